//! `muster serve`'s log output: with `--log-format json` every line it writes parses as JSON,
//! refused requests and connections leave debug lines (status, code, failed check) without
//! secrets; with text to a file there are no ANSI colour codes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use muster_server::ConnectionInfo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

/// The server process, killed when the test ends however it ends.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serve {
    /// Starts `muster serve` on loopback with free ports, stdout and stderr to files.
    fn start(dir: &Path, extra: &[&str], rust_log: &str) -> Serve {
        let child = Command::new(BIN)
            .args(["serve", "--dps-host", "127.0.0.1", "--https-port", "0"])
            .args(["--mqtt-port", "0", "--amqp-port", "0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .env("RUST_LOG", rust_log)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        Serve(child)
    }

    /// Waits (bounded) for `connection.json`, written once every listener is bound.
    async fn connection(&mut self, dir: &Path) -> ConnectionInfo {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(info) = ConnectionInfo::read(&dir.join("data")) {
                return info;
            }
            if let Ok(Some(status)) = self.0.try_wait() {
                panic!(
                    "muster serve exited with {status}: {}",
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "no connection.json");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(&mut self) {
        // SAFETY: signals our own child, whose pid we hold and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                assert!(status.success(), "exit status {status}");
                return;
            }
            assert!(Instant::now() < deadline, "muster serve did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends one HTTP/1.1 request over TLS and returns the status code.
async fn https_request(info: &ConnectionInfo, method: &str, path: &str) -> u16 {
    let config = muster_client::tls::client_config(info.ca_certificate.as_deref()).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], info.https_port));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Polls until `path`'s text holds `needle` (log lines are written as events happen).
async fn wait_for_log(path: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_refusals_are_logged_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), &["--log-format", "json"], "debug");
    let info = serve.connection(dir.path()).await;

    assert_eq!(https_request(&info, "GET", "/no-such-route").await, 404);
    assert_eq!(https_request(&info, "DELETE", "/healthz").await, 405);
    let unsigned = "/enrollments/dev-1?api-version=2021-10-01";
    assert_eq!(https_request(&info, "GET", unsigned).await, 401);
    // Not TLS at all: the handshake is refused.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", info.https_port))
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut sink)).await;
    let stderr = dir.path().join("stderr.log");
    assert!(wait_for_log(&stderr, "TLS handshake failed").await);
    assert!(wait_for_log(&stderr, "405000").await);
    serve.stop().await;

    let mut lines = Vec::new();
    for file in ["stdout.log", "stderr.log"] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
        for line in text.lines() {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{file}: not JSON ({e}): {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(value[key].is_string(), "{key} missing: {line}");
            }
            lines.push(value);
        }
    }
    assert!(lines.iter().any(|l| l["message"] == "Muster is running"));
    let refused = |status: u64, code: u64| {
        lines.iter().any(|l| {
            l["message"] == "request refused"
                && l["level"] == "DEBUG"
                && l["fields"]["status"] == status
                && l["fields"]["error_code"] == code
                && l["fields"]["check"].as_str().is_some_and(|c| !c.is_empty())
        })
    };
    assert!(refused(404, 404000), "no 404 line");
    assert!(refused(405, 405000), "no 405 line");
    assert!(refused(401, 401000), "no 401 line");
    // The query (where a token could travel) is never logged.
    assert!(!lines.iter().any(|l| l.to_string().contains("api-version=")));
    assert!(lines
        .iter()
        .any(|l| l["message"] == "connection refused: TLS handshake failed"));

    // The service key never reaches the log.
    let key = info
        .service_connection_string
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap()
        .to_string();
    for file in ["stdout.log", "stderr.log"] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
        assert!(!text.contains(&key), "{file} holds the service key");
    }
}

#[tokio::test]
async fn text_logs_written_to_a_file_hold_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), &[], "debug");
    let info = serve.connection(dir.path()).await;
    assert_eq!(https_request(&info, "GET", "/no-such-route").await, 404);
    let stderr = dir.path().join("stderr.log");
    assert!(wait_for_log(&stderr, "request refused").await);
    serve.stop().await;
    let out = std::fs::read(dir.path().join("stdout.log")).unwrap();
    let err = std::fs::read(&stderr).unwrap();
    assert!(String::from_utf8_lossy(&out).contains("Muster is running."));
    assert!(String::from_utf8_lossy(&err).contains("listening"));
    for (name, bytes) in [("stdout", &out), ("stderr", &err)] {
        assert!(
            !bytes.windows(2).any(|w| w == b"\x1b["),
            "{name} holds ANSI escape codes"
        );
    }
}
