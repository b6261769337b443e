//! The device HTTPS API (`muster_device_api::https::router`): register and operation-status
//! requests with fuzzed paths, headers (Authorization) and JSON bodies, through the router
//! without sockets. Every refusal must be in the DPS error shape.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use muster_fuzz::{assert_error_shape, call, paused_runtime, stub_registrar, FuzzRequest};

const ROUTES: &[&str] = &[
    "/0ne00000A0A/registrations/{0}/register",
    "/{0}/registrations/{1}/register",
    "/0ne00000A0A/registrations/{0}/operations/{1}",
];

const TOKEN: &str =
    "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fdev-1&sig=AAAA&se=1900000000";

fuzz_target!(|input: FuzzRequest| {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RUNTIME.get_or_init(paused_runtime);
    let Some(req) = input.build(ROUTES, TOKEN) else {
        return;
    };
    let app = muster_device_api::https::router(stub_registrar());
    let (status, body) = rt.block_on(call(app, req));
    // Paths and methods no route serves are answered by the server's shared fallback,
    // which this router alone does not have.
    if status != 404 && status != 405 {
        assert_error_shape(status, body.as_deref());
    }
    // The register body parser on its own, with the raw bytes.
    let _ = muster_device_api::https::parse_registration(&input.body);
});
