//! The path of a device certificate without extensions (X.509 version 1 or 2).
//!
//! Azure accepts such leaves (`openssl x509 -req` without an extension file and the npm `pem`
//! package make them), but webpki parses only v3 certificates, and it cannot verify a path
//! that starts at a CA either (its end entity must not be one). So this module checks what
//! webpki would have checked, link by link, for the certificates above the leaf; everything it
//! cannot judge is refused rather than ignored:
//!
//! * the leaf: signed by the first certificate above it, which it names as its issuer (a v1
//!   certificate has no extensions, so no constraints or key usages to check);
//! * each intermediate (in the order sent, each issuing the one before): a CA by basic
//!   constraints, within the path length it allows, `clientAuth` in its extended key usage
//!   when it has one, no critical extension webpki would not know, and signed by the next
//!   certificate up;
//! * no name constraints anywhere on the path (webpki would apply them; refused here).
//!
//! The caller ([`super::verify_path`]) has already checked every certificate's validity, that
//! every issuer is v3, the trusted certificate's CA flag and every `keyUsage`.

use x509_parser::certificate::X509Certificate;

use super::{parsed, verify_signed_by, ChainError};
use crate::x509::dotnet_name;

/// Extensions webpki understands, by OID (keyUsage, subjectAltName, basicConstraints,
/// nameConstraints, cRLDistributionPoints, extKeyUsage): a critical one outside this list makes
/// webpki refuse the certificate, and so does this module.
const KNOWN_EXTENSIONS: &[&str] = &[
    "2.5.29.15",
    "2.5.29.17",
    "2.5.29.19",
    "2.5.29.30",
    "2.5.29.31",
    "2.5.29.37",
];

fn invalid(cert: &X509Certificate<'_>, reason: &str) -> ChainError {
    ChainError::Invalid(format!(
        "certificate '{}' above an X.509 version 1 device certificate: {reason}",
        dotnet_name(cert.subject())
    ))
}

fn no_name_constraints(cert: &X509Certificate<'_>) -> Result<(), ChainError> {
    match cert.name_constraints() {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(invalid(
            cert,
            "name constraints are not supported on the path of a version 1 device certificate",
        )),
        Err(e) => Err(invalid(cert, &format!("unreadable nameConstraints: {e}"))),
    }
}

/// What webpki checks on an intermediate CA that is `below` CAs above the leaf's issuer.
fn check_intermediate(der: &[u8], below: usize) -> Result<(), ChainError> {
    let cert = parsed(der)?;
    let subject = || dotnet_name(cert.subject());
    if let Some(ext) = cert
        .extensions()
        .iter()
        .find(|e| e.critical && !KNOWN_EXTENSIONS.contains(&e.oid.to_id_string().as_str()))
    {
        return Err(invalid(
            &cert,
            &format!("unsupported critical extension {}", ext.oid.to_id_string()),
        ));
    }
    let constraints = cert
        .basic_constraints()
        .map_err(|e| invalid(&cert, &format!("unreadable basicConstraints: {e}")))?;
    match constraints.map(|c| c.value) {
        Some(c) if c.ca => {
            if let Some(len) = c.path_len_constraint {
                if below > len as usize {
                    return Err(invalid(
                        &cert,
                        &format!("its path length constraint ({len}) is exceeded"),
                    ));
                }
            }
        }
        _ => return Err(ChainError::NotCa { subject: subject() }),
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| invalid(&cert, &format!("unreadable extendedKeyUsage: {e}")))?;
    if eku.is_some_and(|e| !e.value.client_auth) {
        return Err(ChainError::KeyUsage {
            subject: subject(),
            reason: "its extendedKeyUsage lacks clientAuth".into(),
        });
    }
    no_name_constraints(&cert)
}

/// Verifies `leaf` (not v3) → `intermediates` → `anchor`; see the module docs.
pub(super) fn verify(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchor: &[u8],
) -> Result<(), ChainError> {
    let mut path: Vec<&[u8]> = vec![leaf];
    path.extend(intermediates.iter().map(Vec::as_slice));
    path.push(anchor);
    for (below, der) in intermediates.iter().enumerate() {
        check_intermediate(der, below)?;
    }
    no_name_constraints(&parsed(anchor)?)?;
    // Each certificate names the next as its issuer and is signed with its key.
    for link in path.windows(2) {
        verify_signed_by(link[0], link[1])?;
    }
    Ok(())
}
