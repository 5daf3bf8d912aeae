//! The runners: a key's events one after another through the dispatcher, pipelined up to the producer, with
//! retries and backoff; each event's outcome recorded in the window once its outputs are acknowledged.
//!
//! **Pipelining.** A key's next event starts once the previous one's outputs are *handed over* to the producer
//! (queued behind them, so they reach the broker in order) and its points to the store (queued for its writer), not
//! once they are acknowledged and durable; "acknowledged" below covers both ([`aura_runtime::Pending`]). Up to
//! `KAFKA_PIPELINE_DEPTH` events of a key wait for their acknowledgements at once; they are settled oldest first, and
//! an event is finished in the window (so its offset may be committed) only once it and every event of its key
//! before it were acknowledged. When an acknowledgement fails, nothing more of the key is handed over: what was
//! handed over after the failed event settles, then the failed event and all those after it run again, in order,
//! each acknowledged before the next starts, until the key has caught up. Their outputs may then appear twice in the
//! output topic (the first copy of a later event before the failed one's new copy); derived ids are deterministic,
//! so the last copy of each event id is in order and nothing is missing. Skips, dead letters and a disabled handler
//! wait until everything of their key before them settled, so nothing overtakes an unacknowledged event.

use aura_runtime::Pending;

use super::*;

/// What every runner needs.
pub(super) struct RunnerContext {
    pub(super) registry: Arc<Registry>,
    pub(super) dispatcher: Dispatcher,
    pub(super) dead_letters: KafkaPublisher,
    pub(super) retry: RetryPolicy,
    pub(super) max_event_bytes: usize,
    pub(super) spool: PathBuf,
    pub(super) observer: Option<Arc<dyn DependencyObserver>>,
    pub(super) shared: Arc<Shared>,
    /// `KAFKA_CONCURRENCY`: handlers running at once (an event waiting for its acknowledgements holds none).
    pub(super) slots: Semaphore,
    /// `KAFKA_PIPELINE_DEPTH`: events of one key handed over and not yet acknowledged.
    pub(super) depth: usize,
}

/// How one message ended.
pub(super) enum Finished {
    Handled,
    Skipped,
    DeadLettered,
}

/// Where one attempt at a message got to.
pub(super) enum Step {
    /// Handled, its outputs queued in the producer: finished once `Pending` settles.
    Handed(Pending),
    /// Nothing handed over: what to do once everything of its key before it settled.
    Decided(Verdict),
}

/// A message's outcome that hands nothing over.
pub(super) enum Verdict {
    Skipped,
    /// Its handler is disabled: keep it (and everything after it) uncommitted.
    Held(&'static str),
    /// For `<topic>.dlq`.
    DeadLetter {
        handler: String,
        reason: String,
    },
}

/// Why a runner stops before its key is idle.
pub(super) enum End {
    /// Its event's handler is disabled: the partition is held there.
    Held,
    /// Revoked or shutting down while retrying, or the grace period is over: left uncommitted for redelivery.
    Abandoned,
}

/// How settling a key's handed-over events went.
pub(super) enum Settled {
    /// Every one asked for was acknowledged and finished.
    Done,
    /// An acknowledgement failed: the failed event and those after it wait in `Line::again`.
    Redeliver,
    Abandoned,
}

/// One key's events in flight: handed over and waiting for their acknowledgements, or to run again.
#[derive(Default)]
pub(super) struct Line {
    /// Oldest first, each with its settling ([`Pending::settle`]); `true` marks an event running again after a
    /// failed acknowledgement.
    handed: VecDeque<(OwnedMessage, Settling, bool)>,
    /// Events to run again, oldest first, each acknowledged before the next starts.
    again: VecDeque<OwnedMessage>,
    /// Consecutive failed acknowledgements or writes (the backoff's attempt number).
    failures: u32,
}

/// An event's acknowledgements being awaited.
type Settling = futures::future::BoxFuture<'static, Result<(), aura_runtime::Failure>>;

/// Counts a runner out when it ends, however it ends.
pub(super) struct Running(Arc<Partition>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RunnerContext {
    /// Handles `message` and then every message that queues behind its key, in order, until none waits.
    pub(super) async fn run_key(
        self: Arc<Self>,
        part: Arc<Partition>,
        key: u64,
        message: OwnedMessage,
    ) {
        let _running = Running(part.clone());
        let mut line = Line::default();
        let mut next = Ok(Some((message, false)));
        loop {
            let (message, replayed) = match next {
                Ok(Some(next)) => next,
                Ok(None) => return,
                Err(end) => return self.end(&part, key, end),
            };
            next = match self.advance(&part, &mut line, message, replayed).await {
                Ok(()) => self.next_message(&part, key, &mut line).await,
                Err(end) => Err(end),
            };
        }
    }

    /// The runner stops with its key still busy: nothing after an abandoned event can be committed, so the rest of
    /// the window stops too; a held partition stays where it is.
    fn end(&self, part: &Partition, key: u64, end: End) {
        match end {
            End::Held => part.held.store(true, Ordering::Release),
            End::Abandoned => part.abort.cancel(),
        }
        part.book().keys.remove(&key);
    }

    /// Runs `message` up to its hand-over, then settles the oldest handed-over events until at most the pipeline's
    /// depth wait (none for an event running again).
    async fn advance(
        &self,
        part: &Partition,
        line: &mut Line,
        message: OwnedMessage,
        replayed: bool,
    ) -> Result<(), End> {
        let depth = if replayed { 1 } else { self.depth.max(1) };
        let verdict = match self.start(&message, part).await.ok_or(End::Abandoned)? {
            Step::Handed(pending) => {
                line.handed
                    .push_back((message, Box::pin(pending.settle()), replayed));
                return match self.settle(part, line, depth - 1).await {
                    Settled::Done | Settled::Redeliver => Ok(()),
                    Settled::Abandoned => Err(End::Abandoned),
                };
            }
            Step::Decided(verdict) => verdict,
        };
        match self.settle(part, line, 0).await {
            Settled::Done => {}
            Settled::Redeliver => {
                line.again.push_back(message);
                return Ok(());
            }
            Settled::Abandoned => return Err(End::Abandoned),
        }
        let finished = match verdict {
            Verdict::Skipped => Finished::Skipped,
            Verdict::Held(handler) => {
                tracing::warn!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    handler,
                    "handler disabled: partition held at this offset (nothing further committed)"
                );
                self.shared.counters.held.fetch_add(1, Ordering::Relaxed);
                return Err(End::Held);
            }
            Verdict::DeadLetter { handler, reason } => self
                .dead_letter_until_written(&message, part, &handler, &reason)
                .await
                .ok_or(End::Abandoned)?,
        };
        self.finish(part, &message, finished);
        Ok(())
    }

    /// The key's next message: one to run again, or the next waiting behind the key. Before the key is let go
    /// (a new runner may then start for it), everything handed over is settled.
    async fn next_message(
        &self,
        part: &Partition,
        key: u64,
        line: &mut Line,
    ) -> Result<Option<(OwnedMessage, bool)>, End> {
        loop {
            if let Some(again) = line.again.pop_front() {
                return Ok(Some((again, true)));
            }
            if line.handed.is_empty() {
                return Ok(part.book().next_for(key).map(|next| (next, false)));
            }
            if let Some(next) = part.book().next_waiting(key) {
                return Ok(Some((next, false)));
            }
            if let Settled::Abandoned = self.settle(part, line, 0).await {
                return Err(End::Abandoned);
            }
        }
    }

    /// Settles the oldest handed-over events until at most `keep` wait, and then those already acknowledged,
    /// finishing each (so the window moves as soon as it can).
    async fn settle(&self, part: &Partition, line: &mut Line, keep: usize) -> Settled {
        loop {
            let over = line.handed.len() > keep;
            let settled = match line.handed.front_mut() {
                None => break,
                Some((_, settling, _)) if over => tokio::select! {
                    biased;
                    () = part.abort.cancelled() => return Settled::Abandoned,
                    settled = settling => settled,
                },
                Some((_, settling, _)) => match futures::FutureExt::now_or_never(settling) {
                    Some(settled) => settled,
                    None => break,
                },
            };
            let Some((message, _, replayed)) = line.handed.pop_front() else {
                break;
            };
            let failure = match settled {
                Ok(()) => {
                    line.failures = 0;
                    self.finish(part, &message, Finished::Handled);
                    continue;
                }
                Err(failure) => failure,
            };
            if replayed && !failure.error.is_transient() {
                // Refused for good on its own, nothing of its key in flight: its dead letter, in order.
                let handler = failure.handler.unwrap_or("decode");
                let Some(finished) = self
                    .dead_letter_until_written(&message, part, handler, &failure.error.to_string())
                    .await
                else {
                    return Settled::Abandoned;
                };
                self.finish(part, &message, finished);
                continue;
            }
            line.failures += 1;
            let delay = self.retry.delay(line.failures);
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                attempt = line.failures, handed_over_after = line.handed.len(), retry_in_ms = delay.as_millis() as u64,
                error = %failure,
                "an output was not acknowledged or a write not made durable: this event and those of its key handed \
                 over after it run again, in order (nothing after it is committed meanwhile)");
            // What was handed over after it settles first: its outputs may land now and again when it runs again.
            let mut again: VecDeque<OwnedMessage> = VecDeque::with_capacity(line.handed.len() + 1);
            again.push_back(message);
            let mut after = Vec::with_capacity(line.handed.len());
            for (message, settling, _) in line.handed.drain(..) {
                again.push_back(message);
                after.push(settling);
            }
            again.append(&mut line.again);
            line.again = again;
            tokio::select! {
                biased;
                () = part.abort.cancelled() => return Settled::Abandoned,
                _ = futures::future::join_all(after) => {}
            }
            tokio::select! {
                () = part.cancel.cancelled() => return Settled::Abandoned,
                () = tokio::time::sleep(delay) => {}
            }
            return Settled::Redeliver;
        }
        Settled::Done
    }

    /// Counts `message`'s outcome and marks it finished in its window.
    fn finish(&self, part: &Partition, message: &OwnedMessage, finished: Finished) {
        let counters = &self.shared.counters;
        match finished {
            Finished::Handled => counters.handled.fetch_add(1, Ordering::Relaxed),
            Finished::Skipped => counters.skipped.fetch_add(1, Ordering::Relaxed),
            Finished::DeadLettered => counters.dead_lettered.fetch_add(1, Ordering::Relaxed),
        };
        let book = &mut *part.book();
        let (count, bytes) = book.finish(message.offset());
        self.shared.in_flight.fetch_sub(count, Ordering::AcqRel);
        self.shared
            .in_flight_bytes
            .fetch_sub(bytes, Ordering::AcqRel);
        if count > 0
            && self.shared.poller_waits.load(Ordering::Acquire)
            && !self.shared.bounds.reached(book, &self.shared, 2)
        {
            self.shared.room.notify_waiters();
        }
    }

    /// Takes a handler slot and runs `message` up to its hand-over; `None` when the partition is gone (lost, or the
    /// grace period after its revocation is over: an event still running is dropped where it is, its outputs would
    /// be stale work and its new owner runs it), held, or revoked while retrying.
    async fn start(&self, message: &OwnedMessage, part: &Partition) -> Option<Step> {
        if part.abort.is_cancelled() || part.held.load(Ordering::Acquire) {
            return None;
        }
        let _slot = tokio::select! {
            slot = self.slots.acquire() => slot.ok()?,
            () = part.abort.cancelled() => return None,
        };
        tokio::select! {
            biased;
            () = part.abort.cancelled() => None,
            step = self.attempts(message, part) => step,
        }
    }

    /// Attempts until one is not a transient failure; `None` when the partition is revoked or the process stops.
    async fn attempts(&self, message: &OwnedMessage, part: &Partition) -> Option<Step> {
        self.with_backoff(message, part, "transient failure", || self.attempt(message))
            .await
    }

    /// Runs `attempt` until it succeeds, backing off (and logging `failure`) after each error; `None` when the
    /// partition is revoked or the process stops first. Meanwhile the key waits.
    async fn with_backoff<T, F>(
        &self,
        message: &OwnedMessage,
        part: &Partition,
        failure: &'static str,
        mut attempt: impl FnMut() -> F,
    ) -> Option<T>
    where
        F: Future<Output = Result<T, String>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(done) => return Some(done),
                Err(error) => error,
            };
            let delay = self.retry.delay(attempts);
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                attempt = attempts, retry_in_ms = delay.as_millis() as u64, %error, failure,
                "retrying (its key waits)");
            tokio::select! {
                () = part.cancel.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt; `Err` is a transient failure worth retrying.
    async fn attempt(&self, message: &OwnedMessage) -> Result<Step, String> {
        // Types routed by header to no handler never reach a runner (the poller finished them).
        let event = match decode_event(message, self.max_event_bytes) {
            Ok(event) => event,
            Err(reason) => {
                return Ok(Step::Decided(Verdict::DeadLetter {
                    handler: "decode".into(),
                    reason,
                }));
            }
        };
        match self.dispatcher.hand_over(&event).await {
            Ok((Outcome::Handled { .. }, pending)) => Ok(Step::Handed(pending)),
            Ok((Outcome::Unhandled, _)) => Ok(Step::Decided(Verdict::Skipped)),
            Ok((Outcome::Disabled { handler }, _)) => Ok(Step::Decided(Verdict::Held(handler))),
            Err(failure) if failure.error.is_transient() => Err(failure.to_string()),
            Err(failure) => Ok(Step::Decided(Verdict::DeadLetter {
                handler: failure.handler.unwrap_or("decode").into(),
                reason: failure.error.to_string(),
            })),
        }
    }

    /// [`RunnerContext::dead_letter`], retried with backoff while it fails; `None` when the partition is revoked or
    /// the process stops first.
    async fn dead_letter_until_written(
        &self,
        message: &OwnedMessage,
        part: &Partition,
        handler: &str,
        reason: &str,
    ) -> Option<Finished> {
        self.with_backoff(message, part, "dead letter not written", || {
            self.dead_letter(message, handler, reason)
        })
        .await
    }

    /// The original bytes, key and headers to `<topic>.dlq`, plus why; acknowledged before the source is committed.
    ///
    /// A record too large for the producer keeps its headers and the start of its value, with `original_size` and
    /// `original_sha256`. When the dead-letter topic refuses the record for good (authorization, a topic-level size
    /// limit), it is appended to the spool on disk instead, `/health` turns degraded and the partition moves on:
    /// holding it forever would stop every later event of the partition for one that is kept anyway. Only when
    /// even the spool cannot be written does this fail (transient: the lane retries, loudly).
    pub(super) async fn dead_letter(
        &self,
        message: &OwnedMessage,
        handler: &str,
        reason: &str,
    ) -> Result<Finished, String> {
        let letter = DeadLetterRecord::new(
            message,
            handler,
            reason,
            self.dead_letters.message_max_bytes(),
        );
        let record = letter.record(message);
        let sent = self.dead_letters.send(record).await;
        let observe = |outcome| {
            if let Some(observer) = &self.observer {
                observer.report(names::DEAD_LETTERS, outcome);
            }
        };
        match sent {
            Ok(_) => observe(Ok(())),
            Err(error) if crate::publisher::is_permanent(&error) => {
                let why = format!("{} refused the dead letter: {error}", letter.topic);
                self.spool(message, &letter, &why).await?;
                observe(Err(format!(
                    "{why}; dead letters are spooled under {} (fix the topic's ACL or max.message.bytes, then \
                     `vectordb replay --file` them)",
                    self.spool.display()
                )));
            }
            Err(error) => {
                observe(Err(format!("writing to {}: {error}", letter.topic)));
                return Err(format!(
                    "writing the dead letter to {}: {error}",
                    letter.topic
                ));
            }
        }
        tracing::warn!(source_topic = message.topic(), partition = message.partition(), offset = message.offset(),
            handler, reason, dead_letter_topic = %letter.topic, "dead-lettered");
        metrics::counter!("aura360_dead_letters_total", "backend" => "kafka", "handler" => handler.to_owned())
            .increment(1);
        Ok(Finished::DeadLettered)
    }

    /// Appends the dead letter (whole original value, every header) to `<spool>/<topic>.dlq.jsonl`, synced.
    pub(super) async fn spool(
        &self,
        message: &OwnedMessage,
        letter: &DeadLetterRecord,
        why: &str,
    ) -> Result<(), String> {
        let mut exported = crate::offsets::exported(message);
        exported.topic = letter.topic.clone();
        exported.headers.extend(
            letter
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone())),
        );
        exported.headers.remove(TRUNCATION_HEADERS[0]);
        exported.headers.remove(TRUNCATION_HEADERS[1]);
        exported.headers.remove(TRUNCATION_HEADERS[2]);
        let mut line = serde_json::to_vec(&exported).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let path = self.spool.join(format!("{}.jsonl", letter.topic));
        let written = tokio::task::spawn_blocking({
            let path = path.clone();
            move || append_synced(&path, &line)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match written {
            Ok(()) => {
                tracing::error!(source_topic = message.topic(), partition = message.partition(),
                    offset = message.offset(), spool = %path.display(), error = why,
                    "dead letter spooled to disk: the dead-letter topic refused it (fix its ACL or size limit, then \
                     `vectordb replay --file` the spool)");
                metrics::counter!("aura360_dead_letters_spooled_total", "backend" => "kafka")
                    .increment(1);
                Ok(())
            }
            Err(error) => Err(format!(
                "{why}, and spooling it to {} failed: {error}",
                path.display()
            )),
        }
    }
}
