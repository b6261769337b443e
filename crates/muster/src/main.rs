//! `muster`: the Muster server (`muster serve`) and the operator CLI: enrollments, enrollment
//! groups, registration records, linked hubs, device registration, bulk provisioning on behalf
//! of devices, deprovisioning with cascade, the built-in hub's devices and twins.

mod bench;
mod conn;
mod device;
mod enrollment;
mod hub;
mod linked_hub;
mod output;
mod provision;
mod registration;
mod serve;
#[cfg(feature = "postgres")]
mod store;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "muster",
    version,
    about = "Self-hosted IoT device provisioning, compatible with Azure IoT Hub DPS clients",
    after_help = "Service commands find the server with --connection-string, \
        MUSTER_CONNECTION_STRING, or --data-dir (default ./muster-data), whose connection.json \
        `muster serve` writes.\n\nExamples:\n  muster serve\n  muster enrollment-group create \
        --group-id line-1 --initial-twin-tags '{\"site\":\"lyon\"}'\n  muster provision \
        --group-key \"$KEY\" --prefix dev- --count 1000 --out devices.csv"
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
    /// DATA_DIR/connection.json.
    ///
    /// Examples:
    ///   muster serve
    ///   muster serve --data-dir /var/lib/muster --dps-host dps.example.lan
    ///   muster serve --dps-host 127.0.0.2 --https-port 8443 --mqtt-port 18883
    #[command(verbatim_doc_comment)]
    Serve(serve::ServeArgs),
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
    /// Act as a device: register with the provisioning service.
    #[command(subcommand)]
    Device(device::DeviceCommand),
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
    /// The built-in IoT hub (or any hub, with --hub-connection-string): devices and twins.
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
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = match cli.command {
        Command::Serve(args) => return runtime.block_on(serve::serve(args)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "muster", &mut std::io::stdout());
            Ok(())
        }
        Command::ComputeDeviceKey(args) => device::compute_device_key(args),
        Command::Enrollment(c) => runtime.block_on(enrollment::run_individual(c)),
        Command::EnrollmentGroup(c) => runtime.block_on(enrollment::run_group(c)),
        Command::Registration(c) => runtime.block_on(registration::run(c)),
        Command::Deprovision(a) => runtime.block_on(registration::deprovision(a)),
        Command::LinkedHub(c) => runtime.block_on(linked_hub::run(c)),
        Command::Device(c) => runtime.block_on(device::run(c)),
        Command::Provision(a) => runtime.block_on(provision::run(a)),
        Command::Hub(c) => runtime.block_on(hub::run(c)),
        Command::Bench(c) => runtime.block_on(bench::run(c)),
        #[cfg(feature = "postgres")]
        Command::Store(c) => runtime.block_on(store::run(c)),
    };
    if let Err(e) = result {
        eprintln!("error: {}", output::describe(&e));
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
