//! `muster`: the Muster server (`muster serve`) and the operator CLI, shaped like `az iot dps`
//! and `az iot hub`: enrollments, enrollment groups, registration records, access policies and
//! connection strings (`policy.rs`), CA certificates with proof of possession
//! (`ca_certificate.rs`), linked hubs, device registration, bulk provisioning on behalf of
//! devices, deprovisioning with cascade, the built-in hub's devices, twins, cloud-to-device
//! messages, direct methods and telemetry, certificates issued for CSRs (`certificate issued`,
//! `issued_cert.rs`), TPM devices (`tpm.rs`), backup and restore of a data dir. `output.rs`
//! renders every result (`-o`, `--query`) and every error (DPS error body, exit code).

mod audit;
mod backup;
mod bench;
mod ca_certificate;
mod conn;
mod device;
mod enrollment;
mod hub;
mod issued_cert;
mod linked_hub;
mod logging;
mod output;
mod policy;
mod provision;
mod registration;
mod serve;
#[cfg(feature = "postgres")]
mod store;
mod tpm;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use muster_server::LogFormat;

/// `muster --version`: the crate version and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("MUSTER_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "muster",
    version = VERSION,
    about = "Self-hosted IoT device provisioning, compatible with Azure IoT Hub DPS clients",
    after_help = "Service commands find the server with --connection-string, \
        MUSTER_CONNECTION_STRING, or --data-dir (default ./muster-data), whose connection.json \
        `muster serve` writes.\n\nExamples:\n  muster serve\n  muster enrollment-group create \
        --group-id line-1 --initial-twin-tags '{\"site\":\"lyon\"}'\n  muster provision \
        --group-key \"$KEY\" --prefix dev- --count 1000 --out devices.csv\n\nOutput: commands \
        that print a result take -o/--output json|jsonc|yaml|tsv|table|none (default: table on \
        a terminal, json otherwise) and --query JMESPATH, as az does.\n\nExit codes: 0 success; \
        1 the command failed (a service refusal also prints its DPS error JSON on stderr); \
        2 usage (unknown command or option, bad value, invalid --query)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the provisioning service.
    ///
    /// On first start it creates the data dir, the SQLite database, a local CA with a server
    /// certificate, an ID scope and the `provisioningserviceowner` policy key, then writes
    /// DATA_DIR/connection.json. A bare `muster serve` binds loopback only; --listen binds
    /// other addresses while --dps-host stays the name devices are told.
    ///
    /// Examples:
    ///   muster serve
    ///   muster serve --data-dir /var/lib/muster --listen 0.0.0.0 --dps-host dps.example.lan
    ///   muster serve --listen 0.0.0.0 --admin-listen 127.0.0.1:9090 --log-format json
    ///   muster serve --dps-host 127.0.0.2 --https-port 8443 --mqtt-port 18883
    #[command(verbatim_doc_comment)]
    Serve(serve::ServeArgs),
    /// Write a consistent snapshot of a data dir (database, sealing key, CA, connection
    /// settings) to one archive file, while the server runs. The file holds secrets.
    ///
    /// Examples:
    ///   muster backup --data-dir /var/lib/muster --out muster-2026-12-03.tar
    #[command(verbatim_doc_comment)]
    Backup(backup::BackupArgs),
    /// Restore a `muster backup` archive into an empty (or, with --force, an existing) data dir.
    ///
    /// Refuses an archive without the sealing key and one from a newer Muster; an older one
    /// is migrated forward. Starting on another --dps-host/--hub-host is fine.
    ///
    /// Examples:
    ///   muster restore muster-2026-12-03.tar --data-dir /var/lib/muster
    #[command(verbatim_doc_comment)]
    Restore(backup::RestoreArgs),
    /// Manage individual enrollments (like `az iot dps enrollment`).
    #[command(subcommand)]
    Enrollment(enrollment::IndividualCommand),
    /// Manage enrollment groups (like `az iot dps enrollment-group`).
    #[command(subcommand, name = "enrollment-group")]
    EnrollmentGroup(enrollment::GroupCommand),
    /// Show, list and delete device registration records.
    #[command(subcommand)]
    Registration(registration::RegistrationCommand),
    /// Remove devices completely: registration record and hub identity (optionally blocking
    /// re-registration).
    ///
    /// Examples:
    ///   muster deprovision dev-001 dev-002
    ///   muster deprovision dev-001 --block
    ///   muster deprovision dev-001 --hub-connection-string "HostName=myhub.azure-devices.net;..."
    #[command(verbatim_doc_comment)]
    Deprovision(registration::DeprovisionArgs),
    /// Manage the IoT hubs devices may be assigned to.
    #[command(subcommand, name = "linked-hub")]
    LinkedHub(linked_hub::LinkedHubCommand),
    /// Shared access policies of the service and their rights (like `az iot dps policy`).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// CA certificates for enrollment groups, with proof of possession (like `az iot dps
    /// certificate`).
    #[command(subcommand)]
    Certificate(ca_certificate::CertificateCommand),
    /// Service connection strings (like `az iot dps connection-string`).
    #[command(subcommand, name = "connection-string")]
    ConnectionString(policy::ConnectionStringCommand),
    /// The audit log: who changed what, when, with which result.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Act as a device: register with the provisioning service.
    #[command(subcommand)]
    Device(device::DeviceCommand),
    /// A device's TPM: its endorsement key and registration id.
    #[command(subcommand)]
    Tpm(tpm::TpmCommand),
    /// Register many devices of an enrollment group on their behalf and write their
    /// assignments (and derived keys) to a CSV file.
    ///
    /// A rerun skips the devices already in the out file, so an interrupted run resumes.
    /// Failed attempts (throttling, unavailability) are retried honouring retry-after.
    /// Symmetric-key groups only: an X.509 device holds its own private key, so it registers
    /// itself (`muster device register --cert CHAIN.pem --cert-key KEY.pem`).
    ///
    /// Examples:
    ///   muster provision --group-key "$KEY" --prefix dev- --count 10000 --out devices.csv
    ///   muster provision --id-scope 0ne0012AB34 --endpoint dps.example.lan --ca-cert ca.pem \
    ///       --group-key "$KEY" --ids ids.txt --concurrency 64 --out devices.csv
    #[command(verbatim_doc_comment)]
    Provision(provision::ProvisionArgs),
    /// Compute a device's key from an enrollment group key (HMAC-SHA256 of the registration id).
    ///
    /// Same result as `az iot dps enrollment-group compute-device-key` and
    /// `echo -n "$REG_ID" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$(echo "$KEY" | base64 -d | xxd -p -c256) -binary | base64`.
    ///
    /// Example:
    ///   muster compute-device-key --key "$GROUP_KEY" --registration-id dev-001
    #[command(verbatim_doc_comment)]
    ComputeDeviceKey(device::ComputeKeyArgs),
    /// The built-in IoT hub (or any hub, with --hub-connection-string): device identities,
    /// twins, cloud-to-device messages, direct methods and telemetry (like `az iot hub`).
    #[command(subcommand)]
    Hub(hub::HubCommand),
    /// Operations on the store itself: copy an SQLite installation to PostgreSQL.
    #[cfg(feature = "postgres")]
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Benchmarks: load generator, TLS reference, service API at scale.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script.
    ///
    /// Examples:
    ///   muster completions bash > /etc/bash_completion.d/muster
    ///   muster completions zsh > "${fpath[1]}/_muster"
    ///   muster completions fish > ~/.config/fish/completions/muster.fish
    #[command(verbatim_doc_comment)]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// mimalloc instead of glibc's malloc: under registration load glibc's allocator was a fifth
/// of the server's CPU (arena locks, consolidation); see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Command::Serve(args) = cli.command {
        return serve_with_logging(&runtime, args);
    }
    logging::init(LogFormat::Text, "warn");
    let result = match cli.command {
        // Served above, with its own log set-up.
        Command::Serve(_) => Ok(()),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "muster", &mut std::io::stdout());
            Ok(())
        }
        Command::ComputeDeviceKey(args) => device::compute_device_key(args),
        Command::Backup(args) => backup::backup(args),
        Command::Restore(args) => backup::restore(args),
        Command::Enrollment(c) => runtime.block_on(enrollment::run_individual(c)),
        Command::EnrollmentGroup(c) => runtime.block_on(enrollment::run_group(c)),
        Command::Registration(c) => runtime.block_on(registration::run(c)),
        Command::Deprovision(a) => runtime.block_on(registration::deprovision(a)),
        Command::LinkedHub(c) => runtime.block_on(linked_hub::run(c)),
        Command::Audit(c) => runtime.block_on(audit::run(c)),
        Command::Policy(c) => runtime.block_on(policy::run(c)),
        Command::Certificate(c) => runtime.block_on(ca_certificate::run(c)),
        Command::ConnectionString(c) => runtime.block_on(policy::run_connection_string(c)),
        Command::Device(c) => runtime.block_on(device::run(c)),
        Command::Tpm(c) => tpm::run(c),
        Command::Provision(a) => runtime.block_on(provision::run(a)),
        Command::Hub(c) => runtime.block_on(hub::run(c)),
        Command::Bench(c) => runtime.block_on(bench::run(c)),
        #[cfg(feature = "postgres")]
        Command::Store(c) => runtime.block_on(store::run(c)),
    };
    if let Err(e) = result {
        eprintln!("error: {}", output::describe(&e));
        std::process::exit(output::EXIT_FAILED);
    }
    Ok(())
}

/// `muster serve`: the log format comes from its configuration, so the subscriber is set up
/// after the config is read; a failure to start is reported in one line, logged in that format
/// too (returning the error from `main` would print its Debug form, and a backtrace under
/// RUST_BACKTRACE).
fn serve_with_logging(
    runtime: &tokio::runtime::Runtime,
    args: serve::ServeArgs,
) -> anyhow::Result<()> {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", output::describe(&e));
            std::process::exit(1);
        }
    };
    let format = config.log_format;
    logging::init(format, "info");
    if let Err(e) = runtime.block_on(serve::serve(args, config)) {
        match format {
            LogFormat::Json => tracing::error!("{}", output::describe(&e)),
            LogFormat::Text => eprintln!("error: {}", output::describe(&e)),
        }
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
