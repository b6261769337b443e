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
//!
//! TPM (device-protocol.md §7): a token for a TPM individual enrollment is checked against the
//! key issued in the device's last challenge, in [`crate::tpm`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::device::X509RegistrationResult;
use muster_proto::{
    AttestationType, EnrollmentGroup, ErrorCode, IndividualEnrollment, RegistrationId, SasError,
    SasToken,
};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Store};

use crate::group_cache::{device_key_b64, signing_slot, GroupCache};
use crate::hub_client::HubAuthentication;
use crate::record::EnrollmentRef;
use crate::{DeviceCredential, DeviceFailure};

/// Tokens up to this many seconds past their expiry still pass (device clocks drift).
pub const DEVICE_CLOCK_SKEW_SECS: i64 = 300;

/// The length of an HMAC-SHA256 signature.
const SIGNATURE_BYTES: usize = 32;

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
            // No key can sign with another length: refused before any HMAC is computed.
            if token.signature.len() != SIGNATURE_BYTES {
                return Err(unauthorized(format!(
                    "the token's signature (sig) is {} bytes; an HMAC-SHA256 signature is {SIGNATURE_BYTES}",
                    token.signature.len()
                )));
            }
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
            attest_symmetric(
                store,
                groups,
                registration_id,
                &token,
                known_group,
                now_unix,
            )
            .await
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
        if ind.value.attestation.kind == AttestationType::Tpm {
            return crate::tpm::attest_token(store, ind, registration_id, token, now_unix).await;
        }
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
            if signing_slot(&keys, rid, token, &messages).is_some() {
                let (p, s) = keys.derive(rid);
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

#[cfg(test)]
mod tests {
    use muster_attestation::symmetric_key;
    use muster_store::{Expect, SqliteStore, Write};
    use serde_json::json;

    use super::*;
    use crate::group_search::INLINE_GROUPS;

    const SCOPE: &str = "0ne00000001";
    const NOW: i64 = 1_800_000_000;

    fn key(seed: u8) -> String {
        B64.encode([seed; 32])
    }

    fn put_group(id: &str, primary: &str, secondary: &str) -> Write {
        Write::put(
            Collection::EnrollmentGroups,
            id.to_ascii_lowercase(),
            Expect::Any,
            json!({
                "enrollmentGroupId": id,
                "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}},
            }),
        )
    }

    /// Enough groups that a search is not inline, so it goes through the bound; group `gNN`
    /// has keys `key(NN)` and `key(100 + NN)`.
    async fn store_with_groups() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("db")).expect("store");
        let writes = (0..INLINE_GROUPS as u8 + 8)
            .map(|i| put_group(&format!("g{i:02}"), &key(i), &key(100 + i)))
            .collect();
        store.write(writes).await.expect("groups");
        (dir, store)
    }

    /// A device token signed with the device key derived from `group_key`.
    fn token(rid: &str, group_key: &str) -> DeviceCredential {
        let device_key = symmetric_key::derive_device_key(group_key, rid).expect("derive");
        let raw = B64.decode(device_key).expect("b64");
        DeviceCredential::Sas(SasToken::generate(
            &format!("{SCOPE}/registrations/{rid}"),
            &raw,
            Some("registration"),
            NOW + 3600,
        ))
    }

    async fn run(
        store: &SqliteStore,
        groups: &GroupCache,
        rid: &str,
        credential: &DeviceCredential,
        known_group: Option<&str>,
    ) -> Result<Attestation, DeviceFailure> {
        let rid = RegistrationId::new(rid).expect("rid");
        attest(store, groups, SCOPE, &rid, credential, known_group, NOW).await
    }

    /// The accepted group's id and the device keys the hub identity gets.
    fn accepted(outcome: Result<Attestation, DeviceFailure>) -> (String, String, String) {
        match outcome {
            Ok(Attestation::Accepted(Attested {
                matched: Matched::Group(g),
                hub_auth:
                    HubAuthentication::Sas {
                        primary_key,
                        secondary_key,
                    },
                ..
            })) => (
                g.value.enrollment_group_id.to_string(),
                primary_key,
                secondary_key,
            ),
            Ok(_) => panic!("not accepted by a group"),
            Err(e) => panic!("refused: {e:?}"),
        }
    }

    fn refused_code(outcome: Result<Attestation, DeviceFailure>) -> ErrorCode {
        match outcome {
            Err(f) => f.code,
            Ok(_) => panic!("accepted"),
        }
    }

    #[tokio::test]
    async fn first_registration_is_found_by_searching_and_gets_its_derived_keys() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        let (group, primary, secondary) =
            accepted(run(&store, &groups, "dev-1", &token("dev-1", &key(30)), None).await);
        assert_eq!(group, "g30");
        assert_eq!(
            primary,
            symmetric_key::derive_device_key(&key(30), "dev-1").unwrap()
        );
        assert_eq!(
            secondary,
            symmetric_key::derive_device_key(&key(130), "dev-1").unwrap()
        );
        // The secondary key signs as well.
        let (group, ..) =
            accepted(run(&store, &groups, "dev-1", &token("dev-1", &key(130)), None).await);
        assert_eq!(group, "g30");
    }

    #[tokio::test]
    async fn re_registration_tries_the_recorded_group_without_searching() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        let credential = token("dev-2", &key(7));
        let occupied = groups.search().occupy();
        // Every search is refused now; the recorded group (any case) still authenticates.
        let (group, primary, _) =
            accepted(run(&store, &groups, "dev-2", &credential, Some("G07")).await);
        assert_eq!(group, "g07");
        assert_eq!(
            primary,
            symmetric_key::derive_device_key(&key(7), "dev-2").unwrap()
        );
        // Without the record, the same device needs a search: refused with 429, not searched.
        assert_eq!(
            refused_code(run(&store, &groups, "dev-2", &credential, None).await),
            ErrorCode::Throttled
        );
        // Once the searches end, the refused request's place was given back.
        drop(occupied);
        let (group, ..) = accepted(run(&store, &groups, "dev-2", &credential, None).await);
        assert_eq!(group, "g07");
    }

    #[tokio::test]
    async fn after_the_recorded_groups_key_rotates_only_the_new_key_signs() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        accepted(
            run(
                &store,
                &groups,
                "dev-3",
                &token("dev-3", &key(5)),
                Some("g05"),
            )
            .await,
        );
        store
            .write(vec![put_group("g05", &key(250), &key(105))])
            .await
            .expect("rotate");
        let (group, primary, _) = accepted(
            run(
                &store,
                &groups,
                "dev-3",
                &token("dev-3", &key(250)),
                Some("g05"),
            )
            .await,
        );
        assert_eq!(group, "g05");
        assert_eq!(
            primary,
            symmetric_key::derive_device_key(&key(250), "dev-3").unwrap()
        );
        assert_eq!(
            refused_code(
                run(
                    &store,
                    &groups,
                    "dev-3",
                    &token("dev-3", &key(5)),
                    Some("g05")
                )
                .await
            ),
            ErrorCode::DeviceNotAttested
        );
    }

    #[tokio::test]
    async fn after_the_recorded_group_is_deleted_the_device_is_searched_for() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        accepted(
            run(
                &store,
                &groups,
                "dev-4",
                &token("dev-4", &key(9)),
                Some("g09"),
            )
            .await,
        );
        store
            .write(vec![Write::delete(
                Collection::EnrollmentGroups,
                "g09",
                Expect::Any,
            )])
            .await
            .expect("delete");
        assert_eq!(
            refused_code(
                run(
                    &store,
                    &groups,
                    "dev-4",
                    &token("dev-4", &key(9)),
                    Some("g09")
                )
                .await
            ),
            ErrorCode::DeviceNotAttested
        );
        // The device moved to another group: found although its record names the deleted one.
        let (group, ..) = accepted(
            run(
                &store,
                &groups,
                "dev-4",
                &token("dev-4", &key(33)),
                Some("g09"),
            )
            .await,
        );
        assert_eq!(group, "g33");
    }

    #[tokio::test]
    async fn forged_tokens_are_refused_with_and_without_a_recorded_group() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        let forged = token("dev-5", &key(222));
        for known in [None, Some("g01"), Some("no-such-group")] {
            assert_eq!(
                refused_code(run(&store, &groups, "dev-5", &forged, known).await),
                ErrorCode::DeviceNotAttested
            );
        }
        // A token for another registration id does not pass for this one.
        assert_eq!(
            refused_code(
                run(
                    &store,
                    &groups,
                    "dev-5",
                    &token("dev-6", &key(1)),
                    Some("g01")
                )
                .await
            ),
            ErrorCode::Unauthorized
        );
        // Signed with another device's key of the recorded group.
        let rid = "dev-5";
        let other = symmetric_key::derive_device_key(&key(1), "dev-6").unwrap();
        let stolen = DeviceCredential::Sas(SasToken::generate(
            &format!("{SCOPE}/registrations/{rid}"),
            &B64.decode(other).unwrap(),
            None,
            NOW + 60,
        ));
        assert_eq!(
            refused_code(run(&store, &groups, rid, &stolen, Some("g01")).await),
            ErrorCode::DeviceNotAttested
        );
    }

    #[tokio::test]
    async fn a_recently_matched_group_is_tried_first_and_answers_as_the_search_would() {
        let (_dir, store) = store_with_groups().await;
        // Before every `gNN` in id order, a group holds g10's secondary key as its primary.
        store
            .write(vec![put_group("f-early", &key(110), &key(251))])
            .await
            .expect("group");
        let groups = GroupCache::default();
        let (group, ..) =
            accepted(run(&store, &groups, "dev-a", &token("dev-a", &key(10)), None).await);
        assert_eq!(group, "g10");

        // Every search is refused now: another device of g10 is found among the recent groups.
        let occupied = groups.search().occupy();
        let (group, primary, secondary) =
            accepted(run(&store, &groups, "dev-b", &token("dev-b", &key(10)), None).await);
        assert_eq!(group, "g10");
        assert_eq!(
            (primary, secondary),
            (
                symmetric_key::derive_device_key(&key(10), "dev-b").unwrap(),
                symmetric_key::derive_device_key(&key(110), "dev-b").unwrap()
            )
        );
        // Signed with g10's secondary key, which f-early holds too: the search in id order
        // would answer f-early, and so does the recent group.
        let (group, primary, _) =
            accepted(run(&store, &groups, "dev-c", &token("dev-c", &key(110)), None).await);
        assert_eq!(group, "f-early");
        assert_eq!(
            primary,
            symmetric_key::derive_device_key(&key(110), "dev-c").unwrap()
        );
        // A device of a group that has not matched recently still needs a search.
        assert_eq!(
            refused_code(run(&store, &groups, "dev-d", &token("dev-d", &key(20)), None).await),
            ErrorCode::Throttled
        );
        drop(occupied);
        let (group, ..) =
            accepted(run(&store, &groups, "dev-d", &token("dev-d", &key(20)), None).await);
        assert_eq!(group, "g20");
    }

    #[tokio::test]
    async fn a_token_a_search_refused_is_refused_again_without_one_until_the_groups_change() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        let forged = token("dev-f", &key(222));
        assert_eq!(
            refused_code(run(&store, &groups, "dev-f", &forged, None).await),
            ErrorCode::DeviceNotAttested
        );
        let occupied = groups.search().occupy();
        // The same token again: refused as before, although no search may run.
        assert_eq!(
            refused_code(run(&store, &groups, "dev-f", &forged, None).await),
            ErrorCode::DeviceNotAttested
        );
        // Any other token for the id needs its own search: the id itself is never refused.
        assert_eq!(
            refused_code(run(&store, &groups, "dev-f", &token("dev-f", &key(3)), None).await),
            ErrorCode::Throttled
        );
        drop(occupied);
        // A write to the groups forgets what was refused: the token now signs for the new group.
        store
            .write(vec![put_group("g99", &key(222), &key(223))])
            .await
            .expect("group");
        let (group, ..) = accepted(run(&store, &groups, "dev-f", &forged, None).await);
        assert_eq!(group, "g99");
    }

    #[tokio::test]
    async fn a_signature_of_the_wrong_length_is_refused_before_any_group_is_tried() {
        let (_dir, store) = store_with_groups().await;
        let groups = GroupCache::default();
        let _occupied = groups.search().occupy();
        let short = DeviceCredential::Sas(format!(
            "SharedAccessSignature sr={SCOPE}%2Fregistrations%2Fdev-s&sig={}&se={}",
            B64.encode([7u8; 16]).replace('=', "%3D"),
            NOW + 60
        ));
        let failure = match run(&store, &groups, "dev-s", &short, None).await {
            Err(f) => f,
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(failure.code, ErrorCode::Unauthorized, "{failure:?}");
        assert!(
            failure.message.contains("signature (sig) is 16 bytes"),
            "{failure:?}"
        );
    }
}
