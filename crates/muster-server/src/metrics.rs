//! Prometheus metrics: the recorder (installed once per process), the server's own metrics
//! (connections, TLS handshake failures, store writes) and `GET /metrics`.
//!
//! Libraries only call the `metrics` macros (`muster_registration::metrics`,
//! `muster_service_api::metrics`); this module installs the recorder they report to and
//! renders the text exposition. [`authenticated_router`] serves `/metrics` on the HTTPS port
//! behind a service SAS token (any policy); [`router`] serves it without authentication, for
//! a plain-HTTP admin listener that only operators can reach. Every metric is documented in
//! METRICS.md.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use muster_proto::runtime::Clock;
use muster_service_api::Authorizer;
use tokio::sync::watch;

pub const OPEN_CONNECTIONS: &str = "muster_open_connections";
pub const CONNECTIONS_TOTAL: &str = "muster_connections_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "muster_tls_handshake_failures_total";
pub const STORE_WRITE_SECONDS: &str = "muster_store_write_duration_seconds";

/// Histogram buckets (seconds) for every `_seconds` metric: from a cached in-process
/// registration (sub-millisecond) to a slow webhook or hub (tens of seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histogram storage is compacted when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder (once; later calls,
/// such as a second server in one test process, get the same handle) and registers every
/// metric's description.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            {
                Ok(b) => b,
                // Only an empty bucket list fails; ours is a constant.
                Err(e) => {
                    tracing::warn!(error = %e, "metric buckets refused; histograms become summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                // An embedding program installed its own: our metrics go there instead.
                tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    muster_registration::metrics::describe();
    muster_service_api::metrics::describe();
    metrics::describe_gauge!(
        OPEN_CONNECTIONS,
        "Open TCP connections per listener (https, mqtt), TLS handshake included"
    );
    metrics::describe_counter!(
        CONNECTIONS_TOTAL,
        "TCP connections accepted per listener (https, mqtt)"
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes that failed or timed out, by listener and reason"
    );
    metrics::describe_histogram!(
        STORE_WRITE_SECONDS,
        metrics::Unit::Seconds,
        "Time for a store write to be committed and synced (group commit included), by result"
    );
    metrics::describe_histogram!(
        muster_store::sqlite::COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "SQLite: one group commit on the writer thread (transaction and WAL fsync), by result"
    );
    metrics::describe_histogram!(
        muster_store::sqlite::CHECKPOINT_SECONDS,
        metrics::Unit::Seconds,
        "SQLite: one WAL checkpoint on the checkpointer thread, by mode (passive, truncate)"
    );
}

/// Compacts histogram storage every few seconds until `shutdown`.
pub async fn run_upkeep(handle: PrometheusHandle, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            () = tokio::time::sleep(UPKEEP_INTERVAL) => handle.run_upkeep(),
        }
    }
}

/// `GET /metrics` without authentication: for a listener only operators reach (the admin
/// listener).
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(render_open))
        .with_state(handle)
}

/// `GET /metrics` behind a service SAS token of any shared access policy (Prometheus sends
/// it as `authorization: SharedAccessSignature ...`); refusals in the DPS error shape.
pub fn authenticated_router(
    handle: PrometheusHandle,
    auth: Authorizer,
    clock: Arc<dyn Clock>,
) -> Router {
    Router::new()
        .route("/metrics", get(render_authenticated))
        .with_state(Authenticated {
            handle,
            auth,
            clock,
        })
}

#[derive(Clone)]
struct Authenticated {
    handle: PrometheusHandle,
    auth: Authorizer,
    clock: Arc<dyn Clock>,
}

async fn render_open(State(handle): State<PrometheusHandle>) -> Response {
    exposition(&handle)
}

async fn render_authenticated(State(s): State<Authenticated>, headers: HeaderMap) -> Response {
    let now = s.clock.now().unix_seconds();
    match s.auth.authenticate(&headers, now) {
        Ok(_) => exposition(&s.handle),
        Err(e) => e.into_response(),
    }
}

fn exposition(handle: &PrometheusHandle) -> Response {
    let mut response = handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Counts an open connection on a listener for as long as it lives.
pub(crate) struct OpenConnection {
    listener: &'static str,
}

impl OpenConnection {
    pub(crate) fn new(listener: &'static str) -> Self {
        metrics::counter!(CONNECTIONS_TOTAL, "listener" => listener).increment(1);
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => listener).increment(1.0);
        Self { listener }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS, "listener" => self.listener).decrement(1.0);
    }
}

/// A failed TLS handshake; `error` is `None` for a timeout.
pub(crate) fn tls_handshake_failed(listener: &'static str, error: Option<&std::io::Error>) {
    let reason = error.map_or("timeout", handshake_failure_reason);
    metrics::counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "listener" => listener,
        "reason" => reason,
    )
    .increment(1);
}

/// A fixed set of reasons, from rustls's error when there is one.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::Error as TlsError;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    {
        Some(TlsError::InvalidCertificate(_) | TlsError::NoCertificatesPresented) => {
            "bad_certificate"
        }
        Some(TlsError::PeerIncompatible(_)) => "incompatible",
        Some(TlsError::NoApplicationProtocol) => "no_application_protocol",
        Some(TlsError::AlertReceived(_)) => "alert_received",
        Some(
            TlsError::InvalidMessage(_)
            | TlsError::InappropriateMessage { .. }
            | TlsError::InappropriateHandshakeMessage { .. },
        ) => "invalid_message",
        Some(TlsError::PeerMisbehaved(_)) => "peer_misbehaved",
        Some(_) => "other",
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "closed",
            _ => "io",
        },
    }
}

/// One store write and how it ended.
pub(crate) fn store_write(result: &'static str, elapsed: Duration) {
    metrics::histogram!(STORE_WRITE_SECONDS, "result" => result).record(elapsed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_reasons_are_a_fixed_set() {
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoCipherSuitesInCommon
            ))),
            "incompatible"
        );
        assert_eq!(
            handshake_failure_reason(&tls(rustls::Error::NoCertificatesPresented)),
            "bad_certificate"
        );
        assert_eq!(
            handshake_failure_reason(&std::io::ErrorKind::UnexpectedEof.into()),
            "closed"
        );
    }
}
