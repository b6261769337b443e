//! Muster's issued-certificate records (`GET /certificates/issued`, Muster's extension): one
//! per certificate the issuing CA signed for a registration's CSR (device-protocol.md §9.2),
//! with its revocation once an operator revokes it.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// The issuing CA name of Muster's own intermediate (the default).
pub const LOCAL_ISSUING_CA: &str = "local";

/// Longest revocation reason kept.
pub const MAX_REASON_CHARS: usize = 256;

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Upper-case hex, as `issuedCertificate.serialNumber` of the registration record; the key.
    pub serial_number: String,
    /// Upper-case hex SHA-256 of the DER.
    pub sha256_thumbprint: String,
    pub registration_id: String,
    /// `individual` or `group`.
    pub enrollment_type: String,
    /// The group the device registered through (`enrollment_type` `group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The issuing CA's name: [`LOCAL_ISSUING_CA`] or an operator CA's configured name.
    pub issuing_ca: String,
    pub subject_name: String,
    pub issuer_name: String,
    pub not_before_utc: Timestamp,
    pub not_after_utc: Timestamp,
    /// When Muster signed it (the server's clock).
    pub issued_date_time_utc: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_date_time_utc: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<String>,
}

impl IssuedCertificate {
    pub fn is_revoked(&self) -> bool {
        self.revoked_date_time_utc.is_some()
    }
}

/// The body of `POST /certificates/issued/{serial}/revoke`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Serial numbers the way records key them: upper-case hex without separators or leading
/// `0x`; `None` for anything else.
pub fn normalize_serial(serial: &str) -> Option<String> {
    let s = serial.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(s.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_normalize_to_upper_hex() {
        assert_eq!(normalize_serial("0a:bC").as_deref(), Some("0ABC"));
        assert_eq!(normalize_serial("0x1f").as_deref(), Some("1F"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(""), None);
        assert_eq!(normalize_serial(&"a".repeat(65)), None);
    }
}
