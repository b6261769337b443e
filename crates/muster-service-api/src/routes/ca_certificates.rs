//! `/caCertificates`: Muster's service-API extension for the CA certificates enrollment groups
//! reference by name (`attestation.x509.caReferences`); DPS keeps them in the Azure management
//! plane. Needs the `ServiceConfig` right. Certificate text is accepted but never returned.
//!
//! * `PUT /caCertificates/{name}` `{"certificate": PEM or base64 DER}` → the CA, unverified (a
//!   new certificate under an existing name starts unverified again; the same one keeps its
//!   state).
//! * `POST /caCertificates/{name}/verificationCode` → `{"verificationCode": ...}`, a fresh
//!   random code (each call replaces the previous one).
//! * `POST /caCertificates/{name}/verify` `{"certificate": ...}` — a certificate whose CN is the
//!   code and which the CA signed — → the CA, `isVerified: true`. Only verified CAs attest
//!   devices.
//! * `GET /caCertificates`, `GET /caCertificates/{name}`, `DELETE /caCertificates/{name}`.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use muster_attestation::{check_proof_of_possession, CaCertificate};
use muster_proto::runtime::random_hex;
use muster_proto::{AccessRight, ErrorCode, X509CertificateInfo};
use muster_store::{Collection, Expect, ListQuery, Record, Write, WriteOutcome};
use serde::{Deserialize, Serialize};

use super::generic::admit;
use crate::error::ApiError;
use crate::request::Path;
use crate::request::{json_ok, read_body, require_json, QueryParams};
use crate::ServiceApi;

/// Longest CA certificate name.
const MAX_NAME_LEN: usize = 128;

pub(super) fn routes() -> Router<ServiceApi> {
    Router::new()
        .route("/caCertificates", get(list))
        .route(
            "/caCertificates/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .route(
            "/caCertificates/{name}/verificationCode",
            post(verification_code),
        )
        .route("/caCertificates/{name}/verify", post(verify))
}

/// What the API shows of a CA certificate.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CaView {
    name: String,
    info: X509CertificateInfo,
    is_verified: bool,
    etag: String,
}

fn view(ca: CaCertificate, etag: String) -> CaView {
    CaView {
        name: ca.name,
        info: ca.info,
        is_verified: ca.is_verified,
        etag,
    }
}

#[derive(Debug, Deserialize)]
struct CertificateBody {
    certificate: Option<String>,
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::CaCertificateNotFound,
        format!("no CA certificate '{name}'"),
    )
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("CA certificate name '{name}' is invalid: 1 to {MAX_NAME_LEN} characters of letters, digits, '-', '_' and '.'"),
        ))
    }
}

fn decode(r: Record) -> Result<(CaCertificate, String), ApiError> {
    let ca = serde_json::from_value(r.body)
        .map_err(|e| ApiError::internal("reading a CA certificate", e))?;
    Ok((ca, r.etag))
}

async fn load(api: &ServiceApi, name: &str) -> Result<(CaCertificate, String), ApiError> {
    let r = api
        .store
        .get(Collection::CaCertificates, &CaCertificate::key(name))
        .await?
        .ok_or_else(|| not_found(name))?;
    decode(r)
}

/// Writes `ca` if the stored record still has `expect`; returns the new etag.
async fn save(api: &ServiceApi, ca: &CaCertificate, expect: Expect) -> Result<String, ApiError> {
    let body =
        serde_json::to_value(ca).map_err(|e| ApiError::internal("encoding a CA certificate", e))?;
    match api
        .store
        .write(vec![Write::put(
            Collection::CaCertificates,
            CaCertificate::key(&ca.name),
            expect,
            body,
        )])
        .await?
        .into_iter()
        .next()
    {
        Some(WriteOutcome::Written { etag }) => Ok(etag),
        _ => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            format!("CA certificate '{}' changed concurrently; retry", ca.name),
        )),
    }
}

async fn certificate_body(
    api: &ServiceApi,
    headers: &HeaderMap,
    body: Body,
) -> Result<String, ApiError> {
    require_json(headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let req: CertificateBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body must be {{\"certificate\": \"<PEM or base64 DER>\"}}: {e}"),
        )
    })?;
    req.certificate
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidCertificate, "certificate is required"))
}

async fn list(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = api
            .store
            .list(
                Collection::CaCertificates,
                ListQuery {
                    partition: None,
                    after: after.clone(),
                    limit: 500,
                },
            )
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for r in page {
            let (ca, etag) = decode(r)?;
            out.push(view(ca, etag));
        }
    }
    Ok(json_ok(&out))
}

async fn get_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (ca, etag) = load(&api, &name).await?;
    Ok(json_ok(&view(ca, etag)))
}

async fn put_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    check_name(&name)?;
    let text = certificate_body(&api, &headers, body).await?;
    let mut ca = CaCertificate::new(&name, &text)
        .map_err(|e| ApiError::new(ErrorCode::InvalidCertificate, format!("certificate: {e}")))?;
    let existing = api
        .store
        .get(Collection::CaCertificates, &CaCertificate::key(&name))
        .await?;
    let expect = match existing {
        Some(r) => {
            let (old, etag) = decode(r)?;
            if old.info.sha256_thumbprint == ca.info.sha256_thumbprint {
                ca.is_verified = old.is_verified;
                ca.verification_code = old.verification_code;
            }
            ca.name = old.name;
            Expect::Etag(etag)
        }
        None => Expect::Absent,
    };
    let etag = save(&api, &ca, expect).await?;
    Ok(json_ok(&view(ca, etag)))
}

async fn verification_code(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (mut ca, etag) = load(&api, &name).await?;
    let code = random_hex(&*api.entropy, 24).to_ascii_uppercase();
    ca.verification_code = Some(code.clone());
    let etag = save(&api, &ca, Expect::Etag(etag)).await?;
    Ok(json_ok(&serde_json::json!({
        "name": ca.name,
        "verificationCode": code,
        "isVerified": ca.is_verified,
        "etag": etag,
    })))
}

async fn verify(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let text = certificate_body(&api, &headers, body).await?;
    let (mut ca, etag) = load(&api, &name).await?;
    check_proof_of_possession(&ca, &text)
        .map_err(|e| ApiError::new(ErrorCode::ProofOfPossessionFailed, e.to_string()))?;
    ca.is_verified = true;
    ca.verification_code = None;
    let etag = save(&api, &ca, Expect::Etag(etag)).await?;
    Ok(json_ok(&view(ca, etag)))
}

async fn delete_one(
    State(api): State<ServiceApi>,
    Path(name): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::ServiceConfig)?;
    let (_, etag) = load(&api, &name).await?;
    api.store
        .write(vec![Write::delete(
            Collection::CaCertificates,
            CaCertificate::key(&name),
            Expect::Etag(etag),
        )])
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
