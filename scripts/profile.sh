#!/usr/bin/env bash
# Profiles `muster serve` under registration load and renders a flamegraph.
#
# Builds the release binary, starts a server on PROFILE_HOST (default 127.0.0.9) with HTTPS on
# PROFILE_PORT_BASE+3 and MQTT on PROFILE_PORT_BASE+4 (default 18460: 18463/18464; fresh data
# dir, one symmetric-key group), warms it up, then records the server with
# `perf record -e cpu-clock --call-graph dwarf` while `muster bench register` provisions
# COUNT devices in MODE. Writes into $CARGO_TARGET_DIR/profile/ (default target/profile/):
#   MODE.perf.data     the raw profile (`perf report -i ...`)
#   MODE.folded        folded stacks
#   MODE.svg           the flamegraph (needs inferno: `cargo install inferno`)
#   MODE.breakdown.txt the share of samples per category (SQLite, allocation, TLS, ...), each
#                      sample counted by its innermost recognisable frame
#                      (scripts/profile_breakdown.py, from the folded stacks)
# and prints the hottest functions by self time and the breakdown. Every process it starts is
# stopped on exit.
#
# Usage: scripts/profile.sh [MODE] [COUNT]
#   MODE   https-keepalive (default), https-fresh or mqtt-fresh
#   COUNT  devices in the recorded run (default 10000)
# Needs: perf (Debian package linux-perf). cpu-clock sampling works on VMs without hardware
# counters.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-https-keepalive}"
count="${2:-10000}"
host="${PROFILE_HOST:-127.0.0.9}"
port_base="${PROFILE_PORT_BASE:-18460}"
https_port=$((port_base + 3))
mqtt_port=$((port_base + 4))
command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release -p muster --locked --quiet
bin="$target_dir/release/muster"
out="$target_dir/profile"
mkdir -p "$out"

work=$(mktemp -d)
server_pid=""
perf_pid=""
cleanup() {
  [[ -n "$perf_pid" ]] && { kill -INT "$perf_pid" 2>/dev/null || true; wait "$perf_pid" 2>/dev/null || true; }
  [[ -n "$server_pid" ]] && { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin" serve --data-dir "$work/server" --dps-host "$host" --https-port "$https_port" \
  --mqtt-port "$mqtt_port" --amqp-port 0 >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  [[ -f "$work/server/connection.json" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[[ -f "$work/server/connection.json" ]] || { echo "muster serve did not start" >&2; exit 1; }

key=$("$bin" enrollment-group create --data-dir "$work/server" --group-id profile --show-keys -o json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
export MUSTER_GROUP_KEY="$key"
"$bin" bench register --data-dir "$work/server" --mode "$mode" --prefix warm- --count 1000 \
  --concurrency 64 >/dev/null

perf record -F 499 -e cpu-clock --call-graph dwarf,16384 -p "$server_pid" \
  -o "$out/$mode.perf.data" >"$work/perf.log" 2>&1 &
perf_pid=$!
# perf attaches asynchronously; its first output line means it is recording.
for _ in $(seq 1 100); do
  [[ -s "$work/perf.log" ]] && break
  sleep 0.05
done
"$bin" bench register --data-dir "$work/server" --mode "$mode" --prefix run- --count "$count" \
  --concurrency 64 --server-pid "$server_pid"
kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; perf_pid=""

perf script -i "$out/$mode.perf.data" 2>/dev/null >"$work/perf.script"
if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
  inferno-collapse-perf <"$work/perf.script" >"$out/$mode.folded"
  inferno-flamegraph --title "muster serve, $mode, $count devices" <"$out/$mode.folded" >"$out/$mode.svg"
  echo "flamegraph: $out/$mode.svg"
  folded="$out/$mode.folded"
else
  folded=""
  echo "no flamegraph: cargo install inferno (inferno-collapse-perf, inferno-flamegraph)" >&2
fi
echo "hottest functions by self time:"
perf report -i "$out/$mode.perf.data" --no-children --sort symbol --stdio -g none \
  --percent-limit 1.5 2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-120 | head -25
if [[ -n "$folded" ]]; then
  python3 scripts/profile_breakdown.py "$folded" --threads --other 10 \
    >"$out/$mode.breakdown.txt"
  cat "$out/$mode.breakdown.txt"
fi
