//! The hub's device MQTT endpoint driven by a raw MQTT 3.1.1 client (rumqttc's codec over an
//! in-memory duplex stream) and by rumqttc's `AsyncClient` over loopback TCP, together with
//! the service REST routes (telemetry read and SSE, cloud-to-device send, direct methods).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use http_body_util::BodyExt;
use muster_hub::model::{ConnectionState, DeviceStatus};
use muster_hub::{
    DeviceEndpointLimits, DeviceInput, HubPolicy, HubRegistry, HubRights, IfMatch, TwinUpdate,
};
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{SasToken, Timestamp};
use muster_store::{Collection, SqliteStore, Store};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe,
    SubscribeFilter, SubscribeReasonCode,
};
use rumqttc::mqttbytes::{self, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tower::ServiceExt;

const HOST: &str = "hub.test";
const NOW: i64 = 1_800_000_000;
const V: &str = "api-version=2021-04-12";
const SERVICE_KEY: &[u8] = b"service-key-service-key-service-";
const DEVICE_POLICY_KEY: &[u8] = b"device-policy-key-device-policy-";
const KEY1: &[u8] = b"device-key-one-device-key-one-00";
const KEY2: &[u8] = b"device-key-two-device-key-two-00";

struct Harness {
    app: Router,
    hub: HubRegistry,
    clock: Arc<ManualClock>,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

fn policy(name: &str, key: &[u8], rights: &str) -> HubPolicy {
    HubPolicy {
        key_name: name.into(),
        primary_key: B64.encode(key),
        secondary_key: B64.encode(b"secondary-secondary-secondary-00"),
        rights: HubRights::parse(rights).unwrap(),
    }
}

fn harness_with(limits: DeviceEndpointLimits) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).unwrap());
    harness_on(dir, store, None, limits)
}

/// Two nodes of one hub: one store, a bus between them (as PostgreSQL gives several Muster
/// processes), each with its own sessions and routes.
fn two_nodes() -> (Harness, Harness) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).unwrap());
    let bus = muster_store::bus::MemoryBus::default();
    let a = harness_on(
        tempfile::tempdir().unwrap(),
        store.clone(),
        Some(bus.node()),
        DeviceEndpointLimits::default(),
    );
    let b = harness_on(
        dir,
        store,
        Some(bus.node()),
        DeviceEndpointLimits::default(),
    );
    (a, b)
}

fn harness_on(
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    bus: Option<Arc<dyn muster_store::bus::Bus>>,
    limits: DeviceEndpointLimits,
) -> Harness {
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_unix_millis(NOW * 1000).unwrap(),
    ));
    let hub = HubRegistry::with_limits(
        store.clone(),
        HOST.into(),
        vec![
            policy("service", SERVICE_KEY, "ServiceConnect"),
            policy("device", DEVICE_POLICY_KEY, "DeviceConnect"),
            policy(
                "registryRead",
                b"read-key-read-key-read-key-read-",
                "RegistryRead",
            ),
        ],
        clock.clone(),
        Arc::new(SeededEntropy::new(3)),
        limits,
    )
    .with_bus(bus);
    let app = muster_hub::router(hub.clone()).fallback(muster_hub::not_found);
    Harness {
        app,
        hub,
        clock,
        store,
        _dir: dir,
    }
}

fn harness() -> Harness {
    harness_with(DeviceEndpointLimits::default())
}

fn service_token() -> String {
    SasToken::generate(HOST, SERVICE_KEY, Some("service"), NOW + 3600)
}

fn device_token(id: &str, key: &[u8], expiry: i64) -> String {
    SasToken::generate(&format!("{HOST}/devices/{id}"), key, None, expiry)
}

fn username(id: &str) -> String {
    format!("{HOST}/{id}/?api-version=2021-04-12&DeviceClientType=muster-test%2F1.0")
}

impl Harness {
    async fn sas_device(&self, id: &str) {
        self.hub
            .create_or_update_device(
                DeviceInput::sas(id, Some((B64.encode(KEY1), B64.encode(KEY2)))),
                &IfMatch::None,
            )
            .await
            .unwrap();
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", service_token());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, bytes)
    }

    async fn json(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, bytes) = self
            .call(
                method,
                uri,
                &[("content-type", "application/json")],
                body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
            )
            .await;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    /// A raw MQTT client whose other end is served by `serve_connection`.
    fn open(&self, certs: Vec<Vec<u8>>) -> Mqtt {
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(muster_hub::device_mqtt::serve_connection(
            server,
            self.hub.clone(),
            certs,
        ));
        Mqtt {
            io: client,
            buf: BytesMut::new(),
            task,
        }
    }

    /// Connects `id` with CleanSession=0; returns the connection and session-present.
    async fn connected_persistent(&self, id: &str) -> (Mqtt, bool) {
        let mut m = self.open(Vec::new());
        let ack = m
            .connect_session(
                id,
                &username(id),
                &device_token(id, KEY1, NOW + 3600),
                false,
            )
            .await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        (m, ack.session_present)
    }

    /// Invokes a direct method; returns the status and the parsed body.
    async fn invoke(&self, id: &str, method: &str) -> (StatusCode, Value) {
        self.json(
            Method::POST,
            &format!("/twins/{id}/methods?{V}"),
            Some(
                json!({"methodName": method, "payload": {"n": 1}, "responseTimeoutInSeconds": 10}),
            ),
        )
        .await
    }

    /// Connects `id` with a SAS token from its primary key and returns the session.
    async fn connected(&self, id: &str) -> Mqtt {
        let mut m = self.open(Vec::new());
        let ack = m
            .connect(id, &username(id), &device_token(id, KEY1, NOW + 3600))
            .await;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        m
    }
}

struct Mqtt {
    io: DuplexStream,
    buf: BytesMut,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt {
    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        self.io.write_all(&b).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.io.write_all(bytes).await;
    }

    /// The next packet, or `None` when the server closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the server: {e}"),
            }
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for the server")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    async fn expect_closed(&mut self) {
        loop {
            match self.recv().await {
                None => return,
                Some(Packet::PubAck(_)) | Some(Packet::Publish(_)) => continue,
                Some(p) => panic!("expected the connection to close, got {p:?}"),
            }
        }
    }

    async fn connect(&mut self, client_id: &str, user: &str, password: &str) -> ConnAck {
        self.connect_session(client_id, user, password, true).await
    }

    async fn connect_session(
        &mut self,
        client_id: &str,
        user: &str,
        password: &str,
        clean_session: bool,
    ) -> ConnAck {
        let mut c = Connect::new(client_id);
        c.keep_alive = 60;
        c.clean_session = clean_session;
        c.login = Some(Login::new(user, password));
        self.send(Packet::Connect(c)).await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let mut s = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
        );
        s.pkid = 99;
        self.send(Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.pkid, 99);
                a.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    async fn disconnect(mut self) {
        self.send(Packet::Disconnect).await;
        self.expect_closed().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

fn ack_code(a: ConnAck) -> ConnectReturnCode {
    a.code
}

#[tokio::test]
async fn connect_accepts_and_refuses() {
    let h = harness();
    h.sas_device("dev-1").await;
    let cert = b"pretend-der-certificate".to_vec();
    let other_cert = b"another-certificate".to_vec();
    use sha2::Digest;
    let sha256: String = sha2::Sha256::digest(&cert)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let sha1: String = sha1::Sha1::digest(&cert)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    h.hub
        .create_or_update_device(
            DeviceInput::self_signed("x509-256", sha256, None),
            &IfMatch::None,
        )
        .await
        .unwrap();
    h.hub
        .create_or_update_device(
            DeviceInput::self_signed("x509-1", "00".repeat(20), Some(sha1)),
            &IfMatch::None,
        )
        .await
        .unwrap();
    h.hub
        .create_or_update_device(
            DeviceInput::sas("off", Some((B64.encode(KEY1), B64.encode(KEY2))))
                .with_status(DeviceStatus::Disabled),
            &IfMatch::None,
        )
        .await
        .unwrap();

    let try_sas = |client: &'static str, user: String, pass: String| {
        let mut m = h.open(Vec::new());
        async move {
            let code = ack_code(m.connect(client, &user, &pass).await);
            if code != ConnectReturnCode::Success {
                m.expect_closed().await;
            }
            code
        }
    };
    use ConnectReturnCode::*;
    // Primary key, encoded sr (Python, C#).
    assert_eq!(
        try_sas(
            "dev-1",
            username("dev-1"),
            device_token("dev-1", KEY1, NOW + 60)
        )
        .await,
        Success
    );
    // Secondary key, raw sr as Node signs it, host case and port differ.
    let raw = {
        let sr = format!("{HOST}/devices/dev-1");
        let sig = muster_proto::sas::sign(KEY2, &format!("{sr}\n{}", NOW + 60));
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={}",
            percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC),
            NOW + 60
        )
    };
    assert_eq!(
        try_sas(
            "dev-1",
            "HUB.test:8883/dev-1/?api-version=2021-04-12".into(),
            raw
        )
        .await,
        Success
    );
    // A DeviceConnect policy token.
    let policy_token = SasToken::generate(HOST, DEVICE_POLICY_KEY, Some("device"), NOW + 60);
    assert_eq!(
        try_sas("dev-1", username("dev-1"), policy_token).await,
        Success
    );
    // A policy without DeviceConnect.
    let read_token = SasToken::generate(
        HOST,
        b"read-key-read-key-read-key-read-",
        Some("registryRead"),
        NOW + 60,
    );
    assert_eq!(
        try_sas("dev-1", username("dev-1"), read_token).await,
        NotAuthorized
    );
    // Wrong key, expired, another device's token, unknown device, disabled device.
    assert_eq!(
        try_sas(
            "dev-1",
            username("dev-1"),
            device_token("dev-1", b"wrong-key-wrong-key-wrong-key-00", NOW + 60)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "dev-1",
            username("dev-1"),
            device_token("dev-1", KEY1, NOW - 3600)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "dev-1",
            username("dev-1"),
            device_token("dev-2", KEY1, NOW + 60)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "ghost",
            username("ghost"),
            device_token("ghost", KEY1, NOW + 60)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas("off", username("off"), device_token("off", KEY1, NOW + 60)).await,
        NotAuthorized
    );
    // Other hub, module, client id mismatch, malformed user name / password, nothing.
    assert_eq!(
        try_sas(
            "dev-1",
            "other.hub/dev-1/?api-version=2021-04-12".into(),
            device_token("dev-1", KEY1, NOW + 60)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "dev-1",
            format!("{HOST}/dev-1/mod-1/?api-version=2021-04-12"),
            device_token("dev-1", KEY1, NOW + 60)
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "dev-2",
            username("dev-1"),
            device_token("dev-1", KEY1, NOW + 60)
        )
        .await,
        BadClientId
    );
    assert_eq!(
        try_sas(
            "dev-1",
            "nonsense".into(),
            device_token("dev-1", KEY1, NOW + 60)
        )
        .await,
        BadUserNamePassword
    );
    // A password that is no SAS token at all, or a SAS token with a made-up signature: a
    // bad credential, refused with 5 as IoT Hub does (never accepted).
    assert_eq!(
        try_sas("dev-1", username("dev-1"), "hunter2".into()).await,
        NotAuthorized
    );
    assert_eq!(
        try_sas(
            "dev-1",
            username("dev-1"),
            format!(
                "SharedAccessSignature sr={HOST}%2Fdevices%2Fdev-1&sig=Ym9ndXM%3D&se={}",
                NOW + 60
            )
        )
        .await,
        NotAuthorized
    );
    assert_eq!(
        try_sas("dev-1", username("dev-1"), String::new()).await,
        BadUserNamePassword
    );

    // X.509: SHA-256 and SHA-1 (lower-case registered) thumbprints; wrong certificate;
    // a SAS device presenting a certificate.
    for (id, certs, expected) in [
        ("x509-256", vec![cert.clone()], Success),
        ("x509-1", vec![cert.clone(), b"issuer".to_vec()], Success),
        ("x509-256", vec![other_cert.clone()], NotAuthorized),
        ("dev-1", vec![cert.clone()], NotAuthorized),
        ("x509-256", vec![], BadUserNamePassword),
    ] {
        let mut m = h.open(certs);
        let code = ack_code(m.connect(id, &username(id), "").await);
        assert_eq!(code, expected, "{id}");
        if code == Success {
            m.disconnect().await;
        } else {
            m.expect_closed().await;
        }
    }
    // Nothing was stored by any of this.
    assert_eq!(
        h.store.count(Collection::HubTelemetry, None).await.unwrap(),
        0
    );
}

#[tokio::test]
async fn a_second_connection_replaces_the_first_and_connection_state_follows() {
    let h = harness();
    h.sas_device("dev-1").await;
    let mut first = h.connected("dev-1").await;
    assert_eq!(
        h.hub.get_device("dev-1").await.unwrap().connection_state,
        ConnectionState::Connected
    );
    let mut second = h.connected("DEV-1").await;
    first.expect_closed().await;
    // The replaced session does not mark the device disconnected.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.hub.get_device("dev-1").await.unwrap().connection_state,
        ConnectionState::Connected
    );
    second.send(Packet::PingReq).await;
    assert!(matches!(second.recv().await, Some(Packet::PingResp)));
    assert!(h.hub.is_connected("dev-1"));
    second.disconnect().await;
    assert!(!h.hub.is_connected("dev-1"));
    assert_eq!(
        h.hub.get_device("dev-1").await.unwrap().connection_state,
        ConnectionState::Disconnected
    );

    // Disabling the device closes its connection.
    let mut third = h.connected("dev-1").await;
    h.hub
        .create_or_update_device(
            DeviceInput::sas("dev-1", None).with_status(DeviceStatus::Disabled),
            &IfMatch::Any,
        )
        .await
        .unwrap();
    third.expect_closed().await;
}

#[tokio::test]
async fn bad_packets_close_only_that_connection() {
    let h = harness();
    h.sas_device("dev-1").await;
    h.sas_device("dev-2").await;
    let mut bystander = h.connected("dev-2").await;

    // QoS 2.
    let mut m = h.connected("dev-1").await;
    m.publish("devices/dev-1/messages/events/", b"x", QoS::ExactlyOnce, 1)
        .await;
    m.expect_closed().await;
    // Another device's topic.
    let mut m = h.connected("dev-1").await;
    m.publish("devices/dev-2/messages/events/", b"x", QoS::AtLeastOnce, 1)
        .await;
    m.expect_closed().await;
    // A DPS topic.
    let mut m = h.connected("dev-1").await;
    m.publish(
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        b"{}",
        QoS::AtLeastOnce,
        1,
    )
    .await;
    m.expect_closed().await;
    // Garbage.
    let mut m = h.connected("dev-1").await;
    m.send_raw(&[0xF0, 0x00, 0xFF, 0xFF]).await;
    m.expect_closed().await;
    // Oversized: a PUBLISH announcing 300 MB.
    let mut m = h.connected("dev-1").await;
    m.send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    m.expect_closed().await;
    // Not MQTT at all before CONNECT.
    let mut m = h.open(Vec::new());
    m.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    m.expect_closed().await;

    assert_eq!(
        h.store.count(Collection::HubTelemetry, None).await.unwrap(),
        0
    );
    bystander.send(Packet::PingReq).await;
    assert!(matches!(bystander.recv().await, Some(Packet::PingResp)));
}

/// Reads SSE events (`(id, data)`) from a streaming body until `n` arrived.
async fn read_events(body: &mut Body, n: usize) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("timed out waiting for an event")
            .expect("stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut id = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                events.push((id, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

async fn open_stream(h: &Harness, uri: &str, last_event_id: Option<&str>) -> Body {
    let mut req = Request::builder()
        .uri(uri)
        .header("authorization", service_token());
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let resp = h
        .app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp.into_body()
}

#[tokio::test]
async fn telemetry_is_stored_in_order_with_properties_and_streamed() {
    let h = harness();
    h.sas_device("dev-1").await;
    h.sas_device("dev-2").await;
    let mut all = open_stream(&h, &format!("/telemetry/stream?{V}"), None).await;
    let mut live = open_stream(&h, &format!("/devices/dev-1/telemetry/stream?{V}"), None).await;

    let mut m = h.connected("dev-1").await;
    for i in 1..=10u16 {
        let topic = format!(
            "devices/dev-1/messages/events/%24.mid=msg-{i}&%24.cid=corr&%24.ct=application%2Fjson&%24.ce=utf-8&index={i}&flag"
        );
        let body = json!({"temperature": 20 + i}).to_string();
        m.publish(&topic, body.as_bytes(), QoS::AtLeastOnce, i)
            .await;
        match m.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.pkid, i),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // QoS 0, binary body, no property bag, no trailing slash.
    m.publish(
        "devices/dev-1/messages/events",
        &[0xff, 0x00],
        QoS::AtMostOnce,
        0,
    )
    .await;
    // Another device's message shows in the all-devices stream only.
    let mut m2 = h.connected("dev-2").await;
    m2.publish(
        "devices/dev-2/messages/events/",
        b"two",
        QoS::AtLeastOnce,
        1,
    )
    .await;
    assert!(matches!(m2.recv().await, Some(Packet::PubAck(_))));

    let (status, list) = h
        .json(
            Method::GET,
            &format!("/devices/dev-1/telemetry?{V}&limit=100"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 11);
    for (i, msg) in list.iter().take(10).enumerate() {
        let n = i as u64 + 1;
        assert_eq!(msg["sequenceNumber"], n);
        assert_eq!(msg["deviceId"], "dev-1");
        assert_eq!(msg["body"], json!({"temperature": 20 + n}).to_string());
        assert_eq!(msg["bodyEncoding"], "utf-8");
        assert_eq!(msg["properties"]["index"], n.to_string());
        assert_eq!(msg["properties"]["flag"], Value::Null);
        assert_eq!(msg["systemProperties"]["messageId"], format!("msg-{n}"));
        assert_eq!(msg["systemProperties"]["correlationId"], "corr");
        assert_eq!(msg["systemProperties"]["contentType"], "application/json");
        assert_eq!(msg["systemProperties"]["contentEncoding"], "utf-8");
        assert!(msg["enqueuedTime"]
            .as_str()
            .unwrap()
            .starts_with("2027-01-15T08:00:00"));
    }
    assert_eq!(list[10]["bodyEncoding"], "base64");
    assert_eq!(list[10]["body"], B64.encode([0xff, 0x00]));

    // Paging.
    let (_, page) = h
        .json(
            Method::GET,
            &format!("/devices/dev-1/telemetry?{V}&after=8&limit=2"),
            None,
        )
        .await;
    let seqs: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["sequenceNumber"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [9, 10]);
    let (status, _) = h
        .json(
            Method::GET,
            &format!("/devices/dev-1/telemetry?{V}&limit=0"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Live streams.
    let events = read_events(&mut live, 11).await;
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    );
    assert_eq!(events[0].1["systemProperties"]["messageId"], "msg-1");
    let events = read_events(&mut all, 12).await;
    assert_eq!(events[0].0, "dev-1/1");
    assert_eq!(events[11].0, "dev-2/1");
    assert_eq!(events[11].1["body"], "two");

    // Resume with Last-Event-ID: replay 9..11, then live.
    let mut resumed = open_stream(
        &h,
        &format!("/devices/dev-1/telemetry/stream?{V}"),
        Some("8"),
    )
    .await;
    let replayed = read_events(&mut resumed, 3).await;
    let ids: Vec<&str> = replayed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["9", "10", "11"]);
    m.publish(
        "devices/dev-1/messages/events/",
        b"later",
        QoS::AtLeastOnce,
        50,
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let next = read_events(&mut resumed, 1).await;
    assert_eq!(next[0].0, "12");
    assert_eq!(next[0].1["body"], "later");

    // Auth: the registryRead policy can't read telemetry.
    let req = Request::builder()
        .uri(format!("/devices/dev-1/telemetry?{V}"))
        .header(
            "authorization",
            SasToken::generate(
                HOST,
                b"read-key-read-key-read-key-read-",
                Some("registryRead"),
                NOW + 60,
            ),
        )
        .body(Body::empty())
        .unwrap();
    let resp = h.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    m.disconnect().await;
    m2.disconnect().await;
}

#[tokio::test]
async fn telemetry_retention_drops_the_oldest() {
    let h = harness_with(DeviceEndpointLimits {
        telemetry_retention: 3,
        ..DeviceEndpointLimits::default()
    });
    h.sas_device("dev-1").await;
    for i in 0..5 {
        h.hub
            .store_telemetry(
                "dev-1",
                format!("m{i}").as_bytes(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    let msgs = h.hub.read_telemetry("dev-1", 0, 100).await.unwrap();
    let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence_number).collect();
    assert_eq!(seqs, [3, 4, 5]);
    assert_eq!(
        h.store.count(Collection::HubTelemetry, None).await.unwrap(),
        3
    );
}

#[tokio::test]
async fn twin_get_reported_patch_and_desired_notifications() {
    let h = harness();
    h.sas_device("dev-1").await;
    h.hub
        .update_twin(
            "dev-1",
            TwinUpdate::from_json(&json!({"properties": {"desired": {"interval": 5}}})).unwrap(),
            &IfMatch::None,
        )
        .await
        .unwrap();
    let mut m = h.connected("dev-1").await;
    let codes = m
        .subscribe(&[
            "$iothub/twin/res/#",
            "$iothub/twin/PATCH/properties/desired/#",
            "not/a/hub/topic",
        ])
        .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure
        ]
    );

    // GET (Node sends one space at QoS 0).
    m.publish("$iothub/twin/GET/?$rid=1", b" ", QoS::AtMostOnce, 0)
        .await;
    let p = m.recv_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/200/?$rid=1");
    let doc: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(doc["desired"]["interval"], 5);
    assert_eq!(doc["desired"]["$version"], 2);
    assert_eq!(doc["reported"]["$version"], 1);

    // Reported patch (QoS 1: PUBACK first, then the response).
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        br#"{"firmware":"1.2","old":null}"#,
        QoS::AtLeastOnce,
        7,
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(a)) if a.pkid == 7));
    let p = m.recv_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/204/?$rid=2&$version=2");
    if p.qos == QoS::AtLeastOnce {
        m.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    let (_, twin) = h
        .json(Method::GET, &format!("/twins/dev-1?{V}"), None)
        .await;
    assert_eq!(twin["properties"]["reported"]["firmware"], "1.2");

    // Not JSON → 400.
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        b"{nope",
        QoS::AtMostOnce,
        0,
    )
    .await;
    let p = m.recv_publish().await;
    assert_eq!(p.topic, "$iothub/twin/res/400/?$rid=3");

    // A service-side desired change reaches the device; another device's doesn't.
    h.sas_device("dev-2").await;
    h.hub
        .update_twin(
            "dev-2",
            TwinUpdate::from_json(&json!({"properties": {"desired": {"x": 1}}})).unwrap(),
            &IfMatch::None,
        )
        .await
        .unwrap();
    let (status, _) = h
        .json(
            Method::PATCH,
            &format!("/twins/dev-1?{V}"),
            Some(json!({"properties": {"desired": {"interval": 10, "mode": "eco"}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let p = m.recv_publish().await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=3");
    let patch: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(patch, json!({"interval": 10, "mode": "eco", "$version": 3}));
    m.disconnect().await;
}

#[tokio::test]
async fn cloud_to_device_waits_while_offline_then_is_delivered_and_removed_on_puback() {
    let h = harness_with(DeviceEndpointLimits {
        c2d_queue_depth: 3,
        ..DeviceEndpointLimits::default()
    });
    h.sas_device("dev-1").await;
    let uri = format!("/devices/dev-1/messages/cloudToDevice?{V}");
    let (status, _, _) = h
        .call(
            Method::POST,
            &uri,
            &[
                ("iothub-messageid", "m-1"),
                ("iothub-correlationid", "c-1"),
                ("content-type", "application/json"),
                ("content-encoding", "utf-8"),
                ("iothub-app-color", "red/blue"),
                ("iothub-app-size", "L"),
            ],
            br#"{"cmd":"on"}"#.to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = h.call(Method::POST, &uri, &[], b"second".to_vec()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = h.call(Method::POST, &uri, &[], b"third".to_vec()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Queue full.
    let (status, headers, _) = h.call(Method::POST, &uri, &[], b"fourth".to_vec()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        headers["iothub-errorcode"],
        "DeviceMaximumQueueDepthExceeded"
    );
    // Unknown device.
    let (status, _, _) = h
        .call(
            Method::POST,
            &format!("/devices/ghost/messages/cloudToDevice?{V}"),
            &[],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let mut m = h.connected("dev-1").await;
    let codes = m.subscribe(&["devices/dev-1/messages/devicebound/#"]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let first = m.recv_publish().await;
    assert_eq!(first.qos, QoS::AtLeastOnce);
    assert_eq!(&first.payload[..], br#"{"cmd":"on"}"#);
    let bag = first
        .topic
        .strip_prefix("devices/dev-1/messages/devicebound/")
        .unwrap();
    let pairs: Vec<(String, String)> = bag
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (
                percent_encoding::percent_decode_str(k)
                    .decode_utf8()
                    .unwrap()
                    .into_owned(),
                percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .unwrap()
                    .into_owned(),
            )
        })
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("$.mid"), Some("m-1"));
    assert_eq!(get("$.cid"), Some("c-1"));
    assert_eq!(get("$.to"), Some("/devices/dev-1/messages/deviceBound"));
    assert_eq!(get("$.ct"), Some("application/json"));
    assert_eq!(get("$.ce"), Some("utf-8"));
    assert_eq!(get("color"), Some("red/blue"));
    assert_eq!(get("size"), Some("L"));
    let second = m.recv_publish().await;
    assert_eq!(&second.payload[..], b"second");
    let third = m.recv_publish().await;
    assert_eq!(&third.payload[..], b"third");

    // Only the first is acknowledged; the others come again on the next connection.
    m.send(Packet::PubAck(PubAck::new(first.pkid))).await;
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    assert_eq!(
        h.store
            .count(Collection::HubC2dMessages, None)
            .await
            .unwrap(),
        2
    );
    m.disconnect().await;

    let mut m = h.connected("dev-1").await;
    m.subscribe(&["devices/dev-1/messages/devicebound/#"]).await;
    let again = m.recv_publish().await;
    assert_eq!(&again.payload[..], b"second");
    m.send(Packet::PubAck(PubAck::new(again.pkid))).await;
    let again = m.recv_publish().await;
    assert_eq!(&again.payload[..], b"third");
    m.send(Packet::PubAck(PubAck::new(again.pkid))).await;

    // While connected and subscribed, a new message arrives at once.
    let (status, _, _) = h.call(Method::POST, &uri, &[], b"live".to_vec()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let live = m.recv_publish().await;
    assert_eq!(&live.payload[..], b"live");
    m.send(Packet::PubAck(PubAck::new(live.pkid))).await;
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    assert_eq!(
        h.store
            .count(Collection::HubC2dMessages, None)
            .await
            .unwrap(),
        0
    );
    m.disconnect().await;
}

#[tokio::test]
async fn direct_method_round_trip_not_online_and_timeout() {
    let h = harness();
    h.sas_device("dev-1").await;
    let uri = format!("/twins/dev-1/methods?{V}");

    // Not connected → 404 DeviceNotOnline.
    let (status, _, body) = h
        .call(
            Method::POST,
            &uri,
            &[("content-type", "application/json")],
            json!({"methodName": "reboot", "payload": {}, "responseTimeoutInSeconds": 5})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:DeviceNotOnline;"));
    // Unknown device → 404 DeviceNotFound.
    let (status, headers, _) = h
        .call(
            Method::POST,
            &format!("/twins/ghost/methods?{V}"),
            &[],
            json!({"methodName": "reboot"}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["iothub-errorcode"], "DeviceNotFound");

    let mut m = h.connected("dev-1").await;
    // Connected but not subscribed: still not online for methods.
    let (status, _, _) = h
        .call(
            Method::POST,
            &uri,
            &[],
            json!({"methodName": "reboot"}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    m.subscribe(&["$iothub/methods/POST/#"]).await;

    // Round trip: what azure-iot-hub 2.7.0 sends.
    let app = h.app.clone();
    let invoke = tokio::spawn(async move {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/twins/dev-1/methods?{V}"))
            .header("authorization", service_token())
            .header("content-type", "application/json; charset=utf-8")
            .body(Body::from(
                json!({"methodName": "getStatus", "payload": {"verbose": true}, "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 0}).to_string(),
            ))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    });
    let call = m.recv_publish().await;
    let rid = call
        .topic
        .strip_prefix("$iothub/methods/POST/getStatus/?$rid=")
        .unwrap_or_else(|| panic!("unexpected topic {}", call.topic))
        .to_string();
    assert_eq!(
        serde_json::from_slice::<Value>(&call.payload).unwrap(),
        json!({"verbose": true})
    );
    if call.qos == QoS::AtLeastOnce {
        m.send(Packet::PubAck(PubAck::new(call.pkid))).await;
    }
    m.publish(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"state":"ok","uptime":42}"#,
        QoS::AtLeastOnce,
        3,
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let (status, body) = invoke.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": 200, "payload": {"state": "ok", "uptime": 42}})
    );

    // Typed API, empty answer body → null payload, device status passed through.
    let hub = h.hub.clone();
    let invoke = tokio::spawn(async move {
        hub.invoke_method("dev-1", "noop", Value::Null, Duration::from_secs(10))
            .await
    });
    let call = m.recv_publish().await;
    let rid = call.topic.rsplit("$rid=").next().unwrap().to_string();
    m.publish(
        &format!("$iothub/methods/res/404/?$rid={rid}"),
        b"",
        QoS::AtMostOnce,
        0,
    )
    .await;
    assert_eq!(invoke.await.unwrap().unwrap(), (404, Value::Null));

    // The device never answers → 504 GatewayTimeout.
    let (status, headers, _) = h
        .call(
            Method::POST,
            &uri,
            &[],
            json!({"methodName": "slow", "responseTimeoutInSeconds": 1})
                .to_string()
                .into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["iothub-errorcode"], "GatewayTimeout");
    let late = m.recv_publish().await;
    assert!(late.topic.starts_with("$iothub/methods/POST/slow/"));
    // A late answer is ignored, the session carries on.
    let rid = late.topic.rsplit("$rid=").next().unwrap().to_string();
    m.publish(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        b"{}",
        QoS::AtMostOnce,
        0,
    )
    .await;
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    m.disconnect().await;
}

/// rumqttc's own client over loopback TCP: the tutorial's ten messages and a method answer.
#[tokio::test]
async fn rumqttc_client_over_tcp() {
    let h = harness();
    h.sas_device("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").await;
    let id = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hub = h.hub.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(muster_hub::device_mqtt::serve_connection(
                sock,
                hub.clone(),
                Vec::new(),
            ));
        }
    });
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials(username(id), device_token(id, KEY1, NOW + 3600));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 32);
    client
        .subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for i in 1..=10 {
        client
            .publish(
                format!("devices/{id}/messages/events/"),
                QoS::AtLeastOnce,
                false,
                format!("sending message #{i}"),
            )
            .await
            .unwrap();
    }
    let mut acks = 0;
    let mut subscribed = false;
    while acks < 10 || !subscribed {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_)) => acks += 1,
            rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_)) => subscribed = true,
            _ => {}
        }
    }
    let msgs = h.hub.read_telemetry(id, 0, 100).await.unwrap();
    let bodies: Vec<&str> = msgs.iter().map(|m| m.body.as_str()).collect();
    let expected: Vec<String> = (1..=10).map(|i| format!("sending message #{i}")).collect();
    assert_eq!(bodies, expected);

    let hub = h.hub.clone();
    let invoke = tokio::spawn(async move {
        hub.invoke_method(id, "reboot", json!({"delay": 1}), Duration::from_secs(10))
            .await
    });
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .unwrap()
            .unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)) = event {
            let rid = p.topic.rsplit("$rid=").next().unwrap().to_string();
            assert!(p.topic.starts_with("$iothub/methods/POST/reboot/"));
            client
                .publish(
                    format!("$iothub/methods/res/200/?$rid={rid}"),
                    QoS::AtLeastOnce,
                    false,
                    r#"{"rebooting":true}"#,
                )
                .await
                .unwrap();
            break;
        }
    }
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let answer = invoke.await.unwrap().unwrap();
    assert_eq!(answer, (200, json!({"rebooting": true})));
}

/// Many devices at once, each sending 10 messages: every message stored once, in order per
/// device. (`MUSTER_LOAD_DEVICES` sets the count; default 1,000 as in the issue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_send_concurrently_and_nothing_is_lost() {
    let devices: usize = std::env::var("MUSTER_LOAD_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let h = Arc::new(harness());
    let mut tasks = Vec::new();
    for d in 0..devices {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("load-{d:04}");
            h.sas_device(&id).await;
            let mut m = h.connected(&id).await;
            for i in 1..=10u16 {
                m.publish(
                    &format!("devices/{id}/messages/events/n={i}"),
                    format!("{id}#{i}").as_bytes(),
                    QoS::AtLeastOnce,
                    i,
                )
                .await;
            }
            for _ in 0..10 {
                assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
            }
            m.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        h.store.count(Collection::HubTelemetry, None).await.unwrap(),
        devices as u64 * 10
    );
    for d in (0..devices).step_by(37) {
        let id = format!("load-{d:04}");
        let msgs = h.hub.read_telemetry(&id, 0, 100).await.unwrap();
        let bodies: Vec<String> = msgs.iter().map(|m| m.body.clone()).collect();
        let expected: Vec<String> = (1..=10).map(|i| format!("{id}#{i}")).collect();
        assert_eq!(bodies, expected);
        let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence_number).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<u64>>());
    }
}

/// Drives a direct method from the service while the device answers it.
async fn method_round_trip(h: &Harness, m: &mut Mqtt, id: &str) {
    let call = h.invoke(id, "reboot");
    let device = async {
        let p = m.recv_publish().await;
        assert!(
            p.topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
            "{}",
            p.topic
        );
        let rid = p.topic.rsplit('=').next().unwrap().to_string();
        m.publish(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            br#"{"ok":true}"#,
            QoS::AtMostOnce,
            0,
        )
        .await;
    };
    let ((status, body), ()) = tokio::join!(call, device);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": 200, "payload": {"ok": true}}));
}

#[tokio::test]
async fn persistent_session_resumes_subscriptions_and_redelivers_unacknowledged() {
    let h = harness();
    h.sas_device("dev-1").await;
    let desired = |v: Value| {
        let hub = h.hub.clone();
        async move {
            hub.update_twin(
                "dev-1",
                TwinUpdate::from_json(&json!({"properties": {"desired": v}})).unwrap(),
                &IfMatch::None,
            )
            .await
            .unwrap()
        }
    };

    // First connection: no session yet.
    let (mut m, present) = h.connected_persistent("dev-1").await;
    assert!(!present);
    m.subscribe(&[
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
    ])
    .await;
    // A desired patch the device never acknowledges.
    desired(json!({"interval": 10})).await;
    let first = m.recv_publish().await;
    assert_eq!(
        first.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=2"
    );
    m.disconnect().await;
    // Published while the device is away.
    desired(json!({"interval": 20})).await;

    // The SDKs reconnect with CleanSession=0 and do not subscribe again.
    let (mut m, present) = h.connected_persistent("dev-1").await;
    assert!(present, "CleanSession=0 must resume the session");
    let again = m.recv_publish().await;
    assert_eq!(again.topic, first.topic);
    assert_eq!(again.pkid, first.pkid);
    assert!(again.dup, "a redelivered publish carries DUP");
    m.send(Packet::PubAck(PubAck::new(again.pkid))).await;
    let queued = m.recv_publish().await;
    assert_eq!(
        queued.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=3"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&queued.payload).unwrap(),
        json!({"interval": 20, "$version": 3})
    );
    assert!(!queued.dup);
    m.send(Packet::PubAck(PubAck::new(queued.pkid))).await;
    // The twin response subscription and the methods subscription came back too.
    m.publish("$iothub/twin/GET/?$rid=7", b" ", QoS::AtMostOnce, 0)
        .await;
    let res = m.recv_publish().await;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=7");
    m.send(Packet::PubAck(PubAck::new(res.pkid))).await;
    method_round_trip(&h, &mut m, "dev-1").await;

    // A new connection while this one is still open (token renewal) takes the session over.
    let (mut renewed, present) = h.connected_persistent("dev-1").await;
    assert!(present);
    m.expect_closed().await;
    method_round_trip(&h, &mut renewed, "dev-1").await;
    renewed.disconnect().await;

    // CleanSession=1 discards it: nothing is resumed, and a method now finds the device
    // connected but not subscribed.
    let clean = h.connected("dev-1").await;
    let (status, body) = h.invoke("dev-1", "reboot").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = body["Message"].as_str().unwrap();
    assert!(
        message.starts_with("ErrorCode:DeviceNotOnline;"),
        "{message}"
    );
    assert!(message.contains("has not subscribed"), "{message}");
    clean.disconnect().await;
    // ... and keeps nothing after it closes.
    let (m, present) = h.connected_persistent("dev-1").await;
    assert!(!present);
    m.disconnect().await;
}

#[tokio::test]
async fn persistent_session_expires_after_the_idle_time() {
    let h = harness_with(DeviceEndpointLimits {
        session_expiry: Duration::from_secs(60),
        ..DeviceEndpointLimits::default()
    });
    h.sas_device("dev-1").await;
    let (mut m, _) = h.connected_persistent("dev-1").await;
    m.subscribe(&["$iothub/methods/POST/#"]).await;
    m.disconnect().await;
    h.clock.advance_secs(59);
    let (m, present) = h.connected_persistent("dev-1").await;
    assert!(present, "resumed within the expiry");
    m.disconnect().await;
    h.clock.advance_secs(61);
    let (m, present) = h.connected_persistent("dev-1").await;
    assert!(!present, "expired 61 s after the device left");
    m.disconnect().await;
}

#[tokio::test]
async fn patches_missed_beyond_the_session_queue_end_with_the_whole_desired_collection() {
    let h = harness_with(DeviceEndpointLimits {
        session_queue_depth: 2,
        ..DeviceEndpointLimits::default()
    });
    h.sas_device("dev-1").await;
    let (mut m, _) = h.connected_persistent("dev-1").await;
    m.subscribe(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    m.disconnect().await;
    for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
        h.hub
            .update_twin(
                "dev-1",
                TwinUpdate::from_json(&json!({"properties": {"desired": {k: v}}})).unwrap(),
                &IfMatch::None,
            )
            .await
            .unwrap();
    }
    let (mut m, present) = h.connected_persistent("dev-1").await;
    assert!(present);
    // The two newest patches (the oldest was dropped), then the whole collection.
    for (version, body) in [
        (3, json!({"b": 2, "$version": 3})),
        (4, json!({"c": 3, "$version": 4})),
    ] {
        let p = m.recv_publish().await;
        assert_eq!(
            p.topic,
            format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
        );
        assert_eq!(serde_json::from_slice::<Value>(&p.payload).unwrap(), body);
        m.send(Packet::PubAck(PubAck::new(p.pkid))).await;
    }
    let full = m.recv_publish().await;
    assert_eq!(
        full.topic,
        "$iothub/twin/PATCH/properties/desired/?$version=4"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&full.payload).unwrap(),
        json!({"a": 1, "b": 2, "c": 3, "$version": 4})
    );
    m.send(Packet::PubAck(PubAck::new(full.pkid))).await;
    m.disconnect().await;
}

#[tokio::test]
async fn cloud_to_device_locked_by_an_https_receive_is_not_sent_over_mqtt() {
    use muster_hub::c2d::Settlement;
    let h = harness();
    h.sas_device("dev-1").await;
    let uri = format!("/devices/dev-1/messages/cloudToDevice?{V}");
    for body in ["locked", "free"] {
        let (status, _, _) = h
            .call(Method::POST, &uri, &[], body.as_bytes().to_vec())
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // An HTTPS receive (muster_hub::device_http) holds the first one.
    let held = h
        .hub
        .receive_cloud_to_device("dev-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.body_bytes(), b"locked");
    assert_eq!(held.delivery_count, 1);

    let mut m = h.connected("dev-1").await;
    m.subscribe(&["devices/dev-1/messages/devicebound/#"]).await;
    let first = m.recv_publish().await;
    assert_eq!(&first.payload[..], b"free", "the locked message is skipped");
    m.send(Packet::PubAck(PubAck::new(first.pkid))).await;

    // Abandoning it over HTTPS wakes the session, which delivers it.
    h.hub
        .settle_cloud_to_device(
            "dev-1",
            held.lock_token.as_deref().unwrap(),
            Settlement::Abandon,
        )
        .await
        .unwrap();
    let again = m.recv_publish().await;
    assert_eq!(&again.payload[..], b"locked");
    m.send(Packet::PubAck(PubAck::new(again.pkid))).await;
    m.send(Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
    assert_eq!(
        h.store
            .count(Collection::HubC2dMessages, None)
            .await
            .unwrap(),
        0
    );
}

/// A device connected to node A; the service calls on node B: its direct method is answered
/// through A, its cloud-to-device message delivered at once, its telemetry shown on B's live
/// stream; a device no node holds is not online; reconnecting to B closes A's connection and
/// moves its persistent session to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_one_node_is_reached_from_another() {
    let (a, b) = two_nodes();
    a.sas_device("dev-1").await;
    a.sas_device("dev-2").await;
    let mut live = open_stream(&b, &format!("/devices/dev-1/telemetry/stream?{V}"), None).await;

    let (mut m, present) = a.connected_persistent("dev-1").await;
    assert!(!present);
    m.subscribe(&[
        "$iothub/methods/POST/#",
        "devices/dev-1/messages/devicebound/#",
    ])
    .await;
    assert!(
        !b.hub.is_connected("dev-1"),
        "the session is on node A only"
    );
    method_round_trip(&b, &mut m, "dev-1").await;

    // A desired-property update made on node B reaches the session on node A.
    m.subscribe(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    let (status, _) = b
        .json(
            Method::PATCH,
            &format!("/twins/dev-1?{V}"),
            Some(json!({"properties": {"desired": {"from": "b"}}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let patch = m.recv_publish().await;
    assert!(
        patch
            .topic
            .starts_with("$iothub/twin/PATCH/properties/desired/"),
        "{}",
        patch.topic
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&patch.payload).unwrap()["from"],
        "b"
    );
    m.send(Packet::PubAck(PubAck::new(patch.pkid))).await;

    let (status, _, _) = b
        .call(
            Method::POST,
            &format!("/devices/dev-1/messages/cloudToDevice?{V}"),
            &[],
            b"from node b".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let c2d = m.recv_publish().await;
    assert_eq!(&c2d.payload[..], b"from node b");
    m.send(Packet::PubAck(PubAck::new(c2d.pkid))).await;

    m.publish(
        "devices/dev-1/messages/events/",
        br#"{"t":1}"#,
        QoS::AtLeastOnce,
        7,
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(_))));
    let events = read_events(&mut live, 1).await;
    assert_eq!(events[0].1["deviceId"], "dev-1");
    assert_eq!(events[0].1["body"], r#"{"t":1}"#);

    // dev-2 has no session on any node.
    let (status, body) = b.invoke("dev-2", "reboot").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["Message"]
            .as_str()
            .unwrap()
            .starts_with("ErrorCode:DeviceNotOnline;"),
        "{body}"
    );

    // The device reconnects to node B with CleanSession=0 and subscribes to nothing, as the
    // SDKs do when they renew their token: node A's connection closes and hands its session
    // over, so B resumes the methods subscription; a call made on A reaches it on B.
    let (mut on_b, present) = b.connected_persistent("dev-1").await;
    assert!(present, "node B resumed node A's session");
    m.expect_closed().await;
    method_round_trip(&a, &mut on_b, "dev-1").await;
    on_b.disconnect().await;
}
