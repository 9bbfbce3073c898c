//! Per-connection message rate limit: a token bucket (20 messages per second sustained,
//! bursts of 100, as the contract says). Time is an argument, so it is tested without sleeping.

use std::time::Instant;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: u32, now: Instant) -> Self {
        Self {
            capacity: capacity as f64,
            per_second: per_second as f64,
            tokens: capacity as f64,
            updated: now,
        }
    }

    /// Takes `amount` tokens whether or not they are there, going into debt; returns how long
    /// until the debt is paid off (zero when there was enough). For costs that have already
    /// been incurred, such as bytes read, where the caller can only wait before the next.
    pub fn take_or_wait(&mut self, amount: f64, now: Instant) -> std::time::Duration {
        self.refill(now);
        self.tokens -= amount;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_of_100_then_20_per_second() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(100, 20, t0);
        assert!((0..100).all(|_| bucket.try_take(t0)));
        assert!(!bucket.try_take(t0));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| bucket.try_take(t1)).count(), 10);
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..200).filter(|_| bucket.try_take(t2)).count(), 100);
    }

    #[test]
    fn take_or_wait_goes_into_debt_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut bytes = TokenBucket::new(1000, 100, t0);
        assert_eq!(bytes.take_or_wait(600.0, t0), Duration::ZERO);
        assert_eq!(bytes.take_or_wait(600.0, t0), Duration::from_secs(2));
        // After the wait the debt is paid and the bucket refills from zero.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(bytes.take_or_wait(100.0, t1), Duration::from_secs(1));
        assert!(!bytes.try_take(t1));
    }
}
