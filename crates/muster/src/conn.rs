//! How commands find the server: connection strings, `connection.json`, CA files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use muster_client::{ConnectionFile, DeviceClient, HubClient, ServiceClient};

/// The default data dir of `muster serve`.
const DEFAULT_DATA_DIR: &str = "muster-data";

/// Where the service API is.
#[derive(Args, Debug, Clone)]
pub struct ServiceConn {
    /// Service connection string (HostName=..;SharedAccessKeyName=..;SharedAccessKey=..);
    /// wins over --data-dir
    #[arg(long, env = "MUSTER_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Data dir of a local `muster serve`, to read connection.json from [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PEM file of the CA to trust (the system roots are always trusted) [default: connection.json's caCertificate]
    #[arg(long, env = "MUSTER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

/// `connection.json` from `dir`, or from `./muster-data` when it exists and no dir was given.
pub fn connection_file(dir: Option<&Path>) -> anyhow::Result<Option<ConnectionFile>> {
    match dir {
        Some(d) => Ok(Some(ConnectionFile::read(d)?)),
        None => {
            let d = Path::new(DEFAULT_DATA_DIR);
            if d.join(ConnectionFile::FILE_NAME).is_file() {
                Ok(Some(ConnectionFile::read(d)?))
            } else {
                Ok(None)
            }
        }
    }
}

impl ServiceConn {
    pub fn file(&self) -> anyhow::Result<Option<ConnectionFile>> {
        connection_file(self.data_dir.as_deref())
    }

    /// The service client, and `connection.json` when one was read.
    pub fn client(&self) -> anyhow::Result<(ServiceClient, Option<ConnectionFile>)> {
        let file = match (&self.connection_string, &self.data_dir) {
            (Some(_), None) => connection_file(None).ok().flatten(),
            _ => self.file()?,
        };
        let cs = match (&self.connection_string, &file) {
            (Some(cs), _) => cs.clone(),
            (None, Some(f)) => f.service_connection_string.clone(),
            (None, None) => bail!(
                "no service to talk to: pass --connection-string, set MUSTER_CONNECTION_STRING, \
                 or --data-dir DIR of a running `muster serve`"
            ),
        };
        let ca = self
            .ca_cert
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.ca_certificate.clone()));
        crate::output::remember_trusted_ca(ca.as_deref());
        let client = ServiceClient::from_connection_string(&cs, ca.as_deref())
            .context("invalid service connection string")?
            .with_user_agent(format!(
                "{}{}",
                muster_proto::audit::CLI_USER_AGENT_PREFIX,
                env!("CARGO_PKG_VERSION")
            ));
        Ok((client, file))
    }

    pub fn ca(&self, file: Option<&ConnectionFile>) -> Option<PathBuf> {
        self.ca_cert
            .clone()
            .or_else(|| file.and_then(|f| f.ca_certificate.clone()))
    }
}

/// Where the device API is.
#[derive(Args, Debug, Clone)]
pub struct DeviceConn {
    /// ID scope of the provisioning service [default: from connection.json]
    #[arg(long, env = "MUSTER_ID_SCOPE")]
    pub id_scope: Option<String>,
    /// Device endpoint, HOST or HOST:PORT (HTTPS) [default: from connection.json]
    #[arg(long, env = "MUSTER_ENDPOINT")]
    pub endpoint: Option<String>,
    /// MQTT port [default: connection.json's mqttPort, else 8883]
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// PEM file of the CA to trust (the system roots are always trusted) [default: connection.json's caCertificate]
    #[arg(long, env = "MUSTER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Data dir of a local `muster serve`, to read connection.json from [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DeviceConn {
    pub fn client(&self) -> anyhow::Result<DeviceClient> {
        let file = if self.id_scope.is_some() && self.endpoint.is_some() && self.data_dir.is_none()
        {
            connection_file(None).ok().flatten()
        } else {
            connection_file(self.data_dir.as_deref())?
        };
        let scope = match (&self.id_scope, &file) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => f.id_scope.clone(),
            (None, None) => {
                bail!("no ID scope: pass --id-scope, or --data-dir DIR of a running `muster serve`")
            }
        };
        let endpoint = match (&self.endpoint, &file) {
            (Some(e), _) => e.clone(),
            (None, Some(f)) => f.device_endpoint.clone(),
            (None, None) => {
                bail!("no endpoint: pass --endpoint HOST, or --data-dir DIR of a running `muster serve`")
            }
        };
        let ca = self
            .ca_cert
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.ca_certificate.clone()));
        let mqtt_port = self
            .mqtt_port
            .or_else(|| file.as_ref().map(|f| f.mqtt_port).filter(|p| *p != 0))
            .unwrap_or(8883);
        crate::output::remember_trusted_ca(ca.as_deref());
        Ok(DeviceClient::new(&endpoint, &scope, ca.as_deref())?.with_mqtt_port(mqtt_port))
    }
}

/// Where a hub's service API is.
#[derive(Args, Debug, Clone)]
pub struct HubConn {
    /// Hub connection string (iothubowner or a policy with registry and service rights)
    /// [default: the built-in hub's, from connection.json]
    #[arg(long, env = "MUSTER_HUB_CONNECTION_STRING", hide_env_values = true)]
    pub hub_connection_string: Option<String>,
    /// Data dir of a local `muster serve`, to read connection.json from [default: ./muster-data]
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PEM file of the CA to trust (the system roots are always trusted) [default: connection.json's caCertificate]
    #[arg(long, env = "MUSTER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl HubConn {
    pub fn client(&self) -> anyhow::Result<HubClient> {
        let file = match (&self.hub_connection_string, &self.data_dir) {
            (Some(_), None) => connection_file(None).ok().flatten(),
            _ => connection_file(self.data_dir.as_deref())?,
        };
        let cs = match (&self.hub_connection_string, &file) {
            (Some(cs), _) => cs.clone(),
            (None, Some(f)) => match f.hubs.iter().find(|h| h.built_in).or(f.hubs.first()) {
                Some(h) => h.connection_string.clone(),
                None => bail!("connection.json lists no hub; pass --hub-connection-string"),
            },
            (None, None) => bail!(
                "no hub to talk to: pass --hub-connection-string, or --data-dir DIR of a running `muster serve`"
            ),
        };
        let ca = self
            .ca_cert
            .clone()
            .or_else(|| file.as_ref().and_then(|f| f.ca_certificate.clone()));
        crate::output::remember_trusted_ca(ca.as_deref());
        HubClient::from_connection_string(&cs, ca.as_deref())
            .context("invalid hub connection string")
    }
}
