//! `muster bench`: the benchmark tools of issue #8, run against a real server.
//!
//! - [`register`] — the load generator (`muster bench register --mode ...`): simulated
//!   devices of a symmetric-key group over HTTPS (fresh TLS per device, or keep-alive) or MQTT
//!   (fresh TLS per device), closed loop or at a fixed rate, with latency percentiles and the
//!   server's CPU and memory.
//! - [`reference`] — `muster bench tls-reference`: TLS servers with the HTTPS and MQTT
//!   listeners' settings that only handshake, do the protocol's least exchange (HTTP/1.1; MQTT
//!   CONNECT, SUBSCRIBE) and answer a fixed `assigned`, the physical limit to compare with.
//! - [`service_api`] — bulk enrollment creation and paging-query latency at scale.
//! - [`amqp`] — the AMQP device of `--mode amqp-fresh`.
//! - [`attestation`] — `muster bench attestation`: server CPU per forged token and per
//!   registration as the number of enrollment groups grows.
//! - [`groups`] — `muster bench seed-groups`: tops a running server up to N symmetric-key
//!   groups (shared with [`attestation`]) and writes the keys of the devices' groups (the
//!   last K) for `bench register --group-keys-file`: the scaling curve of `scripts/bench.sh`.
//! - [`seed`] — `muster bench seed-records`: registration records written straight into a
//!   stopped server's store.
//! - [`latency`], [`schedule`], [`server_usage`], [`target`], [`report`] — percentiles, the
//!   arrival-rate scheduler, `/proc` sampling, connection settings per mode, output.

pub mod amqp;
pub mod attestation;
pub mod groups;
pub mod latency;
pub mod reference;
pub mod register;
pub mod report;
pub mod schedule;
pub mod seed;
pub mod server_usage;
pub mod service_api;
pub mod target;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Register simulated devices of an enrollment group and measure throughput and latency.
    ///
    /// Modes: https-fresh (new TCP+TLS per device, no session resumption), https-keepalive
    /// (a pool of persistent connections), mqtt-fresh (new TCP+TLS+MQTT session per device),
    /// amqp-fresh (new TCP+TLS+AMQP connection per device).
    /// Closed loop with --concurrency workers, or open loop with --rate devices/s. Latency runs
    /// from a device's start (open loop: its due time) to its `assigned` answer.
    ///
    /// Examples:
    ///   muster bench register --data-dir d --group-key "$KEY" --mode https-fresh --count 5000
    ///   muster bench register --data-dir d --group-key "$KEY" --mode https-keepalive \
    ///       --count 20000 --concurrency 64 --server-pid "$PID" --json
    ///   muster bench register --data-dir d --group-key "$KEY" --mode mqtt-fresh --rate 500
    ///   muster bench register --data-dir d --target tls-reference --endpoint 127.0.0.9:18444 \
    ///       --mode https-fresh --count 5000
    ///   muster bench register --data-dir d --target tls-reference --endpoint 127.0.0.9:18444 \
    ///       --mqtt-endpoint 127.0.0.9:18445 --mode mqtt-fresh --count 5000
    #[command(verbatim_doc_comment)]
    Register(register::RegisterArgs),
    /// Serve TLS handshakes and one fixed DPS-like answer per request: the physical limit.
    ///
    /// Presents DATA_DIR/server.pem with the HTTPS listener's TLS settings on --listen and,
    /// with --mqtt-listen, the MQTT listener's there: CONNECT/CONNACK, SUBSCRIBE/SUBACK and
    /// the fixed answer to each register publish. No credential is checked. Counts each
    /// listener's connections, resumed handshakes and requests (GET /_reference/stats on the
    /// HTTPS address); prints them on SIGINT or SIGTERM.
    ///
    /// Example:
    ///   muster bench tls-reference --data-dir d --listen 127.0.0.9:18444 \
    ///       --mqtt-listen 127.0.0.9:18445
    #[command(verbatim_doc_comment, name = "tls-reference")]
    TlsReference(reference::TlsReferenceArgs),
    /// Bulk-create individual enrollments and measure paging-query latency.
    ///
    /// Examples:
    ///   muster bench service-api --data-dir d --enrollments 100000 --queries 0
    ///   muster bench service-api --data-dir d --enrollments 0 --group-id bench --queries 200
    #[command(verbatim_doc_comment, name = "service-api")]
    ServiceApi(service_api::ServiceApiArgs),
    /// Write registration records of a group straight into a stopped server's database.
    ///
    /// Example:
    ///   muster bench seed-records --data-dir d --group-id bench --count 1000000
    #[command(verbatim_doc_comment, name = "seed-records")]
    SeedRecords(seed::SeedRecordsArgs),
    /// Server CPU per forged token and per registration with N symmetric-key groups.
    ///
    /// Creates groups attest-g00000.. up to --groups through the service API, then measures
    /// forged tokens (new ids), first registrations (a device of the last group), the same
    /// devices again, and forged tokens for their ids.
    ///
    /// Example:
    ///   muster bench attestation --data-dir d --groups 10000 --count 200 --server-pid "$PID"
    #[command(verbatim_doc_comment)]
    Attestation(attestation::AttestationArgs),
    /// Top a running server up to N symmetric-key groups attest-g00000.. (bulk-created).
    ///
    /// The benchmarks' devices belong to the last --spread groups in id order: the longest
    /// search for a registration id Muster has not seen. --keys-file writes their primary
    /// keys for `muster bench register --group-keys-file` (device n: group n mod K).
    ///
    /// Example:
    ///   muster bench seed-groups --data-dir d --groups 10000 --spread 8 --keys-file keys
    ///   muster bench register --data-dir d --group-keys-file keys --mode https-keepalive
    #[command(verbatim_doc_comment, name = "seed-groups")]
    SeedGroups(groups::SeedGroupsArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Register(a) => register::run(a).await,
        BenchCommand::TlsReference(a) => reference::run(a).await,
        BenchCommand::ServiceApi(a) => service_api::run(a).await,
        BenchCommand::SeedRecords(a) => seed::run(a).await,
        BenchCommand::Attestation(a) => attestation::run(a).await,
        BenchCommand::SeedGroups(a) => groups::run(a).await,
    }
}
