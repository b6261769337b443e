//! The hub's device HTTPS API (`muster_hub::device_http`): telemetry posts and
//! cloud-to-device receive / complete / abandon / reject, as the SDKs' HTTP transports call
//! them, with device SAS tokens and X.509 client certificates, and every refusal.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http_body_util::BodyExt;
use muster_device_api::websocket::ClientCertChain;
use muster_hub::model::DeviceStatus;
use muster_hub::{DeviceEndpointLimits, DeviceInput, HubPolicy, HubRegistry, HubRights, IfMatch};
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{SasToken, Timestamp};
use muster_store::SqliteStore;
use serde_json::Value;
use tower::ServiceExt;

const HOST: &str = "hub.test";
const NOW: i64 = 1_800_000_000;
const V: &str = "api-version=2021-04-12";
const SERVICE_KEY: &[u8] = b"service-key-service-key-service-";
const DEVICE_POLICY_KEY: &[u8] = b"device-policy-key-device-policy-";
const KEY1: &[u8] = b"device-key-one-device-key-one-00";
const KEY2: &[u8] = b"device-key-two-device-key-two-00";
const CERT: &[u8] = b"pretend-der-certificate";

struct Harness {
    app: Router,
    hub: HubRegistry,
    clock: Arc<ManualClock>,
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

async fn harness_with(limits: DeviceEndpointLimits) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).unwrap());
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_unix_millis(NOW * 1000).unwrap(),
    ));
    let hub = HubRegistry::with_limits(
        store,
        HOST.into(),
        vec![
            policy("service", SERVICE_KEY, "ServiceConnect"),
            policy("device", DEVICE_POLICY_KEY, "DeviceConnect"),
        ],
        clock.clone(),
        Arc::new(SeededEntropy::new(7)),
        limits,
    );
    let app = muster_hub::router(hub.clone())
        .merge(muster_hub::device_http::router(hub.clone()))
        .fallback(muster_hub::not_found);
    for id in ["dev-1", "dev-2"] {
        hub.create_or_update_device(
            DeviceInput::sas(id, Some((B64.encode(KEY1), B64.encode(KEY2)))),
            &IfMatch::None,
        )
        .await
        .unwrap();
    }
    hub.create_or_update_device(
        DeviceInput::sas("off", Some((B64.encode(KEY1), B64.encode(KEY2))))
            .with_status(DeviceStatus::Disabled),
        &IfMatch::None,
    )
    .await
    .unwrap();
    use sha2::Digest;
    let sha256: String = sha2::Sha256::digest(CERT)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    hub.create_or_update_device(
        DeviceInput::self_signed("x509-dev", sha256, None),
        &IfMatch::None,
    )
    .await
    .unwrap();
    Harness {
        app,
        hub,
        clock,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_with(DeviceEndpointLimits::default()).await
}

fn device_token(id: &str) -> String {
    SasToken::generate(&format!("{HOST}/devices/{id}"), KEY1, None, NOW + 3600)
}

fn service_token() -> String {
    SasToken::generate(HOST, SERVICE_KEY, Some("service"), NOW + 3600)
}

/// How a request authenticates.
#[derive(Clone)]
enum Auth {
    Token(String),
    Cert(Vec<u8>),
    None,
}

fn as_device(id: &str) -> Auth {
    Auth::Token(device_token(id))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn error_code(&self) -> String {
        self.header("iothub-errorcode").unwrap_or("").to_string()
    }

    fn lock(&self) -> String {
        self.header("etag").unwrap().trim_matches('"').to_string()
    }
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: Auth,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        match &auth {
            Auth::Token(t) => req = req.header("authorization", t),
            Auth::Cert(c) => req = req.extension(ClientCertChain(vec![c.clone()])),
            Auth::None => {}
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body.to_vec())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn post_event(
        &self,
        id: &str,
        auth: Auth,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        self.call(
            Method::POST,
            &format!("/devices/{id}/messages/events?{V}"),
            auth,
            headers,
            body,
        )
        .await
    }

    async fn receive(&self, id: &str, auth: Auth) -> Reply {
        self.call(
            Method::GET,
            &format!("/devices/{id}/messages/devicebound?{V}"),
            auth,
            &[],
            b"",
        )
        .await
    }

    async fn complete(&self, id: &str, lock: &str, auth: Auth) -> Reply {
        self.call(
            Method::DELETE,
            &format!("/devices/{id}/messages/devicebound/{lock}?{V}"),
            auth,
            &[("if-match", lock)],
            b"",
        )
        .await
    }

    async fn reject(&self, id: &str, lock: &str, auth: Auth) -> Reply {
        self.call(
            Method::DELETE,
            &format!("/devices/{id}/messages/devicebound/{lock}?{V}&reject"),
            auth,
            &[("if-match", lock)],
            b"",
        )
        .await
    }

    async fn abandon(&self, id: &str, lock: &str, auth: Auth) -> Reply {
        self.call(
            Method::POST,
            &format!("/devices/{id}/messages/devicebound/{lock}/abandon?{V}"),
            auth,
            &[("if-match", lock)],
            b"",
        )
        .await
    }

    /// Sends a cloud-to-device message through the service extension path.
    async fn send_c2d(&self, id: &str, body: &[u8], headers: &[(&str, &str)]) {
        let r = self
            .call(
                Method::POST,
                &format!("/devices/{id}/messages/cloudToDevice?{V}"),
                Auth::Token(service_token()),
                headers,
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    }

    /// The stored telemetry through the service extension path.
    async fn telemetry(&self, id: &str) -> Vec<Value> {
        let r = self
            .call(
                Method::GET,
                &format!("/devices/{id}/telemetry?{V}"),
                Auth::Token(service_token()),
                &[],
                b"",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        serde_json::from_slice::<Vec<Value>>(&r.body).unwrap()
    }
}

#[tokio::test]
async fn telemetry_post_is_stored_with_app_and_system_properties() {
    let h = harness().await;
    let r = h
        .post_event(
            "dev-1",
            as_device("dev-1"),
            &[
                ("iothub-to", "/devices/dev-1/messages/events"),
                ("iothub-messageid", "msg-1"),
                ("iothub-correlationid", "corr-1"),
                ("iothub-contenttype", "application/json"),
                ("iothub-contentencoding", "utf-8"),
                ("iothub-app-Color", "red"),
                ("iothub-app-temperatureAlert", "true"),
            ],
            br#"{"t":21.5}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let msgs = h.telemetry("dev-1").await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m["deviceId"], "dev-1");
    assert_eq!(m["sequenceNumber"], 1);
    assert_eq!(m["body"], r#"{"t":21.5}"#);
    assert_eq!(m["properties"]["color"], "red");
    assert_eq!(m["properties"]["temperaturealert"], "true");
    let sys = &m["systemProperties"];
    assert_eq!(sys["messageId"], "msg-1");
    assert_eq!(sys["correlationId"], "corr-1");
    assert_eq!(sys["contentType"], "application/json");
    assert_eq!(sys["contentEncoding"], "utf-8");
    assert_eq!(sys["to"], "/devices/dev-1/messages/events");

    // A DeviceConnect policy token scoped to the device is a device credential too.
    let policy_token = SasToken::generate(
        &format!("{HOST}/devices/dev-1"),
        DEVICE_POLICY_KEY,
        Some("device"),
        NOW + 60,
    );
    let r = h
        .post_event("dev-1", Auth::Token(policy_token), &[], &[0xff, 0x00])
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let msgs = h.hub.read_telemetry("dev-1", 1, 10).await.unwrap();
    assert_eq!(msgs[0].body_bytes(), vec![0xff, 0x00]);
}

#[tokio::test]
async fn telemetry_batch_stores_each_message() {
    let h = harness().await;
    let body = format!(
        r#"[{{"body":"{}","properties":{{"iothub-app-n":"1"}}}},{{"body":"{}"}}]"#,
        B64.encode("one"),
        B64.encode("two")
    );
    let r = h
        .post_event(
            "dev-1",
            as_device("dev-1"),
            &[("content-type", "application/vnd.microsoft.iothub.json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let msgs = h.hub.read_telemetry("dev-1", 0, 10).await.unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].body, "one");
    assert_eq!(msgs[0].properties["n"], "1");
    assert_eq!(msgs[1].body, "two");

    // A bad element refuses the whole batch before anything is stored.
    let bad = format!(
        r#"[{{"body":"{}"}},{{"body":"not base64!"}}]"#,
        B64.encode("x")
    );
    let r = h
        .post_event(
            "dev-1",
            as_device("dev-1"),
            &[("content-type", "application/vnd.microsoft.iothub.json")],
            bad.as_bytes(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "IotHubFormatError");
    assert!(String::from_utf8_lossy(&r.body).contains("batch message 1"));
    assert_eq!(h.hub.read_telemetry("dev-1", 0, 10).await.unwrap().len(), 2);
}

#[tokio::test]
async fn telemetry_refusals_store_nothing() {
    let h = harness_with(DeviceEndpointLimits {
        d2c_max_body: 16,
        ..DeviceEndpointLimits::default()
    })
    .await;
    let wrong_key = SasToken::generate(
        &format!("{HOST}/devices/dev-1"),
        b"not-the-device-key-not-the-key-0",
        None,
        NOW + 60,
    );
    let expired = SasToken::generate(&format!("{HOST}/devices/dev-1"), KEY1, None, NOW - 600);
    let other_hub = SasToken::generate("other.hub/devices/dev-1", KEY1, None, NOW + 60);
    let cases: Vec<(&str, Auth, &str)> = vec![
        ("dev-1", Auth::None, "neither an Authorization header"),
        ("dev-1", as_device("dev-2"), "not this device's"),
        ("dev-1", Auth::Token(wrong_key), "matches neither key"),
        ("dev-1", Auth::Token(expired), "expired"),
        ("dev-1", Auth::Token(other_hub), "does not name this hub"),
        ("dev-1", Auth::Token(service_token()), "DeviceConnect"),
        ("dev-1", Auth::Token("Bearer abc".into()), "Authorization"),
        ("ghost", as_device("ghost"), "not registered"),
        ("off", as_device("off"), "disabled"),
        ("dev-1", Auth::Cert(CERT.to_vec()), "X.509"),
        ("x509-dev", Auth::Cert(b"other-cert".to_vec()), "thumbprint"),
    ];
    for (id, auth, why) in cases {
        let r = h.post_event(id, auth, &[], b"x").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{id} {why}");
        assert_eq!(r.error_code(), "IotHubUnauthorizedAccess", "{why}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(text.contains(why), "{why}: {text}");
        assert!(!text.contains(&B64.encode(KEY1)));
    }
    // No api-version.
    let r = h
        .call(
            Method::POST,
            "/devices/dev-1/messages/events",
            as_device("dev-1"),
            &[],
            b"x",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "InvalidProtocolVersion");
    // Too large.
    let r = h
        .post_event("dev-1", as_device("dev-1"), &[], &[b'a'; 17])
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "MessageTooLarge");
    for id in ["dev-1", "x509-dev", "ghost", "off"] {
        assert!(h.hub.read_telemetry(id, 0, 10).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn x509_device_posts_and_receives_with_its_certificate() {
    let h = harness().await;
    let r = h
        .post_event("x509-dev", Auth::Cert(CERT.to_vec()), &[], b"from x509")
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert_eq!(h.telemetry("x509-dev").await[0]["body"], "from x509");

    h.send_c2d("x509-dev", b"to x509", &[]).await;
    let r = h.receive("x509-dev", Auth::Cert(CERT.to_vec())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, b"to x509");
    let r = h
        .complete("x509-dev", &r.lock(), Auth::Cert(CERT.to_vec()))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn receive_locks_and_complete_deletes() {
    let h = harness().await;
    let r = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "empty queue");

    h.send_c2d(
        "dev-1",
        b"hello device",
        &[
            ("iothub-messageid", "c2d-1"),
            ("iothub-correlationid", "corr"),
            ("iothub-app-color", "blue"),
            ("iothub-expiry", "2030-01-01T00:00:00Z"),
        ],
    )
    .await;
    h.send_c2d("dev-1", b"second", &[]).await;

    let first = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, b"hello device");
    assert_eq!(first.header("iothub-messageid"), Some("c2d-1"));
    assert_eq!(first.header("iothub-correlationid"), Some("corr"));
    assert_eq!(first.header("iothub-app-color"), Some("blue"));
    assert_eq!(first.header("iothub-sequencenumber"), Some("1"));
    assert_eq!(first.header("iothub-deliverycount"), Some("1"));
    assert_eq!(
        first.header("iothub-to"),
        Some("/devices/dev-1/messages/deviceBound")
    );
    assert!(first.header("iothub-expiry").is_some());
    let etag = first.header("etag").unwrap();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let lock1 = first.lock();
    assert_eq!(lock1.len(), 36, "a UUID: {lock1}");

    // The first is locked: the next receive gets the second.
    let second = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, b"second");
    assert_ne!(second.lock(), lock1);
    assert_eq!(
        h.receive("dev-1", as_device("dev-1")).await.status,
        StatusCode::NO_CONTENT,
        "both locked"
    );

    let r = h.complete("dev-1", &lock1, as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = h.complete("dev-1", &lock1, as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "completed twice");
    assert_eq!(r.error_code(), "DeviceMessageLockLost");
    let r = h
        .complete("dev-1", &second.lock(), as_device("dev-1"))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        h.receive("dev-1", as_device("dev-1")).await.status,
        StatusCode::NO_CONTENT,
        "queue empty"
    );
}

#[tokio::test]
async fn abandon_redelivers_and_reject_deletes() {
    let h = harness().await;
    h.send_c2d("dev-1", b"m", &[]).await;
    let r1 = h.receive("dev-1", as_device("dev-1")).await;
    let r = h.abandon("dev-1", &r1.lock(), as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r2 = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(r2.status, StatusCode::OK);
    assert_eq!(r2.body, b"m");
    assert_eq!(r2.header("iothub-deliverycount"), Some("2"));
    assert_ne!(r2.lock(), r1.lock());
    // The abandoned lock is gone.
    let r = h.abandon("dev-1", &r1.lock(), as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.error_code(), "DeviceMessageLockLost");

    let r = h.reject("dev-1", &r2.lock(), as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        h.receive("dev-1", as_device("dev-1")).await.status,
        StatusCode::NO_CONTENT,
        "rejected messages are not delivered again"
    );
}

#[tokio::test]
async fn expired_lock_frees_the_message_and_delivery_count_is_bounded() {
    let h = harness_with(DeviceEndpointLimits {
        c2d_max_delivery_count: 3,
        ..DeviceEndpointLimits::default()
    })
    .await;
    h.send_c2d("dev-1", b"m", &[]).await;
    let r1 = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(r1.status, StatusCode::OK);
    h.clock.advance_secs(59);
    assert_eq!(
        h.receive("dev-1", as_device("dev-1")).await.status,
        StatusCode::NO_CONTENT,
        "still locked"
    );
    h.clock.advance_secs(2);
    let r2 = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(r2.status, StatusCode::OK, "the lock expired");
    assert_eq!(r2.header("iothub-deliverycount"), Some("2"));
    let r = h.complete("dev-1", &r1.lock(), as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "the old lock");
    h.clock.advance_secs(61);
    let r3 = h.receive("dev-1", as_device("dev-1")).await;
    assert_eq!(r3.header("iothub-deliverycount"), Some("3"));
    h.clock.advance_secs(61);
    let r = h.complete("dev-1", &r3.lock(), as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "expired lock");
    // Delivered three times without completion: dropped.
    assert_eq!(
        h.receive("dev-1", as_device("dev-1")).await.status,
        StatusCode::NO_CONTENT
    );
    // And gone from the queue: the service side can fill it again to the full depth.
    for _ in 0..DeviceEndpointLimits::default().c2d_queue_depth {
        h.send_c2d("dev-1", b"x", &[]).await;
    }
}

#[tokio::test]
async fn a_device_touches_only_its_own_messages() {
    let h = harness().await;
    h.send_c2d("dev-1", b"for dev-1", &[]).await;
    // dev-2's token on dev-1's queue.
    let r = h.receive("dev-1", as_device("dev-2")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "IotHubUnauthorizedAccess");
    assert_eq!(
        h.receive("dev-2", as_device("dev-2")).await.status,
        StatusCode::NO_CONTENT
    );
    let mine = h.receive("dev-1", as_device("dev-1")).await;
    let lock = mine.lock();
    // dev-2 can't settle dev-1's lock: not with its token on dev-1's path, and on its own
    // path the lock names none of its messages.
    let r = h.complete("dev-1", &lock, as_device("dev-2")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = h.complete("dev-2", &lock, as_device("dev-2")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.error_code(), "DeviceMessageLockLost");
    let r = h.reject("dev-2", &lock, as_device("dev-2")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = h.abandon("dev-2", &lock, as_device("dev-2")).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    // Unknown lock token.
    let r = h
        .complete(
            "dev-1",
            "00000000-0000-4000-8000-000000000000",
            as_device("dev-1"),
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    // Unauthenticated settlement.
    let r = h.complete("dev-1", &lock, Auth::None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The owner still holds it.
    let r = h.complete("dev-1", &lock, as_device("dev-1")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn service_extensions_moved_off_the_device_paths() {
    let h = harness().await;
    // The old service-side uses of the device paths are gone: a service token is not a
    // device credential there.
    let r = h
        .call(
            Method::POST,
            &format!("/devices/dev-1/messages/deviceBound?{V}"),
            Auth::Token(service_token()),
            &[],
            b"x",
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = h
        .call(
            Method::GET,
            &format!("/devices/dev-1/messages/events?{V}"),
            Auth::Token(service_token()),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // A device token does not reach the service extensions.
    let r = h
        .call(
            Method::GET,
            &format!("/devices/dev-1/telemetry?{V}"),
            as_device("dev-1"),
            &[],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = h
        .call(
            Method::POST,
            &format!("/devices/dev-1/messages/cloudToDevice?{V}"),
            as_device("dev-1"),
            &[],
            b"x",
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}
