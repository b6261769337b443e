//! The CA that signs device certificates for registrations that send a CSR
//! (`muster_registration::issuance`).
//!
//! By default Muster's own intermediate: `issuing-ca.pem` / `issuing-ca.key` in the data
//! directory, created on first start under the local CA (ECDSA P-256, path length 0) and
//! created again when it no longer chains to the local CA (the local CA was replaced). The
//! device gets the chain leaf → issuing CA → local CA. With `issuing-ca-cert` /
//! `issuing-ca-key` the operator's intermediate (its PEM chain up to the root) signs instead.
//! The key file is written with mode 0600, like the local CA's.

use std::path::Path;

use muster_registration::IssuingCa;

use crate::config::Config;
use crate::tls::{LocalCa, TlsError};

/// File names inside the data directory.
pub const ISSUING_CERT_FILE: &str = "issuing-ca.pem";
pub const ISSUING_KEY_FILE: &str = "issuing-ca.key";

/// The issuing CA the configuration names, or Muster's own under `local`.
pub fn load(config: &Config, data_dir: &Path, local: &LocalCa) -> Result<IssuingCa, TlsError> {
    match (&config.issuing_ca_cert, &config.issuing_ca_key) {
        (Some(cert), Some(key)) => from_files(cert, key, None),
        _ => own(data_dir, local),
    }
}

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
