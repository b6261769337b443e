//! When each device starts: as soon as a worker is free (closed loop, `--concurrency`
//! workers), or at a fixed arrival rate (open loop, `--rate`): device `i` is due at `i / rate`
//! seconds after the start, whether or not earlier devices have finished, so a slow server
//! shows up as latency instead of as fewer requests (no coordinated omission: latency is
//! measured from the due time, not from when the generator got round to it).

use std::time::Duration;

/// How starts are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// `workers` loops, each starting its next device when the previous one finished.
    ClosedLoop { workers: usize },
    /// Device `i` is due at `i / per_second`; at most `max_in_flight` run at once (a start
    /// that has to wait for a free slot is late, and its latency includes the wait).
    OpenLoop {
        per_second: f64,
        max_in_flight: usize,
    },
}

impl Pacing {
    pub fn new(rate: Option<f64>, concurrency: usize) -> anyhow::Result<Self> {
        let concurrency = concurrency.clamp(1, 65_536);
        match rate {
            None => Ok(Pacing::ClosedLoop {
                workers: concurrency,
            }),
            Some(r) if r.is_finite() && r > 0.0 => Ok(Pacing::OpenLoop {
                per_second: r,
                max_in_flight: concurrency,
            }),
            Some(r) => {
                anyhow::bail!("--rate must be a positive number of devices per second, not {r}")
            }
        }
    }
}

/// The due time of start number `index` (0-based) after the run's start, at `per_second`.
pub fn due_offset(index: u64, per_second: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_evenly_spaced() {
        assert_eq!(due_offset(0, 100.0), Duration::ZERO);
        assert_eq!(due_offset(1, 100.0), Duration::from_millis(10));
        assert_eq!(due_offset(250, 100.0), Duration::from_millis(2500));
        assert_eq!(due_offset(3, 0.5), Duration::from_secs(6));
        // 1,000 starts at 400/s take 2.4975 s: the last one is due at 999/400.
        let last = due_offset(999, 400.0).as_secs_f64();
        assert!((last - 2.4975).abs() < 1e-9);
    }

    #[test]
    fn pacing_from_flags() {
        assert_eq!(
            Pacing::new(None, 8).unwrap(),
            Pacing::ClosedLoop { workers: 8 }
        );
        assert_eq!(
            Pacing::new(Some(50.0), 0).unwrap(),
            Pacing::OpenLoop {
                per_second: 50.0,
                max_in_flight: 1
            }
        );
        assert!(Pacing::new(Some(0.0), 8).is_err());
        assert!(Pacing::new(Some(f64::NAN), 8).is_err());
        assert!(Pacing::new(Some(-3.0), 8).is_err());
    }
}
