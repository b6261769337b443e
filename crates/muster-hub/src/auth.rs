//! Hub authorization: shared access policies and service SAS tokens.
//!
//! A request carries `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..`:
//! - `sr` names this hub's host (raw, `quote_plus`-encoded or with a scheme; a port on either
//!   side is ignored), optionally followed by a path that must be a segment prefix of the
//!   resource the request touches: `{host}/devices` covers every device, `{host}/devices/{id}`
//!   covers `/devices/{id}` and `/twins/{id}` of that device only (`twins/{id}` is read as
//!   `devices/{id}`);
//! - `skn` names a policy (required: tokens signed with a device's own key never reach the
//!   registry);
//! - the signature verifies with the policy's primary or secondary key (constant time, every
//!   `sr` encoding clients use — `muster_proto::sas`); `se` is in the future, allowing
//!   [`CLOCK_SKEW_SECS`] of skew;
//! - the policy holds the right the operation needs. As in Azure (and the C# SDK's
//!   `AccessRights` flags, `RegistryWrite = RegistryRead | 2`), RegistryWrite implies
//!   RegistryRead; no other right implies another.
//!
//! Every refusal is 401 `IotHubUnauthorizedAccess`, as IoT Hub answers.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::HeaderMap;
use muster_proto::runtime::Entropy;
use muster_proto::{SasError, SasToken};
use serde::{Deserialize, Serialize};

use crate::error::HubError;

/// Tokens whose `se` lies this many seconds in the past are still accepted (clock skew).
pub const CLOCK_SKEW_SECS: i64 = 30;

muster_proto::str_enum! {
    /// One IoT Hub shared access permission.
    HubRight, "hub access right" {
        RegistryRead => "RegistryRead",
        RegistryWrite => "RegistryWrite",
        ServiceConnect => "ServiceConnect",
        DeviceConnect => "DeviceConnect",
    }
}

/// A set of rights, written as Azure writes it: `"RegistryRead, RegistryWrite"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubRights(Vec<HubRight>);

impl HubRights {
    pub fn all() -> Self {
        Self(HubRight::ALL.to_vec())
    }

    pub fn new(rights: impl IntoIterator<Item = HubRight>) -> Self {
        let mut v: Vec<HubRight> = Vec::new();
        for r in rights {
            if !v.contains(&r) {
                v.push(r);
            }
        }
        v.sort_by_key(|r| HubRight::ALL.iter().position(|a| a == r));
        Self(v)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let rights = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(HubRight::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(rights))
    }

    /// The rights exactly as listed.
    pub fn contains(&self, right: HubRight) -> bool {
        self.0.contains(&right)
    }

    /// Whether an operation needing `right` is allowed: RegistryWrite implies RegistryRead.
    pub fn allows(&self, right: HubRight) -> bool {
        self.contains(right)
            || (right == HubRight::RegistryRead && self.contains(HubRight::RegistryWrite))
    }

    pub fn iter(&self) -> impl Iterator<Item = HubRight> + '_ {
        self.0.iter().copied()
    }
}

impl std::fmt::Display for HubRights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|r| r.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

impl Serialize for HubRights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HubRights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A hub shared access policy: a name, two base64 keys and the rights it grants.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HubPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: HubRights,
}

impl std::fmt::Debug for HubPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPolicy")
            .field("key_name", &self.key_name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// The five policies every IoT hub starts with, with fresh 32-byte keys:
/// `iothubowner` (all four rights), `service` (ServiceConnect), `device` (DeviceConnect),
/// `registryRead` (RegistryRead), `registryReadWrite` (RegistryRead, RegistryWrite).
pub fn default_policies(entropy: &dyn Entropy) -> Vec<HubPolicy> {
    let key = || {
        let mut b = [0u8; 32];
        entropy.fill(&mut b);
        B64.encode(b)
    };
    let policy = |name: &str, rights: &[HubRight]| HubPolicy {
        key_name: name.to_string(),
        primary_key: key(),
        secondary_key: key(),
        rights: HubRights::new(rights.iter().copied()),
    };
    vec![
        policy("iothubowner", HubRight::ALL),
        policy("service", &[HubRight::ServiceConnect]),
        policy("device", &[HubRight::DeviceConnect]),
        policy("registryRead", &[HubRight::RegistryRead]),
        policy(
            "registryReadWrite",
            &[HubRight::RegistryRead, HubRight::RegistryWrite],
        ),
    ]
}

/// What a request touches, for matching against the token's `sr` path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every device (`GET /devices`).
    Devices,
    /// One device (`/devices/{id}`, `/twins/{id}`).
    Device(&'a str),
}

/// Who made the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub policy: String,
}

/// Checks service SAS tokens against one hub's policies.
#[derive(Debug, Clone)]
pub struct HubAuthorizer {
    /// Lower-case host name without port.
    host: Arc<str>,
    policies: Arc<Vec<HubPolicy>>,
}

impl HubAuthorizer {
    pub fn new(host_name: &str, policies: Vec<HubPolicy>) -> Self {
        Self {
            host: strip_port(&host_name.to_ascii_lowercase()).into(),
            policies: Arc::new(policies),
        }
    }

    pub fn policies(&self) -> &[HubPolicy] {
        &self.policies
    }

    /// The policy whose key signed the request's unexpired token, whatever its scope and
    /// rights (the audit log names it for refused writes too); `None` when it does not verify.
    pub fn identify(&self, headers: &HeaderMap, now_unix: i64) -> Option<String> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        let token = SasToken::parse(value).ok()?;
        let name = token.key_name.as_deref()?;
        let policy = self
            .policies
            .iter()
            .find(|p| p.key_name.eq_ignore_ascii_case(name))?;
        let judged_now = now_unix - CLOCK_SKEW_SECS;
        [&policy.primary_key, &policy.secondary_key]
            .into_iter()
            .filter_map(|k| B64.decode(k).ok())
            .any(|k| token.verify(&k, judged_now).is_ok())
            .then(|| policy.key_name.clone())
    }

    /// Checks the request's token, its scope and that its policy allows `right`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        right: HubRight,
        scope: Scope<'_>,
        now_unix: i64,
    ) -> Result<Caller, HubError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| HubError::unauthorized("the request has no Authorization header"))?
            .to_str()
            .map_err(|_| HubError::unauthorized("the Authorization header is not valid text"))?;
        let token = SasToken::parse(value).map_err(sas_error)?;
        self.check_resource(&token, scope)?;
        let name = token.key_name.as_deref().ok_or_else(|| {
            HubError::unauthorized(
                "the token names no shared access policy (skn); the registry needs a hub policy token",
            )
        })?;
        let policy = self
            .policies
            .iter()
            .find(|p| p.key_name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                HubError::unauthorized(format!("no shared access policy is named '{name}'"))
            })?;
        // Skew: judge expiry as if it were CLOCK_SKEW_SECS earlier.
        let judged_now = now_unix - CLOCK_SKEW_SECS;
        let mut last = SasError::BadSignature;
        let mut verified = false;
        for key in [&policy.primary_key, &policy.secondary_key] {
            let Ok(key) = B64.decode(key) else { continue };
            match token.verify(&key, judged_now) {
                Ok(()) => {
                    verified = true;
                    break;
                }
                Err(e @ SasError::Expired { .. }) => return Err(sas_error(e)),
                Err(e) => last = e,
            }
        }
        if !verified {
            return Err(sas_error(last));
        }
        if !policy.rights.allows(right) {
            return Err(HubError::unauthorized(format!(
                "shared access policy '{}' does not have the {} permission this operation needs",
                policy.key_name,
                right.as_str()
            )));
        }
        Ok(Caller {
            policy: policy.key_name.clone(),
        })
    }

    fn check_resource(&self, token: &SasToken, scope: Scope<'_>) -> Result<(), HubError> {
        let resource = token.resource_without_scheme().to_ascii_lowercase();
        let mut parts = resource.split('/');
        let host = strip_port(parts.next().unwrap_or(""));
        if host != &*self.host {
            return Err(HubError::unauthorized(format!(
                "the token's resource (sr) '{}' does not name this hub",
                token.resource
            )));
        }
        let mut path: Vec<&str> = parts.filter(|s| !s.is_empty()).collect();
        if path.first() == Some(&"twins") {
            path[0] = "devices";
        }
        let target_id = match scope {
            Scope::Devices => None,
            Scope::Device(id) => Some(id.to_ascii_lowercase()),
        };
        let mut target: Vec<&str> = vec!["devices"];
        if let Some(id) = target_id.as_deref() {
            target.push(id);
        }
        let covered = path.len() <= target.len() && path.iter().zip(&target).all(|(a, b)| a == b);
        if covered {
            Ok(())
        } else {
            Err(HubError::unauthorized(format!(
                "the token's resource (sr) '{}' does not cover this request",
                token.resource
            )))
        }
    }
}

pub(crate) fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn sas_error(e: SasError) -> HubError {
    HubError::unauthorized(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::runtime::SeededEntropy;

    #[test]
    fn rights_parse_and_imply() {
        let r = HubRights::parse("registrywrite, ServiceConnect").unwrap();
        assert_eq!(r.to_string(), "RegistryWrite, ServiceConnect");
        assert!(r.allows(HubRight::RegistryRead));
        assert!(!r.contains(HubRight::RegistryRead));
        assert!(!r.allows(HubRight::DeviceConnect));
        assert!(!HubRights::parse("RegistryRead")
            .unwrap()
            .allows(HubRight::RegistryWrite));
        assert!(HubRights::parse("Everything").is_err());
        let json = serde_json::to_string(&HubRights::all()).unwrap();
        assert_eq!(
            json,
            "\"RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect\""
        );
    }

    #[test]
    fn default_policies_have_distinct_keys_and_hide_them() {
        let p = default_policies(&SeededEntropy::new(1));
        let names: Vec<&str> = p.iter().map(|p| p.key_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "iothubowner",
                "service",
                "device",
                "registryRead",
                "registryReadWrite"
            ]
        );
        assert_eq!(B64.decode(&p[0].primary_key).unwrap().len(), 32);
        assert_ne!(p[0].primary_key, p[0].secondary_key);
        assert!(!format!("{:?}", p[0]).contains(&p[0].primary_key));
        let json = serde_json::to_value(&p[4]).unwrap();
        assert_eq!(json["keyName"], "registryReadWrite");
        assert_eq!(json["rights"], "RegistryRead, RegistryWrite");
    }

    #[test]
    fn strip_port_only_strips_digits() {
        assert_eq!(strip_port("hub.local:8443"), "hub.local");
        assert_eq!(strip_port("hub.local"), "hub.local");
    }
}
