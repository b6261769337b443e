//! Per-hub rate limits: a token bucket for each linked hub with `maxRegistrationsPerSecond`.
//! A registration that finds no token is not refused: it is recorded as `assigning` and
//! finished in order by that hub's worker once a token frees up.
//!
//! [`Limiter`] picks where the buckets live: in the store when it shares limits between
//! processes ([`Store::take_token`], PostgreSQL: the sum over every node stays within the
//! rate, at the engine clock's time), else in process ([`HubThrottle`], SQLite).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use muster_proto::runtime::Clock;
use muster_store::Store;
use tokio::time::{Duration, Instant};

/// A failing shared limiter (the database unreachable) would otherwise log per registration.
static SHARED_FAILED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// Per-hub limits, shared through the store when it can, else in process.
pub struct Limiter {
    local: HubThrottle,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Limiter {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self {
            local: HubThrottle::default(),
            store,
            clock,
        }
    }

    /// Takes a token for `hub` if one is free now. Hubs without a limit always pass. When
    /// the shared limiter cannot answer (the store failing), no token is taken: the
    /// registration waits in the queue rather than exceed the rate.
    pub async fn try_take(&self, hub: &str, rate: Option<u32>) -> bool {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            return true;
        };
        let name = format!("hub/{}", hub.to_ascii_lowercase());
        let now = self.clock.now().0.timestamp_millis();
        match self.store.take_token(&name, rate, now).await {
            Ok(Some(taken)) => taken,
            Ok(None) => self.local.try_take(hub, Some(rate)),
            Err(e) => {
                if let Some(suppressed) = SHARED_FAILED_LOG.admit() {
                    tracing::warn!(hub, error = %e, suppressed, "the shared rate limit cannot be read; registrations wait");
                }
                false
            }
        }
    }

    /// How long until a token for `hub` is likely free (for `retry-after` and the worker's
    /// wait): the in-process bucket's exact figure, or one token's time when shared.
    pub fn wait_hint(&self, hub: &str, rate: Option<u32>) -> Duration {
        match self.local.wait_hint(hub) {
            Duration::ZERO => match rate.filter(|r| *r > 0) {
                Some(r) => Duration::from_secs_f64(1.0 / f64::from(r)),
                None => Duration::ZERO,
            },
            local => local,
        }
    }

    /// Waits until a token for `hub` is taken.
    pub async fn take(&self, hub: &str, rate: Option<u32>) {
        loop {
            if self.try_take(hub, rate).await {
                return;
            }
            let wait = self.wait_hint(hub, rate).max(Duration::from_millis(1));
            tokio::time::sleep(wait).await;
        }
    }
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        // Burst capacity of one second's worth.
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        self.last = now;
    }
}

#[derive(Debug, Default)]
pub struct HubThrottle {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl HubThrottle {
    /// Takes a token for `hub` if one is free now. Hubs without a limit always pass.
    pub fn try_take(&self, hub: &str, rate: Option<u32>) -> bool {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            return true;
        };
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let now = Instant::now();
        let b = buckets.entry(hub.to_ascii_lowercase()).or_insert(Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        });
        b.rate = f64::from(rate);
        b.refill(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token for `hub` is free (for `retry-after`).
    pub fn wait_hint(&self, hub: &str) -> Duration {
        let Ok(buckets) = self.buckets.lock() else {
            return Duration::from_secs(1);
        };
        match buckets.get(&hub.to_ascii_lowercase()) {
            Some(b) if b.rate > 0.0 => {
                Duration::from_secs_f64(((1.0 - b.tokens) / b.rate).max(0.0))
            }
            _ => Duration::ZERO,
        }
    }

    /// Waits until a token for `hub` is taken.
    pub async fn take(&self, hub: &str, rate: Option<u32>) {
        loop {
            if self.try_take(hub, rate) {
                return;
            }
            let wait = self.wait_hint(hub).max(Duration::from_millis(1));
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_rate_per_hub() {
        let t = HubThrottle::default();
        let mut taken = 0;
        for _ in 0..10 {
            if t.try_take("a", Some(5)) {
                taken += 1;
            }
        }
        assert_eq!(taken, 5, "a full bucket holds one second's worth");
        assert!(t.try_take("b", Some(5)), "hubs are independent");
        assert!(t.try_take("c", None), "no limit");
        let start = Instant::now();
        t.take("a", Some(5)).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited <= Duration::from_millis(210),
            "{waited:?}"
        );
    }
}
