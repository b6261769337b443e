//! Registration over AMQP on a real server (TLS on the AMQP port, SASL PLAIN with the SAS
//! token), driven by fe2o3-amqp's client: the same answers as HTTPS and MQTT, refusals as
//! rejected request deliveries whose description is the DPS error body.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{device_token, now, start, Dps};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::AmqpError;
use fe2o3_amqp::types::definitions::ErrorCondition;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use muster_attestation::symmetric_key::derive_device_key;
use muster_server::config::Config;
use muster_server::Server;
use reqwest::Method;
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

async fn tls(dps: &Dps, addr: std::net::SocketAddr) -> TlsStream<tokio::net::TcpStream> {
    try_tls(dps, addr).await.unwrap()
}

async fn try_tls(
    dps: &Dps,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let pem = std::fs::read(dps.info.ca_certificate.as_deref().expect("a local CA")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// A device's AMQP registration connection, links attached as the Node SDK attaches them.
struct Device {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    sender: Sender,
    receiver: Receiver,
}

impl Device {
    async fn connect(
        dps: &Dps,
        addr: std::net::SocketAddr,
        scope: &str,
        registration_id: &str,
        token: &str,
    ) -> Device {
        let address = format!("{scope}/registrations/{registration_id}");
        let mut connection = Connection::builder()
            .container_id("device")
            .hostname("127.0.0.1")
            .sasl_profile(SaslProfile::Plain {
                username: address.clone(),
                password: token.to_string(),
            })
            .open_with_stream(tls(dps, addr).await)
            .await
            .unwrap();
        let mut session = Session::begin(&mut connection).await.unwrap();
        let receiver = Receiver::attach(&mut session, "recv", address.as_str())
            .await
            .unwrap();
        let sender = Sender::attach(&mut session, "send", address.as_str())
            .await
            .unwrap();
        Device {
            connection,
            session,
            sender,
            receiver,
        }
    }

    /// Sends one request; the response's JSON when it was accepted, the rejection otherwise.
    async fn request(
        &mut self,
        correlation: &str,
        properties: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(Json, ApplicationProperties), fe2o3_amqp::types::definitions::Error> {
        let mut app = ApplicationProperties::default();
        for (k, v) in properties {
            app.0
                .insert(k.to_string(), SimpleValue::String(v.to_string()));
        }
        let message = Message::builder()
            .properties(Properties {
                correlation_id: Some(MessageId::String(correlation.into())),
                ..Default::default()
            })
            .application_properties(app)
            .data(Binary::from(body.to_vec()))
            .build();
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.sender.send(message))
            .await
            .expect("settled in time")
            .unwrap();
        match outcome {
            Outcome::Accepted(_) => {}
            Outcome::Rejected(r) => return Err(r.error.expect("a rejection says why")),
            other => panic!("unexpected outcome {other:?}"),
        }
        let delivery: Delivery<Body<Value>> =
            tokio::time::timeout(Duration::from_secs(10), self.receiver.recv())
                .await
                .expect("answered in time")
                .unwrap();
        self.receiver.accept(&delivery).await.unwrap();
        let message = delivery.into_message();
        assert_eq!(
            message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.clone()),
            Some(MessageId::String(correlation.into())),
            "the response carries the request's correlation id"
        );
        let Body::Data(data) = &message.body else {
            panic!(
                "the response body is not a Data section: {:?}",
                message.body
            );
        };
        let bytes: Vec<u8> = data.iter().flat_map(|d| d.0.iter().copied()).collect();
        Ok((
            serde_json::from_slice(&bytes).unwrap(),
            message.application_properties.unwrap_or_default(),
        ))
    }

    async fn close(mut self) {
        let _ = self.sender.close().await;
        let _ = self.receiver.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

fn dps_error(e: &fe2o3_amqp::types::definitions::Error) -> Json {
    serde_json::from_str(e.description.as_deref().expect("a description")).unwrap()
}

#[tokio::test]
async fn registration_and_refusals_over_amqp() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let amqp = server.amqp_addrs[0];
    assert_eq!(server.connection.amqp_port, amqp.port());
    let scope = dps.info.id_scope.clone();
    let (_, g) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/a",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
        )
        .await;
    let key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let dk = derive_device_key(&key, "a-1").unwrap();

    // Register, then poll the operation: the same answers as over HTTPS.
    let token = device_token(&scope, "a-1", &dk, now() + 60);
    let mut device = Device::connect(&dps, amqp, &scope, "a-1", &token).await;
    let (answer, _) = device
        .request(
            "c-1",
            &[("iotdps-operation-type", "iotdps-register")],
            br#"{"registrationId":"a-1"}"#,
        )
        .await
        .unwrap();
    assert_eq!(answer["status"], "assigned", "{answer}");
    assert_eq!(
        answer["registrationState"]["assignedHub"],
        json!(dps.hub().0)
    );
    let operation_id = answer["operationId"].as_str().unwrap().to_string();
    let (polled, _) = device
        .request(
            "c-2",
            &[
                ("iotdps-operation-type", "iotdps-get-operationstatus"),
                ("iotdps-operation-id", &operation_id),
            ],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(polled["status"], "assigned", "{polled}");
    // A malformed request: rejected as an argument error, the connection stays usable.
    let e = device
        .request("c-3", &[("iotdps-operation-type", "iotdps-nothing")], b"")
        .await
        .unwrap_err();
    assert_eq!(
        e.condition,
        ErrorCondition::Custom("com.microsoft:argument-error".into())
    );
    assert_eq!(dps_error(&e)["errorCode"], 400015, "{e:?}");
    device.close().await;

    // Refusals carry the DPS codes of the other transports.
    for (what, scope_used, id, token, code) in [
        (
            "wrong key",
            scope.as_str(),
            "a-2",
            device_token(&scope, "a-2", &dk, now() + 60),
            401005,
        ),
        (
            "expired",
            scope.as_str(),
            "a-1",
            device_token(&scope, "a-1", &dk, now() - 3600),
            401003,
        ),
        (
            "unknown scope",
            "0neFFFFFFFF",
            "a-1",
            device_token("0neFFFFFFFF", "a-1", &dk, now() + 60),
            401004,
        ),
    ] {
        let mut device = Device::connect(&dps, amqp, scope_used, id, &token).await;
        let e = device
            .request("r", &[("iotdps-operation-type", "iotdps-register")], b"")
            .await
            .unwrap_err();
        assert_eq!(
            e.condition,
            ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
            "{what}"
        );
        let body = dps_error(&e);
        assert_eq!(body["errorCode"], code, "{what}: {body}");
        for field in ["trackingId", "message", "timestampUtc"] {
            assert!(body[field].is_string(), "{what}: {body}");
        }
        // The unauthenticated connection is closed after the rejection.
        let closed =
            tokio::time::timeout(Duration::from_secs(5), device.connection.on_close()).await;
        assert!(
            closed.is_ok(),
            "{what}: the server kept the connection open"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_link_for_another_device_or_no_sasl_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let amqp = server.amqp_addrs[0];
    let scope = dps.info.id_scope.clone();

    // SASL user for one device, link for another: the connection is closed with an error.
    let mut connection = Connection::builder()
        .container_id("device")
        .hostname("127.0.0.1")
        .sasl_profile(SaslProfile::Plain {
            username: format!("{scope}/registrations/dev-a"),
            password: "SharedAccessSignature sr=x&sig=y&se=1".into(),
        })
        .open_with_stream(tls(&dps, amqp).await)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let _ = Receiver::attach(
        &mut session,
        "recv",
        format!("{scope}/registrations/dev-b").as_str(),
    )
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), connection.on_close())
        .await
        .expect("closed in time");
    let err = closed.unwrap_err();
    assert!(format!("{err:?}").contains("UnauthorizedAccess"), "{err:?}");

    // Plain AMQP (no SASL) without a client certificate: the server answers with the SASL
    // header (authentication required) and closes.
    let mut stream = tls(&dps, amqp).await;
    stream.write_all(b"AMQP\x00\x01\x00\x00").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .ok();
    assert_eq!(answer, b"AMQP\x03\x01\x00\x00");
    server.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_amqp_connections_hold_their_address_slot_until_the_open_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config {
        max_unauthenticated_per_address: 1,
        // The AMQP open deadline (header to first link).
        mqtt_connect_timeout_ms: 700,
        ..common::config(dir.path(), "127.0.0.1")
    })
    .await
    .unwrap();
    let dps = Dps::new(&server.connection);
    let amqp = server.amqp_addrs[0];
    let scope = dps.info.id_scope.clone();
    let (_, g) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/u",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
        )
        .await;
    let key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let register = |id: &'static str| {
        let dk = derive_device_key(&key, id).unwrap();
        let token = device_token(&scope, id, &dk, now() + 60);
        let (dps, scope) = (&dps, scope.clone());
        async move {
            let mut device = Device::connect(dps, amqp, &scope, id, &token).await;
            let (answer, _) = device
                .request("c", &[("iotdps-operation-type", "iotdps-register")], b"")
                .await
                .unwrap();
            assert_eq!(answer["status"], "assigned", "{answer}");
            device
        }
    };

    // An authenticated device no longer counts: with one slot per address, a second device
    // from the same address registers while the first stays connected.
    let first = register("u-1").await;
    let second = register("u-2").await;
    first.close().await;
    second.close().await;

    // A connection that never speaks AMQP holds the slot: another from its address is closed
    // at accept, until the open deadline closes the silent one.
    let mut silent = tls(&dps, amqp).await;
    // Closed at accept: the TLS handshake fails, or the stream ends at once.
    let mut refused = try_tls(&dps, amqp).await.ok();
    if let Some(s) = refused.as_mut() {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "a second slot was granted");
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the silent connection outlived the open deadline"
    );
    // The slot is free again.
    register("u-3").await.close().await;
    server.shutdown().await;
}
