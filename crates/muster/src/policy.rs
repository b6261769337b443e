//! `muster policy …` and `muster connection-string show`: the service's shared access
//! policies (Muster's `/accessPolicies`; `az iot dps policy` manages them through ARM) and the
//! connection strings made of their keys.

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use muster_client::ServiceClient;
use serde_json::{json, Value};

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, redact, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[("POLICY", "/keyName"), ("RIGHTS", "/rights")];

/// The policy every service starts with.
const OWNER_POLICY: &str = "provisioningserviceowner";

/// Names the policy: `--policy-name/--pn NAME` as az does, or `NAME` as a positional.
#[derive(Args, Debug, Clone)]
pub struct PolicyNameArg {
    /// The policy's name
    #[arg(
        value_name = "POLICY_NAME",
        required_unless_present = "policy_name",
        conflicts_with = "policy_name"
    )]
    pub positional: Option<String>,
    /// The policy's name
    #[arg(long = "policy-name", visible_aliases = ["pn", "name"])]
    pub policy_name: Option<String>,
}

impl PolicyNameArg {
    fn name(&self) -> &str {
        self.policy_name
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

/// A right, as az spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Right {
    #[value(name = "EnrollmentRead")]
    EnrollmentRead,
    #[value(name = "EnrollmentWrite")]
    EnrollmentWrite,
    #[value(name = "RegistrationStatusRead")]
    RegistrationStatusRead,
    #[value(name = "RegistrationStatusWrite")]
    RegistrationStatusWrite,
    #[value(name = "ServiceConfig")]
    ServiceConfig,
}

impl Right {
    fn as_str(self) -> &'static str {
        match self {
            Right::EnrollmentRead => "EnrollmentRead",
            Right::EnrollmentWrite => "EnrollmentWrite",
            Right::RegistrationStatusRead => "RegistrationStatusRead",
            Right::RegistrationStatusWrite => "RegistrationStatusWrite",
            Right::ServiceConfig => "ServiceConfig",
        }
    }
}

#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    pub name: PolicyNameArg,
    /// The rights (space- or comma-separated)
    #[arg(long, short = 'r', value_enum, value_delimiter = ',', num_args = 1.., required = true)]
    pub rights: Vec<Right>,
    /// Show the policy's keys in the answer
    #[arg(long, visible_alias = "keys")]
    pub show_keys: bool,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub name: PolicyNameArg,
    /// Include the policy's keys
    #[arg(long, visible_alias = "keys")]
    pub show_keys: bool,
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
pub struct DeleteArgs {
    #[command(flatten)]
    pub name: PolicyNameArg,
    #[command(flatten)]
    pub conn: ServiceConn,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// List the shared access policies and their rights (keys are never listed).
    List(ListArgs),
    /// Show a policy (keys only with --show-keys).
    ///
    /// Example:
    ///   muster policy show --pn provisioningserviceowner --show-keys
    #[command(verbatim_doc_comment)]
    Show(ShowArgs),
    /// Create a policy with fresh keys.
    ///
    /// Example:
    ///   muster policy create --pn reader --rights EnrollmentRead RegistrationStatusRead
    #[command(verbatim_doc_comment)]
    Create(WriteArgs),
    /// Change a policy's rights (its keys stay).
    ///
    /// Example:
    ///   muster policy update --pn reader --rights EnrollmentRead
    #[command(verbatim_doc_comment)]
    Update(WriteArgs),
    /// Delete a policy (the owner policy cannot be deleted).
    Delete(DeleteArgs),
}

fn rights(r: &[Right]) -> String {
    let mut names: Vec<&str> = r.iter().map(|x| x.as_str()).collect();
    names.dedup();
    names.join(", ")
}

async fn write(a: WriteArgs, creating: bool) -> anyhow::Result<()> {
    let name = a.name.name();
    let (client, _) = a.conn.client()?;
    match (client.get_access_policy(name).await, creating) {
        (Ok(_), true) => bail!("policy '{name}' exists; change it with `muster policy update`"),
        (Err(e), false) if e.is_not_found() => {
            bail!("no policy '{name}'; create it with `muster policy create`")
        }
        (Err(e), _) if !e.is_not_found() => {
            return Err(e).with_context(|| format!("reading policy '{name}'"))
        }
        _ => {}
    }
    let mut v = client
        .put_access_policy(name, &rights(&a.rights))
        .await
        .with_context(|| {
            format!(
                "{} policy '{name}'",
                if creating { "creating" } else { "updating" }
            )
        })?;
    if !a.show_keys {
        redact(&mut v);
    }
    print_object(&a.out, &v);
    Ok(())
}

pub async fn run(c: PolicyCommand) -> anyhow::Result<()> {
    match c {
        PolicyCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let items = client
                .list_access_policies()
                .await
                .context("listing policies")?;
            print_list(&a.out, &items, COLUMNS);
        }
        PolicyCommand::Show(a) => {
            let name = a.name.name();
            let (client, _) = a.conn.client()?;
            let v = if a.show_keys {
                client.access_policy_keys(name).await
            } else {
                client.get_access_policy(name).await
            }
            .with_context(|| format!("reading policy '{name}'"))?;
            print_object(&a.out, &v);
        }
        PolicyCommand::Create(a) => write(a, true).await?,
        PolicyCommand::Update(a) => write(a, false).await?,
        PolicyCommand::Delete(a) => {
            let name = a.name.name();
            let (client, _) = a.conn.client()?;
            client
                .delete_access_policy(name)
                .await
                .with_context(|| format!("deleting policy '{name}'"))?;
            eprintln!("deleted policy '{name}'");
        }
    }
    Ok(())
}

/// Which key a connection string is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum KeyType {
    #[default]
    Primary,
    Secondary,
}

#[derive(Args, Debug)]
pub struct ConnectionStringShowArgs {
    /// The policy whose keys to use
    #[arg(long = "policy-name", visible_alias = "pn", default_value = OWNER_POLICY)]
    pub policy_name: String,
    /// primary or secondary
    #[arg(long, value_enum, default_value_t = KeyType::Primary)]
    pub key_type: KeyType,
    /// One connection string per policy
    #[arg(long)]
    pub show_all: bool,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Subcommand, Debug)]
pub enum ConnectionStringCommand {
    /// Show the service connection string of a policy (it holds the policy's key).
    ///
    /// Examples:
    ///   muster connection-string show
    ///   muster connection-string show --policy-name reader --key-type secondary
    ///   muster connection-string show --show-all -o table
    #[command(verbatim_doc_comment)]
    Show(ConnectionStringShowArgs),
}

async fn connection_string(
    client: &ServiceClient,
    policy: &str,
    key_type: KeyType,
) -> anyhow::Result<Value> {
    let p = client
        .access_policy_keys(policy)
        .await
        .with_context(|| format!("reading the keys of policy '{policy}'"))?;
    let field = match key_type {
        KeyType::Primary => "primaryKey",
        KeyType::Secondary => "secondaryKey",
    };
    let key = p
        .get(field)
        .and_then(Value::as_str)
        .with_context(|| format!("the service returned policy '{policy}' without {field}"))?;
    Ok(json!({
        "policy": policy,
        "connectionString": muster_proto::ConnectionString {
            host_name: client.host_name().to_string(),
            key_name: policy.to_string(),
            key: key.to_string(),
        }
        .to_string(),
    }))
}

pub async fn run_connection_string(c: ConnectionStringCommand) -> anyhow::Result<()> {
    let ConnectionStringCommand::Show(a) = c;
    let (client, _) = a.conn.client()?;
    if a.show_all {
        let mut all = Vec::new();
        for p in client
            .list_access_policies()
            .await
            .context("listing policies")?
        {
            if let Some(name) = p.get("keyName").and_then(Value::as_str) {
                all.push(connection_string(&client, name, a.key_type).await?);
            }
        }
        print_list(
            &a.out,
            &all,
            &[
                ("POLICY", "/policy"),
                ("CONNECTION STRING", "/connectionString"),
            ],
        );
    } else {
        let v = connection_string(&client, &a.policy_name, a.key_type).await?;
        print_object(&a.out, &v);
    }
    Ok(())
}
