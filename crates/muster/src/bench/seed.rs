//! `muster bench seed-records`: fills a stopped server's database with registration records
//! for the service API's paging benchmark. Records are written through the `muster_store::Store`
//! interface, in the collection, key, partition and shape the registration engine writes
//! (`RegistrationRecord`, keyed by the lower-cased registration id, partitioned by the
//! lower-cased group id), in batches of one transaction each. They describe assigned devices
//! that the hub does not hold: enough for the service API, not for the devices.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use muster_client::ConnectionFile;
use muster_proto::{
    DeviceRegistrationState, EnrollmentGroupId, RegistrationId, RegistrationStatus,
    RegistrationSubstatus, Timestamp,
};
use muster_registration::record::RegistrationRecord;
use muster_store::{Collection, Expect, SqliteStore, Store, Write};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct SeedRecordsArgs {
    /// Data dir of a stopped `muster serve` (its muster.db must exist: start it once first)
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The enrollment group the records belong to
    #[arg(long)]
    pub group_id: String,
    /// Registration ids are PREFIX<n>
    #[arg(long, default_value = "seed-")]
    pub prefix: String,
    /// First n
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Records to write
    #[arg(long, default_value_t = 1_000_000)]
    pub count: u64,
    /// Records per transaction
    #[arg(long, default_value_t = 10_000)]
    pub batch: usize,
    /// The assigned hub the records name [default: the built-in hub from connection.json]
    #[arg(long)]
    pub hub: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct SeedReport {
    pub records: u64,
    pub batches: u64,
    pub secs: f64,
    pub records_per_sec: f64,
}

/// The record the engine stores for a device of `group` assigned to `hub`.
pub fn assigned_record(
    id: RegistrationId,
    group: &EnrollmentGroupId,
    hub: &str,
    operation: u64,
    now: Timestamp,
) -> RegistrationRecord {
    let device_id = id.as_str().to_string();
    RegistrationRecord {
        state: DeviceRegistrationState {
            created_date_time_utc: Some(now),
            assigned_hub: Some(hub.to_string()),
            device_id: Some(device_id),
            status: RegistrationStatus::Assigned,
            substatus: Some(RegistrationSubstatus::InitialAssignment),
            last_updated_date_time_utc: Some(now),
            ..DeviceRegistrationState::unassigned(id)
        },
        operation_id: Some(format!("5.{:016x}.{operation:032x}", 0x5eed)),
        enrollment_group_id: Some(group.as_str().to_string()),
        pending: None,
        issued_certificate_chain: None,
    }
}

/// Refuses to write while something answers on the server's HTTPS port.
async fn ensure_stopped(file: &ConnectionFile) -> anyhow::Result<()> {
    let addr = (file.dps_host.as_str(), file.https_port);
    let probe = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    if let Ok(Ok(_)) = probe {
        bail!(
            "a server answers on {}:{}; stop `muster serve` before seeding its database",
            file.dps_host,
            file.https_port
        );
    }
    Ok(())
}

pub async fn run(a: SeedRecordsArgs) -> anyhow::Result<()> {
    let db = a.data_dir.join("muster.db");
    if !db.is_file() {
        bail!(
            "{} does not exist: start `muster serve --data-dir {}` once first",
            db.display(),
            a.data_dir.display()
        );
    }
    let file = ConnectionFile::read(&a.data_dir)
        .with_context(|| format!("reading connection.json in {}", a.data_dir.display()))?;
    ensure_stopped(&file).await?;
    let hub = match (&a.hub, file.hubs.iter().find(|h| h.built_in)) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.host_name.clone(),
        (None, None) => bail!("connection.json names no built-in hub; pass --hub"),
    };
    let group = EnrollmentGroupId::new(a.group_id.as_str())
        .map_err(|e| anyhow::anyhow!("--group-id: {e}"))?;
    let partition = Some(group.key());
    let store = SqliteStore::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let now = Timestamp::from_unix_millis(now_ms).context("the clock is out of range")?;
    let batch = a.batch.clamp(1, 100_000) as u64;
    let started = Instant::now();
    let mut batches = 0u64;
    let mut next = 0u64;
    while next < a.count {
        let end = (next + batch).min(a.count);
        let mut writes = Vec::with_capacity((end - next) as usize);
        for i in next..end {
            let id = RegistrationId::new(format!("{}{}", a.prefix, a.start + i))
                .map_err(|e| anyhow::anyhow!("--prefix makes an invalid registration id: {e}"))?;
            let key = id.key();
            let record = assigned_record(id, &group, &hub, a.start + i, now);
            let body = serde_json::to_value(&record).context("encoding a record")?;
            writes.push(
                Write::put(Collection::Registrations, key, Expect::Any, body)
                    .with_partition(partition.clone()),
            );
        }
        let outcomes = store.write(writes).await?;
        if let Some(bad) = outcomes.iter().find(|o| !o.is_applied()) {
            bail!("a record was not written: {bad:?}");
        }
        batches += 1;
        next = end;
    }
    let secs = started.elapsed().as_secs_f64();
    let report = SeedReport {
        records: a.count,
        batches,
        secs,
        records_per_sec: if secs > 0.0 {
            a.count as f64 / secs
        } else {
            0.0
        },
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        super::report::print_rows(
            "seed-records",
            &[
                (
                    "records".into(),
                    format!("{} in {} transactions", report.records, report.batches),
                ),
                (
                    "time".into(),
                    format!(
                        "{:.2} s ({:.0} records/s)",
                        report.secs, report.records_per_sec
                    ),
                ),
            ],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_the_service_api_reads_them() {
        let group = EnrollmentGroupId::new("Bench-Group").unwrap();
        let id = RegistrationId::new("Seed-7").unwrap();
        let now = Timestamp::from_unix_millis(1_800_000_000_000).unwrap();
        let record = assigned_record(id, &group, "hub.local", 7, now);
        let body = serde_json::to_value(&record).unwrap();
        assert_eq!(body["enrollmentGroupId"], "Bench-Group");
        assert_eq!(body["status"], "assigned");
        let state: DeviceRegistrationState = serde_json::from_value(body).unwrap();
        assert_eq!(state.device_id.as_deref(), Some("Seed-7"));
        assert_eq!(state.registration_id.key(), "seed-7");
        assert_eq!(group.key(), "bench-group");
    }
}
