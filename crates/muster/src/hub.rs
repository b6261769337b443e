//! `muster hub …`: device identities, twins, cloud-to-device messages, direct methods and the
//! telemetry tail of the built-in hub (or any hub), with `az iot hub`'s command names.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::conn::HubConn;
use crate::output::{emit, print_list, print_object, redact, Format, OutputArgs};
use muster_client::{Error as ClientError, HubClient, TelemetryEvent, TelemetryMessage};
use std::time::Duration;

const DEVICE_COLUMNS: &[(&str, &str)] = &[
    ("DEVICE ID", "/deviceId"),
    ("STATUS", "/status"),
    ("CONNECTION", "/connectionState"),
    ("AUTH", "/authentication/type"),
    ("LAST ACTIVITY", "/lastActivityTime"),
];

#[derive(Args, Debug)]
pub struct DeviceListArgs {
    /// At most N devices
    #[arg(long)]
    pub top: Option<u32>,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DeviceIdArgs {
    pub device_id: String,
    /// Include the device's keys
    #[arg(long)]
    pub show_keys: bool,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// How a new device authenticates (az's `--auth-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    /// Symmetric keys (generated unless given)
    #[value(name = "shared_private_key")]
    SharedPrivateKey,
    /// A self-signed X.509 certificate, by thumbprint
    #[value(name = "x509_thumbprint")]
    X509Thumbprint,
    /// An X.509 certificate issued by a CA the hub trusts
    #[value(name = "x509_ca")]
    X509Ca,
}

#[derive(Args, Debug)]
pub struct DeviceCreateArgs {
    /// The device id
    #[arg(long = "device-id", short = 'd')]
    pub device_id: String,
    /// shared_private_key, x509_thumbprint or x509_ca
    #[arg(long, visible_alias = "am", value_enum, default_value_t = AuthMethod::SharedPrivateKey)]
    pub auth_method: AuthMethod,
    /// Primary symmetric key (base64) [default: generated]
    #[arg(long, visible_alias = "pk")]
    pub primary_key: Option<String>,
    /// Secondary symmetric key (base64) [default: generated]
    #[arg(long, visible_alias = "sk")]
    pub secondary_key: Option<String>,
    /// x509_thumbprint: the certificate's thumbprint (SHA-1 or SHA-256 hex)
    #[arg(long, visible_alias = "ptp")]
    pub primary_thumbprint: Option<String>,
    /// x509_thumbprint: a second certificate's thumbprint
    #[arg(long, visible_alias = "stp")]
    pub secondary_thumbprint: Option<String>,
    /// enabled or disabled
    #[arg(long, visible_alias = "sta", default_value = "enabled")]
    pub status: String,
    /// An IoT Edge device
    #[arg(long, visible_alias = "ee")]
    pub edge_enabled: bool,
    /// Show the device's keys in the answer
    #[arg(long)]
    pub show_keys: bool,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct C2dSendArgs {
    /// The device id
    #[arg(long = "device-id", short = 'd')]
    pub device_id: String,
    /// The message body
    #[arg(long, visible_alias = "da", default_value = "Ping from Muster")]
    pub data: String,
    /// Application properties, `key=value` pairs separated by `;`
    #[arg(long, visible_alias = "props", short = 'p')]
    pub properties: Option<String>,
    /// Message id
    #[arg(long, visible_alias = "mid")]
    pub message_id: Option<String>,
    /// Content type, e.g. application/json
    #[arg(long, visible_alias = "ct")]
    pub content_type: Option<String>,
    #[command(flatten)]
    pub conn: HubConn,
}

#[derive(Subcommand, Debug)]
pub enum C2dCommand {
    /// Queue a cloud-to-device message for a device (delivered over MQTT, AMQP or HTTPS).
    ///
    /// Example:
    ///   muster hub c2d-message send -d dev-001 --data '{"led":"on"}' --props 'kind=cmd;prio=1'
    #[command(verbatim_doc_comment)]
    Send(C2dSendArgs),
}

#[derive(Args, Debug)]
pub struct InvokeArgs {
    /// The device id
    #[arg(long = "device-id", short = 'd')]
    pub device_id: String,
    /// The method's name
    #[arg(long, visible_alias = "mn")]
    pub method_name: String,
    /// The method's payload, JSON
    #[arg(long, visible_alias = "mp", default_value = "{}")]
    pub method_payload: String,
    /// Seconds to wait for the device's answer (1-300)
    #[arg(long, visible_alias = "to", default_value_t = 30)]
    pub timeout: u64,
    /// Seconds to wait for the device to connect first (0-300)
    #[arg(long, visible_alias = "cto", default_value_t = 0)]
    pub connect_timeout: u64,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DeviceDeleteArgs {
    pub device_id: String,
    #[command(flatten)]
    pub conn: HubConn,
}

#[derive(Args, Debug)]
pub struct TwinShowArgs {
    pub device_id: String,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct TwinUpdateArgs {
    pub device_id: String,
    /// Tags to merge, a JSON object (null deletes a tag)
    #[arg(long)]
    pub tags: Option<String>,
    /// Desired properties to merge, a JSON object (null deletes a property)
    #[arg(long)]
    pub desired: Option<String>,
    /// Update only if the twin's etag is this one
    #[arg(long)]
    pub etag: Option<String>,
    #[command(flatten)]
    pub conn: HubConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Only this device's messages [default: every device's, live only]
    pub device_id: Option<String>,
    /// First replay the device's stored messages (the hub keeps the last 10,000 per device)
    #[arg(long, requires = "device_id")]
    pub from_start: bool,
    /// First replay the device's stored messages after this sequence number
    #[arg(long, requires = "device_id", conflicts_with = "from_start")]
    pub after: Option<u64>,
    /// Stop after this many messages [default: follow until Ctrl-C]
    #[arg(long)]
    pub count: Option<u64>,
    #[command(flatten)]
    pub conn: HubConn,
    /// Output format: one line per message, or `-o json` for one JSON object per line
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Subcommand, Debug)]
pub enum HubDeviceCommand {
    /// Create a device identity (keys generated unless given).
    ///
    /// Examples:
    ///   muster hub device-identity create -d dev-001
    ///   muster hub device-identity create -d cam-7 --auth-method x509_thumbprint --ptp "$THUMB"
    ///   muster hub device-identity create -d gw-1 --edge-enabled
    #[command(verbatim_doc_comment)]
    Create(DeviceCreateArgs),
    /// List device identities.
    List(DeviceListArgs),
    /// Show a device identity (keys only with --show-keys).
    Show(DeviceIdArgs),
    /// Delete a device identity.
    Delete(DeviceDeleteArgs),
}

#[derive(Subcommand, Debug)]
pub enum HubTwinCommand {
    /// Show a device twin.
    Show(TwinShowArgs),
    /// Merge tags and desired properties into a device twin.
    ///
    /// Example:
    ///   muster hub twin update dev-001 --tags '{"floor":3}' --desired '{"interval":60}'
    #[command(verbatim_doc_comment)]
    Update(TwinUpdateArgs),
}

#[derive(Subcommand, Debug)]
pub enum HubCommand {
    /// Device identities.
    ///
    /// Examples:
    ///   muster hub device-identity list
    ///   muster hub device-identity show dev-001
    #[command(verbatim_doc_comment)]
    #[command(subcommand, name = "device-identity", visible_alias = "device")]
    Device(HubDeviceCommand),
    /// Cloud-to-device messages.
    #[command(subcommand, name = "c2d-message")]
    C2dMessage(C2dCommand),
    /// Invoke a direct method on a connected device and print its answer.
    ///
    /// Example:
    ///   muster hub invoke-device-method -d dev-001 --method-name reboot --method-payload '{"delay":5}'
    #[command(verbatim_doc_comment)]
    InvokeDeviceMethod(InvokeArgs),
    /// Device twins.
    #[command(subcommand)]
    Twin(HubTwinCommand),
    /// Follow the built-in hub's live telemetry (device-to-cloud messages) until Ctrl-C.
    ///
    /// One line per message: device id, sequence number, enqueued time, body (base64: when
    /// it is not UTF-8), then application and system properties as JSON; `-o json` prints
    /// each message as one JSON object per line. With a DEVICE_ID, --from-start (or --after
    /// SEQ) first replays the device's stored messages, and a dropped connection resumes
    /// after the last message shown; without one, every device's messages are shown live.
    ///
    /// Examples:
    ///   muster hub tail
    ///   muster hub tail dev-001 --from-start
    ///   muster hub tail dev-001 --after 120 -o json | jq .body
    ///   muster hub tail dev-001 --from-start --count 10
    #[command(verbatim_doc_comment, visible_alias = "monitor-events")]
    Tail(TailArgs),
}

/// The device JSON `hub device-identity create` sends.
fn new_device(a: &DeviceCreateArgs) -> anyhow::Result<Value> {
    let status = match a.status.as_str() {
        "enabled" | "disabled" => a.status.as_str(),
        other => anyhow::bail!("--status must be enabled or disabled, not '{other}'"),
    };
    let authentication = match a.auth_method {
        AuthMethod::SharedPrivateKey => json!({
            "type": "sas",
            "symmetricKey": {"primaryKey": a.primary_key, "secondaryKey": a.secondary_key},
        }),
        AuthMethod::X509Thumbprint => {
            let Some(p) = &a.primary_thumbprint else {
                anyhow::bail!("--auth-method x509_thumbprint needs --primary-thumbprint");
            };
            json!({
                "type": "selfSigned",
                "x509Thumbprint": {
                    "primaryThumbprint": p,
                    "secondaryThumbprint": a.secondary_thumbprint,
                },
            })
        }
        AuthMethod::X509Ca => json!({"type": "certificateAuthority"}),
    };
    Ok(json!({
        "deviceId": a.device_id,
        "status": status,
        "authentication": authentication,
        "capabilities": {"iotEdge": a.edge_enabled},
    }))
}

/// `a=1;b=2` → `[(a, 1), (b, 2)]`.
fn properties(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => anyhow::bail!("--props: '{p}' is not key=value (pairs are separated by ';')"),
        })
        .collect()
}

fn object(flag: &str, text: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text)
        .with_context(|| format!("{flag} is not valid JSON"))?
    {
        Value::Object(m) => Ok(m),
        _ => anyhow::bail!("{flag} must be a JSON object"),
    }
}

pub async fn run(c: HubCommand) -> anyhow::Result<()> {
    match c {
        HubCommand::Tail(a) => return tail(a).await,
        HubCommand::Device(HubDeviceCommand::Create(a)) => {
            let device = new_device(&a)?;
            let hub = a.conn.client()?;
            let mut d = hub
                .create_device(&a.device_id, &device)
                .await
                .with_context(|| format!("creating device '{}'", a.device_id))?;
            if !a.show_keys {
                redact(&mut d);
            }
            print_object(&a.out, &d);
        }
        HubCommand::C2dMessage(C2dCommand::Send(a)) => {
            let props = match &a.properties {
                Some(p) => properties(p)?,
                None => Vec::new(),
            };
            let hub = a.conn.client()?;
            hub.send_c2d(
                &a.device_id,
                a.data.clone().into_bytes(),
                &props,
                a.message_id.as_deref(),
                a.content_type.as_deref(),
            )
            .await
            .with_context(|| format!("sending a message to '{}'", a.device_id))?;
            eprintln!(
                "queued a message for '{}' on {}",
                a.device_id,
                hub.host_name()
            );
        }
        HubCommand::InvokeDeviceMethod(a) => {
            let payload: Value = serde_json::from_str(&a.method_payload)
                .context("--method-payload is not valid JSON")?;
            let hub = a.conn.client()?;
            let answer = hub
                .invoke_method(
                    &a.device_id,
                    &a.method_name,
                    &payload,
                    a.timeout,
                    a.connect_timeout,
                )
                .await
                .with_context(|| format!("invoking '{}' on '{}'", a.method_name, a.device_id))?;
            print_object(&a.out, &answer);
        }
        HubCommand::Device(HubDeviceCommand::List(a)) => {
            let hub = a.conn.client()?;
            let mut devices = hub.list_devices(a.top).await.context("listing devices")?;
            devices.iter_mut().for_each(redact);
            print_list(&a.out, &devices, DEVICE_COLUMNS);
        }
        HubCommand::Device(HubDeviceCommand::Show(a)) => {
            let hub = a.conn.client()?;
            let mut d = hub
                .get_device(&a.device_id)
                .await
                .with_context(|| format!("reading device '{}'", a.device_id))?;
            if !a.show_keys {
                redact(&mut d);
            }
            print_object(&a.out, &d);
        }
        HubCommand::Device(HubDeviceCommand::Delete(a)) => {
            let hub = a.conn.client()?;
            hub.delete_device(&a.device_id, None)
                .await
                .with_context(|| format!("deleting device '{}'", a.device_id))?;
            eprintln!("deleted device '{}' from {}", a.device_id, hub.host_name());
        }
        HubCommand::Twin(HubTwinCommand::Show(a)) => {
            let hub = a.conn.client()?;
            let t = hub
                .get_twin(&a.device_id)
                .await
                .with_context(|| format!("reading the twin of '{}'", a.device_id))?;
            print_object(&a.out, &t);
        }
        HubCommand::Twin(HubTwinCommand::Update(a)) => {
            let hub = a.conn.client()?;
            let mut patch = json!({});
            if let Some(t) = &a.tags {
                patch["tags"] = Value::Object(object("--tags", t)?);
            }
            if let Some(d) = &a.desired {
                patch["properties"] = json!({"desired": Value::Object(object("--desired", d)?)});
            }
            if patch.as_object().is_some_and(|m| m.is_empty()) {
                anyhow::bail!("nothing to update: pass --tags and/or --desired");
            }
            let t = hub
                .patch_twin(&a.device_id, &patch, a.etag.as_deref())
                .await
                .with_context(|| format!("updating the twin of '{}'", a.device_id))?;
            print_object(&a.out, &t);
        }
    }
    Ok(())
}

/// One message as a line: `DEVICE #SEQ TIME BODY [properties=JSON] [system=JSON]`.
fn message_line(m: &TelemetryMessage) -> String {
    let body = if m.body_encoding.eq_ignore_ascii_case("base64") {
        format!("base64:{}", m.body)
    } else {
        m.body.replace('\n', "\\n").replace('\r', "\\r")
    };
    let mut line = format!(
        "{}  #{}  {}  {}",
        m.device_id, m.sequence_number, m.enqueued_time, body
    );
    if !m.properties.is_empty() {
        line.push_str(&format!(
            "  properties={}",
            Value::Object(m.properties.clone())
        ));
    }
    if !m.system_properties.is_empty() {
        line.push_str(&format!(
            "  system={}",
            Value::Object(m.system_properties.clone())
        ));
    }
    line
}

/// Refusals that reconnecting cannot fix.
fn is_permanent(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Hub { status, .. } if *status < 500 && *status != 429
    ) || matches!(e, ClientError::InvalidInput(_) | ClientError::Tls(_))
}

async fn tail(a: TailArgs) -> anyhow::Result<()> {
    let hub = a.conn.client()?;
    let what = match &a.device_id {
        Some(d) => format!("the telemetry of '{d}'"),
        None => "the telemetry of every device".to_string(),
    };
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    tokio::select! {
        r = follow(&hub, &a, &what) => r,
        _ = &mut stop => Ok(()),
    }
}

async fn follow(hub: &HubClient, a: &TailArgs, what: &str) -> anyhow::Result<()> {
    // Per device: the last sequence number shown, to resume after it.
    let mut after = match (a.from_start, a.after) {
        (true, _) => Some(0),
        (false, n) => n,
    };
    let mut shown = 0u64;
    let mut connected_once = false;
    let mut backoff = Duration::from_secs(1);
    loop {
        if a.count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        let opened = hub.telemetry_stream(a.device_id.as_deref(), after).await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) if connected_once && !is_permanent(&e) => {
                eprintln!("warning: reconnecting to {what} failed ({e}); retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("following {what}"))),
        };
        if connected_once {
            eprintln!("reconnected to {what}");
        }
        connected_once = true;
        backoff = Duration::from_secs(1);
        let ended = loop {
            match stream.next().await {
                Ok(Some(TelemetryEvent::Message { message, .. })) => {
                    if a.device_id.is_some() {
                        after = Some(message.sequence_number);
                    }
                    match a.output {
                        Format::Json | Format::Jsonc | Format::Yaml => emit(
                            &serde_json::to_string(&message)
                                .context("encoding a message as JSON")?,
                        ),
                        Format::Table | Format::Tsv => emit(&message_line(&message)),
                        Format::None => {}
                    }
                    shown += 1;
                    if a.count.is_some_and(|c| shown >= c) {
                        return Ok(());
                    }
                }
                Ok(Some(TelemetryEvent::Notice(n))) => eprintln!("note: {n}"),
                Ok(None) => break "the hub ended the stream".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        let gap = if a.device_id.is_some() {
            ""
        } else {
            " (messages sent meanwhile are not shown)"
        };
        eprintln!("warning: {ended}; reconnecting{gap}");
        tokio::time::sleep(backoff).await;
    }
}
