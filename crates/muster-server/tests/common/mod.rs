//! Shared helpers for the server's integration tests: start servers on loopback, sign
//! service, hub and device tokens, talk HTTPS trusting the local CA.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::{ConnectionString, SasToken};
use muster_server::{Config, ConnectionInfo, Server};
use serde_json::Value;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn config(dir: &Path, host: &str) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        dps_host: host.into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    }
}

/// Starts a server; when `ca_from` is given, the new server uses that data dir's CA so one
/// client trust store (and each server's outbound client) covers every server.
pub async fn start(dir: &Path, host: &str, ca_from: Option<&Path>) -> Server {
    if let Some(src) = ca_from {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["ca.pem", "ca.key"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
    Server::start(config(dir, host)).await.unwrap()
}

pub fn client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

/// A token for a connection string's policy (service API or hub REST).
pub fn policy_token(connection_string: &str) -> String {
    let cs = ConnectionString::parse(connection_string).unwrap();
    SasToken::generate(
        &cs.host_name,
        &B64.decode(&cs.key).unwrap(),
        Some(&cs.key_name),
        now() + 600,
    )
}

/// A device token signed the way Python and C# sign it.
pub fn device_token(scope: &str, registration_id: &str, key_b64: &str, expiry: i64) -> String {
    SasToken::generate(
        &format!("{scope}/registrations/{registration_id}"),
        &B64.decode(key_b64).unwrap(),
        Some("registration"),
        expiry,
    )
}

pub struct Dps {
    pub info: ConnectionInfo,
    pub http: reqwest::Client,
}

impl Dps {
    pub fn new(info: &ConnectionInfo) -> Self {
        Self {
            info: info.clone(),
            http: client(info.ca_certificate.as_ref().unwrap()),
        }
    }

    pub fn hub(&self) -> (String, String) {
        let h = &self.info.hubs[0];
        (h.host_name.clone(), h.connection_string.clone())
    }

    /// A service API call with the owner policy.
    pub async fn service(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{path}{sep}api-version=2021-10-01",
            self.info.service_endpoint
        );
        let mut req = self.http.request(method, url).header(
            "authorization",
            policy_token(&self.info.service_connection_string),
        );
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A hub REST call against the hub `connection_string` names.
    pub async fn hub_call(&self, connection_string: &str, path: &str) -> (u16, Value) {
        let cs = ConnectionString::parse(connection_string).unwrap();
        let r = self
            .http
            .get(format!(
                "https://{}{path}?api-version=2021-04-12",
                cs.host_name
            ))
            .header("authorization", policy_token(connection_string))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Registers over HTTPS; returns (status, retry-after, body).
    pub async fn register(
        &self,
        registration_id: &str,
        token: &str,
        body: Value,
    ) -> (u16, Option<String>, Value) {
        let r = self
            .http
            .put(format!(
                "https://{}/{}/registrations/{registration_id}/register?api-version=2021-06-01",
                self.info.device_endpoint, self.info.id_scope
            ))
            .header("authorization", token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (status, retry, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn poll(
        &self,
        registration_id: &str,
        operation_id: &str,
        token: &str,
    ) -> (u16, Value) {
        let r = self
            .http
            .get(format!(
                "https://{}/{}/registrations/{registration_id}/operations/{operation_id}?api-version=2021-06-01",
                self.info.device_endpoint, self.info.id_scope
            ))
            .header("authorization", token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}
