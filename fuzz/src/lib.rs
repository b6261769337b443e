//! Shared pieces of the fuzz targets (`fuzz_targets/`): a runtime on a paused clock, a stub
//! registrar, MQTT packet encoding and an HTTP request built from fuzz input.
//!
//! Nothing here is used by Muster itself; see README.md for how the targets are run.

use std::sync::Arc;

use arbitrary::Arbitrary;
use async_trait::async_trait;
use axum::body::Body;
use axum::http::Request;
use bytes::BytesMut;
use muster_registration::{
    DeviceCredential, DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest,
};
use rumqttc::mqttbytes::v4::Packet;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A single-threaded runtime whose clock is paused: a session waiting on a timer (keep-alive,
/// write timeout) moves on at once, so only a real hang (no timer pending) stalls an input.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds")
}

/// Writes `input` into one end of an in-memory stream and reads everything the server
/// answers until it closes, while `serve` runs the server on the other end.
pub async fn feed<F, Fut>(input: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut rd, mut wr) = tokio::io::split(client);
    let client_side = async {
        // The server may close early; a failed write only means it stopped reading.
        let _ = wr.write_all(input).await;
        let _ = wr.shutdown().await;
        // Keep the write half alive until the server is done, so EOF is the only close signal.
        wr
    };
    let reader = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let (_, out, _wr) = tokio::join!(serve(server), reader, client_side);
    out
}

/// Encodes packets with rumqttc's codec (what a real client sends).
pub fn encode(packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        p.write(&mut buf, usize::MAX)
            .expect("well-formed packets encode");
    }
    buf.to_vec()
}

/// Answers like the registrar would, after looking at what it was given the way the real one
/// starts (SAS token and registration id parsed), so replies vary with the input.
pub struct StubRegistrar;

fn look_at(credential: &DeviceCredential, registration_id: &str) -> (u16, serde_json::Value) {
    if let DeviceCredential::Sas(token) = credential {
        if let Ok(t) = muster_proto::SasToken::parse(token) {
            if t.verify(b"fuzz-key", 1_800_000_000).is_err() {
                return (401, json!({"errorCode": 401002, "message": "bad token"}));
            }
        }
    }
    match muster_proto::RegistrationId::new(registration_id) {
        Ok(id) => (
            202,
            json!({"operationId": "op-1", "status": "assigning",
                "registrationState": {"registrationId": id.as_str(), "status": "assigning"}}),
        ),
        Err(e) => (400, json!({"errorCode": 400004, "message": e.to_string()})),
    }
}

#[async_trait]
impl DeviceRegistrar for StubRegistrar {
    async fn register(&self, request: RegisterRequest) -> DeviceReply {
        let (status, body) = look_at(&request.credential, &request.registration_id);
        DeviceReply {
            status,
            retry_after: (status == 202).then_some(3),
            body,
        }
    }

    async fn operation_status(&self, request: StatusRequest) -> DeviceReply {
        let (status, body) = look_at(&request.credential, &request.registration_id);
        DeviceReply {
            status: if status == 202 { 200 } else { status },
            retry_after: None,
            body,
        }
    }
}

/// An HTTP request shaped by fuzz input: a method, a path made of a known route template with
/// fuzzed segments (or fully fuzzed), a query string, a few headers and a body.
#[derive(Debug, Arbitrary)]
pub struct FuzzRequest {
    pub method: u8,
    pub route: u8,
    pub segments: [String; 2],
    pub query: String,
    pub authorized: bool,
    pub headers: Vec<(u8, String)>,
    pub body: Vec<u8>,
}

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];

/// Header names the device and service APIs read.
const HEADER_NAMES: &[&str] = &[
    "if-match",
    "content-type",
    "x-ms-max-item-count",
    "x-ms-continuation",
    "authorization",
    "content-length",
    "accept",
];

impl FuzzRequest {
    /// Builds the request over `routes` (templates with `{0}` and `{1}` for the segments);
    /// `auth` is the Authorization value of an authorized caller. None when the fuzzed parts
    /// can't form an HTTP request at all (the HTTP library refuses those before any handler).
    pub fn build(&self, routes: &[&str], auth: &str) -> Option<Request<Body>> {
        let method = METHODS[usize::from(self.method) % METHODS.len()];
        let path = match routes.get(usize::from(self.route)) {
            Some(t) => t
                .replace("{0}", &self.segments[0])
                .replace("{1}", &self.segments[1]),
            None => self.segments[0].clone(),
        };
        let uri = if self.query.is_empty() {
            path
        } else {
            format!("{path}?{}", self.query)
        };
        let mut req = Request::builder().method(method).uri(uri);
        if self.authorized {
            req = req.header("authorization", auth);
        }
        for (name, value) in &self.headers {
            let name = HEADER_NAMES[usize::from(*name) % HEADER_NAMES.len()];
            req = req.header(name, value.as_str());
        }
        req.body(Body::from(self.body.clone())).ok()
    }
}

/// Runs a request through a router without sockets and reads the whole answer. The body is
/// `None` for HEAD, whose answers have none by definition.
pub async fn call(app: axum::Router, req: Request<Body>) -> (u16, Option<Vec<u8>>) {
    let head = req.method() == axum::http::Method::HEAD;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let resp = match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    (status, (!head).then_some(body))
}

/// Every error answer must be in the DPS error shape (device-protocol.md): a JSON object with
/// an `errorCode` whose first three digits are the HTTP status.
pub fn assert_error_shape(status: u16, body: Option<&[u8]>) {
    let Some(body) = body.filter(|_| status >= 400) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{status} answer is not JSON ({e}): {body:?}"));
    let code = v
        .get("errorCode")
        .and_then(|c| c.as_u64())
        .unwrap_or_else(|| panic!("{status} answer has no errorCode: {v}"));
    assert_eq!(
        code / 1000,
        u64::from(status),
        "errorCode {code} does not match status {status}: {v}"
    );
}

/// The stub registrar behind an `Arc`, as the routers take it.
pub fn stub_registrar() -> Arc<dyn DeviceRegistrar> {
    Arc::new(StubRegistrar)
}
