"""The built-in hub as long-lived devices and bulk tooling use it, with Microsoft's SDKs:

* azure-iot-device 2.14.0 ``IoTHubDeviceClient`` with a short SAS lifetime (``sastoken_ttl``;
  the SDK renews 120 s before expiry, so a 123 s token is renewed after about 3 s): the SDK
  reconnects with CleanSession=0 and does not subscribe again, so the hub must resume the
  session. After the renewal the device still gets a desired-property patch and answers a
  direct method, over MQTT and MQTT over WebSocket.
* azure-iot-hub 2.7.0 ``IoTHubRegistryManager``: every desired update bumps ``$version``
  (equal values too) with fresh ``$metadata``; ``bulk_create_or_update_devices`` (``POST
  /devices``) creates, updates and deletes with per-device errors; device-scope refusals.

Every test gets its own server (fixture ``muster``). No fixed sleeps: conditions are polled
with deadlines and callbacks awaited through queues with bounded timeouts.
"""

from __future__ import annotations

import base64
import queue
import secrets
import time
from pathlib import Path

import pytest
from msrest.exceptions import HttpOperationError

from helpers import unique

WAIT_S = 30  # bound for every condition the tests wait for
TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]
# The SDK renews its token DEFAULT_TOKEN_UPDATE_MARGIN (120 s) before expiry.
SHORT_SAS_TTL = 123


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def hub(muster) -> dict:
    return muster.info["hubs"][0]


@pytest.fixture
def registry(hub):
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(hub["connectionString"])
    try:
        yield manager
    finally:
        if manager.amqp_svc_client is not None:
            manager.amqp_svc_client.disconnect_sync()
            manager.amqp_svc_client = None


def _wait_for(what: str, condition, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_device_keeps_twin_and_methods_across_sas_renewal(muster, hub, registry, websockets):
    from azure.iot.device import IoTHubDeviceClient, MethodResponse
    from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

    device_id = unique("py-renew")
    key = _key()
    registry.create_device_with_sas(device_id, key, _key(), "enabled")
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=hub["hostName"],
        device_id=device_id,
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
        sastoken_ttl=SHORT_SAS_TTL,
    )
    try:
        client.connect()
        patches: "queue.Queue" = queue.Queue()
        calls: "queue.Queue" = queue.Queue()

        def on_method(request):
            calls.put(request.name)
            client.send_method_response(
                MethodResponse.create_from_method_request(request, 200, {"renewed": True})
            )

        # Both return once the SDK's SUBSCRIBE was acknowledged.
        client.on_twin_desired_properties_patch_received = patches.put
        client.on_method_request_received = on_method
        connected_at = registry.get_device(device_id).connection_state_updated_time

        # The renewal: a new connection with a fresh token (the hub records each connect).
        def renewed():
            d = registry.get_device(device_id)
            return d.connection_state == "Connected" and d.connection_state_updated_time != connected_at

        _wait_for("the SDK to renew its SAS token and reconnect", renewed)
        _wait_for("the client to be connected again", lambda: client.connected)

        # The subscriptions survived: a desired patch and a method reach the device.
        updated = registry.update_twin(
            device_id, Twin(properties=TwinProperties(desired={"after": "renewal"})), etag="*"
        )
        patch = patches.get(timeout=WAIT_S)
        assert patch.get("after") == "renewal", patch
        assert patch["$version"] == updated.properties.desired["$version"], patch
        result = registry.invoke_device_method(
            device_id,
            CloudToDeviceMethod(method_name="ping", payload={}, response_timeout_in_seconds=20,
                                connect_timeout_in_seconds=10),
        )
        assert calls.get(timeout=WAIT_S) == "ping"
        assert result.status == 200, result
        assert result.payload == {"renewed": True}, result.payload
    finally:
        client.shutdown()


def test_every_desired_update_bumps_the_version(registry):
    from azure.iot.hub.models import Twin, TwinProperties

    device_id = unique("py-twin")
    registry.create_device_with_sas(device_id, _key(), _key(), "enabled")
    assert registry.get_twin(device_id).properties.desired["$version"] == 1

    def update(desired):
        return registry.update_twin(device_id, Twin(properties=TwinProperties(desired=desired)), etag="*")

    first = update({"interval": 5})
    second = update({"interval": 5})  # the same value again: still an update
    assert first.properties.desired["$version"] == 2, first.properties.desired
    assert second.properties.desired["$version"] == 3, second.properties.desired
    assert second.version == first.version + 1
    meta = second.properties.desired["$metadata"]
    assert meta["$lastUpdatedVersion"] == 3, meta
    assert meta["interval"]["$lastUpdatedVersion"] == 3, meta
    assert isinstance(meta["interval"]["$lastUpdated"], str), meta
    # null deletes one key, and bumps the version.
    third = update({"interval": None})
    assert third.properties.desired["$version"] == 4
    assert "interval" not in third.properties.desired


def test_bulk_registry_create_update_delete(registry):
    from azure.iot.hub.models import (
        AuthenticationMechanism,
        ExportImportDevice,
        SymmetricKey,
    )

    ids = [unique("py-bulk") for _ in range(3)]

    def sas():
        return AuthenticationMechanism(type="sas", symmetric_key=SymmetricKey(primary_key=_key(), secondary_key=_key()))

    created = registry.bulk_create_or_update_devices(
        [ExportImportDevice(id=i, import_mode="create", status="enabled", authentication=sas()) for i in ids]
    )
    assert created.is_successful is True, created
    assert created.errors == []
    devices = [registry.get_device(i) for i in ids]
    assert [d.status for d in devices] == ["enabled"] * 3

    # One update with the current eTag, one with a stale one, one create of an existing id.
    mixed = registry.bulk_create_or_update_devices([
        ExportImportDevice(id=ids[0], import_mode="updateIfMatchETag", e_tag=devices[0].etag,
                           status="disabled", authentication=sas()),
        ExportImportDevice(id=ids[1], import_mode="updateIfMatchETag", e_tag="c3RhbGU=",
                           status="disabled", authentication=sas()),
        ExportImportDevice(id=ids[2], import_mode="create", authentication=sas()),
    ])
    assert mixed.is_successful is False, mixed
    assert sorted((e.device_id, e.error_code) for e in mixed.errors) == sorted([
        (ids[1], "PreconditionFailed"),
        (ids[2], "DeviceAlreadyExists"),
    ]), mixed.errors
    assert all(e.error_status for e in mixed.errors)
    assert registry.get_device(ids[0]).status == "disabled"
    assert registry.get_device(ids[1]).status == "enabled"

    deleted = registry.bulk_create_or_update_devices(
        [ExportImportDevice(id=i, import_mode="delete") for i in ids]
    )
    assert deleted.is_successful is True, deleted
    for i in ids:
        with pytest.raises(HttpOperationError) as e:
            registry.get_device(i)
        assert e.value.response.status_code == 404


def test_device_scope_must_name_an_edge_device(registry):
    from azure.iot.hub.models import (
        AuthenticationMechanism,
        Device,
        ExportImportDevice,
        SymmetricKey,
    )

    edge = registry.create_device_with_sas(unique("py-edge"), _key(), _key(), "enabled", iot_edge=True)
    assert edge.device_scope.startswith(f"ms-azure-iot-edge://{edge.device_id}-"), edge.device_scope

    def leaf(scope):
        return Device(
            device_id=unique("py-leaf"),
            status="enabled",
            authentication=AuthenticationMechanism(
                type="sas", symmetric_key=SymmetricKey(primary_key=_key(), secondary_key=_key())
            ),
            device_scope=scope,
        )

    child = leaf(edge.device_scope)
    made = registry.protocol.devices.create_or_update_identity(child.device_id, child)
    assert made.device_scope == edge.device_scope
    assert made.parent_scopes == [edge.device_scope]

    for scope in ["ms-azure-iot-edge://nobody-637000000000000000", "not-a-scope",
                  f"ms-azure-iot-edge://{child.device_id}-1"]:
        bad = leaf(scope)
        with pytest.raises(HttpOperationError) as e:
            registry.protocol.devices.create_or_update_identity(bad.device_id, bad)
        assert e.value.response.status_code == 400
        assert "ErrorCode:InvalidDeviceScope;" in e.value.response.text, e.value.response.text
        with pytest.raises(HttpOperationError) as e:
            registry.get_device(bad.device_id)
        assert e.value.response.status_code == 404

    result = registry.bulk_create_or_update_devices([
        ExportImportDevice(id=unique("py-leaf"), import_mode="create",
                           device_scope="ms-azure-iot-edge://nobody-1"),
    ])
    assert result.is_successful is False
    assert [e.error_code for e in result.errors] == ["InvalidDeviceScope"], result.errors
