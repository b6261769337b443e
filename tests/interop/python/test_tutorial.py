"""The DPS symmetric-key group tutorial end to end, with Microsoft's SDKs, against Muster's
built-in hub: provision, connect to the assigned hub, telemetry, direct method, twin,
cloud-to-device message; refusals of a wrong key and a disabled device.

* Enrollment group: azure-iot-deviceprovisioning 1.0.0b1 (fixture ``dps``).
* Device: azure-iot-device 2.14.0 ``ProvisioningDeviceClient.create_from_symmetric_key`` then
  ``IoTHubDeviceClient.create_from_symmetric_key(symmetric_key, hostname=assigned_hub,
  device_id=device_id, websockets=..., server_verification_cert=<CA PEM>)``; parametrized over
  MQTT (8883) and MQTT over WebSocket (``wss://host:443/$iothub/websocket``).
* Service side: azure-iot-hub 2.7.0 ``IoTHubRegistryManager`` (``get_twin``, ``update_twin``,
  ``invoke_device_method``, ``update_device_with_sas``; REST through msrest/requests, CA from
  ``REQUESTS_CA_BUNDLE``). Telemetry is read and cloud-to-device messages are sent through
  Muster's REST extensions of the hub (``GET /devices/{id}/telemetry``, ``POST
  /devices/{id}/messages/cloudToDevice``): IoT Hub hands telemetry to Event Hubs and the service
  SDKs send C2D over AMQP, which Muster does not speak.

Every test gets its own server on an empty data dir (fixture ``muster``). No fixed sleeps:
callbacks are awaited through queues with bounded timeouts.
"""

from __future__ import annotations

import json
import queue
import secrets
import urllib.parse
from pathlib import Path

import pytest
import requests

from helpers import DPS_HOST, derive_device_key, service_sas_token, unique

# The registration id of the tutorial ("Provision a device using symmetric keys", group
# enrollment): a serial number and a MAC address.
TUTORIAL_REGISTRATION_ID = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
HUB_API_VERSION = "2021-04-12"
WAIT_S = 30  # bound for every callback the test waits for

TRANSPORTS = [
    pytest.param(False, id="mqtt"),
    pytest.param(True, id="mqtt-ws"),
]


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def hub(muster) -> dict:
    """connection.json hubs[0]: the built-in hub (same host as the DPS)."""
    hubs = muster.info.get("hubs") or []
    assert hubs and hubs[0].get("builtIn") is True, f"no built-in hub in connection.json: {muster.info}"
    return hubs[0]


@pytest.fixture
def registry(hub):
    """azure-iot-hub IoTHubRegistryManager on the built-in hub's iothubowner connection string.
    Constructing it creates an AMQP sender (port 5671) that is never connected here."""
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(hub["connectionString"])
    try:
        yield manager
    finally:
        if manager.amqp_svc_client is not None:
            manager.amqp_svc_client.disconnect_sync()
            manager.amqp_svc_client = None


class Tutorial:
    """What the tutorial has after its provisioning step."""

    def __init__(self, muster, hub, group_id, group_keys, initial_twin, device_key, result):
        self.muster = muster
        self.hub = hub
        self.group_id = group_id
        self.group_keys = group_keys
        self.initial_twin = initial_twin
        self.device_key = device_key
        self.result = result

    @property
    def device_id(self) -> str:
        return self.result.registration_state.device_id

    @property
    def assigned_hub(self) -> str:
        return self.result.registration_state.assigned_hub

    # -- hub REST extensions (telemetry, cloud-to-device) -------------------------------
    def _hub_url(self, path: str) -> str:
        return f"https://{self.hub['hostName']}{path}"

    def _hub_headers(self) -> dict:
        return {"Authorization": service_sas_token(self.hub["connectionString"])}

    def telemetry(self, after: int = 0, limit: int = 100) -> list:
        """GET /devices/{id}/telemetry: the stored device-to-cloud messages, oldest first."""
        r = requests.get(
            self._hub_url(f"/devices/{urllib.parse.quote(self.device_id, safe='')}/telemetry"),
            params={"api-version": HUB_API_VERSION, "after": after, "limit": limit},
            headers=self._hub_headers(),
            verify=self.muster.ca_cert,
            timeout=30,
        )
        assert r.status_code == 200, f"GET telemetry: {r.status_code} {r.text}"
        body = r.json()
        assert isinstance(body, list), body
        return body

    def send_c2d(self, body: bytes, headers: dict) -> requests.Response:
        """POST /devices/{id}/messages/cloudToDevice (Muster's REST extension)."""
        return requests.post(
            self._hub_url(f"/devices/{urllib.parse.quote(self.device_id, safe='')}/messages/cloudToDevice"),
            params={"api-version": HUB_API_VERSION},
            data=body,
            headers={**self._hub_headers(), **headers},
            verify=self.muster.ca_cert,
            timeout=30,
        )

    # -- device client ------------------------------------------------------------------
    def device_client(self, websockets: bool, key: str | None = None, **kwargs):
        """IoTHubDeviceClient exactly as the tutorial's device app builds it."""
        from azure.iot.device import IoTHubDeviceClient

        return IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=key or self.device_key,
            hostname=self.assigned_hub,
            device_id=self.device_id,
            websockets=websockets,
            server_verification_cert=Path(self.muster.ca_cert).read_text(),
            **kwargs,
        )


def provision(muster, hub, dps, websockets: bool, registration_id: str = TUTORIAL_REGISTRATION_ID) -> Tutorial:
    """Tutorial steps 1-3: a symmetric-key enrollment group with an initial twin, the device
    key derived here, and the device registered with ProvisioningDeviceClient."""
    from azure.iot.device import ProvisioningDeviceClient

    group_id = unique("py-tutorial")
    initial_twin = {
        "tags": {"tutorial": "symmetric-key-group"},
        "properties": {"desired": {"telemetryInterval": 5, "thresholds": {"temperature": 30.5, "wind": 12}}},
    }
    created = dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey"},
            "initialTwin": initial_twin,
        },
    )
    group_keys = created["attestation"]["symmetricKey"]
    device_key = derive_device_key(group_keys["primaryKey"], registration_id)

    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=muster.info["dpsHost"],
        registration_id=registration_id,
        id_scope=muster.id_scope,
        symmetric_key=device_key,
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )
    result = client.register()
    assert result.status == "assigned", str(result)
    state = result.registration_state
    assert state.assigned_hub == hub["hostName"] == DPS_HOST, str(state)
    assert state.device_id == registration_id, str(state)
    return Tutorial(muster, hub, group_id, group_keys, initial_twin, device_key, result)


@pytest.fixture
def connected():
    """connect(client): connect an IoTHubDeviceClient; every one is shut down after the test."""
    clients = []

    def connect(client):
        clients.append(client)
        client.connect()
        assert client.connected
        return client

    try:
        yield connect
    finally:
        for client in clients:
            try:
                client.shutdown()
            except Exception:  # best effort; the outcome is decided
                pass


def user_props(props: dict | None) -> dict:
    return {k: v for k, v in (props or {}).items() if not k.startswith("$")}


def tutorial_messages(n: int = 10):
    """The tutorial's messages with a message id and a custom property each."""
    from azure.iot.device import Message

    run = secrets.token_hex(4)
    out = []
    for i in range(1, n + 1):
        msg = Message(f"test wind speed {i}", message_id=f"msg-{run}-{i}")
        msg.custom_properties["index"] = str(i)
        msg.custom_properties["source"] = "tutorial"
        out.append(msg)
    return out


def assert_stored(stored: list, sent: list, device_id: str) -> None:
    """The hub stored exactly ``sent``, in order, with body, message id and properties."""
    summary = [(m.get("sequenceNumber"), m.get("body"), m.get("systemProperties")) for m in stored]
    assert len(stored) == len(sent), f"hub has {len(stored)} messages, sent {len(sent)}: {summary}"
    seqs = [m["sequenceNumber"] for m in stored]
    assert seqs == list(range(seqs[0], seqs[0] + len(sent))), f"sequence numbers not consecutive: {seqs}"
    for got, want in zip(stored, sent):
        assert got["deviceId"] == device_id, got
        assert got["bodyEncoding"] == "utf-8", got
        assert got["body"] == want.data, got
        assert got["systemProperties"].get("messageId") == want.message_id, got
        assert got["properties"] == want.custom_properties, got
        assert got["enqueuedTime"].endswith("Z"), got


# --------------------------------------------------------------------------------------------
# the tutorial: provision, connect, 10 messages, a direct method
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_tutorial_provision_connect_send_10_and_direct_method(muster, hub, dps, registry, connected, websockets):
    from azure.iot.device import MethodResponse
    from azure.iot.hub.models import CloudToDeviceMethod

    t = provision(muster, hub, dps, websockets)
    client = connected(t.device_client(websockets))

    # "Sending message #1 ... #10"
    sent = tutorial_messages(10)
    for msg in sent:
        client.send_message(msg)  # returns after the hub's PUBACK
    # PUBACK means stored: read at once, no polling.
    assert_stored(t.telemetry(), sent, t.device_id)

    # A direct method invoked with azure-iot-hub, answered by the device's handler.
    requests_seen: "queue.Queue" = queue.Queue()

    def on_method(request):
        requests_seen.put((request.name, request.payload))
        answer = {"rebooted": True, "echo": request.payload, "method": request.name}
        client.send_method_response(MethodResponse.create_from_method_request(request, 201, answer))

    client.on_method_request_received = on_method  # returns once subscribed
    payload = {"delay": 3, "reason": "tutorial", "list": [1, "a", None]}
    result = registry.invoke_device_method(
        t.device_id,
        CloudToDeviceMethod(method_name="reboot", payload=payload, response_timeout_in_seconds=20,
                            connect_timeout_in_seconds=5),
    )
    assert requests_seen.get(timeout=WAIT_S) == ("reboot", payload)
    assert result.status == 201, result
    assert result.payload == {"rebooted": True, "echo": payload, "method": "reboot"}, result.payload

    # Nothing else was stored meanwhile.
    assert len(t.telemetry()) == 10


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_telemetry_after_paging(muster, hub, dps, connected, websockets):
    """``after`` and ``limit`` page through the stored messages by sequence number."""
    t = provision(muster, hub, dps, websockets)
    client = connected(t.device_client(websockets))
    sent = tutorial_messages(10)
    for msg in sent:
        client.send_message(msg)
    first = t.telemetry(limit=4)
    assert [m["body"] for m in first] == [m.data for m in sent[:4]]
    rest = t.telemetry(after=first[-1]["sequenceNumber"])
    assert [m["body"] for m in rest] == [m.data for m in sent[4:]]


# --------------------------------------------------------------------------------------------
# twin round trip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_twin_round_trip(muster, hub, dps, registry, connected, websockets):
    from azure.iot.hub.models import Twin, TwinProperties

    t = provision(muster, hub, dps, websockets)
    client = connected(t.device_client(websockets))

    # The enrollment's initial desired properties reach the device.
    twin = client.get_twin()
    assert user_props(twin["desired"]) == t.initial_twin["properties"]["desired"], twin
    assert isinstance(twin["desired"].get("$version"), int), twin
    assert isinstance(twin["reported"].get("$version"), int), twin

    # The device reports; the service sees it.
    reported = {"firmware": "1.0.4", "telemetryInterval": 5, "location": {"lat": 47.6, "lon": -122.3}}
    client.patch_twin_reported_properties(reported)
    service_twin = registry.get_twin(t.device_id)
    assert user_props(service_twin.properties.reported) == reported, service_twin.properties.reported
    assert client.get_twin()["reported"]["firmware"] == "1.0.4"

    # null deletes a reported property.
    client.patch_twin_reported_properties({"location": None})
    service_twin = registry.get_twin(t.device_id)
    assert user_props(service_twin.properties.reported) == {"firmware": "1.0.4", "telemetryInterval": 5}

    # A desired patch from the service reaches the device's handler.
    patches: "queue.Queue" = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put  # returns once subscribed
    version_before = client.get_twin()["desired"]["$version"]
    updated = registry.update_twin(
        t.device_id,
        Twin(properties=TwinProperties(desired={"telemetryInterval": 10, "mode": "storm"})),
        etag="*",
    )
    patch = patches.get(timeout=WAIT_S)
    assert user_props(patch) == {"telemetryInterval": 10, "mode": "storm"}, patch
    assert patch.get("$version") == updated.properties.desired["$version"], (patch, updated.properties.desired)
    assert patch["$version"] > version_before, (patch, version_before)
    twin = client.get_twin()
    assert user_props(twin["desired"]) == {
        "telemetryInterval": 10,
        "mode": "storm",
        "thresholds": t.initial_twin["properties"]["desired"]["thresholds"],
    }, twin


# --------------------------------------------------------------------------------------------
# cloud-to-device message through the REST extension
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_c2d_message_reaches_on_message_received(muster, hub, dps, connected, websockets):
    t = provision(muster, hub, dps, websockets)
    client = connected(t.device_client(websockets))
    received: "queue.Queue" = queue.Queue()
    client.on_message_received = received.put  # returns once subscribed

    body = json.dumps({"command": "blink", "times": 3}).encode()
    message_id = f"c2d-{secrets.token_hex(4)}"
    r = t.send_c2d(
        body,
        {
            "iothub-messageid": message_id,
            "iothub-correlationid": "corr-1",
            "content-type": "application/json",
            "iothub-app-priority": "high",
            "iothub-app-colour": "blue green",
        },
    )
    assert r.status_code == 204, f"{r.status_code} {r.text}"

    msg = received.get(timeout=WAIT_S)
    assert msg.data == body, msg.data
    assert msg.message_id == message_id, vars(msg)
    assert msg.correlation_id == "corr-1", vars(msg)
    assert msg.content_type == "application/json", vars(msg)
    assert msg.custom_properties == {"priority": "high", "colour": "blue green"}, msg.custom_properties
    assert received.empty()


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_wrong_device_key_is_refused(muster, hub, dps, connected, websockets):
    """A SAS signed with a key that is not the device's: the hub refuses the CONNECT (CONNACK
    4/5), which the SDK reports as ``CredentialError``; nothing is stored."""
    from azure.iot.device import Message
    from azure.iot.device.exceptions import CredentialError

    t = provision(muster, hub, dps, websockets)
    wrong = derive_device_key(t.group_keys["primaryKey"], t.device_id + "-x")
    client = t.device_client(websockets, key=wrong, connection_retry=False)
    with pytest.raises(CredentialError):
        connected(client)
    # send_message() connects on its own (auto-connect) and is refused the same way. A fresh
    # client: on the refused one, paho's late disconnect of the first connection can fail
    # the second connect as ConnectionFailedError (a client race, see README).
    sender = t.device_client(websockets, key=wrong, connection_retry=False)
    try:
        with pytest.raises(CredentialError):
            sender.send_message(Message("must not be stored"))
    finally:
        sender.shutdown()
    assert t.telemetry() == []


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_disabled_device_is_refused(muster, hub, dps, registry, connected, websockets):
    """A device disabled with azure-iot-hub ``update_device_with_sas(status="disabled")`` can't
    connect (``CredentialError``); enabled again, it can."""
    from azure.iot.device.exceptions import CredentialError

    t = provision(muster, hub, dps, websockets)
    secondary = derive_device_key(t.group_keys["secondaryKey"], t.device_id)
    device = registry.update_device_with_sas(t.device_id, "*", t.device_key, secondary, "disabled")
    assert device.status == "disabled", device

    client = t.device_client(websockets, connection_retry=False)
    with pytest.raises(CredentialError):
        connected(client)
    assert t.telemetry() == []

    device = registry.update_device_with_sas(t.device_id, "*", t.device_key, secondary, "enabled")
    assert device.status == "enabled", device
    connected(t.device_client(websockets))
