//! Every key at rest is sealed: a real server is given enrollments, groups, hub devices,
//! access policies and a linked hub with known keys, one device registers, and then the
//! database files (WAL and shared memory included, read while the server runs) are searched
//! byte by byte for every key, as base64 text and as the raw bytes it decodes to. The data
//! dir and the database files are the owner's alone, also when an older build left them open.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::{config, device_token, now, policy_token, Dps};
use muster_attestation::symmetric_key::derive_device_key;
use muster_proto::ConnectionString;
use muster_server::config::LinkedHubConfig;
use muster_server::Server;
use reqwest::Method;
use serde_json::{json, Value};

/// A distinct, valid 32-byte key per name.
fn key(name: &str) -> String {
    B64.encode(format!("{name:-<28}{:04}", name.len()).as_bytes())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    ["muster.db", "muster.db-wal", "muster.db-shm"]
        .iter()
        .map(|f| dir.join(f))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn hub_put_device(dps: &Dps, hub_cs: &str, id: &str, primary: &str, secondary: &str) {
    let cs = ConnectionString::parse(hub_cs).unwrap();
    let r = dps
        .http
        .put(format!(
            "https://{}/devices/{id}?api-version=2021-04-12",
            cs.host_name
        ))
        .header("authorization", policy_token(hub_cs))
        .json(&json!({"deviceId": id, "authentication": {"type": "sas",
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}}}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test]
async fn no_key_is_readable_in_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        // As an older build, or `mkdir` with the usual umask, left it.
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&data)
            .unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let linked_key = key("linked-hub");
    let mut cfg = config(&data, "127.0.0.1");
    cfg.linked_hubs = vec![LinkedHubConfig {
        connection_string: format!(
            "HostName=linked.example.net;SharedAccessKeyName=iothubowner;SharedAccessKey={linked_key}"
        ),
        allocation_weight: 1,
        apply_allocation_policy: false,
        location: None,
        max_registrations_per_second: None,
    }];
    let server = Server::start(cfg).await.unwrap();
    let dps = Dps::new(&server.connection);
    let (hub_name, hub_cs) = dps.hub();
    let mut secrets: Vec<(String, String)> = vec![
        ("linked hub".into(), linked_key),
        (
            "service owner policy".into(),
            ConnectionString::parse(&dps.info.service_connection_string)
                .unwrap()
                .key,
        ),
        (
            "hub owner policy".into(),
            ConnectionString::parse(&hub_cs).unwrap().key,
        ),
    ];

    // Individual enrollments, one of them assigned only to the built-in hub and registered.
    for id in ["dev-a", "dev-b"] {
        let (primary, secondary) = (key(&format!("{id}-1")), key(&format!("{id}-2")));
        let (s, b) = dps
            .service(
                Method::PUT,
                &format!("/enrollments/{id}"),
                Some(
                    json!({"registrationId": id, "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
                    "allocationPolicy": "hashed", "iotHubs": [hub_name]}),
                ),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        secrets.push((format!("enrollment {id}"), primary));
        secrets.push((format!("enrollment {id}"), secondary));
    }
    // An enrollment group, and a device registering through it (the hub gets derived keys).
    let (group_primary, group_secondary) = (key("group-1"), key("group-2"));
    let (s, b) = dps
        .service(
            Method::PUT,
            "/enrollmentGroups/line-7",
            Some(
                json!({"enrollmentGroupId": "line-7", "attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": group_primary, "secondaryKey": group_secondary}},
                "allocationPolicy": "hashed", "iotHubs": [hub_name]}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    secrets.push(("group".into(), group_primary.clone()));
    secrets.push(("group".into(), group_secondary.clone()));
    for rid in ["dev-a", "group-dev-1"] {
        let device_key = if rid == "dev-a" {
            key("dev-a-1")
        } else {
            derive_device_key(&group_primary, rid).unwrap()
        };
        if rid != "dev-a" {
            secrets.push((format!("derived key of {rid}"), device_key.clone()));
            secrets.push((
                format!("derived secondary key of {rid}"),
                derive_device_key(&group_secondary, rid).unwrap(),
            ));
        }
        let token = device_token(&dps.info.id_scope, rid, &device_key, now() + 600);
        let (status, _, mut body) = dps
            .register(rid, &token, json!({"registrationId": rid}))
            .await;
        assert_eq!(status, 202, "{body}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while body["status"] != "assigned" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not assigned: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let op = body["operationId"].as_str().unwrap().to_string();
            body = dps.poll(rid, &op, &token).await.1;
        }
    }
    // Hub devices created through the hub's registry API.
    for id in ["hub-dev-1", "hub-dev-2"] {
        let (primary, secondary) = (key(&format!("{id}-1")), key(&format!("{id}-2")));
        hub_put_device(&dps, &hub_cs, id, &primary, &secondary).await;
        secrets.push((format!("hub device {id}"), primary));
        secrets.push((format!("hub device {id}"), secondary));
    }
    // A narrow access policy: its keys are generated and shown once.
    let (s, policy) = dps
        .service(
            Method::PUT,
            "/accessPolicies/reader",
            Some(json!({"rights": "EnrollmentRead"})),
        )
        .await;
    assert_eq!(s, 200, "{policy}");
    for field in ["primaryKey", "secondaryKey"] {
        let k = policy[field].as_str().unwrap_or_else(|| panic!("{policy}"));
        secrets.push(("access policy reader".into(), k.to_string()));
    }

    // The files as they are while the server runs: nothing checkpointed on purpose.
    let mut bytes = Vec::new();
    for f in files(&data) {
        bytes.extend(std::fs::read(&f).unwrap_or_default());
    }
    assert!(
        contains(&bytes, b"group-dev-1"),
        "the registration record (not secret) must be readable, or this test reads the wrong \
         files ({} bytes)",
        bytes.len()
    );
    for (what, secret) in &secrets {
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "the key of {what} is readable in the database files as base64"
        );
        let raw = B64.decode(secret).unwrap();
        assert!(
            !contains(&bytes, &raw),
            "the key of {what} is readable in the database files as raw bytes"
        );
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700, "the data dir");
        for f in files(&data).into_iter().chain([data.join("muster.db.key")]) {
            assert!(f.exists(), "{}", f.display());
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    // What was sealed reads back through the API.
    let (s, b) = dps
        .service(
            Method::POST,
            "/enrollments/query",
            Some(json!({"query": "SELECT * FROM enrollments"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let listed: Vec<&Value> = b.as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 2, "{b}");
    server.shutdown().await;
}
