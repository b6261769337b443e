//! The hub's wire types, spelled as IoT Hub spells them (api-version 2021-04-12), and the
//! validation of what clients send.
//!
//! Output types ([`Device`], [`Twin`]) always carry every field IoT Hub returns, with `null`
//! where Azure writes `null` and `0001-01-01T00:00:00Z` for times that never happened, so
//! msrest (`azure-iot-hub`), Node (`azure-iothub`) and C# deserialize them unchanged.
//! Input types ([`DeviceInput`], [`TwinUpdate`]) read only what a client may set and ignore
//! read-only fields a client echoes back from a GET (etag, generationId, connectionState, ...).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::HubError;
use crate::properties;

/// How IoT Hub writes a time that never happened.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// Characters allowed in device ids besides ASCII letters and digits.
pub const DEVICE_ID_SPECIALS: &str = "-.%_*?!(),:=@$'";

/// Checks a device id: 1..=128 ASCII letters, digits and `-.%_*?!(),:=@$'`.
pub fn validate_device_id(id: &str) -> Result<(), HubError> {
    if id.is_empty() {
        return Err(HubError::invalid("the device id is empty"));
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(HubError::invalid(format!(
            "the device id is {} characters long; at most {MAX_DEVICE_ID_LEN} are allowed",
            id.chars().count()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || DEVICE_ID_SPECIALS.contains(*c)))
    {
        return Err(HubError::invalid(format!(
            "the device id {id:?} contains {c:?}; allowed are ASCII letters, digits and {DEVICE_ID_SPECIALS}"
        )));
    }
    Ok(())
}

/// A point in time or "never" (`0001-01-01T00:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HubTime(pub Option<Timestamp>);

impl HubTime {
    pub const NEVER: HubTime = HubTime(None);
}

impl Serialize for HubTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(t) => s.serialize_str(&t.to_dps_string()),
            None => s.serialize_str(NEVER),
        }
    }
}

impl<'de> Deserialize<'de> for HubTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s.as_deref() {
            None => Ok(HubTime(None)),
            Some(s) if s.starts_with("0001-01-01") => Ok(HubTime(None)),
            Some(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| HubTime(Some(Timestamp(t.with_timezone(&chrono::Utc)))))
                .map_err(serde::de::Error::custom),
        }
    }
}

muster_proto::str_enum! {
    /// Whether a device may connect.
    DeviceStatus, "device status" {
        Enabled => "enabled",
        Disabled => "disabled",
    }
}

muster_proto::str_enum! {
    /// Whether a device is connected to the hub's device endpoints.
    ConnectionState, "connection state" {
        Disconnected => "Disconnected",
        Connected => "Connected",
    }
}

muster_proto::str_enum! {
    /// How a device authenticates.
    AuthenticationType, "authentication type" {
        Sas => "sas",
        SelfSigned => "selfSigned",
        CertificateAuthority => "certificateAuthority",
        None => "none",
    }
}

/// A device's two symmetric keys (base64). Debug never shows them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymmetricKey")
            .field(
                "primary_key",
                &self.primary_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secondary_key",
                &self.secondary_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// X.509 thumbprints (SHA-1 or SHA-256 hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

/// A device's authentication as the hub returns it: both parts always present, the unused
/// one with `null`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationMechanism {
    pub symmetric_key: SymmetricKey,
    pub x509_thumbprint: X509Thumbprint,
    #[serde(rename = "type")]
    pub auth_type: AuthenticationType,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// A device identity (`GET/PUT /devices/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// As first created; lookups ignore case.
    pub device_id: String,
    pub generation_id: String,
    /// Opaque; changes on every identity write (twin writes don't change it).
    pub etag: String,
    pub connection_state: ConnectionState,
    pub status: DeviceStatus,
    pub status_reason: Option<String>,
    pub connection_state_updated_time: HubTime,
    pub status_updated_time: HubTime,
    pub last_activity_time: HubTime,
    pub cloud_to_device_message_count: u64,
    pub authentication: AuthenticationMechanism,
    pub capabilities: DeviceCapabilities,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    #[serde(default)]
    pub parent_scopes: Vec<String>,
}

/// `properties` of a twin: each collection with `$metadata` and `$version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinProperties {
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
}

/// A device twin (`GET/PATCH/PUT /twins/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    pub device_id: String,
    pub model_id: String,
    /// base64 of the big-endian 64-bit twin version, as IoT Hub forms it (`AAAAAAAAAAE=`).
    pub etag: String,
    pub device_etag: String,
    pub status: DeviceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub status_update_time: HubTime,
    pub connection_state: ConnectionState,
    pub last_activity_time: HubTime,
    pub cloud_to_device_message_count: u64,
    pub authentication_type: AuthenticationType,
    pub x509_thumbprint: X509Thumbprint,
    /// Grows by one on every change of tags, desired or reported properties.
    pub version: u64,
    pub tags: Map<String, Value>,
    pub properties: TwinProperties,
    pub capabilities: DeviceCapabilities,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    #[serde(default)]
    pub parent_scopes: Vec<String>,
}

/// The twin etag for a twin version.
pub fn twin_etag(version: u64) -> String {
    B64.encode(version.to_be_bytes())
}

/// Authentication as a client sends it: any part may be missing or `null`, empty strings
/// count as missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationInput {
    #[serde(default, rename = "type")]
    pub auth_type: Option<AuthenticationType>,
    #[serde(default)]
    pub symmetric_key: Option<SymmetricKey>,
    #[serde(default)]
    pub x509_thumbprint: Option<X509Thumbprint>,
}

/// What a client may set on a device identity. Unknown and read-only fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInput {
    /// Empty means "the id in the path".
    #[serde(default, deserialize_with = "null_as_empty")]
    pub device_id: String,
    /// Default `enabled`.
    #[serde(default)]
    pub status: Option<DeviceStatus>,
    #[serde(default)]
    pub status_reason: Option<String>,
    /// Missing: `sas` with generated keys (as Node's registry normalizes it).
    #[serde(default)]
    pub authentication: Option<AuthenticationInput>,
    #[serde(default)]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default)]
    pub device_scope: Option<String>,
    #[serde(default)]
    pub parent_scopes: Option<Vec<String>>,
}

impl DeviceInput {
    /// A `sas` device; `None` keys are generated on create (or kept on update).
    pub fn sas(device_id: impl Into<String>, keys: Option<(String, String)>) -> Self {
        let symmetric_key = keys.map(|(p, s)| SymmetricKey {
            primary_key: Some(p),
            secondary_key: Some(s),
        });
        Self {
            device_id: device_id.into(),
            authentication: Some(AuthenticationInput {
                auth_type: Some(AuthenticationType::Sas),
                symmetric_key,
                x509_thumbprint: None,
            }),
            ..Self::default()
        }
    }

    /// A `selfSigned` device with the leaf certificate's thumbprint(s).
    pub fn self_signed(
        device_id: impl Into<String>,
        primary_thumbprint: String,
        secondary_thumbprint: Option<String>,
    ) -> Self {
        Self {
            device_id: device_id.into(),
            authentication: Some(AuthenticationInput {
                auth_type: Some(AuthenticationType::SelfSigned),
                symmetric_key: None,
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: Some(primary_thumbprint),
                    secondary_thumbprint,
                }),
            }),
            ..Self::default()
        }
    }

    pub fn with_iot_edge(mut self, iot_edge: bool) -> Self {
        self.capabilities = Some(DeviceCapabilities { iot_edge });
        self
    }

    pub fn with_status(mut self, status: DeviceStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Reads a request body; `null` where an object is expected counts as missing.
    pub fn from_json(body: Value) -> Result<Self, HubError> {
        if !body.is_object() {
            return Err(HubError::new(
                crate::error::HubErrorCode::IotHubFormatError,
                "the request body must be a JSON object (a Device)",
            ));
        }
        let mut input: DeviceInput = serde_json::from_value(body).map_err(|e| {
            HubError::invalid(format!("the device in the request body is invalid: {e}"))
        })?;
        input.device_id = input.device_id.trim().to_string();
        Ok(input)
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Checks a base64 key of 16..=64 bytes.
pub fn validate_key(key: &str, which: &str) -> Result<(), HubError> {
    let bytes = B64
        .decode(key)
        .map_err(|_| HubError::invalid(format!("the {which} is not valid base64")))?;
    if !(16..=64).contains(&bytes.len()) {
        return Err(HubError::invalid(format!(
            "the {which} is {} bytes long; keys must be 16 to 64 bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// Checks a thumbprint: 40 (SHA-1) or 64 (SHA-256) hex digits. Returns it upper-cased.
pub fn normalize_thumbprint(t: &str, which: &str) -> Result<String, HubError> {
    let t: String = t.chars().filter(|c| !matches!(c, ' ' | ':')).collect();
    if !(t.len() == 40 || t.len() == 64) || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(HubError::invalid(format!(
            "the {which} must be 40 (SHA-1) or 64 (SHA-256) hexadecimal digits"
        )));
    }
    Ok(t.to_ascii_uppercase())
}

/// Resolves requested authentication against the current one (on update): keys a client
/// leaves out are kept from the current `sas` authentication, or generated with `gen_key`.
pub fn resolve_authentication(
    input: Option<&AuthenticationInput>,
    current: Option<&AuthenticationMechanism>,
    mut gen_key: impl FnMut() -> String,
) -> Result<AuthenticationMechanism, HubError> {
    let empty = AuthenticationInput::default();
    let input = input.unwrap_or(&empty);
    let thumbs = input.x509_thumbprint.clone().unwrap_or_default();
    let keys = input.symmetric_key.clone().unwrap_or_default();
    let auth_type = match input.auth_type {
        Some(t) => t,
        None if non_empty(&thumbs.primary_thumbprint).is_some()
            || non_empty(&thumbs.secondary_thumbprint).is_some() =>
        {
            AuthenticationType::SelfSigned
        }
        None => AuthenticationType::Sas,
    };
    let mut out = AuthenticationMechanism {
        symmetric_key: SymmetricKey::default(),
        x509_thumbprint: X509Thumbprint::default(),
        auth_type,
    };
    match auth_type {
        AuthenticationType::Sas => {
            let kept = current
                .filter(|c| c.auth_type == AuthenticationType::Sas)
                .map(|c| c.symmetric_key.clone())
                .unwrap_or_default();
            let pick = |given: &Option<String>,
                        kept: &Option<String>,
                        which: &str,
                        gen: &mut dyn FnMut() -> String|
             -> Result<String, HubError> {
                match non_empty(given) {
                    Some(k) => {
                        validate_key(k, which)?;
                        Ok(k.to_string())
                    }
                    None => match kept {
                        Some(k) if !k.is_empty() => Ok(k.clone()),
                        _ => Ok(gen()),
                    },
                }
            };
            let primary = pick(
                &keys.primary_key,
                &kept.primary_key,
                "primary key",
                &mut gen_key,
            )?;
            let secondary = pick(
                &keys.secondary_key,
                &kept.secondary_key,
                "secondary key",
                &mut gen_key,
            )?;
            out.symmetric_key = SymmetricKey {
                primary_key: Some(primary),
                secondary_key: Some(secondary),
            };
        }
        AuthenticationType::SelfSigned => {
            let primary = non_empty(&thumbs.primary_thumbprint)
                .map(|t| normalize_thumbprint(t, "primary thumbprint"))
                .transpose()?;
            let secondary = non_empty(&thumbs.secondary_thumbprint)
                .map(|t| normalize_thumbprint(t, "secondary thumbprint"))
                .transpose()?;
            if primary.is_none() && secondary.is_none() {
                return Err(HubError::invalid(
                    "a selfSigned device needs a primary or secondary thumbprint",
                ));
            }
            out.x509_thumbprint = X509Thumbprint {
                primary_thumbprint: primary,
                secondary_thumbprint: secondary,
            };
        }
        AuthenticationType::CertificateAuthority | AuthenticationType::None => {}
    }
    Ok(out)
}

/// A twin write from a service: tags and/or desired properties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinUpdate {
    /// `None`: not sent (patch: unchanged; replace: cleared).
    pub tags: Option<Map<String, Value>>,
    /// `None`: not sent (patch: unchanged; replace: cleared).
    pub desired: Option<Map<String, Value>>,
    /// `"properties": {"desired": null}` was sent: remove every desired property (IoT Hub
    /// clears the collection and bumps its `$version`).
    pub clear_desired: bool,
}

impl TwinUpdate {
    /// Reads `{"tags": {..}, "properties": {"desired": {..}}}`. Read-only parts a client
    /// echoes from a GET (`deviceId`, `etag`, `version`, `properties.reported`,
    /// `$metadata`/`$version` inside desired, ...) are ignored.
    pub fn from_json(body: &Value) -> Result<Self, HubError> {
        let Some(obj) = body.as_object() else {
            return Err(HubError::new(
                crate::error::HubErrorCode::IotHubFormatError,
                "the request body must be a JSON object (a Twin)",
            ));
        };
        let tags = match obj.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(HubError::invalid("twin 'tags' must be a JSON object")),
        };
        let clear_desired = obj
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.get("desired").is_some_and(Value::is_null));
        let desired = match obj.get("properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) => match p.get("desired") {
                None | Some(Value::Null) => None,
                Some(Value::Object(m)) => {
                    let mut m = m.clone();
                    properties::strip_system_keys(&mut m);
                    Some(m)
                }
                Some(_) => {
                    return Err(HubError::invalid(
                        "twin 'properties.desired' must be a JSON object",
                    ))
                }
            },
            Some(_) => return Err(HubError::invalid("twin 'properties' must be a JSON object")),
        };
        let update = Self {
            tags,
            desired,
            clear_desired,
        };
        update.validate()?;
        Ok(update)
    }

    pub fn validate(&self) -> Result<(), HubError> {
        if let Some(t) = &self.tags {
            properties::validate_collection(t, "tags")?;
        }
        if let Some(d) = &self.desired {
            properties::validate_collection(d, "desired")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_ids() {
        validate_device_id("dev-01.a%b_c*d?e!f(g)h,i:j=k@l$m'n").unwrap();
        validate_device_id(&"a".repeat(128)).unwrap();
        assert!(validate_device_id(&"a".repeat(129)).is_err());
        assert!(validate_device_id("").is_err());
        for bad in ["a/b", "a b", "a#b", "ü", "a+b"] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_time_never_round_trips() {
        assert_eq!(serde_json::to_value(HubTime::NEVER).unwrap(), json!(NEVER));
        let t: HubTime = serde_json::from_value(json!(NEVER)).unwrap();
        assert_eq!(t, HubTime::NEVER);
        let t: HubTime = serde_json::from_value(json!("2023-05-19T23:10:45.1256254Z")).unwrap();
        assert_eq!(
            serde_json::to_value(t).unwrap(),
            json!("2023-05-19T23:10:45.1256254Z")
        );
    }

    #[test]
    fn authentication_resolution() {
        let mut n = 0;
        let mut gen = || {
            n += 1;
            B64.encode([n as u8; 32])
        };
        // Node's normalized form: sas with empty keys → generated.
        let input: AuthenticationInput = serde_json::from_value(
            json!({"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": null}}),
        )
        .unwrap();
        let a = resolve_authentication(Some(&input), None, &mut gen).unwrap();
        assert_eq!(
            a.symmetric_key.primary_key.as_deref(),
            Some(B64.encode([1u8; 32]).as_str())
        );
        // Update without keys keeps them.
        let b = resolve_authentication(Some(&input), Some(&a), &mut gen).unwrap();
        assert_eq!(a, b);
        // Thumbprint without type → selfSigned, upper-cased.
        let input: AuthenticationInput = serde_json::from_value(
            json!({"x509Thumbprint": {"primaryThumbprint": "ab".repeat(20)}}),
        )
        .unwrap();
        let c = resolve_authentication(Some(&input), None, &mut gen).unwrap();
        assert_eq!(c.auth_type, AuthenticationType::SelfSigned);
        assert_eq!(c.x509_thumbprint.primary_thumbprint, Some("AB".repeat(20)));
        assert_eq!(c.symmetric_key, SymmetricKey::default());
        // Bad keys and thumbprints.
        let bad_key: AuthenticationInput = serde_json::from_value(
            json!({"type": "sas", "symmetricKey": {"primaryKey": B64.encode([0u8; 8])}}),
        )
        .unwrap();
        assert!(resolve_authentication(Some(&bad_key), None, &mut gen).is_err());
        let bad_thumb: AuthenticationInput = serde_json::from_value(
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "xyz"}}),
        )
        .unwrap();
        assert!(resolve_authentication(Some(&bad_thumb), None, &mut gen).is_err());
        let none: AuthenticationInput =
            serde_json::from_value(json!({"type": "selfSigned"})).unwrap();
        assert!(resolve_authentication(Some(&none), None, &mut gen).is_err());
    }

    #[test]
    fn twin_update_ignores_read_only_parts() {
        let u = TwinUpdate::from_json(&json!({
            "deviceId": "d", "etag": "AAAAAAAAAAE=", "version": 3,
            "tags": {"site": "a"},
            "properties": {"desired": {"x": 1, "$metadata": {}, "$version": 2}, "reported": {"y": 1}}
        }))
        .unwrap();
        assert_eq!(u.tags, json!({"site": "a"}).as_object().cloned());
        assert_eq!(u.desired, json!({"x": 1}).as_object().cloned());
        assert!(TwinUpdate::from_json(&json!({"tags": 5})).is_err());
        assert!(TwinUpdate::from_json(&json!({"tags": {"a.b": 1}})).is_err());
        assert!(TwinUpdate::from_json(&json!([1])).is_err());
    }

    #[test]
    fn twin_etags_are_versions() {
        assert_eq!(twin_etag(1), "AAAAAAAAAAE=");
        assert_eq!(twin_etag(2), "AAAAAAAAAAI=");
    }
}
