//! Latency samples and their summary: nearest-rank percentiles (p50, p90, p99) and the
//! maximum, in milliseconds.

use std::time::Duration;

use serde::Serialize;

/// The summary of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct LatencySummary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// The nearest-rank `percentile` (0 < p ≤ 100) of `sorted` (ascending): the smallest sample
/// such that at least p % of the samples are ≤ it. `None` when there are no samples.
pub fn nearest_rank(sorted: &[Duration], percentile: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((percentile / 100.0) * n as f64).ceil() as usize;
    let index = rank.clamp(1, n) - 1;
    Some(sorted[index])
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl LatencySummary {
    /// Summarises `samples` (any order). All zero when there are none.
    pub fn from_samples(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |p| nearest_rank(&samples, p).map(millis).unwrap_or(0.0);
        let total: Duration = samples.iter().sum();
        Self {
            samples: samples.len(),
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: samples.last().copied().map(millis).unwrap_or(0.0),
            mean_ms: millis(total) / samples.len() as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn nearest_rank_of_one_to_hundred() {
        let sorted: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(nearest_rank(&sorted, 50.0), Some(ms(50)));
        assert_eq!(nearest_rank(&sorted, 90.0), Some(ms(90)));
        assert_eq!(nearest_rank(&sorted, 99.0), Some(ms(99)));
        assert_eq!(nearest_rank(&sorted, 100.0), Some(ms(100)));
        assert_eq!(nearest_rank(&sorted, 0.0), Some(ms(1)));
        assert_eq!(nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn small_sets_round_up() {
        // Nearest rank: p99 of 10 samples is the 10th, p50 of 3 the 2nd.
        let ten: Vec<Duration> = (1..=10).map(ms).collect();
        assert_eq!(nearest_rank(&ten, 99.0), Some(ms(10)));
        assert_eq!(nearest_rank(&ten, 90.0), Some(ms(9)));
        assert_eq!(nearest_rank(&[ms(1), ms(2), ms(3)], 50.0), Some(ms(2)));
        assert_eq!(nearest_rank(&[ms(7)], 99.0), Some(ms(7)));
    }

    #[test]
    fn summary_sorts_and_averages() {
        let s = LatencySummary::from_samples(vec![ms(30), ms(10), ms(20), ms(40)]);
        assert_eq!(s.samples, 4);
        assert_eq!(s.p50_ms, 20.0);
        assert_eq!(s.p90_ms, 40.0);
        assert_eq!(s.max_ms, 40.0);
        assert_eq!(s.mean_ms, 25.0);
        assert_eq!(
            LatencySummary::from_samples(Vec::new()),
            LatencySummary::default()
        );
    }
}
