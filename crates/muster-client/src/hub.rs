//! [`HubClient`]: the IoT hub registry and twin REST API (api-version 2021-04-12), as Muster's
//! built-in hub and Azure IoT Hub serve it. Devices and twins are returned as JSON values,
//! spelled as IoT Hub spells them.

use std::path::Path;

use muster_proto::SasToken;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::service::{parse_connection_string, read_json, segment, truncate};

/// The api-version this client sends to hubs.
pub const HUB_API_VERSION: &str = "2021-04-12";

/// A client of one hub's service REST API, from an `iothubowner`-style connection string.
#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    base_url: String,
    host_name: String,
    key_name: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl HubClient {
    pub fn from_connection_string(connection_string: &str, ca_pem: Option<&Path>) -> Result<Self> {
        Self::with_http_client(connection_string, crate::tls::https_client(ca_pem)?)
    }

    pub fn with_http_client(connection_string: &str, http: reqwest::Client) -> Result<Self> {
        let (cs, key) = parse_connection_string(connection_string)?;
        Ok(Self {
            http,
            base_url: format!("https://{}", cs.host_name),
            host_name: cs.host_name,
            key_name: cs.key_name,
            key,
        })
    }

    /// The hub's host name (`HostName` of the connection string).
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    pub(crate) fn request(&self, method: Method, path: &str, query: &str) -> RequestBuilder {
        let token = SasToken::generate(
            &self.host_name,
            &self.key,
            Some(&self.key_name),
            crate::unix_now() + 3600,
        );
        self.http
            .request(
                method,
                format!(
                    "{}{path}?api-version={HUB_API_VERSION}{query}",
                    self.base_url
                ),
            )
            .header("authorization", token)
    }

    pub(crate) async fn send(&self, what: &str, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|source| Error::Transport {
            url: self.base_url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(hub_error(what, resp).await)
    }

    /// `GET /devices/{id}`.
    pub async fn get_device(&self, device_id: &str) -> Result<Value> {
        let path = format!("/devices/{}", segment(device_id));
        let resp = self
            .send("get device", self.request(Method::GET, &path, ""))
            .await?;
        read_json("get device", resp).await
    }

    /// `GET /devices?top=N`.
    pub async fn list_devices(&self, top: Option<u32>) -> Result<Vec<Value>> {
        let query = top.map(|t| format!("&top={t}")).unwrap_or_default();
        let resp = self
            .send(
                "list devices",
                self.request(Method::GET, "/devices", &query),
            )
            .await?;
        read_json("list devices", resp).await
    }

    /// `DELETE /devices/{id}` (If-Match `*` unless an etag is given).
    pub async fn delete_device(&self, device_id: &str, if_match: Option<&str>) -> Result<()> {
        let path = format!("/devices/{}", segment(device_id));
        let etag = match if_match {
            Some(e) if e != "*" && !e.starts_with('"') => format!("\"{e}\""),
            Some(e) => e.to_string(),
            None => "*".to_string(),
        };
        let req = self
            .request(Method::DELETE, &path, "")
            .header("if-match", etag);
        self.send("delete device", req).await?;
        Ok(())
    }

    /// `PUT /devices/{id}` with `device` (IoT Hub's device JSON): creates the identity.
    pub async fn create_device(&self, device_id: &str, device: &Value) -> Result<Value> {
        let path = format!("/devices/{}", segment(device_id));
        let req = self.request(Method::PUT, &path, "").json(device);
        let resp = self.send("create device", req).await?;
        read_json("create device", resp).await
    }

    /// `POST /devices/{id}/messages/cloudToDevice`: queues a cloud-to-device message; the
    /// properties become `iothub-app-{name}` headers.
    pub async fn send_c2d(
        &self,
        device_id: &str,
        body: Vec<u8>,
        properties: &[(String, String)],
        message_id: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<()> {
        let path = format!("/devices/{}/messages/cloudToDevice", segment(device_id));
        let mut req = self.request(Method::POST, &path, "").body(body);
        for (k, v) in properties {
            req = req.header(format!("iothub-app-{k}"), v);
        }
        if let Some(m) = message_id {
            req = req.header("iothub-messageid", m);
        }
        if let Some(c) = content_type {
            req = req.header("content-type", c);
        }
        self.send("send a cloud-to-device message", req).await?;
        Ok(())
    }

    /// `POST /twins/{id}/methods`: invokes a direct method and returns `{status, payload}`.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        method_name: &str,
        payload: &Value,
        response_timeout_secs: u64,
        connect_timeout_secs: u64,
    ) -> Result<Value> {
        let path = format!("/twins/{}/methods", segment(device_id));
        let body = serde_json::json!({
            "methodName": method_name,
            "payload": payload,
            "responseTimeoutInSeconds": response_timeout_secs,
            "connectTimeoutInSeconds": connect_timeout_secs,
        });
        let req = self.request(Method::POST, &path, "").json(&body);
        let resp = self.send("invoke a direct method", req).await?;
        read_json("invoke a direct method", resp).await
    }

    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, device_id: &str) -> Result<Value> {
        let path = format!("/twins/{}", segment(device_id));
        let resp = self
            .send("get twin", self.request(Method::GET, &path, ""))
            .await?;
        read_json("get twin", resp).await
    }

    /// `PATCH /twins/{id}` with `{"tags": .., "properties": {"desired": ..}}`; `null` deletes.
    pub async fn patch_twin(
        &self,
        device_id: &str,
        patch: &Value,
        if_match: Option<&str>,
    ) -> Result<Value> {
        let path = format!("/twins/{}", segment(device_id));
        let mut req = self.request(Method::PATCH, &path, "").json(patch);
        if let Some(e) = if_match {
            req = req.header("if-match", e);
        }
        let resp = self.send("update twin", req).await?;
        read_json("update twin", resp).await
    }
}

/// An IoT hub error: `iothub-errorcode` header, body `{"Message":"ErrorCode:<code>;<text>"}`.
pub(crate) async fn hub_error(what: &str, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let header_code = resp
        .headers()
        .get("iothub-errorcode")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
        v.get("Message")
            .or_else(|| v.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let (body_code, message) = match message {
        Some(m) => match m.strip_prefix("ErrorCode:").and_then(|r| r.split_once(';')) {
            Some((code, text)) => (Some(code.to_string()), text.to_string()),
            None => (None, m),
        },
        None if text.trim().is_empty() => (None, format!("{what} failed")),
        None => (None, truncate(&text)),
    };
    let error_code = header_code
        .or(body_code)
        .unwrap_or_else(|| status.to_string());
    Error::Hub {
        status,
        error_code,
        message,
    }
}
