#!/usr/bin/env bash
# Provisioning throughput baseline: a release `muster serve` on a loopback address, and
# `muster provision` registering N devices of one symmetric-key group against it, over HTTPS
# (keep-alive, one connection per worker) and over MQTT (one TLS connection per device).
#
# Usage: scripts/bench-provision.sh [COUNT] [CONCURRENCY]
# Prints devices/s per transport; see BENCHMARKS.md for the method and recorded results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
COUNT="${1:-10000}"
CONC="${2:-64}"
HOST=127.0.0.9

cargo build --release -p muster >/dev/null
BIN=target/release/muster
DATA=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
"$BIN" serve --data-dir "$DATA/server" --dps-host "$HOST" --https-port 18443 --mqtt-port 18883 \
  >"$DATA/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do
  [[ -f "$DATA/server/connection.json" ]] && break
  kill -0 "$PID" || { cat "$DATA/server.log"; exit 1; }
  read -r -t 0.1 <> <(:) || true
done
[[ -f "$DATA/server/connection.json" ]] || { echo "server did not start"; exit 1; }

KEY=$("$BIN" enrollment-group create --data-dir "$DATA/server" --group-id bench --show-keys -o json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')

for transport in https mqtt; do
  out="$DATA/$transport.csv"
  start=$(date +%s.%N)
  "$BIN" provision --data-dir "$DATA/server" --group-key "$KEY" --prefix "$transport-" \
    --count "$COUNT" --concurrency "$CONC" --transport "$transport" --no-progress --out "$out" >/dev/null
  end=$(date +%s.%N)
  assigned=$(grep -c ',assigned,' "$out" || true)
  python3 - "$transport" "$COUNT" "$assigned" "$start" "$end" <<'PY'
import sys
t, n, ok, s, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
print(f"{t:6} {ok}/{n} assigned in {e - s:.2f} s = {ok / (e - s):.0f} registrations/s")
PY
done
echo "server CPU time: $(ps -o times= -p "$PID") s, RSS: $(ps -o rss= -p "$PID") KiB"
