//! Where the load generator sends its devices and how it connects: the endpoint, ID scope, CA
//! and MQTT address (from `connection.json` or flags; `--mqtt-endpoint` when MQTT is not on
//! the endpoint's host, as with the TLS reference), and the TLS and HTTP client settings of
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
    /// muster, or tls-reference (pass its address with --endpoint, and for mqtt-fresh its MQTT
    /// address with --mqtt-endpoint)
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
    /// MQTT port on the endpoint's host [default: connection.json's]
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// MQTT endpoint HOST:PORT, when MQTT is not on the endpoint's host (the TLS reference's
    /// --mqtt-listen) [default: the endpoint's host on --mqtt-port]
    #[arg(long, conflicts_with = "mqtt_port")]
    pub mqtt_endpoint: Option<String>,
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
    /// HTTPS endpoint, HOST:PORT or HOST.
    pub endpoint: String,
    pub id_scope: String,
    /// Host (no brackets) and port of the MQTT endpoint.
    pub mqtt_host: String,
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
        let (mqtt_host, mqtt_port) = match &self.mqtt_endpoint {
            Some(e) => match split_host_port(e) {
                (host, Some(port)) if !host.is_empty() => (host.to_string(), port),
                _ => bail!("--mqtt-endpoint {e:?}: expected HOST:PORT"),
            },
            None => (
                split_host_port(&endpoint).0.to_string(),
                self.mqtt_port
                    .or_else(|| file.as_ref().map(|f| f.mqtt_port))
                    .unwrap_or(8883),
            ),
        };
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
            mqtt_host,
            mqtt_port,
            amqp_port,
            ca_cert,
        })
    }
}

impl ResolvedTarget {
    /// The address devices of `mode` connect to, HOST:PORT (or the HTTPS endpoint as given).
    pub fn device_address(&self, mode: Mode) -> String {
        match mode {
            Mode::MqttFresh if self.mqtt_host.contains(':') => {
                format!("[{}]:{}", self.mqtt_host, self.mqtt_port)
            }
            Mode::MqttFresh => format!("{}:{}", self.mqtt_host, self.mqtt_port),
            Mode::AmqpFresh => {
                let host = split_host_port(&self.endpoint).0;
                if host.contains(':') {
                    format!("[{host}]:{}", self.amqp_port)
                } else {
                    format!("{host}:{}", self.amqp_port)
                }
            }
            Mode::HttpsFresh | Mode::HttpsKeepalive => self.endpoint.clone(),
        }
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port` into the host (without brackets) and the
/// port, if any.
pub fn split_host_port(endpoint: &str) -> (&str, Option<u16>) {
    if let Some(rest) = endpoint.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (endpoint, None),
        },
        _ => (endpoint, None),
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
    // The client's MQTT connects to its endpoint's host: MQTT devices get the MQTT host.
    let endpoint = match mode {
        Mode::MqttFresh => target.mqtt_host.as_str(),
        Mode::HttpsFresh | Mode::HttpsKeepalive | Mode::AmqpFresh => target.endpoint.as_str(),
    };
    Ok(
        DeviceClient::with_clients(endpoint, &target.id_scope, http, Arc::new(tls))
            .with_mqtt_port(target.mqtt_port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: &str, mqtt_port: Option<u16>, mqtt_endpoint: Option<&str>) -> TargetArgs {
        TargetArgs {
            target: Target::TlsReference,
            data_dir: None,
            endpoint: Some(endpoint.into()),
            id_scope: Some("0ne00000001".into()),
            mqtt_port,
            mqtt_endpoint: mqtt_endpoint.map(String::from),
            amqp_port: None,
            ca_cert: None,
        }
    }

    #[test]
    fn mqtt_goes_to_the_endpoints_host_or_the_mqtt_endpoint() {
        let t = args("127.0.0.9:18444", Some(18445), None)
            .resolve()
            .unwrap();
        assert_eq!(t.device_address(Mode::MqttFresh), "127.0.0.9:18445");
        assert_eq!(t.device_address(Mode::HttpsFresh), "127.0.0.9:18444");
        let t = args("127.0.0.9:18444", None, Some("127.0.0.41:18501"))
            .resolve()
            .unwrap();
        assert_eq!((t.mqtt_host.as_str(), t.mqtt_port), ("127.0.0.41", 18501));
        assert_eq!(t.device_address(Mode::AmqpFresh), "127.0.0.9:5671");
        let t = args("[::1]:18444", None, Some("[::1]:18445"))
            .resolve()
            .unwrap();
        assert_eq!(t.device_address(Mode::MqttFresh), "[::1]:18445");
        assert!(args("127.0.0.9:18444", None, Some("127.0.0.41"))
            .resolve()
            .is_err());
    }

    #[test]
    fn hosts_and_ports_split() {
        assert_eq!(split_host_port("a.example:8883"), ("a.example", Some(8883)));
        assert_eq!(split_host_port("a.example"), ("a.example", None));
        assert_eq!(split_host_port("[::1]:443"), ("::1", Some(443)));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }
}
