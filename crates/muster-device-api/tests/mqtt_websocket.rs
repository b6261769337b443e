//! MQTT over WebSocket: an axum server with `websocket::mqtt_websocket` on loopback, a
//! tokio-tungstenite client sending MQTT packets in binary messages.

mod mqtt_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use mqtt_common::*;
use muster_device_api::websocket;
use muster_registration::{DeviceCredential, DeviceRegistrar};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn server(registrar: Arc<FakeRegistrar>) -> SocketAddr {
    let registrar: Arc<dyn DeviceRegistrar> = registrar;
    let app = Router::new()
        .route("/$iothub/websocket", get(websocket::mqtt_websocket))
        .route("/", get(websocket::mqtt_websocket))
        .with_state(registrar);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

async fn open(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&str>,
) -> Result<(Ws, Option<String>), tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
    let echoed = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((ws, echoed))
}

fn encode(p: Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

/// Reads MQTT packets out of binary messages, however they are split.
struct Reader {
    buf: BytesMut,
}

impl Reader {
    async fn packet(&mut self, ws: &mut Ws) -> Packet {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match mqttbytes::check(self.buf.iter(), usize::MAX) {
                    Ok(_) => return Packet::read(&mut self.buf, usize::MAX).unwrap(),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("unexpected from server: {other:?}"),
                }
            }
        })
        .await
        .expect("no packet within 5 s")
    }
}

#[tokio::test]
async fn mqtt_over_websocket() {
    let fake = FakeRegistrar::new();
    let addr = server(fake.clone()).await;
    // The C SDK offers `MQTT`; it must come back exactly so.
    let (mut ws, echoed) = open(addr, "/$iothub/websocket", Some("MQTT"))
        .await
        .unwrap();
    assert_eq!(echoed.as_deref(), Some("MQTT"));
    let mut rd = Reader {
        buf: BytesMut::new(),
    };

    // CONNECT split across two WebSocket messages.
    let mut connect = Connect::new(REG_ID);
    connect.login = Some(Login::new(USERNAME, SAS));
    let bytes = encode(Packet::Connect(connect));
    let (a, b) = bytes.split_at(7);
    ws.send(Message::Binary(Bytes::copy_from_slice(a)))
        .await
        .unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(b)))
        .await
        .unwrap();
    let Packet::ConnAck(ack) = rd.packet(&mut ws).await else {
        panic!()
    };
    assert!(!ack.session_present);

    // SUBSCRIBE and the register publish sharing one message.
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    let mut both = encode(Packet::Subscribe(sub));
    let mut publish = Publish::new(
        format!("{REGISTER_TOPIC}ws1"),
        QoS::AtLeastOnce,
        br#"{"registrationId":"my-device-01"}"#.to_vec(),
    );
    publish.pkid = 2;
    both.extend(encode(Packet::Publish(publish)));
    ws.send(Message::Binary(both.into())).await.unwrap();

    assert!(matches!(rd.packet(&mut ws).await, Packet::SubAck(_)));
    assert_eq!(rd.packet(&mut ws).await, Packet::PubAck(PubAck::new(2)));
    let Packet::Publish(r) = rd.packet(&mut ws).await else {
        panic!()
    };
    assert_eq!(
        r.topic,
        "$dps/registrations/res/202/?$rid=ws1&retry-after=3"
    );
    assert_eq!(json_of(&r)["status"], "assigning");
    ws.send(Message::Binary(
        encode(Packet::PubAck(PubAck::new(r.pkid))).into(),
    ))
    .await
    .unwrap();

    // Poll, then DISCONNECT closes the WebSocket.
    let mut poll = Publish::new(
        format!("{STATUS_TOPIC}ws2&operationId=op-1"),
        QoS::AtLeastOnce,
        b" ".to_vec(),
    );
    poll.pkid = 3;
    ws.send(Message::Binary(encode(Packet::Publish(poll)).into()))
        .await
        .unwrap();
    assert_eq!(rd.packet(&mut ws).await, Packet::PubAck(PubAck::new(3)));
    let Packet::Publish(r) = rd.packet(&mut ws).await else {
        panic!()
    };
    assert_eq!(r.topic, "$dps/registrations/res/200/?$rid=ws2");
    ws.send(Message::Binary(encode(Packet::Disconnect).into()))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "WebSocket not closed after DISCONNECT");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let Recorded::Register(req) = &reqs[0] else {
        panic!()
    };
    assert_eq!(req.credential, DeviceCredential::Sas(SAS.into()));
    assert_eq!(req.registration_id, REG_ID);
}

#[tokio::test]
async fn lower_case_mqtt_on_root_path() {
    // C# connects to `/` and offers `mqtt`.
    let addr = server(FakeRegistrar::new()).await;
    let (mut ws, echoed) = open(addr, "/", Some("mqtt")).await.unwrap();
    assert_eq!(echoed.as_deref(), Some("mqtt"));
    let mut connect = Connect::new(REG_ID);
    connect.login = Some(Login::new(USERNAME, SAS));
    ws.send(Message::Binary(encode(Packet::Connect(connect)).into()))
        .await
        .unwrap();
    let mut rd = Reader {
        buf: BytesMut::new(),
    };
    assert!(matches!(rd.packet(&mut ws).await, Packet::ConnAck(_)));
}

#[tokio::test]
async fn upgrade_without_mqtt_subprotocol_is_refused() {
    let addr = server(FakeRegistrar::new()).await;
    assert!(open(addr, "/$iothub/websocket", None).await.is_err());
    assert!(open(addr, "/$iothub/websocket", Some("AMQPWSB10"))
        .await
        .is_err());
    // Offered among others: only `mqtt` is echoed.
    let (_, echoed) = open(addr, "/$iothub/websocket", Some("foo, Mqtt"))
        .await
        .unwrap();
    assert_eq!(echoed.as_deref(), Some("Mqtt"));
}
