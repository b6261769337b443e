//! `muster certificate issued list|show|revoke` (a subgroup of `certificate`, the CA
//! certificates of `ca_certificate.rs`): the certificates Muster issued for devices'
//! CSRs (Muster's `/certificates/issued` extension of the service API).

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[
    ("SERIAL", "/serialNumber"),
    ("REGISTRATION", "/registrationId"),
    ("GROUP", "/enrollmentGroupId"),
    ("CA", "/issuingCa"),
    ("ISSUED", "/issuedDateTimeUtc"),
    ("NOT AFTER", "/notAfterUtc"),
    ("REVOKED", "/revokedDateTimeUtc"),
];

#[derive(Subcommand, Debug)]
pub enum IssuedCommand {
    /// List issued certificates by serial number (needs RegistrationStatusRead).
    ///
    /// Examples:
    ///   muster certificate issued list
    ///   muster certificate issued list --registration-id dev-001 --output json
    #[command(verbatim_doc_comment)]
    List(ListArgs),
    /// Show one issued certificate (needs RegistrationStatusRead).
    ///
    /// Examples:
    ///   muster certificate issued show 5A0F3C...
    #[command(verbatim_doc_comment)]
    Show(ShowArgs),
    /// Revoke an issued certificate: the built-in hub refuses it, its device's hub identity
    /// loses it, and registering with it is refused (needs RegistrationStatusWrite).
    ///
    /// Examples:
    ///   muster certificate issued revoke 5A0F3C... --reason "device stolen"
    #[command(verbatim_doc_comment)]
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this registration's certificates
    #[arg(long)]
    pub registration_id: Option<String>,
    /// Show at most this many [default: all]
    #[arg(long)]
    pub top: Option<usize>,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Serial number (hex, as listed)
    pub serial: String,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Serial number (hex, as listed)
    pub serial: String,
    /// Why (kept with the record, at most 256 characters)
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub async fn run(c: IssuedCommand) -> anyhow::Result<()> {
    match c {
        IssuedCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let mut items = Vec::new();
            let mut continuation: Option<String> = None;
            loop {
                let (page, next) = client
                    .issued_certificates_page(
                        a.registration_id.as_deref(),
                        None,
                        continuation.as_deref(),
                    )
                    .await
                    .context("listing issued certificates")?;
                for cert in page {
                    items.push(serde_json::to_value(cert)?);
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
        IssuedCommand::Show(a) => {
            let (client, _) = a.conn.client()?;
            let cert = client
                .issued_certificate(&a.serial)
                .await
                .with_context(|| format!("showing issued certificate {}", a.serial))?;
            print_object(&a.out, &serde_json::to_value(cert)?);
        }
        IssuedCommand::Revoke(a) => {
            let (client, _) = a.conn.client()?;
            let cert = client
                .revoke_issued_certificate(&a.serial, a.reason.as_deref())
                .await
                .with_context(|| format!("revoking issued certificate {}", a.serial))?;
            print_object(&a.out, &serde_json::to_value(cert)?);
        }
    }
    Ok(())
}
