"""Issue 11 items 2-4 with Microsoft's SDKs: registration behaviours a new user meets when
following Azure's flows.

* Item 2 — a registration record remains while the hub device and the enrollment group are
  deleted and the group is created again with another initial twin: registering again creates
  the device with the *current* group's initial twin (substatus ``deviceDataReset``).
  azure-iot-device 2.14.0 ``ProvisioningDeviceClient`` registers; azure-iot-hub 2.7.0
  ``IoTHubRegistryManager`` deletes the hub device and reads the twin; the group is managed
  with azure-iot-deviceprovisioning 1.0.0b1.
* Item 3 — query specifications: ``{"query": "*"}`` as the legacy Python SDK
  (azure-iothub-provisioningserviceclient 1.2.0, ``QuerySpecification("*")``) and the Node
  samples send it, ``SELECT * FROM <name>`` as the C# samples do, through both Python
  service SDKs; a ``WHERE`` clause stays a clear 400010.
* Item 4 — registration ids that differ only in case: one record; the record, the answer's
  ``deviceId`` and the hub identity take the latest spelling; the device that registered last
  connects to the hub (``IoTHubDeviceClient``), the other is refused, and no hub identity
  remains under the other spelling.

Every test gets its own server on an empty data dir (fixture ``muster``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from azure.core.exceptions import HttpResponseError
from provisioningserviceclient import ProvisioningServiceClient, QuerySpecification

from helpers import DPS_HOST, assert_dps_error_body, derive_device_key, http_error_body, unique


@pytest.fixture
def registry(muster):
    """azure-iot-hub IoTHubRegistryManager on the built-in hub (REST only; its AMQP sender
    is never connected)."""
    from azure.iot.hub import IoTHubRegistryManager

    hubs = muster.info.get("hubs") or []
    assert hubs and hubs[0].get("builtIn") is True, muster.info
    manager = IoTHubRegistryManager.from_connection_string(hubs[0]["connectionString"])
    try:
        yield manager
    finally:
        if manager.amqp_svc_client is not None:
            manager.amqp_svc_client.disconnect_sync()
            manager.amqp_svc_client = None


def register(muster, registration_id: str, key: str, websockets: bool = False):
    """ProvisioningDeviceClient exactly as a device application uses it."""
    from azure.iot.device import ProvisioningDeviceClient

    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=muster.info["dpsHost"],
        registration_id=registration_id,
        id_scope=muster.id_scope,
        symmetric_key=key,
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )
    result = client.register()
    assert result.status == "assigned", str(result)
    assert result.registration_state.assigned_hub == DPS_HOST, str(result.registration_state)
    return result


def create_group(dps, group_id: str, initial_twin: dict) -> str:
    """A symmetric-key group with generated keys; returns its primary key."""
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey"},
            "initialTwin": initial_twin,
        },
    )
    return created["attestation"]["symmetricKey"]["primaryKey"]


def user_desired(twin) -> dict:
    desired = (twin.properties.desired or {}) if twin.properties else {}
    return {k: v for k, v in desired.items() if not k.startswith("$")}


# --------------------------------------------------------------------------------------------
# item 2: a device absent from its hub gets the current enrollment's initial twin
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt", "mqtt-ws"])
def test_recreated_group_and_deleted_hub_device_get_the_current_initial_twin(muster, dps, registry, websockets):
    group_id = unique("py-recreated")
    registration_id = unique("py-phoenix")
    first_twin = {"tags": {"generation": "first"}, "properties": {"desired": {"interval": 10}}}
    second_twin = {"tags": {"generation": "second", "site": "lyon"}, "properties": {"desired": {"interval": 60}}}

    key = derive_device_key(create_group(dps, group_id, first_twin), registration_id)
    first = register(muster, registration_id, key, websockets)
    assert first.registration_state.sub_status == "initialAssignment", str(first.registration_state)
    assert registry.get_twin(registration_id).tags == first_twin["tags"]

    # The operator deletes the hub device and the group; the registration record stays.
    registry.delete_device(registration_id)
    dps.enrollment_group.delete(id=group_id)
    assert dps.device_registration_state.get(id=registration_id)["status"] == "assigned"
    # The group comes back (new generated keys) with another initial twin.
    key = derive_device_key(create_group(dps, group_id, second_twin), registration_id)

    again = register(muster, registration_id, key, websockets)
    state = again.registration_state
    assert state.device_id == registration_id, str(state)
    assert state.created_date_time == first.registration_state.created_date_time, "same record"

    twin = registry.get_twin(registration_id)
    assert twin.tags == second_twin["tags"], f"twin tags {twin.tags!r}"
    assert user_desired(twin) == second_twin["properties"]["desired"], f"desired {twin.properties.desired!r}"
    assert state.sub_status == "deviceDataReset", str(state)
    device = registry.get_device(registration_id)
    assert device.authentication.symmetric_key.primary_key == key, "the hub has the new derived key"
    record = dps.device_registration_state.get(id=registration_id)
    assert record["substatus"] == "deviceDataReset", record


# --------------------------------------------------------------------------------------------
# item 3: every query form the SDKs and samples send
# --------------------------------------------------------------------------------------------
def test_query_forms_of_both_python_service_sdks(muster, dps):
    group_id = unique("py-query-group")
    registration_id = unique("py-query-enr")
    dps.enrollment.create_or_update(
        id=registration_id,
        enrollment={"registrationId": registration_id, "attestation": {"type": "symmetricKey"}},
    )
    create_group(dps, group_id, {"tags": {}, "properties": {"desired": {}}})

    # azure-iot-deviceprovisioning 1.0.0b1 sends what it is given.
    for query in ("*", "SELECT *", "select * from enrollments", "SELECT * FROM enrollmentGroups"):
        spec = {"query": query}
        enrollments = [e["registrationId"] for e in dps.enrollment.query(query_specification=spec)]
        assert enrollments == [registration_id], (query, enrollments)
        groups = [g["enrollmentGroupId"] for g in dps.enrollment_group.query(query_specification=spec)]
        assert groups == [group_id], (query, groups)

    # The legacy SDK's documented form: QuerySpecification("*").
    legacy = ProvisioningServiceClient.create_from_connection_string(muster.connection_string)
    pages = list(legacy.create_individual_enrollment_query(QuerySpecification("*"), page_size=10))
    assert [e.registration_id for page in pages for e in page] == [registration_id]
    pages = list(legacy.create_enrollment_group_query(QuerySpecification("*")))
    assert [g.enrollment_group_id for page in pages for g in page] == [group_id]

    # What Muster cannot run is refused, with the code and the accepted forms.
    with pytest.raises(HttpResponseError) as ei:
        list(dps.enrollment.query(query_specification={"query": "SELECT * FROM enrollments WHERE x = 1"}))
    assert ei.value.status_code == 400
    body = http_error_body(ei.value)
    assert_dps_error_body(body, 400)
    assert body["errorCode"] == 400010, body
    assert "'*'" in body["message"] and "WHERE x = 1" in body["message"], body


# --------------------------------------------------------------------------------------------
# item 4: registration ids that differ only in case
# --------------------------------------------------------------------------------------------
def test_registration_ids_differing_in_case_leave_one_hub_identity(muster, dps, registry):
    from azure.iot.device import IoTHubDeviceClient
    from azure.iot.device.exceptions import CredentialError

    group_id = unique("py-cased")
    group_key = create_group(dps, group_id, {"tags": {"line": "7"}, "properties": {"desired": {}}})
    first_id = unique("Py-Cased-Device")
    last_id = first_id.lower()
    assert first_id != last_id
    keys = {rid: derive_device_key(group_key, rid) for rid in (first_id, last_id)}

    register(muster, first_id, keys[first_id])
    last = register(muster, last_id, keys[last_id])
    assert last.registration_state.device_id == last_id, str(last.registration_state)

    # One record, spelt as the last registration; the hub holds one identity, the same.
    record = dps.device_registration_state.get(id=first_id.upper())
    assert (record["registrationId"], record["deviceId"]) == (last_id, last_id), record
    ids = [d.device_id for d in registry.get_devices() if d.device_id.lower() == last_id]
    assert ids == [last_id], f"hub identities {ids!r}"
    device = registry.get_device(last_id)
    assert device.device_id == last_id
    assert device.authentication.symmetric_key.primary_key == keys[last_id]
    assert registry.get_twin(last_id).tags == {"line": "7"}, "the twin moved with the identity"

    def hub_client(rid):
        return IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=keys[rid],
            hostname=DPS_HOST,
            device_id=rid,
            server_verification_cert=Path(muster.ca_cert).read_text(),
            connection_retry=False,
        )

    winner = hub_client(last_id)
    try:
        winner.connect()
        assert winner.connected
    finally:
        winner.shutdown()
    loser = hub_client(first_id)
    try:
        with pytest.raises(CredentialError):
            loser.connect()
    finally:
        loser.shutdown()
