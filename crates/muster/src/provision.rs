//! `muster provision`: registration on behalf of many devices of a symmetric-key enrollment
//! group, the device-management-platform pattern. One CSV row per device, appended and flushed
//! as each finishes, so a killed run loses nothing and a rerun skips what is already there.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use muster_client::{DeviceClient, DeviceKey, RegisterOptions, RetryPolicy, Transport};
use serde_json::{json, Value};

use crate::conn::DeviceConn;
use crate::output::{print_object, Format, OutputArgs};

pub const HEADER: [&str; 6] = [
    "registration_id",
    "device_id",
    "assigned_hub",
    "derived_key",
    "status",
    "error",
];

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["ids", "prefix"])))]
pub struct ProvisionArgs {
    /// The enrollment group's key; each device's key is derived from it
    #[arg(long, env = "MUSTER_GROUP_KEY", hide_env_values = true)]
    pub group_key: String,
    /// File of registration ids, one per line (blank lines and # comments skipped)
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Registration ids PREFIX + number
    #[arg(long, requires = "count")]
    pub prefix: Option<String>,
    /// How many ids to generate with --prefix
    #[arg(long)]
    pub count: Option<u64>,
    /// First number for --prefix
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// CSV file to append results to (created with a header if missing)
    #[arg(long)]
    pub out: PathBuf,
    /// Registrations in flight at once
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// https or mqtt
    #[arg(long, default_value = "https")]
    pub transport: Transport,
    /// Attempts per device when throttled, unavailable or unreachable (retry-after honoured)
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Also retry devices whose row in the out file did not end `assigned`
    #[arg(long)]
    pub retry_failed: bool,
    /// JSON payload sent with every registration (custom allocation webhooks)
    #[arg(long)]
    pub payload: Option<String>,
    /// Don't draw a progress bar
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub conn: DeviceConn,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// The last status of each id already in the out file. A final line without its newline (a
/// run killed mid-write) is cut off so the file stays well-formed.
fn read_done(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let mut done = HashMap::new();
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let keep = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if keep < bytes.len() {
        f.set_len(keep as u64)
            .with_context(|| format!("truncating the partial last line of {}", path.display()))?;
        bytes.truncate(keep);
    }
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes.as_slice());
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.with_context(|| format!("{} row {}: not CSV", path.display(), i + 2))?;
        if let Some(id) = rec.get(0).filter(|s| !s.is_empty()) {
            done.insert(id.to_string(), rec.get(4).unwrap_or("").to_string());
        }
    }
    Ok(done)
}

fn read_ids(a: &ProvisionArgs) -> anyhow::Result<Vec<String>> {
    match (&a.ids, &a.prefix, a.count) {
        (Some(file), _, _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading ids from {}", file.display()))?;
            Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect())
        }
        (None, Some(p), Some(n)) => Ok((a.start..a.start + n).map(|i| format!("{p}{i}")).collect()),
        _ => bail!("pass --ids FILE or --prefix P --count N"),
    }
}

struct Row {
    id: String,
    device_id: String,
    hub: String,
    key: String,
    status: String,
    error: String,
}

async fn one(client: &DeviceClient, key: &DeviceKey, id: String, options: &RegisterOptions) -> Row {
    let derived = key.device_key(&id).unwrap_or_default();
    match client.register(&id, key, options).await {
        Ok(r) => Row {
            device_id: r.state.device_id.clone().unwrap_or_default(),
            hub: r.state.assigned_hub.clone().unwrap_or_default(),
            key: derived,
            status: r.status.to_string(),
            error: match (r.state.error_code, &r.state.error_message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                (None, Some(m)) => m.clone(),
                (None, None) => String::new(),
            },
            id,
        },
        Err(e) => Row {
            device_id: String::new(),
            hub: String::new(),
            key: derived,
            status: "error".into(),
            error: e.to_string(),
            id,
        },
    }
}

pub async fn run(a: ProvisionArgs) -> anyhow::Result<()> {
    let key = DeviceKey::Group(a.group_key.clone());
    key.device_key("probe").context("invalid --group-key")?;
    let payload = match &a.payload {
        Some(p) => Some(serde_json::from_str::<Value>(p).context("--payload is not valid JSON")?),
        None => None,
    };
    let ids = read_ids(&a)?;
    let done = read_done(&a.out)?;
    let mut seen = std::collections::HashSet::new();
    let todo: VecDeque<String> = ids
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .filter(|id| match done.get(id) {
            None => true,
            Some(status) => a.retry_failed && status != "assigned",
        })
        .collect();
    let skipped = seen.len() - todo.len();
    let total = todo.len();

    let client = a.conn.client()?.with_retry_policy(RetryPolicy {
        max_attempts: a.retries.max(1),
        ..RetryPolicy::default()
    });
    let options = RegisterOptions {
        transport: a.transport,
        payload,
        csr: None,
    };

    // The out file: header when new, then one flushed row per device.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&a.out)
        .with_context(|| format!("opening {}", a.out.display()))?;
    let empty = file.seek(SeekFrom::End(0))? == 0;
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(file);
    let write_err = |e: csv::Error| anyhow::anyhow!("writing {}: {e}", a.out.display());
    if empty {
        writer.write_record(HEADER).map_err(write_err)?;
        writer
            .flush()
            .with_context(|| format!("writing {}", a.out.display()))?;
    }

    let bar = if a.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let queue = Arc::new(Mutex::new(todo));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Row>(256);
    let client = Arc::new(client);
    let key = Arc::new(key);
    let options = Arc::new(options);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..a.concurrency.clamp(1, 4096).min(total.max(1)) {
        let (queue, tx, client, key, options) = (
            queue.clone(),
            tx.clone(),
            client.clone(),
            key.clone(),
            options.clone(),
        );
        workers.spawn(async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some(id) = next else { break };
                let row = one(&client, &key, id, &options).await;
                if tx.send(row).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let (mut assigned, mut failed) = (0usize, 0usize);
    while let Some(row) = rx.recv().await {
        if row.status == "assigned" {
            assigned += 1;
        } else {
            failed += 1;
            bar.set_message(format!("{failed} failed"));
        }
        writer
            .write_record([
                &row.id,
                &row.device_id,
                &row.hub,
                &row.key,
                &row.status,
                &row.error,
            ])
            .map_err(write_err)?;
        writer
            .flush()
            .with_context(|| format!("writing {}", a.out.display()))?;
        bar.inc(1);
    }
    while workers.join_next().await.is_some() {}
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let rate = if elapsed > Duration::from_millis(1) {
        assigned as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    match a.output.format() {
        Format::Table if a.output.query.is_none() => crate::output::emit(&format!(
            "{assigned} assigned, {failed} failed, {skipped} skipped (already in {}) in {:.1}s ({rate:.0}/s)",
            a.out.display(),
            elapsed.as_secs_f64()
        )),
        _ => print_object(
            &a.output,
            &json!({
                "assigned": assigned,
                "failed": failed,
                "skipped": skipped,
                "seconds": elapsed.as_secs_f64(),
                "out": a.out,
            }),
        ),
    }
    if failed > 0 {
        bail!(
            "{failed} devices did not end assigned; see the status and error columns of {} \
             (rerun with --retry-failed to try them again)",
            a.out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_last_line_is_cut_and_ids_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.csv");
        std::fs::write(
            &p,
            "registration_id,device_id,assigned_hub,derived_key,status,error\n\
             a,a,h,k,assigned,\nb,,,k,error,\"x, y\"\nc,c,h,k,assig",
        )
        .unwrap();
        let done = read_done(&p).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done["a"], "assigned");
        assert_eq!(done["b"], "error");
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("\"x, y\"\n"));
    }
}
