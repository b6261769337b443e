//! Validation and normalisation of an enrollment or group before it is stored.
//!
//! Each check that fails names itself in the error. Symmetric keys are generated on create
//! when absent (64 random bytes), kept on update when omitted or empty; X.509 certificate
//! info is computed from the certificate text, and info-only entries (the CLI re-sends what GET
//! returned) are matched to the stored certificate by thumbprint.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_attestation::{symmetric_key, x509};
use muster_proto::runtime::{random_bytes, Entropy};
use muster_proto::{
    AllocationPolicy, AttestationMechanism, AttestationType, ErrorCode, SymmetricKeyAttestation,
    Timestamp, X509CertificateWithInfo, X509Certificates,
};

use crate::error::ApiError;
use crate::kind::EnrollmentKind;

/// Validates `incoming` and fills what the service computes. `existing` is the stored record
/// being replaced, if any.
pub fn prepare<K: EnrollmentKind>(
    mut incoming: K,
    existing: Option<&K>,
    now: Timestamp,
    entropy: &dyn Entropy,
) -> Result<K, ApiError> {
    incoming.clear_read_only();
    incoming.validate_kind()?;
    let previous = existing.map(|e| e.attestation());
    prepare_attestation::<K>(incoming.attestation_mut(), previous, entropy)?;
    check_allocation(&incoming)?;
    let created = existing.and_then(|e| e.created()).unwrap_or(now);
    incoming.set_timestamps(created, now);
    Ok(incoming)
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidAttestation, msg)
}

fn prepare_attestation<K: EnrollmentKind>(
    a: &mut AttestationMechanism,
    previous: Option<&AttestationMechanism>,
    entropy: &dyn Entropy,
) -> Result<(), ApiError> {
    match a.kind {
        AttestationType::None => Err(invalid(
            "attestation type 'none' cannot attest devices; use symmetricKey, x509 or tpm",
        )),
        AttestationType::Tpm => {
            if !K::INDIVIDUAL {
                return Err(invalid(
                    "enrollment groups support only x509 and symmetricKey attestation",
                ));
            }
            let tpm = a
                .tpm
                .as_ref()
                .ok_or_else(|| invalid("attestation type tpm needs attestation.tpm"))?;
            if tpm.endorsement_key.trim().is_empty() {
                return Err(invalid("attestation.tpm.endorsementKey is required"));
            }
            B64.decode(tpm.endorsement_key.trim())
                .map_err(|_| invalid("attestation.tpm.endorsementKey is not valid base64"))?;
            if let Some(srk) = &tpm.storage_root_key {
                B64.decode(srk.trim())
                    .map_err(|_| invalid("attestation.tpm.storageRootKey is not valid base64"))?;
            }
            a.x509 = None;
            a.symmetric_key = None;
            Ok(())
        }
        AttestationType::SymmetricKey => {
            let old = previous
                .filter(|p| p.kind == AttestationType::SymmetricKey)
                .and_then(|p| p.symmetric_key.clone())
                .unwrap_or_default();
            let given = a.symmetric_key.take().unwrap_or_default();
            a.symmetric_key = Some(SymmetricKeyAttestation {
                primary_key: Some(key_or_keep(
                    "primaryKey",
                    given.primary_key,
                    old.primary_key,
                    entropy,
                )?),
                secondary_key: Some(key_or_keep(
                    "secondaryKey",
                    given.secondary_key,
                    old.secondary_key,
                    entropy,
                )?),
            });
            a.x509 = None;
            a.tpm = None;
            Ok(())
        }
        AttestationType::X509 => {
            let old = previous
                .filter(|p| p.kind == AttestationType::X509)
                .and_then(|p| p.x509.as_ref());
            let x = a
                .x509
                .as_mut()
                .ok_or_else(|| invalid("attestation type x509 needs attestation.x509"))?;
            let sets = [
                x.client_certificates.is_some(),
                x.signing_certificates.is_some(),
                x.ca_references.is_some(),
            ];
            if sets.iter().filter(|s| **s).count() != 1 {
                return Err(invalid(
                    "attestation.x509 must have exactly one of clientCertificates, signingCertificates or caReferences",
                ));
            }
            if K::INDIVIDUAL && x.client_certificates.is_none() {
                return Err(invalid(
                    "individual enrollments attest with attestation.x509.clientCertificates",
                ));
            }
            if !K::INDIVIDUAL && x.client_certificates.is_some() {
                return Err(invalid(
                    "enrollment groups attest with attestation.x509.signingCertificates or caReferences, not clientCertificates",
                ));
            }
            if let Some(set) = &mut x.client_certificates {
                let old = old.and_then(|o| o.client_certificates.as_ref());
                prepare_certificates("clientCertificates", set, old)?;
            }
            if let Some(set) = &mut x.signing_certificates {
                let old = old.and_then(|o| o.signing_certificates.as_ref());
                prepare_certificates("signingCertificates", set, old)?;
            }
            if let Some(refs) = &x.ca_references {
                if refs
                    .primary
                    .as_deref()
                    .map(str::trim)
                    .unwrap_or("")
                    .is_empty()
                {
                    return Err(invalid("attestation.x509.caReferences.primary is required"));
                }
            }
            a.tpm = None;
            a.symmetric_key = None;
            Ok(())
        }
    }
}

fn key_or_keep(
    field: &str,
    given: Option<String>,
    old: Option<String>,
    entropy: &dyn Entropy,
) -> Result<String, ApiError> {
    match given
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
    {
        Some(k) => {
            symmetric_key::validate_key(&k).map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidSymmetricKey,
                    format!("attestation.symmetricKey.{field}: {e}"),
                )
            })?;
            Ok(k)
        }
        None => {
            Ok(old.unwrap_or_else(|| symmetric_key::generate_key(&random_bytes::<64>(entropy))))
        }
    }
}

fn prepare_certificates(
    set_name: &str,
    set: &mut X509Certificates,
    old: Option<&X509Certificates>,
) -> Result<(), ApiError> {
    if set.primary.is_none() {
        return Err(invalid(format!(
            "attestation.x509.{set_name}.primary is required"
        )));
    }
    let stored: Vec<&X509CertificateWithInfo> = old
        .map(|o| {
            [o.primary.as_ref(), o.secondary.as_ref()]
                .into_iter()
                .flatten()
                .collect()
        })
        .unwrap_or_default();
    for (slot, entry) in [
        ("primary", &mut set.primary),
        ("secondary", &mut set.secondary),
    ] {
        let Some(entry) = entry else { continue };
        let path = format!("attestation.x509.{set_name}.{slot}");
        match entry
            .certificate
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            Some(text) => {
                let der = x509::decode_certificate(text).map_err(|e| {
                    ApiError::new(
                        ErrorCode::InvalidCertificate,
                        format!("{path}.certificate: {e}"),
                    )
                })?;
                let info = x509::certificate_info(&der).map_err(|e| {
                    ApiError::new(
                        ErrorCode::InvalidCertificate,
                        format!("{path}.certificate: {e}"),
                    )
                })?;
                entry.certificate = Some(text.to_string());
                entry.info = Some(info);
            }
            None => {
                let thumb = entry
                    .info
                    .as_ref()
                    .map(|i| i.sha256_thumbprint.to_ascii_uppercase())
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidCertificate,
                            format!("{path} has neither a certificate nor certificate info"),
                        )
                    })?;
                let kept = stored
                    .iter()
                    .find(|s| {
                        s.info
                            .as_ref()
                            .is_some_and(|i| i.sha256_thumbprint.eq_ignore_ascii_case(&thumb))
                    })
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidCertificate,
                            format!("{path} has certificate info but no certificate, and its thumbprint matches no stored certificate"),
                        )
                    })?;
                *entry = (*kept).clone();
            }
        }
    }
    Ok(())
}

fn check_allocation<K: EnrollmentKind>(e: &K) -> Result<(), ApiError> {
    let (policy, hubs, custom) = e.allocation();
    let has_hubs = hubs.is_some_and(|h| !h.is_empty());
    if has_hubs && policy.is_none() {
        return Err(ApiError::new(
            ErrorCode::AllocationPolicyRequired,
            "Enrollment allocationPolicy must be specified when iotHubs are specified.",
        ));
    }
    if let Some(hubs) = hubs {
        if let Some(h) = hubs.iter().find(|h| h.trim().is_empty()) {
            return Err(ApiError::new(
                ErrorCode::InvalidIotHubs,
                format!("iotHubs contains an empty host name ({h:?})"),
            ));
        }
    }
    if policy == Some(AllocationPolicy::Static) && hubs.is_some_and(|h| h.len() > 1) {
        return Err(ApiError::new(
            ErrorCode::InvalidIotHubs,
            "allocationPolicy static takes exactly one hub in iotHubs",
        ));
    }
    if policy == Some(AllocationPolicy::Custom) {
        let def = custom.ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidCustomAllocation,
                "allocationPolicy custom needs customAllocationDefinition with webhookUrl and apiVersion",
            )
        })?;
        let url = def.webhook_url.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 10 {
            return Err(ApiError::new(
                ErrorCode::InvalidCustomAllocation,
                "customAllocationDefinition.webhookUrl must be an absolute http(s) URL",
            ));
        }
        if def.api_version.trim().is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidCustomAllocation,
                "customAllocationDefinition.apiVersion is required",
            ));
        }
    }
    Ok(())
}
