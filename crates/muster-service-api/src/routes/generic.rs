//! Handlers shared by individual enrollments and enrollment groups, generic over
//! [`EnrollmentKind`].

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_proto::{
    AccessRight, AttestationType, BulkEnrollmentOperationError, BulkEnrollmentOperationResult,
    BulkOperationMode, DeviceRegistrationState, ErrorCode,
};
use muster_store::records::{self, Stored};
use muster_store::{Collection, Expect, ListQuery, Write, WriteOutcome};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::kind::EnrollmentKind;
use crate::prepare::prepare;
use crate::redact;
use crate::request::Path;
use crate::request::{
    api_version, check_query_body, if_match, json_kind, json_ok, page_request, page_response,
    paginate, parse_json_object, read_body, require_json, IfMatch, QueryParams,
};
use crate::ServiceApi;

/// Authorizes the caller and checks the api-version, in that order.
pub(crate) fn admit(
    api: &ServiceApi,
    headers: &HeaderMap,
    params: &QueryParams,
    right: AccessRight,
) -> Result<(), ApiError> {
    api.auth
        .authorize(headers, right, api.clock.now().unix_seconds())?;
    api_version(params)?;
    Ok(())
}

/// `certificateIssuance.issuingCa` must name an issuing CA this server has.
fn check_issuing_ca(
    api: &ServiceApi,
    issuance: Option<&muster_proto::CertificateIssuance>,
) -> Result<(), ApiError> {
    let Some(name) = issuance.and_then(|i| i.issuing_ca.as_deref()) else {
        return Ok(());
    };
    let known = match &api.certificates {
        Some(c) => c.issuing_ca_names(),
        None => vec![muster_proto::issued_certificate::LOCAL_ISSUING_CA.to_string()],
    };
    if known.iter().any(|k| k == name) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::InvalidField,
        format!(
            "certificateIssuance.issuingCa '{name}' is not an issuing CA of this server (it has: {})",
            known.join(", ")
        ),
    ))
}

fn not_found<K: EnrollmentKind>(id: &str) -> ApiError {
    ApiError::new(K::NOT_FOUND, format!("{} '{id}' not found", K::NOUN))
}

pub(crate) async fn get<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentRead)?;
    let key = K::id_key(&id)?;
    let mut stored = records::get::<K>(&*api.store, K::COLLECTION, &key)
        .await?
        .ok_or_else(|| not_found::<K>(&id))?
        .value;
    redact::for_read(stored.attestation_mut());
    if K::INDIVIDUAL {
        let state = match records::get::<DeviceRegistrationState>(
            &*api.store,
            Collection::Registrations,
            &key,
        )
        .await?
        {
            Some(s) => s.value,
            None => DeviceRegistrationState::unassigned(
                muster_proto::RegistrationId::new(stored.id())
                    .map_err(|e| ApiError::internal("reading a stored enrollment", e))?,
            ),
        };
        stored.set_registration_state(Some(state));
    }
    Ok(json_ok(&stored))
}

/// Parses an enrollment body for the record at `path_id`. The id may be omitted in the body;
/// when present it must name the same record.
fn parse_enrollment<K: EnrollmentKind>(
    mut obj: Map<String, Value>,
    path_id: Option<&str>,
) -> Result<K, ApiError> {
    match (obj.get(K::ID_FIELD), path_id) {
        (None | Some(Value::Null), Some(p)) => {
            obj.insert(K::ID_FIELD.into(), Value::String(p.to_string()));
        }
        (None | Some(Value::Null), None) => {
            return Err(ApiError::new(
                ErrorCode::MalformedBody,
                format!("{} is required", K::ID_FIELD),
            ))
        }
        (Some(Value::String(body_id)), _) => {
            K::id_key(body_id)?;
            if let Some(p) = path_id {
                if !body_id.eq_ignore_ascii_case(p) {
                    return Err(ApiError::new(
                        ErrorCode::IdMismatch,
                        format!(
                            "{} {body_id:?} in the body differs from {p:?} in the path",
                            K::ID_FIELD
                        ),
                    ));
                }
            }
        }
        (Some(other), _) => {
            return Err(ApiError::new(
                ErrorCode::MalformedBody,
                format!("{} must be a string, not {}", K::ID_FIELD, json_kind(other)),
            ))
        }
    }
    match obj.get("attestation") {
        None | Some(Value::Null) => {
            return Err(ApiError::new(
                ErrorCode::InvalidAttestation,
                "attestation is required",
            ))
        }
        Some(Value::Object(a)) => match a.get("type") {
            Some(Value::String(t)) => {
                AttestationType::parse(t)
                    .map_err(|m| ApiError::new(ErrorCode::InvalidAttestation, m))?;
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidAttestation,
                    "attestation.type is required",
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidAttestation,
                format!("attestation must be an object, not {}", json_kind(other)),
            ))
        }
    }
    serde_json::from_value(Value::Object(obj)).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedBody,
            format!("the body is not a valid {}: {e}", K::NOUN),
        )
    })
}

fn stored_body<K: EnrollmentKind>(value: &K) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal("encoding an enrollment", e))
}

pub(crate) async fn put<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentWrite)?;
    let key = K::id_key(&id)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    let incoming = parse_enrollment::<K>(parse_json_object(&bytes)?, Some(&id))?;
    let existing = records::get::<K>(&*api.store, K::COLLECTION, &key).await?;
    let expect = match (&existing, if_match(&headers)) {
        (None, IfMatch::Etag(_)) => {
            return Err(ApiError::new(
                ErrorCode::PreconditionFailed,
                format!("If-Match names an etag, but no {} '{id}' exists", K::NOUN),
            ))
        }
        (None, _) => Expect::Absent,
        (Some(_), IfMatch::None) => {
            return Err(ApiError::new(
                K::EXISTS,
                format!(
                    "{} '{id}' already exists; send If-Match with its etag (or *) to replace it",
                    K::NOUN
                ),
            ))
        }
        (Some(s), IfMatch::Any) => Expect::Etag(s.etag.clone()),
        (Some(s), IfMatch::Etag(e)) if e == s.etag => Expect::Etag(e),
        (Some(_), IfMatch::Etag(_)) => return Err(etag_mismatch::<K>(&id)),
    };
    let mut prepared = prepare(
        incoming,
        existing.as_ref().map(|s| &s.value),
        api.clock.now(),
        &*api.entropy,
    )?;
    check_issuing_ca(&api, prepared.certificate_issuance())?;
    crate::references::check(&*api.store, &prepared, existing.as_ref().map(|s| &s.value)).await?;
    let write = Write::put(K::COLLECTION, key, expect, stored_body(&prepared)?);
    let outcome = api.store.write(vec![write]).await?.into_iter().next();
    match outcome {
        Some(WriteOutcome::Written { etag }) => {
            prepared.set_etag(Some(etag));
            redact::for_owner(prepared.attestation_mut());
            Ok(json_ok(&prepared))
        }
        Some(WriteOutcome::AlreadyExists) => Err(ApiError::new(
            K::EXISTS,
            format!("{} '{id}' was created concurrently", K::NOUN),
        )),
        _ => Err(etag_mismatch::<K>(&id)),
    }
}

fn etag_mismatch<K: EnrollmentKind>(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::PreconditionFailed,
        format!(
            "If-Match does not match the current etag of {} '{id}'",
            K::NOUN
        ),
    )
}

pub(crate) async fn delete<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentWrite)?;
    let key = K::id_key(&id)?;
    let existing = api
        .store
        .get(K::COLLECTION, &key)
        .await?
        .ok_or_else(|| not_found::<K>(&id))?;
    let if_match = if_match(&headers);
    if !if_match.matches(&existing.etag) {
        return Err(etag_mismatch::<K>(&id));
    }
    let outcome = api
        .store
        .write(vec![Write::delete(
            K::COLLECTION,
            key.clone(),
            Expect::Etag(existing.etag),
        )])
        .await?
        .into_iter()
        .next();
    match outcome {
        Some(WriteOutcome::Deleted) => {}
        Some(WriteOutcome::NotFound) => return Err(not_found::<K>(&id)),
        _ => return Err(etag_mismatch::<K>(&id)),
    }
    if K::INDIVIDUAL {
        delete_individual_registration(&api, &key).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// An individual enrollment's registration record goes with it (records are 1:1); a record
/// that came from a group stays, as DPS keeps group records.
async fn delete_individual_registration(api: &ServiceApi, key: &str) -> Result<(), ApiError> {
    if let Some(reg) = api.store.get(Collection::Registrations, key).await? {
        if reg.partition.is_none() {
            api.store
                .write(vec![Write::delete(
                    Collection::Registrations,
                    key,
                    Expect::Etag(reg.etag),
                )])
                .await?;
        }
    }
    Ok(())
}

pub(crate) async fn attestation_mechanism<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Path(id): Path<String>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentRead)?;
    let key = K::id_key(&id)?;
    let mut stored = records::get::<K>(&*api.store, K::COLLECTION, &key)
        .await?
        .ok_or_else(|| not_found::<K>(&id))?
        .value;
    redact::for_owner(stored.attestation_mut());
    Ok(json_ok(stored.attestation()))
}

pub(crate) async fn query<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentRead)?;
    let bytes = read_body(body, api.limits.max_body_bytes).await?;
    check_query_body(&bytes)?;
    let scope = K::COLLECTION.as_str();
    let page = page_request(
        &headers,
        scope,
        api.limits.default_page_size,
        api.limits.max_page_size,
    )?;
    let rows: Vec<Stored<K>> = records::list(
        &*api.store,
        K::COLLECTION,
        ListQuery {
            partition: None,
            after: page.after.clone(),
            limit: page.limit + 1,
        },
    )
    .await?;
    let (rows, continuation) = paginate(rows, &page, scope, |r| K::id_key(r.value.id()).ok());
    let items: Vec<K> = rows
        .into_iter()
        .map(|r| {
            let mut v = r.value;
            redact::for_read(v.attestation_mut());
            v
        })
        .collect();
    Ok(page_response(&items, K::ITEM_TYPE, continuation))
}

pub(crate) async fn bulk<K: EnrollmentKind>(
    State(api): State<ServiceApi>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&api, &headers, &params, AccessRight::EnrollmentWrite)?;
    require_json(&headers)?;
    let bytes = read_body(body, api.limits.max_bulk_body_bytes).await?;
    let mut obj = parse_json_object(&bytes)?;
    let mode = match obj.get("mode") {
        Some(Value::String(m)) => BulkOperationMode::parse(m)
            .map_err(|m| ApiError::new(ErrorCode::InvalidBulkOperation, m))?,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidBulkOperation,
                "mode is required: create, update, updateIfMatchETag or delete",
            ))
        }
    };
    let items = match obj.remove(K::BULK_FIELD) {
        Some(Value::Array(items)) => items,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidBulkOperation,
                format!("{} must be an array", K::BULK_FIELD),
            ))
        }
    };
    if items.len() > api.limits.max_bulk_items {
        return Err(ApiError::new(
            ErrorCode::InvalidBulkOperation,
            format!(
                "a bulk operation takes at most {} items; this one has {}",
                api.limits.max_bulk_items,
                items.len()
            ),
        ));
    }

    let now = api.clock.now();
    let mut errors: Vec<BulkEnrollmentOperationError> = Vec::new();
    // Writes that passed validation, with the id each belongs to.
    let mut writes: Vec<Write> = Vec::new();
    let mut write_ids: Vec<String> = Vec::new();
    let mut deleted_individuals: Vec<String> = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let item_id = item
            .get(K::ID_FIELD)
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("#{index}"));
        match plan_bulk_item::<K>(&api, mode, item, now).await {
            Ok(write) => {
                if mode == BulkOperationMode::Delete && K::INDIVIDUAL {
                    deleted_individuals.push(write.key.clone());
                }
                writes.push(write);
                write_ids.push(item_id);
            }
            Err(e) => errors.push(bulk_error::<K>(item_id, &e)),
        }
    }
    let outcomes = if writes.is_empty() {
        Vec::new()
    } else {
        api.store.write(writes).await?
    };
    for (outcome, id) in outcomes.iter().zip(write_ids) {
        let err = match outcome {
            WriteOutcome::Written { .. } | WriteOutcome::Deleted => continue,
            WriteOutcome::AlreadyExists => ApiError::new(
                K::EXISTS,
                format!("{} already exists.", capitalised(K::NOUN)),
            ),
            WriteOutcome::NotFound => not_found::<K>(&id),
            WriteOutcome::EtagMismatch => etag_mismatch::<K>(&id),
            // No bulk write is required of the others.
            WriteOutcome::RolledBack => {
                ApiError::internal("writing a bulk item", "rolled back with its batch")
            }
        };
        errors.push(bulk_error::<K>(id, &err));
    }
    for key in deleted_individuals {
        delete_individual_registration(&api, &key).await?;
    }
    Ok(json_ok(&BulkEnrollmentOperationResult {
        is_successful: errors.is_empty(),
        errors,
    }))
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn bulk_error<K: EnrollmentKind>(id: String, e: &ApiError) -> BulkEnrollmentOperationError {
    let (registration_id, enrollment_group_id) = if K::INDIVIDUAL {
        (Some(id), None)
    } else {
        (None, Some(id))
    };
    BulkEnrollmentOperationError {
        registration_id,
        enrollment_group_id,
        error_code: e.code.code(),
        error_status: e.message.clone(),
    }
}

/// Validates one bulk item and turns it into a conditional write.
///
/// Modes: `create` fails on an existing id; `update` creates or replaces; `updateIfMatchETag`
/// replaces only when the item's etag matches; `delete` removes, ignoring etags.
async fn plan_bulk_item<K: EnrollmentKind>(
    api: &ServiceApi,
    mode: BulkOperationMode,
    item: Value,
    now: muster_proto::Timestamp,
) -> Result<Write, ApiError> {
    let Value::Object(obj) = item else {
        return Err(ApiError::new(
            ErrorCode::MalformedBody,
            format!("each item must be a JSON object, not {}", json_kind(&item)),
        ));
    };
    let item_etag = obj
        .get("etag")
        .and_then(Value::as_str)
        .map(|e| e.trim_matches('"').to_string());
    let id = match obj.get(K::ID_FIELD) {
        Some(Value::String(s)) => s.clone(),
        _ => {
            return Err(ApiError::new(
                ErrorCode::MalformedBody,
                format!("{} is required", K::ID_FIELD),
            ))
        }
    };
    let key = K::id_key(&id)?;
    let existing = records::get::<K>(&*api.store, K::COLLECTION, &key).await?;
    if mode == BulkOperationMode::Delete {
        return match existing {
            Some(_) => Ok(Write::delete(K::COLLECTION, key, Expect::Any)),
            None => Err(not_found::<K>(&id)),
        };
    }
    let incoming = parse_enrollment::<K>(obj, None)?;
    let expect = match (mode, &existing) {
        (BulkOperationMode::Create, Some(_)) => {
            return Err(ApiError::new(
                K::EXISTS,
                format!("{} already exists.", capitalised(K::NOUN)),
            ))
        }
        (BulkOperationMode::UpdateIfMatchETag, None) => return Err(not_found::<K>(&id)),
        (BulkOperationMode::UpdateIfMatchETag, Some(s)) => match &item_etag {
            Some(e) if *e == s.etag => Expect::Etag(s.etag.clone()),
            Some(_) => return Err(etag_mismatch::<K>(&id)),
            None => {
                return Err(ApiError::new(
                    ErrorCode::InvalidBulkOperation,
                    "updateIfMatchETag needs an etag on each item",
                ))
            }
        },
        (_, Some(s)) => Expect::Etag(s.etag.clone()),
        (_, None) => Expect::Absent,
    };
    let prepared = prepare(
        incoming,
        existing.as_ref().map(|s| &s.value),
        now,
        &*api.entropy,
    )?;
    check_issuing_ca(api, prepared.certificate_issuance())?;
    crate::references::check(&*api.store, &prepared, existing.as_ref().map(|s| &s.value)).await?;
    Ok(Write::put(
        K::COLLECTION,
        key,
        expect,
        stored_body(&prepared)?,
    ))
}
