//! The built-in hub's name follows the server's address (`--hub-host`, else `--dps-host`,
//! with the HTTPS port when it is not 443). When a start finds it linked under another name
//! (a new host name, another port, a backup restored on another machine), every stored
//! reference to the old name is rewritten to the new one **in one transaction**: the linked
//! hub entry (keeping its weight, allocation flag, location and rate limit), enrollments' and
//! groups' `iotHubs` and `iotHubHostName`, registration records' `assignedHub` and the hub
//! of any assignment still pending, and the intents to remove a hub device. The hub's own
//! records (devices, twins, messages) stay where they are: they are stored under the name
//! the hub first had (`bootstrap::built_in_hub_storage_name`), not its current address. So a device re-registers to the same hub identity under the new name; its next
//! connection must use the new name its registration returns (as after any hub move).
//!
//! Only fields that name a hub are touched, matched whole and without regard to case, so an
//! initial twin or a webhook payload that happens to contain the old name is left alone.

use muster_proto::linked_hub::LinkedHub;
use muster_store::{Collection, Expect, Record, Store, StoreError, Write};
use serde_json::Value;

/// Stored fields whose string value (or array of strings) names a hub.
const HUB_FIELDS: [&str; 6] = [
    "iotHubs",
    "iotHubHostName",
    "assignedHub",
    "hub",
    "removeFrom",
    "from_hub",
];

/// Stored fields holding user data, never rewritten.
const OPAQUE_FIELDS: [&str; 4] = [
    "initialTwin",
    "payload",
    "customAllocationDefinition",
    "attestation",
];

/// Collections whose records may name a hub, keyed independently of it.
const REFERENCING: [Collection; 4] = [
    Collection::Enrollments,
    Collection::EnrollmentGroups,
    Collection::Registrations,
    Collection::PendingAssignments,
];

/// Rewrites every reference to `old` (the stored linked hub `old_record`) to `new_name`, in
/// one store transaction.
pub async fn rename_built_in_hub(
    store: &dyn Store,
    old_record: Record,
    old: &LinkedHub,
    new_name: &str,
) -> Result<(), StoreError> {
    let backend = |e: serde_json::Error| StoreError::Backend(e.to_string());
    // Unconditional writes: a refused expectation skips only its own write, and the rename
    // must be whole. It runs at start, before any listener is open.
    let mut writes = vec![Write::delete(
        Collection::LinkedHubs,
        old_record.key,
        Expect::Any,
    )];
    let renamed = LinkedHub {
        name: new_name.to_string(),
        ..old.clone()
    };
    // An entry under the new name (from an earlier run on that address) is replaced.
    writes.push(Write::put(
        Collection::LinkedHubs,
        LinkedHub::key(new_name),
        Expect::Any,
        serde_json::to_value(&renamed).map_err(backend)?,
    ));

    let mut rewritten = 0usize;
    for collection in REFERENCING {
        for r in muster_store::records::list_all(store, collection, 1000).await? {
            let mut body = r.body;
            if rename_in(&mut body, &old.name, new_name) {
                rewritten += 1;
                writes.push(
                    Write::put(collection, r.key, Expect::Any, body).with_partition(r.partition),
                );
            }
        }
    }
    // Hub removal intents are keyed `{hub}/{device id}` (lower case).
    for r in muster_store::records::list_all(store, Collection::HubRemovals, 1000).await? {
        let mut body = r.body;
        if rename_in(&mut body, &old.name, new_name) {
            let device = body
                .get("deviceId")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let key = format!("{new_name}/{device}").to_ascii_lowercase();
            rewritten += 1;
            writes.push(Write::delete(Collection::HubRemovals, r.key, Expect::Any));
            writes.push(Write::put(Collection::HubRemovals, key, Expect::Any, body));
        }
    }
    store.write(writes).await?;
    tracing::warn!(
        old = %old.name,
        new = %new_name,
        records = rewritten,
        "the built-in hub's address changed; its linked hub entry and every record naming it \
         now use the new name"
    );
    Ok(())
}

/// Replaces `old` by `new` in the hub-naming fields of `value`; true if anything changed.
fn rename_in(value: &mut Value, old: &str, new: &str) -> bool {
    let mut changed = false;
    match value {
        Value::Object(map) => {
            for (field, v) in map.iter_mut() {
                if OPAQUE_FIELDS.contains(&field.as_str()) {
                    continue;
                }
                if HUB_FIELDS.contains(&field.as_str()) {
                    changed |= rename_names(v, old, new);
                } else {
                    changed |= rename_in(v, old, new);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                changed |= rename_in(v, old, new);
            }
        }
        _ => {}
    }
    changed
}

/// A hub name, or an array of them.
fn rename_names(value: &mut Value, old: &str, new: &str) -> bool {
    match value {
        Value::String(s) if s.eq_ignore_ascii_case(old) => {
            *s = new.to_string();
            true
        }
        Value::Array(items) => {
            let mut changed = false;
            for v in items {
                changed |= rename_names(v, old, new);
            }
            changed
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_hub_fields_are_renamed() {
        let mut group = json!({
            "enrollmentGroupId": "g",
            "iotHubs": ["OLD:8443", "azure.example"],
            "iotHubHostName": "old:8443",
            "initialTwin": {"tags": {"hub": "old:8443"}},
            "registrationState": {"assignedHub": "old:8443"},
        });
        assert!(rename_in(&mut group, "old:8443", "new"));
        assert_eq!(group["iotHubs"], json!(["new", "azure.example"]));
        assert_eq!(group["iotHubHostName"], "new");
        assert_eq!(group["registrationState"]["assignedHub"], "new");
        assert_eq!(group["initialTwin"]["tags"]["hub"], "old:8443");

        let mut record = json!({
            "assignedHub": "other",
            "pending": {"hub": "old:8443", "removeFrom": "other",
                        "twin": {"action": "migrate", "from_hub": "old:8443"}},
        });
        assert!(rename_in(&mut record, "old:8443", "new"));
        assert_eq!(record["assignedHub"], "other");
        assert_eq!(record["pending"]["hub"], "new");
        assert_eq!(record["pending"]["removeFrom"], "other");
        assert_eq!(record["pending"]["twin"]["from_hub"], "new");
        assert!(!rename_in(&mut record, "old:8443", "new"));
    }
}
