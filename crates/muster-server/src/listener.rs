//! Listeners: accept TCP, complete TLS, then serve HTTP/1.1 with hyper ([`serve_https`]), a
//! device MQTT session ([`serve_mqtt`]) or a device AMQP connection ([`serve_amqp`]), and
//! drain gracefully on shutdown.
//!
//! No client can hold a connection for free:
//! - a semaphore bounds concurrent connections per listener (further ones wait in the
//!   kernel's accept queue), sized to the file descriptors (`descriptors.rs`);
//! - each source address may hold a few unauthenticated connections at most
//!   ([`PreAuthLimiter`]); more are closed at accept. An HTTPS connection counts until its
//!   first response is ready, so a slow body counts too;
//! - deadlines: the TLS handshake; on HTTPS the first request's headers
//!   ([`ListenerLimits::http_header_timeout`], from the end of TLS) and every later request's
//!   (hyper's header-read timeout, [`ListenerLimits::http_idle_timeout`], which runs from the
//!   previous response and so is the keep-alive idle limit too); on MQTT, CONNECT and
//!   authentication (`mqtt_dispatch.rs` and the sessions); on AMQP, the open up to the first
//!   link and authentication (`muster_device_api::amqp`);
//! - when `accept` fails (out of file descriptors, say) the loop backs off, from 100 ms up to
//!   1 s, instead of retrying at once, and logs one line per interval with a count.
//!
//! HTTPS serves HTTP/1.1 only: the TLS ALPN offers nothing else, and HTTP/2 by prior
//! knowledge would bring idle streams no header deadline covers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use muster_device_api::pre_auth::PreAuthHold;
use muster_device_api::websocket::ClientCertChain;
use muster_proto::log_limit::LogLimiter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::admission::{PreAuthGuard, PreAuthLimiter};
use crate::health::OpenListeners;
use crate::metrics;

/// How long open connections get to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// First wait after `accept` failed; doubled on each further failure up to
/// [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One "accept failed" line per interval, with a count: out of descriptors, every retry fails.
static ACCEPT_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per interval about connections closed for their address's pre-auth limit.
static ADDRESS_AT_LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// What every listener enforces (from `Config::connection_limits`, with `max_connections`
/// already fitted to the descriptors).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Concurrent connections per listener.
    pub max_connections: usize,
    pub tls_handshake_timeout: Duration,
    /// From the end of TLS to a new connection's first complete request head.
    pub http_header_timeout: Duration,
    /// From a response to the next complete request head on a kept-alive connection.
    pub http_idle_timeout: Duration,
    /// Unauthenticated connections per source address, shared by every listener.
    pub pre_auth: PreAuthLimiter,
    /// Counts the listeners accepting, for `/readyz`.
    pub open_listeners: OpenListeners,
}

/// Accepts TCP connections under the connection limit and the per-address limit, completes
/// TLS within the handshake timeout and runs `session` on each, until `shutdown` turns true;
/// then gives open sessions the drain timeout (they see `shutdown` too) before aborting them.
/// `kind` (`https`, `mqtt`, `amqp`) labels the listener's connection metrics.
async fn accept_tls<F, Fut>(
    kind: &'static str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: ListenerLimits,
    mut shutdown: watch::Receiver<bool>,
    session: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr, PreAuthGuard, watch::Receiver<bool>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut sessions = JoinSet::new();
    let local = listener.local_addr().ok();
    let accepting = limits.open_listeners.opened();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    'accept: loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break 'accept,
                r = listener.accept() => r,
            };
            match accepted {
                Ok(c) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    break c;
                }
                Err(e) => {
                    let wait = needs_backoff(&e).then_some(backoff);
                    if let Some(suppressed) = ACCEPT_FAILED.admit() {
                        let wait_ms = wait.map_or(0, |w| w.as_millis() as u64);
                        warn!(error = %e, suppressed, wait_ms, "accept failed");
                    }
                    let Some(wait) = wait else { continue };
                    // The connection stays queued, so an immediate retry fails the same way.
                    tokio::select! {
                        _ = shutdown.wait_for(|s| *s) => break 'accept,
                        () = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        };
        let Some(pre_auth) = limits.pre_auth.try_acquire(peer.ip()) else {
            debug!(%peer, "connection refused: its address holds its limit of unauthenticated connections");
            if let Some(suppressed) = ADDRESS_AT_LIMIT.admit() {
                warn!(
                    %peer,
                    suppressed,
                    "connection closed: its address holds its limit of unauthenticated connections"
                );
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let session = session.clone();
        let stop = shutdown.clone();
        let handshake_timeout = limits.tls_handshake_timeout;
        // Reap finished sessions so the set does not grow.
        while sessions.try_join_next().is_some() {}
        sessions.spawn(async move {
            let _permit = permit;
            let _open = metrics::OpenConnection::new(kind);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => session(stream, peer, pre_auth, stop).await,
                Ok(Err(e)) => {
                    metrics::tls_handshake_failed(kind, Some(&e));
                    debug!(%peer, error = %e, "connection refused: TLS handshake failed")
                }
                Err(_) => {
                    metrics::tls_handshake_failed(kind, None);
                    debug!(%peer, "connection refused: TLS handshake timed out")
                }
            }
        });
    }
    drop(listener);
    drop(accepting);
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

/// Whether an `accept` error leaves the listener unable to accept for a while (out of
/// descriptors or memory), rather than concerning one connection (`ECONNABORTED`).
fn needs_backoff(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        true
    }
}

/// Serves `app` over TLS (HTTP/1.1, upgrades allowed) until `shutdown`; open connections
/// finish their request and close.
///
/// The connection's [`PreAuthHold`] is let go when the first response is ready (its request,
/// body included, has been read), unless the WebSocket handler took it over from the first
/// request's extensions into the MQTT session, which lets go of it once the device
/// authenticated.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: ListenerLimits,
    shutdown: watch::Receiver<bool>,
) {
    let header_timeout = limits.http_header_timeout;
    let idle_timeout = limits.http_idle_timeout;
    accept_tls(
        "https",
        listener,
        tls,
        limits,
        shutdown,
        move |stream, peer, pre_auth, mut stop| {
            // The device's certificate chain rides along with each request (MQTT over
            // WebSocket reads it).
            let chain = ClientCertChain(peer_chain(&stream));
            let hold = PreAuthHold::new(pre_auth);
            let answered = hold.clone();
            let first_request = Arc::new(Notify::new());
            let seen = first_request.clone();
            let mut is_first = true;
            let service = TowerToHyperService::new(
                app.clone()
                    .map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        if !chain.0.is_empty() {
                            req.extensions_mut().insert(chain.clone());
                        }
                        if std::mem::take(&mut is_first) {
                            // For the WebSocket handler, which takes the slot over.
                            req.extensions_mut().insert(hold.clone());
                            seen.notify_one();
                        }
                        req
                    })
                    // The first request has been read and answered (a slow body held the
                    // slot until then): the connection no longer counts as unauthenticated.
                    .map_response(move |res| {
                        answered.release();
                        res
                    }),
            );
            async move {
                let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(idle_timeout);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::pin!(conn);
                // Resolves only when no request head arrived within the header timeout.
                let no_first_request = async {
                    if tokio::time::timeout(header_timeout, first_request.notified())
                        .await
                        .is_ok()
                    {
                        std::future::pending::<()>().await;
                    }
                };
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = no_first_request => {
                        debug!(%peer, "no request within the header timeout; closing");
                        return;
                    }
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
    limits: ListenerLimits,
    shutdown: watch::Receiver<bool>,
) {
    accept_tls(
        "mqtt",
        listener,
        tls,
        limits,
        shutdown,
        move |stream, _peer, pre_auth, _stop| {
            let services = services.clone();
            async move {
                let certs = peer_chain(&stream);
                crate::mqtt_dispatch::serve(stream, services, certs, PreAuthHold::new(pre_auth))
                    .await;
            }
        },
    )
    .await;
}

/// Serves device AMQP over TLS: each connection goes to registration or to the hub's device
/// endpoint, by its SASL identity or first link (`amqp_dispatch`).
pub async fn serve_amqp(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    services: crate::amqp_dispatch::AmqpServices,
    limits: ListenerLimits,
    shutdown: watch::Receiver<bool>,
) {
    accept_tls(
        "amqp",
        listener,
        tls,
        limits,
        shutdown,
        move |stream, _peer, pre_auth, _stop| {
            let services = services.clone();
            async move {
                let certs = peer_chain(&stream);
                crate::amqp_dispatch::serve(stream, services, certs, PreAuthHold::new(pre_auth))
                    .await;
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
