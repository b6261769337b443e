//! `muster bench tls-reference`: the physical limit to compare registrations with. TLS servers
//! with exactly the device listeners' settings (the data dir's server certificate, ring, TLS 1.2
//! and 1.3, the optional device-certificate request; ALPN `http/1.1` on HTTPS, none on MQTT, as
//! `muster serve`) that do nothing but the handshake, the protocol's least exchange and one
//! fixed answer per request, shaped like DPS's `assigned` answer so the unchanged device client
//! accepts it. No credential is checked and nothing is stored.
//!
//! Layout:
//! - this module — the arguments, the listeners (`--listen` for HTTPS, `--mqtt-listen` for
//!   MQTT), TLS handshakes (within [`TLS_HANDSHAKE_TIMEOUT`]), the connections' deadlines
//!   ([`IDLE_TIMEOUT`], [`WRITE_TIMEOUT`]) and the counters.
//! - [`https`] — HTTP/1.1 requests on a kept-open connection; `GET /_reference/stats` answers
//!   the counters of both listeners as JSON ([`ReferenceStats`], not counted).
//! - [`mqtt`] — an MQTT 3.1.1 session as a DPS device has it: CONNECT/CONNACK,
//!   SUBSCRIBE/SUBACK, and the fixed answer to each register publish.
//!
//! Each listener counts its connections (when they send their first fixed answer), resumed
//! handshakes, answers and failed handshakes; the counters are printed on exit.

pub mod https;
pub mod mqtt;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use super::target::{http_client, tls_config, Mode, ResolvedTarget};

/// The path of the counters.
pub const STATS_PATH: &str = "/_reference/stats";

/// The one answer: what Muster sends a device whose registration finished in the request.
const ASSIGNED_BODY: &str = r#"{"operationId":"5.0000000000000000.00000000000000000000000000000000","status":"assigned","registrationState":{"registrationId":"reference-device","assignedHub":"reference.hub","deviceId":"reference-device","status":"assigned","substatus":"initialAssignment","etag":"\"0000000000000000\""}}"#;

/// From accepting a TCP connection to the end of its TLS handshake (the listeners' default).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence of a client between requests (or packets) before its connection is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time to write one answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct TlsReferenceArgs {
    /// HTTPS address to listen on, e.g. 127.0.0.9:18444 (the server certificate must name its
    /// host); it also serves the counters
    #[arg(long)]
    pub listen: SocketAddr,
    /// Also listen for MQTT over TLS here, e.g. 127.0.0.9:18445
    #[arg(long)]
    pub mqtt_listen: Option<SocketAddr>,
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

/// What one listener of the reference server has seen. Connections are counted when they
/// serve their first fixed answer (so the stats requests themselves are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceCounters {
    /// Connections that served at least one answer.
    pub connections: u64,
    /// Of those, how many resumed an earlier TLS session instead of a full handshake.
    pub resumed_handshakes: u64,
    /// Fixed answers sent.
    pub requests: u64,
    /// Accepted TCP connections whose TLS handshake failed or timed out.
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

/// The counters of both listeners, as `GET /_reference/stats` answers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceStats {
    pub https: ReferenceCounters,
    pub mqtt: ReferenceCounters,
}

impl ReferenceStats {
    /// The counters of the listener that `mode` loads (`None`: the reference has no AMQP).
    pub fn of_mode(&self, mode: Mode) -> Option<ReferenceCounters> {
        match mode {
            Mode::HttpsFresh | Mode::HttpsKeepalive => Some(self.https),
            Mode::MqttFresh => Some(self.mqtt),
            Mode::AmqpFresh => None,
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
    /// A connection sends its first fixed answer.
    fn connection(&self, resumed: bool) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        if resumed {
            self.resumed_handshakes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> ReferenceCounters {
        ReferenceCounters {
            connections: self.connections.load(Ordering::Relaxed),
            resumed_handshakes: self.resumed_handshakes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failed_handshakes: self.failed_handshakes.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Stats {
    https: Counters,
    mqtt: Counters,
}

impl Stats {
    fn snapshot(&self) -> ReferenceStats {
        ReferenceStats {
            https: self.https.snapshot(),
            mqtt: self.mqtt.snapshot(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Https,
    Mqtt,
}

async fn handle(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    stats: Arc<Stats>,
    protocol: Protocol,
) {
    let _ = tcp.set_nodelay(true);
    let counters = match protocol {
        Protocol::Https => &stats.https,
        Protocol::Mqtt => &stats.mqtt,
    };
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => {
            counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    match protocol {
        Protocol::Https => {
            let _ = https::serve_connection(tls, resumed, &stats).await;
        }
        Protocol::Mqtt => mqtt::serve_connection(tls, resumed, counters).await,
    }
}

/// The next connection of the MQTT listener; never, when there is none.
async fn accept_mqtt(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!(
            "the TLS reference listens on loopback addresses only (127.0.0.0/8, ::1), not {addr}"
        );
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

pub async fn run(a: TlsReferenceArgs) -> anyhow::Result<()> {
    let (cert, key) = match (&a.tls_cert, &a.tls_key, &a.data_dir) {
        (Some(c), Some(k), _) => (c.clone(), k.clone()),
        (_, _, Some(d)) => (
            d.join(muster_server::tls::SERVER_CERT_FILE),
            d.join(muster_server::tls::SERVER_KEY_FILE),
        ),
        _ => bail!("pass --data-dir of `muster serve` (or --tls-cert and --tls-key)"),
    };
    let identity = muster_server::tls::ServerIdentity::from_pem_files(&cert, &key)?;
    // The device listeners' configurations, exactly: the optional device certificate request
    // on both, ALPN http/1.1 on HTTPS and none on MQTT.
    let https_acceptor =
        tokio_rustls::TlsAcceptor::from(identity.rustls_config_with(&[b"http/1.1"], true)?);
    let mqtt_acceptor = tokio_rustls::TlsAcceptor::from(identity.rustls_config_with(&[], true)?);
    let https_listener = bind(a.listen).await?;
    let mqtt_listener = match a.mqtt_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let stats = Arc::new(Stats::default());
    let mqtt_note = match &mqtt_listener {
        Some(l) => format!(" and {} (MQTT)", l.local_addr()?),
        None => String::new(),
    };
    eprintln!(
        "TLS reference listening on {} (HTTPS){mqtt_note}, certificate {}, stats at {STATS_PATH}",
        https_listener.local_addr()?,
        cert.display()
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            accepted = https_listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                tokio::spawn(handle(tcp, https_acceptor.clone(), stats.clone(), Protocol::Https));
            }
            accepted = accept_mqtt(mqtt_listener.as_ref()) => {
                let Ok((tcp, _)) = accepted else { continue };
                tokio::spawn(handle(tcp, mqtt_acceptor.clone(), stats.clone(), Protocol::Mqtt));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    println!("{}", serde_json::to_string(&stats.snapshot())?);
    Ok(())
}

/// Reads the reference server's counters over an HTTPS connection of its own (not counted).
pub async fn fetch_reference_stats(target: &ResolvedTarget) -> anyhow::Result<ReferenceStats> {
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
