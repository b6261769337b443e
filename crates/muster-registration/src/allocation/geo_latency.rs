//! Lowest latency. A self-hosted Muster has no latency map of the world, so it gives the
//! policy this meaning: each DPS node has a region (`region` in its config) and each linked hub
//! a `location`; hubs in the node's region are preferred, and among them (or among all, when
//! none matches) the choice is hashed by weight, so it stays stable per device.

use muster_proto::linked_hub::LinkedHub;

use super::hashed;

pub fn choose<'a>(
    registration_key: &str,
    node_region: Option<&str>,
    candidates: &'a [LinkedHub],
) -> Option<&'a LinkedHub> {
    if let Some(region) = node_region {
        let local: Vec<LinkedHub> = candidates
            .iter()
            .filter(|h| {
                h.location
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(region))
            })
            .cloned()
            .collect();
        if let Some(h) = hashed::choose(registration_key, &local) {
            return candidates.iter().find(|c| c.name == h.name);
        }
    }
    hashed::choose(registration_key, candidates)
}
