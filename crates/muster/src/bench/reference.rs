//! `muster bench tls-reference`: the physical limit to compare registrations with. A TLS
//! server with exactly the HTTPS listener's settings (the data dir's server certificate, ring,
//! TLS 1.2 and 1.3, ALPN `http/1.1`, the optional device-certificate request) that does
//! nothing but the handshake and one fixed answer per request, shaped like DPS's `assigned`
//! answer so the unchanged device client accepts it. It keeps the connection open unless the
//! client asks to close it, and counts connections, resumed handshakes and requests, served
//! as JSON at `GET /_reference/stats` (not counted) and printed on exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::target::{http_client, tls_config, ResolvedTarget};

/// The path of the counters.
pub const STATS_PATH: &str = "/_reference/stats";

/// The one answer: what Muster sends a device whose registration finished in the request.
const ASSIGNED_BODY: &str = r#"{"operationId":"5.0000000000000000.00000000000000000000000000000000","status":"assigned","registrationState":{"registrationId":"reference-device","assignedHub":"reference.hub","deviceId":"reference-device","status":"assigned","substatus":"initialAssignment","etag":"\"0000000000000000\""}}"#;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Args, Debug)]
pub struct TlsReferenceArgs {
    /// Address to listen on, e.g. 127.0.0.9:18444 (the server certificate must name its host)
    #[arg(long)]
    pub listen: SocketAddr,
    /// Data dir of `muster serve`: its server.pem and server.key are presented
    #[arg(long, env = "MUSTER_DATA_DIR", required_unless_present_all = ["tls_cert", "tls_key"])]
    pub data_dir: Option<PathBuf>,
    /// PEM certificate chain to present instead of DATA_DIR/server.pem
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key instead of DATA_DIR/server.key
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// What the reference server has seen. Connections are counted when they serve their first
/// fixed answer (so the stats requests themselves are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceCounters {
    /// Connections that served at least one answer.
    pub connections: u64,
    /// Of those, how many resumed an earlier TLS session instead of a full handshake.
    pub resumed_handshakes: u64,
    /// Fixed answers sent.
    pub requests: u64,
    /// Accepted TCP connections whose TLS handshake failed.
    pub failed_handshakes: u64,
}

impl ReferenceCounters {
    /// The counts between `earlier` and `self`.
    pub fn since(&self, earlier: &ReferenceCounters) -> ReferenceCounters {
        ReferenceCounters {
            connections: self.connections.saturating_sub(earlier.connections),
            resumed_handshakes: self
                .resumed_handshakes
                .saturating_sub(earlier.resumed_handshakes),
            requests: self.requests.saturating_sub(earlier.requests),
            failed_handshakes: self
                .failed_handshakes
                .saturating_sub(earlier.failed_handshakes),
        }
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    resumed_handshakes: AtomicU64,
    requests: AtomicU64,
    failed_handshakes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ReferenceCounters {
        ReferenceCounters {
            connections: self.connections.load(Ordering::Relaxed),
            resumed_handshakes: self.resumed_handshakes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failed_handshakes: self.failed_handshakes.load(Ordering::Relaxed),
        }
    }
}

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

/// Serves requests on one TLS connection until the client closes or asks to.
async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    resumed: bool,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut counted = false;
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                stream
                    .write_all(&response("431 Request Header Fields Too Large", "{}", true))
                    .await?;
                return Ok(());
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .ok()
            .and_then(parse_head);
        let Some(head) = head.filter(|h| !h.chunked && h.content_length <= MAX_BODY) else {
            stream
                .write_all(&response("400 Bad Request", "{}", true))
                .await?;
            return Ok(());
        };
        // Skip the body.
        let body_end = head_end + 4 + head.content_length;
        while buf.len() < body_end {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..body_end);
        let answer = if head.path == STATS_PATH {
            let stats = serde_json::to_string(&counters.snapshot()).unwrap_or_default();
            response("200 OK", &stats, head.close)
        } else {
            if !counted {
                counted = true;
                counters.connections.fetch_add(1, Ordering::Relaxed);
                if resumed {
                    counters.resumed_handshakes.fetch_add(1, Ordering::Relaxed);
                }
            }
            counters.requests.fetch_add(1, Ordering::Relaxed);
            response("200 OK", ASSIGNED_BODY, head.close)
        };
        stream.write_all(&answer).await?;
        stream.flush().await?;
        if head.close {
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

async fn handle(tcp: TcpStream, acceptor: tokio_rustls::TlsAcceptor, counters: Arc<Counters>) {
    let _ = tcp.set_nodelay(true);
    let tls = match acceptor.accept(tcp).await {
        Ok(s) => s,
        Err(_) => {
            counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let _ = serve_connection(tls, resumed, &counters).await;
}

pub async fn run(a: TlsReferenceArgs) -> anyhow::Result<()> {
    if !a.listen.ip().is_loopback() {
        bail!("the TLS reference listens on loopback addresses only (127.0.0.0/8, ::1)");
    }
    let (cert, key) = match (&a.tls_cert, &a.tls_key, &a.data_dir) {
        (Some(c), Some(k), _) => (c.clone(), k.clone()),
        (_, _, Some(d)) => (
            d.join(muster_server::tls::SERVER_CERT_FILE),
            d.join(muster_server::tls::SERVER_KEY_FILE),
        ),
        _ => bail!("pass --data-dir of `muster serve` (or --tls-cert and --tls-key)"),
    };
    let identity = muster_server::tls::ServerIdentity::from_pem_files(&cert, &key)?;
    // The HTTPS listener's configuration, exactly: ALPN http/1.1 and the optional device
    // certificate request.
    let config = identity.rustls_config_with(&[b"http/1.1"], true)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let counters = Arc::new(Counters::default());
    eprintln!(
        "TLS reference listening on {} ({}), stats at {STATS_PATH}",
        listener.local_addr()?,
        cert.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                tokio::spawn(handle(tcp, acceptor.clone(), counters.clone()));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    println!("{}", serde_json::to_string(&counters.snapshot())?);
    Ok(())
}

/// Reads the reference server's counters over a connection of its own (not counted).
pub async fn fetch_reference_counters(
    target: &ResolvedTarget,
) -> anyhow::Result<ReferenceCounters> {
    let http = http_client(tls_config(target)?, 0)?;
    let url = format!("https://{}{STATS_PATH}", target.endpoint);
    let resp = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("reading the TLS reference's counters at {url}"))?;
    if !resp.status().is_success() {
        bail!(
            "{url} answered {}: is it `muster bench tls-reference`?",
            resp.status()
        );
    }
    resp.json()
        .await
        .with_context(|| format!("{url}: not the TLS reference's counters"))
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

    #[test]
    fn the_answer_is_an_assigned_registration() {
        let op: muster_proto::device::RegistrationOperationStatus =
            serde_json::from_str(ASSIGNED_BODY).unwrap();
        assert_eq!(op.status, muster_proto::RegistrationStatus::Assigned);
    }

    #[test]
    fn counters_subtract() {
        let a = ReferenceCounters {
            connections: 5,
            resumed_handshakes: 1,
            requests: 9,
            failed_handshakes: 0,
        };
        let b = ReferenceCounters {
            connections: 25,
            resumed_handshakes: 1,
            requests: 29,
            failed_handshakes: 2,
        };
        assert_eq!(
            b.since(&a),
            ReferenceCounters {
                connections: 20,
                resumed_handshakes: 0,
                requests: 20,
                failed_handshakes: 2
            }
        );
    }
}
