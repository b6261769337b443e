//! The DPS service API (`muster_service_api::router`, wrapped in `normalize_path` as the
//! server does): enrollments, groups, registrations, queries, bulk operations, linked hubs,
//! access policies and CA certificates with fuzzed paths, query strings, headers (If-Match,
//! paging) and JSON bodies, through the router without sockets, against a SQLite store in a
//! temporary folder (made once per process). Every refusal must be in the DPS error shape.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use muster_fuzz::{assert_error_shape, call, paused_runtime, FuzzRequest};
use muster_proto::runtime::{ManualClock, SeededEntropy};
use muster_proto::{AccessRights, SasToken, Timestamp};
use muster_service_api::{AccessPolicy, Authorizer, Limits, ServiceApi};
use muster_store::SqliteStore;
use tower::ServiceExt;

const HOST: &str = "dps.fuzz";
const OWNER_KEY: &[u8] = b"owner-key-owner-key-owner-key-00";
const NOW: i64 = 1_800_000_000;

const ROUTES: &[&str] = &[
    "/enrollments/{0}",
    "/enrollments/{0}/attestationmechanism",
    "/enrollments/query",
    "/enrollments",
    "/enrollmentGroups/{0}",
    "/enrollmentGroups/{0}/attestationmechanism",
    "/enrollmentGroups/query",
    "/enrollmentGroups",
    "/registrations/{0}",
    "/registrations/{0}/query",
    "/linkedHubs/{0}",
    "/accessPolicies/{0}",
    "/accessPolicies/{0}/keys",
    "/caCertificates/{0}",
    "/caCertificates/{0}/verificationCode",
    "/caCertificates/{0}/verify",
    "/{0}/{1}",
];

struct Setup {
    rt: tokio::runtime::Runtime,
    app: Router,
    token: String,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary folder");
    let store = SqliteStore::open(&dir.path().join("dps.db")).expect("the store opens");
    let api = ServiceApi {
        store: Arc::new(store),
        auth: Authorizer::new(
            vec![AccessPolicy {
                key_name: "provisioningserviceowner".into(),
                primary_key: B64.encode(OWNER_KEY),
                secondary_key: B64.encode(b"owner-secondary-owner-secondary-"),
                rights: AccessRights::all(),
            }],
            vec![HOST.into()],
        ),
        clock: Arc::new(ManualClock::new(
            Timestamp::from_unix_millis(NOW * 1000).expect("a valid time"),
        )),
        entropy: Arc::new(SeededEntropy::new(7)),
        limits: Limits {
            max_bulk_items: 10,
            ..Limits::default()
        },
        deprovisioner: None,
        hub_check: None,
    };
    let inner = muster_service_api::router(api)
        .fallback(muster_service_api::not_found)
        .method_not_allowed_fallback(muster_service_api::method_not_allowed);
    let app = Router::new().fallback_service(inner.map_request(muster_service_api::normalize_path));
    Setup {
        rt: paused_runtime(),
        app,
        token: SasToken::generate(
            HOST,
            OWNER_KEY,
            Some("provisioningserviceowner"),
            NOW + 3600,
        ),
        _dir: dir,
    }
}

fuzz_target!(|input: FuzzRequest| {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    let s = SETUP.get_or_init(setup);
    let Some(mut req) = input.build(ROUTES, &s.token) else {
        return;
    };
    // Most requests carry a supported api-version, so handlers get past that check.
    if input.method & 0x80 != 0 {
        let uri = req.uri().to_string();
        let sep = if uri.contains('?') { '&' } else { '?' };
        match format!("{uri}{sep}api-version=2021-10-01").parse() {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => return,
        }
    }
    if input.route & 0x80 != 0 {
        req.headers_mut().insert(
            "content-type",
            axum::http::HeaderValue::from_static("application/json"),
        );
    }
    let (status, body) = s.rt.block_on(call(s.app.clone(), req));
    assert_error_shape(status, body.as_deref());
    // The helpers on their own, with the raw input.
    let _ = muster_service_api::request::check_query_body(&input.body);
    let _ = muster_proto::IfMatch::parse(&input.query);
});
