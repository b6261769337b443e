//! Certificate issuance at registration (device-protocol.md §9.2): the device's checked CSR in,
//! an X.509 client certificate chain out.
//!
//! The [`IssuingCa`] is an intermediate CA (Muster's own, created under its local CA by the
//! server, or one the operator supplies) with the chain up to its root. [`IssuingCa::issue`]
//! signs the CSR's public key (never anything else the CSR asks for: extensions and SANs are
//! ignored) into a leaf with subject CN = the registration id, `digitalSignature` key usage,
//! the `clientAuth` extended key usage and no CA rights, valid from the injected clock's now
//! (less [`BACKDATE_SECS`] for clock skew) for the enrollment's `validityDays`, with a serial
//! of 16 bytes from the injected entropy. The answer is the chain the device gets in
//! `issuedCertificateChain` (leaf first, ending with the root) and what the registration
//! record keeps of it ([`IssuedCertificateInfo`]).
//!
//! [`policy`] reads an enrollment's `certificateIssuance` settings; [`IssuanceError`] is
//! mapped to the device's error code in the engine.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use muster_attestation::{Certificate, CheckedCsr};
use muster_proto::runtime::Entropy;
use muster_proto::{CertificateIssuance, IssuedCertificateInfo, Timestamp};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};

/// Issued certificates start this long before the clock's now, for devices whose clocks lag.
pub const BACKDATE_SECS: u64 = 5 * 60;

/// Why issuing failed (the CA, not the device, is at fault).
#[derive(Debug, thiserror::Error)]
pub enum IssuanceError {
    #[error("the issuing CA is not usable: {0}")]
    Ca(String),
    #[error("signing the certificate failed: {0}")]
    Sign(String),
}

/// The CA that signs device certificates, with the chain above it.
pub struct IssuingCa {
    key: KeyPair,
    /// rcgen's view of the CA certificate (same subject, key and key identifier).
    issuer: rcgen::Certificate,
    /// The CA certificate first, then its issuers up to the root, DER.
    chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for IssuingCa {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl IssuingCa {
    /// The CA from its certificate chain (the issuing certificate first, then up to the
    /// root) and its private key (PKCS #8 PEM). The key must be the first certificate's and
    /// that certificate a CA.
    pub fn new(chain: Vec<Vec<u8>>, key_pem: &str) -> Result<Self, IssuanceError> {
        let ca_der = chain
            .first()
            .ok_or_else(|| IssuanceError::Ca("the chain is empty".into()))?;
        let ca =
            Certificate::from_der(ca_der.clone()).map_err(|e| IssuanceError::Ca(e.to_string()))?;
        if !ca.is_ca() {
            return Err(IssuanceError::Ca(format!(
                "'{}' is not a CA certificate",
                ca.subject_name()
            )));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| IssuanceError::Ca(format!("the key does not parse: {e}")))?;
        let spki = muster_attestation::signature::subject_public_key_info(ca_der)
            .map_err(|e| IssuanceError::Ca(e.to_string()))?;
        if spki != key.public_key_der().as_slice() {
            return Err(IssuanceError::Ca(
                "the key does not belong to the issuing certificate".into(),
            ));
        }
        let params = CertificateParams::from_ca_cert_der(&ca_der.clone().into())
            .map_err(|e| IssuanceError::Ca(e.to_string()))?;
        // Re-signing only builds rcgen's issuer view; the chain keeps the real certificate.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| IssuanceError::Ca(e.to_string()))?;
        Ok(Self { key, issuer, chain })
    }

    /// The CA certificate and its issuers, DER, the CA first.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// Signs `csr`'s key into a client certificate for `registration_id`.
    pub fn issue(
        &self,
        csr: &CheckedCsr,
        validity_days: u32,
        now: Timestamp,
        entropy: &dyn Entropy,
    ) -> Result<Issued, IssuanceError> {
        let sign = |e: rcgen::Error| IssuanceError::Sign(e.to_string());
        let public_key = SubjectPublicKeyInfo::from_der(&csr.public_key_info).map_err(sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, csr.common_name.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        entropy.fill(&mut serial);
        serial[0] &= 0x7f; // positive
        serial[0] |= 0x01; // and never shortened by DER's minimal encoding
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now_secs = u64::try_from(now.unix_seconds()).unwrap_or(0);
        let validity = u64::from(validity_days) * 24 * 60 * 60;
        params.not_before =
            epoch + std::time::Duration::from_secs(now_secs.saturating_sub(BACKDATE_SECS));
        params.not_after = epoch + std::time::Duration::from_secs(now_secs + validity);
        let cert = params
            .signed_by(&public_key, &self.issuer, &self.key)
            .map_err(sign)?;
        let leaf = Certificate::from_der(cert.der().to_vec())
            .map_err(|e| IssuanceError::Sign(e.to_string()))?;
        let info = leaf
            .info()
            .map_err(|e| IssuanceError::Sign(e.to_string()))?;
        let record = IssuedCertificateInfo {
            serial_number: info.serial_number,
            sha256_thumbprint: leaf.sha256_thumbprint(),
            subject_name: leaf.subject_name().to_owned(),
            issuer_name: leaf.issuer_name().to_owned(),
            not_before_utc: Timestamp(leaf.not_before()),
            not_after_utc: Timestamp(leaf.not_after()),
        };
        let chain = std::iter::once(leaf.der())
            .chain(self.chain.iter().map(Vec::as_slice))
            .map(|d| B64.encode(d))
            .collect();
        Ok(Issued {
            chain,
            info: record,
        })
    }
}

/// A certificate issued for a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Base64 DER, leaf first, ending with the root (`issuedCertificateChain`).
    pub chain: Vec<String>,
    pub info: IssuedCertificateInfo,
}

/// The enrollment's issuance settings when they accept CSRs.
pub fn policy(settings: Option<&CertificateIssuance>) -> Option<&CertificateIssuance> {
    settings.filter(|s| s.enabled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::runtime::SeededEntropy;
    use rcgen::BasicConstraints;

    fn ca() -> IssuingCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Test Issuing CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        IssuingCa::new(vec![cert.der().to_vec()], &key.serialize_pem()).unwrap()
    }

    fn csr(cn: &str) -> CheckedCsr {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let der = params.serialize_request(&key).unwrap();
        muster_attestation::check_csr(&B64.encode(der.der()), cn).unwrap()
    }

    #[test]
    fn issues_a_client_leaf_from_the_clock_and_entropy() {
        let ca = ca();
        let now = Timestamp::from_unix_millis(1_800_000_000_000).unwrap();
        let issued = ca
            .issue(&csr("dev-1"), 30, now, &SeededEntropy::new(7))
            .unwrap();
        assert_eq!(issued.chain.len(), 2);
        let der = B64.decode(&issued.chain[0]).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.validity().not_before.timestamp(),
            1_800_000_000 - BACKDATE_SECS as i64
        );
        assert_eq!(
            cert.validity().not_after.timestamp(),
            1_800_000_000 + 30 * 86_400
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.is_ca());
        assert_eq!(issued.info.subject_name, "CN=dev-1");
        // The same entropy gives the same serial; another seed another one.
        let again = ca
            .issue(&csr("dev-1"), 30, now, &SeededEntropy::new(7))
            .unwrap();
        assert_eq!(again.info.serial_number, issued.info.serial_number);
        let other = ca
            .issue(&csr("dev-1"), 30, now, &SeededEntropy::new(8))
            .unwrap();
        assert_ne!(other.info.serial_number, issued.info.serial_number);
        muster_attestation::verify_signed_by(&der, &B64.decode(&issued.chain[1]).unwrap()).unwrap();
    }
}
