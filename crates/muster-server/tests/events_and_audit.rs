//! Live registration events and the audit log through a real server on loopback: the SSE
//! stream delivers a registration made after subscribing, refuses subscribers beyond the limit,
//! and hub registry writes are audited with the hub policy that signed them (a device's
//! telemetry over the hub's device HTTPS API is not).

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{config, device_token, now, policy_token, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use muster_server::Server;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::{timeout_at, Instant};

/// Reads SSE `registration` events from `resp` until one names `registration_id`, or the
/// deadline passes.
async fn next_registration(
    resp: &mut reqwest::Response,
    buffer: &mut String,
    registration_id: &str,
    deadline: Instant,
) -> Option<Value> {
    loop {
        // Whole events end with a blank line.
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if !event.lines().any(|l| l == "event: registration") {
                continue;
            }
            let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
            let value: Value = serde_json::from_str(data).ok()?;
            if value["registrationId"] == registration_id {
                return Some(value);
            }
        }
        let chunk = timeout_at(deadline, resp.chunk()).await.ok()?.ok()??;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn registrations_stream_to_subscribers_and_hub_writes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1");
    cfg.max_event_subscribers = 1;
    let server = Server::start(cfg).await.unwrap();
    let dps = Dps::new(&server.connection);
    let (s, group) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/line",
            Some(json!({"enrollmentGroupId": "line", "attestation": {"type": "symmetricKey"}})),
        )
        .await;
    assert_eq!(s, 200, "{group}");
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();

    let events_url = format!(
        "{}/events/registrations?api-version=2021-10-01",
        dps.info.service_endpoint
    );
    let owner = policy_token(&dps.info.service_connection_string);
    let mut stream = dps
        .http
        .get(&events_url)
        .header("authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");

    // One subscriber at most: the next is refused in the DPS error shape.
    let second = dps
        .http
        .get(&events_url)
        .header("authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["errorCode"], 429001, "{body}");

    // Without a token: refused.
    let anonymous = dps.http.get(&events_url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    let rid = "stream-dev-1";
    let key = derive_device_key(&group_key, rid).unwrap();
    let token = device_token(&dps.info.id_scope, rid, &key, now() + 600);
    let (status, _, body) = dps
        .register(rid, &token, json!({"registrationId": rid}))
        .await;
    assert_eq!(status, 202, "{body}");
    let bad = device_token(&dps.info.id_scope, "stream-dev-2", &key, now() + 600);
    dps.register(
        "stream-dev-2",
        &bad,
        json!({"registrationId": "stream-dev-2"}),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buffer = String::new();
    let event = next_registration(&mut stream, &mut buffer, rid, deadline)
        .await
        .expect("an event for the registration");
    let (hub_name, hub_cs) = dps.hub();
    assert_eq!(event["outcome"], "assigned", "{event}");
    assert_eq!(event["hub"], json!(hub_name));
    assert_eq!(event["transport"], "https");
    assert!(event["durationMs"].is_u64(), "{event}");
    assert_eq!(event["errorCode"], Value::Null);
    let refused = next_registration(&mut stream, &mut buffer, "stream-dev-2", deadline)
        .await
        .expect("an event for the refused registration");
    assert_eq!(refused["outcome"], "failed", "{refused}");
    assert_eq!(refused["errorCode"], 401005, "{refused}");
    drop(stream);

    // A hub registry write is audited with the hub policy.
    let r = dps
        .http
        .put(format!(
            "https://{hub_name}/devices/audited-device?api-version=2021-04-12"
        ))
        .header("authorization", policy_token(&hub_cs))
        .json(&json!({"deviceId": "audited-device"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let device: Value = r.json().await.unwrap();

    // The device's own traffic on the hub's device HTTPS API is not a service write: served
    // beside the audited routes, left out of the log.
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    let host = hub_name.split(':').next().unwrap();
    let token = muster_proto::SasToken::generate(
        &format!("{host}/devices/audited-device"),
        &B64.decode(key).unwrap(),
        None,
        now() + 600,
    );
    let r = dps
        .http
        .post(format!(
            "https://{hub_name}/devices/audited-device/messages/events?api-version=2021-04-12"
        ))
        .header("authorization", &token)
        .header("iothub-app-kind", "audit-check")
        .body("from the device")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let r = dps
        .http
        .get(format!(
            "https://{hub_name}/devices/audited-device/telemetry?api-version=2021-04-12"
        ))
        .header("authorization", policy_token(&hub_cs))
        .send()
        .await
        .unwrap();
    let stored: Value = r.json().await.unwrap();
    assert_eq!(stored[0]["body"], "from the device", "{stored}");
    assert_eq!(stored[0]["properties"]["kind"], "audit-check", "{stored}");
    let (s, log) = dps
        .service(Method::GET, "/audit?id=audited-device", None)
        .await;
    assert_eq!(s, 200, "{log}");
    assert_eq!(log.as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!(log[0]["route"], "/devices/{id}");
    assert_eq!(log[0]["policy"], "iothubowner");
    assert_eq!(log[0]["status"], 200);
    let (_, group_log) = dps.service(Method::GET, "/audit?id=line", None).await;
    assert_eq!(
        group_log[0]["route"], "/enrollmentGroups/{id}",
        "{group_log}"
    );

    server.shutdown().await;
}
