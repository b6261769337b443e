//! X.509 device registration on a real server, over HTTPS and MQTT with TLS client
//! certificates: individual enrollments (self-signed leaf), groups with a root or an
//! intermediate as signing certificate, groups on a verified CA reference (proof of possession
//! through `/caCertificates`), the hub identity (`selfSigned` with the leaf's thumbprint), and
//! one error code per failed check. X.509 version 1 device certificates (no extensions, made
//! with the openssl CLI) register on HTTPS, MQTT and MQTT over WebSocket and connect to the
//! hub; a v1 certificate acting as a CA is refused with 401012.

mod common;

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as STANDARD_B64;
use base64::Engine as _;
use bytes::BytesMut;
use common::{start, Dps};
use reqwest::Method;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Certificates

struct Issuer {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Issuer {
    fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// Certificate and key PEM, for the openssl CLI.
    fn pems(&self) -> (String, String) {
        (self.cert.pem(), self.key.serialize_pem())
    }
}

fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p
}

fn root(cn: &str) -> Issuer {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca_params(cn).self_signed(&key).unwrap();
    Issuer { cert, key }
}

fn intermediate(cn: &str, by: &Issuer) -> Issuer {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca_params(cn).signed_by(&key, &by.cert, &by.key).unwrap();
    Issuer { cert, key }
}

/// A device: its leaf, the certificates it sends after the leaf, and its key.
#[derive(Clone)]
struct Device {
    der: Vec<u8>,
    pem: String,
    sends: Vec<Vec<u8>>,
    key_der: Vec<u8>,
}

impl Device {
    fn new(leaf: rcgen::Certificate, key: &rcgen::KeyPair, sends: Vec<Vec<u8>>) -> Self {
        Self {
            der: leaf.der().to_vec(),
            pem: leaf.pem(),
            sends,
            key_der: key.serialize_der(),
        }
    }

    fn der(&self) -> Vec<u8> {
        self.der.clone()
    }

    fn thumbprint(&self) -> String {
        sha2::Sha256::digest(&self.der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// The same device sending other certificates after its leaf.
    fn sending(&self, sends: Vec<Vec<u8>>) -> Device {
        Device {
            sends,
            ..self.clone()
        }
    }
}

fn leaf_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p
}

fn self_signed(cn: &str) -> Device {
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params(cn).self_signed(&key).unwrap();
    Device::new(leaf, &key, Vec::new())
}

fn issued(cn: &str, by: &Issuer, sends: Vec<Vec<u8>>) -> Device {
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params(cn).signed_by(&key, &by.cert, &by.key).unwrap();
    Device::new(leaf, &key, sends)
}

// ---------------------------------------------------------------------------------------------
// Transports

fn tls_config(dps: &Dps, device: &Device, tls12_only: bool) -> rustls::ClientConfig {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ));
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .unwrap()
    .with_root_certificates(roots);
    let mut chain = vec![rustls::pki_types::CertificateDer::from(device.der())];
    chain.extend(
        device
            .sends
            .iter()
            .cloned()
            .map(rustls::pki_types::CertificateDer::from),
    );
    // Not `with_client_auth_cert`: it checks the key against the certificate with webpki,
    // which refuses X.509 v1 certificates (OpenSSL-based device clients do not care).
    let key = rustls::crypto::ring::sign::any_supported_type(
        &rustls::pki_types::PrivateKeyDer::Pkcs8(device.key_der.clone().into()),
    )
    .unwrap();
    builder.with_client_cert_resolver(Arc::new(Presents(Arc::new(
        rustls::sign::CertifiedKey::new(chain, key),
    ))))
}

/// Always presents the device's chain and key.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn https_client(dps: &Dps, device: &Device) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(dps, device, false))
        .build()
        .unwrap()
}

/// Registers over HTTPS with the device's certificate (no Authorization header).
async fn https_register(dps: &Dps, registration_id: &str, device: &Device) -> (u16, Value) {
    let r = https_client(dps, device)
        .put(format!(
            "https://{}/{}/registrations/{registration_id}/register?api-version=2021-06-01",
            dps.info.device_endpoint, dps.info.id_scope
        ))
        .json(&json!({"registrationId": registration_id}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn https_poll(
    dps: &Dps,
    registration_id: &str,
    operation_id: &str,
    device: &Device,
) -> (u16, Value) {
    let r = https_client(dps, device)
        .get(format!(
            "https://{}/{}/registrations/{registration_id}/operations/{operation_id}?api-version=2021-06-01",
            dps.info.device_endpoint, dps.info.id_scope
        ))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn tls_connect(
    dps: &Dps,
    addr: std::net::SocketAddr,
    device: &Device,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls_config(dps, device, true)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// One MQTT register exchange with the device's certificate and no password.
async fn mqtt_register(
    dps: &Dps,
    addr: std::net::SocketAddr,
    registration_id: &str,
    device: &Device,
) -> (u16, Value) {
    let mut tls = tls_connect(dps, addr, device).await;
    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    connect.login = Some(Login::new(
        format!(
            "{}/registrations/{registration_id}/api-version=2019-03-31",
            dps.info.id_scope
        ),
        "",
    ));
    connect.write(&mut out).unwrap();
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut out)
        .unwrap();
    let mut publish = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=x1",
        QoS::AtLeastOnce,
        format!(r#"{{"registrationId":"{registration_id}"}}"#).into_bytes(),
    );
    publish.pkid = 3;
    publish.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();

    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Packet::Publish(p) = packet {
                let status = p
                    .topic
                    .strip_prefix("$dps/registrations/res/")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap();
                return (status, serde_json::from_slice(&p.payload).unwrap());
            }
        }
        let n = tokio::time::timeout_at(deadline, tls.read_buf(&mut buf))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection without answering");
    }
}

/// Connects to the built-in hub's MQTT endpoint as `device_id` with the certificate.
async fn hub_connect(
    dps: &Dps,
    addr: std::net::SocketAddr,
    device_id: &str,
    device: &Device,
) -> ConnectReturnCode {
    let mut tls = tls_connect(dps, addr, device).await;
    let hub = dps.hub().0;
    let mut out = BytesMut::new();
    let mut c = Connect::new(device_id);
    c.login = Some(Login::new(
        format!("{hub}/{device_id}/?api-version=2021-04-12"),
        "",
    ));
    c.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Packet::ConnAck(ack)) = Packet::read(&mut buf, 1 << 16) {
            return ack.code;
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed without a CONNACK");
    }
}

/// One MQTT register exchange over WebSocket (`/$iothub/websocket` on the HTTPS port) with the
/// device's certificate in the TLS handshake.
async fn mqtt_ws_register(
    dps: &Dps,
    https: std::net::SocketAddr,
    registration_id: &str,
    device: &Device,
) -> (u16, Value) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;

    let tls = tls_connect(dps, https, device).await;
    let mut req = format!("wss://{}/$iothub/websocket", https.ip())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    connect.login = Some(Login::new(
        format!(
            "{}/registrations/{registration_id}/api-version=2019-03-31",
            dps.info.id_scope
        ),
        "",
    ));
    connect.write(&mut out).unwrap();
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut out)
        .unwrap();
    let mut publish = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=w1",
        QoS::AtLeastOnce,
        format!(r#"{{"registrationId":"{registration_id}"}}"#).into_bytes(),
    );
    publish.pkid = 4;
    publish.write(&mut out).unwrap();
    ws.send(Message::binary(out.to_vec())).await.unwrap();

    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Packet::Publish(p) = packet {
                let status = p
                    .topic
                    .strip_prefix("$dps/registrations/res/")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap();
                return (status, serde_json::from_slice(&p.payload).unwrap());
            }
        }
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no answer in time")
        {
            Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("the WebSocket ended without an answer: {other:?}"),
        }
    }
}

/// Runs the openssl CLI in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A device certificate for `cn` made as device makers do, with `openssl x509 -req` and no
/// extension file: X.509 version 1. Self-signed, or signed by `by` (certificate and key PEM);
/// `key` is the `openssl genpkey` algorithm options.
fn v1_device(cn: &str, by: Option<(&str, &str)>, key: &[&str]) -> Device {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut genpkey = vec!["genpkey", "-out", "dev.key"];
    genpkey.extend_from_slice(key);
    openssl(d, &genpkey);
    let subject = format!("/CN={cn}");
    openssl(
        d,
        &[
            "req", "-new", "-key", "dev.key", "-subj", &subject, "-out", "dev.csr",
        ],
    );
    let mut x509 = vec![
        "x509", "-req", "-in", "dev.csr", "-days", "30", "-out", "dev.pem",
    ];
    match by {
        Some((cert_pem, key_pem)) => {
            std::fs::write(d.join("ca.pem"), cert_pem).unwrap();
            std::fs::write(d.join("ca.key"), key_pem).unwrap();
            x509.extend(["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]);
        }
        None => x509.extend(["-key", "dev.key"]),
    }
    openssl(d, &x509);
    let text = openssl(d, &["x509", "-in", "dev.pem", "-noout", "-text"]);
    assert!(text.contains("Version: 1 (0x0)"), "not v1: {text}");
    let pem = std::fs::read_to_string(d.join("dev.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let key_pem = std::fs::read(d.join("dev.key")).unwrap();
    let key_der = match rustls_pemfile::private_key(&mut key_pem.as_slice())
        .unwrap()
        .unwrap()
    {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        other => panic!("openssl genpkey writes PKCS#8, not {other:?}"),
    };
    Device {
        der,
        pem,
        sends: Vec::new(),
        key_der,
    }
}

/// A v1 "CA" as `openssl x509 -req -key` makes it: a self-signed v1 certificate; returns its
/// PEM and its key's PEM.
fn v1_ca(cn: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut genpkey = vec!["genpkey", "-out", "ca.key"];
    genpkey.extend_from_slice(EC_P256);
    openssl(d, &genpkey);
    let subject = format!("/CN={cn}");
    openssl(
        d,
        &[
            "req", "-new", "-key", "ca.key", "-subj", &subject, "-out", "ca.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509", "-req", "-in", "ca.csr", "-key", "ca.key", "-days", "30", "-out", "ca.pem",
        ],
    );
    let text = openssl(d, &["x509", "-in", "ca.pem", "-noout", "-text"]);
    assert!(text.contains("Version: 1 (0x0)"), "not v1: {text}");
    (
        std::fs::read_to_string(d.join("ca.pem")).unwrap(),
        std::fs::read_to_string(d.join("ca.key")).unwrap(),
    )
}

const EC_P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
const RSA_2048: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];

// ---------------------------------------------------------------------------------------------
// Service API helpers

async fn put(dps: &Dps, path: &str, body: Value) -> Value {
    let (s, b) = dps.service(Method::PUT, path, Some(body)).await;
    assert_eq!(s, 200, "PUT {path}: {b}");
    b
}

fn individual_x509(id: &str, pem: &str) -> Value {
    json!({"registrationId": id, "attestation": {"type": "x509",
        "x509": {"clientCertificates": {"primary": {"certificate": pem}}}}})
}

fn group_signing(id: &str, pem: &str) -> Value {
    json!({"enrollmentGroupId": id, "attestation": {"type": "x509",
        "x509": {"signingCertificates": {"primary": {"certificate": pem}}}}})
}

/// Both transports give the same refusal.
async fn refused_everywhere(
    dps: &Dps,
    mqtt: std::net::SocketAddr,
    what: &str,
    registration_id: &str,
    device: &Device,
    code: u64,
) {
    let (s, b) = https_register(dps, registration_id, device).await;
    assert_eq!(
        (s, b["errorCode"].as_u64()),
        (401, Some(code)),
        "{what} (https): {b}"
    );
    assert!(
        b["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}"
    );
    let (s, b) = mqtt_register(dps, mqtt, registration_id, device).await;
    assert_eq!(
        (s, b["errorCode"].as_u64()),
        (401, Some(code)),
        "{what} (mqtt): {b}"
    );
}

/// Asserts an `assigned` answer for an X.509 device and its `selfSigned` hub identity.
async fn assert_assigned(dps: &Dps, body: &Value, id: &str, device: &Device, group: Option<&str>) {
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    let (hub, hub_cs) = dps.hub();
    assert_eq!(state["assignedHub"], json!(hub));
    assert_eq!(state["deviceId"], id);
    assert!(state.get("symmetricKey").is_none(), "{state}");
    let x = &state["x509"];
    assert_eq!(
        x["certificateInfo"]["sha256Thumbprint"],
        json!(device.thumbprint()),
        "{state}"
    );
    assert_eq!(x["certificateInfo"]["subjectName"], format!("CN={id}"));
    assert_eq!(x["enrollmentGroupId"].as_str(), group, "{state}");
    assert_eq!(x["signingCertificateInfo"].is_object(), group.is_some());
    let (s, dev) = dps.hub_call(&hub_cs, &format!("/devices/{id}")).await;
    assert_eq!(s, 200, "{dev}");
    assert_eq!(dev["authentication"]["type"], "selfSigned", "{dev}");
    let t = &dev["authentication"]["x509Thumbprint"];
    assert_eq!(t["primaryThumbprint"], json!(device.thumbprint()));
    assert_eq!(t["secondaryThumbprint"], json!(device.thumbprint()));
    // The registration record carries the same certificate info.
    let (s, record) = dps
        .service(Method::GET, &format!("/registrations/{id}"), None)
        .await;
    assert_eq!(s, 200, "{record}");
    assert_eq!(record["x509"], *x, "{record}");
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn individual_enrollment_with_a_self_signed_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];

    let dev = self_signed("x509-ind");
    put(
        &dps,
        "/enrollments/x509-ind",
        individual_x509("x509-ind", &dev.pem.clone()),
    )
    .await;

    // HTTPS: assigned in the first answer; the poll answers with the certificate too.
    let (s, b) = https_register(&dps, "x509-ind", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "x509-ind", &dev, None).await;
    let op = b["operationId"].as_str().unwrap().to_string();
    let (s, polled) = https_poll(&dps, "x509-ind", &op, &dev).await;
    assert_eq!(s, 200, "{polled}");
    assert_eq!(
        polled["registrationState"]["x509"],
        b["registrationState"]["x509"]
    );

    // MQTT: the same.
    let (s, b) = mqtt_register(&dps, mqtt, "x509-ind", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "x509-ind", &dev, None).await;

    // The device then connects to its hub with the same certificate.
    assert_eq!(
        hub_connect(&dps, mqtt, "x509-ind", &dev).await,
        ConnectReturnCode::Success
    );

    // The secondary certificate works too.
    let second = self_signed("x509-two");
    put(
        &dps,
        "/enrollments/x509-two",
        json!({"registrationId": "x509-two", "attestation": {"type": "x509",
            "x509": {"clientCertificates": {"primary": {"certificate": self_signed("x509-two").pem.clone()},
                "secondary": {"certificate": STANDARD_B64.encode(second.der())}}}}}),
    )
    .await;
    let (s, b) = https_register(&dps, "x509-two", &second).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "x509-two", &second, None).await;

    // Failures, one code each, on both transports.
    let impostor = self_signed("x509-ind");
    refused_everywhere(
        &dps,
        mqtt,
        "thumbprint mismatch",
        "x509-ind",
        &impostor,
        401009,
    )
    .await;
    refused_everywhere(&dps, mqtt, "CN mismatch", "someone-else", &dev, 401007).await;

    let mut p = leaf_params("x509-old");
    p.not_before = rcgen::date_time_ymd(2001, 1, 1);
    p.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let old = Device::new(p.self_signed(&key).unwrap(), &key, Vec::new());
    put(
        &dps,
        "/enrollments/x509-old",
        individual_x509("x509-old", &old.pem.clone()),
    )
    .await;
    refused_everywhere(&dps, mqtt, "expired", "x509-old", &old, 401008).await;

    // No enrollment at all for a self-signed certificate.
    refused_everywhere(
        &dps,
        mqtt,
        "not enrolled",
        "x509-none",
        &self_signed("x509-none"),
        401005,
    )
    .await;

    // A disabled individual X.509 enrollment answers `disabled`.
    let off = self_signed("x509-off");
    let mut body = individual_x509("x509-off", &off.pem.clone());
    body["provisioningStatus"] = json!("disabled");
    put(&dps, "/enrollments/x509-off", body).await;
    let (s, b) = https_register(&dps, "x509-off", &off).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("disabled")), "{b}");
    server.shutdown().await;
}

#[tokio::test]
async fn groups_with_signing_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];

    // Root → leaf, the group holding the root.
    let root_a = root("Fleet A Root");
    put(
        &dps,
        "/enrollmentGroups/fleet-a",
        group_signing("fleet-a", &root_a.cert.pem()),
    )
    .await;
    let a1 = issued("a-1", &root_a, Vec::new());
    let (s, b) = https_register(&dps, "a-1", &a1).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "a-1", &a1, Some("fleet-a")).await;
    assert_eq!(
        b["registrationState"]["x509"]["signingCertificateInfo"]["subjectName"],
        "CN=Fleet A Root"
    );
    let a2 = issued("a-2", &root_a, Vec::new());
    let (s, b) = mqtt_register(&dps, mqtt, "a-2", &a2).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "a-2", &a2, Some("fleet-a")).await;
    assert_eq!(
        hub_connect(&dps, mqtt, "a-2", &a2).await,
        ConnectReturnCode::Success
    );
    // The record is visible through the service API under the group.
    let (_, list) = dps
        .service(Method::POST, "/registrations/fleet-a/query", None)
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // Root → intermediate → leaf, the group holding the root, the device sending the
    // intermediate.
    let root_b = root("Fleet B Root");
    let inter_b = intermediate("Fleet B Intermediate", &root_b);
    put(
        &dps,
        "/enrollmentGroups/fleet-b",
        group_signing("fleet-b", &root_b.cert.pem()),
    )
    .await;
    let b1 = issued("b-1", &inter_b, vec![inter_b.der()]);
    let (s, b) = https_register(&dps, "b-1", &b1).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "b-1", &b1, Some("fleet-b")).await;
    let b2 = issued("b-2", &inter_b, vec![inter_b.der()]);
    let (s, b) = mqtt_register(&dps, mqtt, "b-2", &b2).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "b-2", &b2, Some("fleet-b")).await;

    // The intermediate itself as a group's signing certificate: the leaf alone suffices.
    let root_c = root("Fleet C Root");
    let inter_c = intermediate("Fleet C Intermediate", &root_c);
    put(
        &dps,
        "/enrollmentGroups/fleet-c",
        group_signing("fleet-c", &inter_c.cert.pem()),
    )
    .await;
    let c1 = issued("c-1", &inter_c, Vec::new());
    let (s, b) = https_register(&dps, "c-1", &c1).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "c-1", &c1, Some("fleet-c")).await;

    // Incomplete chain: the intermediate is missing.
    let b3 = issued("b-3", &inter_b, Vec::new());
    refused_everywhere(&dps, mqtt, "incomplete chain", "b-3", &b3, 401006).await;
    // Sending it fixes that.
    let (s, b) = https_register(&dps, "b-3", &b3.sending(vec![inter_b.der()])).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");

    // Unknown CA: the chain ends at a root no group knows.
    let stranger = root("Stranger Root");
    let s1 = issued("s-1", &stranger, vec![stranger.der()]);
    refused_everywhere(&dps, mqtt, "unknown CA", "s-1", &s1, 401002).await;

    // A leaf that names Fleet A's root as issuer but was signed by another key.
    let fake_root = root("Fleet A Root");
    let f1 = issued("f-1", &fake_root, Vec::new());
    refused_everywhere(&dps, mqtt, "signature invalid", "f-1", &f1, 401010).await;

    // An expired leaf under a good root.
    let mut p = leaf_params("a-old");
    p.not_before = rcgen::date_time_ymd(2001, 1, 1);
    p.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let old = Device::new(
        p.signed_by(&key, &root_a.cert, &root_a.key).unwrap(),
        &key,
        Vec::new(),
    );
    refused_everywhere(&dps, mqtt, "expired", "a-old", &old, 401008).await;

    // CN different from the registration id the device connects as.
    refused_everywhere(&dps, mqtt, "CN mismatch", "a-9", &a1, 401007).await;

    // A disabled individual enrollment (here symmetric key) blocks one device of the group.
    put(
        &dps,
        "/enrollments/a-blocked",
        json!({"registrationId": "a-blocked", "attestation": {"type": "symmetricKey"},
               "provisioningStatus": "disabled"}),
    )
    .await;
    let blocked = issued("a-blocked", &root_a, Vec::new());
    let (s, b) = https_register(&dps, "a-blocked", &blocked).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("disabled")), "{b}");
    let (s, b) = mqtt_register(&dps, mqtt, "a-blocked", &blocked).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("disabled")), "{b}");
    let (hub, hub_cs) = dps.hub();
    let (s, _) = dps.hub_call(&hub_cs, "/devices/a-blocked").await;
    assert_eq!(s, 404, "nothing written into {hub}");
    // Deleting the blocker lets the device in through its group.
    let (s, _) = dps
        .service(Method::DELETE, "/enrollments/a-blocked", None)
        .await;
    assert_eq!(s, 204);
    let (s, b) = https_register(&dps, "a-blocked", &blocked).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "a-blocked", &blocked, Some("fleet-a")).await;

    // A disabled group answers `disabled`.
    let root_d = root("Fleet D Root");
    let mut g = group_signing("fleet-d", &root_d.cert.pem());
    g["provisioningStatus"] = json!("disabled");
    put(&dps, "/enrollmentGroups/fleet-d", g).await;
    let (s, b) = https_register(&dps, "d-1", &issued("d-1", &root_d, Vec::new())).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("disabled")), "{b}");
    server.shutdown().await;
}

#[tokio::test]
async fn groups_on_a_verified_ca_reference() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];

    let ca = root("Contoso Device CA");
    let uploaded = put(
        &dps,
        "/caCertificates/contoso",
        json!({"certificate": ca.cert.pem()}),
    )
    .await;
    assert_eq!(uploaded["name"], "contoso");
    assert_eq!(uploaded["isVerified"], false);
    assert_eq!(uploaded["info"]["subjectName"], "CN=Contoso Device CA");
    assert!(uploaded.get("certificate").is_none(), "{uploaded}");
    assert!(uploaded["etag"].is_string());

    let group = json!({"enrollmentGroupId": "contoso-devices", "attestation": {"type": "x509",
        "x509": {"caReferences": {"primary": "contoso"}}}});
    // Unverified: a group can't name it yet (nor a CA that does not exist).
    let (s, b) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/contoso-devices",
            Some(group.clone()),
        )
        .await;
    assert_eq!((s, b["errorCode"].as_u64()), (400, Some(400005)), "{b}");
    let message = b["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("caReferences.primary") && message.contains("not verified"),
        "{b}"
    );
    let mut unknown = group.clone();
    unknown["attestation"]["x509"]["caReferences"]["primary"] = json!("nobody");
    let (s, b) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/contoso-devices",
            Some(unknown),
        )
        .await;
    assert_eq!((s, b["errorCode"].as_u64()), (400, Some(400005)), "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist"),
        "{b}"
    );
    let dev = issued("contoso-1", &ca, Vec::new());

    // Proof of possession.
    let (s, b) = dps
        .service(
            Method::POST,
            "/caCertificates/contoso/verify",
            Some(json!({"certificate": ca.cert.pem()})),
        )
        .await;
    assert_eq!(
        (s, b["errorCode"].as_u64()),
        (400, Some(400017)),
        "no code yet: {b}"
    );
    let (s, b) = dps
        .service(
            Method::POST,
            "/caCertificates/contoso/verificationCode",
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let code = b["verificationCode"].as_str().unwrap().to_string();
    assert!(code.len() >= 16, "{code}");
    let proof = |cn: &str, by: &Issuer| {
        let key = rcgen::KeyPair::generate().unwrap();
        leaf_params(cn)
            .signed_by(&key, &by.cert, &by.key)
            .unwrap()
            .pem()
    };
    for (what, cert) in [
        ("wrong CN", proof("not-the-code", &ca)),
        ("other signer", proof(&code, &root("Contoso Device CA"))),
    ] {
        let (s, b) = dps
            .service(
                Method::POST,
                "/caCertificates/contoso/verify",
                Some(json!({"certificate": cert})),
            )
            .await;
        assert_eq!(
            (s, b["errorCode"].as_u64()),
            (400, Some(400017)),
            "{what}: {b}"
        );
    }
    let (s, _) = dps
        .service(Method::GET, "/caCertificates/contoso", None)
        .await;
    assert_eq!(s, 200);
    let (s, b) = dps
        .service(
            Method::POST,
            "/caCertificates/contoso/verify",
            Some(json!({"certificate": proof(&code, &ca)})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["isVerified"], true);
    let (_, b) = dps
        .service(Method::GET, "/caCertificates/CONTOSO", None)
        .await;
    assert_eq!(b["isVerified"], true, "{b}");
    let (_, list) = dps.service(Method::GET, "/cacertificates", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    put(&dps, "/enrollmentGroups/contoso-devices", group).await;

    // Verified: devices register on both transports.
    let (s, b) = https_register(&dps, "contoso-1", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "contoso-1", &dev, Some("contoso-devices")).await;
    assert_eq!(
        b["registrationState"]["x509"]["signingCertificateInfo"]["subjectName"],
        "CN=Contoso Device CA"
    );
    let dev2 = issued("contoso-2", &ca, Vec::new());
    let (s, b) = mqtt_register(&dps, mqtt, "contoso-2", &dev2).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "contoso-2", &dev2, Some("contoso-devices")).await;

    // Re-uploading the same certificate keeps it verified; another one starts over.
    let again = put(
        &dps,
        "/caCertificates/contoso",
        json!({"certificate": STANDARD_B64.encode(ca.der())}),
    )
    .await;
    assert_eq!(again["isVerified"], true, "{again}");
    let other = root("Other CA");
    let replaced = put(
        &dps,
        "/caCertificates/contoso",
        json!({"certificate": other.cert.pem()}),
    )
    .await;
    assert_eq!(replaced["isVerified"], false, "{replaced}");
    // The group keeps naming it; its devices are refused until it is verified again.
    let dev_o = issued("contoso-o", &other, Vec::new());
    refused_everywhere(&dps, mqtt, "unverified CA", "contoso-o", &dev_o, 401011).await;

    // Errors of the CA API.
    let (s, b) = dps
        .service(Method::DELETE, "/caCertificates/contoso", None)
        .await;
    assert_eq!(s, 204, "{b}");
    let (s, b) = dps
        .service(Method::GET, "/caCertificates/contoso", None)
        .await;
    assert_eq!((s, b["errorCode"].as_u64()), (404, Some(404206)), "{b}");
    let (s, b) = dps
        .service(
            Method::PUT,
            "/caCertificates/bad",
            Some(json!({"certificate": "nope"})),
        )
        .await;
    assert_eq!((s, b["errorCode"].as_u64()), (400, Some(400007)), "{b}");
    // A CA reference to a deleted CA attests nobody (the chain's root is unknown).
    let dev3 = issued("contoso-3", &ca, vec![ca.der()]);
    refused_everywhere(&dps, mqtt, "deleted CA", "contoso-3", &dev3, 401002).await;
    server.shutdown().await;
}

#[tokio::test]
async fn throttled_x509_assignments_finish_with_the_thumbprint() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (hub_name, hub_cs) = dps.hub();
    let (s, b) = dps
        .service(
            Method::PUT,
            &format!("/linkedHubs/{hub_name}"),
            Some(json!({"maxRegistrationsPerSecond": 1})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let root_t = root("Throttled Root");
    put(
        &dps,
        "/enrollmentGroups/slow-x509",
        group_signing("slow-x509", &root_t.cert.pem()),
    )
    .await;
    let devices: Vec<(String, Device)> = (0..3)
        .map(|i| {
            let id = format!("slow-x-{i}");
            let d = issued(&id, &root_t, Vec::new());
            (id, d)
        })
        .collect();
    let mut ops = Vec::new();
    let mut assigning = 0;
    for (id, d) in &devices {
        let (s, b) = https_register(&dps, id, d).await;
        assert_eq!(s, 202, "{b}");
        if b["status"] == "assigning" {
            assigning += 1;
        }
        ops.push(b["operationId"].as_str().unwrap().to_string());
    }
    assert!(
        assigning >= 1,
        "a 1/s hub cannot take 3 registrations at once"
    );
    for ((id, d), op) in devices.iter().zip(&ops) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        let body = loop {
            let (s, b) = https_poll(&dps, id, op, d).await;
            if s == 200 {
                break b;
            }
            assert_eq!(s, 202, "{b}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never assigned"
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        };
        assert_eq!(body["status"], "assigned", "{body}");
        assert_eq!(
            body["registrationState"]["x509"]["enrollmentGroupId"],
            "slow-x509"
        );
        let (s, dev) = dps.hub_call(&hub_cs, &format!("/devices/{id}")).await;
        assert_eq!(s, 200, "{dev}");
        assert_eq!(dev["authentication"]["type"], "selfSigned");
        assert_eq!(
            dev["authentication"]["x509Thumbprint"]["primaryThumbprint"],
            json!(d.thumbprint())
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn version_1_device_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];
    let https = server.https_addrs[0];

    // Individual enrollment with the v1 certificate as PEM: HTTPS (TLS 1.3), MQTT and
    // MQTT over WebSocket (TLS 1.2), then the hub with the same certificate.
    let dev = v1_device("v1-pem", None, EC_P256);
    put(
        &dps,
        "/enrollments/v1-pem",
        individual_x509("v1-pem", &dev.pem),
    )
    .await;
    let (s, b) = https_register(&dps, "v1-pem", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "v1-pem", &dev, None).await;
    assert_eq!(
        b["registrationState"]["x509"]["certificateInfo"]["version"],
        1
    );
    let (s, b) = mqtt_register(&dps, mqtt, "v1-pem", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "v1-pem", &dev, None).await;
    let (s, b) = mqtt_ws_register(&dps, https, "v1-pem", &dev).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "v1-pem", &dev, None).await;
    assert_eq!(
        hub_connect(&dps, mqtt, "v1-pem", &dev).await,
        ConnectReturnCode::Success
    );

    // An RSA key, the certificate enrolled as base64 DER: matched by its thumbprint.
    let rsa = v1_device("v1-rsa", None, RSA_2048);
    put(
        &dps,
        "/enrollments/v1-rsa",
        individual_x509("v1-rsa", &STANDARD_B64.encode(rsa.der())),
    )
    .await;
    let (s, b) = https_register(&dps, "v1-rsa", &rsa).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "v1-rsa", &rsa, None).await;
    let (s, b) = mqtt_ws_register(&dps, https, "v1-rsa", &rsa).await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        hub_connect(&dps, mqtt, "v1-rsa", &rsa).await,
        ConnectReturnCode::Success
    );
    // Another v1 certificate with the enrolled CN is not the enrolled one.
    let impostor = v1_device("v1-rsa", None, RSA_2048);
    refused_everywhere(
        &dps,
        mqtt,
        "v1 thumbprint mismatch",
        "v1-rsa",
        &impostor,
        401009,
    )
    .await;
    assert_ne!(
        hub_connect(&dps, mqtt, "v1-rsa", &impostor).await,
        ConnectReturnCode::Success
    );

    // A v1 leaf under a group's (v3) root, and under an intermediate the device sends.
    let root_v = root("V1 Fleet Root");
    put(
        &dps,
        "/enrollmentGroups/v1-fleet",
        group_signing("v1-fleet", &root_v.cert.pem()),
    )
    .await;
    let (root_pem, root_key) = root_v.pems();
    for (transport, id) in [("https", "v1-g-1"), ("mqtt", "v1-g-2"), ("ws", "v1-g-3")] {
        let leaf = v1_device(id, Some((&root_pem, &root_key)), EC_P256);
        let (s, b) = match transport {
            "https" => https_register(&dps, id, &leaf).await,
            "mqtt" => mqtt_register(&dps, mqtt, id, &leaf).await,
            _ => mqtt_ws_register(&dps, https, id, &leaf).await,
        };
        assert_eq!(s, 202, "{transport}: {b}");
        assert_assigned(&dps, &b, id, &leaf, Some("v1-fleet")).await;
        assert_eq!(
            hub_connect(&dps, mqtt, id, &leaf).await,
            ConnectReturnCode::Success,
            "{transport}"
        );
    }
    let inter_v = intermediate("V1 Fleet Intermediate", &root_v);
    let (inter_pem, inter_key) = inter_v.pems();
    let deep = v1_device("v1-g-4", Some((&inter_pem, &inter_key)), EC_P256);
    refused_everywhere(
        &dps,
        mqtt,
        "v1 leaf, intermediate missing",
        "v1-g-4",
        &deep,
        401006,
    )
    .await;
    let deep = deep.sending(vec![inter_v.der()]);
    let (s, b) = mqtt_register(&dps, mqtt, "v1-g-4", &deep).await;
    assert_eq!(s, 202, "{b}");
    assert_assigned(&dps, &b, "v1-g-4", &deep, Some("v1-fleet")).await;
    // Signed by another key under the root's name.
    let (fake_pem, fake_key) = root("V1 Fleet Root").pems();
    let forged = v1_device("v1-g-5", Some((&fake_pem, &fake_key)), EC_P256);
    refused_everywhere(
        &dps,
        mqtt,
        "v1 leaf, bad signature",
        "v1-g-5",
        &forged,
        401010,
    )
    .await;

    // A v1 certificate acting as a CA: the group's signing certificate, or an intermediate.
    let (v1_ca_pem, v1_ca_key) = v1_ca("Version 1 CA");
    put(
        &dps,
        "/enrollmentGroups/v1-ca",
        group_signing("v1-ca", &v1_ca_pem),
    )
    .await;
    let under_v1 = v1_device("v1-under-ca", Some((&v1_ca_pem, &v1_ca_key)), EC_P256);
    refused_everywhere(&dps, mqtt, "v1 CA", "v1-under-ca", &under_v1, 401012).await;
    let (s, b) = mqtt_ws_register(&dps, https, "v1-under-ca", &under_v1).await;
    assert_eq!((s, b["errorCode"].as_u64()), (401, Some(401012)), "{b}");
    let message = b["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("CN=Version 1 CA") && message.contains("version 1"),
        "{message}"
    );
    // A v1 certificate signed by the fleet's root, acting as the intermediate, the same way.
    let v1_inter = v1_device("V1 Intermediate", Some((&root_pem, &root_key)), EC_P256);
    let key_pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD_B64
            .encode(&v1_inter.key_der)
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let below = v1_device("v1-below-inter", Some((&v1_inter.pem, &key_pem)), EC_P256)
        .sending(vec![v1_inter.der()]);
    let (s, b) = https_register(&dps, "v1-below-inter", &below).await;
    assert_eq!((s, b["errorCode"].as_u64()), (401, Some(401012)), "{b}");
    assert!(
        b["message"]
            .as_str()
            .is_some_and(|m| m.contains("CN=V1 Intermediate")),
        "{b}"
    );
    let (_, hub_cs) = dps.hub();
    let (s, _) = dps.hub_call(&hub_cs, "/devices/v1-under-ca").await;
    assert_eq!(s, 404, "nothing written into the hub");
    server.shutdown().await;
}
