//! Secrets at rest. Every collection whose records hold something that authenticates
//! ([`Collection::is_secret`]: individual enrollments and enrollment groups with their
//! attestation keys, the built-in hub's devices with their keys, service settings with the
//! access policy keys, linked hubs with their connection strings) is stored sealed: the whole
//! JSON body is encrypted with ChaCha20-Poly1305 under a 256-bit key kept in a file beside the
//! database (`muster.db.key`, mode 0600), so a copy of the database alone reveals no key. The
//! record's collection and key are bound as associated data, so a sealed body cannot be moved
//! to another record.
//!
//! Only the body is sealed: the record key (an id), partition, etag and collection stay in
//! clear, because they are what a store indexes, orders and filters by. None of them is a
//! secret.
//!
//! This module is the helper every store implementation uses, so callers above the
//! [`crate::Store`] never learn which collections are sealed:
//! - [`Sealer::seal_bytes`] / [`Sealer::open_bytes`] on every write and read of a store that
//!   keeps bytes (SQLite), or [`Sealer::seal_body`] / [`Sealer::open_body`] for one that keeps
//!   text (base64, a third larger);
//! - [`Sealer::key_check`] / [`Sealer::verify_key_check`]: a value sealed under the key when
//!   the database is first sealed and kept with it, so a wrong key file is reported as that
//!   ([`StoreError::SealingKeyMismatch`]) instead of as corrupt records;
//! - [`Sealer::load`] fails with [`StoreError::SealingKeyMissing`]: an implementation creates
//!   a new key ([`Sealer::create`]) only for a database that holds nothing sealed yet.

use std::borrow::Cow;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use muster_proto::runtime::{Entropy, OsEntropy};

use crate::{Collection, StoreError};

/// How a sealed body kept as text starts (version 1: ChaCha20-Poly1305, 12-byte random nonce,
/// base64). Stores that keep bytes use [`Sealer::seal_bytes`] instead; the SQLite store still
/// reads version 1 (the key check, and databases from before migration 3).
pub const SEALED_PREFIX: &str = "sealed:v1:";

/// The first byte of a sealed body kept as bytes ([`Sealer::seal_bytes`], version 2): then
/// the 12-byte random nonce, the ciphertext and the 16-byte tag, with nothing encoded. A
/// quarter smaller than version 1, which keeps a hub device record within one SQLite page.
pub const SEALED_BYTES_VERSION: u8 = 2;

const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;

/// Associated data of the key check; no collection is named like this, so the check value
/// can never be confused with a record body.
const KEY_CHECK_AAD: &[u8] = b"muster key check\n";
const KEY_CHECK_PLAIN: &[u8] = b"muster sealing key check v1";

pub struct Sealer {
    /// Keyed once: the key schedule is not repeated per record.
    cipher: ChaCha20Poly1305,
    path: PathBuf,
    /// Nonces (and a new key file's key) come from here.
    entropy: Arc<dyn Entropy>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Collection {
    /// Collections whose bodies hold something that authenticates, sealed at rest.
    pub fn is_secret(&self) -> bool {
        matches!(
            self,
            Collection::Enrollments
                | Collection::EnrollmentGroups
                | Collection::HubDevices
                | Collection::Settings
                | Collection::LinkedHubs
        )
    }
}

/// Whether a stored body is sealed (by any key).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

impl Sealer {
    /// Loads an existing key file; a missing one is [`StoreError::SealingKeyMissing`].
    /// Nonces come from the operating system.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        Self::load_with(path, Arc::new(OsEntropy))
    }

    /// [`Sealer::load`], with nonces from `entropy`.
    pub fn load_with(path: &Path, entropy: Arc<dyn Entropy>) -> Result<Self, StoreError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::SealingKeyMissing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "reading the sealing key file {}: {e}",
                    path.display()
                )))
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let raw = B64.decode(text.trim()).map_err(|_| {
            StoreError::Backend(format!(
                "the sealing key file {} is not base64",
                path.display()
            ))
        })?;
        if raw.len() != 32 {
            return Err(StoreError::Backend(format!(
                "the sealing key file {} must hold 32 bytes",
                path.display()
            )));
        }
        Ok(Self::from_key(&raw, path, entropy))
    }

    /// Creates a new random key file, owner-only; fails if one exists. The key and nonces come
    /// from the operating system.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        Self::create_with(path, Arc::new(OsEntropy))
    }

    /// [`Sealer::create`], with the key and nonces from `entropy`.
    pub fn create_with(path: &Path, entropy: Arc<dyn Entropy>) -> Result<Self, StoreError> {
        let err = |what: &str, e: std::io::Error| {
            StoreError::Backend(format!(
                "{what} the sealing key file {}: {e}",
                path.display()
            ))
        };
        let mut raw = vec![0u8; 32];
        entropy.fill(&mut raw);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| err("creating", e))?;
        f.write_all(B64.encode(&raw).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| err("writing", e))?;
        Ok(Self::from_key(&raw, path, entropy))
    }

    /// Loads the key file, creating it when missing. Only for a store that holds nothing
    /// sealed yet: for any other, a missing key must be reported, not replaced.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        Self::load_or_create_with(path, Arc::new(OsEntropy))
    }

    /// [`Sealer::load_or_create`], with a new key and nonces from `entropy`.
    pub fn load_or_create_with(path: &Path, entropy: Arc<dyn Entropy>) -> Result<Self, StoreError> {
        match Self::load_with(path, entropy.clone()) {
            Err(StoreError::SealingKeyMissing { .. }) => Self::create_with(path, entropy),
            other => other,
        }
    }

    fn from_key(raw: &[u8], path: &Path, entropy: Arc<dyn Entropy>) -> Self {
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(raw)),
            path: path.to_path_buf(),
            entropy,
        }
    }

    /// The key file this sealer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad(collection: Collection, key: &str) -> Vec<u8> {
        format!("{}\n{key}", collection.as_str()).into_bytes()
    }

    fn seal_raw(&self, plain: &[u8], aad: &[u8]) -> Result<String, StoreError> {
        let mut nonce = [0u8; 12];
        self.entropy.fill(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .map_err(|_| StoreError::Backend("sealing a record failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", B64.encode(out)))
    }

    /// `Err(reason)` when the body is not a sealed value this key opens.
    fn open_raw(&self, stored: &str, aad: &[u8]) -> Result<Vec<u8>, &'static str> {
        let b64 = stored
            .strip_prefix(SEALED_PREFIX)
            .ok_or("the record is not sealed")?;
        let raw = B64.decode(b64).map_err(|_| "sealed body is not base64")?;
        if raw.len() < 12 {
            return Err("sealed body is too short");
        }
        let (nonce, sealed) = raw.split_at(12);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .map_err(|_| "sealed body does not open with this data dir's key file")
    }

    /// Seals `plain` as the body of record `collection/key`.
    pub fn seal(
        &self,
        collection: Collection,
        key: &str,
        plain: &str,
    ) -> Result<String, StoreError> {
        self.seal_raw(plain.as_bytes(), &Self::aad(collection, key))
    }

    /// Opens the sealed body of record `collection/key`. A body that is not sealed, or not
    /// for this record, is corrupt: every secret body is sealed since schema version 2.
    pub fn open(
        &self,
        collection: Collection,
        key: &str,
        stored: &str,
    ) -> Result<String, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            collection: collection.as_str(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let plain = self
            .open_raw(stored, &Self::aad(collection, key))
            .map_err(corrupt)?;
        String::from_utf8(plain).map_err(|_| corrupt("sealed body is not UTF-8"))
    }

    /// Seals `plain` as the body of record `collection/key`, as bytes (version 2): one
    /// allocation, encrypted in place.
    pub fn seal_bytes(
        &self,
        collection: Collection,
        key: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let header = 1 + NONCE_BYTES;
        let mut out = Vec::with_capacity(header + plain.len() + TAG_BYTES);
        out.push(SEALED_BYTES_VERSION);
        out.resize(header, 0);
        self.entropy.fill(&mut out[1..header]);
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(header);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&head[1..]),
                &Self::aad(collection, key),
                body,
            )
            .map_err(|_| StoreError::Backend("sealing a record failed".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens a body sealed by [`Sealer::seal_bytes`] for record `collection/key`.
    pub fn open_bytes(
        &self,
        collection: Collection,
        key: &str,
        stored: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            collection: collection.as_str(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let (&version, rest) = stored
            .split_first()
            .ok_or_else(|| corrupt("sealed body is empty"))?;
        if version != SEALED_BYTES_VERSION {
            return Err(corrupt("sealed body has an unknown version"));
        }
        if rest.len() < NONCE_BYTES + TAG_BYTES {
            return Err(corrupt("sealed body is too short"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_BYTES);
        let (ciphertext, tag) = sealed.split_at(sealed.len() - TAG_BYTES);
        let mut plain = ciphertext.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                &Self::aad(collection, key),
                &mut plain,
                Tag::from_slice(tag),
            )
            .map_err(|_| corrupt("sealed body does not open with this data dir's key file"))?;
        Ok(plain)
    }

    /// The body to store: sealed for a secret collection, `text` itself otherwise.
    pub fn seal_body(
        &self,
        collection: Collection,
        key: &str,
        text: String,
    ) -> Result<String, StoreError> {
        if collection.is_secret() {
            self.seal(collection, key, &text)
        } else {
            Ok(text)
        }
    }

    /// The JSON text of a stored body: opened for a secret collection, as stored otherwise.
    pub fn open_body<'a>(
        &self,
        collection: Collection,
        key: &str,
        stored: &'a str,
    ) -> Result<Cow<'a, str>, StoreError> {
        if collection.is_secret() {
            self.open(collection, key, stored).map(Cow::Owned)
        } else {
            Ok(Cow::Borrowed(stored))
        }
    }

    /// A value sealed under this key, to keep with the database it seals.
    pub fn key_check(&self) -> Result<String, StoreError> {
        self.seal_raw(KEY_CHECK_PLAIN, KEY_CHECK_AAD)
    }

    /// Whether `check` (from [`Sealer::key_check`], kept with the database `db`) was made by
    /// this key; [`StoreError::SealingKeyMismatch`] when not.
    pub fn verify_key_check(&self, check: &str, db: &Path) -> Result<(), StoreError> {
        match self.open_raw(check, KEY_CHECK_AAD) {
            Ok(plain) if plain == KEY_CHECK_PLAIN => Ok(()),
            _ => Err(self.mismatch(db)),
        }
    }

    /// The error for a key that does not open the database `db`.
    pub fn mismatch(&self, db: &Path) -> StoreError {
        StoreError::SealingKeyMismatch {
            key: self.path.clone(),
            db: db.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_binds_to_the_record_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        let s = Sealer::load_or_create(&path).unwrap();
        let sealed = s
            .seal(Collection::LinkedHubs, "hub.a", "{\"k\":\"secret\"}")
            .unwrap();
        assert!(!sealed.contains("secret"));
        let again = Sealer::load(&path).unwrap();
        assert_eq!(
            again
                .open(Collection::LinkedHubs, "hub.a", &sealed)
                .unwrap(),
            "{\"k\":\"secret\"}"
        );
        assert!(
            again
                .open(Collection::LinkedHubs, "hub.b", &sealed)
                .is_err(),
            "bound to its record"
        );
        assert!(
            matches!(
                again.open(Collection::LinkedHubs, "x", "{}"),
                Err(StoreError::Corrupt { .. })
            ),
            "a secret body in clear is refused"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn nonces_come_from_the_entropy_passed_in() {
        use muster_proto::runtime::SeededEntropy;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let seal = |s: &Sealer| s.seal(Collection::Settings, "x", "{}").unwrap();
        Sealer::create(&path).unwrap();
        let first = Sealer::load_with(&path, Arc::new(SeededEntropy::new(7))).unwrap();
        let again = Sealer::load_with(&path, Arc::new(SeededEntropy::new(7))).unwrap();
        // Same key, same entropy: the same nonce, so the same sealed value.
        assert_eq!(seal(&first), seal(&again));
        // Each seal draws a new nonce.
        assert_ne!(seal(&first), seal(&first));
    }

    #[test]
    fn sealed_bytes_are_bound_to_their_record_and_smaller_than_text() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::create(&dir.path().join("k")).unwrap();
        let plain = format!("{{\"primaryKey\":\"{}\"}}", "s".repeat(800));
        let sealed = s
            .seal_bytes(Collection::HubDevices, "hub/dev", plain.as_bytes())
            .unwrap();
        assert_eq!(sealed.len(), 1 + 12 + plain.len() + 16);
        assert!(!sealed.windows(8).any(|w| w == b"ssssssss"));
        assert_eq!(
            s.open_bytes(Collection::HubDevices, "hub/dev", &sealed)
                .unwrap(),
            plain.as_bytes()
        );
        for (collection, key) in [
            (Collection::HubDevices, "hub/other"),
            (Collection::Enrollments, "hub/dev"),
        ] {
            assert!(matches!(
                s.open_bytes(collection, key, &sealed),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert!(s
            .open_bytes(Collection::HubDevices, "hub/dev", &tampered)
            .is_err());
        for short in [&sealed[..0], &sealed[..20]] {
            assert!(s
                .open_bytes(Collection::HubDevices, "hub/dev", short)
                .is_err());
        }
        let text = s.seal(Collection::HubDevices, "hub/dev", &plain).unwrap();
        // Base64 and the prefix make the text form a third larger.
        assert!(
            sealed.len() * 4 <= text.len() * 3,
            "{} vs {}",
            sealed.len(),
            text.len()
        );
    }

    #[test]
    fn only_secret_collections_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::create(&dir.path().join("k")).unwrap();
        for c in Collection::ALL {
            let body = s.seal_body(*c, "id", "{\"a\":1}".into()).unwrap();
            assert_eq!(is_sealed(&body), c.is_secret(), "{c:?}");
            assert_eq!(s.open_body(*c, "id", &body).unwrap(), "{\"a\":1}");
        }
    }

    #[test]
    fn key_check_tells_a_wrong_or_missing_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("muster.db");
        let right = Sealer::create(&dir.path().join("a.key")).unwrap();
        let wrong = Sealer::create(&dir.path().join("b.key")).unwrap();
        let check = right.key_check().unwrap();
        right.verify_key_check(&check, &db).unwrap();
        let err = wrong.verify_key_check(&check, &db).unwrap_err();
        assert!(
            matches!(err, StoreError::SealingKeyMismatch { .. }),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with("sealing key does not open this database"));
        // A record body is never accepted as a key check, nor the reverse.
        let body = right.seal(Collection::Settings, "x", "{}").unwrap();
        assert!(right.verify_key_check(&body, &db).is_err());

        let err = Sealer::load(&dir.path().join("muster.db.key")).unwrap_err();
        assert!(
            matches!(err, StoreError::SealingKeyMissing { .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("sealing key missing: "));
        assert!(err.to_string().contains("muster.db.key"));
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore = "ad-hoc measurement"]
    fn seal_and_open_cost() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::create(&dir.path().join("k")).unwrap();
        let body = format!("{{\"device\":\"{}\"}}", "x".repeat(880));
        let n = 20_000;
        let t = std::time::Instant::now();
        let mut last = String::new();
        for _ in 0..n {
            last = s
                .seal_body(Collection::HubDevices, "hub/dev", body.clone())
                .unwrap();
        }
        let seal = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            let _ = s
                .open_body(Collection::HubDevices, "hub/dev", &last)
                .unwrap();
        }
        eprintln!(
            "seal {seal:?}, open {:?} per ~900-byte body",
            t.elapsed() / n
        );
    }
}
