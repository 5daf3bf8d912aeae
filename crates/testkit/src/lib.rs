//! What the tests of every crate share (a dev-dependency only): the services `scripts/test.sh` starts and where they
//! are, servers of a test's own, and waiting for an observed state.
//!
//! - [`python`], [`kafka_bootstrap`]: the Python venv and the Apache Kafka broker of the run (`AURA_TEST_PYTHON`,
//!   `AURA_TEST_KAFKA`); the tests that need them are behind each crate's `services` feature;
//! - [`RedisServer`]: a `redis-server` of the test's own on a free port (never the machine's Redis);
//! - [`EmbeddingServer`]: a stand-in embeddings endpoint;
//! - [`wait_for`], [`poll`], [`wait_until`]: poll for a state, fail with what was awaited after a limit;
//! - [`process`]: a process's peak memory and log lines, a plain HTTP GET.

mod embedding;
pub mod process;
mod redis;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use embedding::EmbeddingServer;
pub use process::{cpu_seconds, http_get, peak_rss, stdout_of, try_http_get, wait_log};
pub use redis::RedisServer;

/// The venv's Python (`AURA_TEST_PYTHON`, set by `scripts/test.sh`), with the pinned foreign clients.
pub fn python() -> PathBuf {
    std::env::var_os("AURA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("AURA_TEST_PYTHON is not set: run the tests with scripts/test.sh")
        })
}

/// The test broker's bootstrap address (`AURA_TEST_KAFKA`, Apache Kafka started by `scripts/test.sh`).
pub fn kafka_bootstrap() -> String {
    std::env::var("AURA_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("AURA_TEST_KAFKA is not set: run the tests with scripts/test.sh")
    })
}

/// `tests/python`: the foreign clients the tests drive.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python")
}

/// Polls `check` every 100 ms until it returns a value; panics naming `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(Duration::from_millis(100), limit, check, || {
        format!("timed out after {limit:?} waiting for {what}")
    })
}

/// Polls `check` every `every` until it returns a value; after `limit`, panics with `failure()` (a message built
/// only then, so it can show what a process logged by that time).
pub fn poll<T>(
    every: Duration,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
    failure: impl FnOnce() -> String,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if started.elapsed() >= limit {
            panic!("{}", failure());
        }
        std::thread::sleep(every);
    }
}

/// [`wait_for`] in async code: polls `done` every 50 ms; `Err` naming `what` after `limit`.
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() >= limit {
            return Err(format!("{what}: not observed within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
