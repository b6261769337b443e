//! The built-in hub as the registration engine's in-process [`HubConnection`].
//!
//! The engine writes linked hubs through their registry REST API; for the hub that lives in
//! this process that would be an HTTPS call (and a TLS handshake when the pool is cold) to
//! itself. This adapter runs the same registry operations directly, with the same bodies the
//! REST client sends, so the semantics cannot drift: the device and its twin go into the store
//! in one write instead of two calls.
//!
//! [`EngineHubDevices`] lends the engine's hub connections to the web console's cascade.

use async_trait::async_trait;
use muster_hub::error::HubErrorCode;
use muster_hub::model::{DeviceInput, TwinUpdate};
use muster_hub::HubRegistry;
use muster_proto::IfMatch;
use muster_registration::hub_client::{HubDeviceSpec, HubError, StorePut, TwinWrite};
use muster_registration::HubConnection;
use serde_json::{json, Value};

/// The console's cascade: devices deleted from any linked hub through the engine, which holds
/// the linked hubs' credentials and reaches the built-in hub in process.
pub struct EngineHubDevices(pub muster_registration::Engine);

#[async_trait]
impl muster_console::HubDeviceRemover for EngineHubDevices {
    async fn remove(&self, hub: &str, device_id: &str) -> Result<(), String> {
        self.0
            .remove_hub_device(hub, device_id)
            .await
            .map_err(|f| f.message)
    }

    async fn deprovision(&self, registration_id: &str) -> Result<Option<usize>, String> {
        match self.0.deprovision(registration_id, None).await {
            Ok(done) => Ok(Some(done.removed.len())),
            Err(f) if f.code == muster_proto::ErrorCode::RegistrationNotFound => Ok(None),
            Err(f) => Err(f.message),
        }
    }
}

/// `POST /certificates/issued/{serial}/revoke` and the issuing CA names of the service API,
/// carried out by the engine.
#[async_trait]
impl muster_service_api::CertificateIssuer for EngineHubDevices {
    fn issuing_ca_names(&self) -> Vec<String> {
        self.0.issuing_ca_names()
    }

    async fn revoke(
        &self,
        serial: &str,
        reason: Option<String>,
    ) -> Result<muster_proto::IssuedCertificate, muster_service_api::ApiError> {
        self.0
            .revoke_issued(serial, reason)
            .await
            .map(|r| r.certificate)
            .map_err(|f| muster_service_api::ApiError::new(f.code, f.message))
    }
}

/// `POST /deprovisions/{id}` of the service API, carried out by the engine.
#[async_trait]
impl muster_service_api::Deprovisioner for EngineHubDevices {
    async fn deprovision(
        &self,
        registration_id: &str,
        etag: Option<&str>,
    ) -> Result<Value, muster_service_api::ApiError> {
        let done = self
            .0
            .deprovision(registration_id, etag)
            .await
            .map_err(|f| muster_service_api::ApiError::new(f.code, f.message))?;
        serde_json::to_value(done)
            .map_err(|e| muster_service_api::ApiError::internal("encoding a deprovisioning", e))
    }
}

/// The built-in hub, reached without leaving the process.
pub struct LocalHub {
    registry: HubRegistry,
}

impl LocalHub {
    pub fn new(registry: HubRegistry) -> Self {
        Self { registry }
    }

    fn refused(&self, action: &'static str, e: muster_hub::error::HubError) -> HubError {
        HubError::Refused {
            hub: self.registry.host_name().to_string(),
            action,
            status: e.code.status(),
            message: e.wire_message(),
        }
    }

    /// One registry write of the device, with its twin when `twin` says so for a device that
    /// `existed` or not.
    async fn write(
        &self,
        input: &DeviceInput,
        twin: TwinWrite<'_>,
        if_match: &IfMatch,
        existed: bool,
    ) -> Result<(), muster_hub::error::HubError> {
        match twin.parts(existed) {
            Some((tags, desired)) => self
                .registry
                .create_or_update_device_with_twin(
                    input.clone(),
                    if_match,
                    twin_update(tags, desired)?,
                )
                .await
                .map(|_| ()),
            None => self
                .registry
                .create_or_update_device(input.clone(), if_match)
                .await
                .map(|_| ()),
        }
    }
}

/// The registry's input for a device spec, from the same body the REST client sends.
fn device_input(spec: &HubDeviceSpec) -> Result<DeviceInput, muster_hub::error::HubError> {
    serde_json::from_value(spec.to_json())
        .map_err(|e| muster_hub::error::HubError::invalid(e.to_string()))
}

fn twin_update(tags: &Value, desired: &Value) -> Result<TwinUpdate, muster_hub::error::HubError> {
    TwinUpdate::from_json(&json!({"tags": tags, "properties": {"desired": desired}}))
}

#[async_trait]
impl HubConnection for LocalHub {
    /// One store write holds the device and its twin.
    fn writes_device_and_twin_together(&self) -> bool {
        true
    }

    async fn put_device(
        &self,
        spec: &HubDeviceSpec,
        twin: TwinWrite<'_>,
    ) -> Result<bool, HubError> {
        let input = device_input(spec).map_err(|e| self.refused("create device", e))?;
        // Create; an existing device is overwritten with If-Match `*`, as over REST.
        match self.write(&input, twin, &IfMatch::None, false).await {
            Ok(()) => Ok(false),
            Err(e) if e.code == HubErrorCode::DeviceAlreadyExists => {
                self.write(&input, twin, &IfMatch::Any, true)
                    .await
                    .map_err(|e| self.refused("update device", e))?;
                Ok(true)
            }
            Err(e) => Err(self.refused("create device", e)),
        }
    }

    /// The built-in hub keeps its devices in the engine's store (see `Engine::with_local_hub`).
    async fn prepare_put(
        &self,
        spec: &HubDeviceSpec,
        twin: TwinWrite<'_>,
    ) -> Result<Option<StorePut>, HubError> {
        let input = device_input(spec).map_err(|e| self.refused("create device", e))?;
        let (write, put) = self
            .registry
            .prepare_put_device(input, |existed| {
                twin.parts(existed)
                    .map(|(tags, desired)| twin_update(tags, desired))
                    .transpose()
            })
            .await
            .map_err(|e| self.refused("create device", e))?;
        let registry = self.registry.clone();
        Ok(Some(StorePut {
            write,
            existed: put.existed(),
            committed: Box::new(move || registry.finish_prepared_put(&put)),
        }))
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        match self.registry.delete_device(device_id, &IfMatch::Any).await {
            Ok(()) => Ok(()),
            Err(e) if e.code == HubErrorCode::DeviceNotFound => Ok(()),
            Err(e) => Err(self.refused("delete device", e)),
        }
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<Value>, HubError> {
        match self.registry.get_twin(device_id).await {
            Ok(t) => serde_json::to_value(t).map(Some).map_err(|e| {
                self.refused(
                    "read twin",
                    muster_hub::error::HubError::invalid(e.to_string()),
                )
            }),
            Err(e) if e.code == HubErrorCode::DeviceNotFound => Ok(None),
            Err(e) => Err(self.refused("read twin", e)),
        }
    }

    async fn device_etag(&self, device_id: &str) -> Result<Option<String>, HubError> {
        match self.registry.get_device(device_id).await {
            Ok(d) => Ok(Some(d.etag)),
            Err(e) if e.code == HubErrorCode::DeviceNotFound => Ok(None),
            Err(e) => Err(self.refused("read device", e)),
        }
    }

    async fn delete_device_if(&self, device_id: &str, etag: &str) -> Result<bool, HubError> {
        let if_match = IfMatch::Etag(etag.to_string());
        match self.registry.delete_device(device_id, &if_match).await {
            Ok(()) => Ok(true),
            Err(e) if e.code == HubErrorCode::DeviceNotFound => Ok(true),
            Err(e) if e.code == HubErrorCode::PreconditionFailed => Ok(false),
            Err(e) => Err(self.refused("delete device", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use muster_proto::runtime::{ManualClock, SeededEntropy};
    use muster_proto::Timestamp;
    use muster_registration::hub_client::HubAuthentication;
    use muster_store::SqliteStore;

    use super::*;

    async fn hub(dir: &tempfile::TempDir) -> (LocalHub, HubRegistry) {
        let store = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("store"));
        let entropy = Arc::new(SeededEntropy::new(7));
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_unix_millis(1_700_000_000_000).expect("time"),
        ));
        let policies = muster_hub::auth::default_policies(&*entropy);
        let registry = HubRegistry::new(store, "hub.test".into(), policies, clock, entropy);
        (LocalHub::new(registry.clone()), registry)
    }

    // 16-byte keys, base64.
    const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAA==";
    const KEY_B: &str = "BBBBBBBBBBBBBBBBBBBBBA==";
    const KEY_C: &str = "CCCCCCCCCCCCCCCCCCCCCA==";

    fn spec(id: &str, key: &str) -> HubDeviceSpec {
        HubDeviceSpec {
            device_id: id.into(),
            authentication: HubAuthentication::Sas {
                primary_key: key.into(),
                secondary_key: key.into(),
            },
            iot_edge: false,
        }
    }

    fn tags(registry_twin: &Value) -> Value {
        registry_twin.get("tags").cloned().unwrap_or(Value::Null)
    }

    #[tokio::test]
    async fn writes_device_and_twin_like_the_rest_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (local, registry) = hub(&dir).await;
        let (t1, d1) = (json!({"line": "a"}), json!({"interval": 5}));
        let initial = TwinWrite::ReplaceIfCreated {
            tags: &t1,
            desired: &d1,
        };

        // New device: created with its initial twin.
        assert!(!local
            .put_device(&spec("d1", KEY_A), initial)
            .await
            .expect("create"));
        let twin = local.get_twin("d1").await.expect("twin").expect("exists");
        assert_eq!(tags(&twin), t1);
        assert_eq!(
            twin.pointer("/properties/desired/interval"),
            Some(&json!(5))
        );

        // Existing device on an initial assignment: identity overwritten, twin kept.
        let (t2, d2) = (json!({"line": "b"}), json!({}));
        let again = TwinWrite::ReplaceIfCreated {
            tags: &t2,
            desired: &d2,
        };
        assert!(local
            .put_device(&spec("d1", KEY_B), again)
            .await
            .expect("update"));
        let device = registry.get_device("d1").await.expect("device");
        assert_eq!(
            device.authentication.symmetric_key.primary_key.as_deref(),
            Some(KEY_B)
        );
        let twin = local.get_twin("d1").await.expect("twin").expect("exists");
        assert_eq!(tags(&twin), t1);

        // Replace overwrites the twin of an existing device; Keep leaves it.
        let replace = TwinWrite::Replace {
            tags: &t2,
            desired: &d2,
        };
        assert!(local
            .put_device(&spec("d1", KEY_B), replace)
            .await
            .expect("replace"));
        let twin = local.get_twin("d1").await.expect("twin").expect("exists");
        assert_eq!(tags(&twin), t2);
        assert!(twin.pointer("/properties/desired/interval").is_none());
        assert!(local
            .put_device(&spec("d1", KEY_C), TwinWrite::Keep)
            .await
            .expect("keep"));
        assert_eq!(
            tags(&local.get_twin("d1").await.expect("twin").expect("exists")),
            t2
        );

        // Delete is idempotent; a missing twin is None, not an error.
        local.delete_device("d1").await.expect("delete");
        local.delete_device("d1").await.expect("delete again");
        assert!(local.get_twin("d1").await.expect("twin").is_none());
    }

    /// The engine commits a prepared put in its own batch: the device and the caller's record
    /// land together, and a device changed since the read undoes the whole batch.
    #[tokio::test]
    async fn a_prepared_put_commits_with_the_callers_batch_or_not_at_all() {
        use muster_store::{Collection, Expect, Store, Write, WriteOutcome};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("hub.db")).expect("store"));
        let entropy = Arc::new(SeededEntropy::new(7));
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_unix_millis(1_700_000_000_000).expect("time"),
        ));
        let policies = muster_hub::auth::default_policies(&*entropy);
        let registry = HubRegistry::new(store.clone(), "hub.test".into(), policies, clock, entropy);
        let local = LocalHub::new(registry.clone());
        let (t1, d1) = (json!({"line": "a"}), json!({"interval": 5}));
        let initial = TwinWrite::ReplaceIfCreated {
            tags: &t1,
            desired: &d1,
        };
        let record = |v: u32| {
            Write::put(
                Collection::Registrations,
                "r1",
                Expect::Any,
                json!({"v": v}),
            )
        };

        // Prepared, nothing is written until the caller commits.
        let put = local
            .prepare_put(&spec("d1", KEY_A), initial)
            .await
            .expect("prepare")
            .expect("the built-in hub prepares store writes");
        assert!(!put.existed);
        assert!(local.get_twin("d1").await.expect("twin").is_none());
        let outcomes = store
            .write(vec![record(1), put.write])
            .await
            .expect("write");
        assert!(
            outcomes.iter().all(WriteOutcome::is_applied),
            "{outcomes:?}"
        );
        (put.committed)();
        let twin = local.get_twin("d1").await.expect("twin").expect("exists");
        assert_eq!(tags(&twin), t1, "the initial twin came with the device");

        // Read, then the device changes before the commit: the batch is rolled back.
        let stale = local
            .prepare_put(&spec("d1", KEY_B), initial)
            .await
            .expect("prepare")
            .expect("store writes");
        assert!(stale.existed);
        local
            .put_device(&spec("d1", KEY_C), TwinWrite::Keep)
            .await
            .expect("a concurrent write");
        let outcomes = store
            .write(vec![record(2), stale.write])
            .await
            .expect("write");
        assert_eq!(
            outcomes,
            vec![WriteOutcome::RolledBack, WriteOutcome::EtagMismatch]
        );
        let kept = store
            .get(Collection::Registrations, "r1")
            .await
            .expect("get")
            .expect("record");
        assert_eq!(kept.body, json!({"v": 1}), "the record was rolled back too");
        let device = registry.get_device("d1").await.expect("device");
        assert_eq!(
            device.authentication.symmetric_key.primary_key.as_deref(),
            Some(KEY_C),
            "the concurrent write stands"
        );
    }

    #[tokio::test]
    async fn a_conditional_delete_spares_a_device_written_since_its_etag_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (local, _) = hub(&dir).await;
        local
            .put_device(&spec("d1", KEY_A), TwinWrite::Keep)
            .await
            .expect("create");
        let read = local
            .device_etag("d1")
            .await
            .expect("etag")
            .expect("exists");
        // A later registration writes the identity again: a new etag.
        local
            .put_device(&spec("d1", KEY_A), TwinWrite::Keep)
            .await
            .expect("rewrite");
        assert!(!local.delete_device_if("d1", &read).await.expect("delete"));
        let now = local.device_etag("d1").await.expect("etag").expect("kept");
        assert_ne!(now, read);
        assert!(local.delete_device_if("d1", &now).await.expect("delete"));
        assert_eq!(local.device_etag("d1").await.expect("etag"), None);
        assert!(local.delete_device_if("d1", &now).await.expect("gone"));
    }

    #[tokio::test]
    async fn refusals_carry_the_hub_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (local, _) = hub(&dir).await;
        let err = local
            .put_device(&spec("bad id/with slash", KEY_A), TwinWrite::Keep)
            .await
            .expect_err("invalid id");
        assert_eq!(err.status(), Some(400), "{err}");
    }
}
