//! `DATA_DIR/connection.json`, written by `muster serve`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a client needs to reach a Muster server. Mirrors the server's `ConnectionInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionFile {
    pub id_scope: String,
    #[serde(default)]
    pub dps_host: String,
    #[serde(default)]
    pub https_port: u16,
    #[serde(default)]
    pub mqtt_port: u16,
    /// 0 when the server wrote no AMQP port.
    #[serde(default)]
    pub amqp_port: u16,
    /// `host` or `host:port` of the device API.
    pub device_endpoint: String,
    #[serde(default)]
    pub service_endpoint: String,
    pub service_connection_string: String,
    /// PEM file of the local CA clients must trust; `None` when the server presents a
    /// certificate given with `--tls-cert`, whose issuer the system roots (or a CA file the
    /// user passes) must vouch for.
    #[serde(default)]
    pub ca_certificate: Option<PathBuf>,
    /// The `--tls-cert` certificate's subject and issuer, when the server has one.
    #[serde(default)]
    pub tls_certificate: Option<ConnectionTlsCertificate>,
    #[serde(default)]
    pub hubs: Vec<ConnectionHub>,
}

/// A server certificate given with `--tls-cert`, as `connection.json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionTlsCertificate {
    pub path: PathBuf,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub issuer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionHub {
    pub host_name: String,
    pub connection_string: String,
    #[serde(default)]
    pub built_in: bool,
}

impl ConnectionFile {
    pub const FILE_NAME: &'static str = "connection.json";

    /// Reads `data_dir/connection.json`.
    pub fn read(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(Self::FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::io(
                format!(
                    "reading {} (is `muster serve` running with this --data-dir?)",
                    path.display()
                ),
                e,
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::InvalidInput(format!("{} is not valid: {e}", path.display())))
    }

    /// The connection string of the hub named `host_name` (case-insensitive), if listed.
    pub fn hub_connection_string(&self, host_name: &str) -> Option<&str> {
        self.hubs
            .iter()
            .find(|h| h.host_name.eq_ignore_ascii_case(host_name))
            .map(|h| h.connection_string.as_str())
    }
}
