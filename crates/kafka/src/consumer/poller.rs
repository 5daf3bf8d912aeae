//! The poller: the one task that polls the consumer, hands each record to its partition's window and keeps the
//! group session alive while work is slow.

use super::*;

pub(super) struct Poller {
    pub(super) consumer: Arc<StreamConsumer<MountContext>>,
    pub(super) runners: Arc<RunnerContext>,
    /// Record keys are hashed to one `u64`: two keys that collide merely wait for each other.
    pub(super) keys: std::collections::hash_map::RandomState,
    pub(super) ordering: KafkaOrdering,
}

/// The key of a record without one (its own ordering group).
pub(super) const NO_KEY: u64 = u64::MAX;

/// How long the poller waits for a full window to drain before it pauses the partition. While it waits nothing is
/// fetched for any partition, so this is short: 200 ms left the other partitions' windows running dry (5,600–6,600
/// events/s on the Kafka bench against 7,700–8,100 with 20 ms; BENCHMARKS.md); a paused partition's prefetched
/// records are fetched again on resume.
pub(super) const ROOM_WAIT: Duration = Duration::from_millis(20);

/// A record of a type no handler here knows: booked as finished at once (counted, never decoded).
fn skip(shared: &Shared, part: &Partition, offset: i64) {
    aura_runtime::count_skipped();
    shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
    let mut book = part.book();
    book.window.push_back(Slot {
        offset,
        bytes: 0,
        done: false,
    });
    shared.in_flight.fetch_add(1, Ordering::AcqRel);
    let (count, _) = book.finish(offset);
    shared.in_flight.fetch_sub(count, Ordering::AcqRel);
}

impl Poller {
    pub(super) async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutdown requested: no further fetching, finishing in-flight events");
                    return;
                }
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        last_error = None;
                        let full = self.route(&message);
                        drop(message);
                        if let Some(part) = full {
                            self.make_room(&part).await;
                        }
                    }
                    Err(error) => {
                        let text = error.to_string();
                        if last_error.as_deref() != Some(text.as_str()) {
                            tracing::warn!(error = %text, "consumer error (run `vectordb topics create` if a topic is missing)");
                            last_error = Some(text);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = tick.tick() => {
                    self.runners.shared.paused.clear_if_confirmed();
                    let mut lanes = self.runners.shared.lanes();
                    self.store_progress(&mut lanes);
                    let (mut in_flight, mut ahead) = (0, 0);
                    for lane in lanes.iter_mut() {
                        let book = lane.part.book();
                        in_flight += book.window.len();
                        ahead += book.finished_ahead;
                    }
                    metrics::gauge!("aura360_kafka_in_flight_events").set(in_flight as f64);
                    metrics::gauge!("aura360_kafka_finished_ahead_events").set(ahead as f64);
                    self.adjust_pauses(&mut lanes);
                }
            }
        }
    }

    /// Waits (without fetching) until the runners bring the window below half of every bound, as librdkafka's own
    /// prefetch limits hold back the broker meanwhile. A partition still at its bound after [`ROOM_WAIT`] (draining
    /// slower than the others, or stuck: a key retrying, a slow handler holding the window) is paused, so the other
    /// partitions keep flowing; it resumes at the first tick that finds it below half. librdkafka drops a paused
    /// partition's prefetched messages and fetches them again on resume. Under a backlog this happens several times
    /// a second, so it is logged at debug level; a partition that stays full shows in `aura360_kafka_in_flight_events`.
    pub(super) async fn make_room(&self, part: &Arc<Partition>) {
        let shared = &self.runners.shared;
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            shared.poller_waits.store(true, Ordering::Release);
            if !shared.bounds.reached(&part.book(), shared, 2) {
                shared.poller_waits.store(false, Ordering::Release);
                return;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                break;
            }
        }
        shared.poller_waits.store(false, Ordering::Release);
        let mut lanes = shared.lanes();
        if let Some(lane) = lanes.iter_mut().find(|l| Arc::ptr_eq(&l.part, part))
            && !lane.paused
        {
            lane.paused = set_paused(&self.consumer, part, true);
            let book = part.book();
            tracing::debug!(topic = %part.topic, partition = part.partition,
                in_flight = book.window.len(), in_flight_bytes = book.bytes,
                process_in_flight = shared.in_flight.load(Ordering::Acquire),
                "partition paused: in-flight bound reached and not draining");
        }
    }

    /// Books one message into its partition's window and starts its key's runner if the key is idle. Returns the
    /// partition when a bound is reached.
    pub(super) fn route(&self, message: &BorrowedMessage<'_>) -> Option<Arc<Partition>> {
        let shared = &self.runners.shared;
        let mut lanes = shared.lanes();
        let index = match lanes.iter().position(|l| {
            l.part.partition == message.partition() && l.part.topic == message.topic()
        }) {
            Some(index) => index,
            None => {
                lanes.push(Lane::new(message.topic(), message.partition()));
                lanes.len() - 1
            }
        };
        let lane = &mut lanes[index];
        if lane.part.held.load(Ordering::Acquire) {
            // Not processed and not committed: the next owner with the handler enabled starts here.
            return None;
        }
        let offset = message.offset();
        // A type routed by header to no handler here is finished without copying or decoding it.
        if let Some(event_type) = foreign_type(message, &self.runners.registry) {
            tracing::debug!(
                topic = message.topic(),
                offset,
                event_type,
                "no handler for event type; skipped"
            );
            skip(shared, &lane.part, offset);
            return None;
        }
        let key = match self.ordering {
            KafkaOrdering::Partition => 0,
            KafkaOrdering::Key => message.key().map_or(NO_KEY, |k| self.keys.hash_one(k)),
        };
        let bytes = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let owned = message.detach();
        let (start, behind) = {
            let mut book = lane.part.book();
            book.window.push_back(Slot {
                offset,
                bytes,
                done: false,
            });
            book.bytes += bytes;
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            shared.in_flight_bytes.fetch_add(bytes, Ordering::AcqRel);
            let start = match book.keys.entry(key) {
                Entry::Occupied(mut run) => {
                    run.get_mut().waiting.push_back(owned);
                    None
                }
                Entry::Vacant(idle) => {
                    idle.insert(KeyRun {
                        running: offset,
                        waiting: VecDeque::new(),
                    });
                    Some(owned)
                }
            };
            (
                start,
                !lane.paused && shared.bounds.reached(&book, shared, 1),
            )
        };
        if let Some(message) = start {
            lane.part.running.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(
                self.runners
                    .clone()
                    .run_key(lane.part.clone(), key, message),
            );
        }
        behind.then(|| lane.part.clone())
    }

    /// Stores the committable offset of every lane that moved, in one call, and remembers what it stored.
    pub(super) fn store_progress(&self, lanes: &mut [Lane]) {
        let moved = progress_to_store(lanes);
        if moved.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::with_capacity(moved.len());
        for &(i, next) in &moved {
            let _ = list.add_partition_offset(
                &lanes[i].part.topic,
                lanes[i].part.partition,
                Offset::Offset(next),
            );
        }
        match self.consumer.store_offsets(&list) {
            Ok(()) => record_stored(lanes, &moved),
            // A partition taken away meanwhile: its new owner redelivers (at-least-once). Nothing is marked
            // stored, so the next tick tries again.
            Err(error) => tracing::debug!(%error, "offsets not stored"),
        }
    }

    /// Pauses held lanes; resumes lanes that are healthy again and below half of every bound.
    pub(super) fn adjust_pauses(&self, lanes: &mut [Lane]) {
        let shared = &self.runners.shared;
        for lane in lanes.iter_mut() {
            let held = lane.part.held.load(Ordering::Acquire);
            if held && !lane.paused {
                lane.paused = set_paused(&self.consumer, &lane.part, true);
                tracing::info!(topic = %lane.part.topic, partition = lane.part.partition, "partition paused: held");
            } else if lane.paused && !held && !shared.bounds.reached(&lane.part.book(), shared, 2) {
                lane.paused = set_paused(&self.consumer, &lane.part, false);
                tracing::debug!(topic = %lane.part.topic, partition = lane.part.partition, "partition resumed");
            }
        }
    }
}

/// Pauses or resumes one partition; returns the resulting paused state.
pub(super) fn set_paused(
    consumer: &StreamConsumer<MountContext>,
    part: &Partition,
    pause: bool,
) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(&part.topic, part.partition);
    let result = if pause {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) => pause,
        Err(error) => {
            tracing::warn!(%error, topic = %part.topic, partition = part.partition, pause, "pause/resume failed");
            !pause
        }
    }
}
