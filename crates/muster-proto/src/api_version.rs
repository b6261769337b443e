//! The `api-version` values Muster accepts, oldest first.

use crate::str_enum;

str_enum! {
    /// Legacy Python sends 2018-09-01-preview, C# v1 2019-03-31, everything current 2021-10-01.
    ApiVersion, "api-version" {
        V2018_09_01Preview => "2018-09-01-preview",
        V2019_03_31 => "2019-03-31",
        V2021_06_01 => "2021-06-01",
        V2021_10_01 => "2021-10-01",
    }
}

impl ApiVersion {
    /// The version Muster's own clients send.
    pub const LATEST: ApiVersion = ApiVersion::V2021_10_01;
}

/// The device api-versions whose register request may carry a `csr` and whose answer carries
/// `issuedCertificateChain` (device-protocol.md §9.2). Device requests with other versions keep
/// working; only a CSR sent with one of them is refused.
pub const DEVICE_CSR_API_VERSIONS: [&str; 2] = ["2025-07-01-preview", "2026-04-01"];

/// Whether a device request's api-version allows a `csr` (case-insensitive).
pub fn device_accepts_csr(api_version: &str) -> bool {
    DEVICE_CSR_API_VERSIONS
        .iter()
        .any(|v| v.eq_ignore_ascii_case(api_version.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_issuance_versions_accept_a_csr() {
        assert!(device_accepts_csr("2026-04-01"));
        assert!(device_accepts_csr("2025-07-01-PREVIEW"));
        assert!(!device_accepts_csr("2021-10-01"));
        assert!(!device_accepts_csr(""));
    }
}
