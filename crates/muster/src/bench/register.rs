//! `muster bench register`: the load generator. It registers `--count` simulated devices
//! `PREFIX<n>` of a symmetric-key enrollment group (each key derived from the group key) with
//! the real `muster_client::DeviceClient`, in one of four connection modes, closed loop
//! (`--concurrency` workers) or at a fixed arrival rate (`--rate`, open loop), and reports
//! assigned devices, errors by kind, throughput, per-device latency percentiles (from the
//! start of a device's request, or its due time at a fixed rate, to its `assigned` answer,
//! handshake included) and, with `--server-pid`, the server's CPU time and memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use muster_client::{DeviceClient, DeviceKey, RegisterOptions, RetryPolicy, Transport};
use serde::Serialize;

use super::latency::LatencySummary;
use super::reference::{fetch_reference_stats, ReferenceCounters};
use super::schedule::{due_offset, Pacing};
use super::server_usage::{ServerUsage, UsageMonitor};
use super::target::{device_client, Mode, ResolvedTarget, Target, TargetArgs};

/// Any valid group key, for `--target tls-reference` (which checks no token) when none is given.
const PLACEHOLDER_GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// https-fresh, https-keepalive, mqtt-fresh or amqp-fresh
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// The enrollment group's key (required for --target muster, unless --group-keys-file)
    #[arg(long, env = "MUSTER_GROUP_KEY", hide_env_values = true)]
    pub group_key: Option<String>,
    /// A file of group keys, one per line: device n belongs to the group of line n mod lines
    /// (devices spread over several groups, as `muster bench seed-groups --keys-file` writes);
    /// wins over --group-key
    #[arg(long)]
    pub group_keys_file: Option<std::path::PathBuf>,
    /// Registration ids are PREFIX<n>
    #[arg(long, default_value = "bench-")]
    pub prefix: String,
    /// First n
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Devices to register
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Closed loop: devices in flight at once. With --rate: the most in flight at once
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open loop: start devices at this fixed rate (devices/s) whatever the server's speed
    #[arg(long)]
    pub rate: Option<f64>,
    /// Register this many devices (ids PREFIXwarm-<n>) with the same client before the
    /// measured run, closed loop, not counted: an open-loop https-keepalive run then starts
    /// with its connections open, as a gateway's are, instead of opening them all in its first
    /// scheduled milliseconds
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Also measure this process (the server): CPU time and resident memory during the run
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A name for this run in the report
    #[arg(long)]
    pub label: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// One device's result.
enum DeviceOutcome {
    Assigned(Duration),
    NotAssigned(String),
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterReport {
    pub label: Option<String>,
    pub mode: Mode,
    pub target: Target,
    pub endpoint: String,
    pub concurrency: usize,
    /// devices/s when open loop.
    pub rate: Option<f64>,
    pub attempted: u64,
    pub assigned: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub wall_secs: f64,
    /// Assigned devices per second of wall time.
    pub throughput_per_sec: f64,
    /// From each assigned device's start (open loop: its due time) to its `assigned` answer.
    pub latency: LatencySummary,
    /// Open loop: the latest a start came after its due time (the generator, or a full
    /// --concurrency, held it back; its latency includes the wait).
    pub max_start_lag_ms: Option<f64>,
    pub server: Option<ServerUsage>,
    /// --target tls-reference: what the reference's listener of this mode (HTTPS or MQTT) saw
    /// during the run.
    pub reference: Option<ReferenceCounters>,
}

/// A short, stable name for why a device was not assigned.
pub fn error_kind(e: &muster_client::Error) -> String {
    use muster_client::Error;
    match e {
        Error::Service {
            status, error_code, ..
        } => format!("http {status} / {error_code}"),
        Error::Transport { source, .. } if source.is_timeout() => "transport: timeout".into(),
        Error::Transport { source, .. } if source.is_connect() => "transport: connect".into(),
        Error::Transport { .. } => "transport: other".into(),
        Error::Mqtt(m) if m.starts_with("connecting to") => "mqtt: connect".into(),
        Error::Mqtt(m) if m.starts_with("TLS with") => "mqtt: tls".into(),
        Error::Mqtt(m) if m.starts_with("no answer within") => "mqtt: timeout".into(),
        Error::Mqtt(m) if m.contains("refused") => "mqtt: connect refused".into(),
        Error::Mqtt(_) => "mqtt: other".into(),
        Error::StillAssigning { .. } => "still assigning".into(),
        Error::UnexpectedResponse { status, .. } => format!("unexpected answer (http {status})"),
        Error::Hub { .. } => "hub error".into(),
        Error::Stream { .. } => "stream".into(),
        Error::InvalidInput(_) => "invalid input".into(),
        Error::Tls(_) => "tls configuration".into(),
        Error::Tpm(_) => "tpm".into(),
        Error::Io { .. } => "io".into(),
    }
}

async fn register_one(run: &Run, i: u64, measured_from: Instant) -> DeviceOutcome {
    let id = run.id(i);
    let (id, key) = (id.as_str(), run.key(i));
    if let Some(amqp) = &run.amqp {
        return match super::amqp::register(amqp, key, id).await {
            Ok(status) if status == "assigned" => DeviceOutcome::Assigned(measured_from.elapsed()),
            Ok(status) => DeviceOutcome::NotAssigned(status),
            Err(kind) => DeviceOutcome::NotAssigned(kind),
        };
    }
    let (client, options) = (&run.client, &run.options);
    match client.register(id, key, options).await {
        Ok(r) if r.is_assigned() => DeviceOutcome::Assigned(measured_from.elapsed()),
        Ok(r) => DeviceOutcome::NotAssigned(match r.state.error_code {
            Some(code) => format!("{} / {code}", r.status),
            None => r.status.to_string(),
        }),
        Err(e) => DeviceOutcome::NotAssigned(error_kind(&e)),
    }
}

struct Tally {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new(capacity: usize) -> Self {
        Self {
            latencies: Vec::with_capacity(capacity),
            errors: BTreeMap::new(),
        }
    }

    fn add(&mut self, outcome: DeviceOutcome) {
        match outcome {
            DeviceOutcome::Assigned(d) => self.latencies.push(d),
            DeviceOutcome::NotAssigned(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
    }
}

struct Run {
    client: Arc<DeviceClient>,
    /// `--mode amqp-fresh`: AMQP devices, not `client`.
    amqp: Option<super::amqp::AmqpTarget>,
    /// Device n's key is `keys[n % keys.len()]` (never empty).
    keys: Arc<[DeviceKey]>,
    options: Arc<RegisterOptions>,
    prefix: Arc<str>,
    start: u64,
    count: u64,
}

impl Run {
    fn id(&self, i: u64) -> String {
        format!("{}{}", self.prefix, self.start + i)
    }

    fn key(&self, i: u64) -> &DeviceKey {
        &self.keys[((self.start + i) % self.keys.len() as u64) as usize]
    }

    /// `workers` loops, each taking the next device when its previous one is done.
    async fn closed_loop(self, workers: usize) -> anyhow::Result<(Tally, Option<f64>)> {
        let next = Arc::new(AtomicU64::new(0));
        let run = Arc::new(self);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers.min(run.count.max(1) as usize) {
            let (run, next) = (run.clone(), next.clone());
            set.spawn(async move {
                let mut tally = Tally::new(0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= run.count {
                        break;
                    }
                    let t0 = Instant::now();
                    tally.add(register_one(&run, i, t0).await);
                }
                tally
            });
        }
        let mut tally = Tally::new(run.count as usize);
        while let Some(worker) = set.join_next().await {
            tally.merge(worker.context("a load worker panicked")?);
        }
        Ok((tally, None))
    }

    /// Device `i` starts at `i / per_second`; latency counts from that due time.
    async fn open_loop(
        self,
        per_second: f64,
        max_in_flight: usize,
    ) -> anyhow::Result<(Tally, Option<f64>)> {
        let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
        let run = Arc::new(self);
        let mut set = tokio::task::JoinSet::new();
        let mut tally = Tally::new(run.count as usize);
        let mut max_lag = Duration::ZERO;
        let started = tokio::time::Instant::now();
        for i in 0..run.count {
            let due = started + due_offset(i, per_second);
            tokio::time::sleep_until(due).await;
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .context("slots closed")?;
            max_lag = max_lag.max(due.elapsed());
            let run = run.clone();
            set.spawn(async move {
                let outcome = register_one(&run, i, due.into_std()).await;
                drop(permit);
                outcome
            });
            while let Some(done) = set.try_join_next() {
                tally.add(done.context("a device task panicked")?);
            }
        }
        while let Some(done) = set.join_next().await {
            tally.add(done.context("a device task panicked")?);
        }
        Ok((tally, Some(max_lag.as_secs_f64() * 1000.0)))
    }
}

pub async fn run(a: RegisterArgs) -> anyhow::Result<()> {
    let report = measure(&a).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        super::report::print_register(&report);
    }
    if report.assigned == 0 && report.attempted > 0 {
        bail!("no device was assigned; see the errors above");
    }
    Ok(())
}

pub async fn measure(a: &RegisterArgs) -> anyhow::Result<RegisterReport> {
    let target: ResolvedTarget = a.target.resolve()?;
    let pacing = Pacing::new(a.rate, a.concurrency)?;
    if a.target.target == Target::TlsReference {
        match a.mode {
            Mode::AmqpFresh => bail!(
                "the TLS reference speaks HTTPS and MQTT only; compare amqp-fresh with its \
                 mqtt-fresh rate"
            ),
            // Not the MQTT port of connection.json: that is `muster serve`'s.
            Mode::MqttFresh if a.target.mqtt_endpoint.is_none() && a.target.mqtt_port.is_none() => {
                bail!(
                    "pass --mqtt-endpoint HOST:PORT: the address of the TLS reference's \
                     --mqtt-listen"
                )
            }
            _ => {}
        }
    }
    let group_keys = match (&a.group_keys_file, &a.group_key, a.target.target) {
        (Some(path), _, _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --group-keys-file {}", path.display()))?;
            let keys: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if keys.is_empty() {
                bail!("--group-keys-file {} holds no key", path.display());
            }
            keys
        }
        (None, Some(k), _) => vec![k.clone()],
        (None, None, Target::TlsReference) => vec![PLACEHOLDER_GROUP_KEY.to_string()],
        (None, None, Target::Muster) => {
            bail!("pass --group-key (or MUSTER_GROUP_KEY) or --group-keys-file")
        }
    };
    let keys: Arc<[DeviceKey]> = group_keys.into_iter().map(DeviceKey::Group).collect();
    for (n, key) in keys.iter().enumerate() {
        key.device_key("probe")
            .with_context(|| format!("invalid group key (number {})", n + 1))?;
    }
    let pool_size = match pacing {
        Pacing::ClosedLoop { workers } => workers,
        Pacing::OpenLoop { max_in_flight, .. } => max_in_flight,
    };
    let client = device_client(&target, a.mode, pool_size)?.with_retry_policy(RetryPolicy {
        // Every refusal is counted, not retried: a throttled device is an error here.
        max_attempts: 1,
        ..RetryPolicy::default()
    });
    let options = RegisterOptions {
        transport: match a.mode {
            Mode::MqttFresh => Transport::Mqtt,
            Mode::HttpsFresh | Mode::HttpsKeepalive | Mode::AmqpFresh => Transport::Https,
        },
        payload: None,
        csr: None,
    };
    let amqp = match a.mode {
        Mode::AmqpFresh => Some(amqp_target(&target).await?),
        _ => None,
    };
    let run = Run {
        client: Arc::new(client),
        amqp,
        keys,
        options: Arc::new(options),
        prefix: Arc::from(a.prefix.as_str()),
        start: a.start,
        count: a.count,
    };
    if a.warmup > 0 {
        let warm = Run {
            prefix: Arc::from(format!("{}warm-", a.prefix).as_str()),
            start: 0,
            count: a.warmup,
            client: run.client.clone(),
            amqp: run.amqp.clone(),
            keys: run.keys.clone(),
            options: run.options.clone(),
        };
        // At most half the pool at once: the server admits a bounded number of connections
        // per address before their first answer, and the pool opens one per worker.
        warm.closed_loop((pool_size / 2).max(1)).await?;
    }
    let reference_before = match a.target.target {
        Target::TlsReference => Some(fetch_reference_stats(&target).await?),
        Target::Muster => None,
    };
    let monitor = match a.server_pid {
        Some(pid) => Some(UsageMonitor::start(pid)?),
        None => None,
    };
    let started = Instant::now();
    let (tally, max_start_lag_ms) = match pacing {
        Pacing::ClosedLoop { workers } => run.closed_loop(workers).await?,
        Pacing::OpenLoop {
            per_second,
            max_in_flight,
        } => run.open_loop(per_second, max_in_flight).await?,
    };
    let wall = started.elapsed();
    let server = match monitor {
        Some(m) => Some(m.finish().await?),
        None => None,
    };
    let reference = match reference_before {
        Some(before) => {
            let after = fetch_reference_stats(&target).await?;
            after
                .of_mode(a.mode)
                .zip(before.of_mode(a.mode))
                .map(|(after, before)| after.since(&before))
        }
        None => None,
    };
    let assigned = tally.latencies.len() as u64;
    let errors: u64 = tally.errors.values().sum();
    let wall_secs = wall.as_secs_f64();
    Ok(RegisterReport {
        label: a.label.clone(),
        mode: a.mode,
        target: a.target.target,
        endpoint: target.device_address(a.mode),
        concurrency: pool_size,
        rate: a.rate,
        attempted: a.count,
        assigned,
        errors,
        errors_by_kind: tally.errors,
        wall_secs,
        throughput_per_sec: if wall_secs > 0.0 {
            assigned as f64 / wall_secs
        } else {
            0.0
        },
        latency: LatencySummary::from_samples(tally.latencies),
        max_start_lag_ms,
        server,
        reference,
    })
}

/// The AMQP address of the target: its device endpoint's host, on the AMQP port.
async fn amqp_target(target: &ResolvedTarget) -> anyhow::Result<super::amqp::AmqpTarget> {
    let host = super::target::split_host_port(&target.endpoint)
        .0
        .to_string();
    let addr = tokio::net::lookup_host((host.as_str(), target.amqp_port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    Ok(super::amqp::AmqpTarget {
        addr,
        host,
        id_scope: target.id_scope.clone(),
        tls: Arc::new(super::target::tls_config(target)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_short_and_stable() {
        let throttled = muster_client::Error::Service {
            status: 429,
            error_code: 429001,
            message: "busy".into(),
            tracking_id: String::new(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(error_kind(&throttled), "http 429 / 429001");
        assert_eq!(
            error_kind(&muster_client::Error::Mqtt(
                "connecting to 127.0.0.9:18883: refused".into()
            )),
            "mqtt: connect"
        );
        assert_eq!(
            error_kind(&muster_client::Error::Mqtt("no answer within 30s".into())),
            "mqtt: timeout"
        );
    }
}
