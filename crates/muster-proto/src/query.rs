//! Query specification and the paging headers of the three query operations.

use serde::{Deserialize, Serialize};

pub const HEADER_MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
pub const HEADER_CONTINUATION: &str = "x-ms-continuation";
pub const HEADER_ITEM_TYPE: &str = "x-ms-item-type";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuerySpecification {
    pub query: String,
}

/// Value of `x-ms-item-type` (C# parses it and throws when missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemType {
    Enrollment,
    EnrollmentGroup,
    DeviceRegistration,
}

impl ItemType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ItemType::Enrollment => "Enrollment",
            ItemType::EnrollmentGroup => "EnrollmentGroup",
            ItemType::DeviceRegistration => "DeviceRegistration",
        }
    }
}
