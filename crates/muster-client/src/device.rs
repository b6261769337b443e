//! [`DeviceClient`]: device registration over HTTPS (`PUT /{idScope}/registrations/{id}/register`,
//! `GET .../operations/{operationId}`) or MQTT over TLS, with a symmetric key, a key derived
//! from an enrollment-group key, or an X.509 certificate presented in the TLS handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_attestation::symmetric_key;
use muster_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus};
use muster_proto::{RegistrationStatus, SasToken};
use reqwest::Response;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::service::{error_from_text, read_json, retry_after, segment, service_error};

/// The api-version devices send over HTTPS.
pub const DEVICE_API_VERSION: &str = "2021-06-01";
/// The api-version devices name in the MQTT user name.
pub const MQTT_API_VERSION: &str = "2019-03-31";
/// The api-version of a registration that sends a CSR (HTTPS and MQTT).
pub const CSR_API_VERSION: &str = "2026-04-01";

/// How the device reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Https,
    /// MQTT 3.1.1 over TLS (port 8883 by default).
    Mqtt,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "https" | "http" => Ok(Transport::Https),
            "mqtt" => Ok(Transport::Mqtt),
            _ => Err(format!("unknown transport {s:?}; expected https or mqtt")),
        }
    }
}

/// How a device attests: a key it signs its SAS token with, or an X.509 certificate it
/// presents in the TLS handshake. Debug never shows a secret.
#[derive(Clone)]
pub enum DeviceKey {
    /// The device's own key (an individual enrollment's, or one already derived).
    Symmetric(String),
    /// An enrollment group's key: the device key is derived per registration id.
    Group(String),
    /// An X.509 identity: `chain_pem` holds the device's certificate first, then the
    /// intermediates it sends; `key_pem` the certificate's private key (PKCS#8, SEC1 EC or
    /// PKCS#1 RSA PEM). The registration id is the leaf's subject CN.
    X509 { chain_pem: String, key_pem: String },
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKey::Symmetric(_) => "DeviceKey::Symmetric(..)",
            DeviceKey::Group(_) => "DeviceKey::Group(..)",
            DeviceKey::X509 { .. } => "DeviceKey::X509 { .. }",
        })
    }
}

impl DeviceKey {
    /// An X.509 identity read from a PEM chain file (leaf first) and a PEM key file.
    pub fn x509_from_files(chain_pem: &Path, key_pem: &Path) -> Result<Self> {
        let read = |p: &Path, what: &str| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::io(format!("reading {what} {}", p.display()), e))
        };
        Ok(DeviceKey::X509 {
            chain_pem: read(chain_pem, "certificate file")?,
            key_pem: read(key_pem, "key file")?,
        })
    }

    /// For an X.509 identity, the subject CN of its leaf certificate (the registration id the
    /// service expects); `None` for keys, or a leaf without a CN.
    pub fn common_name(&self) -> Result<Option<String>> {
        match self {
            DeviceKey::X509 { chain_pem, .. } => {
                let chain = crate::tls::parse_chain_pem(chain_pem)?;
                let leaf = muster_attestation::x509::Certificate::from_der(chain[0].to_vec())
                    .map_err(|e| Error::InvalidInput(format!("the device certificate: {e}")))?;
                Ok(leaf.common_name())
            }
            _ => Ok(None),
        }
    }

    /// The base64 key this device signs with (an error for an X.509 identity, which has none).
    pub fn device_key(&self, registration_id: &str) -> Result<String> {
        match self {
            DeviceKey::Symmetric(k) => {
                symmetric_key::decode_key(k)
                    .map_err(|e| Error::InvalidInput(format!("device key: {e}")))?;
                Ok(k.clone())
            }
            DeviceKey::Group(g) => symmetric_key::derive_device_key(g, registration_id)
                .map_err(|e| Error::InvalidInput(format!("group key: {e}"))),
            DeviceKey::X509 { .. } => Err(Error::InvalidInput(
                "an X.509 identity has no symmetric key".into(),
            )),
        }
    }
}

/// A device SAS token for `{idScope}/registrations/{registrationId}`, signed as the SDKs sign.
pub fn device_token(
    id_scope: &str,
    registration_id: &str,
    device_key_b64: &str,
    ttl_secs: i64,
) -> Result<String> {
    let key = B64
        .decode(device_key_b64)
        .map_err(|_| Error::InvalidInput("the device key is not base64".into()))?;
    Ok(SasToken::generate(
        &format!("{id_scope}/registrations/{registration_id}"),
        &key,
        Some("registration"),
        crate::unix_now() + ttl_secs,
    ))
}

/// Retries and polling.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Register attempts in all (≥ 1): throttled (429), unavailable (5xx) and transport
    /// failures are retried after `retry-after` (or a backoff).
    pub max_attempts: u32,
    /// Status polls while `assigning`.
    pub max_polls: u32,
    /// Wait when the service sends no `retry-after`.
    pub default_wait: Duration,
    /// Longest wait honoured (a larger `retry-after` is reduced to this).
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_polls: 60,
            default_wait: Duration::from_secs(2),
            max_wait: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    pub(crate) fn wait(&self, retry_after: Option<Duration>, attempt: u32) -> Duration {
        match retry_after {
            Some(d) => d.min(self.max_wait),
            None => (self.default_wait * attempt.max(1)).min(self.max_wait),
        }
    }
}

/// What to send with a registration.
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    pub transport: Transport,
    /// JSON for a custom allocation webhook (`payload` of the register body).
    pub payload: Option<Value>,
    /// A PKCS #10 request (base64 DER, CN = the registration id): the service issues a
    /// certificate, answered in `state.issued_certificate_chain`. Sent with
    /// [`CSR_API_VERSION`].
    pub csr: Option<String>,
}

/// The outcome of a registration that got an answer: `assigned`, or `failed` / `disabled`
/// with the reason in `state.error_code` / `state.error_message`.
#[derive(Debug, Clone)]
pub struct Registration {
    pub operation_id: String,
    pub status: RegistrationStatus,
    pub state: DeviceRegistrationResult,
    /// Register attempts made (1 when nothing was retried).
    pub attempts: u32,
}

impl Registration {
    pub fn is_assigned(&self) -> bool {
        self.status == RegistrationStatus::Assigned
    }
}

/// How one registration authenticates: a SAS token signed with the device key, or a client
/// certificate (an HTTP client and a TLS configuration presenting it), or a token signed
/// elsewhere (a TPM) with the register body's `tpm` object.
pub(crate) enum Auth {
    Sas(String),
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    Token {
        token: String,
        tpm: Option<Value>,
    },
    X509 {
        http: reqwest::Client,
        tls: Arc<rustls::ClientConfig>,
    },
}

/// A device-side client of one ID scope at one endpoint.
#[derive(Clone)]
pub struct DeviceClient {
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    endpoint: String,
    mqtt_port: u16,
    id_scope: String,
    retry: RetryPolicy,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("endpoint", &self.endpoint)
            .field("mqtt_port", &self.mqtt_port)
            .field("id_scope", &self.id_scope)
            .finish_non_exhaustive()
    }
}

impl DeviceClient {
    /// `endpoint` is the global device endpoint, `host` or `host:port` (HTTPS port; 443 when
    /// absent); MQTT uses port 8883 unless [`Self::with_mqtt_port`] says otherwise.
    pub fn new(endpoint: &str, id_scope: &str, ca_pem: Option<&Path>) -> Result<Self> {
        let tls = crate::tls::client_config(ca_pem)?;
        let http = http_client(tls.clone(), 4096)?;
        Ok(Self::with_clients(endpoint, id_scope, http, Arc::new(tls)))
    }

    /// With your own HTTP client and TLS configuration (used for MQTT, and as the base of the
    /// configurations that present an X.509 device certificate).
    pub fn with_clients(
        endpoint: &str,
        id_scope: &str,
        http: reqwest::Client,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            http,
            tls,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            mqtt_port: 8883,
            id_scope: id_scope.to_string(),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_mqtt_port(mut self, port: u16) -> Self {
        self.mqtt_port = port;
        self
    }

    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn id_scope(&self) -> &str {
        &self.id_scope
    }

    /// The host of the endpoint, without a port.
    pub fn host(&self) -> &str {
        split_host_port(&self.endpoint).0
    }

    /// Registers `registration_id`, retrying transient failures and polling while the
    /// service answers `assigning`. `Ok` for every final status (assigned, failed, disabled);
    /// `Err` for refusals (unauthorized, not attested, bad request) and exhausted retries.
    ///
    /// With [`DeviceKey::X509`] the certificate is presented in the TLS handshake (HTTPS and
    /// MQTT) and no SAS token is sent; the service takes the registration id from the leaf's
    /// CN, so `registration_id` must match it.
    pub async fn register(
        &self,
        registration_id: &str,
        key: &DeviceKey,
        options: &RegisterOptions,
    ) -> Result<Registration> {
        let auth = self.auth(registration_id, key)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match options.transport {
                Transport::Https => self.register_https(registration_id, &auth, options).await,
                Transport::Mqtt => {
                    crate::mqtt::register(self, registration_id, &auth, options).await
                }
            };
            match result {
                Ok(mut r) => {
                    r.attempts = attempt;
                    return Ok(r);
                }
                Err(e) if e.is_transient() && attempt < self.retry.max_attempts.max(1) => {
                    tokio::time::sleep(self.retry.wait(e.retry_after(), attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn auth(&self, registration_id: &str, key: &DeviceKey) -> Result<Auth> {
        match key {
            DeviceKey::X509 { chain_pem, key_pem } => {
                let tls = crate::tls::with_client_cert(&self.tls, chain_pem, key_pem)?;
                let http = http_client(tls.clone(), 4)?;
                Ok(Auth::X509 {
                    http,
                    tls: Arc::new(tls),
                })
            }
            _ => Ok(Auth::Sas(key.device_key(registration_id)?)),
        }
    }

    /// A request with the registration's credentials: its client, and a SAS token unless
    /// the certificate authenticates.
    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        registration_id: &str,
        auth: &Auth,
    ) -> Result<reqwest::RequestBuilder> {
        Ok(match auth {
            Auth::Sas(device_key) => self
                .http
                .request(method, url)
                .header("authorization", self.token(registration_id, device_key)?),
            Auth::X509 { http, .. } => http.request(method, url),
            Auth::Token { token, .. } => self
                .http
                .request(method, url)
                .header("authorization", token.as_str()),
        })
    }

    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub(crate) fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    pub(crate) fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    pub(crate) fn token(&self, registration_id: &str, device_key: &str) -> Result<String> {
        device_token(&self.id_scope, registration_id, device_key, 3600)
    }

    fn device_url(&self, registration_id: &str, tail: &str, api_version: &str) -> String {
        format!(
            "https://{}/{}/registrations/{}/{tail}?api-version={api_version}",
            self.endpoint,
            segment(&self.id_scope),
            segment(registration_id)
        )
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response> {
        req.send().await.map_err(|source| Error::Transport {
            url: format!("https://{}", self.endpoint),
            source,
        })
    }

    pub(crate) async fn register_https(
        &self,
        registration_id: &str,
        auth: &Auth,
        options: &RegisterOptions,
    ) -> Result<Registration> {
        let mut body = json!({ "registrationId": registration_id });
        if let Auth::Token { tpm: Some(tpm), .. } = auth {
            body["tpm"] = tpm.clone();
        }
        if let Some(p) = &options.payload {
            body["payload"] = p.clone();
        }
        let api_version = match &options.csr {
            Some(csr) => {
                body["csr"] = json!(csr);
                CSR_API_VERSION
            }
            None => DEVICE_API_VERSION,
        };
        let resp = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    self.device_url(registration_id, "register", api_version),
                    registration_id,
                    auth,
                )?
                .json(&body),
            )
            .await?;
        let (mut op, mut wait) = operation("register", resp).await?;
        let mut polls = 0;
        while !is_final(op.status) {
            if polls >= self.retry.max_polls {
                return Err(Error::StillAssigning {
                    registration_id: registration_id.to_string(),
                    status: op.status.to_string(),
                    polls,
                });
            }
            polls += 1;
            tokio::time::sleep(self.retry.wait(wait, 1)).await;
            let url = self.device_url(
                registration_id,
                &format!("operations/{}", segment(&op.operation_id)),
                api_version,
            );
            let resp = self
                .send(self.request(reqwest::Method::GET, url, registration_id, auth)?)
                .await;
            match resp {
                Ok(resp) => match operation("operation status", resp).await {
                    Ok((next, w)) => {
                        op = next;
                        wait = w;
                    }
                    Err(e) if e.is_transient() => wait = e.retry_after(),
                    Err(e) => return Err(e),
                },
                Err(_) => wait = None,
            }
        }
        Ok(Registration {
            operation_id: op.operation_id,
            status: op.status,
            state: op.registration_state,
            attempts: 1,
        })
    }
}

impl DeviceClient {
    /// The first request of a TPM registration (§7.1): PUT register with the EK and SRK and
    /// no credentials; the answer is 401 with the activation blob and the key name to sign
    /// with. Any other answer is an error.
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    pub(crate) async fn tpm_challenge(
        &self,
        registration_id: &str,
        tpm: &Value,
        options: &RegisterOptions,
    ) -> Result<(Vec<u8>, String)> {
        let mut body = json!({ "registrationId": registration_id, "tpm": tpm });
        if let Some(p) = &options.payload {
            body["payload"] = p.clone();
        }
        let url = self.device_url(registration_id, "register", DEVICE_API_VERSION);
        let resp = self
            .send(self.http.request(reqwest::Method::PUT, url).json(&body))
            .await?;
        if resp.status().as_u16() != 401 {
            return Err(match resp.status().as_u16() {
                200 | 202 => Error::UnexpectedResponse {
                    what: "TPM challenge".into(),
                    status: resp.status().as_u16(),
                    detail: "a registration without credentials was accepted".into(),
                },
                _ => service_error("TPM challenge", resp).await,
            });
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let Some(blob) = answer.get("authenticationKey").and_then(Value::as_str) else {
            // A DPS error body: the EK was refused, or there is no TPM enrollment.
            return Err(error_from_text("TPM challenge", status, None, &text));
        };
        let blob = B64.decode(blob).map_err(|_| Error::UnexpectedResponse {
            what: "TPM challenge".into(),
            status,
            detail: "authenticationKey is not base64".into(),
        })?;
        let key_name = answer
            .get("keyName")
            .and_then(Value::as_str)
            .unwrap_or("registration")
            .to_string();
        Ok((blob, key_name))
    }
}

fn http_client(tls: rustls::ClientConfig, idle_per_host: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(idle_per_host)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
}

/// `assigned`, `failed` and `disabled` end a registration.
pub(crate) fn is_final(status: RegistrationStatus) -> bool {
    matches!(
        status,
        RegistrationStatus::Assigned | RegistrationStatus::Failed | RegistrationStatus::Disabled
    )
}

/// Reads a register / status answer: 200 or 202 with the operation status, else an error.
async fn operation(
    what: &str,
    resp: Response,
) -> Result<(RegistrationOperationStatus, Option<Duration>)> {
    let status = resp.status().as_u16();
    if status == 200 || status == 202 {
        let wait = retry_after(&resp);
        let op: RegistrationOperationStatus = read_json(what, resp).await?;
        Ok((op, wait))
    } else {
        Err(service_error(what, resp).await)
    }
}

/// `host:port` → (`host`, port); `[v6]:port` too.
pub(crate) fn split_host_port(endpoint: &str) -> (&str, Option<u16>) {
    if let Some(rest) = endpoint.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
    }
    match endpoint.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (endpoint, None),
        },
        _ => (endpoint, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("h.example"), ("h.example", None));
        assert_eq!(split_host_port("127.0.0.1:8443"), ("127.0.0.1", Some(8443)));
        assert_eq!(split_host_port("[::1]:8443"), ("::1", Some(8443)));
    }

    #[test]
    fn group_key_derives() {
        let k = DeviceKey::Group("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into());
        assert_eq!(
            k.device_key("my-device-01").unwrap(),
            "JOHsAb4JNdWTiD28P3nwHp6eyIyRvBG156Qxg/6ugAo="
        );
        assert!(DeviceKey::Group("not base64!".into())
            .device_key("x")
            .is_err());
    }

    #[test]
    fn waits_honour_retry_after_within_bounds() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.wait(Some(Duration::from_secs(3)), 1),
            Duration::from_secs(3)
        );
        assert_eq!(p.wait(Some(Duration::from_secs(600)), 1), p.max_wait);
        assert_eq!(p.wait(None, 2), Duration::from_secs(4));
    }
}
