//! How the engine writes devices and twins into hubs.
//!
//! [`HubConnection`] is what the engine needs from one hub. [`RestHub`] implements it over IoT
//! Hub's registry REST API (service-api.md §9.2) for any linked hub, Azure's included; each
//! call signs a fresh hub SAS token from the linked hub's connection string. The server adds
//! an in-process connection for its own built-in hub (the same registry operations without a
//! TLS round trip to itself) through [`crate::Engine::with_local_hub`].

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::runtime::Clock;
use muster_proto::{ConnectionString, SasToken};
use serde_json::{json, Value};

/// The hub REST api-version Muster sends (the C# SDK's default; accepted by Azure hubs).
pub const HUB_API_VERSION: &str = "2021-04-12";

/// How long a hub call may take.
const HUB_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error("hub {hub} could not be reached: {reason}")]
    Unreachable { hub: String, reason: String },
    #[error("hub {hub} answered {status} to {action}: {message}")]
    Refused {
        hub: String,
        action: &'static str,
        status: u16,
        message: String,
    },
    #[error("the connection string of hub {0} is invalid")]
    BadConnectionString(String),
}

impl HubError {
    pub fn status(&self) -> Option<u16> {
        match self {
            HubError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How a device authenticates to its hub.
#[derive(Clone, PartialEq, Eq)]
pub enum HubAuthentication {
    Sas {
        primary_key: String,
        secondary_key: String,
    },
    SelfSigned {
        primary_thumbprint: String,
        secondary_thumbprint: String,
    },
    /// No credential (IoT Hub's `none`): what a device whose issued certificate was revoked
    /// is left with, so nothing connects as it.
    None,
}

impl std::fmt::Debug for HubAuthentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HubAuthentication::Sas { .. } => f.write_str("Sas(..)"),
            HubAuthentication::SelfSigned {
                primary_thumbprint, ..
            } => {
                write!(f, "SelfSigned({primary_thumbprint})")
            }
            HubAuthentication::None => f.write_str("None"),
        }
    }
}

impl HubAuthentication {
    /// The `authentication` object of an IoT Hub `Device`.
    pub fn to_json(&self) -> Value {
        match self {
            HubAuthentication::Sas {
                primary_key,
                secondary_key,
            } => {
                json!({"type": "sas", "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key}})
            }
            HubAuthentication::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            } => json!({"type": "selfSigned", "x509Thumbprint": {
                "primaryThumbprint": primary_thumbprint, "secondaryThumbprint": secondary_thumbprint}}),
            HubAuthentication::None => json!({"type": "none"}),
        }
    }
}

/// The device identity Muster writes.
#[derive(Debug, Clone, PartialEq)]
pub struct HubDeviceSpec {
    pub device_id: String,
    pub authentication: HubAuthentication,
    pub iot_edge: bool,
}

impl HubDeviceSpec {
    /// The `Device` body of `PUT /devices/{id}`.
    pub fn to_json(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "status": "enabled",
            "authentication": self.authentication.to_json(),
            "capabilities": {"iotEdge": self.iot_edge},
        })
    }
}

/// What a device write does to the device's twin.
#[derive(Debug, Clone, Copy)]
pub enum TwinWrite<'a> {
    /// Leave tags and desired properties as they are.
    Keep,
    /// Replace tags and desired properties.
    Replace { tags: &'a Value, desired: &'a Value },
    /// Replace them only if the device is new: an initial assignment or a device kept on its
    /// hub keeps the twin of a device the hub already knew, and a device the hub no longer
    /// has gets the initial twin (`record::TwinPlan`).
    ReplaceIfCreated { tags: &'a Value, desired: &'a Value },
}

impl TwinWrite<'_> {
    /// The tags and desired properties to write, given whether the device existed.
    pub fn parts(&self, existed: bool) -> Option<(&Value, &Value)> {
        match *self {
            TwinWrite::Keep => None,
            TwinWrite::Replace { tags, desired } => Some((tags, desired)),
            TwinWrite::ReplaceIfCreated { tags, desired } => (!existed).then_some((tags, desired)),
        }
    }
}

/// A device put as a store write of the engine's batch ([`HubConnection::prepare_put`]).
pub struct StorePut {
    /// [Required](muster_store::Write::required): refused when the device changed since it
    /// was read, and then nothing of the batch is applied.
    pub write: muster_store::Write,
    /// Whether the device existed before the put.
    pub existed: bool,
    /// Run once the write committed (the hub tells the device's session).
    pub committed: Box<dyn FnOnce() + Send>,
}

/// One hub, as the engine uses it.
#[async_trait::async_trait]
pub trait HubConnection: Send + Sync {
    /// Creates the device, or overwrites the identity of an existing one, and writes its twin
    /// as `twin` says. Returns whether the device existed before.
    async fn put_device(&self, spec: &HubDeviceSpec, twin: TwinWrite<'_>)
        -> Result<bool, HubError>;

    /// For a hub that keeps its devices in the engine's own store (the built-in hub): what
    /// `put_device` would do, as a store write the engine commits in the same transaction as
    /// the registration record. Nothing outside that transaction changes, so no intent is
    /// saved first. `None` (the default): the hub is written by `put_device`.
    async fn prepare_put(
        &self,
        _spec: &HubDeviceSpec,
        _twin: TwinWrite<'_>,
    ) -> Result<Option<StorePut>, HubError> {
        Ok(None)
    }

    /// Whether `put_device` writes the device and its twin in one atomic step. When it does
    /// not (REST: two calls), the engine records that the hub lacked the device before the
    /// put, so a failure or crash between the two still ends with the initial twin.
    fn writes_device_and_twin_together(&self) -> bool {
        false
    }

    /// Deletes the device; a device that is not there is not an error.
    async fn delete_device(&self, device_id: &str) -> Result<(), HubError>;

    /// The device's twin (`GET /twins/{id}`), `None` when the device is not there.
    async fn get_twin(&self, device_id: &str) -> Result<Option<Value>, HubError>;

    /// The device identity's etag (`GET /devices/{id}`), `None` when the device is not there.
    /// Every identity write draws a new one.
    async fn device_etag(&self, device_id: &str) -> Result<Option<String>, HubError>;

    /// Deletes the device only if its identity etag is still `etag`. Returns false when it
    /// changed (412: a later write owns the device, which stays); a device that is not there
    /// counts as deleted.
    async fn delete_device_if(&self, device_id: &str, etag: &str) -> Result<bool, HubError>;
}

/// A linked hub reached over its registry REST API.
pub struct RestHub {
    client: HubClient,
    connection_string: String,
}

impl RestHub {
    pub fn new(client: HubClient, connection_string: impl Into<String>) -> Self {
        Self {
            client,
            connection_string: connection_string.into(),
        }
    }
}

#[async_trait::async_trait]
impl HubConnection for RestHub {
    async fn put_device(
        &self,
        spec: &HubDeviceSpec,
        twin: TwinWrite<'_>,
    ) -> Result<bool, HubError> {
        let cs = &self.connection_string;
        let existed = self.client.put_device(cs, spec).await?;
        if let Some((tags, desired)) = twin.parts(existed) {
            self.client
                .replace_twin(cs, &spec.device_id, tags, desired)
                .await?;
        }
        Ok(existed)
    }

    async fn delete_device(&self, device_id: &str) -> Result<(), HubError> {
        self.client
            .delete_device(&self.connection_string, device_id)
            .await
    }

    async fn get_twin(&self, device_id: &str) -> Result<Option<Value>, HubError> {
        self.client
            .get_twin(&self.connection_string, device_id)
            .await
    }

    async fn device_etag(&self, device_id: &str) -> Result<Option<String>, HubError> {
        let device = self
            .client
            .get_device(&self.connection_string, device_id)
            .await?;
        Ok(device.and_then(|d| d.get("etag").and_then(Value::as_str).map(str::to_string)))
    }

    async fn delete_device_if(&self, device_id: &str, etag: &str) -> Result<bool, HubError> {
        self.client
            .delete_device_if(&self.connection_string, device_id, etag)
            .await
    }
}

#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
}

struct Target {
    host: String,
    key_name: String,
    key: Vec<u8>,
}

fn encode_id(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl HubClient {
    pub fn new(http: reqwest::Client, clock: Arc<dyn Clock>) -> Self {
        Self { http, clock }
    }

    fn target(connection_string: &str) -> Result<Target, HubError> {
        let cs = ConnectionString::parse(connection_string)
            .map_err(|_| HubError::BadConnectionString("(unparsable)".into()))?;
        let key = B64
            .decode(cs.key.as_bytes())
            .map_err(|_| HubError::BadConnectionString(cs.host_name.clone()))?;
        Ok(Target {
            host: cs.host_name,
            key_name: cs.key_name,
            key,
        })
    }

    async fn call(
        &self,
        connection_string: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        action: &'static str,
    ) -> Result<(u16, Value), HubError> {
        let t = Self::target(connection_string)?;
        let token = SasToken::generate(
            &t.host,
            &t.key,
            Some(&t.key_name),
            self.clock.now().unix_seconds() + 3600,
        );
        let url = format!("https://{}{path}?api-version={HUB_API_VERSION}", t.host);
        let mut req = self
            .http
            .request(method, &url)
            .timeout(HUB_TIMEOUT)
            .header("authorization", token);
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| HubError::Unreachable {
            hub: t.host.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| HubError::Unreachable {
            hub: t.host.clone(),
            reason: error_chain(&e),
        })?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status >= 300 {
            let message = value
                .get("Message")
                .or_else(|| value.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(300).collect());
            return Err(HubError::Refused {
                hub: t.host,
                action,
                status,
                message,
            });
        }
        Ok((status, value))
    }

    /// Creates the device; when it already exists, overwrites its identity and reports so.
    /// Returns whether the device existed before.
    pub async fn put_device(&self, cs: &str, spec: &HubDeviceSpec) -> Result<bool, HubError> {
        let body = spec.to_json();
        let path = format!("/devices/{}", encode_id(&spec.device_id));
        match self
            .call(
                cs,
                reqwest::Method::PUT,
                &path,
                Some(&body),
                None,
                "create device",
            )
            .await
        {
            Ok(_) => Ok(false),
            Err(e) if e.status() == Some(409) => {
                self.call(
                    cs,
                    reqwest::Method::PUT,
                    &path,
                    Some(&body),
                    Some("*"),
                    "update device",
                )
                .await?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn delete_device(&self, cs: &str, device_id: &str) -> Result<(), HubError> {
        let path = format!("/devices/{}", encode_id(device_id));
        match self
            .call(
                cs,
                reqwest::Method::DELETE,
                &path,
                None,
                Some("*"),
                "delete device",
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /devices/{id}` with `If-Match: "{etag}"`: false when the device's etag
    /// differs (412), true when it was deleted or not there.
    pub async fn delete_device_if(
        &self,
        cs: &str,
        device_id: &str,
        etag: &str,
    ) -> Result<bool, HubError> {
        let path = format!("/devices/{}", encode_id(device_id));
        let quoted = format!("\"{etag}\"");
        match self
            .call(
                cs,
                reqwest::Method::DELETE,
                &path,
                None,
                Some(&quoted),
                "delete device",
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(true),
            Err(e) if e.status() == Some(412) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /devices/{id}`, `None` when the device is not there.
    pub async fn get_device(&self, cs: &str, device_id: &str) -> Result<Option<Value>, HubError> {
        let path = format!("/devices/{}", encode_id(device_id));
        match self
            .call(cs, reqwest::Method::GET, &path, None, None, "read device")
            .await
        {
            Ok((_, v)) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn get_twin(&self, cs: &str, device_id: &str) -> Result<Option<Value>, HubError> {
        let path = format!("/twins/{}", encode_id(device_id));
        match self
            .call(cs, reqwest::Method::GET, &path, None, None, "read twin")
            .await
        {
            Ok((_, v)) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces tags and desired properties.
    pub async fn replace_twin(
        &self,
        cs: &str,
        device_id: &str,
        tags: &Value,
        desired: &Value,
    ) -> Result<(), HubError> {
        let path = format!("/twins/{}", encode_id(device_id));
        let body = json!({"tags": tags, "properties": {"desired": desired}});
        self.call(
            cs,
            reqwest::Method::PUT,
            &path,
            Some(&body),
            Some("*"),
            "write twin",
        )
        .await
        .map(|_| ())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
