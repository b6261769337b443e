//! The hub registry driven through its router without sockets: what azure-iot-hub 2.7.0 and
//! azure-iothub send, and every refusal with its IoT Hub error body.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http_body_util::BodyExt;
use muster_hub::{
    DeviceInput, HubErrorCode, HubPolicy, HubRegistry, HubRights, IfMatch, TwinUpdate,
};
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{SasToken, Timestamp};
use muster_store::{SqliteStore, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

const HOST: &str = "hub.test";
const OWNER_KEY: &[u8] = b"owner-key-owner-key-owner-key-00";
const READ_KEY: &[u8] = b"read-key-read-key-read-key-read-";
const RW_KEY: &[u8] = b"rw-key-rw-key-rw-key-rw-key-rw-k";
const SERVICE_KEY: &[u8] = b"service-key-service-key-service-";
const NOW: i64 = 1_800_000_000;
const V: &str = "api-version=2021-04-12";

struct Harness {
    app: Router,
    hub: HubRegistry,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

fn policy(name: &str, key: &[u8], rights: &str) -> HubPolicy {
    HubPolicy {
        key_name: name.into(),
        primary_key: B64.encode(key),
        secondary_key: B64.encode(b"secondary-secondary-secondary-00"),
        rights: HubRights::parse(rights).unwrap(),
    }
}

fn policies() -> Vec<HubPolicy> {
    vec![
        policy(
            "iothubowner",
            OWNER_KEY,
            "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect",
        ),
        policy("registryRead", READ_KEY, "RegistryRead"),
        policy("registryReadWrite", RW_KEY, "RegistryWrite"),
        policy("service", SERVICE_KEY, "ServiceConnect"),
    ]
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("muster.db")).unwrap());
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_unix_millis(NOW * 1000).unwrap(),
    ));
    let hub = HubRegistry::new(
        store.clone(),
        HOST.into(),
        policies(),
        clock.clone(),
        Arc::new(SeededEntropy::new(7)),
    );
    let app = muster_hub::router(hub.clone())
        .fallback(muster_hub::not_found)
        .method_not_allowed_fallback(muster_hub::method_not_allowed);
    Harness {
        app,
        hub,
        store,
        clock,
        _dir: dir,
    }
}

/// The token azure-iot-hub 2.7.0 sends: `sr` = quote_plus(host), `skn` = policy.
fn token(resource: &str, key: &[u8], policy: &str, expiry: i64) -> String {
    SasToken::generate(resource, key, Some(policy), expiry)
}

fn owner() -> String {
    token(HOST, OWNER_KEY, "iothubowner", NOW + 3600)
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json; charset=utf-8")
                .body(Body::from(b))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn put_device(&self, id: &str, body: Value, if_match: Option<&str>) -> Reply {
        let h: Vec<(&str, &str)> = if_match.map(|m| vec![("if-match", m)]).unwrap_or_default();
        self.call(
            Method::PUT,
            &format!("/devices/{id}?{V}"),
            Some(&owner()),
            &h,
            Some(body.to_string()),
        )
        .await
    }

    async fn get(&self, path: &str) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.call(
            Method::GET,
            &format!("{path}{sep}{V}"),
            Some(&owner()),
            &[],
            None,
        )
        .await
    }

    async fn twin_write(&self, method: Method, id: &str, body: Value, if_match: &str) -> Reply {
        self.call(
            method,
            &format!("/twins/{id}?{V}"),
            Some(&owner()),
            &[("if-match", if_match)],
            Some(body.to_string()),
        )
        .await
    }
}

/// What the Python SDK's `create_device_with_sas(id, None, None, "enabled")` sends.
fn python_sas_device(id: &str) -> Value {
    json!({
        "deviceId": id,
        "status": "enabled",
        "authentication": {"symmetricKey": {}, "type": "sas"},
        "capabilities": {"iotEdge": false}
    })
}

#[track_caller]
fn assert_hub_error(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert_eq!(
        r.headers
            .get("iothub-errorcode")
            .and_then(|v| v.to_str().ok()),
        Some(code)
    );
    assert_eq!(
        r.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json; charset=utf-8")
    );
    let message = r.body["Message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!("ErrorCode:{code};")),
        "Message {message:?}"
    );
    // Node's parser: exactly one ';' between code and text.
    assert_eq!(message.matches(';').count(), 1, "{message}");
    let exception = r.body["ExceptionMessage"].as_str().unwrap_or_default();
    assert!(
        exception.starts_with("Tracking ID:") && exception.contains("-TimeStamp:"),
        "{exception}"
    );
}

#[tokio::test]
async fn create_generates_keys_and_renders_the_hub_device() {
    let h = harness();
    let r = h
        .put_device("dev-01", python_sas_device("dev-01"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let d = &r.body;
    assert_eq!(d["deviceId"], "dev-01");
    assert_eq!(d["status"], "enabled");
    assert_eq!(d["statusReason"], Value::Null);
    assert_eq!(d["connectionState"], "Disconnected");
    assert_eq!(d["lastActivityTime"], "0001-01-01T00:00:00Z");
    assert_eq!(d["connectionStateUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(d["statusUpdatedTime"], "0001-01-01T00:00:00Z");
    assert_eq!(d["cloudToDeviceMessageCount"], 0);
    assert_eq!(d["capabilities"], json!({"iotEdge": false}));
    assert_eq!(d["parentScopes"], json!([]));
    assert!(d["generationId"].as_str().unwrap().len() >= 18);
    let auth = &d["authentication"];
    assert_eq!(auth["type"], "sas");
    assert_eq!(
        auth["x509Thumbprint"],
        json!({"primaryThumbprint": null, "secondaryThumbprint": null})
    );
    let primary = auth["symmetricKey"]["primaryKey"].as_str().unwrap();
    let secondary = auth["symmetricKey"]["secondaryKey"].as_str().unwrap();
    assert_eq!(B64.decode(primary).unwrap().len(), 32);
    assert_eq!(B64.decode(secondary).unwrap().len(), 32);
    assert_ne!(primary, secondary);
    let etag = d["etag"].as_str().unwrap();
    assert!(B64.decode(etag).is_ok());
    assert_eq!(
        r.headers.get("etag").unwrap().to_str().unwrap(),
        format!("\"{etag}\"")
    );
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json; charset=utf-8"
    );

    // Given keys are kept as sent; x509 devices get upper-case thumbprints.
    let pk = B64.encode([1u8; 32]);
    let sk = B64.encode([2u8; 16]);
    let r = h
        .put_device(
            "dev-02",
            json!({"deviceId": "dev-02", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": pk, "secondaryKey": sk}}}),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["authentication"]["symmetricKey"]["primaryKey"], pk);
    let thumb = "ab".repeat(32);
    let r = h
        .put_device(
            "x509-dev",
            json!({"deviceId": "x509-dev", "status": "disabled", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": thumb, "secondaryThumbprint": null}}, "capabilities": {"iotEdge": true}}),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["status"], "disabled");
    assert_eq!(
        r.body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        "AB".repeat(32)
    );
    assert_eq!(
        r.body["authentication"]["symmetricKey"],
        json!({"primaryKey": null, "secondaryKey": null})
    );
    assert!(r.body["deviceScope"]
        .as_str()
        .unwrap()
        .starts_with("ms-azure-iot-edge://x509-dev-"));

    // Node's create without authentication: sas with generated keys, id from the path.
    let r = h
        .put_device("node-dev", json!({"status": "enabled"}), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["deviceId"], "node-dev");
    assert_eq!(r.body["authentication"]["type"], "sas");
}

#[tokio::test]
async fn if_match_rules_for_devices() {
    let h = harness();
    let created = h.put_device("dev", python_sas_device("dev"), None).await;
    let etag0 = created.body["etag"].as_str().unwrap().to_string();
    let keys0 = created.body["authentication"]["symmetricKey"].clone();

    // No If-Match on an existing device → 409.
    let r = h.put_device("dev", python_sas_device("dev"), None).await;
    assert_hub_error(&r, StatusCode::CONFLICT, "DeviceAlreadyExists");

    // "*" (quoted, as Python and Node send it) updates; keys left out are kept.
    h.clock.advance_secs(10);
    let mut body = python_sas_device("dev");
    body["status"] = json!("disabled");
    body["statusReason"] = json!("maintenance");
    let r = h.put_device("dev", body.clone(), Some("\"*\"")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let etag1 = r.body["etag"].as_str().unwrap().to_string();
    assert_ne!(etag0, etag1);
    assert_eq!(r.body["status"], "disabled");
    assert_eq!(r.body["statusReason"], "maintenance");
    assert_eq!(r.body["authentication"]["symmetricKey"], keys0);
    assert_eq!(r.body["generationId"], created.body["generationId"]);
    assert_ne!(r.body["statusUpdatedTime"], "0001-01-01T00:00:00Z");

    // A stale etag → 412; the current one (quoted or not) → 200.
    let r = h
        .put_device("dev", body.clone(), Some(&format!("\"{etag0}\"")))
        .await;
    assert_hub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let r = h
        .put_device("dev", body.clone(), Some(&format!("\"{etag1}\"")))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let etag2 = r.body["etag"].as_str().unwrap().to_string();
    let r = h.put_device("dev", body.clone(), Some(&etag2)).await;
    assert_eq!(r.status, StatusCode::OK);

    // A concrete etag on a device that doesn't exist → 412; "*" creates.
    let r = h
        .put_device("ghost", python_sas_device("ghost"), Some("\"abc\""))
        .await;
    assert_hub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let r = h
        .put_device("ghost", python_sas_device("ghost"), Some("\"*\""))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    // Body id must name the path's device (case aside).
    let r = h
        .put_device("dev", python_sas_device("other"), Some("*"))
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h
        .put_device("dev", python_sas_device("DEV"), Some("*"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["deviceId"], "dev", "original casing kept");

    // Invalid keys and thumbprints.
    let r = h
        .put_device(
            "k",
            json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "not base64!"}}}),
            None,
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h
        .put_device(
            "k",
            json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": B64.encode([0u8; 65])}}}),
            None,
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h
        .put_device(
            "k",
            json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "abc"}}}),
            None,
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h.put_device("k", json!({"status": "sleeping"}), None).await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn get_delete_and_case_insensitive_lookup() {
    let h = harness();
    h.put_device("MyDevice", python_sas_device("MyDevice"), None)
        .await;
    let r = h.get("/devices/mydevice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["deviceId"], "MyDevice");
    let etag = r.body["etag"].as_str().unwrap().to_string();
    let r = h.get("/twins/MYDEVICE").await;
    assert_eq!(r.body["deviceId"], "MyDevice");

    let r = h.get("/devices/nobody").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
    assert_eq!(
        r.body["Message"],
        "ErrorCode:DeviceNotFound;Device 'nobody' not found."
    );
    let r = h.get("/twins/nobody").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");

    let delete = |if_match: &'static str, id: &'static str| {
        let h = &h;
        async move {
            h.call(
                Method::DELETE,
                &format!("/devices/{id}?{V}"),
                Some(&owner()),
                &[("if-match", if_match)],
                None,
            )
            .await
        }
    };
    let r = delete("\"c3RhbGU=\"", "MYDEVICE").await;
    assert_hub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let quoted = format!("\"{etag}\"");
    let r = h
        .call(
            Method::DELETE,
            &format!("/devices/mydevice?{V}"),
            Some(&owner()),
            &[("if-match", &quoted)],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.body, Value::Null);
    let r = h.get("/devices/MyDevice").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
    let r = h.get("/twins/MyDevice").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
    let r = delete("\"*\"", "MyDevice").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");

    // Recreating starts a fresh twin.
    h.put_device("MyDevice", python_sas_device("MyDevice"), None)
        .await;
    let r = h.get("/twins/MyDevice").await;
    assert_eq!(r.body["version"], 1);
    assert_eq!(
        h.store
            .count(muster_store::Collection::HubDevices, None)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn list_devices_with_top_and_hub_isolation() {
    let h = harness();
    for id in ["c-dev", "A-dev", "b-dev"] {
        assert_eq!(
            h.put_device(id, python_sas_device(id), None).await.status,
            StatusCode::OK
        );
    }
    // A second hub in the same store sees only its own devices.
    let other = HubRegistry::new(
        h.store.clone(),
        "other.hub".into(),
        policies(),
        h.clock.clone(),
        Arc::new(SeededEntropy::new(9)),
    );
    other
        .create_or_update_device(DeviceInput::sas("a-dev", None), &IfMatch::None)
        .await
        .unwrap();
    assert_eq!(other.list_devices(None).await.unwrap().len(), 1);

    let r = h.get("/devices").await;
    assert_eq!(r.status, StatusCode::OK);
    let ids: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["A-dev", "b-dev", "c-dev"]);
    let r = h.get("/devices?top=2").await;
    assert_eq!(r.body.as_array().unwrap().len(), 2);
    // Node lists with a trailing slash; out-of-range top means 1000.
    let r = h.get("/devices/?top=0").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_array().unwrap().len(), 3);
    let r = h.get("/devices?top=many").await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    // The other hub's device is a different record.
    let r = h.get("/devices/a-dev").await;
    assert_eq!(r.body["deviceId"], "A-dev");
}

#[tokio::test]
async fn twin_patch_replace_versions_and_null_deletes() {
    let h = harness();
    let dev = h.put_device("t1", python_sas_device("t1"), None).await;
    let r = h.get("/twins/t1").await;
    assert_eq!(r.status, StatusCode::OK);
    let t = &r.body;
    assert_eq!(t["deviceId"], "t1");
    assert_eq!(t["version"], 1);
    assert_eq!(t["etag"], "AAAAAAAAAAE=");
    assert_eq!(r.headers.get("etag").unwrap(), "\"AAAAAAAAAAE=\"");
    assert_eq!(t["deviceEtag"], dev.body["etag"]);
    assert_eq!(t["status"], "enabled");
    assert_eq!(t["authenticationType"], "sas");
    assert_eq!(t["connectionState"], "Disconnected");
    assert_eq!(t["cloudToDeviceMessageCount"], 0);
    assert_eq!(t["tags"], json!({}));
    assert_eq!(t["properties"]["desired"]["$version"], 1);
    assert_eq!(t["properties"]["reported"]["$version"], 1);
    assert_eq!(
        t["properties"]["desired"]["$metadata"]["$lastUpdatedVersion"],
        1
    );
    assert!(t["properties"]["reported"]["$metadata"]["$lastUpdated"].is_string());

    // PATCH merges tags and desired.
    h.clock.advance_secs(5);
    let r = h
        .twin_write(
            Method::PATCH,
            "t1",
            json!({"tags": {"site": {"building": "b1", "floor": 2}}, "properties": {"desired": {"telemetry": {"period": 5, "unit": "s"}, "mode": "eco"}}}),
            "\"*\"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["etag"], "AAAAAAAAAAI=");
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["$version"], 2);
    assert_eq!(desired["telemetry"], json!({"period": 5, "unit": "s"}));
    assert_eq!(
        desired["$metadata"]["telemetry"]["period"]["$lastUpdatedVersion"],
        2
    );

    // null deletes, nested merge keeps siblings; the twin etag guards the write.
    let r = h
        .twin_write(
            Method::PATCH,
            "t1",
            json!({"tags": {"site": {"floor": null}}, "properties": {"desired": {"telemetry": {"unit": null}, "mode": null}}}),
            "\"AAAAAAAAAAE=\"",
        )
        .await;
    assert_hub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let r = h
        .twin_write(
            Method::PATCH,
            "t1",
            json!({"tags": {"site": {"floor": null}}, "properties": {"desired": {"telemetry": {"unit": null}, "mode": null}}}),
            "\"AAAAAAAAAAI=\"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["version"], 3);
    assert_eq!(r.body["tags"], json!({"site": {"building": "b1"}}));
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["$version"], 3);
    assert_eq!(desired["telemetry"], json!({"period": 5}));
    assert!(desired.get("mode").is_none());
    assert!(desired["$metadata"].get("mode").is_none());

    // Tags-only patch bumps the twin version, not desired $version.
    let r = h
        .twin_write(Method::PATCH, "t1", json!({"tags": {"owner": "ops"}}), "*")
        .await;
    assert_eq!(r.body["version"], 4);
    assert_eq!(r.body["properties"]["desired"]["$version"], 3);
    // A desired update that changes no value is still an update, as in IoT Hub: both
    // versions grow.
    let r = h
        .twin_write(
            Method::PATCH,
            "t1",
            json!({"tags": {"owner": "ops"}, "properties": {"desired": {"gone": null}}}),
            "*",
        )
        .await;
    assert_eq!(r.body["version"], 5);
    assert_eq!(r.body["properties"]["desired"]["$version"], 4);
    // A tags patch that changes nothing is not.
    let r = h
        .twin_write(Method::PATCH, "t1", json!({"tags": {"owner": "ops"}}), "*")
        .await;
    assert_eq!(r.body["version"], 5);

    // PUT replaces tags and desired; a twin from GET can be sent back as is.
    let mut full = h.get("/twins/t1").await.body;
    full["tags"] = json!({"replaced": true});
    full["properties"]["desired"] = json!({"mode": "turbo", "$version": 3, "$metadata": {}});
    let r = h.twin_write(Method::PUT, "t1", full, "*").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["version"], 6);
    assert_eq!(r.body["tags"], json!({"replaced": true}));
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["$version"], 5);
    assert_eq!(desired["mode"], "turbo");
    assert!(desired.get("telemetry").is_none());
    // A replace without tags clears them.
    let r = h
        .twin_write(
            Method::PUT,
            "t1",
            json!({"properties": {"desired": {"mode": "turbo"}}}),
            "*",
        )
        .await;
    assert_eq!(r.body["tags"], json!({}));
    assert_eq!(r.body["version"], 7);
    // Equal desired values replaced: still a desired update.
    assert_eq!(r.body["properties"]["desired"]["$version"], 6);

    // Identity writes don't touch the twin version but show in the twin.
    let r = h
        .put_device("t1", json!({"status": "disabled"}), Some("*"))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let t = h.get("/twins/t1").await.body;
    assert_eq!(t["version"], 7);
    assert_eq!(t["status"], "disabled");
    assert_eq!(t["deviceEtag"], r.body["etag"]);

    // Invalid property names, wrong shapes, malformed JSON.
    let r = h
        .twin_write(
            Method::PATCH,
            "t1",
            json!({"properties": {"desired": {"a.b": 1}}}),
            "*",
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h
        .twin_write(Method::PATCH, "t1", json!({"tags": [1]}), "*")
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = h
        .call(
            Method::PATCH,
            &format!("/twins/t1?{V}"),
            Some(&owner()),
            &[],
            Some("{\"tags\": ".into()),
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "IotHubFormatError");
    let r = h
        .twin_write(Method::PATCH, "nobody", json!({"tags": {"a": 1}}), "*")
        .await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
}

#[tokio::test]
async fn desired_changes_reach_subscribers_and_reported_updates_version() {
    let h = harness();
    let mut rx = h.hub.subscribe_desired();
    h.put_device("Notify-Me", python_sas_device("Notify-Me"), None)
        .await;
    let r = h
        .twin_write(
            Method::PATCH,
            "notify-me",
            json!({"properties": {"desired": {"fan": {"speed": 3}, "led": true}}}),
            "*",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let change = rx.recv().await.unwrap();
    assert_eq!(change.device_id, "Notify-Me");
    assert_eq!(change.version, 2);
    assert_eq!(
        Value::Object(change.patch),
        json!({"fan": {"speed": 3}, "led": true, "$version": 2})
    );
    // Tags-only changes notify nobody; replace sends the difference with nulls.
    h.twin_write(Method::PATCH, "notify-me", json!({"tags": {"x": 1}}), "*")
        .await;
    h.twin_write(
        Method::PUT,
        "notify-me",
        json!({"properties": {"desired": {"fan": {"speed": 3}, "mode": "auto"}}}),
        "*",
    )
    .await;
    let change = rx.recv().await.unwrap();
    assert_eq!(
        Value::Object(change.patch),
        json!({"led": null, "mode": "auto", "$version": 3})
    );

    // Reported properties from the device: version returned, merged with null deletes.
    let v = h
        .hub
        .update_reported(
            "notify-me",
            json!({"fw": "1.0", "battery": {"level": 80}})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(v, 2);
    let v = h
        .hub
        .update_reported(
            "NOTIFY-ME",
            json!({"battery": {"level": null}, "$version": 99})
                .as_object()
                .cloned()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(v, 3);
    let v = h
        .hub
        .update_reported(
            "notify-me",
            json!({"fw": "1.0"}).as_object().cloned().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(v, 3, "no change, no new version");
    let t = h.get("/twins/notify-me").await.body;
    assert_eq!(t["properties"]["reported"]["fw"], "1.0");
    assert_eq!(t["properties"]["reported"]["battery"], json!({}));
    assert_eq!(t["properties"]["reported"]["$version"], 3);
    assert_eq!(t["version"], 6);
    let doc = h.hub.device_twin_document("notify-me").await.unwrap();
    assert_eq!(
        doc["desired"],
        json!({"fan": {"speed": 3}, "mode": "auto", "$version": 3})
    );
    assert_eq!(doc["reported"]["$version"], 3);
    let e = h
        .hub
        .update_reported(
            "notify-me",
            json!({"bad key": 1}).as_object().cloned().unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, HubErrorCode::ArgumentInvalid);
    let e = h
        .hub
        .update_reported("nobody", serde_json::Map::new())
        .await
        .unwrap_err();
    assert_eq!(e.code, HubErrorCode::DeviceNotFound);
    assert!(rx.try_recv().is_err(), "reported changes are not pushed");
}

#[tokio::test]
async fn in_process_create_with_initial_twin_is_one_write() {
    let h = harness();
    let twin = TwinUpdate {
        tags: json!({"env": "prod"}).as_object().cloned(),
        desired: json!({"interval": 30}).as_object().cloned(),
        ..Default::default()
    };
    let (device, t) = h
        .hub
        .create_or_update_device_with_twin(
            DeviceInput::self_signed("cam-1", "0a".repeat(20), None).with_iot_edge(false),
            &IfMatch::None,
            twin.clone(),
        )
        .await
        .unwrap();
    assert_eq!(device.device_id, "cam-1");
    assert_eq!(t.tags, *twin.tags.as_ref().unwrap());
    assert_eq!(t.properties.desired["interval"], 30);
    assert_eq!(
        h.store
            .count(muster_store::Collection::HubDevices, Some(HOST))
            .await
            .unwrap(),
        1
    );
    let e = h
        .hub
        .create_or_update_device_with_twin(DeviceInput::sas("cam-1", None), &IfMatch::None, twin)
        .await
        .unwrap_err();
    assert_eq!(e.code, HubErrorCode::DeviceAlreadyExists);
}

#[tokio::test]
async fn authorization_failures() {
    let h = harness();
    h.put_device("dev", python_sas_device("dev"), None).await;
    let get = |auth: Option<String>, path: &'static str| {
        let h = &h;
        async move {
            h.call(
                Method::GET,
                &format!("{path}?{V}"),
                auth.as_deref(),
                &[],
                None,
            )
            .await
        }
    };
    let unauthorized = StatusCode::UNAUTHORIZED;
    let code = "IotHubUnauthorizedAccess";

    assert_hub_error(&get(None, "/devices/dev").await, unauthorized, code);
    let wrong_key = token(
        HOST,
        b"wrong-key-wrong-key-wrong-key-00",
        "iothubowner",
        NOW + 60,
    );
    assert_hub_error(
        &get(Some(wrong_key), "/devices/dev").await,
        unauthorized,
        code,
    );
    let expired = token(HOST, OWNER_KEY, "iothubowner", NOW - 31);
    let r = get(Some(expired), "/devices/dev").await;
    assert_hub_error(&r, unauthorized, code);
    assert!(r.body["Message"].as_str().unwrap().contains("expired"));
    // Within the 30 s skew allowance it still passes.
    let skewed = token(HOST, OWNER_KEY, "iothubowner", NOW - 29);
    assert_eq!(
        get(Some(skewed), "/devices/dev").await.status,
        StatusCode::OK
    );
    let other_hub = token("other.hub", OWNER_KEY, "iothubowner", NOW + 60);
    assert_hub_error(
        &get(Some(other_hub), "/devices/dev").await,
        unauthorized,
        code,
    );
    let no_policy = token(HOST, OWNER_KEY, "nobody", NOW + 60);
    assert_hub_error(
        &get(Some(no_policy), "/devices/dev").await,
        unauthorized,
        code,
    );
    let device_token =
        SasToken::generate(&format!("{HOST}/devices/dev"), OWNER_KEY, None, NOW + 60);
    assert_hub_error(
        &get(Some(device_token), "/devices/dev").await,
        unauthorized,
        code,
    );

    // Rights: registryRead reads devices but neither writes nor reads twins.
    let read = token(HOST, READ_KEY, "registryRead", NOW + 60);
    assert_eq!(
        get(Some(read.clone()), "/devices/dev").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(Some(read.clone()), "/devices").await.status,
        StatusCode::OK
    );
    let r = h
        .call(
            Method::PUT,
            &format!("/devices/dev2?{V}"),
            Some(&read),
            &[],
            Some("{}".into()),
        )
        .await;
    assert_hub_error(&r, unauthorized, code);
    assert!(r.body["Message"]
        .as_str()
        .unwrap()
        .contains("RegistryWrite"));
    assert_hub_error(&get(Some(read), "/twins/dev").await, unauthorized, code);
    // RegistryWrite implies RegistryRead.
    let rw = token(HOST, RW_KEY, "registryReadWrite", NOW + 60);
    assert_eq!(
        get(Some(rw.clone()), "/devices/dev").await.status,
        StatusCode::OK
    );
    let r = h
        .call(
            Method::DELETE,
            &format!("/devices/dev?{V}"),
            Some(&rw),
            &[("if-match", "*")],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    h.put_device("dev", python_sas_device("dev"), None).await;
    // service: twins yes, identities no.
    let service = token(HOST, SERVICE_KEY, "service", NOW + 60);
    assert_eq!(
        get(Some(service.clone()), "/twins/dev").await.status,
        StatusCode::OK
    );
    assert_hub_error(
        &get(Some(service), "/devices/dev").await,
        unauthorized,
        code,
    );

    // Node signs the raw resource and orders fields differently; scheme prefixes are fine.
    let sig = muster_proto::sas::sign(OWNER_KEY, &format!("{HOST}\n{}", NOW + 60));
    let node = format!(
        "SharedAccessSignature sr={HOST}&sig={}&skn=iothubowner&se={}",
        muster_proto::sas::encode_resource(&sig),
        NOW + 60
    );
    assert_eq!(get(Some(node), "/devices/dev").await.status, StatusCode::OK);
    let scheme = token(
        &format!("https://{HOST}:443"),
        OWNER_KEY,
        "iothubowner",
        NOW + 60,
    );
    assert_eq!(
        get(Some(scheme), "/devices/dev").await.status,
        StatusCode::OK
    );

    // A token scoped to one device covers that device (and its twin) only.
    let scoped = token(
        &format!("{HOST}/devices/dev"),
        OWNER_KEY,
        "iothubowner",
        NOW + 60,
    );
    assert_eq!(
        get(Some(scoped.clone()), "/devices/DEV").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(Some(scoped.clone()), "/twins/dev").await.status,
        StatusCode::OK
    );
    assert_hub_error(
        &get(Some(scoped.clone()), "/devices/other").await,
        unauthorized,
        code,
    );
    assert_hub_error(&get(Some(scoped), "/devices").await, unauthorized, code);
    let all_devices = token(
        &format!("{HOST}/devices"),
        OWNER_KEY,
        "iothubowner",
        NOW + 60,
    );
    assert_eq!(
        get(Some(all_devices), "/devices").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn request_checks() {
    let h = harness();
    // api-version: required, a real date from 2018-06-30 on.
    let r = h
        .call(Method::GET, "/devices", Some(&owner()), &[], None)
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "InvalidProtocolVersion");
    let r = h
        .call(
            Method::GET,
            "/devices?api-version=2016-11-14",
            Some(&owner()),
            &[],
            None,
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "InvalidProtocolVersion");
    for v in ["2021-04-12", "2024-03-31", "2020-06-30-preview"] {
        let r = h
            .call(
                Method::GET,
                &format!("/devices?api-version={v}"),
                Some(&owner()),
                &[],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{v}");
    }

    // Invalid device ids (as the SDKs percent-encode them).
    for bad in ["bad%23id", "a%20b", &"x".repeat(129)] {
        let r = h.put_device(bad, json!({}), None).await;
        assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
        let r = h.get(&format!("/devices/{bad}")).await;
        assert_hub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    }
    // Allowed specials round-trip through percent-encoding.
    let r = h.put_device("dev%25(1)%3A%40%24'", json!({}), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["deviceId"], "dev%(1):@$'");

    // Malformed JSON and non-object bodies.
    let r = h
        .call(
            Method::PUT,
            &format!("/devices/d?{V}"),
            Some(&owner()),
            &[],
            Some("{oops".into()),
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "IotHubFormatError");
    let r = h
        .call(
            Method::PUT,
            &format!("/devices/d?{V}"),
            Some(&owner()),
            &[],
            Some("[]".into()),
        )
        .await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "IotHubFormatError");

    // Body limit: 256 KiB.
    let big = format!(
        "{{\"deviceId\":\"d\",\"statusReason\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    let r = h
        .call(
            Method::PUT,
            &format!("/devices/d?{V}"),
            Some(&owner()),
            &[],
            Some(big),
        )
        .await;
    assert_hub_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "MessageTooLarge");

    // Unknown routes and methods keep the hub error style.
    let r = h.get("/nothing").await;
    assert_hub_error(&r, StatusCode::NOT_FOUND, "NotFound");
    let r = h
        .call(
            Method::POST,
            &format!("/devices/d?{V}"),
            Some(&owner()),
            &[],
            Some("{}".into()),
        )
        .await;
    assert_hub_error(&r, StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed");
}

impl Harness {
    async fn bulk(&self, ops: Value) -> Reply {
        self.call(
            Method::POST,
            &format!("/devices?{V}"),
            Some(&owner()),
            &[("content-type", "application/json; charset=utf-8")],
            Some(ops.to_string()),
        )
        .await
    }
}

#[tokio::test]
async fn bulk_registry_create_update_delete_with_per_device_errors() {
    let h = harness();
    // Create two devices, one with an initial twin (Python's ExportImportDevice shape).
    let r = h
        .bulk(json!([
            {"id": "b1", "importMode": "create", "status": "enabled",
             "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}}},
            {"id": "b2", "importMode": "create", "tags": {"site": "x"},
             "properties": {"desired": {"interval": 5}}},
            {"id": "b0", "importMode": "create"},
        ]))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"isSuccessful": true, "errors": [], "warnings": []})
    );
    let b2 = h.get("/twins/b2").await.body;
    assert_eq!(b2["tags"], json!({"site": "x"}));
    assert_eq!(b2["properties"]["desired"]["interval"], 5);
    let b1 = h.get("/devices/b1").await.body;
    assert!(b1["authentication"]["symmetricKey"]["primaryKey"].is_string());

    // Node's update shapes (capitalised modes, `etag`): one good, one stale etag, one
    // creating, one for a device that does not exist; and a create of an existing device.
    let r = h
        .bulk(json!([
            {"id": "b1", "importMode": "UpdateIfMatchETag", "etag": b1["etag"], "status": "disabled"},
            {"id": "b2", "importMode": "UpdateIfMatchETag", "etag": "bm9wZQ==", "status": "disabled"},
            {"id": "b3", "importMode": "Update", "status": "enabled"},
            {"id": "ghost", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ=="},
            {"id": "b1", "importMode": "create"},
        ]))
        .await;
    // b1 twice: refused whole, nothing written.
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    assert_eq!(
        r.body["errors"][0]["errorCode"],
        "DeviceDefinedMultipleTimes"
    );
    assert_eq!(h.get("/devices/b1").await.body["status"], "enabled");
    let r = h
        .bulk(json!([
            {"id": "b1", "importMode": "UpdateIfMatchETag", "etag": b1["etag"], "status": "disabled"},
            {"id": "b2", "importMode": "UpdateIfMatchETag", "etag": "bm9wZQ==", "status": "disabled"},
            {"id": "b3", "importMode": "Update", "status": "enabled"},
            {"id": "ghost", "importMode": "updateIfMatchETag", "eTag": "bm9wZQ=="},
            {"id": "B0", "importMode": "create"},
        ]))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.body["isSuccessful"], false);
    assert_eq!(r.body["warnings"], json!([]));
    let errors: Vec<(String, String)> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["errorStatus"].is_string());
            (
                e["deviceId"].as_str().unwrap().to_string(),
                e["errorCode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ("b2".to_string(), "PreconditionFailed".to_string()),
            ("ghost".to_string(), "DeviceNotFound".to_string()),
            ("B0".to_string(), "DeviceAlreadyExists".to_string()),
        ]
    );
    // The operations that passed were applied.
    assert_eq!(h.get("/devices/b1").await.body["status"], "disabled");
    assert_eq!(h.get("/devices/b2").await.body["status"], "enabled");
    assert_eq!(h.get("/devices/b3").await.status, StatusCode::OK);

    // Deletes: forced, etag-checked, missing.
    let b3 = h.get("/devices/b3").await.body;
    let r = h
        .bulk(json!([
            {"id": "b1", "importMode": "Delete"},
            {"id": "b3", "importMode": "DeleteIfMatchETag", "etag": b3["etag"]},
            {"id": "b2", "importMode": "deleteIfMatchETag", "eTag": "bm9wZQ=="},
            {"id": "ghost", "importMode": "delete"},
            {"id": "bad id", "importMode": "delete"},
            {"id": "b9", "importMode": "updateTwin"},
        ]))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let codes: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["errorCode"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        vec![
            "ArgumentInvalid",
            "ArgumentInvalid",
            "PreconditionFailed",
            "DeviceNotFound"
        ]
    );
    assert_eq!(h.get("/devices/b1").await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/devices/b3").await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/devices/b2").await.status, StatusCode::OK);

    // Not an array; too many operations; no RegistryWrite.
    let r = h.bulk(json!({"id": "x"})).await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "IotHubFormatError");
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("m{i}"), "importMode": "create"}))
        .collect();
    let r = h.bulk(Value::Array(many)).await;
    assert_hub_error(&r, StatusCode::BAD_REQUEST, "TooManyDevices");
    let r = h
        .call(
            Method::POST,
            &format!("/devices?{V}"),
            Some(&token(HOST, READ_KEY, "registryRead", NOW + 3600)),
            &[],
            Some("[]".into()),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // 150 creates in one request (more than IoT Hub's 100).
    let ops: Vec<Value> = (0..150)
        .map(|i| json!({"id": format!("m{i}"), "importMode": "create"}))
        .collect();
    let r = h.bulk(Value::Array(ops)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(h.get("/devices/m149").await.status, StatusCode::OK);
}

#[tokio::test]
async fn device_scope_must_name_an_edge_device_of_this_hub() {
    let h = harness();
    let r = h
        .put_device("edge-1", json!({"capabilities": {"iotEdge": true}}), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let edge_scope = r.body["deviceScope"].as_str().unwrap().to_string();
    let r = h.put_device("leaf-0", json!({}), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let leaf_etag = r.body["etag"].as_str().unwrap().to_string();

    // A leaf under the edge device: parentScopes is filled in.
    let r = h
        .put_device("leaf-1", json!({"deviceScope": edge_scope}), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["deviceScope"], edge_scope.as_str());
    assert_eq!(r.body["parentScopes"], json!([edge_scope]));

    // Refusals: a scope naming nobody, a non-edge device, another generation; parentScopes
    // that disagree; setting an edge device's own scope; on create and on update.
    let fake = "ms-azure-iot-edge://edge-1-637000000000000000".to_string();
    for (id, body, if_match) in [
        (
            "leaf-2",
            json!({"deviceScope": "ms-azure-iot-edge://nobody-1"}),
            None,
        ),
        ("leaf-2", json!({"deviceScope": "not-a-scope"}), None),
        ("leaf-2", json!({"deviceScope": fake}), None),
        (
            "leaf-2",
            json!({"deviceScope": edge_scope, "parentScopes": ["ms-azure-iot-edge://x-1"]}),
            None,
        ),
        ("leaf-2", json!({"parentScopes": [edge_scope]}), None),
        (
            "edge-2",
            json!({"capabilities": {"iotEdge": true}, "deviceScope": edge_scope}),
            None,
        ),
        (
            "edge-2",
            json!({"capabilities": {"iotEdge": true}, "parentScopes": ["ms-azure-iot-edge://nobody-1"]}),
            None,
        ),
        (
            "leaf-0",
            json!({"deviceScope": "ms-azure-iot-edge://leaf-0-1"}),
            Some(leaf_etag.as_str()),
        ),
    ] {
        let r = h.put_device(id, body.clone(), if_match).await;
        assert_hub_error(&r, StatusCode::BAD_REQUEST, "InvalidDeviceScope");
        assert!(
            r.body["Message"].as_str().unwrap().contains("cope"),
            "{body}: {:?}",
            r.body
        );
    }
    assert_eq!(h.get("/devices/leaf-2").await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/devices/edge-2").await.status, StatusCode::NOT_FOUND);
    assert!(h.get("/devices/leaf-0").await.body["deviceScope"].is_null());

    // An edge device under another edge device names it in parentScopes.
    let r = h
        .put_device(
            "edge-2",
            json!({"capabilities": {"iotEdge": true}, "parentScopes": [edge_scope]}),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_ne!(r.body["deviceScope"], edge_scope.as_str());

    // Bulk: a leaf may name an edge device created earlier in the same request; a bad scope
    // is a per-device InvalidDeviceScope.
    let r = h
        .bulk(json!([
            {"id": "edge-3", "importMode": "create", "capabilities": {"iotEdge": true}},
            {"id": "leaf-3", "importMode": "create", "deviceScope": "ms-azure-iot-edge://nobody-1"},
        ]))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.body["errors"],
        json!([{"deviceId": "leaf-3", "errorCode": "InvalidDeviceScope",
                "errorStatus": r.body["errors"][0]["errorStatus"]}])
    );
    let edge3_scope = h.get("/devices/edge-3").await.body["deviceScope"]
        .as_str()
        .unwrap()
        .to_string();
    let r = h
        .bulk(json!([
            {"id": "edge-4", "importMode": "create", "capabilities": {"iotEdge": true}},
            {"id": "leaf-4", "importMode": "create", "deviceScope": edge3_scope},
        ]))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

#[tokio::test]
async fn equal_desired_updates_and_desired_null_bump_the_version_and_notify() {
    let h = harness();
    let mut rx = h.hub.subscribe_desired();
    h.put_device("t2", python_sas_device("t2"), None).await;
    let patch = |desired: Value| {
        h.twin_write(
            Method::PATCH,
            "t2",
            json!({ "properties": { "desired": desired } }),
            "*",
        )
    };
    let r = patch(json!({"a": 1, "b": {"c": 2}})).await;
    assert_eq!(r.body["properties"]["desired"]["$version"], 2);
    assert_eq!(rx.recv().await.unwrap().version, 2);

    // The same value again: a new version, fresh metadata for what was sent, a notification.
    h.clock.advance_secs(7);
    let r = patch(json!({"a": 1})).await;
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["$version"], 3);
    assert_eq!(desired["$metadata"]["a"]["$lastUpdatedVersion"], 3);
    assert_eq!(desired["$metadata"]["$lastUpdatedVersion"], 3);
    assert_eq!(desired["$metadata"]["b"]["$lastUpdatedVersion"], 2);
    assert_ne!(
        desired["$metadata"]["a"]["$lastUpdated"],
        desired["$metadata"]["b"]["$lastUpdated"]
    );
    let change = rx.recv().await.unwrap();
    assert_eq!(Value::Object(change.patch), json!({"a": 1, "$version": 3}));

    // desired: null clears every desired property.
    let r = patch(Value::Null).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let desired = &r.body["properties"]["desired"];
    assert_eq!(desired["$version"], 4);
    assert!(
        desired.get("a").is_none() && desired.get("b").is_none(),
        "{desired}"
    );
    assert_eq!(desired["$metadata"]["$lastUpdatedVersion"], 4);
    assert!(desired["$metadata"].get("a").is_none());
    let change = rx.recv().await.unwrap();
    assert_eq!(
        Value::Object(change.patch),
        json!({"a": null, "b": null, "$version": 4})
    );
    // An If-Match with the old twin etag is still refused.
    let r = h
        .twin_write(
            Method::PATCH,
            "t2",
            json!({"properties": {"desired": {"a": 1}}}),
            "\"AAAAAAAAAAI=\"",
        )
        .await;
    assert_hub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
}
