//! The server certificate every TLS listener presents, replaceable while the server runs.
//!
//! [`ServerCertificate`] is one `Arc<dyn ResolvesServerCert>` shared by every listener's
//! rustls configuration (HTTPS and MQTT today; a later listener takes the same `Arc`), so a
//! swapped certificate reaches every new handshake at once while open connections keep the
//! one they negotiated. [`CertificateFiles`] re-reads the certificate and key files
//! ([`watch`] polls them every few seconds and on demand, e.g. SIGHUP): a changed pair that
//! loads replaces the certificate; one that does not (half-written, mismatched, not PEM)
//! keeps the old certificate and logs one warning per distinct bad pair.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::{watch as shutdown_watch, Notify};

use crate::tls::{ServerIdentity, TlsError};

/// The certificate handed to new TLS connections.
pub struct ServerCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCertificate").finish_non_exhaustive()
    }
}

impl ServerCertificate {
    pub fn new(identity: &ServerIdentity) -> Result<Arc<ServerCertificate>, TlsError> {
        Ok(Arc::new(ServerCertificate {
            current: RwLock::new(identity.certified_key()?),
        }))
    }

    /// The certificate new connections get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a whole `Arc` (the write is one assignment).
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// Same bytes as the certificate in use (or as the bad pair already warned about).
    Unchanged,
    /// New files loaded; new connections get them.
    Replaced,
    /// New files that do not load; the old certificate stays.
    Refused(TlsError),
}

/// The certificate and key files behind a [`ServerCertificate`], and what was last read.
pub struct CertificateFiles {
    cert_path: PathBuf,
    key_path: PathBuf,
    target: Arc<ServerCertificate>,
    /// The bytes of the pair in use, so an unchanged pair is not parsed again.
    loaded: (Vec<u8>, Vec<u8>),
    /// The last pair that failed, so it is warned about once.
    refused: Option<(Vec<u8>, Vec<u8>)>,
}

impl CertificateFiles {
    /// Files `identity` was read from, now served through `target`.
    pub fn new(identity: &ServerIdentity, target: Arc<ServerCertificate>) -> CertificateFiles {
        let loaded = (
            std::fs::read(identity.cert_path()).unwrap_or_default(),
            std::fs::read(identity.key_path()).unwrap_or_default(),
        );
        CertificateFiles {
            cert_path: identity.cert_path().to_path_buf(),
            key_path: identity.key_path().to_path_buf(),
            target,
            loaded,
            refused: None,
        }
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Reads both files; loads them into the target if they changed and are a usable pair.
    pub fn check(&mut self) -> Reload {
        let read = |p: &Path| std::fs::read(p).map_err(|e| (p.to_path_buf(), e));
        let pair = match (read(&self.cert_path), read(&self.key_path)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err((path, source)), _) | (_, Err((path, source))) => {
                // A missing file is reported once, like any other bad pair.
                let marker = (path.as_os_str().as_encoded_bytes().to_vec(), Vec::new());
                if self.refused.as_ref() == Some(&marker) {
                    return Reload::Unchanged;
                }
                self.refused = Some(marker);
                return Reload::Refused(TlsError::Io {
                    action: "read",
                    path,
                    source,
                });
            }
        };
        if pair == self.loaded || self.refused.as_ref() == Some(&pair) {
            return Reload::Unchanged;
        }
        let loaded =
            ServerIdentity::from_pem_bytes(&self.cert_path, &pair.0, &self.key_path, &pair.1)
                .and_then(|identity| identity.certified_key());
        match loaded {
            Ok(key) => {
                self.target.replace(key);
                self.loaded = pair;
                self.refused = None;
                Reload::Replaced
            }
            Err(e) => {
                self.refused = Some(pair);
                Reload::Refused(e)
            }
        }
    }
}

/// Checks `files` every `interval` and whenever `now` is notified (SIGHUP), until shutdown.
pub async fn watch(
    mut files: CertificateFiles,
    interval: Duration,
    now: Arc<Notify>,
    mut shutdown: shutdown_watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = now.notified() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        // File reads and PEM parsing are blocking work; they are small, but keep them off
        // the async workers.
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = files.check();
            (files, outcome)
        })
        .await;
        let Ok((back, outcome)) = outcome else { return };
        files = back;
        match outcome {
            Reload::Unchanged => {}
            Reload::Replaced => tracing::info!(
                cert = %files.cert_path().display(),
                "reloaded the TLS certificate; new connections get it"
            ),
            Reload::Refused(e) => tracing::warn!(
                "keeping the current TLS certificate: the new files do not load: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::LocalCa;

    fn leaf_of(target: &ServerCertificate) -> Vec<u8> {
        target.current().cert[0].to_vec()
    }

    #[test]
    fn a_bad_new_pair_keeps_the_old_certificate_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let cert = dir.path().join("tls.pem");
        let key = dir.path().join("tls.key");
        let (a_cert, a_key) = ca.issue_server_cert(&["a.example".into()]).unwrap();
        std::fs::write(&cert, &a_cert).unwrap();
        std::fs::write(&key, &a_key).unwrap();
        let identity = ServerIdentity::from_pem_files(&cert, &key).unwrap();
        let target = ServerCertificate::new(&identity).unwrap();
        let a_leaf = leaf_of(&target);
        let mut files = CertificateFiles::new(&identity, target.clone());
        assert!(matches!(files.check(), Reload::Unchanged));

        // A new certificate whose key has not been written yet: refused, once.
        let (b_cert, b_key) = ca.issue_server_cert(&["b.example".into()]).unwrap();
        std::fs::write(&cert, &b_cert).unwrap();
        match files.check() {
            Reload::Refused(e) => assert!(e.to_string().contains("does not belong"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(files.check(), Reload::Unchanged));
        assert_eq!(leaf_of(&target), a_leaf);

        // Not PEM at all.
        std::fs::write(&cert, "garbage").unwrap();
        assert!(matches!(files.check(), Reload::Refused(_)));
        assert!(matches!(files.check(), Reload::Unchanged));
        // A missing file.
        std::fs::remove_file(&cert).unwrap();
        assert!(matches!(
            files.check(),
            Reload::Refused(TlsError::Io { .. })
        ));
        assert!(matches!(files.check(), Reload::Unchanged));
        assert_eq!(leaf_of(&target), a_leaf);

        // The complete new pair loads.
        std::fs::write(&cert, &b_cert).unwrap();
        std::fs::write(&key, &b_key).unwrap();
        assert!(matches!(files.check(), Reload::Replaced));
        assert_ne!(leaf_of(&target), a_leaf);
        assert!(matches!(files.check(), Reload::Unchanged));
    }
}
