//! `muster serve` refuses a bad configuration with one clear line and a non-zero exit, not
//! with a Debug dump or a backtrace.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

#[test]
fn an_invalid_config_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("muster.toml");
    std::fs::write(&config, "hub-session-expiry-secs = 0\n").expect("config");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args([
            "--dps-host",
            "127.0.0.1",
            "--https-port",
            "0",
            "--mqtt-port",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // A backtrace must not appear even when asked for.
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        vec!["error: hub-session-expiry-secs must be at least 1"],
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing announced");
    assert!(!dir.path().join("data").exists(), "nothing created");
}
