//! The DPS error body (`ProvisioningServiceErrorDetails`) and Muster's error codes.
//!
//! Codes follow the DPS convention `HTTP status × 1000 + detail`; the ones DPS itself is known
//! to send (400004, 401000, 404201, 404202, 409201, 409202, 4002xx) keep their meaning, and the
//! rest are Muster's, one per check so a client can tell which one failed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error_code: u32,
    pub tracking_id: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Map<String, Value>>,
    pub timestamp_utc: String,
}

/// Every error code Muster sends. `status()` is the HTTP status it travels with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// The body is not valid JSON or does not match the model.
    MalformedBody = 400001,
    InvalidRegistrationId = 400002,
    InvalidEnrollmentGroupId = 400003,
    /// DPS: "Enrollment allocationPolicy must be specified when iotHubs are specified."
    AllocationPolicyRequired = 400004,
    InvalidAttestation = 400005,
    InvalidSymmetricKey = 400006,
    InvalidCertificate = 400007,
    /// The id in the body differs from the id in the path.
    IdMismatch = 400008,
    InvalidApiVersion = 400009,
    InvalidQuery = 400010,
    InvalidBulkOperation = 400011,
    InvalidCustomAllocation = 400012,
    InvalidContinuationToken = 400013,
    InvalidPageSize = 400014,
    InvalidField = 400015,
    InvalidIotHubs = 400016,
    /// A CA certificate's proof of possession failed (wrong code, not signed by the CA, no code).
    ProofOfPossessionFailed = 400017,
    /// The `csr` is not base64 DER of a PKCS #10 request, or has no subject CN.
    CsrMalformed = 400018,
    /// The CSR's subject CN is not the registration id.
    CsrNameMismatch = 400019,
    /// The CSR's signature does not verify with the key it carries (no proof of possession).
    CsrSignatureInvalid = 400020,
    /// The CSR's key is too weak or of a type the enrollment does not allow (RSA below 2048
    /// bits, curves other than P-256/P-384, ...).
    CsrKeyRejected = 400021,
    /// The device sent a CSR, but its enrollment (or group) does not issue certificates.
    CsrNotEnabled = 400022,
    /// A `csr` on an operation status lookup (only the register request may carry one).
    CsrOnStatusLookup = 400023,
    /// A `csr` with an api-version older than `2025-07-01-preview`.
    CsrApiVersionUnsupported = 400024,
    CustomAllocationFailed = 400207,
    CustomAllocationIotHubNotSpecified = 400208,
    CustomAllocationUnauthorizedAccess = 400209,
    /// No linked hub is eligible for this device.
    NoHubAvailable = 400210,
    /// The enrollment (or the webhook) names a hub that is not linked.
    HubNotLinked = 400211,
    /// No or unreadable credentials, wrong signature, unknown policy.
    Unauthorized = 401000,
    /// DPS: "CA certificate not found." The device's chain leads to no certificate an
    /// enrollment group trusts.
    UnknownCa = 401002,
    /// The token's `se` lies in the past.
    TokenExpired = 401003,
    /// The device presented an ID scope this service does not have.
    UnknownIdScope = 401004,
    /// No enrollment accepts this device's credentials.
    DeviceNotAttested = 401005,
    /// The device sent a chain that stops below the enrollment's certificate (an intermediate
    /// is missing).
    CertificateChainIncomplete = 401006,
    /// The leaf certificate's CN is not the registration id the device connected as.
    CertificateNameMismatch = 401007,
    /// A certificate of the chain is expired or not yet valid.
    CertificateExpired = 401008,
    /// The leaf is not the enrollment's primary or secondary client certificate.
    CertificateThumbprintMismatch = 401009,
    /// A signature in the chain does not verify with its issuer's key.
    CertificateSignatureInvalid = 401010,
    /// The chain leads to a CA certificate that has not been verified (proof of possession).
    CaNotVerified = 401011,
    /// The chain breaks another rule: basic constraints, key usage, unsupported algorithm, ...
    CertificateInvalid = 401012,
    /// TPM: the endorsement key the device sent is unreadable, or not the one its enrollment
    /// holds.
    TpmEndorsementKeyMismatch = 401013,
    /// TPM: a token arrived but no activation key issued to this device is current (never
    /// asked for, or expired): register without a token first.
    TpmChallengeMissing = 401014,
    /// TPM: the token is not signed with the key issued in the device's challenge.
    TpmSignatureMismatch = 401015,
    /// The device's X.509 certificate is one Muster issued and an operator revoked.
    CertificateRevoked = 401016,
    /// The policy is valid but lacks the right the operation needs.
    InsufficientRights = 403001,
    NotFound = 404000,
    EnrollmentNotFound = 404201,
    EnrollmentGroupNotFound = 404202,
    RegistrationNotFound = 404203,
    /// A status poll names an operation this device does not have.
    OperationNotFound = 404204,
    LinkedHubNotFound = 404205,
    CaCertificateNotFound = 404206,
    /// No issued certificate has this serial number.
    IssuedCertificateNotFound = 404207,
    MethodNotAllowed = 405000,
    EnrollmentExists = 409201,
    EnrollmentGroupExists = 409202,
    PreconditionFailed = 412001,
    PayloadTooLarge = 413001,
    UnsupportedMediaType = 415001,
    Throttled = 429001,
    Internal = 500001,
    /// Writing the device into its hub failed.
    HubWriteFailed = 500002,
    Unavailable = 503001,
    /// The store cannot serve the request now (full disk, locked or read-only database, I/O
    /// error); retry after the `retry-after` the answer carries.
    StoreUnavailable = 503002,
    /// The device's IoT hub answered 503 (it may be the built-in hub with its store
    /// unavailable); retry after the `retry-after` the answer carries.
    HubUnavailable = 503003,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    pub fn status(self) -> u16 {
        (self.code() / 1000) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_code() {
        assert_eq!(ErrorCode::EnrollmentNotFound.status(), 404);
        assert_eq!(ErrorCode::PreconditionFailed.status(), 412);
        assert_eq!(ErrorCode::InsufficientRights.status(), 403);
        assert_eq!(ErrorCode::Unauthorized.code(), 401000);
    }
}
