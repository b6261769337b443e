//! Evenly weighted distribution: weighted rendezvous hashing keyed by the lower-cased
//! registration id. Each hub scores `-ln(u) / weight` with `u` uniform from
//! SHA-256(registration id, hub name); the lowest score wins. The same device lands on the same
//! hub while the candidates stay the same, shares follow the weights, and linking or unlinking
//! one hub moves only the devices that must move.

use muster_proto::linked_hub::LinkedHub;
use sha2::{Digest, Sha256};

pub fn choose<'a>(registration_key: &str, candidates: &'a [LinkedHub]) -> Option<&'a LinkedHub> {
    candidates
        .iter()
        .map(|h| (score(registration_key, h), h))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, h)| h)
}

fn score(registration_key: &str, hub: &LinkedHub) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(registration_key.as_bytes());
    hasher.update([0u8]);
    hasher.update(hub.name.to_ascii_lowercase().as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // u in (0, 1): never exactly 0, so ln is finite.
    let u = ((u64::from_be_bytes(first) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let weight = f64::from(hub.allocation_weight.max(1));
    -u.ln() / weight
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, weight: u32) -> LinkedHub {
        LinkedHub {
            name: name.into(),
            connection_string: String::new(),
            allocation_weight: weight,
            apply_allocation_policy: true,
            location: None,
            max_registrations_per_second: None,
            built_in: false,
        }
    }

    #[test]
    fn shares_follow_weights_and_choice_is_stable() {
        let hubs = [hub("a.hub", 1), hub("b.hub", 1), hub("c.hub", 2)];
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            let id = format!("device-{i}");
            let chosen = choose(&id, &hubs).unwrap();
            assert_eq!(choose(&id, &hubs).unwrap().name, chosen.name, "stable");
            let idx = hubs.iter().position(|h| h.name == chosen.name).unwrap();
            counts[idx] += 1;
        }
        let share = |i: usize| counts[i] as f64 / 10_000.0;
        assert!((share(0) - 0.25).abs() < 0.02, "{counts:?}");
        assert!((share(1) - 0.25).abs() < 0.02, "{counts:?}");
        assert!((share(2) - 0.50).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn removing_a_hub_moves_only_its_devices() {
        let three = [hub("a.hub", 1), hub("b.hub", 1), hub("c.hub", 1)];
        let two = [hub("a.hub", 1), hub("b.hub", 1)];
        for i in 0..2_000 {
            let id = format!("d{i}");
            let before = choose(&id, &three).unwrap();
            if before.name != "c.hub" {
                assert_eq!(choose(&id, &two).unwrap().name, before.name);
            }
        }
    }
}
