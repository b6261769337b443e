//! Manage enrollments: enrollment groups and individual enrollments.
//!
//! - `GET /console/enrollments?tab=groups|individual&q=&page=` — list with search (the API's
//!   query, paged with `x-ms-continuation`; a search scans pages and keeps ids containing `q`).
//! - `GET|POST /console/enrollments/new?kind=` — add: symmetric key (generated or given),
//!   X.509 (certificate upload or pasted PEM, or a CA reference), TPM (individual only: the EK
//!   and optional SRK, checked as `TPM2B_PUBLIC` here since the API only checks base64).
//! - `GET /console/enrollments/{kind}/{id}?tab=settings|registrations` — details: keys behind
//!   a reveal, settings form (allocation, linked hubs, initial twin, reprovisioning, status),
//!   the registration records with their assigned hub.
//! - `POST …/{kind}/{id}` saves settings (GET, change, PUT with `If-Match`),
//!   `POST …/status` enables or disables, `POST …/delete` deletes (with cascade: the
//!   registration records, and their devices in the built-in hub).
//!
//! Every change goes through the service API; its refusals are shown next to the field that
//! caused them and the form is re-rendered with what the user typed.

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use muster_store::Collection;

use crate::api::{Failure, Reply};
use crate::csrf::Fields;
use crate::page::{q, redirect, render, render_status, seg, PageCtx};
use crate::session::Session;
use crate::Console;

/// Rows per list page.
const PAGE_SIZE: usize = 50;
/// Pages of 1,000 a search scans at most.
const SEARCH_PAGES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Group,
    Individual,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "groups" | "group" => Some(Kind::Group),
            "individual" => Some(Kind::Individual),
            _ => None,
        }
    }

    /// The console's path segment.
    pub fn slug(&self) -> &'static str {
        match self {
            Kind::Group => "groups",
            Kind::Individual => "individual",
        }
    }

    fn api(&self) -> &'static str {
        match self {
            Kind::Group => "/enrollmentGroups",
            Kind::Individual => "/enrollments",
        }
    }

    fn id_field(&self) -> &'static str {
        match self {
            Kind::Group => "enrollmentGroupId",
            Kind::Individual => "registrationId",
        }
    }

    pub fn noun(&self) -> &'static str {
        match self {
            Kind::Group => "enrollment group",
            Kind::Individual => "individual enrollment",
        }
    }

    pub fn is_group(&self) -> bool {
        *self == Kind::Group
    }
}

/// What the add and settings forms hold, as the user typed it.
#[derive(Debug, Clone)]
pub struct EnrollmentForm {
    pub id: String,
    pub device_id: String,
    /// `symmetricKey`, `x509` or `tpm`.
    pub attestation: String,
    pub auto_keys: bool,
    pub primary_key: String,
    pub secondary_key: String,
    /// `certificate` or `ca`.
    pub x509_source: String,
    pub certificate: String,
    pub ca_reference: String,
    /// The TPM's EK, `TPM2B_PUBLIC` in base64 (whitespace removed: it is often pasted wrapped).
    pub endorsement_key: String,
    /// The TPM's SRK, optional (DPS stores it; registration takes the device's).
    pub storage_root_key: String,
    /// `hashed`, `static`, `geoLatency` or `custom`.
    pub allocation_policy: String,
    pub iot_hubs: Vec<String>,
    pub webhook_url: String,
    pub initial_twin: String,
    /// `reprovisionAndMigrate`, `reprovisionAndReset` or `never`.
    pub reprovision: String,
    pub enabled: bool,
    /// `capabilities.iotEdge`: the device is an IoT Edge device.
    pub iot_edge: bool,
}

impl Default for EnrollmentForm {
    fn default() -> Self {
        Self {
            id: String::new(),
            device_id: String::new(),
            attestation: "symmetricKey".into(),
            auto_keys: true,
            primary_key: String::new(),
            secondary_key: String::new(),
            x509_source: "certificate".into(),
            certificate: String::new(),
            ca_reference: String::new(),
            endorsement_key: String::new(),
            storage_root_key: String::new(),
            allocation_policy: "hashed".into(),
            iot_hubs: Vec::new(),
            webhook_url: String::new(),
            initial_twin: "{\n  \"tags\": {},\n  \"properties\": {\"desired\": {}}\n}".into(),
            reprovision: "reprovisionAndMigrate".into(),
            enabled: true,
            iot_edge: false,
        }
    }
}

/// Errors shown next to fields; `form` for those tied to no field.
#[derive(Debug, Clone, Default)]
pub struct FormErrors {
    pub id: Option<String>,
    pub attestation: Option<String>,
    pub certificate: Option<String>,
    /// The TPM endorsement key field.
    pub tpm: Option<String>,
    /// The TPM storage root key field.
    pub srk: Option<String>,
    pub allocation: Option<String>,
    pub hubs: Option<String>,
    pub twin: Option<String>,
    pub form: Option<String>,
}

impl FormErrors {
    fn any(&self) -> bool {
        self.id.is_some()
            || self.attestation.is_some()
            || self.certificate.is_some()
            || self.tpm.is_some()
            || self.srk.is_some()
            || self.allocation.is_some()
            || self.hubs.is_some()
            || self.twin.is_some()
            || self.form.is_some()
    }

    /// Places an API refusal next to the field it is about.
    fn from_failure(f: &Failure) -> Self {
        let mut e = FormErrors::default();
        let text = Some(f.text());
        let lower = f.message.to_ascii_lowercase();
        match f.code_num() {
            _ if lower.contains("attestation.tpm.storagerootkey") => e.srk = text,
            _ if lower.contains("attestation.tpm") => e.tpm = text,
            400002 | 400003 | 400008 | 409201 | 409202 => e.id = text,
            400005 | 400006 => e.attestation = text,
            400007 | 401002 | 404206 => e.certificate = text,
            400004 | 400012 => e.allocation = text,
            400016 | 400211 => e.hubs = text,
            _ if lower.contains("initialtwin") || lower.contains("initial twin") => e.twin = text,
            _ if lower.contains("attestation") => e.attestation = text,
            _ => e.form = text,
        }
        e
    }
}

impl EnrollmentForm {
    fn from_fields(f: &Fields) -> Self {
        let file = f.get("certificate_file");
        let certificate = if file.trim().is_empty() {
            f.get("certificate").to_string()
        } else {
            file.to_string()
        };
        Self {
            id: f.get("id").trim().to_string(),
            device_id: f.get("device_id").trim().to_string(),
            attestation: f.get("attestation").to_string(),
            auto_keys: f.has("auto_keys"),
            primary_key: f.get("primary_key").trim().to_string(),
            secondary_key: f.get("secondary_key").trim().to_string(),
            x509_source: f.get("x509_source").to_string(),
            certificate,
            ca_reference: f.get("ca_reference").trim().to_string(),
            endorsement_key: without_whitespace(f.get("endorsement_key")),
            storage_root_key: without_whitespace(f.get("storage_root_key")),
            allocation_policy: f.get("allocation_policy").to_string(),
            iot_hubs: f
                .all("iot_hubs")
                .into_iter()
                .filter(|h| !h.trim().is_empty())
                .collect(),
            webhook_url: f.get("webhook_url").trim().to_string(),
            initial_twin: f.get("initial_twin").to_string(),
            reprovision: f.get("reprovision").to_string(),
            enabled: f.has("enabled"),
            iot_edge: f.has("iot_edge"),
        }
    }

    /// The settings part of a stored enrollment, for the settings form.
    fn from_record(v: &Value) -> Self {
        let d = EnrollmentForm::default();
        let rp = v.get("reprovisionPolicy");
        let update = rp
            .and_then(|r| r.get("updateHubAssignment"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let migrate = rp
            .and_then(|r| r.get("migrateDeviceData"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        Self {
            allocation_policy: str_at(v, "allocationPolicy").unwrap_or(d.allocation_policy),
            iot_hubs: v
                .get("iotHubs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            webhook_url: v
                .pointer("/customAllocationDefinition/webhookUrl")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            initial_twin: match v.get("initialTwin") {
                Some(t) if !t.is_null() => serde_json::to_string_pretty(t).unwrap_or_default(),
                _ => "{}".into(),
            },
            reprovision: match (update, migrate) {
                (false, _) => "never",
                (true, true) => "reprovisionAndMigrate",
                (true, false) => "reprovisionAndReset",
            }
            .into(),
            enabled: str_at(v, "provisioningStatus").as_deref() != Some("disabled"),
            iot_edge: v
                .pointer("/capabilities/iotEdge")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            device_id: str_at(v, "deviceId").unwrap_or_default(),
            ..d
        }
    }

    /// Writes the settings fields into an enrollment body.
    fn apply_settings(&self, obj: &mut Map<String, Value>, errors: &mut FormErrors) {
        obj.insert(
            "allocationPolicy".into(),
            Value::String(self.allocation_policy.clone()),
        );
        if self.iot_hubs.is_empty() {
            obj.remove("iotHubs");
        } else {
            obj.insert("iotHubs".into(), json!(self.iot_hubs));
        }
        if self.allocation_policy == "custom" {
            obj.insert(
                "customAllocationDefinition".into(),
                json!({"webhookUrl": self.webhook_url, "apiVersion": crate::api::SERVICE_API_VERSION}),
            );
        } else {
            obj.remove("customAllocationDefinition");
        }
        let twin_text = self.initial_twin.trim();
        if twin_text.is_empty() {
            obj.remove("initialTwin");
        } else {
            match serde_json::from_str::<Value>(twin_text) {
                Ok(Value::Object(m)) => {
                    obj.insert("initialTwin".into(), Value::Object(m));
                }
                Ok(_) => errors.twin = Some("The initial twin must be a JSON object.".into()),
                Err(e) => errors.twin = Some(format!("The initial twin is not valid JSON: {e}")),
            }
        }
        let (update, migrate) = match self.reprovision.as_str() {
            "never" => (false, false),
            "reprovisionAndReset" => (true, false),
            _ => (true, true),
        };
        obj.insert(
            "reprovisionPolicy".into(),
            json!({"updateHubAssignment": update, "migrateDeviceData": migrate}),
        );
        obj.insert(
            "provisioningStatus".into(),
            Value::String(if self.enabled { "enabled" } else { "disabled" }.into()),
        );
        obj.insert(
            "capabilities".into(),
            serde_json::json!({ "iotEdge": self.iot_edge }),
        );
    }

    /// The body of a new enrollment, or the errors found before asking the API.
    fn to_new_body(&self, kind: Kind) -> Result<Value, Box<FormErrors>> {
        let mut errors = FormErrors::default();
        if self.id.is_empty() {
            errors.id = Some(format!(
                "Enter the {}.",
                match kind {
                    Kind::Group => "group id",
                    Kind::Individual => "registration id",
                }
            ));
        }
        let mut obj = Map::new();
        obj.insert(kind.id_field().into(), Value::String(self.id.clone()));
        if kind == Kind::Individual && !self.device_id.is_empty() {
            obj.insert("deviceId".into(), Value::String(self.device_id.clone()));
        }
        let attestation = match self.attestation.as_str() {
            "symmetricKey" => {
                if self.auto_keys {
                    json!({"type": "symmetricKey"})
                } else {
                    if self.primary_key.is_empty() || self.secondary_key.is_empty() {
                        errors.attestation =
                            Some("Enter both keys, or check \"Auto-generate keys\".".into());
                    }
                    json!({"type": "symmetricKey", "symmetricKey": {
                        "primaryKey": self.primary_key, "secondaryKey": self.secondary_key}})
                }
            }
            "x509" => {
                let certs_field = match kind {
                    Kind::Group => "signingCertificates",
                    Kind::Individual => "clientCertificates",
                };
                if self.x509_source == "ca" {
                    if self.ca_reference.is_empty() {
                        errors.certificate = Some(
                            "Enter the name of a CA certificate registered with Muster.".into(),
                        );
                    }
                    json!({"type": "x509", "x509": {"caReferences": {"primary": self.ca_reference}}})
                } else {
                    if self.certificate.trim().is_empty() {
                        errors.certificate = Some("Upload or paste the certificate (PEM).".into());
                    }
                    json!({"type": "x509", "x509": {certs_field: {"primary": {"certificate": self.certificate}}}})
                }
            }
            "tpm" if kind == Kind::Group => {
                errors.attestation = Some(
                    "TPM attestation is for individual enrollments only; groups use X.509 or symmetric keys."
                        .into(),
                );
                Value::Null
            }
            "tpm" => {
                errors.tpm = tpm_key_error(&self.endorsement_key, "endorsement key");
                if !self.storage_root_key.is_empty() {
                    errors.srk = tpm_key_error(&self.storage_root_key, "storage root key");
                }
                let mut tpm = json!({"endorsementKey": self.endorsement_key});
                if !self.storage_root_key.is_empty() {
                    tpm["storageRootKey"] = Value::String(self.storage_root_key.clone());
                }
                json!({"type": "tpm", "tpm": tpm})
            }
            _ => {
                errors.attestation = Some("Choose a mechanism.".into());
                Value::Null
            }
        };
        obj.insert("attestation".into(), attestation);
        self.apply_settings(&mut obj, &mut errors);
        if errors.any() {
            Err(Box::new(errors))
        } else {
            Ok(Value::Object(obj))
        }
    }
}

/// `s` with every whitespace character removed (base64 pasted across lines).
fn without_whitespace(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Why a pasted EK or SRK cannot be a TPM's RSA storage key, checked before asking the API
/// (which only checks base64) so the operator learns it now rather than from the device's
/// 401013 later. `None` when it parses.
fn tpm_key_error(b64: &str, what: &'static str) -> Option<String> {
    if b64.is_empty() {
        return Some(format!(
            "Enter the TPM {what} (base64; `muster tpm show-ek` prints the endorsement key)."
        ));
    }
    muster_attestation::tpm::RsaPublicArea::from_base64(b64, what)
        .err()
        .map(|e| {
            // "the endorsement key is not …" as a sentence.
            let text = e.to_string();
            let mut chars = text.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            format!("{}{}.", first.unwrap_or_default(), chars.as_str())
        })
}

/// What the details page says about an enrolled EK: the registration id devices derive from
/// it, and whether it is this enrollment's (else devices must be given the id).
fn tpm_summary(ek_b64: &str, registration_id: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(ek_b64.trim())
        .ok()?;
    let derived = muster_attestation::tpm::registration_id(&raw);
    Some(if derived == registration_id {
        format!(
            "Endorsement key ({} bytes): devices derive this registration id from it.",
            raw.len()
        )
    } else {
        format!(
            "Endorsement key ({} bytes): the registration id derived from it is {derived}, not this enrollment's; its device must register with --registration-id {registration_id}.",
            raw.len()
        )
    })
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// A linked hub offered in the form.
#[derive(Debug, Clone)]
pub struct HubChoice {
    pub name: String,
    pub checked: bool,
}

/// Linked hub names (not secret) from the store, plus any the form names that are not linked.
async fn hub_choices(c: &Console, selected: &[String]) -> Vec<HubChoice> {
    let mut names: Vec<String> = Vec::new();
    if let Ok(rows) = c
        .api()
        .store
        .list(
            muster_store::Collection::LinkedHubs,
            muster_store::ListQuery {
                partition: None,
                after: None,
                limit: 1000,
            },
        )
        .await
    {
        for r in rows {
            if let Some(n) = r.body.get("name").and_then(Value::as_str) {
                names.push(n.to_string());
            }
        }
    }
    for s in selected {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(s)) {
            names.push(s.clone());
        }
    }
    names
        .into_iter()
        .map(|name| HubChoice {
            checked: selected.iter().any(|s| s.eq_ignore_ascii_case(&name)),
            name,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// List

#[derive(Debug)]
pub struct ListRow {
    pub id: String,
    pub id_seg: String,
    pub attestation: String,
    pub status: String,
    pub allocation: String,
    pub hubs: String,
    pub updated: String,
}

#[derive(Template)]
#[template(path = "enrollments.html")]
struct ListPage {
    page: PageCtx,
    kind: Kind,
    q: String,
    rows: Vec<ListRow>,
    next: Option<String>,
    error: Option<String>,
    searched_all: bool,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    tab: Option<String>,
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    page: Option<String>,
}

fn row(kind: Kind, v: &Value) -> ListRow {
    let id = str_at(v, kind.id_field()).unwrap_or_default();
    ListRow {
        id_seg: seg(&id),
        id,
        attestation: v
            .pointer("/attestation/type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        status: str_at(v, "provisioningStatus").unwrap_or_else(|| "enabled".into()),
        allocation: str_at(v, "allocationPolicy").unwrap_or_else(|| "hashed".into()),
        hubs: v
            .get("iotHubs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "all linked hubs".into()),
        updated: str_at(v, "lastUpdatedDateTimeUtc").unwrap_or_default(),
    }
}

async fn query_page(
    c: &Console,
    s: &Session,
    kind: Kind,
    size: usize,
    continuation: Option<&str>,
) -> Result<Reply, Failure> {
    let mut extra = vec![("x-ms-max-item-count", size.to_string())];
    if let Some(t) = continuation {
        extra.push(("x-ms-continuation", t.to_string()));
    }
    c.service(
        s,
        Method::POST,
        &format!("{}/query", kind.api()),
        Some(&json!({"query": "SELECT *"})),
        &extra,
    )
    .await
}

pub async fn list(
    State(c): State<Console>,
    Query(lq): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let kind = lq
        .tab
        .as_deref()
        .and_then(Kind::parse)
        .unwrap_or(Kind::Group);
    let needle = lq.q.clone().unwrap_or_default().trim().to_string();
    let mut rows = Vec::new();
    let mut next = None;
    let mut error = None;
    let mut searched_all = true;
    let mut error_status = StatusCode::OK;
    if needle.is_empty() {
        match query_page(&c, &s, kind, PAGE_SIZE, lq.page.as_deref()).await {
            Ok(r) => {
                next = r.continuation();
                rows = items(&r.body).iter().map(|v| row(kind, v)).collect();
            }
            Err(f) => {
                error_status = f.status_code();
                error = Some(f.text());
            }
        }
    } else {
        let lower = needle.to_lowercase();
        let mut token: Option<String> = None;
        for i in 0..SEARCH_PAGES {
            match query_page(&c, &s, kind, 1000, token.as_deref()).await {
                Ok(r) => {
                    rows.extend(
                        items(&r.body)
                            .iter()
                            .map(|v| row(kind, v))
                            .filter(|r| r.id.to_lowercase().contains(&lower)),
                    );
                    token = r.continuation();
                }
                Err(f) => {
                    error_status = f.status_code();
                    error = Some(f.text());
                    break;
                }
            }
            if token.is_none() {
                break;
            }
            if i + 1 == SEARCH_PAGES {
                searched_all = false;
            }
        }
    }
    let title = match kind {
        Kind::Group => "Enrollment groups",
        Kind::Individual => "Individual enrollments",
    };
    let status = if error.is_some() {
        error_status
    } else {
        StatusCode::OK
    };
    render_status(
        status,
        &ListPage {
            page: c.page_ctx(&s, title, "enrollments"),
            kind,
            q: needle,
            rows,
            next,
            error,
            searched_all,
        },
    )
}

impl ListPage {
    fn enc(&self, s: &str) -> String {
        q(s)
    }
}

impl DetailsPage {
    fn enc(&self, s: &str) -> String {
        q(s)
    }
}

fn items(body: &Value) -> Vec<Value> {
    body.as_array().cloned().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Add

#[derive(Template)]
#[template(path = "enrollment_new.html")]
struct NewPage {
    page: PageCtx,
    kind: Kind,
    form: EnrollmentForm,
    errors: FormErrors,
    hubs: Vec<HubChoice>,
}

#[derive(Deserialize, Default)]
pub struct KindQuery {
    #[serde(default)]
    kind: Option<String>,
}

pub async fn new_page(
    State(c): State<Console>,
    Query(kq): Query<KindQuery>,
    headers: HeaderMap,
) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let kind = kq
        .kind
        .as_deref()
        .and_then(Kind::parse)
        .unwrap_or(Kind::Group);
    let hubs = hub_choices(&c, &[]).await;
    render(&NewPage {
        page: c.page_ctx(&s, format!("Add {}", kind.noun()), "enrollments"),
        kind,
        form: EnrollmentForm::default(),
        errors: FormErrors::default(),
        hubs,
    })
}

pub async fn create(State(c): State<Console>, req: Request) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let kind = Kind::parse(fields.get("kind")).unwrap_or(Kind::Group);
    let form = EnrollmentForm::from_fields(&fields);
    let result = match form.to_new_body(kind) {
        Ok(body) => c
            .service(
                &s,
                Method::PUT,
                &format!("{}/{}", kind.api(), seg(&form.id)),
                Some(&body),
                &[],
            )
            .await
            .map_err(|f| FormErrors::from_failure(&f)),
        Err(e) => Err(*e),
    };
    match result {
        Ok(_) => {
            c.sessions()
                .set_flash(&s.id, format!("Created {} '{}'.", kind.noun(), form.id));
            redirect(&format!(
                "/console/enrollments/{}/{}",
                kind.slug(),
                seg(&form.id)
            ))
        }
        Err(errors) => {
            let hubs = hub_choices(&c, &form.iot_hubs).await;
            let status = if errors.form.is_some() {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_REQUEST
            };
            render_status(
                status,
                &NewPage {
                    page: c.page_ctx(&s, format!("Add {}", kind.noun()), "enrollments"),
                    kind,
                    form,
                    errors,
                    hubs,
                },
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Details

#[derive(Debug)]
pub struct RegRow {
    pub registration_id: String,
    pub device_id: String,
    pub status: String,
    pub assigned_hub: String,
    pub updated: String,
    pub error: String,
}

#[derive(Template)]
#[template(path = "enrollment_details.html")]
struct DetailsPage {
    page: PageCtx,
    kind: Kind,
    id: String,
    id_seg: String,
    tab: String,
    attestation: String,
    keys: Option<(String, String)>,
    certificates: Vec<String>,
    created: String,
    updated: String,
    enabled: bool,
    form: EnrollmentForm,
    errors: FormErrors,
    hubs: Vec<HubChoice>,
    status_error: Option<String>,
    delete_error: Option<String>,
    regs: Vec<RegRow>,
    regs_error: Option<String>,
    next: Option<String>,
    /// What the cascade delete removes, for its confirmation (`None` when the policy may not
    /// read registration records).
    cascade: Option<Cascade>,
}

/// What deleting an enrollment with "also delete its registration records" removes.
#[derive(Debug, Clone, Default)]
pub struct Cascade {
    /// Registration records.
    pub records: u64,
    /// Devices in IoT hubs (assigned records); `None` when the group has more records than
    /// one page counts ([`CASCADE_COUNT_LIMIT`]).
    pub devices: Option<u64>,
}

impl Cascade {
    /// "3 registration records and 2 devices in their IoT hubs".
    pub fn text(&self) -> String {
        let plural =
            |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        let records = plural(self.records, "registration record", "registration records");
        match self.devices {
            Some(d) => format!(
                "{records} and {} in their IoT hubs",
                plural(d, "device", "devices")
            ),
            None => format!("{records} and up to as many devices in their IoT hubs"),
        }
    }
}

/// Most records of one group the cascade confirmation reads to count their hub devices.
const CASCADE_COUNT_LIMIT: usize = 10_000;

/// Counts what a cascade delete of `id` would remove, from the store (an indexed count of the
/// group's partition; assigned records, one hub device each).
async fn cascade_counts(c: &Console, kind: Kind, id: &str) -> Cascade {
    let store = &c.api().store;
    let key = id.to_ascii_lowercase();
    let assigned = |v: &Value| str_at(v, "status").as_deref() == Some("assigned");
    match kind {
        Kind::Individual => match store.get(Collection::Registrations, &key).await {
            Ok(Some(r)) => Cascade {
                records: 1,
                devices: Some(u64::from(assigned(&r.body))),
            },
            _ => Cascade {
                records: 0,
                devices: Some(0),
            },
        },
        Kind::Group => {
            let records = store
                .count(Collection::Registrations, Some(&key))
                .await
                .unwrap_or(0);
            let devices = if records as usize <= CASCADE_COUNT_LIMIT {
                store
                    .list(
                        Collection::Registrations,
                        muster_store::ListQuery {
                            partition: Some(key),
                            after: None,
                            limit: CASCADE_COUNT_LIMIT,
                        },
                    )
                    .await
                    .ok()
                    .map(|rs| rs.iter().filter(|r| assigned(&r.body)).count() as u64)
            } else {
                None
            };
            Cascade { records, devices }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct DetailsQuery {
    #[serde(default)]
    tab: Option<String>,
    #[serde(default)]
    page: Option<String>,
}

/// What a failed POST puts back on the details page.
#[derive(Default)]
struct Overrides {
    form: Option<EnrollmentForm>,
    errors: FormErrors,
    status_error: Option<String>,
    delete_error: Option<String>,
}

fn parse_kind(kind: &str) -> Option<Kind> {
    Kind::parse(kind)
}

pub async fn details(
    State(c): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    Query(dq): Query<DetailsQuery>,
    headers: HeaderMap,
) -> Response {
    let s = match c.require_session(&headers) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(kind) = parse_kind(&kind) else {
        return crate::page::not_found().await;
    };
    let tab = dq.tab.unwrap_or_else(|| "settings".into());
    details_view(
        &c,
        &s,
        kind,
        &id,
        &tab,
        dq.page.as_deref(),
        Overrides::default(),
    )
    .await
}

async fn details_view(
    c: &Console,
    s: &Session,
    kind: Kind,
    id: &str,
    tab: &str,
    page_token: Option<&str>,
    ov: Overrides,
) -> Response {
    let path = format!("{}/{}", kind.api(), seg(id));
    let record = match c.service(s, Method::GET, &path, None, &[]).await {
        Ok(r) => r.body,
        Err(f) => {
            let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST);
            return crate::page::message_page(
                c.page_ctx(s, kind.noun(), "enrollments"),
                status,
                &format!("Cannot show {} '{id}'", kind.noun()),
                f.text(),
            );
        }
    };
    let attestation = record
        .pointer("/attestation/type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut keys = None;
    if attestation == "symmetricKey" {
        if let Ok(r) = c
            .service(
                s,
                Method::POST,
                &format!("{path}/attestationmechanism"),
                None,
                &[],
            )
            .await
        {
            let k = |p: &str| {
                r.body
                    .pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            keys = Some((
                k("/symmetricKey/primaryKey"),
                k("/symmetricKey/secondaryKey"),
            ));
        }
    }
    let mut certificates = Vec::new();
    if let Some(x) = record.pointer("/attestation/x509") {
        for (set, label) in [
            ("clientCertificates", "Client certificate"),
            ("signingCertificates", "Signing certificate"),
        ] {
            for which in ["primary", "secondary"] {
                if let Some(info) = x.pointer(&format!("/{set}/{which}/info")) {
                    certificates.push(format!(
                        "{label} ({which}): {} — SHA-256 {} — valid until {}",
                        info.get("subjectName")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        info.get("sha256Thumbprint")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                        info.get("notAfterUtc")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    ));
                }
            }
        }
        if let Some(ca) = x.pointer("/caReferences/primary").and_then(Value::as_str) {
            certificates.push(format!("CA reference (primary): {ca}"));
        }
    }
    if let Some(line) = record
        .pointer("/attestation/tpm/endorsementKey")
        .and_then(Value::as_str)
        .and_then(|ek| tpm_summary(ek, id))
    {
        certificates.push(line);
    }
    let stored_form = EnrollmentForm::from_record(&record);
    let form = ov.form.unwrap_or_else(|| stored_form.clone());
    let hubs = hub_choices(c, &form.iot_hubs).await;
    let (mut regs, mut regs_error, mut next) = (Vec::new(), None, None);
    if tab == "registrations" {
        match registrations_of(c, s, kind, id, page_token).await {
            Ok((r, n)) => {
                regs = r;
                next = n;
            }
            Err(f) => regs_error = Some(f.text()),
        }
    }
    let status = if ov.errors.any() || ov.status_error.is_some() || ov.delete_error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let mut page = c.page_ctx(s, format!("{} {id}", kind.noun()), "enrollments");
    for e in [&ov.errors.form, &ov.status_error, &ov.delete_error] {
        page.deny_if_refused(e.as_ref());
    }
    let status = if page.denied.is_some() {
        StatusCode::FORBIDDEN
    } else {
        status
    };
    let cascade = match c.has_right(s, muster_proto::AccessRight::RegistrationStatusRead) {
        Ok(()) => Some(cascade_counts(c, kind, id).await),
        Err(_) => None,
    };
    render_status(
        status,
        &DetailsPage {
            page,
            kind,
            id: id.to_string(),
            id_seg: seg(id),
            tab: tab.to_string(),
            attestation,
            keys,
            certificates,
            created: str_at(&record, "createdDateTimeUtc").unwrap_or_default(),
            updated: str_at(&record, "lastUpdatedDateTimeUtc").unwrap_or_default(),
            enabled: stored_form.enabled,
            form,
            errors: ov.errors,
            hubs,
            status_error: ov.status_error,
            delete_error: ov.delete_error,
            regs,
            regs_error,
            next,
            cascade,
        },
    )
}

pub fn reg_row(v: &Value) -> RegRow {
    let err = match (v.get("errorCode"), str_at(v, "errorMessage")) {
        (Some(code), Some(m)) => format!("{code}: {m}"),
        (_, Some(m)) => m,
        _ => String::new(),
    };
    RegRow {
        registration_id: str_at(v, "registrationId").unwrap_or_default(),
        device_id: str_at(v, "deviceId").unwrap_or_default(),
        status: str_at(v, "status").unwrap_or_default(),
        assigned_hub: str_at(v, "assignedHub").unwrap_or_default(),
        updated: str_at(v, "lastUpdatedDateTimeUtc").unwrap_or_default(),
        error: err,
    }
}

async fn registrations_of(
    c: &Console,
    s: &Session,
    kind: Kind,
    id: &str,
    page_token: Option<&str>,
) -> Result<(Vec<RegRow>, Option<String>), Failure> {
    match kind {
        Kind::Group => {
            let mut extra = vec![("x-ms-max-item-count", PAGE_SIZE.to_string())];
            if let Some(t) = page_token {
                extra.push(("x-ms-continuation", t.to_string()));
            }
            let r = c
                .service(
                    s,
                    Method::POST,
                    &format!("/registrations/{}/query", seg(id)),
                    None,
                    &extra,
                )
                .await?;
            Ok((
                items(&r.body).iter().map(reg_row).collect(),
                r.continuation(),
            ))
        }
        Kind::Individual => {
            match c
                .service(
                    s,
                    Method::GET,
                    &format!("/registrations/{}", seg(id)),
                    None,
                    &[],
                )
                .await
            {
                Ok(r) => Ok((vec![reg_row(&r.body)], None)),
                Err(f) if f.is_not_found() => Ok((Vec::new(), None)),
                Err(f) => Err(f),
            }
        }
    }
}

/// Reads the stored enrollment and its etag for an update.
async fn current(
    c: &Console,
    s: &Session,
    kind: Kind,
    id: &str,
) -> Result<(Map<String, Value>, String), Failure> {
    let r = c
        .service(
            s,
            Method::GET,
            &format!("{}/{}", kind.api(), seg(id)),
            None,
            &[],
        )
        .await?;
    let etag = str_at(&r.body, "etag").unwrap_or_default();
    let mut obj = match r.body {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // Read-only fields the API computes.
    obj.remove("registrationState");
    Ok((obj, etag))
}

async fn put_with_etag(
    c: &Console,
    s: &Session,
    kind: Kind,
    id: &str,
    obj: Map<String, Value>,
    etag: String,
) -> Result<Reply, Failure> {
    c.service(
        s,
        Method::PUT,
        &format!("{}/{}", kind.api(), seg(id)),
        Some(&Value::Object(obj)),
        &[("if-match", etag)],
    )
    .await
}

pub async fn save_settings(
    State(c): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(kind) = parse_kind(&kind) else {
        return crate::page::not_found().await;
    };
    let form = EnrollmentForm::from_fields(&fields);
    let mut errors = FormErrors::default();
    let outcome = match current(&c, &s, kind, &id).await {
        Ok((mut obj, etag)) => {
            form.apply_settings(&mut obj, &mut errors);
            if errors.any() {
                Err(errors)
            } else {
                put_with_etag(&c, &s, kind, &id, obj, etag)
                    .await
                    .map_err(|f| FormErrors::from_failure(&f))
            }
        }
        Err(f) => Err(FormErrors::from_failure(&f)),
    };
    match outcome {
        Ok(_) => {
            c.sessions().set_flash(&s.id, "Settings saved.");
            redirect(&format!(
                "/console/enrollments/{}/{}",
                kind.slug(),
                seg(&id)
            ))
        }
        Err(errors) => {
            details_view(
                &c,
                &s,
                kind,
                &id,
                "settings",
                None,
                Overrides {
                    form: Some(form),
                    errors,
                    ..Overrides::default()
                },
            )
            .await
        }
    }
}

pub async fn set_status(
    State(c): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(kind) = parse_kind(&kind) else {
        return crate::page::not_found().await;
    };
    let status = if fields.get("status") == "disabled" {
        "disabled"
    } else {
        "enabled"
    };
    let outcome = match current(&c, &s, kind, &id).await {
        Ok((mut obj, etag)) => {
            obj.insert("provisioningStatus".into(), Value::String(status.into()));
            put_with_etag(&c, &s, kind, &id, obj, etag).await
        }
        Err(f) => Err(f),
    };
    match outcome {
        Ok(_) => {
            c.sessions()
                .set_flash(&s.id, format!("The {} is now {status}.", kind.noun()));
            redirect(&format!(
                "/console/enrollments/{}/{}",
                kind.slug(),
                seg(&id)
            ))
        }
        Err(f) => {
            details_view(
                &c,
                &s,
                kind,
                &id,
                "settings",
                None,
                Overrides {
                    status_error: Some(f.text()),
                    ..Overrides::default()
                },
            )
            .await
        }
    }
}

pub async fn delete(
    State(c): State<Console>,
    Path((kind, id)): Path<(String, String)>,
    req: Request,
) -> Response {
    let (s, fields, _) = match c.guard(req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(kind) = parse_kind(&kind) else {
        return crate::page::not_found().await;
    };
    let cascade = fields.has("cascade");
    // The API deletes an individual enrollment's record with it, which would leave its hub
    // device behind: so its cascade (record and device, intent first) runs before, once the
    // policy is known to allow both.
    let mut individual_summary = None;
    if cascade && kind == Kind::Individual {
        let allowed = c
            .has_right(&s, muster_proto::AccessRight::EnrollmentWrite)
            .and_then(|()| c.has_right(&s, muster_proto::AccessRight::RegistrationStatusWrite));
        if let Err(f) = allowed {
            return details_view(
                &c,
                &s,
                kind,
                &id,
                "settings",
                None,
                Overrides {
                    delete_error: Some(f.text()),
                    ..Overrides::default()
                },
            )
            .await;
        }
        individual_summary = Some(match c.deprovision(&s, &id).await {
            Ok(None) => "It had no registration record.".to_string(),
            Ok(Some(n)) => {
                format!("Its registration record and {n} device(s) in their hubs deleted.")
            }
            Err(e) => format!("Deleting its registration record and device stopped: {e}"),
        });
    }
    // The enrollment first: if the policy may not delete it, nothing else changes. A group's
    // records stay queryable by its id afterwards.
    if let Err(f) = c
        .service(
            &s,
            Method::DELETE,
            &format!("{}/{}", kind.api(), seg(&id)),
            None,
            &[],
        )
        .await
    {
        return details_view(
            &c,
            &s,
            kind,
            &id,
            "settings",
            None,
            Overrides {
                delete_error: Some(f.text()),
                ..Overrides::default()
            },
        )
        .await;
    }
    let mut message = format!("Deleted {} '{id}'.", kind.noun());
    if let Some(summary) = individual_summary {
        message.push_str(&format!(" {summary}"));
    } else if cascade {
        match cascade_group(&c, &s, &id).await {
            Ok(summary) => message.push_str(&format!(" {summary}")),
            Err(f) => message.push_str(&format!(
                " Deleting its registration records stopped: {}",
                f.text()
            )),
        }
    }
    c.sessions().set_flash(&s.id, message);
    redirect(&format!("/console/enrollments?tab={}", kind.slug()))
}

/// Deprovisions every device of the group: each registration record with its device in
/// whichever linked hub holds it, through the engine (intent first); a device that could not
/// be removed is named in the message.
async fn cascade_group(c: &Console, s: &Session, id: &str) -> Result<String, Failure> {
    c.has_right(s, muster_proto::AccessRight::RegistrationStatusWrite)?;
    let mut records = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut extra = vec![("x-ms-max-item-count", "1000".to_string())];
        if let Some(t) = &token {
            extra.push(("x-ms-continuation", t.clone()));
        }
        let r = c
            .service(
                s,
                Method::POST,
                &format!("/registrations/{}/query", seg(id)),
                None,
                &extra,
            )
            .await?;
        records.extend(items(&r.body).iter().map(reg_row));
        token = r.continuation();
        if token.is_none() {
            break;
        }
    }
    let (mut deleted_records, mut deleted_devices) = (0, 0);
    let mut left = Vec::new();
    for r in &records {
        match c.deprovision(s, &r.registration_id).await {
            Ok(Some(n)) => {
                deleted_records += 1;
                deleted_devices += n;
            }
            Ok(None) => {}
            Err(e) => left.push(format!("{}: {e}", r.registration_id)),
        }
    }
    let mut out = format!(
        "{deleted_records} registration record(s) and {deleted_devices} device(s) in their hubs deleted."
    );
    if !left.is_empty() {
        out.push_str(&format!(
            " {} device(s) could not be deprovisioned: {}.",
            left.len(),
            left.join("; ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    /// A `TPM2B_PUBLIC` shaped like the EK template: RSA-2048, SHA-256 names, AES-128-CFB.
    fn ek_b64() -> String {
        let mut t = Vec::new();
        for v in [0x0001u16, 0x000B] {
            t.extend_from_slice(&v.to_be_bytes());
        }
        t.extend_from_slice(&0x0003_00B2u32.to_be_bytes());
        t.extend_from_slice(&32u16.to_be_bytes());
        t.extend_from_slice(&[7u8; 32]);
        for v in [0x0006u16, 128, 0x0043, 0x0010, 2048] {
            t.extend_from_slice(&v.to_be_bytes());
        }
        t.extend_from_slice(&0u32.to_be_bytes());
        t.extend_from_slice(&256u16.to_be_bytes());
        t.extend_from_slice(&[0xC5u8; 256]);
        let mut out = (t.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&t);
        B64.encode(out)
    }

    fn tpm_form(ek: &str) -> EnrollmentForm {
        EnrollmentForm {
            id: "tpm-device".into(),
            attestation: "tpm".into(),
            endorsement_key: ek.into(),
            ..EnrollmentForm::default()
        }
    }

    #[test]
    fn a_wrapped_ek_is_joined_and_sent_with_the_srk() {
        let ek = ek_b64();
        let wrapped: String = ek
            .as_bytes()
            .chunks(64)
            .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(without_whitespace(&format!("  {wrapped} ")), ek);
        let mut form = tpm_form(&ek);
        form.storage_root_key = ek.clone();
        let body = form.to_new_body(Kind::Individual).expect("valid");
        assert_eq!(body["attestation"]["type"], "tpm");
        assert_eq!(body["attestation"]["tpm"]["endorsementKey"], ek.as_str());
        assert_eq!(body["attestation"]["tpm"]["storageRootKey"], ek.as_str());
        let body = tpm_form(&ek).to_new_body(Kind::Individual).expect("valid");
        assert!(body["attestation"]["tpm"].get("storageRootKey").is_none());
    }

    #[test]
    fn an_ek_that_is_not_a_tpm_public_key_is_refused_with_the_check_that_failed() {
        let e = tpm_form("").to_new_body(Kind::Individual).unwrap_err();
        assert!(e
            .tpm
            .as_deref()
            .unwrap()
            .contains("Enter the TPM endorsement key"));
        let e = tpm_form("not base64!")
            .to_new_body(Kind::Individual)
            .unwrap_err();
        assert_eq!(
            e.tpm.as_deref(),
            Some("The endorsement key is not valid base64.")
        );
        // Valid base64, but an X.509 certificate's first bytes rather than a TPM2B_PUBLIC.
        let e = tpm_form("MIIBszCCAVmgAwIBAgIU")
            .to_new_body(Kind::Individual)
            .unwrap_err();
        assert_eq!(
            e.tpm.as_deref(),
            Some("The endorsement key is not a TPM2B_PUBLIC: it ends early.")
        );
        let mut srk_bad = tpm_form(&ek_b64());
        srk_bad.storage_root_key = "AAAA".into();
        let e = srk_bad.to_new_body(Kind::Individual).unwrap_err();
        assert!(e.tpm.is_none(), "{e:?}");
        assert!(
            e.srk
                .as_deref()
                .unwrap()
                .starts_with("The storage root key is not"),
            "{e:?}"
        );
    }

    #[test]
    fn groups_cannot_choose_tpm() {
        let mut form = tpm_form(&ek_b64());
        form.id = "a-group".into();
        let e = form.to_new_body(Kind::Group).unwrap_err();
        assert!(e
            .attestation
            .as_deref()
            .unwrap()
            .contains("individual enrollments only"));
    }

    #[test]
    fn the_details_line_says_whether_the_registration_id_is_the_eks() {
        let ek = ek_b64();
        let derived = muster_attestation::tpm::registration_id(&B64.decode(&ek).unwrap());
        let same = tpm_summary(&ek, &derived).unwrap();
        assert!(
            same.contains("devices derive this registration id"),
            "{same}"
        );
        let other = tpm_summary(&ek, "custom-id").unwrap();
        assert!(
            other.contains(&derived) && other.contains("--registration-id custom-id"),
            "{other}"
        );
        assert!(tpm_summary("%%", "x").is_none());
    }
}
