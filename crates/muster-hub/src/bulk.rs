//! The bulk registry API: many device creates, updates and deletes in one request.
//!
//! | Method | Path | Right | Success | Failures |
//! |---|---|---|---|---|
//! | POST | `/devices`, `/devices/` | RegistryWrite | 200 `BulkRegistryOperationResult` | 400 `BulkRegistryOperationResult` (some operations failed), 400 (body), 401, 413 |
//!
//! The body is a JSON array of IoT Hub's `ExportImportDevice`, as Node `azure-iothub`
//! (`Registry.addDevices` / `updateDevices` / `removeDevices`) and Python `azure-iot-hub`
//! (`IoTHubRegistryManager.bulk_create_or_update_devices`) send it: `id`, `importMode`,
//! `eTag` (Node sends the device's `etag`), `status`, `statusReason`, `authentication`,
//! `capabilities`, `deviceScope`, `parentScopes`, and, on create and update, `tags` and
//! `properties.desired` (the device's twin is replaced by them, as `PUT /twins` would).
//! `importMode` is read case-insensitively (Node sends `Update`, `DeleteIfMatchETag`, ...):
//!
//! | importMode | Device absent | Device present |
//! |---|---|---|
//! | `create` | created | error `DeviceAlreadyExists` |
//! | `update` | created | overwritten |
//! | `updateIfMatchETag` | error `DeviceNotFound` | overwritten if `eTag` matches, else `PreconditionFailed` |
//! | `delete` | error `DeviceNotFound` | deleted |
//! | `deleteIfMatchETag` | error `DeviceNotFound` | deleted if `eTag` matches, else `PreconditionFailed` |
//!
//! `updateTwin` / `updateTwinIfMatchETag` and module entries (`moduleId`) are refused per
//! device (`ArgumentInvalid`). Each operation is checked as its single-device route would check
//! it (device id, keys, thumbprints, twin properties, device scope: an operation's
//! `deviceScope` may name an IoT Edge device created earlier in the same request). The
//! operations that pass are written in **one store transaction**; the answer is
//! `{"isSuccessful": bool, "errors": [{"deviceId", "errorCode", "errorStatus"}], "warnings": []}`,
//! with HTTP 200 when every operation applied and 400 otherwise, as IoT Hub answers. A
//! request naming a device twice is refused whole (`DeviceDefinedMultipleTimes`, nothing
//! written). At most [`MAX_BULK_OPERATIONS`] operations per request (IoT Hub: 100).

use std::collections::{HashMap, HashSet};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::IfMatch;
use muster_store::{Expect, Write};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::{HubRight, Scope};
use crate::error::{HubError, HubErrorCode};
use crate::model::{validate_device_id, Device, DeviceInput, TwinUpdate};
use crate::registry::{HubRegistry, PlannedPut};
use crate::request::{json_ok, parse_json, read_body, QueryParams};
use crate::routes::admit;

/// Most operations one request may carry (IoT Hub allows 100; Muster's store takes more in
/// one transaction).
pub const MAX_BULK_OPERATIONS: usize = 1000;
/// Largest bulk request body.
pub const MAX_BULK_BODY_BYTES: usize = 4 * 1024 * 1024;

/// IoT Hub's `BulkRegistryOperationResult`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkRegistryOperationResult {
    pub is_successful: bool,
    pub errors: Vec<DeviceRegistryOperationError>,
    /// Always empty: Muster has no warnings to give.
    pub warnings: Vec<Value>,
}

/// One failed operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationError {
    pub device_id: String,
    /// IoT Hub's error code name (`DeviceAlreadyExists`, `PreconditionFailed`, ...).
    pub error_code: String,
    /// What failed, in words.
    pub error_status: String,
}

impl DeviceRegistryOperationError {
    fn new(device_id: &str, e: &HubError) -> Self {
        Self {
            device_id: device_id.to_string(),
            error_code: e.code.as_str().to_string(),
            error_status: e.message.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImportMode {
    Create,
    Update,
    UpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
}

impl ImportMode {
    fn parse(s: &str) -> Result<Self, HubError> {
        match s.to_ascii_lowercase().as_str() {
            "create" => Ok(Self::Create),
            "update" => Ok(Self::Update),
            "updateifmatchetag" => Ok(Self::UpdateIfMatchETag),
            "delete" => Ok(Self::Delete),
            "deleteifmatchetag" => Ok(Self::DeleteIfMatchETag),
            "updatetwin" | "updatetwinifmatchetag" => Err(HubError::invalid(format!(
                "importMode '{s}' is not supported by this hub; use PATCH /twins/{{id}}"
            ))),
            _ => Err(HubError::invalid(format!(
                "importMode '{s}' is not one of create, update, updateIfMatchETag, delete, deleteIfMatchETag"
            ))),
        }
    }
}

/// One operation of the request, read.
struct Operation {
    device_id: String,
    mode: ImportMode,
    etag: Option<String>,
    input: DeviceInput,
    twin: Option<TwinUpdate>,
}

fn read_operation(item: &Value) -> Result<Operation, HubError> {
    let Some(obj) = item.as_object() else {
        return Err(HubError::new(
            HubErrorCode::IotHubFormatError,
            "each operation must be a JSON object (an ExportImportDevice)",
        ));
    };
    let device_id = obj
        .get("id")
        .or_else(|| obj.get("deviceId"))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("")
        .to_string();
    validate_device_id(&device_id)?;
    if obj.get("moduleId").is_some_and(|m| !m.is_null()) {
        return Err(HubError::invalid(
            "module identities are not supported by this hub",
        ));
    }
    let mode = match obj.get("importMode").and_then(Value::as_str) {
        Some(m) => ImportMode::parse(m)?,
        None => return Err(HubError::invalid("importMode is required")),
    };
    let etag = obj
        .get("eTag")
        .or_else(|| obj.get("etag"))
        .and_then(Value::as_str)
        .map(|e| {
            e.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
        .filter(|e| !e.is_empty());
    let mut device = Map::new();
    for (k, v) in obj {
        if !matches!(
            k.as_str(),
            "id" | "importMode" | "eTag" | "etag" | "tags" | "properties" | "twinETag"
        ) {
            device.insert(k.clone(), v.clone());
        }
    }
    device.insert("deviceId".into(), Value::String(device_id.clone()));
    let input = DeviceInput::from_json(Value::Object(device))?;
    let has_twin = obj.get("tags").is_some_and(|t| !t.is_null())
        || obj
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("desired"));
    let twin = if has_twin {
        let mut twin = Map::new();
        for k in ["tags", "properties"] {
            if let Some(v) = obj.get(k) {
                twin.insert(k.into(), v.clone());
            }
        }
        Some(TwinUpdate::from_json(&Value::Object(twin))?)
    } else {
        None
    };
    Ok(Operation {
        device_id,
        mode,
        etag,
        input,
        twin,
    })
}

/// A checked operation, ready to write.
enum Planned {
    Put(Box<PlannedPut>),
    Delete { device_id: String, expect: Expect },
}

impl HubRegistry {
    /// Applies a bulk registry request (the JSON array, see the module doc).
    pub async fn bulk_registry(
        &self,
        items: &[Value],
    ) -> Result<BulkRegistryOperationResult, HubError> {
        if items.len() > MAX_BULK_OPERATIONS {
            return Err(HubError::new(
                HubErrorCode::TooManyDevices,
                format!(
                    "the request holds {} operations; at most {MAX_BULK_OPERATIONS} are taken at once",
                    items.len()
                ),
            ));
        }
        let mut errors = Vec::new();
        let mut operations = Vec::with_capacity(items.len());
        for item in items {
            match read_operation(item) {
                Ok(op) => operations.push(op),
                Err(e) => {
                    let id = item
                        .get("id")
                        .or_else(|| item.get("deviceId"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    errors.push(DeviceRegistryOperationError::new(id, &e));
                }
            }
        }
        // A device named twice: refused whole, nothing written.
        let mut seen = HashSet::new();
        let twice: Vec<DeviceRegistryOperationError> = operations
            .iter()
            .filter(|op| !seen.insert(op.device_id.to_ascii_lowercase()))
            .map(|op| {
                DeviceRegistryOperationError::new(
                    &op.device_id,
                    &HubError::new(
                        HubErrorCode::DeviceDefinedMultipleTimes,
                        format!(
                            "device '{}' appears more than once in the request",
                            op.device_id
                        ),
                    ),
                )
            })
            .collect();
        if !twice.is_empty() {
            return Ok(BulkRegistryOperationResult {
                is_successful: false,
                errors: twice,
                warnings: Vec::new(),
            });
        }

        // Plan every operation against the current records; devices planned earlier in the
        // request count for the scope checks of later ones.
        let mut batch: HashMap<String, Option<Device>> = HashMap::new();
        let mut planned = Vec::with_capacity(operations.len());
        for op in operations {
            match self.plan_operation(&op, &batch).await {
                Ok(p) => {
                    let key = op.device_id.to_ascii_lowercase();
                    match &p {
                        Planned::Put(put) => {
                            batch.insert(key, Some(put.stored.device.clone()));
                        }
                        Planned::Delete { .. } => {
                            batch.insert(key, None);
                        }
                    }
                    planned.push(p);
                }
                Err(e) => errors.push(DeviceRegistryOperationError::new(&op.device_id, &e)),
            }
        }

        // One transaction for everything that passed.
        let mut writes: Vec<Write> = Vec::with_capacity(planned.len());
        for p in &planned {
            writes.push(match p {
                Planned::Put(put) => self.device_write(
                    &put.stored.device.device_id,
                    &put.stored,
                    put.expect.clone(),
                )?,
                Planned::Delete { device_id, expect } => {
                    self.device_delete(device_id, expect.clone())
                }
            });
        }
        let outcomes = if writes.is_empty() {
            Vec::new()
        } else {
            self.store().write(writes).await?
        };
        for (p, outcome) in planned.iter().zip(outcomes) {
            let device_id = match p {
                Planned::Put(put) => &put.stored.device.device_id,
                Planned::Delete { device_id, .. } => device_id,
            };
            if !outcome.is_applied() {
                errors.push(DeviceRegistryOperationError::new(
                    device_id,
                    &HubError::new(
                        HubErrorCode::PreconditionFailed,
                        format!("device '{device_id}' changed during the request; retry"),
                    ),
                ));
                continue;
            }
            match p {
                Planned::Put(put) => self.after_put(put),
                Planned::Delete { device_id, .. } => self.after_delete(device_id),
            }
        }
        Ok(BulkRegistryOperationResult {
            is_successful: errors.is_empty(),
            errors,
            warnings: Vec::new(),
        })
    }

    async fn plan_operation(
        &self,
        op: &Operation,
        batch: &HashMap<String, Option<Device>>,
    ) -> Result<Planned, HubError> {
        let current = self.load(&op.device_id).await?;
        let etag_required =
            || HubError::invalid(format!("importMode {:?} needs the device's eTag", op.mode));
        match op.mode {
            ImportMode::Delete | ImportMode::DeleteIfMatchETag => {
                let Some((stored, record_etag)) = current else {
                    return Err(HubError::device_not_found(&op.device_id));
                };
                if op.mode == ImportMode::DeleteIfMatchETag {
                    let etag = op.etag.as_deref().ok_or_else(etag_required)?;
                    if etag != stored.device.etag {
                        return Err(etag_mismatch(&stored.device.device_id));
                    }
                }
                Ok(Planned::Delete {
                    device_id: stored.device.device_id,
                    expect: Expect::Etag(record_etag),
                })
            }
            ImportMode::Create | ImportMode::Update | ImportMode::UpdateIfMatchETag => {
                let if_match = match op.mode {
                    ImportMode::Create => IfMatch::None,
                    ImportMode::Update => IfMatch::Any,
                    _ => {
                        if current.is_none() {
                            return Err(HubError::device_not_found(&op.device_id));
                        }
                        IfMatch::Etag(op.etag.clone().ok_or_else(etag_required)?)
                    }
                };
                if let Some(twin) = &op.twin {
                    twin.validate()?;
                }
                let put = self
                    .plan_put(&op.input, &if_match, op.twin.as_ref(), current)
                    .map_err(|e| match e.code {
                        HubErrorCode::PreconditionFailed => etag_mismatch(&op.device_id),
                        _ => e,
                    })?;
                self.check_scopes(&put.stored.device, put.previous_scope.as_deref(), batch)
                    .await?;
                Ok(Planned::Put(Box::new(put)))
            }
        }
    }
}

fn etag_mismatch(device_id: &str) -> HubError {
    HubError::new(
        HubErrorCode::PreconditionFailed,
        format!("the eTag of device '{device_id}' does not match"),
    )
}

/// `POST /devices`.
pub(crate) async fn apply(
    State(hub): State<HubRegistry>,
    query: Result<Query<QueryParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        admit(
            &hub,
            &headers,
            query,
            HubRight::RegistryWrite,
            Scope::Devices,
        )?;
        let bytes = read_body(body, MAX_BULK_BODY_BYTES).await?;
        let json = parse_json(&bytes)?;
        let Some(items) = json.as_array() else {
            return Err(HubError::new(
                HubErrorCode::IotHubFormatError,
                "the request body must be a JSON array of ExportImportDevice operations",
            ));
        };
        let result = hub.bulk_registry(items).await?;
        let mut resp = json_ok(&result, None);
        if !result.is_successful {
            *resp.status_mut() = StatusCode::BAD_REQUEST;
        }
        Ok::<_, HubError>(resp)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
