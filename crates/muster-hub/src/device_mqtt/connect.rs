//! CONNECT: who the device is and whether it may connect.
//!
//! | Check | Refusal (CONNACK return code) |
//! |---|---|
//! | no user name, or one not of the form `{host}/{deviceId}[/{moduleId}]/?…` | 4 bad user name or password |
//! | `{host}` (case-insensitive, `:port` ignored) is not this hub | 5 not authorised |
//! | a module (`{host}/{deviceId}/{moduleId}/…`): modules are not supported yet | 5 |
//! | client id ≠ device id of the user name (ASCII case ignored), or an invalid device id | 2 identifier rejected |
//! | unknown device, disabled device | 5 |
//! | password present: not a SAS token (a bad credential, as a bad signature is) | 5 |
//! | SAS token: `sr` not `{host}/devices/{deviceId}` (any encoding; a `skn` DeviceConnect policy token may also name `{host}` or `{host}/devices`), signature matching neither device key (or the policy's keys), expired (30 s skew allowed), or the device is not a `sas` device | 5 |
//! | no password, X.509 client certificate: the device is not `selfSigned`, or the leaf's SHA-1 / SHA-256 thumbprint matches neither registered thumbprint (`certificateAuthority` devices are refused until CA verification exists) | 5 |
//! | neither password nor certificate | 4 |
//! | the store failed | 3 server unavailable |

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::{SasError, SasToken};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::auth::{strip_port, HubRight, CLOCK_SKEW_SECS};
use crate::error::HubErrorCode;
use crate::model::{validate_device_id, AuthenticationType, DeviceStatus};
use crate::HubRegistry;

use super::topic::{parse_username, Username};

/// An accepted device.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// As registered (original casing).
    pub device_id: String,
    /// The SAS token's expiry (unix seconds): the connection is closed then, as IoT Hub
    /// does; the SDKs reconnect with a fresh token before it.
    pub token_expiry: Option<i64>,
    pub username: Username,
}

/// A refusal: the CONNACK code and why (logged; never contains key material).
pub(crate) type Refusal = (ConnectReturnCode, String);

fn refuse(code: ConnectReturnCode, why: impl Into<String>) -> Refusal {
    (code, why.into())
}

/// Uppercase hex.
fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// SHA-1 and SHA-256 thumbprints of a DER certificate, upper-case hex.
pub(crate) fn thumbprints(der: &[u8]) -> (String, String) {
    (
        hex_upper(&Sha1::digest(der)),
        hex_upper(&Sha256::digest(der)),
    )
}

pub(crate) async fn authenticate(
    hub: &HubRegistry,
    connect: &Connect,
    client_certs: &[Vec<u8>],
) -> Result<Identity, Refusal> {
    use ConnectReturnCode::*;
    let login = connect
        .login
        .as_ref()
        .ok_or_else(|| refuse(BadUserNamePassword, "no user name"))?;
    let username = parse_username(&login.username).ok_or_else(|| {
        refuse(
            BadUserNamePassword,
            format!(
                "user name {:?} is not {{host}}/{{deviceId}}/?…",
                login.username
            ),
        )
    })?;
    let hub_host = strip_port(&hub.host_name().to_ascii_lowercase()).to_string();
    if strip_port(&username.host.to_ascii_lowercase()) != hub_host {
        return Err(refuse(
            NotAuthorized,
            format!("user name names host {:?}, not this hub", username.host),
        ));
    }
    if let Some(module) = &username.module_id {
        return Err(refuse(
            NotAuthorized,
            format!("module connections ({module}) are not supported yet"),
        ));
    }
    let device_id = username.device_id.clone();
    let client_id = percent_encoding::percent_decode_str(&connect.client_id).decode_utf8_lossy();
    if !client_id.eq_ignore_ascii_case(&device_id) {
        return Err(refuse(
            BadClientId,
            format!("client id {client_id:?} is not the device id {device_id:?} of the user name"),
        ));
    }
    validate_device_id(&device_id).map_err(|e| refuse(BadClientId, e.message))?;
    let credential = if !login.password.is_empty() {
        // A password that is not a SAS token is a bad credential like a bad signature:
        // IoT Hub answers both with 5.
        let token = SasToken::parse(&login.password)
            .map_err(|e| refuse(NotAuthorized, format!("password: {e}")))?;
        DeviceCredential::Sas(token)
    } else if let Some(leaf) = client_certs.first() {
        DeviceCredential::Certificate(leaf)
    } else {
        return Err(refuse(
            BadUserNamePassword,
            "neither a SAS token (password) nor a client certificate",
        ));
    };
    let (device_id, token_expiry) = authenticate_device(hub, &device_id, credential).await?;
    Ok(Identity {
        device_id,
        token_expiry,
        username,
    })
}

/// What a device presented to prove who it is.
pub(crate) enum DeviceCredential<'a> {
    /// A SAS token (the MQTT password, or an AMQP CBS put-token).
    Sas(SasToken),
    /// The TLS client certificate (leaf, DER).
    Certificate(&'a [u8]),
}

/// Checks that `device_id` is registered, enabled and proves itself with `credential` (the
/// table above, from "unknown device" on). Shared by the MQTT CONNECT and AMQP (CBS or
/// X.509) endpoints. Returns the device id as registered and, for a SAS token, its expiry.
pub(crate) async fn authenticate_device(
    hub: &HubRegistry,
    device_id: &str,
    credential: DeviceCredential<'_>,
) -> Result<(String, Option<i64>), Refusal> {
    use ConnectReturnCode::*;
    validate_device_id(device_id).map_err(|e| refuse(BadClientId, e.message))?;
    let hub_host = strip_port(&hub.host_name().to_ascii_lowercase()).to_string();
    let device = match hub.get_device(device_id).await {
        Ok(d) => d,
        Err(e) if e.code == HubErrorCode::DeviceNotFound => {
            return Err(refuse(
                NotAuthorized,
                format!("device {device_id:?} is not registered"),
            ))
        }
        Err(e) => return Err(refuse(ServiceUnavailable, e.to_string())),
    };
    if device.status == DeviceStatus::Disabled {
        return Err(refuse(
            NotAuthorized,
            format!("device {device_id:?} is disabled"),
        ));
    }
    let now = hub.clock().now().unix_seconds();
    let token_expiry = match credential {
        DeviceCredential::Sas(token) => {
            verify_sas(hub, &hub_host, &device, &token, now)?;
            Some(token.expiry)
        }
        DeviceCredential::Certificate(leaf) => {
            verify_certificate(&device, leaf)?;
            match hub.certificate_revoked(leaf).await {
                Ok(false) => {}
                Ok(true) => {
                    return Err(refuse(
                        NotAuthorized,
                        "the client certificate was issued by Muster and has been revoked",
                    ))
                }
                Err(e) => return Err(refuse(ServiceUnavailable, e.to_string())),
            }
            None
        }
    };
    Ok((device.device_id, token_expiry))
}

pub(crate) fn verify_sas(
    hub: &HubRegistry,
    hub_host: &str,
    device: &crate::Device,
    token: &SasToken,
    now: i64,
) -> Result<(), Refusal> {
    use ConnectReturnCode::NotAuthorized;
    let resource = token.resource_without_scheme().to_ascii_lowercase();
    let (host, path) = resource.split_once('/').unwrap_or((resource.as_str(), ""));
    if strip_port(host) != hub_host {
        return Err(refuse(
            NotAuthorized,
            format!("the token's sr {:?} does not name this hub", token.resource),
        ));
    }
    let path = path.trim_matches('/');
    let own = format!("devices/{}", device.device_id.to_ascii_lowercase());
    let keys: Vec<String> = match &token.key_name {
        None => {
            if path != own {
                return Err(refuse(
                    NotAuthorized,
                    format!("the token's sr {:?} is not this device's", token.resource),
                ));
            }
            if device.authentication.auth_type != AuthenticationType::Sas {
                return Err(refuse(
                    NotAuthorized,
                    "the device does not authenticate with symmetric keys",
                ));
            }
            let k = &device.authentication.symmetric_key;
            [&k.primary_key, &k.secondary_key]
                .into_iter()
                .flatten()
                .cloned()
                .collect()
        }
        Some(name) => {
            if !(path.is_empty() || path == "devices" || path == own) {
                return Err(refuse(
                    NotAuthorized,
                    format!(
                        "the token's sr {:?} does not cover this device",
                        token.resource
                    ),
                ));
            }
            let policy = hub
                .authorizer()
                .policies()
                .iter()
                .find(|p| p.key_name.eq_ignore_ascii_case(name))
                .filter(|p| p.rights.allows(HubRight::DeviceConnect))
                .ok_or_else(|| {
                    refuse(
                        NotAuthorized,
                        format!("no policy {name:?} with the DeviceConnect permission"),
                    )
                })?;
            vec![policy.primary_key.clone(), policy.secondary_key.clone()]
        }
    };
    let judged_now = now - CLOCK_SKEW_SECS;
    for key in keys {
        let Ok(key) = B64.decode(key) else { continue };
        match token.verify(&key, judged_now) {
            Ok(()) => return Ok(()),
            Err(e @ SasError::Expired { .. }) => return Err(refuse(NotAuthorized, e.to_string())),
            Err(_) => {}
        }
    }
    Err(refuse(
        NotAuthorized,
        "the SAS signature matches neither key",
    ))
}

pub(crate) fn verify_certificate(device: &crate::Device, leaf: &[u8]) -> Result<(), Refusal> {
    use ConnectReturnCode::NotAuthorized;
    match device.authentication.auth_type {
        AuthenticationType::SelfSigned => {}
        AuthenticationType::CertificateAuthority => {
            return Err(refuse(
                NotAuthorized,
                "certificateAuthority devices are not supported yet",
            ))
        }
        _ => {
            return Err(refuse(
                NotAuthorized,
                "the device does not authenticate with an X.509 certificate",
            ))
        }
    }
    let (sha1, sha256) = thumbprints(leaf);
    let t = &device.authentication.x509_thumbprint;
    let matches = [&t.primary_thumbprint, &t.secondary_thumbprint]
        .into_iter()
        .flatten()
        .any(|registered| {
            registered.eq_ignore_ascii_case(&sha1) || registered.eq_ignore_ascii_case(&sha256)
        });
    if matches {
        Ok(())
    } else {
        Err(refuse(
            NotAuthorized,
            "the client certificate's thumbprint is not the device's",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_upper_hex() {
        let (s1, s256) = thumbprints(b"abc");
        assert_eq!(s1, "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(
            s256,
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }
}
