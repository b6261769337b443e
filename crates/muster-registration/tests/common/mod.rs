//! Shared by the engine's integration tests: an in-memory hub whose device and twin are two
//! writes (like a linked hub over REST) with injected faults and pauses, so interleavings are
//! driven step by step without timing, and a store seeded with enrollments for it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use muster_proto::device::DeviceRegistration;
use muster_proto::runtime::{Clock, SeededEntropy, SystemClock};
use muster_proto::{IdScope, SasToken};
use muster_registration::hub_client::{HubDeviceSpec, HubError, TwinWrite};
use muster_registration::{DeviceCredential, Engine, EngineConfig, HubConnection, RegisterRequest};
use muster_store::{Collection, Expect, SqliteStore, Store, Write};
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const SCOPE: &str = "0ne00000001";
pub const HUB: &str = "twostep.example";
pub const DEVICE_KEY: [u8; 32] = [7; 32];

/// One device in the fake hub: its identity etag (new on every identity write) and twin.
#[derive(Clone)]
pub struct FakeDevice {
    pub etag: u64,
    pub tags: Value,
    pub desired: Value,
}

/// A pause inside the next hub delete: tells the test it was reached, then waits to go on.
pub struct Pause {
    pub reached: oneshot::Sender<()>,
    pub proceed: oneshot::Receiver<()>,
}

/// A hub that writes a device and its twin in two steps, as `RestHub` does.
#[derive(Default)]
pub struct TwoStepHub {
    devices: Mutex<HashMap<String, FakeDevice>>,
    next_etag: Mutex<u64>,
    /// The twin write after a device put answers 503 (the device stays written).
    pub fail_twin_write: AtomicBool,
    /// Every device put answers 400, before anything is written.
    pub refuse_puts: AtomicBool,
    pub pause_delete: Mutex<Option<Pause>>,
    /// A pause at the start of the next device put.
    pub pause_put: Mutex<Option<Pause>>,
}

impl TwoStepHub {
    pub fn device_count(&self) -> usize {
        self.devices.lock().expect("lock").len()
    }

    pub fn device(&self, id: &str) -> Option<FakeDevice> {
        self.devices.lock().expect("lock").get(id).cloned()
    }

    fn new_etag(&self) -> u64 {
        let mut n = self.next_etag.lock().expect("lock");
        *n += 1;
        *n
    }

    async fn pause_put_if_asked(&self) {
        let pause = self.pause_put.lock().expect("lock").take();
        if let Some(p) = pause {
            let _ = p.reached.send(());
            let _ = p.proceed.await;
        }
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
        self.pause_put_if_asked().await;
        if self.refuse_puts.load(Ordering::SeqCst) {
            return Err(refused(400, "create device"));
        }
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

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub store: Arc<dyn Store>,
    pub hub: Arc<TwoStepHub>,
}

impl Fixture {
    /// A store with one linked hub (the fake) and an individual enrollment per id, each with
    /// an initial twin.
    pub async fn new(ids: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).expect("store"));
        Self::on(store, dir, ids).await
    }

    /// [`Fixture::new`] on a store the caller opened (`dir` lives as long as the fixture).
    pub async fn on(store: Arc<dyn Store>, dir: tempfile::TempDir, ids: &[&str]) -> Fixture {
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
    pub fn engine(&self) -> Engine {
        self.engine_as("local", Arc::new(SystemClock))
    }

    /// An engine for node `node_id` with its own clock: several stand for several nodes.
    pub fn engine_as(&self, node_id: &str, clock: Arc<dyn Clock>) -> Engine {
        self.engine_on(self.store.clone(), node_id, clock)
    }

    /// An engine for node `node_id` on `store` (another handle on the fixture's database,
    /// as a node on another machine has).
    pub fn engine_on(&self, store: Arc<dyn Store>, node_id: &str, clock: Arc<dyn Clock>) -> Engine {
        let mut config = EngineConfig::new(IdScope::new(SCOPE).expect("scope"));
        // The engine's own retry of a kept intent must not race the test's restart.
        config.retry_after_secs = 600;
        config.node_id = node_id.into();
        Engine::new(
            store,
            clock,
            Arc::new(SeededEntropy::new(1)),
            unused_http_client(),
            config,
        )
        .with_local_hub(HUB, self.hub.clone())
    }

    pub async fn record(&self, id: &str) -> Option<Value> {
        self.store
            .get(Collection::Registrations, &id.to_ascii_lowercase())
            .await
            .expect("read")
            .map(|r| r.body)
    }

    /// Polls the store until the record of `id` says `status`, with a deadline.
    pub async fn wait_for_status(&self, id: &str, status: &str) -> Value {
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
pub fn unused_http_client() -> reqwest::Client {
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

pub fn request(id: &str) -> RegisterRequest {
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
        transport: muster_registration::Transport::Https,
        api_version: Some("2021-10-01".into()),
    }
}
