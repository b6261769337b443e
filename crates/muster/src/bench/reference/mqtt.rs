//! The MQTT half of the TLS reference: one MQTT 3.1.1 session per TLS connection, shaped like
//! a DPS device's (device-protocol.md §4) and nothing more. Packets are framed by the MQTT
//! listener's own reader (`muster_device_api::mqtt::PacketReader`, rumqttc's v4 codec, the
//! listener's packet size limit) and the topics are the listener's (`mqtt::topic`):
//!
//! - CONNECT within [`CONNECT_TIMEOUT`] → CONNACK 0, session-present 0; no credential is
//!   looked at. A first packet that isn't an MQTT 3.1.1 CONNECT closes the connection.
//! - SUBSCRIBE `$dps/registrations/res/#` → SUBACK granting QoS 1 (0 if 0 was asked); any
//!   other filter is refused (`0x80`). UNSUBSCRIBE → UNSUBACK.
//! - PUBLISH on a register or status topic (`?$rid=N`) → PUBACK when QoS 1, then, while
//!   subscribed, the fixed `assigned` answer on `$dps/registrations/res/200/?$rid=N` at the
//!   granted QoS. Any other topic, or QoS 2, closes the connection.
//! - PINGREQ → PINGRESP; PUBACK is taken; DISCONNECT and anything else close.
//!
//! Nothing received for [`IDLE_TIMEOUT`], or a write that takes longer than
//! [`WRITE_TIMEOUT`], closes the connection. A connection is counted when it sends its first
//! fixed answer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use muster_device_api::mqtt::topic::{parse_request_topic, response_topic, RESPONSE_FILTER};
use muster_device_api::mqtt::{ConnectProtocol, PacketReader};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant};

use super::{Counters, ASSIGNED_BODY, IDLE_TIMEOUT, WRITE_TIMEOUT};

/// Largest packet accepted: the MQTT listener's default (`MqttLimits::max_packet_size`).
const MAX_PACKET: usize = 128 * 1024;
/// From the end of the TLS handshake to a complete CONNECT (the listener's default).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one MQTT session until the client disconnects, breaks the protocol or goes silent.
/// `resumed` says whether the TLS handshake resumed a session, for the counters.
pub(super) async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    resumed: bool,
    counters: &Counters,
) {
    let mut reader = PacketReader::new(MAX_PACKET);
    if reader
        .next_frame(&mut stream, Instant::now() + CONNECT_TIMEOUT)
        .await
        .is_err()
        || !matches!(reader.connect_protocol(), ConnectProtocol::V311)
        || !matches!(reader.take_packet(), Ok(Packet::Connect(_)))
    {
        return;
    }
    reader.expect_connect = false;
    let mut out = BytesMut::with_capacity(1024);
    if !write(
        &mut stream,
        &mut out,
        &[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        ))],
    )
    .await
    {
        return;
    }
    let mut subscribed: Option<QoS> = None;
    let mut next_pkid: u16 = 0;
    let mut counted = false;
    loop {
        let Ok(packet) = reader
            .next_packet(&mut stream, Instant::now() + IDLE_TIMEOUT)
            .await
        else {
            return;
        };
        let mut answers = Vec::with_capacity(2);
        match packet {
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| match (f.path == RESPONSE_FILTER, f.qos) {
                        (false, _) => SubscribeReasonCode::Failure,
                        (true, QoS::AtMostOnce) => SubscribeReasonCode::Success(QoS::AtMostOnce),
                        (true, _) => SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    })
                    .collect::<Vec<_>>();
                if let Some(SubscribeReasonCode::Success(q)) = codes
                    .iter()
                    .find(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    subscribed = Some(*q);
                }
                answers.push(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            Packet::Unsubscribe(u) => {
                if u.topics.iter().any(|t| t == RESPONSE_FILTER) {
                    subscribed = None;
                }
                answers.push(Packet::UnsubAck(UnsubAck::new(u.pkid)));
            }
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return;
                }
                let Ok(request) = parse_request_topic(&p.topic) else {
                    return;
                };
                if p.qos == QoS::AtLeastOnce {
                    answers.push(Packet::PubAck(PubAck::new(p.pkid)));
                }
                if let Some(qos) = subscribed {
                    let mut answer = Publish::new(
                        response_topic(200, request.rid(), None),
                        qos,
                        ASSIGNED_BODY.as_bytes(),
                    );
                    if qos != QoS::AtMostOnce {
                        // Packet ids 1..=65535, as the listener's.
                        next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                        answer.pkid = next_pkid;
                    }
                    answers.push(Packet::Publish(answer));
                    if !counted {
                        counted = true;
                        counters.connection(resumed);
                    }
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                }
            }
            Packet::PingReq => answers.push(Packet::PingResp),
            Packet::PubAck(_) => continue,
            _ => {
                // DISCONNECT, a second CONNECT, or a packet only a server sends.
                let _ = timeout(WRITE_TIMEOUT, stream.shutdown()).await;
                return;
            }
        }
        if !write(&mut stream, &mut out, &answers).await {
            return;
        }
    }
}

/// Encodes `packets` into one write and flushes it; false when that failed or timed out.
async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    packets: &[Packet],
) -> bool {
    out.clear();
    for p in packets {
        if p.write(out, MAX_PACKET).is_err() {
            return false;
        }
    }
    matches!(
        timeout(WRITE_TIMEOUT, async {
            stream.write_all(out).await?;
            stream.flush().await
        })
        .await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{Connect, Subscribe};
    use tokio::io::AsyncReadExt;

    async fn send<S: AsyncWrite + Unpin>(s: &mut S, p: Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, MAX_PACKET).unwrap();
        s.write_all(&b).await.unwrap();
    }

    async fn recv<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Packet {
        loop {
            if let Ok(p) = Packet::read(buf, MAX_PACKET) {
                return p;
            }
            assert!(s.read_buf(buf).await.unwrap() > 0, "closed early");
        }
    }

    #[tokio::test]
    async fn a_device_session_gets_the_fixed_answer_for_its_rid() {
        let (mut device, server) = tokio::io::duplex(64 * 1024);
        let counters = std::sync::Arc::new(Counters::default());
        let c = counters.clone();
        let served = tokio::spawn(async move { serve_connection(server, false, &c).await });
        let mut buf = BytesMut::new();
        let mut connect = Connect::new("dev-1");
        connect.keep_alive = 60;
        send(&mut device, Packet::Connect(connect)).await;
        match recv(&mut device, &mut buf).await {
            Packet::ConnAck(a) => {
                assert_eq!(a.code, ConnectReturnCode::Success);
                assert!(!a.session_present);
            }
            other => panic!("{other:?}"),
        }
        let mut sub = Subscribe::new(RESPONSE_FILTER, QoS::AtLeastOnce);
        sub.pkid = 1;
        send(&mut device, Packet::Subscribe(sub)).await;
        match recv(&mut device, &mut buf).await {
            Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ),
            other => panic!("{other:?}"),
        }
        let mut publish = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=7",
            QoS::AtLeastOnce,
            br#"{"registrationId":"dev-1"}"#.to_vec(),
        );
        publish.pkid = 2;
        send(&mut device, Packet::Publish(publish)).await;
        assert_eq!(
            recv(&mut device, &mut buf).await,
            Packet::PubAck(PubAck::new(2))
        );
        let answer = match recv(&mut device, &mut buf).await {
            Packet::Publish(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(answer.topic, "$dps/registrations/res/200/?$rid=7");
        assert_eq!(answer.qos, QoS::AtLeastOnce);
        let op: muster_proto::device::RegistrationOperationStatus =
            serde_json::from_slice(&answer.payload).unwrap();
        assert_eq!(op.status, muster_proto::RegistrationStatus::Assigned);
        send(&mut device, Packet::PubAck(PubAck::new(answer.pkid))).await;
        send(&mut device, Packet::PingReq).await;
        assert_eq!(recv(&mut device, &mut buf).await, Packet::PingResp);
        send(&mut device, Packet::Disconnect).await;
        served.await.unwrap();
        let seen = counters.snapshot();
        assert_eq!((seen.connections, seen.requests), (1, 1));
        assert_eq!(seen.resumed_handshakes, 0);
    }

    #[tokio::test]
    async fn unsubscribed_devices_get_no_answer_and_other_topics_close() {
        let (mut device, server) = tokio::io::duplex(64 * 1024);
        let counters = std::sync::Arc::new(Counters::default());
        let c = counters.clone();
        let served = tokio::spawn(async move { serve_connection(server, false, &c).await });
        let mut buf = BytesMut::new();
        send(&mut device, Packet::Connect(Connect::new("dev-2"))).await;
        assert!(matches!(
            recv(&mut device, &mut buf).await,
            Packet::ConnAck(_)
        ));
        let mut publish = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            QoS::AtLeastOnce,
            b"{}".to_vec(),
        );
        publish.pkid = 5;
        send(&mut device, Packet::Publish(publish)).await;
        // Only the PUBACK: nobody listens for the answer.
        assert_eq!(
            recv(&mut device, &mut buf).await,
            Packet::PubAck(PubAck::new(5))
        );
        send(
            &mut device,
            Packet::Publish(Publish::new(
                "devices/x/messages",
                QoS::AtMostOnce,
                b"x".to_vec(),
            )),
        )
        .await;
        served.await.unwrap();
        assert_eq!(device.read_buf(&mut buf).await.unwrap(), 0, "closed");
        assert!(buf.is_empty(), "nothing more was sent: {buf:?}");
        assert_eq!(counters.snapshot().connections, 0);
    }

    #[tokio::test]
    async fn a_first_packet_other_than_connect_closes() {
        let (mut device, server) = tokio::io::duplex(1024);
        let counters = Counters::default();
        let served = serve_connection(server, false, &counters);
        let client = async {
            send(&mut device, Packet::PingReq).await;
            let mut buf = BytesMut::new();
            assert_eq!(device.read_buf(&mut buf).await.unwrap(), 0);
        };
        tokio::join!(served, client);
    }
}
