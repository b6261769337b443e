//! One MQTT port, two services: the DPS (registration) and the built-in hub (device
//! telemetry, twin, methods) share 8883 and `/$iothub/websocket`. What a client sends first
//! decides: [`peek_connect`] reads the CONNECT packet, [`Destination::of`] looks at its user
//! name, and [`Rewind`] hands the chosen session the whole stream, CONNECT included.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{timeout_at, Instant};

/// Who serves a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// `{idScope}/registrations/{registrationId}/...`: device registration.
    Dps,
    /// Anything else (`{hubHost}/{deviceId}/?api-version=...`): the built-in hub.
    Hub,
}

impl Destination {
    pub fn of(username: Option<&str>) -> Self {
        match username {
            Some(u) => {
                let mut parts = u.splitn(3, '/');
                let _scope = parts.next();
                if parts
                    .next()
                    .is_some_and(|p| p.eq_ignore_ascii_case("registrations"))
                {
                    Destination::Dps
                } else {
                    Destination::Hub
                }
            }
            // Without a user name neither can authenticate a SAS device; X.509 registrations
            // always send one, so the DPS session answers (and refuses) it.
            None => Destination::Dps,
        }
    }
}

/// Reads from `stream` until the first MQTT packet is complete and returns the bytes read and,
/// when that packet is a CONNECT, its user name. `None` for the bytes' packet means the stream
/// is not MQTT (or too slow, or too large): the caller drops it.
pub async fn peek_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_packet_size: usize,
    deadline: Instant,
) -> Option<(BytesMut, Option<String>)> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match mqttbytes::check(buf.iter(), max_packet_size) {
            Ok(_) => break,
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        if buf.first().is_some_and(|b| *b != 0x10) {
            return None;
        }
        match timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
    let mut probe = buf.clone();
    // Guarded like the session's own reader: a decoder bug must not take the listener down.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v4::Packet::read(&mut probe, max_packet_size)
    }));
    let username = match decoded {
        Ok(Ok(v4::Packet::Connect(c))) => c.login.map(|l| l.username),
        // A CONNECT the v4 decoder can't read (MQTT 5, say): let the DPS session refuse it.
        _ => None,
    };
    Some((buf, username))
}

/// A stream that first yields `prefix`, then reads `inner`; writes go to `inner`.
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S> std::fmt::Debug for Rewind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind")
            .field("prefix_len", &self.prefix.len())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn connect_bytes(username: Option<&str>) -> BytesMut {
        let mut c = v4::Connect::new("dev-1");
        if let Some(u) = username {
            c.set_login(u, "SharedAccessSignature sr=x&sig=y&se=1");
        }
        let mut out = BytesMut::new();
        c.write(&mut out).unwrap();
        out
    }

    #[test]
    fn routes_by_username() {
        assert_eq!(
            Destination::of(Some(
                "0ne00000A0A/registrations/dev-1/api-version=2019-03-31"
            )),
            Destination::Dps
        );
        assert_eq!(
            Destination::of(Some("hub.local/dev-1/?api-version=2021-04-12")),
            Destination::Hub
        );
        assert_eq!(Destination::of(None), Destination::Dps);
    }

    #[tokio::test]
    async fn peeks_then_replays_the_whole_stream() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let connect = connect_bytes(Some("hub.local/dev-1/?api-version=2021-04-12"));
        // Split across writes, followed by more bytes.
        client.write_all(&connect[..3]).await.unwrap();
        let rest = connect[3..].to_vec();
        tokio::spawn(async move {
            client.write_all(&rest).await.unwrap();
            client.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (prefix, user) = peek_connect(&mut server, 4096, deadline).await.unwrap();
        assert_eq!(
            user.as_deref(),
            Some("hub.local/dev-1/?api-version=2021-04-12")
        );
        let mut replay = Rewind::new(prefix, server);
        let mut all = vec![0u8; connect.len() + 2];
        replay.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..connect.len()], &connect[..]);
        assert_eq!(&all[connect.len()..], &[0xC0, 0x00]);
    }

    #[tokio::test]
    async fn refuses_what_is_not_mqtt() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        assert!(peek_connect(&mut server, 4096, deadline).await.is_none());
    }
}
