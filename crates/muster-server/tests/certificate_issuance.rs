//! Certificate issuance at registration (device-protocol.md §9.2) on a real server: a device
//! registers with a symmetric key plus a CSR over HTTPS, MQTT and AMQP, gets
//! `issuedCertificateChain` (leaf → Muster's issuing CA → the local CA, checked with
//! `openssl verify`), connects to the built-in hub over MQTT with that certificate, and a new
//! CSR rotates it. Every refusal has its own code and names its check.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use common::{device_token, now, Dps};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use muster_attestation::symmetric_key::derive_device_key;
use muster_server::Server;
use reqwest::Method;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value as Json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// This test's loopback address.
const HOST: &str = "127.0.0.34";
const CSR_VERSION: &str = "2026-04-01";

struct DeviceKey {
    key: rcgen::KeyPair,
}

impl DeviceKey {
    fn new() -> Self {
        Self {
            key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    /// A base64 DER CSR with subject CN = `cn`.
    fn csr(&self, cn: &str) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        B64.encode(params.serialize_request(&self.key).unwrap().der())
    }
}

/// A CSR made by `openssl req` with `newkey` (e.g. `rsa:1024`), base64 DER.
fn openssl_csr(dir: &Path, cn: &str, newkey: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", &format!("/CN={cn}")])
        .args(newkey)
        .args(["-keyout"])
        .arg(dir.join("weak.key"))
        .args(["-outform", "DER"])
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    B64.encode(out.stdout)
}

fn thumbprint(der: &[u8]) -> String {
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

fn pem(der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// Checks an issued chain: three certificates, the root the local CA, the leaf a client
/// certificate for `cn` on `key`, the path verified by `openssl verify` for client use.
fn check_chain(dps: &Dps, dir: &Path, chain: &Json, cn: &str, key: &DeviceKey) -> Vec<u8> {
    let ders: Vec<Vec<u8>> = chain
        .as_array()
        .expect("issuedCertificateChain is an array")
        .iter()
        .map(|c| B64.decode(c.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(ders.len(), 3, "leaf, issuing CA, local CA");
    let root_pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let root = rustls_pemfile::certs(&mut root_pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(ders[2], root.to_vec(), "the chain ends with the local CA");
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
    let leaf_cn = leaf.subject().iter_common_name().next().unwrap();
    assert_eq!(leaf_cn.as_str().unwrap(), cn);
    assert_eq!(leaf.public_key().raw, key.key.public_key_der().as_slice());
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth);
    std::fs::write(dir.join("leaf.pem"), pem(&ders[0])).unwrap();
    std::fs::write(dir.join("issuing.pem"), pem(&ders[1])).unwrap();
    std::fs::write(dir.join("root.pem"), pem(&ders[2])).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(dir.join("root.pem"))
        .arg("-untrusted")
        .arg(dir.join("issuing.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ders[0].clone()
}

fn tls_config(dps: &Dps, client: Option<(&[u8], &DeviceKey)>) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match client {
        Some((der, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(der.to_vec())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.key.serialize_der().into()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

async fn tls(
    dps: &Dps,
    addr: std::net::SocketAddr,
    client: Option<(&[u8], &DeviceKey)>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    tokio_rustls::TlsConnector::from(tls_config(dps, client))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads MQTT packets until `pick` returns something.
async fn read_until<T>(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    mut pick: impl FnMut(Packet) -> Option<T>,
) -> T {
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Some(t) = pick(packet) {
                return t;
            }
        }
        let n = tokio::time::timeout_at(deadline, tls.read_buf(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
    }
}

/// Connects to the built-in hub's MQTT endpoint as `device_id` with a client certificate.
async fn hub_connect(
    dps: &Dps,
    addr: std::net::SocketAddr,
    device_id: &str,
    cert: &[u8],
    key: &DeviceKey,
) -> ConnAck {
    let (hub, _) = dps.hub();
    let mut tls = tls(dps, addr, Some((cert, key))).await;
    let mut out = BytesMut::new();
    let mut c = Connect::new(device_id);
    c.login = Some(rumqttc::mqttbytes::v4::Login::new(
        format!("{hub}/{device_id}/?api-version=2021-04-12"),
        "",
    ));
    c.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    read_until(&mut tls, |p| match p {
        Packet::ConnAck(a) => Some(a),
        _ => None,
    })
    .await
}

/// One MQTT request on the registration endpoint (connect, subscribe, publish `topic` with
/// `body`); returns (status, payload).
async fn mqtt_request(
    dps: &Dps,
    addr: std::net::SocketAddr,
    registration_id: &str,
    api_version: &str,
    token: &str,
    topic: &str,
    body: &Json,
) -> (u16, Json) {
    let mut tls = tls(dps, addr, None).await;
    let scope = &dps.info.id_scope;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    connect.set_login(
        format!("{scope}/registrations/{registration_id}/api-version={api_version}"),
        token,
    );
    connect.write(&mut out).unwrap();
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut out)
        .unwrap();
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, serde_json::to_vec(body).unwrap());
    publish.pkid = 7;
    publish.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    read_until(&mut tls, |p| match p {
        Packet::Publish(p) => {
            let status = p
                .topic
                .strip_prefix("$dps/registrations/res/")
                .and_then(|rest| rest.split('/').next())
                .and_then(|s| s.parse().ok())
                .unwrap();
            Some((status, serde_json::from_slice(&p.payload).unwrap()))
        }
        _ => None,
    })
    .await
}

/// Registers over HTTPS with `api_version`; returns (status, body).
async fn https_register(
    dps: &Dps,
    registration_id: &str,
    api_version: &str,
    token: &str,
    body: Json,
) -> (u16, Json) {
    let r = dps
        .http
        .put(format!(
            "https://{}/{}/registrations/{registration_id}/register?api-version={api_version}",
            dps.info.device_endpoint, dps.info.id_scope
        ))
        .header("authorization", token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn start(dir: &Path) -> Server {
    Server::start(common::config(dir, HOST)).await.unwrap()
}

/// Creates symmetric-key group `id` with `issuance`; returns its primary key.
async fn group(dps: &Dps, id: &str, issuance: Option<Json>) -> String {
    let mut body = json!({"attestation": {"type": "symmetricKey"}});
    if let Some(i) = issuance {
        body["certificateIssuance"] = i;
    }
    let (s, g) = dps
        .service(Method::PUT, &format!("/enrollmentGroups/{id}"), Some(body))
        .await;
    assert_eq!(s, 200, "{g}");
    g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

fn token(dps: &Dps, group_key: &str, id: &str) -> String {
    let dk = derive_device_key(group_key, id).unwrap();
    device_token(&dps.info.id_scope, id, &dk, now() + 600)
}

#[tokio::test]
async fn https_issues_a_chain_the_hub_accepts_and_rotates_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let key = group(
        &dps,
        "issuing",
        Some(json!({"enabled": true, "validityDays": 10})),
    )
    .await;
    let (s, g) = dps
        .service(Method::GET, "/enrollmentGroups/issuing", None)
        .await;
    assert_eq!(
        (s, &g["certificateIssuance"]),
        (200, &json!({"enabled": true, "validityDays": 10}))
    );

    // The exact shape of the spec's example body: registrationId, payload, csr.
    let device = DeviceKey::new();
    let t = token(&dps, &key, "c-1");
    let (s, b) = https_register(
        &dps,
        "c-1",
        CSR_VERSION,
        &t,
        json!({"registrationId": "c-1", "payload": {"a": 1}, "csr": device.csr("c-1")}),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");
    let leaf = check_chain(
        &dps,
        dir.path(),
        &b["registrationState"]["issuedCertificateChain"],
        "c-1",
        &device,
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 10, "validityDays, plus the few minutes of backdating");

    // The poll answers the chain too; a poll carrying a csr is refused.
    let op = b["operationId"].as_str().unwrap();
    let url = format!(
        "https://{}/{}/registrations/c-1/operations/{op}?api-version={CSR_VERSION}",
        dps.info.device_endpoint, dps.info.id_scope
    );
    let r = dps
        .http
        .get(&url)
        .header("authorization", &t)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let polled: Json = r.json().await.unwrap();
    assert_eq!(
        polled["registrationState"]["issuedCertificateChain"],
        b["registrationState"]["issuedCertificateChain"]
    );
    let r = dps
        .http
        .get(&url)
        .header("authorization", &t)
        .json(&json!({"csr": device.csr("c-1")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Json = r.json().await.unwrap();
    assert_eq!(e["errorCode"], 400023, "{e}");

    // The record keeps the certificate; the hub device carries its thumbprint.
    let (s, rec) = dps.service(Method::GET, "/registrations/c-1", None).await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(
        rec["issuedCertificate"]["sha256Thumbprint"],
        json!(thumbprint(&leaf))
    );
    assert_eq!(
        rec["issuedCertificate"]["serialNumber"],
        json!(hex_upper(cert.raw_serial()))
    );
    let (_, hub_cs) = dps.hub();
    let (s, d) = dps.hub_call(&hub_cs, "/devices/c-1").await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["authentication"]["type"], "selfSigned", "{d}");

    // The device connects to the hub with its issued certificate.
    let mqtt = server.mqtt_addrs[0];
    assert_eq!(
        hub_connect(&dps, mqtt, "c-1", &leaf, &device).await.code,
        ConnectReturnCode::Success
    );

    // A new CSR rotates the certificate: the old one no longer opens the hub.
    let next = DeviceKey::new();
    let (s, b2) = https_register(
        &dps,
        "c-1",
        CSR_VERSION,
        &t,
        json!({"csr": next.csr("c-1")}),
    )
    .await;
    assert_eq!((s, b2["status"].as_str()), (202, Some("assigned")), "{b2}");
    let new_leaf = check_chain(
        &dps,
        dir.path(),
        &b2["registrationState"]["issuedCertificateChain"],
        "c-1",
        &next,
    );
    assert_ne!(new_leaf, leaf);
    assert_eq!(
        hub_connect(&dps, mqtt, "c-1", &new_leaf, &next).await.code,
        ConnectReturnCode::Success
    );
    assert_eq!(
        hub_connect(&dps, mqtt, "c-1", &leaf, &device).await.code,
        ConnectReturnCode::NotAuthorized
    );
    server.shutdown().await;
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[tokio::test]
async fn every_csr_refusal_has_its_code_and_names_its_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let on = group(&dps, "on", Some(json!({"enabled": true}))).await;
    let p384_only = group(
        &dps,
        "p384",
        Some(json!({"enabled": true, "keyTypes": ["ecP384"]})),
    )
    .await;
    let off = group(&dps, "off", None).await;
    let disabled = group(&dps, "disabled", Some(json!({"enabled": false}))).await;
    let device = DeviceKey::new();
    let mut flipped = B64.decode(device.csr("on-1")).unwrap();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let cases: Vec<(&str, &str, &str, &str, Json, u32, &str)> = vec![
        (
            "old api-version",
            "on-1",
            &on,
            "2021-10-01",
            json!(device.csr("on-1")),
            400024,
            "api-version",
        ),
        (
            "CN mismatch",
            "on-1",
            &on,
            CSR_VERSION,
            json!(device.csr("someone-else")),
            400019,
            "CN",
        ),
        (
            "bad signature",
            "on-1",
            &on,
            CSR_VERSION,
            json!(B64.encode(&flipped)),
            400020,
            "signature",
        ),
        (
            "not a CSR",
            "on-1",
            &on,
            CSR_VERSION,
            json!("aGVsbG8="),
            400018,
            "PKCS #10",
        ),
        (
            "RSA 1024",
            "on-1",
            &on,
            CSR_VERSION,
            json!(openssl_csr(dir.path(), "on-1", &["-newkey", "rsa:1024"])),
            400021,
            "2048",
        ),
        (
            "P-521",
            "on-1",
            &on,
            CSR_VERSION,
            json!(openssl_csr(
                dir.path(),
                "on-1",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"]
            )),
            400021,
            "curve",
        ),
        (
            "key type not allowed",
            "p384-1",
            &p384_only,
            CSR_VERSION,
            json!(device.csr("p384-1")),
            400021,
            "ecP256",
        ),
        (
            "no issuance settings",
            "off-1",
            &off,
            CSR_VERSION,
            json!(device.csr("off-1")),
            400022,
            "does not issue",
        ),
        (
            "issuance disabled",
            "disabled-1",
            &disabled,
            CSR_VERSION,
            json!(device.csr("disabled-1")),
            400022,
            "does not issue",
        ),
    ];
    for (what, id, group_key, version, csr, code, says) in cases {
        let t = token(&dps, group_key, id);
        let (s, e) = https_register(&dps, id, version, &t, json!({"csr": csr})).await;
        assert_eq!(
            (s, e["errorCode"].as_u64()),
            (400, Some(code as u64)),
            "{what}: {e}"
        );
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(says), "{what}: {message}");
        assert!(
            e["trackingId"].is_string() && e["timestampUtc"].is_string(),
            "{e}"
        );
        // Nothing half-written: no record, no hub device.
        let (s, _) = dps
            .service(Method::GET, &format!("/registrations/{id}"), None)
            .await;
        assert_eq!(s, 404, "{what}: a refused CSR leaves no record");
    }
    // Without a csr the same devices register as before (null is no csr).
    let t = token(&dps, &off, "off-1");
    let (s, b) = https_register(&dps, "off-1", "2021-10-01", &t, json!({"csr": null})).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");
    assert!(b["registrationState"]
        .get("issuedCertificateChain")
        .is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn mqtt_issues_refuses_and_the_hub_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let key = group(&dps, "m", Some(json!({"enabled": true}))).await;
    let mqtt = server.mqtt_addrs[0];
    let device = DeviceKey::new();
    let t = token(&dps, &key, "m-1");
    let register = "$dps/registrations/PUT/iotdps-register/?$rid=1";
    // The C# preview's MQTT body: payload and csr, nulls serialised.
    let (s, b) = mqtt_request(
        &dps,
        mqtt,
        "m-1",
        "2025-07-01-preview",
        &t,
        register,
        &json!({"payload": null, "csr": device.csr("m-1")}),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");
    let leaf = check_chain(
        &dps,
        dir.path(),
        &b["registrationState"]["issuedCertificateChain"],
        "m-1",
        &device,
    );
    let op = b["operationId"].as_str().unwrap();
    let (s, e) = mqtt_request(
        &dps,
        mqtt,
        "m-1",
        CSR_VERSION,
        &t,
        &format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}"),
        &json!({"csr": device.csr("m-1")}),
    )
    .await;
    assert_eq!((s, e["errorCode"].as_u64()), (400, Some(400023)), "{e}");
    let (s, e) = mqtt_request(
        &dps,
        mqtt,
        "m-1",
        CSR_VERSION,
        &t,
        register,
        &json!({"csr": device.csr("m-2")}),
    )
    .await;
    assert_eq!((s, e["errorCode"].as_u64()), (400, Some(400019)), "{e}");
    let (s, e) = mqtt_request(
        &dps,
        mqtt,
        "m-1",
        "2019-03-31",
        &t,
        register,
        &json!({"csr": device.csr("m-1")}),
    )
    .await;
    assert_eq!((s, e["errorCode"].as_u64()), (400, Some(400024)), "{e}");
    assert_eq!(
        hub_connect(&dps, mqtt, "m-1", &leaf, &device).await.code,
        ConnectReturnCode::Success
    );
    server.shutdown().await;
}

#[tokio::test]
async fn amqp_issues_with_the_link_api_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let dps = Dps::new(&server.connection);
    let key = group(&dps, "a", Some(json!({"enabled": true}))).await;
    let device = DeviceKey::new();
    let scope = dps.info.id_scope.clone();
    let address = format!("{scope}/registrations/a-1");
    let mut connection = Connection::builder()
        .container_id("device")
        .hostname(HOST)
        .sasl_profile(SaslProfile::Plain {
            username: address.clone(),
            password: token(&dps, &key, "a-1"),
        })
        .open_with_stream(tls(&dps, server.amqp_addrs[0], None).await)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut properties = fe2o3_amqp::types::definitions::Fields::default();
    properties.insert(
        Symbol::from("com.microsoft:api-version"),
        Value::String(CSR_VERSION.into()),
    );
    let mut receiver = Receiver::builder()
        .name("recv")
        .source(address.as_str())
        .properties(properties.clone())
        .attach(&mut session)
        .await
        .unwrap();
    let mut sender = Sender::builder()
        .name("send")
        .target(address.as_str())
        .properties(properties)
        .attach(&mut session)
        .await
        .unwrap();
    let mut app = ApplicationProperties::default();
    app.0.insert(
        "iotdps-operation-type".into(),
        SimpleValue::String("iotdps-register".into()),
    );
    let body =
        serde_json::to_vec(&json!({"registrationId": "a-1", "csr": device.csr("a-1")})).unwrap();
    let message = Message::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::String("c1".into())),
            ..Default::default()
        })
        .application_properties(app)
        .data(Binary::from(body))
        .build();
    let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send(message))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let delivery: Delivery<Body<Value>> =
        tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .unwrap()
            .unwrap();
    receiver.accept(&delivery).await.unwrap();
    let Body::Data(data) = &delivery.into_message().body else {
        panic!("not a Data section");
    };
    let bytes: Vec<u8> = data.iter().flat_map(|d| d.0.iter().copied()).collect();
    let answer: Json = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(answer["status"], "assigned", "{answer}");
    let leaf = check_chain(
        &dps,
        dir.path(),
        &answer["registrationState"]["issuedCertificateChain"],
        "a-1",
        &device,
    );
    let _ = sender.close().await;
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    assert_eq!(
        hub_connect(&dps, server.mqtt_addrs[0], "a-1", &leaf, &device)
            .await
            .code,
        ConnectReturnCode::Success
    );
    server.shutdown().await;
}
