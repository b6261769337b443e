//! Attestation for Muster: how enrollments prove identity, independent of transport and storage.
//!
//! Layout:
//! * [`symmetric_key`] — key validation (16–64 bytes of standard base64), generation of 64-byte
//!   keys from caller-supplied randomness, the enrollment-group derived device key
//!   `base64(HMAC-SHA256(base64decode(groupKey), registrationId))`, and [`hmac_sha256`].
//! * [`x509`] — certificate input decoding (PEM, base64 of PEM, base64 DER) to DER, the
//!   service API's computed `info` object ([`X509CertificateInfo`]) with .NET-style names, and
//!   the owned [`Certificate`] helper used by device X.509 attestation.
//! * [`chain`] — certificate path verification (rustls-webpki with ring): leaf → the
//!   intermediates a device sent → a trusted certificate, with validity, basic constraints,
//!   key usage and signatures; and one certificate signed by another (proof of possession).
//! * [`csr`] — PKCS #10 requests sent with a registration (`csr`): decoding, CN = registration
//!   id, the signature made with the requested key, and the key's strength and type.
//! * [`ca`] — CA certificates registered on the service and their proof of possession.
//! * [`signature`] — a signature checked with a certificate's own public key, for any X.509
//!   version (the TLS client's proof that it holds its certificate's key).
//! * [`tpm`] — TPM attestation: EK/SRK `TPM2B_PUBLIC` parsing and comparison, the registration
//!   id derived from an EK, and the activation blob (MakeCredential to the EK + duplication of
//!   an HMAC key to the SRK) that only that TPM can import.
//!
//! Errors are [`KeyError`], [`CertificateError`], [`ChainError`], [`ProofError`],
//! [`SignatureError`], [`CsrError`] and [`TpmError`]; none ever contains secret material.
//!
//! [`X509CertificateInfo`]: muster_proto::attestation::X509CertificateInfo

pub mod ca;
pub mod chain;
pub mod csr;
pub mod signature;
pub mod symmetric_key;
pub mod tpm;
pub mod x509;

pub use ca::{check_proof_of_possession, CaCertificate, ProofError};
pub use chain::{verify_path, verify_signed_by, ChainError};
pub use csr::{check_csr, CheckedCsr, CsrError};
pub use signature::{verify_with_certificate_key, SignatureError};

pub use symmetric_key::{
    decode_key, derive_device_key, generate_key, hmac_sha256, validate_key, KeyError,
    MAX_KEY_BYTES, MIN_KEY_BYTES,
};
pub use tpm::{activation_blob, RsaPublicArea, TpmError};
pub use x509::{
    certificate_info, decode_certificate, dotnet_name, format_time, Certificate, CertificateError,
};
