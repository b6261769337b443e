//! `muster certificate …`: the CA certificates enrollment groups reference by name (Muster's
//! `/caCertificates`; `az iot dps certificate` manages them through ARM), with the proof of
//! possession Azure users know: create (unverified), generate-verification-code, sign a
//! certificate whose CN is the code with the CA's key, verify with it. Only a verified CA may
//! be named by an enrollment group (`--root-ca-name`) and attests devices.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, OutputArgs};

const COLUMNS: &[(&str, &str)] = &[
    ("NAME", "/name"),
    ("VERIFIED", "/isVerified"),
    ("SUBJECT", "/info/subjectName"),
    ("THUMBPRINT (SHA-256)", "/info/sha256Thumbprint"),
    ("EXPIRES", "/info/notAfterUtc"),
];

/// Names the certificate: `--certificate-name/--name NAME` as az does, or `NAME` as a
/// positional.
#[derive(Args, Debug, Clone)]
pub struct CertificateNameArg {
    /// The CA certificate's name
    #[arg(
        value_name = "CERTIFICATE_NAME",
        required_unless_present = "certificate_name",
        conflicts_with = "certificate_name"
    )]
    pub positional: Option<String>,
    /// The CA certificate's name
    #[arg(long = "certificate-name", visible_aliases = ["cert-name", "name"])]
    pub certificate_name: Option<String>,
}

impl CertificateNameArg {
    fn name(&self) -> &str {
        self.certificate_name
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct PathArgs {
    #[command(flatten)]
    pub name: CertificateNameArg,
    /// PEM (or .cer, base64 DER) file of the certificate
    #[arg(long, short = 'p', visible_alias = "certificate-path")]
    pub path: PathBuf,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    #[command(flatten)]
    pub name: CertificateNameArg,
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

#[derive(Subcommand, Debug)]
pub enum CertificateCommand {
    /// Upload a CA certificate; it starts unverified.
    ///
    /// Example:
    ///   muster certificate create --name my-root --path root.pem
    #[command(verbatim_doc_comment)]
    Create(PathArgs),
    /// List the CA certificates.
    List(ListArgs),
    /// Show a CA certificate.
    Show(NameArgs),
    /// Delete a CA certificate.
    Delete(NameArgs),
    /// Generate the code to prove possession of the CA's private key with (each call
    /// replaces the previous code).
    ///
    /// Then sign a certificate whose subject CN is the code with the CA's key, e.g.:
    ///   muster certificate generate-verification-code --name my-root --query verificationCode -o tsv
    ///   openssl req -new -key root.key -subj "/CN=$CODE" -out pop.csr
    ///   openssl x509 -req -in pop.csr -CA root.pem -CAkey root.key -CAcreateserial -out pop.pem -days 1
    #[command(verbatim_doc_comment)]
    GenerateVerificationCode(NameArgs),
    /// Verify a CA certificate with a certificate the CA signed whose CN is the verification
    /// code.
    ///
    /// Example:
    ///   muster certificate verify --name my-root --path pop.pem
    #[command(verbatim_doc_comment)]
    Verify(PathArgs),
    /// Certificates Muster issued for devices' CSRs: list, show, revoke.
    #[command(subcommand)]
    Issued(crate::issued_cert::IssuedCommand),
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub async fn run(c: CertificateCommand) -> anyhow::Result<()> {
    match c {
        CertificateCommand::Issued(c) => crate::issued_cert::run(c).await?,
        CertificateCommand::Create(a) => {
            let name = a.name.name();
            let text = read(&a.path)?;
            let (client, _) = a.conn.client()?;
            let v = client
                .put_ca_certificate(name, &text)
                .await
                .with_context(|| format!("uploading CA certificate '{name}'"))?;
            print_object(&a.out, &v);
        }
        CertificateCommand::List(a) => {
            let (client, _) = a.conn.client()?;
            let items = client
                .list_ca_certificates()
                .await
                .context("listing CA certificates")?;
            print_list(&a.out, &items, COLUMNS);
        }
        CertificateCommand::Show(a) => {
            let name = a.name.name();
            let (client, _) = a.conn.client()?;
            let v = client
                .get_ca_certificate(name)
                .await
                .with_context(|| format!("reading CA certificate '{name}'"))?;
            print_object(&a.out, &v);
        }
        CertificateCommand::Delete(a) => {
            let name = a.name.name();
            let (client, _) = a.conn.client()?;
            client
                .delete_ca_certificate(name)
                .await
                .with_context(|| format!("deleting CA certificate '{name}'"))?;
            eprintln!("deleted CA certificate '{name}'");
        }
        CertificateCommand::GenerateVerificationCode(a) => {
            let name = a.name.name();
            let (client, _) = a.conn.client()?;
            let v = client
                .ca_verification_code(name)
                .await
                .with_context(|| format!("generating a verification code for '{name}'"))?;
            print_object(&a.out, &v);
        }
        CertificateCommand::Verify(a) => {
            let name = a.name.name();
            let text = read(&a.path)?;
            let (client, _) = a.conn.client()?;
            let v = client
                .verify_ca_certificate(name, &text)
                .await
                .with_context(|| format!("verifying CA certificate '{name}'"))?;
            print_object(&a.out, &v);
        }
    }
    Ok(())
}
