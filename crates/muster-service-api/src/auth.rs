//! Service API authorization: shared access policies and SAS tokens (service-api.md §3).
//!
//! A request carries `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..`. The
//! token must name this service's host (with or without a scheme or port), be unexpired, be
//! signed with a key of the policy it names (or of any policy when `skn` is absent), and that
//! policy must hold the operation's right. Keys are compared in constant time (`muster_proto::sas`).

use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::HeaderMap;
use muster_proto::{AccessRight, AccessRights, ErrorCode, SasError, SasToken};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Tokens whose `se` lies this many seconds in the past are still accepted (clock skew).
pub const CLOCK_SKEW_SECS: i64 = 30;

/// A shared access policy: a name, two keys and the rights it grants.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicy {
    pub key_name: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub rights: AccessRights,
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("key_name", &self.key_name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// The policies and host names the service API authorizes against.
#[derive(Debug, Clone)]
pub struct Authorizer {
    policies: Arc<RwLock<Vec<AccessPolicy>>>,
    /// Host names (optionally `host:port`) a token's `sr` may name, lower-case.
    hosts: Arc<Vec<String>>,
}

/// Who made the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub policy: String,
}

impl Authorizer {
    pub fn new(policies: Vec<AccessPolicy>, hosts: Vec<String>) -> Self {
        Self {
            policies: Arc::new(RwLock::new(policies)),
            hosts: Arc::new(hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect()),
        }
    }

    /// Replaces the policies (after `/accessPolicies` changed them in the store).
    pub fn set_policies(&self, policies: Vec<AccessPolicy>) {
        if let Ok(mut p) = self.policies.write() {
            *p = policies;
        }
    }

    pub fn policies(&self) -> Vec<AccessPolicy> {
        self.policies.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Checks the request's token and that its policy holds `right`.
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        right: AccessRight,
        now_unix: i64,
    ) -> Result<Caller, ApiError> {
        let (policy, rights) = self.verify_token(headers, now_unix)?;
        if !rights.contains(right) {
            return Err(ApiError::new(
                ErrorCode::InsufficientRights,
                format!(
                    "shared access policy '{policy}' does not have the {} right this operation needs",
                    right.as_str()
                ),
            ));
        }
        Ok(Caller { policy })
    }

    /// Checks the request's token only: any policy of this service will do, whatever its
    /// rights (operational endpoints such as `/metrics`).
    pub fn authenticate(&self, headers: &HeaderMap, now_unix: i64) -> Result<Caller, ApiError> {
        let (policy, _) = self.verify_token(headers, now_unix)?;
        Ok(Caller { policy })
    }

    /// The policy whose key signed the request's valid token, whatever its rights (the audit
    /// log names it for refused writes too); `None` when the token does not verify.
    pub fn identify(&self, headers: &HeaderMap, now_unix: i64) -> Option<String> {
        self.verify_token(headers, now_unix).ok().map(|(p, _)| p)
    }

    /// The name and rights of the policy that signed the request's token.
    fn verify_token(
        &self,
        headers: &HeaderMap,
        now_unix: i64,
    ) -> Result<(String, AccessRights), ApiError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("the request has no Authorization header"))?
            .to_str()
            .map_err(|_| unauthorized("the Authorization header is not valid text"))?;
        let token = SasToken::parse(value).map_err(sas_error)?;
        if !self.names_this_service(&token) {
            return Err(unauthorized(format!(
                "the token's resource (sr) '{}' does not name this service",
                token.resource
            )));
        }
        // Skew: judge expiry as if it were CLOCK_SKEW_SECS earlier.
        let judged_now = now_unix - CLOCK_SKEW_SECS;
        let policies = self
            .policies
            .read()
            .map_err(|_| ApiError::internal("reading access policies", "lock poisoned"))?;
        let candidates: Vec<&AccessPolicy> = match &token.key_name {
            Some(name) => {
                let found: Vec<&AccessPolicy> = policies
                    .iter()
                    .filter(|p| p.key_name.eq_ignore_ascii_case(name))
                    .collect();
                if found.is_empty() {
                    return Err(unauthorized(format!(
                        "no shared access policy is named '{name}'"
                    )));
                }
                found
            }
            None => policies.iter().collect(),
        };
        let mut last = SasError::BadSignature;
        for policy in candidates {
            for key in [&policy.primary_key, &policy.secondary_key] {
                let Ok(key) = B64.decode(key) else { continue };
                match token.verify(&key, judged_now) {
                    Ok(()) => return Ok((policy.key_name.clone(), policy.rights.clone())),
                    Err(e @ SasError::Expired { .. }) => return Err(sas_error(e)),
                    Err(e) => last = e,
                }
            }
        }
        Err(sas_error(last))
    }

    fn names_this_service(&self, token: &SasToken) -> bool {
        let r = token.resource_without_scheme().to_ascii_lowercase();
        // DPS matches the resource as a segment prefix of the target URI; the service API
        // lives at the root, so the host (optionally followed by a path) must be ours.
        let host = r.split('/').next().unwrap_or("");
        self.hosts.iter().any(|h| h == host)
    }
}

fn unauthorized(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, msg)
}

fn sas_error(e: SasError) -> ApiError {
    match e {
        SasError::Expired { .. } => ApiError::new(ErrorCode::TokenExpired, e.to_string()),
        other => unauthorized(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, key: &[u8], rights: &str) -> AccessPolicy {
        AccessPolicy {
            key_name: name.into(),
            primary_key: B64.encode(key),
            secondary_key: B64.encode(b"secondary-key-secondary-key-0000"),
            rights: AccessRights::parse(rights).unwrap(),
        }
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, token.parse().unwrap());
        h
    }

    fn authz() -> Authorizer {
        Authorizer::new(
            vec![
                policy(
                    "owner",
                    b"owner-key-owner-key-owner-key-00",
                    "EnrollmentRead, EnrollmentWrite",
                ),
                policy(
                    "reader",
                    b"reader-key-reader-key-reader-000",
                    "EnrollmentRead",
                ),
            ],
            vec!["127.0.0.2".into(), "127.0.0.2:8443".into()],
        )
    }

    #[test]
    fn accepts_valid_token_with_right() {
        let t = SasToken::generate(
            "127.0.0.2",
            b"owner-key-owner-key-owner-key-00",
            Some("owner"),
            1000,
        );
        let c = authz()
            .authorize(&headers(&t), AccessRight::EnrollmentWrite, 500)
            .unwrap();
        assert_eq!(c.policy, "owner");
        // Without skn, any policy whose key verifies.
        let t = SasToken::generate(
            "https://127.0.0.2:8443",
            b"owner-key-owner-key-owner-key-00",
            None,
            1000,
        );
        authz()
            .authorize(&headers(&t), AccessRight::EnrollmentRead, 500)
            .unwrap();
    }

    #[test]
    fn refuses_each_failure_with_its_code() {
        let a = authz();
        let e = a
            .authorize(&HeaderMap::new(), AccessRight::EnrollmentRead, 0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);

        let t = SasToken::generate(
            "127.0.0.2",
            b"wrong-key-wrong-key-wrong-key-00",
            Some("owner"),
            1000,
        );
        let e = a
            .authorize(&headers(&t), AccessRight::EnrollmentRead, 0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(e.message.contains("signature"), "{}", e.message);

        let t = SasToken::generate(
            "127.0.0.2",
            b"owner-key-owner-key-owner-key-00",
            Some("owner"),
            1000,
        );
        let e = a
            .authorize(
                &headers(&t),
                AccessRight::EnrollmentRead,
                1000 + CLOCK_SKEW_SECS + 1,
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::TokenExpired);
        // Inside the skew allowance it still passes.
        a.authorize(
            &headers(&t),
            AccessRight::EnrollmentRead,
            1000 + CLOCK_SKEW_SECS - 1,
        )
        .unwrap();

        let t = SasToken::generate(
            "127.0.0.2",
            b"reader-key-reader-key-reader-000",
            Some("reader"),
            1000,
        );
        let e = a
            .authorize(&headers(&t), AccessRight::EnrollmentWrite, 0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientRights);
        assert!(e.message.contains("EnrollmentWrite"));

        let t = SasToken::generate(
            "other.host",
            b"owner-key-owner-key-owner-key-00",
            Some("owner"),
            1000,
        );
        let e = a
            .authorize(&headers(&t), AccessRight::EnrollmentRead, 0)
            .unwrap_err();
        assert!(e.message.contains("does not name this service"));

        let t = SasToken::generate(
            "127.0.0.2",
            b"owner-key-owner-key-owner-key-00",
            Some("nobody"),
            1000,
        );
        let e = a
            .authorize(&headers(&t), AccessRight::EnrollmentRead, 0)
            .unwrap_err();
        assert!(e.message.contains("nobody"));
        // No message ever carries key material.
        assert!(!e
            .message
            .contains(&B64.encode(b"owner-key-owner-key-owner-key-00")));
    }
}
