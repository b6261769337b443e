//! A `selfSigned` hub device connects to the built-in hub over MQTT with its client
//! certificate: the TLS handshake asks for an optional certificate, and the hub compares the
//! leaf's thumbprint with the device's.

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::{start, Dps};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct DeviceCert {
    der: Vec<u8>,
    key_der: Vec<u8>,
}

fn device_cert(cn: &str) -> DeviceCert {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    DeviceCert {
        der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

fn thumbprint(der: &[u8]) -> String {
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// Connects with `cert` and returns the CONNACK.
async fn connect(
    dps: &Dps,
    addr: std::net::SocketAddr,
    hub: &str,
    device_id: &str,
    cert: Option<&DeviceCert>,
) -> ConnAck {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(c.der.clone())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(c.key_der.clone().into()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut out = BytesMut::new();
    let mut c = Connect::new(device_id);
    c.login = Some(rumqttc::mqttbytes::v4::Login::new(
        format!("{hub}/{device_id}/?api-version=2021-04-12"),
        "",
    ));
    c.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Packet::ConnAck(ack)) = Packet::read(&mut buf, 1 << 16) {
            return ack;
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read_buf(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed without a CONNACK");
    }
}

#[tokio::test]
async fn self_signed_device_connects_with_its_certificate_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (hub, hub_cs) = dps.hub();
    let good = device_cert("x509-dev");
    let other = device_cert("x509-dev");
    let r = dps
        .http
        .put(format!("https://{hub}/devices/x509-dev?api-version=2021-04-12"))
        .header("authorization", common::policy_token(&hub_cs))
        .json(&json!({"deviceId": "x509-dev", "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumbprint(&good.der), "secondaryThumbprint": thumbprint(&good.der)}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let addr = server.mqtt_addrs[0];
    assert_eq!(
        connect(&dps, addr, &hub, "x509-dev", Some(&good))
            .await
            .code,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connect(&dps, addr, &hub, "x509-dev", Some(&other))
            .await
            .code,
        ConnectReturnCode::NotAuthorized
    );
    assert_ne!(
        connect(&dps, addr, &hub, "x509-dev", None).await.code,
        ConnectReturnCode::Success
    );
    server.shutdown().await;
}
