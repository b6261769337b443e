//! The DPS service REST API (service-api.md §1–§6): individual enrollments, enrollment groups
//! and registration records, with the paging, ETag, bulk and authorization rules that
//! Microsoft's service SDKs rely on.
//!
//! Layout:
//! - [`router`] — the axum router; [`normalize_path`] makes routing case-insensitive and must
//!   wrap whatever router this one is merged into.
//! - `routes/enrollments.rs`, `routes/enrollment_groups.rs`, `routes/registrations.rs`,
//!   `routes/linked_hubs.rs`, `routes/access_policies.rs`, `routes/ca_certificates.rs`,
//!   `routes/service_settings.rs` (the default allocation policy) and
//!   `routes/deprovisions.rs`, `routes/audit_log.rs`, `routes/issued_certificates.rs`
//!   (`/certificates/issued`: list, show, revoke) (Muster's extensions): one
//!   file per route family; `routes/generic.rs` holds what individual enrollments and groups
//!   share (get, put, delete, attestation mechanism, query, bulk) over the [`kind::EnrollmentKind`]
//!   trait.
//! - [`audit`] — the middleware that records every write in the store's audit log (who,
//!   from where, route, id, result); [`router`] wraps itself in it.
//! - [`events`] — `GET /events/registrations`, the Server-Sent Events stream of registrations
//!   fed by a broadcast channel ([`events::RegistrationFeed`]).
//! - [`kind`] — what differs between individual enrollments and groups.
//! - [`prepare`] — validation and normalisation of an incoming enrollment (keys, certificates,
//!   allocation settings, timestamps).
//! - [`references`] — what an enrollment names must exist: `iotHubs` linked hubs,
//!   `caReferences` verified CA certificates (400 at write time).
//! - [`redact`] — what each read path may show (service-api.md §5.7).
//! - [`request`] — api-version, body limits, If-Match and paging helpers.
//! - [`auth`] — shared access policies and SAS verification.
//! - [`error`] — [`ApiError`], mapped once to the DPS error body.
//! - [`metrics`] — the request metrics middleware (route template, method, status).
//!
//! Handlers never read the clock or the random source directly: both come from [`ServiceApi`].

pub mod audit;
pub mod auth;
pub mod error;
pub mod events;
pub mod kind;
pub mod metrics;
pub mod prepare;
pub mod redact;
pub mod references;
pub mod request;
mod routes;

use std::sync::Arc;

use axum::extract::Request;
use muster_proto::runtime::{Clock, Entropy};
use muster_store::Store;

pub use auth::{AccessPolicy, Authorizer};
pub use error::ApiError;
pub use routes::{method_not_allowed, not_found, router, OWNER_POLICY, POLICIES_KEY};

/// Limits the service API enforces; documented in the README.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body outside bulk operations.
    pub max_body_bytes: usize,
    /// Largest bulk request body.
    pub max_bulk_body_bytes: usize,
    /// Most items in one bulk operation (DPS allows 10).
    pub max_bulk_items: usize,
    /// Page size when the client sends no `x-ms-max-item-count`.
    pub default_page_size: usize,
    /// Larger requested page sizes are reduced to this.
    pub max_page_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_bulk_body_bytes: 64 * 1024 * 1024,
            max_bulk_items: 10_000,
            default_page_size: 100,
            max_page_size: 1_000,
        }
    }
}

/// Everything the service API's handlers need.
#[derive(Clone)]
pub struct ServiceApi {
    pub store: Arc<dyn Store>,
    pub auth: Authorizer,
    pub clock: Arc<dyn Clock>,
    pub entropy: Arc<dyn Entropy>,
    pub limits: Limits,
    /// Carries out `POST /deprovisions/{id}`; `None` answers 404 there.
    pub deprovisioner: Option<Arc<dyn Deprovisioner>>,
    /// Names the issuing CAs and revokes issued certificates; `None`: only `local` is a
    /// known issuing CA and revoking answers 404.
    pub certificates: Option<Arc<dyn CertificateIssuer>>,
    /// Checks a linked hub's connection string before `PUT /linkedHubs/{name}` stores it
    /// (unless the request says `skipCheck`); `None` stores it unchecked.
    pub hub_check: Option<Arc<dyn HubCheck>>,
}

/// What the issued-certificate extension needs from the server (which implements it with
/// the registration engine).
#[async_trait::async_trait]
pub trait CertificateIssuer: Send + Sync {
    /// The names `certificateIssuance.issuingCa` may use (`local` among them).
    fn issuing_ca_names(&self) -> Vec<String>;
    /// Revokes the certificate with `serial` (upper-case hex) and, when it is its
    /// registration's current one, takes it off the hub device; the record as stored.
    async fn revoke(
        &self,
        serial: &str,
        reason: Option<String>,
    ) -> Result<muster_proto::IssuedCertificate, ApiError>;
}

/// Proves a hub connection string works before it is linked.
#[async_trait::async_trait]
pub trait HubCheck: Send + Sync {
    /// A registry read against the hub with `connection_string`; `Err` says what failed
    /// (never the key).
    async fn check(&self, connection_string: &str) -> Result<(), String>;
}

/// Removes a registration record and its hub device, intent first, so a crash leaves no hub
/// device without a record (the server implements it with the registration engine).
#[async_trait::async_trait]
pub trait Deprovisioner: Send + Sync {
    /// What was removed, as JSON; `etag`, when given, must be the record's current one.
    async fn deprovision(
        &self,
        registration_id: &str,
        etag: Option<&str>,
    ) -> Result<serde_json::Value, ApiError>;
}

/// Route segments clients spell in more than one way (Node sends `/enrollmentgroups/`).
const CANONICAL_SEGMENTS: &[&str] = &[
    "enrollments",
    "enrollmentGroups",
    "registrations",
    "linkedHubs",
    "accessPolicies",
    "caCertificates",
    "attestationmechanism",
    "query",
    "deprovisions",
];

/// Rewrites the fixed segments of service API paths to their canonical spelling so routing
/// is case-insensitive; ids keep their spelling.
pub fn normalize_path(mut req: Request) -> Request {
    let full = req.uri().path();
    // Node's bulk call posts to `/enrollments/`: a trailing slash names the same resource.
    let path = if full.len() > 1 {
        full.trim_end_matches('/')
    } else {
        full
    };
    let mut changed = path.len() != full.len();
    let segments: Vec<&str> = path.split('/').collect();
    // Only the first segment and the segment after an id are fixed words.
    let mut out: Vec<String> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        // Position 3 is fixed only under a service collection (device paths put a
        // registration id there).
        let under_collection = segments.get(1).is_some_and(|first| {
            CANONICAL_SEGMENTS[..6]
                .iter()
                .any(|c| c.eq_ignore_ascii_case(first))
        });
        let fixed_position = i == 1 || (i == 3 && under_collection);
        let canon = if fixed_position {
            CANONICAL_SEGMENTS
                .iter()
                .find(|c| c.eq_ignore_ascii_case(seg) && **c != *seg)
        } else {
            None
        };
        match canon {
            Some(c) => {
                changed = true;
                out.push((*c).to_string());
            }
            None => out.push((*seg).to_string()),
        }
    }
    if changed {
        let mut new_path = out.join("/");
        if new_path.is_empty() {
            new_path.push('/');
        }
        if let Some(q) = req.uri().query() {
            new_path.push('?');
            new_path.push_str(q);
        }
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = new_path.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

/// JSON bytes of a value that always serializes (our own wire types).
pub(crate) fn json_response_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}
