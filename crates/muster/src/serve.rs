//! `muster serve`: run the provisioning service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use muster_server::{Config, LogFormat, Server};

/// Each option overrides the config file, which overrides the defaults.
#[derive(Args)]
pub struct ServeArgs {
    /// TOML config file; keys as the options below, e.g. `dps-host = "127.0.0.2"`.
    #[arg(long, env = "MUSTER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where records live: `sqlite`, `sqlite:PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// (`?sslmode=require|verify-full`, `&sslrootcert=CA.pem`) [default: sqlite, in the data dir]
    #[arg(long, env = "MUSTER_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Sealing key file of a PostgreSQL store, the same on every node
    /// [default: DATA_DIR/store.key]
    #[arg(long, env = "MUSTER_SEALING_KEY")]
    sealing_key: Option<PathBuf>,
    /// The ID scope this node belongs to: a new store takes it, a store with another is refused
    #[arg(long, env = "MUSTER_ID_SCOPE")]
    id_scope: Option<String>,
    /// Name or IP devices and clients are told to reach the DPS at; the server certificate
    /// names it, and listeners bind it when --listen is not given [default: localhost]
    #[arg(long, env = "MUSTER_DPS_HOST")]
    dps_host: Option<String>,
    /// Name or IP devices are told for the built-in IoT hub [default: the DPS host]
    #[arg(long, env = "MUSTER_HUB_HOST")]
    hub_host: Option<String>,
    /// IP address every listener binds, e.g. 0.0.0.0 or [::] (repeatable; environment:
    /// comma-separated) [default: the addresses of --dps-host and --hub-host]
    #[arg(long = "listen", env = "MUSTER_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Bind the device and service ports with SO_REUSEPORT, so several nodes on one machine
    /// share them and the kernel spreads connections (a cluster on one host) [default: off]
    #[arg(long, env = "MUSTER_REUSE_PORT")]
    reuse_port: bool,
    /// ADDR:PORT of a plain-HTTP admin listener serving /healthz and /readyz [default: off]
    #[arg(long, env = "MUSTER_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Log line format: text or json [default: text]
    #[arg(long, env = "MUSTER_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// This node's region, for the geoLatency allocation policy
    #[arg(long, env = "MUSTER_REGION")]
    region: Option<String>,
    /// HTTPS port (device API, service API, hub REST, MQTT and AMQP over WebSocket) [default: 443]
    #[arg(long, env = "MUSTER_HTTPS_PORT")]
    https_port: Option<u16>,
    /// MQTT over TLS port for devices [default: 8883]
    #[arg(long, env = "MUSTER_MQTT_PORT")]
    mqtt_port: Option<u16>,
    /// AMQP over TLS port for devices (registration) [default: 5671]
    #[arg(long, env = "MUSTER_AMQP_PORT")]
    amqp_port: Option<u16>,
    /// PEM certificate chain to serve instead of the local CA's certificate
    #[arg(long, env = "MUSTER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert (both files are reloaded when they change, and on SIGHUP)
    #[arg(long, env = "MUSTER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM chain of your own intermediate CA (its certificate first, up to the root) that
    /// signs device certificates for CSRs [default: Muster's issuing-ca.pem under the local CA]
    #[arg(long, env = "MUSTER_ISSUING_CA_CERT", requires = "issuing_ca_key")]
    issuing_ca_cert: Option<PathBuf>,
    /// PEM (PKCS #8) private key for --issuing-ca-cert
    #[arg(long, env = "MUSTER_ISSUING_CA_KEY", requires = "issuing_ca_cert")]
    issuing_ca_key: Option<PathBuf>,
    /// A named operator issuing CA, NAME=CERT.pem,KEY.pem (repeatable): imported into the
    /// store sealed at start (later starts need neither the option nor the files; giving it
    /// again with new files rotates it); enrollments pick it with certificateIssuance.issuingCa
    #[arg(long = "issuing-ca", value_name = "NAME=CERT,KEY")]
    issuing_ca: Vec<muster_server::config::IssuingCaConfig>,
    /// How often the TLS certificate and key files are checked for a change, in ms
    /// [default: 5000]
    #[arg(long, env = "MUSTER_TLS_RELOAD_INTERVAL_MS")]
    tls_reload_interval_ms: Option<u64>,
    /// Extra host names or addresses for the server certificate (repeatable)
    #[arg(long = "extra-host")]
    extra_hosts: Vec<String>,
    /// Most concurrent connections per listener (lowered to fit the descriptor limit)
    /// [default: 10000]
    #[arg(long, env = "MUSTER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most unauthenticated connections one source address may hold [default: 256]
    #[arg(long, env = "MUSTER_MAX_UNAUTHENTICATED_PER_ADDRESS")]
    max_unauthenticated_per_address: Option<usize>,
    /// Time a client gets to complete the TLS handshake, in ms [default: 10000]
    #[arg(long, env = "MUSTER_TLS_HANDSHAKE_TIMEOUT_MS")]
    tls_handshake_timeout_ms: Option<u64>,
    /// Time a new HTTPS connection gets to send its first request's headers, in ms
    /// [default: 10000]
    #[arg(long, env = "MUSTER_HTTP_HEADER_TIMEOUT_MS")]
    http_header_timeout_ms: Option<u64>,
    /// Time a kept-alive HTTPS connection may wait for its next request, in ms [default: 60000]
    #[arg(long, env = "MUSTER_HTTP_IDLE_TIMEOUT_MS")]
    http_idle_timeout_ms: Option<u64>,
    /// Time a device MQTT connection gets to send CONNECT, in ms [default: 10000]
    #[arg(long, env = "MUSTER_MQTT_CONNECT_TIMEOUT_MS")]
    mqtt_connect_timeout_ms: Option<u64>,
    /// Time an MQTT registration connection gets to authenticate, in ms [default: 10000]
    #[arg(long, env = "MUSTER_MQTT_AUTH_TIMEOUT_MS")]
    mqtt_auth_timeout_ms: Option<u64>,
    /// Longest an MQTT device connection may stay silent, whatever its keep-alive, in s
    /// [default: 1767]
    #[arg(long, env = "MUSTER_MQTT_MAX_IDLE_SECS")]
    mqtt_max_idle_secs: Option<u64>,
    /// Days the audit log keeps an entry [default: 90]
    #[arg(long, env = "MUSTER_AUDIT_RETENTION_DAYS")]
    audit_retention_days: Option<u32>,
    /// This node's name in claims on shared work, unique per node of a PostgreSQL store
    /// [default: `local` with SQLite, random per start with PostgreSQL]
    #[arg(long, env = "MUSTER_NODE_ID")]
    node_id: Option<String>,
    /// How long a node's claim on shared work holds unrenewed, in ms [default: 30000]
    #[arg(long, env = "MUSTER_LEASE_MS")]
    lease_ms: Option<u64>,
    /// How often a node renews its claims and takes up lapsed ones, in ms [default: 5000]
    #[arg(long, env = "MUSTER_SWEEP_INTERVAL_MS")]
    sweep_interval_ms: Option<u64>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// The effective configuration: defaults, then the file, then flags and environment.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.store {
            c.store = Some(v.clone());
        }
        if let Some(v) = &self.sealing_key {
            c.sealing_key = Some(v.clone());
        }
        if let Some(v) = &self.id_scope {
            c.id_scope = Some(v.clone());
        }
        if let Some(v) = &self.dps_host {
            c.dps_host = v.clone();
        }
        if let Some(v) = &self.hub_host {
            c.hub_host = Some(v.clone());
        }
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if self.reuse_port {
            c.reuse_port = true;
        }
        if let Some(v) = &self.admin_listen {
            c.admin_listen = Some(v.clone());
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = &self.region {
            c.region = Some(v.clone());
        }
        if let Some(v) = self.https_port {
            c.https_port = v;
        }
        if let Some(v) = self.mqtt_port {
            c.mqtt_port = v;
        }
        if let Some(v) = self.amqp_port {
            c.amqp_port = v;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
            c.tls_key = self.tls_key.clone();
        }
        if self.issuing_ca_cert.is_some() {
            c.issuing_ca_cert = self.issuing_ca_cert.clone();
            c.issuing_ca_key = self.issuing_ca_key.clone();
        }
        c.extra_hosts.extend(self.extra_hosts.iter().cloned());
        c.issuing_cas.extend(self.issuing_ca.iter().cloned());
        if let Some(v) = self.audit_retention_days {
            c.audit_retention_days = v;
        }
        if let Some(v) = &self.node_id {
            c.node_id = Some(v.clone());
        }
        if let Some(v) = self.lease_ms {
            c.lease_ms = v;
        }
        if let Some(v) = self.sweep_interval_ms {
            c.sweep_interval_ms = v;
        }
        let numbers = [
            (self.max_connections, &mut c.max_connections),
            (
                self.max_unauthenticated_per_address,
                &mut c.max_unauthenticated_per_address,
            ),
        ];
        for (flag, field) in numbers {
            if let Some(v) = flag {
                *field = v;
            }
        }
        let durations = [
            (
                self.tls_handshake_timeout_ms,
                &mut c.tls_handshake_timeout_ms,
            ),
            (self.tls_reload_interval_ms, &mut c.tls_reload_interval_ms),
            (self.http_header_timeout_ms, &mut c.http_header_timeout_ms),
            (self.http_idle_timeout_ms, &mut c.http_idle_timeout_ms),
            (self.mqtt_connect_timeout_ms, &mut c.mqtt_connect_timeout_ms),
            (self.mqtt_auth_timeout_ms, &mut c.mqtt_auth_timeout_ms),
            (self.mqtt_max_idle_secs, &mut c.mqtt_max_idle_secs),
        ];
        for (flag, field) in durations {
            if let Some(v) = flag {
                *field = v;
            }
        }
        Ok(c)
    }
}

pub async fn serve(args: ServeArgs, config: Config) -> anyhow::Result<()> {
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let server = Server::start(config.clone()).await?;
    match config.log_format {
        LogFormat::Text => print_banner(&server, &config),
        LogFormat::Json => log_banner(&server, &config),
    }
    reload_certificate_on_sighup(&server)?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

/// Where the listeners bound and how to expose them, when they bound loopback only.
fn exposure_hint(server: &Server) -> Option<&'static str> {
    server.bind_set.is_loopback_only().then_some(
        "only this machine can connect (loopback); to accept other machines add --listen 0.0.0.0 \
         (or [::], or one address of this machine) and set --dps-host to the name devices use",
    )
}

fn admin_warning(server: &Server) -> Option<String> {
    let addr = server.admin_addr?;
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "the admin listener on {addr} is plain HTTP without auth and not on loopback: \
             keep it on a management network"
        )
    })
}

fn print_banner(server: &Server, config: &Config) {
    let c = &server.connection;
    let listening: Vec<String> = server
        .bind_set
        .ips()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    println!("Muster is running.");
    println!("  ID scope:           {}", c.id_scope);
    println!("  Device endpoint:    {}", c.device_endpoint);
    println!(
        "  Device ports:       HTTPS {}, MQTT {}, AMQP {} (MQTT and AMQP over WebSocket on HTTPS)",
        c.https_port, c.mqtt_port, c.amqp_port
    );
    for h in &c.hubs {
        println!("  Built-in IoT hub:   {}", h.host_name);
    }
    println!("  Service endpoint:   {}", c.service_endpoint);
    match (&c.ca_certificate, &c.tls_certificate) {
        (Some(ca), _) => println!("  Trust this CA:      {}", ca.display()),
        (None, Some(cert)) => {
            println!("  TLS certificate:    {}", cert.path.display());
            println!("    subject:          {}", cert.subject);
            println!("    issued by:        {} (clients trust it through their system roots, or --ca-cert)", cert.issuer);
            println!("    reloaded when the files change or on SIGHUP");
        }
        (None, None) => {}
    }
    println!("  Web console:        {}", c.console_url);
    println!(
        "  Listening on:       {} (HTTPS port {}, MQTT port {}, AMQP port {})",
        listening.join(", "),
        c.https_port,
        c.mqtt_port,
        c.amqp_port
    );
    if let Some(addr) = server.admin_addr {
        println!("  Admin (HTTP):       http://{addr}/healthz, /readyz, /metrics");
    }
    println!(
        "  Connection details: {} (holds the service connection string)",
        config.data_dir.join("connection.json").display()
    );
    if let Some(hint) = exposure_hint(server) {
        println!("Note: {hint}.");
    }
    if let Some(warning) = admin_warning(server) {
        println!("Warning: {warning}.");
    }
    println!("Stop with Ctrl-C.");
}

/// The banner as one log event, so every line of a JSON log parses.
fn log_banner(server: &Server, config: &Config) {
    let c = &server.connection;
    let listening: Vec<String> = server
        .bind_set
        .ips()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    let hubs: Vec<&str> = c.hubs.iter().map(|h| h.host_name.as_str()).collect();
    tracing::info!(
        id_scope = %c.id_scope,
        device_endpoint = %c.device_endpoint,
        hubs = %hubs.join(","),
        service_endpoint = %c.service_endpoint,
        ca_certificate = %c
            .ca_certificate
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        tls_certificate = %c
            .tls_certificate
            .as_ref()
            .map(|t| t.path.display().to_string())
            .unwrap_or_default(),
        console_url = %c.console_url,
        listen = %listening.join(","),
        https_port = c.https_port,
        mqtt_port = c.mqtt_port,
        admin = %server.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        connection_details = %config.data_dir.join("connection.json").display(),
        "Muster is running"
    );
    if let Some(hint) = exposure_hint(server) {
        tracing::info!("{hint}");
    }
    if let Some(warning) = admin_warning(server) {
        tracing::warn!("{warning}");
    }
}

/// SIGHUP reads the TLS certificate and key files again (renewal without a restart).
fn reload_certificate_on_sighup(server: &Server) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let reload = server.certificate_reloader();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reading the TLS certificate files again");
                reload.notify_one();
            }
        });
    }
    #[cfg(not(unix))]
    let _ = server;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
