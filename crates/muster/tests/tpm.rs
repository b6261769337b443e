//! The TPM roles end to end with a real software TPM (Debian's swtpm, started here on
//! 127.0.0.34 with free ports and killed at the end) and the `muster` binary built with the
//! `tpm` feature: `muster tpm show-ek`, `muster enrollment create --attestation-type tpm`,
//! `muster device register --tpm` over HTTPS, then the device connects to the built-in hub
//! with a SAS token its TPM signs with the key it was given, and sends telemetry.
//!
//! Run with `cargo test -p muster --features tpm --test tpm`.

#![cfg(feature = "tpm")]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use muster_client::{HubClient, HubDeviceConnection, Tpm};
use muster_server::{Config, Server};
use serde_json::Value;
use sha2::Sha256;

const BIN: &str = env!("CARGO_BIN_EXE_muster");
const IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 34);

/// swtpm on `IP`, its state in a temporary directory; killed when dropped.
struct SwTpm {
    child: Child,
    _dir: tempfile::TempDir,
    tcti: String,
}

impl SwTpm {
    fn start() -> SwTpm {
        let dir = tempfile::tempdir().expect("tempdir");
        // The swtpm TCTI takes the control port to be the server port + 1.
        let (port, ctrl) = (0..100)
            .find_map(|_| {
                let a = TcpListener::bind((IP, 0)).ok()?;
                let p = a.local_addr().ok()?.port();
                (p < u16::MAX && TcpListener::bind((IP, p + 1)).is_ok()).then_some((p, p + 1))
            })
            .expect("two consecutive free ports");
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr={IP}"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr={IP}"))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is not installed (Debian package swtpm)");
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in [port, ctrl] {
            while TcpStream::connect(SocketAddr::from((IP, p))).is_err() {
                assert!(Instant::now() < deadline, "swtpm did not start");
                std::thread::yield_now();
            }
        }
        SwTpm {
            child,
            _dir: dir,
            tcti: format!("swtpm:host={IP},port={port}"),
        }
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `muster ARGS`, with `--data-dir` when given (service and device commands).
fn muster(data_dir: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    if let Some(d) = data_dir {
        c.arg("--data-dir").arg(d);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("MUSTER_") {
            c.env_remove(k);
        }
    }
    c.output().expect("muster runs")
}

fn json_of(out: Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn the_cli_registers_a_tpm_device_that_then_sends_telemetry_signed_in_its_tpm() {
    let swtpm = SwTpm::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = rt
        .block_on(Server::start(Config {
            data_dir: data.clone(),
            dps_host: IP.to_string(),
            https_port: 0,
            mqtt_port: 0,
            amqp_port: 0,
            ..Config::default()
        }))
        .expect("server starts");
    let info = server.connection.clone();

    // Developer: read the EK and the registration id derived from it (the EK and SRK are
    // created and persisted on first use).
    let ek = json_of(
        muster(
            None,
            &["tpm", "show-ek", "--tcti", &swtpm.tcti, "-o", "json"],
        ),
        "tpm show-ek",
    );
    let rid = ek["registrationId"].as_str().expect("registrationId");
    let ek_b64 = ek["endorsementKey"].as_str().expect("endorsementKey");
    let ek_bytes = B64.decode(ek_b64).expect("base64");
    assert_eq!(ek_bytes.len(), 316, "RSA-2048 EK TPM2B_PUBLIC");
    assert_eq!(&ek_bytes[..4], &[0x01, 0x3a, 0x00, 0x01]);
    assert_eq!(rid, muster_attestation::tpm::registration_id(&ek_bytes));
    // Read again: the same persisted EK.
    let again = json_of(
        muster(
            None,
            &["tpm", "show-ek", "--tcti", &swtpm.tcti, "-o", "json"],
        ),
        "tpm show-ek",
    );
    assert_eq!(again, ek);

    // Operator: enroll the EK.
    json_of(
        muster(
            Some(&data),
            &[
                "enrollment",
                "create",
                "--registration-id",
                rid,
                "--attestation-type",
                "tpm",
                "--endorsement-key",
                ek_b64,
                "--device-id",
                "tpm-cli-device",
                "-o",
                "json",
            ],
        ),
        "enrollment create",
    );

    // Device: register with the TPM (the registration id defaults to the EK's).
    let r = json_of(
        muster(
            Some(&data),
            &[
                "device",
                "register",
                "--tpm",
                "--tcti",
                &swtpm.tcti,
                "-o",
                "json",
            ],
        ),
        "device register --tpm",
    );
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["registrationId"], rid, "{r}");
    assert_eq!(r["deviceId"], "tpm-cli-device", "{r}");
    let hub_host = info.hubs[0].host_name.clone();
    assert_eq!(r["assignedHub"], hub_host.as_str(), "{r}");
    assert!(r["tpm"]["authenticationKey"].is_string(), "{r}");

    // The TPM holds the hub key at 0x81000100: what it signs verifies with the key the hub
    // identity was created with.
    let ca = info.ca_certificate.clone();
    let hub = HubClient::from_connection_string(&info.hubs[0].connection_string, ca.as_deref())
        .expect("hub client");
    let device = rt
        .block_on(hub.get_device("tpm-cli-device"))
        .expect("the hub has the device");
    let hub_key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("a SAS device")
        .to_string();
    let mut tpm = Tpm::open(&swtpm.tcti).expect("the TPM opens");
    tpm.load_device_key().expect("the hub key is persisted");
    let probe = format!("{hub_host}/devices/tpm-cli-device\n1700000000");
    let mut mac = Hmac::<Sha256>::new_from_slice(&B64.decode(&hub_key).unwrap()).unwrap();
    mac.update(probe.as_bytes());
    assert_eq!(
        tpm.hmac(probe.as_bytes()).expect("HMAC in the TPM"),
        mac.finalize().into_bytes().to_vec()
    );

    // The device connects to the hub with a token signed in its TPM and sends telemetry.
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let token = tpm
        .sas_token(&format!("{hub_host}/devices/tpm-cli-device"), None, expiry)
        .expect("token signed in the TPM");
    drop(tpm);
    let mut conn = rt
        .block_on(HubDeviceConnection::connect_with_token(
            &hub_host,
            info.mqtt_port,
            "tpm-cli-device",
            token,
            ca.as_deref(),
        ))
        .expect("the hub accepts the TPM-signed token");
    rt.block_on(conn.send_event(br#"{"from":"tpm"}"#, &[("kind", "tpm")]))
        .expect("telemetry sent");
    rt.block_on(conn.close());
    let stored = rt
        .block_on(hub.read_telemetry("tpm-cli-device", 0, 10))
        .expect("telemetry read");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].body_bytes(), br#"{"from":"tpm"}"#);

    // Registering again with the same TPM: the same device and hub, and the key persisted
    // again still signs for it.
    let again = json_of(
        muster(
            Some(&data),
            &[
                "device",
                "register",
                "--tpm",
                "--tcti",
                &swtpm.tcti,
                "-o",
                "json",
            ],
        ),
        "device register --tpm, again",
    );
    assert_eq!(again["status"], "assigned", "{again}");
    assert_eq!(again["deviceId"], "tpm-cli-device", "{again}");
    assert_eq!(again["assignedHub"], hub_host.as_str(), "{again}");
    let mut tpm = Tpm::open(&swtpm.tcti).expect("the TPM opens");
    tpm.load_device_key().expect("the hub key is persisted");
    let mut mac = Hmac::<Sha256>::new_from_slice(&B64.decode(&hub_key).unwrap()).unwrap();
    mac.update(probe.as_bytes());
    assert_eq!(
        tpm.hmac(probe.as_bytes()).expect("HMAC in the TPM"),
        mac.finalize().into_bytes().to_vec()
    );
    drop(tpm);

    // A TPM whose EK is not enrolled is refused with the service's code.
    let other = SwTpm::start();
    let out = muster(
        Some(&data),
        &[
            "device",
            "register",
            "--tpm",
            "--tcti",
            &other.tcti,
            "--registration-id",
            rid,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401013"), "{err}");

    rt.block_on(server.shutdown());
}
