//! The twin patch merge (`muster_hub::properties`): for a state and a patch that pass the
//! hub's validation, applying the patch never panics and
//! - the returned change is empty exactly when the version stays, and one version up otherwise;
//! - the same patch applied again changes nothing;
//! - the change applied to the old values gives the new values (it is what devices are told);
//! - `$metadata` mirrors the values: every property has a node, and no node outlives its
//!   property.
//!
//! Input: two JSON objects (the starting state as a patch onto an empty set, then the patch),
//! separated by a 0xFF byte (never part of UTF-8 JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use muster_hub::properties::{self, PropertySet};
use serde_json::{Map, Value};

fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    let mut map: Map<String, Value> = serde_json::from_slice(bytes).ok()?;
    properties::strip_system_keys(&mut map);
    properties::validate_collection(&map, "properties").ok()?;
    Some(map)
}

fn assert_mirrored(values: &Map<String, Value>, metadata: &Map<String, Value>, path: &str) {
    for (key, value) in values {
        let node = metadata
            .get(key)
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no $metadata node for {path}.{key}"));
        if let Value::Object(children) = value {
            assert_mirrored(children, node, &format!("{path}.{key}"));
        }
    }
    for key in metadata.keys() {
        assert!(
            key.starts_with('$') || values.contains_key(key),
            "$metadata node {path}.{key} has no property"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0xFF);
    let (Some(start), Some(patch)) = (parts.next(), parts.next()) else {
        return;
    };
    let (Some(start), Some(patch)) = (object(start), object(patch)) else {
        return;
    };
    for track_version in [false, true] {
        let mut set = PropertySet::new("2026-01-01T00:00:00Z", track_version);
        set.apply_patch(&start, "2026-01-01T00:00:01Z", track_version);
        let before = set.clone();

        let change = set.apply_patch(&patch, "2026-01-01T00:00:02Z", track_version);
        if change.is_empty() {
            assert_eq!(set, before, "an empty change left the set as it was");
        } else {
            assert_eq!(set.version, before.version + 1);
        }
        let mut replayed = before.values.clone();
        properties::merge(&mut replayed, &change);
        assert_eq!(
            replayed, set.values,
            "the change turns the old values into the new"
        );
        assert_mirrored(&set.values, &set.metadata, "");

        let after = set.clone();
        let again = set.apply_patch(&patch, "2026-01-01T00:00:03Z", track_version);
        assert!(again.is_empty(), "a patch applied twice changed {again:?}");
        assert_eq!(set, after);

        let _ = set.render(true);
        let _ = properties::check_size(&set.values, "properties", properties::MAX_PROPERTIES_BYTES);
    }
});
