//! [`Tpm`] (cargo feature `tpm`): a device whose keys live in a TPM 2.0, driven through the
//! TSS 2.0 ESAPI (`tss-esapi` over Debian's libtss2) as the Azure device SDKs drive theirs
//! (device-protocol.md §7), and [`DeviceClient::register_tpm`], the HTTPS challenge flow.
//!
//! - The EK is the persistent object at [`EK_HANDLE`] when there is one, else it is created
//!   from the TCG default RSA-2048 template and persisted there; the SRK likewise at
//!   [`SRK_HANDLE`] (RSA-2048, AES-128-CFB, the SDKs' template). Both are sent as their
//!   `TPM2B_PUBLIC` marshalling.
//! - An activation blob (§7.3) is taken in with TPM2_ActivateCredential (the EK under a
//!   PolicySecret(endorsement) session) for the inner wrap key, then TPM2_Import under the
//!   SRK and TPM2_Load. SAS strings are signed with TPM2_HMAC(SHA-256) inside the TPM: the
//!   key never leaves it.
//! - After an assignment the hub key's blob is imported the same way and persisted at
//!   [`DEVICE_KEY_HANDLE`] (where the C, C# and Node SDKs keep it), for signing the hub's
//!   SAS tokens later ([`Tpm::load_device_key`], [`Tpm::sas_token`]).
//!
//! Every transient object this loads (keys, sessions) is flushed again: a TPM without a
//! resource manager (swtpm, `/dev/tpm0`) keeps them across connections otherwise.
//! The ESAPI context is not `Send`, so neither are the futures that hold a [`Tpm`].

use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::SasToken;
use serde_json::{json, Value};
use tss_esapi::abstraction::{ek, DefaultKey};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, PublicAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public,
    PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use crate::device::{Auth, DeviceClient, RegisterOptions, Registration, Transport};
use crate::error::{Error, Result};

/// Where the SDKs keep the endorsement key.
pub const EK_HANDLE: u32 = 0x8101_0001;
/// Where the SDKs keep the storage root key.
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// Where the SDKs keep the device's hub key after registration.
pub const DEVICE_KEY_HANDLE: u32 = 0x8100_0100;
/// The kernel's resource-managed TPM device, the default TCTI.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

fn tpm_err(what: &str) -> impl FnOnce(tss_esapi::Error) -> Error + '_ {
    move |e| Error::Tpm(format!("{what}: {e}"))
}

/// The key the TPM signs with: loaded here (flushed on drop) or a persistent object.
#[derive(Clone, Copy)]
enum SigningKey {
    Transient(KeyHandle),
    Persistent(KeyHandle),
}

/// One TPM, through one TCTI connection.
pub struct Tpm {
    ctx: Context,
    ek: KeyHandle,
    srk: KeyHandle,
    key: Option<SigningKey>,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").finish_non_exhaustive()
    }
}

impl Tpm {
    /// Connects through `tcti` (e.g. `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
    /// `tabrmd`) and makes sure the EK and SRK exist at their persistent handles.
    pub fn open(tcti: &str) -> Result<Self> {
        let conf = TctiNameConf::from_str(tcti)
            .map_err(|e| Error::InvalidInput(format!("TCTI '{tcti}': {e}")))?;
        let mut ctx = Context::new(conf).map_err(tpm_err("connecting to the TPM"))?;
        let ek = match persistent(&mut ctx, EK_HANDLE)? {
            Some(h) => h,
            None => {
                let created = ctx
                    .execute_with_nullauth_session(|c| {
                        ek::create_ek_object(c, AsymmetricAlgorithm::Rsa, DefaultKey)
                    })
                    .map_err(tpm_err("creating the endorsement key"))?;
                persist(&mut ctx, created, EK_HANDLE)?
            }
        };
        let srk = match persistent(&mut ctx, SRK_HANDLE)? {
            Some(h) => h,
            None => {
                let template = srk_template()?;
                let created = ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                    })
                    .map_err(tpm_err("creating the storage root key"))?
                    .key_handle;
                persist(&mut ctx, created, SRK_HANDLE)?
            }
        };
        Ok(Tpm {
            ctx,
            ek,
            srk,
            key: None,
        })
    }

    fn tpm2b_public(&mut self, handle: KeyHandle, what: &str) -> Result<Vec<u8>> {
        let (public, _, _) = self
            .ctx
            .execute_without_session(|c| c.read_public(handle))
            .map_err(tpm_err(what))?;
        let tpmt = public.marshall().map_err(tpm_err(what))?;
        let size = u16::try_from(tpmt.len())
            .map_err(|_| Error::Tpm(format!("{what}: public area too long")))?;
        let mut out = size.to_be_bytes().to_vec();
        out.extend_from_slice(&tpmt);
        Ok(out)
    }

    /// The EK's `TPM2B_PUBLIC`, what an enrollment holds (base64).
    pub fn endorsement_key(&mut self) -> Result<Vec<u8>> {
        self.tpm2b_public(self.ek, "reading the endorsement key")
    }

    /// The SRK's `TPM2B_PUBLIC`.
    pub fn storage_root_key(&mut self) -> Result<Vec<u8>> {
        self.tpm2b_public(self.srk, "reading the storage root key")
    }

    /// The registration id the C and Node SDKs derive from the EK (§7.2).
    pub fn registration_id(&mut self) -> Result<String> {
        Ok(muster_attestation::tpm::registration_id(
            &self.endorsement_key()?,
        ))
    }

    /// Takes in an activation blob (§7.3): ActivateCredential, Import and Load. The loaded key
    /// signs from then on ([`Tpm::hmac`]); a key loaded before is flushed.
    pub fn activate(&mut self, blob: &[u8]) -> Result<()> {
        let parts = tpm2b_parts(blob)?;
        let id_object = IdObject::try_from(parts[0].to_vec()).map_err(blob_err("credential"))?;
        let secret = EncryptedSecret::try_from(parts[1].to_vec()).map_err(blob_err("secret"))?;
        let duplicate = Private::try_from(parts[2].to_vec()).map_err(blob_err("duplicate"))?;
        let seed = EncryptedSecret::try_from(parts[3].to_vec()).map_err(blob_err("seed"))?;
        let public = Public::unmarshall(parts[4]).map_err(blob_err("public area"))?;

        let inner = self.activate_credential(id_object, secret)?;
        let srk = self.srk;
        let encryption_key =
            Data::try_from(inner.value().to_vec()).map_err(tpm_err("the activated credential"))?;
        let private = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.import(
                    srk.into(),
                    Some(encryption_key),
                    public.clone(),
                    duplicate,
                    seed,
                    SymmetricDefinitionObject::AES_128_CFB,
                )
            })
            .map_err(tpm_err("TPM2_Import of the issued key"))?;
        let loaded = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(srk, private, public)
            })
            .map_err(tpm_err("TPM2_Load of the issued key"))?;
        self.release_key();
        self.key = Some(SigningKey::Transient(loaded));
        Ok(())
    }

    /// TPM2_ActivateCredential with the SRK as the activated object and the EK under a
    /// PolicySecret(endorsement) session; returns the inner wrap key.
    fn activate_credential(
        &mut self,
        id_object: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Digest> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm_err("starting a policy session"))?
            .ok_or_else(|| Error::Tpm("the TPM started no policy session".into()))?;
        let (srk, ek) = (self.srk, self.ek);
        let result = PolicySession::try_from(session)
            .map_err(tpm_err("the policy session"))
            .and_then(|policy| {
                self.ctx
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.policy_secret(
                            policy,
                            AuthHandle::Endorsement,
                            Nonce::default(),
                            Digest::default(),
                            Nonce::default(),
                            None,
                        )
                    })
                    .map_err(tpm_err("PolicySecret(endorsement)"))
            })
            .and_then(|_| {
                self.ctx
                    .execute_with_sessions(
                        (Some(AuthSession::Password), Some(session), None),
                        |c| c.activate_credential(srk, ek, id_object, secret),
                    )
                    .map_err(tpm_err("TPM2_ActivateCredential"))
            });
        // The command consumes a session without continueSession; flush it otherwise.
        let _ = self
            .ctx
            .flush_context(ObjectHandle::from(SessionHandle::from(session)));
        result
    }

    /// Persists the loaded key at [`DEVICE_KEY_HANDLE`], replacing what was there.
    pub fn persist_key(&mut self) -> Result<()> {
        let Some(SigningKey::Transient(key)) = self.key else {
            return Err(Error::Tpm("no activated key to persist".into()));
        };
        if let Some(old) = persistent(&mut self.ctx, DEVICE_KEY_HANDLE)? {
            evict(&mut self.ctx, old.into(), DEVICE_KEY_HANDLE)?;
        }
        let handle = evict(&mut self.ctx, key.into(), DEVICE_KEY_HANDLE)?;
        self.release_key();
        self.key = Some(SigningKey::Persistent(handle.into()));
        Ok(())
    }

    /// Signs with the key persisted at [`DEVICE_KEY_HANDLE`] (after a registration).
    pub fn load_device_key(&mut self) -> Result<()> {
        let handle = persistent(&mut self.ctx, DEVICE_KEY_HANDLE)?.ok_or_else(|| {
            Error::Tpm(format!(
                "no device key at {DEVICE_KEY_HANDLE:#x}: register the device first"
            ))
        })?;
        self.release_key();
        self.key = Some(SigningKey::Persistent(handle));
        Ok(())
    }

    /// HMAC-SHA256 of `data` (at most 1024 bytes) inside the TPM with the current key.
    pub fn hmac(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let key = match self.key {
            Some(SigningKey::Transient(k) | SigningKey::Persistent(k)) => k,
            None => return Err(Error::Tpm("no key to sign with: activate one first".into())),
        };
        let buffer = MaxBuffer::try_from(data.to_vec()).map_err(|_| {
            Error::InvalidInput("the data to sign is longer than 1024 bytes".into())
        })?;
        let digest = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.hmac(key.into(), buffer, HashingAlgorithm::Sha256)
            })
            .map_err(tpm_err("TPM2_HMAC"))?;
        Ok(digest.value().to_vec())
    }

    /// A SAS token for `resource`, signed in the TPM with the current key.
    pub fn sas_token(
        &mut self,
        resource: &str,
        key_name: Option<&str>,
        expiry: i64,
    ) -> Result<String> {
        SasToken::generate_with(resource, key_name, expiry, |m| self.hmac(m.as_bytes()))
    }

    fn release_key(&mut self) {
        if let Some(SigningKey::Transient(k)) = self.key.take() {
            let _ = self.ctx.flush_context(k.into());
        }
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        self.release_key();
    }
}

fn blob_err(what: &'static str) -> impl FnOnce(tss_esapi::Error) -> Error {
    move |e| Error::Tpm(format!("the activation blob's {what}: {e}"))
}

/// The persistent object at `handle`, if there is one (asked with TPM2_GetCapability, so an
/// absent handle logs no TPM error).
fn persistent(ctx: &mut Context, handle: u32) -> Result<Option<KeyHandle>> {
    let tpm_handle = PersistentTpmHandle::new(handle)
        .map_err(|e| Error::Tpm(format!("handle {handle:#x}: {e}")))?;
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, handle, 1)
        .map_err(tpm_err("listing the persistent handles"))?;
    let present = match data {
        CapabilityData::Handles(list) => list
            .iter()
            .any(|h| matches!(h, TpmHandle::Persistent(p) if u32::from(*p) == handle)),
        _ => false,
    };
    if !present {
        return Ok(None);
    }
    let object = ctx
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
        .map_err(tpm_err("reading a persistent object"))?;
    Ok(Some(object.into()))
}

/// TPM2_EvictControl: makes `object` persistent at `handle`, or removes the persistent one.
fn evict(ctx: &mut Context, object: ObjectHandle, handle: u32) -> Result<ObjectHandle> {
    let tpm_handle = PersistentTpmHandle::new(handle)
        .map_err(|e| Error::Tpm(format!("handle {handle:#x}: {e}")))?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.evict_control(Provision::Owner, object, Persistent::Persistent(tpm_handle))
    })
    .map_err(|e| Error::Tpm(format!("TPM2_EvictControl at {handle:#x}: {e}")))
}

/// Persists a transient primary at `handle` and flushes the transient copy.
fn persist(ctx: &mut Context, created: KeyHandle, handle: u32) -> Result<KeyHandle> {
    let persisted = evict(ctx, created.into(), handle);
    let _ = ctx.flush_context(created.into());
    Ok(persisted?.into())
}

/// The SDKs' SRK template (§7.2): RSA-2048 restricted decryption key, AES-128-CFB.
fn srk_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tpm_err("the SRK template"))?;
    let parameters = PublicRsaParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        RsaKeyBits::Rsa2048,
        RsaExponent::default(),
    )
    .build()
    .map_err(tpm_err("the SRK template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(tpm_err("the SRK template"))
}

/// The contents of the blob's TPM2B parts (u16 size ‖ bytes): at least the five a device
/// uses (the sixth, "encrypted URI data", is ignored).
fn tpm2b_parts(blob: &[u8]) -> Result<Vec<&[u8]>> {
    let mut parts = Vec::new();
    let mut rest = blob;
    while rest.len() >= 2 {
        let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let part = rest
            .get(2..2 + n)
            .ok_or_else(|| Error::Tpm("the activation blob is truncated".into()))?;
        parts.push(part);
        rest = &rest[2 + n..];
    }
    if !rest.is_empty() || parts.len() < 5 {
        return Err(Error::Tpm(format!(
            "the activation blob has {} parts, expected 6",
            parts.len()
        )));
    }
    Ok(parts)
}

impl DeviceClient {
    /// Registers the device whose EK is in `tpm` over HTTPS (§7.1): the first request sends
    /// the EK and SRK without credentials, the 401 answer's activation blob is taken into the
    /// TPM, and the registration is sent again with a SAS token the TPM signs. When assigned,
    /// the hub key's blob from the answer is taken in and persisted at
    /// [`DEVICE_KEY_HANDLE`]. Retries and polling as [`DeviceClient::register`].
    pub async fn register_tpm(
        &self,
        registration_id: &str,
        tpm: &mut Tpm,
        options: &RegisterOptions,
    ) -> Result<Registration> {
        if options.transport != Transport::Https {
            return Err(Error::InvalidInput(
                "TPM attestation is supported over HTTPS (no device SDK does it over MQTT)".into(),
            ));
        }
        let body = json!({
            "endorsementKey": B64.encode(tpm.endorsement_key()?),
            "storageRootKey": B64.encode(tpm.storage_root_key()?),
        });
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .register_tpm_once(registration_id, tpm, &body, options)
                .await;
            match result {
                Ok(mut r) => {
                    r.attempts = attempt;
                    if r.is_assigned() {
                        let blob = r
                            .state
                            .tpm
                            .as_ref()
                            .map(|t| t.authentication_key.as_str())
                            .ok_or_else(|| {
                                Error::Tpm("the assignment carries no tpm.authenticationKey".into())
                            })?;
                        let blob = B64.decode(blob).map_err(|_| {
                            Error::Tpm(
                                "the assignment's tpm.authenticationKey is not base64".into(),
                            )
                        })?;
                        tpm.activate(&blob)?;
                        tpm.persist_key()?;
                    }
                    return Ok(r);
                }
                Err(e) if e.is_transient() && attempt < self.retry_policy().max_attempts.max(1) => {
                    tokio::time::sleep(self.retry_policy().wait(e.retry_after(), attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn register_tpm_once(
        &self,
        registration_id: &str,
        tpm: &mut Tpm,
        tpm_body: &Value,
        options: &RegisterOptions,
    ) -> Result<Registration> {
        let (blob, key_name) = self
            .tpm_challenge(registration_id, tpm_body, options)
            .await?;
        tpm.activate(&blob)?;
        let token = tpm.sas_token(
            &format!("{}/registrations/{registration_id}", self.id_scope()),
            Some(&key_name),
            crate::unix_now() + 3600,
        )?;
        let auth = Auth::Token {
            token,
            tpm: Some(tpm_body.clone()),
        };
        self.register_https(registration_id, &auth, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_parts_are_checked() {
        let mut blob = Vec::new();
        for n in [3u16, 1, 2, 0, 4, 0] {
            blob.extend_from_slice(&n.to_be_bytes());
            blob.extend(std::iter::repeat_n(7u8, n as usize));
        }
        let parts = tpm2b_parts(&blob).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [3, 1, 2, 0, 4, 0]
        );
        assert!(tpm2b_parts(&blob[..blob.len() - 3]).is_err());
        assert!(tpm2b_parts(&blob[..9]).is_err());
    }
}
