"""Shared helpers for the Python interop tests: ids, key checks, test certificates."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The loopback address the servers bind (scripts/interop.sh, muster_server.py).
DPS_HOST = os.environ.get("MUSTER_DPS_HOST") or "127.0.0.2"

# Sample TPM endorsement key from the azure-iot-deviceprovisioning samples/tests.
TEST_ENDORSEMENT_KEY = (
    "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAibym9HQP9vxCGF5dVc1Q"
    "QsAGe021aUGJzNol1/gycBx3jFsTpwmWbISRwnFvflWd0w2Mc44FAAZNaJOAAxwZvG8GvyLlHh6fGKdh+mSBL4iLH2bZ4Ry22cB3"
    "CJVjXmdGoz9Y/j3/NwLndBxQC+baNvzvyVQZ4/A2YL7vzIIj2ik4y+ve9ir7U0GbNdnxskqK1KFIITVVtkTIYyyFTIR0BySjPrRI"
    "Dj7r7Mh5uF9HBppGKQCBoVSVV8dI91lNazmSdpGWyqCkO7iM4VvUMv2HT/ym53aYlUrau+Qq87Tu+uQipWYgRdF11KDfcpMHqqzB"
    "QQ1NpOJVhrsTrhyJzO7KNw=="
)


def unique(prefix: str) -> str:
    """A registration/group id that is valid for DPS: [a-z0-9-._:], ending alphanumeric."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_generated_key(key) -> None:
    """A service-generated symmetric key: 88 base64 characters encoding 64 bytes."""
    assert isinstance(key, str), f"key is {key!r}"
    assert len(key) == 88, f"generated key has {len(key)} chars, expected 88: {key!r}"
    raw = base64.b64decode(key, validate=True)
    assert len(raw) == 64, f"generated key decodes to {len(raw)} bytes, expected 64"


def assert_no_symmetric_keys(attestation: dict, where: str) -> None:
    """GET and query must not return symmetric keys (only PUT / attestationmechanism do)."""
    assert attestation.get("type") == "symmetricKey", attestation
    sk = attestation.get("symmetricKey")
    assert not sk or (not sk.get("primaryKey") and not sk.get("secondaryKey")), (
        f"{where} leaked symmetric keys: {attestation}"
    )
    assert "symmetricKey" not in attestation, (
        f"{where}: expected attestation exactly {{'type': 'symmetricKey'}} (DPS omits the object), "
        f"got {attestation}"
    )


def http_error_body(err) -> dict:
    """The JSON body of an azure-core HttpResponseError."""
    text = err.response.text()
    try:
        return json.loads(text)
    except ValueError:
        raise AssertionError(f"error body is not JSON: status {err.status_code}, body {text!r}")


def assert_dps_error_body(body: dict, status: int) -> None:
    """ProvisioningServiceErrorDetails: errorCode (int, status*1000+n), trackingId, message, timestampUtc."""
    assert isinstance(body.get("errorCode"), int) and not isinstance(body.get("errorCode"), bool), body
    assert status * 1000 <= body["errorCode"] < (status + 1) * 1000, (
        f"errorCode {body['errorCode']} is not {status}xxx: {body}"
    )
    assert isinstance(body.get("trackingId"), str) and body["trackingId"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    ts = body.get("timestampUtc")
    assert isinstance(ts, str) and ts, body
    parse_utc(ts)


def parse_utc(value: str) -> dt.datetime:
    """Parse a DPS timestamp such as 2023-05-19T23:10:45.4856816Z (7 fractional digits)."""
    v = value.strip()
    assert v.endswith("Z"), f"timestamp not in UTC 'Z' form: {value!r}"
    v = v[:-1]
    if "." in v:
        head, frac = v.split(".", 1)
        v = f"{head}.{frac[:6].ljust(6, '0')}"
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    return dt.datetime.strptime(v, fmt).replace(tzinfo=dt.timezone.utc)


@dataclass
class TestCert:
    __test__ = False  # not a pytest class

    cert: x509.Certificate
    key: object
    pem: str

    @property
    def subject_cn(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    @property
    def sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex().upper()

    @property
    def sha1(self) -> str:
        return self.cert.fingerprint(hashes.SHA1()).hex().upper()

    @property
    def der_b64(self) -> str:
        return base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()


def make_cert(cn: str, *, ca: bool, issuer: "TestCert | None" = None, days: int = 2) -> TestCert:
    """An EC P-256 certificate: a CA (self-signed unless issuer given) or a device leaf."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    signer = issuer.key if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return TestCert(cert=cert, key=key, pem=pem)


def assert_cert_info(info: dict, tc: TestCert) -> None:
    """The service-computed X509CertificateInfo matches the real certificate."""
    assert info, "x509 certificate entry has no 'info'"
    assert info.get("subjectName") == f"CN={tc.subject_cn}", info
    issuer_cn = tc.cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert info.get("issuerName") == f"CN={issuer_cn}", info
    assert info.get("sha256Thumbprint") == tc.sha256, (
        f"sha256Thumbprint {info.get('sha256Thumbprint')!r} != real fingerprint {tc.sha256}"
    )
    assert info.get("sha1Thumbprint") == tc.sha1, (
        f"sha1Thumbprint {info.get('sha1Thumbprint')!r} != real fingerprint {tc.sha1}"
    )
    serial = info.get("serialNumber")
    assert isinstance(serial, str) and serial == serial.upper(), info
    assert int(serial, 16) == tc.cert.serial_number, f"serialNumber {serial} != {tc.cert.serial_number:X}"
    assert info.get("version") == tc.cert.version.value + 1, info  # v1 is 0 in DER
    assert parse_utc(info["notBeforeUtc"]) == tc.cert.not_valid_before_utc, info
    assert parse_utc(info["notAfterUtc"]) == tc.cert.not_valid_after_utc, info


# --------------------------------------------------------------------------------------------
# symmetric keys and SAS tokens (computed in the tests, never by the server)
# --------------------------------------------------------------------------------------------
def derive_device_key(group_key: str, registration_id: str) -> str:
    """DPS group key derivation: base64(HMAC-SHA256(b64decode(groupKey), UTF-8(registrationId)))."""
    import hashlib
    import hmac

    digest = hmac.new(base64.b64decode(group_key), registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def service_sas_token(connection_string: str, ttl: int = 600) -> str:
    """A hub/DPS service SAS token as the Python SDKs sign it: sr=quote_plus(host), skn=policy."""
    import hashlib
    import hmac
    import time
    import urllib.parse

    parts = dict(p.split("=", 1) for p in connection_string.split(";"))
    expiry = int(time.time()) + ttl
    sr = urllib.parse.quote_plus(parts["HostName"])
    sig = base64.b64encode(
        hmac.new(base64.b64decode(parts["SharedAccessKey"]), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    return (
        f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote_plus(sig)}"
        f"&se={expiry}&skn={parts['SharedAccessKeyName']}"
    )


def upload_verified_ca(muster, name: str) -> "TestCert":
    """A fresh CA certificate registered on Muster's /caCertificates under `name` and verified
    by proof of possession (a code, then a certificate with CN = code signed by the CA): what a
    group's caReferences must name."""
    import requests

    def call(method: str, path: str, body: dict | None = None):
        r = requests.request(
            method,
            f"https://{muster.info['dpsHost']}/caCertificates/{path}",
            params={"api-version": "2021-10-01"},
            json=body,
            headers={"Authorization": service_sas_token(muster.connection_string)},
            verify=muster.ca_cert,
            timeout=30,
        )
        assert r.status_code == 200, f"{method} caCertificates/{path}: {r.status_code} {r.text}"
        return r.json()

    ca = make_cert(f"{name} CA", ca=True)
    call("PUT", name, {"certificate": ca.pem})
    code = call("POST", f"{name}/verificationCode")["verificationCode"]
    proof = make_cert(code, ca=False, issuer=ca)
    assert call("POST", f"{name}/verify", {"certificate": proof.pem})["isVerified"] is True
    return ca
