//! The fence that keeps a *paused* process from writing work that another process has taken over.
//!
//! A process that is stopped (SIGSTOP, a frozen VM, a debugger) past its group's session timeout (Kafka) or the
//! visibility timeout (Celery) has lost its work to another member, but it does not know yet when it wakes up: its
//! handlers carry on where they were. A [`PauseWatch`] thread notices the jump in time and closes the [`Fence`]; the
//! mount opens it again once it has re-established what it still owns (Kafka: the group told it its assignment, or
//! a heartbeat round passed without a revocation; Celery: every in-flight message was checked against `unacked`).
//! While the fence is closed, the dispatcher starts no handler and publishes nothing, and a [`FencedStore`] writes
//! nothing: each waits for the fence to open (at most [`FENCE_WAIT`], then fails transiently), while the mount stops
//! the work that is no longer its own (Kafka: the lost partition's events; Celery: the restored messages).
//!
//! A write already under way when the process was stopped completes when it wakes up: no client-side check can
//! stop it (docs/design.md §4). Its result is the same point a redelivery writes (point ids are deterministic).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aura_store::{Durable, Layered, Point, StoreError, StoreLayer, VectorStore};

/// How long a write waits for a closed fence before it fails (transiently): clearing takes a heartbeat round or
/// one Redis round trip; a fence closed longer than this is a member that cannot reach its broker.
pub const FENCE_WAIT: Duration = Duration::from_secs(30);

/// Open (work may be written) or closed (a pause was detected and not yet cleared). Cheap to clone; every clone is
/// the same fence.
#[derive(Clone)]
pub struct Fence(Arc<FenceState>);

struct FenceState {
    /// The [`PauseWatch`]'s last tick (nanoseconds since `base`; 0: no watch) and how late it may be. A check that
    /// finds the tick older than that treats the fence as closed: a process that was just woken may run its
    /// handlers before the watch thread has run its first tick and closed the fence.
    base: Instant,
    beat: AtomicU64,
    late_after: AtomicU64,
    closed: AtomicBool,
    /// Bumped at every close: a mount opens only the closing it has cleared.
    closings: AtomicU64,
    refused: AtomicU64,
    reason: Mutex<String>,
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("closed", &self.is_closed())
            .field("closings", &self.closing())
            .finish()
    }
}

impl Default for Fence {
    fn default() -> Self {
        Self(Arc::new(FenceState {
            base: Instant::now(),
            beat: AtomicU64::new(0),
            late_after: AtomicU64::new(u64::MAX),
            closed: AtomicBool::new(false),
            closings: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            reason: Mutex::new(String::new()),
        }))
    }
}

impl Fence {
    pub fn new() -> Self {
        Self::default()
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.0.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// The watch's tick: the process is running.
    fn beat(&self) {
        self.0.beat.store(self.now_nanos(), Ordering::Release);
    }

    /// The watch is late: the process was stopped and the watch has not run since it woke.
    fn watch_is_late(&self) -> bool {
        let beat = self.0.beat.load(Ordering::Acquire);
        beat != 0
            && self.now_nanos().saturating_sub(beat) > self.0.late_after.load(Ordering::Acquire)
    }

    /// Closes the fence; returns the closing's number (for [`Fence::open_if`]).
    pub fn close(&self, reason: String) -> u64 {
        *self.reason_lock() = reason;
        let closing = self.0.closings.fetch_add(1, Ordering::AcqRel) + 1;
        self.0.closed.store(true, Ordering::Release);
        metrics::counter!("aura360_pauses_detected_total").increment(1);
        closing
    }

    /// Opens the fence if no later closing happened since `closing` was read.
    pub fn open_if(&self, closing: u64) -> bool {
        if self.0.closings.load(Ordering::Acquire) != closing {
            return false;
        }
        self.0.closed.store(false, Ordering::Release);
        true
    }

    /// The number of the latest closing (0: never closed).
    pub fn closing(&self) -> u64 {
        self.0.closings.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire) || self.watch_is_late()
    }

    /// `Err(reason)` while closed (counted in `aura360_fenced_writes_total`).
    pub fn check(&self) -> Result<(), String> {
        if !self.is_closed() {
            return Ok(());
        }
        self.count_fenced();
        Err(self.refusal())
    }

    /// Waits while the fence is closed, at most `limit`; then `Err(reason)` if it is still closed. A write that met
    /// the fence closed is counted once (`aura360_fenced_writes_total`), however it ends (it may also be dropped
    /// while it waits, when the mount finds its work taken over).
    pub async fn wait_open(&self, limit: Duration) -> Result<(), String> {
        if !self.is_closed() {
            return Ok(());
        }
        self.count_fenced();
        let started = Instant::now();
        while self.is_closed() {
            if started.elapsed() >= limit {
                return Err(self.refusal());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn count_fenced(&self) {
        self.0.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("aura360_fenced_writes_total").increment(1);
    }

    fn refusal(&self) -> String {
        format!(
            "this process was paused and does not yet know what it still owns ({})",
            self.reason_lock()
        )
    }

    /// Writes that met the fence closed so far.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }

    fn reason_lock(&self) -> std::sync::MutexGuard<'_, String> {
        // Only plain assignments happen under this lock.
        self.0
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A thread that ticks every `tick` and closes `fence` when it finds that more than `limit` passed since its last
/// tick: the whole process was stopped (a thread that only sleeps is not late by seconds otherwise). `on_pause` is
/// called with the closing's number, so the mount can start clearing it. The thread ends when this is dropped.
pub struct PauseWatch {
    stop: Arc<AtomicBool>,
}

impl PauseWatch {
    pub fn spawn(
        fence: Fence,
        tick: Duration,
        limit: Duration,
        on_pause: impl Fn(u64, Duration) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        fence.0.late_after.store(
            u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Release,
        );
        fence.beat();
        std::thread::Builder::new()
            .name("pause-watch".into())
            .spawn(move || {
                let mut last = Instant::now();
                while !stopped.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                    let now = Instant::now();
                    let gap = now.duration_since(last);
                    last = now;
                    if gap > limit {
                        let closing = fence.close(format!(
                            "no progress for {:.1} s (stopped, or frozen)",
                            gap.as_secs_f64()
                        ));
                        tracing::warn!(
                            paused_s = gap.as_secs_f64(),
                            "this process was paused; writing nothing until it knows what it still owns"
                        );
                        on_pause(closing, gap);
                    }
                    // Only after a late tick has closed the fence: whoever finds this beat fresh finds it closed.
                    fence.beat();
                }
            })
            .map(|_| Self { stop })
    }
}

impl Drop for PauseWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A store layer that writes only while its [`Fence`] is open; reads always pass.
pub struct Fenced(pub Fence);

/// A store whose writes wait for the fence.
pub type FencedStore = Layered<Fenced>;

#[async_trait]
impl StoreLayer for Fenced {
    async fn hand_over(
        &self,
        inner: &dyn VectorStore,
        points: Vec<Point>,
    ) -> Result<Durable, StoreError> {
        self.0
            .wait_open(FENCE_WAIT)
            .await
            .map_err(StoreError::Unavailable)?;
        inner.hand_over(points).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_fence_refuses_until_the_closing_it_cleared_is_the_latest() {
        let fence = Fence::new();
        assert!(fence.check().is_ok());
        let first = fence.close("paused".into());
        assert!(fence.check().unwrap_err().contains("paused"));
        let second = fence.close("paused again".into());
        // Clearing the first closing does not open what the second closed.
        assert!(!fence.open_if(first));
        assert!(fence.is_closed());
        assert!(fence.open_if(second));
        assert!(fence.check().is_ok());
        assert_eq!(fence.refused(), 1);
    }

    #[test]
    fn a_fence_whose_watch_is_late_is_closed_before_the_watch_runs() {
        let fence = Fence::new();
        fence.0.late_after.store(1_000_000, Ordering::Release);
        fence.beat();
        std::thread::sleep(Duration::from_millis(5));
        assert!(fence.is_closed());
        assert!(fence.check().is_err());
        fence.beat();
        assert!(!fence.is_closed());
    }

    #[test]
    fn the_watch_closes_the_fence_when_its_thread_is_late() {
        let fence = Fence::new();
        let (tx, rx) = std::sync::mpsc::channel();
        // A limit below the tick: every tick is "late", as a stopped process's first tick after SIGCONT.
        let _watch = PauseWatch::spawn(
            fence.clone(),
            Duration::from_millis(20),
            Duration::from_millis(1),
            move |closing, _| {
                let _ = tx.send(closing);
            },
        )
        .unwrap();
        let closing = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(closing >= 1);
        assert!(fence.is_closed());
    }
}
