//! Intent before effect, against a hub whose device and twin are two writes (like a linked
//! hub over REST): a failure between the device put and the twin write, and a device that
//! registers again between a deprovisioning's record delete and its hub delete.
//!
//! The hub is an in-memory [`HubConnection`] with injected faults and pauses, so each
//! interleaving is driven step by step, without timing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use muster_proto::device::DeviceRegistration;
use muster_proto::runtime::{SeededEntropy, SystemClock};
use muster_proto::{IdScope, SasToken};
use muster_registration::hub_client::{HubDeviceSpec, HubError, TwinWrite};
use muster_registration::{
    DeviceCredential, DeviceRegistrar, Engine, EngineConfig, HubConnection, RegisterRequest,
};
use muster_store::{Collection, Expect, SqliteStore, Store, Write};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const SCOPE: &str = "0ne00000001";
const HUB: &str = "twostep.example";
const DEVICE_KEY: [u8; 32] = [7; 32];

/// One device in the fake hub: its identity etag (new on every identity write) and twin.
#[derive(Clone)]
struct FakeDevice {
    etag: u64,
    tags: Value,
    desired: Value,
}

/// A pause inside the next hub delete: tells the test it was reached, then waits to go on.
struct Pause {
    reached: oneshot::Sender<()>,
    proceed: oneshot::Receiver<()>,
}

/// A hub that writes a device and its twin in two steps, as `RestHub` does.
#[derive(Default)]
struct TwoStepHub {
    devices: Mutex<HashMap<String, FakeDevice>>,
    next_etag: Mutex<u64>,
    /// The twin write after a device put answers 503 (the device stays written).
    fail_twin_write: AtomicBool,
    pause_delete: Mutex<Option<Pause>>,
}

impl TwoStepHub {
    fn device(&self, id: &str) -> Option<FakeDevice> {
        self.devices.lock().expect("lock").get(id).cloned()
    }

    fn new_etag(&self) -> u64 {
        let mut n = self.next_etag.lock().expect("lock");
        *n += 1;
        *n
    }

    async fn pause_if_asked(&self) {
        let pause = self.pause_delete.lock().expect("lock").take();
        if let Some(p) = pause {
            let _ = p.reached.send(());
            let _ = p.proceed.await;
        }
    }
}

fn refused(status: u16, action: &'static str) -> HubError {
    HubError::Refused {
        hub: HUB.into(),
        action,
        status,
        message: "injected".into(),
    }
}

#[async_trait::async_trait]
impl HubConnection for TwoStepHub {
    async fn put_device(
        &self,
        spec: &HubDeviceSpec,
        twin: TwinWrite<'_>,
    ) -> Result<bool, HubError> {
        let etag = self.new_etag();
        // Step 1: the identity (created empty, or overwritten).
        let existed = {
            let mut devices = self.devices.lock().expect("lock");
            match devices.get_mut(&spec.device_id) {
                Some(d) => {
                    d.etag = etag;
                    true
                }
                None => {
                    devices.insert(
                        spec.device_id.clone(),
                        FakeDevice {
                            etag,
                            tags: json!({}),
                            desired: json!({}),
                        },
                    );
                    false
                }
            }
        };
        // Step 2: the twin, a separate call that may fail.
        if let Some((tags, desired)) = twin.parts(existed) {
            if self.fail_twin_write.load(Ordering::SeqCst) {
                return Err(refused(503, "write twin"));
            }
            let mut devices = self.devices.lock().expect("lock");
            let d = devices
                .get_mut(&spec.device_id)
                .ok_or_else(|| refused(404, "write twin"))?;
            d.tags = tags.clone();
            d.desired = desired.clone();
        }
        Ok(existed)
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.pause_if_asked().await;
        self.devices.lock().expect("lock").remove(device_id);
        Ok(())
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<Value>, HubError> {
        Ok(self.device(device_id).map(|d| {
            json!({"deviceId": device_id, "deviceEtag": d.etag.to_string(),
                "tags": d.tags, "properties": {"desired": d.desired}})
        }))
    }

    async fn device_etag(&self, device_id: &str) -> Result<Option<String>, HubError> {
        Ok(self.device(device_id).map(|d| d.etag.to_string()))
    }

    async fn delete_device_if(&self, device_id: &str, etag: &str) -> Result<bool, HubError> {
        self.pause_if_asked().await;
        let mut devices = self.devices.lock().expect("lock");
        match devices.get(device_id) {
            Some(d) if d.etag.to_string() != etag => Ok(false),
            _ => {
                devices.remove(device_id);
                Ok(true)
            }
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    hub: Arc<TwoStepHub>,
}

impl Fixture {
    /// A store with one linked hub (the fake) and an individual enrollment per id, each with
    /// an initial twin.
    async fn new(ids: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).expect("store"));
        let key = B64.encode(DEVICE_KEY);
        let mut writes = vec![Write::put(
            Collection::LinkedHubs,
            HUB,
            Expect::Any,
            json!({"name": HUB, "allocationWeight": 1, "applyAllocationPolicy": true,
                "connectionString": format!("HostName={HUB};SharedAccessKeyName=owner;SharedAccessKey={key}")}),
        )];
        for id in ids {
            writes.push(Write::put(
                Collection::Enrollments,
                id.to_ascii_lowercase(),
                Expect::Any,
                json!({"registrationId": id,
                    "attestation": {"type": "symmetricKey",
                        "symmetricKey": {"primaryKey": key, "secondaryKey": key}},
                    "initialTwin": {"tags": {"line": "a"},
                        "properties": {"desired": {"interval": 5}}}}),
            ));
        }
        store.write(writes).await.expect("seed");
        Fixture {
            _dir: dir,
            store,
            hub: Arc::new(TwoStepHub::default()),
        }
    }

    /// An engine on the fixture's store and hub: a new one stands for a restarted server.
    fn engine(&self) -> Engine {
        let mut config = EngineConfig::new(IdScope::new(SCOPE).expect("scope"));
        // The engine's own retry of a kept intent must not race the test's restart.
        config.retry_after_secs = 600;
        Engine::new(
            self.store.clone(),
            Arc::new(SystemClock),
            Arc::new(SeededEntropy::new(1)),
            unused_http_client(),
            config,
        )
        .with_local_hub(HUB, self.hub.clone())
    }

    async fn record(&self, id: &str) -> Option<Value> {
        self.store
            .get(Collection::Registrations, &id.to_ascii_lowercase())
            .await
            .expect("read")
            .map(|r| r.body)
    }

    /// Polls the store until the record of `id` says `status`, with a deadline.
    async fn wait_for_status(&self, id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let record = self.record(id).await;
            if let Some(r) = record.as_ref().filter(|r| r["status"] == status) {
                return r.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never became {status}: {record:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The engine's HTTP client (webhooks, REST hubs), which these tests never use: no roots.
fn unused_http_client() -> reqwest::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("http client")
}

fn request(id: &str) -> RegisterRequest {
    let expiry = chrono::Utc::now().timestamp() + 3600;
    RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: id.into(),
        credential: DeviceCredential::Sas(SasToken::generate(
            &format!("{SCOPE}/registrations/{id}"),
            &DEVICE_KEY,
            Some("registration"),
            expiry,
        )),
        body: DeviceRegistration::default(),
    }
}

#[tokio::test]
async fn a_twin_write_failing_after_the_device_put_is_finished_with_the_initial_twin() {
    let f = Fixture::new(&["dev-twin"]).await;
    f.hub.fail_twin_write.store(true, Ordering::SeqCst);
    let reply = f.engine().register(request("dev-twin")).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["errorCode"], 503003, "{}", reply.body);
    // The device is in the hub without its twin; the intent is kept.
    let half = f.hub.device("dev-twin").expect("device put");
    assert_eq!(half.tags, json!({}));
    let intent = f.record("dev-twin").await.expect("record");
    assert_eq!(intent["status"], "assigning");
    assert_eq!(intent["pending"]["createsDevice"], true, "{intent}");

    // The hub works again; a restarted engine reconciles the intent.
    f.hub.fail_twin_write.store(false, Ordering::SeqCst);
    let restarted = f.engine();
    assert_eq!(restarted.resume_pending().await.expect("resume"), 1);
    let record = f.wait_for_status("dev-twin", "assigned").await;
    assert_eq!(record["substatus"], "initialAssignment", "{record}");
    let device = f.hub.device("dev-twin").expect("device");
    assert_eq!(device.tags, json!({"line": "a"}));
    assert_eq!(device.desired, json!({"interval": 5}));

    // Idempotent: running the finished registration's flow again changes nothing.
    assert_eq!(restarted.resume_pending().await.expect("resume"), 0);
}

#[tokio::test]
async fn a_device_registering_during_a_deprovisioning_keeps_its_hub_device() {
    let f = Fixture::new(&["dev-race"]).await;
    let engine = f.engine();
    let first = engine.register(request("dev-race")).await;
    assert_eq!(first.body["status"], "assigned", "{}", first.body);
    assert!(f.hub.device("dev-race").is_some());

    // The deprovisioning stops between its record delete and its hub delete ...
    let (reached_tx, reached_rx) = oneshot::channel();
    let (proceed_tx, proceed_rx) = oneshot::channel();
    *f.hub.pause_delete.lock().expect("lock") = Some(Pause {
        reached: reached_tx,
        proceed: proceed_rx,
    });
    let deprovisioning = tokio::spawn({
        let engine = engine.clone();
        async move { engine.deprovision("dev-race", None).await }
    });
    reached_rx.await.expect("the hub delete was reached");
    assert!(f.record("dev-race").await.is_none(), "record deleted first");

    // ... while the device registers again and reuses its hub identity.
    let again = engine.register(request("dev-race")).await;
    assert_eq!(again.body["status"], "assigned", "{}", again.body);
    proceed_tx.send(()).expect("resume the deprovisioning");
    let done = deprovisioning.await.expect("join").expect("deprovisioned");
    assert!(done.removed.is_empty(), "{done:?}");

    // The new registration owns a hub device that still exists.
    let record = f.record("dev-race").await.expect("new record");
    assert_eq!(record["status"], "assigned");
    assert!(
        f.hub.device("dev-race").is_some(),
        "the hub device was lost"
    );
    assert_eq!(engine.finish_hub_removals().await.expect("finish"), 0);

    // Without a race, deprovisioning removes the device.
    let done = engine.deprovision("dev-race", None).await.expect("again");
    assert_eq!(done.removed, vec![format!("{HUB}/dev-race")]);
    assert!(f.hub.device("dev-race").is_none());
}
