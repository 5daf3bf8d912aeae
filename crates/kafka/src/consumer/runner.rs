//! The runners: one event of a key at a time through the dispatcher, with retries and backoff, then its outcome
//! recorded in the window.

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
    /// `KAFKA_CONCURRENCY`.
    pub(super) slots: Semaphore,
}

/// How one message ended.
pub(super) enum Finished {
    Handled,
    Skipped,
    DeadLettered,
    /// Its handler is disabled: keep it (and everything after it) uncommitted.
    Held(&'static str),
    /// Revoked or shutting down while retrying: left uncommitted for redelivery.
    Abandoned,
}

/// Counts a runner out when it ends, however it ends.
pub(super) struct Running(Arc<Partition>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RunnerContext {
    /// Handles `message` and then every message that queues behind its key, one at a time, until none waits.
    pub(super) async fn run_key(
        self: Arc<Self>,
        part: Arc<Partition>,
        key: u64,
        mut message: OwnedMessage,
    ) {
        let running = Running(part.clone());
        loop {
            let finished = if part.abort.is_cancelled() || part.held.load(Ordering::Acquire) {
                Finished::Abandoned
            } else {
                let slot = tokio::select! {
                    slot = self.slots.acquire() => slot.ok(),
                    () = part.abort.cancelled() => None,
                };
                match slot {
                    // Once the partition is gone (lost, or the grace period after its revocation is over) an event
                    // still running is dropped where it is: its outputs would be stale work, its new owner runs it.
                    Some(_slot) => tokio::select! {
                        biased;
                        () = part.abort.cancelled() => Finished::Abandoned,
                        finished = self.process(&message, &part) => finished,
                    },
                    None => Finished::Abandoned,
                }
            };
            let counters = &self.shared.counters;
            match finished {
                Finished::Handled => counters.handled.fetch_add(1, Ordering::Relaxed),
                Finished::Skipped => counters.skipped.fetch_add(1, Ordering::Relaxed),
                Finished::DeadLettered => counters.dead_lettered.fetch_add(1, Ordering::Relaxed),
                Finished::Held(handler) => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        handler,
                        "handler disabled: partition held at this offset (nothing further committed)"
                    );
                    counters.held.fetch_add(1, Ordering::Relaxed);
                    part.held.store(true, Ordering::Release);
                    part.book().keys.remove(&key);
                    return;
                }
                Finished::Abandoned => {
                    // Nothing after an abandoned event can be committed: stop the rest of the window too.
                    part.abort.cancel();
                    part.book().keys.remove(&key);
                    return;
                }
            };
            let next = {
                let mut book = part.book();
                let (count, bytes) = book.finish(message.offset());
                self.shared.in_flight.fetch_sub(count, Ordering::AcqRel);
                self.shared
                    .in_flight_bytes
                    .fetch_sub(bytes, Ordering::AcqRel);
                if count > 0
                    && self.shared.poller_waits.load(Ordering::Acquire)
                    && !self.shared.bounds.reached(&book, &self.shared, 2)
                {
                    self.shared.room.notify_waiters();
                }
                book.next_for(key)
            };
            match next {
                Some(next) => message = next,
                None => break,
            }
        }
        drop(running);
    }

    /// Decodes, dispatches and dead-letters one message, retrying transient failures until they pass or the
    /// partition is revoked or the process stops.
    pub(super) async fn process(&self, message: &OwnedMessage, part: &Partition) -> Finished {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.attempt(message).await {
                Ok(finished) => return finished,
                Err(error) => error,
            };
            let delay = self.retry.delay(attempt);
            tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                attempt, retry_in_ms = delay.as_millis() as u64, %error, "transient failure; retrying (its key waits)");
            tokio::select! {
                () = part.cancel.cancelled() => return Finished::Abandoned,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt; `Err` is a transient failure worth retrying.
    pub(super) async fn attempt(&self, message: &OwnedMessage) -> Result<Finished, String> {
        // Types routed by header to no handler never reach a runner (the poller finished them).
        let event = match decode_event(message, self.max_event_bytes) {
            Ok(event) => event,
            Err(reason) => return self.dead_letter(message, "decode", &reason).await,
        };
        match self.dispatcher.dispatch(&event).await {
            Ok(Outcome::Handled { .. }) => Ok(Finished::Handled),
            Ok(Outcome::Unhandled) => Ok(Finished::Skipped),
            Ok(Outcome::Disabled { handler }) => Ok(Finished::Held(handler)),
            Err(failure) if failure.error.is_transient() => Err(failure.to_string()),
            Err(failure) => {
                let handler = failure.handler.unwrap_or("decode");
                self.dead_letter(message, handler, &failure.error.to_string())
                    .await
            }
        }
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
