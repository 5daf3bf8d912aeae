//! What the worker does about having been paused: the held delivery tags, checked against `unacked` after a
//! pause, and those another worker took over.

use super::*;

/// Delivery tags this worker holds, each with the token that stops its task when another worker took it over.
pub(super) type HeldTags = std::collections::HashMap<String, CancellationToken>;

/// What the worker does about having been paused (see `aura_runtime::fence`): a stop of more than half the
/// visibility timeout may have let another worker restore and run the messages this one holds. The fence closes;
/// the held tags are checked against `unacked`; those gone are *taken over* — the committer drops their results,
/// outputs and acknowledgements — and the fence opens again.
#[derive(Clone, Default)]
pub(super) struct Paused {
    pub(super) fence: Fence,
    pub(super) taken_over: Arc<StdMutex<HashSet<String>>>,
}

impl Paused {
    /// Returns once no pause is left unchecked (at once, unless the worker was just woken).
    pub(super) async fn checked(&self) {
        while self.fence.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether any message was taken over and not yet met (one lock, for the common answer: no).
    pub(super) fn any_taken(&self) -> bool {
        self.taken_over
            .lock()
            .map(|set| !set.is_empty())
            .unwrap_or(false)
    }

    /// Whether `tag` was taken over (kept: see [`Paused::take`]).
    pub(super) fn is_taken(&self, tag: Option<&str>) -> bool {
        tag.is_some_and(|tag| {
            self.taken_over
                .lock()
                .map(|set| set.contains(tag))
                .unwrap_or(false)
        })
    }

    /// Whether `tag` was taken over (and forgets it: it is met once).
    pub(super) fn take(&self, tag: &str) -> bool {
        self.taken_over
            .lock()
            .map(|mut set| set.remove(tag))
            .unwrap_or(false)
    }

    /// Checks the held tags after the pause `closing` until Redis answers, then opens the fence.
    pub(super) async fn clear(&self, closing: u64, broker: &Broker, held: &StdMutex<HeldTags>) {
        loop {
            let tags: Vec<String> = held
                .lock()
                .map(|held| held.keys().cloned().collect())
                .unwrap_or_default();
            match broker.taken_over(&tags).await {
                Ok(gone) => {
                    if !gone.is_empty() {
                        tracing::warn!(
                            taken_over = gone.len(),
                            held = tags.len(),
                            "messages this worker held were restored by another worker while it was paused: their results and outputs are dropped here"
                        );
                        metrics::counter!("aura360_celery_taken_over_total")
                            .increment(gone.len() as u64);
                    }
                    // A task still running stops where it is; one already finished is dropped by the committer.
                    if let Ok(held) = held.lock() {
                        for tag in &gone {
                            if let Some(stop) = held.get(tag) {
                                stop.cancel();
                            }
                        }
                    }
                    if let Ok(mut set) = self.taken_over.lock() {
                        set.extend(gone);
                    }
                    if self.fence.open_if(closing) {
                        tracing::info!("held messages checked after the pause: writing again");
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot check the held messages after the pause; writing nothing until Redis answers");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
