//! `/healthz` and `/readyz`: what load balancers and orchestrators poll, without auth, on the
//! HTTPS port and on the admin listener (`admin.rs`).
//!
//! - `/healthz`: the process answers (200 `{"status":"ok"}`); nothing else is checked.
//! - `/readyz`: 200 when the store accepts a write (a probe record in `Settings`) and every
//!   HTTPS and MQTT listener is accepting; otherwise 503 in the DPS error shape with
//!   `retry-after`, the code and message naming the first check that failed. A listener stops
//!   counting as soon as shutdown closes it, so a draining node turns unready.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use muster_proto::ErrorCode;
use muster_service_api::ApiError;
use muster_store::{Collection, Expect, Store, Write};
use serde_json::json;

/// Key of the record `/readyz` writes in [`Collection::Settings`]; it holds nothing but a
/// marker, so rewriting it from any node is harmless.
pub const PROBE_KEY: &str = "readiness-probe";

/// A write probe slower than this counts as failed (a locked database can stall writes).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Health {
    store: Arc<dyn Store>,
    listeners: OpenListeners,
}

impl Health {
    pub fn new(store: Arc<dyn Store>, listeners: OpenListeners) -> Self {
        Self { store, listeners }
    }

    /// `Ok` when ready; otherwise the first failed check as the error the edge renders.
    pub async fn readiness(&self) -> Result<(), ApiError> {
        let (open, expected) = self.listeners.counts();
        if open < expected {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "not ready: listeners: {open} of {expected} HTTPS and MQTT listeners are accepting"
                ),
            ));
        }
        let probe = Write::put(
            Collection::Settings,
            PROBE_KEY,
            Expect::Any,
            json!({ "probe": true }),
        );
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.write(vec![probe])).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ApiError::new(
                if e.is_unavailable() {
                    ErrorCode::StoreUnavailable
                } else {
                    ErrorCode::Unavailable
                },
                format!("not ready: store: the write probe failed: {e}"),
            )),
            Err(_) => Err(ApiError::new(
                ErrorCode::StoreUnavailable,
                format!(
                    "not ready: store: the write probe took longer than {} s",
                    PROBE_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

/// How many of the server's HTTPS and MQTT listeners are accepting, out of how many it bound.
#[derive(Debug, Clone, Default)]
pub struct OpenListeners {
    open: Arc<AtomicUsize>,
    expected: Arc<AtomicUsize>,
}

impl OpenListeners {
    /// Sets how many listeners a ready server has.
    pub fn expect(&self, listeners: usize) {
        self.expected.store(listeners, Ordering::SeqCst);
    }

    /// Counts one listener as accepting until the returned guard is dropped.
    pub fn opened(&self) -> ListenerOpen {
        self.open.fetch_add(1, Ordering::SeqCst);
        ListenerOpen {
            open: self.open.clone(),
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.open.load(Ordering::SeqCst),
            self.expected.load(Ordering::SeqCst),
        )
    }
}

/// One accepting listener; dropped when it stops accepting.
pub struct ListenerOpen {
    open: Arc<AtomicUsize>,
}

impl Drop for ListenerOpen {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `/healthz` and `/readyz`, with no auth.
pub fn routes(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(health): State<Health>) -> Response {
    match health.readiness().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unready_while_a_listener_is_not_accepting() {
        let dir = tempfile::tempdir().unwrap();
        let store = muster_store::SqliteStore::open(&dir.path().join("muster.db")).unwrap();
        let listeners = OpenListeners::default();
        listeners.expect(2);
        let health = Health::new(Arc::new(store), listeners.clone());
        let first = listeners.opened();
        let e = health.readiness().await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("listeners: 1 of 2"), "{}", e.message);
        let second = listeners.opened();
        health.readiness().await.unwrap();
        drop(first);
        assert!(health.readiness().await.is_err());
        drop(second);
    }
}
