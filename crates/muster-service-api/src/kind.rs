//! [`EnrollmentKind`]: what differs between individual enrollments and enrollment groups, so
//! one set of handlers serves both.

use muster_proto::{
    AllocationPolicy, AttestationMechanism, CustomAllocationDefinition, DeviceRegistrationState,
    EnrollmentGroup, EnrollmentGroupId, ErrorCode, IndividualEnrollment, ItemType, RegistrationId,
    Timestamp,
};
use muster_store::records::Etagged;
use muster_store::Collection;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

pub trait EnrollmentKind:
    Serialize + DeserializeOwned + Etagged + Clone + Send + Sync + 'static
{
    const COLLECTION: Collection;
    const ITEM_TYPE: ItemType;
    const NOT_FOUND: ErrorCode;
    const EXISTS: ErrorCode;
    const INVALID_ID: ErrorCode;
    /// "enrollment" or "enrollment group", for messages.
    const NOUN: &'static str;
    /// The JSON field that carries the id.
    const ID_FIELD: &'static str;
    /// Whether this kind can hold individual client certificates (else signing certs / CA refs).
    const INDIVIDUAL: bool;
    /// The array field of a bulk operation body.
    const BULK_FIELD: &'static str;

    /// Validates an id from a path or body; returns its lookup key.
    fn id_key(id: &str) -> Result<String, ApiError>;
    fn id(&self) -> &str;
    fn attestation(&self) -> &AttestationMechanism;
    fn attestation_mut(&mut self) -> &mut AttestationMechanism;
    fn created(&self) -> Option<Timestamp>;
    fn set_timestamps(&mut self, created: Timestamp, updated: Timestamp);
    fn allocation(
        &self,
    ) -> (
        Option<AllocationPolicy>,
        Option<&Vec<String>>,
        Option<&CustomAllocationDefinition>,
    );
    /// Individual enrollments show their device's registration record on GET.
    fn set_registration_state(&mut self, state: Option<DeviceRegistrationState>);
    /// Clears fields clients may send but only the service sets.
    fn clear_read_only(&mut self);
    /// Checks specific to this kind (device id rules, attestation types it allows).
    fn validate_kind(&self) -> Result<(), ApiError>;
    /// Muster's `certificateIssuance` extension.
    fn certificate_issuance(&self) -> Option<&muster_proto::CertificateIssuance>;
}

impl EnrollmentKind for IndividualEnrollment {
    const COLLECTION: Collection = Collection::Enrollments;
    const ITEM_TYPE: ItemType = ItemType::Enrollment;
    const NOT_FOUND: ErrorCode = ErrorCode::EnrollmentNotFound;
    const EXISTS: ErrorCode = ErrorCode::EnrollmentExists;
    const INVALID_ID: ErrorCode = ErrorCode::InvalidRegistrationId;
    const NOUN: &'static str = "enrollment";
    const ID_FIELD: &'static str = "registrationId";
    const INDIVIDUAL: bool = true;
    const BULK_FIELD: &'static str = "enrollments";

    fn id_key(id: &str) -> Result<String, ApiError> {
        RegistrationId::new(id)
            .map(|i| i.key())
            .map_err(|e| ApiError::new(Self::INVALID_ID, e.to_string()))
    }
    fn id(&self) -> &str {
        self.registration_id.as_str()
    }
    fn attestation(&self) -> &AttestationMechanism {
        &self.attestation
    }
    fn attestation_mut(&mut self) -> &mut AttestationMechanism {
        &mut self.attestation
    }
    fn created(&self) -> Option<Timestamp> {
        self.created_date_time_utc
    }
    fn set_timestamps(&mut self, created: Timestamp, updated: Timestamp) {
        self.created_date_time_utc = Some(created);
        self.last_updated_date_time_utc = Some(updated);
    }
    fn allocation(
        &self,
    ) -> (
        Option<AllocationPolicy>,
        Option<&Vec<String>>,
        Option<&CustomAllocationDefinition>,
    ) {
        (
            self.allocation_policy,
            self.iot_hubs.as_ref(),
            self.custom_allocation_definition.as_ref(),
        )
    }
    fn set_registration_state(&mut self, state: Option<DeviceRegistrationState>) {
        self.registration_state = state;
    }
    fn clear_read_only(&mut self) {
        self.registration_state = None;
        self.etag = None;
    }
    fn certificate_issuance(&self) -> Option<&muster_proto::CertificateIssuance> {
        self.certificate_issuance.as_ref()
    }
    fn validate_kind(&self) -> Result<(), ApiError> {
        if let Some(d) = &self.device_id {
            validate_device_id(d)?;
        }
        validate_issuance(self.certificate_issuance.as_ref())
    }
}

impl EnrollmentKind for EnrollmentGroup {
    const COLLECTION: Collection = Collection::EnrollmentGroups;
    const ITEM_TYPE: ItemType = ItemType::EnrollmentGroup;
    const NOT_FOUND: ErrorCode = ErrorCode::EnrollmentGroupNotFound;
    const EXISTS: ErrorCode = ErrorCode::EnrollmentGroupExists;
    const INVALID_ID: ErrorCode = ErrorCode::InvalidEnrollmentGroupId;
    const NOUN: &'static str = "enrollment group";
    const ID_FIELD: &'static str = "enrollmentGroupId";
    const INDIVIDUAL: bool = false;
    const BULK_FIELD: &'static str = "enrollmentGroups";

    fn id_key(id: &str) -> Result<String, ApiError> {
        EnrollmentGroupId::new(id)
            .map(|i| i.key())
            .map_err(|e| ApiError::new(Self::INVALID_ID, e.to_string()))
    }
    fn id(&self) -> &str {
        self.enrollment_group_id.as_str()
    }
    fn attestation(&self) -> &AttestationMechanism {
        &self.attestation
    }
    fn attestation_mut(&mut self) -> &mut AttestationMechanism {
        &mut self.attestation
    }
    fn created(&self) -> Option<Timestamp> {
        self.created_date_time_utc
    }
    fn set_timestamps(&mut self, created: Timestamp, updated: Timestamp) {
        self.created_date_time_utc = Some(created);
        self.last_updated_date_time_utc = Some(updated);
    }
    fn allocation(
        &self,
    ) -> (
        Option<AllocationPolicy>,
        Option<&Vec<String>>,
        Option<&CustomAllocationDefinition>,
    ) {
        (
            self.allocation_policy,
            self.iot_hubs.as_ref(),
            self.custom_allocation_definition.as_ref(),
        )
    }
    fn set_registration_state(&mut self, _: Option<DeviceRegistrationState>) {}
    fn clear_read_only(&mut self) {
        self.etag = None;
    }
    fn certificate_issuance(&self) -> Option<&muster_proto::CertificateIssuance> {
        self.certificate_issuance.as_ref()
    }
    fn validate_kind(&self) -> Result<(), ApiError> {
        validate_issuance(self.certificate_issuance.as_ref())
    }
}

/// Muster's `certificateIssuance` extension: the validity range.
fn validate_issuance(issuance: Option<&muster_proto::CertificateIssuance>) -> Result<(), ApiError> {
    issuance
        .map(|i| i.validate())
        .transpose()
        .map(|_| ())
        .map_err(|m| ApiError::new(ErrorCode::InvalidField, m))
}

/// IoT Hub device ids: up to 128 characters from letters, digits and `-.%_*?!(),:=@$'`.
pub fn validate_device_id(id: &str) -> Result<(), ApiError> {
    let bad = |why: String| ApiError::new(ErrorCode::InvalidField, format!("deviceId {why}"));
    if id.is_empty() {
        return Err(bad("is empty".into()));
    }
    if id.chars().count() > 128 {
        return Err(bad("is longer than 128 characters".into()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(*c)))
    {
        return Err(bad(format!(
            "contains {c:?}; IoT Hub device ids allow letters, digits and -.%_*?!(),:=@$'"
        )));
    }
    Ok(())
}
