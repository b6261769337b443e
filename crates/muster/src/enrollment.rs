//! `muster enrollment …` and `muster enrollment-group …`, with the options of
//! `az iot dps enrollment[-group]`.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use muster_client::{EnrollmentKind, ServiceClient};
use muster_proto::{
    AllocationPolicy, AttestationType, BulkOperationMode, EnrollmentGroup, IndividualEnrollment,
    ProvisioningStatus,
};
use serde_json::{json, Map, Value};

use crate::conn::ServiceConn;
use crate::output::{print_list, print_object, redact, Format, OutputArgs};

/// `--reprovision-policy`, as `az iot dps` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reprovision {
    /// Move to the newly chosen hub, keeping the twin
    #[value(name = "reprovisionandmigratedata")]
    MigrateData,
    /// Move to the newly chosen hub, resetting the twin to the initial twin
    #[value(name = "reprovisionandresetdata")]
    ResetData,
    /// Stay on the current hub
    #[value(name = "never")]
    Never,
}

impl Reprovision {
    fn json(self) -> Value {
        let (update, migrate) = match self {
            Reprovision::MigrateData => (true, true),
            Reprovision::ResetData => (true, false),
            Reprovision::Never => (false, false),
        };
        json!({"updateHubAssignment": update, "migrateDeviceData": migrate})
    }
}

/// Settings shared by individual enrollments and groups.
#[derive(Args, Debug, Clone, Default)]
pub struct Settings {
    /// Attestation: symmetricKey, x509 or tpm [create default: symmetricKey]
    #[arg(long, visible_alias = "at")]
    pub attestation_type: Option<AttestationType>,
    /// Primary symmetric key (base64, 16-64 bytes) [default: generated]
    #[arg(long, visible_alias = "pk")]
    pub primary_key: Option<String>,
    /// Secondary symmetric key [default: generated]
    #[arg(long, visible_alias = "sk")]
    pub secondary_key: Option<String>,
    /// X.509: primary certificate PEM file (individual: the device's; group: the signing CA)
    #[arg(long, visible_alias = "cp")]
    pub certificate_path: Option<PathBuf>,
    /// X.509: secondary certificate PEM file
    #[arg(long, visible_alias = "scp")]
    pub secondary_certificate_path: Option<PathBuf>,
    /// IoT hubs devices may be assigned to (host names, comma-separated or repeated)
    #[arg(long, visible_alias = "ih", value_delimiter = ',', num_args = 1..)]
    pub iot_hubs: Option<Vec<String>>,
    /// hashed, geoLatency, static or custom
    #[arg(long, visible_alias = "ap")]
    pub allocation_policy: Option<AllocationPolicy>,
    /// Custom allocation webhook URL (implies --allocation-policy custom)
    #[arg(long, visible_alias = "wh")]
    pub webhook_url: Option<String>,
    /// api-version sent to the webhook
    #[arg(long, default_value = "2021-10-01", requires = "webhook_url")]
    pub api_version: String,
    /// Initial twin tags, a JSON object, e.g. '{"site":"lyon"}'
    #[arg(long, visible_alias = "tags")]
    pub initial_twin_tags: Option<String>,
    /// Initial twin desired properties, a JSON object, e.g. '{"interval":30}'
    #[arg(long, visible_alias = "props")]
    pub initial_twin_properties: Option<String>,
    /// enabled or disabled
    #[arg(long, visible_alias = "ps")]
    pub provisioning_status: Option<ProvisioningStatus>,
    /// What re-registering devices do
    #[arg(long, visible_alias = "rp", value_enum)]
    pub reprovision_policy: Option<Reprovision>,
    /// Whether devices are IoT Edge devices
    #[arg(long, visible_alias = "ee")]
    pub edge_enabled: Option<bool>,
    /// Whether devices may send a CSR and get a certificate (Muster's certificateIssuance)
    #[arg(long)]
    pub issue_certificates: Option<bool>,
    /// Days an issued certificate is valid (1-397) [default: 30]
    #[arg(long, requires = "issue_certificates")]
    pub certificate_validity_days: Option<u32>,
    /// Key types a CSR may carry: rsa, ecP256, ecP384, ed25519 (comma-separated) [default: all]
    #[arg(long, value_delimiter = ',', num_args = 1.., requires = "issue_certificates")]
    pub certificate_key_types: Option<Vec<String>>,
    /// Issuing CA that signs: local, or an operator CA's name (muster serve --issuing-ca)
    /// [default: local]
    #[arg(long, requires = "issue_certificates")]
    pub issuing_ca: Option<String>,
    /// Show the symmetric keys in the answer
    #[arg(long)]
    pub show_keys: bool,
}

fn parse_object(flag: &str, text: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(text).with_context(|| {
        format!("{flag} is not valid JSON (expected an object like '{{\"a\":1}}')")
    })?;
    if !v.is_object() {
        bail!("{flag} must be a JSON object, like '{{\"a\":1}}'");
    }
    Ok(v)
}

fn read_cert(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading certificate {}", path.display()))
}

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

/// What differs between the two kinds in the CLI.
trait CliKind: EnrollmentKind {
    const NOUN: &'static str;
    const ID_FIELD: &'static str;
    const INDIVIDUAL: bool;
    const COLUMNS: &'static [(&'static str, &'static str)];
}

impl CliKind for IndividualEnrollment {
    const NOUN: &'static str = "enrollment";
    const ID_FIELD: &'static str = "registrationId";
    const INDIVIDUAL: bool = true;
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("REGISTRATION ID", "/registrationId"),
        ("DEVICE ID", "/deviceId"),
        ("ATTESTATION", "/attestation/type"),
        ("STATUS", "/provisioningStatus"),
        ("ALLOCATION", "/allocationPolicy"),
        ("IOT HUBS", "/iotHubs"),
        ("LAST UPDATED", "/lastUpdatedDateTimeUtc"),
    ];
}

impl CliKind for EnrollmentGroup {
    const NOUN: &'static str = "enrollment group";
    const ID_FIELD: &'static str = "enrollmentGroupId";
    const INDIVIDUAL: bool = false;
    const COLUMNS: &'static [(&'static str, &'static str)] = &[
        ("GROUP ID", "/enrollmentGroupId"),
        ("ATTESTATION", "/attestation/type"),
        ("STATUS", "/provisioningStatus"),
        ("ALLOCATION", "/allocationPolicy"),
        ("IOT HUBS", "/iotHubs"),
        ("LAST UPDATED", "/lastUpdatedDateTimeUtc"),
    ];
}

/// Kind-specific options, as JSON edits.
#[derive(Default)]
struct Extra {
    device_id: Option<String>,
    endorsement_key: Option<String>,
    root_ca_name: Option<String>,
    secondary_root_ca_name: Option<String>,
}

/// Applies the options to an enrollment body (new: `{}` plus the id; update: the current one).
fn apply<K: CliKind>(
    body: &mut Value,
    s: &Settings,
    x: &Extra,
    creating: bool,
) -> anyhow::Result<()> {
    let m = obj(body);
    // Attestation.
    let current_type = m
        .get("attestation")
        .and_then(|a| a.get("type"))
        .and_then(Value::as_str)
        .and_then(|t| AttestationType::parse(t).ok());
    let touches_attestation = s.attestation_type.is_some()
        || s.primary_key.is_some()
        || s.secondary_key.is_some()
        || s.certificate_path.is_some()
        || s.secondary_certificate_path.is_some()
        || x.endorsement_key.is_some()
        || x.root_ca_name.is_some()
        || x.secondary_root_ca_name.is_some();
    if creating || touches_attestation {
        let kind = s.attestation_type.or(current_type).unwrap_or_else(|| {
            if s.certificate_path.is_some() || x.root_ca_name.is_some() {
                AttestationType::X509
            } else if x.endorsement_key.is_some() {
                AttestationType::Tpm
            } else {
                AttestationType::SymmetricKey
            }
        });
        let same_kind = current_type == Some(kind);
        let mut att = if same_kind {
            m.get("attestation").cloned().unwrap_or(Value::Null)
        } else {
            json!({})
        };
        let a = obj(&mut att);
        a.insert("type".into(), json!(kind.as_str()));
        match kind {
            AttestationType::SymmetricKey => {
                let sk = obj(a.entry("symmetricKey").or_insert(json!({})));
                if let Some(k) = &s.primary_key {
                    sk.insert("primaryKey".into(), json!(k));
                }
                if let Some(k) = &s.secondary_key {
                    sk.insert("secondaryKey".into(), json!(k));
                }
            }
            AttestationType::X509 => {
                let x509 = obj(a.entry("x509").or_insert(json!({})));
                let certs_field = if K::INDIVIDUAL {
                    "clientCertificates"
                } else {
                    "signingCertificates"
                };
                if s.certificate_path.is_some() || s.secondary_certificate_path.is_some() {
                    x509.remove("caReferences");
                    let certs = obj(x509.entry(certs_field).or_insert(json!({})));
                    if let Some(p) = &s.certificate_path {
                        certs.insert("primary".into(), json!({"certificate": read_cert(p)?}));
                    }
                    if let Some(p) = &s.secondary_certificate_path {
                        certs.insert("secondary".into(), json!({"certificate": read_cert(p)?}));
                    }
                }
                if x.root_ca_name.is_some() || x.secondary_root_ca_name.is_some() {
                    x509.remove(certs_field);
                    let refs = obj(x509.entry("caReferences").or_insert(json!({})));
                    if let Some(n) = &x.root_ca_name {
                        refs.insert("primary".into(), json!(n));
                    }
                    if let Some(n) = &x.secondary_root_ca_name {
                        refs.insert("secondary".into(), json!(n));
                    }
                }
                if x509.is_empty() {
                    bail!(
                        "x509 attestation needs --certificate-path{}",
                        if K::INDIVIDUAL {
                            ""
                        } else {
                            " or --root-ca-name"
                        }
                    );
                }
            }
            AttestationType::Tpm => {
                if !K::INDIVIDUAL {
                    bail!("enrollment groups cannot use TPM attestation");
                }
                let tpm = obj(a.entry("tpm").or_insert(json!({})));
                if let Some(ek) = &x.endorsement_key {
                    tpm.insert("endorsementKey".into(), json!(ek));
                }
                if !tpm.contains_key("endorsementKey") {
                    bail!("tpm attestation needs --endorsement-key");
                }
            }
            AttestationType::None => bail!("attestation type 'none' cannot be enrolled"),
        }
        m.insert("attestation".into(), att);
    }
    if let Some(d) = &x.device_id {
        m.insert("deviceId".into(), json!(d));
    }
    if let Some(h) = &s.iot_hubs {
        let hubs: Vec<&str> = h
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        m.insert("iotHubs".into(), json!(hubs));
    }
    if let Some(url) = &s.webhook_url {
        m.insert(
            "customAllocationDefinition".into(),
            json!({"webhookUrl": url, "apiVersion": s.api_version}),
        );
        if s.allocation_policy.is_none() {
            m.insert("allocationPolicy".into(), json!("custom"));
        }
    }
    if let Some(p) = s.allocation_policy {
        m.insert("allocationPolicy".into(), json!(p.as_str()));
    }
    if s.initial_twin_tags.is_some() || s.initial_twin_properties.is_some() {
        let twin = obj(m.entry("initialTwin").or_insert(json!({})));
        if let Some(t) = &s.initial_twin_tags {
            twin.insert("tags".into(), parse_object("--initial-twin-tags", t)?);
        }
        if let Some(p) = &s.initial_twin_properties {
            twin.insert(
                "properties".into(),
                json!({"desired": parse_object("--initial-twin-properties", p)?}),
            );
        }
    }
    if let Some(p) = s.provisioning_status {
        m.insert("provisioningStatus".into(), json!(p.as_str()));
    }
    if let Some(r) = s.reprovision_policy {
        m.insert("reprovisionPolicy".into(), r.json());
    }
    if let Some(e) = s.edge_enabled {
        m.insert("capabilities".into(), json!({"iotEdge": e}));
    }
    if let Some(enabled) = s.issue_certificates {
        let mut issuance = json!({"enabled": enabled});
        if let Some(d) = s.certificate_validity_days {
            issuance["validityDays"] = json!(d);
        }
        if let Some(k) = &s.certificate_key_types {
            for t in k {
                muster_proto::CsrKeyType::parse(t.trim())
                    .map_err(|e| anyhow::anyhow!("--certificate-key-types: {e}"))?;
            }
            issuance["keyTypes"] = json!(k.iter().map(|t| t.trim()).collect::<Vec<_>>());
        }
        if let Some(ca) = &s.issuing_ca {
            issuance["issuingCa"] = json!(ca);
        }
        m.insert("certificateIssuance".into(), issuance);
    }
    Ok(())
}

fn to_kind<K: CliKind>(v: Value) -> anyhow::Result<K> {
    serde_json::from_value(v).with_context(|| format!("building the {}", K::NOUN))
}

fn shown<K: CliKind>(item: &K, show_keys: bool) -> anyhow::Result<Value> {
    let mut v = serde_json::to_value(item)?;
    if !show_keys {
        redact(&mut v);
    }
    Ok(v)
}

async fn create<K: CliKind>(
    conn: &ServiceConn,
    id: &str,
    s: &Settings,
    x: &Extra,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let mut body = json!({ K::ID_FIELD: id });
    apply::<K>(&mut body, s, x, true)?;
    let item: K = to_kind(body)?;
    let created = client
        .create_or_update(&item, None)
        .await
        .with_context(|| format!("creating {} '{id}'", K::NOUN))?;
    print_object(out, &shown(&created, s.show_keys)?);
    Ok(())
}

async fn update<K: CliKind>(
    conn: &ServiceConn,
    id: &str,
    s: &Settings,
    x: &Extra,
    etag: Option<&str>,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let current: K = client
        .get(id)
        .await
        .with_context(|| format!("reading {} '{id}'", K::NOUN))?;
    let if_match = etag
        .map(str::to_string)
        .or_else(|| current.etag().map(str::to_string))
        .unwrap_or_else(|| "*".into());
    let mut body = serde_json::to_value(&current)?;
    if let Some(m) = body.as_object_mut() {
        m.remove("registrationState");
    }
    apply::<K>(&mut body, s, x, false)?;
    let item: K = to_kind(body)?;
    let updated = client
        .create_or_update(&item, Some(&if_match))
        .await
        .with_context(|| format!("updating {} '{id}'", K::NOUN))?;
    print_object(out, &shown(&updated, s.show_keys)?);
    Ok(())
}

async fn show<K: CliKind>(
    conn: &ServiceConn,
    id: &str,
    show_keys: bool,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let item: K = client
        .get(id)
        .await
        .with_context(|| format!("reading {} '{id}'", K::NOUN))?;
    let mut v = serde_json::to_value(&item)?;
    if show_keys {
        let att = client
            .attestation_mechanism::<K>(id)
            .await
            .with_context(|| format!("reading the keys of {} '{id}'", K::NOUN))?;
        v["attestation"] = serde_json::to_value(att)?;
    } else {
        redact(&mut v);
    }
    print_object(out, &v);
    Ok(())
}

async fn list<K: CliKind>(
    conn: &ServiceConn,
    top: Option<usize>,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let mut pager = client.query::<K>(Some(1000));
    let mut items = Vec::new();
    while let Some(page) = pager.next_page().await.context("listing")? {
        for it in page {
            let mut v = serde_json::to_value(&it)?;
            redact(&mut v);
            items.push(v);
        }
        if top.is_some_and(|t| items.len() >= t) {
            break;
        }
    }
    if let Some(t) = top {
        items.truncate(t);
    }
    print_list(out, &items, K::COLUMNS);
    Ok(())
}

async fn delete<K: CliKind>(
    conn: &ServiceConn,
    id: &str,
    etag: Option<&str>,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    client
        .delete::<K>(id, etag)
        .await
        .with_context(|| format!("deleting {} '{id}'", K::NOUN))?;
    eprintln!("deleted {} '{id}'", K::NOUN);
    Ok(())
}

/// Fields the service computes; left out of exports.
const READ_ONLY: &[&str] = &[
    "registrationState",
    "etag",
    "createdDateTimeUtc",
    "lastUpdatedDateTimeUtc",
];

async fn export<K: CliKind>(
    conn: &ServiceConn,
    file: Option<&Path>,
    show_keys: bool,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let sink: Box<dyn Write> = match file {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    let mut pager = client.query::<K>(Some(1000));
    let mut n = 0usize;
    while let Some(page) = pager.next_page().await.context("exporting")? {
        for it in page {
            let mut v = serde_json::to_value(&it)?;
            if let Some(m) = v.as_object_mut() {
                for f in READ_ONLY {
                    m.remove(*f);
                }
            }
            let symmetric = v
                .pointer("/attestation/type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.eq_ignore_ascii_case("symmetricKey"));
            if show_keys && symmetric {
                let att = client.attestation_mechanism::<K>(it.id()).await?;
                v["attestation"] = serde_json::to_value(att)?;
            } else {
                redact(&mut v);
            }
            serde_json::to_writer(&mut w, &v)?;
            w.write_all(b"\n")?;
            n += 1;
        }
    }
    w.flush()?;
    eprintln!(
        "exported {n} {}{}",
        if n == 1 {
            K::NOUN.to_string()
        } else {
            format!("{}s", K::NOUN)
        },
        if show_keys {
            ""
        } else {
            " (without keys: pass --show-keys to include them)"
        }
    );
    Ok(())
}

async fn import<K: CliKind>(
    conn: &ServiceConn,
    file: &Path,
    mode: BulkOperationMode,
    chunk: usize,
    out: &OutputArgs,
) -> anyhow::Result<()> {
    let (client, _) = conn.client()?;
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let chunk = chunk.clamp(1, 10_000);
    let mut batch: Vec<K> = Vec::with_capacity(chunk);
    let (mut total, mut failed) = (0usize, Vec::new());
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item: K = serde_json::from_str(&line).with_context(|| {
            format!("{} line {}: not a valid {}", file.display(), i + 1, K::NOUN)
        })?;
        batch.push(item);
        if batch.len() == chunk {
            total += batch.len();
            failed.extend(send_bulk(&client, mode, &batch).await?);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        total += batch.len();
        failed.extend(send_bulk(&client, mode, &batch).await?);
    }
    let ok = total - failed.len();
    match out.format() {
        Format::Table if out.query.is_none() => {
            crate::output::emit(&format!(
                "{ok} of {total} {}s imported ({})",
                K::NOUN,
                mode.as_str()
            ));
            if !failed.is_empty() {
                print_list(
                    out,
                    &failed,
                    &[
                        ("ID", "/id"),
                        ("ERROR CODE", "/errorCode"),
                        ("ERROR", "/errorStatus"),
                    ],
                );
            }
        }
        _ => print_object(
            out,
            &json!({"total": total, "succeeded": ok, "errors": failed}),
        ),
    }
    if !failed.is_empty() {
        bail!("{} of {total} items failed", failed.len());
    }
    Ok(())
}

async fn send_bulk<K: CliKind>(
    client: &ServiceClient,
    mode: BulkOperationMode,
    batch: &[K],
) -> anyhow::Result<Vec<Value>> {
    let r = client.bulk(mode, batch).await.context("bulk operation")?;
    Ok(r.errors
        .into_iter()
        .map(|e| {
            json!({
                "id": e.registration_id.or(e.enrollment_group_id),
                "errorCode": e.error_code,
                "errorStatus": e.error_status,
            })
        })
        .collect())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportMode {
    /// Fail items whose id exists
    Create,
    /// Create or replace
    Update,
    /// Replace only when the item's etag matches
    UpdateIfMatchEtag,
    /// Delete the listed items
    Delete,
}

impl From<ImportMode> for BulkOperationMode {
    fn from(m: ImportMode) -> Self {
        match m {
            ImportMode::Create => BulkOperationMode::Create,
            ImportMode::Update => BulkOperationMode::Update,
            ImportMode::UpdateIfMatchEtag => BulkOperationMode::UpdateIfMatchETag,
            ImportMode::Delete => BulkOperationMode::Delete,
        }
    }
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// NDJSON file: one enrollment (or group) JSON object per line, as `export` writes
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = ImportMode::Create)]
    pub mode: ImportMode,
    /// Items per bulk request (at most 10000)
    #[arg(long, default_value_t = 1000)]
    pub chunk_size: usize,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Write to FILE instead of standard output
    #[arg(long)]
    pub out_file: Option<PathBuf>,
    /// Include symmetric keys (needed to re-import without new keys)
    #[arg(long)]
    pub show_keys: bool,
    #[command(flatten)]
    pub conn: ServiceConn,
}

/// Names the enrollment: `--enrollment-id/--eid ID` as az does, or `ID` as a positional.
#[derive(Args, Debug, Clone)]
pub struct EnrollmentIdArg {
    /// The enrollment id (the device's registration id)
    #[arg(
        value_name = "ENROLLMENT_ID",
        required_unless_present = "enrollment_id",
        conflicts_with = "enrollment_id"
    )]
    pub positional: Option<String>,
    /// The enrollment id (the device's registration id)
    #[arg(
        long = "enrollment-id",
        visible_alias = "eid",
        alias = "registration-id"
    )]
    pub enrollment_id: Option<String>,
}

/// Names the group: `--group-id/--gid ID` (or az's `--enrollment-id/--eid`), or `ID` as a
/// positional.
#[derive(Args, Debug, Clone)]
pub struct GroupIdArg {
    /// The enrollment group id
    #[arg(
        value_name = "GROUP_ID",
        required_unless_present = "group_id",
        conflicts_with = "group_id"
    )]
    pub positional: Option<String>,
    /// The enrollment group id
    #[arg(long = "group-id", visible_aliases = ["gid", "enrollment-id", "eid"])]
    pub group_id: Option<String>,
}

/// The id an [`EnrollmentIdArg`] or [`GroupIdArg`] names (clap makes one of the two forms
/// required).
pub trait IdArg: Args {
    fn id(&self) -> &str;
}

impl IdArg for EnrollmentIdArg {
    fn id(&self) -> &str {
        self.enrollment_id
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

impl IdArg for GroupIdArg {
    fn id(&self) -> &str {
        self.group_id
            .as_deref()
            .or(self.positional.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct ShowArgs<I: IdArg> {
    #[command(flatten)]
    pub id: I,
    /// Include the symmetric keys
    #[arg(long, visible_alias = "keys")]
    pub show_keys: bool,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// At most N items
    #[arg(long)]
    pub top: Option<usize>,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs<I: IdArg> {
    #[command(flatten)]
    pub id: I,
    /// Delete only if the current etag is this one
    #[arg(long, short = 'e')]
    pub etag: Option<String>,
    #[command(flatten)]
    pub conn: ServiceConn,
}

#[derive(Args, Debug)]
pub struct IndividualWrite {
    #[command(flatten)]
    pub id: EnrollmentIdArg,
    /// Device id in the hub [default: the registration id]
    #[arg(long, visible_alias = "did")]
    pub device_id: Option<String>,
    /// TPM endorsement key (base64)
    #[arg(long, visible_alias = "ek")]
    pub endorsement_key: Option<String>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct IndividualUpdate {
    #[command(flatten)]
    pub write: IndividualWrite,
    /// Update only if the current etag is this one [default: the etag just read]
    #[arg(long, short = 'e')]
    pub etag: Option<String>,
}

#[derive(Args, Debug)]
pub struct GroupWrite {
    #[command(flatten)]
    pub id: GroupIdArg,
    /// X.509: name of a verified CA certificate registered with the service (CA reference)
    #[arg(long, visible_aliases = ["ca-name", "cn"])]
    pub root_ca_name: Option<String>,
    /// X.509: secondary CA reference
    #[arg(long, visible_aliases = ["secondary-ca-name", "scn"])]
    pub secondary_root_ca_name: Option<String>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct GroupUpdate {
    #[command(flatten)]
    pub write: GroupWrite,
    /// Update only if the current etag is this one [default: the etag just read]
    #[arg(long, short = 'e')]
    pub etag: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum IndividualCommand {
    /// Create an individual enrollment.
    ///
    /// Examples:
    ///   muster enrollment create --enrollment-id dev-001
    ///   muster enrollment create --enrollment-id dev-002 --primary-key "$K1" --secondary-key "$K2" \
    ///       --initial-twin-tags '{"site":"lyon"}' --initial-twin-properties '{"interval":30}'
    ///   muster enrollment create --enrollment-id dev-003 --attestation-type x509 --certificate-path dev-003.pem
    ///   muster enrollment create --enrollment-id dev-004 --iot-hubs hub1.example,hub2.example \
    ///       --allocation-policy hashed --reprovision-policy never --edge-enabled true
    #[command(verbatim_doc_comment)]
    Create(IndividualWrite),
    /// Show an individual enrollment (keys only with --show-keys).
    ///
    /// Example:
    ///   muster enrollment show dev-001 --show-keys --output json
    #[command(verbatim_doc_comment)]
    Show(ShowArgs<EnrollmentIdArg>),
    /// List individual enrollments.
    ///
    /// Example:
    ///   muster enrollment list --top 50
    #[command(verbatim_doc_comment)]
    List(ListArgs),
    /// Change an individual enrollment; options not given keep their value.
    ///
    /// Example:
    ///   muster enrollment update --enrollment-id dev-001 --provisioning-status disabled
    #[command(verbatim_doc_comment)]
    Update(IndividualUpdate),
    /// Delete an individual enrollment (and its registration record).
    ///
    /// Example:
    ///   muster enrollment delete dev-001
    #[command(verbatim_doc_comment)]
    Delete(DeleteArgs<EnrollmentIdArg>),
    /// Write every individual enrollment as NDJSON (one JSON object per line).
    ///
    /// Example:
    ///   muster enrollment export --show-keys --out-file enrollments.ndjson
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
    /// Create (or update, delete) individual enrollments from NDJSON through the bulk API.
    ///
    /// Example:
    ///   muster enrollment import enrollments.ndjson --mode update
    #[command(verbatim_doc_comment)]
    Import(ImportArgs),
    /// The enrollment's registration record (like `az iot dps enrollment registration`).
    #[command(subcommand)]
    Registration(crate::registration::RegistrationCommand),
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create an enrollment group.
    ///
    /// Examples:
    ///   muster enrollment-group create --group-id line-1
    ///   muster enrollment-group create --group-id line-2 --primary-key "$K" \
    ///       --initial-twin-tags '{"line":2}' --reprovision-policy reprovisionandresetdata
    ///   muster enrollment-group create --group-id cam --attestation-type x509 --certificate-path signer.pem
    ///   muster enrollment-group create --group-id ca --attestation-type x509 --root-ca-name my-root
    ///   muster enrollment-group create --group-id hooked --webhook-url https://alloc.example/api
    #[command(verbatim_doc_comment)]
    Create(GroupWrite),
    /// Show an enrollment group (keys only with --show-keys).
    ///
    /// Example:
    ///   muster enrollment-group show line-1 --show-keys
    #[command(verbatim_doc_comment)]
    Show(ShowArgs<GroupIdArg>),
    /// List enrollment groups.
    List(ListArgs),
    /// Change an enrollment group; options not given keep their value.
    ///
    /// Example:
    ///   muster enrollment-group update --group-id line-1 --iot-hubs hub1.example --allocation-policy static
    #[command(verbatim_doc_comment)]
    Update(GroupUpdate),
    /// Delete an enrollment group (its devices' registration records stay).
    Delete(DeleteArgs<GroupIdArg>),
    /// Write every enrollment group as NDJSON.
    Export(ExportArgs),
    /// Create (or update, delete) enrollment groups from NDJSON through the bulk API.
    Import(ImportArgs),
    /// Compute a device's key from the group's primary key: read through the service API
    /// (--group-id), or given offline (--key).
    ///
    /// Examples:
    ///   muster enrollment-group compute-device-key --gid line-1 --rid dev-001
    ///   muster enrollment-group compute-device-key --key "$GROUP_KEY" --rid dev-001
    #[command(verbatim_doc_comment)]
    ComputeDeviceKey(GroupComputeKeyArgs),
    /// The registration records of the group's devices (like `az iot dps enrollment-group
    /// registration`).
    #[command(subcommand)]
    Registration(crate::registration::RegistrationCommand),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["group_id", "key"])))]
pub struct GroupComputeKeyArgs {
    /// The enrollment group whose primary key to read (symmetric-key groups)
    #[arg(long = "group-id", visible_aliases = ["gid", "enrollment-id", "eid"])]
    pub group_id: Option<String>,
    /// The group key itself (base64), computed offline
    #[arg(long, visible_aliases = ["symmetric-key", "group-key"], hide_env_values = true)]
    pub key: Option<String>,
    /// The device's registration id
    #[arg(long, visible_alias = "rid")]
    pub registration_id: String,
    #[command(flatten)]
    pub conn: ServiceConn,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `enrollment-group compute-device-key`: the group key from `--key`, or from the service's
/// attestation mechanism of `--group-id`.
async fn group_compute_device_key(a: GroupComputeKeyArgs) -> anyhow::Result<()> {
    let group_key = match (&a.key, &a.group_id) {
        (Some(k), _) => k.clone(),
        (None, Some(g)) => {
            let (client, _) = a.conn.client()?;
            let att = client
                .attestation_mechanism::<EnrollmentGroup>(g)
                .await
                .with_context(|| format!("reading the keys of enrollment group '{g}'"))?;
            match att.symmetric_key.and_then(|k| k.primary_key) {
                Some(k) => k,
                None => bail!(
                    "enrollment group '{g}' does not use symmetric keys (its attestation is {}): \
                     only symmetric-key groups derive device keys",
                    att.kind.as_str()
                ),
            }
        }
        (None, None) => bail!("pass --group-id or --key"),
    };
    let key = muster_client::DeviceKey::Group(group_key).device_key(&a.registration_id)?;
    crate::device::print_device_key(&a.out, &a.registration_id, &key);
    Ok(())
}

pub async fn run_individual(c: IndividualCommand) -> anyhow::Result<()> {
    type K = IndividualEnrollment;
    let extra = |w: &IndividualWrite| Extra {
        device_id: w.device_id.clone(),
        endorsement_key: w.endorsement_key.clone(),
        ..Extra::default()
    };
    match c {
        IndividualCommand::Create(w) => {
            create::<K>(&w.conn, w.id.id(), &w.settings, &extra(&w), &w.out).await
        }
        IndividualCommand::Update(u) => {
            let w = &u.write;
            update::<K>(
                &w.conn,
                w.id.id(),
                &w.settings,
                &extra(w),
                u.etag.as_deref(),
                &w.out,
            )
            .await
        }
        IndividualCommand::Show(a) => show::<K>(&a.conn, a.id.id(), a.show_keys, &a.out).await,
        IndividualCommand::List(a) => list::<K>(&a.conn, a.top, &a.out).await,
        IndividualCommand::Delete(a) => delete::<K>(&a.conn, a.id.id(), a.etag.as_deref()).await,
        IndividualCommand::Export(a) => {
            export::<K>(&a.conn, a.out_file.as_deref(), a.show_keys).await
        }
        IndividualCommand::Import(a) => {
            import::<K>(&a.conn, &a.file, a.mode.into(), a.chunk_size, &a.out).await
        }
        IndividualCommand::Registration(c) => crate::registration::run(c).await,
    }
}

pub async fn run_group(c: GroupCommand) -> anyhow::Result<()> {
    type K = EnrollmentGroup;
    let extra = |w: &GroupWrite| Extra {
        root_ca_name: w.root_ca_name.clone(),
        secondary_root_ca_name: w.secondary_root_ca_name.clone(),
        ..Extra::default()
    };
    match c {
        GroupCommand::Create(w) => {
            create::<K>(&w.conn, w.id.id(), &w.settings, &extra(&w), &w.out).await
        }
        GroupCommand::Update(u) => {
            let w = &u.write;
            update::<K>(
                &w.conn,
                w.id.id(),
                &w.settings,
                &extra(w),
                u.etag.as_deref(),
                &w.out,
            )
            .await
        }
        GroupCommand::Show(a) => show::<K>(&a.conn, a.id.id(), a.show_keys, &a.out).await,
        GroupCommand::List(a) => list::<K>(&a.conn, a.top, &a.out).await,
        GroupCommand::Delete(a) => delete::<K>(&a.conn, a.id.id(), a.etag.as_deref()).await,
        GroupCommand::Export(a) => export::<K>(&a.conn, a.out_file.as_deref(), a.show_keys).await,
        GroupCommand::Import(a) => {
            import::<K>(&a.conn, &a.file, a.mode.into(), a.chunk_size, &a.out).await
        }
        GroupCommand::ComputeDeviceKey(a) => group_compute_device_key(a).await,
        GroupCommand::Registration(c) => crate::registration::run(c).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_build_an_individual_enrollment() {
        let s = Settings {
            iot_hubs: Some(vec!["h1".into(), "h2".into()]),
            allocation_policy: Some(AllocationPolicy::Hashed),
            initial_twin_tags: Some(r#"{"site":"lyon"}"#.into()),
            initial_twin_properties: Some(r#"{"interval":30}"#.into()),
            provisioning_status: Some(ProvisioningStatus::Disabled),
            reprovision_policy: Some(Reprovision::ResetData),
            edge_enabled: Some(true),
            api_version: "2021-10-01".into(),
            ..Settings::default()
        };
        let mut body = json!({"registrationId": "dev-1"});
        apply::<IndividualEnrollment>(&mut body, &s, &Extra::default(), true).unwrap();
        assert_eq!(body["attestation"]["type"], "symmetricKey");
        assert_eq!(body["iotHubs"], json!(["h1", "h2"]));
        assert_eq!(body["initialTwin"]["properties"]["desired"]["interval"], 30);
        assert_eq!(
            body["reprovisionPolicy"],
            json!({"updateHubAssignment": true, "migrateDeviceData": false})
        );
        assert_eq!(body["capabilities"]["iotEdge"], true);
        let e: IndividualEnrollment = to_kind(body).unwrap();
        assert!(!e.is_enabled());
    }

    #[test]
    fn bad_twin_json_is_refused() {
        let s = Settings {
            initial_twin_tags: Some("[1]".into()),
            ..Settings::default()
        };
        let mut body = json!({"enrollmentGroupId": "g"});
        let err = apply::<EnrollmentGroup>(&mut body, &s, &Extra::default(), true).unwrap_err();
        assert!(err.to_string().contains("JSON object"), "{err}");
    }
}
