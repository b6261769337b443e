//! Secrets at rest. Collections that hold keys ([`Collection::is_secret`]: service settings
//! with the access policy keys, linked hubs with their connection strings) are stored sealed
//! with ChaCha20-Poly1305 under a 256-bit key kept in a file beside the database (mode 0600),
//! so a copy of the database alone reveals no key. The collection and record key are bound
//! as associated data, so a sealed body cannot be moved to another record.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

use crate::{Collection, StoreError};

const PREFIX: &str = "sealed:v1:";

pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Collection {
    /// Collections whose bodies hold secrets and are sealed at rest.
    pub fn is_secret(&self) -> bool {
        matches!(self, Collection::Settings | Collection::LinkedHubs)
    }
}

impl Sealer {
    /// Loads the key file, creating it (owner-only) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        let err = |what: &str, e: std::io::Error| {
            StoreError::Backend(format!("{what} the store key file {}: {e}", path.display()))
        };
        let key = match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let raw = B64.decode(text.trim()).map_err(|_| {
                    StoreError::Backend(format!(
                        "the store key file {} is not base64",
                        path.display()
                    ))
                })?;
                if raw.len() != 32 {
                    return Err(StoreError::Backend(format!(
                        "the store key file {} must hold 32 bytes",
                        path.display()
                    )));
                }
                raw
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut raw = vec![0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut raw);
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
                raw
            }
            Err(e) => return Err(err("reading", e)),
        };
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    fn aad(collection: Collection, key: &str) -> Vec<u8> {
        format!("{}\n{key}", collection.as_str()).into_bytes()
    }

    pub fn seal(
        &self,
        collection: Collection,
        key: &str,
        plain: &str,
    ) -> Result<String, StoreError> {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: &Self::aad(collection, key),
                },
            )
            .map_err(|_| StoreError::Backend("sealing a record failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", B64.encode(out)))
    }

    /// Opens a sealed body; bodies written before sealing existed pass through unchanged.
    pub fn open(
        &self,
        collection: Collection,
        key: &str,
        stored: &str,
    ) -> Result<String, StoreError> {
        let Some(b64) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let corrupt = |reason: &str| StoreError::Corrupt {
            collection: collection.as_str(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let raw = B64
            .decode(b64)
            .map_err(|_| corrupt("sealed body is not base64"))?;
        if raw.len() < 12 {
            return Err(corrupt("sealed body is too short"));
        }
        let (nonce, sealed) = raw.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &Self::aad(collection, key),
                },
            )
            .map_err(|_| corrupt("sealed body does not open with this data dir's key file"))?;
        String::from_utf8(plain).map_err(|_| corrupt("sealed body is not UTF-8"))
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
        let again = Sealer::load_or_create(&path).unwrap();
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
        assert_eq!(again.open(Collection::LinkedHubs, "x", "{}").unwrap(), "{}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
}
