//! TLS for the clients: trust a CA PEM file (Muster's local CA), or the system roots.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Root certificates: the certificates of `ca_pem` when given, else the system's roots.
pub fn root_store(ca_pem: Option<&Path>) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| Error::io(format!("reading CA file {}", path.display()), e))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    Error::Tls(format!("{} is not a PEM file: {e}", path.display()))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("a certificate in {}: {e}", path.display())))?;
                added += 1;
            }
            if added == 0 {
                return Err(Error::Tls(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(roots)
}

/// A rustls client configuration (ring provider) trusting `ca_pem` or the system roots.
pub fn client_config(ca_pem: Option<&Path>) -> Result<rustls::ClientConfig> {
    let roots = root_store(ca_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTPS client trusting `ca_pem` (or the system roots).
pub fn https_client(ca_pem: Option<&Path>) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca_pem)?)
        .pool_max_idle_per_host(64)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
}
