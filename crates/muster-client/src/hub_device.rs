//! [`HubDeviceConnection`]: a device's MQTT 3.1.1 connection (over TLS) to an IoT hub's
//! device endpoint, enough to send telemetry (device-to-cloud messages) the way the device
//! SDKs do: user name `{hubHost}/{deviceId}/?api-version=2021-04-12`, password a device SAS
//! token for `{hubHost}/devices/{deviceId}`, PUBLISH at QoS 1 to
//! `devices/{deviceId}/messages/events/{property bag}`.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use muster_proto::SasToken;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;

use crate::device::split_host_port;
use crate::error::{Error, Result};
use crate::hub::HUB_API_VERSION;
use crate::mqtt::{tls_connect, Conn};

/// Characters IoT Hub leaves as they are in a property bag.
const BAG: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'$');

/// One device connected to a hub over MQTT.
pub struct HubDeviceConnection {
    conn: Conn<tokio_rustls::client::TlsStream<TcpStream>>,
    device_id: String,
    pkid: u16,
}

impl std::fmt::Debug for HubDeviceConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubDeviceConnection")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl HubDeviceConnection {
    /// Connects `device_id` to the hub `hub_host` (as in `assignedHub`; a `:port` there is
    /// the HTTPS port and is ignored) on `mqtt_port`, authenticated with the device's
    /// symmetric key (base64), trusting `ca_pem` or the system roots.
    pub async fn connect(
        hub_host: &str,
        mqtt_port: u16,
        device_id: &str,
        device_key_b64: &str,
        ca_pem: Option<&Path>,
    ) -> Result<Self> {
        let key = B64
            .decode(device_key_b64)
            .map_err(|_| Error::InvalidInput("the device key is not base64".into()))?;
        let tls = Arc::new(crate::tls::client_config(ca_pem)?);
        let token = SasToken::generate(
            &format!("{hub_host}/devices/{device_id}"),
            &key,
            None,
            crate::unix_now() + 3600,
        );
        Self::connect_with(hub_host, mqtt_port, device_id, tls, token).await
    }

    /// Connects `device_id` with a device SAS token for `{hub_host}/devices/{device_id}` signed
    /// elsewhere, e.g. in the device's TPM (`Tpm::sas_token`).
    pub async fn connect_with_token(
        hub_host: &str,
        mqtt_port: u16,
        device_id: &str,
        token: String,
        ca_pem: Option<&Path>,
    ) -> Result<Self> {
        let tls = Arc::new(crate::tls::client_config(ca_pem)?);
        Self::connect_with(hub_host, mqtt_port, device_id, tls, token).await
    }

    /// Connects `device_id` authenticated with its X.509 certificate (`chain_pem`: the
    /// device certificate first, e.g. the `issuedCertificateChain` of a CSR registration;
    /// `key_pem`: its PKCS #8 key), presented in the TLS handshake.
    pub async fn connect_x509(
        hub_host: &str,
        mqtt_port: u16,
        device_id: &str,
        chain_pem: &str,
        key_pem: &str,
        ca_pem: Option<&Path>,
    ) -> Result<Self> {
        let base = crate::tls::client_config(ca_pem)?;
        let tls = Arc::new(crate::tls::with_client_cert(&base, chain_pem, key_pem)?);
        Self::connect_with(hub_host, mqtt_port, device_id, tls, String::new()).await
    }

    async fn connect_with(
        hub_host: &str,
        mqtt_port: u16,
        device_id: &str,
        tls: Arc<rustls::ClientConfig>,
        token: String,
    ) -> Result<Self> {
        let (host, _) = split_host_port(hub_host);
        let mut conn = tls_connect(host, mqtt_port, tls).await?;
        let username = format!(
            "{hub_host}/{device_id}/?api-version={HUB_API_VERSION}&DeviceClientType=muster-client%2F{}",
            env!("CARGO_PKG_VERSION")
        );
        let mut connect = Connect::new(device_id);
        connect.keep_alive = 60;
        connect.clean_session = true;
        connect.login = Some(Login::new(username, token));
        conn.send(Packet::Connect(connect)).await?;
        match conn.recv().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(ack) => {
                return Err(Error::Mqtt(format!(
                    "the hub refused the connection of '{device_id}': {:?}",
                    ack.code
                )))
            }
            other => return Err(Error::Mqtt(format!("expected CONNACK, got {other:?}"))),
        }
        Ok(Self {
            conn,
            device_id: device_id.to_string(),
            pkid: 0,
        })
    }

    /// Sends one telemetry message at QoS 1 and waits for the hub's PUBACK. `properties` are
    /// application properties; keys starting `$.` are system properties (`$.mid`, `$.ct`, …).
    pub async fn send_event(&mut self, body: &[u8], properties: &[(&str, &str)]) -> Result<()> {
        let bag: Vec<String> = properties
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, BAG),
                    utf8_percent_encode(v, BAG)
                )
            })
            .collect();
        let topic = format!(
            "devices/{}/messages/events/{}",
            self.device_id,
            bag.join("&")
        );
        self.pkid = self.pkid.wrapping_add(1).max(1);
        let mut p = Publish::new(topic, QoS::AtLeastOnce, body.to_vec());
        p.pkid = self.pkid;
        self.conn.send(Packet::Publish(p)).await?;
        loop {
            match self.conn.recv().await? {
                Packet::PubAck(a) if a.pkid == self.pkid => return Ok(()),
                Packet::Publish(p) if p.qos != QoS::AtMostOnce => {
                    self.conn.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
                }
                Packet::Disconnect => {
                    return Err(Error::Mqtt("the hub closed the connection".into()))
                }
                _ => {}
            }
        }
    }

    /// Sends DISCONNECT and closes the connection.
    pub async fn close(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.conn.send(Packet::Disconnect).await;
        let _ = self.conn.stream.shutdown().await;
    }
}
