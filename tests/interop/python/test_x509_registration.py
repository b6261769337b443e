"""X.509 device registration with Microsoft's Python device SDK, then the device on the hub.

* azure-iot-device 2.14.0 ``ProvisioningDeviceClient.create_from_x509_certificate(
  provisioning_host, registration_id, id_scope, x509=X509(cert_file, key_file[, pass_phrase]),
  websockets=..., server_verification_cert=<CA PEM>)`` over MQTT (8883) and MQTT-WS
  (``wss://host:443/$iothub/websocket``). The client hands ``cert_file`` to
  ``SSLContext.load_cert_chain``, so a file holding leaf + intermediate PEMs makes the
  TLS handshake send that chain (case c).
* Enrollments with azure-iot-deviceprovisioning 1.0.0b1 (fixture ``dps``); CA certificates
  through Muster's service-API extension ``/caCertificates`` (no SDK has it; plain REST with
  the owner policy's SAS, as the SDKs sign it).
* After ``assigned``: ``IoTHubDeviceClient.create_from_x509_certificate(x509=...,
  hostname=assigned_hub, device_id=...)`` connects to the built-in hub with the same
  certificate and sends telemetry, read back through ``GET /devices/{id}/telemetry``;
  azure-iot-hub 2.7.0 ``get_device`` shows ``selfSigned`` with the leaf's SHA-256 thumbprint.

Cases: (a) individual enrollment, self-signed leaf; (b) group, signing certificate = root,
root -> leaf; (c) group, signing certificate = root, root -> intermediate -> leaf with the
device sending leaf + intermediate (key encrypted, ``pass_phrase``); (d) group on a verified
CA reference (upload, verification code, proof of possession). Refused: a group on an
unverified CA reference, and a leaf from a root no enrollment knows.

X.509 version 1 device certificates (no extensions), made as device makers do with
``openssl x509 -req`` and no extension file: (e) individual enrollment with the certificate as
PEM and as base64 DER (matched by its thumbprint), (f) a v1 leaf under a group's root, each
then on the hub; (g) a hub device created by thumbprint (azure-iot-hub
``create_device_with_x509``) connects with a v1 certificate; (h) a v1 certificate acting as
the group's CA is refused (401012).

Every test gets its own server on an empty data dir (fixture ``muster``).
"""

from __future__ import annotations

import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from cryptography import x509 as cx509
from cryptography.hazmat.primitives import serialization
from msrest.exceptions import HttpOperationError

from helpers import DPS_HOST, TestCert, assert_cert_info, make_cert, service_sas_token, unique

HUB_API_VERSION = "2021-04-12"
SERVICE_API_VERSION = "2021-10-01"

TRANSPORTS = [
    pytest.param(False, id="mqtt"),
    pytest.param(True, id="mqtt-ws"),
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def transport_name(websockets: bool) -> str:
    return "MQTT-WS" if websockets else "MQTT"


class DeviceFiles:
    """The files a device application hands to ``X509``: cert_file (leaf first, then the
    certificates it sends after it) and key_file (PKCS#8 PEM, optionally encrypted)."""

    def __init__(self, tmp_path: Path, leaf: TestCert, chain: tuple = (), pass_phrase: str | None = None,
                 name: str = "device"):
        d = tmp_path / f"{name}-{leaf.subject_cn}"
        d.mkdir(parents=True, exist_ok=True)
        self.leaf = leaf
        self.cert_file = d / "device-chain.pem"
        self.key_file = d / "device.key"
        self.pass_phrase = pass_phrase
        self.cert_file.write_text(leaf.pem + "".join(c.pem for c in chain))
        encryption = (
            serialization.BestAvailableEncryption(pass_phrase.encode())
            if pass_phrase
            else serialization.NoEncryption()
        )
        self.key_file.write_bytes(
            leaf.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )

    def x509(self):
        from azure.iot.device import X509

        return X509(cert_file=str(self.cert_file), key_file=str(self.key_file), pass_phrase=self.pass_phrase)


def provisioning_client(muster, files: DeviceFiles, websockets: bool, registration_id: str | None = None):
    from azure.iot.device import ProvisioningDeviceClient

    return ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=muster.info["dpsHost"],
        registration_id=registration_id or files.leaf.subject_cn,
        id_scope=muster.id_scope,
        x509=files.x509(),
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )


def shutdown_provisioning(client) -> None:
    """register() stops its pipeline only on success; after an error use the pipeline's
    shutdown (ProvisioningDeviceClient has no public one; see test_device_registration.py)."""
    from azure.iot.device.common.evented_callback import EventedCallback

    done = EventedCallback()
    try:
        client._pipeline.shutdown(callback=done)
        done.wait_for_completion(timeout=15)
    except Exception:  # best effort; the outcome is decided
        pass


@pytest.fixture
def hub(muster) -> dict:
    hubs = muster.info.get("hubs") or []
    assert hubs and hubs[0].get("builtIn") is True, f"no built-in hub in connection.json: {muster.info}"
    return hubs[0]


@pytest.fixture
def registry(hub):
    """azure-iot-hub IoTHubRegistryManager (REST only; CA from REQUESTS_CA_BUNDLE)."""
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(hub["connectionString"])
    try:
        yield manager
    finally:
        if manager.amqp_svc_client is not None:
            manager.amqp_svc_client.disconnect_sync()
            manager.amqp_svc_client = None


def service_call(muster, method: str, path: str, body: dict | None = None) -> requests.Response:
    """Muster's service API (owner policy SAS), for the /caCertificates extension."""
    return requests.request(
        method,
        f"https://{muster.info['dpsHost']}{path}",
        params={"api-version": SERVICE_API_VERSION},
        json=body,
        headers={"Authorization": service_sas_token(muster.connection_string)},
        verify=muster.ca_cert,
        timeout=30,
    )


def register_and_check(muster, dps, files: DeviceFiles, websockets: bool, group_id: str | None,
                       registration_timer):
    """register() -> assigned on the built-in hub as device id = CN, with a service-side
    registration record (listed under the group for group devices). The Python client's
    RegistrationResult has no x509 fields; the Node suite checks the answer's
    ``registrationState.x509``."""
    registration_id = files.leaf.subject_cn
    client = provisioning_client(muster, files, websockets)
    t0 = time.perf_counter()
    result = client.register()
    registration_timer(f"x509 {group_id or 'individual'}/{transport_name(websockets)}", time.perf_counter() - t0)

    assert result is not None, "register() returned None"
    assert result.status == "assigned", f"status {result.status!r}: {result}"
    state = result.registration_state
    assert state.assigned_hub == muster.info["dpsHost"] == DPS_HOST, str(state)
    assert state.device_id == registration_id, str(state)
    assert state.sub_status == "initialAssignment", str(state)

    # The service API's DeviceRegistrationState (no x509 fields in its schema); groups list
    # their devices' records under the group.
    record = dps.device_registration_state.get(id=registration_id)
    assert record["status"] == "assigned", record
    assert record["deviceId"] == registration_id, record
    assert record["assignedHub"] == DPS_HOST, record
    if group_id is not None:
        regs = list(dps.device_registration_state.query(id=group_id))
        assert registration_id in [r["registrationId"] for r in regs], regs
    return result


def connect_and_send(muster, hub, registry, files: DeviceFiles, result, websockets: bool) -> None:
    """The device connects to its assigned hub with the same certificate and sends telemetry
    that the hub has stored when send_message returns; the hub identity is selfSigned with
    the leaf's thumbprint."""
    from azure.iot.device import IoTHubDeviceClient, Message

    device_id = result.registration_state.device_id
    device = registry.get_device(device_id)
    assert device.authentication.type == "selfSigned", device.authentication.type
    thumbs = device.authentication.x509_thumbprint
    assert thumbs.primary_thumbprint == files.leaf.sha256, (thumbs.primary_thumbprint, files.leaf.sha256)
    assert device.status == "enabled", device.status

    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=files.x509(),
        hostname=result.registration_state.assigned_hub,
        device_id=device_id,
        websockets=websockets,
        server_verification_cert=Path(muster.ca_cert).read_text(),
    )
    body = f"x509 telemetry from {device_id} over {transport_name(websockets)}"
    try:
        client.connect()
        assert client.connected
        msg = Message(body, message_id=f"{device_id}-1")
        msg.custom_properties["case"] = "x509"
        client.send_message(msg)
    finally:
        client.shutdown()

    r = requests.get(
        f"https://{hub['hostName']}/devices/{urllib.parse.quote(device_id, safe='')}/telemetry",
        params={"api-version": HUB_API_VERSION, "after": 0, "limit": 10},
        headers={"Authorization": service_sas_token(hub["connectionString"])},
        verify=muster.ca_cert,
        timeout=30,
    )
    assert r.status_code == 200, f"GET telemetry: {r.status_code} {r.text}"
    messages = r.json()
    assert [m["body"] for m in messages] == [body], messages
    assert messages[0]["deviceId"] == device_id, messages
    assert messages[0]["systemProperties"]["messageId"] == f"{device_id}-1", messages
    assert messages[0]["properties"] == {"case": "x509"}, messages


def create_signing_group(dps, group_id: str, signer: TestCert) -> None:
    dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": signer.pem}}},
            },
        },
    )


def create_ca_reference_group(dps, group_id: str, ca_name: str) -> None:
    dps.enrollment_group.create_or_update(
        id=group_id,
        enrollment_group={
            "enrollmentGroupId": group_id,
            "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}},
        },
    )


def verify_ca(muster, name: str, ca: TestCert) -> None:
    """Proof of possession: a verification code, then a certificate with CN = code signed by
    the CA."""
    r = service_call(muster, "POST", f"/caCertificates/{name}/verificationCode")
    assert r.status_code == 200, f"verificationCode: {r.status_code} {r.text}"
    code = r.json()["verificationCode"]
    assert isinstance(code, str) and code, r.text
    proof = make_cert(code, ca=False, issuer=ca)
    r = service_call(muster, "POST", f"/caCertificates/{name}/verify", {"certificate": proof.pem})
    assert r.status_code == 200, f"verify: {r.status_code} {r.text}"
    assert r.json()["isVerified"] is True, r.text


def upload_ca(muster, name: str, ca: TestCert) -> dict:
    r = service_call(muster, "PUT", f"/caCertificates/{name}", {"certificate": ca.pem})
    assert r.status_code == 200, f"PUT caCertificates: {r.status_code} {r.text}"
    body = r.json()
    assert body["name"] == name and body["isVerified"] is False, body
    assert body["info"]["sha256Thumbprint"] == ca.sha256, body
    return body


def assert_refused(muster, registry, files: DeviceFiles, websockets: bool) -> None:
    """register() fails as the SDK reports a DPS 401: ClientError caused by ServiceError
    (see README, "What the SDKs do with errors"); no hub device is created."""
    from azure.iot.device.exceptions import ClientError, ServiceError

    client = provisioning_client(muster, files, websockets)
    try:
        with pytest.raises(ClientError) as ei:
            client.register()
    finally:
        shutdown_provisioning(client)
    cause = ei.value.__cause__
    assert isinstance(cause, ServiceError), f"cause {cause!r}"
    assert "401" in str(cause), f"cause {cause!r}"
    with pytest.raises(HttpOperationError) as hi:
        registry.get_device(files.leaf.subject_cn)
    assert hi.value.response.status_code == 404, hi.value.response.text


def openssl(cwd: Path, *args: str) -> str:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"openssl {args}: {out.stderr}"
    return out.stdout


def make_v1_cert(tmp_path: Path, cn: str, issuer: TestCert | None = None) -> TestCert:
    """An X.509 version 1 certificate (EC P-256) made with ``openssl x509 -req`` and no
    extension file: self-signed, or signed by ``issuer``."""
    d = tmp_path / f"v1-{cn}"
    d.mkdir(parents=True, exist_ok=True)
    openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "dev.key")
    openssl(d, "req", "-new", "-key", "dev.key", "-subj", f"/CN={cn}", "-out", "dev.csr")
    args = ["x509", "-req", "-in", "dev.csr", "-days", "2", "-out", "dev.pem"]
    if issuer is None:
        args += ["-key", "dev.key"]
    else:
        (d / "ca.pem").write_text(issuer.pem)
        (d / "ca.key").write_bytes(
            issuer.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        args += ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
    openssl(d, *args)
    text = openssl(d, "x509", "-in", "dev.pem", "-noout", "-text")
    assert "Version: 1 (0x0)" in text, text
    pem = (d / "dev.pem").read_text()
    cert = cx509.load_pem_x509_certificate(pem.encode())
    assert cert.version == cx509.Version.v1, cert.version
    key = serialization.load_pem_private_key((d / "dev.key").read_bytes(), password=None)
    return TestCert(cert=cert, key=key, pem=pem)


# --------------------------------------------------------------------------------------------
# (a) individual enrollment, self-signed leaf
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_individual_enrollment_self_signed(muster, dps, hub, registry, tmp_path, registration_timer, websockets):
    registration_id = unique("py-x509-ind")
    leaf = make_cert(registration_id, ca=False)
    created = dps.enrollment.create_or_update(
        id=registration_id,
        enrollment={
            "registrationId": registration_id,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {"certificate": leaf.pem}}},
            },
        },
    )
    assert created["attestation"]["type"] == "x509", created
    assert_cert_info(created["attestation"]["x509"]["clientCertificates"]["primary"]["info"], leaf)

    files = DeviceFiles(tmp_path, leaf)
    result = register_and_check(muster, dps, files, websockets, None, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


# --------------------------------------------------------------------------------------------
# (b) group, signing certificate = root; root -> leaf
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_group_root_signed_leaf(muster, dps, hub, registry, tmp_path, registration_timer, websockets):
    group_id = unique("py-x509-root")
    root = make_cert(f"{group_id} Root CA", ca=True)
    create_signing_group(dps, group_id, root)

    files = DeviceFiles(tmp_path, make_cert(unique("py-x509-rl"), ca=False, issuer=root))
    result = register_and_check(muster, dps, files, websockets, group_id, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


# --------------------------------------------------------------------------------------------
# (c) group, signing certificate = root; root -> intermediate -> leaf, device sends both
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_group_root_intermediate_leaf_chain(muster, dps, hub, registry, tmp_path, registration_timer, websockets):
    group_id = unique("py-x509-chain")
    root = make_cert(f"{group_id} Root CA", ca=True)
    intermediate = make_cert(f"{group_id} Intermediate CA", ca=True, issuer=root)
    create_signing_group(dps, group_id, root)

    leaf = make_cert(unique("py-x509-ch"), ca=False, issuer=intermediate)
    # Control: the leaf alone (no intermediate in cert_file) does not chain to the root.
    assert_refused(muster, registry, DeviceFiles(tmp_path, leaf, name="leaf-only"), websockets)
    # cert_file = leaf + intermediate; the key file encrypted (X509 pass_phrase).
    files = DeviceFiles(tmp_path, leaf, chain=(intermediate,), pass_phrase="muster-test-pass")
    result = register_and_check(muster, dps, files, websockets, group_id, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


# --------------------------------------------------------------------------------------------
# (d) group on a verified CA reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_group_on_verified_ca_reference(muster, dps, hub, registry, tmp_path, registration_timer, websockets):
    ca_name = unique("py-ca")
    ca = make_cert(f"{ca_name} Device CA", ca=True)
    upload_ca(muster, ca_name, ca)
    verify_ca(muster, ca_name, ca)

    group_id = unique("py-x509-caref")
    create_ca_reference_group(dps, group_id, ca_name)
    files = DeviceFiles(tmp_path, make_cert(unique("py-x509-cr"), ca=False, issuer=ca))
    result = register_and_check(muster, dps, files, websockets, group_id, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


# --------------------------------------------------------------------------------------------
# refused
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_unverified_ca_reference_is_refused(muster, dps, registry, tmp_path, websockets):
    ca_name = unique("py-ca-unverified")
    ca = make_cert(f"{ca_name} Device CA", ca=True)
    upload_ca(muster, ca_name, ca)
    # A group can't name an unverified CA: refused at write time.
    group_id = unique("py-x509-unverified")
    with pytest.raises(HttpResponseError) as refused:
        create_ca_reference_group(dps, group_id, ca_name)
    text = refused.value.response.text()
    assert refused.value.status_code == 400 and "not verified" in text, text
    # Named while verified, then replaced by a new (unverified) certificate: its devices are
    # refused until it is verified again.
    verify_ca(muster, ca_name, ca)
    create_ca_reference_group(dps, group_id, ca_name)
    replacement = make_cert(f"{ca_name} Replacement CA", ca=True)
    r = service_call(muster, "PUT", f"/caCertificates/{ca_name}", {"certificate": replacement.pem})
    assert r.status_code == 200 and r.json()["isVerified"] is False, r.text

    files = DeviceFiles(tmp_path, make_cert(unique("py-x509-uv"), ca=False, issuer=replacement))
    assert_refused(muster, registry, files, websockets)
    with pytest.raises(ResourceNotFoundError):
        dps.device_registration_state.get(id=files.leaf.subject_cn)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_unknown_root_is_refused(muster, dps, registry, tmp_path, websockets):
    # A group exists, but on another root.
    create_signing_group(dps, unique("py-x509-known"), make_cert("Known Root CA", ca=True))
    stranger = make_cert("Stranger Root CA", ca=True)
    files = DeviceFiles(tmp_path, make_cert(unique("py-x509-st"), ca=False, issuer=stranger), chain=(stranger,))
    assert_refused(muster, registry, files, websockets)


# --------------------------------------------------------------------------------------------
# X.509 version 1 device certificates
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("websockets", TRANSPORTS)
@pytest.mark.parametrize("form", ["pem", "base64-der"])
def test_v1_individual_enrollment(muster, dps, hub, registry, tmp_path, registration_timer, websockets, form):
    registration_id = unique("py-x509-v1")
    leaf = make_v1_cert(tmp_path, registration_id)
    created = dps.enrollment.create_or_update(
        id=registration_id,
        enrollment={
            "registrationId": registration_id,
            "attestation": {
                "type": "x509",
                "x509": {"clientCertificates": {"primary": {
                    "certificate": leaf.pem if form == "pem" else leaf.der_b64}}},
            },
        },
    )
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert_cert_info(info, leaf)
    assert info["version"] == 1, info

    files = DeviceFiles(tmp_path, leaf)
    result = register_and_check(muster, dps, files, websockets, None, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_v1_leaf_under_group_root(muster, dps, hub, registry, tmp_path, registration_timer, websockets):
    group_id = unique("py-x509-v1g")
    root = make_cert(f"{group_id} Root CA", ca=True)
    create_signing_group(dps, group_id, root)

    files = DeviceFiles(tmp_path, make_v1_cert(tmp_path, unique("py-x509-v1l"), issuer=root))
    result = register_and_check(muster, dps, files, websockets, group_id, registration_timer)
    connect_and_send(muster, hub, registry, files, result, websockets)


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_v1_hub_device_by_thumbprint(muster, hub, registry, tmp_path, websockets):
    """A selfSigned hub device made with the service SDK from the v1 certificate's thumbprint
    connects with that certificate; another v1 certificate with the same CN does not."""
    from azure.iot.device import IoTHubDeviceClient
    from azure.iot.device.exceptions import ConnectionFailedError, CredentialError

    device_id = unique("py-hub-v1")
    leaf = make_v1_cert(tmp_path, device_id)
    registry.create_device_with_x509(device_id, leaf.sha256, leaf.sha256, "enabled")

    def connect(files: DeviceFiles) -> None:
        client = IoTHubDeviceClient.create_from_x509_certificate(
            x509=files.x509(),
            hostname=hub["hostName"],
            device_id=device_id,
            websockets=websockets,
            server_verification_cert=Path(muster.ca_cert).read_text(),
            connection_retry=False,
        )
        try:
            client.connect()
            assert client.connected
        finally:
            client.shutdown()

    connect(DeviceFiles(tmp_path, leaf))
    other = make_v1_cert(tmp_path / "other", device_id)
    with pytest.raises((CredentialError, ConnectionFailedError)):
        connect(DeviceFiles(tmp_path, other, name="other"))


@pytest.mark.parametrize("websockets", TRANSPORTS)
def test_v1_ca_is_refused(muster, dps, registry, tmp_path, websockets):
    """A v1 certificate cannot be a CA: a group whose signing certificate is v1 attests none
    of the leaves it signed, with a DPS 401 after a completed handshake (the Python client
    shows only the status; the Node and Rust tests check the code, 401012), no hub device."""
    group_id = unique("py-x509-v1ca")
    v1_ca = make_v1_cert(tmp_path, f"{group_id} V1 CA")
    create_signing_group(dps, group_id, v1_ca)
    files = DeviceFiles(tmp_path, make_v1_cert(tmp_path, unique("py-x509-v1u"), issuer=v1_ca))
    assert_refused(muster, registry, files, websockets)
    with pytest.raises(ResourceNotFoundError):
        dps.device_registration_state.get(id=files.leaf.subject_cn)
