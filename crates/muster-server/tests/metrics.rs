//! `GET /metrics` on a real server: counters and histograms move with registrations, refusals
//! carry their error code, and the HTTPS port refuses a scrape without a service token.
//!
//! One test in this binary: the recorder is per process, so nothing else moves the counters.

mod common;

use std::time::Duration;

use common::{device_token, now, policy_token, start, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The text exposition, scraped with the owner policy's token.
async fn scrape(dps: &Dps) -> String {
    let r = dps
        .http
        .get(format!("{}/metrics", dps.info.service_endpoint))
        .header(
            "authorization",
            policy_token(&dps.info.service_connection_string),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    r.text().await.unwrap()
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let present: Vec<&str> = label_text.split(',').collect();
            labels
                .iter()
                .all(|(k, v)| present.contains(&format!("{k}=\"{v}\"").as_str()))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test]
async fn registrations_and_refusals_move_their_counters_and_metrics_need_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "127.0.0.1", None).await;
    let dps = Dps::new(&server.connection);
    let (hub_name, _) = dps.hub();
    let hub = hub_name.to_ascii_lowercase();

    let (s, group) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/line-7",
            Some(json!({"enrollmentGroupId": "line-7", "attestation": {"type": "symmetricKey"}})),
        )
        .await;
    assert_eq!(s, 200, "{group}");
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();

    let before = scrape(&dps).await;
    let assigned = [
        ("transport", "https"),
        ("outcome", "assigned"),
        ("attestation", "symmetricKey"),
        ("hub", hub.as_str()),
    ];
    let request_count = "muster_registration_request_duration_seconds_count";
    let to_assigned_count = "muster_registration_time_to_assigned_seconds_count";

    // One device registers with its derived key ...
    let rid = "sensor-0001";
    let key = derive_device_key(&group_key, rid).unwrap();
    let token = device_token(&dps.info.id_scope, rid, &key, now() + 600);
    let (s, _, body) = dps
        .register(rid, &token, json!({"registrationId": rid}))
        .await;
    assert_eq!(
        (s, body["status"].as_str()),
        (202, Some("assigned")),
        "{body}"
    );

    // ... and another with a key that is not its own.
    let rid = "sensor-0002";
    let wrong = derive_device_key(&group_key, "someone-else").unwrap();
    let token = device_token(&dps.info.id_scope, rid, &wrong, now() + 600);
    let (s, _, refusal) = dps
        .register(rid, &token, json!({"registrationId": rid}))
        .await;
    assert_eq!(s, 401, "{refusal}");
    let code = refusal["errorCode"].as_u64().unwrap().to_string();
    let refused = [
        ("transport", "https"),
        ("outcome", "refused"),
        ("error_code", code.as_str()),
    ];

    let after = scrape(&dps).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(
        moved("muster_registrations_total", &assigned),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved("muster_registrations_total", &refused),
        1.0,
        "{after}"
    );
    assert_eq!(
        moved("muster_registrations_total", &[]),
        2.0,
        "nothing else counted"
    );
    assert_eq!(moved(request_count, &[("outcome", "assigned")]), 1.0);
    assert_eq!(moved(request_count, &[("outcome", "refused")]), 1.0);
    assert_eq!(moved(to_assigned_count, &[("queued", "false")]), 1.0);
    assert_eq!(
        moved(
            "muster_hub_write_duration_seconds_count",
            &[("hub", &hub), ("result", "ok")]
        ),
        1.0
    );
    // The built-in hub's device, its twin and the record: one store transaction.
    assert_eq!(
        moved(
            "muster_store_write_duration_seconds_count",
            &[("result", "ok")]
        ),
        1.0
    );
    // Service API requests are labelled by route template, never by id.
    assert!(
        sample(
            &after,
            "muster_service_api_requests_total",
            &[
                ("route", "/enrollmentGroups/{id}"),
                ("method", "PUT"),
                ("status", "200")
            ]
        ) >= 1.0,
        "{after}"
    );
    assert!(
        !after.contains("line-7") && !after.contains("sensor-000"),
        "{after}"
    );
    // The scrape's own connection is open.
    assert!(sample(&after, "muster_open_connections", &[("listener", "https")]) >= 1.0);

    // A client that does not speak TLS is counted as a handshake failure.
    let https = server.https_addrs[0];
    let mut plain = tokio::net::TcpStream::connect(https).await.unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await;
    let failures = "muster_tls_handshake_failures_total";
    let https_failures = [("listener", "https"), ("reason", "invalid_message")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now_text = scrape(&dps).await;
        let moved = sample(&now_text, failures, &https_failures)
            - sample(&before, failures, &https_failures);
        if moved >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no handshake failure counted: {now_text}"
        );
        tokio::task::yield_now().await;
    }

    // The HTTPS port serves metrics to service tokens only, refusing in the DPS error shape.
    let url = format!("{}/metrics", dps.info.service_endpoint);
    let r = dps.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"].as_u64().unwrap() / 1000, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("Authorization"));
    for field in ["trackingId", "timestampUtc"] {
        assert!(body.get(field).is_some(), "{body}");
    }
    let forged = device_token(&dps.info.id_scope, "sensor-0001", &key, now() + 600);
    let r = dps
        .http
        .get(&url)
        .header("authorization", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    server.shutdown().await;
}
