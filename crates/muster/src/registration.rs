//! `muster registration …` and `muster deprovision`: registration records, and removing a
//! device completely (record, hub identity, optionally blocking it).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use muster_client::{ConnectionFile, HubClient, ServiceClient};
use muster_proto::{
    AttestationMechanism, IndividualEnrollment, ProvisioningStatus, RegistrationId,
};
use serde_json::{json, Value};

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[
    ("REGISTRATION ID", "/registrationId"),
    ("DEVICE ID", "/deviceId"),
    ("STATUS", "/status"),
    ("SUBSTATUS", "/substatus"),
    ("ASSIGNED HUB", "/assignedHub"),
    ("ERROR", "/errorCode"),
    ("LAST UPDATED", "/lastUpdatedDateTimeUtc"),
];

/// Names the record: `--registration-id/--rid ID` as az does, or `ID` as a positional.
#[derive(Args, Debug, Clone)]
pub struct RegistrationIdArg {
    /// The device's registration id
    #[arg(
        value_name = "REGISTRATION_ID",
        required_unless_present = "registration_id",
        conflicts_with = "registration_id"
    )]
    pub positional: Option<String>,
    /// The device's registration id (`az iot dps enrollment registration` spells it --eid)
    #[arg(long = "registration-id", visible_alias = "rid", aliases = ["enrollment-id", "eid"])]
    pub registration_id: Option<String>,
}

impl RegistrationIdArg {
    pub fn id(&self) -> &str {
        self.registration_id
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub id: RegistrationIdArg,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The enrollment group whose devices' records to list
    #[arg(long, visible_aliases = ["gid", "enrollment-id", "eid"])]
    pub group_id: String,
    /// At most N records
    #[arg(long)]
    pub top: Option<usize>,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// How to remove a device from its hub.
#[derive(Args, Debug, Clone)]
pub struct CascadeArgs {
    /// Connection string of the device's hub, when it is not the built-in hub
    #[arg(long, env = "MUSTER_HUB_CONNECTION_STRING", hide_env_values = true)]
    pub hub_connection_string: Option<String>,
    /// Also block the device: create (or disable) an individual enrollment for it with
    /// provisioning status disabled, so it cannot register again
    #[arg(long)]
    pub block: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub id: RegistrationIdArg,
    /// Also delete the device identity from its hub (the cascade DPS lacks)
    #[arg(long)]
    pub cascade: bool,
    /// Delete only if the record's etag is this one
    #[arg(long, short = 'e')]
    pub etag: Option<String>,
    #[command(flatten)]
    pub cascade_args: CascadeArgs,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DeprovisionArgs {
    /// Registration ids to deprovision
    #[arg(required = true)]
    pub registration_ids: Vec<String>,
    #[command(flatten)]
    pub cascade_args: CascadeArgs,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Subcommand, Debug)]
pub enum RegistrationCommand {
    /// Show a device's registration record.
    ///
    /// Example:
    ///   muster registration show dev-001
    #[command(verbatim_doc_comment)]
    Show(ShowArgs),
    /// List the registration records of an enrollment group's devices.
    ///
    /// Example:
    ///   muster registration list --group-id line-1 --output json
    #[command(verbatim_doc_comment)]
    List(ListArgs),
    /// Delete a registration record; with --cascade also the device in its hub.
    ///
    /// Without --cascade the device stays in its hub (as with DPS). --block also keeps the
    /// device from registering again.
    ///
    /// Examples:
    ///   muster registration delete dev-001
    ///   muster registration delete dev-001 --cascade
    ///   muster registration delete dev-001 --cascade --block
    #[command(verbatim_doc_comment)]
    Delete(DeleteArgs),
}

pub async fn run(c: RegistrationCommand) -> anyhow::Result<()> {
    match c {
        RegistrationCommand::Show(a) => {
            let (client, _) = a.conn.client()?;
            let id = a.id.id();
            let r = client
                .get_registration(id)
                .await
                .with_context(|| format!("reading registration '{id}'"))?;
            print_object(&a.out, &serde_json::to_value(r)?);
            Ok(())
        }
        RegistrationCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let mut pager = client.query_registrations(&a.group_id, Some(1000));
            let mut items: Vec<Value> = Vec::new();
            while let Some(page) = pager
                .next_page()
                .await
                .with_context(|| format!("listing the registrations of group '{}'", a.group_id))?
            {
                for r in page {
                    items.push(serde_json::to_value(r)?);
                }
                if a.top.is_some_and(|t| items.len() >= t) {
                    break;
                }
            }
            if let Some(t) = a.top {
                items.truncate(t);
            }
            print_list(&a.out, &items, COLUMNS);
            Ok(())
        }
        RegistrationCommand::Delete(a) => {
            let registration_id = a.id.id();
            let (client, file) = a.conn.client()?;
            if a.cascade || a.cascade_args.block {
                let ca = a.conn.ca(file.as_ref());
                let done = cascade(
                    &client,
                    file.as_ref(),
                    ca.as_deref(),
                    registration_id,
                    &a.cascade_args,
                    a.etag.as_deref(),
                    a.cascade,
                )
                .await?;
                print_object(&a.out, &done);
            } else {
                client
                    .delete_registration(registration_id, a.etag.as_deref())
                    .await
                    .with_context(|| format!("deleting registration '{registration_id}'"))?;
                eprintln!(
                    "deleted registration '{registration_id}' (the device stays in its hub; \
                     --cascade removes it)"
                );
            }
            Ok(())
        }
    }
}

pub async fn deprovision(a: DeprovisionArgs) -> anyhow::Result<()> {
    let (client, file) = a.conn.client()?;
    let ca = a.conn.ca(file.as_ref());
    let mut failures = 0;
    let mut rows = Vec::new();
    for id in &a.registration_ids {
        match cascade(
            &client,
            file.as_ref(),
            ca.as_deref(),
            id,
            &a.cascade_args,
            None,
            true,
        )
        .await
        {
            Ok(v) => rows.push(v),
            Err(e) => {
                failures += 1;
                eprintln!("error: {id}: {}", crate::output::describe(&e));
            }
        }
    }
    print_list(
        &a.out,
        &rows,
        &[
            ("REGISTRATION ID", "/registrationId"),
            ("HUB", "/hub"),
            ("DEVICE", "/device"),
            ("RECORD", "/record"),
            ("BLOCKED", "/blocked"),
        ],
    );
    if failures > 0 {
        bail!(
            "{failures} of {} devices were not deprovisioned",
            a.registration_ids.len()
        );
    }
    Ok(())
}

/// Deletes the record and (with `hub`) the hub device; blocks first when asked, so the device
/// cannot slip back in between. The server does the cascade itself (`POST /deprovisions`,
/// intent first, so a crash leaves no hub device without a record); only a device in a hub
/// the server does not link, named by `--hub-connection-string`, is deleted from here.
async fn cascade(
    client: &ServiceClient,
    file: Option<&ConnectionFile>,
    ca: Option<&std::path::Path>,
    registration_id: &str,
    args: &CascadeArgs,
    etag: Option<&str>,
    hub: bool,
) -> anyhow::Result<Value> {
    let record = match client.get_registration(registration_id).await {
        Ok(r) => Some(r),
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            return Err(e).with_context(|| format!("reading registration '{registration_id}'"))
        }
    };
    if record.is_none() && !args.block {
        bail!("no registration record '{registration_id}'");
    }
    if let (Some(r), true, None) = (&record, hub, &args.hub_connection_string) {
        let mut blocked = "-";
        if args.block {
            block(client, registration_id).await?;
            blocked = "yes";
        }
        let done = client
            .deprovision(registration_id, etag)
            .await
            .with_context(|| format!("deprovisioning '{registration_id}'"))?;
        let device = match &r.device_id {
            Some(d) if r.assigned_hub.is_some() => format!("{d} deleted"),
            _ => "-".to_string(),
        };
        return Ok(json!({
            "registrationId": registration_id,
            "hub": done.get("hub").cloned().unwrap_or(Value::Null),
            "device": device,
            "record": "deleted",
            "blocked": blocked,
        }));
    }
    // Find the hub before changing anything, so a missing connection string fails cleanly.
    let target = match (&record, hub) {
        (Some(r), true) => match (&r.assigned_hub, &r.device_id) {
            (Some(h), Some(d)) => Some((hub_client(file, ca, h, args)?, d.clone())),
            _ => None,
        },
        _ => None,
    };
    let mut blocked = "-";
    if args.block {
        block(client, registration_id).await?;
        blocked = "yes";
    }
    let mut device_state = "-".to_string();
    if let Some((h, device_id)) = &target {
        device_state = match h.delete_device(device_id, None).await {
            Ok(()) => format!("{device_id} deleted"),
            Err(e) if e.is_not_found() => format!("{device_id} (already gone)"),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("deleting device '{device_id}' from hub {}", h.host_name())
                })
            }
        };
    }
    let record_state = match &record {
        Some(_) => match client.delete_registration(registration_id, etag).await {
            Ok(()) => "deleted",
            Err(e) if e.is_not_found() => "already gone",
            Err(e) => {
                return Err(e).with_context(|| format!("deleting registration '{registration_id}'"))
            }
        },
        None => "none",
    };
    Ok(json!({
        "registrationId": registration_id,
        "hub": target.as_ref().map(|(h, _)| h.host_name().to_string()),
        "device": device_state,
        "record": record_state,
        "blocked": blocked,
    }))
}

fn hub_client(
    file: Option<&ConnectionFile>,
    ca: Option<&std::path::Path>,
    host: &str,
    args: &CascadeArgs,
) -> anyhow::Result<HubClient> {
    let cs = match (&args.hub_connection_string, file.and_then(|f| f.hub_connection_string(host))) {
        (Some(cs), _) => {
            let parsed = muster_proto::ConnectionString::parse(cs)
                .context("invalid --hub-connection-string")?;
            if !parsed.host_name.eq_ignore_ascii_case(host) {
                bail!(
                    "the device is in hub {host}, but --hub-connection-string names {}",
                    parsed.host_name
                );
            }
            cs.clone()
        }
        (None, Some(cs)) => cs.to_string(),
        (None, None) => bail!(
            "the device is in hub {host}, whose connection string is unknown: pass --hub-connection-string"
        ),
    };
    Ok(HubClient::from_connection_string(&cs, ca)?)
}

/// A disabled individual enrollment blocks the device even when its group would accept it.
async fn block(client: &ServiceClient, registration_id: &str) -> anyhow::Result<()> {
    match client.get_enrollment(registration_id).await {
        Ok(mut e) => {
            e.provisioning_status = Some(ProvisioningStatus::Disabled);
            e.registration_state = None;
            let etag = e.etag.clone().unwrap_or_else(|| "*".into());
            client
                .create_or_update_enrollment(&e, Some(&etag))
                .await
                .with_context(|| format!("disabling enrollment '{registration_id}'"))?;
        }
        Err(err) if err.is_not_found() => {
            let mut e: IndividualEnrollment = serde_json::from_value(json!({
                "registrationId": RegistrationId::new(registration_id)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .as_str(),
                "attestation": serde_json::to_value(AttestationMechanism {
                    kind: muster_proto::AttestationType::SymmetricKey,
                    tpm: None,
                    x509: None,
                    symmetric_key: None,
                })?,
            }))?;
            e.provisioning_status = Some(ProvisioningStatus::Disabled);
            client
                .create_or_update_enrollment(&e, None)
                .await
                .with_context(|| {
                    format!("creating a disabled enrollment for '{registration_id}'")
                })?;
        }
        Err(err) => {
            return Err(err).with_context(|| format!("reading enrollment '{registration_id}'"))
        }
    }
    Ok(())
}
