//! `PostgresStore` against the shared conformance suite on a throwaway cluster
//! (`scripts/pg.sh`), plus what is PostgreSQL's own: migrations once under the advisory lock,
//! refusing a newer schema or another sealing key, TLS from the URL, and an outage reported
//! as `StoreError::Unavailable`.
//!
//! One cluster serves every check of this file (starting one costs seconds), each check on
//! its own database; the cluster is stopped when the test ends, also on failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_store::test_cluster::PgCluster;
use muster_store::{
    Collection, Expect, ListQuery, PostgresStore, Record, Store, StoreError, Unavailability, Write,
    WriteOutcome,
};
use serde_json::json;

async fn open(url: &str, key: &std::path::Path) -> PostgresStore {
    PostgresStore::open(url, key)
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("store.key");

    // First, while the cluster's files hold little else to search through.
    secrets_sealed_at_rest(&cluster, &key).await;
    conformance(&cluster, &key).await;
    searches_are_index_range_scans(&cluster, &key).await;
    sealed_bodies_are_bytes_from_the_injected_entropy(&cluster, &key).await;
    group_changes_reach_the_other_node(&cluster, &key).await;
    rate_limits_are_shared_by_the_nodes(&cluster, &key).await;
    bus_messages_reach_the_other_node(&cluster, &key).await;
    migrations_run_once_under_the_lock(&cluster, &key).await;
    refuses_a_newer_schema(&cluster, &key).await;
    refuses_another_or_a_missing_sealing_key(&cluster, keys.path()).await;
    import_keeps_etags_and_moves_the_sequence(&cluster, &key).await;
    tls_from_the_url(&cluster, &key).await;
    read_only_database_is_unavailable(&cluster, &key).await;
    // Last: it stops the server.
    outage_is_unavailable(&cluster, &key).await;
}

/// Two nodes take tokens of one bucket: one second's worth in all at one instant, refilled
/// at the rate, capped at one second's worth, and a node whose clock lags gets no refill
/// from the bucket's past.
async fn rate_limits_are_shared_by_the_nodes(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("rate_limits").await;
    let a = open(&url, key).await;
    let b = open(&url, key).await;
    let take = |store: &PostgresStore, now: i64| {
        let store = store.clone();
        async move {
            store
                .take_token("hub/h.example", 4, now)
                .await
                .expect("take")
                .expect("a PostgreSQL store shares its limits")
        }
    };
    let t0 = 1_000_000;
    let mut taken = 0;
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        if take(node, t0).await {
            taken += 1;
        }
    }
    assert_eq!(
        taken, 4,
        "both nodes together get one second's worth at one instant"
    );
    assert!(!take(&b, t0 + 200).await, "0.8 tokens after 200 ms: none");
    assert!(take(&a, t0 + 250).await, "one token after 250 ms");
    assert!(
        !take(&b, t0 + 100).await,
        "a lagging clock gets no refill from the past"
    );
    let mut later = 0;
    for i in 0..10 {
        let node = if i % 2 == 0 { &a } else { &b };
        if take(node, t0 + 60_000).await {
            later += 1;
        }
    }
    assert_eq!(later, 4, "a long pause refills at most one second's worth");
    let other = a
        .take_token("hub/other.example", 4, t0)
        .await
        .expect("take");
    assert_eq!(other, Some(true), "buckets are per name");
}

async fn conformance(cluster: &PgCluster, key: &std::path::Path) {
    let next = AtomicUsize::new(0);
    muster_store::conformance::run_all(|| {
        let name = format!("conformance_{}", next.fetch_add(1, Ordering::Relaxed));
        async move { open(&cluster.create_database(&name).await, key).await }
    })
    .await;
}

/// Both searches can only be answered through an index: with sequential scans disabled, the
/// plan of each is an index scan of the primary key or of the device id index.
async fn searches_are_index_range_scans(cluster: &PgCluster, key: &std::path::Path) {
    use muster_store::postgres::search_sql;
    use muster_store::SearchField;
    let url = cluster.create_database("search_plans").await;
    drop(open(&url, key).await);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(connection);
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    for (field, index) in [
        (SearchField::Key, "muster_records_pkey"),
        (
            SearchField::DeviceId,
            "muster_records_registrations_by_device",
        ),
    ] {
        let sql = format!("EXPLAIN {}", search_sql(field));
        let rows = client
            .query(&sql, &[&"registrations", &"a", &"b", &10i64])
            .await
            .expect("explain");
        let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("Index Scan using {index}")),
            "{field:?}:\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Sort"),
            "{field:?}:\n{plan}"
        );
    }
    drop(client);
    let _ = conn.await;
}

async fn secrets_sealed_at_rest(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("sealed").await;
    let store = open(&url, key).await;
    // The records table's files (heap and TOAST) and the write-ahead log, where every write
    // lands first.
    let data = cluster.data_dir();
    let mut paths: Vec<PathBuf> = query_strings(
        &url,
        "SELECT pg_relation_filepath(c.oid) FROM pg_class c
         WHERE c.relname = 'muster_records'
            OR c.oid = (SELECT reltoastrelid FROM pg_class WHERE relname = 'muster_records')",
    )
    .await
    .into_iter()
    .map(|p| data.join(p))
    .collect();
    paths.push(data.join("pg_wal"));
    let dirs = paths;
    muster_store::conformance::secrets_sealed_at_rest(store, || {
        dirs.iter().flat_map(|d| bytes_under(d)).collect()
    })
    .await;
}

/// Every byte of `path`, or of every file under it.
fn bytes_under(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                pending.push(entry.expect("entry").path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend(bytes);
        }
    }
    out
}

async fn migrations_run_once_under_the_lock(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("racing_nodes").await;
    // Three nodes opening a new database at once: one migrates, the others wait and find it
    // done.
    let (a, b, c) = tokio::join!(
        PostgresStore::open(&url, key),
        PostgresStore::open(&url, key),
        PostgresStore::open(&url, key)
    );
    let (a, _b, _c) = (a.expect("node a"), b.expect("node b"), c.expect("node c"));
    let versions = query_strings(
        &url,
        "SELECT version::TEXT FROM muster_schema_migrations ORDER BY version",
    )
    .await;
    let expected: Vec<String> = (1..=PostgresStore::SCHEMA_VERSION)
        .map(|v| v.to_string())
        .collect();
    assert_eq!(versions, expected, "each migration recorded exactly once");
    let written = a
        .write(vec![Write::put(
            Collection::Settings,
            "k",
            Expect::Absent,
            json!({"v": 1}),
        )])
        .await
        .expect("write");
    assert!(written[0].is_applied());
}

async fn refuses_a_newer_schema(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("from_the_future").await;
    drop(open(&url, key).await);
    execute(
        &url,
        "INSERT INTO muster_schema_migrations (version) VALUES (999)",
    )
    .await;
    let err = PostgresStore::open(&url, key).await.expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("schema version 999") && text.contains("newer Muster"),
        "{text}"
    );
}

async fn refuses_another_or_a_missing_sealing_key(cluster: &PgCluster, keys: &std::path::Path) {
    let url = cluster.create_database("sealed_by_one").await;
    let own = keys.join("own.key");
    let store = open(&url, &own).await;
    store
        .write(vec![Write::put(
            Collection::Enrollments,
            "dev",
            Expect::Any,
            json!({"k": "secret"}),
        )])
        .await
        .expect("write");
    drop(store);

    let other = keys.join("other.key");
    muster_store::sealing::Sealer::create(&other).expect("other key");
    let err = PostgresStore::open(&url, &other)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, StoreError::SealingKeyMismatch { .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains("password"), "{err}");

    let err = PostgresStore::open(&url, &keys.join("missing.key"))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, StoreError::SealingKeyMissing { .. }),
        "{err:?}"
    );
    assert!(
        !keys.join("missing.key").exists(),
        "no new key is made for a sealed database"
    );

    let store = open(&url, &own).await;
    let record = store
        .get(Collection::Enrollments, "dev")
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.body, json!({"k": "secret"}));
}

async fn sealed_bodies_are_bytes_from_the_injected_entropy(
    cluster: &PgCluster,
    key: &std::path::Path,
) {
    use muster_proto::runtime::SeededEntropy;
    let mut stored = Vec::new();
    // Two databases, the same key and the same seeded entropy: the same nonce, so the same
    // sealed bytes. Nonces come from the entropy passed in, not from the operating system.
    for name in ["entropy_a", "entropy_b"] {
        let url = cluster.create_database(name).await;
        let store = PostgresStore::open_with_entropy(&url, key, Arc::new(SeededEntropy::new(9)))
            .await
            .expect("open");
        for (collection, k) in [
            (Collection::Enrollments, "dev"),
            (Collection::EnrollmentGroups, "g"),
        ] {
            let outcome = store
                .write(vec![Write::put(
                    collection,
                    k,
                    Expect::Any,
                    json!({"primaryKey": "c2VjcmV0"}),
                )])
                .await
                .expect("write");
            assert!(matches!(outcome[0], WriteOutcome::Written { .. }));
        }
        store
            .write(vec![Write::put(
                Collection::Registrations,
                "dev",
                Expect::Any,
                json!({"status": "assigned"}),
            )])
            .await
            .expect("write");
        // Secret collections: sealed bytes (version 2) in `sealed`, nothing in `body`;
        // other collections: JSON text in `body`.
        let rows = query_strings(
            &url,
            "SELECT collection || ' ' || COALESCE(body, '-') || ' ' ||
                    COALESCE(get_byte(sealed, 0)::TEXT, '-') || ' ' ||
                    COALESCE(encode(sealed, 'hex'), '-')
             FROM muster_records ORDER BY collection, key",
        )
        .await;
        let shapes: Vec<String> = rows
            .iter()
            .map(|r| r.splitn(4, ' ').take(3).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            shapes,
            [
                "enrollment_groups - 2",
                "enrollments - 2",
                "registrations {\"status\":\"assigned\"} -"
            ]
        );
        stored.push(rows);
    }
    assert_eq!(
        stored[0], stored[1],
        "nonces come from the injected entropy"
    );
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after 20 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn put_group(store: &PostgresStore, id: &str) {
    let outcome = store
        .write(vec![Write::put(
            Collection::EnrollmentGroups,
            id,
            Expect::Any,
            json!({"enrollmentGroupId": id}),
        )])
        .await
        .expect("write group");
    assert!(matches!(outcome[0], WriteOutcome::Written { .. }));
}

/// Two nodes on one database: a group written on one moves the other's change counter (so
/// its group cache reloads), and after the listening connections are cut they reconnect and
/// changes flow again. Collections written on the registration path are not counted.
async fn group_changes_reach_the_other_node(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("two_nodes").await;
    let a = open(&url, key).await;
    let b = open(&url, key).await;
    let groups = Collection::EnrollmentGroups;
    wait_until("both nodes listen", || {
        a.changes(groups).is_some() && b.changes(groups).is_some()
    })
    .await;
    for collection in [Collection::Registrations, Collection::Operations] {
        assert_eq!(a.changes(collection), None, "{collection:?} is not counted");
    }

    let (a0, b0) = (a.changes(groups), b.changes(groups));
    put_group(&a, "g1").await;
    assert_ne!(
        a.changes(groups),
        a0,
        "the writer's counter moves before it returns"
    );
    wait_until("node b hears of node a's group", || b.changes(groups) != b0).await;
    let b1 = b.changes(groups);
    let _ = b
        .get(groups, "g1")
        .await
        .expect("get")
        .expect("node b reads the group");

    // Cut both listening connections: each reconnects (a new backend) and moves its
    // counters, since notifications may have been missed meanwhile.
    let listeners = format!(
        "SELECT pid::TEXT FROM pg_stat_activity WHERE application_name = '{}' ORDER BY pid",
        muster_store::postgres::LISTENER_NAME
    );
    let before = query_strings(&url, &listeners).await;
    assert_eq!(
        before.len(),
        2,
        "one listening connection per node: {before:?}"
    );
    let killed = query_strings(
        &url,
        &format!(
            "SELECT pg_terminate_backend(pid)::TEXT FROM pg_stat_activity
             WHERE application_name = '{}'",
            muster_store::postgres::LISTENER_NAME
        ),
    )
    .await;
    assert_eq!(killed, ["true", "true"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = query_strings(&url, &listeners).await;
        if now.len() == 2 && now.iter().all(|pid| !before.contains(pid)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listeners did not reconnect: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until("node b listens again", || {
        b.changes(groups).is_some_and(|g| Some(g) != b1)
    })
    .await;
    let b2 = b.changes(groups);
    put_group(&a, "g2").await;
    wait_until("node b hears of the next group", || b.changes(groups) != b2).await;
}

/// Two nodes on one database: what one publishes on the bus the other receives, in order,
/// and a payload too large for a notification arrives whole through `muster_bus_spill`; a
/// node does not hear itself.
async fn bus_messages_reach_the_other_node(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("bus").await;
    let a = open(&url, key).await;
    let b = open(&url, key).await;
    let (bus_a, bus_b) = (a.bus().expect("bus"), b.bus().expect("bus"));
    assert_ne!(bus_a.node_id(), bus_b.node_id());
    let mut at_a = bus_a.subscribe();
    let mut at_b = bus_b.subscribe();
    // Messages sent before b's listening connection is up are lost: probe until one lands.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        bus_a.publish("probe", Vec::new());
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), at_b.recv()).await {
            assert_eq!((m.origin, m.topic.as_str()), (bus_a.node_id(), "probe"));
            break;
        }
        assert!(Instant::now() < deadline, "node b never heard node a");
    }
    let large: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    bus_a.publish("hub", b"small".to_vec());
    bus_a.publish("hub", large.clone());
    bus_a.publish("hub", b"after".to_vec());
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(20), at_b.recv())
            .await
            .expect("node b receives")
            .expect("open");
        if m.topic == "hub" {
            got.push(m.payload.clone());
        }
    }
    assert_eq!(got, [b"small".to_vec(), large, b"after".to_vec()]);
    let spilled = query_strings(&url, "SELECT count(*)::TEXT FROM muster_bus_spill").await;
    assert_eq!(
        spilled,
        ["1"],
        "only the large message went through the table"
    );
    // Node a heard nothing of its own (b said nothing).
    assert!(at_a.try_recv().is_err());
    bus_b.publish("hub", b"from b".to_vec());
    let m = tokio::time::timeout(Duration::from_secs(20), at_a.recv())
        .await
        .expect("node a receives")
        .expect("open");
    assert_eq!(
        (m.origin, m.payload.as_slice()),
        (bus_b.node_id(), &b"from b"[..])
    );
}

async fn import_keeps_etags_and_moves_the_sequence(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("imported").await;
    let store = open(&url, key).await;
    // Etags as another store issued them (counter 500 and 501).
    let source = tempfile::tempdir().expect("tempdir");
    let sqlite = muster_store::SqliteStore::open(&source.path().join("m.db")).expect("sqlite");
    let mut records: Vec<Record> = Vec::new();
    for i in 0..3 {
        let outcome = sqlite
            .write(vec![Write::put(
                Collection::HubDevices,
                format!("hub/dev{i}"),
                Expect::Any,
                json!({"key": format!("secret{i}")}),
            )
            .with_partition(Some("hub".into()))])
            .await
            .expect("sqlite write");
        assert!(outcome[0].is_applied());
    }
    records.extend(
        sqlite
            .list(
                Collection::HubDevices,
                ListQuery {
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .expect("list"),
    );
    store
        .import(Collection::HubDevices, &records)
        .await
        .expect("import");
    for record in &records {
        let got = store
            .get(Collection::HubDevices, &record.key)
            .await
            .expect("get")
            .expect("imported");
        assert_eq!(&got, record, "imported as it was, etag included");
    }
    // New etags never repeat an imported one.
    let outcome = store
        .write(vec![Write::put(
            Collection::HubDevices,
            "hub/new",
            Expect::Absent,
            json!({}),
        )])
        .await
        .expect("write");
    let WriteOutcome::Written { etag } = &outcome[0] else {
        panic!("{outcome:?}");
    };
    assert!(records.iter().all(|r| &r.etag != etag), "{etag} repeats");
    // An existing key fails the whole import.
    let err = store
        .import(Collection::HubDevices, &records)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("hub/dev0"), "{err}");
    assert_eq!(
        store
            .count(Collection::HubDevices, None)
            .await
            .expect("count"),
        4
    );
}

async fn tls_from_the_url(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("over_tls").await;
    let ca = cluster.ca_file();
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = open(&verified, key).await;
    // A pooled connection (the pool opens them on demand).
    store
        .get(Collection::Settings, "x")
        .await
        .expect("read over TLS");
    let ssl: Vec<String> = query_strings(
        &cluster.url_for("postgres"),
        "SELECT ssl::TEXT FROM pg_stat_ssl WHERE pid IN \
         (SELECT pid FROM pg_stat_activity WHERE datname = 'over_tls')",
    )
    .await;
    assert!(
        ssl.iter().all(|s| s == "true") && !ssl.is_empty(),
        "{ssl:?}"
    );
    drop(store);
    open(&format!("{url}?sslmode=require"), key).await;

    // A CA that did not sign the server's certificate is refused.
    let keys = tempfile::tempdir().expect("tempdir");
    let wrong_ca = keys.path().join("wrong.pem");
    std::fs::write(&wrong_ca, OTHER_CA).expect("write");
    let err = PostgresStore::open(
        &format!(
            "{url}?sslmode=verify-full&sslrootcert={}",
            wrong_ca.display()
        ),
        key,
    )
    .await
    .expect_err("refused");
    assert!(
        err.is_unavailable() || matches!(err, StoreError::Backend(_)),
        "{err:?}"
    );
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// A CA certificate that did not sign the cluster's (made once with openssl, no key kept).
const OTHER_CA: &str = include_str!("data/other-ca.pem");

async fn read_only_database_is_unavailable(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("standby_like").await;
    let store = open(&url, key).await;
    cluster
        .admin(
            "ALTER DATABASE standby_like SET default_transaction_read_only = on;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = 'standby_like' AND pid <> pg_backend_pid();",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let result = store
            .write(vec![Write::put(
                Collection::Registrations,
                "r",
                Expect::Any,
                json!({}),
            )])
            .await;
        match result {
            Err(StoreError::Unavailable {
                cause: Unavailability::ReadOnly,
                detail,
            }) => {
                assert!(detail.contains("read-only"), "{detail}");
                break;
            }
            // A pooled connection that was terminated: unavailable too, the next one is new.
            Err(StoreError::Unavailable { .. }) => {}
            other => panic!("a write to a read-only database returned {other:?}"),
        }
        assert!(Instant::now() < deadline, "never reported read-only");
    }
    assert_eq!(
        store
            .get(Collection::Registrations, "r")
            .await
            .expect("reads still work"),
        None
    );
}

async fn outage_is_unavailable(cluster: &PgCluster, key: &std::path::Path) {
    let url = cluster.create_database("outage").await;
    let store = open(&url, key).await;
    cluster.stop_server();
    let err = store
        .get(Collection::Enrollments, "x")
        .await
        .expect_err("no server");
    assert!(
        matches!(
            err,
            StoreError::Unavailable {
                cause: Unavailability::Unreachable,
                ..
            }
        ),
        "{err:?}"
    );
    let err = store
        .write(vec![Write::put(
            Collection::Enrollments,
            "x",
            Expect::Any,
            json!({}),
        )])
        .await
        .expect_err("no server");
    assert!(err.is_unavailable(), "{err:?}");
    let err = PostgresStore::open(&url, key).await.expect_err("no server");
    assert!(err.is_unavailable(), "{err:?}");
}

async fn execute(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let task = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = task.await;
}

async fn query_strings(url: &str, sql: &str) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let task = tokio::spawn(connection);
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = task.await;
    rows.iter().map(|row| row.get(0)).collect()
}
