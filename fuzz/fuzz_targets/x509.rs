//! X.509 input for attestation (`muster_attestation::x509` and `::chain`): certificate text
//! (PEM, base64 of PEM, base64 of DER) decoding, the `info` object, and path and signature
//! checks over certificates taken from the input, never panic.
//!
//! Input: up to four DER certificates, each preceded by its length as two big-endian bytes
//! (the seeds in `seeds/x509` are real chains in this form); the whole input is also tried as
//! certificate text and as one DER certificate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muster_attestation::chain::{check_validity, issued_by_name};
use muster_attestation::{
    certificate_info, decode_certificate, verify_path, verify_signed_by, Certificate,
};

const NOW: i64 = 1_800_000_000;

fn split(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < 4 {
        let [hi, lo, rest @ ..] = data else { break };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        out.push(rest[..len].to_vec());
        data = &rest[len..];
    }
    out
}

fn look_at_one(der: &[u8]) {
    let _ = certificate_info(der);
    let _ = check_validity(der, NOW);
    if let Ok(cert) = Certificate::from_der(der.to_vec()) {
        let _ = (cert.common_name(), cert.subject_name(), cert.issuer_name());
        let _ = (
            cert.sha1_thumbprint(),
            cert.is_ca(),
            cert.not_before(),
            cert.not_after(),
        );
        let _ = cert.info();
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(der) = decode_certificate(text) {
            look_at_one(&der);
        }
        let _ = Certificate::parse(text);
    }
    look_at_one(data);

    let certs = split(data);
    for c in &certs {
        look_at_one(c);
    }
    if let [leaf, rest @ ..] = certs.as_slice() {
        if let Some((anchor, intermediates)) = rest.split_last() {
            let _ = verify_path(leaf, intermediates, anchor, NOW);
            let _ = verify_signed_by(leaf, anchor);
            let _ = issued_by_name(leaf, anchor);
        } else {
            let _ = verify_path(leaf, &[], leaf, NOW);
            let _ = verify_signed_by(leaf, leaf);
        }
    }
});
