//! Reference checks on an enrollment or group before it is stored: what it names must exist,
//! so a mistake is refused at write time (400, naming the field and the fix) instead of
//! failing each device's registration later.
//!
//! * `iotHubs` entries must name linked hubs (`/linkedHubs`; the built-in hub is linked from
//!   the start). DPS offers only linked hubs for an enrollment too.
//! * `attestation.x509.caReferences.primary` / `.secondary` must name a CA certificate that
//!   exists and is verified by proof of possession. Azure requires the same: only a verified
//!   CA certificate can be chosen for an enrollment group, and an unverified one attests no
//!   device. A reference whose CA later becomes unverified (a new certificate uploaded under
//!   its name) stays stored, and its devices are refused at registration (401011) until the
//!   CA is verified again.
//!
//! Only references that are new or changed against the stored record are checked, so an
//! unrelated update of an enrollment does not fail because a hub was unlinked since.
//!
//! The `customAllocationDefinition` a `custom` policy needs is checked with the other
//! allocation settings ([`crate::prepare`]).

use muster_attestation::CaCertificate;
use muster_proto::linked_hub::LinkedHub;
use muster_proto::{AttestationMechanism, ErrorCode};
use muster_store::{Collection, Store};

use crate::error::ApiError;
use crate::kind::EnrollmentKind;

/// Checks what `incoming` names; `existing` is the stored record it replaces, if any.
pub async fn check<K: EnrollmentKind>(
    store: &dyn Store,
    incoming: &K,
    existing: Option<&K>,
) -> Result<(), ApiError> {
    check_hubs(store, incoming, existing).await?;
    check_ca_references(
        store,
        incoming.attestation(),
        existing.map(|e| e.attestation()),
    )
    .await
}

async fn check_hubs<K: EnrollmentKind>(
    store: &dyn Store,
    incoming: &K,
    existing: Option<&K>,
) -> Result<(), ApiError> {
    let Some(hubs) = incoming.allocation().1 else {
        return Ok(());
    };
    let before: Vec<String> = existing
        .and_then(|e| e.allocation().1)
        .map(|h| h.iter().map(|n| LinkedHub::key(n.trim())).collect())
        .unwrap_or_default();
    for hub in hubs {
        let key = LinkedHub::key(hub.trim());
        if before.contains(&key) {
            continue;
        }
        if store.get(Collection::LinkedHubs, &key).await?.is_none() {
            return Err(ApiError::new(
                ErrorCode::InvalidIotHubs,
                format!(
                    "iotHubs names '{hub}', which is not a linked hub: link it first \
                     (PUT /linkedHubs/{hub}, `muster linked-hub create`) or name a linked hub \
                     (GET /linkedHubs lists them)"
                ),
            ));
        }
    }
    Ok(())
}

fn references(a: Option<&AttestationMechanism>) -> [Option<&str>; 2] {
    let refs = a
        .and_then(|a| a.x509.as_ref())
        .and_then(|x| x.ca_references.as_ref());
    [
        refs.and_then(|r| r.primary.as_deref()),
        refs.and_then(|r| r.secondary.as_deref()),
    ]
}

async fn check_ca_references(
    store: &dyn Store,
    incoming: &AttestationMechanism,
    existing: Option<&AttestationMechanism>,
) -> Result<(), ApiError> {
    let before = references(existing);
    for (slot, name) in ["primary", "secondary"]
        .into_iter()
        .zip(references(Some(incoming)))
    {
        let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
            continue;
        };
        if before
            .iter()
            .flatten()
            .any(|b| CaCertificate::key(b) == CaCertificate::key(name))
        {
            continue;
        }
        let field = format!("attestation.x509.caReferences.{slot}");
        let Some(r) = store
            .get(Collection::CaCertificates, &CaCertificate::key(name))
            .await?
        else {
            return Err(ApiError::new(
                ErrorCode::InvalidAttestation,
                format!(
                    "{field} names CA certificate '{name}', which does not exist: upload it \
                     (PUT /caCertificates/{name}, `muster certificate create`) and verify it first"
                ),
            ));
        };
        let ca: CaCertificate = serde_json::from_value(r.body)
            .map_err(|e| ApiError::internal("reading a CA certificate", e))?;
        if !ca.is_verified {
            return Err(ApiError::new(
                ErrorCode::InvalidAttestation,
                format!(
                    "{field} names CA certificate '{name}', which is not verified: prove \
                     possession of its key first (`muster certificate \
                     generate-verification-code`, then `muster certificate verify`)"
                ),
            ));
        }
    }
    Ok(())
}
