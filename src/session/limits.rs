//! Per-connection and per-address limits: a token bucket for message and byte rates, and a count
//! of open connections per client address.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved up. A rate of zero disables it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(rate) as f64;
        Self {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens at `now` if the bucket holds them; `false` means the rate was exceeded.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Open connections per client address, bounded.
#[derive(Debug, Clone)]
pub struct AddressLimiter {
    open: Arc<DashMap<IpAddr, usize>>,
    max: usize,
}

/// One connection's place in an [`AddressLimiter`], given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    /// The limiter's counts, or `None` when there is no limit (nothing to give back).
    open: Option<Arc<DashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressLimiter {
    /// At most `max` connections per address; zero means no limit.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(DashMap::new()),
            max,
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it has `max` open already.
    pub fn acquire(&self, ip: IpAddr) -> Option<AddressSlot> {
        if self.max == 0 {
            return Some(AddressSlot { open: None, ip });
        }
        let mut n = self.open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        drop(n);
        Some(AddressSlot {
            open: Some(self.open.clone()),
            ip,
        })
    }

    /// Connections open from `ip` (tests and diagnostics).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).map_or(0, |n| *n)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.remove_if_mut(&self.ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl TokenBucket {
        fn take_now(&mut self, n: u64) -> bool {
            self.take(n, Instant::now())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = TokenBucket::new(10, 20);
        assert!(b.take_now(20));
        assert!(!b.take_now(1));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.take_now(5));
        assert!(!b.take_now(1));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(b.take_now(20));
        assert!(!b.take_now(1));
    }

    #[test]
    fn a_zero_rate_never_refuses() {
        let mut b = TokenBucket::new(0, 0);
        assert!((0..1000).all(|_| b.take_now(u64::MAX)));
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let limiter = AddressLimiter::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = limiter.acquire(ip).unwrap();
        let b = limiter.acquire(ip).unwrap();
        assert!(limiter.acquire(ip).is_none());
        assert!(limiter.acquire("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(limiter.open_from(ip), 1);
        let _c = limiter.acquire(ip).unwrap();
        drop(b);
        assert_eq!(limiter.open_from(ip), 1);
        assert!(AddressLimiter::new(0).acquire(ip).is_some());
    }
}
