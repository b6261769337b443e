//! Claims-based security (`$cbs`), as IoT Hub's AMQP device endpoint offers it: the device
//! attaches a sender and a receiver on `$cbs` and sends put-token requests, application
//! properties `operation` = `put-token`, `type` = `servicebus.windows.net:sastoken` (or
//! `azure-devices.net:sastoken`), `name` = the audience (`{host}/devices/{deviceId}`), the
//! SAS token as the body (an AMQP string value), a `message-id` and `reply-to`. The answer
//! goes out on the `$cbs` sender: `correlation-id` = the request's `message-id`, application
//! properties `status-code` (200, 400 malformed, 401 refused, 503 store failure) and
//! `status-description`.

use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use muster_proto::SasToken;
use rumqttc::mqttbytes::v4::ConnectReturnCode;

use crate::auth::strip_port;

pub(crate) const CBS_ADDRESS: &str = "$cbs";

/// A put-token request, checked for shape only (the token is verified by the session).
/// No `Debug`: the token is a credential.
pub(crate) struct PutToken {
    /// The request's `message-id` (the reply's `correlation-id`).
    pub message_id: Option<MessageId>,
    /// The device the audience names.
    pub device_id: String,
    pub token: SasToken,
}

/// Why a put-token was refused: the status code and its description (never key material).
pub(crate) type CbsRefusal = (i32, String);

fn property(message: &Message<Body<Value>>, name: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The body as text: a string value (Node, C), or a Data section / binary value.
pub(crate) fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(sections) => sections.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(AmqpValue(Value::String(s))) => s.as_bytes().to_vec(),
        Body::Value(AmqpValue(Value::Binary(b))) => b.to_vec(),
        _ => Vec::new(),
    }
}

/// The device id of an audience or token resource `[scheme://]{host}/devices/{deviceId}`
/// when `{host}` is this hub.
/// The SDKs pass the token's `sr` as it is in the token, percent-encoded (Node).
pub(crate) fn audience_device(audience: &str, hub_host: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(audience)
        .decode_utf8()
        .ok()?;
    let audience = decoded.as_ref();
    let rest = audience.split_once("://").map_or(audience, |(_, r)| r);
    let (host, path) = rest.split_once('/')?;
    if !strip_port(&host.to_ascii_lowercase()).eq_ignore_ascii_case(strip_port(hub_host)) {
        return None;
    }
    let path = path.trim_end_matches('/');
    let (devices, id) = path.split_once('/')?;
    if !devices.eq_ignore_ascii_case("devices") || id.is_empty() || id.contains('/') {
        return None;
    }
    Some(id.to_string())
}

/// Parses a put-token request.
pub(crate) fn parse_put_token(
    message: &Message<Body<Value>>,
    hub_host: &str,
) -> Result<PutToken, (Option<MessageId>, CbsRefusal)> {
    let message_id = message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    let bad = |why: String| (message_id.clone(), (400, why));
    match property(message, "operation").as_deref() {
        Some("put-token") => {}
        other => return Err(bad(format!("operation {other:?} is not put-token"))),
    }
    match property(message, "type").as_deref() {
        Some("servicebus.windows.net:sastoken" | "azure-devices.net:sastoken") => {}
        other => return Err(bad(format!("token type {other:?} is not a SAS token"))),
    }
    let audience = property(message, "name").ok_or_else(|| bad("no name (audience)".into()))?;
    let device_id = audience_device(&audience, hub_host).ok_or_else(|| {
        (
            message_id.clone(),
            (
                401,
                format!("the audience {audience:?} is not a device of this hub"),
            ),
        )
    })?;
    let text = String::from_utf8(body_bytes(&message.body))
        .map_err(|_| bad("the token is not UTF-8".into()))?;
    let token = SasToken::parse(&text)
        .map_err(|e| (message_id.clone(), (401, format!("the token: {e}"))))?;
    Ok(PutToken {
        message_id,
        device_id,
        token,
    })
}

/// The status a refused device authentication gets.
pub(crate) fn refusal_status(code: ConnectReturnCode) -> i32 {
    match code {
        ConnectReturnCode::ServiceUnavailable => 503,
        _ => 401,
    }
}

/// The reply to a put-token.
pub(crate) fn reply(
    correlation_id: Option<MessageId>,
    status: i32,
    description: &str,
) -> Message<Data> {
    let mut properties = ApplicationProperties::default();
    properties
        .0
        .insert("status-code".into(), SimpleValue::Int(status));
    properties.0.insert(
        "status-description".into(),
        SimpleValue::String(description.to_string()),
    );
    Message::builder()
        .properties(Properties {
            correlation_id,
            ..Default::default()
        })
        .application_properties(properties)
        .data(Binary::from(Vec::new()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_token(props: &[(&str, &str)], body: &str) -> Message<Body<Value>> {
        let mut ap = ApplicationProperties::default();
        for (k, v) in props {
            ap.0.insert(k.to_string(), SimpleValue::String(v.to_string()));
        }
        Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String("m-1".into())),
                ..Default::default()
            })
            .application_properties(ap)
            .body(Body::Value(AmqpValue(Value::String(body.into()))))
            .build()
    }

    #[test]
    fn audiences_name_a_device_of_this_hub() {
        assert_eq!(
            audience_device("hub.local/devices/dev-1", "hub.local"),
            Some("dev-1".into())
        );
        assert_eq!(
            audience_device("amqps://HUB.local:5671/devices/dev%231/", "hub.local"),
            Some("dev#1".into())
        );
        assert_eq!(
            audience_device("hub.local%2Fdevices%2Fdev-1", "hub.local"),
            Some("dev-1".into())
        );
        assert_eq!(audience_device("other/devices/dev-1", "hub.local"), None);
        assert_eq!(audience_device("hub.local/devices", "hub.local"), None);
        assert_eq!(
            audience_device("hub.local/devices/d/modules/m", "hub.local"),
            None
        );
    }

    #[test]
    fn put_token_requests_are_checked_for_shape() {
        let token = "SharedAccessSignature sr=hub.local%2Fdevices%2Fd&sig=YWJj&se=100";
        let ok = put_token(
            &[
                ("operation", "put-token"),
                ("type", "servicebus.windows.net:sastoken"),
                ("name", "hub.local/devices/d"),
            ],
            token,
        );
        let p = parse_put_token(&ok, "hub.local").unwrap();
        assert_eq!(p.device_id, "d");
        assert_eq!(p.message_id, Some(MessageId::String("m-1".into())));
        assert_eq!(p.token.expiry, 100);

        let wrong_op = put_token(&[("operation", "delete-token")], token);
        let (id, (status, why)) = parse_put_token(&wrong_op, "hub.local").err().unwrap();
        assert_eq!((id, status), (Some(MessageId::String("m-1".into())), 400));
        assert!(why.contains("put-token"), "{why}");

        let other_hub = put_token(
            &[
                ("operation", "put-token"),
                ("type", "servicebus.windows.net:sastoken"),
                ("name", "elsewhere/devices/d"),
            ],
            token,
        );
        assert_eq!(
            parse_put_token(&other_hub, "hub.local").err().unwrap().1 .0,
            401
        );
    }

    #[test]
    fn replies_carry_the_status_and_the_request_id() {
        let m = reply(Some(MessageId::String("m-1".into())), 401, "no");
        assert_eq!(
            m.properties.unwrap().correlation_id,
            Some(MessageId::String("m-1".into()))
        );
        let ap = m.application_properties.unwrap();
        assert_eq!(ap.0.get("status-code"), Some(&SimpleValue::Int(401)));
    }
}
