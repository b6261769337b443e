//! The server's resource use over a run, read from Linux's `/proc/<pid>`: CPU time (user +
//! system, from `stat`, the delta between the start and the end of the run) and memory
//! (`VmRSS` from `status`, sampled every 50 ms for the run's peak, and `VmHWM`, the process's
//! lifetime peak).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::sync::watch;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which the kernel fixes at
/// 100 per second for this interface on every mainstream architecture (x86, arm, riscv).
const USER_HZ: f64 = 100.0;

/// How often the resident set is sampled during a run.
pub const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// CPU time from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTime {
    pub user_secs: f64,
    pub system_secs: f64,
}

/// Parses the contents of `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces or parentheses, so fields are counted after the last `)`:
/// `utime` and `stime` are fields 14 and 15.
pub fn parse_stat_cpu(stat: &str) -> Option<CpuTime> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(CpuTime {
        user_secs: utime as f64 / USER_HZ,
        system_secs: stime as f64 / USER_HZ,
    })
}

/// A `Name:  123 kB` line of `/proc/<pid>/status`, in KiB.
pub fn parse_status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// One process's `/proc` files.
#[derive(Debug, Clone)]
pub struct ProcessProbe {
    pid: u32,
    dir: PathBuf,
}

impl ProcessProbe {
    /// Checks that `/proc/<pid>` can be read.
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        let probe = Self {
            pid,
            dir: PathBuf::from(format!("/proc/{pid}")),
        };
        probe.cpu()?;
        probe.memory_kib("VmRSS")?;
        Ok(probe)
    }

    /// The text of `/proc/<pid>/<file>`, and its path for messages.
    fn read(&self, file: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
        let path = self.dir.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is process {} running?)",
                path.display(),
                self.pid
            )
        })?;
        Ok((path, text))
    }

    pub fn cpu(&self) -> anyhow::Result<CpuTime> {
        let (path, text) = self.read("stat")?;
        parse_stat_cpu(&text).with_context(|| format!("{}: unexpected format", path.display()))
    }

    pub fn memory_kib(&self, name: &str) -> anyhow::Result<u64> {
        let (path, text) = self.read("status")?;
        parse_status_kib(&text, name).with_context(|| format!("{}: no {name} line", path.display()))
    }
}

/// What the server used during a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServerUsage {
    pub pid: u32,
    /// User + system CPU seconds spent during the run.
    pub cpu_secs: f64,
    pub cpu_user_secs: f64,
    pub cpu_system_secs: f64,
    /// The largest `VmRSS` sampled during the run (every 50 ms), in KiB.
    pub peak_rss_kib: u64,
    /// `VmRSS` at the end of the run, in KiB.
    pub end_rss_kib: u64,
    /// `VmHWM` at the end of the run: the process's peak resident set since it started.
    pub hwm_kib: u64,
    pub rss_samples: u64,
}

/// Measures a process from [`UsageMonitor::start`] to [`UsageMonitor::finish`].
pub struct UsageMonitor {
    probe: ProcessProbe,
    cpu_at_start: CpuTime,
    stop: watch::Sender<bool>,
    sampler: tokio::task::JoinHandle<(u64, u64)>,
}

impl UsageMonitor {
    /// Reads the CPU time now and starts sampling the resident set.
    pub fn start(pid: u32) -> anyhow::Result<Self> {
        let probe = Arc::new(ProcessProbe::new(pid)?);
        let cpu_at_start = probe.cpu()?;
        let (stop, mut stopped) = watch::channel(false);
        let sampling = probe.clone();
        let sampler = tokio::spawn(async move {
            let (mut peak, mut samples) = match sampling.memory_kib("VmRSS") {
                Ok(kib) => (kib, 1u64),
                Err(_) => (0, 0),
            };
            let mut tick = tokio::time::interval(RSS_SAMPLE_INTERVAL);
            tick.tick().await; // the first tick is immediate: the sample above
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Ok(kib) = sampling.memory_kib("VmRSS") {
                            peak = peak.max(kib);
                            samples += 1;
                        }
                    }
                    _ = stopped.changed() => break,
                }
            }
            (peak, samples)
        });
        Ok(Self {
            probe: Arc::unwrap_or_clone(probe),
            cpu_at_start,
            stop,
            sampler,
        })
    }

    pub async fn finish(self) -> anyhow::Result<ServerUsage> {
        let cpu = self.probe.cpu()?;
        let end_rss_kib = self.probe.memory_kib("VmRSS")?;
        let hwm_kib = self.probe.memory_kib("VmHWM")?;
        let _ = self.stop.send(true);
        let (peak, rss_samples) = self.sampler.await.context("the RSS sampler stopped")?;
        let user = cpu.user_secs - self.cpu_at_start.user_secs;
        let system = cpu.system_secs - self.cpu_at_start.system_secs;
        Ok(ServerUsage {
            pid: self.probe.pid,
            cpu_secs: user + system,
            cpu_user_secs: user,
            cpu_system_secs: system,
            peak_rss_kib: peak.max(end_rss_kib),
            end_rss_kib,
            hwm_kib,
            rss_samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let stat = "4242 (muster (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 6 0 123456 2000000 3000 18446744073709551615";
        let cpu = parse_stat_cpu(stat).unwrap();
        assert_eq!(cpu.user_secs, 2.5);
        assert_eq!(cpu.system_secs, 0.75);
        assert_eq!(parse_stat_cpu("4242 (short) S 1 2"), None);
        assert_eq!(parse_stat_cpu("no parenthesis"), None);
    }

    #[test]
    fn status_lines_in_kib() {
        let status = "Name:\tmuster\nVmPeak:\t  900000 kB\nVmHWM:\t   45678 kB\nVmRSS:\t   34567 kB\nThreads:\t6\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(34567));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(45678));
        assert_eq!(parse_status_kib(status, "Threads"), Some(6));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert_eq!(parse_status_kib("VmRSS:\tlots kB\n", "VmRSS"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn monitors_this_process() {
        let monitor = UsageMonitor::start(std::process::id()).unwrap();
        // Burn a little CPU so the delta is visible at 10 ms resolution.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(120) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let usage = monitor.finish().await.unwrap();
        assert!(usage.cpu_secs > 0.0, "{usage:?}");
        assert!(usage.peak_rss_kib > 0 && usage.hwm_kib >= usage.end_rss_kib / 2);
        assert!(usage.rss_samples >= 1);
    }
}
