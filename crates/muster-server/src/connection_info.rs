//! `connection.json`: what clients, the CLI and test harnesses need to reach this server.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub id_scope: String,
    /// Host devices and service clients connect to.
    pub dps_host: String,
    pub https_port: u16,
    pub mqtt_port: u16,
    /// AMQP over TLS (0 in files written before AMQP existed).
    #[serde(default)]
    pub amqp_port: u16,
    /// `host` when the HTTPS port is 443, else `host:port`: the DPS "global device endpoint".
    pub device_endpoint: String,
    /// Service API base URL.
    pub service_endpoint: String,
    /// Connection string of the `provisioningserviceowner` policy.
    pub service_connection_string: String,
    /// Path of the PEM file of the local CA clients must trust; `null` when the server
    /// presents a certificate given with `--tls-cert` (see `tlsCertificate`).
    pub ca_certificate: Option<PathBuf>,
    /// The certificate given with `--tls-cert`: clients trust its issuer (for a public CA,
    /// the system roots do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate: Option<TlsCertificateInfo>,
    /// The web console's URL (`{serviceEndpoint}/console`).
    #[serde(default)]
    pub console_url: String,
    /// IoT hubs this server runs (the built-in one).
    #[serde(default)]
    pub hubs: Vec<HubInfo>,
}

/// A user-supplied server certificate, as read at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsCertificateInfo {
    /// The chain file (reloaded when it changes).
    pub path: PathBuf,
    /// The leaf's subject (RFC 4514).
    pub subject: String,
    /// The leaf's issuer: the CA clients must trust.
    pub issuer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubInfo {
    /// What devices are told to connect to (`assignedHub`).
    pub host_name: String,
    /// `iothubowner` connection string for the hub's service API.
    pub connection_string: String,
    pub built_in: bool,
}

impl ConnectionInfo {
    pub const FILE_NAME: &'static str = "connection.json";

    /// Writes atomically (temp file + rename) so a reader never sees half a file; the file
    /// holds a key, so it is readable by the owner only.
    pub fn write(&self, data_dir: &Path) -> std::io::Result<PathBuf> {
        let path = data_dir.join(Self::FILE_NAME);
        let tmp = data_dir.join(format!(".{}.tmp", Self::FILE_NAME));
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_private(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    pub fn read(data_dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(data_dir.join(Self::FILE_NAME))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// `host` or `host:port` as clients write it in a connection string (IPv6 in brackets).
pub fn host_with_port(host: &str, port: u16, default_port: u16) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    if port == default_port {
        host
    } else {
        format!("{host}:{port}")
    }
}
