//! Intent before effect, against a hub whose device and twin are two writes (like a linked
//! hub over REST): a failure between the device put and the twin write, and a device that
//! registers again between a deprovisioning's record delete and its hub delete.

mod common;

use std::sync::atomic::Ordering;

use common::{Fixture, Pause, HUB};
use muster_registration::DeviceRegistrar;
use serde_json::json;
use tokio::sync::oneshot;

use common::request;

#[tokio::test]
async fn a_twin_write_failing_after_the_device_put_is_finished_with_the_initial_twin() {
    let f = Fixture::new(&["dev-twin"]).await;
    f.hub.fail_twin_write.store(true, Ordering::SeqCst);
    let reply = f.engine().register(request("dev-twin")).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.body["errorCode"], 503003, "{}", reply.body);
    // The device is in the hub without its twin; the intent is kept.
    let half = f.hub.device("dev-twin").expect("device put");
    assert_eq!(half.tags, json!({}));
    let intent = f.record("dev-twin").await.expect("record");
    assert_eq!(intent["status"], "assigning");
    assert_eq!(intent["pending"]["createsDevice"], true, "{intent}");

    // The hub works again; a restarted engine reconciles the intent.
    f.hub.fail_twin_write.store(false, Ordering::SeqCst);
    let restarted = f.engine();
    assert_eq!(restarted.resume_pending().await.expect("resume"), 1);
    let record = f.wait_for_status("dev-twin", "assigned").await;
    assert_eq!(record["substatus"], "initialAssignment", "{record}");
    let device = f.hub.device("dev-twin").expect("device");
    assert_eq!(device.tags, json!({"line": "a"}));
    assert_eq!(device.desired, json!({"interval": 5}));

    // Idempotent: running the finished registration's flow again changes nothing.
    assert_eq!(restarted.resume_pending().await.expect("resume"), 0);
}

#[tokio::test]
async fn a_device_registering_during_a_deprovisioning_keeps_its_hub_device() {
    let f = Fixture::new(&["dev-race"]).await;
    let engine = f.engine();
    let first = engine.register(request("dev-race")).await;
    assert_eq!(first.body["status"], "assigned", "{}", first.body);
    assert!(f.hub.device("dev-race").is_some());

    // The deprovisioning stops between its record delete and its hub delete ...
    let (reached_tx, reached_rx) = oneshot::channel();
    let (proceed_tx, proceed_rx) = oneshot::channel();
    *f.hub.pause_delete.lock().expect("lock") = Some(Pause {
        reached: reached_tx,
        proceed: proceed_rx,
    });
    let deprovisioning = tokio::spawn({
        let engine = engine.clone();
        async move { engine.deprovision("dev-race", None).await }
    });
    reached_rx.await.expect("the hub delete was reached");
    assert!(f.record("dev-race").await.is_none(), "record deleted first");

    // ... while the device registers again and reuses its hub identity.
    let again = engine.register(request("dev-race")).await;
    assert_eq!(again.body["status"], "assigned", "{}", again.body);
    proceed_tx.send(()).expect("resume the deprovisioning");
    let done = deprovisioning.await.expect("join").expect("deprovisioned");
    assert!(done.removed.is_empty(), "{done:?}");

    // The new registration owns a hub device that still exists.
    let record = f.record("dev-race").await.expect("new record");
    assert_eq!(record["status"], "assigned");
    assert!(
        f.hub.device("dev-race").is_some(),
        "the hub device was lost"
    );
    assert_eq!(engine.finish_hub_removals().await.expect("finish"), 0);

    // Without a race, deprovisioning removes the device.
    let done = engine.deprovision("dev-race", None).await.expect("again");
    assert_eq!(done.removed, vec![format!("{HUB}/dev-race")]);
    assert!(f.hub.device("dev-race").is_none());
}
