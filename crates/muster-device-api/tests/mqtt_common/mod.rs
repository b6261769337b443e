//! Shared by the MQTT tests: a fake registrar and a raw MQTT client built on rumqttc's codec.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use muster_registration::{DeviceRegistrar, DeviceReply, RegisterRequest, StatusRequest};
use rumqttc::mqttbytes::v4::{Connect, Login, Packet, Publish, Subscribe};
use rumqttc::mqttbytes::{self, QoS};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const SCOPE: &str = "0ne00000A0A";
pub const REG_ID: &str = "my-device-01";
pub const SAS: &str = "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fmy-device-01&sig=bNd2vrhHg%2FQT5ra43SUtdMVYIK98Kv0b5uzOGn6JSe8%3D&se=1700000000";
pub const USERNAME: &str = "0ne00000A0A/registrations/my-device-01/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.10.12%3BLinux%29";
pub const REGISTER_TOPIC: &str = "$dps/registrations/PUT/iotdps-register/?$rid=";
pub const STATUS_TOPIC: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=";

#[derive(Debug, Clone)]
pub enum Recorded {
    Register(RegisterRequest),
    Status(StatusRequest),
}

/// Records every request and answers with canned replies after an optional delay.
pub struct FakeRegistrar {
    pub requests: Mutex<Vec<Recorded>>,
    pub register_reply: Mutex<DeviceReply>,
    pub status_reply: Mutex<DeviceReply>,
    pub delay: Mutex<Duration>,
}

impl FakeRegistrar {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            requests: Mutex::new(Vec::new()),
            register_reply: Mutex::new(DeviceReply {
                status: 202,
                retry_after: Some(3),
                body: json!({"operationId": "op-1", "status": "assigning",
                    "registrationState": {"registrationId": REG_ID, "status": "assigning"}}),
            }),
            status_reply: Mutex::new(DeviceReply {
                status: 200,
                retry_after: None,
                body: json!({"operationId": "op-1", "status": "assigned",
                    "registrationState": {"registrationId": REG_ID, "status": "assigned",
                        "assignedHub": "hub.example", "deviceId": REG_ID}}),
            }),
            delay: Mutex::new(Duration::ZERO),
        })
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    async fn pause(&self) {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[async_trait]
impl DeviceRegistrar for FakeRegistrar {
    async fn register(&self, request: RegisterRequest) -> DeviceReply {
        self.requests
            .lock()
            .unwrap()
            .push(Recorded::Register(request));
        self.pause().await;
        self.register_reply.lock().unwrap().clone()
    }

    async fn operation_status(&self, request: StatusRequest) -> DeviceReply {
        self.requests
            .lock()
            .unwrap()
            .push(Recorded::Status(request));
        self.pause().await;
        self.status_reply.lock().unwrap().clone()
    }
}

/// A raw MQTT client: packets are written and read with rumqttc's v4 codec, and every frame
/// read is kept as bytes too.
pub struct RawClient<S> {
    pub stream: S,
    buf: BytesMut,
}

#[derive(Debug)]
pub enum Received {
    Packet(Packet, Vec<u8>),
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut b = BytesMut::new();
        packet.write(&mut b, usize::MAX).unwrap();
        self.send_raw(&b).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or `Closed` at end of stream / a reset; panics after 5 s.
    pub async fn recv(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(5), self.recv_inner())
            .await
            .expect("nothing received within 5 s")
    }

    async fn recv_inner(&mut self) -> Received {
        loop {
            match mqttbytes::check(self.buf.iter(), usize::MAX) {
                Ok(h) => {
                    let raw = self.buf[..h.frame_length()].to_vec();
                    let p = Packet::read(&mut self.buf, usize::MAX).unwrap();
                    return Received::Packet(p, raw);
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad frame from server: {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Received::Closed,
                Ok(_) => {}
            }
        }
    }

    pub async fn packet(&mut self) -> Packet {
        self.packet_raw().await.0
    }

    pub async fn packet_raw(&mut self) -> (Packet, Vec<u8>) {
        match self.recv().await {
            Received::Packet(p, raw) => (p, raw),
            Received::Closed => panic!("connection closed, expected a packet"),
        }
    }

    /// Asserts that the server closes the connection (after at most a few more packets).
    pub async fn expect_closed(&mut self) {
        for _ in 0..8 {
            if let Received::Closed = self.recv().await {
                return;
            }
        }
        panic!("connection still open");
    }

    /// CONNECT as the Python SDK does (clean session off) and expect CONNACK 0.
    pub async fn connect(&mut self) {
        let mut c = Connect::new(REG_ID);
        c.clean_session = false;
        c.keep_alive = 60;
        c.login = Some(Login::new(USERNAME, SAS));
        self.send(Packet::Connect(c)).await;
        let (p, raw) = self.packet_raw().await;
        assert!(matches!(p, Packet::ConnAck(_)), "{p:?}");
        assert_eq!(raw, [0x20, 0x02, 0x00, 0x00]);
    }

    pub async fn subscribe(&mut self) {
        let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
        sub.pkid = 1;
        self.send(Packet::Subscribe(sub)).await;
        let (p, raw) = self.packet_raw().await;
        assert!(matches!(p, Packet::SubAck(_)), "{p:?}");
        assert_eq!(raw, [0x90, 0x03, 0x00, 0x01, 0x01]);
    }

    pub async fn connect_and_subscribe(&mut self) {
        self.connect().await;
        self.subscribe().await;
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &[u8]) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await;
    }

    /// Reads the PUBACK for `pkid` (exact bytes), then the response publish, which it PUBACKs.
    pub async fn puback_then_response(&mut self, pkid: u16) -> Publish {
        let (p, raw) = self.packet_raw().await;
        assert!(
            matches!(p, Packet::PubAck(_)),
            "expected PUBACK first, got {p:?}"
        );
        assert_eq!(raw, [0x40, 0x02, (pkid >> 8) as u8, pkid as u8]);
        self.response().await
    }

    /// Reads a response publish (QoS 1) and acknowledges it.
    pub async fn response(&mut self) -> Publish {
        match self.packet().await {
            Packet::Publish(p) => {
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_ne!(p.pkid, 0);
                self.send(Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)))
                    .await;
                p
            }
            other => panic!("expected a response PUBLISH, got {other:?}"),
        }
    }
}

pub fn json_of(p: &Publish) -> serde_json::Value {
    serde_json::from_slice(&p.payload).expect("response payload is JSON")
}
