//! The window of each assigned partition: events received and not yet committable, per key in offset order, and
//! the committable offset that moves once everything before it finished.

use super::*;

/// The lanes whose committable offset moved past what was stored: `(index, offset)`, each book read once.
pub(super) fn progress_to_store(lanes: &[Lane]) -> Vec<(usize, i64)> {
    lanes
        .iter()
        .enumerate()
        .filter_map(|(i, lane)| {
            let next = lane.part.book().next?;
            (lane.stored != Some(next)).then_some((i, next))
        })
        .collect()
}

/// Marks the offsets of `progress_to_store` as stored. Only those: a runner may have moved a book since it was read,
/// and an offset marked stored but never stored would never be committed (the last event of a partition stayed
/// uncommitted until another arrived).
pub(super) fn record_stored(lanes: &mut [Lane], stored: &[(usize, i64)]) {
    for &(i, next) in stored {
        lanes[i].stored = Some(next);
    }
}

/// One assigned partition, as the poller sees it.
pub(super) struct Lane {
    pub(super) part: Arc<Partition>,
    pub(super) paused: bool,
    /// The offset last stored for it.
    pub(super) stored: Option<i64>,
}

impl Lane {
    /// A partition just assigned: nothing received, nothing stored.
    pub(super) fn new(topic: &str, partition: i32) -> Self {
        Lane {
            part: Arc::new(Partition {
                topic: topic.to_owned(),
                partition,
                book: Mutex::new(Book::default()),
                running: AtomicUsize::new(0),
                held: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                abort: CancellationToken::new(),
            }),
            paused: false,
            stored: None,
        }
    }
}

/// One assigned partition, as its runners see it.
pub(super) struct Partition {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) book: Mutex<Book>,
    /// Runners alive (revocation and shutdown wait for none).
    pub(super) running: AtomicUsize,
    /// Stopped at an event whose handler is disabled.
    pub(super) held: AtomicBool,
    /// Revocation or shutdown: retries give up.
    pub(super) cancel: CancellationToken,
    /// The grace period is over: no runner takes a further event.
    pub(super) abort: CancellationToken,
}

impl Partition {
    pub(super) fn book(&self) -> MutexGuard<'_, Book> {
        // Nothing panics while holding this lock (plain collection updates).
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A partition's window and the messages waiting behind their keys.
#[derive(Default)]
pub(super) struct Book {
    /// Received and not yet committable, in offset order.
    pub(super) window: VecDeque<Slot>,
    /// Bytes of the messages in the window.
    pub(super) bytes: usize,
    /// Keys with a runner: the offset it runs and the messages waiting for it (in offset order).
    pub(super) keys: HashMap<u64, KeyRun>,
    /// Revocation or shutdown: the last offset still to run (see [`Book::start_drain`]).
    pub(super) drain_to: Option<i64>,
    /// The offset to commit: the end of the contiguous prefix of finished messages.
    pub(super) next: Option<i64>,
    /// Finished messages still in the window (behind an unfinished one).
    pub(super) finished_ahead: usize,
}

pub(super) struct Slot {
    pub(super) offset: i64,
    pub(super) bytes: usize,
    pub(super) done: bool,
}

/// One key's runner, as its partition's book sees it.
pub(super) struct KeyRun {
    pub(super) running: i64,
    pub(super) waiting: VecDeque<OwnedMessage>,
}

impl Book {
    /// Stops the window at the furthest offset finished or running: everything up to it still runs (each key's
    /// waiting events up to it, in order), nothing beyond it starts. Once that is done the finished events form a
    /// contiguous prefix, so the partition's next owner starts right after them and handles nothing twice.
    pub(super) fn start_drain(&mut self) {
        let finished = self
            .window
            .iter()
            .filter(|s| s.done)
            .map(|s| s.offset)
            .max();
        let running = self.keys.values().map(|k| k.running).max();
        self.drain_to = Some(finished.max(running).unwrap_or(-1));
    }

    /// The next message of `key`'s runner, or `None` (and the key is idle) when none waits or the drain stops here.
    pub(super) fn next_for(&mut self, key: u64) -> Option<OwnedMessage> {
        let next = self.next_waiting(key);
        if next.is_none() {
            self.keys.remove(&key);
        }
        next
    }

    /// [`Book::next_for`], except that the key stays busy when nothing waits (its runner still has events in
    /// flight).
    pub(super) fn next_waiting(&mut self, key: u64) -> Option<OwnedMessage> {
        let drain_to = self.drain_to;
        let run = self.keys.get_mut(&key)?;
        if drain_to.is_some_and(|last| run.waiting.front().is_some_and(|m| m.offset() > last)) {
            return None;
        }
        let next = run.waiting.pop_front()?;
        run.running = next.offset();
        Some(next)
    }

    /// Marks `offset` finished and drops the finished prefix of the window; returns the messages and bytes it
    /// released.
    pub(super) fn finish(&mut self, offset: i64) -> (usize, usize) {
        if let Ok(i) = self
            .window
            .binary_search_by_key(&offset, |slot| slot.offset)
            && !self.window[i].done
        {
            self.window[i].done = true;
            self.finished_ahead += 1;
        }
        let (mut count, mut bytes) = (0, 0);
        while let Some(slot) = self.window.front() {
            if !slot.done {
                break;
            }
            self.next = Some(slot.offset + 1);
            self.finished_ahead -= 1;
            count += 1;
            bytes += slot.bytes;
            self.window.pop_front();
        }
        self.bytes -= bytes;
        (count, bytes)
    }
}
