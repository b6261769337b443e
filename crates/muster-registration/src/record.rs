//! The registration record as stored: the `DeviceRegistrationState` the service API shows,
//! plus what the engine needs to answer polls and finish throttled assignments. The extra
//! fields are ignored by readers that decode only the state.

use muster_proto::{DeviceRegistrationState, InitialTwin, RegistrationSubstatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hub_client::TwinWrite;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationRecord {
    #[serde(flatten)]
    pub state: DeviceRegistrationState,
    /// The operation the device polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// Set when the device registered through a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// An accepted assignment still waiting for its hub (throttled); finished in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingAssignment>,
    /// The chain issued for the registration's CSR (base64 DER, leaf first), answered to the
    /// device's polls as `issuedCertificateChain`; public data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_certificate_chain: Option<Vec<String>>,
}

/// Where the device's hub credentials come from, so they are recomputed rather than stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "id")]
pub enum EnrollmentRef {
    Individual(String),
    Group(String),
}

/// What to do with the twin on the target hub.
///
/// The rule every variant follows: **a device absent from the target hub always gets the
/// enrollment's initial twin** (`twin`, the current enrollment's or the webhook's). Whether the
/// device was absent is learnt from the hub write itself (a create that reports
/// created-vs-existing, the twin written only on create: [`crate::hub_client::TwinWrite`]), so
/// the rule holds for every hub the same way. `twin` is absent only in plans stored before
/// the rule existed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "action")]
pub enum TwinPlan {
    /// Write the initial twin (first assignment, or reset).
    Initial { twin: Option<InitialTwin> },
    /// Copy tags and desired properties from the device on the previous hub; a device the
    /// previous hub no longer has gets the initial twin instead.
    Migrate {
        from_hub: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        twin: Option<InitialTwin>,
    },
    /// Leave the twin of a device the hub has as it is; a device the hub no longer has is
    /// created with the initial twin.
    Keep {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        twin: Option<InitialTwin>,
    },
}

impl TwinPlan {
    /// The enrollment's (or webhook's) initial twin, for a device the hub does not have.
    pub fn initial_twin(&self) -> Option<&InitialTwin> {
        match self {
            TwinPlan::Initial { twin }
            | TwinPlan::Migrate { twin, .. }
            | TwinPlan::Keep { twin } => twin.as_ref(),
        }
    }
}

/// Where the tags and desired properties on the target hub came from after the hub write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinOutcome {
    /// The enrollment's (or the webhook's) initial twin was written.
    Initial,
    /// Copied from the device on the previous hub.
    Migrated,
    /// The device existed and its twin was left as it was.
    Kept,
}

/// Everything needed to finish an assignment after a crash or a throttling delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingAssignment {
    pub enrollment: EnrollmentRef,
    pub hub: String,
    pub device_id: String,
    pub iot_edge: bool,
    pub twin: TwinPlan,
    /// The hub to remove the device from once it is on `hub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_from: Option<String>,
    /// The hub identity the device had before, when it differs from `device_id` (a group
    /// device that registers with its id spelt in another case, or an individual enrollment
    /// whose `deviceId` changed): removed from `remove_from` so no stale identity remains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_device_id: Option<String>,
    /// Whether this is an initial assignment (substatus decided by whether the hub knew the device).
    pub initial: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<RegistrationSubstatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// X.509 devices: the leaf's SHA-256 thumbprint, the hub identity's `selfSigned`
    /// thumbprint (the certificate itself is not kept, so it can't be recomputed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
    /// The target hub was found without the device before this plan's put: the initial twin
    /// is owed even when a retry finds the device. Recorded (intent before effect) for hubs
    /// whose device and twin are two writes (REST), so a failure or crash between them is
    /// finished with the twin rather than as a kept device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub creates_device: bool,
}

impl PendingAssignment {
    /// The hub identity to read the migrated twin from and to remove: the previous one.
    pub fn old_device_id(&self) -> &str {
        self.previous_device_id
            .as_deref()
            .unwrap_or(&self.device_id)
    }

    /// How the enrollment's initial twin is written when nothing is migrated: replaced on a
    /// reset and when a migration found nothing to copy; otherwise (a first assignment, a
    /// device kept on its hub) only if the hub write creates the device.
    pub fn initial_twin_write<'a>(&self, tags: &'a Value, desired: &'a Value) -> TwinWrite<'a> {
        if self.creates_device || !self.twin_depends_on_creation() {
            TwinWrite::Replace { tags, desired }
        } else {
            TwinWrite::ReplaceIfCreated { tags, desired }
        }
    }

    /// Whether the twin is written only if the hub creates the device (a first assignment, a
    /// device kept on its hub); otherwise it is always replaced.
    pub fn twin_depends_on_creation(&self) -> bool {
        match self.twin {
            TwinPlan::Initial { .. } => self.initial,
            TwinPlan::Migrate { .. } => false,
            TwinPlan::Keep { .. } => true,
        }
    }

    /// The substatus of the finished assignment, given whether the device `existed` on the
    /// target hub before the write and where its twin came from.
    ///
    /// A first assignment says whether the hub knew the device. On a reprovisioning (DPS
    /// knew the device), a twin copied from the previous hub is `deviceDataMigrated`, and a
    /// device whose twin was set from the enrollment's initial twin because it was created
    /// anew or moved is `deviceDataReset` — Azure's values: `initialAssignment` and
    /// `reprovisionedToInitialAssignment` are for registrations DPS had no record of (C#
    /// SDK PR 2397). A device left where it was with its twin keeps the previous substatus.
    pub fn substatus(&self, existed: bool, twin: TwinOutcome) -> Option<RegistrationSubstatus> {
        if self.initial {
            return Some(if existed {
                RegistrationSubstatus::ReprovisionedToInitialAssignment
            } else {
                RegistrationSubstatus::InitialAssignment
            });
        }
        match twin {
            TwinOutcome::Migrated => Some(RegistrationSubstatus::DeviceDataMigrated),
            TwinOutcome::Initial if !existed || self.remove_from.is_some() => {
                Some(RegistrationSubstatus::DeviceDataReset)
            }
            TwinOutcome::Initial | TwinOutcome::Kept => self.substatus,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use RegistrationSubstatus::*;

    fn plan(
        initial: bool,
        remove_from: Option<&str>,
        substatus: Option<RegistrationSubstatus>,
    ) -> PendingAssignment {
        PendingAssignment {
            enrollment: EnrollmentRef::Group("g".into()),
            hub: "hub-a".into(),
            device_id: "dev".into(),
            iot_edge: false,
            twin: TwinPlan::Keep { twin: None },
            remove_from: remove_from.map(str::to_string),
            previous_device_id: None,
            initial,
            substatus,
            payload: None,
            thumbprint: None,
            creates_device: false,
        }
    }

    #[test]
    fn substatus_says_what_the_hub_write_did() {
        // First assignment: whether the hub knew the device.
        let first = plan(true, None, None);
        assert_eq!(
            first.substatus(false, TwinOutcome::Initial),
            Some(InitialAssignment)
        );
        assert_eq!(
            first.substatus(true, TwinOutcome::Kept),
            Some(ReprovisionedToInitialAssignment)
        );
        // Same hub, device still there: the previous substatus stays.
        let same = plan(false, None, Some(InitialAssignment));
        assert_eq!(
            same.substatus(true, TwinOutcome::Kept),
            Some(InitialAssignment)
        );
        assert_eq!(
            same.substatus(true, TwinOutcome::Initial),
            Some(InitialAssignment)
        );
        // Same hub, device gone: created anew with the initial twin.
        assert_eq!(
            same.substatus(false, TwinOutcome::Initial),
            Some(DeviceDataReset)
        );
        // A move: migrated, or reset (also when there was nothing to migrate).
        let moved = plan(false, Some("hub-b"), Some(DeviceDataMigrated));
        assert_eq!(
            moved.substatus(false, TwinOutcome::Migrated),
            Some(DeviceDataMigrated)
        );
        assert_eq!(
            moved.substatus(false, TwinOutcome::Initial),
            Some(DeviceDataReset)
        );
        assert_eq!(
            moved.substatus(true, TwinOutcome::Initial),
            Some(DeviceDataReset)
        );
    }

    #[test]
    fn a_device_the_hub_creates_always_gets_the_initial_twin() {
        let (tags, desired) = (json!({"gen": 2}), json!({}));
        let written = |p: &PendingAssignment, existed: bool| {
            p.initial_twin_write(&tags, &desired)
                .parts(existed)
                .is_some()
        };
        let mut p = plan(false, None, Some(InitialAssignment));
        for twin in [
            TwinPlan::Keep { twin: None },
            TwinPlan::Initial { twin: None },
            TwinPlan::Migrate {
                from_hub: "hub-b".into(),
                twin: None,
            },
        ] {
            p.twin = twin;
            assert!(written(&p, false), "{:?}: created", p.twin);
        }
        // An existing device: kept only where the plan keeps it.
        p.twin = TwinPlan::Keep { twin: None };
        assert!(!written(&p, true));
        p.twin = TwinPlan::Initial { twin: None };
        assert!(written(&p, true), "a reset replaces");
        p.initial = true;
        assert!(
            !written(&p, true),
            "a first assignment keeps a known device's twin"
        );
    }

    #[test]
    fn plans_stored_before_the_twin_rule_still_decode() {
        let old = json!({"enrollment": {"kind": "group", "id": "g"}, "hub": "h", "deviceId": "d",
            "iotEdge": false, "twin": {"action": "keep"}, "initial": false});
        let p: PendingAssignment = serde_json::from_value(old).expect("old keep plan");
        assert_eq!(p.twin, TwinPlan::Keep { twin: None });
        assert_eq!(p.previous_device_id, None);
        assert_eq!(p.old_device_id(), "d");
        let migrate = json!({"action": "migrate", "from_hub": "a"});
        let t: TwinPlan = serde_json::from_value(migrate).expect("old migrate plan");
        assert_eq!(
            t,
            TwinPlan::Migrate {
                from_hub: "a".into(),
                twin: None
            }
        );
        // And a new plan round-trips with its initial twin.
        let twin: InitialTwin = serde_json::from_value(json!({"tags": {"a": 1}})).expect("twin");
        let keep = TwinPlan::Keep {
            twin: Some(twin.clone()),
        };
        let back: TwinPlan =
            serde_json::from_value(serde_json::to_value(&keep).expect("encode")).expect("decode");
        assert_eq!(back.initial_twin(), Some(&twin));
    }
}
