//! Work that outlives a request, shared by the nodes of one store: which node finishes each
//! pending assignment and hub removal, and who takes it over when that node dies.
//!
//! A node writes a plan's `PendingAssignments` marker claimed by itself (a lease of
//! [`EngineConfig::lease`](super::EngineConfig::lease), `Write::with_lease`) and keeps the
//! key in its held set while it works on it. Every
//! [`sweep_interval`](super::EngineConfig::sweep_interval) [`Engine::sweep`] renews the
//! leases of the held keys (dropping those another node took over), claims markers nobody
//! holds (a dead node's, once its lease lapsed; this node's own after a restart) and queues
//! them for their hub's worker, and claims and finishes `HubRemovals` intents the same way.
//! Times come from the engine's [`Clock`](muster_proto::runtime::Clock), so every node must
//! keep its clock in step (NTP); a node whose clock runs ahead takes work over early, which
//! the conditional completion (`Engine::complete`) makes harmless.

use std::sync::atomic::Ordering;

use muster_store::{Collection, Lease};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Engine, MarkerBody, PendingMarker, PENDING_MARKERS_SETTING};
use crate::DeviceFailure;

/// Most intents of each kind one sweep claims; the next sweep takes more.
const SWEEP_BATCH: usize = 1000;

/// A failing sweep (the store unreachable) would otherwise log every interval.
static SWEEP_FAILED_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));

impl Engine {
    /// Now, in Unix milliseconds of the engine's clock.
    pub(super) fn now_ms(&self) -> i64 {
        self.0.clock.now().0.timestamp_millis()
    }

    /// A lease for this node from now.
    pub(super) fn lease(&self) -> Lease {
        Lease {
            owner: self.0.config.node_id.clone(),
            until_ms: self.lease_end(self.now_ms()),
        }
    }

    fn lease_end(&self, now_ms: i64) -> i64 {
        let lease = i64::try_from(self.0.config.lease.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(lease)
    }

    /// Remembers that this node works on `key` (its lease is renewed by each sweep); returns
    /// whether it was new.
    pub(super) fn hold(&self, key: &str) -> bool {
        self.0
            .held
            .lock()
            .map(|mut h| h.insert(key.to_owned()))
            .unwrap_or(false)
    }

    pub(super) fn unhold(&self, key: &str) {
        if let Ok(mut held) = self.0.held.lock() {
            held.remove(key);
        }
    }

    pub(super) fn holds(&self, key: &str) -> bool {
        self.0.held.lock().map(|h| h.contains(key)).unwrap_or(false)
    }

    /// One round of the shared-work protocol (see the module docs): renews this node's
    /// leases, finishes hub removals nobody holds, and queues the pending assignments
    /// nobody holds, oldest first. Returns how many assignments it queued.
    pub async fn sweep(&self) -> Result<usize, DeviceFailure> {
        self.renew_held().await?;
        self.finish_hub_removals().await?;
        if !self.0.legacy_checked.load(Ordering::Acquire) {
            if self
                .0
                .store
                .get(Collection::Settings, PENDING_MARKERS_SETTING)
                .await?
                .is_none()
            {
                self.mark_legacy_pending().await?;
            }
            self.0.legacy_checked.store(true, Ordering::Release);
        }
        let now = self.now_ms();
        let claimed = self
            .0
            .store
            .claim(
                Collection::PendingAssignments,
                &self.0.config.node_id,
                now,
                self.lease_end(now),
                SWEEP_BATCH,
            )
            .await?;
        let mut new = Vec::new();
        for r in claimed {
            let marker: MarkerBody = serde_json::from_value(r.body)
                .map_err(|e| DeviceFailure::internal("reading a pending assignment", e))?;
            if self.hold(&r.key) {
                new.push(PendingMarker {
                    key: r.key,
                    hub: marker.hub,
                    since: marker.since,
                });
            }
        }
        new.sort_by_key(|p| p.since);
        let n = new.len();
        for p in new {
            self.enqueue(p.hub, p.key);
        }
        if n > 0 {
            info!(count = n, node = %self.0.config.node_id, "took up pending assignments");
        }
        Ok(n)
    }

    /// Extends the leases of the assignments this node works on; those another node took
    /// over meanwhile (this node stalled past its lease) are dropped, and their queued runs
    /// skip them.
    async fn renew_held(&self) -> Result<(), DeviceFailure> {
        let held: Vec<String> = match self.0.held.lock() {
            Ok(h) => h.iter().cloned().collect(),
            Err(_) => return Ok(()),
        };
        if held.is_empty() {
            return Ok(());
        }
        let until = self.lease_end(self.now_ms());
        let kept = self
            .0
            .store
            .renew(
                Collection::PendingAssignments,
                &self.0.config.node_id,
                &held,
                until,
            )
            .await?;
        if kept.len() < held.len() {
            let kept: std::collections::HashSet<&String> = kept.iter().collect();
            if let Ok(mut h) = self.0.held.lock() {
                // Only what was asked about: keys held since then stay.
                for key in held.iter().filter(|k| !kept.contains(k)) {
                    h.remove(key);
                }
            }
        }
        Ok(())
    }

    /// Claims the hub removals nobody holds, up to one batch.
    pub(super) async fn claim_hub_removals(
        &self,
    ) -> Result<Vec<muster_store::Record>, DeviceFailure> {
        let now = self.now_ms();
        Ok(self
            .0
            .store
            .claim(
                Collection::HubRemovals,
                &self.0.config.node_id,
                now,
                self.lease_end(now),
                SWEEP_BATCH,
            )
            .await?)
    }

    /// Sweeps every `sweep_interval` until `shutdown` says so; a failed sweep is logged and
    /// retried at the next interval.
    pub async fn run_sweeps(self, mut shutdown: watch::Receiver<bool>) {
        let interval = self
            .0
            .config
            .sweep_interval
            .max(std::time::Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            if let Err(f) = self.sweep().await {
                if let Some(suppressed) = SWEEP_FAILED_LOG.admit() {
                    warn!(error = %f.message, suppressed, "sweeping shared work failed; retrying");
                }
            }
        }
    }
}
