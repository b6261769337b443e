//! The error type of every client.

use std::time::Duration;

/// What went wrong. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The provisioning service (service or device API) answered with a DPS error body.
    #[error("{message} (DPS error {error_code}, HTTP {status})")]
    Service {
        status: u16,
        /// DPS `errorCode`, e.g. 404201; 0 when the body had none.
        error_code: u32,
        message: String,
        tracking_id: String,
        /// `retry-after` seconds, when the service sent one (429, 503).
        retry_after: Option<Duration>,
    },
    /// The IoT hub answered with an error (`iothub-errorcode` / `Message: ErrorCode:...`).
    #[error("{message} (hub error {error_code}, HTTP {status})")]
    Hub {
        status: u16,
        /// e.g. `DeviceNotFound`.
        error_code: String,
        message: String,
    },
    /// The request never got an answer (connect, TLS, timeout, reset).
    #[error("could not reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that is not what the API defines (e.g. not JSON).
    #[error("unexpected answer from {what} (HTTP {status}): {detail}")]
    UnexpectedResponse {
        what: String,
        status: u16,
        detail: String,
    },
    /// MQTT transport failure (connect refused, closed, timeout, protocol error).
    #[error("MQTT: {0}")]
    Mqtt(String),
    /// A server-sent event stream broke off (connection reset, no keep-alive in time).
    #[error("event stream from {url}: {detail}")]
    Stream { url: String, detail: String },
    /// The registration did not finish within the client's polling budget.
    #[error("registration of '{registration_id}' still {status} after {polls} polls")]
    StillAssigning {
        registration_id: String,
        status: String,
        polls: u32,
    },
    /// Bad input given to the client: connection string, key, id, file.
    #[error("{0}")]
    InvalidInput(String),
    /// TLS configuration (CA file unreadable or not PEM).
    #[error("TLS: {0}")]
    Tls(String),
    /// The TPM refused a command, or its answer is unusable (feature `tpm`).
    #[error("TPM: {0}")]
    Tpm(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// HTTP status of a service or hub error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Service { status, .. }
            | Error::Hub { status, .. }
            | Error::UnexpectedResponse { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The DPS `errorCode`, for service errors.
    pub fn error_code(&self) -> Option<u32> {
        match self {
            Error::Service { error_code, .. } => Some(*error_code),
            _ => None,
        }
    }

    /// True for a 404 from either the service or a hub.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Worth retrying: throttled, unavailable, a server error or a transport failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Mqtt(_) | Error::Stream { .. } => true,
            Error::Service { status, .. } | Error::Hub { status, .. } => {
                *status == 429 || *status >= 500
            }
            _ => false,
        }
    }

    /// `retry-after` the service asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Service { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
