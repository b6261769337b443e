//! Identifiers: registration ids, enrollment group ids and ID scopes.
//!
//! DPS treats registration and group ids case-insensitively but echoes them as given, so each
//! id keeps its original spelling and offers [`RegistrationId::key`], the lower-cased form that
//! stores index by.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest registration or enrollment group id DPS accepts.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused; the message names the rule that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} contains {found:?} at position {position}; only letters, digits and - . _ : are allowed")]
    BadCharacter {
        kind: &'static str,
        found: char,
        position: usize,
    },
    #[error("{kind} must start and end with a letter or digit (a final '-' is also allowed)")]
    BadEdge { kind: &'static str },
    #[error("ID scope must be 3 to 64 letters and digits, like 0ne00000000")]
    BadIdScope,
}

fn validate_id(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    let len = s.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len });
    }
    for (position, c) in s.chars().enumerate() {
        if !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':')) {
            return Err(IdError::BadCharacter {
                kind,
                found: c,
                position,
            });
        }
    }
    // DPS: "No special characters allowed at start or end"; the portal also lets ids end in '-'.
    let first = s.chars().next().unwrap_or('-');
    let last = s.chars().last().unwrap_or('-');
    if !first.is_ascii_alphanumeric() || !(last.is_ascii_alphanumeric() || last == '-') {
        return Err(IdError::BadEdge { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, PartialEq, Eq, Hash)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against the DPS id rules.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id($kind, &s)?;
                Ok(Self(s))
            }

            /// The id as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The case-folded form used for lookups.
            pub fn key(&self) -> String {
                self.0.to_ascii_lowercase()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// A device's registration id (for X.509 devices, the leaf certificate's CN).
    RegistrationId,
    "registration id"
);
id_type!(
    /// The id of an enrollment group.
    EnrollmentGroupId,
    "enrollment group id"
);

/// The ID scope that devices present; `0ne` followed by 8 hex digits when Muster makes one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct IdScope(String);

impl IdScope {
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if !(3..=64).contains(&s.len()) || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(IdError::BadIdScope);
        }
        Ok(Self(s))
    }

    /// A fresh scope in the DPS form `0ne` + 8 upper-case hex digits, from caller-supplied randomness.
    pub fn from_random(random: u32) -> Self {
        Self(format!("0ne{random:08X}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dps_ids() {
        for ok in [
            "a",
            "dev-01",
            "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
            "a:b.c_d",
            "x-",
        ] {
            RegistrationId::new(ok).unwrap();
        }
        RegistrationId::new("a".repeat(128)).unwrap();
    }

    #[test]
    fn refuses_bad_ids_naming_the_rule() {
        assert!(matches!(
            RegistrationId::new(""),
            Err(IdError::Empty { .. })
        ));
        assert!(matches!(
            RegistrationId::new("a".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        assert!(matches!(
            RegistrationId::new("bad!id"),
            Err(IdError::BadCharacter {
                found: '!',
                position: 3,
                ..
            })
        ));
        assert!(matches!(
            RegistrationId::new("-abc"),
            Err(IdError::BadEdge { .. })
        ));
        assert!(matches!(
            RegistrationId::new("abc."),
            Err(IdError::BadEdge { .. })
        ));
        assert!(matches!(
            RegistrationId::new("héllo"),
            Err(IdError::BadCharacter { .. })
        ));
    }

    #[test]
    fn key_folds_case() {
        assert_eq!(RegistrationId::new("Dev-A").unwrap().key(), "dev-a");
        assert_eq!(RegistrationId::new("Dev-A").unwrap().as_str(), "Dev-A");
    }

    #[test]
    fn id_scope_from_random() {
        assert_eq!(IdScope::from_random(0xAB12).as_str(), "0ne0000AB12");
        assert!(IdScope::new("0ne!").is_err());
    }
}
