//! A `redis-server` of a test's own.

/// A `redis-server` of the test's own on a free port (never the machine's shared Redis): the broker of a Celery test,
/// which may crash it (`SIGKILL`), stop it (`SIGTERM`) and start it again on the same port and directory. Killed on
/// drop. `extra` arguments go to every start (`--appendonly yes --appendfsync always` for a durable one,
/// `--requirepass …`).
pub struct RedisServer {
    port: u16,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// No persistence: a scratch broker.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Append-only with an fsync per write: what it acknowledged survives `crash` + `spawn`.
    pub fn durable() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("a free port: {e}"))
            .port();
        let mut server = Self {
            port,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            dir: tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}")),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>` (no database, no password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it answers `PING` — with `PONG`, or `NOAUTH` when a password is
    /// set — not while it is still loading its data.
    pub fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server on PATH: {e}"));
        self.child = Some(child);
        let started = std::time::Instant::now();
        while !self.answers() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut reply = [0u8; 64];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read(&mut reply).is_ok_and(|n| {
                reply[..n].starts_with(b"+PONG") || reply[..n].starts_with(b"-NOAUTH")
            })
    }

    /// `SIGKILL`: gone at once, as in a crash (a durable server keeps what it acknowledged).
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SIGTERM` (the server flushes its append-only file), then starts again on the same port.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.crash();
    }
}
