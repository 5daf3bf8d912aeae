//! What the consumer does about having been paused (`aura_runtime::fence`): the pause watch, and when the fence
//! opens again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aura_runtime::{Fence, PauseWatch};
/// librdkafka's heartbeat interval for a session: its default (3 s), or a third of a shorter session.
pub(crate) fn heartbeat_interval_ms(session_timeout_ms: u32) -> u32 {
    (session_timeout_ms / 3).clamp(100, 3_000)
}

/// What the consumer does about having been paused (see `aura_runtime::fence`).
///
/// A stop of more than half the session (`session.timeout.ms`) may have cost the membership: the broker gave the
/// partitions to the other members, which process what this one had in flight. When such a pause is seen the fence
/// closes. It opens again once the group has spoken: an assignment after the pause (the partitions that were lost
/// came first, as a revocation that gave their events up), or two heartbeat intervals with no revocation (librdkafka
/// sends its overdue heartbeat at once on waking, and a member that is still one hears nothing).
pub(crate) struct Paused {
    fence: Fence,
    limit: Duration,
    confirm_after: Duration,
    assignments: AtomicU64,
    /// The closing to clear: its number, when it was seen and the assignments counted then.
    pending: Mutex<Option<(u64, Instant, u64)>>,
}

impl Paused {
    pub(crate) fn new(fence: Fence, session_timeout_ms: u32) -> Self {
        let session = Duration::from_millis(u64::from(session_timeout_ms));
        Self {
            fence,
            limit: (session / 2).max(Duration::from_millis(500)),
            confirm_after: Duration::from_millis(
                2 * u64::from(heartbeat_interval_ms(session_timeout_ms)) + 500,
            ),
            assignments: AtomicU64::new(0),
            pending: Mutex::new(None),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Option<(u64, Instant, u64)>> {
        // Only plain assignments happen under this lock.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the watch thread (it stops when the result is dropped); a failure to start it is logged and the
    /// consumer runs unfenced.
    pub(crate) fn watch(this: &Arc<Self>) -> Option<PauseWatch> {
        let weak = Arc::downgrade(this);
        let started = PauseWatch::spawn(
            this.fence.clone(),
            Duration::from_millis(100),
            this.limit,
            move |closing, _| {
                if let Some(paused) = weak.upgrade() {
                    let assignments = paused.assignments.load(Ordering::Acquire);
                    *paused.pending() = Some((closing, Instant::now(), assignments));
                }
            },
        );
        started
            .inspect_err(|error| {
                tracing::warn!(%error, "cannot start the pause watch; a paused consumer is not fenced")
            })
            .ok()
    }

    pub(crate) fn assigned(&self) {
        self.assignments.fetch_add(1, Ordering::AcqRel);
    }

    /// Opens the fence once the group has spoken since the pause (see the type's docs).
    pub(crate) fn clear_if_confirmed(&self) {
        let mut pending = self.pending();
        let Some((closing, seen, assignments)) = *pending else {
            return;
        };
        let reassigned = self.assignments.load(Ordering::Acquire) > assignments;
        if (reassigned || seen.elapsed() >= self.confirm_after) && self.fence.open_if(closing) {
            tracing::info!(
                reassigned,
                "membership confirmed after the pause: writing again"
            );
            *pending = None;
        } else if self.fence.closing() != closing {
            // A later pause replaced this one; the watch recorded it.
            *pending = None;
        }
    }
}
