//! Time and randomness, passed in wherever behaviour depends on them so tests control them.
//!
//! [`SystemClock`] and [`OsEntropy`] are the only places in Muster's libraries that read the
//! real clock or the operating system's random source.

use chrono::Utc;

use crate::time::Timestamp;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

pub trait Entropy: Send + Sync + 'static {
    fn fill(&self, buf: &mut [u8]);

    fn bytes<const N: usize>(&self) -> [u8; N]
    where
        Self: Sized,
    {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }
}

/// Helpers usable through `dyn Entropy`.
pub fn random_bytes<const N: usize>(e: &dyn Entropy) -> [u8; N] {
    let mut b = [0u8; N];
    e.fill(&mut b);
    b
}

pub fn random_hex(e: &dyn Entropy, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    e.fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp(Utc::now())
    }
}

/// Randomness from the operating system, through `rand`'s thread-local CSPRNG (ChaCha12,
/// seeded from the OS and reseeded from it as it is used), so the several random values of
/// a registration (operation id, etags, nonces) cost no `getrandom` system call each.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, buf: &mut [u8]) {
        use rand::RngCore;
        rand::thread_rng().fill_bytes(buf);
    }
}

/// A clock tests set by hand.
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<Timestamp>);

impl ManualClock {
    pub fn new(t: Timestamp) -> Self {
        Self(std::sync::Mutex::new(t))
    }

    pub fn set(&self, t: Timestamp) {
        if let Ok(mut g) = self.0.lock() {
            *g = t;
        }
    }

    pub fn advance_secs(&self, secs: i64) {
        if let Ok(mut g) = self.0.lock() {
            g.0 += chrono::Duration::seconds(secs);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.0
            .lock()
            .map(|g| *g)
            .unwrap_or_else(|e| *e.into_inner())
    }
}

/// Deterministic entropy for tests: a counter-seeded xorshift.
#[derive(Debug)]
pub struct SeededEntropy(std::sync::Mutex<u64>);

impl SeededEntropy {
    pub fn new(seed: u64) -> Self {
        Self(std::sync::Mutex::new(seed | 1))
    }
}

impl Entropy for SeededEntropy {
    fn fill(&self, buf: &mut [u8]) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for b in buf {
            let mut x = *g;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *g = x;
            *b = (x >> 24) as u8;
        }
    }
}
