//! The registration engine, independent of transport.
//!
//! A device transport (HTTPS, MQTT, MQTT over WebSocket, later AMQP) turns what arrived on
//! the wire into a [`RegisterRequest`] or [`StatusRequest`] and hands it to a
//! [`DeviceRegistrar`]; the [`DeviceReply`] it gets back carries the status code (HTTP status,
//! or the `{status}` of the MQTT response topic), an optional `retry-after` and the JSON body
//! (a `RegistrationOperationStatus` or the DPS error body). Transports add nothing else.
//!
//! Layout:
//! - [`engine`] — the [`Engine`]: the registration flow, reprovisioning, records, throttled
//!   queues; every plan is saved before its hub write (intent before effect), and
//!   `engine/deprovision.rs` removes a record and its hub device the same way (the hub delete
//!   conditional on the device's etag, so a device that registered again keeps it);
//!   `engine/claims.rs` shares that work between the nodes of one store: claims with leases,
//!   renewed and taken over by the periodic [`Engine::sweep`];
//!   `engine/certificates.rs` records each issued certificate (with its audit entry) before it
//!   leaves, refuses X.509 devices presenting a revoked one (401016), and revokes (the record,
//!   then the hub device written back with authentication `none`).
//! - [`device_auth`] — which enrollment accepts a device (symmetric keys; X.509 via [`x509`]).
//! - [`group_cache`] — every enrollment group, decoded once with its keys prepared for HMAC,
//!   kept until one is written; one group by id.
//! - [`group_search`] — the search through every group for a device whose group is unknown,
//!   and the bound on how many such searches run or wait.
//! - [`x509`] — X.509 attestation: CN, individual thumbprints, group chains, verified CAs.
//! - [`issuance`] — certificate issuance at registration: the [`IssuingCa`] that signs a
//!   device's checked CSR (`muster_attestation::csr`) into the `issuedCertificateChain`; the
//!   engine checks the api-version, the enrollment's `certificateIssuance` and the key type,
//!   records the certificate on the registration and gives the hub device its thumbprint.
//!   Several CAs may be configured by name ([`Engine::with_named_issuing_ca`]); the
//!   enrollment's `certificateIssuance.issuingCa` picks one (`local` by default).
//! - [`tpm`] — TPM attestation: the EK checked against the individual enrollment, the issued
//!   key (sealed, bounded lifetime) and its activation blob in the 401 challenge, tokens
//!   verified with that key, and the final blob in the assigned answer.
//! - [`allocation`] — candidate hubs and one module per policy: `hashed`, `static_hub`,
//!   `geo_latency`, `custom` (the webhook).
//! - [`hub_client`] — [`HubConnection`], how the engine writes devices and twins into a hub,
//!   and its IoT Hub registry REST implementation.
//! - [`record`] — the stored registration record and the plan of a pending assignment, with
//!   the twin rule (`TwinPlan`) and the substatus it yields.
//! - [`throttle`] — per-hub token buckets: in process, or in the store when it is shared by
//!   several nodes (`Limiter`).
//! - [`reply`] — [`DeviceReply`], what transports send back.
//! - [`metrics`] — the engine's metrics (registrations, latencies, throttle queues,
//!   webhook calls), recorded through the `metrics` facade; the server installs the exporter.

pub mod allocation;
pub mod device_auth;
pub mod engine;
pub mod group_cache;
pub mod group_search;
pub mod hub_client;
pub mod issuance;
pub mod metrics;
pub mod record;
pub mod reply;
pub mod throttle;
pub mod tpm;
pub mod x509;

use async_trait::async_trait;
use muster_proto::device::DeviceRegistration;
use muster_proto::ErrorCode;

pub use engine::{Engine, EngineConfig};
pub use hub_client::{HubClient, HubConnection};
pub use issuance::IssuingCa;
pub use metrics::Transport;
pub use reply::DeviceReply;

/// Why a registration did not succeed: a code that names the failed check and a message
/// without secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeviceFailure {
    pub code: ErrorCode,
    pub message: String,
}

impl DeviceFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        if let Some(suppressed) = INTERNAL_ERROR_LOG.admit() {
            tracing::error!(%err, suppressed, "{context}");
        }
        Self::new(
            ErrorCode::Internal,
            format!("internal error while {context}"),
        )
    }

    /// A refused CSR, with the code of the check that failed.
    pub fn csr(e: &muster_attestation::CsrError) -> Self {
        use muster_attestation::CsrError;
        let code = match e {
            CsrError::Malformed(_) => ErrorCode::CsrMalformed,
            CsrError::NameMismatch { .. } => ErrorCode::CsrNameMismatch,
            CsrError::SignatureInvalid => ErrorCode::CsrSignatureInvalid,
            CsrError::WeakKey(_) => ErrorCode::CsrKeyRejected,
        };
        Self::new(code, e.to_string())
    }

    /// Failures worth retrying as they are (503: the store or the hub unavailable): they
    /// leave a registration's intent in place rather than a `failed` record.
    pub fn is_transient(&self) -> bool {
        self.code.status() == 503
    }

    /// Failures that end as a `failed` registration record (the device authenticated, but no
    /// hub could be chosen) rather than as an error answer.
    pub fn is_registration_outcome(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::CustomAllocationFailed
                | ErrorCode::CustomAllocationIotHubNotSpecified
                | ErrorCode::CustomAllocationUnauthorizedAccess
                | ErrorCode::NoHubAvailable
                | ErrorCode::HubNotLinked
        )
    }
}

impl From<muster_store::StoreError> for DeviceFailure {
    fn from(e: muster_store::StoreError) -> Self {
        if e.is_unavailable() {
            return DeviceFailure::store_unavailable(&e);
        }
        DeviceFailure::internal("accessing the store", e)
    }
}

/// A full disk fails every request: one warning per interval, with the count held back.
static STORE_UNAVAILABLE_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

/// An internal error repeats on every request that meets it: one line per interval.
static INTERNAL_ERROR_LOG: muster_proto::log_limit::LogLimiter =
    muster_proto::log_limit::LogLimiter::new(std::time::Duration::from_secs(10));

impl DeviceFailure {
    /// 503 with `retry-after`: the device retries, nothing is half-written (the store refused
    /// the whole write), and the log stays bounded.
    pub fn store_unavailable(e: &muster_store::StoreError) -> Self {
        if let Some(suppressed) = STORE_UNAVAILABLE_LOG.admit() {
            tracing::warn!(error = %e, suppressed, "store unavailable; devices are told to retry");
        }
        Self::new(
            ErrorCode::StoreUnavailable,
            "Muster's store is temporarily unavailable; retry after the indicated time",
        )
    }
}

/// How the device authenticated on its connection or request.
#[derive(Clone, PartialEq, Eq)]
pub enum DeviceCredential {
    /// A SAS token (`SharedAccessSignature sr=..&sig=..&se=..[&skn=registration]`), exactly as sent.
    Sas(String),
    /// The client certificate chain from the TLS handshake, leaf first, DER.
    X509 { chain: Vec<Vec<u8>> },
    /// Nothing presented.
    None,
}

impl std::fmt::Debug for DeviceCredential {
    /// Never prints token text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceCredential::Sas(_) => f.write_str("Sas(..)"),
            DeviceCredential::X509 { chain } => write!(f, "X509({} certificates)", chain.len()),
            DeviceCredential::None => f.write_str("None"),
        }
    }
}

/// `PUT /{idScope}/registrations/{registrationId}/register`, or the MQTT register publish.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub id_scope: String,
    /// From the URL path, MQTT username or link address: authoritative over the body.
    pub registration_id: String,
    pub credential: DeviceCredential,
    pub body: DeviceRegistration,
    /// Where the request arrived (a metrics label only).
    pub transport: Transport,
    /// The request's `api-version` (URL query, MQTT username, AMQP link); a `csr` needs
    /// `2025-07-01-preview` or later.
    pub api_version: Option<String>,
}

/// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`, or the MQTT poll.
#[derive(Debug, Clone)]
pub struct StatusRequest {
    pub id_scope: String,
    pub registration_id: String,
    pub operation_id: String,
    pub credential: DeviceCredential,
    /// The poll's body carried a `csr` (refused: only the register request may).
    pub csr_sent: bool,
}

/// Whether a status poll's body (any bytes: `{}`, `" "`, the register JSON, nothing) carries
/// a non-null `csr`, which DPS answers with a bad request.
pub fn body_names_csr(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("csr").map(|c| !c.is_null()))
        .unwrap_or(false)
}

/// What device transports need from the registration engine.
#[async_trait]
pub trait DeviceRegistrar: Send + Sync + 'static {
    async fn register(&self, request: RegisterRequest) -> DeviceReply;
    async fn operation_status(&self, request: StatusRequest) -> DeviceReply;
}
