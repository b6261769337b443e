//! Twin property collections: validation, merge with `null` deletes, diffs, `$metadata`.
//!
//! Desired and reported properties each live in a [`PropertySet`]: the values, a `$version`
//! that grows by one on every change, and a `$metadata` tree mirroring the values in which
//! every node carries `$lastUpdated` (and, for desired properties, `$lastUpdatedVersion`), as
//! IoT Hub renders it:
//!
//! ```json
//! {"telemetry": {"period": 5},
//!  "$metadata": {"$lastUpdated": "..", "$lastUpdatedVersion": 2,
//!                "telemetry": {"$lastUpdated": "..", "$lastUpdatedVersion": 2,
//!                              "period": {"$lastUpdated": "..", "$lastUpdatedVersion": 2}}},
//!  "$version": 2}
//! ```
//!
//! Replacing a collection is computed as a diff (removed keys become `null`) and applied as a
//! patch, so unchanged keys keep their metadata and the diff is exactly what a connected
//! device must be told.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::HubError;

/// Deepest nesting of objects inside a collection (a top-level key is depth 1).
pub const MAX_DEPTH: usize = 10;
/// Longest property name, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest tags collection (serialized JSON, metadata excluded).
pub const MAX_TAGS_BYTES: usize = 16 * 1024;
/// Largest desired or reported collection (serialized JSON, metadata excluded).
pub const MAX_PROPERTIES_BYTES: usize = 32 * 1024;

const METADATA: &str = "$metadata";
const VERSION: &str = "$version";
const LAST_UPDATED: &str = "$lastUpdated";
const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";

/// Removes the read-only `$metadata` and `$version` a client may send back from a GET.
pub fn strip_system_keys(map: &mut Map<String, Value>) {
    map.shift_remove(METADATA);
    map.shift_remove(VERSION);
}

/// Checks property names and nesting: names are 1..=1024 bytes without control characters,
/// `.`, `$` or space (IoT Hub's rule); objects nest at most [`MAX_DEPTH`] deep.
pub fn validate_collection(map: &Map<String, Value>, what: &str) -> Result<(), HubError> {
    validate_object(map, what, 1, &mut String::new())
}

fn validate_object(
    map: &Map<String, Value>,
    what: &str,
    depth: usize,
    path: &mut String,
) -> Result<(), HubError> {
    if depth > MAX_DEPTH {
        return Err(HubError::invalid(format!(
            "{what} nest deeper than {MAX_DEPTH} levels at '{path}'"
        )));
    }
    for (key, value) in map {
        check_key(key, what, path)?;
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        validate_value(value, what, depth, path)?;
        path.truncate(len);
    }
    Ok(())
}

fn validate_value(
    value: &Value,
    what: &str,
    depth: usize,
    path: &mut String,
) -> Result<(), HubError> {
    match value {
        Value::Object(m) => validate_object(m, what, depth + 1, path),
        Value::Array(items) => {
            for item in items {
                validate_value(item, what, depth, path)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_key(key: &str, what: &str, path: &str) -> Result<(), HubError> {
    let bad = |why: &str| {
        let at = if path.is_empty() {
            String::new()
        } else {
            format!(" under '{path}'")
        };
        Err(HubError::invalid(format!(
            "{what} property name {key:?}{at} {why}"
        )))
    };
    if key.is_empty() {
        return bad("is empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return bad("is longer than 1024 bytes");
    }
    if key
        .chars()
        .any(|c| c.is_control() || c == '.' || c == '$' || c == ' ')
    {
        return bad("contains a character IoT Hub refuses in property names ('.', '$', space or a control character)");
    }
    Ok(())
}

/// Refuses a collection whose serialized size is over `limit`.
pub fn check_size(map: &Map<String, Value>, what: &str, limit: usize) -> Result<(), HubError> {
    let size = serde_json::to_vec(map)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limit {
        return Err(HubError::invalid(format!(
            "{what} would be {size} bytes, over the limit of {limit} bytes"
        )));
    }
    Ok(())
}

/// The patch that turns `old` into `new`: changed values, `null` for removed keys, nested
/// objects diffed recursively.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            out.insert(key.clone(), Value::Null);
        }
    }
    for (key, nv) in new {
        match (old.get(key), nv) {
            (Some(Value::Object(o)), Value::Object(n)) => {
                let d = diff(o, n);
                if !d.is_empty() {
                    out.insert(key.clone(), Value::Object(d));
                }
            }
            (Some(ov), nv) if ov == nv => {}
            _ => {
                out.insert(key.clone(), nv.clone());
            }
        }
    }
    out
}

/// Merges `patch` into `values`: objects merge recursively, `null` deletes a key, anything
/// else replaces. Nulls inside newly created objects are dropped. Returns whether anything
/// changed.
pub fn merge(values: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    merge_with_metadata(values, None, patch, &Stamp::none())
}

/// A collection without `null`s (objects recursively; arrays are kept as sent).
pub fn drop_nulls(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                Value::Object(m) => Value::Object(drop_nulls(m)),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// What metadata nodes touched by a merge record.
struct Stamp {
    now: Option<String>,
    version: Option<u64>,
}

impl Stamp {
    fn none() -> Self {
        Self {
            now: None,
            version: None,
        }
    }

    fn apply(&self, node: &mut Map<String, Value>) {
        if let Some(now) = &self.now {
            node.insert(LAST_UPDATED.into(), Value::String(now.clone()));
        }
        if let Some(v) = self.version {
            node.insert(LAST_UPDATED_VERSION.into(), Value::from(v));
        }
    }

    /// A fresh metadata node for `value` (and, for objects, every child).
    fn tree(&self, value: &Value) -> Value {
        let mut node = Map::new();
        self.apply(&mut node);
        if let Value::Object(m) = value {
            for (k, v) in m {
                node.insert(k.clone(), self.tree(v));
            }
        }
        Value::Object(node)
    }
}

fn merge_with_metadata(
    values: &mut Map<String, Value>,
    mut meta: Option<&mut Map<String, Value>>,
    patch: &Map<String, Value>,
    stamp: &Stamp,
) -> bool {
    let mut changed = false;
    for (key, pv) in patch {
        match pv {
            Value::Null => {
                if values.shift_remove(key).is_some() {
                    if let Some(m) = meta.as_deref_mut() {
                        m.shift_remove(key);
                    }
                    changed = true;
                }
            }
            Value::Object(po) => {
                if let Some(Value::Object(existing)) = values.get_mut(key) {
                    let child_meta = match meta.as_deref_mut() {
                        Some(m) => {
                            let node = m
                                .entry(key.clone())
                                .or_insert_with(|| Value::Object(Map::new()));
                            if !node.is_object() {
                                *node = Value::Object(Map::new());
                            }
                            node.as_object_mut()
                        }
                        None => None,
                    };
                    let mut child_meta = child_meta;
                    if merge_with_metadata(existing, child_meta.as_deref_mut(), po, stamp) {
                        if let Some(node) = child_meta {
                            stamp.apply(node);
                        }
                        changed = true;
                    }
                } else {
                    let fresh = Value::Object(drop_nulls(po));
                    if let Some(m) = meta.as_deref_mut() {
                        m.insert(key.clone(), stamp.tree(&fresh));
                    }
                    values.insert(key.clone(), fresh);
                    changed = true;
                }
            }
            other => {
                if values.get(key) != Some(other) {
                    values.insert(key.clone(), other.clone());
                    if let Some(m) = meta.as_deref_mut() {
                        m.insert(key.clone(), stamp.tree(other));
                    }
                    changed = true;
                }
            }
        }
    }
    changed
}

/// Refreshes the metadata of every node `patch` names with a value (not `null`), changed
/// or not: IoT Hub stamps what a service wrote, not only what differed.
fn touch(meta: &mut Map<String, Value>, patch: &Map<String, Value>, stamp: &Stamp) {
    for (key, value) in patch {
        if value.is_null() {
            continue;
        }
        let node = meta
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        if let Some(node) = node.as_object_mut() {
            stamp.apply(node);
            if let Value::Object(child) = value {
                touch(node, child, stamp);
            }
        }
    }
}

/// Desired or reported properties with their version and metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PropertySet {
    pub version: u64,
    pub values: Map<String, Value>,
    pub metadata: Map<String, Value>,
}

impl PropertySet {
    /// An empty set at version 1; `track_version` adds `$lastUpdatedVersion` (desired only).
    pub fn new(now: &str, track_version: bool) -> Self {
        let mut metadata = Map::new();
        Stamp {
            now: Some(now.to_string()),
            version: track_version.then_some(1),
        }
        .apply(&mut metadata);
        Self {
            version: 1,
            values: Map::new(),
            metadata,
        }
    }

    /// Applies a patch (`null` deletes). Returns the effective change, empty when nothing
    /// changed, in which case the version stays.
    pub fn apply_patch(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
        track_version: bool,
    ) -> Map<String, Value> {
        let before = self.values.clone();
        let stamp = Stamp {
            now: Some(now.to_string()),
            version: track_version.then_some(self.version + 1),
        };
        let mut values = self.values.clone();
        let mut metadata = self.metadata.clone();
        if !merge_with_metadata(&mut values, Some(&mut metadata), patch, &stamp) {
            return Map::new();
        }
        let change = diff(&before, &values);
        if change.is_empty() {
            return change;
        }
        stamp.apply(&mut metadata);
        self.values = values;
        self.metadata = metadata;
        self.version += 1;
        change
    }

    /// A service's desired-properties update, as IoT Hub treats it: the version grows and
    /// every property the patch names gets fresh metadata even when its value is unchanged.
    /// Returns the notification for the device: the patch as sent.
    pub fn apply_update(
        &mut self,
        patch: &Map<String, Value>,
        now: &str,
        track_version: bool,
    ) -> Map<String, Value> {
        let stamp = Stamp {
            now: Some(now.to_string()),
            version: track_version.then_some(self.version + 1),
        };
        merge_with_metadata(&mut self.values, Some(&mut self.metadata), patch, &stamp);
        touch(&mut self.metadata, patch, &stamp);
        stamp.apply(&mut self.metadata);
        self.version += 1;
        patch.clone()
    }

    /// Stamps the collection's root metadata (an update that changed no value).
    pub fn stamp_root(&mut self, now: &str, version: u64) {
        Stamp {
            now: Some(now.to_string()),
            version: Some(version),
        }
        .apply(&mut self.metadata);
    }

    /// Removes every value (`"desired": null`); the version grows even when there was
    /// nothing to remove. Returns the notification: `null` for every removed key.
    pub fn clear(&mut self, now: &str, track_version: bool) -> Map<String, Value> {
        let removed: Map<String, Value> = self
            .values
            .keys()
            .map(|k| (k.clone(), Value::Null))
            .collect();
        self.version += 1;
        self.values = Map::new();
        self.metadata = Map::new();
        Stamp {
            now: Some(now.to_string()),
            version: track_version.then_some(self.version),
        }
        .apply(&mut self.metadata);
        removed
    }

    /// Replaces every value. Returns the effective change (see [`Self::apply_patch`]).
    pub fn replace(
        &mut self,
        new: &Map<String, Value>,
        now: &str,
        track_version: bool,
    ) -> Map<String, Value> {
        let patch = diff(&self.values, &drop_nulls(new));
        if patch.is_empty() {
            return patch;
        }
        self.apply_patch(&patch, now, track_version)
    }

    /// The wire form: values, `$metadata`, `$version`.
    pub fn render(&self, with_metadata: bool) -> Map<String, Value> {
        let mut out = self.values.clone();
        if with_metadata {
            out.insert(METADATA.into(), Value::Object(self.metadata.clone()));
        }
        out.insert(VERSION.into(), Value::from(self.version));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn merge_deep_and_null_deletes() {
        let mut v = obj(json!({"a": {"b": 1, "c": 2}, "d": 3}));
        assert!(merge(
            &mut v,
            &obj(json!({"a": {"b": null, "e": {"f": null, "g": 1}}, "d": null}))
        ));
        assert_eq!(
            Value::Object(v.clone()),
            json!({"a": {"c": 2, "e": {"g": 1}}})
        );
        assert!(!merge(&mut v, &obj(json!({"a": {"c": 2}, "zz": null}))));
    }

    #[test]
    fn diff_then_merge_reaches_target() {
        let old = obj(json!({"a": {"b": 1, "c": [1, 2]}, "x": 1, "y": {"z": 1}}));
        let new = obj(json!({"a": {"b": 2, "c": [1, 2]}, "y": 5, "n": {"m": true}}));
        let d = diff(&old, &new);
        assert_eq!(
            Value::Object(d.clone()),
            json!({"x": null, "a": {"b": 2}, "y": 5, "n": {"m": true}})
        );
        let mut v = old.clone();
        merge(&mut v, &d);
        assert_eq!(v, new);
    }

    #[test]
    fn property_set_versions_and_metadata() {
        let mut p = PropertySet::new("t0", true);
        assert_eq!(p.render(true)["$version"], 1);
        let change = p.apply_patch(&obj(json!({"tele": {"period": 5}})), "t1", true);
        assert_eq!(Value::Object(change), json!({"tele": {"period": 5}}));
        assert_eq!(p.version, 2);
        let r = Value::Object(p.render(true));
        assert_eq!(r["$metadata"]["$lastUpdated"], "t1");
        assert_eq!(r["$metadata"]["$lastUpdatedVersion"], 2);
        assert_eq!(r["$metadata"]["tele"]["period"]["$lastUpdatedVersion"], 2);
        // A no-op patch changes nothing.
        assert!(p
            .apply_patch(
                &obj(json!({"tele": {"period": 5}, "gone": null})),
                "t2",
                true
            )
            .is_empty());
        assert_eq!(p.version, 2);
        // Replace removes keys and keeps metadata of untouched ones.
        p.apply_patch(&obj(json!({"keep": 1})), "t3", true);
        let change = p.replace(&obj(json!({"keep": 1, "new": 2})), "t4", true);
        assert_eq!(Value::Object(change), json!({"tele": null, "new": 2}));
        let r = Value::Object(p.render(true));
        assert_eq!(r["$metadata"]["keep"]["$lastUpdated"], "t3");
        assert!(r["$metadata"].get("tele").is_none());
        assert_eq!(r["$version"], 4);
        // Reported sets carry no $lastUpdatedVersion.
        let mut rep = PropertySet::new("t0", false);
        rep.apply_patch(&obj(json!({"fw": "1.0"})), "t1", false);
        assert!(Value::Object(rep.render(true))["$metadata"]["fw"]
            .get("$lastUpdatedVersion")
            .is_none());
    }

    #[test]
    fn names_and_depth_are_checked() {
        validate_collection(&obj(json!({"ok_name-1": {"x": [ {"y": 1} ]}})), "tags").unwrap();
        for bad in [
            json!({"a.b": 1}),
            json!({"$x": 1}),
            json!({"a b": 1}),
            json!({"": 1}),
            json!({"o": {"x\u{1}": 1}}),
        ] {
            assert!(
                validate_collection(&obj(bad.clone()), "tags").is_err(),
                "{bad}"
            );
        }
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        validate_collection(deep.as_object().unwrap(), "desired").unwrap();
        let deeper = json!({ "k": deep });
        assert!(validate_collection(deeper.as_object().unwrap(), "desired").is_err());
    }
}
