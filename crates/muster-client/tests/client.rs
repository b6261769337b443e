//! The clients against a real server on 127.0.0.1 (port 0, a temporary data dir).

use std::time::{Duration, Instant};

use muster_client::{
    DeviceClient, DeviceKey, Error, HubClient, RegisterOptions, ServiceClient, Transport,
};
use muster_proto::linked_hub::LinkedHubRequest;
use muster_proto::{BulkOperationMode, EnrollmentGroup, IndividualEnrollment, RegistrationStatus};
use muster_server::{Config, Server};
use serde_json::json;

async fn start(dir: &std::path::Path) -> Server {
    Server::start(Config {
        data_dir: dir.to_path_buf(),
        dps_host: "127.0.0.1".into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    })
    .await
    .expect("server starts")
}

fn enrollment(id: &str) -> IndividualEnrollment {
    serde_json::from_value(json!({"registrationId": id, "attestation": {"type": "symmetricKey"}}))
        .expect("enrollment")
}

fn group(id: &str) -> EnrollmentGroup {
    serde_json::from_value(
        json!({"enrollmentGroupId": id, "attestation": {"type": "symmetricKey"}}),
    )
    .expect("group")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_client_covers_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let info = server.connection.clone();
    let svc = ServiceClient::from_connection_string(
        &info.service_connection_string,
        info.ca_certificate.as_deref(),
    )
    .expect("client");

    // Create, conflict, update with etag, stale etag, attestation mechanism, delete.
    let created = svc
        .create_or_update(&enrollment("e-0"), None)
        .await
        .expect("create");
    let etag = created.etag.clone().expect("etag");
    let err = svc
        .create_or_update(&enrollment("e-0"), None)
        .await
        .unwrap_err();
    assert_eq!(err.error_code(), Some(409201), "{err}");
    let mut e = svc.get_enrollment("e-0").await.expect("get");
    assert!(e
        .attestation
        .symmetric_key
        .as_ref()
        .and_then(|k| k.primary_key.as_ref())
        .is_none());
    e.device_id = Some("renamed".into());
    e.registration_state = None;
    let updated = svc.create_or_update(&e, Some(&etag)).await.expect("update");
    assert_eq!(updated.device_id.as_deref(), Some("renamed"));
    let err = svc.create_or_update(&e, Some(&etag)).await.unwrap_err();
    assert_eq!((err.status(), err.error_code()), (Some(412), Some(412001)));
    let att = svc
        .enrollment_attestation("e-0")
        .await
        .expect("attestation");
    assert!(att.symmetric_key.and_then(|k| k.primary_key).is_some());

    // Bulk beyond DPS's 10 items, then paging through them.
    let items: Vec<IndividualEnrollment> = (1..25).map(|i| enrollment(&format!("e-{i}"))).collect();
    let r = svc
        .bulk(BulkOperationMode::Create, &items)
        .await
        .expect("bulk");
    assert!(r.is_successful, "{r:?}");
    let mut pager = svc.query_enrollments(Some(10));
    let mut sizes = Vec::new();
    while let Some(page) = pager.next_page().await.expect("page") {
        sizes.push(page.len());
    }
    assert_eq!(sizes, vec![10, 10, 5]);
    let r = svc
        .bulk(BulkOperationMode::Create, &items[..2])
        .await
        .expect("bulk");
    assert!(!r.is_successful);
    assert_eq!(r.errors.len(), 2);
    svc.delete_enrollment("e-0", None).await.expect("delete");
    let err = svc.get_enrollment("e-0").await.unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(err.error_code(), Some(404201));

    // Groups, registrations by group, device registration over both transports.
    let g = svc
        .create_or_update(&group("g"), None)
        .await
        .expect("group");
    let gk = g
        .attestation
        .symmetric_key
        .and_then(|k| k.primary_key)
        .expect("key");
    assert_eq!(
        svc.query_enrollment_groups(None)
            .collect_all()
            .await
            .expect("groups")
            .len(),
        1
    );
    let dev = DeviceClient::new(
        &info.device_endpoint,
        &info.id_scope,
        info.ca_certificate.as_deref(),
    )
    .expect("device client")
    .with_mqtt_port(info.mqtt_port);
    for (id, transport) in [("d-https", Transport::Https), ("d-mqtt", Transport::Mqtt)] {
        let r = dev
            .register(
                id,
                &DeviceKey::Group(gk.clone()),
                &RegisterOptions {
                    transport,
                    payload: None,
                    csr: None,
                },
            )
            .await
            .expect("register");
        assert_eq!(r.status, RegistrationStatus::Assigned, "{transport:?}");
        assert_eq!(r.state.device_id.as_deref(), Some(id));
    }
    let regs = svc
        .query_registrations("g", Some(1))
        .collect_all()
        .await
        .expect("registrations");
    assert_eq!(regs.len(), 2);
    assert_eq!(
        svc.get_registration("d-mqtt").await.expect("record").status,
        RegistrationStatus::Assigned
    );
    svc.delete_registration("d-mqtt", None)
        .await
        .expect("delete record");
    assert_eq!(
        svc.get_registration("d-mqtt")
            .await
            .unwrap_err()
            .error_code(),
        Some(404203)
    );
    let err = dev
        .register(
            "d-x",
            &DeviceKey::Symmetric(gk.clone()),
            &RegisterOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.error_code(), Some(401005), "{err}");
    let err = dev
        .register(
            "d-x",
            &DeviceKey::Symmetric(gk.clone()),
            &RegisterOptions {
                transport: Transport::Mqtt,
                payload: None,
                csr: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");

    // The hub.
    let hub = HubClient::from_connection_string(
        &info.hubs[0].connection_string,
        info.ca_certificate.as_deref(),
    )
    .expect("hub client");
    assert_eq!(hub.list_devices(None).await.expect("devices").len(), 2);
    let twin = hub
        .patch_twin("d-https", &json!({"tags": {"a": 1}}), None)
        .await
        .expect("patch");
    assert_eq!(twin["tags"]["a"], 1);
    assert_eq!(hub.get_twin("d-https").await.expect("twin")["tags"]["a"], 1);
    hub.delete_device("d-https", None)
        .await
        .expect("delete device");
    match hub.get_device("d-https").await.unwrap_err() {
        Error::Hub {
            status: 404,
            error_code,
            ..
        } => assert_eq!(error_code, "DeviceNotFound"),
        other => panic!("{other:?}"),
    }

    // Linked hubs.
    let cs = "HostName=hub2.example;SharedAccessKeyName=iothubowner;SharedAccessKey=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let added = svc
        .put_linked_hub(
            "hub2.example",
            &LinkedHubRequest {
                connection_string: Some(cs.into()),
                // hub2.example is not a real hub: link it without the registry read.
                skip_check: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("link");
    assert_eq!(added.key_name, "iothubowner");
    assert_eq!(svc.list_linked_hubs().await.expect("list").len(), 2);
    assert_eq!(
        svc.get_linked_hub("hub2.example")
            .await
            .expect("get")
            .allocation_weight,
        1
    );
    svc.delete_linked_hub("hub2.example").await.expect("unlink");
    assert_eq!(
        svc.get_linked_hub("hub2.example")
            .await
            .unwrap_err()
            .error_code(),
        Some(404205)
    );
    server.shutdown().await;
}

/// A throttled hub makes registrations answer `assigning` with retry-after; the client polls
/// until they are assigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_client_polls_while_assigning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let info = server.connection.clone();
    let svc = ServiceClient::from_connection_string(
        &info.service_connection_string,
        info.ca_certificate.as_deref(),
    )
    .expect("client");
    svc.put_linked_hub(
        &info.hubs[0].host_name,
        &LinkedHubRequest {
            max_registrations_per_second: Some(1),
            ..Default::default()
        },
    )
    .await
    .expect("throttle the hub");
    let g = svc
        .create_or_update(&group("slow"), None)
        .await
        .expect("group");
    let gk = g
        .attestation
        .symmetric_key
        .and_then(|k| k.primary_key)
        .expect("key");
    let dev = DeviceClient::new(
        &info.device_endpoint,
        &info.id_scope,
        info.ca_certificate.as_deref(),
    )
    .expect("device client")
    .with_mqtt_port(info.mqtt_port);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let (dev, gk) = (dev.clone(), gk.clone());
        let transport = if i % 2 == 0 {
            Transport::Https
        } else {
            Transport::Mqtt
        };
        tasks.spawn(async move {
            dev.register(
                &format!("slow-{i}"),
                &DeviceKey::Group(gk),
                &RegisterOptions {
                    transport,
                    payload: None,
                    csr: None,
                },
            )
            .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("task").expect("registered");
        assert_eq!(r.status, RegistrationStatus::Assigned);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "4 devices at 1/s took {:?}",
        started.elapsed()
    );
    server.shutdown().await;
}
