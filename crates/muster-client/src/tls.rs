//! TLS for the clients: trust the system roots, plus a CA PEM file when given (Muster's
//! local CA, or a private CA that issued the server's certificate).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Root certificates: the system's roots, and the certificates of `ca_pem` when given (a
/// server with a publicly issued certificate needs no file; a local CA adds its own).
pub fn root_store(ca_pem: Option<&Path>) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls can't use is no reason to fail.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_pem {
        let pem = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading CA file {}", path.display()), e))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| Error::Tls(format!("{} is not a PEM file: {e}", path.display())))?;
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
    Ok(roots)
}

/// A rustls client configuration (ring provider) trusting the system roots and `ca_pem`.
pub fn client_config(ca_pem: Option<&Path>) -> Result<rustls::ClientConfig> {
    let roots = root_store(ca_pem)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTPS client trusting the system roots and `ca_pem`.
pub fn https_client(ca_pem: Option<&Path>) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca_pem)?)
        .pool_max_idle_per_host(64)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
}

/// Parses a PEM certificate chain (leaf first, then intermediates).
pub fn parse_chain_pem(chain_pem: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let chain = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidInput(format!("the certificate chain is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(Error::InvalidInput(
            "the certificate file holds no PEM certificate".into(),
        ));
    }
    Ok(chain)
}

/// Parses a PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`) or PKCS#1
/// (`RSA PRIVATE KEY`).
pub fn parse_key_pem(key_pem: &str) -> Result<rustls::pki_types::PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| Error::InvalidInput(format!("the private key is not PEM: {e}")))?
        .ok_or_else(|| {
            Error::InvalidInput("the key file holds no PEM private key (PKCS#8, EC or RSA)".into())
        })
}

/// Always presents one certificate chain and key as the client's identity.
#[derive(Debug)]
struct ClientIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `base` (its trusted roots, protocol versions and crypto provider) presenting the X.509
/// identity `chain_pem` (leaf first) / `key_pem` as its client certificate; the same as
/// building it with `with_client_auth_cert(chain, key)`. Session resumption is off, so a
/// connection never resumes a session made with another identity.
pub fn with_client_cert(
    base: &rustls::ClientConfig,
    chain_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig> {
    let chain = parse_chain_pem(chain_pem)?;
    let key = parse_key_pem(key_pem)?;
    let key = base
        .crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::InvalidInput(format!("the private key: {e}")))?;
    // Not `CertifiedKey::from_der`: it compares the keys by parsing the certificate with
    // webpki, which refuses X.509 version 1 device certificates (no extensions).
    if let Some(key_spki) = key.public_key() {
        let cert_spki = muster_attestation::signature::subject_public_key_info(&chain[0])
            .map_err(|e| Error::InvalidInput(format!("the device certificate: {e}")))?;
        if key_spki.as_ref() != cert_spki {
            return Err(Error::InvalidInput(
                "the private key is not the device certificate's key".into(),
            ));
        }
    }
    let certified = rustls::sign::CertifiedKey::new(chain, key);
    let mut config = base.clone();
    config.client_auth_cert_resolver = Arc::new(ClientIdentity(Arc::new(certified)));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_invalid_input() {
        assert!(matches!(
            parse_chain_pem("nothing here"),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            parse_key_pem("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"),
            Err(Error::InvalidInput(_))
        ));
    }

    /// Test-only identities made with openssl: a SEC1 EC key and a PKCS#1 RSA key.
    #[test]
    fn sec1_and_rsa_keys_make_identities() {
        let base = client_config(Some(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ec.pem"
        ))))
        .unwrap();
        for (chain, key) in [
            (
                include_str!("../tests/data/ec.pem"),
                include_str!("../tests/data/ec-sec1.key"),
            ),
            (
                include_str!("../tests/data/rsa.pem"),
                include_str!("../tests/data/rsa-pkcs1.key"),
            ),
        ] {
            let config = with_client_cert(&base, chain, key).unwrap();
            assert!(config.client_auth_cert_resolver.has_certs());
        }
        // A key that is not the certificate's.
        assert!(with_client_cert(
            &base,
            include_str!("../tests/data/ec.pem"),
            include_str!("../tests/data/rsa-pkcs1.key")
        )
        .is_err());
        // A v1 certificate (openssl x509 -req, no extensions) for the same EC key.
        let dir = tempfile::tempdir().unwrap();
        let key_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ec-sec1.key");
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-key",
                key_path,
                "-subj",
                "/CN=v1-dev",
                "-out",
                "v1.csr",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = std::process::Command::new("openssl")
            .args([
                "x509", "-req", "-in", "v1.csr", "-key", key_path, "-days", "1",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v1_pem = String::from_utf8(out.stdout).unwrap();
        let der = parse_chain_pem(&v1_pem).unwrap();
        assert_eq!(
            x509_parser::parse_x509_certificate(&der[0])
                .unwrap()
                .1
                .version()
                .0,
            0,
            "version 1"
        );
        let config =
            with_client_cert(&base, &v1_pem, include_str!("../tests/data/ec-sec1.key")).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        assert!(
            with_client_cert(&base, &v1_pem, include_str!("../tests/data/rsa-pkcs1.key")).is_err()
        );
        let id = crate::DeviceKey::X509 {
            chain_pem: include_str!("../tests/data/rsa.pem").into(),
            key_pem: String::new(),
        };
        assert_eq!(id.common_name().unwrap().as_deref(), Some("rsa-dev"));
    }
}
