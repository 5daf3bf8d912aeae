//! Helpers shared by the process-level tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Peak resident memory of process `pid` so far (the kernel's `VmHWM`), in bytes; 0 once it has exited.
#[allow(dead_code)] // not every test binary measures memory
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A plain HTTP/1.1 GET: status and body. (Not every test binary that includes this module serves HTTP.)
#[allow(dead_code)]
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path} failed"))
}

/// `http_get`, or `None` while nothing answers (the process is still starting).
#[allow(dead_code)]
pub fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Waits until the log file `log` of process `child` holds `text` at least `times` times; panics if the process
/// exits first or `limit` passes.
#[allow(dead_code)]
pub fn wait_log(
    child: &mut std::process::Child,
    log: &std::path::Path,
    text: &str,
    times: usize,
    limit: std::time::Duration,
) {
    let started = std::time::Instant::now();
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    while read().matches(text).count() < times {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited ({status}) before logging {text:?}:\n{}", read());
        }
        assert!(
            started.elapsed() < limit,
            "{text:?} not logged {times} times:\n{}",
            read()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `tests/python/embedding_server.py`: an OpenAI-compatible embeddings endpoint answering 503 for its first
/// `down_seconds` (counted from its first request), then real vectors.
#[allow(dead_code)] // not every test binary uses every part
pub struct EmbeddingServer {
    child: Child,
    port: u16,
    log: PathBuf,
    gate: PathBuf,
}

#[allow(dead_code)]
impl EmbeddingServer {
    /// Started with `python` (the venv's), its port file and request log in `dir`.
    pub fn start(python: &Path, dir: &Path, down_seconds: u32) -> Self {
        Self::start_delayed(python, dir, down_seconds, 0)
    }

    /// [`EmbeddingServer::start`], answering each request after 0..`max_delay_ms` ms (varying per text).
    pub fn start_delayed(python: &Path, dir: &Path, down_seconds: u32, max_delay_ms: u32) -> Self {
        let port_file = dir.join(format!("embedder-{}.port", uuid::Uuid::new_v4().simple()));
        let log = port_file.with_extension("log");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/embedding_server.py");
        let child = Command::new(python)
            .arg(script)
            .arg(&port_file)
            .arg(down_seconds.to_string())
            .arg(max_delay_ms.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "embedding server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let gate = PathBuf::from(format!("{}.gate", port_file.display()));
        Self {
            child,
            port,
            log,
            gate,
        }
    }

    /// Holds every request from now on (answered once [`EmbeddingServer::open_gate`] is called).
    pub fn close_gate(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }

    pub fn open_gate(&self) {
        std::fs::remove_file(&self.gate).unwrap();
    }

    /// Requests waiting at the closed gate now.
    pub fn held(&self) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let count = |word: &str| log.lines().filter(|l| *l == word).count();
        count("held") - count("released")
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests answered 503, and requests answered with vectors.
    pub fn requests(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let count = |status: &str| log.lines().filter(|l| l.starts_with(status)).count();
        (count("503"), count("200"))
    }
}

impl Drop for EmbeddingServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The point ids in the embedded stores under `roots` (each a process's `QDRANT_PATH`, its process stopped):
/// (their union, the sum of each store's count). A root without the collection counts as empty.
#[allow(dead_code)] // not every test binary runs several processes
pub fn points_in_stores(
    roots: &[&Path],
    dimension: usize,
) -> (std::collections::HashSet<String>, usize) {
    use aura_runtime::store::{CollectionSpec, Distance, EdgeStore, VectorStore};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _inside = runtime.enter();
    let mut union = std::collections::HashSet::new();
    let mut total = 0;
    for root in roots {
        if !root.join("user_context").exists() {
            continue;
        }
        let spec = CollectionSpec {
            name: "user_context".into(),
            dimension,
            distance: Distance::Cosine,
        };
        let store = EdgeStore::open(root, spec).unwrap();
        let count = runtime.block_on(store.count(None)).unwrap() as usize;
        let probe = vec![1.0 / (dimension as f32).sqrt(); dimension];
        let hits = runtime
            .block_on(store.search(probe, None, count + 10))
            .unwrap();
        assert_eq!(
            hits.len(),
            count,
            "{}: a search for every point",
            root.display()
        );
        total += count;
        union.extend(hits.into_iter().map(|h| h.id));
    }
    (union, total)
}
