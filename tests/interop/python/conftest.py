"""pytest fixtures: a fresh Muster server per test, and SDK clients bound to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/interop

from muster_server import (  # noqa: E402
    MusterCluster,
    MusterServer,
    MusterStartError,
    loopback_no_proxy,
)


def _start(data_dir: Path) -> MusterServer:
    # MUSTER_CLUSTER=N (N > 1): each test gets a fresh cluster, PostgreSQL and N nodes sharing
    # one address and the standard ports (scripts/cluster.sh), instead of one server.
    nodes = int(os.environ.get("MUSTER_CLUSTER") or "1")
    try:
        if nodes > 1:
            return MusterCluster(data_dir.parent / f"{data_dir.name}-cluster", nodes).start()
        return MusterServer(data_dir=data_dir).start()
    except MusterStartError as e:
        pytest.fail(f"could not start muster: {e}", pytrace=False)


def _report_log_if_failed(request, server: MusterServer) -> None:
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        sys.stderr.write(f"\n--- muster log tail ({server.log_path}) ---\n{server.log_tail(4000)}\n")


@pytest.fixture
def muster(request, tmp_path, monkeypatch):
    """A Muster server on an empty data dir, stopped (SIGTERM) after the test.

    Yields the MusterServer; ``.info`` is the parsed connection.json. The CA that
    the clients must trust is exported as REQUESTS_CA_BUNDLE (read by requests,
    which both Python service SDKs use) for the duration of the test.
    """
    server = _start(tmp_path / "data")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.ca_cert)
    env = {}
    loopback_no_proxy(env)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield server
    finally:
        server.stop()
        _report_log_if_failed(request, server)


@pytest.fixture
def muster_factory(request, tmp_path, monkeypatch):
    """Start servers on demand (e.g. to restart one on the same data dir)."""
    started: list[MusterServer] = []

    def start(data_dir: Path | None = None) -> MusterServer:
        server = _start(data_dir or (tmp_path / f"data{len(started)}"))
        started.append(server)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.ca_cert)
        return server

    env = {}
    loopback_no_proxy(env)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield start
    finally:
        for server in started:
            server.stop()
            _report_log_if_failed(request, server)


# (test id, what was measured, seconds): filled by the `registration_timer` fixture and
# printed at the end of the run (timings are reported, never asserted).
_REGISTRATION_TIMINGS: list[tuple[str, str, float]] = []


@pytest.fixture
def registration_timer(request):
    """record(label, seconds): report a device registration's duration in the run summary."""

    def record(label: str, seconds: float) -> None:
        _REGISTRATION_TIMINGS.append((request.node.nodeid, label, seconds))
        print(f"{label}: register() took {seconds * 1000:.0f} ms")

    return record


def pytest_terminal_summary(terminalreporter):
    if not _REGISTRATION_TIMINGS:
        return
    terminalreporter.section("device registration timings (register() call to result)")
    for nodeid, label, seconds in _REGISTRATION_TIMINGS:
        terminalreporter.write_line(f"{seconds * 1000:8.0f} ms  {label}  ({nodeid.split('::')[-1]})")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def make_dps_client(connection_string: str, ca_cert: str):
    """DeviceProvisioningClient exactly as a user builds it, trusting the test CA.

    retry_total=0 so that a server error surfaces at once instead of after
    azure-core's back-off retries.
    """
    from azure.iot.deviceprovisioning import DeviceProvisioningClient

    return DeviceProvisioningClient.from_connection_string(
        connection_string, connection_verify=ca_cert, retry_total=0
    )


@pytest.fixture
def dps(muster):
    """azure-iot-deviceprovisioning 1.0.0b1 client for the `muster` server."""
    return make_dps_client(muster.connection_string, muster.ca_cert)
