//! The SASL layer (device-protocol.md §5.1, §5.2): which mechanism the device chose and what
//! it presented. Nothing is verified here: the registrar checks the SAS token on every request
//! and answers with its DPS error code, exactly as over MQTT, so a device with a wrong key
//! learns `401002` rather than a bare SASL failure.

use std::sync::{Arc, Mutex};

use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

/// `PLAIN`: SAS tokens. `ANONYMOUS`: clients that authenticate otherwise (their TLS client
/// certificate, or later a CBS token on the hub).
const PLAIN: &str = "PLAIN";
const ANONYMOUS: &str = "ANONYMOUS";

/// What the device presented in SASL.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum SaslIdentity {
    /// No SASL layer at all (protocol id 0 after TLS: X.509 devices).
    #[default]
    None,
    Anonymous,
    /// `authcid` (`{idScope}/registrations/{registrationId}` for DPS) and the password (a SAS
    /// token).
    Plain {
        authcid: String,
        password: String,
    },
}

impl std::fmt::Debug for SaslIdentity {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaslIdentity::None => f.write_str("None"),
            SaslIdentity::Anonymous => f.write_str("Anonymous"),
            SaslIdentity::Plain { authcid, .. } => write!(f, "Plain({authcid:?}, ..)"),
        }
    }
}

/// A SASL acceptor for one connection that records what the device presented (fe2o3 clones
/// the acceptor per connection; the clones share `seen`).
#[derive(Clone, Default)]
pub(crate) struct RecordingSasl {
    pub(crate) seen: Arc<Mutex<SaslIdentity>>,
}

impl RecordingSasl {
    pub(crate) fn identity(&self) -> SaslIdentity {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, identity: SaslIdentity) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = identity;
    }
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

/// Splits a PLAIN initial response, `authzid NUL authcid NUL passwd` (RFC 4616).
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((
        String::from_utf8(authcid.to_vec()).ok()?,
        String::from_utf8(password.to_vec()).ok()?,
    ))
}

impl SaslAcceptor for RecordingSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from(PLAIN), Symbol::from(ANONYMOUS)])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            PLAIN => {
                let response = init.initial_response.map(|b| b.into_vec());
                match response.as_deref().and_then(parse_plain) {
                    Some((authcid, password)) if !authcid.is_empty() => {
                        self.record(SaslIdentity::Plain { authcid, password });
                        outcome(SaslCode::Ok)
                    }
                    _ => outcome(SaslCode::Auth),
                }
            }
            ANONYMOUS => {
                self.record(SaslIdentity::Anonymous);
                outcome(SaslCode::Ok)
            }
            // TPM and anything else: not offered.
            _ => outcome(SaslCode::Auth),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No offered mechanism has a challenge.
        outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        assert_eq!(
            parse_plain(b"\0scope/registrations/dev\0SharedAccessSignature sr=x"),
            Some((
                "scope/registrations/dev".into(),
                "SharedAccessSignature sr=x".into()
            ))
        );
        assert_eq!(parse_plain(b"no-separators"), None);
        assert_eq!(parse_plain(b"\0a\0b\0c"), None);
        assert_eq!(parse_plain(b"\0\xff\0pw"), None);
    }

    #[test]
    fn the_identity_never_prints_the_password() {
        let id = SaslIdentity::Plain {
            authcid: "s/registrations/d".into(),
            password: "SharedAccessSignature sig=secret".into(),
        };
        assert!(!format!("{id:?}").contains("secret"));
    }
}
