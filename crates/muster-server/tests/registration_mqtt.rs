//! Registration over MQTT on a real server (TLS on the MQTT port): the same answers as HTTPS,
//! including every refusal, carried in `$dps/registrations/res/{status}/?$rid=...`.

mod common;

use std::sync::Arc;

use bytes::BytesMut;
use common::{device_token, now, start, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use reqwest::Method;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One MQTT register exchange as a device does it; returns (status, payload).
async fn mqtt_register(
    dps: &Dps,
    mqtt_addr: std::net::SocketAddr,
    scope: &str,
    registration_id: &str,
    password: &str,
) -> (u16, Value) {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(mqtt_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();

    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    connect.set_login(
        format!("{scope}/registrations/{registration_id}/api-version=2019-03-31"),
        password,
    );
    connect.write(&mut out).unwrap();
    Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce)
        .write(&mut out)
        .unwrap();
    let mut publish = Publish::new(
        "$dps/registrations/PUT/iotdps-register/?$rid=r1",
        QoS::AtLeastOnce,
        br#"{"registrationId":null,"payload":null}"#.to_vec(),
    );
    publish.pkid = 7;
    publish.write(&mut out).unwrap();
    tls.write_all(&out).await.unwrap();

    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Ok(packet) = Packet::read(&mut buf, 1 << 20) {
            if let Packet::Publish(p) = packet {
                let topic = p.topic.clone();
                let status = topic
                    .strip_prefix("$dps/registrations/res/")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap();
                assert!(topic.contains("/?$rid=r1"), "{topic}");
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

#[tokio::test]
async fn every_answer_arrives_over_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let mqtt = server.mqtt_addrs[0];
    let scope = dps.info.id_scope.clone();
    let (_, g) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/m",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
        )
        .await;
    let key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let dk = derive_device_key(&key, "m-1").unwrap();

    let (s, b) = mqtt_register(
        &dps,
        mqtt,
        &scope,
        "m-1",
        &device_token(&scope, "m-1", &dk, now() + 60),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");
    assert_eq!(b["registrationState"]["assignedHub"], json!(dps.hub().0));

    let cases: Vec<(&str, String, String, u16, u64)> = vec![
        (
            "wrong key",
            "m-2".into(),
            device_token(&scope, "m-2", &dk, now() + 60),
            401,
            401005,
        ),
        (
            "expired",
            "m-1".into(),
            device_token(&scope, "m-1", &dk, now() - 3600),
            401,
            401003,
        ),
        (
            "unknown scope",
            "m-1".into(),
            device_token("0neFFFFFFFF", "m-1", &dk, now() + 60),
            401,
            401004,
        ),
        (
            "invalid id",
            "m!1".into(),
            device_token(&scope, "m!1", &dk, now() + 60),
            400,
            400002,
        ),
    ];
    for (what, id, token, status, code) in cases {
        let scope_used = if what == "unknown scope" {
            "0neFFFFFFFF"
        } else {
            scope.as_str()
        };
        let (s, b) = mqtt_register(&dps, mqtt, scope_used, &id, &token).await;
        assert_eq!(
            (s, b["errorCode"].as_u64()),
            (status, Some(code)),
            "{what}: {b}"
        );
        assert!(
            b["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }

    let (_, e) = dps
        .service(
            Method::PUT,
            "/enrollments/m-off",
            Some(
                json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"}),
            ),
        )
        .await;
    let k = e["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, b) = mqtt_register(
        &dps,
        mqtt,
        &scope,
        "m-off",
        &device_token(&scope, "m-off", &k, now() + 60),
    )
    .await;
    assert_eq!((s, b["status"].as_str()), (202, Some("disabled")), "{b}");
    server.shutdown().await;
}
