//! The retry policy: data plus pure functions, applied with backon by the client.
//!
//! In-process retries are for short blips (seconds). A job that still fails should be
//! handed back to its queue, which can ask [`RetryPolicy::delay_for`] for its next delay.

use std::time::Duration;

use backon::ExponentialBuilder;

use super::error::Error;

/// How often and how patiently to repeat a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry; doubles on each later one.
    pub min_delay: Duration,
    /// Cap of the exponential delay (jitter included).
    pub max_delay: Duration,
    /// Attempts in total, the first one included (1 = never retry).
    pub max_attempts: u32,
    /// Cap of a `Retry-After` Microsoft asks for.
    pub max_retry_after: Duration,
    /// A `Retry-After` above the cap: `false` waits the cap, `true` gives up at once (the
    /// caller retries later on its own schedule, which honours it).
    pub give_up_beyond_cap: bool,
}

impl Default for RetryPolicy {
    /// Production: 4 attempts, 0.5 s → 30 s, honour `Retry-After` up to 60 s.
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_attempts: 4,
            max_retry_after: Duration::from_secs(60),
            give_up_beyond_cap: false,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The worker's: one quick retry (50–100 ms, or a `Retry-After` of at most 100 ms),
    /// then the failure is handed back to the outbox backoff or the retry queues, which
    /// honour a longer `Retry-After`. A retry in place holds an effect slot, its database
    /// connection and, on the fast path, the subscription's lane: with 15 % of calls failing
    /// (`bench chaos`), effect slots spent most of their time asleep in retries of
    /// 0.2–1 s, and webhooks waited in the queue past Microsoft's 10 s window (P7).
    pub fn hand_back() -> Self {
        Self {
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(100),
            max_attempts: 2,
            max_retry_after: Duration::from_millis(100),
            give_up_beyond_cap: true,
        }
    }

    /// The delay before the attempt after `attempt` (1-based) failed with `error`, or `None`
    /// to give up: not retryable, or attempts exhausted. A `Retry-After` wins, capped at
    /// `max_retry_after`; otherwise the jittered exponential delay.
    pub fn delay_for(&self, attempt: u32, error: &Error) -> Option<Duration> {
        self.delay_with_jitter(attempt, error, random_unit())
    }

    /// [`Self::delay_for`] with the jitter given (`0.0..1.0`), for deterministic callers.
    pub fn delay_with_jitter(&self, attempt: u32, error: &Error, jitter: f64) -> Option<Duration> {
        if !error.is_retryable() || attempt >= self.max_attempts {
            return None;
        }
        Some(match error.retry_after() {
            Some(asked) if self.gives_up_on(asked) => return None,
            Some(asked) => self.cap_retry_after(asked),
            None => {
                let base = self.base_delay(attempt);
                base.saturating_add(base.mul_f64(jitter.clamp(0.0, 1.0)))
                    .min(self.max_delay)
            }
        })
    }

    /// Bounds of the exponential delay after `attempt` (1-based): `base..=min(2·base, max)`
    /// where `base = min_delay·2^(attempt-1)` capped at `max_delay`.
    pub fn delay_bounds(&self, attempt: u32) -> (Duration, Duration) {
        let base = self.base_delay(attempt);
        (base, base.saturating_mul(2).min(self.max_delay))
    }

    fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        self.min_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay)
    }

    fn gives_up_on(&self, asked: Duration) -> bool {
        self.give_up_beyond_cap && asked > self.max_retry_after
    }

    fn cap_retry_after(&self, asked: Duration) -> Duration {
        asked.min(self.max_retry_after)
    }

    /// The backon schedule matching this policy (same base, factor, jitter and attempts).
    pub(crate) fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
    }

    /// backon's `adjust` hook: `Retry-After` overrides the exponential delay, and backon's
    /// jitter (which may double the delay) is capped at `max_delay`. `None` stays `None`:
    /// the attempts are spent.
    pub(crate) fn adjust(&self, error: &Error, proposed: Option<Duration>) -> Option<Duration> {
        let proposed = proposed?;
        Some(match error.retry_after() {
            Some(asked) if self.gives_up_on(asked) => return None,
            Some(asked) => self.cap_retry_after(asked),
            None => proposed.min(self.max_delay),
        })
    }
}

/// A uniform value in `0.0..1.0` from the OS RNG behind `Uuid::new_v4` (no extra crate).
fn random_unit() -> f64 {
    let (_, low) = uuid::Uuid::new_v4().as_u64_pair();
    // The low 53 bits of a v4 UUID are all random.
    (low & ((1 << 53) - 1)) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::marketplace::error::{Call, Failure, TransientCause};
    use backon::BackoffBuilder;

    fn transient() -> Error {
        Error::Transient {
            cause: TransientCause::Status,
            failure: Box::new(Failure::new(Call::GetSubscription, "HTTP 500")),
        }
    }

    fn throttled(retry_after: Option<Duration>) -> Error {
        Error::Throttled {
            retry_after,
            failure: Box::new(Failure::new(Call::GetSubscription, "HTTP 429")),
        }
    }

    fn not_found() -> Error {
        Error::NotFound {
            failure: Box::new(Failure::new(Call::GetSubscription, "HTTP 404")),
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_production_default_is_four_attempts_half_a_second_to_thirty() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 4);
        assert_eq!(p.min_delay, MS(500));
        assert_eq!(p.max_delay, Duration::from_secs(30));
        assert_eq!(p.max_retry_after, Duration::from_secs(60));
    }

    #[test]
    fn exponential_delays_double_and_are_capped() {
        let p = RetryPolicy {
            min_delay: MS(100),
            max_delay: MS(1000),
            max_attempts: 10,
            max_retry_after: MS(5000),
            give_up_beyond_cap: false,
        };
        assert_eq!(p.delay_with_jitter(1, &transient(), 0.0), Some(MS(100)));
        assert_eq!(p.delay_with_jitter(2, &transient(), 0.0), Some(MS(200)));
        assert_eq!(p.delay_with_jitter(3, &transient(), 0.0), Some(MS(400)));
        assert_eq!(p.delay_with_jitter(3, &transient(), 0.5), Some(MS(600)));
        assert_eq!(p.delay_with_jitter(4, &transient(), 0.0), Some(MS(800)));
        assert_eq!(p.delay_with_jitter(4, &transient(), 0.99), Some(MS(1000)));
        assert_eq!(p.delay_with_jitter(5, &transient(), 0.0), Some(MS(1000)));
        assert_eq!(p.delay_with_jitter(9, &transient(), 0.7), Some(MS(1000)));
        assert_eq!(p.delay_bounds(2), (MS(200), MS(400)));
        assert_eq!(p.delay_bounds(40), (MS(1000), MS(1000)));
        for attempt in 1..10 {
            let d = p.delay_for(attempt, &transient()).unwrap();
            let (lo, hi) = p.delay_bounds(attempt);
            assert!(
                lo <= d && d <= hi,
                "{attempt}: {d:?} not in {lo:?}..={hi:?}"
            );
        }
    }

    #[test]
    fn gives_up_when_attempts_are_spent_or_the_error_is_final() {
        let p = RetryPolicy::default();
        assert!(p.delay_for(3, &transient()).is_some());
        assert_eq!(p.delay_for(4, &transient()), None);
        assert_eq!(p.delay_for(1, &not_found()), None);
        assert_eq!(RetryPolicy::never().delay_for(1, &transient()), None);
    }

    #[test]
    fn the_worker_retries_once_quickly_then_hands_the_failure_back() {
        let p = RetryPolicy::hand_back();
        let d = p.delay_for(1, &transient()).unwrap();
        assert!(d >= MS(50) && d <= MS(100), "{d:?}");
        assert_eq!(p.delay_for(2, &transient()), None);
        // A short Retry-After is waited; a longer one is left to the caller's schedule.
        assert_eq!(p.delay_for(1, &throttled(Some(MS(80)))), Some(MS(80)));
        assert_eq!(
            p.delay_for(1, &throttled(Some(Duration::from_secs(1)))),
            None
        );
        assert_eq!(
            p.adjust(&throttled(Some(Duration::from_secs(1))), Some(MS(60))),
            None
        );
        assert_eq!(p.adjust(&transient(), Some(MS(60))), Some(MS(60)));
        assert_eq!(p.delay_for(2, &throttled(Some(MS(80)))), None);
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let p = RetryPolicy {
            max_retry_after: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        let asked = |s| throttled(Some(Duration::from_secs(s)));
        assert_eq!(p.delay_for(1, &asked(0)), Some(Duration::ZERO));
        assert_eq!(p.delay_for(1, &asked(7)), Some(Duration::from_secs(7)));
        assert_eq!(p.delay_for(2, &asked(3600)), Some(Duration::from_secs(60)));
        let d = p.delay_for(1, &throttled(None)).unwrap();
        assert!(d >= MS(500) && d <= MS(1000), "{d:?}");
        assert_eq!(p.delay_for(4, &asked(1)), None);
    }

    #[test]
    fn the_backon_schedule_matches_the_policy() {
        let p = RetryPolicy {
            min_delay: MS(100),
            max_delay: MS(700),
            max_attempts: 6,
            max_retry_after: MS(5000),
            give_up_beyond_cap: false,
        };
        let delays: Vec<_> = p
            .backoff()
            .build()
            .map(|d| p.adjust(&transient(), Some(d)).unwrap())
            .collect();
        assert_eq!(delays.len(), 5, "max_attempts counts the first attempt");
        for (i, d) in delays.iter().enumerate() {
            // backon computes in f32 seconds: allow a millisecond of rounding.
            let (lo, hi) = p.delay_bounds(i as u32 + 1);
            let (lo, hi) = (lo - MS(1), hi + MS(1));
            assert!(
                lo <= *d && *d <= hi,
                "retry {}: {d:?} not in {lo:?}..={hi:?}",
                i + 1
            );
        }
        assert_eq!(
            p.adjust(&throttled(Some(MS(1))), Some(MS(300))),
            Some(MS(1))
        );
        assert_eq!(
            p.adjust(&throttled(Some(Duration::from_secs(99))), Some(MS(300))),
            Some(MS(5000))
        );
        assert_eq!(p.adjust(&throttled(Some(MS(1))), None), None);
    }
}
