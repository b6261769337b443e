"""A real device's view: Microsoft's Python SDK registers, process start to `assigned`.

Usage: bench_python_sdk.py SDK_PYTHON CONNECTION_JSON GROUP_KEY COUNT

Starts COUNT fresh interpreters of SDK_PYTHON (a venv with azure-iot-device, as
scripts/interop.sh makes), one after another; each registers one device of the group with
`ProvisioningDeviceClient.create_from_symmetric_key` over MQTT (the SDK's default) and prints
the moment it holds the `assigned` answer. CLOCK_MONOTONIC is system-wide on Linux, so that
moment minus the moment this script started the process is "process start to assigned":
interpreter start, SDK import, TLS, MQTT, registration. Prints one JSON object.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time

DEVICE = r"""
import sys, time
from azure.iot.device import ProvisioningDeviceClient
host, scope, rid, key, ca = sys.argv[1:6]
client = ProvisioningDeviceClient.create_from_symmetric_key(
    provisioning_host=host, registration_id=rid, id_scope=scope, symmetric_key=key,
    server_verification_cert=open(ca).read())
result = client.register()
at = time.monotonic()
print(result.status, at, flush=True)
"""


def derive(group_key: str, registration_id: str) -> str:
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def percentile(sorted_ms: list[float], p: float) -> float:
    i = min(len(sorted_ms) - 1, max(0, round(p / 100 * len(sorted_ms) + 0.5) - 1))
    return sorted_ms[i]


def main() -> int:
    python, connection_json, group_key, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    info = json.load(open(connection_json))
    to_assigned, to_exit, failures = [], [], []
    for n in range(count):
        rid = f"python-sdk-{n}"
        start = time.monotonic()
        proc = subprocess.run(
            [python, "-c", DEVICE, info["dpsHost"], info["idScope"], rid, derive(group_key, rid),
             info["caCertificate"]],
            capture_output=True, text=True, timeout=60)
        exited = time.monotonic()
        fields = proc.stdout.split()
        if proc.returncode != 0 or len(fields) != 2 or fields[0] != "assigned":
            failures.append({"registration_id": rid, "exit": proc.returncode,
                             "stdout": proc.stdout[-300:], "stderr": proc.stderr[-500:]})
            continue
        to_assigned.append((float(fields[1]) - start) * 1000)
        to_exit.append((exited - start) * 1000)
    to_assigned.sort()
    to_exit.sort()
    report = {"devices": count, "assigned": len(to_assigned), "failures": failures}
    for name, xs in (("start_to_assigned_ms", to_assigned), ("start_to_exit_ms", to_exit)):
        if xs:
            report[name] = {"min": xs[0], "p50": percentile(xs, 50), "p90": percentile(xs, 90),
                            "max": xs[-1]}
    print(json.dumps(report))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
