//! Shared access signature tokens, for the service API and for devices.
//!
//! `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}[&skn={policy}]`, where
//! `sig = base64(HMAC-SHA256(base64decode(key), sr + "\n" + se))`.
//!
//! Clients disagree on how `sr` is encoded (raw, `quote_plus`, lower-case hex, with a scheme
//! prefix) and on field order, so verification signs the `sr` text exactly as it appears in the
//! token, and also the other encodings of the same resource; the comparison is constant-time.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "SharedAccessSignature ";

/// What `quote_plus` and `WebUtility.UrlEncode` leave alone.
const QUOTE_PLUS: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why a token was refused. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the authorization is not a SharedAccessSignature token")]
    NotSas,
    #[error("the SharedAccessSignature token has no '{0}' field")]
    MissingField(&'static str),
    #[error("the SharedAccessSignature token field '{0}' is malformed")]
    Malformed(&'static str),
    #[error("the SharedAccessSignature token expired at {expiry} (unix seconds)")]
    Expired { expiry: i64 },
    #[error("the SharedAccessSignature signature does not match")]
    BadSignature,
}

/// A parsed token. `sr_raw` keeps the resource exactly as sent, since that is what was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    pub sr_raw: String,
    /// `sr` percent-decoded once.
    pub resource: String,
    pub signature: Vec<u8>,
    pub expiry: i64,
    pub key_name: Option<String>,
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// `quote_plus`-style encoding with upper-case hex, as Python, C# and the CLI produce.
pub fn encode_resource(resource: &str) -> String {
    utf8_percent_encode(resource, QUOTE_PLUS).to_string()
}

/// HMAC-SHA256 of `message` under `key`, base64-encoded.
pub fn sign(key: &[u8], message: &str) -> String {
    B64.encode(hmac_bytes(key, message))
}

fn hmac_bytes(key: &[u8], message: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

impl SasToken {
    /// Parses the value of an `Authorization` header or an MQTT password.
    pub fn parse(value: &str) -> Result<Self, SasError> {
        let body = value.trim().strip_prefix(PREFIX).ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in body.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sr" => sr = Some(v),
                "sig" => sig = Some(v),
                "se" => se = Some(v),
                "skn" => skn = Some(v),
                _ => {}
            }
        }
        let sr_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let se = se.ok_or(SasError::MissingField("se"))?;
        let signature = B64
            .decode(decode(sig).as_bytes())
            .map_err(|_| SasError::Malformed("sig"))?;
        let expiry = decode(se)
            .parse::<i64>()
            .map_err(|_| SasError::Malformed("se"))?;
        Ok(Self {
            sr_raw: sr_raw.to_string(),
            resource: decode(sr_raw),
            signature,
            expiry,
            key_name: skn.map(decode).filter(|s| !s.is_empty()),
        })
    }

    /// The resource without a `https://` or `http://` prefix and without a trailing `/`.
    pub fn resource_without_scheme(&self) -> &str {
        let r = self.resource.as_str();
        let r = r
            .strip_prefix("https://")
            .or_else(|| r.strip_prefix("http://"))
            .unwrap_or(r);
        r.trim_end_matches('/')
    }

    /// Checks expiry, then the signature against each encoding clients use for `sr`.
    pub fn verify(&self, key: &[u8], now_unix: i64) -> Result<(), SasError> {
        if self.expiry <= now_unix {
            return Err(SasError::Expired {
                expiry: self.expiry,
            });
        }
        // HMAC takes keys of any length: this never fails.
        let Ok(keyed) = HmacSha256::new_from_slice(key) else {
            return Err(SasError::BadSignature);
        };
        if self.signature_matches(&keyed, &self.signed_messages()) {
            Ok(())
        } else {
            Err(SasError::BadSignature)
        }
    }

    /// The messages the signature may cover, each distinct once: `sr` exactly as sent and in
    /// the other encodings clients use, then `\n{se}`. Callers that try many keys against one
    /// token build this once.
    pub fn signed_messages(&self) -> Vec<String> {
        let encoded = encode_resource(&self.resource);
        let mut messages: Vec<String> = Vec::with_capacity(4);
        for sr in [
            self.sr_raw.clone(),
            self.resource.clone(),
            lower_hex_escapes(&encoded),
            encoded,
        ] {
            let message = format!("{sr}\n{}", self.expiry);
            if !messages.contains(&message) {
                messages.push(message);
            }
        }
        messages
    }

    /// Whether the signature is the HMAC of one of `messages` under `keyed` (an HMAC already
    /// keyed, so its key schedule is paid once). Constant-time in the signature; no expiry check.
    pub fn signature_matches(&self, keyed: &Hmac<Sha256>, messages: &[String]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for m in messages {
            let mut mac = keyed.clone();
            mac.update(m.as_bytes());
            ok |= mac
                .finalize()
                .into_bytes()
                .as_slice()
                .ct_eq(&self.signature);
        }
        bool::from(ok)
    }

    /// Makes a token the way Python and C# do: `sr` encoded, and the encoded form signed.
    pub fn generate(resource: &str, key: &[u8], key_name: Option<&str>, expiry: i64) -> String {
        let signed: Result<String, std::convert::Infallible> =
            Self::generate_with(resource, key_name, expiry, |m| Ok(hmac_bytes(key, m)));
        match signed {
            Ok(t) => t,
            Err(never) => match never {},
        }
    }

    /// Like [`SasToken::generate`], with the HMAC-SHA256 computed by `sign` over the string to
    /// sign (`{encoded sr}\n{expiry}`): for a key that never leaves its holder, e.g. a TPM.
    pub fn generate_with<E>(
        resource: &str,
        key_name: Option<&str>,
        expiry: i64,
        sign: impl FnOnce(&str) -> Result<Vec<u8>, E>,
    ) -> Result<String, E> {
        let sr = encode_resource(resource);
        let sig = B64.encode(sign(&format!("{sr}\n{expiry}"))?);
        let mut token = format!(
            "{PREFIX}sr={sr}&sig={}&se={expiry}",
            utf8_percent_encode(&sig, QUOTE_PLUS)
        );
        if let Some(name) = key_name {
            token.push_str("&skn=");
            token.push_str(&encode_resource(name));
        }
        Ok(token)
    }
}

fn lower_hex_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for _ in 0..2 {
                if let Some(h) = chars.next() {
                    out.push(h.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn generated_token_verifies() {
        let t = SasToken::generate(
            "127.0.0.2:8443",
            KEY,
            Some("provisioningserviceowner"),
            2000,
        );
        let p = SasToken::parse(&t).unwrap();
        assert_eq!(p.resource, "127.0.0.2:8443");
        assert_eq!(p.sr_raw, "127.0.0.2%3A8443");
        assert_eq!(p.key_name.as_deref(), Some("provisioningserviceowner"));
        p.verify(KEY, 1000).unwrap();
        assert_eq!(p.verify(KEY, 2000), Err(SasError::Expired { expiry: 2000 }));
        assert_eq!(p.verify(b"another key", 1000), Err(SasError::BadSignature));
    }

    #[test]
    fn node_style_raw_sr_any_field_order() {
        // Node signs the raw resource and orders fields sr, sig, skn, se.
        let sig = sign(KEY, "host:8443\n5000");
        let t = format!(
            "SharedAccessSignature sr=host:8443&sig={}&skn=owner&se=5000",
            encode_resource(&sig)
        );
        SasToken::parse(&t).unwrap().verify(KEY, 10).unwrap();
    }

    #[test]
    fn lower_case_hex_and_unencoded_slash_in_sig() {
        let sig = sign(KEY, "0ne1%2fregistrations%2fdev\n5000");
        // Legacy Python leaves '/' in sig unencoded; C lower-cases hex escapes.
        let t = format!("SharedAccessSignature sr=0ne1%2fregistrations%2fdev&sig={sig}&se=5000");
        let p = SasToken::parse(&t).unwrap();
        assert_eq!(p.resource, "0ne1/registrations/dev");
        p.verify(KEY, 10).unwrap();
    }

    #[test]
    fn scheme_prefixed_resource() {
        let t = SasToken::generate("https://h.example", KEY, None, 5000);
        let p = SasToken::parse(&t).unwrap();
        assert_eq!(p.resource_without_scheme(), "h.example");
        p.verify(KEY, 10).unwrap();
    }

    #[test]
    fn malformed_tokens_name_the_field() {
        assert_eq!(SasToken::parse("Bearer x"), Err(SasError::NotSas));
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=a&se=1"),
            Err(SasError::MissingField("sr"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=AAAA&se=soon"),
            Err(SasError::Malformed("se"))
        );
    }
}
