//! The HTTPS half of the TLS reference: HTTP/1.1 on one TLS connection, every request answered
//! with the fixed `assigned` body, except `GET /_reference/stats`, which answers the counters
//! of both halves (and is not counted). The connection stays open unless the client asks to
//! close it or sends nothing for [`IDLE_TIMEOUT`]; a write may take [`WRITE_TIMEOUT`].

use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::time::timeout;

use super::{Stats, ASSIGNED_BODY, IDLE_TIMEOUT, STATS_PATH, WRITE_TIMEOUT};

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// A parsed request head: what the answer depends on.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub path: String,
    pub content_length: usize,
    /// The client asked to close after this answer (`Connection: close`, or HTTP/1.0
    /// without `Connection: keep-alive`).
    pub close: bool,
    pub chunked: bool,
}

/// Parses an HTTP/1.x request head (up to and excluding the blank line).
pub fn parse_head(head: &str) -> Option<RequestHead> {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let _method = request_line.next()?;
    let target = request_line.next()?;
    let version = request_line.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let http10 = version.eq_ignore_ascii_case("HTTP/1.0");
    let (mut content_length, mut close, mut keep_alive, mut chunked) = (0, false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                close |= token.trim().eq_ignore_ascii_case("close");
                keep_alive |= token.trim().eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    Some(RequestHead {
        path,
        content_length,
        close: close || (http10 && !keep_alive),
        chunked,
    })
}

fn response(status: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// What arrives within [`IDLE_TIMEOUT`]; 0, as at the end of the stream, when nothing does.
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) -> std::io::Result<usize> {
    timeout(IDLE_TIMEOUT, stream.read(buf))
        .await
        .unwrap_or(Ok(0))
}

/// Writes and flushes `bytes` within [`WRITE_TIMEOUT`].
async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    timeout(WRITE_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Serves requests on one TLS connection until the client closes, asks to, or is silent for
/// [`IDLE_TIMEOUT`].
pub(super) async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    resumed: bool,
    stats: &Stats,
) -> std::io::Result<()> {
    let counters = &stats.https;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut counted = false;
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                send(
                    &mut stream,
                    &response("431 Request Header Fields Too Large", "{}", true),
                )
                .await?;
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = read_some(&mut stream, &mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .ok()
            .and_then(parse_head);
        let Some(head) = head.filter(|h| !h.chunked && h.content_length <= MAX_BODY) else {
            send(&mut stream, &response("400 Bad Request", "{}", true)).await?;
            return Ok(());
        };
        // Skip the body.
        let body_end = head_end + 4 + head.content_length;
        while buf.len() < body_end {
            let mut chunk = [0u8; 4096];
            let n = read_some(&mut stream, &mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..body_end);
        let answer = if head.path == STATS_PATH {
            let stats = serde_json::to_string(&stats.snapshot()).unwrap_or_default();
            response("200 OK", &stats, head.close)
        } else {
            if !counted {
                counted = true;
                counters.connection(resumed);
            }
            counters.requests.fetch_add(1, Ordering::Relaxed);
            response("200 OK", ASSIGNED_BODY, head.close)
        };
        send(&mut stream, &answer).await?;
        if head.close {
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_say_length_and_close() {
        let h = parse_head(
            "PUT /0ne1/registrations/d-1/register?api-version=2021-06-01 HTTP/1.1\r\n\
             host: 127.0.0.9\r\ncontent-type: application/json\r\nContent-Length: 27",
        )
        .unwrap();
        assert_eq!(h.path, "/0ne1/registrations/d-1/register");
        assert_eq!(h.content_length, 27);
        assert!(!h.close && !h.chunked);
        let h = parse_head("GET / HTTP/1.1\r\nConnection: Close").unwrap();
        assert!(h.close);
        assert!(parse_head("GET / HTTP/1.0").unwrap().close);
        assert!(
            !parse_head("GET / HTTP/1.0\r\nconnection: keep-alive")
                .unwrap()
                .close
        );
        assert!(
            parse_head("POST / HTTP/1.1\r\ntransfer-encoding: chunked")
                .unwrap()
                .chunked
        );
        assert_eq!(parse_head("GET / HTTP/1.1\r\ncontent-length: x"), None);
        assert_eq!(parse_head("nonsense"), None);
    }
}
