//! HTTPS listeners: accept TCP, complete TLS, serve HTTP/1.1 with hyper, and drain
//! gracefully on shutdown.
//!
//! A semaphore bounds concurrent connections (further ones wait in the kernel's accept queue)
//! and a handshake timeout stops idle sockets from holding a slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long open connections get to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds every address, failing with a message that says what to do.
pub async fn bind(
    addrs: &[SocketAddr],
    what: &str,
) -> Result<Vec<TcpListener>, crate::ServerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                return Err(crate::ServerError::Bind {
                    what: what.to_string(),
                    addr: *addr,
                    hint: bind_hint(addr, &e),
                    source: e,
                })
            }
        }
    }
    Ok(listeners)
}

fn bind_hint(addr: &SocketAddr, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: run as root, grant the capability \
             (setcap cap_net_bind_service=+ep $(which muster)), or choose another port, e.g. --https-port 8443 \
             (port {} was requested)",
            addr.port()
        ),
        std::io::ErrorKind::AddrInUse => format!(
            "another process already listens on {addr}: stop it or choose another port"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine: check --dps-host",
            addr.ip()
        ),
        _ => "check the address and port".into(),
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then drains.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and similar: log and keep serving.
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if let Some(addr) = local {
        info!(%addr, "HTTPS listener closed; draining connections");
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the drain timeout; closing them");
    }
}

/// Serves MQTT over TLS on `listener`: each connection goes to the device MQTT transport.
/// On shutdown, accepting stops and open sessions get the drain timeout to end.
pub async fn serve_mqtt(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    registrar: Arc<dyn muster_registration::DeviceRegistrar>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let registrar = registrar.clone();
        // Reap finished sessions so the set does not grow.
        while sessions.try_join_next().is_some() {}
        sessions.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let certs: Vec<Vec<u8>> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
                .unwrap_or_default();
            muster_device_api::mqtt::serve_connection(
                tls,
                registrar,
                certs,
                muster_device_api::mqtt::MqttLimits::default(),
            )
            .await;
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.abort_all();
    }
}
