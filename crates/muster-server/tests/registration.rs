//! Device registration through a real server over HTTPS: attestation, allocation, hub writes,
//! reprovisioning, refusals and throttling. Hubs are real: each server runs a built-in hub, and
//! extra servers serve as further linked hubs.

mod common;

use std::time::Duration;

use common::{device_token, now, start, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use reqwest::Method;
use serde_json::{json, Value};

fn group(id: &str) -> Value {
    json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"},
           "initialTwin": {"tags": {"line": "7"}, "properties": {"desired": {"interval": 30}}}})
}

async fn group_key(dps: &Dps, id: &str, body: Value) -> String {
    let (s, b) = dps
        .service(Method::PUT, &format!("/enrollmentGroups/{id}"), Some(body))
        .await;
    assert_eq!(s, 200, "{b}");
    b["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn group_device_is_assigned_in_the_first_answer_and_written_into_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let key = group_key(&dps, "factory", group("factory")).await;
    let rid = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6";
    let device_key = derive_device_key(&key, rid).unwrap();
    let token = device_token(&dps.info.id_scope, rid, &device_key, now() + 3600);

    let (status, retry, body) = dps
        .register(rid, &token, json!({"registrationId": rid}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(retry, None, "nothing to wait for");
    assert_eq!(body["status"], "assigned", "{body}");
    let state = &body["registrationState"];
    let (hub_name, hub_cs) = dps.hub();
    assert_eq!(state["assignedHub"], json!(hub_name));
    assert_eq!(state["deviceId"], rid);
    assert_eq!(state["substatus"], "initialAssignment");
    assert_eq!(state["symmetricKey"]["enrollmentGroupId"], "factory");
    let op = body["operationId"].as_str().unwrap().to_string();

    // Polling the operation answers 200 with the same state.
    let (s, polled) = dps.poll(rid, &op, &token).await;
    assert_eq!(s, 200);
    assert_eq!(polled["registrationState"]["assignedHub"], json!(hub_name));

    // The hub has the device with the derived keys, and its twin carries the initial twin.
    let (s, device) = dps.hub_call(&hub_cs, &format!("/devices/{rid}")).await;
    assert_eq!(s, 200, "{device}");
    assert_eq!(device["authentication"]["type"], "sas");
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        json!(device_key)
    );
    let (_, twin) = dps.hub_call(&hub_cs, &format!("/twins/{rid}")).await;
    assert_eq!(twin["tags"]["line"], "7", "{twin}");
    assert_eq!(twin["properties"]["desired"]["interval"], 30, "{twin}");

    // The record is visible through the service API, under the group too.
    let (s, record) = dps
        .service(Method::GET, &format!("/registrations/{rid}"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(record["status"], "assigned");
    assert_eq!(record["assignedHub"], json!(hub_name));
    let (_, list) = dps
        .service(Method::POST, "/registrations/factory/query", None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    // Registering again lands on the same hub and keeps the device: idempotent.
    let (_, _, again) = dps.register(rid, &token, json!({})).await;
    assert_eq!(again["status"], "assigned");
    assert_eq!(again["registrationState"]["assignedHub"], json!(hub_name));
    assert_eq!(again["registrationState"]["substatus"], "initialAssignment");
    server.shutdown().await;
}

#[tokio::test]
async fn individual_enrollment_with_either_key_and_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (s, e) = dps
        .service(
            Method::PUT,
            "/enrollments/Sensor-01",
            Some(
                json!({"registrationId": "Sensor-01", "deviceId": "sensor-one",
                "attestation": {"type": "symmetricKey"}, "capabilities": {"iotEdge": true}}),
            ),
        )
        .await;
    assert_eq!(s, 200);
    let secondary = e["attestation"]["symmetricKey"]["secondaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    // Registration ids match case-insensitively; the secondary key works too.
    let token = device_token(&dps.info.id_scope, "sensor-01", &secondary, now() + 60);
    let (_, _, body) = dps
        .register("sensor-01", &token, json!({"payload": {"fw": "1.2"}}))
        .await;
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["registrationState"]["deviceId"], "sensor-one");
    let (_, hub_cs) = dps.hub();
    let (_, device) = dps.hub_call(&hub_cs, "/devices/sensor-one").await;
    assert_eq!(device["capabilities"]["iotEdge"], true, "{device}");
    assert_eq!(
        device["authentication"]["symmetricKey"]["secondaryKey"],
        json!(secondary)
    );
    // The individual enrollment's GET now embeds the record.
    let (_, got) = dps
        .service(Method::GET, "/enrollments/Sensor-01", None)
        .await;
    assert_eq!(got["registrationState"]["status"], "assigned");
    server.shutdown().await;
}

#[tokio::test]
async fn refusals_say_which_check_failed_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let key = group_key(&dps, "g", group("g")).await;
    let scope = dps.info.id_scope.clone();
    let dk = derive_device_key(&key, "dev-1").unwrap();

    let wrong = device_token(
        &scope,
        "dev-1",
        &derive_device_key(&key, "dev-2").unwrap(),
        now() + 60,
    );
    let (s, _, b) = dps.register("dev-1", &wrong, json!({})).await;
    assert_eq!((s, b["errorCode"].as_u64()), (401, Some(401005)), "{b}");

    let expired = device_token(&scope, "dev-1", &dk, now() - 3600);
    let (s, _, b) = dps.register("dev-1", &expired, json!({})).await;
    assert_eq!((s, b["errorCode"].as_u64()), (401, Some(401003)), "{b}");

    let r = dps
        .http
        .put(format!(
            "https://{}/0neFFFFFFFF/registrations/dev-1/register",
            dps.info.device_endpoint
        ))
        .header(
            "authorization",
            device_token("0neFFFFFFFF", "dev-1", &dk, now() + 60),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["errorCode"], 401004);

    let (s, _, b) = dps
        .register(
            "bad$id",
            &device_token(&scope, "bad$id", &dk, now() + 60),
            json!({}),
        )
        .await;
    assert_eq!((s, b["errorCode"].as_u64()), (400, Some(400002)), "{b}");

    // The token must name this device.
    let other = device_token(&scope, "dev-9", &dk, now() + 60);
    let (s, _, b) = dps.register("dev-1", &other, json!({})).await;
    assert_eq!(s, 401);
    assert!(b["message"].as_str().unwrap().contains("sr"), "{b}");

    // A disabled individual enrollment blocks one device of an enabled group.
    dps.service(
        Method::PUT,
        "/enrollments/dev-1",
        Some(json!({"attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})),
    )
    .await;
    let token = device_token(&scope, "dev-1", &dk, now() + 60);
    let (s, _, b) = dps.register("dev-1", &token, json!({})).await;
    assert_eq!(s, 202);
    assert_eq!(b["status"], "disabled", "{b}");

    // A disabled group answers disabled for its devices.
    let mut disabled = group("g2");
    disabled["provisioningStatus"] = json!("disabled");
    let k2 = group_key(&dps, "g2", disabled).await;
    let t2 = device_token(
        &scope,
        "dev-3",
        &derive_device_key(&k2, "dev-3").unwrap(),
        now() + 60,
    );
    let (_, _, b) = dps.register("dev-3", &t2, json!({})).await;
    assert_eq!(b["status"], "disabled");

    // None of these reached the hub.
    let (_, hub_cs) = dps.hub();
    for d in ["dev-1", "dev-3"] {
        let (s, _) = dps.hub_call(&hub_cs, &format!("/devices/{d}")).await;
        assert_eq!(s, 404, "{d} must not exist on the hub");
    }
    // Unknown operations are 404 for the device that asks.
    let (s, b) = dps.poll("dev-3", "5.nope", &t2).await;
    assert_eq!((s, b["errorCode"].as_u64()), (404, Some(404204)));
    server.shutdown().await;
}

/// Starts `n` servers sharing one CA; the first links the others' built-in hubs.
async fn linked_servers(n: usize, dirs: &[tempfile::TempDir]) -> Vec<muster_server::Server> {
    let mut servers = vec![start(dirs[0].path(), "127.0.0.1", None).await];
    for d in dirs.iter().take(n).skip(1) {
        servers.push(start(d.path(), "127.0.0.1", Some(dirs[0].path())).await);
    }
    let dps = Dps::new(&servers[0].connection);
    for s in servers.iter().skip(1) {
        let h = &s.connection.hubs[0];
        let (st, b) = dps
            .service(
                Method::PUT,
                &format!("/linkedHubs/{}", h.host_name),
                Some(json!({"connectionString": h.connection_string})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        assert!(
            b.get("connectionString").is_none(),
            "keys are never returned"
        );
    }
    servers
}

#[tokio::test]
async fn hashed_allocation_follows_weights_across_three_hubs() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(3, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let hubs: Vec<String> = servers
        .iter()
        .map(|s| s.connection.hubs[0].host_name.clone())
        .collect();
    let (s, _) = dps
        .service(
            Method::PUT,
            &format!("/linkedHubs/{}", hubs[2]),
            Some(json!({"allocationWeight": 2})),
        )
        .await;
    assert_eq!(s, 200);
    let key = group_key(
        &dps,
        "fleet",
        json!({"enrollmentGroupId": "fleet", "attestation": {"type": "symmetricKey"}}),
    )
    .await;

    let mut counts = std::collections::HashMap::<String, usize>::new();
    let mut first_hub = None;
    let ids: Vec<String> = (0..1000).map(|i| format!("fleet-{i:04}")).collect();
    for chunk in ids.chunks(25) {
        let futs = chunk.iter().map(|id| {
            let token = device_token(
                &dps.info.id_scope,
                id,
                &derive_device_key(&key, id).unwrap(),
                now() + 600,
            );
            let dps = &dps;
            async move { dps.register(id, &token, json!({})).await }
        });
        for (s, _, b) in futures_util::future::join_all(futs).await {
            assert_eq!(s, 202);
            assert_eq!(b["status"], "assigned", "{b}");
            let hub = b["registrationState"]["assignedHub"]
                .as_str()
                .unwrap()
                .to_string();
            first_hub.get_or_insert((
                b["registrationState"]["deviceId"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                hub.clone(),
            ));
            *counts.entry(hub).or_default() += 1;
        }
    }
    let share = |h: &str| counts.get(h).copied().unwrap_or(0) as f64 / 1000.0;
    assert!((share(&hubs[0]) - 0.25).abs() <= 0.05, "{counts:?}");
    assert!((share(&hubs[1]) - 0.25).abs() <= 0.05, "{counts:?}");
    assert!((share(&hubs[2]) - 0.50).abs() <= 0.05, "{counts:?}");
    // The device is really in the hub it was told, and only there.
    let (device, hub) = first_hub.unwrap();
    for s in &servers {
        let h = &s.connection.hubs[0];
        let (status, _) = dps
            .hub_call(&h.connection_string, &format!("/devices/{device}"))
            .await;
        assert_eq!(
            status == 200,
            h.host_name == hub,
            "{device} on {}",
            h.host_name
        );
    }
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn reprovisioning_migrates_resets_or_stays() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(2, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let a = servers[0].connection.hubs[0].clone();
    let b = servers[1].connection.hubs[0].clone();
    let scope = dps.info.id_scope.clone();

    for (policy, expect_sub, moves) in [
        (
            json!({"updateHubAssignment": true, "migrateDeviceData": true}),
            "deviceDataMigrated",
            true,
        ),
        (
            json!({"updateHubAssignment": true, "migrateDeviceData": false}),
            "deviceDataReset",
            true,
        ),
        (
            json!({"updateHubAssignment": false, "migrateDeviceData": false}),
            "initialAssignment",
            false,
        ),
    ] {
        let id = format!("re-{}", expect_sub.to_ascii_lowercase());
        let body = |hub: &str| {
            json!({"registrationId": id, "attestation": {"type": "symmetricKey"},
            "allocationPolicy": "static", "iotHubs": [hub], "reprovisionPolicy": policy,
            "initialTwin": {"tags": {"gen": "initial"}, "properties": {"desired": {"mode": "initial"}}}})
        };
        let (_, e) = dps
            .service(
                Method::PUT,
                &format!("/enrollments/{id}"),
                Some(body(&a.host_name)),
            )
            .await;
        let key = e["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap()
            .to_string();
        let token = device_token(&scope, &id, &key, now() + 600);
        let (_, _, r) = dps.register(&id, &token, json!({})).await;
        assert_eq!(
            r["registrationState"]["assignedHub"],
            json!(a.host_name),
            "{r}"
        );

        // The twin changes on hub A after provisioning (an operator sets a desired property).
        let twin_url = format!("https://{}/twins/{id}?api-version=2021-04-12", a.host_name);
        let patched = dps
            .http
            .patch(&twin_url)
            .header("authorization", common::policy_token(&a.connection_string))
            .json(&json!({"tags": {"gen": "changed"}, "properties": {"desired": {"mode": "changed"}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(patched.status(), 200);

        // The enrollment now points at hub B.
        let mut upd = body(&b.host_name);
        upd["attestation"]["symmetricKey"] = e["attestation"]["symmetricKey"].clone();
        let r = dps
            .http
            .put(format!(
                "{}/enrollments/{id}?api-version=2021-10-01",
                dps.info.service_endpoint
            ))
            .header(
                "authorization",
                common::policy_token(&dps.info.service_connection_string),
            )
            .header("if-match", "*")
            .json(&upd)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        let (_, _, r) = dps.register(&id, &token, json!({})).await;
        let state = &r["registrationState"];
        assert_eq!(state["substatus"], expect_sub, "{r}");
        let (on_a, _) = dps
            .hub_call(&a.connection_string, &format!("/devices/{id}"))
            .await;
        let (on_b, _) = dps
            .hub_call(&b.connection_string, &format!("/devices/{id}"))
            .await;
        if moves {
            assert_eq!(state["assignedHub"], json!(b.host_name));
            assert_eq!((on_a, on_b), (404, 200), "moved: gone from A, present on B");
            let (_, twin) = dps
                .hub_call(&b.connection_string, &format!("/twins/{id}"))
                .await;
            let want = if expect_sub == "deviceDataMigrated" {
                "changed"
            } else {
                "initial"
            };
            assert_eq!(twin["tags"]["gen"], want, "{twin}");
            assert_eq!(twin["properties"]["desired"]["mode"], want, "{twin}");
        } else {
            assert_eq!(state["assignedHub"], json!(a.host_name));
            assert_eq!((on_a, on_b), (200, 404));
        }
    }
    for s in servers {
        s.shutdown().await;
    }
}

/// A webhook server on loopback that answers what the test tells it.
async fn webhook(
    answer: fn(&Value) -> (u16, Value),
    delay: Duration,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use axum::routing::post;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/alloc",
        post(move |axum::Json(req): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(req.clone());
                tokio::time::sleep(delay).await;
                let (s, b) = answer(&req);
                (axum::http::StatusCode::from_u16(s).unwrap(), axum::Json(b))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}/alloc?code=secret"), rx)
}

#[tokio::test]
async fn custom_allocation_uses_the_webhook_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), "127.0.0.1");
    cfg.webhook_timeout_ms = 300;
    cfg.webhook_retries = 1;
    let server = muster_server::Server::start(cfg).await.unwrap();
    let dps = Dps::new(&server.connection);
    let scope = dps.info.id_scope.clone();
    let (hub_name, hub_cs) = dps.hub();

    let (ok_url, mut seen) = webhook(
        |req| (200, json!({"iotHubHostName": req["linkedHubs"][0], "payload": {"echo": req["deviceRuntimeContext"]["payload"]},
                           "initialTwin": {"tags": {"from": "webhook"}}})),
        Duration::ZERO,
    )
    .await;
    let (down_url, _) = ("http://127.0.0.1:9/alloc".to_string(), ());
    let (slow_url, _slow_seen) = webhook(
        |req| (200, json!({"iotHubHostName": req["linkedHubs"][0]})),
        Duration::from_secs(3),
    )
    .await;
    let (refusing_url, _r) = webhook(|_| (401, json!({})), Duration::ZERO).await;
    let (nohub_url, _n) = webhook(|_| (200, json!({"payload": 1})), Duration::ZERO).await;

    for (id, url, expect) in [
        ("wh-ok", ok_url.as_str(), None),
        ("wh-down", down_url.as_str(), Some(400207)),
        ("wh-slow", slow_url.as_str(), Some(400207)),
        ("wh-401", refusing_url.as_str(), Some(400209)),
        ("wh-nohub", nohub_url.as_str(), Some(400208)),
    ] {
        let (s, e) = dps
            .service(Method::PUT, &format!("/enrollments/{id}"), Some(json!({"attestation": {"type": "symmetricKey"},
                "allocationPolicy": "custom", "customAllocationDefinition": {"webhookUrl": url, "apiVersion": "2021-10-01"}})))
            .await;
        assert_eq!(s, 200, "{e}");
        let key = e["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        let token = device_token(&scope, id, key, now() + 60);
        let (_, _, r) = dps
            .register(id, &token, json!({"payload": {"model": "t-1000"}}))
            .await;
        match expect {
            None => {
                assert_eq!(r["status"], "assigned", "{r}");
                assert_eq!(r["registrationState"]["assignedHub"], json!(hub_name));
                assert_eq!(
                    r["registrationState"]["payload"],
                    json!({"echo": {"model": "t-1000"}})
                );
                let req = seen.recv().await.unwrap();
                assert_eq!(req["individualEnrollment"]["registrationId"], id);
                assert!(
                    req["individualEnrollment"]["attestation"]
                        .get("symmetricKey")
                        .is_none(),
                    "no keys to webhooks"
                );
                assert_eq!(req["deviceRuntimeContext"]["registrationId"], id);
                let (_, twin) = dps.hub_call(&hub_cs, &format!("/twins/{id}")).await;
                assert_eq!(twin["tags"]["from"], "webhook");
            }
            Some(code) => {
                assert_eq!(r["status"], "failed", "{id}: {r}");
                assert_eq!(r["registrationState"]["errorCode"], code, "{id}: {r}");
                assert!(r["registrationState"]["errorMessage"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()));
                let (s, _) = dps.hub_call(&hub_cs, &format!("/devices/{id}")).await;
                assert_eq!(s, 404, "{id}: no device left behind");
                let (_, rec) = dps
                    .service(Method::GET, &format!("/registrations/{id}"), None)
                    .await;
                assert_eq!(rec["status"], "failed");
                assert_eq!(rec["errorCode"], code);
            }
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn throttled_registrations_are_accepted_and_finish_in_order_even_across_a_restart() {
    throttled_then_restart(false).await;
}

/// A database from before pending-assignment markers: the first start finds the pending
/// plans by one full scan, finishes them, and records that the scan was done.
#[tokio::test]
async fn pending_plans_saved_before_markers_existed_are_found_once_and_finished() {
    throttled_then_restart(true).await;
}

async fn throttled_then_restart(legacy: bool) {
    use muster_store::{Collection, Expect, SqliteStore, Store, Write};
    const MARKERS_SETTING: &str = "pendingAssignmentMarkers";
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (hub_name, hub_cs) = dps.hub();
    let (s, b) = dps
        .service(
            Method::PUT,
            &format!("/linkedHubs/{hub_name}"),
            Some(json!({"maxRegistrationsPerSecond": 1})),
        )
        .await;
    assert_eq!(
        (s, &b["maxRegistrationsPerSecond"]),
        (200, &json!(1)),
        "{b}"
    );
    let key = group_key(
        &dps,
        "slow",
        json!({"enrollmentGroupId": "slow", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let scope = dps.info.id_scope.clone();
    let ids: Vec<String> = (0..4).map(|i| format!("slow-{i}")).collect();
    let mut ops = Vec::new();
    let mut assigning = 0;
    for id in &ids {
        let token = device_token(
            &scope,
            id,
            &derive_device_key(&key, id).unwrap(),
            now() + 600,
        );
        let (s, retry, r) = dps.register(id, &token, json!({})).await;
        assert_eq!(s, 202);
        if r["status"] == "assigning" {
            assigning += 1;
            assert!(retry.is_some(), "assigning answers carry retry-after");
        }
        ops.push((
            id.clone(),
            r["operationId"].as_str().unwrap().to_string(),
            token,
        ));
    }
    assert!(
        assigning >= 2,
        "a 1/s hub cannot take 4 registrations at once"
    );
    // Stop before the queue drains: accepted registrations must survive. Same port again, as a
    // real deployment would have.
    let port = server.https_addrs[0].port();
    let mqtt_port = server.mqtt_addrs[0].port();
    server.shutdown().await;
    let db = dir.path().join("muster.db");
    {
        let store = SqliteStore::open(&db).unwrap();
        let markers = store
            .count(Collection::PendingAssignments, None)
            .await
            .unwrap();
        assert!(
            markers >= 2 && markers <= assigning,
            "one marker per unfinished assignment: {markers} for {assigning} accepted"
        );
        if legacy {
            let mut writes = vec![Write::delete(
                Collection::Settings,
                MARKERS_SETTING,
                Expect::Any,
            )];
            for r in store
                .list(
                    Collection::PendingAssignments,
                    muster_store::ListQuery {
                        partition: None,
                        after: None,
                        limit: 100,
                    },
                )
                .await
                .unwrap()
            {
                writes.push(Write::delete(
                    Collection::PendingAssignments,
                    r.key,
                    Expect::Any,
                ));
            }
            store.write(writes).await.unwrap();
        }
    }
    let mut cfg = common::config(dir.path(), "127.0.0.1");
    cfg.https_port = port;
    cfg.mqtt_port = mqtt_port;
    let server = muster_server::Server::start(cfg).await.unwrap();
    let dps = Dps::new(&server.connection);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut finished = Vec::new();
    for (id, op, token) in &ops {
        loop {
            let (s, r) = dps.poll(id, op, token).await;
            if r["status"] == "assigned" {
                assert_eq!(s, 200);
                finished.push(
                    r["registrationState"]["lastUpdatedDateTimeUtc"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
                break;
            }
            assert_eq!(r["status"], "assigning", "{r}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never finished"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (s, _) = dps.hub_call(&hub_cs, &format!("/devices/{id}")).await;
        assert_eq!(s, 200);
    }
    let mut sorted = finished.clone();
    sorted.sort();
    assert_eq!(
        finished, sorted,
        "completed in the order they were accepted"
    );
    server.shutdown().await;
    let store = SqliteStore::open(&db).unwrap();
    assert_eq!(
        store
            .count(Collection::PendingAssignments, None)
            .await
            .unwrap(),
        0,
        "finished assignments leave no marker"
    );
    assert!(store
        .get(Collection::Settings, MARKERS_SETTING)
        .await
        .unwrap()
        .is_some());
}

/// `DELETE /devices/{id}` on a hub, as an operator would.
async fn delete_hub_device(dps: &Dps, connection_string: &str, device_id: &str) {
    let cs = muster_proto::ConnectionString::parse(connection_string).unwrap();
    let r = dps
        .http
        .delete(format!(
            "https://{}/devices/{device_id}?api-version=2021-04-12",
            cs.host_name
        ))
        .header("authorization", common::policy_token(connection_string))
        .header("if-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "delete {device_id}");
}

/// Issue 11 item 2: a registration record remains, the hub device and the group were deleted,
/// the group comes back with another initial twin. The device is created anew with the
/// *current* group's initial twin and the substatus says its data was reset, on the built-in
/// hub (in process) and on a hub reached over the registry REST API alike.
#[tokio::test]
async fn a_device_absent_from_its_hub_gets_the_current_enrollments_initial_twin() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(2, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let scope = dps.info.id_scope.clone();
    for (n, hub) in [
        &servers[0].connection.hubs[0],
        &servers[1].connection.hubs[0],
    ]
    .into_iter()
    .enumerate()
    {
        let gid = format!("recreated-{n}");
        let rid = format!("phoenix-{n}");
        let body = |generation: &str, keys: Option<&Value>| {
            let mut g = json!({"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"},
                "allocationPolicy": "static", "iotHubs": [hub.host_name],
                "initialTwin": {"tags": {"gen": generation},
                                "properties": {"desired": {"gen": generation}}}});
            if let Some(k) = keys {
                g["attestation"]["symmetricKey"] = k.clone();
            }
            g
        };
        let (s, created) = dps
            .service(
                Method::PUT,
                &format!("/enrollmentGroups/{gid}"),
                Some(body("first", None)),
            )
            .await;
        assert_eq!(s, 200, "{created}");
        let keys = created["attestation"]["symmetricKey"].clone();
        let group_key = keys["primaryKey"].as_str().unwrap();
        let device_key = derive_device_key(group_key, &rid).unwrap();
        let token = device_token(&scope, &rid, &device_key, now() + 600);
        let (_, _, first) = dps.register(&rid, &token, json!({})).await;
        assert_eq!(
            first["registrationState"]["assignedHub"],
            json!(hub.host_name),
            "{first}"
        );
        assert_eq!(first["registrationState"]["substatus"], "initialAssignment");

        delete_hub_device(&dps, &hub.connection_string, &rid).await;
        let (s, _) = dps
            .service(Method::DELETE, &format!("/enrollmentGroups/{gid}"), None)
            .await;
        assert_eq!(s, 204);
        let (s, b) = dps
            .service(
                Method::PUT,
                &format!("/enrollmentGroups/{gid}"),
                Some(body("second", Some(&keys))),
            )
            .await;
        assert_eq!(s, 200, "{b}");

        let (_, _, again) = dps.register(&rid, &token, json!({})).await;
        let state = &again["registrationState"];
        assert_eq!(state["status"], "assigned", "{again}");
        assert_eq!(state["assignedHub"], json!(hub.host_name));
        assert_eq!(state["substatus"], "deviceDataReset", "{again}");
        let (s, twin) = dps
            .hub_call(&hub.connection_string, &format!("/twins/{rid}"))
            .await;
        assert_eq!(s, 200, "{twin}");
        assert_eq!(twin["tags"], json!({"gen": "second"}), "{twin}");
        assert_eq!(twin["properties"]["desired"]["gen"], "second", "{twin}");

        // A device the hub still has keeps its twin (migrateDeviceData, same hub) and the
        // substatus it had.
        let (s, _) = dps
            .service(
                Method::PUT,
                &format!("/enrollmentGroups/{gid}"),
                Some(body("third", Some(&keys))),
            )
            .await;
        assert_eq!(s, 409, "no If-Match on an existing group");
        let (_, _, kept) = dps.register(&rid, &token, json!({})).await;
        assert_eq!(kept["registrationState"]["substatus"], "deviceDataReset");
        let (_, twin) = dps
            .hub_call(&hub.connection_string, &format!("/twins/{rid}"))
            .await;
        assert_eq!(twin["tags"], json!({"gen": "second"}), "{twin}");
    }
    for s in servers {
        s.shutdown().await;
    }
}

/// Issue 11 item 4: registration ids are case-insensitive (one record), hub device ids are
/// case-sensitive. The spelling of the latest registration is the record's, the answer's
/// `deviceId` and the hub identity's, with the key derived from it; no identity remains under
/// the other spelling, on the built-in hub and on a hub reached over REST.
#[tokio::test]
async fn registration_ids_differing_in_case_leave_one_hub_identity() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(2, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let scope = dps.info.id_scope.clone();
    for (n, hub) in [
        &servers[0].connection.hubs[0],
        &servers[1].connection.hubs[0],
    ]
    .into_iter()
    .enumerate()
    {
        let gid = format!("cased-{n}");
        let mut g = group(&gid);
        g["allocationPolicy"] = json!("static");
        g["iotHubs"] = json!([hub.host_name]);
        let group_key = group_key(&dps, &gid, g).await;
        let upper = format!("Sensor-{n}A");
        let lower = upper.to_ascii_lowercase();
        for (spelling, previous) in [
            (&upper, None),
            (&lower, Some(&upper)),
            (&upper, Some(&lower)),
        ] {
            let device_key = derive_device_key(&group_key, spelling).unwrap();
            let token = device_token(&scope, spelling, &device_key, now() + 600);
            let (_, _, r) = dps.register(spelling, &token, json!({})).await;
            let state = &r["registrationState"];
            assert_eq!(state["status"], "assigned", "{r}");
            assert_eq!(state["registrationId"], json!(spelling), "{r}");
            assert_eq!(state["deviceId"], json!(spelling), "{r}");
            let (_, record) = dps
                .service(Method::GET, &format!("/registrations/{lower}"), None)
                .await;
            assert_eq!(record["registrationId"], json!(spelling), "{record}");
            assert_eq!(record["deviceId"], json!(spelling), "{record}");
            let (s, devices) = dps.hub_call(&hub.connection_string, "/devices").await;
            assert_eq!(s, 200, "{devices}");
            let ids: Vec<&str> = devices
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|d| d["deviceId"].as_str())
                .filter(|id| id.eq_ignore_ascii_case(&upper))
                .collect();
            assert_eq!(
                ids,
                vec![spelling.as_str()],
                "one identity, the latest spelling"
            );
            let (_, device) = dps
                .hub_call(&hub.connection_string, &format!("/devices/{spelling}"))
                .await;
            assert_eq!(
                device["authentication"]["symmetricKey"]["primaryKey"],
                json!(device_key),
                "{device}"
            );
            if previous.is_some() {
                // The twin moved with the identity (migrateDeviceData, the default).
                assert_eq!(state["substatus"], "deviceDataMigrated", "{r}");
                let (_, twin) = dps
                    .hub_call(&hub.connection_string, &format!("/twins/{spelling}"))
                    .await;
                assert_eq!(twin["tags"]["line"], "7", "{twin}");
            }
        }
    }
    for s in servers {
        s.shutdown().await;
    }
}

/// A hub linked over REST (another server's built-in hub): the first assignment writes the
/// device and its initial twin in two calls after checking that the hub lacks the device, and
/// the cascade deprovisioning deletes the device conditionally on the etag it read.
#[tokio::test]
async fn a_rest_linked_hub_gets_the_initial_twin_and_loses_the_device_on_deprovision() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(2, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let b = servers[1].connection.hubs[0].clone();
    let id = "rest-twin";
    let (s, e) = dps
        .service(
            Method::PUT,
            &format!("/enrollments/{id}"),
            Some(json!({"registrationId": id, "attestation": {"type": "symmetricKey"},
                "allocationPolicy": "static", "iotHubs": [b.host_name],
                "initialTwin": {"tags": {"line": "a"}, "properties": {"desired": {"interval": 5}}}})),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    let key = e["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    let token = device_token(&dps.info.id_scope, id, &key, now() + 600);
    let (_, _, r) = dps.register(id, &token, json!({})).await;
    assert_eq!(r["status"], "assigned", "{r}");
    assert_eq!(r["registrationState"]["assignedHub"], json!(b.host_name));
    assert_eq!(r["registrationState"]["substatus"], "initialAssignment");
    let (s, twin) = dps
        .hub_call(&b.connection_string, &format!("/twins/{id}"))
        .await;
    assert_eq!(s, 200, "{twin}");
    assert_eq!(twin["tags"], json!({"line": "a"}));
    assert_eq!(twin["properties"]["desired"]["interval"], 5);

    let (s, done) = dps
        .service(Method::POST, &format!("/deprovisions/{id}"), None)
        .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["removed"], json!([format!("{}/{id}", b.host_name)]));
    let (s, _) = dps
        .hub_call(&b.connection_string, &format!("/devices/{id}"))
        .await;
    assert_eq!(s, 404, "the device is gone from the linked hub");
    for s in servers {
        s.shutdown().await;
    }
}

/// The service's default allocation policy (`/serviceSettings`) decides for enrollments that
/// set none, from the next registration on: hashed places a device among two hubs, static
/// refuses to choose between them (400210), hashed again places the next.
#[tokio::test]
async fn the_service_default_allocation_policy_applies_to_enrollments_without_one() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = linked_servers(2, &dirs).await;
    let dps = Dps::new(&servers[0].connection);
    let key = group_key(
        &dps,
        "defaults",
        json!({"enrollmentGroupId": "defaults", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let register = |id: &'static str| {
        let token = device_token(
            &dps.info.id_scope,
            id,
            &derive_device_key(&key, id).unwrap(),
            now() + 600,
        );
        let dps = &dps;
        async move { dps.register(id, &token, json!({})).await }
    };
    let set = |policy: &'static str| {
        let dps = &dps;
        async move {
            let (s, b) = dps
                .service(
                    Method::PUT,
                    "/serviceSettings",
                    Some(json!({"allocationPolicy": policy})),
                )
                .await;
            assert_eq!(s, 200, "{b}");
        }
    };

    let (s, _, b) = register("defaults-1").await;
    assert_eq!((s, b["status"].as_str()), (202, Some("assigned")), "{b}");

    set("static").await;
    let (_, _, b) = register("defaults-2").await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["registrationState"]["errorCode"], 400210, "{b}");
    assert!(
        b["registrationState"]["errorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("static allocation"),
        "{b}"
    );

    set("hashed").await;
    let (_, _, b) = register("defaults-3").await;
    assert_eq!(b["status"], "assigned", "{b}");
    for s in servers {
        s.shutdown().await;
    }
}
