//! The SASL layer (device-protocol.md §5.1, §5.2, §5.7), run by Muster itself (not by
//! fe2o3's synchronous `SaslAcceptor`, because the `TPM` mechanism waits on the registration
//! engine in the middle of the exchange): the mechanisms frame, the device's init, and for
//! `TPM` the challenge rounds; then the outcome. fe2o3 takes the connection over after it,
//! from the device's second protocol header (AMQP).
//!
//! Nothing is verified here: the registrar checks the SAS token on every request and answers
//! with its DPS error code, exactly as over MQTT, so a device with a wrong key learns `401002`
//! rather than a bare SASL failure. For `TPM` the exchange is (§5.7): init
//! `0 ‖ idScope ‖ 0 ‖ registrationId ‖ 0 ‖ EK`; challenge `0`; response `0 ‖ SRK`; the
//! registrar issues the key ([`DeviceRegistrar::register`] with the EK and SRK and no token,
//! as the HTTPS challenge), and its activation blob goes out in challenge segments
//! `0x80 | last·0x40 | seq ‖ chunk` (each but the last answered with one byte); the last
//! response is `0 ‖ SAS token` signed with the key the TPM imported, recorded like a PLAIN
//! password. A refused challenge (EK not enrolled, ...) ends SASL with `auth`.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use fe2o3_amqp::frames::sasl::Frame;
use fe2o3_amqp::types::primitives::{Array, Binary, Symbol};
use fe2o3_amqp::types::sasl::{SaslChallenge, SaslCode, SaslInit, SaslMechanisms, SaslOutcome};
use muster_proto::device::{DeviceRegistration, DeviceTpm};
use muster_registration::{DeviceCredential, DeviceRegistrar, RegisterRequest, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// `PLAIN`: SAS tokens. `ANONYMOUS`: clients that authenticate otherwise (their TLS client
/// certificate, or a CBS token on the hub). `EXTERNAL`: the TLS client certificate (the C
/// SDK's X.509 devices); checked by the session, like a certificate without SASL. `TPM`: the
/// TPM challenge (registration only).
const PLAIN: &str = "PLAIN";
const ANONYMOUS: &str = "ANONYMOUS";
const EXTERNAL: &str = "EXTERNAL";
const TPM: &str = "TPM";

/// The largest SASL frame read: AMQP's minimum max-frame-size is 512, which the SDKs keep
/// to; a TPM init (a 316-byte EK, scope and id) fits, with room.
const MAX_SASL_FRAME: u32 = 2048;
/// Blob bytes per challenge segment (frames stay under 512 bytes; two segments for a
/// 766-byte blob, at most four allowed by the 2-bit sequence number).
const SEGMENT: usize = 400;

/// What the device presented in SASL.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum SaslIdentity {
    /// No SASL layer at all (protocol id 0 after TLS: X.509 devices).
    #[default]
    None,
    Anonymous,
    /// `EXTERNAL`: the identity is the TLS client certificate.
    External,
    /// `authcid` (`{idScope}/registrations/{registrationId}` for DPS) and the password (a SAS
    /// token; for `TPM`, the one signed with the key the TPM imported).
    Plain {
        authcid: String,
        password: String,
    },
}

impl std::fmt::Debug for SaslIdentity {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaslIdentity::None => f.write_str("None"),
            SaslIdentity::Anonymous => f.write_str("Anonymous"),
            SaslIdentity::External => f.write_str("External"),
            SaslIdentity::Plain { authcid, .. } => write!(f, "Plain({authcid:?}, ..)"),
        }
    }
}

/// Why SASL did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum SaslFailed {
    #[error("SASL I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("SASL frame: {0}")]
    Frame(String),
    /// Sent as the outcome `auth`.
    #[error("SASL refused: {0}")]
    Refused(String),
}

/// Splits a PLAIN initial response, `authzid NUL authcid NUL passwd` (RFC 4616).
fn parse_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((
        String::from_utf8(authcid.to_vec()).ok()?,
        String::from_utf8(password.to_vec()).ok()?,
    ))
}

/// Splits a TPM initial response, `0 ‖ idScope ‖ 0 ‖ registrationId ‖ 0 ‖ EK` (the EK is
/// binary and may hold zeros).
fn parse_tpm_init(response: &[u8]) -> Option<(String, String, Vec<u8>)> {
    let rest = response.strip_prefix(&[0u8])?;
    let end = rest.iter().position(|b| *b == 0)?;
    let scope = std::str::from_utf8(&rest[..end]).ok()?.to_string();
    let rest = &rest[end + 1..];
    let end = rest.iter().position(|b| *b == 0)?;
    let rid = std::str::from_utf8(&rest[..end]).ok()?.to_string();
    let ek = rest[end + 1..].to_vec();
    (!scope.is_empty() && !rid.is_empty() && !ek.is_empty()).then_some((scope, rid, ek))
}

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    frame: Frame,
) -> Result<(), SaslFailed> {
    let body = serde_amqp::to_vec(&frame).map_err(|e| SaslFailed::Frame(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(body.len() + 8);
    buf.put_u32(u32::try_from(body.len() + 8).map_err(|_| SaslFailed::Frame("too long".into()))?);
    // doff 2, type 1 (SASL), channel ignored.
    buf.put_slice(&[2, 1, 0, 0]);
    buf.put_slice(&body);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    Ok(())
}

async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Frame, SaslFailed> {
    let size = stream.read_u32().await?;
    if !(8..=MAX_SASL_FRAME).contains(&size) {
        return Err(SaslFailed::Frame(format!("a SASL frame of {size} bytes")));
    }
    let mut frame = vec![0u8; size as usize - 4];
    stream.read_exact(&mut frame).await?;
    if frame[1] != 1 || frame[0] < 2 {
        return Err(SaslFailed::Frame("not a SASL frame".into()));
    }
    let body = frame
        .get(frame[0] as usize * 4 - 4..)
        .ok_or_else(|| SaslFailed::Frame("bad data offset".into()))?;
    serde_amqp::from_slice(body).map_err(|e| SaslFailed::Frame(e.to_string()))
}

fn outcome(code: SaslCode) -> Frame {
    Frame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

fn challenge(bytes: Vec<u8>) -> Frame {
    Frame::Challenge(SaslChallenge {
        challenge: Binary::from(bytes),
    })
}

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, SaslFailed> {
    match read_frame(stream).await? {
        Frame::Response(r) => Ok(r.response.into_vec()),
        _ => Err(SaslFailed::Frame("expected a sasl-response".into())),
    }
}

/// Runs SASL after the device's SASL protocol header was read (and echoed by the caller):
/// mechanisms, init, (TPM rounds), outcome. Returns what the device presented once the
/// outcome `ok` was sent; on a refusal the outcome `auth` was sent.
pub async fn negotiate<S>(
    stream: &mut S,
    registrar: Option<&Arc<dyn DeviceRegistrar>>,
) -> Result<SaslIdentity, SaslFailed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut mechanisms = vec![
        Symbol::from(PLAIN),
        Symbol::from(ANONYMOUS),
        Symbol::from(EXTERNAL),
    ];
    if registrar.is_some() {
        mechanisms.push(Symbol::from(TPM));
    }
    write_frame(
        stream,
        Frame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: Array::from(mechanisms),
        }),
    )
    .await?;
    let init = match read_frame(stream).await? {
        Frame::Init(init) => init,
        _ => return Err(SaslFailed::Frame("expected a sasl-init".into())),
    };
    let result = match init.mechanism.as_str() {
        TPM => match registrar {
            Some(r) => tpm(stream, init, r.as_ref()).await,
            None => Err(SaslFailed::Refused("TPM is not offered here".into())),
        },
        _ => simple(init),
    };
    match result {
        Ok(identity) => {
            write_frame(stream, outcome(SaslCode::Ok)).await?;
            Ok(identity)
        }
        Err(SaslFailed::Refused(why)) => {
            let _ = write_frame(stream, outcome(SaslCode::Auth)).await;
            Err(SaslFailed::Refused(why))
        }
        Err(e) => Err(e),
    }
}

/// The mechanisms without a challenge.
fn simple(init: SaslInit) -> Result<SaslIdentity, SaslFailed> {
    match init.mechanism.as_str() {
        PLAIN => {
            let response = init.initial_response.map(|b| b.into_vec());
            match response.as_deref().and_then(parse_plain) {
                Some((authcid, password)) if !authcid.is_empty() => {
                    Ok(SaslIdentity::Plain { authcid, password })
                }
                _ => Err(SaslFailed::Refused(
                    "a PLAIN response without a user".into(),
                )),
            }
        }
        ANONYMOUS => Ok(SaslIdentity::Anonymous),
        EXTERNAL => Ok(SaslIdentity::External),
        other => Err(SaslFailed::Refused(format!(
            "mechanism {other:?} is not offered"
        ))),
    }
}

/// The `TPM` mechanism (§5.7).
async fn tpm<S>(
    stream: &mut S,
    init: SaslInit,
    registrar: &dyn DeviceRegistrar,
) -> Result<SaslIdentity, SaslFailed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    let response = init
        .initial_response
        .map(|b| b.into_vec())
        .unwrap_or_default();
    let (scope, rid, ek) = parse_tpm_init(&response).ok_or_else(|| {
        SaslFailed::Refused("a TPM init that is not 0 scope 0 registrationId 0 EK".into())
    })?;
    write_frame(stream, challenge(vec![0])).await?;
    let srk = read_response(stream).await?;
    let srk = srk
        .strip_prefix(&[0u8])
        .filter(|s| !s.is_empty())
        .ok_or_else(|| SaslFailed::Refused("a TPM response without the SRK".into()))?
        .to_vec();
    let reply = registrar
        .register(RegisterRequest {
            id_scope: scope.clone(),
            registration_id: rid.clone(),
            credential: DeviceCredential::None,
            body: DeviceRegistration {
                registration_id: Some(rid.clone()),
                tpm: Some(DeviceTpm {
                    endorsement_key: B64.encode(&ek),
                    storage_root_key: Some(B64.encode(&srk)),
                }),
                ..Default::default()
            },
            transport: Transport::Amqp,
            api_version: None,
        })
        .await;
    let blob = match (reply.status, reply.body.get("authenticationKey")) {
        (401, Some(serde_json::Value::String(b))) => B64
            .decode(b)
            .map_err(|_| SaslFailed::Frame("the activation blob is not base64".into()))?,
        _ => {
            return Err(SaslFailed::Refused(format!(
                "TPM challenge for '{rid}' refused: {}",
                reply
                    .body
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
            )))
        }
    };
    let segments: Vec<&[u8]> = blob.chunks(SEGMENT).collect();
    if segments.len() > 4 {
        return Err(SaslFailed::Frame(
            "the activation blob needs more than 4 segments".into(),
        ));
    }
    for (seq, chunk) in segments.iter().enumerate() {
        let last = seq + 1 == segments.len();
        let mut bytes = vec![0x80 | if last { 0x40 } else { 0 } | seq as u8];
        bytes.extend_from_slice(chunk);
        write_frame(stream, challenge(bytes)).await?;
        let answer = read_response(stream).await?;
        if last {
            let token = answer
                .strip_prefix(&[0u8])
                .and_then(|t| String::from_utf8(t.to_vec()).ok())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| SaslFailed::Refused("the last TPM response has no token".into()))?;
            return Ok(SaslIdentity::Plain {
                authcid: format!("{scope}/registrations/{rid}"),
                password: token,
            });
        }
    }
    Err(SaslFailed::Frame("an empty activation blob".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm_init_responses() {
        assert_eq!(
            parse_tpm_init(b"\0scope\0dev-1\0\x01\x3a\0\x01"),
            Some(("scope".into(), "dev-1".into(), b"\x01\x3a\0\x01".to_vec()))
        );
        assert_eq!(parse_tpm_init(b"scope\0dev\0ek"), None);
        assert_eq!(parse_tpm_init(b"\0scope\0dev\0"), None);
        assert_eq!(parse_tpm_init(b"\0scope\0dev"), None);
    }

    #[test]
    fn plain_responses() {
        assert_eq!(
            parse_plain(b"\0scope/registrations/dev\0SharedAccessSignature sr=x"),
            Some((
                "scope/registrations/dev".into(),
                "SharedAccessSignature sr=x".into()
            ))
        );
        assert_eq!(parse_plain(b"no-separators"), None);
        assert_eq!(parse_plain(b"\0a\0b\0c"), None);
        assert_eq!(parse_plain(b"\0\xff\0pw"), None);
    }

    #[test]
    fn the_identity_never_prints_the_password() {
        let id = SaslIdentity::Plain {
            authcid: "s/registrations/d".into(),
            password: "SharedAccessSignature sig=secret".into(),
        };
        assert!(!format!("{id:?}").contains("secret"));
    }
}
