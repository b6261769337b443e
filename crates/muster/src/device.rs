//! `muster device register` and `muster compute-device-key`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use muster_client::{DeviceKey, RegisterOptions, Transport};
use serde_json::{json, Value};

use crate::conn::DeviceConn;
use crate::output::{print_object, Format, OutputArgs};

#[derive(Args, Debug)]
pub struct ComputeKeyArgs {
    /// The enrollment group's key (base64)
    #[arg(long, visible_aliases = ["symmetric-key", "group-key"])]
    pub key: String,
    /// The device's registration id
    #[arg(long, visible_alias = "rid")]
    pub registration_id: String,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn compute_device_key(a: ComputeKeyArgs) -> anyhow::Result<()> {
    let key = DeviceKey::Group(a.key).device_key(&a.registration_id)?;
    print_device_key(&a.out, &a.registration_id, &key);
    Ok(())
}

/// A derived key: bare in a table (for `$(...)`), else `{registrationId, derivedKey}` in the
/// format asked for (`--query derivedKey -o tsv` is the bare key too).
pub fn print_device_key(out: &OutputArgs, registration_id: &str, key: &str) {
    if out.format() == Format::Table && out.query.is_none() {
        crate::output::emit(key);
    } else {
        print_object(
            out,
            &json!({"registrationId": registration_id, "derivedKey": key}),
        );
    }
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("credential").required(true).args(["key", "group_key", "cert", "tpm"])))]
pub struct RegisterArgs {
    /// The device's registration id [with --cert, default: the certificate's subject CN;
    /// with --tpm, the id derived from the EK (`muster tpm show-ek`)]
    #[arg(long, visible_alias = "rid")]
    pub registration_id: Option<String>,
    /// The device's symmetric key (individual enrollment, or an already derived key)
    #[arg(long, env = "MUSTER_DEVICE_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// The enrollment group's key; the device key is derived from it
    #[arg(long, env = "MUSTER_GROUP_KEY", hide_env_values = true)]
    pub group_key: Option<String>,
    /// X.509: PEM file with the device certificate first, then any intermediates to send
    #[arg(long, requires = "cert_key")]
    pub cert: Option<PathBuf>,
    /// X.509: PEM file with the certificate's private key (PKCS#8, EC or RSA)
    #[arg(long, requires = "cert")]
    pub cert_key: Option<PathBuf>,
    /// TPM: attest with the TPM's endorsement key (HTTPS); the hub key it gets is kept in
    /// the TPM at 0x81000100
    #[arg(long, conflicts_with_all = ["key", "group_key", "cert", "csr_key"])]
    pub tpm: bool,
    #[command(flatten)]
    pub tcti: crate::tpm::TctiArgs,
    /// https or mqtt
    #[arg(long, default_value = "https")]
    pub transport: Transport,
    /// JSON payload for a custom allocation webhook
    #[arg(long)]
    pub payload: Option<String>,
    /// Ask for a certificate: PEM (PKCS #8) private key the CSR is made with (CN = the
    /// registration id; EC P-256/P-384, Ed25519 or RSA ≥ 2048); the enrollment must allow
    /// certificate issuance
    #[arg(long)]
    pub csr_key: Option<PathBuf>,
    /// With --csr-key: where to write the issued certificate chain (PEM, leaf first)
    #[arg(long, requires = "csr_key")]
    pub cert_out: Option<PathBuf>,
    /// Register attempts when throttled or unavailable
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    #[command(flatten)]
    pub conn: DeviceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a device and print its assignment.
    ///
    /// With --key or --group-key the device signs a SAS token; with --cert/--cert-key it
    /// presents its X.509 certificate in the TLS handshake (HTTPS and MQTT), and the
    /// registration id is the certificate's subject CN; with --tpm its TPM answers the
    /// service's challenge and signs the token (HTTPS; needs a muster built with the `tpm`
    /// feature).
    ///
    /// Examples:
    ///   muster device register --registration-id dev-001 --group-key "$GROUP_KEY"
    ///   muster device register --cert dev-003-chain.pem --cert-key dev-003.key --transport mqtt
    ///   muster device register --tpm --tcti device:/dev/tpmrm0
    ///   muster device register --registration-id dev-004 --group-key "$GROUP_KEY" \
    ///       --csr-key dev-004.key --cert-out dev-004-chain.pem
    ///   muster device register --id-scope 0ne0012AB34 --endpoint dps.example.lan --ca-cert ca.pem \
    ///       --registration-id dev-002 --key "$DEVICE_KEY" --transport mqtt --payload '{"model":"x1"}'
    #[command(verbatim_doc_comment)]
    Register(RegisterArgs),
}

pub async fn run(c: DeviceCommand) -> anyhow::Result<()> {
    match c {
        DeviceCommand::Register(a) => register(a).await,
    }
}

async fn register(a: RegisterArgs) -> anyhow::Result<()> {
    if a.tpm {
        let client = a
            .conn
            .client()?
            .with_retry_policy(muster_client::RetryPolicy {
                max_attempts: a.retries.max(1),
                ..Default::default()
            });
        let payload = match &a.payload {
            Some(p) => {
                Some(serde_json::from_str::<Value>(p).context("--payload is not valid JSON")?)
            }
            None => None,
        };
        let options = RegisterOptions {
            transport: a.transport,
            payload,
            csr: None,
        };
        let (rid, r) =
            crate::tpm::register(&client, a.registration_id.clone(), &a.tcti.tcti, &options)
                .await?;
        return report(&a, &rid, &r);
    }
    let key = match (&a.cert, &a.cert_key, &a.key, &a.group_key) {
        (Some(cert), Some(cert_key), _, _) => DeviceKey::x509_from_files(cert, cert_key)?,
        (Some(_), None, _, _) | (None, Some(_), _, _) => {
            bail!("--cert and --cert-key go together")
        }
        (None, None, Some(k), _) => DeviceKey::Symmetric(k.clone()),
        (None, None, None, Some(g)) => DeviceKey::Group(g.clone()),
        (None, None, None, None) => bail!("pass --key, --group-key, or --cert and --cert-key"),
    };
    let registration_id = match (&a.registration_id, &key) {
        (Some(r), _) => r.clone(),
        (None, DeviceKey::X509 { .. }) => key
            .common_name()
            .context("reading --cert")?
            .context("the certificate has no subject CN; pass --registration-id")?,
        (None, _) => bail!("pass --registration-id"),
    };
    let payload = match &a.payload {
        Some(p) => Some(serde_json::from_str::<Value>(p).context("--payload is not valid JSON")?),
        None => None,
    };
    let csr = match &a.csr_key {
        Some(path) => Some(make_csr(path, &registration_id)?),
        None => None,
    };
    let client = a
        .conn
        .client()?
        .with_retry_policy(muster_client::RetryPolicy {
            max_attempts: a.retries.max(1),
            ..Default::default()
        });
    let r = client
        .register(
            &registration_id,
            &key,
            &RegisterOptions {
                transport: a.transport,
                payload,
                csr,
            },
        )
        .await
        .with_context(|| format!("registering '{registration_id}'"))?;
    report(&a, &registration_id, &r)
}

/// Prints the outcome (and writes an issued chain); an error unless assigned.
fn report(
    a: &RegisterArgs,
    registration_id: &str,
    r: &muster_client::Registration,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(&r.state)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("operationId".into(), json!(r.operation_id));
    }
    print_object(&a.out, &v);
    if let (Some(out), Some(chain)) = (&a.cert_out, &r.state.issued_certificate_chain) {
        write_chain(out, chain)?;
    }
    if !r.is_assigned() {
        bail!(
            "registration of '{}' ended {}{}",
            registration_id,
            r.status,
            r.state
                .error_message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// A base64 DER PKCS #10 request for `registration_id` signed with the PEM key at `path`.
fn make_csr(path: &std::path::Path, registration_id: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading --csr-key {}", path.display()))?;
    let key = rcgen::KeyPair::from_pem(&pem)
        .with_context(|| format!("{} is not a PKCS #8 PEM private key", path.display()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, registration_id);
    let csr = params
        .serialize_request(&key)
        .context("making the certificate signing request")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(csr.der()))
}

/// Writes an issued chain (base64 DER, leaf first) as PEM.
fn write_chain(path: &std::path::Path, chain: &[String]) -> anyhow::Result<()> {
    use base64::Engine as _;
    let mut pem = String::new();
    for c in chain {
        let der = base64::engine::general_purpose::STANDARD
            .decode(c)
            .context("the issued chain is not base64")?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
}
