//! Server configuration: serde types read from a TOML file, overridden by command-line
//! options and `MUSTER_*` environment variables (the binary does that merge), with documented
//! defaults ([`Config::default`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `muster serve` can be told. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Where the database, the local CA, certificates and `connection.json` live.
    pub data_dir: PathBuf,
    /// Where records live: `sqlite` (`DATA_DIR/muster.db`), `sqlite:PATH`, or a
    /// `postgres://user:password@host:port/dbname[?sslmode=...]` URL that several nodes share.
    /// `None`: `sqlite`.
    pub store: Option<String>,
    /// The sealing key file of a PostgreSQL store; every node of the installation needs the
    /// same one. `None`: `DATA_DIR/store.key` (created for a new database). A SQLite store
    /// keeps its key beside the database file.
    pub sealing_key: Option<PathBuf>,
    /// The ID scope this node belongs to. A new store takes it; a store that has another
    /// one is refused. `None`: whatever the store has (a random one for a new store).
    pub id_scope: Option<String>,
    /// Name or IP address devices and clients are told to reach the DPS at; the server
    /// certificate names it. Listeners bind it only when `listen` is empty.
    pub dps_host: String,
    /// Name or IP devices are told for the built-in IoT hub. `None`: the DPS host.
    pub hub_host: Option<String>,
    /// IP addresses every listener binds (`0.0.0.0`, `::`, `[::]` allowed). Empty: the
    /// addresses the advertised hosts resolve to (loopback for the default `localhost`).
    pub listen: Vec<String>,
    /// Bind the device and service listeners with `SO_REUSEPORT`, so several Muster nodes
    /// on one machine share an address and port and the kernel spreads the connections
    /// among them (a cluster on one host, or a rolling restart without a closed port).
    pub reuse_port: bool,
    /// `ADDR:PORT` of a plain-HTTP admin listener (`/healthz`, `/readyz`); off when `None`.
    pub admin_listen: Option<String>,
    /// How `muster serve` writes its log lines.
    pub log_format: LogFormat,
    /// HTTPS port: device API, service API, hub REST, MQTT and AMQP over WebSocket.
    pub https_port: u16,
    /// MQTT over TLS port for device registration.
    pub mqtt_port: u16,
    /// AMQP over TLS port for device registration (`0` picks a free port).
    pub amqp_port: u16,
    /// PEM certificate chain to serve instead of one issued by the local CA.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM chain of an operator-supplied intermediate CA (its certificate first, then up to
    /// the root) that signs device certificates for CSRs, instead of Muster's own
    /// `issuing-ca.pem` under the local CA.
    pub issuing_ca_cert: Option<PathBuf>,
    /// PEM (PKCS #8) private key for `issuing_ca_cert`.
    pub issuing_ca_key: Option<PathBuf>,
    /// Named operator issuing CAs (`[[issuing-cas]]`), imported at start into the store,
    /// sealed, for enrollments to select with `certificateIssuance.issuingCa`; once imported
    /// they load from the store and the files are no longer read.
    pub issuing_cas: Vec<IssuingCaConfig>,
    /// How often the TLS certificate and key files are checked for a change (SIGHUP checks
    /// at once).
    pub tls_reload_interval_ms: u64,
    /// Extra names and addresses the local CA's server certificate should carry.
    pub extra_hosts: Vec<String>,
    /// Most concurrent connections per listener; more wait in the accept queue. Lowered at
    /// start when the process's file descriptor limit could not hold that many.
    pub max_connections: usize,
    /// Most connections one source address may have open before they authenticate (TLS,
    /// then the first HTTP request or an authenticated MQTT registration / hub CONNECT);
    /// more from that address are closed at once, so one address cannot take every slot.
    pub max_unauthenticated_per_address: usize,
    /// Time a client gets to complete the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Time a new HTTPS connection gets, after TLS, to send its first request's headers.
    pub http_header_timeout_ms: u64,
    /// Time a kept-alive HTTPS connection may wait for its next request (headers included).
    pub http_idle_timeout_ms: u64,
    /// Time a device MQTT connection gets, after TLS or the WebSocket upgrade, to send CONNECT;
    /// an AMQP connection gets as long to open its first link.
    pub mqtt_connect_timeout_ms: u64,
    /// Time an MQTT or AMQP registration connection gets, from its start, to authenticate (its first
    /// request accepted); a failed attestation closes it at once, after the error response.
    pub mqtt_auth_timeout_ms: u64,
    /// The longest an MQTT device connection may stay silent: 1.5 × the client's keep-alive
    /// is capped at this, which is also the limit when keep-alive is 0 (IoT Hub: 1767 s); an
    /// AMQP registration connection without a request for this long is closed.
    pub mqtt_max_idle_secs: u64,
    /// This node's region, matched against linked hubs' `location` by `geoLatency`.
    pub region: Option<String>,
    /// How long one call to a custom allocation webhook may take.
    pub webhook_timeout_ms: u64,
    /// Further attempts after a webhook timed out, was unreachable or answered ≥ 429.
    pub webhook_retries: u32,
    /// Hubs to link at start (besides the built-in one); updated when they change.
    pub linked_hubs: Vec<LinkedHubConfig>,
    /// How long the built-in hub keeps a device's persistent MQTT session (CleanSession=0)
    /// after the device disconnected.
    pub hub_session_expiry_secs: u64,
    /// Days the audit log keeps an entry; older ones are pruned periodically.
    pub audit_retention_days: u32,
    /// Most `GET /events/registrations` streams (console live views included) open at once.
    pub max_event_subscribers: usize,
    /// This node's name in claims on shared work (pending assignments, hub removals); unique
    /// among the nodes of one PostgreSQL store, best kept across restarts. `None`: `local`
    /// with SQLite, a random name per start with PostgreSQL.
    pub node_id: Option<String>,
    /// How long a node's claim on shared work holds without renewal: a dead node's work is
    /// taken over this long after it died.
    pub lease_ms: u64,
    /// How often a node renews its claims and looks for work whose claim lapsed.
    pub sweep_interval_ms: u64,
}

/// How log lines are written: `text` for people, `json` (one object per line) for collectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(ConfigError::Invalid(format!(
                "log-format must be `text` or `json`, not `{other}`"
            ))),
        }
    }
}

/// The listeners' limits and deadlines ([`Config::connection_limits`]); `max_connections` is
/// what the descriptor limit allows, which may be less than configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_unauthenticated_per_address: usize,
    pub tls_handshake_timeout: Duration,
    pub http_header_timeout: Duration,
    pub http_idle_timeout: Duration,
    pub mqtt_connect_timeout: Duration,
    pub mqtt_auth_timeout: Duration,
    pub mqtt_max_idle: Duration,
}

/// An `[[issuing-cas]]` entry of the config file (`--issuing-ca NAME=CERT,KEY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IssuingCaConfig {
    /// What `certificateIssuance.issuingCa` names it by.
    pub name: String,
    /// PEM chain: the intermediate first, then up to the root.
    pub cert: PathBuf,
    /// Its PEM (PKCS #8) private key.
    pub key: PathBuf,
}

impl std::str::FromStr for IssuingCaConfig {
    type Err = String;

    /// `NAME=CERT.pem,KEY.pem`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not NAME=CERT.pem,KEY.pem");
        let (name, files) = s.split_once('=').ok_or_else(bad)?;
        let (cert, key) = files.split_once(',').ok_or_else(bad)?;
        if name.is_empty() || cert.is_empty() || key.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_string(),
            cert: cert.into(),
            key: key.into(),
        })
    }
}

/// A `[[linked-hubs]]` entry of the config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LinkedHubConfig {
    pub connection_string: String,
    #[serde(default = "one")]
    pub allocation_weight: u32,
    #[serde(default = "yes")]
    pub apply_allocation_policy: bool,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub max_registrations_per_second: Option<u32>,
}

impl std::fmt::Debug for LinkedHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkedHubConfig")
            .field("allocation_weight", &self.allocation_weight)
            .finish_non_exhaustive()
    }
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("muster-data"),
            store: None,
            sealing_key: None,
            id_scope: None,
            dps_host: "localhost".into(),
            hub_host: None,
            listen: Vec::new(),
            reuse_port: false,
            admin_listen: None,
            log_format: LogFormat::Text,
            https_port: 443,
            mqtt_port: 8883,
            amqp_port: 5671,
            tls_cert: None,
            tls_key: None,
            issuing_ca_cert: None,
            issuing_ca_key: None,
            issuing_cas: Vec::new(),
            tls_reload_interval_ms: 5_000,
            extra_hosts: Vec::new(),
            max_connections: 10_000,
            max_unauthenticated_per_address: 256,
            tls_handshake_timeout_ms: 10_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            mqtt_connect_timeout_ms: 10_000,
            mqtt_auth_timeout_ms: 10_000,
            mqtt_max_idle_secs: 1767,
            region: None,
            webhook_timeout_ms: 10_000,
            webhook_retries: 3,
            linked_hubs: Vec::new(),
            hub_session_expiry_secs: 3600,
            audit_retention_days: 90,
            max_event_subscribers: 32,
            node_id: None,
            lease_ms: 30_000,
            sweep_interval_ms: 5_000,
        }
    }
}

/// Where the records live ([`Config::store_location`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite database file (the default, `DATA_DIR/muster.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database, and the sealing key file every node shares.
    Postgres { url: String, sealing_key: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store_location()?;
        if let Some(scope) = &self.id_scope {
            muster_proto::IdScope::new(scope.clone())
                .map_err(|e| ConfigError::Invalid(format!("id-scope: {e}")))?;
        }
        if self.dps_host.trim().is_empty() {
            return Err(ConfigError::Invalid("dps-host must not be empty".into()));
        }
        self.listen_addrs()?;
        self.admin_addr()?;
        if self.hub_session_expiry_secs == 0 {
            return Err(ConfigError::Invalid(
                "hub-session-expiry-secs must be at least 1".into(),
            ));
        }
        if self.sweep_interval_ms >= self.lease_ms {
            return Err(ConfigError::Invalid(
                "sweep-interval-ms must be shorter than lease-ms (claims are renewed every sweep)"
                    .into(),
            ));
        }
        if self.audit_retention_days == 0 {
            return Err(ConfigError::Invalid(
                "audit-retention-days must be at least 1".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "tls-cert and tls-key go together: give both or neither".into(),
            ));
        }
        if self.issuing_ca_cert.is_some() != self.issuing_ca_key.is_some() {
            return Err(ConfigError::Invalid(
                "issuing-ca-cert and issuing-ca-key go together: give both or neither".into(),
            ));
        }
        for (i, ca) in self.issuing_cas.iter().enumerate() {
            crate::issuing_ca::check_name(&ca.name)
                .map_err(|e| ConfigError::Invalid(format!("issuing-cas: {e}")))?;
            if self.issuing_cas[..i].iter().any(|o| o.name == ca.name) {
                return Err(ConfigError::Invalid(format!(
                    "issuing-cas: '{}' is named twice",
                    ca.name
                )));
            }
        }
        for h in &self.linked_hubs {
            muster_proto::ConnectionString::parse(&h.connection_string).map_err(|e| {
                ConfigError::Invalid(format!("linked-hubs: connection-string: {e}"))
            })?;
            if !(1..=1000).contains(&h.allocation_weight) {
                return Err(ConfigError::Invalid(
                    "linked-hubs: allocation-weight must be 1 to 1000".into(),
                ));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max-connections must be at least 1".into(),
            ));
        }
        if self.max_unauthenticated_per_address == 0 {
            return Err(ConfigError::Invalid(
                "max-unauthenticated-per-address must be at least 1".into(),
            ));
        }
        for (name, value) in [
            ("tls-handshake-timeout-ms", self.tls_handshake_timeout_ms),
            ("tls-reload-interval-ms", self.tls_reload_interval_ms),
            ("http-header-timeout-ms", self.http_header_timeout_ms),
            ("http-idle-timeout-ms", self.http_idle_timeout_ms),
            ("mqtt-connect-timeout-ms", self.mqtt_connect_timeout_ms),
            ("mqtt-auth-timeout-ms", self.mqtt_auth_timeout_ms),
            ("mqtt-max-idle-secs", self.mqtt_max_idle_secs),
            ("lease-ms", self.lease_ms),
            ("sweep-interval-ms", self.sweep_interval_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// The store [`Config::store`] names.
    pub fn store_location(&self) -> Result<StoreLocation, ConfigError> {
        let value = self.store.as_deref().map(str::trim).unwrap_or("sqlite");
        if value == "sqlite" {
            return Ok(StoreLocation::Sqlite(self.data_dir.join("muster.db")));
        }
        if let Some(path) = value.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(ConfigError::Invalid(
                    "store: sqlite:PATH needs a path".into(),
                ));
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            if !cfg!(feature = "postgres") {
                return Err(ConfigError::Invalid(
                    "store: this build of Muster has no PostgreSQL support (cargo feature \
                     `postgres`)"
                        .into(),
                ));
            }
            return Ok(StoreLocation::Postgres {
                url: value.to_string(),
                sealing_key: self
                    .sealing_key
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("store.key")),
            });
        }
        // Never echo the value: a mistyped URL may hold a password.
        Err(ConfigError::Invalid(
            "store must be `sqlite`, `sqlite:PATH` or a postgres:// URL".into(),
        ))
    }

    /// `listen` parsed: each entry an IP address, IPv6 with or without brackets, duplicates
    /// dropped.
    pub fn listen_addrs(&self) -> Result<Vec<IpAddr>, ConfigError> {
        let mut addrs = Vec::new();
        for entry in &self.listen {
            let text = entry.trim();
            let ip = text
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or(text)
                .parse::<IpAddr>()
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "listen: `{entry}` is not an IP address (e.g. 0.0.0.0, ::, 192.168.1.10); \
                         names devices use go in dps-host, hub-host and extra-hosts"
                    ))
                })?;
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        Ok(addrs)
    }

    /// `admin_listen` parsed.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.admin_listen
            .as_deref()
            .map(|text| {
                text.trim().parse::<SocketAddr>().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "admin-listen: `{text}` is not ADDR:PORT (e.g. 127.0.0.1:9090, [::1]:9090)"
                    ))
                })
            })
            .transpose()
    }

    /// The listeners' deadlines and limits, as the listener and session code takes them.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_unauthenticated_per_address: self.max_unauthenticated_per_address,
            tls_handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            http_header_timeout: Duration::from_millis(self.http_header_timeout_ms),
            http_idle_timeout: Duration::from_millis(self.http_idle_timeout_ms),
            mqtt_connect_timeout: Duration::from_millis(self.mqtt_connect_timeout_ms),
            mqtt_auth_timeout: Duration::from_millis(self.mqtt_auth_timeout_ms),
            mqtt_max_idle: Duration::from_secs(self.mqtt_max_idle_secs),
        }
    }

    /// The config as TOML, for `muster serve --print-config`.
    /// The configuration as TOML, with a PostgreSQL URL's password replaced by `REDACTED`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store = shown.store.as_deref().map(redact_password);
        toml::to_string_pretty(&shown).unwrap_or_default()
    }
}

/// `scheme://user:password@host...` with the password replaced by `REDACTED`; anything else
/// as it is.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:REDACTED@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_config_hides_the_database_password() {
        let c = Config {
            store: Some("postgres://muster:s3cret@db.lan:5432/muster?sslmode=require".into()),
            ..Config::default()
        };
        let text = c.to_toml();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("postgres://muster:REDACTED@db.lan:5432/muster?sslmode=require"),
            "{text}"
        );
        for plain in [
            "sqlite",
            "sqlite:/x/m.db",
            "postgres://muster@db.lan/muster",
        ] {
            assert_eq!(redact_password(plain), plain);
        }
    }

    #[test]
    fn store_defaults_to_sqlite_in_the_data_dir_and_refuses_unknown_kinds() {
        let c = Config::default();
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Sqlite(PathBuf::from("muster-data/muster.db"))
        );
        let c: Config = toml::from_str("store = \"sqlite:/var/lib/m.db\"").unwrap();
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Sqlite(PathBuf::from("/var/lib/m.db"))
        );
        let c: Config = toml::from_str("store = \"mysql://u:hunter2@h/d\"").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("postgres://") && !e.contains("hunter2"), "{e}");
        let c: Config = toml::from_str("id-scope = \"not a scope!\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("id-scope"));
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn a_postgres_store_shares_a_key_file() {
        let c: Config =
            toml::from_str("data-dir = \"/d\"\nstore = \"postgres://m@db/fleet?sslmode=require\"")
                .unwrap();
        assert_eq!(
            c.store_location().unwrap(),
            StoreLocation::Postgres {
                url: "postgres://m@db/fleet?sslmode=require".into(),
                sealing_key: PathBuf::from("/d/store.key"),
            }
        );
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("muster.toml");
        std::fs::write(&p, "dps-host = \"127.0.0.2\"\nhttps-port = 8443\n").unwrap();
        let c = Config::from_file(&p).unwrap();
        assert_eq!(c.dps_host, "127.0.0.2");
        assert_eq!(c.https_port, 8443);
        assert_eq!(c.mqtt_port, 8883);
        assert_eq!(c.amqp_port, 5671);
        std::fs::write(&p, "dps-hots = \"x\"\n").unwrap();
        let e = Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("dps-hots"), "{e}");
    }

    #[test]
    fn connection_limits_come_from_the_file_and_zero_is_refused() {
        let text = "max-unauthenticated-per-address = 4\nhttp-header-timeout-ms = 1500\n\
                    mqtt-max-idle-secs = 60\n";
        let c: Config = toml::from_str(text).unwrap();
        let limits = c.connection_limits();
        assert_eq!(limits.max_unauthenticated_per_address, 4);
        assert_eq!(limits.http_header_timeout, Duration::from_millis(1500));
        assert_eq!(limits.mqtt_max_idle, Duration::from_secs(60));
        assert_eq!(limits.tls_handshake_timeout, Duration::from_secs(10));
        c.validate().unwrap();
        let zero = Config {
            mqtt_auth_timeout_ms: 0,
            ..Config::default()
        };
        let e = zero.validate().unwrap_err().to_string();
        assert!(e.contains("mqtt-auth-timeout-ms"), "{e}");
        let zero = Config {
            max_unauthenticated_per_address: 0,
            ..Config::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn claims_settings_come_from_the_file_and_a_sweep_must_be_shorter_than_a_lease() {
        let c: Config =
            toml::from_str("node-id = \"n1\"\nlease-ms = 10000\nsweep-interval-ms = 2000\n")
                .unwrap();
        c.validate().unwrap();
        assert_eq!(c.node_id.as_deref(), Some("n1"));
        assert_eq!((c.lease_ms, c.sweep_interval_ms), (10_000, 2_000));
        let slow = Config {
            lease_ms: 5_000,
            sweep_interval_ms: 5_000,
            ..Config::default()
        };
        let e = slow.validate().unwrap_err().to_string();
        assert!(e.contains("sweep-interval-ms"), "{e}");
        let zero = Config {
            lease_ms: 0,
            ..Config::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn listen_addresses_are_ips_and_admin_listen_an_address_with_port() {
        let text = "listen = [\"0.0.0.0\", \"[::]\", \"::1\", \"0.0.0.0\"]\n\
                    admin-listen = \"127.0.0.1:9090\"\nlog-format = \"json\"\n";
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let addrs: Vec<String> = c
            .listen_addrs()
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(addrs, ["0.0.0.0", "::", "::1"]);
        assert_eq!(
            c.admin_addr().unwrap(),
            Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
        );
        assert_eq!(c.log_format, LogFormat::Json);
        let named = Config {
            listen: vec!["dps.example.lan".into()],
            ..Config::default()
        };
        let e = named.validate().unwrap_err().to_string();
        assert!(e.contains("listen") && e.contains("dps.example.lan"), "{e}");
        let no_port = Config {
            admin_listen: Some("127.0.0.1".into()),
            ..Config::default()
        };
        let e = no_port.validate().unwrap_err().to_string();
        assert!(e.contains("admin-listen"), "{e}");
        assert!("yaml".parse::<LogFormat>().is_err());
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
    }

    #[test]
    fn default_round_trips_through_toml() {
        let c = Config::default();
        assert_eq!(toml::from_str::<Config>(&c.to_toml()).unwrap(), c);
    }
}
