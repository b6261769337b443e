//! Rate limits for log lines that one request (or one failing accept) could otherwise repeat
//! thousands of times a second: a full disk, an exhausted descriptor table or a storm of bad
//! tokens must leave a bounded log that still says how often it happened.
//!
//! A [`LogLimiter`] lets one line through per interval and counts the ones it held back; the
//! next line that passes carries that count:
//!
//! ```
//! use std::time::Duration;
//! use muster_proto::log_limit::LogLimiter;
//!
//! static STORE_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
//! if let Some(suppressed) = STORE_FAILED.admit() {
//!     eprintln!("store write failed ({suppressed} more since the last line)");
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One log line per interval, with a count of the lines held back in between.
#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: u64,
    /// The first admission's time; `next_ms` counts from it.
    epoch: OnceLock<Instant>,
    /// Milliseconds after `epoch` before which lines are held back.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter that lets one line through per `interval` (at least 1 ms).
    pub const fn new(interval: Duration) -> Self {
        let ms = interval.as_millis() as u64;
        Self {
            interval_ms: if ms == 0 { 1 } else { ms },
            epoch: OnceLock::new(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines held back since
    /// the last one written, or `None` (the line is counted and should be dropped).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`admit`](Self::admit) at a given time, so tests control the clock.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(|| now);
        let elapsed = now.saturating_duration_since(epoch).as_millis() as u64;
        let next = self.next_ms.load(Ordering::Acquire);
        if elapsed >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    elapsed + self.interval_ms,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limiter.admit_at(t0), Some(0));
        for i in 1..=500u64 {
            assert_eq!(limiter.admit_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(limiter.admit_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(limiter.admit_at(t0 + Duration::from_secs(10)), Some(501));
        assert_eq!(limiter.admit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(limiter.admit_at(t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn concurrent_callers_let_exactly_one_line_through() {
        let limiter = std::sync::Arc::new(LogLimiter::new(Duration::from_secs(3600)));
        let admitted: u64 = (0..8)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| limiter.admit().is_some()).count() as u64
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .sum();
        assert_eq!(admitted, 1);
        assert_eq!(limiter.suppressed.load(Ordering::Relaxed), 7999);
    }
}
