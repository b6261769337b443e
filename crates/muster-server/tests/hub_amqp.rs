//! The built-in hub's devices over AMQP on a real server (TLS on the AMQP port, no SASL, a CBS
//! put-token), driven by fe2o3-amqp's client: a wrong token is refused with status 401 and
//! the connection closed; with the right one, telemetry is stored and cloud-to-device
//! messages are delivered, abandoned ones again, completed ones once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{policy_token, start, Dps};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use muster_proto::SasToken;
use serde_json::json;

async fn tls(
    dps: &Dps,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
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
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

struct Hub {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
}

/// Opens a connection without SASL and sends one put-token; returns the connection and the
/// reply's `status-code`.
async fn put_token(
    dps: &Dps,
    addr: std::net::SocketAddr,
    audience: &str,
    token: &str,
) -> (Hub, i64) {
    let mut connection = Connection::builder()
        .container_id("hub-device")
        .hostname("127.0.0.1")
        .open_with_stream(tls(dps, addr).await)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut sender = Sender::attach(&mut session, "cbs-send", "$cbs")
        .await
        .unwrap();
    let mut receiver = Receiver::attach(&mut session, "cbs-recv", "$cbs")
        .await
        .unwrap();
    let mut app = ApplicationProperties::default();
    for (k, v) in [
        ("operation", "put-token"),
        ("type", "servicebus.windows.net:sastoken"),
        ("name", audience),
    ] {
        app.0.insert(k.into(), SimpleValue::String(v.into()));
    }
    let request = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String("put-1".into())),
            reply_to: Some("cbs".into()),
            ..Default::default()
        })
        .application_properties(app)
        .value(token.to_string())
        .build();
    sender.send(request).await.unwrap();
    let reply: Delivery<Body<Value>> =
        tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await
            .expect("answered in time")
            .unwrap();
    receiver.accept(&reply).await.unwrap();
    let m = reply.message();
    assert_eq!(
        m.properties.as_ref().and_then(|p| p.correlation_id.clone()),
        Some(MessageId::String("put-1".into()))
    );
    let status = match m
        .application_properties
        .as_ref()
        .unwrap()
        .0
        .get("status-code")
    {
        Some(SimpleValue::Int(s)) => i64::from(*s),
        other => panic!("status-code {other:?}"),
    };
    (
        Hub {
            connection,
            session,
        },
        status,
    )
}

async fn next(c2d: &mut Receiver) -> Delivery<Body<Value>> {
    tokio::time::timeout(Duration::from_secs(10), c2d.recv::<Body<Value>>())
        .await
        .expect("delivered in time")
        .unwrap()
}

fn body_text(delivery: &Delivery<Body<Value>>) -> String {
    match delivery.body() {
        Body::Data(d) => String::from_utf8(d.iter().flat_map(|s| s.0.to_vec()).collect()).unwrap(),
        other => panic!("body {other:?}"),
    }
}

#[tokio::test]
async fn cbs_authentication_telemetry_and_cloud_to_device_over_amqp() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (hub, hub_cs) = dps.hub();
    let amqp = server.amqp_addrs[0];
    let r = dps
        .http
        .put(format!(
            "https://{hub}/devices/amqp-dev?api-version=2021-04-12"
        ))
        .header("authorization", policy_token(&hub_cs))
        .json(&json!({"deviceId": "amqp-dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let device: serde_json::Value = r.json().await.unwrap();
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let audience = format!("{hub}/devices/amqp-dev");
    let expiry = common::now() + 600;

    // A token signed with another key: 401, then the connection is closed.
    let wrong = SasToken::generate(&audience, &[7u8; 32], None, expiry);
    let (mut refused, status) = put_token(&dps, amqp, &audience, &wrong).await;
    assert_eq!(status, 401);
    let closed = tokio::time::timeout(Duration::from_secs(5), refused.connection.on_close())
        .await
        .expect("closed in time");
    assert!(
        format!("{closed:?}").contains("UnauthorizedAccess"),
        "{closed:?}"
    );

    // The device's own token.
    let token = SasToken::generate(&audience, &B64.decode(&key).unwrap(), None, expiry);
    let (mut device, status) = put_token(&dps, amqp, &audience, &token).await;
    assert_eq!(status, 200);

    // Telemetry is stored with its properties, then accepted.
    let mut events = Sender::attach(
        &mut device.session,
        "events",
        "/devices/amqp-dev/messages/events",
    )
    .await
    .unwrap();
    let mut app = ApplicationProperties::default();
    app.0
        .insert("alert".into(), SimpleValue::String("high".into()));
    let event = Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String("m-1".into())),
            ..Default::default()
        })
        .application_properties(app)
        .data(Binary::from(b"{\"t\":21}".to_vec()))
        .build();
    assert!(matches!(
        events.send(event).await.unwrap(),
        Outcome::Accepted(_)
    ));
    let (status, stored) = dps.hub_call(&hub_cs, "/devices/amqp-dev/telemetry").await;
    assert_eq!(status, 200);
    assert_eq!(stored[0]["body"], "{\"t\":21}");
    assert_eq!(stored[0]["properties"]["alert"], "high");
    assert_eq!(stored[0]["systemProperties"]["messageId"], "m-1");

    // Cloud-to-device: released comes again, accepted is deleted and the next follows.
    for body in ["first", "second"] {
        let r = dps
            .http
            .post(format!(
                "https://{hub}/devices/amqp-dev/messages/cloudToDevice?api-version=2021-04-12"
            ))
            .header("authorization", policy_token(&hub_cs))
            .header("iothub-messageid", format!("c2d-{body}"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let mut c2d = Receiver::attach(
        &mut device.session,
        "c2d",
        "/devices/amqp-dev/messages/devicebound",
    )
    .await
    .unwrap();
    let first = next(&mut c2d).await;
    assert_eq!(body_text(&first), "first");
    assert_eq!(
        first.message().properties.as_ref().unwrap().message_id,
        Some(MessageId::String("c2d-first".into()))
    );
    c2d.release(&first).await.unwrap();
    let again = next(&mut c2d).await;
    assert_eq!(body_text(&again), "first");
    c2d.accept(&again).await.unwrap();
    let second = next(&mut c2d).await;
    assert_eq!(body_text(&second), "second");
    c2d.accept(&second).await.unwrap();

    // A link naming another device closes the connection.
    let _ = Sender::attach(
        &mut device.session,
        "other",
        "/devices/someone-else/messages/events",
    )
    .await;
    let closed = tokio::time::timeout(Duration::from_secs(5), device.connection.on_close())
        .await
        .expect("closed in time");
    assert!(
        format!("{closed:?}").contains("UnauthorizedAccess"),
        "{closed:?}"
    );

    // Completed messages are gone: a new connection gets nothing but what is sent next.
    let (mut device, status) = put_token(&dps, amqp, &audience, &token).await;
    assert_eq!(status, 200);
    let mut c2d = Receiver::attach(
        &mut device.session,
        "c2d",
        "/devices/amqp-dev/messages/devicebound",
    )
    .await
    .unwrap();
    let r = dps
        .http
        .post(format!(
            "https://{hub}/devices/amqp-dev/messages/cloudToDevice?api-version=2021-04-12"
        ))
        .header("authorization", policy_token(&hub_cs))
        .body("third")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let third = next(&mut c2d).await;
    assert_eq!(body_text(&third), "third");
    c2d.accept(&third).await.unwrap();
    drop(c2d);
    let _ = device.connection.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_hub_connection_that_never_authenticates_is_closed_at_the_auth_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = muster_server::Server::start(muster_server::Config {
        mqtt_auth_timeout_ms: 700,
        ..common::config(dir.path(), "127.0.0.1")
    })
    .await
    .unwrap();
    let dps = Dps::new(&server.connection);
    let amqp = server.amqp_addrs[0];
    // Opens and attaches `$cbs` (a hub connection) but never puts a token.
    let mut connection = Connection::builder()
        .container_id("silent")
        .hostname("127.0.0.1")
        .open_with_stream(tls(&dps, amqp).await)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let _cbs = Sender::attach(&mut session, "cbs-send", "$cbs")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.on_close())
        .await
        .expect("closed by the server");
    assert!(
        format!("{closed:?}").contains("not authenticated in time"),
        "{closed:?}"
    );
    server.shutdown().await;
}
