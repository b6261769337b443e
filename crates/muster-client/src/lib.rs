//! Rust clients for Muster, which speaks the Azure IoT Hub Device Provisioning Service (DPS)
//! protocols, so these clients also work against DPS-compatible services.
//!
//! - [`ServiceClient`] — the DPS service REST API: individual enrollments, enrollment groups,
//!   registration records (get, create or update with ETags, delete, attestation mechanism,
//!   paged queries, bulk) and Muster's `/linkedHubs` extension. Every request is signed with a
//!   fresh SAS token from the connection string's policy.
//!   [`issued`] adds Muster's `/certificates/issued` (list, show, revoke) to it.
//! - [`DeviceClient`] — device registration over HTTPS or MQTT (TLS) with a symmetric key, or
//!   a key derived from an enrollment-group key, or an X.509 certificate (TLS client
//!   authentication; [`DeviceKey::X509`]); polls while `assigning`, honouring
//!   `retry-after`, and retries throttled requests a bounded number of times.
//! - [`HubClient`] — the IoT hub registry and twin REST API (devices, twins), for Muster's
//!   built-in hub or any hub whose `iothubowner`-style connection string you have; and the
//!   built-in hub's telemetry: stored pages and the live Server-Sent Events stream
//!   ([`HubClient::telemetry_stream`]).
//! - [`HubDeviceConnection`] — a device's MQTT connection to a hub, to send telemetry.
//! - `tpm` (cargo feature `tpm`; needs libtss2) — `Tpm`, a device whose keys live in a TPM
//!   2.0 (EK, SRK, activation blobs, HMAC inside the TPM), and
//!   `DeviceClient::register_tpm`, TPM attestation over HTTPS.
//! - [`ConnectionFile`] — `DATA_DIR/connection.json` as `muster serve` writes it.
//! - [`tls`] — building a `reqwest::Client` / rustls config that trusts the system roots and,
//!   when given, a CA PEM file.
//!
//! Errors ([`Error`]) carry the DPS `errorCode` and message (or the hub's error code), never a
//! key.

pub mod connection;
pub mod device;
pub mod error;
pub mod hub;
pub mod hub_device;
pub mod issued;
mod mqtt;
pub mod service;
pub mod telemetry;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;

pub use connection::{ConnectionFile, ConnectionHub, ConnectionTlsCertificate};
pub use device::{DeviceClient, DeviceKey, RegisterOptions, Registration, RetryPolicy, Transport};
pub use error::{Error, Result};
pub use hub::HubClient;
pub use hub_device::HubDeviceConnection;
pub use service::{AuditQuery, EnrollmentKind, Pager, ServiceClient};
pub use telemetry::{TelemetryEvent, TelemetryMessage, TelemetryStream};
#[cfg(feature = "tpm")]
pub use tpm::Tpm;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
