//! The registration engine's metrics (names, labels and HELP texts; METRICS.md documents
//! them). Recorded through the `metrics` facade: whoever runs the engine installs a recorder
//! (the server installs the Prometheus one), and without one every call is a no-op.
//!
//! Every label value comes from a closed set (the transport, outcome and attestation kinds,
//! error codes, linked hub names): never a registration id or other device-chosen text.

use std::time::Duration;

use serde_json::Value;

use crate::{DeviceCredential, DeviceReply};

pub const REGISTRATIONS_TOTAL: &str = "muster_registrations_total";
pub const REGISTRATION_REQUEST_SECONDS: &str = "muster_registration_request_duration_seconds";
pub const REGISTRATION_ASSIGNED_SECONDS: &str = "muster_registration_time_to_assigned_seconds";
pub const HUB_WRITE_SECONDS: &str = "muster_hub_write_duration_seconds";
pub const THROTTLE_QUEUE_DEPTH: &str = "muster_throttle_queue_depth";
pub const WEBHOOK_CALLS_TOTAL: &str = "muster_webhook_calls_total";

/// The device transport a register request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Https,
    /// MQTT, directly or over WebSocket (both run the same session).
    Mqtt,
    /// AMQP 1.0, directly or over WebSocket.
    Amqp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Https => "https",
            Transport::Mqtt => "mqtt",
            Transport::Amqp => "amqp",
        }
    }
}

/// HELP texts for the exporter; call once after installing a recorder.
pub fn describe() {
    metrics::describe_counter!(
        REGISTRATIONS_TOTAL,
        "Register requests answered by the engine, by transport, outcome (assigned, assigning, \
         failed, disabled, refused), error code, attestation and assigned hub"
    );
    metrics::describe_histogram!(
        REGISTRATION_REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time from a register request reaching the engine to its answer, by transport and outcome"
    );
    metrics::describe_histogram!(
        REGISTRATION_ASSIGNED_SECONDS,
        metrics::Unit::Seconds,
        "Time from a register request to its assignment being recorded; queued=true for \
         registrations finished by a throttled hub's worker"
    );
    metrics::describe_histogram!(
        HUB_WRITE_SECONDS,
        metrics::Unit::Seconds,
        "Time to write an assignment into its hub (device, twin, removal from the old hub), by \
         hub and result"
    );
    metrics::describe_gauge!(
        THROTTLE_QUEUE_DEPTH,
        "Registrations waiting in a rate-limited hub's queue"
    );
    metrics::describe_counter!(
        WEBHOOK_CALLS_TOTAL,
        "Custom allocation webhook calls (each attempt), by result"
    );
}

/// Counts one answered register request and its duration (and the time to assigned when it
/// was assigned at once). The outcome, error code and hub are read back from the reply, so
/// every path through the engine is counted the same way.
pub(crate) fn registration_answered(
    transport: Transport,
    attestation: &'static str,
    reply: &DeviceReply,
    elapsed: Duration,
) {
    let (outcome, error_code, hub) = reply_labels(reply);
    let transport = transport.as_str();
    metrics::counter!(
        REGISTRATIONS_TOTAL,
        "transport" => transport,
        "outcome" => outcome,
        "error_code" => error_code,
        "attestation" => attestation,
        "hub" => hub,
    )
    .increment(1);
    metrics::histogram!(
        REGISTRATION_REQUEST_SECONDS,
        "transport" => transport,
        "outcome" => outcome,
    )
    .record(elapsed);
    if outcome == "assigned" {
        assigned(false, elapsed);
    }
}

/// A registration's assignment was recorded `elapsed` after its request.
pub(crate) fn assigned(queued: bool, elapsed: Duration) {
    metrics::histogram!(
        REGISTRATION_ASSIGNED_SECONDS,
        "queued" => if queued { "true" } else { "false" },
    )
    .record(elapsed);
}

/// The attestation label of a credential.
pub(crate) fn attestation_kind(credential: &DeviceCredential) -> &'static str {
    match credential {
        DeviceCredential::Sas(_) => "symmetricKey",
        DeviceCredential::X509 { .. } => "x509",
        DeviceCredential::None => "none",
    }
}

/// `(outcome, error code, hub)` of a register reply: an error body is `refused` with its
/// `errorCode`; otherwise the registration state's status, error code and assigned hub.
fn reply_labels(reply: &DeviceReply) -> (&'static str, String, String) {
    let code = |v: Option<&Value>| v.and_then(Value::as_u64).map(|c| c.to_string());
    if let Some(error_code) = code(reply.body.get("errorCode")) {
        return ("refused", error_code, String::new());
    }
    let outcome = match reply.body.get("status").and_then(Value::as_str) {
        Some("assigned") => "assigned",
        Some("assigning") => "assigning",
        Some("failed") => "failed",
        Some("disabled") => "disabled",
        _ => "unassigned",
    };
    let state = reply.body.get("registrationState");
    let error_code = code(state.and_then(|s| s.get("errorCode"))).unwrap_or_default();
    let hub = state
        .and_then(|s| s.get("assignedHub"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (outcome, error_code, hub)
}

/// One hub write of an assignment, by hub (lower-case linked hub name) and result.
pub(crate) fn hub_write(hub: &str, ok: bool, elapsed: Duration) {
    metrics::histogram!(
        HUB_WRITE_SECONDS,
        "hub" => hub.to_ascii_lowercase(),
        "result" => if ok { "ok" } else { "error" },
    )
    .record(elapsed);
}

/// Sets the queue depth gauge of a hub (`hub_key` is already lower-case).
pub(crate) fn throttle_queue_changed(hub_key: &str, delta: f64) {
    metrics::gauge!(THROTTLE_QUEUE_DEPTH, "hub" => hub_key.to_string()).increment(delta);
}

/// One webhook attempt and how it ended (a fixed set of results).
pub(crate) fn webhook_call(result: &'static str) {
    metrics::counter!(WEBHOOK_CALLS_TOTAL, "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(body: Value) -> DeviceReply {
        DeviceReply {
            status: 202,
            retry_after: None,
            body,
        }
    }

    #[test]
    fn labels_come_from_the_reply() {
        let assigned = reply(json!({"operationId": "x", "status": "assigned",
            "registrationState": {"registrationId": "dev-1", "status": "assigned",
            "assignedHub": "Hub.Example:8443"}}));
        assert_eq!(
            reply_labels(&assigned),
            ("assigned", String::new(), "hub.example:8443".into())
        );
        let refused = reply(json!({"errorCode": 401002, "trackingId": "t",
            "message": "m", "timestampUtc": "now"}));
        assert_eq!(
            reply_labels(&refused),
            ("refused", "401002".into(), String::new())
        );
        let failed = reply(json!({"operationId": "x", "status": "failed",
            "registrationState": {"registrationId": "dev-1", "status": "failed",
            "errorCode": 400209}}));
        assert_eq!(
            reply_labels(&failed),
            ("failed", "400209".into(), String::new())
        );
    }
}
