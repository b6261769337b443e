//! `muster audit list`: the audit log of service-API and console writes (Muster's `GET /audit`).

use anyhow::Context;
use clap::{Args, Subcommand};
use muster_client::AuditQuery;

use crate::conn::ServiceConn;
use crate::output::{print_list, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[
    ("TIME", "/time"),
    ("POLICY", "/policy"),
    ("SOURCE", "/source"),
    ("METHOD", "/method"),
    ("ROUTE", "/route"),
    ("ID", "/id"),
    ("STATUS", "/status"),
    ("ERROR", "/errorCode"),
];

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only entries at or after this time (RFC 3339, e.g. 2026-12-03T10:00:00Z)
    #[arg(long)]
    pub since: Option<String>,
    /// Only entries before this time (RFC 3339)
    #[arg(long)]
    pub until: Option<String>,
    /// Only writes signed by this shared access policy
    #[arg(long)]
    pub policy: Option<String>,
    /// Only writes to this id (registration id, group id, hub name, ...)
    #[arg(long)]
    pub id: Option<String>,
    /// Show at most this many entries [default: all]
    #[arg(long)]
    pub top: Option<usize>,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// List audit entries, oldest first (needs a policy with ServiceConfig).
    ///
    /// Examples:
    ///   muster audit list
    ///   muster audit list --since 2026-12-03T00:00:00Z --policy provisioningserviceowner
    ///   muster audit list --id dev-001 --output json
    #[command(verbatim_doc_comment)]
    List(ListArgs),
}

pub async fn run(c: AuditCommand) -> anyhow::Result<()> {
    match c {
        AuditCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let query = AuditQuery {
                from: a.since.clone(),
                to: a.until.clone(),
                policy: a.policy.clone(),
                id: a.id.clone(),
                page_size: None,
            };
            let mut items = Vec::new();
            let mut continuation: Option<String> = None;
            loop {
                let (page, next) = client
                    .audit_page(&query, continuation.as_deref())
                    .await
                    .context("listing audit entries")?;
                for entry in page {
                    items.push(serde_json::to_value(entry)?);
                }
                if let Some(top) = a.top.filter(|top| items.len() >= *top) {
                    items.truncate(top);
                    break;
                }
                match next {
                    Some(n) => continuation = Some(n),
                    None => break,
                }
            }
            print_list(&a.out, &items, COLUMNS);
        }
    }
    Ok(())
}
