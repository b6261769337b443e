//! Listening apart from the advertised names (`listen`), `/healthz` and `/readyz` on the
//! HTTPS port and the admin listener, and the front door (`/` → console, favicon, version).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use common::{client, config};
use muster_proto::runtime::{OsEntropy, SystemClock};
use muster_server::Server;
use muster_store::{
    Collection, ListQuery, Record, SqliteStore, Store, StoreError, Unavailability, Write,
    WriteOutcome,
};
use serde_json::Value;

/// A name no resolver answers: the server must start on it when told where to listen.
const ADVERTISED: &str = "dps.example.invalid";

/// Wraps a store; while `full` is set every write fails as SQLite's full disk does.
struct UnwritableStore {
    inner: Arc<dyn Store>,
    full: AtomicBool,
}

#[async_trait]
impl Store for UnwritableStore {
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>, StoreError> {
        self.inner.get(collection, key).await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<Vec<WriteOutcome>, StoreError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                cause: Unavailability::DiskFull,
                detail: "committing the write transaction: database or disk is full".into(),
            });
        }
        self.inner.write(writes).await
    }

    async fn list(
        &self,
        collection: Collection,
        query: ListQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.list(collection, query).await
    }

    async fn count(
        &self,
        collection: Collection,
        partition: Option<&str>,
    ) -> Result<u64, StoreError> {
        self.inner.count(collection, partition).await
    }

    async fn claim(
        &self,
        collection: Collection,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner
            .claim(collection, owner, now_ms, until_ms, limit)
            .await
    }

    async fn renew(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
        until_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.renew(collection, owner, keys, until_ms).await
    }

    async fn release(
        &self,
        collection: Collection,
        owner: &str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        self.inner.release(collection, owner, keys).await
    }

    async fn search(
        &self,
        collection: Collection,
        query: muster_store::SearchQuery,
    ) -> Result<Vec<Record>, StoreError> {
        self.inner.search(collection, query).await
    }

    fn changes(&self, collection: Collection) -> Option<u64> {
        self.inner.changes(collection)
    }
}

/// A client that trusts the server's CA and reaches `name` at `addr`, so TLS checks the
/// certificate against `name` (SNI) and requests carry `Host: name`.
fn client_for_name(ca: &std::path::Path, name: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(trusting(ca))
        .resolve(name, addr)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// TLS that trusts only the server's CA.
fn trusting(ca: &std::path::Path) -> rustls::ClientConfig {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[tokio::test]
async fn listening_on_every_address_serves_the_advertised_name_it_cannot_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), ADVERTISED);
    c.listen = vec!["0.0.0.0".into()];
    let server = Server::start(c).await.unwrap();
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    assert!(server.https_addrs.iter().all(|a| a.ip() == unspecified));
    assert!(server.mqtt_addrs.iter().all(|a| a.ip() == unspecified));
    assert!(!server.bind_set.is_loopback_only());
    // Devices and clients are told the name, not the bind address.
    let info = &server.connection;
    assert!(info.device_endpoint.starts_with(ADVERTISED), "{info:?}");
    assert!(info.hubs[0].host_name.starts_with(ADVERTISED), "{info:?}");

    // Through loopback, with SNI and Host the advertised name: the certificate names it.
    let loopback = SocketAddr::from(([127, 0, 0, 1], info.https_port));
    let http = client_for_name(
        info.ca_certificate.as_deref().expect("a local CA"),
        ADVERTISED,
        loopback,
    );
    let r = http
        .get(format!("{}/healthz", info.service_endpoint))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "ok");

    // The MQTT listener bound the same address: a TLS handshake for the name succeeds.
    let tls = trusting(info.ca_certificate.as_deref().expect("a local CA"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", info.mqtt_port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(ADVERTISED).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("MQTT TLS handshake for the advertised name");
    server.shutdown().await;
}

#[tokio::test]
async fn without_listen_an_unresolvable_advertised_name_says_to_use_listen() {
    let dir = tempfile::tempdir().unwrap();
    let e = match Server::start(config(dir.path(), ADVERTISED)).await {
        Ok(s) => {
            s.shutdown().await;
            panic!("started on a name that does not resolve");
        }
        Err(e) => e.to_string(),
    };
    assert!(e.contains(ADVERTISED) && e.contains("--listen"), "{e}");
}

/// `/readyz` on `base` (the HTTPS port or the admin listener): status, `retry-after`, body.
async fn readyz(http: &reqwest::Client, base: &str) -> (u16, Option<String>, Value) {
    let r = http.get(format!("{base}/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, retry_after, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn readyz_turns_unready_while_the_store_is_unwritable_and_ready_again_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "127.0.0.1");
    c.admin_listen = Some("127.0.0.1:0".into());
    std::fs::create_dir_all(dir.path()).unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("muster.db")).unwrap();
    let store = Arc::new(UnwritableStore {
        inner: Arc::new(sqlite),
        full: AtomicBool::new(false),
    });
    let server =
        Server::start_on_store(c, Arc::new(SystemClock), Arc::new(OsEntropy), store.clone())
            .await
            .unwrap();
    let https = client(
        server
            .connection
            .ca_certificate
            .as_deref()
            .expect("a local CA"),
    );
    // Plain HTTP; the TLS set-up is only there because reqwest needs one.
    let plain = client(
        server
            .connection
            .ca_certificate
            .as_deref()
            .expect("a local CA"),
    );
    let admin = format!("http://{}", server.admin_addr.expect("admin listener"));
    let bases = [
        (&https, server.connection.service_endpoint.clone()),
        (&plain, admin),
    ];

    for (http, base) in &bases {
        let (status, _, body) = readyz(http, base).await;
        assert_eq!(status, 200, "{base}: {body}");
    }

    store.full.store(true, Ordering::SeqCst);
    for (http, base) in &bases {
        let (status, retry_after, body) = readyz(http, base).await;
        assert_eq!(status, 503, "{base}: {body}");
        assert_eq!(body["errorCode"], 503002, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("store") && message.contains("write probe"),
            "{body}"
        );
        for field in ["trackingId", "timestampUtc"] {
            assert!(body[field].is_string(), "{field}: {body}");
        }
        let retry_after: u64 = retry_after.expect("retry-after").parse().unwrap();
        assert!(retry_after > 0);
        // The process is alive all the same.
        let r = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    store.full.store(false, Ordering::SeqCst);
    for (http, base) in &bases {
        let (status, _, body) = readyz(http, base).await;
        assert_eq!(status, 200, "{base}: {body}");
    }

    // The admin listener serves Prometheus metrics without a token; the HTTPS port wants one.
    let (_, admin) = &bases[1];
    let r = plain.get(format!("{admin}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE muster_"), "{text}");
    let r = https
        .get(format!("{}/metrics", server.connection.service_endpoint))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    server.shutdown().await;
}

#[tokio::test]
async fn the_front_door_leads_to_the_console_which_shows_the_version_and_a_favicon() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(config(dir.path(), "127.0.0.1"))
        .await
        .unwrap();
    let info = &server.connection;
    let addr = SocketAddr::from(([127, 0, 0, 1], info.https_port));
    let http = client_for_name(
        info.ca_certificate.as_deref().expect("a local CA"),
        "127.0.0.1",
        addr,
    );
    let base = &info.service_endpoint;

    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert!(matches!(r.status().as_u16(), 302 | 303), "{}", r.status());
    assert_eq!(r.headers()["location"], "/console/");

    // Followed (with the client's default policy), the redirect ends on a console page.
    let r = client(info.ca_certificate.as_deref().expect("a local CA"))
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let html = r.text().await.unwrap();
    let version = format!("Muster {}", env!("CARGO_PKG_VERSION"));
    assert!(html.contains(&version), "{html}");
    assert!(html.contains(r#"rel="icon" href="/favicon.ico""#), "{html}");

    let r = http
        .get(format!("{base}/favicon.ico"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    assert!(r.text().await.unwrap().starts_with("<svg"));
    server.shutdown().await;
}
