//! AMQP 1.0 for devices (device-protocol.md §5), for any byte stream: TLS on 5671, or a
//! WebSocket (`AMQPWSB10`) adapted by [`crate::websocket::WsByteStream`]. The AMQP framing and
//! link state machines are `fe2o3-amqp`'s, the SASL exchange ours; this module decides what a
//! connection may do and hands its messages to the registration engine.
//!
//! Layout:
//! - this file — [`open`]: the protocol header (SASL, or none at all, on the same port: X.509
//!   devices, and hub devices that authenticate with a CBS put-token, skip SASL), the
//!   connection's open, its session and its first link, within [`AmqpLimits::open_timeout`];
//! - [`sasl`] — the SASL exchange, run here rather than by fe2o3: the mechanisms offered
//!   (`PLAIN`, `ANONYMOUS`, `EXTERNAL`, and `TPM` with its challenge rounds, which wait on the
//!   registrar) and what the device presented;
//! - [`address`] — `[amqps://host/]{idScope}/registrations/{registrationId}`;
//! - [`dispatch`] — which service a connection is for (the SASL identity, else the first link):
//!   the registration session here, or the built-in hub's device session
//!   (`muster_hub::device_amqp`, which builds on [`Opened`]);
//! - [`registration`] — the DPS session: links, register / poll requests, replies and errors.
//!
//! A connection that is not AMQP, that needs SASL mechanisms we don't offer, or that is too
//! slow to open is closed (debug log, never a panic).

pub mod address;
pub mod dispatch;
pub mod registration;
pub mod sasl;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, ListenerConnectionHandle, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::types::definitions::Role;
use fe2o3_amqp::types::messaging::TargetArchetype;
use fe2o3_amqp::types::performatives::Attach;
use muster_registration::DeviceRegistrar;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::mqtt::dispatch::Rewind;
pub use sasl::SaslIdentity;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct AmqpLimits {
    /// From the start of the stream to the device's first link: header, SASL, open, begin,
    /// attach.
    pub open_timeout: Duration,
    /// From the start of the stream until one of the device's requests was accepted by the
    /// registrar.
    pub auth_timeout: Duration,
    /// Requests a connection may have in progress; further ones are rejected as throttled.
    pub max_inflight: usize,
    /// Largest frame, and largest message, accepted (DPS allows 96 KB messages).
    pub max_message_size: u32,
    /// A registration connection with no request for this long is closed; any connection
    /// (registration or hub) that sends no frame at all for this long is closed too (the
    /// AMQP idle timeout announced in the open).
    pub idle_timeout: Duration,
}

impl Default for AmqpLimits {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            max_inflight: 16,
            max_message_size: 128 * 1024,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// The AMQP protocol header: `AMQP` then the protocol id (0 AMQP, 2 TLS, 3 SASL) and 1.0.0.
const HEADER_AMQP: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
const HEADER_SASL: [u8; 8] = *b"AMQP\x03\x01\x00\x00";

/// The frame size fe2o3 negotiates; messages span frames, so this only bounds one frame.
const MAX_FRAME_SIZE: u32 = 64 * 1024;

/// The connection acceptor's settings, shared by both protocol headers. The idle timeout is
/// announced in our open (clients send empty frames at half of it) and enforced by fe2o3's
/// transport: a connection that sends nothing for that long is closed.
macro_rules! acceptor {
    ($limits:expr) => {
        ConnectionAcceptor::builder()
            .container_id("muster")
            .max_frame_size(MAX_FRAME_SIZE)
            .channel_max(15u16)
            .idle_time_out(u32::try_from($limits.idle_timeout.as_millis()).unwrap_or(u32::MAX))
    };
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub sasl: SaslIdentity,
    /// The TLS client certificate chain, leaf first, DER (empty when none).
    pub client_certs: Vec<Vec<u8>>,
}

/// A connection opened up to its first link, not yet accepted: the service it is for
/// accepts (or refuses) that link.
pub struct Opened {
    pub connection: ListenerConnectionHandle,
    pub session: ListenerSessionHandle,
    pub first_attach: Attach,
    pub peer: Peer,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("peer", &self.peer)
            .field("first_link", &link_address(&self.first_attach))
            .finish_non_exhaustive()
    }
}

/// Why a connection did not get as far as a link.
#[derive(Debug, thiserror::Error)]
pub enum OpenFailed {
    #[error("no AMQP protocol header in time")]
    NoHeader,
    #[error("not an AMQP 1.0 protocol header: {0:?}")]
    NotAmqp([u8; 8]),
    #[error("the connection did not open in time")]
    TimedOut,
    #[error("the connection failed to open: {0}")]
    Open(String),
    #[error("the connection ended before its first link")]
    Ended,
}

/// Reads the protocol header, runs SASL when the device asked for it (DPS SAS and TPM devices,
/// [`sasl::negotiate`]; `registrar` answers the `TPM` mechanism's challenge, which is offered
/// only with one), then waits for the open, the first session and its first attach, all
/// before `limits.open_timeout`. A connection without SASL is not refused here: it
/// authenticates later, with its TLS client certificate or (on the hub) a CBS token, and the
/// session it is handed to refuses it otherwise.
pub async fn open<S>(
    mut stream: S,
    client_certs: Vec<Vec<u8>>,
    limits: &AmqpLimits,
    registrar: Option<&Arc<dyn DeviceRegistrar>>,
) -> Result<Opened, OpenFailed>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
{
    let deadline = Instant::now() + limits.open_timeout;
    let mut header = [0u8; 8];
    match timeout_at(deadline, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        _ => return Err(OpenFailed::NoHeader),
    }
    let mut identity = SaslIdentity::None;
    let opening = async {
        let header = match header {
            HEADER_SASL => {
                let io = |e: std::io::Error| OpenFailed::Open(e.to_string());
                stream.write_all(&HEADER_SASL).await.map_err(io)?;
                identity = sasl::negotiate(&mut stream, registrar)
                    .await
                    .map_err(|e| OpenFailed::Open(e.to_string()))?;
                // After SASL the device starts AMQP with its protocol header.
                let mut next = [0u8; 8];
                stream.read_exact(&mut next).await.map_err(io)?;
                if next != HEADER_AMQP {
                    return Err(OpenFailed::NotAmqp(next));
                }
                next
            }
            HEADER_AMQP => header,
            other => {
                let _ = stream.write_all(&HEADER_AMQP).await;
                let _ = stream.shutdown().await;
                return Err(OpenFailed::NotAmqp(other));
            }
        };
        let replay = Rewind::new(BytesMut::from(&header[..]), stream);
        let mut connection = acceptor!(limits)
            .build()
            .accept(replay)
            .await
            .map_err(|e| OpenFailed::Open(e.to_string()))?;
        let session = SessionAcceptor::new()
            .accept(&mut connection)
            .await
            .map_err(|e| OpenFailed::Open(e.to_string()))?;
        Ok((connection, session))
    };
    let (connection, mut session) = match timeout_at(deadline, opening).await {
        Ok(r) => r?,
        Err(_) => return Err(OpenFailed::TimedOut),
    };
    let first_attach = match timeout_at(deadline, session.next_incoming_attach()).await {
        Ok(Some(a)) => a,
        Ok(None) => return Err(OpenFailed::Ended),
        Err(_) => return Err(OpenFailed::TimedOut),
    };
    Ok(Opened {
        connection,
        session,
        first_attach,
        peer: Peer {
            sasl: identity,
            client_certs,
        },
    })
}

/// The address a link attaches to: the target when the device sends on it, the source when
/// it receives.
pub fn link_address(attach: &Attach) -> Option<&str> {
    match attach.role {
        // The device is the sender: its messages go to the target.
        Role::Sender => match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.as_deref(),
            _ => None,
        },
        Role::Receiver => attach.source.as_ref().and_then(|s| s.address.as_deref()),
    }
}
