//! The worker's background chores: heartbeats, restoring expired messages, refreshing leases, promoting
//! scheduled tasks.

use super::*;

/// Runs `tick` every `interval` (after each one ends) until `stop`: the worker's background chores.
pub(super) async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        tick().await;
    }
}

pub(super) async fn heartbeat(events: Arc<EventSender>) {
    match events.send_worker_event("worker-heartbeat").await {
        Ok(()) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("aura360_celery_heartbeat_timestamp_seconds").set(now);
        }
        Err(error) => tracing::debug!(%error, "heartbeat not sent"),
    }
}

/// Restores what dead workers left in `unacked` past the visibility timeout.
pub(super) async fn restore(broker: Arc<Broker>, counters: Arc<Counters>) {
    match broker.restore_visible().await {
        Ok(0) => {}
        Ok(n) => {
            counters.restored.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(
                restored = n,
                "restored messages left unacknowledged past the visibility timeout"
            );
        }
        Err(error) => tracing::warn!(%error, "visibility restore failed"),
    }
}

/// Keeps the leases of held messages fresh (see [`Broker::refresh_leases`]).
pub(super) async fn refresh_leases(broker: Arc<Broker>, held: Arc<StdMutex<HeldTags>>) {
    let tags: Vec<String> = held
        .lock()
        .map(|held| held.keys().cloned().collect())
        .unwrap_or_default();
    if tags.is_empty() {
        return;
    }
    if let Err(error) = broker.refresh_leases(&tags).await {
        tracing::warn!(%error, held = tags.len(),
            "could not refresh the leases of held messages; if this lasts past the visibility timeout they are restored and may run twice");
    }
}

/// Moves due scheduled tasks from `<queue>.delayed` back onto their queues.
pub(super) async fn promote(broker: Arc<Broker>, queues: Arc<[String]>) {
    for queue in queues.iter() {
        match broker.promote_due(queue, 500).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(queue = %queue, due = n, "scheduled tasks due: back on their queue")
            }
            Err(error) => {
                tracing::warn!(%error, queue = %queue, "moving due scheduled tasks back")
            }
        }
    }
}
