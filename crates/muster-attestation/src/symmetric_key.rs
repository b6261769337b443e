//! Symmetric-key attestation: key validation, generation and the enrollment-group derived
//! device key (device-protocol.md §3.3, service-api.md §4.3).
//!
//! No function here ever puts key material into an error message.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Smallest accepted decoded key length in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Largest accepted decoded key length in bytes (also the length of generated keys).
pub const MAX_KEY_BYTES: usize = 64;

/// Standard alphabet with canonical padding, but non-zero trailing bits tolerated the way
/// .NET's `Convert.FromBase64String` and Python's `b64decode` tolerate them.
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

/// Why a symmetric key was refused. Messages name the rule, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is empty")]
    Empty,
    #[error("the key is not valid standard base64 (alphabet A-Z a-z 0-9 + /, '=' padding)")]
    InvalidBase64,
    #[error(
        "the key must decode to {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, but decodes to {0} bytes"
    )]
    InvalidLength(usize),
}

/// Decodes a base64 key to its bytes (standard alphabet, padded).
pub fn decode_key(b64: &str) -> Result<Vec<u8>, KeyError> {
    if b64.is_empty() {
        return Err(KeyError::Empty);
    }
    KEY_ENGINE.decode(b64).map_err(|_| KeyError::InvalidBase64)
}

/// Checks a user-supplied key: valid standard base64 that decodes to 16..=64 bytes.
pub fn validate_key(b64: &str) -> Result<(), KeyError> {
    let bytes = decode_key(b64)?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&bytes.len()) {
        return Err(KeyError::InvalidLength(bytes.len()));
    }
    Ok(())
}

/// A service-generated key: base64 of the 64 random bytes given (88 characters).
/// Callers supply the randomness so tests can control it.
pub fn generate_key(random: &[u8; 64]) -> String {
    STANDARD.encode(random)
}

/// The device key of `registration_id` in an enrollment group with key `group_key_b64`:
/// `base64(HMAC-SHA256(key = base64decode(group key), msg = UTF-8(registration id)))`.
///
/// Only the group key's base64 is checked here, not its length (HMAC takes any length; stored
/// group keys were validated when they were written).
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, KeyError> {
    let key = decode_key(group_key_b64)?;
    Ok(STANDARD.encode(hmac_sha256(&key, registration_id.as_bytes())))
}

/// Raw HMAC-SHA256 (32 bytes) — the primitive behind derived keys and SAS signatures.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// device-protocol.md §3.4: group key = bytes 0x00..0x1f.
    const SPEC_GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const SPEC_DEVICE_KEY: &str = "JOHsAb4JNdWTiD28P3nwHp6eyIyRvBG156Qxg/6ugAo=";

    #[test]
    fn derive_matches_spec_worked_example() {
        let group: Vec<u8> = (0u8..32).collect();
        assert_eq!(STANDARD.encode(&group), SPEC_GROUP_KEY);
        assert_eq!(
            derive_device_key(SPEC_GROUP_KEY, "my-device-01").unwrap(),
            SPEC_DEVICE_KEY
        );
    }

    /// The derived key is what signs the SAS token of §3.4 (Python/C# style).
    #[test]
    fn derived_key_signs_spec_sas_example() {
        let device_key = derive_device_key(SPEC_GROUP_KEY, "my-device-01").unwrap();
        let key = decode_key(&device_key).unwrap();
        assert_eq!(key.len(), 32);
        let sig = hmac_sha256(
            &key,
            b"0ne00000A0A%2Fregistrations%2Fmy-device-01\n1700000000",
        );
        assert_eq!(
            STANDARD.encode(sig),
            "bNd2vrhHg/QT5ra43SUtdMVYIK98Kv0b5uzOGn6JSe8="
        );
        let sig_c = hmac_sha256(
            &key,
            b"0ne00000A0A%2fregistrations%2fmy-device-01\n1700000000",
        );
        assert_eq!(
            STANDARD.encode(sig_c),
            "4pdFy41n/uI3o8+QlecKjv4/xOvYGifP2euehP0RMig="
        );
    }

    /// The tutorial's recipe:
    /// `keybytes=$(echo $KEY | base64 --decode | xxd -p -u -c 1000)`;
    /// `echo -n $REG_ID | openssl sha256 -mac HMAC -macopt hexkey:$keybytes -binary | base64`
    /// (run with OpenSSL for these values).
    #[test]
    fn derive_matches_openssl_recipe() {
        let group = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
        assert_eq!(
            derive_device_key(group, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").unwrap(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
    }

    #[test]
    fn derive_rejects_bad_group_key() {
        assert_eq!(
            derive_device_key("not base64!", "dev"),
            Err(KeyError::InvalidBase64)
        );
        assert_eq!(derive_device_key("", "dev"), Err(KeyError::Empty));
    }

    #[test]
    fn validate_lengths() {
        assert_eq!(
            validate_key(&STANDARD.encode([7u8; 15])),
            Err(KeyError::InvalidLength(15))
        );
        assert_eq!(validate_key(&STANDARD.encode([7u8; 16])), Ok(()));
        assert_eq!(validate_key(&STANDARD.encode([7u8; 32])), Ok(()));
        assert_eq!(validate_key(&STANDARD.encode([7u8; 64])), Ok(()));
        assert_eq!(
            validate_key(&STANDARD.encode([7u8; 65])),
            Err(KeyError::InvalidLength(65))
        );
        assert_eq!(validate_key(""), Err(KeyError::Empty));
    }

    #[test]
    fn validate_rejects_non_standard_base64_without_echoing() {
        let url_safe = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh_-"; // '-' '_' alphabet
        for bad in [
            url_safe,
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8", // missing padding
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8==", // excess padding
            "AAECAwQFBgcI CQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", // embedded space
            "secret-key-material!",
        ] {
            let err = validate_key(bad).unwrap_err();
            assert_eq!(err, KeyError::InvalidBase64, "{bad}");
            let msg = err.to_string();
            assert!(!msg.contains(bad), "message echoes the key: {msg}");
            assert!(msg.contains("base64"), "{msg}");
        }
        let msg = KeyError::InvalidLength(8).to_string();
        assert!(msg.contains("16 to 64 bytes"), "{msg}");
    }

    #[test]
    fn generated_key_is_88_chars_and_valid() {
        let mut random = [0u8; 64];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37);
        }
        let key = generate_key(&random);
        assert_eq!(key.len(), 88);
        assert_eq!(validate_key(&key), Ok(()));
        assert_eq!(decode_key(&key).unwrap(), random.to_vec());
    }
}
