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
