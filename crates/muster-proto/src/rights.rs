//! Shared access policy rights (service-api.md §3.2). Rights do not imply each other.

use serde::{Deserialize, Serialize};

use crate::str_enum;

str_enum! {
    AccessRight, "access right" {
        ServiceConfig => "ServiceConfig",
        EnrollmentRead => "EnrollmentRead",
        EnrollmentWrite => "EnrollmentWrite",
        DeviceConnect => "DeviceConnect",
        RegistrationStatusRead => "RegistrationStatusRead",
        RegistrationStatusWrite => "RegistrationStatusWrite",
    }
}

/// A set of rights, written as Azure writes it: `"EnrollmentRead, EnrollmentWrite"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRights(Vec<AccessRight>);

impl AccessRights {
    pub fn all() -> Self {
        Self(AccessRight::ALL.to_vec())
    }

    pub fn new(rights: impl IntoIterator<Item = AccessRight>) -> Self {
        let mut v: Vec<AccessRight> = Vec::new();
        for r in rights {
            if !v.contains(&r) {
                v.push(r);
            }
        }
        Self(v)
    }

    pub fn contains(&self, right: AccessRight) -> bool {
        self.0.contains(&right)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let rights = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(AccessRight::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(rights))
    }
}

impl std::fmt::Display for AccessRights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|r| r.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

impl Serialize for AccessRights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AccessRights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_azure_form() {
        let r = AccessRights::parse("EnrollmentRead, enrollmentwrite").unwrap();
        assert!(r.contains(AccessRight::EnrollmentWrite));
        assert!(!r.contains(AccessRight::ServiceConfig));
        assert_eq!(r.to_string(), "EnrollmentRead, EnrollmentWrite");
        assert!(AccessRights::parse("Everything").is_err());
    }
}
