//! Retry delays: exponential with jitter, capped.

use std::time::Duration;

use rand::Rng;

/// Delay before retry number `attempt + 1`: `base * 2^attempt`, capped at
/// `max`, then scaled by a random factor in [0.5, 1] so that requests that
/// failed together do not retry together.
pub fn delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exponential = base.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    let capped = exponential.min(max);
    capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds_and_cap() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(600);
        for attempt in 0..40 {
            let full = base
                .saturating_mul(2u32.saturating_pow(attempt.min(30)))
                .min(max);
            for _ in 0..50 {
                let d = delay(attempt, base, max);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_retries() {
        let samples: std::collections::HashSet<_> = (0..20)
            .map(|_| delay(3, Duration::from_secs(2), Duration::from_secs(600)))
            .collect();
        assert!(samples.len() > 1);
    }
}
