//! The hub's device MQTT names (service-api.md §10): the CONNECT user name, the topics a
//! device publishes to and subscribes to, and property bags.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

use crate::c2d::CloudToDeviceMessage;

/// What `encodeURIComponent` leaves alone (Node decodes with `decodeURIComponent`, Python
/// with `urllib.parse.unquote`).
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// A parsed CONNECT user name: `{host}/{deviceId}[/{moduleId}]/?{query}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Username {
    pub host: String,
    pub device_id: String,
    pub module_id: Option<String>,
    /// `api-version`, `DeviceClientType`, `model-id`, ... (percent-decoded; unknown ones are
    /// kept and ignored).
    pub params: Vec<(String, String)>,
}

impl Username {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a user name leniently: the query may follow `?` or (older C SDKs) be a path
/// segment containing `=`; empty segments are ignored.
pub(crate) fn parse_username(username: &str) -> Option<Username> {
    let (path, query) = username.split_once('?').unwrap_or((username, ""));
    let mut segments = Vec::new();
    let mut params = Vec::new();
    let mut parse_query = |q: &str| {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((decode(k), decode(v)));
        }
    };
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg.contains('=') {
            parse_query(seg);
        } else {
            segments.push(seg);
        }
    }
    parse_query(query);
    match segments.as_slice() {
        [host, device] => Some(Username {
            host: host.to_string(),
            device_id: decode(device),
            module_id: None,
            params,
        }),
        [host, device, module] => Some(Username {
            host: host.to_string(),
            device_id: decode(device),
            module_id: Some(decode(module)),
            params,
        }),
        _ => None,
    }
}

/// A topic a device publishes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceTopic<'a> {
    /// `devices/{id}/messages/events/[{property bag}]`.
    Telemetry { device_id: String, bag: &'a str },
    /// `$iothub/twin/GET/?$rid={rid}`.
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`.
    TwinPatchReported { rid: String },
    /// `$iothub/methods/res/{status}/?$rid={rid}`.
    MethodResponse { status: u16, rid: String },
}

/// The `$rid` of a `?…` query (as sent; Python and Node use plain tokens).
fn rid(query: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix("$rid="))
        .map(str::to_string)
        .filter(|r| !r.is_empty())
}

/// Parses a device publish topic; `Err` names why it isn't one the device may use.
pub(crate) fn parse_publish_topic(topic: &str) -> Result<DeviceTopic<'_>, &'static str> {
    if let Some(rest) = topic.strip_prefix("devices/") {
        let (device, rest) = rest.split_once('/').ok_or("not a device topic")?;
        let bag = if rest == "messages/events" {
            ""
        } else if let Some(bag) = rest.strip_prefix("messages/events/") {
            bag
        } else {
            return Err("devices may only publish telemetry under devices/{id}/messages/events/");
        };
        return Ok(DeviceTopic::Telemetry {
            device_id: decode(device),
            bag,
        });
    }
    let (path, query) = topic.split_once('?').unwrap_or((topic, ""));
    let path = path.trim_end_matches('/');
    let need_rid = || rid(query).ok_or("the request topic has no $rid");
    match path {
        "$iothub/twin/GET" => Ok(DeviceTopic::TwinGet { rid: need_rid()? }),
        "$iothub/twin/PATCH/properties/reported" => {
            Ok(DeviceTopic::TwinPatchReported { rid: need_rid()? })
        }
        _ => {
            if let Some(status) = path.strip_prefix("$iothub/methods/res/") {
                let status = status
                    .parse::<u16>()
                    .map_err(|_| "the method response status is not a number")?;
                return Ok(DeviceTopic::MethodResponse {
                    status,
                    rid: need_rid()?,
                });
            }
            Err("not a topic devices may publish to")
        }
    }
}

/// A subscription filter the hub serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    CloudToDevice,
    TwinResponses,
    DesiredPatches,
    Methods,
}

/// Which service a subscription filter names (`None`: not one the hub serves).
pub(crate) fn parse_filter(filter: &str, device_id: &str) -> Option<Filter> {
    match filter {
        "$iothub/twin/res/#" => Some(Filter::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => Some(Filter::DesiredPatches),
        "$iothub/methods/POST/#" => Some(Filter::Methods),
        _ => {
            let rest = filter.strip_prefix("devices/")?;
            let (device, rest) = rest.split_once('/')?;
            (rest == "messages/devicebound/#" && decode(device).eq_ignore_ascii_case(device_id))
                .then_some(Filter::CloudToDevice)
        }
    }
}

/// A property bag's pairs, percent-decoded: `k=v` → `(k, Some(v))`, `k` → `(k, None)`.
pub(crate) fn parse_property_bag(bag: &str) -> Vec<(String, Option<String>)> {
    bag.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (decode(k), Some(decode(v))),
            None => (decode(pair), None),
        })
        .collect()
}

/// The name a `$.` system property is stored under.
fn system_name(key: &str) -> String {
    match key {
        "$.mid" => "messageId",
        "$.cid" => "correlationId",
        "$.uid" => "userId",
        "$.to" => "to",
        "$.ct" => "contentType",
        "$.ce" => "contentEncoding",
        "$.exp" => "expiryTimeUtc",
        "$.ifid" => "interfaceId",
        "$.on" => "outputName",
        other => return other.to_string(),
    }
    .to_string()
}

/// A telemetry property bag split into application and system properties.
pub(crate) fn telemetry_properties(bag: &str) -> (Map<String, Value>, Map<String, Value>) {
    let mut app = Map::new();
    let mut system = Map::new();
    for (k, v) in parse_property_bag(bag) {
        let v = v.map_or(Value::Null, Value::String);
        if k.starts_with("$.") {
            system.insert(system_name(&k), v);
        } else {
            app.insert(k, v);
        }
    }
    (app, system)
}

/// The topic a queued cloud-to-device message is delivered on:
/// `devices/{id}/messages/devicebound/{property bag}`, keys and values encoded as IoT Hub
/// does (`%24.mid=...&%24.to=%2Fdevices%2F...&color=red`).
pub(crate) fn c2d_topic(device_id: &str, message: &CloudToDeviceMessage) -> String {
    let mut pairs: Vec<String> = Vec::new();
    for (name, key) in [
        ("messageId", "$.mid"),
        ("to", "$.to"),
        ("expiryTimeUtc", "$.exp"),
        ("correlationId", "$.cid"),
        ("userId", "$.uid"),
        ("contentType", "$.ct"),
        ("contentEncoding", "$.ce"),
    ] {
        if let Some(v) = message.system_properties.get(name).and_then(Value::as_str) {
            pairs.push(format!("{}={}", encode(key), encode(v)));
        }
    }
    for (k, v) in &message.properties {
        match v {
            Value::Null => pairs.push(encode(k)),
            Value::String(s) => pairs.push(format!("{}={}", encode(k), encode(s))),
            other => pairs.push(format!("{}={}", encode(k), encode(&other.to_string()))),
        }
    }
    format!(
        "devices/{}/messages/devicebound/{}",
        device_id,
        pairs.join("&")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        let u = parse_username(
            "hub.example/dev-1/?api-version=2021-04-12&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0",
        )
        .unwrap();
        assert_eq!(
            (u.host.as_str(), u.device_id.as_str()),
            ("hub.example", "dev-1")
        );
        assert_eq!(u.module_id, None);
        assert_eq!(u.param("api-version"), Some("2021-04-12"));
        assert_eq!(
            u.param("devicecLienttype"),
            Some("azure-iot-device-iothub-py/2.14.0")
        );
        let u = parse_username("hub.example:8883/dev-1/mod/?api-version=x").unwrap();
        assert_eq!(u.module_id.as_deref(), Some("mod"));
        let u =
            parse_username("hub.example/dev-1/api-version=2016-11-14&DeviceClientType=c").unwrap();
        assert_eq!(u.param("DeviceClientType"), Some("c"));
        let u = parse_username("hub.example/dev-1").unwrap();
        assert!(u.params.is_empty());
        assert!(parse_username("hub.example").is_none());
        assert!(parse_username("").is_none());
        assert!(parse_username("a/b/c/d").is_none());
    }

    #[test]
    fn publish_topics() {
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events/").unwrap(),
            DeviceTopic::Telemetry {
                device_id: "d1".into(),
                bag: ""
            }
        );
        assert_eq!(
            parse_publish_topic("devices/d1/messages/events/a=1&%24.mid=x").unwrap(),
            DeviceTopic::Telemetry {
                device_id: "d1".into(),
                bag: "a=1&%24.mid=x"
            }
        );
        assert!(matches!(
            parse_publish_topic("devices/d1/messages/events").unwrap(),
            DeviceTopic::Telemetry { bag: "", .. }
        ));
        assert_eq!(
            parse_publish_topic("$iothub/twin/GET/?$rid=7").unwrap(),
            DeviceTopic::TwinGet { rid: "7".into() }
        );
        assert_eq!(
            parse_publish_topic("$iothub/twin/PATCH/properties/reported/?$rid=ab&$version=3")
                .unwrap(),
            DeviceTopic::TwinPatchReported { rid: "ab".into() }
        );
        assert_eq!(
            parse_publish_topic("$iothub/methods/res/200/?$rid=1f").unwrap(),
            DeviceTopic::MethodResponse {
                status: 200,
                rid: "1f".into()
            }
        );
        for bad in [
            "devices/d1/messages/devicebound/x",
            "devices/d1",
            "$iothub/twin/GET/",
            "$iothub/methods/res/abc/?$rid=1",
            "$dps/registrations/PUT/iotdps-register/?$rid=1",
            "other",
        ] {
            assert!(parse_publish_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters() {
        assert_eq!(
            parse_filter("devices/Dev1/messages/devicebound/#", "dev1"),
            Some(Filter::CloudToDevice)
        );
        assert_eq!(
            parse_filter("devices/other/messages/devicebound/#", "dev1"),
            None
        );
        assert_eq!(
            parse_filter("$iothub/twin/res/#", "d"),
            Some(Filter::TwinResponses)
        );
        assert_eq!(
            parse_filter("$iothub/twin/PATCH/properties/desired/#", "d"),
            Some(Filter::DesiredPatches)
        );
        assert_eq!(
            parse_filter("$iothub/methods/POST/#", "d"),
            Some(Filter::Methods)
        );
        assert_eq!(parse_filter("#", "d"), None);
    }

    #[test]
    fn property_bags() {
        let (app, system) = telemetry_properties(
            "%24.mid=m1&%24.ct=application%2Fjson&$.ce=utf-8&temp=30&flag&empty=&$.custom=z",
        );
        assert_eq!(app["temp"], "30");
        assert_eq!(app["flag"], Value::Null);
        assert_eq!(app["empty"], "");
        assert_eq!(system["messageId"], "m1");
        assert_eq!(system["contentType"], "application/json");
        assert_eq!(system["contentEncoding"], "utf-8");
        assert_eq!(system["$.custom"], "z");
    }

    #[test]
    fn c2d_topics() {
        let mut system = Map::new();
        system.insert("messageId".into(), "m 1".into());
        system.insert("to".into(), "/devices/d1/messages/deviceBound".into());
        let mut props = Map::new();
        props.insert("color".into(), "red/blue".into());
        let m = CloudToDeviceMessage {
            device_id: "d1".into(),
            sequence_number: 1,
            enqueued_time: String::new(),
            expiry_unix_ms: 0,
            explicit_expiry: false,
            body: String::new(),
            properties: props,
            system_properties: system,
            delivery_count: 0,
            lock_token: None,
            locked_until_ms: None,
        };
        let t = c2d_topic("d1", &m);
        assert_eq!(
            t,
            "devices/d1/messages/devicebound/%24.mid=m%201&%24.to=%2Fdevices%2Fd1%2Fmessages%2FdeviceBound&color=red%2Fblue"
        );
        // What Python does with it: split on '/', take part 4, split '&' and '=', unquote.
        let bag = t.split('/').nth(4).unwrap();
        let pairs = parse_property_bag(bag);
        assert_eq!(pairs[0], ("$.mid".into(), Some("m 1".into())));
        assert_eq!(pairs[2], ("color".into(), Some("red/blue".into())));
    }
}
