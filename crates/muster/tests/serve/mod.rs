//! `muster serve` as a child process on a PostgreSQL store, for the tests that start nodes
//! (`postgres.rs`, `cluster_storm.rs`): [`Serve`] starts the real binary and waits until it
//! is running, and kills it on drop; [`muster`] runs the CLI with no `MUSTER_*` variables
//! from the test's environment.

// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_muster");

pub fn host() -> String {
    std::env::var("MUSTER_PG_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn muster(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("MUSTER_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c
}

/// A running `muster serve`; killed on drop.
pub struct Serve {
    pub child: Child,
    pub data_dir: PathBuf,
}

impl Serve {
    /// Starts `muster serve` with `extra` options and waits for its `connection.json`;
    /// `Err(stderr)` when it exits first.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<Serve, String> {
        Self::start_on(data_dir, "0", extra)
    }

    /// [`Serve::start`] on HTTPS port `https_port` ("0": the kernel picks). The built-in
    /// hub's name carries the port, so a node that must keep an installation's hub name (and
    /// so its records' etags) starts on the port the installation had.
    pub fn start_on(data_dir: &Path, https_port: &str, extra: &[&str]) -> Result<Serve, String> {
        Self::start_with_ports(data_dir, https_port, "0", extra)
    }

    /// [`Serve::start_on`] with MQTT port `mqtt_port` too (nodes sharing ports with
    /// `--reuse-port` name the first node's).
    pub fn start_with_ports(
        data_dir: &Path,
        https_port: &str,
        mqtt_port: &str,
        extra: &[&str],
    ) -> Result<Serve, String> {
        let _ = std::fs::remove_file(data_dir.join("connection.json"));
        let host = host();
        let mut args = vec![
            "serve",
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--dps-host",
            &host,
            "--https-port",
            https_port,
            "--mqtt-port",
            mqtt_port,
            "--amqp-port",
            "0",
        ];
        args.extend_from_slice(extra);
        let mut child = muster(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("muster serve runs");
        // `serve` prints "Muster is running." once connection.json is written; stdout closing
        // first means it exited.
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Muster is running") {
                    let _ = ready.send(());
                }
            }
        });
        let mut serve = Serve {
            child,
            data_dir: data_dir.to_path_buf(),
        };
        match started.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Ok(serve),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("muster serve did not start within 60 s")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = serve.child.wait().expect("wait");
                let mut stderr = String::new();
                if let Some(mut pipe) = serve.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                Err(format!("{status}: {stderr}"))
            }
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--data-dir", self.data_dir.to_str().expect("utf-8")]);
        muster(&all).output().expect("muster runs")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "muster {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    pub fn https_port(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("connection.json")).expect("read");
        let info: Value = serde_json::from_str(&text).expect("json");
        info["httpsPort"].as_u64().expect("httpsPort").to_string()
    }

    pub fn id_scope(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("connection.json")).expect("read");
        let info: Value = serde_json::from_str(&text).expect("json");
        info["id_scope"]
            .as_str()
            .or_else(|| info["idScope"].as_str())
            .expect("id scope in connection.json")
            .to_string()
    }

    /// Creates group `g` and registers `id` through it over HTTPS; returns the group key.
    pub fn register(&self, id: &str) -> String {
        if self
            .run(&["enrollment-group", "show", "g"])
            .status
            .success()
            .eq(&false)
        {
            self.json(&["enrollment-group", "create", "--group-id", "g"]);
        }
        let group = self.json(&["enrollment-group", "show", "g", "--show-keys"]);
        let key = group["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("group key")
            .to_string();
        let r = self.json(&[
            "device",
            "register",
            "--registration-id",
            id,
            "--group-key",
            &key,
        ]);
        assert_eq!(r["status"], "assigned", "{r}");
        key
    }

    pub fn stop(mut self) {
        // SIGTERM: the graceful path an operator takes.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        // `wait` returns once the process has exited; the test harness's timeout bounds it.
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "muster serve stopped with {status}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
