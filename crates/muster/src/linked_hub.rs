//! `muster linked-hub …`: the hubs devices may be assigned to (Muster's `/linkedHubs`).

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use muster_proto::linked_hub::LinkedHubRequest;
use muster_proto::ConnectionString;

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[
    ("HOST NAME", "/name"),
    ("POLICY", "/keyName"),
    ("WEIGHT", "/allocationWeight"),
    ("APPLY POLICY", "/applyAllocationPolicy"),
    ("LOCATION", "/location"),
    ("MAX REG/S", "/maxRegistrationsPerSecond"),
    ("BUILT-IN", "/builtIn"),
];

#[derive(Args, Debug, Clone)]
pub struct HubSettings {
    /// Relative share of devices for the hashed policy (1-1000)
    #[arg(long, visible_aliases = ["aw", "weight"])]
    pub allocation_weight: Option<u32>,
    /// Whether devices of enrollments that name no hubs may be assigned here
    #[arg(long, visible_alias = "aap")]
    pub apply_allocation_policy: Option<bool>,
    /// Region, for the geoLatency policy
    #[arg(long)]
    pub location: Option<String>,
    /// Registrations per second sent to this hub at most (0 = unlimited)
    #[arg(long)]
    pub max_registrations_per_second: Option<u32>,
    /// Don't check the connection string with a registry read against the hub first (for a
    /// hub that is not up yet)
    #[arg(long)]
    pub skip_check: bool,
}

/// Names the hub: `--linked-hub/--lh HOST` as az does, or `HOST` as a positional.
#[derive(Args, Debug, Clone)]
pub struct LinkedHubArg {
    /// The hub's host name
    #[arg(
        value_name = "HOST_NAME",
        required_unless_present = "linked_hub",
        conflicts_with = "linked_hub"
    )]
    pub positional: Option<String>,
    /// The hub's host name
    #[arg(long = "linked-hub", visible_alias = "lh")]
    pub linked_hub: Option<String>,
}

impl LinkedHubArg {
    fn host(&self) -> &str {
        self.linked_hub
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// The hub's connection string (a policy with RegistryWrite and ServiceConnect)
    #[arg(long, env = "MUSTER_HUB_CONNECTION_STRING", hide_env_values = true)]
    pub hub_connection_string: String,
    #[command(flatten)]
    pub settings: HubSettings,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub hub: LinkedHubArg,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub hub: LinkedHubArg,
    /// A new connection string (e.g. after rotating keys)
    #[arg(long, hide_env_values = true)]
    pub hub_connection_string: Option<String>,
    #[command(flatten)]
    pub settings: HubSettings,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub hub: LinkedHubArg,
    #[command(flatten)]
    pub conn: ServiceConn,
}

#[derive(Subcommand, Debug)]
pub enum LinkedHubCommand {
    /// Link a hub (its host name comes from the connection string). The service first
    /// checks the connection string with a registry read against the hub (--skip-check
    /// links without it).
    ///
    /// Example:
    ///   muster linked-hub create --hub-connection-string "HostName=hub2.example;SharedAccessKeyName=iothubowner;SharedAccessKey=..." --allocation-weight 2
    #[command(verbatim_doc_comment, name = "create", visible_alias = "add")]
    Add(AddArgs),
    /// List linked hubs (connection strings are never shown).
    List(ListArgs),
    /// Show a linked hub (its connection string is never shown).
    ///
    /// Example:
    ///   muster linked-hub show --linked-hub hub2.example
    #[command(verbatim_doc_comment)]
    Show(ShowArgs),
    /// Change a linked hub's settings.
    ///
    /// Example:
    ///   muster linked-hub update hub2.example --apply-allocation-policy false
    #[command(verbatim_doc_comment)]
    Update(UpdateArgs),
    /// Unlink a hub (the built-in hub cannot be unlinked).
    ///
    /// Example:
    ///   muster linked-hub remove hub2.example
    #[command(verbatim_doc_comment, name = "delete", visible_alias = "remove")]
    Remove(RemoveArgs),
}

fn request(s: &HubSettings, cs: Option<String>) -> LinkedHubRequest {
    LinkedHubRequest {
        connection_string: cs,
        allocation_weight: s.allocation_weight,
        apply_allocation_policy: s.apply_allocation_policy,
        location: s.location.clone(),
        max_registrations_per_second: s.max_registrations_per_second,
        skip_check: s.skip_check.then_some(true),
    }
}

pub async fn run(c: LinkedHubCommand) -> anyhow::Result<()> {
    match c {
        LinkedHubCommand::Add(a) => {
            let host = ConnectionString::parse(&a.hub_connection_string)
                .context("invalid --hub-connection-string")?
                .host_name;
            let (client, _) = a.conn.client()?;
            if client.get_linked_hub(&host).await.is_ok() {
                bail!("hub {host} is already linked; use `muster linked-hub update {host}`");
            }
            let info = client
                .put_linked_hub(
                    &host,
                    &request(&a.settings, Some(a.hub_connection_string.clone())),
                )
                .await
                .with_context(|| format!("linking hub {host}"))?;
            print_object(&a.out, &serde_json::to_value(info)?);
        }
        LinkedHubCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let hubs = client
                .list_linked_hubs()
                .await
                .context("listing linked hubs")?;
            let items = hubs
                .into_iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?;
            print_list(&a.out, &items, COLUMNS);
        }
        LinkedHubCommand::Show(a) => {
            let host = a.hub.host();
            let (client, _) = a.conn.client()?;
            let info = client
                .get_linked_hub(host)
                .await
                .with_context(|| format!("reading linked hub {host}"))?;
            print_object(&a.out, &serde_json::to_value(info)?);
        }
        LinkedHubCommand::Update(a) => {
            let host = a.hub.host();
            let (client, _) = a.conn.client()?;
            client
                .get_linked_hub(host)
                .await
                .with_context(|| format!("reading linked hub {host}"))?;
            let info = client
                .put_linked_hub(host, &request(&a.settings, a.hub_connection_string.clone()))
                .await
                .with_context(|| format!("updating linked hub {host}"))?;
            print_object(&a.out, &serde_json::to_value(info)?);
        }
        LinkedHubCommand::Remove(a) => {
            let host = a.hub.host();
            let (client, _) = a.conn.client()?;
            client
                .delete_linked_hub(host)
                .await
                .with_context(|| format!("unlinking hub {host}"))?;
            eprintln!("unlinked hub {host}");
        }
    }
    Ok(())
}
