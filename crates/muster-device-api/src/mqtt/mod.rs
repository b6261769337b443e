//! DPS registration over MQTT 3.1.1 (device-protocol.md §4), for any byte stream: TLS on
//! 8883, or a WebSocket adapted by [`crate::websocket`].
//!
//! DPS is not a broker. A connection goes:
//!
//! 1. **CONNECT** within [`MqttLimits::connect_timeout`], protocol level 4 (anything else that
//!    calls itself MQTT gets CONNACK 1). Username `{idScope}/registrations/{registrationId}/…`,
//!    client id = registration id, password = SAS token. The credential is
//!    [`DeviceCredential::Sas`](muster_registration::DeviceCredential::Sas) when a password was
//!    sent, else `X509` with the TLS client chain when there is one, else `None`; it is not
//!    checked here: the registrar checks it on every request and answers 401, as DPS does.
//!    Until the registrar has accepted one of its requests the connection is
//!    **unauthenticated**: a 401 (or 403) answer closes it once the answer is written (after
//!    the device's DISCONNECT, or 1 s, whichever comes first), and one still unauthenticated
//!    [`MqttLimits::auth_timeout`] after it started is closed (once the requests it has in
//!    flight are answered). Authenticating releases the listener's [`PreAuthHold`].
//!    CONNACK is 0 with session-present **always 0** (C# fails otherwise), clean session or not;
//!    2 for a client id that isn't the registration id; 4 for a missing or malformed username.
//! 2. **SUBSCRIBE** `$dps/registrations/res/#` is granted QoS 1 (0 if 0 was asked); any other
//!    filter gets `0x80`. UNSUBSCRIBE is acknowledged.
//! 3. **PUBLISH** (QoS 0 or 1) on `$dps/registrations/PUT/iotdps-register/?$rid={rid}` or
//!    `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`. A QoS 1
//!    request is PUBACKed first; the registrar's answer follows on
//!    `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]` with `$rid` echoed
//!    verbatim, payload the reply JSON, QoS 1 with our own packet ids (client PUBACKs are
//!    accepted; nothing is redelivered: DPS sessions are not persistent). Requests run
//!    concurrently, at most [`MqttLimits::max_inflight`] per connection; beyond that the answer
//!    is 429 / 429001 with `retry-after`. A register payload that is not JSON gets 400 / 400001.
//!    Responses are only published while the device is subscribed to the response filter.
//! 4. **PINGREQ** → PINGRESP. Nothing received for 1.5 × keep-alive (or
//!    [`MqttLimits::idle_timeout`] when keep-alive is 0), at most [`MqttLimits::max_idle`],
//!    closes the connection. **DISCONNECT** closes it after what was queued is written.
//!
//! Everything else closes the connection (debug log, never a panic): malformed bytes, a packet
//! over [`MqttLimits::max_packet_size`], a QoS 2 publish, a publish on any other topic (DPS
//! isn't a broker; a misdirected client learns at once rather than waiting for a response that
//! never comes), a second CONNECT, and packets only a server sends.

pub mod dispatch;
pub(crate) mod session;
pub mod topic;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use muster_registration::DeviceRegistrar;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::{self, PacketType, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use crate::pre_auth::PreAuthHold;
use session::{AuthState, Flow, Outgoing, Session};

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct MqttLimits {
    /// Largest accepted packet (its remaining length), in bytes. DPS allows 96 KB messages.
    pub max_packet_size: usize,
    /// Time allowed from the start of the stream to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Requests a connection may have in progress; further ones are answered 429.
    pub max_inflight: usize,
    /// Time allowed to write one packet before the peer counts as gone.
    pub write_timeout: Duration,
    /// Idle limit for clients that disable keep-alive (CONNECT keep-alive 0, as the C SDK does).
    pub idle_timeout: Duration,
    /// The longest a connection may stay silent, whatever keep-alive the client asked for
    /// (65535 s would otherwise be 27 hours).
    pub max_idle: Duration,
    /// Time allowed from the start of the stream until a request of the device was accepted
    /// by the registrar.
    pub auth_timeout: Duration,
}

impl Default for MqttLimits {
    fn default() -> Self {
        Self {
            max_packet_size: 128 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_inflight: 16,
            write_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_idle: Duration::from_secs(1767),
            auth_timeout: Duration::from_secs(10),
        }
    }
}

/// How long a connection whose attestation failed stays open after the answer, for the
/// device to disconnect first.
const ATTESTATION_FAILED_LINGER: Duration = Duration::from_secs(1);

/// The first byte of every CONNECT (type 1, flags 0).
const CONNECT_BYTE: u8 = 0x10;

/// Packets queued for the writer; the reader waits (and stops reading) when it is full.
const OUTGOING_QUEUE: usize = 64;

/// Serves one MQTT connection until it closes. `client_certs` is the TLS client certificate
/// chain (leaf first, DER), empty when none was presented or there is no TLS. `pre_auth` is
/// released once the device has authenticated.
pub async fn serve_connection<S>(
    stream: S,
    registrar: Arc<dyn DeviceRegistrar>,
    client_certs: Vec<Vec<u8>>,
    limits: MqttLimits,
    pre_auth: PreAuthHold,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(limits.max_packet_size);

    // CONNECT
    let connect_deadline = start + limits.connect_timeout;
    let connect = match reader.next_frame(&mut rd, connect_deadline).await {
        Ok(()) => match reader.connect_protocol() {
            ConnectProtocol::NotConnect => {
                tracing::debug!("MQTT connection closed: first packet is not CONNECT");
                return;
            }
            ConnectProtocol::Unsupported(level) => {
                tracing::debug!(level, "MQTT connection refused: unsupported protocol level");
                refuse(&mut wr, ConnectReturnCode::RefusedProtocolVersion, &limits).await;
                return;
            }
            ConnectProtocol::V311 => match reader.take_packet() {
                Ok(Packet::Connect(c)) if c.protocol == Protocol::V4 => c,
                Ok(_) => {
                    refuse(&mut wr, ConnectReturnCode::RefusedProtocolVersion, &limits).await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "MQTT connection closed: malformed CONNECT");
                    return;
                }
            },
        },
        Err(end) => {
            tracing::debug!("MQTT connection closed before CONNECT: {end}");
            return;
        }
    };
    reader.expect_connect = false;
    let identity = match session::accept_connect(&connect, client_certs) {
        Ok(identity) => identity,
        Err(code) => {
            tracing::debug!(?code, client_id = %connect.client_id, "MQTT CONNECT refused");
            refuse(&mut wr, code, &limits).await;
            return;
        }
    };
    let idle = if connect.keep_alive > 0 {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500)
    } else {
        limits.idle_timeout
    }
    .min(limits.max_idle);
    let auth_deadline = start + limits.auth_timeout;
    let auth = Arc::new(AuthState::new(pre_auth));

    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    // The queue is empty, so this cannot fail for lack of room.
    let _ = tx.try_send(Outgoing::Packet(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    ))));
    let mut session = Session::new(
        identity,
        registrar,
        tx.clone(),
        limits.max_inflight,
        auth.clone(),
    );

    let read_side = async {
        let reason = loop {
            if auth.failed_now() {
                // Give the device a moment to leave by itself (SDKs disconnect on a 401 and
                // complain when the socket is already gone), reading nothing more.
                let linger_end = Instant::now() + ATTESTATION_FAILED_LINGER;
                while let Ok(packet) = reader.next_packet(&mut rd, linger_end).await {
                    match packet {
                        Packet::Disconnect => break,
                        // The Node SDK unsubscribes before it disconnects and waits for the
                        // UNSUBACK; answer that (and pings), but take no new request.
                        Packet::Unsubscribe(_) | Packet::PingReq | Packet::PubAck(_) => {
                            if let Flow::Close(_) = session.handle(packet).await {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                break "attestation failed on an unauthenticated connection".to_string();
            }
            if !auth.is_authenticated() && Instant::now() >= auth_deadline {
                // Requests still being answered may yet authenticate the device.
                session.settled().await;
                if !auth.is_authenticated() {
                    break format!("not authenticated within {:?}", limits.auth_timeout);
                }
            }
            let mut deadline = Instant::now() + idle;
            if !auth.is_authenticated() {
                deadline = deadline.min(auth_deadline);
            }
            let read = tokio::select! {
                read = reader.next_packet(&mut rd, deadline) => read,
                () = auth.failed() => continue,
            };
            match read {
                Ok(packet) => {
                    if let Flow::Close(reason) = session.handle(packet).await {
                        break reason;
                    }
                }
                Err(ReadEnd::TimedOut)
                    if !auth.is_authenticated() && Instant::now() >= auth_deadline =>
                {
                    continue
                }
                Err(end) => break end.to_string(),
            }
        };
        tracing::debug!("MQTT connection closing: {reason}");
        let _ = tx.send(Outgoing::Close).await;
    };
    let write_side = write_loop(wr, rx, limits.write_timeout);
    tokio::pin!(read_side, write_side);
    tokio::select! {
        () = &mut read_side => {
            // Let the writer flush what was queued before the close.
            let _ = timeout(limits.write_timeout, &mut write_side).await;
        }
        () = &mut write_side => {
            tracing::debug!("MQTT connection closed by the writer (a failed write or attestation)");
        }
    }
}

/// Writes a refusing CONNACK and closes.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: ConnectReturnCode, limits: &MqttLimits) {
    let mut buf = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut buf, usize::MAX)
        .is_ok()
    {
        let _ = timeout(limits.write_timeout, async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            wr.shutdown().await
        })
        .await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
) {
    let mut last_pkid: u16 = 0;
    let mut buf = BytesMut::with_capacity(1024);
    while let Some(out) = rx.recv().await {
        let packet = match out {
            Outgoing::Packet(p) => p,
            Outgoing::Response {
                topic,
                payload,
                qos,
            } => {
                let mut publish = Publish::from_bytes(topic, qos, payload);
                if qos != QoS::AtMostOnce {
                    last_pkid = last_pkid.checked_add(1).unwrap_or(1);
                    publish.pkid = last_pkid;
                }
                Packet::Publish(publish)
            }
            Outgoing::Close => break,
        };
        if !write_packet(&mut wr, &mut buf, &packet, write_timeout).await {
            return;
        }
    }
    let _ = timeout(write_timeout, wr.shutdown()).await;
}

/// Encodes `packet` into `buf` and writes it within `write_timeout`; false when the peer is
/// gone (or too slow), after logging why. Shared by the registration and hub sessions.
pub async fn write_packet<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut BytesMut,
    packet: &Packet,
    write_timeout: Duration,
) -> bool {
    buf.clear();
    if let Err(e) = packet.write(buf, usize::MAX) {
        tracing::debug!(error = %e, "MQTT packet could not be encoded");
        return false;
    }
    let written = timeout(write_timeout, async {
        wr.write_all(buf).await?;
        wr.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "MQTT write failed");
            false
        }
        Err(_) => {
            tracing::debug!("MQTT write timed out");
            false
        }
    }
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadEnd {
    #[error("peer closed the connection")]
    Eof,
    #[error("nothing received in time")]
    TimedOut,
    #[error("read failed: {0}")]
    Io(std::io::Error),
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error("the packet decoder panicked")]
    Panicked,
}

/// What the first packet of a stream is.
pub enum ConnectProtocol {
    NotConnect,
    /// `MQTT` level 4.
    V311,
    /// `MQTT` with another level, or `MQIsdp` (3.1).
    Unsupported(u8),
}

/// Frames packets from a byte stream with rumqttc's v4 codec, under a size limit. Public so
/// the built-in hub's device session (`muster_hub::device_mqtt`) reads packets the same way.
pub struct PacketReader {
    buf: BytesMut,
    max_packet_size: usize,
    /// Until CONNECT is read: refuse a stream whose first byte isn't CONNECT's at once,
    /// rather than waiting for a "packet" whose length is made of garbage.
    pub expect_connect: bool,
}

impl PacketReader {
    pub fn new(max_packet_size: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(4096),
            max_packet_size,
            expect_connect: true,
        }
    }

    /// Reads until the buffer starts with one complete packet (or fails: the size limit is
    /// checked from the fixed header, before the body is read).
    pub async fn next_frame<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        deadline: Instant,
    ) -> Result<(), ReadEnd> {
        loop {
            if self.expect_connect && self.buf.first().is_some_and(|b| *b != CONNECT_BYTE) {
                return Err(ReadEnd::NotConnect);
            }
            match mqttbytes::check(self.buf.iter(), self.max_packet_size) {
                Ok(_) => return Ok(()),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(ReadEnd::Malformed(e)),
            }
            self.buf.reserve(8 * 1024);
            match timeout_at(deadline, rd.read_buf(&mut self.buf)).await {
                Err(_) => return Err(ReadEnd::TimedOut),
                Ok(Err(e)) => return Err(ReadEnd::Io(e)),
                Ok(Ok(0)) => return Err(ReadEnd::Eof),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Decodes the complete packet at the start of the buffer.
    pub fn take_packet(&mut self) -> Result<Packet, ReadEnd> {
        let (buf, max) = (&mut self.buf, self.max_packet_size);
        // rumqttc's decoder is written not to panic on bad input; this keeps a bug there from
        // taking more than this connection down.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Packet::read(buf, max))) {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(ReadEnd::Malformed(e)),
            Err(_) => Err(ReadEnd::Panicked),
        }
    }

    pub async fn next_packet<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        deadline: Instant,
    ) -> Result<Packet, ReadEnd> {
        self.next_frame(rd, deadline).await?;
        self.take_packet()
    }

    /// Looks at the complete frame at the start of the buffer: is it a CONNECT, and of which
    /// protocol? (rumqttc's v4 decoder would misread a level-5 CONNECT rather than refuse it.)
    pub fn connect_protocol(&self) -> ConnectProtocol {
        let frame = &self.buf[..];
        let is_connect = mqttbytes::check(frame.iter(), self.max_packet_size)
            .and_then(|h| h.packet_type())
            .is_ok_and(|t| t == PacketType::Connect);
        if !is_connect {
            return ConnectProtocol::NotConnect;
        }
        // Fixed header: type byte, then 1–4 remaining-length bytes (the last without bit 7).
        let Some(len_bytes) = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0) else {
            return ConnectProtocol::NotConnect;
        };
        let vh = &frame[(2 + len_bytes).min(frame.len())..];
        match vh {
            [0, 4, b'M', b'Q', b'T', b'T', 4, ..] => ConnectProtocol::V311,
            [0, 4, b'M', b'Q', b'T', b'T', level, ..] => ConnectProtocol::Unsupported(*level),
            [0, 6, b'M', b'Q', b'I', b's', b'd', b'p', level, ..] => {
                ConnectProtocol::Unsupported(*level)
            }
            // Not MQTT at all: let the decoder reject it.
            _ => ConnectProtocol::V311,
        }
    }
}
