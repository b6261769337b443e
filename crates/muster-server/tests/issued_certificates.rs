//! Issued-certificate records and revocation (issue #20): every certificate issued for a CSR is
//! listed under `/certificates/issued`, revoking one takes it off the hub device, the built-in
//! hub refuses it over MQTT and AMQP, an X.509 registration with it gets 401016, and a new
//! CSR registration rotates to a fresh certificate that works.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use common::{device_token, now, policy_token, Dps};
use fe2o3_amqp::types::messaging::{Message, Outcome};
use fe2o3_amqp::{Connection, Sender, Session};
use muster_attestation::symmetric_key::derive_device_key;
use muster_proto::ConnectionString;
use muster_server::Server;
use reqwest::Method;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// This test's loopback address.
const HOST: &str = "127.0.0.33";
const CSR_VERSION: &str = "2026-04-01";

struct DeviceKey(rcgen::KeyPair);

impl DeviceKey {
    fn new() -> Self {
        Self(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
    }

    fn csr(&self, cn: &str) -> String {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        B64.encode(params.serialize_request(&self.0).unwrap().der())
    }
}

fn tls_config(dps: &Dps, client: Option<(&[u8], &DeviceKey)>) -> rustls::ClientConfig {
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
    match client {
        Some((der, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(der.to_vec())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.0.serialize_der().into()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

async fn tls(
    dps: &Dps,
    addr: std::net::SocketAddr,
    client: Option<(&[u8], &DeviceKey)>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls_config(dps, client)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// MQTT CONNECT to the built-in hub as `device_id` with a client certificate: the CONNACK code.
async fn mqtt_hub_connect(
    dps: &Dps,
    server: &Server,
    device_id: &str,
    cert: &[u8],
    key: &DeviceKey,
) -> ConnectReturnCode {
    let (hub, _) = dps.hub();
    let mut tls = tls(dps, server.mqtt_addrs[0], Some((cert, key))).await;
    let mut out = BytesMut::new();
    let mut c = Connect::new(device_id);
    c.login = Some(rumqttc::mqttbytes::v4::Login::new(
        format!("{hub}/{device_id}/?api-version=2021-04-12"),
        "",
    ));
    c.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Packet::ConnAck(a) = packet {
                return a.code;
            }
        }
        let n = tokio::time::timeout_at(deadline, tls.read_buf(&mut buf))
            .await
            .expect("a CONNACK in time")
            .unwrap();
        assert!(n > 0, "the hub closed the connection without a CONNACK");
    }
}

/// AMQP to the built-in hub with a client certificate (no SASL): whether a telemetry message
/// on the device's link is accepted.
async fn amqp_hub_telemetry(
    dps: &Dps,
    server: &Server,
    device_id: &str,
    cert: &[u8],
    key: &DeviceKey,
) -> bool {
    let (hub, _) = dps.hub();
    let stream = tls(dps, server.amqp_addrs[0], Some((cert, key))).await;
    let attempt = async {
        let mut connection = Connection::builder()
            .container_id(device_id)
            .hostname(hub.as_str())
            .open_with_stream(stream)
            .await
            .ok()?;
        let mut session = Session::begin(&mut connection).await.ok()?;
        let mut sender = Sender::attach(
            &mut session,
            "telemetry",
            format!("/devices/{device_id}/messages/events"),
        )
        .await
        .ok()?;
        let outcome = sender
            .send(Message::builder().value("hello").build())
            .await
            .ok()?;
        let _ = sender.close().await;
        let _ = session.end().await;
        let _ = connection.close().await;
        Some(matches!(outcome, Outcome::Accepted(_)))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("the hub answers in time")
        .unwrap_or(false)
}

/// The built-in hub's device HTTPS API with a client certificate: the status of a telemetry
/// POST.
async fn https_hub_telemetry(dps: &Dps, device_id: &str, cert: &[u8], key: &DeviceKey) -> u16 {
    let (hub, _) = dps.hub();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(dps, Some((cert, key))))
        .build()
        .unwrap();
    http.post(format!(
        "https://{hub}/devices/{device_id}/messages/events?api-version=2021-04-12"
    ))
    .body("hello")
    .send()
    .await
    .unwrap()
    .status()
    .as_u16()
}

/// Registers over HTTPS with a SAS token (or, without one, the TLS client certificate).
async fn register(
    dps: &Dps,
    id: &str,
    token: Option<&str>,
    client: Option<(&[u8], &DeviceKey)>,
    body: Json,
) -> (u16, Json) {
    let http = match client {
        Some(c) => reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(dps, Some(c)))
            .build()
            .unwrap(),
        None => dps.http.clone(),
    };
    let mut req = http
        .put(format!(
            "https://{}/{}/registrations/{id}/register?api-version={CSR_VERSION}",
            dps.info.device_endpoint, dps.info.id_scope
        ))
        .json(&body);
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Json::Null))
}

/// Creates symmetric-key group `id` issuing certificates; returns its primary key.
async fn issuing_group(dps: &Dps, id: &str) -> String {
    let (s, g) = dps
        .service(
            Method::PUT,
            &format!("/enrollmentGroups/{id}"),
            Some(json!({"attestation": {"type": "symmetricKey"},
                        "certificateIssuance": {"enabled": true}})),
        )
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

/// Registers `id` with a new key's CSR; the leaf (DER) and its key.
async fn issue(dps: &Dps, group_key: &str, id: &str) -> (Vec<u8>, DeviceKey) {
    let key = DeviceKey::new();
    let t = token(dps, group_key, id);
    let (s, b) = register(dps, id, Some(&t), None, json!({"csr": key.csr(id)})).await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");
    let leaf = B64
        .decode(
            b["registrationState"]["issuedCertificateChain"][0]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    (leaf, key)
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

#[tokio::test]
async fn revoked_certificate_is_refused_at_the_hub_and_registration_and_rotation_works() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(common::config(dir.path(), HOST))
        .await
        .unwrap();
    let dps = Dps::new(&server.connection);
    let group_key = issuing_group(&dps, "fleet").await;
    let (leaf, key) = issue(&dps, &group_key, "r-1").await;
    let serial = serial_of(&leaf);

    // The record: serial, thumbprint, registration, enrollment, issuing CA, validity.
    let (s, rec) = dps
        .service(Method::GET, &format!("/certificates/issued/{serial}"), None)
        .await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["registrationId"], "r-1");
    assert_eq!(rec["enrollmentType"], "group");
    assert_eq!(rec["enrollmentGroupId"], "fleet");
    assert_eq!(rec["issuingCa"], "local");
    assert!(rec["notAfterUtc"].is_string() && rec["issuedDateTimeUtc"].is_string());
    assert!(rec.get("revokedDateTimeUtc").is_none(), "{rec}");
    let (_, registration) = dps.service(Method::GET, "/registrations/r-1", None).await;
    assert_eq!(
        rec["sha256Thumbprint"],
        registration["issuedCertificate"]["sha256Thumbprint"]
    );

    // Before revocation the certificate opens the hub over MQTT and AMQP.
    assert_eq!(
        mqtt_hub_connect(&dps, &server, "r-1", &leaf, &key).await,
        ConnectReturnCode::Success
    );
    assert!(amqp_hub_telemetry(&dps, &server, "r-1", &leaf, &key).await);
    assert_eq!(https_hub_telemetry(&dps, "r-1", &leaf, &key).await, 204);

    let (s, revoked) = dps
        .service(
            Method::POST,
            &format!("/certificates/issued/{serial}/revoke"),
            Some(json!({"reason": "device stolen"})),
        )
        .await;
    assert_eq!(s, 200, "{revoked}");
    assert_eq!(revoked["revocationReason"], "device stolen");
    assert!(revoked["revokedDateTimeUtc"].is_string(), "{revoked}");

    // The hub device lost the thumbprint; both transports refuse the certificate.
    let (_, hub_cs) = dps.hub();
    let (s, d) = dps.hub_call(&hub_cs, "/devices/r-1").await;
    assert_eq!(
        (s, &d["authentication"]["type"]),
        (200, &json!("none")),
        "{d}"
    );
    assert_eq!(
        mqtt_hub_connect(&dps, &server, "r-1", &leaf, &key).await,
        ConnectReturnCode::NotAuthorized
    );
    assert!(!amqp_hub_telemetry(&dps, &server, "r-1", &leaf, &key).await);
    assert_eq!(https_hub_telemetry(&dps, "r-1", &leaf, &key).await, 401);

    // Even with the thumbprint put back by hand, the hub refuses the revoked certificate.
    let thumbprint = rec["sha256Thumbprint"].as_str().unwrap();
    let cs = ConnectionString::parse(&hub_cs).unwrap();
    let r = dps
        .http
        .put(format!(
            "https://{}/devices/r-1?api-version=2021-04-12",
            cs.host_name
        ))
        .header("authorization", policy_token(&hub_cs))
        .header("if-match", "*")
        .json(
            &json!({"deviceId": "r-1", "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumbprint}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        mqtt_hub_connect(&dps, &server, "r-1", &leaf, &key).await,
        ConnectReturnCode::NotAuthorized
    );
    assert!(!amqp_hub_telemetry(&dps, &server, "r-1", &leaf, &key).await);
    assert_eq!(https_hub_telemetry(&dps, "r-1", &leaf, &key).await, 401);

    // Registering with the revoked certificate (X.509 over TLS) is refused with its code.
    let (s, e) = register(&dps, "r-1", None, Some((&leaf, &key)), json!({})).await;
    assert_eq!((s, &e["errorCode"]), (401, &json!(401016)), "{e}");
    assert!(e["message"].as_str().unwrap().contains("revoked"), "{e}");

    // A new CSR rotates: a fresh certificate that opens the hub; the revoked one still not.
    let (fresh, fresh_key) = issue(&dps, &group_key, "r-1").await;
    assert_ne!(serial_of(&fresh), serial);
    assert_eq!(
        mqtt_hub_connect(&dps, &server, "r-1", &fresh, &fresh_key).await,
        ConnectReturnCode::Success
    );
    assert!(amqp_hub_telemetry(&dps, &server, "r-1", &fresh, &fresh_key).await);
    assert_eq!(
        mqtt_hub_connect(&dps, &server, "r-1", &leaf, &key).await,
        ConnectReturnCode::NotAuthorized
    );

    // Revoking again keeps the first revocation.
    let (s, again) = dps
        .service(
            Method::POST,
            &format!("/certificates/issued/{serial}/revoke"),
            Some(json!({"reason": "other"})),
        )
        .await;
    assert_eq!(
        (s, &again["revocationReason"]),
        (200, &json!("device stolen"))
    );

    // The audit log has the issue (by the device) and the revocation (by the owner policy).
    let (s, audit) = dps
        .service(Method::GET, &format!("/audit?id={serial}"), None)
        .await;
    assert_eq!(s, 200, "{audit}");
    let entries: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_string(),
                e["route"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        entries.contains(&("device".into(), "/certificates/issued/{serial}".into())),
        "{audit}"
    );
    assert!(
        entries
            .iter()
            .any(|(_, route)| route == "/certificates/issued/{serial}/revoke"),
        "{audit}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn listing_pages_filters_and_read_only_policies_cannot_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(common::config(dir.path(), HOST))
        .await
        .unwrap();
    let dps = Dps::new(&server.connection);
    let group_key = issuing_group(&dps, "many").await;
    let mut serials = Vec::new();
    for id in ["l-1", "l-2", "l-1"] {
        serials.push(serial_of(&issue(&dps, &group_key, id).await.0));
    }

    // Paged by serial with the continuation token, like the queries.
    let page = |continuation: Option<String>, filter: &str| {
        let mut req = dps
            .http
            .get(format!(
                "{}/certificates/issued?api-version=2021-10-01{filter}",
                dps.info.service_endpoint
            ))
            .header(
                "authorization",
                policy_token(&dps.info.service_connection_string),
            )
            .header("x-ms-max-item-count", "2");
        if let Some(c) = continuation {
            req = req.header("x-ms-continuation", c);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let next = r
                .headers()
                .get("x-ms-continuation")
                .map(|v| v.to_str().unwrap().to_string());
            let items: Json = r.json().await.unwrap();
            let serials: Vec<String> = items
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["serialNumber"].as_str().unwrap().to_string())
                .collect();
            (serials, next)
        }
    };
    let (first, next) = page(None, "").await;
    assert_eq!(first.len(), 2);
    let (second, last) = page(Some(next.expect("a second page")), "").await;
    assert_eq!(second.len(), 1);
    assert_eq!(last, None, "no continuation after the last page");
    let mut all: Vec<String> = first.into_iter().chain(second).collect();
    let mut expected = serials.clone();
    expected.sort();
    all.sort();
    assert_eq!(all, expected);
    let (only_l2, _) = page(None, "&registrationId=L-2").await;
    assert_eq!(only_l2, [serials[1].clone()]);

    // Unknown serials have their code; a bad one names the field.
    let (s, e) = dps
        .service(Method::GET, "/certificates/issued/ABCDEF", None)
        .await;
    assert_eq!((s, &e["errorCode"]), (404, &json!(404207)), "{e}");
    let (s, e) = dps
        .service(
            Method::POST,
            "/certificates/issued/ABCDEF/revoke",
            Some(json!({})),
        )
        .await;
    assert_eq!((s, &e["errorCode"]), (404, &json!(404207)), "{e}");
    let (s, e) = dps
        .service(Method::GET, "/certificates/issued/not-hex", None)
        .await;
    assert_eq!((s, &e["errorCode"]), (400, &json!(400015)), "{e}");

    // A read-only policy lists but may not revoke.
    let (s, created) = dps
        .service(
            Method::PUT,
            "/accessPolicies/reader",
            Some(json!({"rights": "RegistrationStatusRead"})),
        )
        .await;
    assert_eq!(s, 200, "{created}");
    let reader_cs = format!(
        "HostName={};SharedAccessKeyName=reader;SharedAccessKey={}",
        dps.info.device_endpoint,
        created["primaryKey"].as_str().unwrap()
    );
    let reader = Dps {
        info: muster_server::ConnectionInfo {
            service_connection_string: reader_cs,
            ..dps.info.clone()
        },
        http: dps.http.clone(),
    };
    let (s, _) = reader
        .service(
            Method::GET,
            &format!("/certificates/issued/{}", serials[0]),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, e) = reader
        .service(
            Method::POST,
            &format!("/certificates/issued/{}/revoke", serials[0]),
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!((s, &e["errorCode"]), (403, &json!(403001)), "{e}");
    let (_, rec) = dps
        .service(
            Method::GET,
            &format!("/certificates/issued/{}", serials[0]),
            None,
        )
        .await;
    assert!(rec.get("revokedDateTimeUtc").is_none(), "{rec}");

    // An enrollment naming an issuing CA the server lacks is refused, naming the field.
    let (s, e) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/unknown-ca",
            Some(json!({"attestation": {"type": "symmetricKey"},
                        "certificateIssuance": {"enabled": true, "issuingCa": "nope"}})),
        )
        .await;
    assert_eq!((s, &e["errorCode"]), (400, &json!(400015)), "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("certificateIssuance.issuingCa"),
        "{e}"
    );
    let (s, _) = dps
        .service(Method::GET, "/enrollmentGroups/unknown-ca", None)
        .await;
    assert_eq!(s, 404, "nothing written");
    server.shutdown().await;
}

/// An operator root and intermediate (rcgen): the intermediate's PEM chain and key.
fn operator_ca(cn: &str) -> (String, String, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_params = |name: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = ca_params(&format!("{cn} Root"))
        .self_signed(&root_key)
        .unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let inter = ca_params(cn).signed_by(&key, &root, &root_key).unwrap();
    (
        format!("{}{}", inter.pem(), root.pem()),
        key.serialize_pem(),
        inter.der().to_vec(),
    )
}

#[tokio::test]
async fn a_named_operator_ca_is_imported_sealed_and_chosen_per_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let (chain_pem, key_pem, inter_der) = operator_ca("Fleet Issuing CA");
    let cert = files.path().join("fleet.pem");
    let key_path = files.path().join("fleet.key");
    std::fs::write(&cert, &chain_pem).unwrap();
    std::fs::write(&key_path, &key_pem).unwrap();
    // `issuing-ca-cert`/`-key` are imported the same way, as `local`.
    let (local_chain, local_key, local_der) = operator_ca("Override Issuing CA");
    let local_cert = files.path().join("local.pem");
    let local_key_path = files.path().join("local.key");
    std::fs::write(&local_cert, &local_chain).unwrap();
    std::fs::write(&local_key_path, &local_key).unwrap();
    let mut config = common::config(dir.path(), HOST);
    config.issuing_cas = vec![muster_server::config::IssuingCaConfig {
        name: "fleet".into(),
        cert: cert.clone(),
        key: key_path.clone(),
    }];
    config.issuing_ca_cert = Some(local_cert);
    config.issuing_ca_key = Some(local_key_path);
    let server = Server::start(config).await.unwrap();
    server.shutdown().await;
    // The files go; the next start (without the option) loads the CA from the store.
    drop(files);
    let server = Server::start(common::config(dir.path(), HOST))
        .await
        .unwrap();
    let dps = Dps::new(&server.connection);
    let (s, g) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/op",
            Some(json!({"attestation": {"type": "symmetricKey"},
                        "certificateIssuance": {"enabled": true, "issuingCa": "fleet"}})),
        )
        .await;
    assert_eq!(s, 200, "{g}");
    let group_key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let key = DeviceKey::new();
    let t = token(&dps, &group_key, "o-1");
    let (s, b) = register(&dps, "o-1", Some(&t), None, json!({"csr": key.csr("o-1")})).await;
    assert_eq!(s, 202, "{b}");
    let chain = b["registrationState"]["issuedCertificateChain"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(chain.len(), 3, "leaf, the operator intermediate, its root");
    assert_eq!(B64.decode(chain[1].as_str().unwrap()).unwrap(), inter_der);
    let leaf = B64.decode(chain[0].as_str().unwrap()).unwrap();
    muster_attestation::verify_signed_by(&leaf, &inter_der).unwrap();
    let (_, rec) = dps
        .service(
            Method::GET,
            &format!("/certificates/issued/{}", serial_of(&leaf)),
            None,
        )
        .await;
    assert_eq!(rec["issuingCa"], "fleet", "{rec}");
    assert_eq!(rec["issuerName"], "CN=Fleet Issuing CA", "{rec}");
    // A group naming no CA gets `local`: here the imported override, not Muster's own.
    let default_key = issuing_group(&dps, "default-ca").await;
    let (leaf, _) = issue(&dps, &default_key, "o-2").await;
    muster_attestation::verify_signed_by(&leaf, &local_der).unwrap();
    let (_, rec) = dps
        .service(
            Method::GET,
            &format!("/certificates/issued/{}", serial_of(&leaf)),
            None,
        )
        .await;
    assert_eq!(rec["issuingCa"], "local", "{rec}");
    assert_eq!(rec["issuerName"], "CN=Override Issuing CA", "{rec}");
    server.shutdown().await;

    // At rest the key is sealed: its PEM body is nowhere in the database files.
    let needle = key_pem
        .lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap()
        .to_string();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("muster.db")
        {
            let bytes = std::fs::read(&path).unwrap();
            checked += bytes.len();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds the issuing CA key in clear",
                path.display()
            );
        }
    }
    assert!(checked > 0, "the database files were read");
}
