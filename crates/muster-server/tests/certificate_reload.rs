//! A server started with `--tls-cert`/`--tls-key`: connection.json names that chain (no local
//! CA), and replacing the files makes every TLS listener (HTTPS and MQTT) present the new
//! certificate to new connections, without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_server::{Config, ConnectionInfo, Server};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

/// A test CA standing in for a public one.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Test Public CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A leaf for 127.0.0.1 with `cn`, as (chain PEM, key PEM, leaf DER).
    fn leaf(&self, cn: &str) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// Replaces a file the way deployment tools do: a new file renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The leaf certificate a new TLS connection to `addr` is shown.
async fn served_leaf(addr: SocketAddr, ca: &CertificateDer<'static>) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("handshake with a certificate the test CA issued");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// Polls new connections to `addr` until they are shown `want`, or panics at the deadline.
async fn wait_until_served(addr: SocketAddr, ca: &CertificateDer<'static>, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if served_leaf(addr, ca).await == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still serves the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections_on_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_der = CertificateDer::from(ca.cert.der().to_vec());
    let (a_chain, a_key, a_leaf) = ca.leaf("cert A");
    let (b_chain, b_key, b_leaf) = ca.leaf("cert B");
    let cert_path = dir.path().join("tls.pem");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&cert_path, &a_chain).unwrap();
    std::fs::write(&key_path, &a_key).unwrap();

    let server = Server::start(Config {
        data_dir: dir.path().join("data"),
        dps_host: "127.0.0.1".into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path.clone()),
        tls_reload_interval_ms: 100,
        ..Config::default()
    })
    .await
    .unwrap();

    // connection.json describes the given chain, not the local CA.
    let info = ConnectionInfo::read(&dir.path().join("data")).unwrap();
    let text = std::fs::read_to_string(dir.path().join("data/connection.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(json["caCertificate"].is_null(), "{text}");
    let described = info.tls_certificate.as_ref().unwrap();
    assert_eq!(described.issuer, "CN=Test Public CA");
    assert_eq!(described.subject, "CN=cert A");
    assert_eq!(described.path, cert_path);

    let https = server.https_addrs[0];
    let mqtt = server.mqtt_addrs[0];
    assert_eq!(served_leaf(https, &ca_der).await, a_leaf);
    assert_eq!(served_leaf(mqtt, &ca_der).await, a_leaf);

    // Renewal: the key first, then the chain (a moment with a mismatched pair is refused and
    // the old certificate kept).
    replace(&key_path, &b_key);
    replace(&cert_path, &b_chain);
    wait_until_served(https, &ca_der, &b_leaf).await;
    wait_until_served(mqtt, &ca_der, &b_leaf).await;

    // On demand (SIGHUP in `muster serve`): back to A without waiting for a poll interval
    // to matter.
    replace(&key_path, &a_key);
    replace(&cert_path, &a_chain);
    server.reload_certificate();
    wait_until_served(https, &ca_der, &a_leaf).await;
    server.shutdown().await;
}
