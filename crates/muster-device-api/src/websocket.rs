//! MQTT over WebSocket (device-protocol.md §4.1): the same DPS MQTT session as on 8883, carried
//! in binary WebSocket messages on the HTTPS port.
//!
//! The upgrade must offer the subprotocol `mqtt` in any case; the offered string is echoed
//! exactly (the C SDK offers `MQTT`, the others `mqtt`). MQTT packets may span messages or
//! share one: the messages are turned back into a byte stream ([`WsByteStream`]) and handed to
//! [`mqtt::serve_connection`].
//!
//! # Mounting
//!
//! Python, Node and C connect to `/$iothub/websocket`, C# to `/`, so serve both:
//!
//! ```ignore
//! use axum::routing::get;
//! let ws = Router::new()
//!     .route("/$iothub/websocket", get(websocket::mqtt_websocket))
//!     .route("/", get(websocket::mqtt_websocket))
//!     .with_state(registrar.clone()); // Arc<dyn DeviceRegistrar>
//! ```
//!
//! The TLS client chain, when the listener has one, is read from a [`ClientCertChain`] request
//! extension. To route AMQP-over-WebSocket (`AMQPWSB10`) on the same paths later, dispatch on
//! [`mqtt_subprotocol`] and call [`upgrade`] directly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use muster_registration::DeviceRegistrar;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::mqtt::{self, MqttLimits};
use crate::pre_auth::PreAuthHold;

/// The TLS client certificate chain of the connection a request arrived on (leaf first, DER),
/// as a request extension set by the listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCertChain(pub Vec<Vec<u8>>);

/// Axum handler for `GET /$iothub/websocket` and `GET /`: MQTT over WebSocket with default
/// [`MqttLimits`]. Answers 400 when the upgrade doesn't offer the `mqtt` subprotocol.
pub async fn mqtt_websocket(
    State(registrar): State<Arc<dyn DeviceRegistrar>>,
    client_certs: Option<Extension<ClientCertChain>>,
    ws: WebSocketUpgrade,
) -> Response {
    let certs = client_certs.map(|Extension(c)| c.0).unwrap_or_default();
    upgrade(
        ws,
        registrar,
        certs,
        MqttLimits::default(),
        PreAuthHold::none(),
    )
}

/// The offered subprotocol that names MQTT (`mqtt`, `MQTT`, any case), exactly as offered.
pub fn mqtt_subprotocol(ws: &WebSocketUpgrade) -> Option<HeaderValue> {
    ws.requested_protocols()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(b"mqtt"))
        .cloned()
}

/// Accepts the upgrade with the offered MQTT subprotocol echoed and serves an MQTT session on
/// the WebSocket; 400 when no MQTT subprotocol was offered. The session releases `pre_auth`
/// once the device has authenticated.
pub fn upgrade(
    ws: WebSocketUpgrade,
    registrar: Arc<dyn DeviceRegistrar>,
    client_certs: Vec<Vec<u8>>,
    limits: MqttLimits,
    pre_auth: PreAuthHold,
) -> Response {
    let Some(protocol) = mqtt_subprotocol(&ws) else {
        return (
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket needs the subprotocol `mqtt` (Sec-WebSocket-Protocol)",
        )
            .into_response();
    };
    // A message may hold several packets; bound it all the same.
    let max_message = limits.max_packet_size.saturating_mul(2).max(256 * 1024);
    let mut ws = ws.max_message_size(max_message).max_frame_size(max_message);
    ws.set_selected_protocol(protocol);
    ws.on_upgrade(move |socket| async move {
        mqtt::serve_connection(
            WsByteStream::new(socket),
            registrar,
            client_certs,
            limits,
            pre_auth,
        )
        .await;
    })
}

/// A WebSocket as a byte stream: reads yield the bytes of binary messages in order (message
/// boundaries don't matter to MQTT); each write becomes one binary message.
///
/// A text message is an error (MQTT over WebSocket is binary only); a close message or the end
/// of the socket is end of stream. Pings are answered by the WebSocket layer.
pub struct WsByteStream {
    ws: WebSocket,
    pending: Bytes,
    eof: bool,
}

impl std::fmt::Debug for WsByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsByteStream")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl WsByteStream {
    pub fn new(ws: WebSocket) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn io_error(e: axum::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsByteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on an MQTT WebSocket",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsByteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}
