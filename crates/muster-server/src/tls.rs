//! TLS for `muster serve`: a local certificate authority kept in the data directory, the server
//! certificate it issues, user-supplied certificates, and the rustls server configuration.
//!
//! * [`LocalCa`] — `ca.pem` / `ca.key` (ECDSA P-256 root, 10 years), created on first use.
//! * [`ServerIdentity`] — the chain and key the listeners present: either `server.pem` /
//!   `server.key` issued by the local CA (re-issued when hosts change, the CA changes, or fewer
//!   than 30 days remain) or files given with `--tls-cert` / `--tls-key`.
//! * [`ServerIdentity::rustls_config`] — TLS 1.2 and 1.3 (ring provider), no client auth yet.
//!
//! Private keys are written with mode 0600 on Unix; every error names the file involved.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;

/// File names inside the TLS directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";

const DAY_SECS: u64 = 24 * 60 * 60;
/// Local CA validity.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * DAY_SECS);
/// Server certificate validity (≤ 397 days, what public-CA rules and Apple clients accept).
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * DAY_SECS);
/// A stored server certificate is re-issued when it has less than this left.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * DAY_SECS);
/// Certificates start this far in the past to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Names every issued server certificate carries besides the requested hosts.
const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: invalid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no CERTIFICATE found in the PEM file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key found (expected a PEM PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("{}: invalid certificate: {reason}", path.display())]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("{}: unusable private key: {reason}", path.display())]
    InvalidKey { path: PathBuf, reason: String },
    #[error("private key {} does not belong to certificate {}: {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("{} exists but its key {} is missing; restore the key, or remove {} to create a new local CA (clients must then trust the new one)", cert.display(), key.display(), cert.display())]
    MissingCaKey { cert: PathBuf, key: PathBuf },
    #[error("cannot generate certificate signed by {}: {source}", ca.display())]
    Generate { ca: PathBuf, source: rcgen::Error },
    #[error("cannot build the TLS configuration for {}: {source}", cert.display())]
    Rustls {
        cert: PathBuf,
        source: rustls::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn now_since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never shortened by DER minimal encoding
    SerialNumber::from_slice(&bytes)
}

/// The local certificate authority stored as `ca.pem` / `ca.key`.
pub struct LocalCa {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// The CA as rcgen needs it to sign (same subject, key and key identifier as `cert_pem`).
    issuer: rcgen::Certificate,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads `dir/ca.pem` + `dir/ca.key`, or creates both (and `dir`) when neither exists.
    /// A key without its certificate is replaced (nobody can trust a certificate that was never
    /// written); a certificate without its key is an error, since clients may already trust it.
    pub fn load_or_create(dir: &Path) -> Result<LocalCa, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(cert_path, key_path),
            (true, false) => Err(TlsError::MissingCaKey {
                cert: cert_path,
                key: key_path,
            }),
            _ => {
                fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
                Self::create(cert_path, key_path)
            }
        }
    }

    fn create(cert_path: PathBuf, key_path: PathBuf) -> Result<LocalCa, TlsError> {
        let gen_err = |source| TlsError::Generate {
            ca: cert_path.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let suffix: [u8; 4] = rand::random();
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Muster Local CA {suffix}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = now_since_epoch();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(BACKDATE);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + CA_VALIDITY);

        let issuer = params.self_signed(&key).map_err(gen_err)?;
        let cert_pem = issuer.pem();
        let cert_der = issuer.der().clone();
        // Key first: a crash in between leaves a lone key, which the next start replaces.
        write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&cert_path, cert_pem.as_bytes(), false)?;
        Ok(LocalCa {
            cert_path,
            key_path,
            cert_pem,
            cert_der,
            key,
            issuer,
        })
    }

    fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<LocalCa, TlsError> {
        let cert_pem = read_to_string(&cert_path)?;
        let cert_der = read_certs(&cert_path, cert_pem.as_bytes())?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::NoCertificate {
                path: cert_path.clone(),
            })?;
        let key_pem = read_to_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::InvalidKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let spki = {
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
                TlsError::InvalidCertificate {
                    path: cert_path.clone(),
                    reason: e.to_string(),
                }
            })?;
            parsed.public_key().raw.to_vec()
        };
        if spki != key.public_key_der() {
            return Err(TlsError::KeyMismatch {
                cert: cert_path,
                key: key_path,
                source: rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch),
            });
        }
        let params = CertificateParams::from_ca_cert_der(&cert_der).map_err(|e| {
            TlsError::InvalidCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            }
        })?;
        // Re-signing only rebuilds rcgen's issuer view; `cert_pem` on disk stays the CA.
        let issuer = params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                ca: cert_path.clone(),
                source,
            })?;
        Ok(LocalCa {
            cert_path,
            key_path,
            cert_pem,
            cert_der,
            key,
            issuer,
        })
    }

    /// The CA certificate as PEM (what clients must trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate is stored (`dir/ca.pem`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Where the CA key is stored (`dir/ca.key`).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Issues an intermediate CA (ECDSA P-256, path length 0, `keyCertSign`) for signing
    /// device certificates, valid as long as the local CA. Returns `(certificate PEM,
    /// PKCS#8 key PEM)`.
    pub fn issue_intermediate(&self, common_name: &str) -> Result<(String, String), TlsError> {
        let gen_err = |source| TlsError::Generate {
            ca: self.cert_path.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = now_since_epoch();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(BACKDATE);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + CA_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues an ECDSA P-256 server certificate for `hosts` (IP addresses become IP SANs, the
    /// rest DNS SANs; `localhost`, `127.0.0.1` and `::1` are always added; CN = first host).
    /// Returns `(certificate PEM, PKCS#8 key PEM)`.
    pub fn issue_server_cert(&self, hosts: &[String]) -> Result<(String, String), TlsError> {
        self.issue_server_cert_valid_for(hosts, SERVER_VALIDITY)
    }

    fn issue_server_cert_valid_for(
        &self,
        hosts: &[String],
        validity: Duration,
    ) -> Result<(String, String), TlsError> {
        let gen_err = |source| TlsError::Generate {
            ca: self.cert_path.clone(),
            source,
        };
        let wanted = wanted_names(hosts);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = wanted
            .iter()
            .map(|name| match name {
                HostName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
                HostName::Dns(dns) => Ok(SanType::DnsName(dns.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()
            .map_err(gen_err)?;
        let cn = hosts
            .iter()
            .map(|h| normalise_host(h))
            .find(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = now_since_epoch();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + now.saturating_sub(BACKDATE);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + validity);
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A requested host name, normalised for comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum HostName {
    Ip(IpAddr),
    /// Lower-case.
    Dns(String),
}

fn normalise_host(host: &str) -> String {
    let h = host.trim();
    h.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(h)
        .to_owned()
}

fn parse_host(host: &str) -> Option<HostName> {
    let h = normalise_host(host);
    if h.is_empty() {
        return None;
    }
    Some(match h.parse::<IpAddr>() {
        Ok(ip) => HostName::Ip(ip),
        Err(_) => HostName::Dns(h.trim_end_matches('.').to_ascii_lowercase()),
    })
}

/// The requested hosts plus the defaults, de-duplicated, requested ones first.
fn wanted_names(hosts: &[String]) -> Vec<HostName> {
    let mut seen = BTreeSet::new();
    hosts
        .iter()
        .map(String::as_str)
        .chain(DEFAULT_HOSTS)
        .filter_map(parse_host)
        .filter(|n| seen.insert(n.clone()))
        .collect()
}

/// The certificate chain and private key the listeners present.
pub struct ServerIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("chain_len", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Uses `dir/server.pem` + `dir/server.key` if they cover every host in `hosts`, were issued
    /// by `ca`, match each other and are valid for more than 30 more days; otherwise issues a
    /// new certificate with `ca` and stores it there (key with mode 0600).
    pub fn load_or_create(
        dir: &Path,
        ca: &LocalCa,
        hosts: &[String],
    ) -> Result<ServerIdentity, TlsError> {
        let cert_path = dir.join(SERVER_CERT_FILE);
        let key_path = dir.join(SERVER_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            match Self::from_pem_files(&cert_path, &key_path) {
                Ok(existing) => match existing.reuse_problem(ca, hosts) {
                    None => return Ok(existing),
                    Some(reason) => tracing::info!(
                        cert = %cert_path.display(),
                        "re-issuing server certificate: {reason}"
                    ),
                },
                Err(e) => tracing::warn!("re-issuing server certificate: {e}"),
            }
        }
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let (cert_pem, key_pem) = ca.issue_server_cert(hosts)?;
        write_file(&key_path, key_pem.as_bytes(), true)?;
        write_file(&cert_path, cert_pem.as_bytes(), false)?;
        Self::from_pem(
            &cert_path,
            cert_pem.as_bytes(),
            &key_path,
            key_pem.as_bytes(),
        )
    }

    /// Loads a user-supplied certificate chain (leaf first, intermediates after) and its key
    /// (PKCS#8, SEC1 or PKCS#1 RSA PEM), checking that the key belongs to the leaf.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerIdentity, TlsError> {
        let cert_pem = fs::read(cert).map_err(io_err("read", cert))?;
        let key_pem = fs::read(key).map_err(io_err("read", key))?;
        Self::from_pem(cert, &cert_pem, key, &key_pem)
    }

    /// Like [`Self::from_pem_files`], from bytes already read from those paths.
    pub fn from_pem_bytes(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<ServerIdentity, TlsError> {
        Self::from_pem(cert_path, cert_pem, key_path, key_pem)
    }

    fn from_pem(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<ServerIdentity, TlsError> {
        let cert_chain = read_certs(cert_path, cert_pem)?;
        if cert_chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_path.to_path_buf(),
            });
        }
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| TlsError::Pem {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| TlsError::NoPrivateKey {
                path: key_path.to_path_buf(),
            })?;
        CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider()).map_err(
            |source| match source {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: cert_path.to_path_buf(),
                    key: key_path.to_path_buf(),
                    source,
                },
                other => TlsError::InvalidKey {
                    path: key_path.to_path_buf(),
                    reason: other.to_string(),
                },
            },
        )?;
        Ok(ServerIdentity {
            cert_chain,
            key,
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
        })
    }

    /// Why this (stored) identity cannot be reused for `hosts` under `ca`, if it cannot.
    fn reuse_problem(&self, ca: &LocalCa, hosts: &[String]) -> Option<String> {
        let leaf = self.cert_chain.first()?;
        let parsed = match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, parsed)) => parsed,
            Err(e) => return Some(format!("unparsable certificate: {e}")),
        };
        let mut have = BTreeSet::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => {
                        have.insert(HostName::Dns(
                            dns.trim_end_matches('.').to_ascii_lowercase(),
                        ));
                    }
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            have.insert(HostName::Ip(ip));
                        }
                    }
                    _ => {}
                }
            }
        }
        let missing: Vec<String> = wanted_names(hosts)
            .into_iter()
            .filter(|n| !have.contains(n))
            .map(|n| match n {
                HostName::Ip(ip) => ip.to_string(),
                HostName::Dns(d) => d,
            })
            .collect();
        if !missing.is_empty() {
            return Some(format!("not valid for {}", missing.join(", ")));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let renew_at = now_since_epoch() + RENEW_BEFORE;
        if not_after <= i64::try_from(renew_at.as_secs()).unwrap_or(i64::MAX) {
            return Some("expires within 30 days".to_owned());
        }
        // Chain to the CA (signature, validity, serverAuth), using a name checked above.
        let mut roots = RootCertStore::empty();
        if let Err(e) = roots.add(ca.cert_der().clone()) {
            return Some(format!("local CA unusable as trust anchor: {e}"));
        }
        let verifier =
            match WebPkiServerVerifier::builder_with_provider(roots.into(), provider()).build() {
                Ok(v) => v,
                Err(e) => return Some(format!("cannot build verifier: {e}")),
            };
        let verified = verifier.verify_server_cert(
            leaf,
            &self.cert_chain[1..],
            &ServerName::DnsName(match "localhost".try_into() {
                Ok(n) => n,
                Err(_) => return Some("invalid verification name".to_owned()),
            }),
            &[],
            UnixTime::now(),
        );
        if let Err(e) = verified {
            return Some(format!("not issued by {}: {e}", ca.cert_path().display()));
        }
        None
    }

    /// The chain presented to clients, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The chain and its signing key as rustls serves them.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::InvalidKey {
                path: self.key_path.clone(),
                reason: e.to_string(),
            })?;
        Ok(Arc::new(CertifiedKey::new(self.cert_chain.clone(), key)))
    }

    /// Subject and issuer of the leaf, as RFC 4514 strings, for the banner and
    /// `connection.json`.
    pub fn leaf_names(&self) -> Option<(String, String)> {
        let leaf = self.cert_chain.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
        Some((parsed.subject().to_string(), parsed.issuer().to_string()))
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, no client
    /// authentication) offering `alpn` in order of preference.
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        self.rustls_config_with(alpn, false)
    }

    /// Like [`Self::rustls_config`]; with `device_certificates` the handshake also asks devices
    /// for an optional client certificate (`crate::client_cert`).
    pub fn rustls_config_with(
        &self,
        alpn: &[&[u8]],
        device_certificates: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let rustls_err = |source| TlsError::Rustls {
            cert: self.cert_path.clone(),
            source,
        };
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?;
        let builder = if device_certificates {
            builder.with_client_cert_verifier(Arc::new(
                crate::client_cert::DeviceCertificateVerifier::new(provider),
            ))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(rustls_err)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3) presenting whatever
/// `certificate` holds at each handshake, offering `alpn` in order of preference; with
/// `device_certificates` it also asks for an optional client certificate
/// (`crate::client_cert`).
pub fn server_config(
    certificate: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[&[u8]],
    device_certificates: bool,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if device_certificates {
        builder.with_client_cert_verifier(Arc::new(
            crate::client_cert::DeviceCertificateVerifier::new(provider),
        ))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_cert_resolver(certificate);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

fn read_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Writes `contents` to `path` through a temporary file and a rename; `private` files get
/// mode 0600 on Unix before any byte is written.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(if private { 0o600 } else { 0o644 });
        let mut file = options.open(&tmp).map_err(io_err("create", &tmp))?;
        if private {
            // The mode only applies to new files; fix a stale temporary file too.
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err("set permissions of", &tmp))?;
        }
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("write", &tmp))?;
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        let mut file = options.open(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(contents).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("write", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err("replace", path))
}

/// Reads a PEM file (for the issuing CA).
pub(crate) fn read_pem(path: &Path) -> Result<String, TlsError> {
    read_to_string(path)
}

/// The certificates of a PEM text, DER, in file order.
pub(crate) fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    Ok(read_certs(path, pem)?
        .into_iter()
        .map(|c| c.to_vec())
        .collect())
}

/// Writes a private key file (mode 0600) through a temporary file.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_file(path, contents, true)
}

/// Writes a public file (a certificate) through a temporary file.
pub(crate) fn write_public(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_file(path, contents, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::ClientConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn leaf_of(identity: &ServerIdentity) -> Vec<u8> {
        identity.cert_chain()[0].to_vec()
    }

    fn san_strings(der: &[u8]) -> Vec<String> {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    format!("IP:{}", IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
                }
                GeneralName::IPAddress(b) => {
                    format!("IP:{}", IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()))
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn client_config(
        ca: &LocalCa,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        config
    }

    #[test]
    fn ca_is_created_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let ca = LocalCa::load_or_create(&tls_dir).unwrap();
        assert_eq!(ca.cert_path(), tls_dir.join("ca.pem"));
        assert!(ca.key_path().exists());
        assert_eq!(fs::read_to_string(ca.cert_path()).unwrap(), ca.cert_pem());

        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert!(cn.starts_with("Muster Local CA "), "{cn}");
        assert_eq!(cn.len(), "Muster Local CA ".len() + 8);
        assert_eq!(cert.subject(), cert.issuer());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let years = (cert.validity().not_after.timestamp()
            - cert.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
        assert_eq!(
            cert.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1"
        );

        let again = LocalCa::load_or_create(&tls_dir).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert_eq!(again.cert_der(), ca.cert_der());

        // A certificate issued by the reloaded CA chains to the original CA certificate.
        let id = ServerIdentity::load_or_create(&tls_dir, &again, &hosts(&["a.test"])).unwrap();
        assert_eq!(id.reuse_problem(&ca, &hosts(&["a.test"])), None);
    }

    #[test]
    fn ca_cert_without_key_is_an_error_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        fs::remove_file(ca.key_path()).unwrap();
        let err = LocalCa::load_or_create(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TlsError::MissingCaKey { .. }));
        assert!(msg.contains(&ca.cert_path().display().to_string()), "{msg}");
        assert!(msg.contains(&ca.key_path().display().to_string()), "{msg}");
    }

    #[test]
    fn lone_ca_key_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), "stale").unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        assert!(fs::read_to_string(ca.key_path())
            .unwrap()
            .contains("PRIVATE KEY"));
    }

    #[test]
    fn corrupt_ca_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        fs::write(ca.key_path(), "garbage").unwrap();
        let msg = LocalCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&ca.key_path().display().to_string()), "{msg}");
        fs::write(ca.cert_path(), "garbage").unwrap();
        let msg = LocalCa::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&ca.cert_path().display().to_string()), "{msg}");
    }

    #[test]
    fn server_cert_has_requested_and_default_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let id = ServerIdentity::load_or_create(
            dir.path(),
            &ca,
            &hosts(&["muster.example", "127.0.0.2", "[fd00::1]", "LOCALHOST"]),
        )
        .unwrap();
        let der = leaf_of(&id);
        let sans = san_strings(&der);
        for want in [
            "DNS:muster.example",
            "IP:127.0.0.2",
            "IP:fd00::1",
            "DNS:localhost",
            "IP:127.0.0.1",
            "IP:::1",
        ] {
            assert!(
                sans.contains(&want.to_owned()),
                "{want} missing from {sans:?}"
            );
        }
        assert_eq!(sans.len(), 6, "{sans:?}");

        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "muster.example");
        assert_eq!(
            cert.issuer(),
            X509Certificate::from_der(ca.cert_der())
                .unwrap()
                .1
                .subject()
        );
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / (24 * 3600);
        assert!((365..=397).contains(&days), "{days}");
        assert_eq!(id.cert_path(), dir.path().join("server.pem"));
        assert_eq!(id.key_path(), dir.path().join("server.key"));
    }

    #[test]
    fn server_cert_is_reused_or_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let first =
            ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["a.test", "10.0.0.5"]))
                .unwrap();
        let first_der = leaf_of(&first);

        // Same hosts, a subset, different case: reused.
        for h in [&["a.test", "10.0.0.5"][..], &["A.TEST"], &[]] {
            let again = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(h)).unwrap();
            assert_eq!(leaf_of(&again), first_der, "{h:?}");
        }

        // A new host: re-issued, covering it.
        let more = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["b.test"])).unwrap();
        assert_ne!(leaf_of(&more), first_der);
        assert!(san_strings(&leaf_of(&more)).contains(&"DNS:b.test".to_owned()));
        assert_eq!(
            fs::read(dir.path().join(SERVER_CERT_FILE)).unwrap(),
            fs::read(more.cert_path()).unwrap()
        );

        // A different CA: re-issued.
        let other_dir = tempfile::tempdir().unwrap();
        let other_ca = LocalCa::load_or_create(other_dir.path()).unwrap();
        let foreign =
            ServerIdentity::load_or_create(dir.path(), &other_ca, &hosts(&["b.test"])).unwrap();
        assert_ne!(leaf_of(&foreign), leaf_of(&more));
        assert!(foreign.reuse_problem(&ca, &hosts(&["b.test"])).is_some());
        assert_eq!(foreign.reuse_problem(&other_ca, &hosts(&["b.test"])), None);

        // Nearly expired: re-issued.
        let (pem, key) = ca
            .issue_server_cert_valid_for(&hosts(&["b.test"]), Duration::from_secs(10 * DAY_SECS))
            .unwrap();
        fs::write(dir.path().join(SERVER_CERT_FILE), &pem).unwrap();
        fs::write(dir.path().join(SERVER_KEY_FILE), &key).unwrap();
        let short = ServerIdentity::from_pem_files(
            &dir.path().join(SERVER_CERT_FILE),
            &dir.path().join(SERVER_KEY_FILE),
        )
        .unwrap();
        assert_eq!(
            short.reuse_problem(&ca, &hosts(&["b.test"])).as_deref(),
            Some("expires within 30 days")
        );
        let renewed = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["b.test"])).unwrap();
        assert_ne!(leaf_of(&renewed), leaf_of(&short));
        assert_eq!(renewed.reuse_problem(&ca, &hosts(&["b.test"])), None);

        // Corrupt files: re-issued rather than failing.
        fs::write(dir.path().join(SERVER_KEY_FILE), "garbage").unwrap();
        let fixed = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["b.test"])).unwrap();
        assert_eq!(fixed.reuse_problem(&ca, &hosts(&["b.test"])), None);
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let id = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["x.test"])).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(ca.key_path()), 0o600);
        assert_eq!(mode(id.key_path()), 0o600);
        assert_eq!(mode(ca.cert_path()), 0o644);
        // Re-issuing over a key file with loose permissions still leaves 0600.
        fs::set_permissions(id.key_path(), fs::Permissions::from_mode(0o644)).unwrap();
        let id = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["y.test"])).unwrap();
        assert_eq!(mode(id.key_path()), 0o600);
        let tmp_left = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        assert!(!tmp_left);
    }

    /// PKCS#8 → SEC1 (`EC PRIVATE KEY`): the PKCS#8 privateKey OCTET STRING is an ECPrivateKey.
    fn sec1_pem_from_pkcs8(key: &KeyPair) -> String {
        use base64::Engine as _;
        use x509_parser::der_parser::parse_der;
        let pkcs8 = key.serialize_der();
        let (_, obj) = parse_der(&pkcs8).unwrap();
        let seq = obj.as_sequence().unwrap();
        let sec1 = seq[2].as_slice().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(sec1);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn user_supplied_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(&dir.path().join("ca")).unwrap();
        let (leaf_pem, key_pem) = ca.issue_server_cert(&hosts(&["user.test"])).unwrap();
        let cert_path = dir.path().join("chain.pem");
        let key_path = dir.path().join("key.pem");
        // Chain: leaf then CA.
        fs::write(&cert_path, format!("{leaf_pem}{}", ca.cert_pem())).unwrap();
        fs::write(&key_path, &key_pem).unwrap();
        let id = ServerIdentity::from_pem_files(&cert_path, &key_path).unwrap();
        assert_eq!(id.cert_chain().len(), 2);
        id.rustls_config(&[b"h2"]).unwrap();

        // SEC1 key.
        let key = KeyPair::from_pem(&key_pem).unwrap();
        fs::write(&key_path, sec1_pem_from_pkcs8(&key)).unwrap();
        let id = ServerIdentity::from_pem_files(&cert_path, &key_path).unwrap();
        id.rustls_config(&[]).unwrap();

        // Key of another certificate.
        let (_, other_key) = ca.issue_server_cert(&hosts(&["other.test"])).unwrap();
        fs::write(&key_path, &other_key).unwrap();
        let err = ServerIdentity::from_pem_files(&cert_path, &key_path).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&key_path.display().to_string())
                && msg.contains(&cert_path.display().to_string()),
            "{msg}"
        );

        // No key in the key file, no certificate in the cert file, missing file.
        fs::write(&key_path, ca.cert_pem()).unwrap();
        let err = ServerIdentity::from_pem_files(&cert_path, &key_path).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err:?}");
        assert!(err.to_string().contains(&key_path.display().to_string()));
        fs::write(&key_path, &key_pem).unwrap();
        fs::write(&cert_path, &key_pem).unwrap();
        let err = ServerIdentity::from_pem_files(&cert_path, &key_path).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains(&cert_path.display().to_string()));
        let missing = dir.path().join("missing.pem");
        let err = ServerIdentity::from_pem_files(&missing, &key_path).unwrap_err();
        assert!(matches!(err, TlsError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&missing.display().to_string()));
    }

    async fn echo_once<S>(mut server: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(&buf).await.unwrap();
        server.flush().await.unwrap();
    }

    #[tokio::test]
    async fn tls12_handshake_over_loopback_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let id = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["127.0.0.2"])).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(id.rustls_config(&[b"mqtt"]).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_2)
            );
            echo_once(tls).await;
        });

        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca, &rustls::version::TLS12)));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
        let mut tls = connector.connect(name, tcp).await.unwrap();
        {
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_2)
            );
            assert_eq!(conn.alpn_protocol(), Some(&b"mqtt"[..]));
        }
        tls.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn tls13_handshake_over_duplex() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let id =
            ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["muster.example"])).unwrap();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(id.rustls_config(&[b"h2", b"mqtt"]).unwrap());
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let tls = acceptor.accept(server_io).await.unwrap();
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            echo_once(tls).await;
        });

        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca, &rustls::version::TLS13)));
        let name = ServerName::try_from("muster.example").unwrap();
        let mut tls = connector.connect(name, client_io).await.unwrap();
        {
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(conn.alpn_protocol(), Some(&b"mqtt"[..]));
        }
        tls.write_all(b"world").await.unwrap();
        let mut back = [0u8; 5];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"world");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn untrusted_name_is_rejected_by_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let id = ServerIdentity::load_or_create(dir.path(), &ca, &hosts(&["a.test"])).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(id.rustls_config(&[]).unwrap());
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(server_io).await.is_err() });
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&ca, &rustls::version::TLS13)));
        let name = ServerName::try_from("not-in-cert.test").unwrap();
        assert!(connector.connect(name, client_io).await.is_err());
        assert!(server.await.unwrap());
    }
}
