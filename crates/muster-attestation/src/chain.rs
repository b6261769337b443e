//! Certificate path verification for device X.509 attestation and CA proof of possession.
//!
//! * [`verify_path`] — leaf → the intermediates the device sent → one trusted certificate (an
//!   enrollment group's signing certificate or a verified CA). `rustls-webpki` (ring) checks
//!   every signature on the path, basic constraints (issuers are CAs, the leaf is not, path
//!   length), the client-auth extended key usage when the leaf has one, and validity; Muster adds
//!   what webpki does not judge: the trusted certificate's own validity and CA flag, and
//!   `keyUsage` (issuers need `keyCertSign`, a leaf `digitalSignature` when the extension is
//!   present). Validity is checked first, certificate by certificate, so the error names the
//!   certificate that is expired.
//! * [`verify_signed_by`] — one certificate's signature checked with another's public key (the
//!   verification certificate of a CA's proof of possession).
//!
//! Errors are [`ChainError`]: one variant per check, so callers map each to its own code.

use pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;

use crate::x509::{dotnet_name, format_time};

/// Why a certificate path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("certificate '{subject}' expired at {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("certificate '{subject}' is not valid before {not_before}")]
    NotYetValid { subject: String, not_before: String },
    #[error("the signature of certificate '{subject}' does not verify with its issuer's key")]
    SignatureInvalid { subject: String },
    /// No path from the leaf reaches the trusted certificate through what was sent.
    #[error(
        "certificate '{subject}' is not issued by '{anchor}' or by a certificate sent with it"
    )]
    UnknownIssuer { subject: String, anchor: String },
    #[error("certificate '{subject}' issues certificates but is not a CA (basic constraints)")]
    NotCa { subject: String },
    #[error("certificate '{subject}' may not be used for this: {reason}")]
    KeyUsage { subject: String, reason: String },
    #[error("the chain uses a signature algorithm Muster does not support ({0})")]
    UnsupportedAlgorithm(String),
    #[error("the certificate chain is invalid: {0}")]
    Invalid(String),
}

/// Signature algorithms accepted in device chains (those rustls/webpki support with ring).
pub static SUPPORTED_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_3072_8192_SHA384,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

fn parsed(der: &[u8]) -> Result<X509Certificate<'_>, ChainError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| ChainError::Invalid(format!("a certificate does not parse: {e}")))
}

/// The certificate's validity period contains `now_unix`.
pub fn check_validity(der: &[u8], now_unix: i64) -> Result<(), ChainError> {
    let cert = parsed(der)?;
    let v = cert.validity();
    let subject = || dotnet_name(cert.subject());
    let fmt = |t: x509_parser::time::ASN1Time| {
        chrono::DateTime::<chrono::Utc>::from_timestamp(t.timestamp(), 0)
            .map(format_time)
            .unwrap_or_else(|| t.to_string())
    };
    if now_unix < v.not_before.timestamp() {
        return Err(ChainError::NotYetValid {
            subject: subject(),
            not_before: fmt(v.not_before),
        });
    }
    if now_unix > v.not_after.timestamp() {
        return Err(ChainError::Expired {
            subject: subject(),
            not_after: fmt(v.not_after),
        });
    }
    Ok(())
}

/// `keyUsage`, when present, allows what the certificate does on the path.
fn check_key_usage(der: &[u8], issuer: bool) -> Result<(), ChainError> {
    let cert = parsed(der)?;
    let ku = cert.key_usage().map_err(|e| ChainError::KeyUsage {
        subject: dotnet_name(cert.subject()),
        reason: format!("unreadable keyUsage extension: {e}"),
    })?;
    let Some(ku) = ku else { return Ok(()) };
    let (ok, needed) = if issuer {
        (ku.value.key_cert_sign(), "keyCertSign")
    } else {
        (ku.value.digital_signature(), "digitalSignature")
    };
    if ok {
        Ok(())
    } else {
        Err(ChainError::KeyUsage {
            subject: dotnet_name(cert.subject()),
            reason: format!("its keyUsage lacks {needed}"),
        })
    }
}

/// Verifies the path `leaf` → `intermediates` (in the order sent, each issuing the one before)
/// → `anchor` at `now_unix`. `anchor` is trusted as given; it must still be a valid CA.
pub fn verify_path(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchor: &[u8],
    now_unix: i64,
) -> Result<(), ChainError> {
    // Validity first, so the message names the certificate.
    check_validity(leaf, now_unix)?;
    for i in intermediates {
        check_validity(i, now_unix)?;
    }
    check_validity(anchor, now_unix)?;
    let anchor_cert = parsed(anchor)?;
    if !anchor_cert.is_ca() {
        return Err(ChainError::NotCa {
            subject: dotnet_name(anchor_cert.subject()),
        });
    }
    check_key_usage(leaf, false)?;
    for der in intermediates.iter().map(Vec::as_slice).chain([anchor]) {
        check_key_usage(der, true)?;
    }

    let anchor_der = CertificateDer::from(anchor);
    let trust = webpki::anchor_from_trusted_cert(&anchor_der)
        .map_err(|e| ChainError::Invalid(format!("the trusted certificate is unusable: {e}")))?;
    let leaf_der = CertificateDer::from(leaf);
    let ee = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| ChainError::Invalid(format!("the device certificate is unusable: {e}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_unix.max(0) as u64));
    let anchors = [trust];
    ee.verify_for_usage(
        SUPPORTED_ALGORITHMS,
        &anchors,
        &inter,
        time,
        KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| map_error(e, leaf, intermediates, anchor))
}

/// Which certificate of the path webpki's error is about, as well as can be told.
fn map_error(
    e: webpki::Error,
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchor: &[u8],
) -> ChainError {
    let name_of = |der: &[u8]| {
        parsed(der)
            .map(|c| dotnet_name(c.subject()))
            .unwrap_or_default()
    };
    let leaf_name = name_of(leaf);
    // The certificate whose issuer is the last link: the top of what was sent.
    let top = intermediates.last().map(Vec::as_slice).unwrap_or(leaf);
    use webpki::Error as E;
    match e {
        E::InvalidSignatureForPublicKey => ChainError::SignatureInvalid {
            subject: signature_subject(leaf, intermediates, anchor).unwrap_or(leaf_name),
        },
        E::UnknownIssuer => ChainError::UnknownIssuer {
            subject: name_of(top),
            anchor: name_of(anchor),
        },
        E::CertExpired { .. } => ChainError::Expired {
            subject: leaf_name,
            not_after: String::from("(see the certificate)"),
        },
        E::CertNotValidYet { .. } => ChainError::NotYetValid {
            subject: leaf_name,
            not_before: String::from("(see the certificate)"),
        },
        E::EndEntityUsedAsCa => ChainError::NotCa {
            subject: intermediates
                .iter()
                .find(|d| parsed(d).is_ok_and(|c| !c.is_ca()))
                .map(|d| name_of(d))
                .unwrap_or_default(),
        },
        E::CaUsedAsEndEntity => ChainError::KeyUsage {
            subject: leaf_name,
            reason: "a CA certificate cannot be a device certificate".into(),
        },
        E::RequiredEkuNotFoundContext(_) => ChainError::KeyUsage {
            subject: leaf_name,
            reason: "its extendedKeyUsage lacks clientAuth".into(),
        },
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => ChainError::UnsupportedAlgorithm(format!("{e:?}")),
        other => ChainError::Invalid(format!("{other:?}")),
    }
}

/// The first certificate on the path whose signature fails with the next one's key.
fn signature_subject(leaf: &[u8], intermediates: &[Vec<u8>], anchor: &[u8]) -> Option<String> {
    let mut path: Vec<&[u8]> = vec![leaf];
    path.extend(intermediates.iter().map(Vec::as_slice));
    path.push(anchor);
    path.windows(2)
        .find(|w| verify_signed_by(w[0], w[1]).is_err())
        .and_then(|w| parsed(w[0]).ok().map(|c| dotnet_name(c.subject())))
}

/// `cert` names `issuer`'s subject as its issuer (raw DER comparison). `issued_by_name(c, c)`
/// tells whether `c` is self-issued (a root, or a self-signed leaf).
pub fn issued_by_name(cert: &[u8], issuer: &[u8]) -> bool {
    match (parsed(cert), parsed(issuer)) {
        (Ok(c), Ok(i)) => c.issuer().as_raw() == i.subject().as_raw(),
        _ => false,
    }
}

/// `cert` is signed with the key of `issuer` (any supported algorithm), and names `issuer` as
/// its issuer. Nothing else is checked (no validity, no constraints).
pub fn verify_signed_by(cert: &[u8], issuer: &[u8]) -> Result<(), ChainError> {
    let c = parsed(cert)?;
    let i = parsed(issuer)?;
    if c.issuer().as_raw() != i.subject().as_raw() {
        return Err(ChainError::UnknownIssuer {
            subject: dotnet_name(c.subject()),
            anchor: dotnet_name(i.subject()),
        });
    }
    let issuer_der = CertificateDer::from(issuer);
    let key = EndEntityCert::try_from(&issuer_der)
        .map_err(|e| ChainError::Invalid(format!("the issuing certificate is unusable: {e}")))?;
    let tbs = c.tbs_certificate.as_ref();
    let sig = c.signature_value.data.as_ref();
    if SUPPORTED_ALGORITHMS
        .iter()
        .any(|alg| key.verify_signature(*alg, tbs, sig).is_ok())
    {
        Ok(())
    } else {
        Err(ChainError::SignatureInvalid {
            subject: dotnet_name(c.subject()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    };

    struct Issued {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    impl Issued {
        fn der(&self) -> Vec<u8> {
            self.cert.der().to_vec()
        }
    }

    fn params(cn: &str, ca: bool) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2040, 1, 1);
        p
    }

    fn root(cn: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params(cn, true).self_signed(&key).unwrap();
        Issued { cert, key }
    }

    fn issue(p: CertificateParams, by: &Issued) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &by.cert, &by.key).unwrap();
        Issued { cert, key }
    }

    const NOW: i64 = 1_800_000_000; // 2027

    #[test]
    fn root_intermediate_leaf() {
        let r = root("root");
        let i = issue(params("inter", true), &r);
        let l = issue(params("dev", false), &i);
        verify_path(&l.der(), &[i.der()], &r.der(), NOW).unwrap();
        // The intermediate as the trusted certificate.
        verify_path(&l.der(), &[], &i.der(), NOW).unwrap();
        // Missing intermediate.
        let e = verify_path(&l.der(), &[], &r.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::UnknownIssuer { .. }), "{e:?}");
        verify_signed_by(&i.der(), &r.der()).unwrap();
        verify_signed_by(&l.der(), &i.der()).unwrap();
    }

    #[test]
    fn same_name_other_key_is_a_bad_signature() {
        let r = root("root");
        let impostor = root("root");
        let l = issue(params("dev", false), &r);
        let e = verify_path(&l.der(), &[], &impostor.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::SignatureInvalid { .. }), "{e:?}");
        let e = verify_signed_by(&l.der(), &impostor.der()).unwrap_err();
        assert!(matches!(e, ChainError::SignatureInvalid { .. }), "{e:?}");
    }

    #[test]
    fn validity_names_the_certificate() {
        let r = root("root");
        let mut p = params("old", false);
        p.not_after = date_time_ymd(2021, 1, 1);
        let l = issue(p, &r);
        match verify_path(&l.der(), &[], &r.der(), NOW).unwrap_err() {
            ChainError::Expired { subject, not_after } => {
                assert_eq!(subject, "CN=old");
                assert_eq!(not_after, "2021-01-01T00:00:00Z");
            }
            e => panic!("{e:?}"),
        }
        let mut p = params("future", false);
        p.not_before = date_time_ymd(2030, 1, 1);
        let l = issue(p, &r);
        let e = verify_path(&l.der(), &[], &r.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::NotYetValid { .. }), "{e:?}");
    }

    #[test]
    fn constraints() {
        let r = root("root");
        // An intermediate that is not a CA.
        let i = issue(params("not-ca", false), &r);
        let l = issue(params("dev", false), &i);
        let e = verify_path(&l.der(), &[i.der()], &r.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::NotCa { .. }), "{e:?}");
        // A trusted certificate that is not a CA.
        let e = verify_path(&l.der(), &[], &i.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::NotCa { .. }), "{e:?}");
        // A CA without keyCertSign.
        let mut p = params("ku", true);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let i = issue(p, &r);
        let l = issue(params("dev", false), &i);
        let e = verify_path(&l.der(), &[i.der()], &r.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::KeyUsage { .. }), "{e:?}");
        // A leaf for servers only.
        let mut p = params("srv", false);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let l = issue(p, &r);
        let e = verify_path(&l.der(), &[], &r.der(), NOW).unwrap_err();
        assert!(matches!(e, ChainError::KeyUsage { .. }), "{e:?}");
    }
}
