//! What each read path may show (service-api.md §5.7): symmetric keys only on PUT and
//! `attestationmechanism`, certificate text never, computed certificate info always.

use muster_proto::{AttestationMechanism, X509Certificates};

/// For GET and query: no keys, no certificate text.
pub fn for_read(a: &mut AttestationMechanism) {
    a.symmetric_key = None;
    strip_certificates(a);
}

/// For PUT responses and `attestationmechanism`: keys shown, certificate text not.
pub fn for_owner(a: &mut AttestationMechanism) {
    strip_certificates(a);
}

fn strip_certificates(a: &mut AttestationMechanism) {
    if let Some(x) = &mut a.x509 {
        for set in [&mut x.client_certificates, &mut x.signing_certificates]
            .into_iter()
            .flatten()
        {
            strip_set(set);
        }
    }
}

fn strip_set(set: &mut X509Certificates) {
    for c in [&mut set.primary, &mut set.secondary].into_iter().flatten() {
        c.certificate = None;
    }
}
