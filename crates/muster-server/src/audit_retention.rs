//! Prunes the audit log: at start and then every [`PRUNE_INTERVAL`], entries older than
//! `audit-retention-days` by the injected clock go (`muster_store::audit::prune_expired`).
//! The interval is real time (it only schedules); what is old is the clock's judgement.

use std::sync::Arc;
use std::time::Duration;

use muster_proto::runtime::Clock;
use muster_store::{audit, Store};
use tokio::sync::watch;

/// How often the log is pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Runs until `shutdown` turns true.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    retention_days: u32,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match audit::prune_expired(&*store, &*clock, retention_days).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, retention_days, "pruned the audit log"),
            Err(e) => tracing::warn!(error = %e, "could not prune the audit log; retrying later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}
