"""azure-iot-deviceprovisioning 1.0.0b1 (api-version 2021-10-01) against Muster.

Covers every example in the package README (with the README's two typos fixed:
it writes `client.individual_enrollment` / `client.enrollment_groups`, the real
attributes are `client.enrollment` / `client.enrollment_group`) and the flows of
the package's samples/ (individual enrollments, enrollment groups, bulk
operations), plus paging, ETag rules and error shapes.

Every test gets its own server on an empty data dir (fixture `muster`).
"""

from __future__ import annotations

import base64
import secrets

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)

from conftest import make_dps_client
from helpers import (
    TEST_ENDORSEMENT_KEY,
    assert_cert_info,
    assert_dps_error_body,
    assert_generated_key,
    assert_no_symmetric_keys,
    http_error_body,
    make_cert,
    parse_utc,
    unique,
    upload_verified_ca,
)

SELECT_ALL = {"query": "SELECT *"}


def all_enrollments(dps) -> list[dict]:
    return list(dps.enrollment.query(query_specification=SELECT_ALL))


def all_groups(dps) -> list[dict]:
    return list(dps.enrollment_group.query(query_specification=SELECT_ALL))


# --------------------------------------------------------------------------------------------
# README: "Create the client" (connection string, AzureNamedKeyCredential, AzureSasCredential)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["connection_string", "named_key", "sas_token"])
def test_readme_client_authentication(muster, dps, how):
    from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
    from azure.iot.deviceprovisioning import DeviceProvisioningClient, generate_sas_token

    parts = muster.cs_parts()
    # README style endpoint: scheme and trailing slash. The SDK signs it exactly as
    # given (sr=https%3A%2F%2F127.0.0.2%2F).
    dps_endpoint = f"https://{parts['HostName']}/"
    policy_name, policy_key = parts["SharedAccessKeyName"], parts["SharedAccessKey"]
    if how == "connection_string":
        client = DeviceProvisioningClient.from_connection_string(
            connection_string=muster.connection_string, connection_verify=muster.ca_cert
        )
    elif how == "named_key":
        credential = AzureNamedKeyCredential(name=policy_name, key=policy_key)
        client = DeviceProvisioningClient(
            endpoint=dps_endpoint, credential=credential, connection_verify=muster.ca_cert
        )
    else:
        sas_token = generate_sas_token(dps_endpoint, policy_name, policy_key)
        credential = AzureSasCredential(signature=sas_token)
        client = DeviceProvisioningClient(
            endpoint=dps_endpoint, credential=credential, connection_verify=muster.ca_cert
        )
    enrollment_id = unique(f"auth-{how.replace('_', '-')}")
    client.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
    )
    assert [e["registrationId"] for e in client.enrollment.query(query_specification=SELECT_ALL)] == [
        enrollment_id
    ]
    assert dps.enrollment.get(id=enrollment_id)["registrationId"] == enrollment_id


# --------------------------------------------------------------------------------------------
# README: "Create an individual device enrollment"
# --------------------------------------------------------------------------------------------
def test_readme_symmetric_key_enrollment_with_initial_twin(dps):
    enrollment_id = unique("readme-sym")
    device_id = unique("device")
    initial_twin = {
        "properties": {"desired": {"key": "value"}},
        "tags": {"env": "Development"},
    }
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {"type": "symmetricKey"},
            "deviceId": device_id,
            "initialTwin": initial_twin,
        },
    )

    # PUT response: generated keys, twin echoed verbatim, defaults filled in.
    assert created["registrationId"] == enrollment_id
    assert created["deviceId"] == device_id
    assert created["attestation"]["type"] == "symmetricKey"
    keys = created["attestation"]["symmetricKey"]
    assert_generated_key(keys["primaryKey"])
    assert_generated_key(keys["secondaryKey"])
    assert keys["primaryKey"] != keys["secondaryKey"]
    assert created["initialTwin"] == initial_twin
    assert created["provisioningStatus"] == "enabled"
    assert isinstance(created.get("etag"), str) and created["etag"]
    created_at = parse_utc(created["createdDateTimeUtc"])
    assert parse_utc(created["lastUpdatedDateTimeUtc"]) >= created_at
    assert "registrationState" not in created, "PUT response must not embed registrationState"

    # GET: keys redacted, registrationState embedded, twin verbatim.
    got = dps.enrollment.get(id=enrollment_id)
    assert got["registrationId"] == enrollment_id
    assert got["deviceId"] == device_id
    assert_no_symmetric_keys(got["attestation"], "GET /enrollments/{id}")
    assert got["initialTwin"] == initial_twin
    assert got["provisioningStatus"] == "enabled"
    assert got["etag"] == created["etag"]
    assert got["registrationState"]["registrationId"] == enrollment_id
    assert got["registrationState"]["status"] == "unassigned"
    assert got["registrationState"] == {"registrationId": enrollment_id, "status": "unassigned"}

    # attestationmechanism returns the same keys as the PUT.
    att = dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert att["type"] == "symmetricKey"
    assert att["symmetricKey"]["primaryKey"] == keys["primaryKey"]
    assert att["symmetricKey"]["secondaryKey"] == keys["secondaryKey"]

    # query: present, keys redacted, no registrationState.
    items = all_enrollments(dps)
    assert [e["registrationId"] for e in items] == [enrollment_id]
    assert_no_symmetric_keys(items[0]["attestation"], "enrollment query")
    assert items[0]["initialTwin"] == initial_twin
    assert "registrationState" not in items[0]


def test_sample_symmetric_key_enrollment_with_supplied_keys(dps):
    """User-supplied keys (SDK test style: 32 random bytes each) are stored as given."""
    enrollment_id = unique("sym-keys")
    primary = base64.b64encode(secrets.token_bytes(32)).decode()
    secondary = base64.b64encode(secrets.token_bytes(32)).decode()
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
            },
            "allocationPolicy": "geoLatency",
            "reprovisionPolicy": {"migrateDeviceData": True, "updateHubAssignment": True},
            # The SDK's generate_enrollment() sends explicit nulls for unset fields.
            "capabilities": None,
            "customAllocationDefinition": None,
            "iotHubs": None,
            "iotHubHostName": None,
            "optionalDeviceInformation": None,
        },
    )
    assert created["attestation"]["symmetricKey"] == {"primaryKey": primary, "secondaryKey": secondary}
    assert created["allocationPolicy"] == "geoLatency"
    att = dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert att["symmetricKey"] == {"primaryKey": primary, "secondaryKey": secondary}


# --------------------------------------------------------------------------------------------
# README: "Create an enrollment with reprovisioning policies"
# (+ sample update_enrollment_reprovisioning_policy_sample)
# --------------------------------------------------------------------------------------------
def test_readme_enrollment_with_reprovision_policy(dps):
    enrollment_id = unique("readme-reprov")
    device_id = unique("device")
    policy = {"migrateDeviceData": True, "updateHubAssignment": True}
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {"type": "symmetricKey"},
            "deviceId": device_id,
            "reprovisionPolicy": policy,
        },
    )
    assert created["reprovisionPolicy"] == policy
    assert created["deviceId"] == device_id
    assert_generated_key(created["attestation"]["symmetricKey"]["primaryKey"])

    got = dps.enrollment.get(id=enrollment_id)
    assert got["reprovisionPolicy"] == policy

    # Sample: change the policy with the etag from GET.
    got["reprovisionPolicy"] = {"updateHubAssignment": True, "migrateDeviceData": False}
    updated = dps.enrollment.create_or_update(id=enrollment_id, enrollment=got, if_match=got["etag"])
    assert updated["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": False}
    assert updated["etag"] != got["etag"], "etag must change on every write"
    assert dps.enrollment.get(id=enrollment_id)["reprovisionPolicy"]["migrateDeviceData"] is False


# --------------------------------------------------------------------------------------------
# README: "Create an intermediate x509 certificate enrollment group"
# --------------------------------------------------------------------------------------------
def test_readme_x509_group_with_signing_certificates(dps):
    group_id = unique("readme-x509-group")
    ca = make_cert(unique("Muster Test Intermediate"), ca=True)
    cert_contents = ca.pem
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {
                "type": "x509",
                "x509": {
                    "signingCertificates": {
                        "primary": {"certificate": f"{cert_contents}"},
                        "secondary": {"certificate": f"{cert_contents}"},
                    }
                },
            },
        },
    )
    assert created["enrollmentGroupId"] == group_id
    assert created["attestation"]["type"] == "x509"
    assert created["provisioningStatus"] == "enabled"
    signing = created["attestation"]["x509"]["signingCertificates"]
    for slot in ("primary", "secondary"):
        assert not signing[slot].get("certificate"), "the certificate text must never be returned"
        assert_cert_info(signing[slot]["info"], ca)
    assert "registrationState" not in created

    got = dps.enrollment_group.get(id=group_id)
    assert got["enrollmentGroupId"] == group_id
    assert "registrationState" not in got, "group GET has no registrationState"
    for slot in ("primary", "secondary"):
        entry = got["attestation"]["x509"]["signingCertificates"][slot]
        assert not entry.get("certificate")
        assert_cert_info(entry["info"], ca)

    att = dps.enrollment_group.get_attestation_mechanism(id=group_id)
    assert att["type"] == "x509"
    assert_cert_info(att["x509"]["signingCertificates"]["primary"]["info"], ca)

    groups = all_groups(dps)
    assert [g["enrollmentGroupId"] for g in groups] == [group_id]
    assert_cert_info(groups[0]["attestation"]["x509"]["signingCertificates"]["primary"]["info"], ca)

    dps.enrollment_group.delete(id=group_id)
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment_group.get(id=group_id)


def test_x509_group_accepts_base64_der_certificate(dps):
    """C# and the CLI (for non-UTF-8 files) send base64 DER without PEM armour."""
    group_id = unique("x509-der-group")
    ca = make_cert(unique("Muster DER Root"), ca=True)
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": ca.der_b64}}},
            },
        },
    )
    assert_cert_info(created["attestation"]["x509"]["signingCertificates"]["primary"]["info"], ca)


# --------------------------------------------------------------------------------------------
# README: "Create an x509 CA certificate enrollment group"
# --------------------------------------------------------------------------------------------
def test_readme_x509_group_with_ca_references(dps, muster):
    # caReferences are *names* of CA certificates registered (and verified) on the DPS
    # resource (the README snippet passes PEM text, which is a documentation slip).
    primary, secondary = unique("muster-root-ca"), unique("muster-root-ca-2")
    upload_verified_ca(muster, primary)
    upload_verified_ca(muster, secondary)
    group_id = unique("readme-ca-group")
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {
                "type": "x509",
                "x509": {"caReferences": {"primary": primary, "secondary": secondary}},
            },
        },
    )
    assert created["attestation"]["type"] == "x509"
    assert created["attestation"]["x509"]["caReferences"] == {
        "primary": primary,
        "secondary": secondary,
    }
    got = dps.enrollment_group.get(id=group_id)
    assert got["attestation"]["x509"]["caReferences"]["primary"] == primary
    assert got["attestation"]["x509"]["caReferences"]["secondary"] == secondary
    # A name no verified CA certificate has is refused at write time, saying which.
    missing = unique("readme-ca-missing")
    with pytest.raises(HttpResponseError) as refused:
        dps.enrollment_group.create_or_update(
            id=missing,
            enrollment_group={
                "enrollmentGroupId": missing,
                "attestation": {"type": "x509", "x509": {"caReferences": {"primary": "no-such-ca"}}},
            },
        )
    body = http_error_body(refused.value)
    assert_dps_error_body(body, 400)
    assert body["errorCode"] == 400005 and "no-such-ca" in body["message"], body


# --------------------------------------------------------------------------------------------
# README: "Check device registration status"
# --------------------------------------------------------------------------------------------
def test_readme_device_registration_status(dps):
    group_id = unique("readme-reg-group")
    dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}},
    )
    device_registrations = dps.device_registration_state.query(id=group_id)
    assert list(device_registrations) == []

    with pytest.raises(ResourceNotFoundError) as exc:
        dps.device_registration_state.get(id=unique("never-registered"))
    assert exc.value.status_code == 404
    assert_dps_error_body(http_error_body(exc.value), 404)


# --------------------------------------------------------------------------------------------
# Samples: x509 and TPM individual enrollments
# --------------------------------------------------------------------------------------------
def test_sample_x509_individual_enrollment(dps):
    enrollment_id = unique("sample-x509")
    leaf = make_cert(enrollment_id, ca=False)
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {
                "type": "x509",
                "x509": {
                    "clientCertificates": {
                        "primary": {"certificate": f"{leaf.pem}"},
                        "secondary": {"certificate": f"{leaf.pem}"},
                    }
                },
            },
            "allocationPolicy": "hashed",
            "reprovisionPolicy": {"migrateDeviceData": True, "updateHubAssignment": True},
        },
    )
    client_certs = created["attestation"]["x509"]["clientCertificates"]
    assert_cert_info(client_certs["primary"]["info"], leaf)
    assert_cert_info(client_certs["secondary"]["info"], leaf)
    assert not client_certs["primary"].get("certificate")
    assert created["allocationPolicy"] == "hashed"

    got = dps.enrollment.get(id=enrollment_id)
    assert_cert_info(got["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)
    assert got["registrationState"] == {"registrationId": enrollment_id, "status": "unassigned"}

    att = dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert_cert_info(att["x509"]["clientCertificates"]["primary"]["info"], leaf)

    # SDK test flow: switch to custom allocation with the etag from GET.
    got["provisioningStatus"] = "disabled"
    got["allocationPolicy"] = "custom"
    got["customAllocationDefinition"] = {"webhookUrl": "https://127.0.0.1/alloc", "apiVersion": "2019-03-31"}
    updated = dps.enrollment.create_or_update(id=enrollment_id, enrollment=got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "disabled"
    assert updated["customAllocationDefinition"] == {
        "webhookUrl": "https://127.0.0.1/alloc",
        "apiVersion": "2019-03-31",
    }
    # The update re-sent info-only certificate entries; the stored certificate stays.
    assert_cert_info(updated["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)


def test_sample_tpm_enrollment(dps):
    enrollment_id = unique("sample-tpm")
    device_id = unique("device")
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {"type": "tpm", "tpm": {"endorsementKey": TEST_ENDORSEMENT_KEY}},
            "provisioningStatus": "enabled",
            "deviceId": device_id,
            "allocationPolicy": "static",
        },
    )
    assert created["attestation"]["tpm"]["endorsementKey"] == TEST_ENDORSEMENT_KEY
    assert created["allocationPolicy"] == "static"
    assert created["deviceId"] == device_id
    assert created["provisioningStatus"] == "enabled"

    got = dps.enrollment.get(id=enrollment_id)
    assert got["attestation"]["tpm"]["endorsementKey"] == TEST_ENDORSEMENT_KEY  # EK is not secret
    att = dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert att["tpm"]["endorsementKey"] == TEST_ENDORSEMENT_KEY

    # SDK test flow: update with etag, optionalDeviceInformation echoed verbatim.
    got["provisioningStatus"] = "disabled"
    got["optionalDeviceInformation"] = {"additionalProperties": {"hello": "world"}}
    updated = dps.enrollment.create_or_update(id=enrollment_id, enrollment=got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "disabled"
    assert updated["optionalDeviceInformation"] == {"additionalProperties": {"hello": "world"}}

    dps.enrollment.delete(id=enrollment_id)
    assert all_enrollments(dps) == []


# --------------------------------------------------------------------------------------------
# Enrollment get / update / delete and ETag rules
# --------------------------------------------------------------------------------------------
def test_enrollment_get_update_delete_and_etags(dps):
    enrollment_id = unique("etag")
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
    )
    original_keys = created["attestation"]["symmetricKey"]
    etag0 = created["etag"]

    # Sample update_enrollment_sample: GET, change, PUT with the etag from GET.
    got = dps.enrollment.get(id=enrollment_id)
    assert got["etag"] == etag0
    got["provisioningStatus"] = "disabled"
    got["allocationPolicy"] = "geoLatency"
    upd1 = dps.enrollment.create_or_update(id=enrollment_id, enrollment=got, if_match=got["etag"])
    assert upd1["provisioningStatus"] == "disabled"
    assert upd1["allocationPolicy"] == "geoLatency"
    etag1 = upd1["etag"]
    assert etag1 and etag1 != etag0
    assert upd1["createdDateTimeUtc"] == created["createdDateTimeUtc"], "createdDateTimeUtc must not change"
    assert parse_utc(upd1["lastUpdatedDateTimeUtc"]) >= parse_utc(created["lastUpdatedDateTimeUtc"])
    # The GET body carried no keys: an update keeps the enrollment's keys.
    att = dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert att["symmetricKey"] == original_keys, "keys changed although the update sent none"

    # Unconditional update with If-Match: *
    body = dps.enrollment.get(id=enrollment_id)
    body["provisioningStatus"] = "enabled"
    upd2 = dps.enrollment.create_or_update(id=enrollment_id, enrollment=body, if_match="*")
    assert upd2["provisioningStatus"] == "enabled"
    etag2 = upd2["etag"]
    assert etag2 not in (etag0, etag1)

    # Blind PUT (no If-Match) over an existing record: 409.
    with pytest.raises(ResourceExistsError) as exc:
        dps.enrollment.create_or_update(
            id=enrollment_id,
            enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
        )
    assert exc.value.status_code == 409
    assert_dps_error_body(http_error_body(exc.value), 409)

    # Stale etag: 412, nothing changed.
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment.create_or_update(id=enrollment_id, enrollment=body, if_match=etag0)
    assert exc.value.status_code == 412
    assert_dps_error_body(http_error_body(exc.value), 412)
    assert dps.enrollment.get(id=enrollment_id)["etag"] == etag2

    # Delete with a stale etag: 412; with the current one: 204.
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment.delete(id=enrollment_id, if_match=etag1)
    assert exc.value.status_code == 412
    assert dps.enrollment.delete(id=enrollment_id, if_match=etag2) is None
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment.get(id=enrollment_id)
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment.get_attestation_mechanism(id=enrollment_id)
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment.delete(id=enrollment_id)
    assert all_enrollments(dps) == []


def test_ids_are_case_insensitive(dps):
    enrollment_id = unique("MixedCase-Enrollment")
    dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
    )
    got = dps.enrollment.get(id=enrollment_id.lower())
    assert got["registrationId"].lower() == enrollment_id.lower()
    with pytest.raises(ResourceExistsError):
        dps.enrollment.create_or_update(
            id=enrollment_id.upper(),
            enrollment={"registrationId": enrollment_id.upper(), "attestation": {"type": "symmetricKey"}},
        )


# --------------------------------------------------------------------------------------------
# Bulk operations (samples) and paging
# --------------------------------------------------------------------------------------------
def test_sample_bulk_enrollment_operations(dps):
    ids = [unique("bulk-enrollment-1"), unique("bulk-enrollment-2")]
    bulk_operation = {
        "mode": "create",
        "enrollments": [{"registrationId": i, "attestation": {"type": "symmetricKey"}} for i in ids],
    }
    result = dps.enrollment.run_bulk_operation(bulk_operation=bulk_operation)
    assert result["isSuccessful"] is True, result
    assert result.get("errors", []) == [], result
    for i in ids:
        assert dps.enrollment.get(id=i)["registrationId"] == i

    # create again: per-item errors (409xxx), HTTP 200, isSuccessful false.
    result = dps.enrollment.run_bulk_operation(bulk_operation=bulk_operation)
    assert result["isSuccessful"] is False, result
    errs = {e["registrationId"]: e for e in result["errors"]}
    assert set(errs) == set(ids), result
    for e in errs.values():
        assert isinstance(e["errorCode"], int) and 409000 <= e["errorCode"] < 410000, e
        assert isinstance(e.get("errorStatus"), str) and e["errorStatus"], e

    bulk_operation["mode"] = "delete"
    result = dps.enrollment.run_bulk_operation(bulk_operation=bulk_operation)
    assert result["isSuccessful"] is True, result
    for i in ids:
        with pytest.raises(ResourceNotFoundError):
            dps.enrollment.get(id=i)


def test_sample_bulk_enrollment_group_operations(dps):
    ids = [unique("bulk-group-1"), unique("bulk-group-2")]
    bulk_operation = {
        "mode": "create",
        "enrollmentGroups": [{"enrollmentGroupId": i, "attestation": {"type": "symmetricKey"}} for i in ids],
    }
    result = dps.enrollment_group.run_bulk_operation(bulk_operation=bulk_operation)
    assert result["isSuccessful"] is True, result
    assert sorted(g["enrollmentGroupId"] for g in all_groups(dps)) == sorted(ids)

    bulk_operation["mode"] = "delete"
    result = dps.enrollment_group.run_bulk_operation(bulk_operation=bulk_operation)
    assert result["isSuccessful"] is True, result
    assert all_groups(dps) == []


def test_paging_150_enrollments_page_size_10(dps):
    total = 150
    ids = [f"page-{n:03d}-{secrets.token_hex(3)}" for n in range(total)]
    bulk = {
        "mode": "create",
        "enrollments": [{"registrationId": i, "attestation": {"type": "symmetricKey"}} for i in ids],
    }
    result = dps.enrollment.run_bulk_operation(bulk_operation=bulk)  # all 150 in one call
    assert result["isSuccessful"] is True, result
    assert result.get("errors", []) == [], result

    # top=10 is sent as x-ms-max-item-count: 10 (operations/_patch.py).
    pages = [list(page) for page in dps.enrollment.query(query_specification=SELECT_ALL, top=10).by_page()]
    sizes = [len(p) for p in pages]
    assert sizes == [10] * 15, f"page sizes {sizes}"
    seen = [e["registrationId"] for p in pages for e in p]
    assert len(seen) == total
    assert sorted(seen) == sorted(ids), "every enrollment exactly once"
    for e in (e for p in pages for e in p):
        assert_no_symmetric_keys(e["attestation"], "paged query")

    # Without a page size the SDK still walks every page.
    assert sorted(e["registrationId"] for e in all_enrollments(dps)) == sorted(ids)

    # Bulk delete all 150 in one call.
    bulk["mode"] = "delete"
    result = dps.enrollment.run_bulk_operation(bulk_operation=bulk)
    assert result["isSuccessful"] is True, result
    assert all_enrollments(dps) == []


def test_group_query_paging(dps):
    ids = [unique(f"gpage-{n}") for n in range(7)]
    result = dps.enrollment_group.run_bulk_operation(
        bulk_operation={
            "mode": "create",
            "enrollmentGroups": [{"enrollmentGroupId": i, "attestation": {"type": "symmetricKey"}} for i in ids],
        }
    )
    assert result["isSuccessful"] is True, result
    pages = [list(p) for p in dps.enrollment_group.query(query_specification=SELECT_ALL, top=3).by_page()]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert sorted(g["enrollmentGroupId"] for p in pages for g in p) == sorted(ids)


# --------------------------------------------------------------------------------------------
# Enrollment groups (sample: symmetric key group lifecycle)
# --------------------------------------------------------------------------------------------
def test_sample_symmetric_key_enrollment_group(dps):
    group_id = unique("sym-group")
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}},
    )
    assert created["enrollmentGroupId"] == group_id
    keys = created["attestation"]["symmetricKey"]
    assert_generated_key(keys["primaryKey"])
    assert_generated_key(keys["secondaryKey"])
    assert created["provisioningStatus"] == "enabled"

    got = dps.enrollment_group.get(id=group_id)
    assert got["enrollmentGroupId"] == group_id
    assert_no_symmetric_keys(got["attestation"], "GET /enrollmentGroups/{id}")
    assert "registrationState" not in got

    att = dps.enrollment_group.get_attestation_mechanism(id=group_id)
    assert att["symmetricKey"] == keys

    # sample update_enrollment_group_sample
    got["provisioningStatus"] = "disabled"
    got["allocationPolicy"] = "geoLatency"
    updated = dps.enrollment_group.create_or_update(id=group_id, enrollment_group=got, if_match=got["etag"])
    assert updated["provisioningStatus"] == "disabled"
    assert updated["allocationPolicy"] == "geoLatency"
    assert updated["etag"] != got["etag"]
    assert dps.enrollment_group.get_attestation_mechanism(id=group_id)["symmetricKey"] == keys

    with pytest.raises(ResourceExistsError):
        dps.enrollment_group.create_or_update(
            id=group_id,
            enrollment_group={"enrollmentGroupId": group_id, "attestation": {"type": "symmetricKey"}},
        )
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment_group.create_or_update(id=group_id, enrollment_group=got, if_match=got["etag"])
    assert exc.value.status_code == 412

    groups = all_groups(dps)
    assert [g["enrollmentGroupId"] for g in groups] == [group_id]
    assert_no_symmetric_keys(groups[0]["attestation"], "group query")

    dps.enrollment_group.delete(id=group_id)
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment_group.get(id=group_id)
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment_group.get_attestation_mechanism(id=group_id)
    assert all_groups(dps) == []


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _with_key(cs: str, **replace: str) -> str:
    parts = dict(p.split("=", 1) for p in cs.split(";"))
    parts.update(replace)
    return ";".join(f"{k}={v}" for k, v in parts.items())


def test_wrong_key_is_401(muster, dps):
    wrong_key = base64.b64encode(secrets.token_bytes(32)).decode()
    bad = make_dps_client(_with_key(muster.connection_string, SharedAccessKey=wrong_key), muster.ca_cert)
    enrollment_id = unique("unauth")
    with pytest.raises(ClientAuthenticationError) as exc:
        bad.enrollment.create_or_update(
            id=enrollment_id,
            enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
        )
    assert exc.value.status_code == 401
    with pytest.raises(ClientAuthenticationError):
        bad.enrollment.get(id=enrollment_id)
    with pytest.raises(ClientAuthenticationError):
        list(bad.enrollment.query(query_specification=SELECT_ALL))
    with pytest.raises(ClientAuthenticationError):
        bad.device_registration_state.get(id=enrollment_id)
    # Unknown policy name with the right key: also 401.
    bad_policy = make_dps_client(
        _with_key(muster.connection_string, SharedAccessKeyName="nosuchpolicy"), muster.ca_cert
    )
    with pytest.raises(ClientAuthenticationError):
        bad_policy.enrollment.get(id=enrollment_id)
    # Nothing was created.
    with pytest.raises(ResourceNotFoundError):
        dps.enrollment.get(id=enrollment_id)


def test_invalid_registration_id_is_400(dps):
    bad_id = "bad!id"
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment.create_or_update(
            id=bad_id,
            enrollment={"registrationId": bad_id, "attestation": {"type": "symmetricKey"}},
        )
    assert exc.value.status_code == 400
    body = http_error_body(exc.value)
    assert_dps_error_body(body, 400)
    assert exc.value.response.headers.get("Content-Type", "").startswith("application/json")
    # The record was not created.
    assert all_enrollments(dps) == []


def test_invalid_group_id_is_400(dps):
    bad_id = "bad!group"
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment_group.create_or_update(
            id=bad_id,
            enrollment_group={"enrollmentGroupId": bad_id, "attestation": {"type": "symmetricKey"}},
        )
    assert exc.value.status_code == 400
    assert_dps_error_body(http_error_body(exc.value), 400)
    assert all_groups(dps) == []


def test_explicit_nulls_and_omitted_fields(dps):
    """The SDK's own generate_enrollment() sends null for every unset field.

    Real DPS echoes an explicit provisioningStatus null, and omits absent
    optional fields from the response (service-api.md 4.2).
    """
    enrollment_id = unique("nulls")
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={
            "registrationId": enrollment_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": None, "secondaryKey": None}},
            "allocationPolicy": None,
            "capabilities": None,
            "reprovisionPolicy": None,
            "customAllocationDefinition": None,
            "provisioningStatus": None,
            "deviceId": None,
            "optionalDeviceInformation": None,
            "iotHubs": None,
            "iotHubHostName": None,
            "initialTwin": None,
        },
    )
    assert_generated_key(created["attestation"]["symmetricKey"]["primaryKey"])
    assert_generated_key(created["attestation"]["symmetricKey"]["secondaryKey"])
    assert "provisioningStatus" in created and created["provisioningStatus"] is None, created
    for absent in ("deviceId", "capabilities", "reprovisionPolicy", "initialTwin", "iotHubs",
                   "customAllocationDefinition", "optionalDeviceInformation", "iotHubHostName"):
        assert absent not in created, f"{absent} should be omitted, got {created.get(absent)!r}"


def test_malformed_body_is_400(dps):
    enrollment_id = unique("badjson")
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment.create_or_update(id=enrollment_id, enrollment=b"{not json")
    assert exc.value.status_code == 400
    assert_dps_error_body(http_error_body(exc.value), 400)
    with pytest.raises(HttpResponseError) as exc:
        dps.enrollment.create_or_update(id=enrollment_id, enrollment={"registrationId": enrollment_id})
    assert exc.value.status_code == 400, "attestation is required"
    assert_dps_error_body(http_error_body(exc.value), 400)
    assert all_enrollments(dps) == []


@pytest.mark.parametrize("case", ["expired", "other audience", "malformed", "not a SAS", "valid (control)"])
def test_sas_token_rules(muster, case):
    """Expired, wrong-audience and malformed tokens are all 401; a hand-made valid one works."""
    from azure.core.credentials import AzureSasCredential
    from azure.iot.deviceprovisioning import DeviceProvisioningClient, generate_sas_token

    parts = muster.cs_parts()
    host, policy, key = parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"]
    token = {
        "expired": lambda: generate_sas_token(host, policy, key, expiry=-120),
        "other audience": lambda: generate_sas_token("other-dps.example.net", policy, key),
        "malformed": lambda: f"SharedAccessSignature sr={host}&sig=notbase64!!&se=notanumber&skn={policy}",
        "not a SAS": lambda: "Bearer abc.def.ghi",
        "valid (control)": lambda: generate_sas_token(host, policy, key),
    }[case]()
    client = DeviceProvisioningClient(
        endpoint=f"https://{host}", credential=AzureSasCredential(token),
        connection_verify=muster.ca_cert, retry_total=0,
    )
    if case == "valid (control)":
        assert list(client.enrollment.query(SELECT_ALL)) == []
    else:
        with pytest.raises(ClientAuthenticationError) as exc:
            client.enrollment.get(id="whatever")
        assert exc.value.status_code == 401


def test_registration_state_delete_unknown_is_404(dps):
    with pytest.raises(ResourceNotFoundError):
        dps.device_registration_state.delete(id=unique("never-registered"))
