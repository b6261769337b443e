//! Device registration over MQTT 3.1.1 over TLS (the DPS MQTT protocol): CONNECT with the
//! `{idScope}/registrations/{id}/api-version=..` user name and a SAS password (or, with an
//! X.509 identity, the client certificate in the TLS handshake and no password), SUBSCRIBE to
//! `$dps/registrations/res/#`, PUBLISH the register request, then status requests while the
//! answer says `assigning`. Packets are framed with rumqttc's v4 codec.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use muster_proto::device::RegistrationOperationStatus;
use muster_proto::ErrorBody;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::{self, QoS};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::device::{is_final, Auth, DeviceClient, Registration, MQTT_API_VERSION};
use crate::error::{Error, Result};

const MAX_PACKET: usize = 256 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn mqtt_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Mqtt(format!("{what}: {e}"))
}

pub(crate) struct Conn<S> {
    pub(crate) stream: S,
    buf: BytesMut,
}

/// A TLS connection to `host:port`, the certificate checked against `host`.
pub(crate) async fn tls_connect(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Conn<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| mqtt_err(&format!("connecting to {host}:{port}"), e))?;
    let _ = tcp.set_nodelay(true);
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| Error::InvalidInput(format!("endpoint host {host:?}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let stream = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| mqtt_err(&format!("TLS with {host}:{port}"), e))?;
    Ok(Conn {
        stream,
        buf: BytesMut::new(),
    })
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(crate) async fn send(&mut self, packet: Packet) -> Result<()> {
        let mut b = BytesMut::new();
        packet
            .write(&mut b, MAX_PACKET)
            .map_err(|e| mqtt_err("encoding a packet", e))?;
        self.stream
            .write_all(&b)
            .await
            .map_err(|e| mqtt_err("writing", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| mqtt_err("writing", e))
    }

    pub(crate) async fn recv(&mut self) -> Result<Packet> {
        tokio::time::timeout(READ_TIMEOUT, self.recv_inner())
            .await
            .map_err(|_| Error::Mqtt(format!("no answer within {}s", READ_TIMEOUT.as_secs())))?
    }

    async fn recv_inner(&mut self) -> Result<Packet> {
        loop {
            match mqttbytes::check(self.buf.iter(), MAX_PACKET) {
                Ok(_) => {
                    return Packet::read(&mut self.buf, MAX_PACKET)
                        .map_err(|e| mqtt_err("reading a packet", e))
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(mqtt_err("reading a packet", e)),
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| mqtt_err("reading", e))?;
            if n == 0 {
                return Err(Error::Mqtt("the server closed the connection".into()));
            }
        }
    }

    /// Publishes a request and returns the response publish for `rid`: (status, retry-after,
    /// payload).
    async fn request(
        &mut self,
        topic: String,
        pkid: u16,
        rid: &str,
        payload: Vec<u8>,
    ) -> Result<(u16, Option<Duration>, Vec<u8>)> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = pkid;
        self.send(Packet::Publish(p)).await?;
        loop {
            match self.recv().await? {
                Packet::Publish(resp) => {
                    if resp.qos != QoS::AtMostOnce {
                        self.send(Packet::PubAck(PubAck::new(resp.pkid))).await?;
                    }
                    if let Some(parsed) = parse_response_topic(&resp.topic) {
                        if parsed.rid == rid {
                            return Ok((parsed.status, parsed.retry_after, resp.payload.to_vec()));
                        }
                    }
                }
                Packet::PubAck(_) | Packet::PingResp => {}
                Packet::Disconnect => return Err(Error::Mqtt("the server disconnected".into())),
                _ => {}
            }
        }
    }
}

struct ResponseTopic {
    status: u16,
    rid: String,
    retry_after: Option<Duration>,
}

/// `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={n}]`.
fn parse_response_topic(topic: &str) -> Option<ResponseTopic> {
    let rest = topic.strip_prefix("$dps/registrations/res/")?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let mut rid = None;
    let mut retry_after = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "$rid" {
            rid = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("retry-after") {
            retry_after = v.parse::<u64>().ok().map(Duration::from_secs);
        }
    }
    Some(ResponseTopic {
        status,
        rid: rid?,
        retry_after,
    })
}

fn operation(
    status: u16,
    retry_after: Option<Duration>,
    payload: &[u8],
) -> Result<RegistrationOperationStatus> {
    if status == 200 || status == 202 {
        return serde_json::from_slice(payload).map_err(|e| Error::UnexpectedResponse {
            what: "MQTT register".into(),
            status,
            detail: e.to_string(),
        });
    }
    match serde_json::from_slice::<ErrorBody>(payload) {
        Ok(b) => Err(Error::Service {
            status,
            error_code: b.error_code,
            message: b.message,
            tracking_id: b.tracking_id,
            retry_after,
        }),
        Err(_) => Err(Error::Service {
            status,
            error_code: status as u32 * 1000,
            message: String::from_utf8_lossy(payload).into_owned(),
            tracking_id: String::new(),
            retry_after,
        }),
    }
}

pub(crate) async fn register(
    client: &DeviceClient,
    registration_id: &str,
    auth: &Auth,
    options: &crate::device::RegisterOptions,
) -> Result<Registration> {
    let api_version = match options.csr {
        Some(_) => crate::device::CSR_API_VERSION,
        None => MQTT_API_VERSION,
    };
    let (tls, password) = match auth {
        Auth::Sas(device_key) => (
            client.tls_config(),
            client.token(registration_id, device_key)?,
        ),
        Auth::X509 { tls, .. } => (tls.clone(), String::new()),
        Auth::Token { token, .. } => (client.tls_config(), token.clone()),
    };
    let mut conn = tls_connect(client.host(), client.mqtt_port(), tls).await?;

    let username = format!(
        "{}/registrations/{registration_id}/api-version={api_version}&ClientVersion=muster-client%2F{}",
        client.id_scope(),
        env!("CARGO_PKG_VERSION")
    );
    let mut connect = Connect::new(registration_id);
    connect.keep_alive = 60;
    connect.clean_session = true;
    connect.login = Some(Login::new(username, password));
    conn.send(Packet::Connect(connect)).await?;
    match conn.recv().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
        Packet::ConnAck(ack) => {
            let (status, code) = match ack.code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    (401, 401000)
                }
                ConnectReturnCode::ServiceUnavailable => (503, 503001),
                _ => (400, 400000),
            };
            return Err(Error::Service {
                status,
                error_code: code,
                message: format!("the server refused the MQTT connection: {:?}", ack.code),
                tracking_id: String::new(),
                retry_after: None,
            });
        }
        other => return Err(Error::Mqtt(format!("expected CONNACK, got {other:?}"))),
    }
    let mut sub = Subscribe::new("$dps/registrations/res/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    conn.send(Packet::Subscribe(sub)).await?;
    loop {
        match conn.recv().await? {
            Packet::SubAck(_) => break,
            Packet::PingResp => {}
            other => return Err(Error::Mqtt(format!("expected SUBACK, got {other:?}"))),
        }
    }

    let mut body = json!({ "registrationId": registration_id });
    if let Some(p) = &options.payload {
        body["payload"] = p.clone();
    }
    if let Some(csr) = &options.csr {
        body["csr"] = json!(csr);
    }
    let mut pkid: u16 = 2;
    let rid = "1".to_string();
    let (status, mut wait, bytes) = conn
        .request(
            format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}"),
            pkid,
            &rid,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .await?;
    let mut op = operation(status, wait, &bytes)?;
    let retry = *client.retry_policy();
    let mut polls = 0;
    while !is_final(op.status) {
        if polls >= retry.max_polls {
            let _ = conn.send(Packet::Disconnect).await;
            return Err(Error::StillAssigning {
                registration_id: registration_id.to_string(),
                status: op.status.to_string(),
                polls,
            });
        }
        polls += 1;
        let sleep = wait.unwrap_or(retry.default_wait).min(retry.max_wait);
        tokio::time::sleep(sleep).await;
        pkid = pkid.wrapping_add(1).max(2);
        let rid = format!("{}", polls + 1);
        let (status, w, bytes) = conn
            .request(
                format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
                    op.operation_id
                ),
                pkid,
                &rid,
                Vec::new(),
            )
            .await?;
        wait = w;
        match operation(status, w, &bytes) {
            Ok(next) => op = next,
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
    }
    let _ = conn.send(Packet::Disconnect).await;
    let _ = conn.stream.shutdown().await;
    Ok(Registration {
        operation_id: op.operation_id,
        status: op.status,
        state: op.registration_state,
        attempts: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_topics() {
        let t = parse_response_topic("$dps/registrations/res/202/?$rid=7&retry-after=3").unwrap();
        assert_eq!((t.status, t.rid.as_str()), (202, "7"));
        assert_eq!(t.retry_after, Some(Duration::from_secs(3)));
        let t = parse_response_topic("$dps/registrations/res/200/?$rid=1").unwrap();
        assert_eq!(t.retry_after, None);
        assert!(parse_response_topic("$iothub/twin/res/200/?$rid=1").is_none());
    }
}
