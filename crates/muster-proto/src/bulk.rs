//! Bulk enrollment operations (`POST /enrollments`, `POST /enrollmentGroups`).

use serde::{Deserialize, Serialize};

use crate::enrollment::{EnrollmentGroup, IndividualEnrollment};
use crate::str_enum;

str_enum! {
    /// Node spells `updateIfMatchEtag`, the spec `updateIfMatchETag`: parsing ignores case.
    BulkOperationMode, "bulk operation mode" {
        Create => "create",
        Update => "update",
        UpdateIfMatchETag => "updateIfMatchETag",
        Delete => "delete",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    pub enrollments: Vec<IndividualEnrollment>,
    pub mode: BulkOperationMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    pub enrollment_groups: Vec<EnrollmentGroup>,
    pub mode: BulkOperationMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationResult {
    pub is_successful: bool,
    pub errors: Vec<BulkEnrollmentOperationError>,
}

/// One failed item; exactly one of the two ids is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperationError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    pub error_code: u32,
    pub error_status: String,
}
