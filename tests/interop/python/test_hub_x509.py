"""An X.509 (selfSigned) device on the built-in hub with Microsoft's Python device SDK.

The hub identity is created with azure-iot-hub 2.7.0 ``create_device_with_x509`` (leaf
SHA-256 thumbprint); the device connects with azure-iot-device 2.14.0
``IoTHubDeviceClient.create_from_x509_certificate`` over MQTT and MQTT-WS, presenting its
certificate in the TLS handshake (no password), and sends a message that the hub stores.
A device whose certificate does not match is refused.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from helpers import make_cert, service_sas_token, unique

TRANSPORTS = [pytest.param(False, id="mqtt"), pytest.param(True, id="mqtt-ws")]


def _write_pair(tmp_path: Path, cert) -> tuple[str, str]:
    cert_file = tmp_path / "device.pem"
    key_file = tmp_path / "device.key"
    cert_file.write_text(cert.pem)
    key_file.write_bytes(
        cert.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


def _client(muster, hub_host: str, device_id: str, cert_file: str, key_file: str, websockets: bool):
    from azure.iot.device import IoTHubDeviceClient, X509

    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=cert_file, key_file=key_file),
        hostname=hub_host,
        device_id=device_id,
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_self_signed_device_connects_with_its_certificate(muster, tmp_path, websockets):
    from azure.iot.device import Message
    from azure.iot.device.exceptions import CredentialError, ConnectionFailedError
    from azure.iot.hub import IoTHubRegistryManager

    hub = muster.info["hubs"][0]
    registry = IoTHubRegistryManager.from_connection_string(hub["connectionString"])
    device_id = unique("py-x509")
    cert = make_cert(device_id, ca=False)
    registry.create_device_with_x509(device_id, cert.sha256, cert.sha256, "enabled")
    assert registry.get_device(device_id).authentication.type == "selfSigned"

    cert_file, key_file = _write_pair(tmp_path, cert)
    client = _client(muster, hub["hostName"], device_id, cert_file, key_file, websockets)
    client.connect()
    try:
        client.send_message(Message("hello from x509", message_id="x1"))
    finally:
        client.shutdown()
    r = requests.get(
        f"https://{hub['hostName']}/devices/{urllib.parse.quote(device_id, safe='')}/telemetry",
        params={"api-version": "2021-04-12", "after": 0, "limit": 10},
        headers={"Authorization": service_sas_token(hub["connectionString"])},
        verify=muster.ca_cert,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    messages = r.json()
    assert [m["body"] for m in messages] == ["hello from x509"], messages
    assert messages[0]["systemProperties"]["messageId"] == "x1"

    # Another certificate with the same subject is not this device.
    impostor = make_cert(device_id, ca=False)
    other_dir = tmp_path / "impostor"
    other_dir.mkdir()
    bad_cert, bad_key = _write_pair(other_dir, impostor)
    bad = _client(muster, hub["hostName"], device_id, bad_cert, bad_key, websockets)
    try:
        with pytest.raises((CredentialError, ConnectionFailedError)):
            bad.connect()
    finally:
        bad.shutdown()
