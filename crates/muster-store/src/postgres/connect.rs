//! From a `postgres://` URL to a connection configuration and a rustls connector.
//!
//! tokio-postgres itself knows only `sslmode=disable|prefer|require` and never verifies the
//! server, so the URL's TLS wishes are taken out of it here, libpq-style:
//! - `disable`: no TLS; `allow` and `prefer` (the default): TLS when the server offers it,
//!   encryption only, as libpq does;
//! - `require`: TLS or no connection; the certificate is verified only when `sslrootcert`
//!   names a CA file (libpq's rule);
//! - `verify-ca` and `verify-full`: TLS, certificate chain and host name verified against
//!   `sslrootcert` (a PEM file) or, without it, the system's roots. `verify-ca` is checked
//!   as strictly as `verify-full`.

use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// How long opening one connection may take before the store reports itself unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed store URL.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    /// The URL without its password, for messages and logs.
    pub(super) display: String,
}

/// Whether `url` names a PostgreSQL store.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    /// Encrypt, trust any certificate (libpq's `prefer` and `require`).
    None,
    /// Chain and host name.
    Full,
}

pub(super) fn parse(url: &str) -> Result<Target, StoreError> {
    let invalid = |why: String| StoreError::Backend(format!("invalid PostgreSQL store URL: {why}"));
    if !is_postgres_url(url) {
        return Err(invalid(
            "it must start with postgres:// or postgresql://".into(),
        ));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut sslmode = "prefer".to_string();
    let mut root_file: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = percent_decode_str(value).decode_utf8_lossy().into_owned();
        match name {
            "sslmode" => sslmode = decoded,
            "sslrootcert" => root_file = Some(decoded),
            _ => kept.push(pair),
        }
    }
    let (pg_mode, verification) = match sslmode.as_str() {
        "disable" => ("disable", Verification::None),
        "allow" | "prefer" => ("prefer", Verification::None),
        "require" if root_file.is_some() => ("require", Verification::Full),
        "require" => ("require", Verification::None),
        "verify-ca" | "verify-full" => ("require", Verification::Full),
        other => {
            return Err(invalid(format!(
                "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, \
                 verify-full"
            )))
        }
    };
    kept.push(match pg_mode {
        "disable" => "sslmode=disable",
        "require" => "sslmode=require",
        _ => "sslmode=prefer",
    });
    let rebuilt = format!("{base}?{}", kept.join("&"));
    let mut config: tokio_postgres::Config =
        rebuilt.parse().map_err(|e| invalid(format!("{e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("muster");
    }
    let tls = MakeRustlsConnect::new(client_config(verification, root_file.as_deref())?);
    let display = describe(&config);
    Ok(Target {
        config,
        tls,
        display,
    })
}

/// `postgres://user@host:port/dbname`, never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

fn client_config(
    verification: Verification,
    root_file: Option<&str>,
) -> Result<ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(format!("TLS to PostgreSQL: {e}")))?;
    let config = match verification {
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
        Verification::Full => builder
            .with_root_certificates(roots(root_file)?)
            .with_no_client_auth(),
    };
    Ok(config)
}

fn roots(root_file: Option<&str>) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    match root_file.filter(|f| *f != "system") {
        Some(path) => {
            let err = |why: String| {
                StoreError::Backend(format!(
                    "reading sslrootcert {path} for TLS to PostgreSQL: {why}"
                ))
            };
            let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| err(e.to_string()))?;
                roots.add(cert).map_err(|e| err(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(err("no certificate in the file".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One unusable system certificate must not stop the others.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(StoreError::Backend(
                    "TLS to PostgreSQL: no system root certificates found; name a CA file with \
                     sslrootcert=PATH"
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// libpq's `prefer`/`require` without a CA: the connection is encrypted, the server is not
/// authenticated. Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tls_options_and_hides_the_password() {
        let target = parse(
            "postgres://muster:s3cret@db.example:6543/fleet?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(target.display, "postgres://muster@db.example:6543/fleet");
        assert_eq!(
            target.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(target.config.get_application_name(), Some("x"));
        let target = parse("postgresql://u@h/d?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(
            target.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let target = parse("postgres://u@h/d").unwrap();
        assert_eq!(
            target.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
    }

    #[test]
    fn refuses_bad_urls_without_echoing_the_password() {
        let err = parse("postgres://u:pw@h/d?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(err.to_string().contains("sslmode=sometimes"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        let err = parse("mysql://u@h/d").err().expect("refused");
        assert!(err.to_string().contains("postgres://"), "{err}");
        let err = parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
