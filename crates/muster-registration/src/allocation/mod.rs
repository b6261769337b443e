//! Choosing the hub (service-api.md §8.2): the candidate set, then one module per policy.
//!
//! - [`hashed`]: weighted rendezvous hashing on the registration id (evenly weighted, stable).
//! - [`static_hub`]: the single hub the enrollment names.
//! - [`geo_latency`]: hubs in the DPS node's own region first, then hashed.
//! - [`custom`]: the enrollment's webhook decides.

pub mod custom;
pub mod geo_latency;
pub mod hashed;
pub mod static_hub;

use muster_proto::linked_hub::LinkedHub;
use muster_proto::ErrorCode;

use crate::DeviceFailure;

/// The hubs a device may go to: the enrollment's `iotHubs` (or legacy `iotHubHostName`) when
/// set, else every linked hub; hubs with `applyAllocationPolicy: false` only when named.
pub fn candidates(
    enrollment_hubs: Option<&[String]>,
    legacy_host: Option<&str>,
    linked: &[LinkedHub],
) -> Result<Vec<LinkedHub>, DeviceFailure> {
    let named: Vec<String> = match (enrollment_hubs, legacy_host) {
        (Some(h), _) if !h.is_empty() => h.to_vec(),
        (_, Some(l)) if !l.trim().is_empty() => vec![l.to_string()],
        _ => Vec::new(),
    };
    if named.is_empty() {
        let all: Vec<LinkedHub> = linked
            .iter()
            .filter(|h| h.apply_allocation_policy)
            .cloned()
            .collect();
        if all.is_empty() {
            return Err(DeviceFailure::new(
                ErrorCode::NoHubAvailable,
                "no linked IoT hub takes part in allocation; link a hub first",
            ));
        }
        return Ok(all);
    }
    let mut out = Vec::new();
    for name in &named {
        match linked.iter().find(|h| h.name.eq_ignore_ascii_case(name)) {
            Some(h) => out.push(h.clone()),
            None => {
                return Err(DeviceFailure::new(
                    ErrorCode::HubNotLinked,
                    format!("the enrollment names IoT hub '{name}', which is not linked"),
                ))
            }
        }
    }
    Ok(out)
}
