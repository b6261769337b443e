//! Device-to-cloud messages (telemetry) of a hub, as Muster's built-in hub serves them: a page
//! of one device's stored messages ([`HubClient::read_telemetry`]) and the live stream as
//! Server-Sent Events ([`HubClient::telemetry_stream`]).
//!
//! The stream endpoints (api-version 2021-04-12, `ServiceConnect`):
//! - `GET /devices/{id}/telemetry/stream[?after={seq}]`: one device; with `after` (or
//!   `Last-Event-ID`) the stored messages after that sequence number are replayed first, then
//!   the stream goes live; event ids are sequence numbers.
//! - `GET /telemetry/stream`: every device, live only; event ids are `{deviceId}/{seq}`.
//!
//! Each event's `data` is one [`TelemetryMessage`] as JSON. A comment other than the
//! keep-alive (`lagged: N messages were skipped`) is returned as [`TelemetryEvent::Notice`].

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use reqwest::{Method, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::hub::{hub_error, HubClient};
use crate::service::{read_json, segment};

/// One stored device-to-cloud message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryMessage {
    pub device_id: String,
    /// Per device, from 1, one more per message.
    pub sequence_number: u64,
    /// When the hub stored it, `YYYY-MM-DDTHH:MM:SS.fffffffZ`.
    #[serde(default)]
    pub enqueued_time: String,
    /// The payload: the text itself (`bodyEncoding` `utf-8`) or base64 (`base64`).
    #[serde(default)]
    pub body: String,
    #[serde(default = "utf8")]
    pub body_encoding: String,
    /// Application properties.
    #[serde(default)]
    pub properties: Map<String, Value>,
    /// System properties (`messageId`, `correlationId`, `contentType`, …).
    #[serde(default)]
    pub system_properties: Map<String, Value>,
    /// Fields this client does not know, kept as the server sent them.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn utf8() -> String {
    "utf-8".into()
}

impl TelemetryMessage {
    /// The payload bytes.
    pub fn body_bytes(&self) -> Vec<u8> {
        if self.body_encoding.eq_ignore_ascii_case("base64") {
            B64.decode(&self.body).unwrap_or_default()
        } else {
            self.body.as_bytes().to_vec()
        }
    }
}

/// What a telemetry stream delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum TelemetryEvent {
    /// A message, with the event id (`{seq}` per device, `{deviceId}/{seq}` for all devices).
    Message {
        id: Option<String>,
        message: Box<TelemetryMessage>,
    },
    /// A notice from the server, e.g. `lagged: 3 messages were skipped`.
    Notice(String),
}

/// The longest a stream may stay silent: the server sends a keep-alive every 15 s.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request timeout of a stream (it is meant to stay open).
const STREAM_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// An open event stream; read it with [`TelemetryStream::next`].
#[derive(Debug)]
pub struct TelemetryStream {
    resp: Response,
    parser: SseParser,
    url: String,
    idle_timeout: Duration,
}

impl TelemetryStream {
    /// The next event; `Ok(None)` when the server ended the stream. A stream silent for
    /// longer than the idle timeout (60 s), or broken off, is an [`Error::Stream`].
    pub async fn next(&mut self) -> Result<Option<TelemetryEvent>> {
        loop {
            while let Some(item) = self.parser.next_item() {
                match item {
                    SseItem::Comment(c) if c.trim().is_empty() => {}
                    SseItem::Comment(c) => return Ok(Some(TelemetryEvent::Notice(c))),
                    SseItem::Event { id, data, .. } => {
                        let message =
                            serde_json::from_str(&data).map_err(|e| Error::UnexpectedResponse {
                                what: "telemetry stream".into(),
                                status: 200,
                                detail: format!("an event is not a telemetry message: {e}"),
                            })?;
                        return Ok(Some(TelemetryEvent::Message { id, message }));
                    }
                }
            }
            let chunk = tokio::time::timeout(self.idle_timeout, self.resp.chunk())
                .await
                .map_err(|_| Error::Stream {
                    url: self.url.clone(),
                    detail: format!("silent for {} s", self.idle_timeout.as_secs()),
                })?
                .map_err(|e| Error::Stream {
                    url: self.url.clone(),
                    detail: e.to_string(),
                })?;
            match chunk {
                Some(bytes) => self.parser.push(&bytes),
                None => return Ok(None),
            }
        }
    }

    /// Changes how long the stream may stay silent before [`Self::next`] fails.
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = timeout;
    }
}

impl HubClient {
    /// Opens the live telemetry stream: of one device (`device_id`), replaying its stored
    /// messages with sequence numbers greater than `after` first when `after` is given; or
    /// of every device (`device_id` `None`, live only, `after` must be `None`).
    pub async fn telemetry_stream(
        &self,
        device_id: Option<&str>,
        after: Option<u64>,
    ) -> Result<TelemetryStream> {
        let (path, query) = match (device_id, after) {
            (Some(d), after) => (
                format!("/devices/{}/telemetry/stream", segment(d)),
                after.map(|a| format!("&after={a}")).unwrap_or_default(),
            ),
            (None, None) => ("/telemetry/stream".to_string(), String::new()),
            (None, Some(_)) => {
                return Err(Error::InvalidInput(
                    "the stream of every device is live only; replay needs a device id".into(),
                ))
            }
        };
        let req = self
            .request(Method::GET, &path, &query)
            .header("accept", "text/event-stream")
            .timeout(STREAM_TIMEOUT);
        let resp = req.send().await.map_err(|source| Error::Transport {
            url: self.base_url().to_string(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(hub_error("open the telemetry stream", resp).await);
        }
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !content_type.starts_with("text/event-stream") {
            return Err(Error::UnexpectedResponse {
                what: "telemetry stream".into(),
                status: resp.status().as_u16(),
                detail: format!("content-type {content_type:?}, not text/event-stream"),
            });
        }
        Ok(TelemetryStream {
            resp,
            parser: SseParser::default(),
            url: format!("{}{path}", self.base_url()),
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    /// `GET /devices/{id}/telemetry?after=&limit=`: up to `limit` (1..=1000) stored
    /// messages with sequence numbers greater than `after`, oldest first.
    pub async fn read_telemetry(
        &self,
        device_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<TelemetryMessage>> {
        let path = format!("/devices/{}/telemetry", segment(device_id));
        let resp = self
            .send(
                "read telemetry",
                self.request(Method::GET, &path, &format!("&after={after}&limit={limit}")),
            )
            .await?;
        read_json("read telemetry", resp).await
    }
}

/// One item of a Server-Sent Events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SseItem {
    Event {
        id: Option<String>,
        #[allow(dead_code)]
        event: Option<String>,
        data: String,
    },
    Comment(String),
}

/// An incremental parser of `text/event-stream` (the WHATWG rules: lines end with CRLF, LF
/// or CR; `data` lines join with LF; a blank line dispatches; `:` starts a comment).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    ready: std::collections::VecDeque<SseItem>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(rel) = self.buf[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let end = start + rel;
            let next = match (self.buf[end], self.buf.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                // A CR at the end: wait, an LF may follow.
                (b'\r', None) => break,
                _ => end + 1,
            };
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            self.line(&line);
            start = next;
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.ready.push_back(SseItem::Event {
                    id: self.id.clone(),
                    event: self.event.take(),
                    data,
                });
            }
            self.event = None;
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.ready
                .push_back(SseItem::Comment(comment.trim_start().to_string()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
    }

    pub(crate) fn next_item(&mut self) -> Option<SseItem> {
        self.ready.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(chunks: &[&[u8]]) -> Vec<SseItem> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c);
            while let Some(i) = p.next_item() {
                out.push(i);
            }
        }
        out
    }

    #[test]
    fn events_comments_and_split_lines() {
        let got = items(&[
            b":\n\nid: 1\nda",
            b"ta: {\"a\":1}\r",
            b"\n\r\n: lagged: 2 messages were skipped\n\nid:2\ndata:x\ndata: y\r\r\n",
        ]);
        assert_eq!(
            got,
            vec![
                SseItem::Comment(String::new()),
                SseItem::Event {
                    id: Some("1".into()),
                    event: None,
                    data: "{\"a\":1}".into()
                },
                SseItem::Comment("lagged: 2 messages were skipped".into()),
                SseItem::Event {
                    id: Some("2".into()),
                    event: None,
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn message_json() {
        let m: TelemetryMessage = serde_json::from_value(serde_json::json!({
            "deviceId": "d", "sequenceNumber": 3, "enqueuedTime": "t", "body": "/wA=",
            "bodyEncoding": "base64", "properties": {"a": "1"}, "systemProperties": {},
            "future": true
        }))
        .unwrap();
        assert_eq!(m.body_bytes(), vec![0xff, 0]);
        assert_eq!(serde_json::to_value(&m).unwrap()["future"], true);
    }
}
