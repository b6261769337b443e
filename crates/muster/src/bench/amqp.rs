//! `--mode amqp-fresh`: one device's registration over AMQP as the SDKs do it, on a new TCP
//! connection, full TLS handshake and AMQP connection (SASL PLAIN with the SAS token), with
//! fe2o3-amqp's client: attach the response and request links on
//! `{idScope}/registrations/{id}`, send `iotdps-register`, poll while `assigning`, close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use muster_client::DeviceKey;

/// Longest one device's whole exchange may take.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);
/// Polls of an `assigning` operation before giving up.
const MAX_POLLS: u32 = 20;

/// Where AMQP devices connect.
#[derive(Clone)]
pub struct AmqpTarget {
    pub addr: SocketAddr,
    /// The TLS server name (the DPS host).
    pub host: String,
    pub id_scope: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// Registers `id`: `Ok(status)` of the final answer, or a short error kind.
pub async fn register(target: &AmqpTarget, key: &DeviceKey, id: &str) -> Result<String, String> {
    match tokio::time::timeout(DEVICE_TIMEOUT, exchange(target, key, id)).await {
        Ok(r) => r,
        Err(_) => Err("amqp: timeout".into()),
    }
}

async fn exchange(target: &AmqpTarget, key: &DeviceKey, id: &str) -> Result<String, String> {
    let device_key = key
        .device_key(id)
        .map_err(|_| "invalid input".to_string())?;
    let token = muster_client::device::device_token(&target.id_scope, id, &device_key, 3600)
        .map_err(|_| "invalid input".to_string())?;
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|_| "amqp: connect".to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|_| "amqp: tls".to_string())?;
    let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|_| "amqp: tls".to_string())?;
    let address = format!("{}/registrations/{id}", target.id_scope);
    let mut connection = Connection::builder()
        .container_id(id.to_string())
        .hostname(target.host.as_str())
        .sasl_profile(SaslProfile::Plain {
            username: address.clone(),
            password: token,
        })
        .open_with_stream(tls)
        .await
        .map_err(|_| "amqp: open".to_string())?;
    let result = async {
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|_| "amqp: open".to_string())?;
        let mut receiver = Receiver::attach(&mut session, "recv", address.as_str())
            .await
            .map_err(|_| "amqp: attach".to_string())?;
        let mut sender = Sender::attach(&mut session, "send", address.as_str())
            .await
            .map_err(|_| "amqp: attach".to_string())?;
        let mut answer = request(&mut sender, &mut receiver, 0, None).await?;
        let mut polls = 0;
        while answer["status"] == "assigning" && polls < MAX_POLLS {
            polls += 1;
            let wait = answer["retry"].as_u64().unwrap_or(1).clamp(1, 10);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let operation_id = answer["operationId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            answer = request(&mut sender, &mut receiver, polls, Some(&operation_id)).await?;
        }
        let _ = sender.close().await;
        let _ = receiver.close().await;
        let _ = session.end().await;
        Ok(answer["status"].as_str().unwrap_or("no status").to_string())
    }
    .await;
    let _ = connection.close().await;
    result
}

/// One register (no operation id) or poll; the answer's JSON, with `retry` set from the
/// response's `retry-after`.
async fn request(
    sender: &mut Sender,
    receiver: &mut Receiver,
    n: u32,
    operation_id: Option<&str>,
) -> Result<serde_json::Value, String> {
    let mut properties = ApplicationProperties::default();
    let operation = match operation_id {
        None => "iotdps-register",
        Some(op) => {
            properties.0.insert(
                "iotdps-operation-id".into(),
                SimpleValue::String(op.to_string()),
            );
            "iotdps-get-operationstatus"
        }
    };
    properties.0.insert(
        "iotdps-operation-type".into(),
        SimpleValue::String(operation.into()),
    );
    let correlation = MessageId::String(format!("r{n}"));
    let message = Message::builder()
        .properties(Properties {
            correlation_id: Some(correlation.clone()),
            ..Default::default()
        })
        .application_properties(properties)
        .data(Binary::from(b"{}".to_vec()))
        .build();
    match sender.send(message).await {
        Ok(Outcome::Accepted(_)) => {}
        Ok(Outcome::Rejected(r)) => {
            let code = r
                .error
                .and_then(|e| e.description)
                .and_then(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
                .and_then(|b| b["errorCode"].as_u64())
                .unwrap_or(0);
            return Err(format!("amqp: rejected / {code}"));
        }
        _ => return Err("amqp: send".into()),
    }
    let delivery: Delivery<Body<Value>> = receiver
        .recv()
        .await
        .map_err(|_| "amqp: receive".to_string())?;
    let _ = receiver.accept(&delivery).await;
    let message = delivery.into_message();
    let retry = message
        .application_properties
        .as_ref()
        .and_then(|p| p.0.get("retry-after"))
        .and_then(|v| match v {
            SimpleValue::String(s) => s.parse::<u64>().ok(),
            _ => None,
        });
    let Body::Data(data) = message.body else {
        return Err("amqp: body".into());
    };
    let bytes: Vec<u8> = data.iter().flat_map(|d| d.0.iter().copied()).collect();
    let mut answer: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "amqp: body".to_string())?;
    if let Some(r) = retry {
        answer["retry"] = r.into();
    }
    Ok(answer)
}
