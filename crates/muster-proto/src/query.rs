//! Query specification, the query forms Muster accepts, and the paging headers of the three
//! query operations.
//!
//! DPS documents no query grammar; the clients send one of these, and each lists every record
//! of the operation's kind:
//! - `*` — the Node SDK samples (`createIndividualEnrollmentQuery({"query": "*"})`) and the
//!   legacy Python SDK (`QuerySpecification("*")`);
//! - `SELECT *` — the Azure CLI, the Python SDK's tests, Muster's console and CLI;
//! - `SELECT * FROM <name>` — the C# samples (`SELECT * FROM enrollments`, also for groups)
//!   and the Java SDK's builder (`select * from enrollmentGroups`).
//!
//! Keywords are case-insensitive and whitespace is free. The `FROM` name is not checked
//! against the operation (the C# group sample names `enrollments`). Anything else (`WHERE`,
//! projections, `TOP`) is refused, never silently ignored.

use serde::{Deserialize, Serialize};

pub const HEADER_MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
pub const HEADER_CONTINUATION: &str = "x-ms-continuation";
pub const HEADER_ITEM_TYPE: &str = "x-ms-item-type";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuerySpecification {
    pub query: String,
}

impl QuerySpecification {
    /// Checks that the query is one of the forms Muster accepts (see the module doc).
    pub fn check(&self) -> Result<(), UnsupportedQuery> {
        check_query(&self.query)
    }
}

/// A query Muster does not run: it names what it supports, and echoes the query (which holds
/// no secrets) so the caller sees what was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported query {query:?}: Muster supports '*', 'SELECT *' and 'SELECT * FROM <name>'")]
pub struct UnsupportedQuery {
    pub query: String,
}

/// Checks query text against the accepted forms.
pub fn check_query(query: &str) -> Result<(), UnsupportedQuery> {
    let words: Vec<&str> = query.split_whitespace().collect();
    let keyword = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
    let accepted = match words.as_slice() {
        ["*"] => true,
        [select, "*"] => keyword(select, "select"),
        [select, "*", from, name] => {
            keyword(select, "select") && keyword(from, "from") && is_collection_name(name)
        }
        _ => false,
    };
    if accepted {
        Ok(())
    } else {
        Err(UnsupportedQuery {
            query: query.to_string(),
        })
    }
}

/// A bare identifier, as the SDKs name collections (`enrollments`, `enrollmentGroups`,
/// `deviceRegistrations`): no clause can hide in it.
fn is_collection_name(name: &str) -> bool {
    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_the_sdks_send() {
        for q in [
            "*",
            " * ",
            "SELECT *",
            "select *",
            "Select  *",
            "SELECT * FROM enrollments",
            "select * from enrollmentGroups",
            "SELECT * FROM deviceRegistrations",
        ] {
            assert_eq!(check_query(q), Ok(()), "{q:?}");
        }
    }

    #[test]
    fn refuses_what_it_would_ignore() {
        for q in [
            "",
            "**",
            "SELECT",
            "SELECT id",
            "SELECT *, id",
            "SELECT * FROM",
            "SELECT * FROM enrollments WHERE provisioningStatus = 'enabled'",
            "SELECT * FROM enrollments;DROP",
            "SELECT TOP 5 *",
            "* FROM enrollments",
        ] {
            let err = check_query(q).expect_err(q);
            assert_eq!(err.query, q);
            assert!(err.to_string().contains("'SELECT *'"), "{err}");
        }
    }
}
