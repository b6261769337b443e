//! Listeners: accept TCP, complete TLS, then serve HTTP/1.1 with hyper ([`serve_https`]) or a
//! device MQTT session ([`serve_mqtt`]), and drain gracefully on shutdown.
//!
//! A semaphore bounds concurrent connections (further ones wait in the kernel's accept queue)
//! and a handshake timeout stops idle sockets from holding a slot.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use muster_device_api::websocket::ClientCertChain;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
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

/// Accepts TCP connections under the connection limit, completes TLS within the handshake
/// timeout and runs `session` on each, until `shutdown` turns true; then gives open sessions
/// the drain timeout (they see `shutdown` too) before aborting them.
async fn accept_tls<F, Fut>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
    session: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut sessions = JoinSet::new();
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
        let session = session.clone();
        let stop = shutdown.clone();
        // Reap finished sessions so the set does not grow.
        while sessions.try_join_next().is_some() {}
        sessions.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => session(stream, peer, stop).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    if let Some(addr) = local {
        info!(%addr, "listener closed; draining connections");
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections still open after the drain timeout; closing them");
        sessions.abort_all();
    }
}

/// Serves `app` over TLS (HTTP/1.1, upgrades allowed) until `shutdown`; open connections
/// finish their request and close.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
) {
    accept_tls(
        listener,
        tls,
        max_connections,
        shutdown,
        move |stream, peer, mut stop| {
            // The device's certificate chain rides along with each request (MQTT over
            // WebSocket reads it).
            let chain = ClientCertChain(peer_chain(&stream));
            let service = TowerToHyperService::new(app.clone().map_request(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if !chain.0.is_empty() {
                        req.extensions_mut().insert(chain.clone());
                    }
                    req
                },
            ));
            async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    // The guard `wait_for` returns must not live across an await.
                    _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
            }
        },
    )
    .await;
}

/// Serves device MQTT over TLS: each connection goes to registration or to the hub's device
/// endpoint, by its CONNECT (`mqtt_dispatch`).
pub async fn serve_mqtt(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    services: crate::mqtt_dispatch::MqttServices,
    max_connections: usize,
    shutdown: watch::Receiver<bool>,
) {
    accept_tls(
        listener,
        tls,
        max_connections,
        shutdown,
        move |stream, _peer, _stop| {
            let services = services.clone();
            async move {
                let certs: Vec<Vec<u8>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
                    .unwrap_or_default();
                crate::mqtt_dispatch::serve(stream, services, certs).await;
            }
        },
    )
    .await;
}

/// The client certificate chain of a TLS connection, leaf first (empty when none was sent).
fn peer_chain(stream: &TlsStream<TcpStream>) -> Vec<Vec<u8>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
        .unwrap_or_default()
}
