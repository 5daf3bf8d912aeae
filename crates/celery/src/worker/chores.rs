//! The worker's start-up recovery and its background chores: the committer, remote control, heartbeats,
//! restoring expired messages, refreshing leases, promoting scheduled tasks, and clearing a pause.

use super::*;

/// Start-up: the queues declared, parked tasks of enabled handlers back on their queues, quarantined messages a
/// stopped worker left dead-lettered, expired `unacked` entries restored. Returns (unparked, restored).
pub(super) async fn recover(
    broker: &Broker,
    options: &WorkerOptions,
    registry: &Registry,
) -> Result<(usize, usize), TransportError> {
    broker.ping(Patience::Forever).await?;
    for queue in &options.queues {
        broker.declare_queue(queue).await?;
    }
    let mut unparked = 0;
    for queue in &options.queues {
        for handler in registry.enabled() {
            unparked += broker.unpark(queue, handler).await?;
        }
    }
    if unparked > 0 {
        tracing::info!(
            unparked,
            "moved parked tasks of enabled handlers back onto their queues"
        );
    }
    for queue in &options.queues {
        match broker
            .sweep_unreadable(queue, |raw| unreadable_entry(queue, raw))
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(queue = %queue, dead_lettered = n, "dead-lettered unreadable messages a stopped worker left in quarantine")
            }
            Err(error) => tracing::warn!(%error, "dead-lettering quarantined messages"),
        }
    }
    let restored = broker.restore_visible().await.unwrap_or_else(|error| {
        tracing::warn!(%error, "restoring expired unacked messages at start-up");
        0
    });
    Ok((unparked, restored))
}

/// What runs beside the fetch loop: the committer, the chores, remote control, the pause watch.
pub(super) struct Background {
    committer: tokio::task::JoinHandle<()>,
    helpers: JoinSet<()>,
    /// Stops the chores.
    chores: CancellationToken,
    /// Cancelled at the shutdown deadline: writes that still wait for Redis give up (their messages stay in
    /// `unacked`, restored after the visibility timeout).
    hard_stop: CancellationToken,
    events: Arc<EventSender>,
    _pause_watch: Option<PauseWatch>,
}

impl Background {
    pub(super) fn start(
        shared: &Arc<Shared>,
        commits: mpsc::Receiver<Commit>,
        observer: Option<Arc<dyn DependencyObserver>>,
    ) -> Self {
        let (broker, options) = (&shared.broker, &shared.options);
        let (pause_tx, mut pauses) = mpsc::unbounded_channel();
        let pause_watch = PauseWatch::spawn(
            shared.paused.fence.clone(),
            Duration::from_millis(100),
            (options.visibility_timeout / 2).max(Duration::from_millis(500)),
            move |closing, _| {
                let _ = pause_tx.send(closing);
            },
        )
        .inspect_err(|error| {
            tracing::warn!(%error, "cannot start the pause watch; a paused worker is not fenced")
        })
        .ok();
        let hard_stop = CancellationToken::new();
        let committer = tokio::spawn(run_committer(
            broker.clone(),
            shared.results.clone(),
            shared.events.clone(),
            commits,
            observer,
            hard_stop.clone(),
            shared.paused.clone(),
        ));
        let chores = CancellationToken::new();
        let mut helpers = JoinSet::new();
        helpers.spawn(serve_control(
            broker.link().clone(),
            shared.events.clone(),
            shared.control.clone(),
            chores.clone(),
        ));
        let events = shared.events.clone();
        helpers.spawn(every(
            Duration::from_secs_f64(HEARTBEAT_SECS),
            chores.clone(),
            move || heartbeat(events.clone()),
        ));
        let (restore_broker, counters) = (broker.clone(), shared.counters.clone());
        helpers.spawn(every(options.restore_interval, chores.clone(), move || {
            restore(restore_broker.clone(), counters.clone())
        }));
        let (lease_broker, held) = (broker.clone(), shared.held.clone());
        helpers.spawn(every(options.lease_interval(), chores.clone(), move || {
            refresh_leases(lease_broker.clone(), held.clone())
        }));
        let (promote_broker, queues) = (
            broker.clone(),
            Arc::<[String]>::from(options.queues.clone()),
        );
        helpers.spawn(every(Duration::from_secs(1), chores.clone(), move || {
            promote(promote_broker.clone(), queues.clone())
        }));
        let (clear_broker, clear_held, clearing) =
            (broker.clone(), shared.held.clone(), shared.paused.clone());
        helpers.spawn(async move {
            while let Some(closing) = pauses.recv().await {
                clearing.clear(closing, &clear_broker, &clear_held).await;
            }
        });
        Self {
            committer,
            helpers,
            chores,
            hard_stop,
            events: shared.events.clone(),
            _pause_watch: pause_watch,
        }
    }

    /// `worker-online` for Flower, and the ready lines (Celery's own words, which runbooks and people grep for).
    pub(super) async fn announce(&self, shared: &Shared) {
        if let Err(error) = self.events.send_worker_event("worker-online").await {
            tracing::warn!(%error, "worker-online event");
        }
        let options = &shared.options;
        tracing::info!(hostname = %options.hostname, queues = %options.queues.join(","),
            concurrency = options.concurrency, prefetch = options.prefetch(), "celery worker ready");
        tracing::info!(hostname = %options.hostname, "{} ready.", options.hostname);
    }

    /// Makes the writes still waiting for Redis give up at `deadline`.
    pub(super) fn stop_writes_at(
        &self,
        deadline: tokio::time::Instant,
    ) -> tokio::task::JoinHandle<()> {
        let hard_stop = self.hard_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            hard_stop.cancel();
        })
    }

    /// Once every message task is gone: the committer writes its queue (or is stopped at the deadline), the
    /// chores stop, and `worker-offline` is sent — each step bounded.
    pub(super) async fn stop(mut self, deadline: tokio::time::Instant) {
        if tokio::time::timeout_at(deadline + Duration::from_millis(200), &mut self.committer)
            .await
            .is_err()
        {
            self.committer.abort();
        }
        self.chores.cancel();
        let helpers_done = tokio::time::timeout(Duration::from_millis(100), async {
            while self.helpers.join_next().await.is_some() {}
        })
        .await;
        if helpers_done.is_err() {
            self.helpers.abort_all();
        }
        let offline = tokio::time::timeout(
            Duration::from_millis(200),
            self.events.send_worker_event("worker-offline"),
        )
        .await;
        match offline {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "worker-offline event"),
            Err(_) => tracing::warn!("worker-offline event not sent: the broker does not answer"),
        }
    }
}

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
