//! Issue #14's acceptance test: a registration storm on a 3-node cluster, with one node
//! killed (`kill -9`) mid-storm.
//!
//! A throwaway PostgreSQL (`scripts/pg.sh`, skipped only when `MUSTER_PG_OPTIONAL=1` and
//! PostgreSQL is not installed) and 3 `muster serve` nodes on one loopback address sharing
//! the HTTPS and MQTT ports (`--reuse-port`: the kernel spreads new connections among the
//! live nodes), with short claim leases. One symmetric-key enrollment group on the built-in
//! hub, whose `maxRegistrationsPerSecond` is below what the devices ask for, so registrations
//! queue behind the shared limiter (`Store::take_token`).
//!
//! The devices: [`HTTPS_DEVICES`] speak raw HTTPS (PUT register, as the SDKs do, retrying
//! connection errors, 429 and 5xx after `retry-after`); a registration is *acknowledged* by
//! the first answer carrying an operation id (`assigning` or `assigned`), and the device does
//! not poll further, so finishing it is entirely the cluster's job. [`MQTT_DEVICES`] use
//! `muster_client::DeviceClient` over MQTT, which polls until `assigned` (retrying
//! likewise); they are acknowledged by that answer. When a third are acknowledged one node is
//! killed; the storm goes on against the other two.
//!
//! Then, once no record is `assigning` (polled, bounded): every acknowledged registration
//! has its record `assigned` and its hub device, every record is assigned, the hub holds
//! exactly one device per record (0 orphans), and the throttled hub's admissions never
//! exceeded its token bucket. Admission times are the assigned records'
//! `lastUpdatedDateTimeUtc` (the engine's clock when it finished the assignment, shortly after
//! taking the token): exact per admission and kept in the database, unlike the per-node
//! metrics, which die with the killed node. Figures for BENCHMARKS.md are printed (eprintln).

mod serve;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_client::{DeviceClient, DeviceKey, RegisterOptions, RetryPolicy, Transport};
use muster_store::test_cluster::PgCluster;
use muster_store::{Collection, ListQuery, PostgresStore, Store};
use serde_json::{json, Value};
use serve::{host, Serve};

const HTTPS_DEVICES: usize = 2000;
const MQTT_DEVICES: usize = 1000;
/// Devices registering at once.
const HTTPS_CONCURRENCY: usize = 32;
/// MQTT devices hold their slot until assigned, so they get their own.
const MQTT_CONCURRENCY: usize = 24;
/// The built-in hub's `maxRegistrationsPerSecond`: below the storm's acknowledgement rate.
const RATE: u32 = 60;
const LEASE_MS: &str = "2000";
const SWEEP_MS: &str = "500";
/// Register attempts per device (connection errors, 429, 5xx).
const ATTEMPTS: u32 = 30;
/// The kill window: acknowledgements answered within this long after the kill (or until the
/// last HTTPS device's, if sooner).
const KILL_WINDOW: Duration = Duration::from_secs(5);

/// One device's registration as the device saw it.
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    https: bool,
    started: Instant,
    /// When the first answer with an operation id came, and its status.
    acked: Option<(Instant, String)>,
    /// Register attempts (more than one: a connection error, 429 or 5xx was retried).
    attempts: u32,
    error: Option<String>,
}

#[test]
fn a_storm_survives_a_killed_node() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = rt.block_on(cluster.create_database("storm"));
    let key = dir.path().join("store.key");
    let node_args = |i: usize| {
        vec![
            "--store".to_string(),
            url.clone(),
            "--sealing-key".to_string(),
            key.to_str().expect("utf-8").to_string(),
            "--listen".to_string(),
            host(),
            "--reuse-port".to_string(),
            "--node-id".to_string(),
            format!("storm-{i}"),
            "--lease-ms".to_string(),
            LEASE_MS.to_string(),
            "--sweep-interval-ms".to_string(),
            SWEEP_MS.to_string(),
        ]
    };
    let start = |i: usize, https: &str, mqtt: &str| {
        let args = node_args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Serve::start_with_ports(&dir.path().join(format!("node-{i}")), https, mqtt, &args)
            .unwrap_or_else(|e| panic!("node {i} starts: {e}"))
    };

    // Node 1 picks the ports; the group and the hub's rate are set before the others join.
    let first = start(1, "0", "0");
    let conn = muster_client::ConnectionFile::read(&first.data_dir).expect("connection.json");
    let (https_port, mqtt_port) = (conn.https_port.to_string(), conn.mqtt_port.to_string());
    first.json(&["enrollment-group", "create", "--group-id", "storm"]);
    let group = first.json(&["enrollment-group", "show", "storm", "--show-keys"]);
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("group key")
        .to_string();
    let hubs = first.json(&["linked-hub", "list"]);
    let hub = hubs[0]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("the built-in hub is linked: {hubs}"))
        .to_string();
    first.json(&[
        "linked-hub",
        "update",
        &hub,
        "--max-registrations-per-second",
        &RATE.to_string(),
    ]);
    let mut nodes = vec![
        first,
        start(2, &https_port, &mqtt_port),
        start(3, &https_port, &mqtt_port),
    ];

    let ca = conn.ca_certificate.clone().expect("the local CA");
    let endpoint = format!("{}:{https_port}", host());
    let tls = muster_client::tls::client_config(Some(&ca)).expect("TLS config");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let mqtt_client = DeviceClient::new(&endpoint, &conn.id_scope, Some(&ca))
        .expect("device client")
        .with_mqtt_port(conn.mqtt_port)
        .with_retry_policy(RetryPolicy {
            max_attempts: ATTEMPTS,
            max_polls: 10_000,
            default_wait: Duration::from_millis(500),
            max_wait: Duration::from_secs(5),
        });

    let transactions_before = rt.block_on(transactions(&url));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let acked = Arc::new(AtomicUsize::new(0));
    let total = HTTPS_DEVICES + MQTT_DEVICES;
    let storm_start = Instant::now();
    let storm = {
        let _guard = rt.enter();
        let mut tasks = Vec::new();
        let next_https = Arc::new(AtomicUsize::new(0));
        for _ in 0..HTTPS_CONCURRENCY {
            let (next, outcomes, acked) = (next_https.clone(), outcomes.clone(), acked.clone());
            let (http, endpoint, scope, group_key) = (
                http.clone(),
                endpoint.clone(),
                conn.id_scope.clone(),
                group_key.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= HTTPS_DEVICES {
                        break;
                    }
                    let id = format!("storm-h-{i:04}");
                    let started = Instant::now();
                    let result = register_https(&http, &endpoint, &scope, &id, &group_key).await;
                    let outcome = finish(id, true, started, result, &acked);
                    outcomes.lock().expect("outcomes").push(outcome);
                }
            }));
        }
        let next_mqtt = Arc::new(AtomicUsize::new(0));
        for _ in 0..MQTT_CONCURRENCY {
            let (next, outcomes, acked) = (next_mqtt.clone(), outcomes.clone(), acked.clone());
            let (client, group_key) = (mqtt_client.clone(), group_key.clone());
            tasks.push(tokio::spawn(async move {
                let options = RegisterOptions {
                    transport: Transport::Mqtt,
                    ..Default::default()
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= MQTT_DEVICES {
                        break;
                    }
                    let id = format!("storm-m-{i:04}");
                    let started = Instant::now();
                    let result = client
                        .register(&id, &DeviceKey::Group(group_key.clone()), &options)
                        .await
                        .map_err(|e| e.to_string())
                        .map(|r| (r.status.to_string(), r.attempts));
                    let outcome = finish(id, false, started, result, &acked);
                    outcomes.lock().expect("outcomes").push(outcome);
                }
            }));
        }
        tasks
    };

    // Kill one node (the first: it made the TLS identity, so nothing relies on it staying).
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.load(Ordering::Relaxed) < total / 3 {
        assert!(
            Instant::now() < deadline,
            "a third of the storm was never acknowledged"
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(10)).await });
    }
    let victim = &mut nodes[0];
    victim.child.kill().expect("kill -9 node 1");
    let killed_at = Instant::now();
    victim.child.wait().expect("node 1 gone");
    let acked_at_kill = acked.load(Ordering::Relaxed);
    // The dead node's claims: queued assignments only another node can finish.
    let orphaned = rt.block_on(query_count(
        &url,
        "SELECT count(*) FROM muster_records WHERE collection = $1 AND claim_owner = 'storm-1'",
        Collection::PendingAssignments.as_str(),
    ));
    eprintln!(
        "storm: killed node 1 after {:.1} s with {acked_at_kill} of {total} acknowledged; it held {orphaned} queued assignments",
        killed_at.duration_since(storm_start).as_secs_f64()
    );
    assert!(orphaned > 0, "node 1 died holding queued work");

    for task in storm {
        rt.block_on(task).expect("device task");
    }
    let storm_end = Instant::now();
    let outcomes = outcomes.lock().expect("outcomes").clone();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.acked.is_none()).collect();
    assert!(
        failed.is_empty(),
        "{} devices were never acknowledged, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    report(&outcomes, storm_start, storm_end, killed_at);

    // The cluster finishes what it acknowledged.
    let store = rt.block_on(async { PostgresStore::open(&url, &key).await.expect("open") });
    let deadline = Instant::now() + Duration::from_secs(180);
    let records = loop {
        let pending = rt
            .block_on(store.count(Collection::PendingAssignments, None))
            .expect("count");
        if pending == 0 {
            let records = list_all(&rt, &store, Collection::Registrations);
            if records.iter().all(|r| r["status"] != "assigning") {
                break records;
            }
        }
        assert!(
            Instant::now() < deadline,
            "registrations still assigning after 180 s ({pending} queued)"
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(250)).await });
    };
    eprintln!(
        "storm: every record final {:.1} s after the storm ended",
        storm_end.elapsed().as_secs_f64()
    );

    assert_eq!(records.len(), total, "one record per device");
    let mut assigned_devices = HashSet::new();
    let mut record_ids = HashSet::new();
    for r in &records {
        assert_eq!(r["status"], "assigned", "every record assigned: {r}");
        let id = r["registrationId"].as_str().expect("registrationId");
        record_ids.insert(id.to_string());
        assigned_devices.insert(
            r["deviceId"]
                .as_str()
                .unwrap_or_else(|| panic!("assigned record names its device: {r}"))
                .to_ascii_lowercase(),
        );
    }
    let hub_devices: HashSet<String> = list_all(&rt, &store, Collection::HubDevices)
        .iter()
        .map(|d| {
            d["device"]["deviceId"]
                .as_str()
                .expect("hub device id")
                .to_ascii_lowercase()
        })
        .collect();
    for o in &outcomes {
        assert!(
            record_ids.contains(&o.id),
            "acknowledged {} has a record",
            o.id
        );
        assert!(
            hub_devices.contains(&o.id.to_ascii_lowercase()),
            "acknowledged {} has its hub device",
            o.id
        );
    }
    assert_eq!(
        hub_devices, assigned_devices,
        "the hub holds exactly the assigned devices (0 orphans)"
    );

    // The shared limiter held across the nodes.
    let mut admitted: Vec<f64> = records
        .iter()
        .map(|r| {
            let t = r["lastUpdatedDateTimeUtc"]
                .as_str()
                .unwrap_or_else(|| panic!("assigned record has a time: {r}"));
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap_or_else(|e| panic!("{t}: {e}"))
                .timestamp_micros() as f64
                / 1e6
        })
        .collect();
    admitted.sort_by(f64::total_cmp);
    if let Err(e) = check_rate(&admitted) {
        panic!("{e}");
    }

    // A figure for BENCHMARKS.md: PostgreSQL transactions (each statement outside a
    // transaction is one: about the round trips) per registration, polls and sweeps included.
    // Statistics reach pg_stat_database within about a second, so this is a lower bound.
    let spent = rt.block_on(transactions(&url)) - transactions_before;
    eprintln!(
        "storm: PostgreSQL: {spent} transactions, {:.1} per registration (sweeps and polls included)",
        spent as f64 / total as f64
    );
    drop(nodes);
}

/// The device's view of one registration: acknowledged with a status, or an error.
fn finish(
    id: String,
    https: bool,
    started: Instant,
    result: Result<(String, u32), String>,
    acked: &AtomicUsize,
) -> Outcome {
    let (acked_at, attempts, error) = match result {
        Ok((status, attempts)) => {
            acked.fetch_add(1, Ordering::Relaxed);
            (Some((Instant::now(), status)), attempts, None)
        }
        Err(e) => (None, ATTEMPTS, Some(e)),
    };
    Outcome {
        id,
        https,
        started,
        acked: acked_at,
        attempts,
        error,
    }
}

/// PUT register until the service answers with an operation id; connection errors, 429 and
/// 5xx are retried after `retry-after` (else a short backoff), as the SDKs do.
/// `Ok((status, attempts))`.
async fn register_https(
    http: &reqwest::Client,
    endpoint: &str,
    scope: &str,
    id: &str,
    group_key: &str,
) -> Result<(String, u32), String> {
    let device_key = DeviceKey::Group(group_key.to_string())
        .device_key(id)
        .map_err(|e| e.to_string())?;
    let url = format!(
        "https://{endpoint}/{scope}/registrations/{id}/register?api-version={}",
        muster_client::device::DEVICE_API_VERSION
    );
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let token = muster_client::device::device_token(scope, id, &device_key, 3600)
            .map_err(|e| e.to_string())?;
        let sent = http
            .put(&url)
            .header("authorization", token)
            .json(&json!({ "registrationId": id }))
            .send()
            .await;
        let backoff = Duration::from_millis(200 * u64::from(attempt.min(10)));
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                last = format!("transport: {e}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Option<Value> = resp.json().await.ok();
        if status.as_u16() == 429 || status.is_server_error() || body.is_none() {
            last = format!("{status}: {body:?}");
            tokio::time::sleep(retry_after.unwrap_or(backoff).min(Duration::from_secs(5))).await;
            continue;
        }
        let body = body.unwrap_or_default();
        if status.is_success() && body["operationId"].as_str().is_some() {
            return Ok((
                body["status"].as_str().unwrap_or_default().to_string(),
                attempt,
            ));
        }
        return Err(format!("{status}: {body}"));
    }
    Err(format!("{ATTEMPTS} attempts, last: {last}"))
}

/// Committed and rolled-back transactions of the database `url` names, so far.
async fn transactions(url: &str) -> i64 {
    query_count(
        url,
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
        url.rsplit('/').next().expect("database name"),
    )
    .await
}

/// The one `bigint` `sql` answers, with `$1` = `arg`, on the database `url` names.
async fn query_count(url: &str, sql: &str, arg: &str) -> i64 {
    let (client, connection) =
        tokio_postgres::connect(&format!("{url}?sslmode=disable"), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
    let task = tokio::spawn(connection);
    let row = client
        .query_one(sql, &[&arg])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = task.await;
    row.get(0)
}

fn list_all(rt: &tokio::runtime::Runtime, store: &PostgresStore, c: Collection) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = rt
            .block_on(store.list(
                c,
                ListQuery {
                    after: after.clone(),
                    limit: 1000,
                    ..Default::default()
                },
            ))
            .expect("list");
        let Some(last) = page.last() else {
            return all;
        };
        after = Some(last.key.clone());
        all.extend(page.into_iter().map(|r| r.body));
    }
}

/// The hub's token bucket (capacity `RATE`, refilled at `RATE`/s) bounds the admissions in
/// any interval [a, b] by `RATE` × (b − a) + `RATE`; one more second of `RATE` allows for the
/// time between taking a token and stamping the record. Three unshared buckets would admit
/// about 3 × `RATE`/s and break the bound on any interval longer than a second or two.
fn check_rate(admitted: &[f64]) -> Result<(), String> {
    let rate = f64::from(RATE);
    let mut busiest_second = 0;
    let mut j = 0;
    for i in 0..admitted.len() {
        while j < admitted.len() && admitted[j] < admitted[i] + 1.0 {
            j += 1;
        }
        busiest_second = busiest_second.max(j - i);
        for k in i..admitted.len() {
            let span = admitted[k] - admitted[i];
            let count = (k - i + 1) as f64;
            if count > rate * span + 2.0 * rate {
                return Err(format!(
                    "{count} admissions in {span:.2} s exceed the hub's {RATE}/s bucket"
                ));
            }
        }
    }
    let span = admitted.last().copied().unwrap_or(0.0) - admitted.first().copied().unwrap_or(0.0);
    let mean = admitted.len() as f64 / span.max(1e-3);
    eprintln!(
        "storm: {} admissions over {span:.1} s: mean {mean:.1}/s, busiest second {busiest_second} (rate {RATE}/s, bucket {RATE})",
        admitted.len()
    );
    // Throttling happened: the hub ran near its rate, not below it.
    if mean <= rate * 0.5 {
        return Err(format!(
            "the storm never pressed the hub's rate (mean {mean:.1}/s)"
        ));
    }
    Ok(())
}

/// Prints the storm's figures: acknowledgements per second overall and in the kill window,
/// and latency percentiles (start to acknowledgement) of the registrations answered then.
fn report(outcomes: &[Outcome], start: Instant, end: Instant, killed_at: Instant) {
    // The window ends early when the HTTPS devices are all done (the MQTT ones only answer
    // once assigned, at the hub's rate), so the rate is not diluted by the tail.
    let last_https = outcomes
        .iter()
        .filter(|o| o.https)
        .filter_map(|o| o.acked.as_ref().map(|(at, _)| *at))
        .max()
        .unwrap_or(end);
    let window_end =
        (killed_at + KILL_WINDOW).min(last_https.max(killed_at + Duration::from_millis(100)));
    let window = (window_end - killed_at).as_secs_f64();
    let in_window: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| {
            o.acked
                .as_ref()
                .is_some_and(|(at, _)| *at >= killed_at && *at <= window_end)
        })
        .collect();
    let latencies = |pick: &dyn Fn(&Outcome) -> bool| {
        let mut l: Vec<f64> = in_window
            .iter()
            .filter(|o| pick(o))
            .filter_map(|o| {
                o.acked
                    .as_ref()
                    .map(|(at, _)| (*at - o.started).as_secs_f64())
            })
            .collect();
        l.sort_by(f64::total_cmp);
        let p = |q: f64| {
            l.get(((l.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(f64::NAN, |s| s * 1000.0)
        };
        (l.len(), p(0.5), p(0.99), p(1.0))
    };
    let assigning = outcomes
        .iter()
        .filter(|o| o.acked.as_ref().is_some_and(|(_, s)| s == "assigning"))
        .count();
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let retried = outcomes.iter().filter(|o| o.attempts > 1).count();
    let before = outcomes
        .iter()
        .filter(|o| o.acked.as_ref().is_some_and(|(at, _)| *at < killed_at))
        .count();
    eprintln!(
        "storm: before the kill: {before} acknowledged in {:.1} s ({:.0}/s)",
        (killed_at - start).as_secs_f64(),
        before as f64 / (killed_at - start).as_secs_f64()
    );
    let secs = (end - start).as_secs_f64();
    eprintln!(
        "storm: {} registrations acknowledged in {secs:.1} s ({:.0}/s), {assigning} of them first answered `assigning`, {retried} retried, {failed} failed",
        outcomes.len(),
        outcomes.len() as f64 / secs
    );
    let (n, p50, p99, max) = latencies(&|o| o.https);
    let window_retried = in_window.iter().filter(|o| o.attempts > 1).count();
    eprintln!(
        "storm: kill window ({window:.2} s from the kill): {} acknowledged ({:.0}/s, {window_retried} after a retry); HTTPS start to acknowledgement: n={n}, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
        in_window.len(),
        in_window.len() as f64 / window
    );
    let (n, p50, p99, max) = latencies(&|o| !o.https);
    eprintln!(
        "storm: kill window: MQTT start to assigned (throttled queue included): n={n}, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms"
    );
}

/// The rate check itself: admissions at the hub's rate (after a full bucket's burst) pass;
/// three unshared buckets' worth (3 × `RATE`/s for a few seconds) is caught.
#[test]
fn the_rate_check_catches_unshared_buckets() {
    let at = |per_second: f64, n: usize| -> Vec<f64> {
        let burst = (0..RATE as usize).map(|i| i as f64 * 1e-3);
        burst
            .chain((0..n).map(|i| 1.0 + i as f64 / per_second))
            .collect()
    };
    assert_eq!(check_rate(&at(f64::from(RATE), 5 * RATE as usize)), Ok(()));
    let three_nodes = check_rate(&at(3.0 * f64::from(RATE), 900));
    assert!(three_nodes.is_err(), "3 × the rate must fail the check");
    let idle = check_rate(&at(f64::from(RATE) / 4.0, 100));
    assert!(
        idle.is_err(),
        "a hub never pressed is not a throttling test"
    );
}
