//! TPM attestation in the engine (device-protocol.md §7): the challenge, the token check
//! against the issued key, and the final blob.
//!
//! 1. A register request without credentials but with `tpm.endorsementKey` (and
//!    `storageRootKey`) for a TPM individual enrollment: the EK must be the enrolled one; a
//!    fresh 32-byte key is issued, kept for the registration (sealed: it lives in the
//!    [`Collection::Settings`] collection, under `tpm-key/{registration id}`, with the SRK it was
//!    wrapped for) and sent back in a 401 as an activation blob ([`challenge`]).
//!    While an issued key is current for the same SRK, a new challenge wraps it again instead
//!    of replacing it (an EK is no secret: nobody can retire a device's key by asking).
//! 2. The device activates the blob in its TPM and signs its SAS token with the imported key;
//!    the token is verified like a symmetric-key token with that key while it is current
//!    ([`TPM_KEY_LIFETIME_SECS`] from its issue; a challenge after that, or with another SRK,
//!    issues a new one) ([`attest_token`]).
//! 3. The hub identity gets the issued key (its secondary derived from it), and the assigned
//!    answer carries `tpm.authenticationKey`: a new blob wrapping that key ([`result_blob`]).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use muster_attestation::tpm::{activation_blob, RsaPublicArea};
use muster_proto::device::DeviceTpm;
use muster_proto::runtime::Entropy;
use muster_proto::{AttestationType, ErrorCode, IndividualEnrollment, RegistrationId, SasToken};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Expect, Store, Write};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::device_auth::{Attestation, Attested, Matched, DEVICE_CLOCK_SKEW_SECS};
use crate::hub_client::HubAuthentication;
use crate::DeviceFailure;

/// How long an issued key authenticates registrations and polls (the device activates it
/// within seconds; a later registration asks for a new one).
pub const TPM_KEY_LIFETIME_SECS: i64 = 15 * 60;

/// The issued key's length: an HMAC-SHA256 key of one hash length.
const ISSUED_KEY_BYTES: usize = 32;

/// The key the device signs with, as sent in the challenge (C uses it as `skn`).
pub const KEY_NAME: &str = "registration";

/// What is kept per registration (sealed at rest with the Settings collection).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssuedKey {
    /// Base64 of the HMAC key given to the TPM.
    key: String,
    /// Unix seconds of its issue.
    issued: i64,
    /// The SRK it was wrapped for (base64 `TPM2B_PUBLIC`), for the final blob.
    storage_root_key: String,
    /// Hex SHA-256 of the enrolled EK it was issued for ([`RsaPublicArea::key_digest`]): an
    /// enrollment re-created with another EK does not accept it.
    endorsement_key_digest: String,
}

fn issued_key_name(rid: &RegistrationId) -> String {
    format!("tpm-key/{}", rid.key())
}

fn mismatch(message: impl Into<String>) -> DeviceFailure {
    DeviceFailure::new(ErrorCode::TpmEndorsementKeyMismatch, message)
}

/// The enrolled EK of a TPM individual enrollment.
fn enrolled_ek(enrollment: &IndividualEnrollment) -> Result<RsaPublicArea, DeviceFailure> {
    let tpm = enrollment
        .attestation
        .tpm
        .as_ref()
        .filter(|_| enrollment.attestation.kind == AttestationType::Tpm)
        .ok_or_else(|| {
            DeviceFailure::new(
                ErrorCode::DeviceNotAttested,
                format!(
                    "the enrollment '{}' does not use TPM attestation",
                    enrollment.registration_id
                ),
            )
        })?;
    RsaPublicArea::from_base64(&tpm.endorsement_key, "enrolled endorsement key").map_err(|e| {
        DeviceFailure::new(
            ErrorCode::DeviceNotAttested,
            format!("the enrollment's endorsement key cannot be used: {e}"),
        )
    })
}

/// Step 1: checks the device's EK against its enrollment and issues a key; returns the
/// activation blob (base64) for the 401 answer.
pub async fn challenge(
    store: &dyn Store,
    entropy: &dyn Entropy,
    rid: &RegistrationId,
    device: &DeviceTpm,
    now_unix: i64,
) -> Result<String, DeviceFailure> {
    let enrollment =
        records::get::<IndividualEnrollment>(store, Collection::Enrollments, &rid.key())
            .await?
            .ok_or_else(|| {
                DeviceFailure::new(
                    ErrorCode::DeviceNotAttested,
                    format!("no TPM individual enrollment has the registration id '{rid}'"),
                )
            })?;
    let enrolled = enrolled_ek(&enrollment.value)?;
    let ek = RsaPublicArea::from_base64(&device.endorsement_key, "endorsement key")
        .map_err(|e| mismatch(e.to_string()))?;
    if !ek.same_key(&enrolled) {
        return Err(mismatch(format!(
            "the endorsement key is not the one enrolled for '{rid}'"
        )));
    }
    let srk_b64 = device.storage_root_key.as_deref().ok_or_else(|| {
        DeviceFailure::new(
            ErrorCode::MalformedBody,
            "the register body's tpm object has no storageRootKey",
        )
    })?;
    let srk = RsaPublicArea::from_base64(srk_b64, "storage root key")
        .map_err(|e| DeviceFailure::new(ErrorCode::MalformedBody, e.to_string()))?;
    // A key still current for this SRK is wrapped again rather than replaced: anyone may
    // send the (public) EK, and a new key on every such request would let them retire the
    // key of a device mid-registration, and write to the store without authenticating.
    if let Some((issued, key)) = load_issued(store, rid).await? {
        if issued.issued + TPM_KEY_LIFETIME_SECS > now_unix
            && issued.storage_root_key == srk_b64.trim()
            && issued.endorsement_key_digest == hex::encode(enrolled.key_digest())
        {
            let blob = activation_blob(&ek, &srk, &key, entropy)
                .map_err(|e| DeviceFailure::internal("building a TPM activation blob", e))?;
            return Ok(B64.encode(blob));
        }
    }
    let mut key = [0u8; ISSUED_KEY_BYTES];
    entropy.fill(&mut key);
    let blob = activation_blob(&ek, &srk, &key, entropy)
        .map_err(|e| DeviceFailure::internal("building a TPM activation blob", e))?;
    let issued = IssuedKey {
        key: B64.encode(key),
        issued: now_unix,
        storage_root_key: srk_b64.trim().to_string(),
        endorsement_key_digest: hex::encode(enrolled.key_digest()),
    };
    let body = serde_json::to_value(&issued)
        .map_err(|e| DeviceFailure::internal("encoding a TPM key", e))?;
    store
        .write(vec![Write::put(
            Collection::Settings,
            issued_key_name(rid),
            Expect::Any,
            body,
        )])
        .await?;
    Ok(B64.encode(blob))
}

async fn load_issued(
    store: &dyn Store,
    rid: &RegistrationId,
) -> Result<Option<(IssuedKey, Vec<u8>)>, DeviceFailure> {
    let Some(record) = store
        .get(Collection::Settings, &issued_key_name(rid))
        .await?
    else {
        return Ok(None);
    };
    let issued: IssuedKey = serde_json::from_value(record.body)
        .map_err(|e| DeviceFailure::internal("reading a TPM key", e))?;
    let key = B64
        .decode(&issued.key)
        .map_err(|e| DeviceFailure::internal("reading a TPM key", e))?;
    Ok(Some((issued, key)))
}

/// The hub credentials of a TPM device: the issued key, and a secondary derived from it.
fn hub_auth(key: &[u8]) -> HubAuthentication {
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"muster tpm secondary key");
    HubAuthentication::Sas {
        primary_key: B64.encode(key),
        secondary_key: B64.encode(mac.finalize().into_bytes()),
    }
}

/// Step 2: the token of a device whose individual enrollment is a TPM one (the resource,
/// length and expiry of the token were checked by the caller).
pub async fn attest_token(
    store: &dyn Store,
    enrollment: Stored<IndividualEnrollment>,
    rid: &RegistrationId,
    token: &SasToken,
    now_unix: i64,
) -> Result<Attestation, DeviceFailure> {
    let (issued, key) = load_issued(store, rid).await?.ok_or_else(|| {
        DeviceFailure::new(
            ErrorCode::TpmChallengeMissing,
            format!(
                "no TPM key was issued to '{rid}': register with tpm.endorsementKey and no token first"
            ),
        )
    })?;
    if issued.issued + TPM_KEY_LIFETIME_SECS <= now_unix {
        return Err(DeviceFailure::new(
            ErrorCode::TpmChallengeMissing,
            format!(
                "the TPM key issued to '{rid}' expired ({TPM_KEY_LIFETIME_SECS} s after its challenge): register without a token for a new one"
            ),
        ));
    }
    if issued.endorsement_key_digest != hex::encode(enrolled_ek(&enrollment.value)?.key_digest()) {
        return Err(DeviceFailure::new(
            ErrorCode::TpmChallengeMissing,
            format!(
                "the TPM key of '{rid}' was issued for another endorsement key than the enrolled one: register without a token for a new one"
            ),
        ));
    }
    if token
        .verify(&key, now_unix - DEVICE_CLOCK_SKEW_SECS)
        .is_err()
    {
        return Err(DeviceFailure::new(
            ErrorCode::TpmSignatureMismatch,
            format!("the token is not signed with the key issued in '{rid}''s TPM challenge"),
        ));
    }
    let enabled = enrollment.value.is_enabled();
    let matched = Matched::Individual(Box::new(enrollment));
    if !enabled {
        return Ok(Attestation::Disabled(matched));
    }
    Ok(Attestation::Accepted(Attested {
        matched,
        hub_auth: hub_auth(&key),
        x509: None,
    }))
}

/// The hub credentials of a pending TPM assignment (after a restart or a throttled queue).
pub async fn hub_auth_for(
    store: &dyn Store,
    rid: &RegistrationId,
) -> Result<Option<HubAuthentication>, DeviceFailure> {
    Ok(load_issued(store, rid)
        .await?
        .map(|(_, key)| hub_auth(&key)))
}

/// Step 3: the assigned answer's `tpm.authenticationKey`, a new blob wrapping the hub key
/// (the issued key) for the enrolled EK and the SRK of the challenge.
pub async fn result_blob(
    store: &dyn Store,
    entropy: &dyn Entropy,
    enrollment: &IndividualEnrollment,
    rid: &RegistrationId,
) -> Result<Option<String>, DeviceFailure> {
    let Some((issued, key)) = load_issued(store, rid).await? else {
        return Ok(None);
    };
    let ek = enrolled_ek(enrollment)?;
    let srk = RsaPublicArea::from_base64(&issued.storage_root_key, "storage root key")
        .map_err(|e| DeviceFailure::internal("reading a TPM key", e))?;
    let blob = activation_blob(&ek, &srk, &key, entropy)
        .map_err(|e| DeviceFailure::internal("building a TPM activation blob", e))?;
    Ok(Some(B64.encode(blob)))
}

/// Whether an enrollment is a TPM one (its registrations answer with `tpm`).
pub fn is_tpm(matched: &Matched) -> Option<&IndividualEnrollment> {
    match matched {
        Matched::Individual(e) if e.value.attestation.kind == AttestationType::Tpm => {
            Some(&e.value)
        }
        _ => None,
    }
}
