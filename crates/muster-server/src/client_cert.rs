//! Optional TLS client certificates on the device listeners.
//!
//! Devices that attest with X.509 present a certificate in the handshake; which certificates
//! to trust depends on the enrollment or the hub device the connection is for, which TLS
//! can't know yet. So the handshake asks for a certificate without requiring one, accepts any
//! chain, and still checks the handshake signature (the client proves it holds the leaf's
//! private key). The chain is judged after the handshake: the hub compares thumbprints, device
//! registration verifies it against the enrollment (`muster_registration::x509`).
//!
//! Device certificates may be X.509 version 1 (no extensions: `openssl x509 -req`, the npm
//! `pem` package), which Azure accepts. rustls's `verify_tls12_signature` /
//! `verify_tls13_signature` parse the certificate with webpki, which refuses anything but v3
//! (`UnsupportedCertVersion`), so the handshake signature is checked here against the leaf's
//! SubjectPublicKeyInfo instead (`muster_attestation::signature`), with the same scheme →
//! algorithm mapping and TLS 1.2 / 1.3 rules as rustls.

use std::sync::Arc;

use muster_attestation::signature::{self, SignatureError};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls13_signature_with_raw_key, CryptoProvider};
use rustls::pki_types::{
    CertificateDer, SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, PeerMisbehaved, SignatureScheme,
};

#[derive(Debug)]
pub struct DeviceCertificateVerifier {
    provider: Arc<CryptoProvider>,
}

impl DeviceCertificateVerifier {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }

    /// The algorithms the provider maps `scheme` to (several for TLS 1.2, e.g. ECDSA with
    /// SHA-256 on P-256 or P-384); a scheme we did not offer is the peer's fault.
    fn algorithms_for(
        &self,
        scheme: SignatureScheme,
    ) -> Result<&'static [&'static dyn SignatureVerificationAlgorithm], rustls::Error> {
        self.provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, algs)| *algs)
            .ok_or_else(|| PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into())
    }
}

fn certificate_error(e: SignatureError) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        SignatureError::Certificate(_) | SignatureError::PublicKey(_) => {
            CertificateError::BadEncoding
        }
        // A scheme for another key type: the signature cannot be the key's.
        SignatureError::Invalid | SignatureError::AlgorithmMismatch => {
            CertificateError::BadSignature
        }
    })
}

impl ClientCertVerifier for DeviceCertificateVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Symmetric-key devices send no certificate.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Trust is decided per device after the handshake (see the module docs).
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Any of the scheme's algorithms whose key type fits may verify (as rustls does).
        let candidates = self.algorithms_for(dss.scheme)?;
        signature::verify_with_certificate_key(cert, candidates, message, dss.signature())
            .map(|()| HandshakeSignatureValid::assertion())
            .map_err(certificate_error)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // rustls's raw-public-key check applies TLS 1.3's rules (no PKCS#1, no SHA-1, one
        // algorithm per scheme) and never parses the certificate.
        let spki = signature::subject_public_key_info(cert).map_err(certificate_error)?;
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki),
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    //! Real X.509 v1 certificates made with the openssl CLI (as device makers do), and
    //! handshake signatures made by rustls's own signers for every scheme the SDKs use.

    use super::*;
    use rustls::pki_types::PrivateKeyDer;
    use std::process::Command;

    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed v1 certificate (`openssl x509 -req`, no extension file) and its key.
    fn v1_certificate(genpkey: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["genpkey", "-out", "dev.key"];
        args.extend_from_slice(genpkey);
        openssl(dir.path(), &args);
        openssl(
            dir.path(),
            &[
                "req",
                "-new",
                "-key",
                "dev.key",
                "-subj",
                "/CN=dev-v1",
                "-out",
                "dev.csr",
            ],
        );
        openssl(
            dir.path(),
            &[
                "x509", "-req", "-in", "dev.csr", "-key", "dev.key", "-days", "1", "-out",
                "dev.pem",
            ],
        );
        let pem = std::fs::read(dir.path().join("dev.pem")).unwrap();
        let cert = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        assert_eq!(
            parsed.version().0,
            0,
            "openssl made an X.509 version 1 certificate"
        );
        let key = std::fs::read(dir.path().join("dev.key")).unwrap();
        let key = rustls_pemfile::private_key(&mut key.as_slice())
            .unwrap()
            .unwrap();
        (cert, key)
    }

    fn sign(key: &PrivateKeyDer<'_>, scheme: SignatureScheme, message: &[u8]) -> Vec<u8> {
        rustls::crypto::ring::sign::any_supported_type(key)
            .unwrap()
            .choose_scheme(&[scheme])
            .expect("the key signs with this scheme")
            .sign(message)
            .unwrap()
    }

    /// The struct as the client's CertificateVerify carries it (its constructor is private).
    fn signed(scheme: SignatureScheme, signature: Vec<u8>) -> DigitallySignedStruct {
        use rustls::internal::msgs::codec::{Codec as _, Reader};
        let mut wire = u16::from(scheme).to_be_bytes().to_vec();
        wire.extend(u16::try_from(signature.len()).unwrap().to_be_bytes());
        wire.extend(signature);
        DigitallySignedStruct::read(&mut Reader::init(&wire)).unwrap()
    }

    fn verifier() -> DeviceCertificateVerifier {
        DeviceCertificateVerifier::new(Arc::new(rustls::crypto::ring::default_provider()))
    }

    const MESSAGE: &[u8] = b"the handshake transcript the client signs";

    #[test]
    fn v1_certificates_prove_their_key_with_every_scheme() {
        use SignatureScheme as S;
        let v = verifier();
        let cases: [(&[&str], &[S]); 4] = [
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                &[S::ECDSA_NISTP256_SHA256],
            ),
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
                &[S::ECDSA_NISTP384_SHA384],
            ),
            (
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                &[
                    S::RSA_PKCS1_SHA256,
                    S::RSA_PKCS1_SHA384,
                    S::RSA_PKCS1_SHA512,
                    S::RSA_PSS_SHA256,
                    S::RSA_PSS_SHA384,
                    S::RSA_PSS_SHA512,
                ],
            ),
            (&["-algorithm", "ED25519"], &[S::ED25519]),
        ];
        for (genpkey, schemes) in cases {
            let (cert, key) = v1_certificate(genpkey);
            // What the verifier did before: webpki refuses the certificate itself.
            let algs = &rustls::crypto::ring::default_provider().signature_verification_algorithms;
            let dss = signed(schemes[0], sign(&key, schemes[0], MESSAGE));
            assert!(
                rustls::crypto::verify_tls12_signature(MESSAGE, &cert, &dss, algs).is_err(),
                "webpki parses v1 certificates now; revisit client_cert.rs"
            );
            for &scheme in schemes {
                let dss = signed(scheme, sign(&key, scheme, MESSAGE));
                v.verify_tls12_signature(MESSAGE, &cert, &dss)
                    .unwrap_or_else(|e| panic!("{scheme:?} TLS 1.2: {e}"));
                let tls13 = v.verify_tls13_signature(MESSAGE, &cert, &dss);
                let pkcs1 = matches!(
                    scheme,
                    S::RSA_PKCS1_SHA256 | S::RSA_PKCS1_SHA384 | S::RSA_PKCS1_SHA512
                );
                assert_eq!(tls13.is_ok(), !pkcs1, "{scheme:?} TLS 1.3: {tls13:?}");
                // Another message, or another key, does not verify.
                assert!(v.verify_tls12_signature(b"other", &cert, &dss).is_err());
                assert!(v.verify_tls13_signature(b"other", &cert, &dss).is_err());
            }
        }
    }

    #[test]
    fn a_signature_by_another_key_or_for_another_key_type_fails() {
        let v = verifier();
        let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
        let (cert, _) = v1_certificate(&ec);
        let (_, other_key) = v1_certificate(&ec);
        let dss = signed(
            SignatureScheme::ECDSA_NISTP256_SHA256,
            sign(&other_key, SignatureScheme::ECDSA_NISTP256_SHA256, MESSAGE),
        );
        assert!(v.verify_tls12_signature(MESSAGE, &cert, &dss).is_err());
        assert!(v.verify_tls13_signature(MESSAGE, &cert, &dss).is_err());
        // An RSA signature presented for the EC certificate.
        let (_, rsa_key) =
            v1_certificate(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        let dss = signed(
            SignatureScheme::RSA_PSS_SHA256,
            sign(&rsa_key, SignatureScheme::RSA_PSS_SHA256, MESSAGE),
        );
        assert!(v.verify_tls12_signature(MESSAGE, &cert, &dss).is_err());
        assert!(v.verify_tls13_signature(MESSAGE, &cert, &dss).is_err());
        // Not a certificate at all.
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(v.verify_tls12_signature(MESSAGE, &junk, &dss).is_err());
    }
}
