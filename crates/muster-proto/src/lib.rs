//! Wire types shared by every part of Muster: the server, the clients, the CLI and the tests.
//!
//! Everything here is spelled exactly as Azure DPS spells it on the wire (camelCase JSON,
//! the `ProvisioningServiceErrorDetails` error body, SAS tokens), so one definition serves
//! both ends of every connection.
//!
//! Layout:
//! - [`ids`] — [`RegistrationId`], [`EnrollmentGroupId`], [`IdScope`] and their validation.
//! - [`if_match`] — `If-Match` in every client's form.
//! - [`time`] — [`Timestamp`], UTC with the 7 fractional digits DPS emits.
//! - [`attestation`] — `AttestationMechanism` and its symmetric key, X.509 and TPM parts.
//! - [`enrollment`] — `IndividualEnrollment`, `EnrollmentGroup` and their shared settings
//!   (allocation policy, reprovision policy, capabilities, custom allocation, and Muster's
//!   `certificateIssuance`: whether a device's CSR is signed, validity, key types).
//! - [`twin`] — `InitialTwin`.
//! - [`device`] — device-facing register request (with `csr`), operation status and
//!   registration result (with `issuedCertificateChain`).
//! - [`issued_certificate`] — Muster's issued-certificate records (serial, thumbprint,
//!   registration, issuing CA, validity, revocation) and the revoke request.
//! - [`linked_hub`] — linked IoT hubs as the `/linkedHubs` extension shows them.
//! - [`registration`] — `DeviceRegistrationState`, its status enums and the issued
//!   certificate it records.
//! - [`bulk`] and [`query`] — bulk operations, query specification and paging headers.
//! - [`error`] — the DPS error body and Muster's table of error codes.
//! - [`sas`] — shared access signature tokens: parse, sign, verify.
//! - [`connection_string`] — `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`.
//! - [`api_version`] — the api-versions Muster accepts, and the device ones that allow a `csr`.
//! - [`rights`] — shared access policy rights.
//! - [`service_settings`] — service-wide settings (the default allocation policy).
//! - [`audit`] — an audit log entry (Muster's `GET /audit`).
//!
//! - [`runtime`] — the `Clock` and `Entropy` traits that callers pass in.
//! - [`log_limit`] — [`log_limit::LogLimiter`]: one log line per interval, with a count of the
//!   lines held back, for warnings a flood of requests could repeat.
//!
//! This crate performs no I/O; only `runtime::SystemClock` and `runtime::OsEntropy` touch the
//! real clock and random source.

mod str_enum;

pub mod api_version;
pub mod attestation;
pub mod audit;
pub mod bulk;
pub mod connection_string;
pub mod device;
pub mod enrollment;
pub mod error;
pub mod ids;
pub mod if_match;
pub mod issued_certificate;
pub mod linked_hub;
pub mod log_limit;
pub mod query;
pub mod registration;
pub mod rights;
pub mod runtime;
pub mod sas;
pub mod service_settings;
pub mod time;
pub mod twin;

pub use api_version::ApiVersion;
pub use attestation::{
    AttestationMechanism, AttestationType, SymmetricKeyAttestation, TpmAttestation,
    X509Attestation, X509CaReferences, X509CertificateInfo, X509CertificateWithInfo,
    X509Certificates,
};
pub use bulk::{
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, BulkEnrollmentOperationError,
    BulkEnrollmentOperationResult, BulkOperationMode,
};
pub use connection_string::ConnectionString;
pub use enrollment::{
    AllocationPolicy, CertificateIssuance, CsrKeyType, CustomAllocationDefinition,
    DeviceCapabilities, EnrollmentGroup, IndividualEnrollment, ProvisioningStatus,
    ReprovisionPolicy,
};
pub use error::{ErrorBody, ErrorCode};
pub use ids::{EnrollmentGroupId, IdError, IdScope, RegistrationId};
pub use if_match::IfMatch;
pub use issued_certificate::{IssuedCertificate, RevokeRequest};
pub use query::{ItemType, QuerySpecification, UnsupportedQuery};
pub use registration::{
    DeviceRegistrationState, IssuedCertificateInfo, RegistrationStatus, RegistrationSubstatus,
};
pub use rights::{AccessRight, AccessRights};
pub use sas::{SasError, SasToken};
pub use time::Timestamp;
pub use twin::{InitialTwin, InitialTwinProperties};
