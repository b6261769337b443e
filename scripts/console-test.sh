#!/usr/bin/env bash
# Browser test of the web console: builds the muster binary, starts `muster serve` with a
# fresh data dir on a loopback address, and drives the console in Debian's chromium with
# playwright-core (tests/console/console.test.mjs). Screenshots of every page go to
# tests/console/artifacts/ and, as the run's test artefacts, are copied (with the server log
# when the test fails) to $MUSTER_ARTIFACTS_DIR/console/ (default: artifacts/console/ at the
# repository root; git-ignored, and the directory CI keeps).
#
# The TPM enrollment test starts Debian's swtpm on the same loopback address and registers with
# `muster device register --tpm`, so the binary is built with `--features muster/tpm`
# (libtss2-dev); scripts/test.sh passes the one its `cargo test --features muster/tpm` built.
#
# Usage: scripts/console-test.sh [--no-build]
#
# Environment:
#   MUSTER_BIN           muster binary built with --features muster/tpm (default: built here,
#                        $CARGO_TARGET_DIR or target, /debug/muster)
#   MUSTER_CONSOLE_HOST  loopback address for the server (default 127.0.0.13)
#   CHROMIUM             browser binary (default /usr/bin/chromium; apt-get install chromium)
#   MUSTER_ARTIFACTS_DIR where test artefacts are kept (default: artifacts/ at the repo root)
#
# Needs: node >= 20 and npm, chromium, cargo, swtpm (apt-get install swtpm swtpm-tools), libtss2-dev.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
build=1
[[ "${1:-}" == "--no-build" ]] && build=0

HOST="${MUSTER_CONSOLE_HOST:-127.0.0.13}"
BIN="${MUSTER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/muster}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
TEST_DIR="$ROOT/tests/console"

[[ -x "$CHROMIUM" ]] || { echo "console-test: $CHROMIUM not found (apt-get install chromium)" >&2; exit 1; }
command -v node >/dev/null || { echo "console-test: node not found" >&2; exit 1; }
command -v swtpm >/dev/null || { echo "console-test: swtpm not found (apt-get install swtpm swtpm-tools)" >&2; exit 1; }

if [[ $build == 1 && -z "${MUSTER_BIN:-}" ]]; then
  cargo build -q -p muster --locked --features muster/tpm
fi
[[ -x "$BIN" ]] || { echo "console-test: $BIN not found" >&2; exit 1; }

# playwright-core, pinned by package-lock.json; reinstalled when the lockfile changes.
marker="$TEST_DIR/node_modules/.muster-lock-hash"
want="$(sha256sum "$TEST_DIR/package-lock.json" | cut -c1-64)"
if [[ ! -f "$marker" || "$(cat "$marker")" != "$want" ]]; then
  (cd "$TEST_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$marker"
fi

DATA="$(mktemp -d)"
LOG="$DATA.log"
server_pid=""
ARTIFACTS="${MUSTER_ARTIFACTS_DIR:-$ROOT/artifacts}/console"
cleanup() {
  # Keep the screenshots (and, on failure, the server log) as the run's artefacts.
  rm -rf "$ARTIFACTS" && mkdir -p "$ARTIFACTS"
  cp "$TEST_DIR"/artifacts/*.png "$ARTIFACTS"/ 2>/dev/null || true
  if [[ "${status:-0}" != 0 && -f "$LOG" ]]; then cp "$LOG" "$ARTIFACTS/muster-serve.log"; fi
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$DATA" "$LOG"
}
trap cleanup EXIT

"$BIN" serve --data-dir "$DATA" --dps-host "$HOST" --https-port 0 --mqtt-port 0 --amqp-port 0 >"$LOG" 2>&1 &
server_pid=$!

# Wait (up to 60 s) for connection.json: it is written once every listener is bound.
deadline=$((SECONDS + 60))
until [[ -f "$DATA/connection.json" ]]; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "console-test: muster serve exited:" >&2; cat "$LOG" >&2; exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "console-test: no connection.json after 60 s:" >&2; cat "$LOG" >&2; exit 1
  fi
  sleep 0.1
done
grep -m1 "Web console" "$LOG" || true

status=0
MUSTER_CONNECTION="$DATA/connection.json" MUSTER_DATA_DIR="$DATA" MUSTER_BIN="$BIN" MUSTER_CONSOLE_HOST="$HOST" \
  node --test --test-reporter=spec "$TEST_DIR/console.test.mjs" || status=$?
if [[ $status != 0 ]]; then
  echo "---- muster serve log ----" >&2; tail -n 50 "$LOG" >&2
fi
exit $status
