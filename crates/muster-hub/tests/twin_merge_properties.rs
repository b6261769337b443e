//! Property tests for the twin patch merge (`muster_hub::properties`): for valid property
//! collections and patches, the change reported is exactly what turns the old values into the
//! new ones, a patch applied twice changes nothing the second time, the version moves by one
//! per change, `$metadata` mirrors the values, and replacing gives the new collection.
//! Cases are limited so the suite stays in seconds.

use muster_hub::properties::{self, PropertySet};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Valid property names (no `.`, `$`, space or control characters); a small alphabet so
/// patches hit existing keys often.
fn key() -> impl Strategy<Value = String> {
    "[a-d]{1,2}"
}

fn value(with_nulls: bool) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-5i64..5).prop_map(Value::from),
        "[a-z]{0,3}".prop_map(Value::String),
        prop::collection::vec((-3i64..3).prop_map(Value::from), 0..3).prop_map(Value::Array),
    ];
    let leaf = if with_nulls {
        prop_oneof![1 => Just(Value::Null), 4 => leaf].boxed()
    } else {
        leaf.boxed()
    };
    leaf.prop_recursive(3, 20, 3, move |inner| {
        prop::collection::btree_map(key(), inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    })
}

fn collection(with_nulls: bool) -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(key(), value(with_nulls), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn assert_mirrored(values: &Map<String, Value>, metadata: &Map<String, Value>) {
    for (key, value) in values {
        let node = metadata
            .get(key)
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no $metadata node for {key}"));
        if let Value::Object(children) = value {
            assert_mirrored(children, node);
        }
    }
    for key in metadata.keys() {
        assert!(
            key.starts_with('$') || values.contains_key(key),
            "$metadata node {key} has no property"
        );
    }
}

fn has_object_null(map: &Map<String, Value>) -> bool {
    map.values().any(|v| match v {
        Value::Null => true,
        Value::Object(m) => has_object_null(m),
        _ => false,
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn patch_change_version_and_metadata(start in collection(false), patch in collection(true), track in any::<bool>()) {
        prop_assert!(properties::validate_collection(&patch, "desired properties").is_ok());
        let mut set = PropertySet::new("t0", track);
        set.apply_patch(&start, "t1", track);
        let before = set.clone();

        let change = set.apply_patch(&patch, "t2", track);
        if change.is_empty() {
            prop_assert_eq!(&set, &before);
        } else {
            prop_assert_eq!(set.version, before.version + 1);
        }
        // What devices are told turns their copy into the new values.
        let mut replayed = before.values.clone();
        properties::merge(&mut replayed, &change);
        prop_assert_eq!(&replayed, &set.values);
        // `null` deletes: no null is ever stored as a property value.
        prop_assert!(!has_object_null(&set.values));
        assert_mirrored(&set.values, &set.metadata);

        let after = set.clone();
        prop_assert!(set.apply_patch(&patch, "t3", track).is_empty());
        prop_assert_eq!(set, after);
    }

    #[test]
    fn replace_gives_the_new_collection(start in collection(false), new in collection(false)) {
        let mut set = PropertySet::new("t0", true);
        set.apply_patch(&start, "t1", true);
        set.replace(&new, "t2", true);
        prop_assert_eq!(&set.values, &new);
        assert_mirrored(&set.values, &set.metadata);
        prop_assert_eq!(properties::diff(&set.values, &new), Map::new());
    }

    #[test]
    fn diff_then_merge_is_identity(old in collection(false), new in collection(false)) {
        let d = properties::diff(&old, &new);
        let mut merged = old.clone();
        properties::merge(&mut merged, &d);
        prop_assert_eq!(merged, new);
    }

    /// Names IoT Hub refuses are refused, anywhere in the tree.
    #[test]
    fn bad_names_refused(good in collection(false), bad in "[a-z]{0,3}[.$ \u{1}][a-z]{0,3}", deep in any::<bool>()) {
        let mut map = good;
        if deep {
            let mut inner = Map::new();
            inner.insert(bad, Value::from(1));
            map.insert("zz".into(), Value::Object(inner));
        } else {
            map.insert(bad, Value::from(1));
        }
        prop_assert!(properties::validate_collection(&map, "tags").is_err());
    }
}
