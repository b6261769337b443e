//! Signatures checked with a certificate's own public key, whatever the certificate's X.509
//! version: how a TLS client proves it holds the private key of the certificate it presents
//! (the handshake's `CertificateVerify`).
//!
//! webpki parses only version 3 certificates, and rustls's `verify_tls12_signature` /
//! `verify_tls13_signature` parse the certificate with webpki, so a device certificate without
//! extensions (version 1: `openssl x509 -req`, the npm `pem` package) fails the handshake with
//! `UnsupportedCertVersion`. The key does not depend on the version: here x509-parser takes the
//! SubjectPublicKeyInfo out of the certificate and webpki's algorithm implementations verify
//! the signature with it (the same code rustls uses for raw public keys). Whether the
//! certificate is *trusted* is decided elsewhere ([`crate::chain`], thumbprints).

use pki_types::{SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer};
use webpki::RawPublicKeyEntity;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("the certificate's public key does not parse: {0}")]
    PublicKey(String),
    #[error("the signature does not verify with the certificate's public key")]
    Invalid,
    /// None of the candidate algorithms fits the key (e.g. an ECDSA scheme for an RSA key).
    #[error("the signature algorithm does not fit the certificate's public key")]
    AlgorithmMismatch,
}

/// The DER SubjectPublicKeyInfo of `cert_der` (any X.509 version).
pub fn subject_public_key_info(cert_der: &[u8]) -> Result<&[u8], SignatureError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| SignatureError::Certificate(e.to_string()))?;
    Ok(cert.tbs_certificate.subject_pki.raw)
}

/// Verifies `signature` over `message` with the public key of `cert_der`, trying `candidates`
/// in order: one whose key type differs from the certificate's is skipped, the first that fits
/// decides (as rustls does for TLS 1.2, where one scheme can map to several algorithms; pass a
/// single algorithm for TLS 1.3).
pub fn verify_with_certificate_key(
    cert_der: &[u8],
    candidates: &[&dyn SignatureVerificationAlgorithm],
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let spki = SubjectPublicKeyInfoDer::from(subject_public_key_info(cert_der)?);
    let key = RawPublicKeyEntity::try_from(&spki)
        .map_err(|e| SignatureError::PublicKey(format!("{e:?}")))?;
    for alg in candidates {
        match key.verify_signature(*alg, message, signature) {
            Ok(()) => return Ok(()),
            Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => continue,
            #[allow(deprecated)]
            Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKey) => continue,
            Err(_) => return Err(SignatureError::Invalid),
        }
    }
    Err(SignatureError::AlgorithmMismatch)
}
