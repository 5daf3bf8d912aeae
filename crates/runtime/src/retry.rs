//! Exponential backoff with jitter for transient failures.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; `None` retries until the dependency comes back
    /// (the Kafka mount: a partition must not skip ahead of a failing event).
    pub max_attempts: Option<u32>,
    pub base: Duration,
    pub cap: Duration,
    /// Fraction of each delay randomised (0.0 – 1.0), so a fleet does not retry in lockstep.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Short retries for in-process runs: a flaky dependency gets a few chances before the dead letter.
    pub fn in_process() -> Self {
        Self {
            max_attempts: Some(5),
            base: Duration::from_millis(50),
            cap: Duration::from_secs(2),
            jitter: 0.2,
        }
    }

    /// Delay before attempt `attempt + 1`, given `attempt` failures so far (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let spread = raw.as_secs_f64() * self.jitter.clamp(0.0, 1.0);
        let offset = spread * (2.0 * pseudo_random() - 1.0);
        Duration::from_secs_f64((raw.as_secs_f64() + offset).max(0.0))
    }

    pub fn gives_up_after(&self, attempt: u32) -> bool {
        self.max_attempts.is_some_and(|max| attempt >= max)
    }
}

/// A uniform value in [0, 1) — jitter needs spread, not cryptographic randomness.
fn pseudo_random() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64;
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: Some(4),
            base: Duration::from_secs(60),
            cap: Duration::from_secs(600),
            jitter: 0.0,
        };
        let delays: Vec<u64> = (1..=6).map(|a| policy.delay(a).as_secs()).collect();
        assert_eq!(delays, [60, 120, 240, 480, 600, 600]);
        assert!(!policy.gives_up_after(3));
        assert!(policy.gives_up_after(4));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let policy = RetryPolicy {
            max_attempts: None,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(10),
            jitter: 0.2,
        };
        for _ in 0..100 {
            let d = policy.delay(1).as_secs_f64();
            assert!((8.0..=12.0).contains(&d), "{d}");
        }
        assert!(!policy.gives_up_after(1_000_000));
    }
}
