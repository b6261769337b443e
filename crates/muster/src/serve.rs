//! `muster serve`: run the provisioning service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use muster_server::{Config, Server};

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
    /// Name or IP the DPS is reached at; listeners bind it [default: localhost]
    #[arg(long, env = "MUSTER_DPS_HOST")]
    dps_host: Option<String>,
    /// Name or IP of the built-in IoT hub; its listeners bind it [default: the DPS host]
    #[arg(long, env = "MUSTER_HUB_HOST")]
    hub_host: Option<String>,
    /// This node's region, for the geoLatency allocation policy
    #[arg(long, env = "MUSTER_REGION")]
    region: Option<String>,
    /// HTTPS port (device API, service API, hub REST, MQTT over WebSocket) [default: 443]
    #[arg(long, env = "MUSTER_HTTPS_PORT")]
    https_port: Option<u16>,
    /// MQTT over TLS port for devices [default: 8883]
    #[arg(long, env = "MUSTER_MQTT_PORT")]
    mqtt_port: Option<u16>,
    /// PEM certificate chain to serve instead of the local CA's certificate
    #[arg(long, env = "MUSTER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert
    #[arg(long, env = "MUSTER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
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
        if let Some(v) = &self.region {
            c.region = Some(v.clone());
        }
        if let Some(v) = self.https_port {
            c.https_port = v;
        }
        if let Some(v) = self.mqtt_port {
            c.mqtt_port = v;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
            c.tls_key = self.tls_key.clone();
        }
        c.extra_hosts.extend(self.extra_hosts.iter().cloned());
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

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let server = Server::start(config.clone()).await?;
    let c = &server.connection;
    println!("Muster is running.");
    println!("  ID scope:           {}", c.id_scope);
    println!("  Device endpoint:    {}", c.device_endpoint);
    for h in &c.hubs {
        println!("  Built-in IoT hub:   {}", h.host_name);
    }
    println!("  Service endpoint:   {}", c.service_endpoint);
    println!("  Trust this CA:      {}", c.ca_certificate.display());
    println!("  Web console:        {}", c.console_url);
    println!(
        "  Connection details: {} (holds the service connection string)",
        config.data_dir.join("connection.json").display()
    );
    println!("Stop with Ctrl-C.");
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
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
