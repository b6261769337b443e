#!/usr/bin/env bash
# Interop tests: Microsoft's DPS service SDKs, device SDKs (device registration
# over MQTT, MQTT-WS and HTTPS; the built-in hub's device endpoint over MQTT and
# MQTT-WS) and IoT hub service SDKs (Python and Node), unchanged, against a real
# Muster server. See tests/interop/README.md.
#
# Usage: scripts/interop.sh [--python-only | --node-only | --cluster-only] [--no-cluster]
#                            [--no-build] [-- PYTEST_ARGS...]
#
#   --python-only   run only the pytest suites
#   --node-only     run only the node:test suites (service, device, tutorial, x509, registration, hub, hub-http, amqp, hub-amqp .test.js)
#   --cluster-only  run only the cluster stage: hub, registration and service .test.js, and
#                   the Python registration, service-SDK and hub-session suites, against 3
#                   nodes on PostgreSQL (scripts/cluster.sh; needs PostgreSQL)
#   --no-cluster    skip the cluster stage
#   --no-build      don't run `cargo build -p muster` (implied when MUSTER_BIN is set)
#   -- ARGS         extra arguments for pytest, e.g. -- -k paging -x
#
# Environment:
#   MUSTER_BIN        muster binary to test (default: target/debug/muster, built here)
#   MUSTER_DPS_HOST   loopback address for the servers (default 127.0.0.2)
#   MUSTER_CLUSTER_NODE_HOSTS  own addresses of the cluster's nodes, for the hub test that
#                     pins its service calls to one node (default 127.0.0.3 for node 1)
#
# Needs: python3 (with venv), node >= 20 and npm, cargo, openssl (node/x509.test.js
# makes its certificates with it); root (or CAP_NET_BIND_SERVICE): port 443.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

INTEROP="$ROOT/tests/interop"
VENV="$ROOT/.interop/venv"
REQS="$INTEROP/requirements.txt"
NODE_DIR="$INTEROP/node"

run_python=1
run_node=1
run_cluster=1
build=1
pytest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-only) run_node=0; run_cluster=0 ;;
    --node-only) run_python=0; run_cluster=0 ;;
    --cluster-only) run_python=0; run_node=0 ;;
    --no-cluster) run_cluster=0 ;;
    --no-build) build=0 ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

section() { printf '\n========== %s ==========\n' "$*"; }
die() { echo "interop: $*" >&2; exit 1; }

# Contents only: the marker must match from any checkout path.
hash_of() { cat "$@" | sha256sum | cut -c1-64; }

# ---------------------------------------------------------------------------
section "Python environment (.interop/venv)"
command -v python3 >/dev/null || die "python3 not found"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv at $VENV"
  python3 -m venv "$VENV"
fi
py_marker="$VENV/.muster-interop-requirements"
py_want="$(hash_of "$REQS")"
if [[ -f "$py_marker" && "$(cat "$py_marker")" == "$py_want" ]]; then
  echo "pinned packages already installed (requirements hash ${py_want:0:12})"
else
  echo "installing pinned packages from ${REQS#"$ROOT"/}"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$REQS"
  echo "$py_want" > "$py_marker"
fi
"$VENV/bin/python" -m pip --disable-pip-version-check freeze \
  | grep -Ei '^(azure-iot-deviceprovisioning|azure-iothub-provisioningserviceclient|azure-iot-device|azure-iot-hub|pytest|cryptography)==' || true

# ---------------------------------------------------------------------------
if [[ $run_node -eq 1 || $run_cluster -eq 1 ]]; then
  section "Node environment (tests/interop/node/node_modules)"
  command -v node >/dev/null || die "node not found"
  command -v npm >/dev/null || die "npm not found"
  command -v openssl >/dev/null || die "openssl not found (node/x509.test.js makes its certificates with it)"
  echo "node $(node --version), npm $(npm --version)"
  node_marker="$NODE_DIR/node_modules/.muster-interop-lock"
  node_want="$(hash_of "$NODE_DIR/package.json" "$NODE_DIR/package-lock.json")"
  if [[ -f "$node_marker" && "$(cat "$node_marker")" == "$node_want" ]]; then
    echo "npm packages already installed (lock hash ${node_want:0:12})"
  else
    echo "installing npm packages from package-lock.json"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$node_want" > "$node_marker"
  fi
  for pkg in azure-iot-provisioning-service azure-iot-provisioning-device azure-iot-provisioning-device-http \
             azure-iot-provisioning-device-mqtt azure-iot-security-symmetric-key azure-iot-security-x509 \
             azure-iot-provisioning-device-amqp azure-iot-amqp-base \
             azure-iot-device azure-iot-device-mqtt azure-iot-device-amqp azure-iot-device-http azure-iothub; do
    node -e "console.log('$pkg ' + require('$NODE_DIR/node_modules/$pkg/package.json').version)"
  done
fi

# ---------------------------------------------------------------------------
section "Muster binary"
if [[ -n "${MUSTER_BIN:-}" ]]; then
  echo "using MUSTER_BIN=$MUSTER_BIN (not building)"
elif [[ $build -eq 1 ]]; then
  echo "+ cargo build -p muster"
  cargo build -p muster
  export MUSTER_BIN="$ROOT/target/debug/muster"
else
  export MUSTER_BIN="$ROOT/target/debug/muster"
  echo "not building; using $MUSTER_BIN"
fi
[[ -x "$MUSTER_BIN" ]] || die "muster binary not found or not executable: $MUSTER_BIN"
if [[ $EUID -ne 0 ]]; then
  echo "warning: not root; binding port 443 may fail" >&2
fi

# ---------------------------------------------------------------------------
py_status="skipped"
node_status="skipped"
failed=0

if [[ $run_python -eq 1 ]]; then
  section "Python: azure-iot-deviceprovisioning 1.0.0b1, azure-iothub-provisioningserviceclient 1.2.0, azure-iot-device 2.14.0, azure-iot-hub 2.7.0 (pytest)"
  set +e
  (cd "$INTEROP/python" && PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" -m pytest \
      -p no:cacheprovider -v -rfE --durations=5 ${pytest_args[@]+"${pytest_args[@]}"})
  rc=$?
  set -e
  case $rc in
    0) py_status="passed" ;;
    5) py_status="FAILED (pytest collected no tests)"; failed=1 ;;
    *) py_status="FAILED (pytest exit $rc)"; failed=1 ;;
  esac
fi

if [[ $run_node -eq 1 ]]; then
  section "Node: azure-iot-provisioning-service 1.11.2, azure-iot-provisioning-device 1.9.1 (+ -http 1.9.1, -mqtt 1.8.1, -amqp 1.9.1, azure-iot-security-x509 1.7.12), azure-iot-device 1.18.4 (+ -mqtt 1.16.4, -amqp 1.14.4), azure-iothub 1.16.6 (node --test)"
  # NODE_EXTRA_CA_CERTS is read only when node starts, so the server is started
  # first (by muster_server.py) and node is launched with the CA in its env.
  # Every tests/interop/node/*.test.js runs (service.test.js, device.test.js,
  # tutorial.test.js, x509.test.js, registration.test.js, hub.test.js, hub-http.test.js,
  # amqp.test.js, hub-amqp.test.js), all against that one server.
  shopt -s nullglob
  node_tests=("$NODE_DIR"/*.test.js)
  shopt -u nullglob
  if [[ ${#node_tests[@]} -eq 0 ]]; then
    node_status="FAILED (no node test files)"; failed=1
  else
    set +e
    "$VENV/bin/python" "$INTEROP/muster_server.py" -- node --test "${node_tests[@]}"
    rc=$?
    set -e
    if [[ $rc -eq 0 ]]; then node_status="passed"; else node_status="FAILED (exit $rc)"; failed=1; fi
  fi
fi

cluster_status="skipped"
if [[ $run_cluster -eq 1 ]]; then
  section "Node against a 3-node cluster on PostgreSQL (scripts/cluster.sh): hub, registration, service"
  # The suites whose calls cross nodes: a device's session on one node, the service call on
  # another (hub.test.js pins one node through its own address to make sure of it).
  set +e
  MUSTER_CLUSTER=3 MUSTER_CLUSTER_NODE_HOSTS="${MUSTER_CLUSTER_NODE_HOSTS-127.0.0.3,,}" \
    "$VENV/bin/python" "$INTEROP/muster_server.py" -- node --test \
    "$NODE_DIR/hub.test.js" "$NODE_DIR/registration.test.js" "$NODE_DIR/service.test.js"
  rc=$?
  # Python: registration, the service SDK and the hub sessions (twin, methods, C2D across SAS
  # renewal), each test against a fresh 3-node cluster (conftest.py reads MUSTER_CLUSTER);
  # here the kernel picks the nodes, the Node hub test above forces the cross-node path.
  section "Python against a 3-node cluster on PostgreSQL: registration, service SDK, hub sessions"
  (cd "$INTEROP/python" && MUSTER_CLUSTER=3 MUSTER_CLUSTER_NODE_HOSTS= PYTHONDONTWRITEBYTECODE=1 \
      "$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfE \
      test_device_registration.py test_deviceprovisioning_sdk.py test_hub_sessions.py)
  py_rc=$?
  set -e
  if [[ $rc -eq 0 && $py_rc -eq 0 ]]; then
    cluster_status="passed"
  else
    cluster_status="FAILED (node exit $rc, python exit $py_rc)"; failed=1
  fi
fi

section "Interop summary"
echo "python:  $py_status"
echo "node:    $node_status"
echo "cluster: $cluster_status"
exit $failed
