//! Issued certificates in the engine: each one recorded (with its audit entry) before it can
//! leave the server, revoked ones refused when a device attests with them, and revocation
//! taking the certificate off the device's hub identity.
//!
//! Revoking the registration's current certificate puts the hub device back with
//! authentication `none` (IoT Hub's type for "no credential"): the thumbprint is gone, so no
//! connection is accepted with the certificate or any other, until the device registers again
//! (with a new CSR: a fresh certificate; without one: its enrollment's own credentials). A
//! revocation racing a rotation may clear the new certificate too; that fails closed, and the
//! next registration writes the device again.

use muster_proto::audit::{AuditEntry, AuditSource};
use muster_proto::issued_certificate::IssuedCertificate;
use muster_proto::{ErrorCode, RegistrationId, Timestamp};
use muster_store::issued::{self, Revoked};
use muster_store::Collection;
use tracing::{info, warn};

use super::{decode_record, Engine};
use crate::device_auth::Matched;
use crate::hub_client::{HubAuthentication, HubDeviceSpec, TwinWrite};
use crate::issuance::Issued;
use crate::DeviceFailure;

/// The audit log's route for a certificate issued to a device (source `device`).
pub const ISSUE_AUDIT_ROUTE: &str = "/certificates/issued/{serial}";

/// What revoking did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The record as stored (revoked now or before).
    pub certificate: IssuedCertificate,
    /// The hub device whose credential was cleared (`{hub}/{device id}`), if it was the
    /// registration's current certificate.
    pub cleared: Option<String>,
}

impl Engine {
    /// Records `issued` (and its audit entry) in one store write; a certificate whose record
    /// did not land is never handed out.
    pub(super) async fn record_issued(
        &self,
        issued: &Issued,
        registration_id: &RegistrationId,
        matched: &Matched,
        issuing_ca: &str,
        now: Timestamp,
    ) -> Result<(), DeviceFailure> {
        let info = &issued.info;
        let cert = IssuedCertificate {
            serial_number: info.serial_number.clone(),
            sha256_thumbprint: info.sha256_thumbprint.clone(),
            registration_id: registration_id.to_string(),
            enrollment_type: match matched {
                Matched::Individual(_) => "individual".into(),
                Matched::Group(_) => "group".into(),
            },
            enrollment_group_id: matched.group_id(),
            issuing_ca: issuing_ca.to_string(),
            subject_name: info.subject_name.clone(),
            issuer_name: info.issuer_name.clone(),
            not_before_utc: info.not_before_utc,
            not_after_utc: info.not_after_utc,
            issued_date_time_utc: now,
            revoked_date_time_utc: None,
            revocation_reason: None,
        };
        let entry = AuditEntry {
            time: now,
            policy: None,
            source: AuditSource::Device,
            method: "PUT".into(),
            route: ISSUE_AUDIT_ROUTE.into(),
            id: Some(cert.serial_number.clone()),
            status: 201,
            error_code: None,
        };
        let writes = vec![
            issued::record_write(&cert)?,
            muster_store::audit::append_write(&entry, &*self.0.entropy)?,
        ];
        let outcome = self.0.store.write(writes).await?;
        if !outcome.first().is_some_and(|o| o.is_applied()) {
            return Err(DeviceFailure::internal(
                "recording an issued certificate",
                format!("serial {} is recorded already", cert.serial_number),
            ));
        }
        Ok(())
    }

    /// Refuses a device whose X.509 leaf is a certificate Muster issued and an operator
    /// revoked (one store read by its serial; the thumbprint must match too, so another CA's
    /// certificate with the same serial is not mistaken for it).
    pub(super) async fn refuse_revoked(&self, leaf: &[u8]) -> Result<(), DeviceFailure> {
        let Ok(cert) = muster_attestation::Certificate::from_der(leaf.to_vec()) else {
            return Ok(()); // attestation reports the malformed certificate
        };
        let Ok(info) = cert.info() else {
            return Ok(());
        };
        let Some(record) = issued::get(&*self.0.store, &info.serial_number).await? else {
            return Ok(());
        };
        if record.is_revoked()
            && record
                .sha256_thumbprint
                .eq_ignore_ascii_case(&cert.sha256_thumbprint())
        {
            return Err(DeviceFailure::new(
                ErrorCode::CertificateRevoked,
                format!(
                    "the client certificate (serial {}) was issued by Muster and has been revoked; register with a new csr using another credential",
                    record.serial_number
                ),
            ));
        }
        Ok(())
    }

    /// The names of the issuing CAs `certificateIssuance.issuingCa` may use.
    pub fn issuing_ca_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.issuing_cas.keys().cloned().collect();
        names.sort();
        names
    }

    /// Revokes the issued certificate with `serial` and, when it is its registration's
    /// current certificate, clears it from the hub device. Revoking again re-applies the
    /// clearing (a first attempt may have met an unreachable hub) and keeps the first reason.
    pub async fn revoke_issued(
        &self,
        serial: &str,
        reason: Option<String>,
    ) -> Result<Revocation, DeviceFailure> {
        let now = self.0.clock.now();
        let certificate = match issued::revoke(&*self.0.store, serial, now, reason).await? {
            Revoked::Now(c) => {
                info!(serial = %c.serial_number, registration = %c.registration_id,
                    "revoked an issued certificate");
                c
            }
            Revoked::Already(c) => c,
            Revoked::NotFound => {
                return Err(DeviceFailure::new(
                    ErrorCode::IssuedCertificateNotFound,
                    format!("no issued certificate has serial number {serial}"),
                ))
            }
        };
        let cleared = self.clear_from_hub(&certificate).await?;
        Ok(Revocation {
            certificate,
            cleared,
        })
    }

    async fn clear_from_hub(
        &self,
        cert: &IssuedCertificate,
    ) -> Result<Option<String>, DeviceFailure> {
        let key = cert.registration_id.to_ascii_lowercase();
        let Some(stored) = self.0.store.get(Collection::Registrations, &key).await? else {
            return Ok(None);
        };
        let record = decode_record(&stored)?;
        let current = record
            .state
            .issued_certificate
            .as_ref()
            .is_some_and(|i| i.serial_number.eq_ignore_ascii_case(&cert.serial_number));
        let (Some(hub), Some(device_id)) = (record.state.assigned_hub, record.state.device_id)
        else {
            return Ok(None);
        };
        if !current {
            return Ok(None);
        }
        let linked = self.linked_hubs().await?;
        let Some(target) = linked.iter().find(|h| h.name.eq_ignore_ascii_case(&hub)) else {
            warn!(%hub, serial = %cert.serial_number,
                "revoked certificate's hub is not linked; its device keeps the thumbprint");
            return Err(DeviceFailure::new(
                ErrorCode::HubNotLinked,
                format!("the certificate is revoked, but hub '{hub}' of device '{device_id}' is not linked, so its identity still holds the thumbprint; remove it there"),
            ));
        };
        let hub_connection = self.connection(target);
        // The put replaces the whole identity: an IoT Edge device stays one.
        let iot_edge = hub_connection
            .get_twin(&device_id)
            .await
            .map_err(super::hub_failure)?
            .and_then(|t| t.pointer("/capabilities/iotEdge").and_then(|v| v.as_bool()))
            .unwrap_or(false);
        let spec = HubDeviceSpec {
            device_id: device_id.clone(),
            authentication: HubAuthentication::None,
            iot_edge,
        };
        hub_connection
            .put_device(&spec, TwinWrite::Keep)
            .await
            .map_err(super::hub_failure)?;
        info!(%hub, device = %device_id, serial = %cert.serial_number,
            "cleared a revoked certificate from its hub device");
        Ok(Some(format!("{hub}/{device_id}")))
    }
}
