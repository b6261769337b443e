//! Several nodes (engines with their own node ids) on one store: a plan saved by a node that
//! then stalls or dies is taken over by another once its lease lapses, not before, and not
//! while the first node renews it; the stalled node finishing late does not overwrite the
//! record the other node saved. Run on SQLite (one handle) and on PostgreSQL (a pool per
//! node, on a throwaway cluster).

mod common;

use std::sync::Arc;

use common::{request, Fixture, Pause};
use muster_proto::runtime::{Clock, ManualClock};
use muster_registration::{DeviceRegistrar, Engine};
use muster_store::test_cluster::PgCluster;
use muster_store::{Collection, PostgresStore};
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nodes_plan_is_taken_over_after_its_lease_and_finished_once() {
    let f = Fixture::new(&["dev-x"]).await;
    let clock = Arc::new(ManualClock::new(muster_proto::runtime::SystemClock.now()));
    let a = f.engine_as("node-a", clock.clone());
    let b = f.engine_as("node-b", clock.clone());
    stalled_node_taken_over(&f, &clock, a, b).await;
}

/// The same with each node on its own connection pool to one PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_stalled_nodes_plan_is_taken_over_after_its_lease_and_finished_once() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("store.key");
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
    let f = Fixture::on(a_store.clone(), dir, &["dev-x"]).await;
    let clock = Arc::new(ManualClock::new(muster_proto::runtime::SystemClock.now()));
    let a = f.engine_on(a_store, "node-a", clock.clone());
    let b = f.engine_on(b_store, "node-b", clock.clone());
    stalled_node_taken_over(&f, &clock, a, b).await;
}

async fn stalled_node_taken_over(f: &Fixture, clock: &ManualClock, a: Engine, b: Engine) {
    // Node A saves its plan, then stalls right before its hub write.
    let (reached_tx, reached_rx) = oneshot::channel();
    let (proceed_tx, proceed_rx) = oneshot::channel();
    *f.hub.pause_put.lock().expect("lock") = Some(Pause {
        reached: reached_tx,
        proceed: proceed_rx,
    });
    let stalled = tokio::spawn({
        let a = a.clone();
        async move { a.register(request("dev-x")).await }
    });
    reached_rx.await.expect("node A reached its hub write");
    let intent = f.record("dev-x").await.expect("plan saved");
    assert_eq!(intent["status"], "assigning", "{intent}");

    // While A's lease runs, B finds nothing to take; A renewing keeps it past the first
    // expiry.
    assert_eq!(b.sweep().await.expect("sweep"), 0, "A's lease is running");
    clock.advance_secs(20);
    assert_eq!(a.sweep().await.expect("renew"), 0, "A holds it already");
    clock.advance_secs(20);
    assert_eq!(
        b.sweep().await.expect("sweep"),
        0,
        "A renewed its lease at +20 s, so it holds at +40 s"
    );
    // A stops renewing (it is stalled, as a dead node would be); its lease lapses.
    clock.advance_secs(11);
    assert_eq!(
        b.sweep().await.expect("sweep"),
        1,
        "B takes the lapsed plan over"
    );
    let done = f.wait_for_status("dev-x", "assigned").await;
    assert_eq!(done["assignedHub"], common::HUB, "{done}");
    let finished = f
        .store
        .get(Collection::Registrations, "dev-x")
        .await
        .expect("read")
        .expect("record");
    assert!(
        f.store
            .get(Collection::PendingAssignments, "dev-x")
            .await
            .expect("read")
            .is_none(),
        "the marker goes with the finished plan"
    );

    // A wakes up and finishes the same plan: the same hub device, and B's record stands.
    proceed_tx.send(()).expect("A still waits");
    let reply = stalled.await.expect("A's request");
    assert_eq!(reply.body["status"], "assigned", "{}", reply.body);
    let after = f
        .store
        .get(Collection::Registrations, "dev-x")
        .await
        .expect("read")
        .expect("record");
    assert_eq!(
        after.etag, finished.etag,
        "the late completion must not overwrite the record B saved"
    );
    assert!(f.hub.device("dev-x").is_some(), "one hub device");
    assert_eq!(
        f.store
            .count(Collection::PendingAssignments, None)
            .await
            .expect("count"),
        0,
        "no marker left behind"
    );
    assert_eq!(
        a.sweep().await.expect("sweep"),
        0,
        "nothing is left for anyone to finish"
    );
}
