//! DPS over MQTT 3.1.1, driven with raw packets (rumqttc's codec) against `serve_connection`
//! on loopback TCP, with a fake registrar.

mod mqtt_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_common::*;
use muster_device_api::mqtt::{serve_connection, MqttLimits};
use muster_device_api::pre_auth::PreAuthHold;
use muster_registration::{DeviceCredential, DeviceRegistrar, DeviceReply};
use rumqttc::mqttbytes::v4::{
    Connect, Login, Packet, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{Protocol, QoS};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

async fn server(registrar: Arc<FakeRegistrar>, limits: MqttLimits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registrar: Arc<dyn DeviceRegistrar> = registrar;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_connection(
                stream,
                registrar.clone(),
                Vec::new(),
                limits.clone(),
                PreAuthHold::none(),
            ));
        }
    });
    addr
}

async fn client(addr: SocketAddr) -> RawClient<TcpStream> {
    RawClient::new(TcpStream::connect(addr).await.unwrap())
}

async fn setup() -> (Arc<FakeRegistrar>, SocketAddr) {
    let fake = FakeRegistrar::new();
    let addr = server(fake.clone(), MqttLimits::default()).await;
    (fake, addr)
}

/// A full register + poll on a fresh connection, proving the server still works.
async fn assert_server_works(addr: SocketAddr) {
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(&format!("{REGISTER_TOPIC}ok"), QoS::AtLeastOnce, 7, b"{}")
        .await;
    let r = c.puback_then_response(7).await;
    assert_eq!(r.topic, "$dps/registrations/res/202/?$rid=ok&retry-after=3");
}

#[tokio::test]
async fn connack_never_reports_a_session() {
    let (_, addr) = setup().await;
    // `connect` sends clean_session = false (as Python does) and checks the exact CONNACK bytes
    // 20 02 00 00: session present 0, return code 0.
    client(addr).await.connect().await;
    let mut c = client(addr).await;
    let mut connect = Connect::new(REG_ID);
    connect.login = Some(Login::new(USERNAME, SAS));
    c.send(Packet::Connect(connect)).await;
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0x20, 0x02, 0x00, 0x00]);
}

#[tokio::test]
async fn subscribe_grants_qos1_to_the_response_filter_only() {
    let (_, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect().await;
    // QoS 1 → 1 (exact bytes checked in `subscribe`).
    c.subscribe().await;
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::ExactlyOnce);
    sub.pkid = 9;
    sub.filters.push(SubscribeFilter::new(
        "devices/x/messages/#".into(),
        QoS::AtLeastOnce,
    ));
    c.send(Packet::Subscribe(sub)).await;
    let (p, raw) = c.packet_raw().await;
    match p {
        Packet::SubAck(ack) => {
            assert_eq!(ack.pkid, 9);
            assert_eq!(
                ack.return_codes,
                [
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(raw, [0x90, 0x04, 0x00, 0x09, 0x01, 0x80]);
}

#[tokio::test]
async fn register_puback_comes_before_the_response() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(
        &format!("{REGISTER_TOPIC}abc"),
        QoS::AtLeastOnce,
        2,
        br#"{"payload": null, "registrationId": "my-device-01"}"#,
    )
    .await;
    let r = c.puback_then_response(2).await;
    assert_eq!(
        r.topic,
        "$dps/registrations/res/202/?$rid=abc&retry-after=3"
    );
    assert_eq!(json_of(&r)["status"], "assigning");
    assert_eq!(json_of(&r)["operationId"], "op-1");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let Recorded::Register(req) = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!(req.id_scope, SCOPE);
    assert_eq!(req.registration_id, REG_ID);
    assert_eq!(req.credential, DeviceCredential::Sas(SAS.into()));
    assert_eq!(req.body.registration_id.as_deref(), Some(REG_ID));
}

#[tokio::test]
async fn poll_passes_the_operation_id() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(
        &format!("{STATUS_TOPIC}xyz&operationId=5.3a8f-1"),
        QoS::AtLeastOnce,
        3,
        b" ",
    )
    .await;
    let r = c.puback_then_response(3).await;
    assert_eq!(r.topic, "$dps/registrations/res/200/?$rid=xyz");
    assert_eq!(
        json_of(&r)["registrationState"]["assignedHub"],
        "hub.example"
    );
    let reqs = fake.requests();
    let Recorded::Status(req) = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!(req.operation_id, "5.3a8f-1");
    assert_eq!(req.registration_id, REG_ID);
    assert_eq!(req.id_scope, SCOPE);
    assert_eq!(req.credential, DeviceCredential::Sas(SAS.into()));
}

#[tokio::test]
async fn python_quoted_rid_is_echoed_verbatim() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(
        &format!("{STATUS_TOPIC}7d9e%2D1&operationId=op%2E2"),
        QoS::AtLeastOnce,
        4,
        b" ",
    )
    .await;
    let r = c.puback_then_response(4).await;
    assert_eq!(r.topic, "$dps/registrations/res/200/?$rid=7d9e%2D1");
    let Recorded::Status(req) = &fake.requests()[0] else {
        panic!()
    };
    assert_eq!(req.operation_id, "op.2");
}

#[tokio::test]
async fn qos0_requests_are_answered_without_puback() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    // The C SDK publishes at QoS 0 and sends the register JSON again on polls.
    c.publish(
        &format!("{REGISTER_TOPIC}1"),
        QoS::AtMostOnce,
        0,
        br#"{"registrationId":"my-device-01"}"#,
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.topic, "$dps/registrations/res/202/?$rid=1&retry-after=3");
    c.publish(
        &format!("{STATUS_TOPIC}2&operationId=op-1"),
        QoS::AtMostOnce,
        0,
        br#"{"registrationId":"my-device-01"}"#,
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.topic, "$dps/registrations/res/200/?$rid=2");
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn empty_register_payload_is_an_empty_registration() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    // C# sends 0 bytes.
    c.publish(&format!("{REGISTER_TOPIC}1"), QoS::AtLeastOnce, 1, b"")
        .await;
    let r = c.puback_then_response(1).await;
    assert!(r.topic.starts_with("$dps/registrations/res/202/"));
    let Recorded::Register(req) = &fake.requests()[0] else {
        panic!()
    };
    assert_eq!(req.body, Default::default());
    assert_eq!(req.registration_id, REG_ID);
}

#[tokio::test]
async fn invalid_json_payload_gets_400() {
    let (fake, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(
        &format!("{REGISTER_TOPIC}bad"),
        QoS::AtLeastOnce,
        5,
        b"{not json",
    )
    .await;
    let r = c.puback_then_response(5).await;
    assert_eq!(r.topic, "$dps/registrations/res/400/?$rid=bad");
    let body = json_of(&r);
    assert_eq!(body["errorCode"], 400001);
    assert!(body["trackingId"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["message"].is_string());
    assert!(body["timestampUtc"].is_string());
    assert!(fake.requests().is_empty());
    // The connection stays usable.
    c.publish(&format!("{REGISTER_TOPIC}good"), QoS::AtLeastOnce, 6, b"")
        .await;
    let r = c.puback_then_response(6).await;
    assert!(r.topic.starts_with("$dps/registrations/res/202/?$rid=good"));
}

#[tokio::test]
async fn ping_gets_pingresp() {
    let (_, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect().await;
    c.send(Packet::PingReq).await;
    let (p, raw) = c.packet_raw().await;
    assert_eq!(p, Packet::PingResp);
    assert_eq!(raw, [0xD0, 0x00]);
}

#[tokio::test]
async fn unsubscribe_is_acknowledged_and_disconnect_closes() {
    let (_, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    let mut u = Unsubscribe::new("$dps/registrations/res/#");
    u.pkid = 12;
    c.send(Packet::Unsubscribe(u)).await;
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0xB0, 0x02, 0x00, 0x0C]);
    c.send(Packet::Disconnect).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn x509_and_missing_credentials() {
    let fake = FakeRegistrar::new();
    let registrar: Arc<dyn DeviceRegistrar> = fake.clone();
    for (certs, expected) in [
        (
            vec![vec![1u8, 2], vec![3]],
            DeviceCredential::X509 {
                chain: vec![vec![1, 2], vec![3]],
            },
        ),
        (vec![], DeviceCredential::None),
    ] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve_connection(
            b,
            registrar.clone(),
            certs,
            MqttLimits::default(),
            PreAuthHold::none(),
        ));
        let mut c = RawClient::new(a);
        let mut connect = Connect::new(REG_ID);
        connect.login = Some(Login::new(USERNAME, ""));
        c.send(Packet::Connect(connect)).await;
        let (_, raw) = c.packet_raw().await;
        assert_eq!(raw, [0x20, 0x02, 0x00, 0x00]);
        c.subscribe().await;
        c.publish(&format!("{REGISTER_TOPIC}1"), QoS::AtLeastOnce, 1, b"")
            .await;
        c.puback_then_response(1).await;
        let reqs = fake.requests();
        let Recorded::Register(req) = reqs.last().unwrap() else {
            panic!()
        };
        assert_eq!(req.credential, expected);
    }
}

#[tokio::test]
async fn connect_refusals() {
    let (_, addr) = setup().await;
    let cases: [(&str, Option<&str>, Protocol, u8); 4] = [
        // client id ≠ registration id → 2
        ("someone-else", Some(USERNAME), Protocol::V4, 2),
        // username not `{scope}/registrations/{id}/…` → 4
        (REG_ID, Some("my-device-01"), Protocol::V4, 4),
        // no username → 4
        (REG_ID, None, Protocol::V4, 4),
        // protocol level 5 → 1
        (REG_ID, Some(USERNAME), Protocol::V5, 1),
    ];
    for (client_id, username, protocol, code) in cases {
        let mut c = client(addr).await;
        let mut connect = Connect::new(client_id);
        connect.protocol = protocol;
        connect.login = username.map(|u| Login::new(u, SAS));
        c.send(Packet::Connect(connect)).await;
        let (p, raw) = c.packet_raw().await;
        assert_eq!(
            raw,
            [0x20, 0x02, 0x00, code],
            "{client_id} {username:?} {p:?}"
        );
        c.expect_closed().await;
    }
    // MQTT 3.1 (`MQIsdp`, level 3) → 1
    let mut c = client(addr).await;
    let mut v31 = vec![0x10, 0x00, 0x00, 0x06];
    v31.extend_from_slice(b"MQIsdp");
    v31.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x01, b'x']);
    v31[1] = (v31.len() - 2) as u8;
    c.send_raw(&v31).await;
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0x20, 0x02, 0x00, 0x01]);
    c.expect_closed().await;
}

#[tokio::test]
async fn first_packet_must_be_connect_in_time() {
    let fake = FakeRegistrar::new();
    let addr = server(
        fake,
        MqttLimits {
            connect_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    let mut c = client(addr).await;
    c.send(Packet::PingReq).await;
    c.expect_closed().await;
    let mut c = client(addr).await;
    let start = Instant::now();
    c.expect_closed().await;
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn keep_alive_is_enforced() {
    let (_, addr) = setup().await;
    let mut c = client(addr).await;
    let mut connect = Connect::new(REG_ID);
    connect.keep_alive = 1;
    connect.login = Some(Login::new(USERNAME, SAS));
    c.send(Packet::Connect(connect)).await;
    c.packet().await;
    let start = Instant::now();
    c.expect_closed().await;
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let fake = FakeRegistrar::new();
    let addr = server(
        fake,
        MqttLimits {
            max_packet_size: 4096,
            ..Default::default()
        },
    )
    .await;
    // A healthy connection, open during all of the below.
    let mut healthy = client(addr).await;
    healthy.connect_and_subscribe().await;

    // Garbage before CONNECT.
    let mut c = client(addr).await;
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    c.expect_closed().await;

    // Garbage after CONNECT: packet type 0 and a malformed remaining length.
    for garbage in [&[0x00u8, 0x00][..], &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]] {
        let mut c = client(addr).await;
        c.connect_and_subscribe().await;
        c.send_raw(garbage).await;
        c.expect_closed().await;
    }

    // A publish whose topic length crosses the packet boundary.
    let mut c = client(addr).await;
    c.connect().await;
    c.send_raw(&[0x30, 0x03, 0x00, 0x10, b'a']).await;
    c.expect_closed().await;

    // Oversized: refused from the fixed header, before the body arrives.
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(
        &format!("{REGISTER_TOPIC}big"),
        QoS::AtLeastOnce,
        1,
        &vec![b' '; 8192],
    )
    .await;
    c.expect_closed().await;

    // QoS 2 publish.
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(&format!("{REGISTER_TOPIC}q2"), QoS::ExactlyOnce, 1, b"")
        .await;
    c.expect_closed().await;

    // Unknown topic.
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish("devices/x/messages/events/", QoS::AtLeastOnce, 1, b"hi")
        .await;
    c.expect_closed().await;

    // A second CONNECT.
    let mut c = client(addr).await;
    c.connect().await;
    let mut connect = Connect::new(REG_ID);
    connect.login = Some(Login::new(USERNAME, SAS));
    c.send(Packet::Connect(connect)).await;
    c.expect_closed().await;

    // The healthy connection still works, and so do new ones.
    healthy
        .publish(&format!("{REGISTER_TOPIC}h"), QoS::AtLeastOnce, 9, b"")
        .await;
    let r = healthy.puback_then_response(9).await;
    assert_eq!(r.topic, "$dps/registrations/res/202/?$rid=h&retry-after=3");
    assert_server_works(addr).await;
}

#[tokio::test]
async fn requests_run_concurrently_up_to_the_inflight_limit() {
    let fake = FakeRegistrar::new();
    *fake.delay.lock().unwrap() = Duration::from_millis(400);
    let addr = server(
        fake.clone(),
        MqttLimits {
            max_inflight: 1,
            ..Default::default()
        },
    )
    .await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(&format!("{REGISTER_TOPIC}a"), QoS::AtLeastOnce, 1, b"")
        .await;
    c.publish(&format!("{REGISTER_TOPIC}b"), QoS::AtLeastOnce, 2, b"")
        .await;
    // PUBACK 1, PUBACK 2, then the answer to b (429: a still holds the only slot), then,
    // once the slow registrar answers, the 202 for a.
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0x40, 0x02, 0x00, 0x01]);
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0x40, 0x02, 0x00, 0x02]);
    let b = c.response().await;
    assert_eq!(b.topic, "$dps/registrations/res/429/?$rid=b&retry-after=1");
    assert_eq!(json_of(&b)["errorCode"], 429001);
    let a = c.response().await;
    assert_eq!(a.topic, "$dps/registrations/res/202/?$rid=a&retry-after=3");
    assert_eq!(fake.requests().len(), 1);
    // The slot is free again.
    c.publish(&format!("{REGISTER_TOPIC}c"), QoS::AtLeastOnce, 3, b"")
        .await;
    let r = c.puback_then_response(3).await;
    assert_eq!(r.topic, "$dps/registrations/res/202/?$rid=c&retry-after=3");
}

#[tokio::test]
async fn responses_need_a_subscription() {
    let (_, addr) = setup().await;
    let mut c = client(addr).await;
    c.connect().await;
    c.publish(&format!("{REGISTER_TOPIC}1"), QoS::AtLeastOnce, 1, b"")
        .await;
    let (_, raw) = c.packet_raw().await;
    assert_eq!(raw, [0x40, 0x02, 0x00, 0x01]);
    // No response without a subscription; the next packet is the answer to a ping.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.send(Packet::PingReq).await;
    assert_eq!(c.packet().await, Packet::PingResp);
}

#[tokio::test]
async fn error_replies_pass_through() {
    let fake = FakeRegistrar::new();
    *fake.register_reply.lock().unwrap() = DeviceReply {
        status: 401,
        retry_after: None,
        body: json!({"errorCode": 401000, "trackingId": "t", "message": "Unauthorized",
            "timestampUtc": "2019-11-19T21:39:05.1573304Z"}),
    };
    let addr = server(fake, MqttLimits::default()).await;
    let mut c = client(addr).await;
    c.connect_and_subscribe().await;
    c.publish(&format!("{REGISTER_TOPIC}1"), QoS::AtLeastOnce, 1, b"")
        .await;
    let r = c.puback_then_response(1).await;
    assert_eq!(r.topic, "$dps/registrations/res/401/?$rid=1");
    assert_eq!(json_of(&r)["errorCode"], 401000);
    // A failed attestation on a connection that never authenticated closes it, after the
    // answer.
    c.expect_closed().await;
}

/// A slot that records when it is let go.
struct Slot(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn unauthenticated_connections_are_closed_and_authenticated_ones_kept() {
    let fake = FakeRegistrar::new();
    let limits = MqttLimits {
        auth_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registrar: Arc<dyn DeviceRegistrar> = fake.clone();
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slot = released.clone();
    tokio::spawn(async move {
        let mut slot = Some(slot);
        while let Ok((stream, _)) = listener.accept().await {
            let hold = match slot.take() {
                Some(s) => PreAuthHold::new(Slot(s)),
                None => PreAuthHold::none(),
            };
            tokio::spawn(serve_connection(
                stream,
                registrar.clone(),
                Vec::new(),
                limits.clone(),
                hold,
            ));
        }
    });

    // Authenticated (the registrar accepted a request): the slot is let go at once, and the
    // connection outlives the authentication deadline.
    let mut good = client(addr).await;
    let mut connect = Connect::new(REG_ID);
    connect.keep_alive = 65535;
    connect.login = Some(Login::new(USERNAME, SAS));
    good.send(Packet::Connect(connect)).await;
    good.packet().await;
    good.subscribe().await;
    good.publish(&format!("{REGISTER_TOPIC}g"), QoS::AtLeastOnce, 1, b"")
        .await;
    good.puback_then_response(1).await;
    assert!(released.load(std::sync::atomic::Ordering::SeqCst));

    // Never authenticated, however busy: closed once the deadline passes, pings or not.
    let mut idle = client(addr).await;
    let mut connect = Connect::new(REG_ID);
    connect.keep_alive = 65535;
    connect.login = Some(Login::new(USERNAME, "SharedAccessSignature bogus"));
    idle.send(Packet::Connect(connect)).await;
    idle.packet().await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(5);
    loop {
        idle.send(Packet::PingReq).await;
        match idle.recv().await {
            Received::Closed => break,
            Received::Packet(Packet::PingResp, _) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "still open after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(250));

    // The authenticated connection is still served, well past the deadline.
    good.send(Packet::PingReq).await;
    assert_eq!(good.packet().await, Packet::PingResp);
}

#[tokio::test]
async fn keep_alive_is_capped() {
    let fake = FakeRegistrar::new();
    let addr = server(
        fake,
        MqttLimits {
            max_idle: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    let mut c = client(addr).await;
    let mut connect = Connect::new(REG_ID);
    connect.keep_alive = 65535;
    connect.login = Some(Login::new(USERNAME, SAS));
    c.send(Packet::Connect(connect)).await;
    c.packet().await;
    c.subscribe().await;
    c.publish(&format!("{REGISTER_TOPIC}1"), QoS::AtLeastOnce, 1, b"")
        .await;
    c.puback_then_response(1).await;
    let start = Instant::now();
    c.expect_closed().await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}
