//! [`HubRegistry`]: the built-in hub's identity registry and twins, as typed operations over
//! the [`Store`], plus the desired-property notification channel.
//!
//! Storage: one record per device in `Collection::HubDevices`, key
//! `"{hub host, lower-case}/{device id, lower-case}"`, partition = the lower-case hub host
//! (for the built-in hub, the host it first had: [`HubRegistry::with_storage_name`]).
//! The store's keys are unique per collection whatever the partition, so the host is part of
//! the key; device ids can't contain `/`, so the key is unambiguous, and listing one
//! partition in key order lists one hub's devices by lower-cased id. The body holds the
//! identity and its twin together (`{"device": Device, "twin": TwinState}`), so creating a
//! device creates its twin in the same write, deleting removes both, and every change is one
//! conditional write (`Expect::Etag` of the record, retried on a concurrent change).
//!
//! Etags: the device etag (`Device::etag`) is IoT Hub-shaped (base64 of a decimal number),
//! drawn fresh on every identity write and kept in the body; the twin etag is base64 of the
//! big-endian twin version (`AAAAAAAAAAE=` for version 1), as IoT Hub forms it. The store's
//! own etag is only used for the conditional writes.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::runtime::{Clock, Entropy};
use muster_store::{Collection, Expect, ListQuery, Record, Store, Write, WriteOutcome};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::auth::{HubAuthorizer, HubPolicy};
use crate::endpoint::{DeviceEndpointLimits, EndpointState};
use crate::error::{HubError, HubErrorCode};
use crate::model::{
    resolve_authentication, twin_etag, validate_device_id, ConnectionState, Device, DeviceInput,
    DeviceStatus, HubTime, Twin, TwinProperties, TwinUpdate,
};
use crate::properties::{self, PropertySet};
use crate::request::IfMatch;

/// Largest request body the REST API reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most devices one `GET /devices` returns (and the default for `top`).
pub const MAX_LIST: usize = 1000;
/// Capacity of the desired-change channel; a subscriber that falls further behind gets
/// `RecvError::Lagged` and should re-read the twin.
pub const DESIRED_CHANNEL_CAPACITY: usize = 1024;
/// Conditional writes retried this often when another writer got there first.
const MAX_ATTEMPTS: usize = 16;

/// A change of a device's desired properties, for the device endpoints to push:
/// `patch` is the effective change (`null` = deleted) and includes `"$version": version`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredChange {
    /// As the device was created (original casing).
    pub device_id: String,
    pub version: u64,
    pub patch: Map<String, Value>,
}

/// Tags, desired and reported properties, and the twin version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TwinState {
    pub version: u64,
    pub tags: Map<String, Value>,
    pub desired: PropertySet,
    pub reported: PropertySet,
}

impl TwinState {
    fn new(now: &str) -> Self {
        Self {
            version: 1,
            tags: Map::new(),
            desired: PropertySet::new(now, true),
            reported: PropertySet::new(now, false),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredDevice {
    pub device: Device,
    pub twin: TwinState,
}

/// A create-or-update, checked and ready to write.
pub(crate) struct PlannedPut {
    pub stored: StoredDevice,
    /// The condition of the write (absent, or the record etag it was planned from).
    pub expect: Expect,
    pub existed: bool,
    /// The stored device's scope (`""` for none); `None` on create.
    pub previous_scope: Option<String>,
    pub desired_change: Map<String, Value>,
}

/// A device put planned by [`HubRegistry::prepare_put_device`], its write not yet committed.
pub struct PreparedPut(PlannedPut);

impl PreparedPut {
    /// Whether the device existed before the put.
    pub fn existed(&self) -> bool {
        self.0.existed
    }
}

/// The scheme of an IoT Edge device's own scope: `ms-azure-iot-edge://{id}-{generationId}`.
pub const EDGE_SCOPE_PREFIX: &str = "ms-azure-iot-edge://";

fn edge_scope(device_id: &str, generation_id: &str) -> String {
    format!("{EDGE_SCOPE_PREFIX}{device_id}-{generation_id}")
}

/// A device that is not an IoT Edge device and names a parent has `parentScopes` =
/// `[deviceScope]` (IoT Hub fills it in when a client leaves it empty); anything else a
/// client sent is kept for [`HubRegistry::check_scopes`] to judge.
fn leaf_parent_scopes(iot_edge: bool, scope: Option<&str>, sent: Vec<String>) -> Vec<String> {
    match scope {
        Some(s) if !iot_edge && sent.is_empty() => vec![s.to_string()],
        _ => sent,
    }
}

fn scope_error(message: impl Into<String>) -> HubError {
    HubError::new(HubErrorCode::InvalidDeviceScope, message)
}

/// The built-in hub's registry. Cheap to clone.
#[derive(Clone)]
pub struct HubRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    host_name: String,
    /// Lower-case host name: the partition and key prefix.
    partition: String,
    auth: HubAuthorizer,
    clock: Arc<dyn Clock>,
    entropy: Arc<dyn Entropy>,
    desired_tx: broadcast::Sender<DesiredChange>,
    endpoint: EndpointState,
    /// The other nodes of this hub, when the store has a bus ([`Self::with_bus`]).
    cluster: Option<crate::cluster::Cluster>,
}

impl std::fmt::Debug for HubRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubRegistry")
            .field("host_name", &self.inner.host_name)
            .finish_non_exhaustive()
    }
}

impl HubRegistry {
    /// A registry with the default [`DeviceEndpointLimits`].
    pub fn new(
        store: Arc<dyn Store>,
        host_name: String,
        policies: Vec<HubPolicy>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> Self {
        Self::with_limits(
            store,
            host_name,
            policies,
            clock,
            entropy,
            DeviceEndpointLimits::default(),
        )
    }

    /// A registry whose device endpoint uses `limits` (telemetry retention, queue depths,
    /// timeouts).
    pub fn with_limits(
        store: Arc<dyn Store>,
        host_name: String,
        policies: Vec<HubPolicy>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
        limits: DeviceEndpointLimits,
    ) -> Self {
        let (desired_tx, _) = broadcast::channel(DESIRED_CHANNEL_CAPACITY);
        let partition = host_name.to_ascii_lowercase();
        Self {
            inner: Arc::new(Inner {
                store,
                auth: HubAuthorizer::new(&host_name, policies),
                host_name,
                partition,
                clock,
                entropy,
                desired_tx,
                endpoint: EndpointState::new(limits),
                cluster: None,
            }),
        }
    }

    /// Keeps this hub's records (devices, twins, messages) under `storage_name` instead of
    /// its host name: the built-in hub passes the name it first had, so its devices stay
    /// when its address changes. Call it right after construction, before any clone.
    pub fn with_storage_name(mut self, storage_name: &str) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.partition = storage_name.to_ascii_lowercase(),
            None => tracing::error!("with_storage_name called on a shared HubRegistry; ignored"),
        }
        self
    }

    /// Serves the hub together with the other nodes on `bus` (the store's, [`Store::bus`]):
    /// cloud-to-device wakes, direct methods, session takeovers and live telemetry reach
    /// devices and viewers on any node (`cluster.rs`). `None` keeps everything in this
    /// process. Call it right after construction, before any clone, inside a Tokio runtime:
    /// it starts the task that relays the other nodes' events (it ends with the registry).
    pub fn with_bus(mut self, bus: Option<Arc<dyn muster_store::bus::Bus>>) -> Self {
        let Some(bus) = bus else {
            return self;
        };
        let cluster = crate::cluster::Cluster::new(bus);
        let mut events = cluster.subscribe();
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.cluster = Some(cluster),
            None => {
                tracing::error!("with_bus called on a shared HubRegistry; ignored");
                return self;
            }
        }
        let registry = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let message = match events.recv().await {
                    Ok(m) => m,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "hub events lost: this node fell behind the bus");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(inner) = registry.upgrade() else {
                    return;
                };
                if let Some(event) = crate::cluster::decode(&message) {
                    HubRegistry { inner }.on_hub_event(event);
                }
            }
        });
        self
    }

    /// The other nodes of this hub, if it has any.
    pub(crate) fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.inner.cluster.as_ref()
    }

    /// The lower-case name this hub's records are kept under.
    pub(crate) fn hub_partition(&self) -> &str {
        &self.inner.partition
    }

    /// The device endpoint's limits.
    pub fn limits(&self) -> &DeviceEndpointLimits {
        &self.inner.endpoint.limits
    }

    pub(crate) fn endpoint(&self) -> &EndpointState {
        &self.inner.endpoint
    }

    pub(crate) fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    /// The partition of a device's messages: `"{hub host}/{device id}"`, lower-cased (the
    /// same text as [`Self::store_key`]).
    pub(crate) fn device_partition(&self, device_id: &str) -> String {
        self.store_key(device_id)
    }

    /// Whether the device has a connected MQTT session on this node.
    pub fn is_connected(&self, device_id: &str) -> bool {
        self.inner.endpoint.is_connected(&self.store_key(device_id))
    }

    /// Records a connection state change (`connectionState`, `connectionStateUpdatedTime`,
    /// `lastActivityTime`). Neither etag changes, as in IoT Hub. A deleted device is not an
    /// error.
    pub async fn set_connection_state(
        &self,
        device_id: &str,
        state: ConnectionState,
    ) -> Result<(), HubError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut stored, record_etag)) = self.load(device_id).await? else {
                return Ok(());
            };
            let now = HubTime(Some(self.inner.clock.now()));
            stored.device.connection_state = state;
            stored.device.connection_state_updated_time = now;
            stored.device.last_activity_time = now;
            if self
                .write(device_id, &stored, Expect::Etag(record_etag))
                .await?
            {
                return Ok(());
            }
        }
        Err(contention(device_id))
    }

    pub fn host_name(&self) -> &str {
        &self.inner.host_name
    }

    pub fn authorizer(&self) -> &HubAuthorizer {
        &self.inner.auth
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    /// Whether `leaf` (DER) is a certificate Muster issued for a CSR and an operator revoked
    /// (`muster_store::issued`: one read by serial; the SHA-256 thumbprint must match too).
    /// Refused at every device endpoint even if a device's thumbprint names it again.
    pub(crate) async fn certificate_revoked(&self, leaf: &[u8]) -> Result<bool, HubError> {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
            return Ok(false);
        };
        let serial: String = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let Some(record) = muster_store::issued::get(&*self.inner.store, &serial)
            .await
            .map_err(HubError::from)?
        else {
            return Ok(false);
        };
        let (_, sha256) = crate::device_mqtt::connect::thumbprints(leaf);
        Ok(record.is_revoked() && record.sha256_thumbprint.eq_ignore_ascii_case(&sha256))
    }

    pub(crate) fn entropy(&self) -> &dyn Entropy {
        &*self.inner.entropy
    }

    /// The store key of a device of this hub.
    pub fn store_key(&self, device_id: &str) -> String {
        format!(
            "{}/{}",
            self.inner.partition,
            device_id.to_ascii_lowercase()
        )
    }

    /// Subscribes to desired-property changes of every device of this hub.
    pub fn subscribe_desired(&self) -> broadcast::Receiver<DesiredChange> {
        self.inner.desired_tx.subscribe()
    }

    /// `PUT /devices/{id}`: creates (no If-Match, or `*`) or updates (`*` or the current
    /// device etag) an identity. No If-Match on an existing device → 409
    /// `DeviceAlreadyExists`; another etag → 412 `PreconditionFailed` (also when the device
    /// does not exist). Keys a `sas` device is created without are generated (32 random
    /// bytes); an update without keys keeps the current ones.
    pub async fn create_or_update_device(
        &self,
        input: DeviceInput,
        if_match: &IfMatch,
    ) -> Result<Device, HubError> {
        self.put_device(input, if_match, None).await.map(|(d, _)| d)
    }

    /// As [`Self::create_or_update_device`], and in the same write replaces the twin's tags
    /// and desired properties (on create: the initial twin).
    pub async fn create_or_update_device_with_twin(
        &self,
        input: DeviceInput,
        if_match: &IfMatch,
        twin: TwinUpdate,
    ) -> Result<(Device, Twin), HubError> {
        twin.validate()?;
        self.put_device(input, if_match, Some(twin)).await
    }

    async fn put_device(
        &self,
        input: DeviceInput,
        if_match: &IfMatch,
        twin_update: Option<TwinUpdate>,
    ) -> Result<(Device, Twin), HubError> {
        validate_device_id(&input.device_id)?;
        let id = input.device_id.clone();
        for _ in 0..MAX_ATTEMPTS {
            let current = self.load(&id).await?;
            let (write, planned) = self
                .planned_write(&input, if_match, twin_update.as_ref(), current)
                .await?;
            if self.write_one(write).await?.is_applied() {
                self.after_put(&planned);
                let twin = render_twin(&planned.stored);
                return Ok((planned.stored.device, twin));
            }
        }
        Err(contention(&id))
    }

    /// Plans a create-or-overwrite of a device (`If-Match: *` on an existing one) without
    /// writing it: the store write goes into the caller's own batch, so the device and the
    /// caller's records commit in one transaction. `twin` gives the twin to write, knowing
    /// whether the device existed. The write is [required](Write::required): when the device
    /// changed since it was read, nothing of the batch is applied and the caller plans again.
    /// Once committed, [`Self::finish_prepared_put`] tells the device's session.
    pub async fn prepare_put_device(
        &self,
        input: DeviceInput,
        twin: impl FnOnce(bool) -> Result<Option<TwinUpdate>, HubError>,
    ) -> Result<(Write, PreparedPut), HubError> {
        validate_device_id(&input.device_id)?;
        let current = self.load(&input.device_id).await?;
        let existed = current.is_some();
        let if_match = if existed { IfMatch::Any } else { IfMatch::None };
        let twin_update = twin(existed)?;
        if let Some(t) = &twin_update {
            t.validate()?;
        }
        let (write, planned) = self
            .planned_write(&input, &if_match, twin_update.as_ref(), current)
            .await?;
        Ok((write.required(), PreparedPut(planned)))
    }

    /// A create-or-update planned against `current` ([`Self::plan_put`]), its scopes checked
    /// ([`Self::check_scopes`]), and the store write that would carry it out.
    async fn planned_write(
        &self,
        input: &DeviceInput,
        if_match: &IfMatch,
        twin_update: Option<&TwinUpdate>,
        current: Option<(StoredDevice, String)>,
    ) -> Result<(Write, PlannedPut), HubError> {
        let planned = self.plan_put(input, if_match, twin_update, current)?;
        self.check_scopes(
            &planned.stored.device,
            planned.previous_scope.as_deref(),
            &HashMap::new(),
        )
        .await?;
        let write = self.device_write(&input.device_id, &planned.stored, planned.expect.clone())?;
        Ok((write, planned))
    }

    /// After the write of [`Self::prepare_put_device`] committed: a disabled device's session
    /// closes, a connected one hears of its desired properties.
    pub fn finish_prepared_put(&self, put: &PreparedPut) {
        self.after_put(&put.0);
    }

    /// What a create-or-update writes, checked against the current record (`None`: absent)
    /// and If-Match; the scope checks that need the store come after
    /// ([`Self::check_scopes`]).
    pub(crate) fn plan_put(
        &self,
        input: &DeviceInput,
        if_match: &IfMatch,
        twin_update: Option<&TwinUpdate>,
        current: Option<(StoredDevice, String)>,
    ) -> Result<PlannedPut, HubError> {
        let id = &input.device_id;
        let now = self.inner.clock.now();
        let now_s = now.to_dps_string();
        let (mut stored, expect, previous_scope) = match current {
            None => {
                if let IfMatch::Etag(_) = if_match {
                    return Err(HubError::new(
                        HubErrorCode::PreconditionFailed,
                        format!("Device '{id}' does not exist, so If-Match cannot match."),
                    ));
                }
                let device = self.new_device(input, now)?;
                (
                    StoredDevice {
                        device,
                        twin: TwinState::new(&now_s),
                    },
                    Expect::Absent,
                    None,
                )
            }
            Some((stored, record_etag)) => {
                match if_match {
                    IfMatch::None => {
                        return Err(HubError::new(
                            HubErrorCode::DeviceAlreadyExists,
                            format!(
                                "A device with ID '{}' is already registered.",
                                stored.device.device_id
                            ),
                        ))
                    }
                    IfMatch::Etag(e) if *e != stored.device.etag => {
                        return Err(precondition_failed("device", &stored.device.device_id))
                    }
                    _ => {}
                }
                let device = self.updated_device(&stored.device, input, now)?;
                let previous_scope = Some(stored.device.device_scope.clone().unwrap_or_default());
                (
                    StoredDevice {
                        device,
                        twin: stored.twin.clone(),
                    },
                    Expect::Etag(record_etag),
                    previous_scope,
                )
            }
        };
        let existed = previous_scope.is_some();
        let mut desired_change = Map::new();
        if let Some(update) = twin_update {
            let (tags_changed, change) = replace_twin_state(&mut stored.twin, update, &now_s)?;
            if tags_changed || !change.is_empty() {
                stored.twin.version += 1;
            }
            desired_change = change;
        }
        Ok(PlannedPut {
            stored,
            expect,
            existed,
            previous_scope,
            desired_change,
        })
    }

    /// After a planned put was written: a disabled device's connection closes, a connected
    /// device hears of its desired change.
    pub(crate) fn after_put(&self, planned: &PlannedPut) {
        // Only an existing device's connected session can care.
        if planned.existed {
            let id = &planned.stored.device.device_id;
            if planned.stored.device.status == DeviceStatus::Disabled {
                let key = self.store_key(id);
                self.inner.endpoint.close_session(&key);
                if let Some(c) = self.cluster() {
                    c.publish(&crate::cluster::HubEvent::CloseSession { device: key });
                }
            }
            if !planned.desired_change.is_empty() {
                self.notify(&planned.stored, planned.desired_change.clone());
            }
        }
    }

    /// After a device was deleted: its connection closes and its MQTT session is dropped.
    pub(crate) fn after_delete(&self, device_id: &str) {
        let key = self.store_key(device_id);
        self.inner.endpoint.close_session(&key);
        self.inner.endpoint.forget_session(&key);
        if let Some(c) = self.cluster() {
            c.publish(&crate::cluster::HubEvent::CloseSession { device: key });
        }
    }

    /// Device-scope rules, as IoT Hub applies them:
    /// - a device that is not an IoT Edge device may name a parent with `deviceScope`, which
    ///   must be the scope of an existing IoT Edge device of this hub; its `parentScopes` is
    ///   then `[deviceScope]` (empty or that one entry may be sent) and empty without one;
    /// - an IoT Edge device's `deviceScope` is its own, generated by the hub (checked in
    ///   `new_device` / `updated_device`); its `parentScopes` may name one parent IoT Edge
    ///   device (not itself) by that device's scope.
    ///
    /// Scopes are only checked when they change (`previous_scope`: the stored device's, `None`
    /// on create), so an unrelated update of a device whose parent is gone still works.
    /// `batch` holds devices a bulk request creates, updates (`Some`) or deletes (`None`) before
    /// this one, by lower-cased id.
    pub(crate) async fn check_scopes(
        &self,
        device: &Device,
        previous_scope: Option<&str>,
        batch: &HashMap<String, Option<Device>>,
    ) -> Result<(), HubError> {
        let scope = device.device_scope.as_deref().unwrap_or("");
        let changed = previous_scope != Some(scope);
        if device.capabilities.iot_edge {
            match device.parent_scopes.as_slice() {
                [] => {}
                [parent] => {
                    if device.device_scope.as_deref() == Some(parent.as_str()) {
                        return Err(scope_error(format!(
                            "parentScopes of IoT Edge device '{}' names the device itself",
                            device.device_id
                        )));
                    }
                    if self.edge_device_with_scope(parent, batch).await?.is_none() {
                        return Err(scope_error(format!(
                            "parentScopes entry '{parent}' is not the deviceScope of an IoT Edge device of this hub"
                        )));
                    }
                }
                _ => {
                    return Err(scope_error(
                        "an IoT Edge device has at most one parent: parentScopes holds at most one scope",
                    ))
                }
            }
            return Ok(());
        }
        if scope.is_empty() {
            if !device.parent_scopes.is_empty() {
                return Err(scope_error(
                    "parentScopes must be empty for a device without a deviceScope",
                ));
            }
            return Ok(());
        }
        if device.parent_scopes.as_slice() != [scope.to_string()] {
            return Err(scope_error(format!(
                "parentScopes of a device that is not an IoT Edge device must be [deviceScope] ('{scope}')"
            )));
        }
        if changed && self.edge_device_with_scope(scope, batch).await?.is_none() {
            return Err(scope_error(format!(
                "deviceScope '{scope}' is not the scope of an IoT Edge device of this hub"
            )));
        }
        Ok(())
    }

    /// The IoT Edge device whose own scope is `scope` (`ms-azure-iot-edge://{id}-{generation}`).
    async fn edge_device_with_scope(
        &self,
        scope: &str,
        batch: &HashMap<String, Option<Device>>,
    ) -> Result<Option<Device>, HubError> {
        let Some((owner, _generation)) = scope
            .strip_prefix(EDGE_SCOPE_PREFIX)
            .and_then(|rest| rest.rsplit_once('-'))
        else {
            return Ok(None);
        };
        if validate_device_id(owner).is_err() {
            return Ok(None);
        }
        let device = match batch.get(&owner.to_ascii_lowercase()) {
            Some(planned) => planned.clone(),
            None => self.load(owner).await?.map(|(s, _)| s.device),
        };
        Ok(device.filter(|d| d.capabilities.iot_edge && d.device_scope.as_deref() == Some(scope)))
    }

    fn new_device(
        &self,
        input: &DeviceInput,
        now: muster_proto::Timestamp,
    ) -> Result<Device, HubError> {
        let authentication =
            resolve_authentication(input.authentication.as_ref(), None, || self.new_key())?;
        let capabilities = input.capabilities.unwrap_or_default();
        let generation_id = self.generation_id(now);
        let given_scope = input.device_scope.clone().filter(|s| !s.is_empty());
        let device_scope = if capabilities.iot_edge {
            if given_scope.is_some() {
                return Err(scope_error(format!(
                    "the deviceScope of IoT Edge device '{}' is generated by the hub and cannot be set (name a parent with parentScopes)",
                    input.device_id
                )));
            }
            Some(edge_scope(&input.device_id, &generation_id))
        } else {
            given_scope
        };
        let parent_scopes = leaf_parent_scopes(
            capabilities.iot_edge,
            device_scope.as_deref(),
            input.parent_scopes.clone().unwrap_or_default(),
        );
        Ok(Device {
            device_id: input.device_id.clone(),
            generation_id,
            etag: self.device_etag(None),
            connection_state: ConnectionState::Disconnected,
            status: input.status.unwrap_or(DeviceStatus::Enabled),
            status_reason: input.status_reason.clone(),
            connection_state_updated_time: HubTime::NEVER,
            status_updated_time: HubTime::NEVER,
            last_activity_time: HubTime::NEVER,
            cloud_to_device_message_count: 0,
            authentication,
            capabilities,
            device_scope,
            parent_scopes,
        })
    }

    fn updated_device(
        &self,
        current: &Device,
        input: &DeviceInput,
        now: muster_proto::Timestamp,
    ) -> Result<Device, HubError> {
        let mut d = current.clone();
        d.authentication = resolve_authentication(
            input.authentication.as_ref(),
            Some(&current.authentication),
            || self.new_key(),
        )?;
        if let Some(status) = input.status {
            if status != current.status {
                d.status_updated_time = HubTime(Some(now));
            }
            d.status = status;
        }
        d.status_reason = input.status_reason.clone();
        if let Some(c) = input.capabilities {
            d.capabilities = c;
        }
        let given_scope = input.device_scope.clone().filter(|s| !s.is_empty());
        if d.capabilities.iot_edge {
            let own = edge_scope(&d.device_id, &d.generation_id);
            if given_scope.as_ref().is_some_and(|s| *s != own) {
                return Err(scope_error(format!(
                    "the deviceScope of IoT Edge device '{}' is its own ('{own}') and cannot be changed (name a parent with parentScopes)",
                    d.device_id
                )));
            }
            d.device_scope = Some(own);
        } else if current.capabilities.iot_edge {
            // No longer an edge device: its own scope goes; a parent may be given.
            d.device_scope = given_scope;
        } else if let Some(scope) = given_scope {
            d.device_scope = Some(scope);
        }
        if let Some(p) = input.parent_scopes.clone() {
            d.parent_scopes = p;
        } else if !d.capabilities.iot_edge && d.device_scope != current.device_scope {
            d.parent_scopes = Vec::new();
        }
        d.parent_scopes = leaf_parent_scopes(
            d.capabilities.iot_edge,
            d.device_scope.as_deref(),
            std::mem::take(&mut d.parent_scopes),
        );
        d.etag = self.device_etag(Some(&current.etag));
        Ok(d)
    }

    /// `GET /devices/{id}`.
    pub async fn get_device(&self, device_id: &str) -> Result<Device, HubError> {
        validate_device_id(device_id)?;
        match self.load(device_id).await? {
            Some((s, _)) => Ok(s.device),
            None => Err(HubError::device_not_found(device_id)),
        }
    }

    /// `DELETE /devices/{id}`: removes the identity and its twin. If-Match `*`, absent or
    /// the current device etag; another etag → 412.
    pub async fn delete_device(&self, device_id: &str, if_match: &IfMatch) -> Result<(), HubError> {
        validate_device_id(device_id)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some((stored, record_etag)) = self.load(device_id).await? else {
                return Err(HubError::device_not_found(device_id));
            };
            if !if_match.matches(&stored.device.etag) {
                return Err(precondition_failed("device", &stored.device.device_id));
            }
            let outcome = self
                .write_one(Write::delete(
                    Collection::HubDevices,
                    self.store_key(device_id),
                    Expect::Etag(record_etag),
                ))
                .await?;
            if outcome.is_applied() {
                self.after_delete(device_id);
                return Ok(());
            }
        }
        Err(contention(device_id))
    }

    /// `GET /devices?top=N`: up to `top` devices (1..=1000; anything else means 1000),
    /// ordered by lower-cased id.
    pub async fn list_devices(&self, top: Option<i64>) -> Result<Vec<Device>, HubError> {
        let limit = match top {
            Some(n) if (1..=MAX_LIST as i64).contains(&n) => n as usize,
            _ => MAX_LIST,
        };
        let records = self
            .inner
            .store
            .list(
                Collection::HubDevices,
                ListQuery {
                    partition: Some(self.inner.partition.clone()),
                    after: None,
                    limit,
                },
            )
            .await?;
        records
            .into_iter()
            .map(|r| decode(r).map(|(s, _)| s.device))
            .collect()
    }

    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, device_id: &str) -> Result<Twin, HubError> {
        validate_device_id(device_id)?;
        match self.load(device_id).await? {
            Some((s, _)) => Ok(render_twin(&s)),
            None => Err(HubError::device_not_found(device_id)),
        }
    }

    /// The device-side twin document (MQTT `$iothub/twin/GET`):
    /// `{"desired": {..., "$version": n}, "reported": {..., "$version": m}}`.
    pub async fn device_twin_document(&self, device_id: &str) -> Result<Value, HubError> {
        validate_device_id(device_id)?;
        match self.load(device_id).await? {
            Some((s, _)) => Ok(serde_json::json!({
                "desired": s.twin.desired.render(false),
                "reported": s.twin.reported.render(false),
            })),
            None => Err(HubError::device_not_found(device_id)),
        }
    }

    /// `PATCH /twins/{id}`: merges tags and desired properties (`null` deletes a key).
    /// A change bumps the twin `version`; a desired change also bumps desired `$version` and
    /// is published to [`Self::subscribe_desired`]. If-Match: absent, `*` or the twin etag.
    pub async fn update_twin(
        &self,
        device_id: &str,
        update: TwinUpdate,
        if_match: &IfMatch,
    ) -> Result<Twin, HubError> {
        update.validate()?;
        self.twin_write(device_id, if_match, |twin, now| {
            let tags_changed = match &update.tags {
                Some(patch) => {
                    let mut tags = twin.tags.clone();
                    let changed = properties::merge(&mut tags, patch);
                    if changed {
                        properties::check_size(&tags, "tags", properties::MAX_TAGS_BYTES)?;
                        twin.tags = tags;
                    }
                    changed
                }
                None => false,
            };
            // Every desired update counts, equal values included: IoT Hub bumps `$version`
            // and notifies the device each time.
            let change = if update.clear_desired {
                Some(twin.desired.clear(now, true))
            } else {
                match &update.desired {
                    Some(patch) if !patch.is_empty() => {
                        let change = twin.desired.apply_update(patch, now, true);
                        properties::check_size(
                            &twin.desired.values,
                            "desired properties",
                            properties::MAX_PROPERTIES_BYTES,
                        )?;
                        Some(change)
                    }
                    _ => None,
                }
            };
            Ok((tags_changed || change.is_some(), change))
        })
        .await
    }

    /// `PUT /twins/{id}`: replaces tags and desired properties (a part not sent is cleared).
    /// Versions and notification as for [`Self::update_twin`]; the published patch is the
    /// difference, with `null` for removed keys.
    pub async fn replace_twin(
        &self,
        device_id: &str,
        update: TwinUpdate,
        if_match: &IfMatch,
    ) -> Result<Twin, HubError> {
        update.validate()?;
        self.twin_write(device_id, if_match, |twin, now| {
            let (tags_changed, change) = replace_twin_state(twin, &update, now)?;
            let desired_sent = update.desired.is_some() || update.clear_desired;
            if desired_sent && change.is_empty() {
                // Replaced with equal values: still an update (version and notification).
                twin.desired.version += 1;
                let stamp_version = twin.desired.version;
                twin.desired.stamp_root(now, stamp_version);
                return Ok((true, Some(Map::new())));
            }
            let change = (!change.is_empty()).then_some(change);
            Ok((tags_changed || change.is_some(), change))
        })
        .await
    }

    /// A device's reported-properties patch (MQTT `$iothub/twin/PATCH/properties/reported/`):
    /// merges it (`null` deletes) and returns the reported `$version` afterwards (unchanged
    /// when the patch changed nothing).
    pub async fn update_reported(
        &self,
        device_id: &str,
        mut patch: Map<String, Value>,
    ) -> Result<u64, HubError> {
        properties::strip_system_keys(&mut patch);
        properties::validate_collection(&patch, "reported")?;
        let mut version = 0;
        self.twin_write(device_id, &IfMatch::None, |twin, now| {
            let change = twin.reported.apply_patch(&patch, now, false);
            if !change.is_empty() {
                properties::check_size(
                    &twin.reported.values,
                    "reported properties",
                    properties::MAX_PROPERTIES_BYTES,
                )?;
            }
            version = twin.reported.version;
            // Reported changes are never pushed to the device.
            Ok((!change.is_empty(), None))
        })
        .await?;
        Ok(version)
    }

    /// Read, change, conditionally write the twin; retried on a concurrent change. `change`
    /// returns whether anything changed and the desired change to publish.
    async fn twin_write<F>(
        &self,
        device_id: &str,
        if_match: &IfMatch,
        mut change: F,
    ) -> Result<Twin, HubError>
    where
        F: FnMut(&mut TwinState, &str) -> Result<(bool, Option<Map<String, Value>>), HubError>,
    {
        validate_device_id(device_id)?;
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut stored, record_etag)) = self.load(device_id).await? else {
                return Err(HubError::device_not_found(device_id));
            };
            if !if_match.matches(&twin_etag(stored.twin.version)) {
                return Err(precondition_failed("twin", &stored.device.device_id));
            }
            let now = self.inner.clock.now().to_dps_string();
            let mut twin = stored.twin.clone();
            let (changed, desired_change) = change(&mut twin, &now)?;
            if !changed {
                return Ok(render_twin(&stored));
            }
            twin.version += 1;
            stored.twin = twin;
            if self
                .write(device_id, &stored, Expect::Etag(record_etag))
                .await?
            {
                if let Some(change) = desired_change {
                    self.notify(&stored, change);
                }
                return Ok(render_twin(&stored));
            }
        }
        Err(contention(device_id))
    }

    /// Publishes a desired update (possibly with no values: an update that changed none
    /// still carries the new `$version`).
    fn notify(&self, stored: &StoredDevice, change: Map<String, Value>) {
        let version = stored.twin.desired.version;
        let mut patch = change;
        patch.insert("$version".into(), Value::from(version));
        let key = self.store_key(&stored.device.device_id);
        if let Some(c) = self.cluster() {
            c.publish(&crate::cluster::HubEvent::Desired {
                device: key.clone(),
                device_id: stored.device.device_id.clone(),
                version,
                patch: patch.clone(),
            });
        }
        self.deliver_desired(&key, &stored.device.device_id, version, patch);
    }

    /// Sends a desired change to the device's session on this node, or queues it in the
    /// device's persistent session kept here.
    pub(crate) fn deliver_desired(
        &self,
        device_key: &str,
        device_id: &str,
        version: u64,
        patch: Map<String, Value>,
    ) {
        // A device away with a persistent session gets it when it resumes.
        if let Ok(body) = serde_json::to_vec(&patch) {
            self.inner.endpoint.queue_for_absent(
                device_key,
                format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                body,
            );
        }
        // No subscriber is not an error.
        let _ = self.inner.desired_tx.send(DesiredChange {
            device_id: device_id.to_string(),
            version,
            patch,
        });
    }

    pub(crate) async fn load(
        &self,
        device_id: &str,
    ) -> Result<Option<(StoredDevice, String)>, HubError> {
        let record = self
            .inner
            .store
            .get(Collection::HubDevices, &self.store_key(device_id))
            .await?;
        record.map(decode).transpose()
    }

    /// One conditional put; `false` when another writer changed the record first.
    async fn write(
        &self,
        device_id: &str,
        stored: &StoredDevice,
        expect: Expect,
    ) -> Result<bool, HubError> {
        let write = self.device_write(device_id, stored, expect)?;
        Ok(self.write_one(write).await?.is_applied())
    }

    /// The store write that puts a device record.
    pub(crate) fn device_write(
        &self,
        device_id: &str,
        stored: &StoredDevice,
        expect: Expect,
    ) -> Result<Write, HubError> {
        Write::put_serialized(
            Collection::HubDevices,
            self.store_key(device_id),
            expect,
            stored,
        )
        .map(|w| w.with_partition(Some(self.inner.partition.clone())))
        .map_err(|e| HubError::internal("encoding a device record", e))
    }

    /// The store write that deletes a device record.
    pub(crate) fn device_delete(&self, device_id: &str, expect: Expect) -> Write {
        Write::delete(Collection::HubDevices, self.store_key(device_id), expect)
    }

    pub(crate) async fn write_one(&self, write: Write) -> Result<WriteOutcome, HubError> {
        let mut outcomes = self.inner.store.write(vec![write]).await?;
        outcomes.pop().ok_or_else(|| {
            HubError::internal("writing a device record", "the store returned no outcome")
        })
    }

    fn new_key(&self) -> String {
        let mut b = [0u8; 32];
        self.inner.entropy.fill(&mut b);
        B64.encode(b)
    }

    /// IoT Hub-shaped: base64 of a decimal number, different from the previous one.
    fn device_etag(&self, previous: Option<&str>) -> String {
        loop {
            let mut b = [0u8; 8];
            self.inner.entropy.fill(&mut b);
            let n = u64::from_le_bytes(b) % 9_000_000_000 + 1_000_000_000;
            let etag = B64.encode(n.to_string());
            if previous != Some(etag.as_str()) {
                return etag;
            }
        }
    }

    /// IoT Hub-shaped: .NET ticks of the creation time with the last four digits random.
    fn generation_id(&self, now: muster_proto::Timestamp) -> String {
        const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;
        let ticks = now.0.timestamp() * 10_000_000
            + i64::from(now.0.timestamp_subsec_nanos() / 100)
            + UNIX_EPOCH_TICKS;
        let mut b = [0u8; 2];
        self.inner.entropy.fill(&mut b);
        let low = i64::from(u16::from_le_bytes(b) % 10_000);
        (ticks - ticks.rem_euclid(10_000) + low).to_string()
    }
}

/// Replaces tags and desired properties; returns whether the tags changed and the desired
/// change.
fn replace_twin_state(
    twin: &mut TwinState,
    update: &TwinUpdate,
    now: &str,
) -> Result<(bool, Map<String, Value>), HubError> {
    let tags = update
        .tags
        .as_ref()
        .map(properties::drop_nulls)
        .unwrap_or_default();
    properties::check_size(&tags, "tags", properties::MAX_TAGS_BYTES)?;
    let tags_changed = tags != twin.tags;
    twin.tags = tags;
    let empty = Map::new();
    let desired = if update.clear_desired {
        &empty
    } else {
        update.desired.as_ref().unwrap_or(&empty)
    };
    let change = twin.desired.replace(desired, now, true);
    properties::check_size(
        &twin.desired.values,
        "desired properties",
        properties::MAX_PROPERTIES_BYTES,
    )?;
    Ok((tags_changed, change))
}

fn render_twin(s: &StoredDevice) -> Twin {
    let d = &s.device;
    Twin {
        device_id: d.device_id.clone(),
        model_id: String::new(),
        etag: twin_etag(s.twin.version),
        device_etag: d.etag.clone(),
        status: d.status,
        status_reason: d.status_reason.clone(),
        status_update_time: d.status_updated_time,
        connection_state: d.connection_state,
        last_activity_time: d.last_activity_time,
        cloud_to_device_message_count: d.cloud_to_device_message_count,
        authentication_type: d.authentication.auth_type,
        x509_thumbprint: d.authentication.x509_thumbprint.clone(),
        version: s.twin.version,
        tags: s.twin.tags.clone(),
        properties: TwinProperties {
            desired: s.twin.desired.render(true),
            reported: s.twin.reported.render(true),
        },
        capabilities: d.capabilities,
        device_scope: d.device_scope.clone(),
        parent_scopes: d.parent_scopes.clone(),
    }
}

fn decode(record: Record) -> Result<(StoredDevice, String), HubError> {
    let stored: StoredDevice = serde_json::from_value(record.body).map_err(|e| {
        HubError::internal(
            "reading a device record",
            format!("record {} is corrupt: {e}", record.key),
        )
    })?;
    Ok((stored, record.etag))
}

fn precondition_failed(what: &str, device_id: &str) -> HubError {
    HubError::new(
        HubErrorCode::PreconditionFailed,
        format!(
            "Precondition failed: the {what} etag of device '{device_id}' does not match If-Match."
        ),
    )
}

fn contention(device_id: &str) -> HubError {
    HubError::new(
        HubErrorCode::ServerError,
        format!("device '{device_id}' kept changing during the write; retry"),
    )
}
