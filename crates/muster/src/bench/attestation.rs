//! `muster bench attestation`: what one registration costs the server as the number of
//! symmetric-key enrollment groups grows (issue #12). It tops the running server up to
//! `--groups` groups (`attest-g00000`, ... bulk-created by [`super::groups`]), then
//! measures four phases of `--count` devices each with the load generator of
//! [`super::register`], reading the server's CPU time over each:
//!
//! - `forged-new`: new registration ids, tokens signed with a key no group has (refused);
//! - `first`: first registrations of devices of the last group in id order (the longest search);
//! - `again`: the same devices registering again (their records name their group);
//! - `forged-known`: the same registration ids with forged tokens.
//!
//! The CPU per request includes TLS, HTTP and, for accepted devices, the hub write and the
//! record: compare the same phase across group counts.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use super::groups::{self, group_id};
use super::register::{self, RegisterArgs, RegisterReport};
use super::target::{Mode, Target, TargetArgs};

/// A key no server generates (they are random): signs the forged tokens.
const FORGED_KEY: &str = "Zm9yZ2VkLWtleS1mb3ItdGhlLWF0dGVzdGF0aW9uLWJlbmNo";

#[derive(Args, Debug)]
pub struct AttestationArgs {
    /// Data dir of the running `muster serve` (connection.json)
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Symmetric-key groups named attest-gNNNNN the server should hold (created if missing)
    #[arg(long, default_value_t = 1)]
    pub groups: u64,
    /// Devices per phase
    #[arg(long, default_value_t = 200)]
    pub count: u64,
    /// Devices in flight at once
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// https-keepalive (the device side's cost stays out of the server's), https-fresh or
    /// mqtt-fresh
    #[arg(long, value_enum, default_value_t = Mode::HttpsKeepalive)]
    pub mode: Mode,
    /// Registration ids are TAG-<phase>-<n> [default: a tag from the clock]
    #[arg(long)]
    pub tag: Option<String>,
    /// The server's process id, for its CPU time
    #[arg(long)]
    pub server_pid: u32,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct PhaseReport {
    pub phase: &'static str,
    pub attempted: u64,
    pub assigned: u64,
    pub errors_by_kind: std::collections::BTreeMap<String, u64>,
    /// Server CPU (user + system) per request, in milliseconds.
    pub server_cpu_ms_per_request: f64,
    pub wall_secs: f64,
}

#[derive(Debug, Serialize)]
pub struct AttestationReport {
    pub groups: u64,
    pub created_groups: u64,
    pub mode: Mode,
    pub phases: Vec<PhaseReport>,
}

fn phase(name: &'static str, r: RegisterReport) -> PhaseReport {
    let cpu = r.server.as_ref().map_or(0.0, |s| s.cpu_secs);
    PhaseReport {
        phase: name,
        attempted: r.attempted,
        assigned: r.assigned,
        errors_by_kind: r.errors_by_kind,
        server_cpu_ms_per_request: if r.attempted > 0 {
            cpu * 1000.0 / r.attempted as f64
        } else {
            0.0
        },
        wall_secs: r.wall_secs,
    }
}

pub async fn run(a: AttestationArgs) -> anyhow::Result<()> {
    if a.groups == 0 {
        bail!("--groups must be at least 1: the legitimate devices need a group");
    }
    let client = groups::service_client(&a.data_dir)?;
    let created_groups = groups::seed_groups(&client, a.groups).await?;
    let group_key = groups::primary_key(&client, &group_id(a.groups - 1)).await?;
    let tag = a.tag.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("t{secs}")
    });
    let args = |label: &str, prefix: String, key: &str| RegisterArgs {
        mode: a.mode,
        group_key: Some(key.to_string()),
        group_keys_file: None,
        prefix,
        start: 0,
        count: a.count,
        concurrency: a.concurrency,
        rate: None,
        warmup: 0,
        server_pid: Some(a.server_pid),
        label: Some(label.to_string()),
        json: false,
        target: TargetArgs {
            target: Target::Muster,
            data_dir: Some(a.data_dir.clone()),
            endpoint: None,
            id_scope: None,
            mqtt_port: None,
            mqtt_endpoint: None,
            amqp_port: None,
            ca_cert: None,
        },
    };
    let devices = format!("{tag}-dev-");
    let mut phases = Vec::new();
    for (name, prefix, key) in [
        ("forged-new", format!("{tag}-forged-"), FORGED_KEY),
        ("first", devices.clone(), group_key.as_str()),
        ("again", devices.clone(), group_key.as_str()),
        ("forged-known", devices.clone(), FORGED_KEY),
    ] {
        let report = register::measure(&args(name, prefix, key)).await?;
        phases.push(phase(name, report));
    }
    let report = AttestationReport {
        groups: a.groups,
        created_groups,
        mode: a.mode,
        phases,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "attestation with {} groups ({} created now), {:?}",
            report.groups, report.created_groups, report.mode
        );
        for p in &report.phases {
            println!(
                "  {:13} {:>5}/{:<5} assigned  server CPU {:8.3} ms/request  errors {:?}",
                p.phase, p.assigned, p.attempted, p.server_cpu_ms_per_request, p.errors_by_kind
            );
        }
    }
    Ok(())
}
