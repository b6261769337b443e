//! Where the load generator sends its devices and how it connects: the endpoint, ID scope, CA
//! and MQTT port (from `connection.json` or flags), and the TLS and HTTP client settings of
//! each mode (fresh TLS per device without session resumption, or a keep-alive pool).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use muster_client::DeviceClient;

use crate::conn::connection_file;

/// How simulated devices connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// HTTPS, a new TCP connection and full TLS handshake per device (no session resumption).
    HttpsFresh,
    /// HTTPS over a pool of persistent connections (a gateway or device-management platform
    /// registering devices on their behalf).
    HttpsKeepalive,
    /// MQTT, a new TCP connection, full TLS handshake and MQTT session per device.
    MqttFresh,
    /// AMQP, a new TCP connection, full TLS handshake and AMQP connection (SASL PLAIN) per
    /// device.
    AmqpFresh,
}

/// What the generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A running `muster serve`.
    Muster,
    /// `muster bench tls-reference`: handshake and one fixed answer, nothing else.
    TlsReference,
}

/// The server to load.
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// muster, or tls-reference (pass its address with --endpoint)
    #[arg(long, value_enum, default_value_t = Target::Muster)]
    pub target: Target,
    /// Data dir of the `muster serve` under test, for connection.json (ID scope, endpoint, CA)
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Device endpoint HOST:PORT (HTTPS) [default: connection.json's]
    #[arg(long)]
    pub endpoint: Option<String>,
    /// ID scope [default: connection.json's]
    #[arg(long)]
    pub id_scope: Option<String>,
    /// MQTT port [default: connection.json's]
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// AMQP port [default: connection.json's, else 5671]
    #[arg(long)]
    pub amqp_port: Option<u16>,
    /// PEM file of the CA to trust [default: connection.json's caCertificate]
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

/// The resolved target.
#[derive(Debug, Clone)]
pub struct ResolvedTarget {
    pub endpoint: String,
    pub id_scope: String,
    pub mqtt_port: u16,
    pub amqp_port: u16,
    pub ca_cert: Option<PathBuf>,
}

impl TargetArgs {
    pub fn resolve(&self) -> anyhow::Result<ResolvedTarget> {
        let file = match (&self.data_dir, &self.endpoint, &self.id_scope) {
            (None, Some(_), Some(_)) => None,
            _ => connection_file(self.data_dir.as_deref())?,
        };
        let endpoint = match (&self.endpoint, &file) {
            (Some(e), _) => e.clone(),
            (None, Some(f)) => f.device_endpoint.clone(),
            (None, None) => {
                bail!("no endpoint: pass --data-dir DIR of a running `muster serve` or --endpoint")
            }
        };
        let id_scope = match (&self.id_scope, &file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => f.id_scope.clone(),
            (None, None) => bail!("no ID scope: pass --data-dir or --id-scope"),
        };
        let mqtt_port = self
            .mqtt_port
            .or_else(|| file.as_ref().map(|f| f.mqtt_port))
            .unwrap_or(8883);
        let amqp_port = self
            .amqp_port
            .or_else(|| file.as_ref().map(|f| f.amqp_port).filter(|p| *p != 0))
            .unwrap_or(5671);
        let ca_cert = self
            .ca_cert
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.ca_certificate.clone()));
        Ok(ResolvedTarget {
            endpoint,
            id_scope,
            mqtt_port,
            amqp_port,
            ca_cert,
        })
    }
}

/// The client TLS configuration of every mode: Muster's client settings (ring, TLS 1.2 and
/// 1.3, the CA) with session resumption off, so a fresh connection is always a full handshake.
pub fn tls_config(target: &ResolvedTarget) -> anyhow::Result<rustls::ClientConfig> {
    let mut tls = muster_client::tls::client_config(target.ca_cert.as_deref())
        .context("building the TLS client configuration")?;
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// An HTTP client over `tls`. `keep_idle` = 0 keeps no connection after its response, so
/// every request opens a new TCP connection and TLS session; otherwise up to `keep_idle`
/// connections stay open for reuse.
pub fn http_client(tls: rustls::ClientConfig, keep_idle: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(keep_idle)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")
}

/// The device client of `mode`: the real `muster_client::DeviceClient`, with an HTTP client
/// that pools no connection (fresh modes) or `pool_size` of them (keep-alive).
pub fn device_client(
    target: &ResolvedTarget,
    mode: Mode,
    pool_size: usize,
) -> anyhow::Result<DeviceClient> {
    let tls = tls_config(target)?;
    let keep_idle = match mode {
        Mode::HttpsKeepalive => pool_size.max(1),
        Mode::HttpsFresh | Mode::MqttFresh | Mode::AmqpFresh => 0,
    };
    let http = http_client(tls.clone(), keep_idle)?;
    Ok(
        DeviceClient::with_clients(&target.endpoint, &target.id_scope, http, Arc::new(tls))
            .with_mqtt_port(target.mqtt_port),
    )
}
