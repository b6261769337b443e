//! CA certificates registered on the service (Muster's `/caCertificates` extension, what DPS
//! keeps in its management plane): the stored record, and the proof of possession that
//! verifies one.
//!
//! Enrollment groups name these certificates in `attestation.x509.caReferences`; only a
//! verified CA attests devices. Verification: the service hands out a random code, the owner
//! of the CA's key issues a certificate whose subject CN is that code, and
//! [`check_proof_of_possession`] checks the CN and the signature.

use muster_proto::attestation::X509CertificateInfo;
use serde::{Deserialize, Serialize};

use crate::chain::{self, ChainError};
use crate::x509::{certificate_info, decode_certificate, Certificate, CertificateError};

/// A CA certificate as stored in `Collection::CaCertificates` (key: [`CaCertificate::key`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    /// The name as first given (names compare case-insensitively).
    pub name: String,
    /// The certificate text as uploaded (PEM, base64 of PEM or base64 DER); never returned.
    pub certificate: String,
    pub info: X509CertificateInfo,
    pub is_verified: bool,
    /// The code the verification certificate's CN must carry; set by `verificationCode`,
    /// cleared once verified. Never shown except when it is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_code: Option<String>,
}

impl CaCertificate {
    /// A new, unverified CA from uploaded text.
    pub fn new(name: &str, certificate: &str) -> Result<Self, CertificateError> {
        let der = decode_certificate(certificate)?;
        Ok(Self {
            name: name.to_string(),
            certificate: certificate.trim().to_string(),
            info: certificate_info(&der)?,
            is_verified: false,
            verification_code: None,
        })
    }

    /// The store key of a CA name.
    pub fn key(name: &str) -> String {
        name.to_ascii_lowercase()
    }

    /// The certificate's DER.
    pub fn der(&self) -> Result<Vec<u8>, CertificateError> {
        decode_certificate(&self.certificate)
    }
}

/// Why a proof of possession was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("no verification code has been issued for this CA certificate; POST .../verificationCode first")]
    NoCode,
    #[error("the verification certificate's CN is '{found}', not the verification code")]
    WrongCode { found: String },
    #[error("the verification certificate is not signed by this CA certificate: {0}")]
    NotSigned(ChainError),
    #[error("the verification certificate is not usable: {0}")]
    Certificate(#[from] CertificateError),
}

/// Checks that `proof` (any accepted input form) has CN = the issued code and is signed by
/// the CA's key.
pub fn check_proof_of_possession(ca: &CaCertificate, proof: &str) -> Result<(), ProofError> {
    let code = ca.verification_code.as_deref().ok_or(ProofError::NoCode)?;
    let proof = Certificate::parse(proof)?;
    let cn = proof.common_name().unwrap_or_default();
    if cn != code {
        return Err(ProofError::WrongCode { found: cn });
    }
    chain::verify_signed_by(proof.der(), &ca.der()?).map_err(ProofError::NotSigned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    fn ca() -> (rcgen::Certificate, KeyPair) {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Fleet CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    }

    fn proof(cn: &str, ca: &rcgen::Certificate, ca_key: &KeyPair) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, ca, ca_key).unwrap().pem()
    }

    #[test]
    fn proof_of_possession() {
        let (cert, key) = ca();
        let mut rec = CaCertificate::new("fleet", &cert.pem()).unwrap();
        assert!(!rec.is_verified);
        assert_eq!(rec.info.subject_name, "CN=Fleet CA");
        assert_eq!(rec.der().unwrap(), cert.der().to_vec());
        assert_eq!(
            check_proof_of_possession(&rec, &proof("ABC", &cert, &key)),
            Err(ProofError::NoCode)
        );
        rec.verification_code = Some("ABC123".into());
        check_proof_of_possession(&rec, &proof("ABC123", &cert, &key)).unwrap();
        assert!(matches!(
            check_proof_of_possession(&rec, &proof("ABC", &cert, &key)),
            Err(ProofError::WrongCode { .. })
        ));
        // Same name, other key.
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Fleet CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_key = KeyPair::generate().unwrap();
        let other = p.self_signed(&other_key).unwrap();
        assert!(matches!(
            check_proof_of_possession(&rec, &proof("ABC123", &other, &other_key)),
            Err(ProofError::NotSigned(_))
        ));
        assert!(matches!(
            check_proof_of_possession(&rec, "garbage"),
            Err(ProofError::Certificate(_))
        ));
    }
}
