//! The service API driven through its router without sockets: every behaviour the SDKs rely
//! on, and every refusal with its DPS error code.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http_body_util::BodyExt;
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{AccessRights, SasToken, Timestamp};
use muster_service_api::{AccessPolicy, Authorizer, Limits, ServiceApi};
use muster_store::{SqliteStore, Store as _};
use serde_json::{json, Value};
use tower::ServiceExt;

const HOST: &str = "dps.test";
const OWNER_KEY: &[u8] = b"owner-key-owner-key-owner-key-00";
const READER_KEY: &[u8] = b"reader-key-reader-key-reader-000";
const NOW: i64 = 1_800_000_000;

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
    store: Arc<SqliteStore>,
    policies: Vec<AccessPolicy>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("muster.db")).unwrap();
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_unix_millis(NOW * 1000).unwrap(),
    ));
    let policies = vec![
        AccessPolicy {
            key_name: "provisioningserviceowner".into(),
            primary_key: B64.encode(OWNER_KEY),
            secondary_key: B64.encode(b"owner-secondary-owner-secondary-"),
            rights: AccessRights::all(),
        },
        AccessPolicy {
            key_name: "reader".into(),
            primary_key: B64.encode(READER_KEY),
            secondary_key: B64.encode(b"reader-secondary-reader-secondar"),
            rights: AccessRights::parse("EnrollmentRead, RegistrationStatusRead").unwrap(),
        },
    ];
    let store = Arc::new(store);
    let api = ServiceApi {
        store: store.clone(),
        auth: Authorizer::new(policies.clone(), vec![HOST.into()]),
        clock: clock.clone(),
        entropy: Arc::new(SeededEntropy::new(7)),
        limits: Limits::default(),
        deprovisioner: None,
        certificates: None,
        hub_check: None,
    };
    let inner = muster_service_api::router(api)
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    let app = Router::new().fallback_service(inner.map_request(muster_service_api::normalize_path));
    Harness {
        app,
        clock,
        store,
        policies,
        _dir: dir,
    }
}

fn owner_token() -> String {
    SasToken::generate(
        HOST,
        OWNER_KEY,
        Some("provisioningserviceowner"),
        NOW + 3600,
    )
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.call_as(&owner_token(), method, path, body, headers)
            .await
    }

    async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let sep = if path.contains('?') { '&' } else { '?' };
        let uri = if path.contains("api-version") {
            path.to_string()
        } else {
            format!("{path}{sep}api-version=2021-10-01")
        };
        let mut req = Request::builder().method(method).uri(uri);
        if !token.is_empty() {
            req = req.header("authorization", token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json; charset=utf-8")
                .body(Body::from(serde_json::to_vec(&b).unwrap()))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        self.send(req).await
    }

    async fn send(&self, req: Request) -> Reply {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }
}

fn assert_error(r: &Reply, status: u16, code: u64) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.body);
    assert_eq!(r.body["errorCode"], json!(code), "body: {}", r.body);
    assert!(r.body["trackingId"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(r.body["message"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(r.body["timestampUtc"].as_str().is_some());
    assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
}

fn sym_enrollment(id: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
           "capabilities": null, "reprovisionPolicy": null, "initialTwin": null})
}

#[tokio::test]
async fn symmetric_key_enrollment_lifecycle() {
    let h = harness();
    let r = h
        .call(
            Method::PUT,
            "/enrollments/Dev-01",
            Some(sym_enrollment("Dev-01")),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let keys = r.body["attestation"]["symmetricKey"].clone();
    for k in ["primaryKey", "secondaryKey"] {
        let key = keys[k].as_str().unwrap();
        assert_eq!(key.len(), 88);
        assert_eq!(B64.decode(key).unwrap().len(), 64);
    }
    assert_ne!(keys["primaryKey"], keys["secondaryKey"]);
    assert_eq!(r.body["provisioningStatus"], "enabled");
    assert_eq!(r.body["registrationId"], "Dev-01");
    assert!(r.body.get("capabilities").is_none());
    assert!(r.body.get("registrationState").is_none());
    let etag = r.body["etag"].as_str().unwrap().to_string();
    let created = r.body["createdDateTimeUtc"].as_str().unwrap().to_string();
    assert!(created.ends_with('Z') && created.len() == 28, "{created}");

    // GET hides keys, embeds registrationState; ids match case-insensitively.
    let g = h.call(Method::GET, "/enrollments/dev-01", None, &[]).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["attestation"], json!({"type": "symmetricKey"}));
    assert_eq!(
        g.body["registrationState"],
        json!({"registrationId": "Dev-01", "status": "unassigned"})
    );
    assert_eq!(g.body["etag"], json!(etag));

    // The attestation mechanism shows the keys.
    let a = h
        .call(
            Method::POST,
            "/enrollments/Dev-01/attestationmechanism",
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["symmetricKey"], keys);

    // A blind PUT over an existing record is a conflict.
    let c = h
        .call(
            Method::PUT,
            "/enrollments/Dev-01",
            Some(sym_enrollment("Dev-01")),
            &[],
        )
        .await;
    assert_error(&c, 409, 409201);

    // A stale etag is refused; quoted and bare etags both match.
    let s = h
        .call(
            Method::PUT,
            "/enrollments/Dev-01",
            Some(sym_enrollment("Dev-01")),
            &[("if-match", "stale")],
        )
        .await;
    assert_error(&s, 412, 412001);
    h.clock.advance_secs(5);
    let mut upd = sym_enrollment("Dev-01");
    upd["initialTwin"] =
        json!({"tags": {"version": "1", "site": "a"}, "properties": {"desired": {"interval": 5}}});
    let quoted = format!("\"{etag}\"");
    let u = h
        .call(
            Method::PUT,
            "/enrollments/Dev-01",
            Some(upd.clone()),
            &[("if-match", &quoted)],
        )
        .await;
    assert_eq!(u.status, 200, "{}", u.body);
    // Omitted keys are kept, not rotated; the created time stays, the update time moves.
    assert_eq!(u.body["attestation"]["symmetricKey"], keys);
    assert_eq!(u.body["createdDateTimeUtc"], json!(created));
    assert_ne!(u.body["lastUpdatedDateTimeUtc"], json!(created));
    assert_ne!(u.body["etag"], json!(etag));
    assert_eq!(u.body["initialTwin"], upd["initialTwin"]);

    // `*` updates unconditionally; explicit keys replace.
    let mut with_keys = sym_enrollment("Dev-01");
    let k1 = B64.encode([1u8; 32]);
    let k2 = B64.encode([2u8; 16]);
    with_keys["attestation"]["symmetricKey"] = json!({"primaryKey": k1, "secondaryKey": k2});
    let w = h
        .call(
            Method::PUT,
            "/enrollments/Dev-01",
            Some(with_keys),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(w.status, 200);
    assert_eq!(
        w.body["attestation"]["symmetricKey"]["primaryKey"],
        json!(k1)
    );

    // Delete with a stale etag fails; then succeeds; then 404.
    let d = h
        .call(
            Method::DELETE,
            "/enrollments/Dev-01",
            None,
            &[("if-match", "stale")],
        )
        .await;
    assert_error(&d, 412, 412001);
    let d = h
        .call(
            Method::DELETE,
            "/enrollments/Dev-01",
            None,
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(d.status, 204);
    assert_eq!(d.body, Value::Null);
    assert!(d.headers.get("content-type").is_none());
    let g = h.call(Method::GET, "/enrollments/Dev-01", None, &[]).await;
    assert_error(&g, 404, 404201);
}

#[tokio::test]
async fn provisioning_status_null_is_echoed_and_absent_defaults() {
    let h = harness();
    let mut e = sym_enrollment("a1");
    e["provisioningStatus"] = Value::Null;
    let r = h.call(Method::PUT, "/enrollments/a1", Some(e), &[]).await;
    assert_eq!(r.body["provisioningStatus"], Value::Null);
    let r = h
        .call(
            Method::PUT,
            "/enrollments/a2",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["provisioningStatus"], "enabled");
    assert_eq!(r.body["registrationId"], "a2");
}

#[tokio::test]
async fn refusals_name_the_check_and_write_nothing() {
    let h = harness();
    let cases: Vec<(&str, Value, u16, u64)> = vec![
        ("/enrollments/bad!id", sym_enrollment("bad!id"), 400, 400002),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "password"}}),
            400,
            400005,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1"}),
            400,
            400005,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "other", "attestation": {"type": "symmetricKey"}}),
            400,
            400008,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}),
            400,
            400006,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "symmetricKey"}, "iotHubs": ["h1.example"]}),
            400,
            400004,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"}),
            400,
            400012,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "not a certificate"}}}}}),
            400,
            400007,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "tpm"}}),
            400,
            400005,
        ),
        (
            "/enrollmentGroups/g1",
            json!({"enrollmentGroupId": "g1", "attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}}),
            400,
            400005,
        ),
        (
            "/enrollments/ok1",
            json!({"registrationId": "ok1", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "nearest"}),
            400,
            400001,
        ),
    ];
    for (path, body, status, code) in cases {
        let r = h.call(Method::PUT, path, Some(body.clone()), &[]).await;
        assert_error(&r, status, code);
        let id = path.rsplit('/').next().unwrap();
        let g = h.call(Method::GET, path, None, &[]).await;
        assert!(
            g.status == 404 || g.status == 400,
            "{id} was written: {}",
            g.body
        );
    }
    // Malformed JSON.
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/enrollments/ok1?api-version=2021-10-01")
        .header("authorization", owner_token())
        .header("content-type", "application/json")
        .body(Body::from("{\"registrationId\": \"ok1\", "))
        .unwrap();
    let r = h.send(req).await;
    assert_error(&r, 400, 400001);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    // Not JSON at all.
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/enrollments/ok1?api-version=2021-10-01")
        .header("authorization", owner_token())
        .header("content-type", "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    assert_error(&h.send(req).await, 415, 415001);
    // Oversized body.
    let big = json!({"registrationId": "ok1", "attestation": {"type": "symmetricKey"}, "optionalDeviceInformation": {"pad": "x".repeat(2 * 1024 * 1024)}});
    assert_error(
        &h.call(Method::PUT, "/enrollments/ok1", Some(big), &[])
            .await,
        413,
        413001,
    );
    // api-version.
    let r = h
        .call(
            Method::GET,
            "/enrollments/ok1?api-version=2099-01-01",
            None,
            &[],
        )
        .await;
    assert_error(&r, 400, 400009);
    let req = Request::builder()
        .uri("/enrollments/ok1")
        .header("authorization", owner_token())
        .body(Body::empty())
        .unwrap();
    assert_error(&h.send(req).await, 400, 400009);
    // Unknown route, wrong method.
    assert_error(
        &h.call(Method::GET, "/nothing/here", None, &[]).await,
        404,
        404000,
    );
    assert_error(
        &h.call(Method::PATCH, "/enrollments/ok1", None, &[]).await,
        405,
        405000,
    );
}

#[tokio::test]
async fn authorization_failures() {
    let h = harness();
    let none = h
        .call_as("", Method::GET, "/enrollments/a", None, &[])
        .await;
    assert_error(&none, 401, 401000);
    let wrong = SasToken::generate(
        HOST,
        b"not-the-key-not-the-key-not-the-",
        Some("provisioningserviceowner"),
        NOW + 60,
    );
    assert_error(
        &h.call_as(&wrong, Method::GET, "/enrollments/a", None, &[])
            .await,
        401,
        401000,
    );
    let expired = SasToken::generate(
        HOST,
        OWNER_KEY,
        Some("provisioningserviceowner"),
        NOW - 3600,
    );
    assert_error(
        &h.call_as(&expired, Method::GET, "/enrollments/a", None, &[])
            .await,
        401,
        401003,
    );
    // The reader may read but not write, and may not delete registration records.
    let reader = SasToken::generate(HOST, READER_KEY, Some("reader"), NOW + 60);
    let r = h
        .call_as(
            &reader,
            Method::PUT,
            "/enrollments/a",
            Some(sym_enrollment("a")),
            &[],
        )
        .await;
    assert_error(&r, 403, 403001);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("EnrollmentWrite"));
    assert_eq!(
        h.call(Method::GET, "/enrollments/a", None, &[])
            .await
            .status,
        404,
        "nothing written"
    );
    assert_error(
        &h.call_as(&reader, Method::DELETE, "/registrations/a", None, &[])
            .await,
        403,
        403001,
    );
    assert_error(
        &h.call_as(&reader, Method::GET, "/enrollments/a", None, &[])
            .await,
        404,
        404201,
    );
    // Every client's form of sr: raw host (Node) and scheme-prefixed (Python with an https:// endpoint).
    let node = {
        let sig = muster_proto::sas::sign(OWNER_KEY, &format!("{HOST}\n{}", NOW + 60));
        format!(
            "SharedAccessSignature sr={HOST}&sig={}&skn=provisioningserviceowner&se={}",
            muster_proto::sas::encode_resource(&sig),
            NOW + 60
        )
    };
    assert_eq!(
        h.call_as(&node, Method::GET, "/enrollments/a", None, &[])
            .await
            .status,
        404
    );
    let py = SasToken::generate(
        &format!("https://{HOST}"),
        OWNER_KEY,
        Some("provisioningserviceowner"),
        NOW + 60,
    );
    assert_eq!(
        h.call_as(&py, Method::GET, "/enrollments/a", None, &[])
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn paging_returns_each_record_once() {
    let h = harness();
    let items: Vec<Value> = (0..150)
        .map(|i| sym_enrollment(&format!("page-{i:03}")))
        .collect();
    let r = h
        .call(
            Method::POST,
            "/enrollments",
            Some(json!({"enrollments": items, "mode": "create"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"isSuccessful": true, "errors": []}));

    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut headers = vec![("x-ms-max-item-count", "10".to_string())];
        if let Some(t) = &token {
            headers.push(("x-ms-continuation", t.clone()));
        }
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = h
            .call(
                Method::POST,
                "/enrollments/query",
                Some(json!({"query": "SELECT *"})),
                &hdrs,
            )
            .await;
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["x-ms-item-type"], "Enrollment");
        let arr = p.body.as_array().unwrap();
        assert_eq!(arr.len(), 10);
        for e in arr {
            assert_eq!(
                e["attestation"],
                json!({"type": "symmetricKey"}),
                "query hides keys"
            );
            assert!(e.get("registrationState").is_none());
            seen.push(e["registrationId"].as_str().unwrap().to_string());
        }
        pages += 1;
        match p.headers.get("x-ms-continuation") {
            Some(t) => token = Some(t.to_str().unwrap().to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 15);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 150);
    assert_eq!(seen.len(), 150);

    // An empty query body (Python sends none for registrations) and an empty result.
    let g = h
        .call(Method::POST, "/enrollmentGroups/query", None, &[])
        .await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, json!([]));
    assert_eq!(g.headers["x-ms-item-type"], "EnrollmentGroup");
    assert!(g.headers.get("x-ms-continuation").is_none());
    // A token from one query does not work on another.
    let bad = h
        .call(
            Method::POST,
            "/registrations/grp/query",
            None,
            &[("x-ms-continuation", token.as_deref().unwrap_or("x"))],
        )
        .await;
    assert_error(&bad, 400, 400013);
}

/// Every query form an official SDK or sample sends lists the records, on all three query
/// operations; other query text is a 400010 that echoes the query.
#[tokio::test]
async fn query_forms_the_sdks_send() {
    let h = harness();
    let r = h
        .call(
            Method::PUT,
            "/enrollments/q-1",
            Some(sym_enrollment("q-1")),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let group = json!({"enrollmentGroupId": "q-g", "attestation": {"type": "symmetricKey"}});
    let r = h
        .call(Method::PUT, "/enrollmentGroups/q-g", Some(group), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let accepted = [
        "*",
        "SELECT *",
        "select * from enrollments",
        "SELECT * FROM enrollmentGroups",
    ];
    for q in accepted {
        let e = h
            .call(
                Method::POST,
                "/enrollments/query",
                Some(json!({ "query": q })),
                &[],
            )
            .await;
        assert_eq!(e.status, 200, "{q}: {}", e.body);
        assert_eq!(e.body.as_array().map(Vec::len), Some(1), "{q}");
        let g = h
            .call(
                Method::POST,
                "/enrollmentGroups/query",
                Some(json!({ "query": q })),
                &[],
            )
            .await;
        assert_eq!(g.status, 200, "{q}: {}", g.body);
        assert_eq!(g.body.as_array().map(Vec::len), Some(1), "{q}");
        let d = h
            .call(
                Method::POST,
                "/registrations/q-g/query",
                Some(json!({ "query": q })),
                &[],
            )
            .await;
        assert_eq!(d.status, 200, "{q}: {}", d.body);
        assert_eq!(d.body, json!([]), "{q}");
    }
    for path in [
        "/enrollments/query",
        "/enrollmentGroups/query",
        "/registrations/q-g/query",
    ] {
        let q = "SELECT * FROM enrollments WHERE registrationId = 'q-1'";
        let r = h
            .call(Method::POST, path, Some(json!({ "query": q })), &[])
            .await;
        assert_error(&r, 400, 400010);
        let message = r.body["message"].as_str().unwrap_or_default();
        assert!(message.contains("WHERE registrationId"), "{message}");
        assert!(message.contains("'*'"), "{message}");
    }
}

#[tokio::test]
async fn bulk_has_no_ten_item_cap_and_reports_per_item() {
    let h = harness();
    let items: Vec<Value> = (0..10_000)
        .map(|i| sym_enrollment(&format!("bulk-{i}")))
        .collect();
    let r = h
        .call(
            Method::POST,
            "/enrollments",
            Some(json!({"enrollments": items, "mode": "create"})),
            &[],
        )
        .await;
    assert_eq!(r.body["isSuccessful"], true, "{}", r.body["errors"][0]);
    // Create again: per-item conflicts, plus one invalid item; nothing else changes.
    let mut again: Vec<Value> = (0..3)
        .map(|i| sym_enrollment(&format!("bulk-{i}")))
        .collect();
    again.push(json!({"registrationId": "bad id", "attestation": {"type": "symmetricKey"}}));
    again.push(sym_enrollment("bulk-new"));
    let r = h
        .call(
            Method::POST,
            "/enrollments",
            Some(json!({"enrollments": again, "mode": "create"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["isSuccessful"], false);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert_eq!(
        errors[0],
        json!({"registrationId": "bulk-0", "errorCode": 409201, "errorStatus": "Enrollment already exists."})
    );
    assert_eq!(errors[3]["errorCode"], 400002);
    assert_eq!(
        h.call(Method::GET, "/enrollments/bulk-new", None, &[])
            .await
            .status,
        200
    );
    // updateIfMatchEtag (Node's spelling) with a stale etag; update upserts; delete removes.
    let mut stale = sym_enrollment("bulk-1");
    stale["etag"] = json!("stale");
    let r = h
        .call(
            Method::POST,
            "/enrollments",
            Some(json!({"enrollments": [stale], "mode": "updateIfMatchEtag"})),
            &[],
        )
        .await;
    assert_eq!(r.body["errors"][0]["errorCode"], 412001);
    let r = h.call(Method::POST, "/enrollments", Some(json!({"enrollments": [sym_enrollment("bulk-1"), sym_enrollment("fresh")], "mode": "update"})), &[]).await;
    assert_eq!(r.body["isSuccessful"], true);
    let r = h.call(Method::POST, "/enrollments", Some(json!({"enrollments": [sym_enrollment("bulk-1"), sym_enrollment("missing")], "mode": "delete"})), &[]).await;
    assert_eq!(
        r.body["errors"],
        json!([{"registrationId": "missing", "errorCode": 404201, "errorStatus": "enrollment 'missing' not found"}])
    );
    assert_eq!(
        h.call(Method::GET, "/enrollments/bulk-1", None, &[])
            .await
            .status,
        404
    );
    // Over the limit, and a bad mode.
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({})).collect();
    let r = h
        .call(
            Method::POST,
            "/enrollments",
            Some(json!({"enrollments": too_many, "mode": "create"})),
            &[],
        )
        .await;
    assert_error(&r, 400, 400011);
    let r = h
        .call(
            Method::POST,
            "/enrollmentGroups",
            Some(json!({"enrollmentGroups": [], "mode": "merge"})),
            &[],
        )
        .await;
    assert_error(&r, 400, 400011);
}

#[tokio::test]
async fn groups_routes_are_case_insensitive_and_registrations_empty() {
    let h = harness();
    let g = json!({"enrollmentGroupId": "Group-A", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "geolatency",
                   "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}});
    let r = h
        .call(Method::PUT, "/enrollmentgroups/Group-A", Some(g), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["allocationPolicy"], "geoLatency");
    assert_eq!(
        r.body["reprovisionPolicy"],
        json!({"updateHubAssignment": true, "migrateDeviceData": false})
    );
    let a = h
        .call(
            Method::POST,
            "/ENROLLMENTGROUPS/group-a/AttestationMechanism",
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body["symmetricKey"]["primaryKey"],
        r.body["attestation"]["symmetricKey"]["primaryKey"]
    );
    let q = h
        .call(Method::POST, "/registrations/Group-A/query", None, &[])
        .await;
    assert_eq!(q.status, 200);
    assert_eq!(q.body, json!([]));
    assert_eq!(q.headers["x-ms-item-type"], "DeviceRegistration");
    assert_error(
        &h.call(Method::GET, "/registrations/dev-x", None, &[]).await,
        404,
        404203,
    );
    assert_error(
        &h.call(Method::DELETE, "/registrations/dev-x", None, &[])
            .await,
        404,
        404203,
    );
    // Legacy api-versions work.
    for v in ["2018-09-01-preview", "2019-03-31"] {
        let r = h
            .call(
                Method::GET,
                &format!("/enrollmentGroups/Group-A?api-version={v}"),
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(r.body["attestation"].get("symmetricKey").is_none());
    }
}

fn self_signed(cn: &str, ca: bool) -> (String, Vec<u8>) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), cert.der().to_vec())
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

#[tokio::test]
async fn x509_certificates_are_summarised_never_echoed() {
    let h = harness();
    let (root_pem, root_der) = self_signed("Muster Test Root", true);
    let (second_pem, second_der) = self_signed("Second Root", true);
    // Signing certificates as PEM (primary) and as base64 DER (secondary, as C# sends them).
    let group = json!({"enrollmentGroupId": "x509-group", "attestation": {"type": "x509", "x509": {"signingCertificates": {
        "primary": {"certificate": root_pem}, "secondary": {"certificate": B64.encode(&second_der)}}}}});
    let r = h
        .call(
            Method::PUT,
            "/enrollmentGroups/x509-group",
            Some(group),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let primary = &r.body["attestation"]["x509"]["signingCertificates"]["primary"];
    assert!(
        primary.get("certificate").is_none(),
        "certificate text is never returned"
    );
    assert_eq!(primary["info"]["subjectName"], "CN=Muster Test Root");
    assert_eq!(primary["info"]["issuerName"], "CN=Muster Test Root");
    assert_eq!(
        primary["info"]["sha256Thumbprint"],
        json!(sha256_hex(&root_der))
    );
    assert_eq!(primary["info"]["version"], 3);
    let secondary = &r.body["attestation"]["x509"]["signingCertificates"]["secondary"];
    assert_eq!(
        secondary["info"]["sha256Thumbprint"],
        json!(sha256_hex(&second_der))
    );
    let _ = second_pem;

    // The CLI's update re-sends the info-only entries it got from GET: accepted, certificate kept.
    let got = h
        .call(Method::GET, "/enrollmentGroups/x509-group", None, &[])
        .await;
    let mut resend = got.body.clone();
    resend["provisioningStatus"] = json!("disabled");
    let u = h
        .call(
            Method::PUT,
            "/enrollmentGroups/x509-group",
            Some(resend),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(
        u.body["attestation"]["x509"]["signingCertificates"]["primary"]["info"],
        primary["info"]
    );
    // An info-only entry that matches nothing stored is refused.
    let mut forged = got.body.clone();
    forged["attestation"]["x509"]["signingCertificates"]["primary"]["info"]["sha256Thumbprint"] =
        json!("00".repeat(32));
    let f = h
        .call(
            Method::PUT,
            "/enrollmentGroups/x509-group",
            Some(forged),
            &[("if-match", "*")],
        )
        .await;
    assert_error(&f, 400, 400007);

    // Individual enrollments take client certificates, groups do not.
    let (leaf_pem, leaf_der) = self_signed("device-x1", false);
    let ind = json!({"registrationId": "device-x1", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": B64.encode(leaf_pem.as_bytes())}}}}});
    let r = h
        .call(Method::PUT, "/enrollments/device-x1", Some(ind), &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"],
        json!(sha256_hex(&leaf_der))
    );
    let bad = json!({"enrollmentGroupId": "g2", "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf_pem}}}}});
    assert_error(
        &h.call(Method::PUT, "/enrollmentGroups/g2", Some(bad), &[])
            .await,
        400,
        400005,
    );
    // CA references must name a CA certificate that exists and is verified (the accepted
    // case, after proof of possession, is in muster-server's registration_x509 test).
    let refs = json!({"enrollmentGroupId": "g3", "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "my-root"}}}});
    let r = h
        .call(Method::PUT, "/enrollmentGroups/g3", Some(refs.clone()), &[])
        .await;
    assert_error(&r, 400, 400005);
    let message = r.body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("caReferences.primary") && message.contains("does not exist"),
        "{}",
        r.body
    );
    let (root_pem, _) = self_signed("My Root", true);
    let up = h
        .call(
            Method::PUT,
            "/caCertificates/my-root",
            Some(json!({"certificate": root_pem})),
            &[],
        )
        .await;
    assert_eq!(up.status, 200, "{}", up.body);
    let r = h
        .call(Method::PUT, "/enrollmentGroups/g3", Some(refs), &[])
        .await;
    assert_error(&r, 400, 400005);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not verified"),
        "{}",
        r.body
    );
    let gone = h.call(Method::GET, "/enrollmentGroups/g3", None, &[]).await;
    assert_eq!(gone.status, 404, "nothing written: {}", gone.body);
}

#[tokio::test]
async fn deleting_an_individual_enrollment_removes_its_record_but_group_records_stay() {
    use muster_store::{Collection, Expect, Store, Write};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("m.db")).unwrap());
    let h = {
        let mut h = harness();
        let api = ServiceApi {
            store: store.clone(),
            auth: Authorizer::new(
                vec![AccessPolicy {
                    key_name: "provisioningserviceowner".into(),
                    primary_key: B64.encode(OWNER_KEY),
                    secondary_key: B64.encode(OWNER_KEY),
                    rights: AccessRights::all(),
                }],
                vec![HOST.into()],
            ),
            clock: h.clock.clone(),
            entropy: Arc::new(SeededEntropy::new(3)),
            limits: Limits::default(),
            deprovisioner: None,
            certificates: None,
            hub_check: None,
        };
        h.app = Router::new().fallback_service(
            muster_service_api::router(api).map_request(muster_service_api::normalize_path),
        );
        h
    };
    let record = |id: &str| json!({"registrationId": id, "status": "assigned", "assignedHub": "hub.local", "deviceId": id});
    store
        .write(vec![
            Write::put(
                Collection::Registrations,
                "solo",
                Expect::Absent,
                record("solo"),
            ),
            Write::put(
                Collection::Registrations,
                "member",
                Expect::Absent,
                record("member"),
            )
            .with_partition(Some("grp".into())),
        ])
        .await
        .unwrap();
    h.call(
        Method::PUT,
        "/enrollments/solo",
        Some(sym_enrollment("solo")),
        &[],
    )
    .await;
    let g = h.call(Method::GET, "/enrollments/solo", None, &[]).await;
    assert_eq!(g.body["registrationState"]["assignedHub"], "hub.local");
    assert!(g.body["registrationState"]["etag"].is_string());
    let q = h
        .call(Method::POST, "/registrations/GRP/query", None, &[])
        .await;
    assert_eq!(q.body.as_array().unwrap().len(), 1);
    assert_eq!(
        h.call(Method::DELETE, "/enrollments/solo", None, &[])
            .await
            .status,
        204
    );
    assert_error(
        &h.call(Method::GET, "/registrations/solo", None, &[]).await,
        404,
        404203,
    );
    // Group records are only removed through the registrations API, with etag checks.
    let m = h
        .call(Method::GET, "/registrations/member", None, &[])
        .await;
    assert_eq!(m.status, 200);
    assert_error(
        &h.call(
            Method::DELETE,
            "/registrations/member",
            None,
            &[("if-match", "stale")],
        )
        .await,
        412,
        412001,
    );
    let etag = m.body["etag"].as_str().unwrap().to_string();
    assert_eq!(
        h.call(
            Method::DELETE,
            "/registrations/member",
            None,
            &[("if-match", &etag)]
        )
        .await
        .status,
        204
    );
}

/// Found by the `http_service` fuzz target: a path segment that percent-decodes to invalid
/// UTF-8 got axum's plain-text 400. Every route family answers in the DPS error shape.
#[tokio::test]
async fn malformed_path_segment_answers_in_the_dps_shape() {
    let h = harness();
    for (method, path) in [
        (Method::POST, "/caCertificates/%EEE/verificationCode"),
        (Method::GET, "/enrollments/%FF"),
        (
            Method::POST,
            "/enrollmentGroups/%C3%28/attestationmechanism",
        ),
        (Method::GET, "/registrations/%FF"),
        (Method::POST, "/registrations/%FF/query"),
        (Method::GET, "/linkedHubs/%FF"),
        (Method::POST, "/accessPolicies/%FF/keys"),
    ] {
        let r = h.call(method, path, None, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.body);
        assert_error(&r, 400, 400015);
        let message = r.body["message"].as_str().unwrap();
        assert!(message.contains("Invalid UTF-8"), "{path}: {message}");
    }
}

fn reader_token() -> String {
    SasToken::generate(HOST, READER_KEY, Some("reader"), NOW + 3600)
}

/// Every write is in the audit log with its policy, source, route template, id, status and
/// error code; reads and queries are not; keys and bodies never are.
#[tokio::test]
async fn writes_and_refused_writes_are_audited() {
    let h = harness();
    let created = h
        .call(
            Method::PUT,
            "/enrollments/Dev-A",
            Some(sym_enrollment("Dev-A")),
            &[("user-agent", "muster-cli/0.1.0")],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let key = created.body["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    h.clock.advance_secs(1);
    let deleted = h
        .call(Method::DELETE, "/enrollments/dev-a", None, &[])
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    h.clock.advance_secs(1);
    let refused = h
        .call_as(
            &reader_token(),
            Method::PUT,
            "/enrollments/dev-b",
            Some(sym_enrollment("dev-b")),
            &[],
        )
        .await;
    assert_error(&refused, 403, 403001);
    let forged = SasToken::generate(
        HOST,
        b"not-a-key",
        Some("provisioningserviceowner"),
        NOW + 60,
    );
    let unsigned = h
        .call_as(&forged, Method::DELETE, "/enrollments/dev-a", None, &[])
        .await;
    assert_error(&unsigned, 401, 401000);
    // Reads and queries are not writes.
    h.call(Method::GET, "/enrollments/dev-a", None, &[]).await;
    h.call(Method::POST, "/enrollments/query", None, &[]).await;

    let log = h.call(Method::GET, "/audit", None, &[]).await;
    assert_eq!(log.status, 200, "{}", log.body);
    let entries = log.body.as_array().unwrap();
    let summary: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!([
                e["policy"],
                e["source"],
                e["method"],
                e["route"],
                e["id"],
                e["status"],
                e["errorCode"]
            ])
        })
        .collect();
    assert_eq!(
        summary,
        [
            json!([
                "provisioningserviceowner",
                "cli",
                "PUT",
                "/enrollments/{id}",
                "Dev-A",
                200,
                null
            ]),
            json!([
                "provisioningserviceowner",
                "api",
                "DELETE",
                "/enrollments/{id}",
                "dev-a",
                204,
                null
            ]),
            json!([
                "reader",
                "api",
                "PUT",
                "/enrollments/{id}",
                "dev-b",
                403,
                "403001"
            ]),
            json!([
                null,
                "api",
                "DELETE",
                "/enrollments/{id}",
                "dev-a",
                401,
                "401000"
            ]),
        ]
    );
    // Time from the injected clock.
    assert_eq!(entries[0]["time"], "2027-01-15T08:00:00.0000000Z");
    assert_eq!(entries[1]["time"], "2027-01-15T08:00:01.0000000Z");
    assert!(!log.body.to_string().contains(&key), "no key in the log");

    // Filters and paging.
    let by_policy = h.call(Method::GET, "/audit?policy=READER", None, &[]).await;
    assert_eq!(by_policy.body.as_array().unwrap().len(), 1);
    let by_id = h.call(Method::GET, "/audit?id=dev-a", None, &[]).await;
    assert_eq!(by_id.body.as_array().unwrap().len(), 3);
    let window = h
        .call(
            Method::GET,
            "/audit?from=2027-01-15T08:00:01Z&to=2027-01-15T08:00:02Z",
            None,
            &[],
        )
        .await;
    assert_eq!(window.body.as_array().unwrap().len(), 1, "{}", window.body);
    let first = h.call(Method::GET, "/audit?top=3", None, &[]).await;
    assert_eq!(first.body.as_array().unwrap().len(), 3);
    let token = first.headers["x-ms-continuation"]
        .to_str()
        .unwrap()
        .to_string();
    let rest = h
        .call(
            Method::GET,
            "/audit",
            None,
            &[("x-ms-continuation", &token)],
        )
        .await;
    assert_eq!(rest.body.as_array().unwrap().len(), 1);
    assert!(rest.headers.get("x-ms-continuation").is_none());

    // Reading the log needs ServiceConfig; a bad filter names itself.
    let denied = h
        .call_as(&reader_token(), Method::GET, "/audit", None, &[])
        .await;
    assert_error(&denied, 403, 403001);
    let bad = h
        .call(Method::GET, "/audit?from=yesterday", None, &[])
        .await;
    assert_error(&bad, 400, 400010);
    assert!(bad.body["message"].as_str().unwrap().contains("'from'"));
}

/// `/serviceSettings` holds the default allocation policy: hashed until saved, saved values
/// read back, `custom` and unknown policies refused with what to fix, ServiceConfig needed.
#[tokio::test]
async fn service_settings_hold_the_default_allocation_policy() {
    let h = harness();
    let r = h.call(Method::GET, "/serviceSettings", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"allocationPolicy": "hashed"}));

    let r = h
        .call(
            Method::PUT,
            "/serviceSettings",
            Some(json!({"allocationPolicy": "static"})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = h.call(Method::GET, "/serviceSettings", None, &[]).await;
    assert_eq!(r.body, json!({"allocationPolicy": "static"}));

    for (body, says) in [
        (json!({"allocationPolicy": "custom"}), "webhook"),
        (json!({"allocationPolicy": "random"}), "allocationPolicy"),
        (json!({}), "allocationPolicy: required"),
    ] {
        let r = h
            .call(Method::PUT, "/serviceSettings", Some(body.clone()), &[])
            .await;
        assert_error(&r, 400, 400015);
        assert!(
            r.body["message"].as_str().unwrap().contains(says),
            "{body}: {}",
            r.body
        );
    }
    let r = h.call(Method::GET, "/serviceSettings", None, &[]).await;
    assert_eq!(
        r.body,
        json!({"allocationPolicy": "static"}),
        "refusals wrote nothing"
    );

    let r = h
        .call_as(&reader_token(), Method::GET, "/serviceSettings", None, &[])
        .await;
    assert_error(&r, 403, 403001);
}

/// `POST /accessPolicies/{name}/regenerateKey` replaces only the named key; the old key stops
/// signing, the other keeps working.
#[tokio::test]
async fn regenerating_a_policy_key_replaces_only_that_key() {
    let h = harness();
    // The server stores its policies at start-up; this harness only hands them to the
    // Authorizer, so store them as the server would.
    let body = serde_json::to_value(&h.policies).unwrap();
    h.store
        .write(vec![muster_store::Write::put(
            muster_store::Collection::Settings,
            muster_service_api::POLICIES_KEY,
            muster_store::Expect::Any,
            body,
        )])
        .await
        .unwrap();
    let before = h
        .call(Method::POST, "/accessPolicies/reader/keys", None, &[])
        .await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.body);
    let r = h
        .call(
            Method::POST,
            "/accessPolicies/reader/regenerateKey",
            Some(json!({"keyType": "primary"})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_ne!(r.body["primaryKey"], before.body["primaryKey"]);
    assert_eq!(r.body["secondaryKey"], before.body["secondaryKey"]);
    // The old primary key no longer signs.
    let old = h
        .call_as(&reader_token(), Method::GET, "/enrollments/x", None, &[])
        .await;
    assert_eq!(old.status.as_u16(), 401, "{}", old.body);
    let new_key = B64.decode(r.body["primaryKey"].as_str().unwrap()).unwrap();
    let token = SasToken::generate(HOST, &new_key, Some("reader"), NOW + 3600);
    let fresh = h
        .call_as(&token, Method::GET, "/enrollments/x", None, &[])
        .await;
    assert_error(&fresh, 404, 404201);

    let r = h
        .call(
            Method::POST,
            "/accessPolicies/reader/regenerateKey",
            Some(json!({"keyType": "tertiary"})),
            &[],
        )
        .await;
    assert_error(&r, 400, 400015);
    let r = h
        .call(
            Method::POST,
            "/accessPolicies/nobody/regenerateKey",
            Some(json!({"keyType": "primary"})),
            &[],
        )
        .await;
    assert_eq!(r.status.as_u16(), 404, "{}", r.body);
}
