#!/usr/bin/env python3
"""Start and stop a Muster server for the interop tests.

Used two ways:

* imported by ``python/conftest.py`` (the ``muster`` pytest fixture), and
* as a command wrapper for suites whose runtime must see the server's CA when
  the process starts (Node reads ``NODE_EXTRA_CA_CERTS`` only at start-up)::

      python tests/interop/muster_server.py -- node --test tests/interop/node/

  The wrapper starts a server on a fresh temporary data dir, waits until it is
  ready, runs the command with ``MUSTER_CONNECTION_STRING``, ``MUSTER_CA_CERT``,
  ``MUSTER_CONNECTION_JSON``, ``MUSTER_DPS_HOST``, ``MUSTER_ID_SCOPE`` and
  ``NODE_EXTRA_CA_CERTS`` set (plus ``MUSTER_HUB_HOST`` and
  ``MUSTER_HUB_CONNECTION_STRING`` when connection.json lists a built-in hub),
  stops the server (SIGTERM to its process group, SIGKILL after a grace period)
  and exits with the command's exit code.

"Ready" means: ``DATA_DIR/connection.json`` exists and parses, and a TCP
connect to ``dpsHost:443`` succeeds (the server writes the file only after its
listeners are bound). The wait is a bounded poll, never a fixed sleep.

Environment:
  MUSTER_BIN       path of the muster binary (default: <repo>/target/debug/muster)
  MUSTER_DPS_HOST  loopback address the server binds (default: 127.0.0.2)
  MUSTER_CLUSTER   N > 1: the wrapper starts a cluster instead, PostgreSQL and N nodes
                   sharing MUSTER_DPS_HOST and the ports (``scripts/cluster.sh``), and
                   also sets ``MUSTER_CLUSTER_ADMIN_URLS`` (each node's admin listener,
                   comma-separated) and ``MUSTER_CLUSTER_NODE_ADDRS`` (each node's own
                   extra address from ``MUSTER_CLUSTER_NODE_HOSTS``, empty for none) for
                   the command; connection details are node 1's (every node presents the
                   same certificate and hub).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "muster"
DEFAULT_DPS_HOST = "127.0.0.2"
HTTPS_PORT = 443
MQTT_PORT = 8883
AMQP_PORT = 5671
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0

# Every server started by this process, so that an interrupted run (Ctrl-C,
# a crashing test session) still stops them.
_LIVE: "set[MusterServer]" = set()


def muster_bin() -> Path:
    return Path(os.environ.get("MUSTER_BIN") or DEFAULT_BIN)


def dps_host() -> str:
    host = os.environ.get("MUSTER_DPS_HOST") or DEFAULT_DPS_HOST
    if not host.startswith("127."):
        raise ValueError(f"MUSTER_DPS_HOST must be a loopback address (127.0.0.0/8), got {host!r}")
    return host


class MusterStartError(RuntimeError):
    pass


class _ConnectionInfo:
    """What a server or a cluster tells its clients: read from its connection.json (``info``,
    ``data_dir``)."""

    @property
    def connection_string(self) -> str:
        return self.info["serviceConnectionString"]

    @property
    def ca_cert(self) -> str:
        return self.info["caCertificate"]

    @property
    def id_scope(self) -> str:
        return self.info["idScope"]

    @property
    def connection_json(self) -> Path:
        return self.data_dir / "connection.json"

    @property
    def hubs(self) -> list:
        """connection.json ``hubs``: [{hostName, connectionString, builtIn}, ...] ([] if absent)."""
        return list(self.info.get("hubs") or [])

    def builtin_hub(self) -> Optional[dict]:
        """The built-in IoT hub's entry in ``hubs``, if the server reports one."""
        for hub in self.hubs:
            if hub.get("builtIn"):
                return hub
        return None

    def cs_parts(self) -> dict:
        """The service connection string split into its parts."""
        parts = {}
        for item in self.connection_string.split(";"):
            k, _, v = item.partition("=")
            parts[k] = v
        return parts


@dataclass(eq=False)
class MusterServer(_ConnectionInfo):
    """One running ``muster serve`` process with its own data dir."""

    data_dir: Path
    host: str = field(default_factory=dps_host)
    binary: Path = field(default_factory=muster_bin)
    proc: Optional[subprocess.Popen] = None
    info: dict = field(default_factory=dict)
    log_path: Optional[Path] = None

    # -- lifecycle ------------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT_S) -> "MusterServer":
        if not self.binary.is_file():
            raise MusterStartError(
                f"muster binary not found at {self.binary} "
                "(run `cargo build -p muster` or set MUSTER_BIN)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / (self.data_dir.name + ".log")
        log = open(self.log_path, "wb")
        cmd = [
            str(self.binary),
            "serve",
            "--data-dir", str(self.data_dir),
            "--dps-host", self.host,
            "--https-port", str(HTTPS_PORT),
            "--mqtt-port", str(MQTT_PORT),
            "--amqp-port", str(AMQP_PORT),
        ]
        # Everything the server needs is on its command line: drop MUSTER_* variables
        # (the server reads e.g. MUSTER_CONFIG, MUSTER_TLS_CERT) so a developer's
        # shell can't change what is tested.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: we can signal all of it
            )
        finally:
            log.close()
        _LIVE.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err = "connection.json not written yet"
        delay = 0.02
        while True:
            if self.proc.poll() is not None:
                raise MusterStartError(
                    f"muster exited with code {self.proc.returncode} before becoming ready\n"
                    f"--- server log ({self.log_path}) ---\n{self.log_tail()}"
                )
            info = self._read_connection_json()
            if info is not None:
                host = info.get("dpsHost") or self.host
                try:
                    with socket.create_connection((host, HTTPS_PORT), timeout=1.0):
                        pass
                    self.info = info
                    self._check_info()
                    return
                except OSError as e:
                    last_err = f"TCP connect to {host}:{HTTPS_PORT} failed: {e}"
            if time.monotonic() >= deadline:
                raise MusterStartError(
                    f"muster not ready after {timeout:.0f}s: {last_err}\n"
                    f"--- server log ({self.log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(delay)  # poll interval, not a readiness guess
            delay = min(delay * 2, 0.25)

    def _read_connection_json(self) -> Optional[dict]:
        try:
            text = self.connection_json.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return None  # half-written; poll again

    def _check_info(self) -> None:
        missing = [k for k in ("idScope", "dpsHost", "serviceConnectionString", "caCertificate")
                   if not self.info.get(k)]
        if missing:
            raise MusterStartError(f"connection.json lacks {missing}: {self.info}")
        if not Path(self.ca_cert).is_absolute() or not Path(self.ca_cert).is_file():
            raise MusterStartError(f"caCertificate is not an absolute path of a file: {self.ca_cert!r}")

    def stop(self) -> Optional[int]:
        """SIGTERM the server's process group; SIGKILL it after a grace period."""
        _LIVE.discard(self)
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_GRACE_S)
                print(f"muster (pid {proc.pid}) ignored SIGTERM for {STOP_GRACE_S:.0f}s; killed",
                      file=sys.stderr)
        # Anything else left in its group (it should have none).
        _signal_group(proc, signal.SIGKILL)
        return proc.returncode

    def log_tail(self, max_bytes: int = 8000) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        data = self.log_path.read_bytes()
        return data[-max_bytes:].decode("utf-8", "replace")

    def __enter__(self) -> "MusterServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # pgid == pid because of start_new_session
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def loopback_no_proxy(env: dict) -> None:
    """Make sure no HTTP proxy is used for the loopback server."""
    extra = "127.0.0.0/8,localhost"
    for key in ("NO_PROXY", "no_proxy"):
        cur = env.get(key)
        env[key] = f"{cur},{extra}" if cur else extra


class MusterCluster(_ConnectionInfo):
    """PostgreSQL and N ``muster serve`` nodes started by ``scripts/cluster.sh``."""

    def __init__(self, root: Path, nodes: int):
        self.root = root
        self.nodes = nodes
        self.node_hosts = os.environ.get("MUSTER_CLUSTER_NODE_HOSTS", "")
        self.info: dict = {}
        self.admin_urls: list = []
        self.data_dir = root / "node-1" / "data"
        self.log_path = root
        self.host = dps_host()

    def _script(self, action: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.update(
            MUSTER_CLUSTER_HOST=dps_host(),
            MUSTER_CLUSTER_NODES=str(self.nodes),
            MUSTER_CLUSTER_NODE_HOSTS=self.node_hosts,
            MUSTER_BIN=str(muster_bin()),
        )
        return subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "cluster.sh"), action, str(self.root)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )

    def start(self) -> "MusterCluster":
        _LIVE.add(self)
        done = self._script("start")
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            raise MusterStartError(f"scripts/cluster.sh start failed:\n{done.stderr}")
        self.info = json.loads((self.data_dir / "connection.json").read_text())
        for line in (self.root / "nodes").read_text().splitlines():
            self.admin_urls.append(line.split()[2])
        return self

    def stop(self) -> Optional[int]:
        _LIVE.discard(self)
        done = self._script("stop")
        if done.returncode != 0:
            print(f"scripts/cluster.sh stop failed: {done.stderr}", file=sys.stderr)
        return None

    def log_tail(self, max_bytes: int = 8000) -> str:
        """The end of every node's log, node by node."""
        parts = []
        for i in range(1, self.nodes + 1):
            path = self.root / f"node-{i}.log"
            if path.exists():
                data = path.read_bytes()[-(max_bytes // self.nodes):]
                parts.append(f"--- node {i} ---\n" + data.decode("utf-8", "replace"))
        return "\n".join(parts) or "(no log)"


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="muster-interop-"))
    nodes = int(os.environ.get("MUSTER_CLUSTER") or "1")
    if nodes > 1:
        server = MusterCluster(tmp / "cluster", nodes)
    else:
        server = MusterServer(data_dir=tmp / "data")
    rc = 1
    # Stop the server on SIGTERM/SIGINT to this wrapper too.
    def _on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        server.start()
        print(f"muster ready: host={server.info['dpsHost']} idScope={server.id_scope} "
              f"ca={server.ca_cert} data={server.data_dir}", flush=True)
        env = dict(os.environ)
        if isinstance(server, MusterCluster):
            env.update(
                MUSTER_CLUSTER_ADMIN_URLS=",".join(server.admin_urls),
                MUSTER_CLUSTER_NODE_ADDRS=server.node_hosts,
            )
        env.update(
            MUSTER_CONNECTION_STRING=server.info["serviceConnectionString"],
            MUSTER_CA_CERT=server.ca_cert,
            MUSTER_CONNECTION_JSON=str(server.data_dir / "connection.json"),
            MUSTER_DPS_HOST=server.info["dpsHost"],
            MUSTER_ID_SCOPE=server.id_scope,
            NODE_EXTRA_CA_CERTS=server.ca_cert,
        )
        hub = server.builtin_hub()
        if hub is not None:
            env.update(
                MUSTER_HUB_HOST=hub.get("hostName", ""),
                MUSTER_HUB_CONNECTION_STRING=hub.get("connectionString", ""),
            )
        loopback_no_proxy(env)
        rc = subprocess.call(argv, env=env)
    except MusterStartError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    finally:
        code = server.stop()
        if code not in (None, 0):
            print(f"note: muster exited with code {code} after SIGTERM "
                  f"(log: {server.log_path})", file=sys.stderr)
        if rc == 0 and os.environ.get("MUSTER_KEEP_DATA") != "1":
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"server data and log kept in {tmp}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
