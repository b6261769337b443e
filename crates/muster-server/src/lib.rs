//! Assembles a running Muster: configuration, data dir, store, local CA and TLS, listeners,
//! and graceful shutdown.
//!
//! Layout:
//! - [`config`] — the settings `muster serve` takes (TOML file, flags, environment).
//! - [`bootstrap`] — the service identity kept in the store (ID scope, access policies).
//! - [`tls`] — the local CA and the server certificate it issues.
//! - [`shared_tls`] — with a PostgreSQL store, that CA and certificate created once and kept
//!   in the store, so every node serves the same chain.
//! - [`issuing_ca`] — the CA that signs device certificates for CSRs: `issuing-ca.pem` /
//!   `issuing-ca.key`, an intermediate under the local CA, and named operator CAs imported
//!   into the store sealed (`--issuing-ca NAME=CERT,KEY`) and loaded from it.
//! - [`server_cert`] — the certificate every TLS listener presents (one shared resolver),
//!   reloaded when its files change or on demand (SIGHUP).
//! - [`client_cert`] — optional device client certificates (any X.509 version: the handshake
//!   signature is checked with the leaf's own key), judged after the handshake.
//! - [`app`] — the HTTPS router: service API, device API, built-in hub REST, device WebSockets.
//! - [`local_hub`] — the built-in hub as the engine's in-process hub connection.
//! - [`linked_hub_check`] — the registry read that proves a hub's connection string works
//!   before the service API links the hub.
//! - [`bind_set`] — the addresses every listener binds (`--listen`), apart from the
//!   advertised names; `SO_REUSEPORT` for nodes sharing a port (`--reuse-port`).
//! - [`health`] — `/healthz` and `/readyz` (store write probe, listeners accepting).
//! - [`admin`] — the optional plain-HTTP admin listener (`--admin-listen`): health, metrics.
//! - [`hub_rename`] — a built-in hub whose address changed takes every stored reference to
//!   its old name along, in one transaction.
//! - [`listener`] — TLS accept loops (HTTPS, device MQTT, device AMQP), connection limits, deadlines,
//!   back-off when `accept` fails, draining.
//! - [`admission`] — per-source-address limit on unauthenticated connections.
//! - [`descriptors`] — the file descriptor limit: raised at start, connection limits fitted.
//! - [`mqtt_dispatch`] — one MQTT port for registration and the hub's device endpoint.
//! - [`refusal_log`] — a debug line for every refused HTTPS request (status, code, check).
//! - [`amqp_dispatch`] — one AMQP port (5671) for registration and the built-in hub's devices.
//! - [`device_websocket`] — `/$iothub/websocket`: MQTT or AMQP by the offered subprotocol.
//! - [`connection_info`] — `connection.json`, what clients need to connect.
//! - [`unread_body`] — `Connection: close` when a request's body was left unread (an early
//!   refusal), so clients don't reuse a connection hyper is closing.
//! - [`metrics`] — the Prometheus recorder (installed once per process), connection and TLS
//!   metrics, and `GET /metrics`; [`metered_store`] times every store write.
//! - [`registration_events`] — each transport's view of the engine, publishing every
//!   registration to the live event feed, and to the other nodes over the store's bus.
//!
//! Several nodes on one PostgreSQL store: the built-in hub and the registration feed use
//! the store's bus (`Store::bus`, `muster_hub::HubRegistry::with_bus`), so sessions, method
//! calls and live streams reach across nodes; with SQLite there is no bus.
//! - [`audit_retention`] — the periodic pruning of the audit log.
//!
//! [`Server::start`] binds every listener before it writes `connection.json`, so a harness
//! that sees the file can connect.

pub mod admin;
pub mod admission;
pub mod amqp_dispatch;
pub mod app;
pub mod audit_retention;
pub mod bind_set;
pub mod bootstrap;
pub mod client_cert;
pub mod config;
pub mod connection_info;
pub mod descriptors;
pub mod device_websocket;
pub mod health;
pub mod hub_rename;
pub mod issuing_ca;
pub mod linked_hub_check;
pub mod listener;
pub mod local_hub;
pub mod metered_store;
pub mod metrics;
pub mod mqtt_dispatch;
pub mod refusal_log;
pub mod registration_events;
pub mod server_cert;
pub mod shared_tls;
pub mod tls;
pub mod unread_body;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use muster_proto::runtime::{Clock, Entropy, OsEntropy, SystemClock};
use muster_proto::{ConnectionString, IdScope};
use muster_registration::{DeviceRegistrar, Engine, EngineConfig};
use muster_service_api::events::RegistrationFeed;
use muster_service_api::{Authorizer, Limits, ServiceApi};
use muster_store::{SqliteStore, Store};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

pub use bind_set::BindSet;
pub use config::{Config, LogFormat};
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
    #[error(transparent)]
    IssuingCa(#[from] issuing_ca::ImportError),
    #[error(
        "could not resolve {host}: {source}; to advertise a name this machine cannot resolve, \
         bind its addresses with --listen (e.g. --listen 0.0.0.0)"
    )]
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
    /// The addresses the HTTPS and MQTT listeners bound.
    pub bind_set: BindSet,
    /// Where the plain-HTTP admin listener listens, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// Where the AMQP listeners listen (registration and hub devices over AMQP 1.0).
    pub amqp_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    reload_certificate: Arc<tokio::sync::Notify>,
}

/// Opens the store the configuration names (SQLite by default).
async fn open_store(
    config: &Config,
    entropy: Arc<dyn Entropy>,
) -> Result<Arc<dyn Store>, ServerError> {
    match config.store_location()? {
        config::StoreLocation::Sqlite(path) => {
            Ok(Arc::new(SqliteStore::open_with_entropy(&path, entropy)?))
        }
        #[cfg(feature = "postgres")]
        config::StoreLocation::Postgres { url, sealing_key } => Ok(Arc::new(
            muster_store::PostgresStore::open_with_entropy(&url, &sealing_key, entropy).await?,
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
        let store = open_store(&config, entropy.clone()).await?;
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
        let metrics_handle = metrics::install();
        let store: Arc<dyn Store> = Arc::new(metered_store::MeteredStore::new(store));
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
        let mut hosts = vec![config.dps_host.clone(), hub_host.clone()];
        hosts.extend(config.extra_hosts.iter().cloned());
        hosts.dedup();
        // Several nodes on one database serve one chain: the generated CA and server
        // certificate come from the store (--tls-cert overrides, as on one node).
        if config.tls_cert.is_none()
            && matches!(
                config.store_location()?,
                config::StoreLocation::Postgres { .. }
            )
        {
            shared_tls::share(&*store, &data_dir, &hosts).await?;
        }
        let ca = tls::LocalCa::load_or_create(&data_dir)?;
        let server_identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => tls::ServerIdentity::from_pem_files(cert, key)?,
            _ => tls::ServerIdentity::load_or_create(&data_dir, &ca, &hosts)?,
        };
        // One certificate for every TLS listener, replaced in place when its files change.
        let certificate = server_cert::ServerCertificate::new(&server_identity)?;
        let tls_config = |alpn: &[&[u8]]| {
            // Devices may present X.509 client certificates on both listeners.
            tls::server_config(certificate.clone(), alpn, true).map_err(|source| {
                tls::TlsError::Rustls {
                    cert: server_identity.cert_path().to_path_buf(),
                    source,
                }
            })
        };
        let https_tls = tls_config(&[b"http/1.1"])?;
        let mqtt_tls = tls_config(&[])?;

        // Bind everything before anything is announced.
        let bind_set = BindSet::from_config(&config).await?;
        let https_listeners = bind_set.bind(config.https_port, "HTTPS").await?;
        let mqtt_listeners = bind_set.bind(config.mqtt_port, "MQTT").await?;
        let amqp_listeners = bind_set.bind(config.amqp_port, "AMQP").await?;
        let admin_listener = match config.admin_addr()? {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };
        let max_connections = fit_connections_to_descriptors(
            config.max_connections,
            https_listeners.len() + mqtt_listeners.len() + amqp_listeners.len(),
        );
        let bound: Vec<SocketAddr> = https_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let mqtt_bound: Vec<SocketAddr> = mqtt_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let https_port = bound.first().map(|a| a.port()).unwrap_or(config.https_port);
        let mqtt_port = mqtt_bound
            .first()
            .map(|a| a.port())
            .unwrap_or(config.mqtt_port);
        let amqp_bound: Vec<SocketAddr> = amqp_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let amqp_port = amqp_bound
            .first()
            .map(|a| a.port())
            .unwrap_or(config.amqp_port);

        let endpoint = connection_info::host_with_port(&config.dps_host, https_port, 443);
        let hub_endpoint = connection_info::host_with_port(&hub_host, https_port, 443);

        // The built-in hub, linked like any other hub; its records stay under its first name.
        let hub_storage_name = bootstrap::built_in_hub_storage_name(&*store, &hub_endpoint).await?;
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
        )
        .with_storage_name(&hub_storage_name)
        // Several nodes on one database reach each other's devices and viewers.
        .with_bus(store.bus());
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
            certificates: None,
            hub_check: None,
        };

        let http = outbound_client(&ca)?;
        let mut engine_config = EngineConfig::new(identity.id_scope.clone());
        engine_config.region = config.region.clone();
        engine_config.webhook.timeout = std::time::Duration::from_millis(config.webhook_timeout_ms);
        engine_config.webhook.retries = config.webhook_retries;
        engine_config.node_id = match (&config.node_id, config.store_location()?) {
            (Some(id), _) => id.clone(),
            (None, config::StoreLocation::Sqlite(_)) => "local".into(),
            // Unique per start: a restarted node's old claims lapse and are taken up.
            (None, _) => format!("node-{}", muster_proto::runtime::random_hex(&*entropy, 8)),
        };
        engine_config.lease = std::time::Duration::from_millis(config.lease_ms);
        engine_config.sweep_interval = std::time::Duration::from_millis(config.sweep_interval_ms);
        // The built-in hub is written in process; other linked hubs over their REST API.
        let issuing = issuing_ca::load_all(&config, &data_dir, &ca, &*store, clock.now()).await?;
        let engine = Engine::new(store.clone(), clock.clone(), entropy, http, engine_config)
            .with_local_hub(
                &hub_endpoint,
                Arc::new(local_hub::LocalHub::new(hub.clone())),
            );
        let engine = issuing.into_iter().fold(engine, |engine, (name, ca)| {
            engine.with_named_issuing_ca(&name, Arc::new(ca))
        });
        let registrar: Arc<dyn DeviceRegistrar> = Arc::new(engine.clone());
        let events = RegistrationFeed::new(config.max_event_subscribers);
        let bus = store.bus();
        let reporting = |transport: &'static str| -> Arc<dyn DeviceRegistrar> {
            Arc::new(registration_events::ReportingRegistrar {
                inner: registrar.clone(),
                transport,
                feed: events.clone(),
                clock: clock.clone(),
                bus: bus.clone(),
            })
        };
        api.deprovisioner = Some(Arc::new(local_hub::EngineHubDevices(engine.clone())));
        api.certificates = Some(Arc::new(local_hub::EngineHubDevices(engine.clone())));
        api.hub_check = Some(Arc::new(linked_hub_check::RegistryRead::new(
            outbound_client(&ca)?,
            clock.clone(),
        )));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        if let Some(bus) = &bus {
            // Subscribed now, so nothing published from here on is missed.
            tasks.spawn(registration_events::relay(
                bus.subscribe(),
                events.clone(),
                shutdown_rx.clone(),
            ));
        }
        let mqtt_services = mqtt_dispatch::MqttServices {
            registrar: reporting("mqtt"),
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
        )
        .with_registration_events(events.clone());
        let amqp_services = amqp_dispatch::AmqpServices {
            registrar: reporting("amqp"),
            hub: hub.clone(),
            limits: muster_device_api::amqp::AmqpLimits {
                open_timeout: limits.mqtt_connect_timeout,
                auth_timeout: limits.mqtt_auth_timeout,
                idle_timeout: limits.mqtt_max_idle,
                ..Default::default()
            },
        };
        let open_listeners = health::OpenListeners::default();
        open_listeners.expect(bound.len() + mqtt_bound.len() + amqp_bound.len());
        let health = health::Health::new(store.clone(), open_listeners.clone());
        let app = app::https_app(
            api,
            reporting("https"),
            device_websocket::DeviceServices {
                mqtt: mqtt_services.clone(),
                amqp: amqp_services.clone(),
            },
            console,
            health.clone(),
            metrics_handle.clone(),
            events,
        );
        tasks.spawn(audit_retention::run(
            store.clone(),
            clock.clone(),
            config.audit_retention_days,
            shutdown_rx.clone(),
        ));
        let listener_limits = listener::ListenerLimits {
            max_connections,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            http_header_timeout: limits.http_header_timeout,
            http_idle_timeout: limits.http_idle_timeout,
            pre_auth: admission::PreAuthLimiter::new(limits.max_unauthenticated_per_address),
            open_listeners,
        };
        tasks.spawn(metrics::run_upkeep(
            metrics_handle.clone(),
            shutdown_rx.clone(),
        ));
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
        if let Some(l) = admin_listener {
            tasks.spawn(admin::serve(
                l,
                admin::admin_router(health, metrics_handle.clone()),
                shutdown_rx.clone(),
            ));
        }
        let reload_certificate = Arc::new(tokio::sync::Notify::new());
        tasks.spawn(server_cert::watch(
            server_cert::CertificateFiles::new(&server_identity, certificate),
            std::time::Duration::from_millis(config.tls_reload_interval_ms),
            reload_certificate.clone(),
            shutdown_rx.clone(),
        ));
        for l in amqp_listeners {
            tasks.spawn(listener::serve_amqp(
                l,
                mqtt_tls.clone(),
                amqp_services.clone(),
                listener_limits.clone(),
                shutdown_rx.clone(),
            ));
        }
        engine
            .resume_pending()
            .await
            .map_err(|f| ServerError::Engine(f.message))?;
        tasks.spawn(engine.clone().run_sweeps(shutdown_rx.clone()));

        // With --tls-cert clients trust the chain's issuer (a public CA: the system roots),
        // not the local CA.
        let user_certificate = config.tls_cert.as_ref().map(|path| {
            let (subject, issuer) = server_identity.leaf_names().unwrap_or_default();
            connection_info::TlsCertificateInfo {
                path: absolute(path.clone()),
                subject,
                issuer,
            }
        });
        let owner = identity.owner().cloned();
        let connection = ConnectionInfo {
            id_scope: identity.id_scope.to_string(),
            dps_host: config.dps_host.clone(),
            https_port,
            mqtt_port,
            amqp_port,
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
            ca_certificate: user_certificate
                .is_none()
                .then(|| absolute(ca.cert_path().to_path_buf())),
            tls_certificate: user_certificate,
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
        info!(https = ?bound, mqtt = ?mqtt_bound, amqp = ?amqp_bound, admin = ?admin_addr, console = %connection.console_url, "listening");
        Ok(Server {
            connection,
            https_addrs: bound,
            mqtt_addrs: mqtt_bound,
            bind_set,
            admin_addr,
            amqp_addrs: amqp_bound,
            shutdown,
            tasks,
            reload_certificate,
        })
    }

    /// Reads the TLS certificate and key files again now (what SIGHUP does) instead of at
    /// the next poll; new connections get them if they load.
    pub fn reload_certificate(&self) {
        self.reload_certificate.notify_one();
    }

    /// A handle that does [`Server::reload_certificate`] from elsewhere (a signal handler).
    pub fn certificate_reloader(&self) -> Arc<tokio::sync::Notify> {
        self.reload_certificate.clone()
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
