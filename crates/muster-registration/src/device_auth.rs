//! Device attestation for the registration engine: which enrollment accepts this device.
//!
//! Symmetric keys (device-protocol.md §3): the SAS token's `sr` must name
//! `{idScope}/registrations/{registrationId}`; the signature is checked over `sr` exactly as
//! sent (and its other encodings) with the individual enrollment's keys, or with keys derived
//! from a symmetric-key group's keys. An individual enrollment wins over groups; a disabled
//! individual enrollment blocks a device its group would accept.
//!
//! Which group: the one the device's registration record names is tried first, alone (a
//! re-registration or a poll costs the same with one group or ten thousand); only if it does
//! not sign the token (no record, the group was deleted, the device holds another group's
//! key, or the token is forged) are all groups searched in id order, under the bound of
//! [`crate::group_search`].
//!
//! X.509 (device-protocol.md §6): the TLS client chain, judged in [`crate::x509`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::device::X509RegistrationResult;
use muster_proto::{
    AttestationType, EnrollmentGroup, ErrorCode, IndividualEnrollment, RegistrationId, SasError,
    SasToken,
};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store};

use crate::group_cache::{device_key_b64, GroupCache};
use crate::group_search::signed_with;
use crate::hub_client::HubAuthentication;
use crate::record::EnrollmentRef;
use crate::{DeviceCredential, DeviceFailure};

/// Tokens up to this many seconds past their expiry still pass (device clocks drift).
pub const DEVICE_CLOCK_SKEW_SECS: i64 = 300;

/// The enrollment that accepted the device.
#[derive(Debug, Clone)]
pub enum Matched {
    Individual(Box<Stored<IndividualEnrollment>>),
    Group(Box<Stored<EnrollmentGroup>>),
}

impl Matched {
    pub fn reference(&self) -> EnrollmentRef {
        match self {
            Matched::Individual(e) => {
                EnrollmentRef::Individual(e.value.registration_id.to_string())
            }
            Matched::Group(g) => EnrollmentRef::Group(g.value.enrollment_group_id.to_string()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        match self {
            Matched::Individual(e) => e.value.is_enabled(),
            Matched::Group(g) => g.value.is_enabled(),
        }
    }

    pub fn group_id(&self) -> Option<String> {
        match self {
            Matched::Group(g) => Some(g.value.enrollment_group_id.to_string()),
            Matched::Individual(_) => None,
        }
    }
}

/// A device that proved who it is, and the credentials its hub identity gets.
#[derive(Debug, Clone)]
pub struct Attested {
    pub matched: Matched,
    pub hub_auth: HubAuthentication,
    /// X.509 devices: the leaf's and the signing certificate's info for the record and answer.
    pub x509: Option<Box<X509RegistrationResult>>,
}

pub enum Attestation {
    Accepted(Attested),
    /// Authenticated, but the deciding enrollment is disabled.
    Disabled(Matched),
}

fn unauthorized(msg: impl Into<String>) -> DeviceFailure {
    DeviceFailure::new(ErrorCode::Unauthorized, msg)
}

/// `known_group` is the enrollment group the device's registration record names, if any: the
/// first group tried.
pub async fn attest(
    store: &dyn Store,
    groups: &GroupCache,
    id_scope: &str,
    registration_id: &RegistrationId,
    credential: &DeviceCredential,
    known_group: Option<&str>,
    now_unix: i64,
) -> Result<Attestation, DeviceFailure> {
    match credential {
        DeviceCredential::Sas(token) => {
            let token = SasToken::parse(token).map_err(|e| unauthorized(e.to_string()))?;
            check_resource(&token, id_scope, registration_id)?;
            if token.expiry + DEVICE_CLOCK_SKEW_SECS <= now_unix {
                return Err(DeviceFailure::new(
                    ErrorCode::TokenExpired,
                    SasError::Expired {
                        expiry: token.expiry,
                    }
                    .to_string(),
                ));
            }
            if let Some(skn) = &token.key_name {
                if !skn.eq_ignore_ascii_case("registration") {
                    return Err(unauthorized(format!(
                        "the token's skn is '{skn}'; devices sign with skn=registration or none"
                    )));
                }
            }
            attest_symmetric(store, groups, registration_id, &token, known_group, now_unix).await
        }
        DeviceCredential::X509 { chain } => {
            crate::x509::attest(store, groups, registration_id, chain, now_unix).await
        }
        DeviceCredential::None => Err(unauthorized(
            "the device presented no credentials (no SAS token, no client certificate)",
        )),
    }
}

fn check_resource(
    token: &SasToken,
    id_scope: &str,
    registration_id: &RegistrationId,
) -> Result<(), DeviceFailure> {
    let expected = format!("{id_scope}/registrations/{}", registration_id.as_str());
    if token.resource.eq_ignore_ascii_case(&expected) {
        Ok(())
    } else {
        Err(unauthorized(format!(
            "the token's resource (sr) '{}' is not '{expected}'",
            token.resource
        )))
    }
}

/// Verifies with a base64 key; `None` when the key is unusable.
fn verifies(token: &SasToken, key_b64: Option<&str>, now_unix: i64) -> bool {
    let Some(key) = key_b64.and_then(|k| B64.decode(k).ok()) else {
        return false;
    };
    token
        .verify(&key, now_unix - DEVICE_CLOCK_SKEW_SECS)
        .is_ok()
}

async fn attest_symmetric(
    store: &dyn Store,
    groups: &GroupCache,
    registration_id: &RegistrationId,
    token: &SasToken,
    known_group: Option<&str>,
    now_unix: i64,
) -> Result<Attestation, DeviceFailure> {
    let key = registration_id.key();
    let individual =
        records::get::<IndividualEnrollment>(store, Collection::Enrollments, &key).await?;
    if let Some(ind) = individual {
        let sk = (ind.value.attestation.kind == AttestationType::SymmetricKey)
            .then(|| ind.value.attestation.symmetric_key.clone())
            .flatten();
        if let Some(sk) = sk {
            if verifies(token, sk.primary_key.as_deref(), now_unix)
                || verifies(token, sk.secondary_key.as_deref(), now_unix)
            {
                let matched = Matched::Individual(Box::new(ind.clone()));
                if !ind.value.is_enabled() {
                    return Ok(Attestation::Disabled(matched));
                }
                return Ok(Attestation::Accepted(Attested {
                    matched,
                    hub_auth: HubAuthentication::Sas {
                        primary_key: sk.primary_key.unwrap_or_default(),
                        secondary_key: sk.secondary_key.unwrap_or_default(),
                    },
                    x509: None,
                }));
            }
        }
        if ind.value.is_enabled() {
            return Err(DeviceFailure::new(
                ErrorCode::DeviceNotAttested,
                format!(
                    "the token is not signed with a key of individual enrollment '{}'",
                    ind.value.registration_id
                ),
            ));
        }
        // A disabled individual enrollment blocks the device if its group accepts it.
        return match find_group(store, groups, registration_id, token, known_group).await? {
            Some((group, _)) => Ok(Attestation::Disabled(Matched::Group(Box::new(group)))),
            None => Err(not_attested()),
        };
    }
    match find_group(store, groups, registration_id, token, known_group).await? {
        Some((group, (primary_key, secondary_key))) => {
            if !group.value.is_enabled() {
                return Ok(Attestation::Disabled(Matched::Group(Box::new(group))));
            }
            Ok(Attestation::Accepted(Attested {
                matched: Matched::Group(Box::new(group)),
                hub_auth: HubAuthentication::Sas {
                    primary_key,
                    secondary_key,
                },
                x509: None,
            }))
        }
        None => Err(not_attested()),
    }
}

fn not_attested() -> DeviceFailure {
    DeviceFailure::new(
        ErrorCode::DeviceNotAttested,
        "no enrollment accepts this registration id with this key",
    )
}

/// The symmetric-key group whose derived key signed the token, and the device's keys in it:
/// the known group if it signed, else the first in id order.
async fn find_group(
    store: &dyn Store,
    groups: &GroupCache,
    registration_id: &RegistrationId,
    token: &SasToken,
    known_group: Option<&str>,
) -> Result<Option<(Stored<EnrollmentGroup>, (String, String))>, DeviceFailure> {
    let messages = token.signed_messages();
    // Devices derive from the id as they send it.
    let rid = registration_id.as_str();
    if let Some(id) = known_group {
        if let Some((group, Some(keys))) = groups.group(store, id).await? {
            if let Some((p, s)) = signed_with(&keys, rid, token, &messages) {
                return Ok(Some((group, (device_key_b64(&p), device_key_b64(&s)))));
            }
        }
    }
    let found = groups
        .search()
        .find(groups, store, rid, token, &messages)
        .await?;
    Ok(found.map(|f| {
        let (p, s) = f.device_keys;
        (f.group, (device_key_b64(&p), device_key_b64(&s)))
    }))
}
