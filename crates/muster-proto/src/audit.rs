//! The audit log's entry as `GET /audit` returns it and the store keeps it: who (policy),
//! from where (api, console, cli), what (method, route template, id), when and the result.
//! Never a key, a token or a body.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// The CLI's `User-Agent` starts with this (`muster-cli/{version}`); the audit log records
/// such requests with the source `cli`.
pub const CLI_USER_AGENT_PREFIX: &str = "muster-cli/";

/// One recorded write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// When the write was answered (the injected clock).
    pub time: Timestamp,
    /// The shared access policy that signed the request; `None` when its token did not verify.
    pub policy: Option<String>,
    /// Where the request came from.
    pub source: AuditSource,
    /// `PUT`, `DELETE`, `POST`, `PATCH`.
    pub method: String,
    /// The route template, e.g. `/enrollments/{id}`.
    pub route: String,
    /// The id the route names, when it names one (bulk writes name none).
    pub id: Option<String>,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The error code of a refused write (the DPS `errorCode`, or the hub's code name).
    pub error_code: Option<String>,
}

/// Who sent a request: an SDK or other client, Muster's console, Muster's CLI, or a device
/// (whose registration was issued a certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditSource {
    Api,
    Console,
    Cli,
    /// A device's registration (a certificate issued for its CSR); `policy` is `None`.
    Device,
}

impl AuditSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuditSource::Api => "api",
            AuditSource::Console => "console",
            AuditSource::Cli => "cli",
            AuditSource::Device => "device",
        }
    }
}
