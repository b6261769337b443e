//! A store that refuses writes (as a full disk does) through the `Store` trait: devices get
//! 503 with `retry-after` over HTTPS and MQTT, the service API 503 in the DPS error shape with
//! `Retry-After`, nothing is half-written, the log stays bounded, and the server serves again
//! as soon as the store does, without a restart.

mod common;

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::BytesMut;
use common::{config, device_token, now, policy_token, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use muster_proto::runtime::{OsEntropy, SystemClock};
use muster_server::Server;
use muster_store::{
    Collection, ListQuery, Record, SqliteStore, Store, StoreError, Unavailability, Write,
    WriteOutcome,
};
use reqwest::Method;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Wraps a store; while `full` is set every write fails the way SQLite's SQLITE_FULL does, and
/// while `hub_full` is set so does every write that touches the built-in hub's devices.
struct FullDiskStore {
    inner: Arc<dyn Store>,
    full: AtomicBool,
    hub_full: AtomicBool,
}

#[async_trait]
impl Store for FullDiskStore {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(collection, key).await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError> {
        let hub_write = writes
            .iter()
            .any(|w| w.collection == Collection::HubDevices);
        if self.full.load(Ordering::SeqCst) || (hub_write && self.hub_full.load(Ordering::SeqCst)) {
            return Err(StoreError::Unavailable {
                cause: Unavailability::DiskFull,
                detail: "committing the write transaction: database or disk is full".into(),
            });
        }
        self.inner.write(writes).await
    }

    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.list(collection, query).await
    }

    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.inner.count(collection, partition).await
    }

    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner
            .claim(collection, owner, now_ms, until_ms, limit)
            .await
    }

    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.renew(collection, owner, keys, until_ms).await
    }

    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        self.inner.release(collection, owner, keys).await
    }

    async fn search(
        &self,
        collection: Collection,
        query: muster_store::SearchQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.search(collection, query).await
    }

    fn changes(&self, collection: Collection) -> Option<u64> {
        self.inner.changes(collection)
    }
}

/// Every log line the server writes, for counting.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn lines(&self) -> Vec<String> {
        let text = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// One MQTT register exchange; returns the response topic and payload.
async fn mqtt_register(
    dps: &Dps,
    mqtt_addr: std::net::SocketAddr,
    registration_id: &str,
    password: &str,
) -> (String, Value) {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(mqtt_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(name, tcp)
        .await
        .unwrap();
    let scope = &dps.info.id_scope;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    connect.set_login(
        format!("{scope}/registrations/{registration_id}/api-version=2019-03-31"),
        password,
    );
    connect.write(&mut out).unwrap();
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut out)
        .unwrap();
    let mut publish = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=r1",
        QoS::AtLeastOnce,
        br#"{"registrationId":null,"payload":null}"#.to_vec(),
    );
    publish.pkid = 7;
    publish.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Packet::Publish(p) = packet {
                return (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap());
            }
        }
        let n = tokio::time::timeout_at(deadline, tls.read_buf(&mut buf))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection without answering");
    }
}

/// A server on the data dir's SQLite store, wrapped so the test can make writes fail.
async fn start_on_failing_store(dir: &std::path::Path) -> (Server, Arc<FullDiskStore>) {
    let sqlite = SqliteStore::open(&dir.join("muster.db")).unwrap();
    let store = Arc::new(FullDiskStore {
        inner: Arc::new(sqlite),
        full: AtomicBool::new(false),
        hub_full: AtomicBool::new(false),
    });
    let server = Server::start_on_store(
        config(dir, "127.0.0.1"),
        Arc::new(SystemClock),
        Arc::new(OsEntropy),
        store.clone(),
    )
    .await
    .unwrap();
    (server, store)
}

/// Creates a symmetric-key enrollment group with generated keys; returns its primary key.
async fn create_group(dps: &Dps, id: &str) -> String {
    let (s, g) = dps
        .service(
            Method::PUT,
            &format!("/enrollmentGroups/{id}"),
            Some(json!({"attestation": {"type": "symmetricKey"}})),
        )
        .await;
    assert_eq!(s, 200, "{g}");
    g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_answers_503_with_retry_after_quietly_and_recovers_without_a_restart() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let (server, store) = start_on_failing_store(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];
    let scope = dps.info.id_scope.clone();
    let key = create_group(&dps, "full").await;
    let token = |id: &str| {
        device_token(
            &scope,
            id,
            &derive_device_key(&key, id).unwrap(),
            now() + 600,
        )
    };
    let hub_has = |id: String| {
        let dps = &dps;
        async move {
            let (_, cs) = dps.hub();
            dps.hub_call(&cs, &format!("/devices/{id}")).await.0 == 200
        }
    };
    let lines_before = logs.lines().len();

    store.full.store(true, Ordering::SeqCst);
    let attempts = 20;
    for i in 0..attempts {
        let id = format!("full-{i}");
        // HTTPS: 503, retry-after, the DPS error shape with the store's code.
        let (s, retry, body) = dps.register(&id, &token(&id), json!({})).await;
        assert_eq!(s, 503, "{body}");
        assert_eq!(retry.as_deref(), Some("5"));
        assert_eq!(body["errorCode"], json!(503002), "{body}");
        for field in ["trackingId", "message", "timestampUtc"] {
            assert!(body[field].is_string(), "{field} in {body}");
        }
        // MQTT: the same status in the response topic, with retry-after.
        let (topic, body) = mqtt_register(&dps, mqtt, &id, &token(&id)).await;
        assert!(
            topic.starts_with("$dps/registrations/res/503/?$rid=r1&retry-after=5"),
            "{topic}"
        );
        assert_eq!(body["errorCode"], json!(503002), "{body}");
        // Intent before effect: the plan could not be saved, so no hub was written.
        assert!(!hub_has(id).await, "no hub device without its record");
    }
    // The service API: 503 in the DPS error shape with Retry-After.
    let r = dps
        .http
        .put(format!(
            "{}/enrollments/e-1?api-version=2021-10-01",
            dps.info.service_endpoint
        ))
        .header(
            "authorization",
            policy_token(&dps.info.service_connection_string),
        )
        .json(&json!({"registrationId": "e-1", "attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], json!(503002), "{body}");

    // Bounded: 41 refused requests wrote a handful of lines, none an ERROR.
    let lines: Vec<String> = logs.lines().split_off(lines_before);
    assert!(
        lines.len() <= 4,
        "{} log lines for {} refused requests:\n{}",
        lines.len(),
        attempts * 2 + 1,
        lines.join("\n")
    );
    assert!(
        lines.iter().all(|l| !l.contains("ERROR")),
        "{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("store unavailable")),
        "{}",
        lines.join("\n")
    );

    // Space returns: the same devices register, no restart.
    store.full.store(false, Ordering::SeqCst);
    for i in 0..2 {
        let id = format!("full-{i}");
        let (s, _, body) = dps.register(&id, &token(&id), json!({})).await;
        assert_eq!(
            (s, body["status"].as_str()),
            (202, Some("assigned")),
            "{body}"
        );
        assert!(hub_has(id).await);
    }
    let (topic, body) = mqtt_register(&dps, mqtt, "full-2", &token("full-2")).await;
    assert!(topic.starts_with("$dps/registrations/res/202/"), "{topic}");
    assert_eq!(body["status"], json!("assigned"), "{body}");
    let _ = std::io::stderr().flush();
    server.shutdown().await;
}

/// A registration whose hub write fails transiently (here the built-in hub's store) keeps its
/// intent and is finished by the server once the hub works again, even if the device never
/// retries: no hub device is left waiting for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_registration_finishes_without_the_device_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let (server, store) = start_on_failing_store(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let scope = dps.info.id_scope.clone();
    let key = create_group(&dps, "kept").await;
    let id = "kept-1";
    let token = device_token(
        &scope,
        id,
        &derive_device_key(&key, id).unwrap(),
        now() + 600,
    );

    store.hub_full.store(true, Ordering::SeqCst);
    let (s, retry, body) = dps.register(id, &token, json!({})).await;
    assert_eq!(s, 503, "{body}");
    assert!(retry.is_some(), "{body}");
    let (s, record) = dps
        .service(Method::GET, &format!("/registrations/{id}"), None)
        .await;
    assert_eq!(
        (s, record["status"].as_str()),
        (200, Some("assigning")),
        "{record}"
    );

    // The hub works again; the device stays silent.
    store.hub_full.store(false, Ordering::SeqCst);
    let (_, cs) = dps.hub();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (s, record) = dps
            .service(Method::GET, &format!("/registrations/{id}"), None)
            .await;
        assert_eq!(s, 200, "{record}");
        if record["status"] == json!("assigned") {
            assert_eq!(dps.hub_call(&cs, &format!("/devices/{id}")).await.0, 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the kept intent was not finished: {record}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}
