//! `muster bench` against real servers started in-process on 127.0.0.1 (port 0, temporary
//! data dirs): the load generator in every mode, the TLS reference's handshake counts (HTTPS
//! and MQTT), and the service API benchmark over seeded registration records.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use muster_server::{Config, Server};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_muster");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn start_server(rt: &tokio::runtime::Runtime, data_dir: &Path) -> Server {
    let config = Config {
        data_dir: data_dir.to_path_buf(),
        dps_host: "127.0.0.1".into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    };
    rt.block_on(Server::start(config)).expect("server starts")
}

fn muster(args: &[&str]) -> Command {
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

fn json_of(args: &[&str]) -> Value {
    let out = muster(args).output().expect("muster runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "muster {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

fn group_key(data_dir: &str, group: &str) -> String {
    let g = json_of(&[
        "enrollment-group",
        "create",
        "--data-dir",
        data_dir,
        "--group-id",
        group,
        "--show-keys",
        "-o",
        "json",
    ]);
    g["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("the group key")
        .to_string()
}

fn ms(v: &Value, field: &str) -> f64 {
    v["latency"][field].as_f64().unwrap_or(-1.0)
}

fn assert_sane_latency(report: &Value) {
    let (p50, p90, p99, max) = (
        ms(report, "p50_ms"),
        ms(report, "p90_ms"),
        ms(report, "p99_ms"),
        ms(report, "max_ms"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max && max < 60_000.0,
        "{report:#}"
    );
    assert_eq!(report["latency"]["samples"], report["assigned"]);
}

#[test]
fn every_mode_assigns_every_device_with_sane_percentiles() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start_server(&rt, &data);
    let data_dir = data.to_str().expect("utf-8 path");
    let key = group_key(data_dir, "bench");
    let pid = std::process::id().to_string();
    for mode in ["https-fresh", "https-keepalive", "mqtt-fresh", "amqp-fresh"] {
        let prefix = format!("{mode}-");
        let report = json_of(&[
            "bench",
            "register",
            "--data-dir",
            data_dir,
            "--group-key",
            &key,
            "--mode",
            mode,
            "--prefix",
            &prefix,
            "--count",
            "12",
            "--concurrency",
            "3",
            "--server-pid",
            &pid,
            "--json",
        ]);
        assert_eq!(report["attempted"], 12, "{report:#}");
        assert_eq!(report["assigned"], 12, "{mode}: {report:#}");
        assert_eq!(report["errors"], 0, "{report:#}");
        assert_sane_latency(&report);
        assert!(report["throughput_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
        let server_usage = &report["server"];
        assert!(server_usage["cpu_secs"].as_f64().unwrap_or(-1.0) >= 0.0);
        assert!(server_usage["peak_rss_kib"].as_u64().unwrap_or(0) > 0);
        assert!(server_usage["hwm_kib"].as_u64().unwrap_or(0) > 0);
    }
    // At a fixed rate: 10 devices at 40/s take about 0.225 s to start.
    let report = json_of(&[
        "bench",
        "register",
        "--data-dir",
        data_dir,
        "--group-key",
        &key,
        "--mode",
        "https-keepalive",
        "--prefix",
        "rate-",
        "--count",
        "10",
        "--rate",
        "40",
        "--warmup",
        "4",
        "--json",
    ]);
    assert_eq!(report["assigned"], 10, "{report:#}");
    assert_eq!(
        report["attempted"], 10,
        "the warm-up is not counted: {report:#}"
    );
    // ... but it registered its devices, under their own prefix.
    let warm = json_of(&[
        "registration",
        "show",
        "rate-warm-3",
        "--data-dir",
        data_dir,
    ]);
    assert_eq!(warm["status"], "assigned", "{warm:#}");
    assert!(
        report["wall_secs"].as_f64().unwrap_or(0.0) >= 0.2,
        "{report:#}"
    );
    assert!(report["max_start_lag_ms"].as_f64().is_some());
    assert_sane_latency(&report);
    // A wrong key: every device refused, counted by kind, and the command fails.
    let out = muster(&[
        "bench",
        "register",
        "--data-dir",
        data_dir,
        "--group-key",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "--mode",
        "https-keepalive",
        "--count",
        "3",
        "--json",
    ])
    .output()
    .expect("muster runs");
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(
        report["errors_by_kind"]["http 401 / 401005"], 3,
        "{report:#}"
    );
    rt.block_on(server.shutdown());
}

/// Stops the reference server when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the reference's "listening" line, printed once its ports are bound, and returns
/// the addresses it names: HTTPS first, then MQTT.
fn wait_until_listening(stderr: std::process::ChildStderr) -> Vec<String> {
    let mut line = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .expect("reading the TLS reference's stderr");
    assert!(
        line.contains("listening on"),
        "the TLS reference said: {line}"
    );
    line.split_whitespace()
        .filter(|w| w.parse::<std::net::SocketAddr>().is_ok())
        .map(String::from)
        .collect()
}

#[test]
fn tls_reference_sees_one_full_handshake_per_fresh_device() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start_server(&rt, &data);
    let data_dir = data.to_str().expect("utf-8 path");
    let mut child = muster(&[
        "bench",
        "tls-reference",
        "--data-dir",
        data_dir,
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the TLS reference starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let _guard = ChildGuard(child);
    let [listen, mqtt_listen] = &wait_until_listening(stderr)[..] else {
        panic!("the TLS reference names its HTTPS and MQTT addresses");
    };
    let reference_run = |mode: &str| {
        json_of(&[
            "bench",
            "register",
            "--data-dir",
            data_dir,
            "--target",
            "tls-reference",
            "--endpoint",
            listen,
            "--mqtt-endpoint",
            mqtt_listen,
            "--mode",
            mode,
            "--count",
            "20",
            "--concurrency",
            "4",
            "--json",
        ])
    };
    // A fresh run: every device assigned, each over a connection and full handshake of its own.
    let one_handshake_each = |report: &Value| {
        assert_eq!(report["assigned"], 20, "{report:#}");
        assert_sane_latency(report);
        let seen = &report["reference"];
        assert_eq!(seen["requests"], 20, "{report:#}");
        assert_eq!(
            seen["connections"], 20,
            "one connection per device: {report:#}"
        );
        assert_eq!(
            seen["resumed_handshakes"], 0,
            "no session resumption: {report:#}"
        );
    };
    one_handshake_each(&reference_run("https-fresh"));
    let kept = reference_run("https-keepalive");
    assert_eq!(kept["assigned"], 20, "{kept:#}");
    let seen = &kept["reference"];
    assert_eq!(seen["requests"], 20, "{kept:#}");
    let connections = seen["connections"].as_u64().unwrap_or(0);
    // One per worker, and now and then one more when a request starts just before the
    // previous answer's connection is back in the pool; never one per request.
    assert!(
        (1..=10).contains(&connections),
        "connections are reused: {kept:#}"
    );
    // MQTT: a TLS handshake, CONNECT, SUBSCRIBE and one register publish per device, counted
    // by the MQTT listener.
    let mqtt = reference_run("mqtt-fresh");
    assert_eq!(mqtt["endpoint"], mqtt_listen.as_str(), "{mqtt:#}");
    one_handshake_each(&mqtt);
    let seen = &mqtt["reference"];
    assert_eq!(seen["failed_handshakes"], 0, "{mqtt:#}");
    // The MQTT reference needs its address: connection.json's MQTT port is muster serve's.
    let refused = |args: &[&str]| {
        let out = muster(args).output().expect("muster runs");
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // ... and AMQP has no reference.
    for (mode, reason) in [
        ("mqtt-fresh", "--mqtt-endpoint"),
        ("amqp-fresh", "HTTPS and MQTT only"),
    ] {
        let why = refused(&[
            "bench",
            "register",
            "--data-dir",
            data_dir,
            "--target",
            "tls-reference",
            "--endpoint",
            listen,
            "--mode",
            mode,
            "--count",
            "1",
        ]);
        assert!(why.contains(reason), "{mode}: {why}");
    }
    rt.block_on(server.shutdown());
}

#[test]
fn service_api_pages_through_seeded_records() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let data: PathBuf = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8 path");
    let server = start_server(&rt, &data);
    group_key(data_dir, "seeded");
    rt.block_on(server.shutdown());

    let seeded = json_of(&[
        "bench",
        "seed-records",
        "--data-dir",
        data_dir,
        "--group-id",
        "seeded",
        "--count",
        "2500",
        "--batch",
        "1000",
        "--json",
    ]);
    assert_eq!(seeded["records"], 2500);
    assert_eq!(seeded["batches"], 3);

    let server = start_server(&rt, &data);
    let report = json_of(&[
        "bench",
        "service-api",
        "--data-dir",
        data_dir,
        "--enrollments",
        "1500",
        "--batch",
        "1000",
        "--queries",
        "6",
        "--group-id",
        "seeded",
        "--server-pid",
        &std::process::id().to_string(),
        "--json",
    ]);
    let bulk = &report["bulk_create"];
    assert_eq!(bulk["enrollments"], 1500, "{report:#}");
    assert_eq!(bulk["calls"], 2);
    assert_eq!(bulk["failed_items"], 0);
    let queries = report["queries"].as_array().expect("query reports");
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[0]["collection"], "enrollments");
    assert_eq!(queries[0]["items"], 1500);
    assert_eq!(queries[1]["collection"], "registrations/seeded");
    assert_eq!(queries[1]["items"], 2500, "{report:#}");
    assert_eq!(queries[1]["walk_pages"], 3);
    assert_eq!(queries[1]["max_offset"], 2000);
    for q in queries {
        assert_eq!(q["queries"], 6);
        let l = &q["latency"];
        assert!(
            l["p50_ms"].as_f64().unwrap_or(0.0) > 0.0
                && l["max_ms"].as_f64() >= l["p99_ms"].as_f64(),
            "{q:#}"
        );
    }
    rt.block_on(server.shutdown());
}

#[test]
fn attestation_bench_refuses_forged_tokens_and_registers_devices_of_the_last_group() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start_server(&rt, &data);
    let data_dir = data.to_str().expect("utf-8 path");
    // 40 groups: more than a search runs inline, so the bounded search is measured.
    let report = json_of(&[
        "bench",
        "attestation",
        "--data-dir",
        data_dir,
        "--groups",
        "40",
        "--count",
        "3",
        "--concurrency",
        "2",
        "--server-pid",
        &std::process::id().to_string(),
        "--json",
    ]);
    assert_eq!(report["groups"], 40, "{report:#}");
    assert_eq!(report["created_groups"], 40, "{report:#}");
    let phases = report["phases"].as_array().expect("phases");
    let by_phase = |name: &str| {
        phases
            .iter()
            .find(|p| p["phase"] == name)
            .unwrap_or_else(|| panic!("no phase {name}: {report:#}"))
    };
    for (name, assigned) in [
        ("forged-new", 0),
        ("first", 3),
        ("again", 3),
        ("forged-known", 0),
    ] {
        let p = by_phase(name);
        assert_eq!(p["attempted"], 3, "{p:#}");
        assert_eq!(p["assigned"], assigned, "{p:#}");
        assert!(p["server_cpu_ms_per_request"].as_f64().unwrap_or(-1.0) >= 0.0);
        if assigned == 0 {
            assert_eq!(p["errors_by_kind"]["http 401 / 401005"], 3, "{p:#}");
        }
    }
    rt.block_on(server.shutdown());
}

#[test]
fn seed_groups_tops_the_server_up_and_writes_the_keys_of_the_devices_groups() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = start_server(&rt, &data);
    let data_dir = data.to_str().expect("utf-8 path");
    let seed = |groups: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "seed-groups",
            "--data-dir",
            data_dir,
            "--groups",
            groups,
            "--json",
        ];
        args.extend_from_slice(extra);
        json_of(&args)
    };
    let first = seed("3", &[]);
    assert_eq!(first["groups"], 3, "{first:#}");
    assert_eq!(first["created_groups"], 3, "{first:#}");
    assert_eq!(
        first["device_groups"],
        serde_json::json!(["attest-g00002"]),
        "{first:#}"
    );
    // Growing the curve creates only the missing groups; the devices' groups are the new last.
    let keys_file = dir.path().join("keys");
    let keys_path = keys_file.to_str().expect("utf-8 path");
    let grown = seed("5", &["--spread", "2", "--keys-file", keys_path]);
    assert_eq!(grown["created_groups"], 2, "{grown:#}");
    assert_eq!(
        grown["device_groups"],
        serde_json::json!(["attest-g00003", "attest-g00004"]),
        "{grown:#}"
    );
    assert!(
        !grown.to_string().contains("primaryKey"),
        "no key on stdout: {grown:#}"
    );
    let keys: Vec<String> = std::fs::read_to_string(&keys_file)
        .expect("the keys file")
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(keys.len(), 2);
    for (key, group) in keys.iter().zip(["attest-g00003", "attest-g00004"]) {
        let shown = json_of(&[
            "enrollment-group",
            "show",
            "--data-dir",
            data_dir,
            "--group-id",
            group,
            "--show-keys",
            "-o",
            "json",
        ]);
        assert_eq!(
            shown["attestation"]["symmetricKey"]["primaryKey"],
            key.as_str()
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&keys_file)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Devices take the keys in turn (device n: line n mod 2): all register, new ids and again.
    for round in ["new", "again"] {
        let report = json_of(&[
            "bench",
            "register",
            "--data-dir",
            data_dir,
            "--group-keys-file",
            keys_path,
            "--mode",
            "https-keepalive",
            "--prefix",
            "grown-",
            "--count",
            "4",
            "--concurrency",
            "2",
            "--json",
        ]);
        assert_eq!(report["assigned"], 4, "{round}: {report:#}");
    }
    rt.block_on(server.shutdown());
}
