//! `muster hub …`: devices and twins of the built-in hub (or any hub).

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::conn::HubConn;
use crate::output::{print_list, print_object, redact, OutputArgs};

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

#[derive(Subcommand, Debug)]
pub enum HubDeviceCommand {
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
    ///   muster hub device list
    ///   muster hub device show dev-001
    #[command(verbatim_doc_comment)]
    #[command(subcommand)]
    Device(HubDeviceCommand),
    /// Device twins.
    #[command(subcommand)]
    Twin(HubTwinCommand),
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
        HubCommand::Device(HubDeviceCommand::List(a)) => {
            let hub = a.conn.client()?;
            let mut devices = hub.list_devices(a.top).await.context("listing devices")?;
            devices.iter_mut().for_each(redact);
            print_list(a.out.output, &devices, DEVICE_COLUMNS);
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
            print_object(a.out.output, &d);
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
            print_object(a.out.output, &t);
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
            print_object(a.out.output, &t);
        }
    }
    Ok(())
}
