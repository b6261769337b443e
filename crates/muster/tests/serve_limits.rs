//! `muster serve`'s connection limits: flags and environment reach the config, and under a
//! low `RLIMIT_NOFILE` it fits its connection limits to the descriptors and says so, and when
//! descriptors run out anyway it backs off instead of spinning, writes a bounded log, keeps
//! serving the connections it has and recovers.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use muster_server::ConnectionInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const NOFILE: u64 = 256;

/// The server process, killed when the test ends however it ends.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// `rlim_t` is not `u64` on every target.
#[allow(clippy::unnecessary_cast)]
fn set_nofile(pid: Option<i32>, limit: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: both calls only read `lim`; prlimit writes nothing when `old` is null.
    let rc = unsafe {
        match pid {
            None => libc::setrlimit(libc::RLIMIT_NOFILE, &lim),
            Some(pid) => libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()),
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn log_text(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
async fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// One request on `tls` (kept alive); the status line's code.
async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(tls: &mut S) -> String {
    tls.write_all(b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await.unwrap();
    // Drain the rest of the (small) response so the next one starts clean.
    let mut rest = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut rest)).await;
    String::from_utf8_lossy(&head[9..12]).into_owned()
}

async fn tls_connect(
    info: &ConnectionInfo,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = muster_client::tls::client_config(info.ca_certificate.as_deref()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

#[tokio::test]
async fn out_of_descriptors_the_server_backs_off_logs_little_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("serve.log");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--dps-host", "127.0.0.1", "--https-port", "0"])
        .args(["--mqtt-port", "0", "--amqp-port", "0"])
        .args(["--tls-handshake-timeout-ms", "500"])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| set_nofile(None, NOFILE));
    }
    let server = Serve(cmd.spawn().unwrap());
    let pid = server.0.id();
    assert!(
        wait_for(Duration::from_secs(30), || data
            .join("connection.json")
            .exists())
        .await,
        "the server did not start: {}",
        log_text(&log)
    );
    let info = ConnectionInfo::read(&data).unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", info.https_port).parse().unwrap();

    // (256 - 128 reserved) / 3 listeners (HTTPS, MQTT, AMQP).
    let start_log = log_text(&log);
    let limits = start_log
        .lines()
        .find(|l| l.contains("connection limits"))
        .unwrap_or_else(|| panic!("no connection limits logged: {start_log}"));
    assert!(limits.contains("descriptors_soft=256"), "{limits}");
    assert!(
        limits.contains("max_connections_per_listener=42"),
        "{limits}"
    );

    // A kept-alive connection from before the shortage.
    let mut kept = tls_connect(&info, https).await.unwrap();
    assert_eq!(request(&mut kept).await, "404");

    // Descriptors run out: the server may open only a few more.
    let in_use = open_descriptors(pid);
    assert!(in_use > 0);
    set_nofile(Some(pid as i32), in_use + 4).unwrap();
    let mut flood = Vec::new();
    for _ in 0..60 {
        if let Ok(c) = std::net::TcpStream::connect(https) {
            flood.push(c);
        }
    }
    let accept_failures = |text: &str| text.matches("accept failed").count();
    assert!(
        wait_for(Duration::from_secs(5), || accept_failures(&log_text(&log))
            > 0)
        .await,
        "accept never failed: {}",
        log_text(&log)
    );
    // Let the shortage last: without a back-off this is millions of log lines.
    let log_len_before = std::fs::metadata(&log).unwrap().len();
    let shortage = Instant::now();
    // The server still serves what it has: the kept-alive connection answers.
    assert_eq!(request(&mut kept).await, "404");
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(shortage.elapsed())).await;
    let text = log_text(&log);
    assert!(
        accept_failures(&text) <= 2,
        "{} accept failures logged",
        accept_failures(&text)
    );
    let grown = std::fs::metadata(&log).unwrap().len() - log_len_before;
    assert!(grown < 16 * 1024, "the log grew {grown} bytes in 1.5 s");

    // The shortage ends: new connections are served again.
    drop(flood);
    let recovered = async {
        loop {
            if let Ok(mut c) = tls_connect(&info, https).await {
                return request(&mut c).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(10), recovered)
        .await
        .expect("a new connection is served once descriptors are free");
    assert_eq!(status, "404");
    drop(server);
}

#[test]
fn limits_and_deadlines_come_from_flags_and_environment() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--print-config",
            "--max-unauthenticated-per-address",
            "5",
        ])
        .args([
            "--http-idle-timeout-ms",
            "1234",
            "--mqtt-max-idle-secs",
            "90",
        ])
        .env("MUSTER_MQTT_AUTH_TIMEOUT_MS", "4321")
        .env("MUSTER_MAX_CONNECTIONS", "77")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8_lossy(&out.stdout);
    for line in [
        "max-connections = 77",
        "max-unauthenticated-per-address = 5",
        "http-idle-timeout-ms = 1234",
        "mqtt-auth-timeout-ms = 4321",
        "mqtt-max-idle-secs = 90",
        "tls-handshake-timeout-ms = 10000",
    ] {
        assert!(toml.lines().any(|l| l == line), "{line} in {toml}");
    }
}

#[test]
fn reuse_port_comes_from_the_flag_or_the_environment() {
    let print = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args(["serve", "--print-config"]).args(args);
        c.env_remove("MUSTER_REUSE_PORT");
        if let Some(v) = env {
            c.env("MUSTER_REUSE_PORT", v);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let has = |toml: &str, line: &str| toml.lines().any(|l| l == line);
    assert!(has(&print(&[], None), "reuse-port = false"));
    assert!(has(&print(&["--reuse-port"], None), "reuse-port = true"));
    assert!(has(&print(&[], Some("true")), "reuse-port = true"));
}
