//! When to retry a call to an OpenAI-compatible server, how long to wait, and when to stop
//! sending it work: exponential backoff with full jitter, `Retry-After`, and a per-endpoint
//! circuit breaker. Pure logic over instants handed in, so it is tested without a clock.

use std::time::{Duration, Instant};

/// Retry and breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `max_retries + 1` attempts at most).
    pub max_retries: u32,
    /// First backoff ceiling; doubles per retry up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured; a server asking for more fails the call.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0-based): a uniform draw (`unit` in [0, 1)) below
    /// `base · 2^retry` capped at `max_backoff`, but never shorter than the server's
    /// `Retry-After`. `None` when the server asks for longer than `max_retry_after`.
    pub fn wait(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Option<Duration> {
        let ceiling = self
            .base_backoff
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.max_backoff);
        let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(asked) if asked > self.max_retry_after => None,
            Some(asked) => Some(jittered.max(asked)),
            None => Some(jittered),
        }
    }
}

/// Reads a `Retry-After` header given in seconds (the HTTP-date form is not honoured: it is
/// treated as absent, so ordinary backoff applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long an open breaker refuses work before letting a trial call through.
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// A circuit breaker of one endpoint: closed (work flows), open (refuse until `open_until`),
/// then half-open (calls go through; one success closes it, one failure opens it again).
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether a call may go to this endpoint now.
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    /// When an open breaker lets calls through again.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        self.open_until.filter(|&until| now < until)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until = None;
    }

    pub fn failure(&mut self, now: Instant, policy: BreakerPolicy) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= policy.failures {
            self.open_until = Some(now + policy.open_for);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_full_jitter_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.wait(0, None, 1.0), Some(Duration::from_millis(200)));
        assert_eq!(p.wait(1, None, 1.0), Some(Duration::from_millis(400)));
        assert_eq!(p.wait(2, None, 0.5), Some(Duration::from_millis(400)));
        assert_eq!(p.wait(10, None, 1.0), Some(Duration::from_secs(5)));
        assert_eq!(p.wait(40, None, 1.0), Some(Duration::from_secs(5)));
        assert_eq!(p.wait(3, None, 0.0), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_is_a_floor_and_has_a_limit() {
        let p = RetryPolicy::default();
        let asked = Some(Duration::from_secs(2));
        assert_eq!(p.wait(0, asked, 1.0), Some(Duration::from_secs(2)));
        assert_eq!(p.wait(9, asked, 1.0), Some(Duration::from_secs(5)));
        assert_eq!(p.wait(0, Some(Duration::from_secs(31)), 1.0), None);
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_half_opens_later() {
        let policy = BreakerPolicy {
            failures: 3,
            open_for: Duration::from_secs(10),
        };
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(t0, policy);
        b.failure(t0, policy);
        b.success();
        b.failure(t0, policy);
        b.failure(t0, policy);
        assert!(b.allows(t0), "a success in between resets the count");
        b.failure(t0, policy);
        assert!(!b.allows(t0 + Duration::from_secs(9)));
        assert_eq!(b.open_until(t0), Some(t0 + Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(10);
        assert!(b.allows(later), "half-open: a trial goes through");
        b.failure(later, policy);
        assert!(
            !b.allows(later + Duration::from_secs(1)),
            "a failed trial opens it again"
        );
        b.success();
        assert!(b.allows(later) && b.consecutive_failures() == 0);
    }
}
