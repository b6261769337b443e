//! X.509 device attestation (device-protocol.md §6, service-api.md §8.3).
//!
//! The device presented a TLS client chain (leaf first, then the intermediates it sent); the
//! TLS layer already checked that it holds the leaf's private key. Here:
//!
//! 1. the leaf's subject CN must be the registration id the device connected as, and the leaf
//!    must be within its validity period;
//! 2. an individual enrollment for that registration id decides first: its `clientCertificates`
//!    primary or secondary must be the leaf (DER compared); disabled → `disabled`. A disabled
//!    individual enrollment of any attestation also blocks the device when a group accepts it;
//! 3. otherwise the chain is walked from the leaf upwards: at each position, the enrollment
//!    groups whose `signingCertificates` (or the CA certificates their `caReferences` name) are
//!    the certificate sent there, or the certificate that issued the last one sent, are tried in
//!    group id order; the path leaf → intermediates → that certificate is verified
//!    ([`muster_attestation::chain::verify_path`]) and the first group it verifies for decides.
//!    A CA reference counts only once the CA is verified (proof of possession).
//!
//! Leaves may be X.509 version 1 (no extensions), as Azure allows; a v1 certificate that
//! issues others (an intermediate, or the group's certificate) is refused with 401012
//! ([`ChainError::Version1Issuer`]).
//!
//! Every refusal names the check that failed, with its own [`ErrorCode`].

use muster_attestation::chain::{self, ChainError};
use muster_attestation::{CaCertificate, Certificate};
use muster_proto::device::X509RegistrationResult;
use muster_proto::{
    AttestationType, EnrollmentGroup, ErrorCode, IndividualEnrollment, RegistrationId,
    X509Certificates,
};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store};

use crate::device_auth::{Attestation, Attested, Matched};
use crate::group_cache::GroupCache;
use crate::hub_client::HubAuthentication;
use crate::DeviceFailure;

fn fail(code: ErrorCode, msg: impl Into<String>) -> DeviceFailure {
    DeviceFailure::new(code, msg)
}

/// Maps a path verification error to its code.
pub fn chain_failure(e: ChainError) -> DeviceFailure {
    let code = match &e {
        ChainError::Expired { .. } | ChainError::NotYetValid { .. } => {
            ErrorCode::CertificateExpired
        }
        ChainError::SignatureInvalid { .. } => ErrorCode::CertificateSignatureInvalid,
        ChainError::UnknownIssuer { .. } => ErrorCode::CertificateChainIncomplete,
        // A v1 certificate acting as a CA breaks the basic-constraints rule like a v3 one
        // without `CA:TRUE`; its message says what to do about it.
        ChainError::NotCa { .. }
        | ChainError::Version1Issuer { .. }
        | ChainError::KeyUsage { .. }
        | ChainError::UnsupportedAlgorithm(_)
        | ChainError::Invalid(_) => ErrorCode::CertificateInvalid,
    };
    fail(code, e.to_string())
}

/// The hub identity of an X.509 device: `selfSigned` with the leaf's SHA-256 thumbprint as
/// primary and secondary (service-api.md §9.1).
pub fn hub_auth(thumbprint: &str) -> HubAuthentication {
    HubAuthentication::SelfSigned {
        primary_thumbprint: thumbprint.to_string(),
        secondary_thumbprint: thumbprint.to_string(),
    }
}

/// The DER of each certificate of an enrollment's certificate set that has its text.
fn set_ders(set: Option<&X509Certificates>) -> Vec<Vec<u8>> {
    let Some(set) = set else { return Vec::new() };
    [set.primary.as_ref(), set.secondary.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|c| c.certificate.as_deref())
        .filter_map(|t| muster_attestation::decode_certificate(t).ok())
        .collect()
}

struct Presented {
    leaf: Certificate,
    /// Every certificate sent, leaf first.
    chain: Vec<Certificate>,
}

fn parse_chain(chain: &[Vec<u8>]) -> Result<Presented, DeviceFailure> {
    if chain.is_empty() {
        return Err(fail(
            ErrorCode::Unauthorized,
            "the device presented no client certificate",
        ));
    }
    let certs = chain
        .iter()
        .enumerate()
        .map(|(i, der)| {
            Certificate::from_der(der.clone()).map_err(|e| {
                fail(
                    ErrorCode::CertificateInvalid,
                    format!("certificate {i} of the presented chain: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Presented {
        leaf: certs[0].clone(),
        chain: certs,
    })
}

pub async fn attest(
    store: &dyn Store,
    groups: &GroupCache,
    registration_id: &RegistrationId,
    chain: &[Vec<u8>],
    now_unix: i64,
) -> Result<Attestation, DeviceFailure> {
    let presented = parse_chain(chain)?;
    let leaf = &presented.leaf;
    match leaf.common_name() {
        Some(cn) if cn.eq_ignore_ascii_case(registration_id.as_str()) => {}
        Some(cn) => {
            return Err(fail(
                ErrorCode::CertificateNameMismatch,
                format!(
                    "the device certificate's CN is '{cn}', but the device connected as registration id '{registration_id}'"
                ),
            ))
        }
        None => {
            return Err(fail(
                ErrorCode::CertificateNameMismatch,
                format!(
                    "the device certificate '{}' has no CN; its CN must be the registration id '{registration_id}'",
                    leaf.subject_name()
                ),
            ))
        }
    }
    chain::check_validity(leaf.der(), now_unix).map_err(chain_failure)?;
    let thumbprint = leaf.sha256_thumbprint();
    let leaf_info = leaf
        .info()
        .map_err(|e| fail(ErrorCode::CertificateInvalid, e.to_string()))?;

    let individual = records::get::<IndividualEnrollment>(
        store,
        Collection::Enrollments,
        &registration_id.key(),
    )
    .await?;
    if let Some(ind) = individual {
        let is_x509 = ind.value.attestation.kind == AttestationType::X509;
        let enrolled = set_ders(
            ind.value
                .attestation
                .x509
                .as_ref()
                .and_then(|x| x.client_certificates.as_ref()),
        );
        if is_x509 && enrolled.iter().any(|d| d.as_slice() == leaf.der()) {
            let matched = Matched::Individual(Box::new(ind.clone()));
            if !ind.value.is_enabled() {
                return Ok(Attestation::Disabled(matched));
            }
            return Ok(Attestation::Accepted(Attested {
                matched,
                hub_auth: hub_auth(&thumbprint),
                x509: Some(Box::new(X509RegistrationResult {
                    certificate_info: Some(leaf_info),
                    enrollment_group_id: None,
                    signing_certificate_info: None,
                })),
            }));
        }
        if ind.value.is_enabled() {
            return Err(if is_x509 {
                fail(
                    ErrorCode::CertificateThumbprintMismatch,
                    format!(
                        "the device certificate (SHA-256 thumbprint {thumbprint}) is neither the primary nor the secondary client certificate of individual enrollment '{}'",
                        ind.value.registration_id
                    ),
                )
            } else {
                fail(
                    ErrorCode::DeviceNotAttested,
                    format!(
                        "individual enrollment '{}' attests with {}, not with an X.509 certificate",
                        ind.value.registration_id,
                        ind.value.attestation.kind.as_str()
                    ),
                )
            });
        }
        // A disabled individual enrollment blocks the device if its group accepts it.
        return match find_group(store, groups, &presented, now_unix).await? {
            GroupMatch::Found(group, _) => Ok(Attestation::Disabled(Matched::Group(group))),
            GroupMatch::Refused(f) => Err(f),
        };
    }
    match find_group(store, groups, &presented, now_unix).await? {
        GroupMatch::Found(group, signing_info) => {
            if !group.value.is_enabled() {
                return Ok(Attestation::Disabled(Matched::Group(group)));
            }
            let group_id = group.value.enrollment_group_id.to_string();
            Ok(Attestation::Accepted(Attested {
                matched: Matched::Group(group),
                hub_auth: hub_auth(&thumbprint),
                x509: Some(Box::new(X509RegistrationResult {
                    certificate_info: Some(leaf_info),
                    enrollment_group_id: Some(group_id),
                    signing_certificate_info: signing_info,
                })),
            }))
        }
        GroupMatch::Refused(f) => Err(f),
    }
}

enum GroupMatch {
    Found(
        Box<Stored<EnrollmentGroup>>,
        Option<muster_proto::X509CertificateInfo>,
    ),
    Refused(DeviceFailure),
}

/// A certificate an X.509 group trusts.
struct Trusted {
    group: usize,
    der: Vec<u8>,
    /// `Some(name)` for a CA reference, with whether that CA is verified.
    ca: Option<(String, bool)>,
}

/// Every X.509 group and the certificates it trusts, in group id order.
async fn x509_groups(
    store: &dyn Store,
    cache: &GroupCache,
) -> Result<(Vec<Stored<EnrollmentGroup>>, Vec<Trusted>), DeviceFailure> {
    let mut groups = Vec::new();
    let mut trusted = Vec::new();
    for g in cache.all(store).await?.iter() {
        if g.value.attestation.kind != AttestationType::X509 {
            continue;
        }
        let Some(x) = g.value.attestation.x509.clone() else {
            continue;
        };
        let index = groups.len();
        for der in set_ders(x.signing_certificates.as_ref()) {
            trusted.push(Trusted {
                group: index,
                der,
                ca: None,
            });
        }
        if let Some(refs) = &x.ca_references {
            for name in [refs.primary.as_ref(), refs.secondary.as_ref()]
                .into_iter()
                .flatten()
            {
                let rec = store
                    .get(Collection::CaCertificates, &CaCertificate::key(name))
                    .await?
                    .and_then(|r| serde_json::from_value::<CaCertificate>(r.body).ok());
                if let Some(rec) = rec {
                    if let Ok(der) = rec.der() {
                        trusted.push(Trusted {
                            group: index,
                            der,
                            ca: Some((rec.name.clone(), rec.is_verified)),
                        });
                    }
                }
            }
        }
        groups.push(g.clone());
    }
    Ok((groups, trusted))
}

async fn find_group(
    store: &dyn Store,
    cache: &GroupCache,
    presented: &Presented,
    now_unix: i64,
) -> Result<GroupMatch, DeviceFailure> {
    let (groups, trusted) = x509_groups(store, cache).await?;
    let chain = &presented.chain;
    let n = chain.len();
    let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.der().to_vec()).collect();
    // Where each trusted certificate sits on the presented chain: position i (1..=n) means it
    // issued chain[i - 1]; it is chain[i] itself when i < n.
    let mut candidates: Vec<(usize, bool, &Trusted)> = Vec::new();
    for t in &trusted {
        let exact = (1..n).find(|&i| ders[i] == t.der);
        let position = exact.or_else(|| {
            (1..=n).find(|&i| chain::issued_by_name(&ders[i - 1], &t.der) && ders[i - 1] != t.der)
        });
        if let Some(p) = position {
            candidates.push((p, exact.is_none(), t));
        }
    }
    // Lowest position first, exact matches before name matches, then group id order.
    candidates.sort_by_key(|(p, by_name, t)| (*p, *by_name, t.group));

    let mut first_error: Option<DeviceFailure> = None;
    for (position, _, t) in candidates {
        let intermediates = &ders[1..position];
        match chain::verify_path(&ders[0], intermediates, &t.der, now_unix) {
            Ok(()) => {
                if let Some((name, false)) = &t.ca {
                    first_error.get_or_insert_with(|| {
                        fail(
                            ErrorCode::CaNotVerified,
                            format!(
                                "the device certificate chains to CA certificate '{name}' of enrollment group '{}', which is not verified (proof of possession pending)",
                                groups[t.group].value.enrollment_group_id
                            ),
                        )
                    });
                    continue;
                }
                let info = muster_attestation::certificate_info(&t.der).ok();
                return Ok(GroupMatch::Found(Box::new(groups[t.group].clone()), info));
            }
            Err(e) => {
                first_error.get_or_insert_with(|| chain_failure(e));
            }
        }
    }
    if let Some(f) = first_error {
        return Ok(GroupMatch::Refused(f));
    }
    let top = &chain[n - 1];
    let self_signed = chain::issued_by_name(top.der(), top.der());
    Ok(GroupMatch::Refused(if self_signed && n == 1 {
        fail(
            ErrorCode::DeviceNotAttested,
            format!(
                "no individual enrollment for this self-signed device certificate ('{}'), and no enrollment group trusts it",
                top.subject_name()
            ),
        )
    } else if self_signed {
        fail(
            ErrorCode::UnknownCa,
            format!(
                "CA certificate not found: the device's chain ends at root '{}', which is neither the signing certificate of an enrollment group nor a CA certificate one references",
                top.subject_name()
            ),
        )
    } else {
        fail(
            ErrorCode::CertificateChainIncomplete,
            format!(
                "the device's chain ends at '{}', issued by '{}', which no enrollment group trusts; the device must send its intermediate certificates up to the enrollment group's certificate (if '{}' is not an intermediate of one, the CA is unknown)",
                top.subject_name(),
                top.issuer_name(),
                top.issuer_name()
            ),
        )
    }))
}
