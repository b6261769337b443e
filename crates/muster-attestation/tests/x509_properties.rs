//! Property tests for certificate input (`muster_attestation::x509`): any text is refused or
//! accepted without a panic, and one certificate in every form clients send (PEM with any
//! line breaks, base64 of DER or of PEM, whitespace anywhere) decodes to the same DER with the
//! same info. Cases are limited so the suite stays in seconds.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_attestation::chain::check_validity;
use muster_attestation::{certificate_info, decode_certificate, Certificate};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One self-signed certificate, made once.
fn der() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a key");
        rcgen::CertificateParams::new(vec!["device-1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("a certificate")
            .der()
            .to_vec()
    })
}

/// `text` with `breaks` inserted at positions taken from `at`.
fn with_whitespace(text: &str, at: &[(prop::sample::Index, usize)]) -> String {
    let mut out: Vec<char> = text.chars().collect();
    for (i, kind) in at {
        let ws = [' ', '\n', '\r', '\t'][kind % 4];
        out.insert(i.index(out.len() + 1), ws);
    }
    out.into_iter().collect()
}

fn pem(der: &[u8], line: usize) -> String {
    let b64 = B64.encode(der);
    let body: Vec<String> = b64
        .as_bytes()
        .chunks(line)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        body.join("\n")
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_form_decodes_to_the_same_der(
        line in 16usize..100,
        spaces in prop::collection::vec((any::<prop::sample::Index>(), any::<usize>()), 0..6),
        form in 0usize..3,
    ) {
        let der = der();
        let text = match form {
            0 => pem(der, line),
            1 => with_whitespace(&B64.encode(der), &spaces),
            _ => B64.encode(pem(der, line)),
        };
        let decoded = decode_certificate(&text).expect("a valid certificate decodes");
        prop_assert_eq!(decoded.as_slice(), der);
        let info = certificate_info(&decoded).unwrap();
        prop_assert_eq!(info, Certificate::parse(&text).unwrap().info().unwrap());
    }

    #[test]
    fn any_text_never_panics(text in prop_oneof![
        ".{0,200}",
        "[A-Za-z0-9+/=\\s]{0,300}",
        "-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\\s]{0,200}(-----END CERTIFICATE-----)?",
    ]) {
        if let Ok(der) = decode_certificate(&text) {
            let _ = certificate_info(&der);
        }
    }

    #[test]
    fn damaged_der_never_panics(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = der().to_vec();
        for (i, b) in &flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let _ = certificate_info(&bytes);
        let _ = check_validity(&bytes, 1_800_000_000);
        if let Ok(c) = Certificate::from_der(bytes) {
            let _ = (c.common_name(), c.info());
        }
    }
}
