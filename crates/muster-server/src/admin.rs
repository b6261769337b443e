//! The optional plain-HTTP admin listener (`--admin-listen ADDR:PORT`, off by default): what
//! load balancers and monitoring poll without TLS or auth.
//!
//! It serves [`admin_router`] only: the health routes (`health.rs`) and Prometheus
//! `/metrics` (`metrics.rs`, unauthenticated here, behind a service SAS token on the HTTPS
//! port). Nothing on it needs a credential or reveals one, which is why it may skip TLS;
//! bind it to loopback or a management network all the same (the banner warns otherwise).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::health::{self, Health};
use crate::listener::DRAIN_TIMEOUT;

/// A request head must arrive within this, so an idle or slow client cannot hold a
/// connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the admin listener serves at once; pollers need a handful.
const MAX_CONNECTIONS: usize = 64;

/// Every route of the admin listener.
pub fn admin_router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new()
        .merge(health::routes(health))
        .merge(crate::metrics::router(metrics))
}

/// Binds the admin listener (a clear error when the address is taken or not local).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::ServerError::Bind {
            what: "admin".into(),
            addr,
            hint: "check --admin-listen (ADDR:PORT of this machine, the port free)".into(),
            source,
        })
}

/// Serves `router` over plain HTTP/1.1 until `shutdown`, then drains open connections.
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "admin listener: accept failed");
                // Out of descriptors: retrying at once would spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = shutdown.clone();
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin listener closed");
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("admin connections still open after the drain timeout; closing them");
        connections.abort_all();
    }
}
