//! A stand-in OpenAI-compatible embeddings endpoint (`tests/python/embedding_server.py`) that can be down, slow, or
//! hold every request at a gate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `tests/python/embedding_server.py`: an OpenAI-compatible embeddings endpoint answering 503 for its first
/// `down_seconds` (counted from its first request), then real vectors.
pub struct EmbeddingServer {
    child: Child,
    port: u16,
    log: PathBuf,
    gate: PathBuf,
}

impl EmbeddingServer {
    /// Started with `python` (the venv's), its port file and request log in `dir`.
    pub fn start(python: &Path, dir: &Path, down_seconds: u32) -> Self {
        Self::start_delayed(python, dir, down_seconds, 0)
    }

    /// [`EmbeddingServer::start`], answering each request after 0..`max_delay_ms` ms (varying per text).
    pub fn start_delayed(python: &Path, dir: &Path, down_seconds: u32, max_delay_ms: u32) -> Self {
        let port_file = dir.join(format!("embedder-{}.port", uuid::Uuid::new_v4().simple()));
        let log = port_file.with_extension("log");
        let script = crate::python_dir().join("embedding_server.py");
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
