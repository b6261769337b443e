//! Assembles a running Muster: configuration, data dir, store, local CA and TLS, listeners,
//! and graceful shutdown.
//!
//! Layout:
//! - [`config`] — the settings `muster serve` takes (TOML file, flags, environment).
//! - [`bootstrap`] — the service identity kept in the store (ID scope, access policies).
//! - [`tls`] — the local CA and the server certificate it issues.
//! - [`client_cert`] — optional device client certificates (any X.509 version: the handshake
//!   signature is checked with the leaf's own key), judged after the handshake.
//! - [`app`] — the HTTPS router: service API, device API, built-in hub REST, MQTT over WebSocket.
//! - [`local_hub`] — the built-in hub as the engine's in-process hub connection.
//! - [`listener`] — TLS accept loops (HTTPS and device MQTT), connection limits, deadlines,
//!   back-off when `accept` fails, draining.
//! - [`admission`] — per-source-address limit on unauthenticated connections.
//! - [`descriptors`] — the file descriptor limit: raised at start, connection limits fitted.
//! - [`mqtt_dispatch`] — one MQTT port for registration and the hub's device endpoint.
//! - [`connection_info`] — `connection.json`, what clients need to connect.
//!
//! [`Server::start`] binds every listener before it writes `connection.json`, so a harness
//! that sees the file can connect.

pub mod admission;
pub mod app;
pub mod bootstrap;
pub mod client_cert;
pub mod config;
pub mod connection_info;
pub mod descriptors;
pub mod listener;
pub mod local_hub;
pub mod mqtt_dispatch;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use muster_proto::runtime::{Clock, Entropy, OsEntropy, SystemClock};
use muster_proto::{ConnectionString, IdScope};
use muster_registration::{DeviceRegistrar, Engine, EngineConfig};
use muster_service_api::{Authorizer, Limits, ServiceApi};
use muster_store::{SqliteStore, Store};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

pub use config::Config;
pub use connection_info::ConnectionInfo;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("could not create or restrict the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not open the store: {0}")]
    Store(#[from] muster_store::StoreError),
    #[error(
        "refusing to join this store: it belongs to ID scope {stored}, but this node is \
         configured for {expected} (id-scope); point the node at its own store or fix id-scope"
    )]
    IdScopeMismatch { expected: String, stored: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("could not resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("could not bind the {what} listener on {addr}: {source}; {hint}")]
    Bind {
        what: String,
        addr: SocketAddr,
        hint: String,
        source: std::io::Error,
    },
    #[error("could not start the registration engine: {0}")]
    Engine(String),
    #[error("could not build the outbound HTTPS client: {0}")]
    Outbound(String),
    #[error("could not write {path}: {source}")]
    ConnectionInfo {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A started server. Dropping it does not stop it: call [`Server::shutdown`].
pub struct Server {
    pub connection: ConnectionInfo,
    pub https_addrs: Vec<SocketAddr>,
    pub mqtt_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Opens the store the configuration names (SQLite by default).
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServerError> {
    match config.store_location()? {
        config::StoreLocation::Sqlite(path) => Ok(Arc::new(SqliteStore::open(&path)?)),
        #[cfg(feature = "postgres")]
        config::StoreLocation::Postgres { url, sealing_key } => Ok(Arc::new(
            muster_store::PostgresStore::open(&url, &sealing_key).await?,
        )),
        #[cfg(not(feature = "postgres"))]
        config::StoreLocation::Postgres { .. } => Err(config::ConfigError::Invalid(
            "store: this build of Muster has no PostgreSQL support".into(),
        )
        .into()),
    }
}

/// Checks the configuration and creates the data dir (0700) before anything is opened in it.
fn prepare_data_dir(config: &Config) -> Result<(), ServerError> {
    config.validate()?;
    create_private_dir(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })
}

impl Server {
    /// Starts with the system clock and the OS random source.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        Self::start_with(config, Arc::new(SystemClock), Arc::new(OsEntropy)).await
    }

    pub async fn start_with(
        config: Config,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> Result<Server, ServerError> {
        prepare_data_dir(&config)?;
        let store = open_store(&config).await?;
        Self::start_on_store(config, clock, entropy, store).await
    }

    /// Starts on a store opened by the caller (tests wrap the data dir's SQLite store, for
    /// example to make it fail on command).
    pub async fn start_on_store(
        config: Config,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        store: Arc<dyn Store>,
    ) -> Result<Server, ServerError> {
        // Again for callers that opened their store elsewhere (idempotent).
        prepare_data_dir(&config)?;
        let data_dir = config.data_dir.clone();
        let expected_scope = match &config.id_scope {
            Some(scope) => Some(
                IdScope::new(scope.clone())
                    .map_err(|e| config::ConfigError::Invalid(format!("id-scope: {e}")))?,
            ),
            None => None,
        };
        let identity =
            bootstrap::load_or_create(&*store, &*entropy, expected_scope.as_ref()).await?;
        if let Some(expected) = expected_scope.filter(|s| *s != identity.id_scope) {
            return Err(ServerError::IdScopeMismatch {
                expected: expected.to_string(),
                stored: identity.id_scope.to_string(),
            });
        }
        let hub_policies = bootstrap::hub_policies(&*store, &*entropy).await?;

        let hub_host = config
            .hub_host
            .clone()
            .unwrap_or_else(|| config.dps_host.clone());
        let ca = tls::LocalCa::load_or_create(&data_dir)?;
        let mut hosts = vec![config.dps_host.clone(), hub_host.clone()];
        hosts.extend(config.extra_hosts.iter().cloned());
        hosts.dedup();
        let server_identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => tls::ServerIdentity::from_pem_files(cert, key)?,
            _ => tls::ServerIdentity::load_or_create(&data_dir, &ca, &hosts)?,
        };
        // Devices may present X.509 client certificates on both listeners.
        let https_tls = server_identity.rustls_config_with(&[b"http/1.1"], true)?;
        let mqtt_tls = server_identity.rustls_config_with(&[], true)?;

        // Bind everything before anything is announced.
        let mut https_addrs = resolve(&config.dps_host, config.https_port).await?;
        let mut mqtt_addrs = resolve(&config.dps_host, config.mqtt_port).await?;
        if !hub_host.eq_ignore_ascii_case(&config.dps_host) {
            https_addrs.extend(resolve(&hub_host, config.https_port).await?);
            mqtt_addrs.extend(resolve(&hub_host, config.mqtt_port).await?);
        }
        let https_listeners = listener::bind(&https_addrs, "HTTPS").await?;
        let mqtt_listeners = listener::bind(&mqtt_addrs, "MQTT").await?;
        let max_connections = fit_connections_to_descriptors(
            config.max_connections,
            https_listeners.len() + mqtt_listeners.len(),
        );
        let bound: Vec<SocketAddr> = https_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let mqtt_bound: Vec<SocketAddr> = mqtt_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let https_port = bound.first().map(|a| a.port()).unwrap_or(config.https_port);
        let mqtt_port = mqtt_bound
            .first()
            .map(|a| a.port())
            .unwrap_or(config.mqtt_port);

        let endpoint = connection_info::host_with_port(&config.dps_host, https_port, 443);
        let hub_endpoint = connection_info::host_with_port(&hub_host, https_port, 443);

        // The built-in hub, linked like any other hub.
        let limits = config.connection_limits();
        let hub = muster_hub::HubRegistry::with_limits(
            store.clone(),
            hub_endpoint.clone(),
            hub_policies.clone(),
            clock.clone(),
            entropy.clone(),
            muster_hub::DeviceEndpointLimits {
                session_expiry: std::time::Duration::from_secs(config.hub_session_expiry_secs),
                connect_timeout: limits.mqtt_connect_timeout,
                max_idle: limits.mqtt_max_idle,
                ..muster_hub::DeviceEndpointLimits::default()
            },
        );
        let hub_owner = hub_policies
            .iter()
            .find(|p| p.key_name == bootstrap::HUB_OWNER_POLICY)
            .cloned();
        let hub_connection_string = hub_owner
            .map(|p| {
                ConnectionString {
                    host_name: hub_endpoint.clone(),
                    key_name: p.key_name.clone(),
                    key: p.primary_key.clone(),
                }
                .to_string()
            })
            .unwrap_or_default();
        bootstrap::link_hubs(
            &*store,
            &hub_endpoint,
            &hub_connection_string,
            &config.linked_hubs,
        )
        .await?;

        let mut service_hosts = vec![endpoint.clone(), config.dps_host.clone()];
        service_hosts.extend(config.extra_hosts.iter().cloned());
        let mut api = ServiceApi {
            store: store.clone(),
            auth: Authorizer::new(identity.policies.clone(), service_hosts),
            clock: clock.clone(),
            entropy: entropy.clone(),
            limits: Limits::default(),
            deprovisioner: None,
        };

        let http = outbound_client(&ca)?;
        let mut engine_config = EngineConfig::new(identity.id_scope.clone());
        engine_config.region = config.region.clone();
        engine_config.webhook.timeout = std::time::Duration::from_millis(config.webhook_timeout_ms);
        engine_config.webhook.retries = config.webhook_retries;
        // The built-in hub is written in process; other linked hubs over their REST API.
        let engine = Engine::new(store.clone(), clock, entropy, http, engine_config)
            .with_local_hub(
                &hub_endpoint,
                Arc::new(local_hub::LocalHub::new(hub.clone())),
            );
        let registrar: Arc<dyn DeviceRegistrar> = Arc::new(engine.clone());
        api.deprovisioner = Some(Arc::new(local_hub::EngineHubDevices(engine.clone())));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mqtt_services = mqtt_dispatch::MqttServices {
            registrar: registrar.clone(),
            hub: hub.clone(),
            limits: muster_device_api::mqtt::MqttLimits {
                connect_timeout: limits.mqtt_connect_timeout,
                auth_timeout: limits.mqtt_auth_timeout,
                max_idle: limits.mqtt_max_idle,
                ..Default::default()
            },
        };
        let console = muster_console::Console::new(
            muster_console::ConsoleConfig {
                id_scope: identity.id_scope.to_string(),
                device_endpoint: endpoint.clone(),
                service_endpoint: format!("https://{endpoint}"),
                service_host: endpoint.clone(),
                ca_pem_path: absolute(ca.cert_path().to_path_buf()),
            },
            api.clone(),
            hub.clone(),
            Arc::new(local_hub::EngineHubDevices(engine.clone())),
        );
        let app = app::https_app(api, mqtt_services.clone(), console);
        let listener_limits = listener::ListenerLimits {
            max_connections,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            http_header_timeout: limits.http_header_timeout,
            http_idle_timeout: limits.http_idle_timeout,
            pre_auth: admission::PreAuthLimiter::new(limits.max_unauthenticated_per_address),
        };
        for l in https_listeners {
            tasks.spawn(listener::serve_https(
                l,
                https_tls.clone(),
                app.clone(),
                listener_limits.clone(),
                shutdown_rx.clone(),
            ));
        }
        for l in mqtt_listeners {
            tasks.spawn(listener::serve_mqtt(
                l,
                mqtt_tls.clone(),
                mqtt_services.clone(),
                listener_limits.clone(),
                shutdown_rx.clone(),
            ));
        }
        engine
            .resume_pending()
            .await
            .map_err(|f| ServerError::Engine(f.message))?;

        let owner = identity.owner().cloned();
        let connection = ConnectionInfo {
            id_scope: identity.id_scope.to_string(),
            dps_host: config.dps_host.clone(),
            https_port,
            mqtt_port,
            device_endpoint: endpoint.clone(),
            service_endpoint: format!("https://{endpoint}"),
            service_connection_string: owner
                .map(|p| {
                    ConnectionString {
                        host_name: endpoint.clone(),
                        key_name: p.key_name,
                        key: p.primary_key,
                    }
                    .to_string()
                })
                .unwrap_or_default(),
            ca_certificate: absolute(ca.cert_path().to_path_buf()),
            console_url: format!("https://{endpoint}{}", muster_console::BASE),
            hubs: vec![connection_info::HubInfo {
                host_name: hub_endpoint,
                connection_string: hub_connection_string,
                built_in: true,
            }],
        };
        let path = data_dir.join(ConnectionInfo::FILE_NAME);
        connection
            .write(&data_dir)
            .map_err(|source| ServerError::ConnectionInfo { path, source })?;
        info!(https = ?bound, mqtt = ?mqtt_bound, console = %connection.console_url, "listening");
        Ok(Server {
            connection,
            https_addrs: bound,
            mqtt_addrs: mqtt_bound,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, lets open requests finish (bounded by the drain timeout), and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Raises the descriptor limit and returns the connection limit per listener that fits it,
/// logging both.
fn fit_connections_to_descriptors(configured: usize, listeners: usize) -> usize {
    let Some(fds) = descriptors::raise_limit() else {
        return configured;
    };
    let per_listener = descriptors::connections_per_listener(configured, listeners, fds.soft);
    if per_listener < configured {
        tracing::warn!(
            soft = fds.soft,
            hard = fds.hard,
            listeners,
            configured,
            per_listener,
            "max-connections lowered to what the file descriptor limit allows; raise the hard \
             limit (LimitNOFILE= under systemd, ulimit -Hn) to serve more"
        );
    }
    info!(
        descriptors_soft = fds.soft,
        descriptors_hard = fds.hard,
        listeners,
        max_connections_per_listener = per_listener,
        "connection limits"
    );
    per_listener
}

/// The data dir holds keys: owner-only on creation.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o700);
        }
        return b.create(dir);
    }
    // A data dir an older Muster (or an operator) left open to others is closed: it holds
    // the database, its key file and the CA key.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
            tracing::info!(path = %dir.display(), old_mode = format!("{:o}", mode & 0o777), "restricted the data dir to its owner");
        }
    }
    Ok(())
}

/// HTTPS client for hub REST calls and webhooks: trusts the system's roots and the local CA
/// (the built-in hub's certificate comes from it).
fn outbound_client(ca: &tls::LocalCa) -> Result<reqwest::Client, ServerError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    roots
        .add(ca.cert_der().clone())
        .map_err(|e| ServerError::Outbound(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Outbound(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| ServerError::Outbound(e.to_string()))
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// Addresses `host` resolves to. `localhost` resolves to loopback without asking DNS.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ServerError> {
    if let Ok(ip) = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
    {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]);
    }
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ServerError::Resolve {
            host: host.to_string(),
            source,
        })?
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}
