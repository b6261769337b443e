//! Deprovisioning with cascade: a registration record and its device in the hub, removed so
//! that a crash at any point leaves no hub device without a record.
//!
//! Intent before effect: the record's removal and one `HubRemovals` intent per hub device it
//! may have written (its assignment, and the target of an unfinished plan) are one store
//! transaction; the hub deletes follow, and each intent is removed once its hub confirmed.
//! After a crash, [`Engine::finish_hub_removals`] (run by every [`Engine::sweep`]) finishes
//! every intent left, once the lease of the node that wrote it lapsed. A device that registered again in between keeps its hub
//! identity: each intent names the hub device's etag as read before the record was removed,
//! and the hub delete is conditional on it (`If-Match`), so a device a newer registration
//! wrote meanwhile (a new etag) is left alone; an intent is also dropped without a hub call
//! when a record claims that device again.

use muster_proto::{ErrorCode, RegistrationId, Timestamp};
use muster_store::{Collection, Expect, Write, WriteOutcome};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{decode_record, hub_failure, Engine};
use crate::DeviceFailure;

/// A bulk deprovisioning after a hub was unlinked meets it once per device.
static UNLINKED_HUB_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// What a deprovisioning removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deprovisioned {
    pub registration_id: String,
    /// The hub the device was assigned to, if any.
    pub hub: Option<String>,
    pub device_id: Option<String>,
    /// Hub devices deleted (or already gone), as `{hub}/{device id}`.
    pub removed: Vec<String>,
}

/// The body of a `HubRemovals` intent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HubRemoval {
    hub: String,
    device_id: String,
    /// The record whose removal made this device an orphan-to-be.
    registration_id: String,
    since: Timestamp,
    /// The hub device's identity etag when the record was removed: only that device is
    /// deleted, not one a newer registration wrote since. Absent in intents written before
    /// the condition existed (deleted unconditionally unless a record claims the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device_etag: Option<String>,
}

impl HubRemoval {
    fn key(&self) -> String {
        format!("{}/{}", self.hub, self.device_id).to_ascii_lowercase()
    }
}

impl Engine {
    /// Deletes the registration record of `registration_id` and its device in whichever
    /// linked hub holds it (in process for the built-in hub). `etag`, when given, must be the
    /// record's current etag. Nothing is changed when the record is missing, the etag differs,
    /// or a hub the device may be in is not linked (so an operator can remove it another way).
    pub async fn deprovision(
        &self,
        registration_id: &str,
        etag: Option<&str>,
    ) -> Result<Deprovisioned, DeviceFailure> {
        let rid = RegistrationId::new(registration_id)
            .map_err(|e| DeviceFailure::new(ErrorCode::InvalidRegistrationId, e.to_string()))?;
        let key = rid.key();
        let not_found = || {
            DeviceFailure::new(
                ErrorCode::RegistrationNotFound,
                format!("registration '{rid}' not found"),
            )
        };
        let stored = self
            .0
            .store
            .get(Collection::Registrations, &key)
            .await?
            .ok_or_else(not_found)?;
        if etag.is_some_and(|e| e != "*" && e != stored.etag) {
            return Err(stale(&rid));
        }
        let record = decode_record(&stored)?;
        let now = self.0.clock.now();
        let mut removals: Vec<HubRemoval> = Vec::new();
        let assigned = record
            .state
            .assigned_hub
            .clone()
            .zip(record.state.device_id.clone());
        let planned = record
            .pending
            .as_ref()
            .map(|p| (p.hub.clone(), p.device_id.clone()));
        for (hub, device_id) in assigned.clone().into_iter().chain(planned) {
            let removal = HubRemoval {
                hub,
                device_id,
                registration_id: rid.to_string(),
                since: now,
                device_etag: None,
            };
            if !removals.iter().any(|r| r.key() == removal.key()) {
                removals.push(removal);
            }
        }
        // Every hub must be linked and reachable before anything changes. Each device's
        // etag is read now, before the record goes: a registration that writes the device
        // after this point changes it, and the conditional delete then spares the device.
        let linked = self.linked_hubs().await?;
        let mut absent = Vec::new();
        for r in &mut removals {
            let Some(hub) = linked.iter().find(|h| h.name.eq_ignore_ascii_case(&r.hub)) else {
                return Err(DeviceFailure::new(
                    ErrorCode::HubNotLinked,
                    format!(
                        "the device is in IoT hub '{}', which is not linked; nothing was deleted",
                        r.hub
                    ),
                ));
            };
            r.device_etag = self
                .connection(hub)
                .device_etag(&r.device_id)
                .await
                .map_err(hub_failure)?;
            if r.device_etag.is_none() {
                absent.push(format!("{}/{}", r.hub, r.device_id));
            }
        }
        // A device the hub does not have needs no removal: a later put of it belongs to
        // whichever registration writes it.
        removals.retain(|r| r.device_etag.is_some());
        let mut writes = vec![
            Write::delete(
                Collection::Registrations,
                key.clone(),
                Expect::Etag(stored.etag.clone()),
            ),
            Write::delete(Collection::PendingAssignments, key.clone(), Expect::Any),
        ];
        for r in &removals {
            // Claimed by this node, which finishes it below; another takes it over if this
            // one dies first.
            writes.push(
                Write::put(
                    Collection::HubRemovals,
                    r.key(),
                    Expect::Any,
                    serde_json::to_value(r)
                        .map_err(|e| DeviceFailure::internal("encoding a hub removal", e))?,
                )
                .with_lease(self.lease()),
            );
        }
        // A batch applies the writes whose expectation holds, so the intents are only
        // written together with the record's removal when the record is still the one read.
        let outcome = self.0.store.write(writes).await?;
        if outcome.first() != Some(&WriteOutcome::Deleted) {
            let undo = removals
                .iter()
                .map(|r| Write::delete(Collection::HubRemovals, r.key(), Expect::Any))
                .collect();
            self.0.store.write(undo).await?;
            return Err(stale(&rid));
        }
        let mut removed = absent;
        for r in removals {
            if self.finish_removal(&r).await? {
                removed.push(format!("{}/{}", r.hub, r.device_id));
            }
        }
        let (hub, device_id) = assigned.unzip();
        Ok(Deprovisioned {
            registration_id: rid.to_string(),
            hub,
            device_id,
            removed,
        })
    }

    /// Deletes the device of one intent from its hub, then the intent. The device stays when
    /// a record claims it again or its etag changed since the intent (a newer registration
    /// wrote it). A hub that is no longer linked ends the intent: nothing can reach it.
    /// Returns whether the device is gone.
    async fn finish_removal(&self, r: &HubRemoval) -> Result<bool, DeviceFailure> {
        let mut gone = false;
        if !self.claimed(r).await? {
            let linked = self.linked_hubs().await?;
            match linked.iter().find(|h| h.name.eq_ignore_ascii_case(&r.hub)) {
                Some(hub) => {
                    let hub = self.connection(hub);
                    gone = match &r.device_etag {
                        Some(etag) => hub.delete_device_if(&r.device_id, etag).await,
                        None => hub.delete_device(&r.device_id).await.map(|()| true),
                    }
                    .map_err(hub_failure)?;
                    if !gone {
                        info!(hub = %r.hub, device = %r.device_id,
                            "a deprovisioned device was registered again meanwhile; its hub identity stays");
                    }
                }
                None => {
                    if let Some(suppressed) = UNLINKED_HUB_LOG.admit() {
                        warn!(hub = %r.hub, device = %r.device_id, suppressed,
                            "a deprovisioned device's hub is no longer linked; its identity stays there");
                    }
                }
            }
        }
        self.0
            .store
            .write(vec![Write::delete(
                Collection::HubRemovals,
                r.key(),
                Expect::Any,
            )])
            .await?;
        Ok(gone)
    }

    /// Whether a registration record (assigned, or with a plan in flight) names this hub
    /// device again: the device registered after its deprovisioning.
    async fn claimed(&self, r: &HubRemoval) -> Result<bool, DeviceFailure> {
        let Ok(rid) = RegistrationId::new(&r.registration_id) else {
            return Ok(false);
        };
        let Some(stored) = self
            .0
            .store
            .get(Collection::Registrations, &rid.key())
            .await?
        else {
            return Ok(false);
        };
        let record = decode_record(&stored)?;
        let same = |hub: &str, device: &str| {
            hub.eq_ignore_ascii_case(&r.hub) && device.eq_ignore_ascii_case(&r.device_id)
        };
        let assigned = matches!(
            (&record.state.assigned_hub, &record.state.device_id),
            (Some(h), Some(d)) if same(h, d)
        );
        let planned = record
            .pending
            .as_ref()
            .is_some_and(|p| same(&p.hub, &p.device_id));
        Ok(assigned || planned)
    }

    /// Finishes the hub removals a crash interrupted that no live node holds (claimed for
    /// this node first, see `claims`); returns how many.
    pub async fn finish_hub_removals(&self) -> Result<usize, DeviceFailure> {
        let intents = self.claim_hub_removals().await?;
        let n = intents.len();
        for stored in intents {
            let removal: HubRemoval = serde_json::from_value(stored.body)
                .map_err(|e| DeviceFailure::internal("reading a hub removal", e))?;
            self.finish_removal(&removal).await?;
        }
        if n > 0 {
            info!(count = n, "finished interrupted hub removals");
        }
        Ok(n)
    }
}

fn stale(rid: &RegistrationId) -> DeviceFailure {
    DeviceFailure::new(
        ErrorCode::PreconditionFailed,
        format!("registration '{rid}' was changed meanwhile (etag mismatch); nothing was deleted"),
    )
}
