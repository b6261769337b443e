//! [`ServiceClient`]: the DPS service REST API and Muster's `/linkedHubs` extension.

use std::marker::PhantomData;
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::audit::AuditEntry;
use muster_proto::linked_hub::{LinkedHubInfo, LinkedHubRequest};
use muster_proto::query::{HEADER_CONTINUATION, HEADER_MAX_ITEM_COUNT};
use muster_proto::{
    AttestationMechanism, BulkEnrollmentOperationResult, BulkOperationMode, ConnectionString,
    DeviceRegistrationState, EnrollmentGroup, ErrorBody, IndividualEnrollment, SasToken,
};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, Result};

/// The api-version this client sends.
pub const SERVICE_API_VERSION: &str = "2021-10-01";

/// How long each request's SAS token is valid.
const TOKEN_TTL_SECS: i64 = 3600;

/// What a path segment may contain unescaped (ids use letters, digits and `-._:`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b':');

pub(crate) fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// What differs between individual enrollments and enrollment groups on the wire, so one set
/// of generic methods serves both.
pub trait EnrollmentKind: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// Collection path segment: `enrollments` or `enrollmentGroups`.
    const COLLECTION: &'static str;
    /// Field of the bulk body holding the items.
    const BULK_FIELD: &'static str;
    /// `registrationId` or `enrollmentGroupId`.
    fn id(&self) -> &str;
    fn etag(&self) -> Option<&str>;
}

impl EnrollmentKind for IndividualEnrollment {
    const COLLECTION: &'static str = "enrollments";
    const BULK_FIELD: &'static str = "enrollments";
    fn id(&self) -> &str {
        self.registration_id.as_str()
    }
    fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }
}

impl EnrollmentKind for EnrollmentGroup {
    const COLLECTION: &'static str = "enrollmentGroups";
    const BULK_FIELD: &'static str = "enrollmentGroups";
    fn id(&self) -> &str {
        self.enrollment_group_id.as_str()
    }
    fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }
}

/// A client of the DPS service API. Cheap to clone (the HTTP client is shared).
#[derive(Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    base_url: String,
    resource: String,
    key_name: String,
    key: Vec<u8>,
    /// Sent as `User-Agent` when set (the CLI says `muster-cli/{version}`, which the audit
    /// log records as its source).
    user_agent: Option<String>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("base_url", &self.base_url)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// Parses a connection string and decodes its key.
pub(crate) fn parse_connection_string(s: &str) -> Result<(ConnectionString, Vec<u8>)> {
    let cs = ConnectionString::parse(s).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let key = B64.decode(cs.key.trim()).map_err(|_| {
        Error::InvalidInput("the connection string's SharedAccessKey is not base64".into())
    })?;
    Ok((cs, key))
}

/// Reads an error answer: the DPS error body when there is one.
pub(crate) async fn service_error(what: &str, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let retry_after = retry_after(&resp);
    let text = resp.text().await.unwrap_or_default();
    error_from_text(what, status, retry_after, &text)
}

/// An error answer already read: the DPS error body when `text` is one.
pub(crate) fn error_from_text(
    what: &str,
    status: u16,
    retry_after: Option<Duration>,
    text: &str,
) -> Error {
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(b) => Error::Service {
            status,
            error_code: b.error_code,
            message: b.message,
            tracking_id: b.tracking_id,
            retry_after,
        },
        Err(_) if status == 429 || status == 503 => Error::Service {
            status,
            error_code: status as u32 * 1000,
            message: format!("{what}: the service is busy"),
            tracking_id: String::new(),
            retry_after,
        },
        Err(_) => Error::UnexpectedResponse {
            what: what.to_string(),
            status,
            detail: truncate(text),
        },
    }
}

/// `retry-after` in seconds, as a duration.
pub(crate) fn retry_after(resp: &Response) -> Option<Duration> {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(crate) async fn read_json<T: DeserializeOwned>(what: &str, resp: Response) -> Result<T> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.map_err(|e| Error::UnexpectedResponse {
        what: what.to_string(),
        status,
        detail: e.to_string(),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::UnexpectedResponse {
        what: what.to_string(),
        status,
        detail: format!("{e}: {}", truncate(&String::from_utf8_lossy(&bytes))),
    })
}

impl ServiceClient {
    /// From a `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..` connection string, trusting
    /// `ca_pem` (Muster's `ca.pem`) or, without it, the system roots.
    pub fn from_connection_string(connection_string: &str, ca_pem: Option<&Path>) -> Result<Self> {
        Self::with_http_client(connection_string, crate::tls::https_client(ca_pem)?)
    }

    /// With your own HTTP client (its TLS settings decide what is trusted).
    pub fn with_http_client(connection_string: &str, http: reqwest::Client) -> Result<Self> {
        let (cs, key) = parse_connection_string(connection_string)?;
        Ok(Self {
            http,
            base_url: format!("https://{}", cs.host_name),
            resource: cs.host_name,
            key_name: cs.key_name,
            key,
            user_agent: None,
        })
    }

    /// Sends requests to `base_url` (e.g. `https://127.0.0.1:8443`) instead of the connection
    /// string's host; tokens still name the connection string's host.
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into().trim_end_matches('/').to_string();
        self
    }

    /// Names the program in `User-Agent` on every request.
    pub fn with_user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// The service host the connection string names.
    pub fn host_name(&self) -> &str {
        &self.resource
    }

    fn token(&self) -> String {
        SasToken::generate(
            &self.resource,
            &self.key,
            Some(&self.key_name),
            crate::unix_now() + TOKEN_TTL_SECS,
        )
    }

    /// A request with a fresh token and the api-version.
    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{path}{sep}api-version={SERVICE_API_VERSION}",
            self.base_url
        );
        let req = self
            .http
            .request(method, url)
            .header("authorization", self.token());
        match &self.user_agent {
            Some(ua) => req.header(reqwest::header::USER_AGENT, ua.as_str()),
            None => req,
        }
    }

    pub(crate) async fn send(&self, what: &str, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|source| Error::Transport {
            url: self.base_url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(service_error(what, resp).await)
        }
    }

    fn path<K: EnrollmentKind>(id: &str) -> String {
        format!("/{}/{}", K::COLLECTION, segment(id))
    }

    // ---- enrollments and groups, generic ----

    /// `GET /{collection}/{id}`. Keys are not shown (use [`Self::attestation_mechanism`]).
    pub async fn get<K: EnrollmentKind>(&self, id: &str) -> Result<K> {
        let resp = self
            .send("get", self.request(Method::GET, &Self::path::<K>(id)))
            .await?;
        read_json("get", resp).await
    }

    /// `PUT /{collection}/{id}`. Without `if_match`, fails with 409 when the record exists;
    /// `Some("*")` replaces whatever is there, `Some(etag)` only that version. The answer shows
    /// the keys (generated ones included).
    pub async fn create_or_update<K: EnrollmentKind>(
        &self,
        item: &K,
        if_match: Option<&str>,
    ) -> Result<K> {
        let mut req = self
            .request(Method::PUT, &Self::path::<K>(item.id()))
            .json(item);
        if let Some(e) = if_match {
            req = req.header("if-match", quote_etag(e));
        }
        let resp = self.send("create or update", req).await?;
        read_json("create or update", resp).await
    }

    /// `DELETE /{collection}/{id}`, optionally only if the etag matches.
    pub async fn delete<K: EnrollmentKind>(&self, id: &str, if_match: Option<&str>) -> Result<()> {
        let mut req = self.request(Method::DELETE, &Self::path::<K>(id));
        if let Some(e) = if_match {
            req = req.header("if-match", quote_etag(e));
        }
        self.send("delete", req).await?;
        Ok(())
    }

    /// `POST /{collection}/{id}/attestationmechanism`: the attestation with its keys.
    pub async fn attestation_mechanism<K: EnrollmentKind>(
        &self,
        id: &str,
    ) -> Result<AttestationMechanism> {
        let path = format!("{}/attestationmechanism", Self::path::<K>(id));
        let resp = self
            .send("attestation mechanism", self.request(Method::POST, &path))
            .await?;
        read_json("attestation mechanism", resp).await
    }

    /// `POST /{collection}/query`, page by page. `page_size` None = the server's default (100).
    pub fn query<K: EnrollmentKind>(&self, page_size: Option<u32>) -> Pager<K> {
        Pager::new(self.clone(), format!("/{}/query", K::COLLECTION), page_size)
    }

    /// `POST /{collection}`: a bulk operation (Muster takes up to 10,000 items per call).
    /// Per-item failures are in the result, not an `Err`.
    pub async fn bulk<K: EnrollmentKind>(
        &self,
        mode: BulkOperationMode,
        items: &[K],
    ) -> Result<BulkEnrollmentOperationResult> {
        let body = json!({ "mode": mode.as_str(), K::BULK_FIELD: items });
        let req = self
            .request(Method::POST, &format!("/{}", K::COLLECTION))
            .json(&body);
        let resp = self.send("bulk operation", req).await?;
        read_json("bulk operation", resp).await
    }

    // ---- named shorthands ----

    pub async fn get_enrollment(&self, registration_id: &str) -> Result<IndividualEnrollment> {
        self.get(registration_id).await
    }

    pub async fn create_or_update_enrollment(
        &self,
        enrollment: &IndividualEnrollment,
        if_match: Option<&str>,
    ) -> Result<IndividualEnrollment> {
        self.create_or_update(enrollment, if_match).await
    }

    pub async fn delete_enrollment(
        &self,
        registration_id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        self.delete::<IndividualEnrollment>(registration_id, if_match)
            .await
    }

    pub async fn enrollment_attestation(
        &self,
        registration_id: &str,
    ) -> Result<AttestationMechanism> {
        self.attestation_mechanism::<IndividualEnrollment>(registration_id)
            .await
    }

    pub fn query_enrollments(&self, page_size: Option<u32>) -> Pager<IndividualEnrollment> {
        self.query(page_size)
    }

    pub async fn bulk_enrollments(
        &self,
        mode: BulkOperationMode,
        items: &[IndividualEnrollment],
    ) -> Result<BulkEnrollmentOperationResult> {
        self.bulk(mode, items).await
    }

    pub async fn get_enrollment_group(&self, group_id: &str) -> Result<EnrollmentGroup> {
        self.get(group_id).await
    }

    pub async fn create_or_update_enrollment_group(
        &self,
        group: &EnrollmentGroup,
        if_match: Option<&str>,
    ) -> Result<EnrollmentGroup> {
        self.create_or_update(group, if_match).await
    }

    pub async fn delete_enrollment_group(
        &self,
        group_id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        self.delete::<EnrollmentGroup>(group_id, if_match).await
    }

    pub async fn enrollment_group_attestation(
        &self,
        group_id: &str,
    ) -> Result<AttestationMechanism> {
        self.attestation_mechanism::<EnrollmentGroup>(group_id)
            .await
    }

    pub fn query_enrollment_groups(&self, page_size: Option<u32>) -> Pager<EnrollmentGroup> {
        self.query(page_size)
    }

    pub async fn bulk_enrollment_groups(
        &self,
        mode: BulkOperationMode,
        items: &[EnrollmentGroup],
    ) -> Result<BulkEnrollmentOperationResult> {
        self.bulk(mode, items).await
    }

    // ---- registration records ----

    /// `GET /registrations/{id}`.
    pub async fn get_registration(&self, registration_id: &str) -> Result<DeviceRegistrationState> {
        let path = format!("/registrations/{}", segment(registration_id));
        let resp = self
            .send("get registration", self.request(Method::GET, &path))
            .await?;
        read_json("get registration", resp).await
    }

    /// `DELETE /registrations/{id}`, optionally only if the etag matches. This removes the
    /// record only; the device stays in its hub (see the CLI's `--cascade`).
    pub async fn delete_registration(
        &self,
        registration_id: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let path = format!("/registrations/{}", segment(registration_id));
        let mut req = self.request(Method::DELETE, &path);
        if let Some(e) = if_match {
            req = req.header("if-match", quote_etag(e));
        }
        self.send("delete registration", req).await?;
        Ok(())
    }

    /// `POST /deprovisions/{id}` (Muster extension): removes the registration record and the
    /// device from whichever linked hub holds it, server-side and intent first, so a crash
    /// leaves no hub device without a record. Answers what was removed
    /// (`registrationId`, `hub`, `deviceId`, `removed`).
    pub async fn deprovision(
        &self,
        registration_id: &str,
        if_match: Option<&str>,
    ) -> Result<serde_json::Value> {
        let path = format!("/deprovisions/{}", segment(registration_id));
        let mut req = self.request(Method::POST, &path);
        if let Some(e) = if_match {
            req = req.header("if-match", quote_etag(e));
        }
        let resp = self.send("deprovision", req).await?;
        read_json("deprovision", resp).await
    }

    /// `POST /registrations/{groupId}/query`: the records of one enrollment group, paged.
    pub fn query_registrations(
        &self,
        group_id: &str,
        page_size: Option<u32>,
    ) -> Pager<DeviceRegistrationState> {
        Pager::new(
            self.clone(),
            format!("/registrations/{}/query", segment(group_id)),
            page_size,
        )
    }

    // ---- linked hubs (Muster extension) ----

    /// `GET /linkedHubs`.
    pub async fn list_linked_hubs(&self) -> Result<Vec<LinkedHubInfo>> {
        let resp = self
            .send("list linked hubs", self.request(Method::GET, "/linkedHubs"))
            .await?;
        read_json("list linked hubs", resp).await
    }

    /// `GET /linkedHubs/{hostName}`.
    pub async fn get_linked_hub(&self, host_name: &str) -> Result<LinkedHubInfo> {
        let path = format!("/linkedHubs/{}", segment(host_name));
        let resp = self
            .send("get linked hub", self.request(Method::GET, &path))
            .await?;
        read_json("get linked hub", resp).await
    }

    /// `PUT /linkedHubs/{hostName}`: links a hub (connection string required) or updates one
    /// (omitted fields are kept).
    pub async fn put_linked_hub(
        &self,
        host_name: &str,
        request: &LinkedHubRequest,
    ) -> Result<LinkedHubInfo> {
        let path = format!("/linkedHubs/{}", segment(host_name));
        let req = self.request(Method::PUT, &path).json(request);
        let resp = self.send("put linked hub", req).await?;
        read_json("put linked hub", resp).await
    }

    // ---- audit log (Muster extension) ----

    /// `GET /audit`: one page of audit entries matching `filter`, oldest first, and the
    /// continuation token of the next page, if any.
    pub async fn audit_page(
        &self,
        filter: &AuditQuery,
        continuation: Option<&str>,
    ) -> Result<(Vec<AuditEntry>, Option<String>)> {
        let mut query = Vec::new();
        for (name, value) in [
            ("from", filter.from.as_deref()),
            ("to", filter.to.as_deref()),
            ("policy", filter.policy.as_deref()),
            ("id", filter.id.as_deref()),
        ] {
            if let Some(v) = value {
                query.push(format!("{name}={}", segment(v)));
            }
        }
        let path = if query.is_empty() {
            "/audit".to_string()
        } else {
            format!("/audit?{}", query.join("&"))
        };
        let mut req = self.request(Method::GET, &path);
        if let Some(n) = filter.page_size {
            req = req.header(HEADER_MAX_ITEM_COUNT, n.to_string());
        }
        if let Some(c) = continuation {
            req = req.header(HEADER_CONTINUATION, c);
        }
        let resp = self.send("list audit entries", req).await?;
        let next = resp
            .headers()
            .get(HEADER_CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let entries = read_json("list audit entries", resp).await?;
        Ok((entries, next))
    }

    // ---- access policies and CA certificates (Muster extensions) ----

    async fn call_json(
        &self,
        what: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = self.send(what, req).await?;
        read_json(what, resp).await
    }

    /// `GET /accessPolicies`: names and rights, no keys.
    pub async fn list_access_policies(&self) -> Result<Vec<serde_json::Value>> {
        let v = self
            .call_json("list access policies", Method::GET, "/accessPolicies", None)
            .await?;
        Ok(match v {
            serde_json::Value::Array(a) => a,
            other => vec![other],
        })
    }

    /// `GET /accessPolicies/{name}`: name and rights, no keys.
    pub async fn get_access_policy(&self, name: &str) -> Result<serde_json::Value> {
        let path = format!("/accessPolicies/{}", segment(name));
        self.call_json("get access policy", Method::GET, &path, None)
            .await
    }

    /// `POST /accessPolicies/{name}/keys`: the policy with its keys.
    pub async fn access_policy_keys(&self, name: &str) -> Result<serde_json::Value> {
        let path = format!("/accessPolicies/{}/keys", segment(name));
        self.call_json("read access policy keys", Method::POST, &path, None)
            .await
    }

    /// `PUT /accessPolicies/{name}` `{"rights": "EnrollmentRead, ..."}`: creates the policy
    /// with fresh keys (returned) or changes its rights.
    pub async fn put_access_policy(&self, name: &str, rights: &str) -> Result<serde_json::Value> {
        let path = format!("/accessPolicies/{}", segment(name));
        let body = json!({ "rights": rights });
        self.call_json("put access policy", Method::PUT, &path, Some(&body))
            .await
    }

    /// `DELETE /accessPolicies/{name}`.
    pub async fn delete_access_policy(&self, name: &str) -> Result<()> {
        let path = format!("/accessPolicies/{}", segment(name));
        self.send("delete access policy", self.request(Method::DELETE, &path))
            .await?;
        Ok(())
    }

    /// `GET /caCertificates`.
    pub async fn list_ca_certificates(&self) -> Result<Vec<serde_json::Value>> {
        let v = self
            .call_json("list CA certificates", Method::GET, "/caCertificates", None)
            .await?;
        Ok(match v {
            serde_json::Value::Array(a) => a,
            other => vec![other],
        })
    }

    /// `GET /caCertificates/{name}`.
    pub async fn get_ca_certificate(&self, name: &str) -> Result<serde_json::Value> {
        let path = format!("/caCertificates/{}", segment(name));
        self.call_json("get CA certificate", Method::GET, &path, None)
            .await
    }

    /// `PUT /caCertificates/{name}` with the certificate (PEM or base64 DER): unverified until
    /// [`Self::verify_ca_certificate`].
    pub async fn put_ca_certificate(
        &self,
        name: &str,
        certificate: &str,
    ) -> Result<serde_json::Value> {
        let path = format!("/caCertificates/{}", segment(name));
        let body = json!({ "certificate": certificate });
        self.call_json("put CA certificate", Method::PUT, &path, Some(&body))
            .await
    }

    /// `POST /caCertificates/{name}/verificationCode`: a fresh code for the proof of
    /// possession (the CN of a certificate the CA signs).
    pub async fn ca_verification_code(&self, name: &str) -> Result<serde_json::Value> {
        let path = format!("/caCertificates/{}/verificationCode", segment(name));
        self.call_json("generate a verification code", Method::POST, &path, None)
            .await
    }

    /// `POST /caCertificates/{name}/verify` with the certificate whose CN is the code.
    pub async fn verify_ca_certificate(
        &self,
        name: &str,
        certificate: &str,
    ) -> Result<serde_json::Value> {
        let path = format!("/caCertificates/{}/verify", segment(name));
        let body = json!({ "certificate": certificate });
        self.call_json("verify CA certificate", Method::POST, &path, Some(&body))
            .await
    }

    /// `DELETE /caCertificates/{name}`.
    pub async fn delete_ca_certificate(&self, name: &str) -> Result<()> {
        let path = format!("/caCertificates/{}", segment(name));
        self.send("delete CA certificate", self.request(Method::DELETE, &path))
            .await?;
        Ok(())
    }

    /// `DELETE /linkedHubs/{hostName}`.
    pub async fn delete_linked_hub(&self, host_name: &str) -> Result<()> {
        let path = format!("/linkedHubs/{}", segment(host_name));
        self.send("delete linked hub", self.request(Method::DELETE, &path))
            .await?;
        Ok(())
    }
}

/// Which audit entries [`ServiceClient::audit_page`] asks for; times are RFC 3339.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub from: Option<String>,
    pub to: Option<String>,
    pub policy: Option<String>,
    pub id: Option<String>,
    pub page_size: Option<u32>,
}

fn quote_etag(etag: &str) -> String {
    if etag == "*" || etag.starts_with('"') {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

/// Pages of a query. Call [`Pager::next_page`] until it gives `None`, or
/// [`Pager::collect_all`].
pub struct Pager<T> {
    client: ServiceClient,
    path: String,
    page_size: Option<u32>,
    continuation: Option<String>,
    done: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Pager<T> {
    fn new(client: ServiceClient, path: String, page_size: Option<u32>) -> Self {
        Self {
            client,
            path,
            page_size,
            continuation: None,
            done: false,
            _item: PhantomData,
        }
    }

    /// The next page, or `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<Vec<T>>> {
        if self.done {
            return Ok(None);
        }
        let mut req = self
            .client
            .request(Method::POST, &self.path)
            .json(&json!({ "query": "SELECT *" }));
        if let Some(n) = self.page_size {
            req = req.header(HEADER_MAX_ITEM_COUNT, n.to_string());
        }
        if let Some(c) = &self.continuation {
            req = req.header(HEADER_CONTINUATION, c.as_str());
        }
        let resp = self.client.send("query", req).await?;
        self.continuation = resp
            .headers()
            .get(HEADER_CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        if self.continuation.is_none() {
            self.done = true;
        }
        let items: Vec<T> = read_json("query", resp).await?;
        Ok(Some(items))
    }

    /// Every remaining item.
    pub async fn collect_all(mut self) -> Result<Vec<T>> {
        let mut out = Vec::new();
        while let Some(page) = self.next_page().await? {
            out.extend(page);
        }
        Ok(out)
    }

    /// The continuation token for the next page, if any (to resume a query later).
    pub fn continuation(&self) -> Option<&str> {
        self.continuation.as_deref()
    }

    /// Starts this query at a continuation token an earlier page of the same query returned
    /// (a query resumed later, or read from a saved position).
    pub fn resume_from(mut self, continuation: impl Into<String>) -> Self {
        self.continuation = Some(continuation.into());
        self.done = false;
        self
    }
}

impl<T> std::fmt::Debug for Pager<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("path", &self.path)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
