//! When a partition pauses and resumes: the in-flight bounds by count and bytes, per partition and per process.

use super::*;

/// When a partition pauses and resumes.
pub(super) struct Bounds {
    pub(super) partition_count: usize,
    pub(super) partition_bytes: usize,
    pub(super) process_count: usize,
    pub(super) process_bytes: usize,
}

impl Bounds {
    pub(super) fn new(options: &ConsumerOptions) -> Self {
        Self {
            partition_count: options.max_in_flight_per_partition.max(1),
            partition_bytes: (options.max_in_flight_bytes / 4).max(1),
            process_count: options.max_in_flight.max(1),
            process_bytes: options.max_in_flight_bytes.max(1),
        }
    }

    /// At a bound (`divisor` 1) or at half of one (`divisor` 2, the resume test). A bound of 1 resumes at 0.
    pub(super) fn reached(&self, book: &Book, shared: &Shared, divisor: usize) -> bool {
        self.exceeds(
            [
                book.window.len(),
                book.bytes,
                shared.in_flight.load(Ordering::Acquire),
                shared.in_flight_bytes.load(Ordering::Acquire),
            ],
            divisor,
        )
    }

    /// `[partition count, partition bytes, process count, process bytes]` against the bounds divided by `divisor`
    /// (never below 1, so that an empty window is always below them).
    pub(super) fn exceeds(&self, levels: [usize; 4], divisor: usize) -> bool {
        let bounds = [
            self.partition_count,
            self.partition_bytes,
            self.process_count,
            self.process_bytes,
        ];
        levels
            .iter()
            .zip(bounds)
            .any(|(level, bound)| *level >= (bound / divisor).max(1))
    }
}
