//! The CA that signs device certificates for registrations that send a CSR
//! (`muster_registration::issuance`).
//!
//! By default Muster's own intermediate: `issuing-ca.pem` / `issuing-ca.key` in the data
//! directory, created on first start under the local CA (ECDSA P-256, path length 0) and
//! created again when it no longer chains to the local CA (the local CA was replaced). The
//! device gets the chain leaf → issuing CA → local CA. With `issuing-ca-cert` /
//! `issuing-ca-key` the operator's intermediate (its PEM chain up to the root) signs instead.
//! Muster's own key file is written with mode 0600, like the local CA's.
//!
//! Operator CAs are kept in the store, sealed with the sealing key like every other secret
//! (a `Settings` record `issuing-ca/{name}` holding the PEM chain and key): [`import`] checks
//! and stores them (the `[[issuing-cas]]` entries, `--issuing-ca NAME=CERT,KEY`, and the
//! `issuing-ca-cert`/`-key` pair under the name `local`) at start, and [`load_all`] reads every
//! stored one, so after the first start the files need not stay on disk; importing again
//! under the same name rotates the CA. A stored `local` replaces Muster's own intermediate.

use std::path::Path;

use muster_proto::issued_certificate::LOCAL_ISSUING_CA;
use muster_proto::Timestamp;
use muster_registration::IssuingCa;
use muster_store::{Collection, Expect, Store, Write};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::tls::{LocalCa, TlsError};

/// Settings keys of stored operator CAs start with this.
pub const STORED_PREFIX: &str = "issuing-ca/";

/// A stored operator CA (sealed at rest: `Settings` is a secret collection).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredCa {
    name: String,
    certificate_pem: String,
    key_pem: String,
    imported_at_utc: Timestamp,
}

/// Issuing CA names: 1 to 64 of `a-z 0-9 - _ .`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "issuing CA name '{name}' must be 1 to 64 characters of a-z, 0-9, '-', '_', '.'"
        ))
    }
}

/// Why an operator CA could not be imported or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Files(#[from] TlsError),
    #[error("issuing CA '{name}': {reason}")]
    Invalid { name: String, reason: String },
    #[error("issuing CA '{name}': {source}")]
    Store {
        name: String,
        source: muster_store::StoreError,
    },
}

/// Checks the PEM chain and key files of operator CA `name` and stores them sealed,
/// replacing a CA stored under that name before.
pub async fn import(
    store: &dyn Store,
    name: &str,
    cert: &Path,
    key: &Path,
    now: Timestamp,
) -> Result<(), ImportError> {
    let invalid = |reason: String| ImportError::Invalid {
        name: name.to_string(),
        reason,
    };
    check_name(name).map_err(invalid)?;
    let certificate_pem = crate::tls::read_pem(cert)?;
    let key_pem = crate::tls::read_pem(key)?;
    // Refuse what would not sign before anything is stored.
    let chain = crate::tls::pem_certificates(cert, certificate_pem.as_bytes())?;
    IssuingCa::new(chain, &key_pem).map_err(|e| invalid(e.to_string()))?;
    let stored = StoredCa {
        name: name.to_string(),
        certificate_pem,
        key_pem,
        imported_at_utc: now,
    };
    let body = serde_json::to_value(&stored).map_err(|e| invalid(e.to_string()))?;
    store
        .write(vec![Write::put(
            Collection::Settings,
            format!("{STORED_PREFIX}{name}"),
            Expect::Any,
            body,
        )])
        .await
        .map_err(|source| ImportError::Store {
            name: name.to_string(),
            source,
        })?;
    tracing::info!(issuing_ca = name, cert = %cert.display(), "imported an issuing CA into the store (sealed)");
    Ok(())
}

/// Imports what the configuration names, then loads every issuing CA: `local` (a stored
/// operator CA under that name, else Muster's own) and each stored operator CA.
pub async fn load_all(
    config: &Config,
    data_dir: &Path,
    local: &LocalCa,
    store: &dyn Store,
    now: Timestamp,
) -> Result<Vec<(String, IssuingCa)>, ImportError> {
    if let (Some(cert), Some(key)) = (&config.issuing_ca_cert, &config.issuing_ca_key) {
        import(store, LOCAL_ISSUING_CA, cert, key, now).await?;
    }
    for ca in &config.issuing_cas {
        import(store, &ca.name, &ca.cert, &ca.key, now).await?;
    }
    let settings = muster_store::records::list_all(store, Collection::Settings, 100)
        .await
        .map_err(|source| ImportError::Store {
            name: "*".into(),
            source,
        })?;
    let mut out = Vec::new();
    for record in settings
        .into_iter()
        .filter(|r| r.key.starts_with(STORED_PREFIX))
    {
        let name = record.key[STORED_PREFIX.len()..].to_string();
        let invalid = |reason: String| ImportError::Invalid {
            name: name.clone(),
            reason,
        };
        let stored: StoredCa =
            serde_json::from_value(record.body).map_err(|e| invalid(e.to_string()))?;
        let path = Path::new("<store>");
        let chain = crate::tls::pem_certificates(path, stored.certificate_pem.as_bytes())?;
        let ca = IssuingCa::new(chain, &stored.key_pem).map_err(|e| invalid(e.to_string()))?;
        out.push((name, ca));
    }
    if !out.iter().any(|(n, _)| n == LOCAL_ISSUING_CA) {
        out.push((LOCAL_ISSUING_CA.to_string(), own(data_dir, local)?));
    }
    Ok(out)
}

/// File names inside the data directory.
pub const ISSUING_CERT_FILE: &str = "issuing-ca.pem";
pub const ISSUING_KEY_FILE: &str = "issuing-ca.key";

/// Muster's intermediate, created when missing or no longer issued by `local`.
fn own(dir: &Path, local: &LocalCa) -> Result<IssuingCa, TlsError> {
    let cert = dir.join(ISSUING_CERT_FILE);
    let key = dir.join(ISSUING_KEY_FILE);
    if cert.exists() && key.exists() {
        if let Ok(ca) = from_files(&cert, &key, Some(local)) {
            return Ok(ca);
        }
        tracing::warn!(cert = %cert.display(), "the issuing CA does not chain to the local CA or does not load; creating a new one");
    }
    let (cert_pem, key_pem) = local.issue_intermediate("Muster Device Issuing CA")?;
    // Key first: a lone key is replaced at the next start.
    crate::tls::write_private(&key, key_pem.as_bytes())?;
    crate::tls::write_public(&cert, cert_pem.as_bytes())?;
    from_files(&cert, &key, Some(local))
}

/// Reads a PEM chain and key; with `local`, the chain is completed with the local CA and
/// must be issued by it.
fn from_files(cert: &Path, key: &Path, local: Option<&LocalCa>) -> Result<IssuingCa, TlsError> {
    let pem = crate::tls::read_pem(cert)?;
    let mut chain: Vec<Vec<u8>> = crate::tls::pem_certificates(cert, pem.as_bytes())?;
    if let Some(local) = local {
        let root = local.cert_der().to_vec();
        let first = chain.first().ok_or_else(|| TlsError::NoCertificate {
            path: cert.to_path_buf(),
        })?;
        muster_attestation::verify_signed_by(first, &root).map_err(|e| {
            TlsError::InvalidCertificate {
                path: cert.to_path_buf(),
                reason: format!("not issued by the local CA: {e}"),
            }
        })?;
        chain.truncate(1);
        chain.push(root);
    }
    let key_pem = crate::tls::read_pem(key)?;
    IssuingCa::new(chain, &key_pem).map_err(|e| TlsError::InvalidCertificate {
        path: cert.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_and_replaced_with_the_local_ca() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalCa::load_or_create(dir.path()).unwrap();
        let first = own(dir.path(), &local).unwrap();
        assert_eq!(first.chain().len(), 2);
        assert_eq!(first.chain()[1], local.cert_der().to_vec());
        let again = own(dir.path(), &local).unwrap();
        assert_eq!(again.chain(), first.chain());
        // Another local CA: the intermediate is issued again under it.
        let other_dir = tempfile::tempdir().unwrap();
        let other = LocalCa::load_or_create(other_dir.path()).unwrap();
        let replaced = own(dir.path(), &other).unwrap();
        assert_ne!(replaced.chain()[0], first.chain()[0]);
        assert_eq!(replaced.chain()[1], other.cert_der().to_vec());
    }
}
