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
//!   A device certificate without extensions (X.509 version 1, as `openssl x509 -req` and the
//!   npm `pem` package make them) is accepted as the leaf, as Azure does, though webpki refuses
//!   non-v3 end entities: [`v1_leaf`] checks its signature by its issuer and the issuing
//!   certificates above it. A certificate that issues others must be v3 (a v1 certificate
//!   cannot say it is a CA): [`ChainError::Version1Issuer`].
//! * [`verify_signed_by`] — one certificate's signature checked with another's public key (the
//!   verification certificate of a CA's proof of possession).
//!
//! Errors are [`ChainError`]: one variant per check, so callers map each to its own code.

use pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;

use crate::x509::{dotnet_name, format_time};

mod v1_leaf;

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
    /// A v1 (or v2) certificate where a CA is needed: it has no basicConstraints extension.
    #[error(
        "certificate '{subject}' is an X.509 version {version} certificate, which cannot issue certificates (it has no basicConstraints extension saying it is a CA); issue it again as a version 3 CA certificate with basicConstraints CA:TRUE"
    )]
    Version1Issuer { subject: String, version: u32 },
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

/// The X.509 version as people write it (1, 2 or 3; the DER field holds 0, 1 or 2).
fn version(cert: &X509Certificate<'_>) -> u32 {
    cert.version().0 + 1
}

/// A certificate that issues others on the path is version 3, so it can be a CA.
fn check_issuer_version(der: &[u8]) -> Result<(), ChainError> {
    let cert = parsed(der)?;
    match version(&cert) {
        3 => Ok(()),
        v => Err(ChainError::Version1Issuer {
            subject: dotnet_name(cert.subject()),
            version: v,
        }),
    }
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
    for der in intermediates.iter().map(Vec::as_slice).chain([anchor]) {
        check_issuer_version(der)?;
    }
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
    if version(&parsed(leaf)?) != 3 {
        return v1_leaf::verify(leaf, intermediates, anchor);
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
/// its issuer. Nothing else is checked (no validity, no constraints), except that `issuer` is
/// v3: a v1 certificate cannot be a CA, so a CA's proof of possession fails clearly too.
pub fn verify_signed_by(cert: &[u8], issuer: &[u8]) -> Result<(), ChainError> {
    let c = parsed(cert)?;
    let i = parsed(issuer)?;
    if c.issuer().as_raw() != i.subject().as_raw() {
        return Err(ChainError::UnknownIssuer {
            subject: dotnet_name(c.subject()),
            anchor: dotnet_name(i.subject()),
        });
    }
    check_issuer_version(issuer)?;
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

    /// Certificates made with the openssl CLI the way device makers do: `openssl x509 -req`
    /// without an extension file gives X.509 version 1.
    mod openssl {
        use std::path::Path;
        use std::process::Command;

        pub fn run(dir: &Path, args: &[&str]) {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fn der(dir: &Path, pem_file: &str) -> Vec<u8> {
            let pem = std::fs::read_to_string(dir.join(pem_file)).unwrap();
            crate::decode_certificate(&pem).unwrap()
        }

        /// A v1 certificate for `cn`, signed by the issuer in `ca.pem`/`ca.key` in `dir`, or
        /// self-signed when `issuer` is false. Returns its DER.
        pub fn v1(dir: &Path, name: &str, cn: &str, issuer: bool) -> Vec<u8> {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            run(
                dir,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-subj",
                    &format!("/CN={cn}"),
                    "-out",
                    &csr,
                ],
            );
            let mut args = vec!["x509", "-req", "-in", &csr, "-days", "30", "-out", &pem];
            if issuer {
                args.extend(["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]);
            } else {
                args.extend(["-key", &key]);
            }
            run(dir, &args);
            let der = der(dir, &pem);
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(c.version().0, 0, "{name} is an X.509 version 1 certificate");
            der
        }

        /// Makes `by` the issuer `v1(.., true)` uses.
        pub fn use_issuer(dir: &Path, cert_pem: &str, key_pem: &str) {
            std::fs::write(dir.join("ca.pem"), cert_pem).unwrap();
            std::fs::write(dir.join("ca.key"), key_pem).unwrap();
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_v1_leaf_verifies_under_a_root_or_through_intermediates() {
        let dir = tempfile::tempdir().unwrap();
        let r = root("root");
        let i = issue(params("inter", true), &r);
        openssl::use_issuer(dir.path(), &r.cert.pem(), &r.key.serialize_pem());
        let under_root = openssl::v1(dir.path(), "a", "dev-a", true);
        verify_path(&under_root, &[], &r.der(), now()).unwrap();
        // Another root with the same name did not sign it.
        let impostor = root("root");
        let e = verify_path(&under_root, &[], &impostor.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::SignatureInvalid { .. }), "{e:?}");
        // Outside its validity period.
        let e = verify_path(&under_root, &[], &r.der(), now() + 40 * 86_400).unwrap_err();
        assert!(matches!(e, ChainError::Expired { .. }), "{e:?}");

        openssl::use_issuer(dir.path(), &i.cert.pem(), &i.key.serialize_pem());
        let under_inter = openssl::v1(dir.path(), "b", "dev-b", true);
        verify_path(&under_inter, &[i.der()], &r.der(), now()).unwrap();
        verify_path(&under_inter, &[], &i.der(), now()).unwrap();
        let e = verify_path(&under_inter, &[], &r.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::UnknownIssuer { .. }), "{e:?}");
    }

    #[test]
    fn intermediates_above_a_v1_leaf_are_judged_like_webpki_does() {
        let dir = tempfile::tempdir().unwrap();
        let r = root("root");
        // Not a CA.
        let not_ca = issue(params("not-ca", false), &r);
        openssl::use_issuer(dir.path(), &not_ca.cert.pem(), &not_ca.key.serialize_pem());
        let leaf = openssl::v1(dir.path(), "a", "dev-a", true);
        let e = verify_path(&leaf, &[not_ca.der()], &r.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::NotCa { .. }), "{e:?}");
        // A CA for servers only.
        let mut p = params("server-ca", true);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_ca = issue(p, &r);
        openssl::use_issuer(
            dir.path(),
            &server_ca.cert.pem(),
            &server_ca.key.serialize_pem(),
        );
        let leaf = openssl::v1(dir.path(), "b", "dev-b", true);
        let e = verify_path(&leaf, &[server_ca.der()], &r.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::KeyUsage { .. }), "{e:?}");
        // Path length: a CA that allows no CA below it, above another intermediate.
        let mut p = params("strict", true);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let strict = issue(p, &r);
        let lower = issue(params("lower", true), &strict);
        openssl::use_issuer(dir.path(), &lower.cert.pem(), &lower.key.serialize_pem());
        let leaf = openssl::v1(dir.path(), "c", "dev-c", true);
        let e = verify_path(&leaf, &[lower.der(), strict.der()], &r.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::Invalid(_)), "{e:?}");
        verify_path(&leaf, &[lower.der()], &strict.der(), now()).unwrap();
    }

    #[test]
    fn a_v1_certificate_cannot_issue() {
        let dir = tempfile::tempdir().unwrap();
        // A v1 "CA" made with openssl (ca.pem, ca.key: the issuer of the next certificate), as
        // the trusted certificate and as an intermediate.
        let v1_ca = openssl::v1(dir.path(), "ca", "Version 1 CA", false);
        let leaf = openssl::v1(dir.path(), "a", "dev-a", true);
        match verify_path(&leaf, &[], &v1_ca, now()).unwrap_err() {
            ChainError::Version1Issuer { subject, version } => {
                assert_eq!((subject.as_str(), version), ("CN=Version 1 CA", 1));
            }
            e => panic!("{e:?}"),
        }
        let r = root("root");
        let e = verify_path(&leaf, std::slice::from_ref(&v1_ca), &r.der(), now()).unwrap_err();
        assert!(matches!(e, ChainError::Version1Issuer { .. }), "{e:?}");
        // Nor can it prove possession of its key by signing a verification certificate.
        let e = verify_signed_by(&leaf, &v1_ca).unwrap_err();
        assert!(matches!(e, ChainError::Version1Issuer { .. }), "{e:?}");
        // Whatever the leaf: the issuer's version is judged first.
        let v3_leaf = issue(params("dev-v3", false), &r);
        let e = verify_path(&v3_leaf.der(), &[], &v1_ca, now()).unwrap_err();
        assert!(matches!(e, ChainError::Version1Issuer { .. }), "{e:?}");
    }
}
