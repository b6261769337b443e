"""azure-iothub-provisioningserviceclient 1.2.0 (api-version 2018-09-01-preview) against Muster.

The legacy client trusts the test CA through REQUESTS_CA_BUNDLE (set by the
`muster` fixture); it takes no TLS option of its own.
"""

from __future__ import annotations

import secrets

import pytest
from provisioningserviceclient import (
    BulkEnrollmentOperation,
    ProvisioningServiceClient,
    ProvisioningServiceError,
    QuerySpecification,
)
from provisioningserviceclient.models import (
    AttestationMechanism,
    EnrollmentGroup,
    IndividualEnrollment,
    InitialTwin,
    ReprovisionPolicy,
    SymmetricKeyAttestation,
)

from helpers import (
    TEST_ENDORSEMENT_KEY,
    assert_generated_key,
    make_cert,
    unique,
)


@pytest.fixture
def legacy(muster) -> ProvisioningServiceClient:
    return ProvisioningServiceClient.create_from_connection_string(muster.connection_string)


def status_of(err: ProvisioningServiceError) -> int:
    assert err.cause is not None, f"no HTTP cause on {err!r}"
    return err.cause.response.status_code


def sym_attestation() -> AttestationMechanism:
    # 1.2.0 has no create_with_symmetric_key helper; the generated model is public.
    return AttestationMechanism(type="symmetricKey", symmetric_key=SymmetricKeyAttestation())


def test_legacy_symmetric_key_enrollment_lifecycle(legacy):
    reg_id = unique("legacy-sym")
    device_id = unique("legacy-device")
    twin = InitialTwin.create(tags={"env": "legacy"}, desired_properties={"interval": 30})
    enrollment = IndividualEnrollment.create(
        reg_id,
        sym_attestation(),
        device_id=device_id,
        initial_twin=twin,
        reprovision_policy=ReprovisionPolicy(update_hub_assignment=True, migrate_device_data=False),
    )
    created = legacy.create_or_update(enrollment)
    assert isinstance(created, IndividualEnrollment)
    assert created.registration_id == reg_id
    assert created.device_id == device_id
    assert created.provisioning_status == "enabled"
    assert created.etag
    keys = created.attestation.symmetric_key
    assert_generated_key(keys.primary_key)
    assert_generated_key(keys.secondary_key)
    assert created.initial_twin.tags == {"env": "legacy"}
    assert created.initial_twin.desired_properties == {"interval": 30}
    assert created.reprovision_policy.update_hub_assignment is True
    assert created.reprovision_policy.migrate_device_data is False
    assert created.created_date_time_utc is not None

    got = legacy.get_individual_enrollment(reg_id)
    assert got.registration_id == reg_id
    assert got.attestation.type == "symmetricKey"
    assert got.attestation.symmetric_key is None, "GET must not return symmetric keys"
    assert got.registration_state is not None
    assert got.registration_state.registration_id == reg_id
    assert got.registration_state.status == "unassigned"
    assert got.initial_twin.tags == {"env": "legacy"}

    att = legacy.get_individual_enrollment_attestation_mechanism(reg_id)
    assert att.type == "symmetricKey"
    assert att.symmetric_key.primary_key == keys.primary_key
    assert att.symmetric_key.secondary_key == keys.secondary_key

    # Update: the model's etag becomes If-Match.
    old_etag = got.etag
    got.provisioning_status = "disabled"
    updated = legacy.create_or_update(got)
    assert updated.provisioning_status == "disabled"
    assert updated.etag and updated.etag != old_etag
    att = legacy.get_individual_enrollment_attestation_mechanism(reg_id)
    assert att.symmetric_key.primary_key == keys.primary_key, "update without keys must keep them"

    # Stale etag: 412.
    got.etag = old_etag
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.create_or_update(got)
    assert status_of(exc.value) == 412

    # Blind create over an existing record: 409.
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.create_or_update(IndividualEnrollment.create(reg_id, sym_attestation()))
    assert status_of(exc.value) == 409

    # Delete with the current etag (taken from the model).
    legacy.delete(updated)
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.get_individual_enrollment(reg_id)
    assert status_of(exc.value) == 404


def test_legacy_tpm_enrollment(legacy):
    reg_id = unique("legacy-tpm")
    created = legacy.create_or_update(
        IndividualEnrollment.create(reg_id, AttestationMechanism.create_with_tpm(TEST_ENDORSEMENT_KEY))
    )
    assert created.attestation.tpm.endorsement_key == TEST_ENDORSEMENT_KEY
    got = legacy.get_individual_enrollment(reg_id)
    assert got.attestation.tpm.endorsement_key == TEST_ENDORSEMENT_KEY
    att = legacy.get_individual_enrollment_attestation_mechanism(reg_id)
    assert att.tpm.endorsement_key == TEST_ENDORSEMENT_KEY
    legacy.delete_individual_enrollment_by_param(reg_id)
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.get_individual_enrollment(reg_id)
    assert status_of(exc.value) == 404


def test_legacy_x509_signing_certificate_group(legacy):
    group_id = unique("legacy-x509-group")
    ca = make_cert(unique("Legacy Test Root"), ca=True)
    created = legacy.create_or_update(
        EnrollmentGroup.create(group_id, AttestationMechanism.create_with_x509_signing_certs(ca.pem))
    )
    assert isinstance(created, EnrollmentGroup)
    assert created.enrollment_group_id == group_id
    assert created.attestation.type == "x509"
    info = created.attestation.x509.signing_certificates.primary.info
    assert info.subject_name == f"CN={ca.subject_cn}"
    assert info.sha256_thumbprint == ca.sha256
    assert info.sha1_thumbprint == ca.sha1
    assert int(info.serial_number, 16) == ca.cert.serial_number
    assert info.version == 3
    assert info.not_before_utc == ca.cert.not_valid_before_utc
    assert info.not_after_utc == ca.cert.not_valid_after_utc
    assert not created.attestation.x509.signing_certificates.primary.certificate

    got = legacy.get_enrollment_group(group_id)
    assert got.attestation.x509.signing_certificates.primary.info.sha256_thumbprint == ca.sha256
    att = legacy.get_enrollment_group_attestation_mechanism(group_id)
    assert att.x509.signing_certificates.primary.info.sha256_thumbprint == ca.sha256

    got.provisioning_status = "disabled"
    updated = legacy.create_or_update(got)
    assert updated.provisioning_status == "disabled"
    assert updated.attestation.x509.signing_certificates.primary.info.sha256_thumbprint == ca.sha256

    groups = [g for page in legacy.create_enrollment_group_query(QuerySpecification("SELECT *")) for g in page]
    assert [g.enrollment_group_id for g in groups] == [group_id]

    legacy.delete_enrollment_group_by_param(group_id, updated.etag)
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.get_enrollment_group(group_id)
    assert status_of(exc.value) == 404


def test_legacy_symmetric_key_group_attestation(legacy):
    group_id = unique("legacy-sym-group")
    created = legacy.create_or_update(EnrollmentGroup.create(group_id, sym_attestation()))
    assert_generated_key(created.attestation.symmetric_key.primary_key)
    att = legacy.get_enrollment_group_attestation_mechanism(group_id)
    assert att.symmetric_key.primary_key == created.attestation.symmetric_key.primary_key
    assert legacy.get_enrollment_group(group_id).attestation.symmetric_key is None


def test_legacy_bulk_create_and_query_paging(legacy):
    ids = [f"legacy-page-{n:02d}-{secrets.token_hex(3)}" for n in range(25)]
    enrollments = [IndividualEnrollment.create(i, sym_attestation()) for i in ids]
    result = legacy.run_bulk_operation(BulkEnrollmentOperation("create", enrollments))
    assert result.is_successful is True, result.errors
    assert not result.errors

    query = legacy.create_individual_enrollment_query(QuerySpecification("SELECT *"), page_size=10)
    pages = [page for page in query]
    assert [len(p) for p in pages] == [10, 10, 5]
    seen = [e.registration_id for p in pages for e in p]
    assert sorted(seen) == sorted(ids), "every enrollment exactly once"
    assert all(e.attestation.symmetric_key is None for p in pages for e in p), "query must not return keys"
    assert query.has_next is False

    result = legacy.run_bulk_operation(BulkEnrollmentOperation("delete", enrollments))
    assert result.is_successful is True, result.errors
    assert list(legacy.create_individual_enrollment_query(QuerySpecification("SELECT *"))) == []


def test_legacy_registration_states(legacy):
    group_id = unique("legacy-reg-group")
    legacy.create_or_update(EnrollmentGroup.create(group_id, sym_attestation()))

    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.get_registration_state(unique("never-registered"))
    assert status_of(exc.value) == 404

    # The SDK's own wrapper is broken client-side in 1.2.0: Query.next() calls
    # query_device_registration_states(id, page_size, token, raw=True), whose
    # signature is (id, custom_headers, raw) -> TypeError before any request.
    # Use the generated operation it wraps (same request: POST /registrations/{id}/query).
    with pytest.raises(TypeError):
        list(legacy.create_registration_state_query(group_id))
    raw = legacy._runtime_client.query_device_registration_states(group_id, raw=True)
    assert raw.output == []
    assert raw.response.headers.get("x-ms-item-type") == "DeviceRegistration"
    assert "x-ms-continuation" not in raw.response.headers

    # Delete of an unknown registration: 404.
    with pytest.raises(ProvisioningServiceError) as exc:
        legacy.delete_registration_state_by_param(unique("never-registered"))
    assert status_of(exc.value) == 404
