//! `muster_server::Server` started for real on loopback: TLS with the local CA, the service API
//! behind it, connection.json, restart persistence, and bind failures that say what to do.

use std::sync::Arc;

use muster_proto::{ConnectionString, SasToken};
use muster_server::{Config, ConnectionInfo, Server};
use serde_json::{json, Value};

fn config(dir: &std::path::Path, port: u16) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        dps_host: "127.0.0.1".into(),
        https_port: port,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    }
}

/// A client that trusts only the server's local CA, limited to the given TLS versions.
fn client(
    ca_pem_path: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> reqwest::Client {
    let pem = std::fs::read(ca_pem_path).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

fn token(info: &ConnectionInfo) -> String {
    let cs = ConnectionString::parse(&info.service_connection_string).unwrap();
    let key = base64_decode(&cs.key);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    SasToken::generate(&cs.host_name, &key, Some(&cs.key_name), now + 600)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test]
async fn serves_the_service_api_over_tls_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), 0)).await.unwrap();
    let info = ConnectionInfo::read(dir.path()).unwrap();
    assert_eq!(info, server.connection);
    assert!(info.id_scope.starts_with("0ne") && info.id_scope.len() == 11);
    let ca = info.ca_certificate.as_ref().unwrap();
    assert!(ca.is_absolute() && ca.exists());
    let port = server.https_addrs[0].port();
    assert_ne!(port, 0);
    assert_eq!(info.device_endpoint, format!("127.0.0.1:{port}"));
    assert!(info.service_connection_string.starts_with(&format!(
        "HostName=127.0.0.1:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
    )));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("connection.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "connection.json holds a key: owner only");
    }

    // TLS 1.2 only (as Python's device client) and TLS 1.3 both work.
    for versions in [
        &[&rustls::version::TLS12][..],
        &[&rustls::version::TLS13][..],
    ] {
        let c = client(info.ca_certificate.as_ref().unwrap(), versions);
        let r = c
            .get(format!(
                "{}/enrollmentGroups/nope?api-version=2021-10-01",
                info.service_endpoint
            ))
            .header("authorization", token(&info))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["errorCode"], 404202);
    }

    let c = client(
        info.ca_certificate.as_ref().unwrap(),
        &[&rustls::version::TLS13],
    );
    let r = c
        .put(format!(
            "{}/enrollmentGroups/line-1?api-version=2021-10-01",
            info.service_endpoint
        ))
        .header("authorization", token(&info))
        .json(&json!({"enrollmentGroupId": "line-1", "attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let created: Value = r.json().await.unwrap();
    server.shutdown().await;

    // Same data dir: same scope, same keys, same records.
    let again = Server::start(config(dir.path(), 0)).await.unwrap();
    assert_eq!(again.connection.id_scope, info.id_scope);
    let k1 = ConnectionString::parse(&info.service_connection_string)
        .unwrap()
        .key;
    let k2 = ConnectionString::parse(&again.connection.service_connection_string)
        .unwrap()
        .key;
    assert_eq!(k1, k2);
    let c = client(
        again.connection.ca_certificate.as_ref().unwrap(),
        &[&rustls::version::TLS12],
    );
    let r = c
        .post(format!(
            "{}/enrollmentGroups/line-1/attestationmechanism?api-version=2021-10-01",
            again.connection.service_endpoint
        ))
        .header("authorization", token(&again.connection))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let att: Value = r.json().await.unwrap();
    assert_eq!(att["symmetricKey"], created["attestation"]["symmetricKey"]);
    again.shutdown().await;

    // Keys of access policies and linked hubs are sealed at rest: not in the database files.
    let hub_key = ConnectionString::parse(&info.hubs[0].connection_string)
        .unwrap()
        .key;
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("muster.db")
            && !p.to_string_lossy().ends_with(".key")
        {
            stored.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(!stored.is_empty());
    for secret in [k1.as_str(), hub_key.as_str()] {
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a key is stored in the clear"
        );
    }
}

#[tokio::test]
async fn a_taken_port_fails_with_a_hint() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let err = match Server::start(config(dir.path(), port)).await {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("already listens"), "{err}");
    assert!(
        !dir.path().join("connection.json").exists(),
        "no connection.json for a server that never listened"
    );
}

#[tokio::test]
async fn refuses_clients_that_do_not_speak_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), 0)).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(server.https_addrs[0])
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server closes the connection after a failed handshake (possibly with a TLS alert).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
    server.shutdown().await;
}

#[tokio::test]
async fn least_privilege_policies_through_the_access_policies_extension() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), 0)).await.unwrap();
    let info = server.connection.clone();
    let c = client(
        info.ca_certificate.as_ref().unwrap(),
        &[&rustls::version::TLS13],
    );
    let url = |p: &str| format!("{}{p}?api-version=2021-10-01", info.service_endpoint);
    let owner = token(&info);

    let r = c
        .put(url("/accessPolicies/reader"))
        .header("authorization", &owner)
        .json(&json!({"rights": "EnrollmentRead, RegistrationStatusRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["rights"], "EnrollmentRead, RegistrationStatusRead");
    let reader_cs = format!(
        "HostName={};SharedAccessKeyName=reader;SharedAccessKey={}",
        info.device_endpoint,
        created["primaryKey"].as_str().unwrap()
    );
    let reader = token(&ConnectionInfo {
        service_connection_string: reader_cs,
        ..info.clone()
    });
    // The listing shows no keys.
    let list: Value = c
        .get(url("/accessPolicies"))
        .header("authorization", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list[1].get("primaryKey").is_none(), "{list}");

    // The reader reads, but can neither write enrollments nor manage policies.
    let r = c
        .get(url("/enrollments/x"))
        .header("authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .put(url("/enrollments/x"))
        .header("authorization", &reader)
        .json(&json!({"attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorCode"], 403001);
    let r = c
        .get(url("/accessPolicies"))
        .header("authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The owner can't lock itself out.
    let r = c
        .delete(url("/accessPolicies/provisioningserviceowner"))
        .header("authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .put(url("/accessPolicies/provisioningserviceowner"))
        .header("authorization", &owner)
        .json(&json!({"rights": "EnrollmentRead"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Deleting the reader revokes its tokens at once, and the change survives a restart.
    let r = c
        .delete(url("/accessPolicies/reader"))
        .header("authorization", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .get(url("/enrollments/x"))
        .header("authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    server.shutdown().await;
    let again = Server::start(config(dir.path(), 0)).await.unwrap();
    let c = client(
        again.connection.ca_certificate.as_ref().unwrap(),
        &[&rustls::version::TLS13],
    );
    let list: Value = c
        .get(format!(
            "{}/accessPolicies?api-version=2021-10-01",
            again.connection.service_endpoint
        ))
        .header("authorization", token(&again.connection))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    again.shutdown().await;
}
