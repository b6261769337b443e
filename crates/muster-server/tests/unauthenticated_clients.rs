//! Anonymous and slow clients cannot hold the server: against a small `max-connections`,
//! MQTT connections with a bogus SAS, TLS connections that never send a request, slowloris
//! headers and bare TCP connections are closed by their deadlines, one source address cannot
//! take the slots of many, and a real device still registers meanwhile.
//!
//! The attackers connect from 127.0.0.25 (loopback), the device from 127.0.0.1.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::{device_token, now, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use muster_server::{Config, Server};
use reqwest::Method;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;

const ATTACKER: [u8; 4] = [127, 0, 0, 25];
const DEVICE: [u8; 4] = [127, 0, 0, 1];

fn config(dir: &std::path::Path) -> Config {
    Config {
        max_connections: 8,
        ..common::config(dir, "127.0.0.1")
    }
}

async fn tcp_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    socket.connect(to).await
}

fn tls_connector(dps: &Dps) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(dps.info.ca_certificate.as_ref().unwrap()).unwrap();
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
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// TLS from `source`; `None` when the server closed the connection instead, or left it
/// waiting for a free slot for over a second.
async fn tls_from(dps: &Dps, source: [u8; 4], to: SocketAddr) -> Option<TlsStream<TcpStream>> {
    let tcp = tcp_from(source, to).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(
        Duration::from_secs(1),
        tls_connector(dps).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()
}

fn connect_packet(scope: &str, registration_id: &str, password: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let mut connect = Connect::new(registration_id);
    // 65535 s: without a cap, 1.5 × that (27 hours) before the server gives up.
    connect.keep_alive = u16::MAX;
    connect.set_login(
        format!("{scope}/registrations/{registration_id}/api-version=2019-03-31"),
        password,
    );
    connect.write(&mut out).unwrap();
    out
}

fn register_packets() -> BytesMut {
    let mut out = BytesMut::new();
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
    out
}

/// Reads packets until a response publish arrives; (status, payload), or `None` when the
/// connection closed first or nothing came before `deadline`.
async fn mqtt_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Option<(u16, Value)> {
    loop {
        while let Ok(packet) = Packet::read(buf, 1 << 20) {
            if let Packet::Publish(p) = packet {
                let status = p
                    .topic
                    .strip_prefix("$dps/registrations/res/")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|s| s.parse().ok())?;
                return Some((status, serde_json::from_slice(&p.payload).ok()?));
            }
        }
        match timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// An MQTT connection from `source` that sent CONNECT with `password` and got CONNACK 0.
async fn mqtt_connected(
    dps: &Dps,
    source: [u8; 4],
    to: SocketAddr,
    registration_id: &str,
    password: &str,
) -> Option<TlsStream<TcpStream>> {
    let mut tls = tls_from(dps, source, to).await?;
    let connect = connect_packet(&dps.info.id_scope, registration_id, password);
    tls.write_all(&connect).await.ok()?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut connack))
        .await
        .ok()?
        .ok()?;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    Some(tls)
}

/// A device registering over MQTT from 127.0.0.1; (status, body) or `None` when it could not
/// get an answer before `deadline`.
async fn device_registers_over_mqtt(
    dps: &Dps,
    mqtt: SocketAddr,
    registration_id: &str,
    token: &str,
    deadline: Instant,
) -> Option<(u16, Value)> {
    timeout_at(deadline, async {
        let mut tls = mqtt_connected(dps, DEVICE, mqtt, registration_id, token).await?;
        tls.write_all(&register_packets()).await.ok()?;
        mqtt_response(&mut tls, &mut BytesMut::new(), deadline).await
    })
    .await
    .ok()
    .flatten()
}

/// Whether the server closes `stream` before `deadline` (end of stream or a reset).
async fn closed_by<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A symmetric-key group and a token for `registration_id` derived from it.
async fn device_credentials(dps: &Dps, registration_id: &str) -> String {
    let (status, group) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/line",
            Some(json!({"attestation": {"type": "symmetricKey"}})),
        )
        .await;
    assert!(status == 200 || status == 201, "{group}");
    let key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let device_key = derive_device_key(&key, registration_id).unwrap();
    device_token(
        &dps.info.id_scope,
        registration_id,
        &device_key,
        now() + 600,
    )
}

/// Writes `head` one byte at a time, 100 ms apart, until the server closes the connection;
/// true when it did before `deadline`.
async fn slowloris<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    head: &'static [u8],
    deadline: Instant,
) -> bool {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let trickle = async move {
        for b in head.iter().cycle() {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        closed = closed_by(&mut rd, deadline) => closed,
        () = trickle => true,
    }
}

const SLOW_HEAD: &[u8] =
    b"PUT /0ne00000000/registrations/x/register?api-version=2021-06-01 HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

const SLOW_BODY: &[u8] = b"PUT /0ne00000000/registrations/x/register?api-version=2021-06-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{";

#[tokio::test]
async fn anonymous_and_slow_connections_are_closed_by_their_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config {
        // Deadlines short enough for a test; the per-address limit out of the way, so only
        // the deadlines free the slots here.
        max_unauthenticated_per_address: 1000,
        tls_handshake_timeout_ms: 500,
        http_header_timeout_ms: 500,
        http_idle_timeout_ms: 800,
        mqtt_connect_timeout_ms: 500,
        mqtt_auth_timeout_ms: 700,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let dps = Dps::new(&server.connection);
    let (mqtt, https) = (server.mqtt_addrs[0], server.https_addrs[0]);
    let token = device_credentials(&dps, "dev-1").await;
    let bogus = device_token(&dps.info.id_scope, "anon", "AAAA", now() + 600);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(4);

    // A bogus SAS that asks to register: answered 401, then closed.
    let mut asked = mqtt_connected(&dps, ATTACKER, mqtt, "anon", &bogus)
        .await
        .unwrap();
    asked.write_all(&register_packets()).await.unwrap();
    let (status, body) = mqtt_response(&mut asked, &mut BytesMut::new(), deadline)
        .await
        .expect("an answer to the bogus register");
    assert_eq!(status, 401, "{body}");
    assert!(closed_by(&mut asked, deadline).await, "closed after a 401");

    // Every one of the MQTT listener's 8 slots held by an anonymous or idle client.
    let mut mqtt_held = Vec::new();
    for i in 0..4 {
        let c = mqtt_connected(&dps, ATTACKER, mqtt, &format!("anon-{i}"), &bogus).await;
        mqtt_held.push(("bogus SAS, no request", Box::new(c.unwrap()) as Box<dyn Io>));
    }
    for _ in 0..2 {
        let c = tls_from(&dps, ATTACKER, mqtt).await.unwrap();
        mqtt_held.push(("TLS, no CONNECT", Box::new(c)));
    }
    for _ in 0..2 {
        let c = tcp_from(ATTACKER, mqtt).await.unwrap();
        mqtt_held.push(("TCP, no TLS", Box::new(c)));
    }

    // The device gets a slot only as the deadlines free them.
    let (status, body) = device_registers_over_mqtt(&dps, mqtt, "dev-1", &token, deadline)
        .await
        .expect("the device registers over MQTT while anonymous clients connect");
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("assigned")),
        "{body}"
    );

    for (what, mut c) in mqtt_held {
        assert!(closed_by(&mut c, deadline).await, "MQTT {what}: still open");
    }

    // HTTPS: a TLS connection that never sends a request, slowloris headers, and a kept-alive
    // connection left idle after one request.
    let mut tls_idle = tls_from(&dps, ATTACKER, https).await.unwrap();
    let slow = tls_from(&dps, ATTACKER, https).await.unwrap();
    let mut kept = tls_from(&dps, ATTACKER, https).await.unwrap();
    kept.write_all(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");
    let deadline = Instant::now() + Duration::from_secs(3);
    assert!(
        slowloris(slow, SLOW_HEAD, deadline).await,
        "slowloris headers: still open"
    );
    assert!(
        closed_by(&mut tls_idle, deadline).await,
        "TLS idle: still open"
    );
    assert!(
        closed_by(&mut kept, deadline).await,
        "keep-alive idle: still open"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    server.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_take_the_slots_of_many() {
    let dir = tempfile::tempdir().unwrap();
    // Deadlines far beyond the test: only the per-address limit keeps slots free.
    let server = Server::start(Config {
        max_unauthenticated_per_address: 3,
        tls_handshake_timeout_ms: 60_000,
        http_header_timeout_ms: 60_000,
        mqtt_connect_timeout_ms: 60_000,
        mqtt_auth_timeout_ms: 60_000,
        ..config(dir.path())
    })
    .await
    .unwrap();
    let dps = Dps::new(&server.connection);
    let (mqtt, https) = (server.mqtt_addrs[0], server.https_addrs[0]);
    let token = device_credentials(&dps, "dev-2").await;
    let bogus = device_token(&dps.info.id_scope, "anon", "AAAA", now() + 600);

    // Ten of each from one address, more than either listener's 8 slots. First complete
    // request heads whose body never comes, then the rest.
    let mut attackers: Vec<Box<dyn Io>> = Vec::new();
    for _ in 0..10 {
        if let Some(mut c) = tls_from(&dps, ATTACKER, https).await {
            let _ = c.write_all(SLOW_BODY).await;
            attackers.push(Box::new(c));
        }
    }
    for i in 0..10 {
        if let Some(c) = mqtt_connected(&dps, ATTACKER, mqtt, &format!("a-{i}"), &bogus).await {
            attackers.push(Box::new(c));
        }
        if let Ok(c) = tcp_from(ATTACKER, mqtt).await {
            attackers.push(Box::new(c));
        }
        if let Some(mut c) = tls_from(&dps, ATTACKER, https).await {
            let _ = c.write_all(&SLOW_HEAD[..20]).await;
            attackers.push(Box::new(c));
        }
        if let Ok(c) = tcp_from(ATTACKER, https).await {
            attackers.push(Box::new(c));
        }
    }

    let deadline = Instant::now() + Duration::from_secs(4);
    let (status, body) = device_registers_over_mqtt(&dps, mqtt, "dev-2", &token, deadline)
        .await
        .expect("the device registers over MQTT while one address floods the server");
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("assigned")),
        "{body}"
    );
    // A new client: a fresh connection, not one pooled from before the flood.
    let device = Dps::new(&server.connection);
    let (status, _, body) = tokio::time::timeout_at(
        deadline,
        device.register("dev-2", &token, json!({"registrationId": "dev-2"})),
    )
    .await
    .expect("the device registers over HTTPS while one address floods the server");
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("assigned")),
        "{body}"
    );
    drop(attackers);
    server.shutdown().await;
}

/// A client connection of any kind.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
