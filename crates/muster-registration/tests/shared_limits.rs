//! Two nodes (engines, each with its own connection pool) on one PostgreSQL store share a
//! hub's rate limit: together they admit no more than the hub's `maxRegistrationsPerSecond`,
//! and the registrations over it are queued (`assigning`), not refused, then finished as the
//! shared bucket refills. Time is the engines' injected clock, frozen except where the test
//! moves it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::{request, unused_http_client, TwoStepHub, DEVICE_KEY, HUB, SCOPE};
use muster_proto::runtime::{Clock, ManualClock, SeededEntropy, SystemClock};
use muster_proto::IdScope;
use muster_registration::{DeviceRegistrar, Engine, EngineConfig};
use muster_store::test_cluster::PgCluster;
use muster_store::{Collection, Expect, PostgresStore, Store, Write};
use serde_json::json;

const RATE: u32 = 5;
const DEVICES: usize = 24;

fn engine(
    store: Arc<PostgresStore>,
    clock: Arc<ManualClock>,
    node: &str,
    hub: Arc<TwoStepHub>,
) -> Engine {
    let mut config = EngineConfig::new(IdScope::new(SCOPE).expect("scope"));
    config.node_id = node.into();
    Engine::new(
        store,
        clock,
        Arc::new(SeededEntropy::new(7)),
        unused_http_client(),
        config,
    )
    .with_local_hub(HUB, hub)
}

async fn assigned(store: &PostgresStore) -> usize {
    let mut n = 0;
    for i in 0..DEVICES {
        let r = store
            .get(Collection::Registrations, &format!("dev-{i:02}"))
            .await
            .expect("read");
        if r.is_some_and(|r| r.body["status"] == "assigned") {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_admit_no_more_than_the_hubs_rate_together() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let keys = tempfile::tempdir().expect("tempdir");
    let key = keys.path().join("store.key");
    let a_store = Arc::new(
        PostgresStore::open(cluster.url(), &key)
            .await
            .expect("node a"),
    );
    let b_store = Arc::new(
        PostgresStore::open(cluster.url(), &key)
            .await
            .expect("node b"),
    );
    let device_key = B64.encode(DEVICE_KEY);
    let mut seed = vec![Write::put(
        Collection::LinkedHubs,
        HUB,
        Expect::Any,
        json!({"name": HUB, "allocationWeight": 1, "applyAllocationPolicy": true,
            "maxRegistrationsPerSecond": RATE,
            "connectionString": format!("HostName={HUB};SharedAccessKeyName=owner;SharedAccessKey={device_key}")}),
    )];
    for i in 0..DEVICES {
        let id = format!("dev-{i:02}");
        seed.push(Write::put(
            Collection::Enrollments,
            id.clone(),
            Expect::Any,
            json!({"registrationId": id, "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": device_key, "secondaryKey": device_key}}}),
        ));
    }
    a_store.write(seed).await.expect("seed");

    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let hub = Arc::new(TwoStepHub::default());
    let a = engine(a_store.clone(), clock.clone(), "node-a", hub.clone());
    let b = engine(b_store.clone(), clock.clone(), "node-b", hub.clone());

    // A burst spread over both nodes at one instant: one bucket's worth in all.
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            node.register(request(&format!("dev-{i:02}"))).await
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        let reply = t.await.expect("registration");
        match reply.body["status"].as_str() {
            Some("assigned") => admitted += 1,
            Some("assigning") => {}
            other => panic!(
                "over the rate a registration queues, never fails: {other:?} {}",
                reply.body
            ),
        }
    }
    assert_eq!(
        admitted,
        RATE as usize,
        "both nodes together admit one second's worth (in-process buckets would admit {})",
        2 * RATE
    );
    assert_eq!(hub.device_count(), RATE as usize);

    // One second later the shared bucket holds one second's worth again: the queued
    // registrations of both nodes take exactly that much between them.
    clock.advance_secs(1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while assigned(&a_store).await < 2 * RATE as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queues never moved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a_store
            .take_token(
                &format!("hub/{HUB}"),
                RATE,
                clock.now().0.timestamp_millis()
            )
            .await
            .expect("take"),
        Some(false),
        "the queues took the whole refill; none is left at this instant"
    );
    assert_eq!(assigned(&a_store).await, 2 * RATE as usize);
    assert_eq!(hub.device_count(), 2 * RATE as usize);
}
