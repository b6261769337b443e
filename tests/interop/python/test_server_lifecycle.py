"""The server contract the interop harness relies on: connection.json, SIGTERM, data dir."""

from __future__ import annotations

import ssl
import socket

from azure.core.exceptions import ResourceNotFoundError

from conftest import make_dps_client
from helpers import unique


def test_connection_json_and_tls(muster):
    info = muster.info
    assert info["dpsHost"] == muster.host
    parts = muster.cs_parts()
    assert set(parts) == {"HostName", "SharedAccessKeyName", "SharedAccessKey"}, parts
    assert parts["HostName"] == muster.host, "port 443 must not appear in HostName"
    assert parts["SharedAccessKeyName"] == "provisioningserviceowner"
    assert isinstance(info["idScope"], str) and info["idScope"]

    # The server certificate chains to caCertificate and carries an IP SAN for dpsHost.
    ctx = ssl.create_default_context(cafile=muster.ca_cert)
    with socket.create_connection((muster.host, 443), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=muster.host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # Python's device SDK speaks TLS 1.2 only.
    ctx12 = ssl.create_default_context(cafile=muster.ca_cert)
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((muster.host, 443), timeout=5) as raw:
        with ctx12.wrap_socket(raw, server_hostname=muster.host) as tls:
            assert tls.version() == "TLSv1.2"


def test_sigterm_is_graceful_and_data_persists(muster_factory, tmp_path):
    data_dir = tmp_path / "persist"
    first = muster_factory(data_dir)
    cs, ca = first.connection_string, first.ca_cert
    dps = make_dps_client(cs, ca)
    enrollment_id = unique("persist")
    created = dps.enrollment.create_or_update(
        id=enrollment_id,
        enrollment={"registrationId": enrollment_id, "attestation": {"type": "symmetricKey"}},
    )
    rc = first.stop()
    assert rc == 0, f"muster exited with {rc} on SIGTERM; log:\n{first.log_tail(3000)}"

    # Restart on the same data dir (also proves the ports were released).
    second = muster_factory(data_dir)
    assert second.connection_string == cs, "service key must survive a restart"
    assert second.id_scope == first.id_scope
    dps2 = make_dps_client(second.connection_string, second.ca_cert)
    got = dps2.enrollment.get(id=enrollment_id)
    assert got["etag"] == created["etag"]
    att = dps2.enrollment.get_attestation_mechanism(id=enrollment_id)
    assert att["symmetricKey"] == created["attestation"]["symmetricKey"]
    dps2.enrollment.delete(id=enrollment_id)
    try:
        dps2.enrollment.get(id=enrollment_id)
        raise AssertionError("deleted enrollment still readable")
    except ResourceNotFoundError:
        pass
