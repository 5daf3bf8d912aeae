//! Test doubles shared by handler and integration tests (feature `testing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use aura_embed::HashEmbedder;
use aura_store::{CollectionSpec, Distance, EdgeStore, InterceptedStore, StoreError, VectorStore};

use crate::HandlerContext;

pub const TEST_DIM: usize = 64;

/// A handler context on a real embedded store in a temporary directory.
///
/// Fields drop in order: the context and store (closing the shard, which flushes) before the directory goes.
pub struct Embedded {
    pub ctx: HandlerContext,
    pub store: Arc<EdgeStore>,
    _dir: tempfile::TempDir,
}

pub fn embedded() -> Embedded {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    let spec = CollectionSpec {
        name: "user_context".into(),
        dimension: TEST_DIM,
        distance: Distance::Cosine,
    };
    let store =
        Arc::new(EdgeStore::open(dir.path(), spec).unwrap_or_else(|e| panic!("open store: {e}")));
    Embedded {
        ctx: context_with(store.clone()),
        store,
        _dir: dir,
    }
}

pub fn context_with(store: Arc<dyn VectorStore>) -> HandlerContext {
    HandlerContext {
        store,
        embedder: Arc::new(HashEmbedder::new(TEST_DIM)),
        embedding_version: "test-v1".into(),
        limits: aura_events::limits::Limits::default(),
    }
}

/// A store that is down for the first `failures` upserts, then writes to `inner`; `attempts` counts every upsert.
pub struct FlakyStore {
    pub store: Arc<InterceptedStore>,
    pub attempts: Arc<AtomicU32>,
}

impl FlakyStore {
    pub fn new(inner: Arc<dyn VectorStore>, failures: u32) -> Self {
        let attempts = Arc::new(AtomicU32::new(0));
        let remaining = AtomicU32::new(failures);
        let counter = attempts.clone();
        let store = InterceptedStore::with_hook(inner, move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            match remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                Ok(_) => Err(StoreError::Unavailable("connection refused (test)".into())),
                Err(_) => Ok(()),
            }
        });
        Self {
            store: Arc::new(store),
            attempts,
        }
    }
}

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

/// Kafka settings of one test against the test broker `AURA_TEST_KAFKA` (`scripts/test.sh` starts it): its own group
/// and topic prefix (`<name>-<random>`), so tests share the broker in parallel; a 6 s session (a dead member is
/// noticed within a test) and a 50 ms fetch wait; the defaults otherwise.
pub fn kafka_settings(name: &str) -> crate::settings::KafkaSettings {
    let bootstrap = std::env::var("AURA_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("AURA_TEST_KAFKA is not set: run the tests with scripts/test.sh")
    });
    let id = uuid::Uuid::new_v4().simple().to_string();
    crate::settings::KafkaSettings {
        bootstrap_servers: bootstrap,
        security_protocol: "PLAINTEXT".into(),
        sasl_mechanism: "PLAIN".into(),
        api_key: None,
        api_secret: None,
        group_id: format!("{name}-{id}"),
        topic_prefix: format!("{name}-{}.", &id[..8]),
        fetch_wait_max_ms: 50,
        session_timeout_ms: 6_000,
        assignment_strategy: "range,roundrobin".into(),
        drain_to_celery: true,
        dead_letter_spool_dir: std::env::temp_dir().join(format!("aura-dead-letters-{id}")),
        message_max_bytes: 1_000_000,
        ordering: crate::settings::KafkaOrdering::Key,
        concurrency: 64,
        max_in_flight_per_partition: 1000,
        max_in_flight: 10_000,
        max_in_flight_bytes: 64 << 20,
    }
}
