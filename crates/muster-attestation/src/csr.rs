//! Certificate signing requests (PKCS #10) sent with a registration (device-protocol.md §9.2):
//! decoding, and the checks before anything is issued.
//!
//! [`check_csr`] takes the `csr` field (base64 DER, no PEM armour) and refuses, each with its
//! own [`CsrError`]: text that is not a CSR or has no subject CN; a CN other than the
//! registration id (compared case-insensitively, as registration ids are); a signature that
//! does not verify with the CSR's own key (the device does not hold the key it asks a
//! certificate for); and a key that is weak or of an unsupported type (RSA below 2048 bits,
//! elliptic curves other than P-256 and P-384, DSA, ...). Signatures are verified with webpki's
//! algorithms (ring), the same ones that check device chains.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::CsrKeyType;
use pki_types::{SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer};
use webpki::RawPublicKeyEntity;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Largest CSR accepted (base64 text): an RSA-8192 request is about 1.5 KB of DER.
pub const MAX_CSR_BASE64_BYTES: usize = 16 * 1024;

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a CSR was refused. Messages name the failed check and quote nothing secret (a CSR holds
/// only public data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the csr is not valid: {0}")]
    Malformed(String),
    #[error("the csr's subject CN '{cn}' is not the registration id '{registration_id}'")]
    NameMismatch { cn: String, registration_id: String },
    #[error("the csr's signature does not verify with the public key it carries")]
    SignatureInvalid,
    #[error("the csr's key is refused: {0}")]
    WeakKey(String),
}

/// A CSR that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    /// The whole request, DER.
    pub der: Vec<u8>,
    /// The requested key's SubjectPublicKeyInfo, DER.
    pub public_key_info: Vec<u8>,
    pub key_type: CsrKeyType,
    /// The subject CN as the device wrote it.
    pub common_name: String,
}

/// Decodes and checks the `csr` of a registration of `registration_id`.
pub fn check_csr(base64_der: &str, registration_id: &str) -> Result<CheckedCsr, CsrError> {
    if base64_der.len() > MAX_CSR_BASE64_BYTES {
        return Err(CsrError::Malformed(format!(
            "it is longer than {MAX_CSR_BASE64_BYTES} characters"
        )));
    }
    let text = base64_der.trim();
    if text.starts_with("-----") {
        return Err(CsrError::Malformed(
            "it must be base64 DER without PEM headers and footers".into(),
        ));
    }
    let der = B64
        .decode(text)
        .map_err(|e| CsrError::Malformed(format!("it is not base64: {e}")))?;
    let (rest, csr) = X509CertificationRequest::from_der(&der)
        .map_err(|e| CsrError::Malformed(format!("it is not a DER PKCS #10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "it has bytes after the PKCS #10 request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| CsrError::Malformed("its subject has no UTF-8 common name (CN)".into()))?;
    if !common_name.eq_ignore_ascii_case(registration_id) {
        return Err(CsrError::NameMismatch {
            cn: common_name,
            registration_id: registration_id.to_owned(),
        });
    }
    let spki = &info.subject_pki;
    let key_type = key_type(spki)?;
    let algorithm = signature_algorithm(&csr.signature_algorithm.algorithm, key_type)?;
    let spki_der = SubjectPublicKeyInfoDer::from(spki.raw);
    let key = RawPublicKeyEntity::try_from(&spki_der)
        .map_err(|e| CsrError::WeakKey(format!("the public key does not parse ({e:?})")))?;
    key.verify_signature(algorithm, info.raw, &csr.signature_value.data)
        .map_err(|_| CsrError::SignatureInvalid)?;
    Ok(CheckedCsr {
        public_key_info: spki.raw.to_vec(),
        der,
        key_type,
        common_name,
    })
}

/// The requested key's type; weak and unsupported keys are refused here.
fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<CsrKeyType, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::WeakKey("the RSA key does not parse".into())),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakKey(format!(
                "RSA keys need at least {MIN_RSA_BITS} bits, this one has {bits}"
            )));
        }
        return Ok(CsrKeyType::Rsa);
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(CsrKeyType::EcP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(CsrKeyType::EcP384),
            Some(c) => Err(CsrError::WeakKey(format!(
                "the elliptic curve {c} is not supported (P-256 or P-384)"
            ))),
            None => Err(CsrError::WeakKey(
                "the EC key names no curve (P-256 or P-384 required)".into(),
            )),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok(CsrKeyType::Ed25519);
    }
    Err(CsrError::WeakKey(format!(
        "the key algorithm {alg} is not supported (RSA ≥ {MIN_RSA_BITS} bits, ECDSA P-256/P-384, Ed25519)"
    )))
}

/// The webpki algorithm for the CSR's signature OID and key type.
fn signature_algorithm(
    oid: &Oid<'_>,
    key: CsrKeyType,
) -> Result<&'static dyn SignatureVerificationAlgorithm, CsrError> {
    use webpki::ring as alg;
    let found: Option<&'static dyn SignatureVerificationAlgorithm> = match key {
        CsrKeyType::Rsa if *oid == OID_PKCS1_SHA256WITHRSA => Some(alg::RSA_PKCS1_2048_8192_SHA256),
        CsrKeyType::Rsa if *oid == OID_PKCS1_SHA384WITHRSA => Some(alg::RSA_PKCS1_2048_8192_SHA384),
        CsrKeyType::Rsa if *oid == OID_PKCS1_SHA512WITHRSA => Some(alg::RSA_PKCS1_2048_8192_SHA512),
        CsrKeyType::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA256 => Some(alg::ECDSA_P256_SHA256),
        CsrKeyType::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA384 => Some(alg::ECDSA_P256_SHA384),
        CsrKeyType::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA256 => Some(alg::ECDSA_P384_SHA256),
        CsrKeyType::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA384 => Some(alg::ECDSA_P384_SHA384),
        CsrKeyType::Ed25519 if *oid == OID_SIG_ED25519 => Some(alg::ED25519),
        _ => None,
    };
    found.ok_or_else(|| {
        CsrError::WeakKey(format!(
            "the signature algorithm {oid} is not supported for a {key} key"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn csr_for(cn: &str, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(key).unwrap();
        B64.encode(csr.der())
    }

    #[test]
    fn a_good_csr_passes_with_its_key() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let checked = check_csr(&csr_for("Dev-1", &key), "dev-1").unwrap();
        assert_eq!(checked.key_type, CsrKeyType::EcP256);
        assert_eq!(checked.public_key_info, key.public_key_der());
        assert_eq!(checked.common_name, "Dev-1");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            check_csr(&csr_for("d", &key), "d").unwrap().key_type,
            CsrKeyType::EcP384
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            check_csr(&csr_for("d", &key), "d").unwrap().key_type,
            CsrKeyType::Ed25519
        );
    }

    #[test]
    fn each_check_has_its_error() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let good = csr_for("dev-1", &key);
        assert!(matches!(
            check_csr(&good, "dev-2"),
            Err(CsrError::NameMismatch { .. })
        ));
        assert!(matches!(
            check_csr("not base64!", "dev-1"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            check_csr(&B64.encode(b"hello"), "dev-1"),
            Err(CsrError::Malformed(_))
        ));
        let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{good}\n");
        assert!(matches!(
            check_csr(&pem, "dev-1"),
            Err(CsrError::Malformed(_))
        ));
        // One flipped bit in the signature (the last byte of the DER).
        let mut der = B64.decode(&good).unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert_eq!(
            check_csr(&B64.encode(&der), "dev-1"),
            Err(CsrError::SignatureInvalid)
        );
    }

    #[test]
    fn no_cn_is_malformed() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "acme");
        let csr = B64.encode(params.serialize_request(&key).unwrap().der());
        let err = check_csr(&csr, "dev-1").unwrap_err();
        assert!(err.to_string().contains("common name"), "{err}");
    }
}
