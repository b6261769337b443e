//! The strings of the DPS MQTT protocol (device-protocol.md §4): the CONNECT username, the two
//! request topics and the response topic.
//!
//! Parsing is lenient where the SDKs differ (extra username keys, percent-encoded values) and
//! exact where they are strict (the response topic is built in the one form every SDK parses).

use percent_encoding::percent_decode_str;

/// The only filter a device may subscribe to; responses are published below it.
pub const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/?";
const STATUS_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";

/// The CONNECT username:
/// `{idScope}/registrations/{registrationId}/api-version={v}&ClientVersion={urlencoded}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    pub id_scope: String,
    /// Percent-decoded (registration ids never legitimately contain `%`).
    pub registration_id: String,
    pub api_version: Option<String>,
    /// Percent-decoded user agent of the SDK, for logs.
    pub client_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("the username is not `{{idScope}}/registrations/{{registrationId}}/...`")]
    Format,
    #[error("the username names an empty ID scope or registration ID")]
    Empty,
}

/// Parses `<scope>/registrations/<regid>[/<query>]`. The query part may be missing, empty or
/// carry keys other than `api-version` and `ClientVersion` (keys are matched ignoring case).
pub fn parse_username(username: &str) -> Result<Username, UsernameError> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next().ok_or(UsernameError::Format)?;
    let literal = parts.next().ok_or(UsernameError::Format)?;
    let regid = parts.next().ok_or(UsernameError::Format)?;
    let query = parts.next().unwrap_or("");
    if !literal.eq_ignore_ascii_case("registrations") {
        return Err(UsernameError::Format);
    }
    let id_scope = decode(scope);
    let registration_id = decode(regid);
    if id_scope.is_empty() || registration_id.is_empty() {
        return Err(UsernameError::Empty);
    }
    let mut api_version = None;
    let mut client_version = None;
    for (key, value) in query_pairs(query) {
        if key.eq_ignore_ascii_case("api-version") && api_version.is_none() {
            api_version = Some(decode(value));
        } else if key.eq_ignore_ascii_case("ClientVersion") && client_version.is_none() {
            client_version = Some(decode(value));
        }
    }
    Ok(Username {
        id_scope,
        registration_id,
        api_version,
        client_version,
    })
}

/// A device → service publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTopic {
    /// `$dps/registrations/PUT/iotdps-register/?$rid={rid}`
    Register { rid: String },
    /// `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}`;
    /// `operation_id` is `None` when the topic lacks it.
    Status {
        rid: String,
        operation_id: Option<String>,
    },
}

impl RequestTopic {
    pub fn rid(&self) -> &str {
        match self {
            RequestTopic::Register { rid } | RequestTopic::Status { rid, .. } => rid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("not a DPS request topic")]
    Unknown,
    #[error("the request topic has no `$rid`")]
    MissingRid,
}

/// Parses a request topic. `$rid` is kept exactly as sent (Python URL-quotes it and expects
/// the same text back); `operationId` is percent-decoded because it is looked up, not echoed.
pub fn parse_request_topic(topic: &str) -> Result<RequestTopic, TopicError> {
    let (is_register, query) = if let Some(q) = topic.strip_prefix(REGISTER_PREFIX) {
        (true, q)
    } else if let Some(q) = topic.strip_prefix(STATUS_PREFIX) {
        (false, q)
    } else {
        return Err(TopicError::Unknown);
    };
    let mut rid = None;
    let mut operation_id = None;
    for (key, value) in query_pairs(query) {
        if key == "$rid" && rid.is_none() {
            rid = Some(value.to_owned());
        } else if key == "operationId" && operation_id.is_none() {
            operation_id = Some(decode(value));
        }
    }
    let rid = rid.ok_or(TopicError::MissingRid)?;
    Ok(if is_register {
        RequestTopic::Register { rid }
    } else {
        RequestTopic::Status {
            rid,
            operation_id: operation_id.filter(|id| !id.is_empty()),
        }
    })
}

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]`: `$rid` first (C#), exactly
/// one `?$` (Python), lower-case `retry-after` (Python, Node).
pub fn response_topic(status: u16, rid: &str, retry_after: Option<u32>) -> String {
    match retry_after {
        Some(n) => format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={n}"),
        None => format!("$dps/registrations/res/{status}/?$rid={rid}"),
    }
}

/// `a=1&b=2` → `(a, 1), (b, 2)`; a part without `=` has an empty value, empty parts are skipped.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Percent-decodes (`+` stays `+`); invalid UTF-8 is replaced rather than refused.
fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_username() {
        let u = parse_username(
            "0ne00000A0A/registrations/my-device-01/api-version=2019-03-31&ClientVersion=azure-iot-device-provisioning-py%2F2.14.0%283.10.12%3BLinux%20%231%20SMP%3Bx86_64%29",
        )
        .unwrap();
        assert_eq!(u.id_scope, "0ne00000A0A");
        assert_eq!(u.registration_id, "my-device-01");
        assert_eq!(u.api_version.as_deref(), Some("2019-03-31"));
        assert_eq!(
            u.client_version.as_deref(),
            Some("azure-iot-device-provisioning-py/2.14.0(3.10.12;Linux #1 SMP;x86_64)")
        );
    }

    #[test]
    fn username_variants() {
        // C: version only; docs form: no ClientVersion; no query at all; extra keys.
        let u =
            parse_username("0ne1/registrations/dev/api-version=2021-06-01&ClientVersion=1.15.0")
                .unwrap();
        assert_eq!(u.client_version.as_deref(), Some("1.15.0"));
        let u = parse_username("0ne1/registrations/dev/api-version=2019-03-31").unwrap();
        assert_eq!(u.api_version.as_deref(), Some("2019-03-31"));
        assert_eq!(u.client_version, None);
        let u = parse_username("0ne1/registrations/dev").unwrap();
        assert_eq!(
            (u.id_scope.as_str(), u.registration_id.as_str()),
            ("0ne1", "dev")
        );
        assert_eq!(u.api_version, None);
        let u = parse_username("0ne1/registrations/dev/").unwrap();
        assert_eq!(u.registration_id, "dev");
        let u = parse_username("0ne1/registrations/a:b.c/x=1&api-version=v&flag&ClientVersion=")
            .unwrap();
        assert_eq!(u.registration_id, "a:b.c");
        assert_eq!(u.api_version.as_deref(), Some("v"));
        assert_eq!(u.client_version.as_deref(), Some(""));
        let u = parse_username("0ne1/Registrations/dev%3Aone/api-version=v").unwrap();
        assert_eq!(u.registration_id, "dev:one");
    }

    #[test]
    fn bad_usernames() {
        assert_eq!(parse_username(""), Err(UsernameError::Format));
        assert_eq!(parse_username("0ne1"), Err(UsernameError::Format));
        assert_eq!(
            parse_username("0ne1/registrations"),
            Err(UsernameError::Format)
        );
        assert_eq!(
            parse_username("0ne1/devices/dev/x"),
            Err(UsernameError::Format)
        );
        assert_eq!(
            parse_username("/registrations/dev/x"),
            Err(UsernameError::Empty)
        );
        assert_eq!(
            parse_username("0ne1/registrations//x"),
            Err(UsernameError::Empty)
        );
    }

    #[test]
    fn request_topics() {
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid=1"),
            Ok(RequestTopic::Register { rid: "1".into() })
        );
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=5.3a8f-1"
            ),
            Ok(RequestTopic::Status {
                rid: "2".into(),
                operation_id: Some("5.3a8f-1".into())
            })
        );
        // Python quotes both values: `$rid` stays as sent, operationId is decoded.
        assert_eq!(
            parse_request_topic(
                "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=a%2Db&operationId=op%2E1"
            ),
            Ok(RequestTopic::Status {
                rid: "a%2Db".into(),
                operation_id: Some("op.1".into())
            })
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=3"),
            Ok(RequestTopic::Status {
                rid: "3".into(),
                operation_id: None
            })
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?foo=1"),
            Err(TopicError::MissingRid)
        );
        assert_eq!(
            parse_request_topic("$dps/registrations/PUT/iotdps-register/?$rid="),
            Ok(RequestTopic::Register { rid: String::new() })
        );
        for t in [
            "",
            "devices/x/messages/events/",
            "$dps/registrations/res/200/?$rid=1",
            "$dps/registrations/PUT/iotdps-register?$rid=1",
            "$dps/registrations/put/iotdps-register/?$rid=1",
        ] {
            assert_eq!(parse_request_topic(t), Err(TopicError::Unknown), "{t}");
        }
    }

    #[test]
    fn response_topics() {
        assert_eq!(
            response_topic(202, "abc", Some(3)),
            "$dps/registrations/res/202/?$rid=abc&retry-after=3"
        );
        assert_eq!(
            response_topic(200, "xyz", None),
            "$dps/registrations/res/200/?$rid=xyz"
        );
        assert_eq!(
            response_topic(401, "7d9e%2D1", None),
            "$dps/registrations/res/401/?$rid=7d9e%2D1"
        );
    }
}
