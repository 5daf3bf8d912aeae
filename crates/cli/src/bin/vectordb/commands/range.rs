//! The Kafka records `export` and `replay` read: a topic and an optional partition/offset range.

use aura_runtime::Settings;

#[derive(clap::Args)]
pub struct RangeArgs {
    /// Topic to read, e.g. `aura360.user.events` or `aura360.context.aggregated.dlq`.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this partition (default: all).
    #[arg(long)]
    partition: Option<i32>,
    /// First offset to read (inclusive; default: the oldest on the broker).
    #[arg(long, conflicts_with_all = ["from_group", "from_beginning"])]
    from_offset: Option<i64>,
    /// Read from the oldest record on the broker (the default; the console consumer's flag, spelled out).
    #[arg(long, conflicts_with = "from_group")]
    from_beginning: bool,
    /// Offset to stop at (exclusive; default: the end offset when reading starts).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Start at this consumer group's committed offsets (what the group has not processed yet);
    /// `--from-group` alone means KAFKA_GROUP_ID.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    from_group: Option<String>,
}

impl RangeArgs {
    /// The range, `max_records` at most; `None` without `--topic`.
    pub fn range(
        self,
        settings: &Settings,
        max_records: Option<u64>,
    ) -> Option<aura_kafka::offsets::Range> {
        let topic = self.topic?;
        Some(aura_kafka::offsets::Range {
            topic,
            partition: self.partition,
            // `--from-beginning` is what no start flag means: the oldest offset on the broker.
            from: self.from_offset,
            to: self.to_offset,
            from_group: self.from_group.map(|g| {
                if g.is_empty() {
                    settings.kafka.group_id.clone()
                } else {
                    g
                }
            }),
            max_records,
        })
    }
}
