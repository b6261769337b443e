//! Property tests for allocation (`muster_registration::allocation`): hashed choice is stable
//! per device while the hub list is unchanged, follows the weights, and never leaves the
//! candidates; the candidate set never holds a hub the enrollment leaves out; static and
//! geo_latency choose only candidates. Cases are limited so the suite stays in seconds.

use std::collections::BTreeSet;

use muster_proto::linked_hub::LinkedHub;
use muster_registration::allocation::{candidates, geo_latency, hashed, static_hub};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn hub(name: String, weight: u32, apply: bool, location: Option<String>) -> LinkedHub {
    LinkedHub {
        name,
        connection_string: String::new(),
        allocation_weight: weight,
        apply_allocation_policy: apply,
        location,
        max_registrations_per_second: None,
        built_in: false,
    }
}

/// 1 to 6 linked hubs with distinct names, weights 0 to 10 (0 counts as 1), some taking no
/// part in allocation, some in a region.
fn linked_hubs() -> impl Strategy<Value = Vec<LinkedHub>> {
    prop::collection::btree_set("[a-z]{1,8}", 1..7).prop_flat_map(|names| {
        let n = names.len();
        (
            Just(names),
            prop::collection::vec(0u32..=10, n),
            prop::collection::vec(prop::bool::weighted(0.8), n),
            prop::collection::vec(prop::option::of(prop_oneof!["westus", "eastus"]), n),
        )
            .prop_map(|(names, weights, applies, locations)| {
                names
                    .into_iter()
                    .zip(weights)
                    .zip(applies)
                    .zip(locations)
                    .map(|(((name, w), a), l)| hub(format!("{name}.hub.test"), w, a, l))
                    .collect()
            })
    })
}

fn registration_id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9.:_-]{0,30}"
}

proptest! {
    #![proptest_config(config(64))]

    /// Hashed: the same device gets the same hub every time, also with the list reordered;
    /// the hub is one of the candidates.
    #[test]
    fn hashed_is_stable_and_among_candidates(hubs in linked_hubs(), ids in prop::collection::vec(registration_id(), 1..20)) {
        let mut reversed = hubs.clone();
        reversed.reverse();
        for id in &ids {
            let chosen = hashed::choose(id, &hubs).expect("a non-empty list has a choice");
            prop_assert!(hubs.iter().any(|h| h == chosen));
            prop_assert_eq!(&hashed::choose(id, &hubs).unwrap().name, &chosen.name);
            prop_assert_eq!(&hashed::choose(id, &reversed).unwrap().name, &chosen.name);
        }
        prop_assert!(hashed::choose("any", &[]).is_none());
    }

    /// Removing a hub moves only the devices that were on it.
    #[test]
    fn hashed_removal_moves_only_that_hubs_devices(hubs in linked_hubs(), ids in prop::collection::vec(registration_id(), 1..30), drop in any::<prop::sample::Index>()) {
        prop_assume!(hubs.len() > 1);
        let gone = drop.index(hubs.len());
        let rest: Vec<LinkedHub> = hubs.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, h)| h.clone()).collect();
        for id in &ids {
            let before = hashed::choose(id, &hubs).unwrap();
            if before.name != hubs[gone].name {
                prop_assert_eq!(&hashed::choose(id, &rest).unwrap().name, &before.name);
            }
        }
    }

    /// Candidates: when the enrollment names hubs, exactly those (all linked); otherwise every
    /// linked hub that takes part in allocation. Whatever a policy picks is among them.
    #[test]
    fn policies_pick_only_candidates(
        hubs in linked_hubs(),
        named in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        id in registration_id(),
        region in prop::option::of(prop_oneof!["westus", "EastUS", "north"]),
    ) {
        let names: Vec<String> = named.iter().map(|i| hubs[i.index(hubs.len())].name.to_uppercase()).collect();
        let enrollment = (!names.is_empty()).then_some(names.as_slice());
        let Ok(cands) = candidates(enrollment, None, &hubs) else {
            // Only when nothing takes part in allocation and the enrollment names nothing.
            prop_assert!(names.is_empty() && hubs.iter().all(|h| !h.apply_allocation_policy));
            return Ok(());
        };
        let allowed: BTreeSet<String> = if names.is_empty() {
            hubs.iter().filter(|h| h.apply_allocation_policy).map(|h| h.name.clone()).collect()
        } else {
            names.iter().map(|n| n.to_lowercase()).collect()
        };
        for c in &cands {
            prop_assert!(allowed.contains(&c.name), "{} is not allowed", c.name);
        }
        let hashed_pick = hashed::choose(&id, &cands).unwrap();
        prop_assert!(allowed.contains(&hashed_pick.name));
        let geo_pick = geo_latency::choose(&id, region.as_deref(), &cands).unwrap();
        prop_assert!(allowed.contains(&geo_pick.name));
        // A hub in the node's region wins whenever there is one.
        if let Some(r) = &region {
            if cands.iter().any(|h| h.location.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(r))) {
                prop_assert!(geo_pick.location.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(r)));
            }
        }
        match static_hub::choose(&cands) {
            Ok(h) => {
                prop_assert_eq!(cands.len(), 1);
                prop_assert!(allowed.contains(&h.name));
            }
            Err(_) => prop_assert!(cands.len() != 1),
        }
    }

    /// A name the hub list doesn't have is refused rather than replaced by another hub.
    #[test]
    fn unlinked_named_hub_is_refused(hubs in linked_hubs(), stranger in "[a-z]{1,8}\\.elsewhere\\.test") {
        prop_assert!(candidates(Some(&[stranger]), None, &hubs).is_err());
    }
}

proptest! {
    #![proptest_config(config(8))]

    /// Over 4,000 ids each hub's share is its weight's share of the total, within 0.04
    /// (about five standard deviations at this sample size).
    #[test]
    fn hashed_shares_follow_weights(weights in prop::collection::vec(1u32..=5, 2..=4)) {
        let hubs: Vec<LinkedHub> = weights.iter().enumerate()
            .map(|(i, w)| hub(format!("hub-{i}.test"), *w, true, None))
            .collect();
        let n = 4_000;
        let mut counts = vec![0usize; hubs.len()];
        for i in 0..n {
            let chosen = hashed::choose(&format!("device-{i}"), &hubs).unwrap();
            counts[hubs.iter().position(|h| h.name == chosen.name).unwrap()] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = f64::from(*w) / f64::from(total);
            let share = counts[i] as f64 / n as f64;
            prop_assert!((share - expected).abs() < 0.04, "weights {:?}: counts {:?}", weights, counts);
        }
    }
}
