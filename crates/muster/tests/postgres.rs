//! `muster serve --store postgres://...` and `muster store migrate` against a throwaway
//! PostgreSQL cluster (`scripts/pg.sh`; skipped only when `MUSTER_PG_OPTIONAL=1` and
//! PostgreSQL is not installed).
//!
//! The server runs as the real binary on loopback with ports chosen by the kernel; the devices
//! register through the CLI over HTTPS. A restart uses a new, empty data dir (only the sealing
//! key is carried over), so what it finds can only have come from the database.
//!
//! Several nodes: two nodes on one database serve one TLS identity, and a node killed with
//! queued registrations has them finished by another node once its lease lapses.

mod serve;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use muster_store::test_cluster::PgCluster;
use serde_json::Value;
use serve::{host, muster, Serve};

#[test]
fn serve_and_migrate_on_postgres() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    serve_keeps_devices_across_restarts(&rt, &cluster, dir.path());
    migrate_copies_an_installation(&rt, &cluster, dir.path());
    nodes_share_one_tls_identity(&rt, &cluster, dir.path());
    a_killed_nodes_queue_is_finished_by_another(&rt, &cluster, dir.path());
}

/// Node A accepts registrations its hub's rate limit queues, and is killed (`kill -9`) with
/// them unfinished. Node B (another node id, on A's port so the hub keeps its name) takes
/// them over once A's lease lapses and finishes every one: all assigned, every marker gone,
/// one hub device each.
fn a_killed_nodes_queue_is_finished_by_another(
    rt: &tokio::runtime::Runtime,
    cluster: &PgCluster,
    dir: &Path,
) {
    const QUEUED: usize = 4;
    let url = rt.block_on(cluster.create_database("takeover"));
    let key = dir.join("takeover-store.key");
    let key_arg = key.to_str().expect("utf-8").to_string();
    let node = |id: &'static str| {
        vec![
            "--store".to_string(),
            url.clone(),
            "--sealing-key".to_string(),
            key_arg.clone(),
            "--node-id".to_string(),
            id.to_string(),
            "--lease-ms".to_string(),
            "2000".to_string(),
            "--sweep-interval-ms".to_string(),
            "200".to_string(),
        ]
    };
    let a_args = node("node-a");
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a_dir = dir.join("takeover-a");
    let mut a = Serve::start(&a_dir, &a_args).expect("node A starts");
    let group_key = a.register("takeover-0");
    let hubs = a.json(&["linked-hub", "list"]);
    let hub = hubs
        .as_array()
        .and_then(|h| h.first())
        .and_then(|h| h["name"].as_str())
        .unwrap_or_else(|| panic!("the built-in hub is linked: {hubs}"))
        .to_string();
    a.json(&[
        "linked-hub",
        "update",
        &hub,
        "--max-registrations-per-second",
        "1",
    ]);
    // Each of these waits for its assignment; node A queues them behind the rate limit.
    let mut waiting = Vec::new();
    for i in 1..=QUEUED {
        let id = format!("takeover-{i}");
        waiting.push(
            muster(&[
                "device",
                "register",
                "--registration-id",
                &id,
                "--group-key",
                &group_key,
                "--data-dir",
                a_dir.to_str().expect("utf-8"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("muster device register runs"),
        );
    }
    let store = rt.block_on(async {
        muster_store::PostgresStore::open(&url, &key)
            .await
            .expect("open the database")
    });
    let count = |collection| {
        rt.block_on(async {
            muster_store::Store::count(&store, collection, None)
                .await
                .expect("count")
        })
    };
    // Kill A while at least two are still queued (at 1/s the rest wait seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(muster_store::Collection::PendingAssignments) < 2 {
        assert!(std::time::Instant::now() < deadline, "node A never queued");
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    }
    a.child.kill().expect("kill -9 node A");
    a.child.wait().expect("node A gone");
    for mut w in waiting {
        let _ = w.kill();
        let _ = w.wait();
    }
    let left = count(muster_store::Collection::PendingAssignments);
    assert!(left >= 1, "node A died with work queued");

    let b_args = node("node-b");
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let port = a.https_port();
    let b = Serve::start_on(&dir.join("takeover-b"), &port, &b_args).expect("node B starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(muster_store::Collection::PendingAssignments) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "node B never finished node A's queue"
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }
    let records = rt.block_on(async {
        muster_store::Store::list(
            &store,
            muster_store::Collection::Registrations,
            muster_store::ListQuery {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .expect("list")
    });
    let started: Vec<&Value> = records
        .iter()
        .map(|r| &r.body)
        .filter(|b| {
            b["registrationId"]
                .as_str()
                .is_some_and(|id| id.starts_with("takeover-"))
        })
        .collect();
    assert!(
        started.len() > left as usize,
        "the first device and those A left queued: {started:?}"
    );
    for r in &started {
        assert_eq!(r["status"], "assigned", "{r}");
    }
    assert_eq!(
        count(muster_store::Collection::HubDevices),
        started.len() as u64,
        "one hub device per registration"
    );
    b.stop();
}

/// Two nodes on one database, each with its own empty data dir (only the sealing key is
/// shared): the second takes the CA and server certificate the first stored, so both serve
/// the same chain; a device trusting the first node's CA registers through the second.
fn nodes_share_one_tls_identity(rt: &tokio::runtime::Runtime, cluster: &PgCluster, dir: &Path) {
    let url = rt.block_on(cluster.create_database("tls"));
    let first_dir = dir.join("tls-first");
    let second_dir = dir.join("tls-second");
    std::fs::create_dir_all(&second_dir).expect("mkdir");
    let key = dir.join("tls-store.key");
    let key_arg = key.to_str().expect("utf-8");
    let store_args = ["--store", url.as_str(), "--sealing-key", key_arg];
    let first = Serve::start(&first_dir, &store_args).expect("first node starts");
    let second = Serve::start(&second_dir, &store_args).expect("second node starts");
    for file in ["ca.pem", "server.pem", "server.key"] {
        let a = std::fs::read(first_dir.join(file)).expect("first node's file");
        let b = std::fs::read(second_dir.join(file)).expect("second node's file");
        assert!(a == b, "{file} differs between the nodes");
    }
    // The second node serves that chain: a device trusting only the first node's CA
    // registers over HTTPS on the second node's port.
    let group_key = first.register("shared-tls-a");
    let endpoint = format!("{}:{}", host(), second.https_port());
    let ca = first_dir.join("ca.pem");
    let r = first.json(&[
        "device",
        "register",
        "--registration-id",
        "shared-tls-b",
        "--group-key",
        &group_key,
        "--endpoint",
        &endpoint,
        "--ca-cert",
        ca.to_str().expect("utf-8"),
    ]);
    assert_eq!(r["status"], "assigned", "{r}");
    second.stop();
    first.stop();
}

fn serve_keeps_devices_across_restarts(
    rt: &tokio::runtime::Runtime,
    cluster: &PgCluster,
    dir: &Path,
) {
    let url = rt.block_on(cluster.create_database("serve"));
    let verified = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        cluster.ca_file().display()
    );
    let key = dir.join("shared.key");
    let key_arg = key.to_str().expect("utf-8");
    let first = dir.join("node-a");
    let serve = Serve::start(&first, &["--store", &verified, "--sealing-key", key_arg])
        .expect("serve on postgres");
    let group_key = serve.register("dev-pg-1");
    let scope = serve.id_scope();
    assert!(
        !first.join("muster.db").exists(),
        "no SQLite database beside a postgres store"
    );
    serve.stop();

    // Another node (a new data dir, the shared key): same ID scope, same group, the device.
    let second = dir.join("node-b");
    let serve = Serve::start(&second, &["--store", &verified, "--sealing-key", key_arg])
        .expect("restart on postgres");
    assert_eq!(serve.id_scope(), scope);
    let record = serve.json(&["registration", "show", "dev-pg-1"]);
    assert_eq!(record["registrationId"], "dev-pg-1", "{record}");
    assert_eq!(record["status"], "assigned", "{record}");
    let group = serve.json(&["enrollment-group", "show", "g", "--show-keys"]);
    assert_eq!(
        group["attestation"]["symmetricKey"]["primaryKey"],
        group_key.as_str()
    );
    serve.register("dev-pg-2");
    serve.stop();

    // Refusals, with messages that say which check failed.
    let err = Serve::start(
        &dir.join("node-c"),
        &[
            "--store",
            &url,
            "--sealing-key",
            dir.join("other.key").to_str().expect("utf-8"),
        ],
    )
    .err()
    .expect("a node without the key is refused");
    assert!(err.contains("sealing key missing"), "{err}");
    // Another key file (a real one, of another installation) is told apart from a missing one.
    let other_key = dir.join("another-installation.key");
    muster_store::sealing::Sealer::create(&other_key).expect("another key");
    let err = Serve::start(
        &dir.join("node-e"),
        &[
            "--store",
            &url,
            "--sealing-key",
            other_key.to_str().expect("utf-8"),
        ],
    )
    .err()
    .expect("a node with another key is refused");
    assert!(
        err.contains("sealing key does not open this database"),
        "{err}"
    );
    let other_scope = if scope == "0ne00000001" {
        "0ne00000002"
    } else {
        "0ne00000001"
    };
    let err = Serve::start(
        &dir.join("node-d"),
        &[
            "--store",
            &url,
            "--sealing-key",
            key_arg,
            "--id-scope",
            other_scope,
        ],
    )
    .err()
    .expect("a node of another ID scope is refused");
    assert!(
        err.contains("refusing to join") && err.contains(&scope),
        "{err}"
    );
}

fn migrate_copies_an_installation(rt: &tokio::runtime::Runtime, cluster: &PgCluster, dir: &Path) {
    let sqlite_dir = dir.join("sqlite-node");
    let serve = Serve::start(&sqlite_dir, &[]).expect("serve on sqlite");
    let group_key = serve.register("dev-lite-1");
    serve.register("dev-lite-2");
    let scope = serve.id_scope();
    let port = serve.https_port();
    let before = serve.json(&["registration", "show", "dev-lite-1"]);
    serve.stop();

    let url = rt.block_on(cluster.create_database("migrated"));
    let db = sqlite_dir.join("muster.db");
    let from = format!("sqlite:{}", db.display());
    let out = muster(&["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .expect("migrate runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every collection's count matches"),
        "{stdout}"
    );

    let key = sqlite_dir.join("muster.db.key");
    let serve = Serve::start_on(
        &dir.join("migrated-node"),
        &port,
        &[
            "--store",
            &url,
            "--sealing-key",
            key.to_str().expect("utf-8"),
        ],
    )
    .expect("serve on the migrated database");
    assert_eq!(serve.id_scope(), scope);
    let after = serve.json(&["registration", "show", "dev-lite-1"]);
    assert_eq!(after["etag"], before["etag"], "etags are preserved");
    assert_eq!(after["assignedHub"], before["assignedHub"]);
    let group = serve.json(&["enrollment-group", "show", "g", "--show-keys"]);
    assert_eq!(
        group["attestation"]["symmetricKey"]["primaryKey"],
        group_key.as_str()
    );
    serve.stop();

    // Only into an empty database.
    let out = muster(&["store", "migrate", "--from", &from, "--to", &url])
        .output()
        .expect("migrate runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("empty database"), "{stderr}");
}
