//! The per-connection rate limiter (PROTOCOL.md §9): at most `limit` accepted requests in
//! any window of `window` (60 per second by default). Pure logic with an injected clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A sliding-window limiter owned by one session. Rejected requests do not use up the
/// allowance; only accepted ones are recorded.
#[derive(Debug)]
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    /// When each request accepted inside the current window arrived, oldest first. Grows
    /// to at most `limit` entries, and only on a connection that actually sends requests.
    accepted: VecDeque<Instant>,
}

impl RateLimiter {
    /// A limiter allowing `limit` requests per `window`; `limit == 0` disables it.
    pub fn new(limit: u32, window: Duration) -> Self {
        RateLimiter {
            limit: limit as usize,
            window,
            accepted: VecDeque::new(),
        }
    }

    /// Records a request arriving at `now`. `Err(secs)` when it is over the limit, with the
    /// whole seconds (at least 1) until a request would be accepted.
    pub fn check(&mut self, now: Instant) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        while let Some(&oldest) = self.accepted.front() {
            if now.saturating_duration_since(oldest) >= self.window {
                self.accepted.pop_front();
            } else {
                break;
            }
        }
        if self.accepted.len() < self.limit {
            self.accepted.push_back(now);
            return Ok(());
        }
        let oldest = self.accepted.front().copied().unwrap_or(now);
        let wait = (oldest + self.window).saturating_duration_since(now);
        Err(wait.as_secs_f64().ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_of_a_hundred() {
        let mut rl = RateLimiter::new(60, Duration::from_secs(1));
        let t0 = Instant::now();
        let passed = (0..100)
            .filter(|i| rl.check(t0 + Duration::from_micros(*i)).is_ok())
            .count();
        assert_eq!(passed, 60);
        assert_eq!(rl.check(t0 + Duration::from_millis(10)), Err(1));
        // The window slides: after a second from the first request, room again.
        assert!(rl.check(t0 + Duration::from_millis(1000)).is_ok());
    }

    #[test]
    fn retry_after_counts_whole_seconds() {
        let mut rl = RateLimiter::new(1, Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(rl.check(t0).is_ok());
        assert_eq!(rl.check(t0 + Duration::from_millis(500)), Err(3));
        assert_eq!(rl.check(t0 + Duration::from_millis(2500)), Err(1));
    }

    #[test]
    fn zero_disables() {
        let mut rl = RateLimiter::new(0, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| rl.check(t0).is_ok()));
    }
}
