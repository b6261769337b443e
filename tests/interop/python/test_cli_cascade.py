"""The ``muster`` CLI's cascade, checked with Microsoft's Python SDKs.

* ``muster registration delete ID --cascade`` removes the DPS registration record *and*
  the device identity from its hub (the cascade DPS lacks): azure-iot-hub 2.7.0
  ``IoTHubRegistryManager.get_device`` finds the device before and answers 404 after;
  azure-iot-deviceprovisioning 1.0.0b1 ``device_registration_state.get`` raises
  ``ResourceNotFoundError`` after.
* ``muster deprovision ID --block`` removes both and keeps the device out: its next
  registration (azure-iot-device 2.14.0 ``ProvisioningDeviceClient``, and
  ``muster device register``) ends ``disabled``.

The CLI runs as an operator runs it, against the fixture's server: ``--data-dir`` of the
server (connection.json holds the service and hub connection strings and the CA path).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from msrest.exceptions import HttpOperationError

from helpers import unique
from muster_server import muster_bin

CLI_TIMEOUT_S = 60


def muster_cli(muster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``muster ARGS --data-dir <the server's data dir>``; no MUSTER_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_") and k != "RUST_LOG"}
    cmd = [str(muster_bin()), *args, "--data-dir", str(muster.data_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}",
            pytrace=False,
        )
    return proc


def muster_json(muster, *args: str):
    return json.loads(muster_cli(muster, *args, "--output", "json").stdout)


def derive_device_key(group_key: str, registration_id: str) -> str:
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@pytest.fixture
def registry(muster):
    """azure-iot-hub 2.7.0 IoTHubRegistryManager for the built-in hub (connection.json
    hubs[0]); it trusts the test CA through REQUESTS_CA_BUNDLE. Only REST calls are made."""
    from azure.iot.hub import IoTHubRegistryManager

    hub = muster.builtin_hub()
    assert hub is not None, f"connection.json has no built-in hub: {muster.info}"
    manager = IoTHubRegistryManager.from_connection_string(hub["connectionString"])
    try:
        yield manager
    finally:
        if manager.amqp_svc_client is not None:
            manager.amqp_svc_client.disconnect_sync()
            manager.amqp_svc_client = None


def make_device_client(muster, registration_id: str, key: str):
    from azure.iot.device import ProvisioningDeviceClient

    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=muster.info["dpsHost"],
        registration_id=registration_id,
        id_scope=muster.id_scope,
        symmetric_key=key,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )


def shutdown_client(client) -> None:
    """register() leaves its pipeline up after an error; stop it (best effort)."""
    from azure.iot.device.common.evented_callback import EventedCallback

    done = EventedCallback()
    try:
        client._pipeline.shutdown(callback=done)
        done.wait_for_completion(timeout=15)
    except Exception:
        pass


def assert_hub_has_no_device(registry, device_id: str) -> None:
    with pytest.raises(HttpOperationError) as ei:
        registry.get_device(device_id)
    status = ei.value.response.status_code
    assert status == 404, f"expected 404 for {device_id}, got {status}: {ei.value.response.text}"


def assert_no_registration_record(dps, registration_id: str) -> None:
    with pytest.raises(ResourceNotFoundError):
        dps.device_registration_state.get(id=registration_id)


def create_group(muster) -> str:
    """An enrollment group made with the CLI; returns its primary key."""
    group_id = unique("cli-group")
    muster_cli(muster, "enrollment-group", "create", "--group-id", group_id)
    group = muster_json(muster, "enrollment-group", "show", group_id, "--show-keys")
    return group["attestation"]["symmetricKey"]["primaryKey"]


def test_registration_delete_cascade_removes_the_hub_device(muster, dps, registry):
    group_key = create_group(muster)
    registration_id = unique("cli-cascade")
    result = muster_json(
        muster, "device", "register", "--registration-id", registration_id, "--group-key", group_key
    )
    assert result["status"] == "assigned", result
    assert result["deviceId"] == registration_id, result

    device = registry.get_device(registration_id)
    assert device.device_id == registration_id
    assert device.authentication.symmetric_key.primary_key == derive_device_key(group_key, registration_id)
    state = dps.device_registration_state.get(id=registration_id)
    assert state["status"] == "assigned", state

    # Without --cascade another device keeps its hub identity (the DPS behaviour).
    kept = unique("cli-kept")
    muster_json(muster, "device", "register", "--registration-id", kept, "--group-key", group_key)
    muster_cli(muster, "registration", "delete", kept)
    assert registry.get_device(kept).device_id == kept
    assert_no_registration_record(dps, kept)

    muster_cli(muster, "registration", "delete", registration_id, "--cascade")
    assert_hub_has_no_device(registry, registration_id)
    assert_no_registration_record(dps, registration_id)

    # Nothing left to delete: a clear, non-zero failure.
    again = muster_cli(muster, "registration", "delete", registration_id, "--cascade", check=False)
    assert again.returncode != 0
    assert "404203" in again.stderr or "no registration record" in again.stderr, again.stderr


def test_deprovision_block_keeps_the_device_out(muster, dps, registry):
    group_key = create_group(muster)
    registration_id = unique("py-blocked")
    device_key = derive_device_key(group_key, registration_id)

    # The device registers itself with the Python device SDK (MQTT).
    client = make_device_client(muster, registration_id, device_key)
    result = client.register()
    assert result.status == "assigned", str(result)
    assert registry.get_device(registration_id).device_id == registration_id

    out = muster_json(muster, "deprovision", registration_id, "--block")
    rows = out if isinstance(out, list) else [out]
    assert rows and rows[0]["registrationId"] == registration_id, out
    assert_hub_has_no_device(registry, registration_id)
    assert_no_registration_record(dps, registration_id)
    enrollment = dps.enrollment.get(id=registration_id)
    assert enrollment["provisioningStatus"] == "disabled", enrollment

    # Its next attempt ends `disabled`. azure-iot-device 2.14.0 accepts only assigning /
    # assigned / failed and raises ClientError caused by ServiceError("... invalid
    # registration status disabled ...").
    from azure.iot.device.exceptions import ClientError, ServiceError

    client = make_device_client(muster, registration_id, device_key)
    try:
        with pytest.raises(ClientError) as ei:
            client.register()
    finally:
        shutdown_client(client)
    assert isinstance(ei.value.__cause__, ServiceError), f"cause {ei.value.__cause__!r}"
    assert "invalid registration status disabled" in str(ei.value.__cause__), str(ei.value.__cause__)
    state = dps.device_registration_state.get(id=registration_id)
    assert state["status"] == "disabled", state
    assert_hub_has_no_device(registry, registration_id)

    # The CLI's device register says so too, with a non-zero exit.
    proc = muster_cli(
        muster,
        "device",
        "register",
        "--registration-id",
        registration_id,
        "--group-key",
        group_key,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert "disabled" in proc.stderr, proc.stderr
    assert_hub_has_no_device(registry, registration_id)
