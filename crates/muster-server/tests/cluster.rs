//! Two Muster nodes on one PostgreSQL database (a throwaway cluster from `scripts/pg.sh`;
//! skipped only when `MUSTER_PG_OPTIONAL=1` and PostgreSQL is not installed): a device
//! connected over MQTT to node A is reached by service calls made on node B (direct method,
//! cloud-to-device message), its telemetry shows on B's live stream, and a registration made
//! on A shows on B's registration stream.
//!
//! The nodes announce one name, `muster.cluster.test`, on one HTTPS port (so the built-in
//! hub's name, and the SAS audiences, are the same on both), each bound to its own loopback
//! address: A on 127.0.0.32, B on 127.0.0.42 (`MUSTER_CLUSTER_HOST_B`). The clients resolve
//! the name to the node they mean, so which node serves what is certain. B uses A's local CA,
//! so one trust store covers both.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use common::{config, device_token, now, policy_token};
use muster_attestation::symmetric_key::derive_device_key;
use muster_proto::runtime::{OsEntropy, SystemClock};
use muster_proto::SasToken;
use muster_server::{Config, Server};
use muster_store::test_cluster::PgCluster;
use muster_store::PostgresStore;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

const NAME: &str = "muster.cluster.test";

fn host(var: &str, default: &str) -> IpAddr {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .parse()
        .expect("an IP address")
}

async fn node(config: Config, url: &str, key: &std::path::Path) -> Server {
    let store = PostgresStore::open(url, key).await.expect("open the store");
    Server::start_on_store(
        config,
        Arc::new(SystemClock),
        Arc::new(OsEntropy),
        Arc::new(store),
    )
    .await
    .expect("the node starts")
}

/// An HTTPS client that reaches [`NAME`] at `addr`, trusting `ca`.
fn client_for(ca: &std::path::Path, addr: SocketAddr) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve(NAME, addr)
        .build()
        .unwrap()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A raw MQTT 3.1.1 device connection over TLS.
struct Device {
    tls: Tls,
    buf: BytesMut,
}

impl Device {
    async fn connect(
        ca: &std::path::Path,
        addr: SocketAddr,
        hub: &str,
        id: &str,
        key: &str,
    ) -> Self {
        let pem = std::fs::read(ca).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(NAME).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let mut d = Device {
            tls,
            buf: BytesMut::new(),
        };
        let token = SasToken::generate(
            &format!("{hub}/devices/{id}"),
            &B64.decode(key).unwrap(),
            None,
            now() + 3600,
        );
        let mut c = Connect::new(id);
        c.keep_alive = 60;
        c.login = Some(rumqttc::mqttbytes::v4::Login::new(
            format!("{hub}/{id}/?api-version=2021-04-12"),
            token,
        ));
        d.send(Packet::Connect(c)).await;
        match d.recv().await {
            Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        d
    }

    async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        self.tls.write_all(&b).await.unwrap();
    }

    async fn recv(&mut self) -> Packet {
        loop {
            if let Ok(p) = Packet::read(&mut self.buf, 1 << 20) {
                return p;
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.tls.read_buf(&mut self.buf))
                .await
                .expect("timed out waiting for the hub")
                .unwrap();
            assert!(n > 0, "the hub closed the connection");
        }
    }

    async fn recv_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Packet::Publish(p) => return p,
                Packet::PingResp | Packet::PubAck(_) => {}
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }
}

/// Reads SSE events from `resp` until one's data satisfies `want`, or the deadline passes.
async fn next_event(
    resp: &mut reqwest::Response,
    buffer: &mut String,
    deadline: Instant,
    want: impl Fn(&Value) -> bool,
) -> Option<Value> {
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            if let Ok(value) = serde_json::from_str::<Value>(data.trim_start()) {
                if want(&value) {
                    return Some(value);
                }
            }
        }
        let chunk = timeout_at(deadline, resp.chunk()).await.ok()?.ok()??;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_node_a_is_reached_through_node_b() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let url = cluster.create_database("two_nodes").await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("store.key");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ip_a, ip_b) = (
        host("MUSTER_PG_HOST", "127.0.0.1"),
        host("MUSTER_CLUSTER_HOST_B", "127.0.0.42"),
    );

    let a = node(
        Config {
            listen: vec![ip_a.to_string()],
            ..config(dir_a.path(), NAME)
        },
        &url,
        &key,
    )
    .await;
    let port = a.https_addrs[0].port();
    std::fs::create_dir_all(dir_b.path()).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(dir_a.path().join(f), dir_b.path().join(f)).unwrap();
    }
    let b = node(
        Config {
            listen: vec![ip_b.to_string()],
            https_port: port,
            ..config(dir_b.path(), NAME)
        },
        &url,
        &key,
    )
    .await;
    let ca = a.connection.ca_certificate.clone().unwrap();
    let (hub, hub_cs) = (
        a.connection.hubs[0].host_name.clone(),
        a.connection.hubs[0].connection_string.clone(),
    );
    assert_eq!(b.connection.hubs[0].host_name, hub, "one hub name");
    let (http_a, http_b) = (
        client_for(&ca, a.https_addrs[0]),
        client_for(&ca, b.https_addrs[0]),
    );
    let v = "api-version=2021-04-12";
    let hub_token = policy_token(&hub_cs);

    // Node B's live streams, opened before anything happens.
    let mut telemetry = http_b
        .get(format!("https://{hub}/devices/dev-1/telemetry/stream?{v}"))
        .header("authorization", &hub_token)
        .send()
        .await
        .unwrap();
    assert_eq!(telemetry.status(), 200);
    let owner = policy_token(&a.connection.service_connection_string);
    let mut registrations = http_b
        .get(format!(
            "https://{NAME}:{port}/events/registrations?api-version=2021-10-01"
        ))
        .header("authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(registrations.status(), 200);

    // The device, created through B, connects to A.
    let r = http_b
        .put(format!("https://{hub}/devices/dev-1?{v}"))
        .header("authorization", &hub_token)
        .json(&json!({"deviceId": "dev-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let device: Value = r.json().await.unwrap();
    let device_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let mut d = Device::connect(&ca, a.mqtt_addrs[0], &hub, "dev-1", &device_key).await;
    let mut s = Subscribe::new("$iothub/methods/POST/#", QoS::AtMostOnce);
    s.add(
        "devices/dev-1/messages/devicebound/#".into(),
        QoS::AtLeastOnce,
    );
    s.pkid = 1;
    d.send(Packet::Subscribe(s)).await;
    assert!(matches!(d.recv().await, Packet::SubAck(_)));

    // Direct method through B, answered by the device on A.
    let call = http_b
        .post(format!("https://{hub}/twins/dev-1/methods?{v}"))
        .header("authorization", &hub_token)
        .json(
            &json!({"methodName": "reboot", "payload": {"in": 5}, "responseTimeoutInSeconds": 20}),
        )
        .send();
    let answer = async {
        let p = d.recv_publish().await;
        assert!(
            p.topic.starts_with("$iothub/methods/POST/reboot/?$rid="),
            "{}",
            p.topic
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&p.payload).unwrap(),
            json!({"in": 5})
        );
        let rid = p.topic.rsplit('=').next().unwrap().to_string();
        let mut res = Publish::new(
            format!("$iothub/methods/res/201/?$rid={rid}"),
            QoS::AtMostOnce,
            br#"{"done":true}"#.to_vec(),
        );
        res.pkid = 0;
        d.send(Packet::Publish(res)).await;
    };
    let (r, ()) = tokio::join!(call, answer);
    let r = r.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": 201, "payload": {"done": true}})
    );

    // A cloud-to-device message sent on B reaches the device on A at once.
    let r = http_b
        .post(format!(
            "https://{hub}/devices/dev-1/messages/cloudToDevice?{v}"
        ))
        .header("authorization", &hub_token)
        .body("to the device on a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let m = d.recv_publish().await;
    assert_eq!(&m.payload[..], b"to the device on a");
    d.send(Packet::PubAck(PubAck::new(m.pkid))).await;

    // Telemetry sent to A shows on B's stream.
    let mut t = Publish::new(
        "devices/dev-1/messages/events/",
        QoS::AtLeastOnce,
        br#"{"celsius":21}"#.to_vec(),
    );
    t.pkid = 2;
    d.send(Packet::Publish(t)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buffer = String::new();
    let seen = next_event(&mut telemetry, &mut buffer, deadline, |e| {
        e["deviceId"] == "dev-1"
    })
    .await
    .expect("node B streams node A's telemetry");
    assert_eq!(seen["body"], r#"{"celsius":21}"#);

    // A registration made on A shows on B's registration stream.
    let service_a = format!("https://{NAME}:{port}");
    let r = http_a
        .put(format!(
            "{service_a}/enrollmentGroups/line?api-version=2021-10-01"
        ))
        .header("authorization", &owner)
        .json(&json!({"enrollmentGroupId": "line", "attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let group: Value = r.json().await.unwrap();
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let rid = "line-dev-1";
    let dev_key = derive_device_key(group_key, rid).unwrap();
    let scope = &a.connection.id_scope;
    let r = http_a
        .put(format!(
            "{service_a}/{scope}/registrations/{rid}/register?api-version=2021-06-01"
        ))
        .header(
            "authorization",
            device_token(scope, rid, &dev_key, now() + 600),
        )
        .json(&json!({"registrationId": rid}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let mut buffer = String::new();
    let event = next_event(&mut registrations, &mut buffer, deadline, |e| {
        e["registrationId"] == rid
    })
    .await
    .expect("node B streams node A's registration");
    assert_eq!(event["transport"], "https");

    drop((telemetry, registrations));
    a.shutdown().await;
    b.shutdown().await;
}
