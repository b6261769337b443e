//! `muster backup` of a running server and `muster restore` into a fresh data dir, started
//! under another address: every enrollment, record and hub device intact, the built-in hub's
//! references renamed, devices register again and connect to the hub. And the refusals: a
//! non-empty target, an archive without the sealing key, a database from a newer Muster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use muster_server::{Config, ConnectionInfo, Server};
use serde_json::Value;
use sha2::Sha256;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

fn muster(cwd: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("MUSTER_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c.output().expect("muster runs")
}

fn ok(cwd: &Path, args: &[&str]) -> Output {
    let out = muster(cwd, args);
    assert!(
        out.status.success(),
        "muster {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

fn fails(cwd: &Path, args: &[&str]) -> String {
    let out = muster(cwd, args);
    assert!(!out.status.success(), "muster {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A service or device command against the server of `data_dir`, output as JSON.
fn json(cwd: &Path, data_dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--data-dir", data_dir.to_str().unwrap(), "--output", "json"]);
    let out = ok(cwd, &all);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start(rt: &tokio::runtime::Runtime, data_dir: PathBuf, host: &str) -> Server {
    rt.block_on(Server::start(Config {
        data_dir,
        dps_host: host.into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    }))
    .expect("server starts")
}

fn device_key(group_key: &str, id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&B64.decode(group_key).unwrap()).unwrap();
    mac.update(id.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

#[test]
fn backup_of_a_running_server_restores_under_another_address() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let a_dir = cwd.join("a");
    let server = start(&rt, a_dir.clone(), "127.0.0.1");
    let old_hub = server.connection.hubs[0].host_name.clone();

    // An enrollment group with a registered device, and an individual enrollment pinned to
    // the built-in hub by name.
    json(
        cwd,
        &a_dir,
        &["enrollment-group", "create", "--group-id", "g"],
    );
    let g = json(
        cwd,
        &a_dir,
        &["enrollment-group", "show", "g", "--show-keys"],
    );
    let group_key = g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let solo_key = B64.encode([7u8; 32]);
    json(
        cwd,
        &a_dir,
        &[
            "enrollment",
            "create",
            "--enrollment-id",
            "solo",
            "--primary-key",
            &solo_key,
            "--iot-hubs",
            &old_hub,
            "--allocation-policy",
            "static",
        ],
    );
    for (id, key) in [("dev-1", &group_key), ("solo", &solo_key)] {
        let flag = if id == "solo" { "--key" } else { "--group-key" };
        let r = json(
            cwd,
            &a_dir,
            &["device", "register", "--registration-id", id, flag, key],
        );
        assert_eq!(r["status"], "assigned", "{r}");
        assert_eq!(r["assignedHub"], old_hub.as_str());
    }

    // Online backup, while the server runs.
    let archive = cwd.join("backup.tar");
    let out = ok(
        cwd,
        &[
            "backup",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--out",
            archive.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds secrets"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&archive).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A write after the snapshot is not in it.
    json(
        cwd,
        &a_dir,
        &["enrollment-group", "create", "--group-id", "later"],
    );
    rt.block_on(server.shutdown());

    // Refusals leave the target untouched.
    let busy = cwd.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let err = fails(
        cwd,
        &[
            "restore",
            archive.to_str().unwrap(),
            "--data-dir",
            busy.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("is not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    let unpacked = cwd.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let tar = |args: &[&str]| {
        let s = Command::new("tar")
            .args(args)
            .current_dir(&unpacked)
            .status()
            .unwrap();
        assert!(s.success(), "tar {args:?}");
    };
    tar(&["-xf", archive.to_str().unwrap()]);
    let keyless = cwd.join("keyless.tar");
    tar(&[
        "-cf",
        keyless.to_str().unwrap(),
        "muster-backup.json",
        "muster.db",
        "ca.pem",
    ]);
    let err = fails(
        cwd,
        &[
            "restore",
            keyless.to_str().unwrap(),
            "--data-dir",
            cwd.join("k").to_str().unwrap(),
        ],
    );
    assert!(err.contains("sealing key missing"), "{err}");
    assert!(!cwd.join("k/muster.db").exists());

    let conn = rusqlite::Connection::open(unpacked.join("muster.db")).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 'future')",
        [],
    )
    .unwrap();
    drop(conn);
    let newer = cwd.join("newer.tar");
    tar(&[
        "-cf",
        newer.to_str().unwrap(),
        "muster-backup.json",
        "muster.db",
        "muster.db.key",
    ]);
    let err = fails(
        cwd,
        &[
            "restore",
            newer.to_str().unwrap(),
            "--data-dir",
            cwd.join("n").to_str().unwrap(),
        ],
    );
    assert!(err.contains("newer Muster") && err.contains("999"), "{err}");

    // Restore into a fresh dir and start under another address.
    let b_dir = cwd.join("b");
    ok(
        cwd,
        &[
            "restore",
            archive.to_str().unwrap(),
            "--data-dir",
            b_dir.to_str().unwrap(),
        ],
    );
    let server = start(&rt, b_dir.clone(), "localhost");
    let info: ConnectionInfo = server.connection.clone();
    let new_hub = info.hubs[0].host_name.clone();
    assert_ne!(new_hub, old_hub);

    let groups = json(cwd, &b_dir, &["enrollment-group", "list"]);
    let ids: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["enrollmentGroupId"].as_str())
        .collect();
    assert_eq!(ids, ["g"], "the snapshot, not what came after");
    let g = json(
        cwd,
        &b_dir,
        &["enrollment-group", "show", "g", "--show-keys"],
    );
    assert_eq!(
        g["attestation"]["symmetricKey"]["primaryKey"],
        group_key.as_str()
    );
    let solo = json(cwd, &b_dir, &["enrollment", "show", "solo"]);
    assert_eq!(solo["iotHubs"], serde_json::json!([new_hub.as_str()]));
    for id in ["dev-1", "solo"] {
        let r = json(cwd, &b_dir, &["registration", "show", id]);
        assert_eq!(r["assignedHub"], new_hub.as_str(), "{r}");
        let d = json(cwd, &b_dir, &["hub", "device", "show", id]);
        assert_eq!(d["deviceId"], id);
    }
    let hubs = json(cwd, &b_dir, &["linked-hub", "list"]);
    assert_eq!(hubs.as_array().map(Vec::len), Some(1), "{hubs}");

    // Devices register again (same hub identity, new name) and connect to the hub.
    for (id, key) in [
        ("dev-1", device_key(&group_key, "dev-1")),
        ("solo", solo_key.clone()),
    ] {
        let r = json(
            cwd,
            &b_dir,
            &["device", "register", "--registration-id", id, "--key", &key],
        );
        assert_eq!(r["status"], "assigned", "{r}");
        assert_eq!(r["assignedHub"], new_hub.as_str());
        assert_eq!(r["deviceId"], id);
        let hub = rt
            .block_on(muster_client::HubDeviceConnection::connect(
                &new_hub,
                info.mqtt_port,
                id,
                &key,
                info.ca_certificate.as_deref(),
            ))
            .expect("the device connects to the restored hub");
        rt.block_on(hub.close());
    }
    rt.block_on(server.shutdown());
}
