//! Per-source-address admission of unauthenticated connections.
//!
//! A connection is unauthenticated from accept until it has proved something: an HTTPS
//! connection until its first request, body included, was read and answered (a WebSocket
//! upgrade stays unauthenticated until the MQTT session inside authenticates), an MQTT
//! registration until the registrar accepts its first request, a hub MQTT connection until
//! its CONNECT is read. Each source address may
//! hold at most [`PreAuthLimiter::new`]'s limit of such connections across every listener;
//! beyond it, new connections from that address are closed at accept. Without this, one
//! address could take every slot of `max-connections` for as long as the deadlines allow.
//!
//! IPv4-mapped IPv6 addresses count as their IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts unauthenticated connections per source address.
#[derive(Debug, Clone)]
pub struct PreAuthLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    per_address: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PreAuthLimiter {
    /// At most `per_address` (at least 1) unauthenticated connections per source address.
    pub fn new(per_address: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_address: per_address.max(1),
                counts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A slot for one more unauthenticated connection from `addr`, or `None` when the address
    /// holds its limit. The slot is given back when the guard is dropped.
    pub fn try_acquire(&self, addr: IpAddr) -> Option<PreAuthGuard> {
        let addr = canonical(addr);
        let mut counts = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(addr).or_insert(0);
        if *count >= self.inner.per_address {
            return None;
        }
        *count += 1;
        Some(PreAuthGuard {
            limiter: self.inner.clone(),
            addr,
        })
    }

    /// Unauthenticated connections `addr` holds now.
    pub fn held(&self, addr: IpAddr) -> usize {
        let counts = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&canonical(addr)).copied().unwrap_or(0)
    }
}

/// One unauthenticated connection's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct PreAuthGuard {
    limiter: Arc<Inner>,
    addr: IpAddr,
}

impl Drop for PreAuthGuard {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Addresses are not remembered once they hold nothing.
                counts.remove(&self.addr);
            }
        }
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_limit_and_gets_slots_back() {
        let limiter = PreAuthLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = limiter.try_acquire(a).unwrap();
        // The mapped form is the same address.
        let a2 = limiter
            .try_acquire("::ffff:192.0.2.1".parse().unwrap())
            .unwrap();
        assert!(limiter.try_acquire(a).is_none());
        let b1 = limiter.try_acquire(b).unwrap();
        assert_eq!((limiter.held(a), limiter.held(b)), (2, 1));
        drop(a1);
        let a3 = limiter.try_acquire(a).unwrap();
        drop((a2, a3, b1));
        assert_eq!((limiter.held(a), limiter.held(b)), (0, 0));
        assert!(limiter.inner.counts.lock().unwrap().is_empty());
    }
}
