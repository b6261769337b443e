#!/usr/bin/env bash
# Counts the instructions `muster serve` executes per registration, under callgrind.
#
# Instruction counts (callgrind's `Ir`) do not depend on how busy the machine is, so two builds
# can be compared on a shared machine where CPU times vary by ±25%. Starts the given binary
# under `valgrind --tool=callgrind` on HOST (fresh data dir, one symmetric-key group), warms it
# up with WARM registrations, zeroes the counters, registers COUNT new devices with
# `muster bench register --mode MODE`, dumps the counters and prints Ir per registration.
# Every process it starts is stopped on exit.
#
# Usage: scripts/callgrind.sh BINARY HOST OUT [COUNT] [MODE] [WARM]
#   BINARY  the muster binary to measure (e.g. target/release/muster); it also drives the load
#   HOST    a loopback address of your own (ports 18473/18474 on it)
#   OUT     the callgrind output file (read it with `callgrind_annotate --inclusive=yes OUT`)
#   COUNT   registrations measured (default 2000); MODE https-keepalive (default);
#   WARM    registrations before the counters are zeroed (default 300)
# Needs: valgrind.
set -euo pipefail

bin="$1"
host="$2"
out="$3"
count="${4:-2000}"
mode="${5:-https-keepalive}"
warm="${6:-300}"
command -v valgrind >/dev/null || { echo "valgrind not found (apt-get install valgrind)" >&2; exit 1; }

work=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n "$server_pid" ]] && { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no \
  "$bin" serve --data-dir "$work/server" --dps-host "$host" --https-port 18473 \
  --mqtt-port 18474 --amqp-port 0 >"$work/server.log" 2>&1 &
server_pid=$!
# Under callgrind the server starts about fifty times slower.
for _ in $(seq 1 1200); do
  [[ -f "$work/server/connection.json" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[[ -f "$work/server/connection.json" ]] || { echo "muster serve did not start" >&2; exit 1; }

key=$("$bin" enrollment-group create --data-dir "$work/server" --group-id callgrind --show-keys -o json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
export MUSTER_GROUP_KEY="$key"
"$bin" bench register --data-dir "$work/server" --mode "$mode" --prefix warm- --count "$warm" \
  --concurrency 16 >/dev/null
callgrind_control -z "$server_pid" >/dev/null
"$bin" bench register --data-dir "$work/server" --mode "$mode" --prefix run- --count "$count" \
  --concurrency 16 >/dev/null
callgrind_control -d "$server_pid" >/dev/null
# The dump after zeroing is the file with the highest part number.
dump=$(ls -1 "$out".* 2>/dev/null | sort -t. -k"$(($(tr -cd . <<<"$out" | wc -c) + 2))" -n | tail -1)
ir=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
echo "$dump: $ir Ir in $count registrations: $((ir / count)) Ir per registration"
# How big the stored rows are, and whether they spill into overflow pages.
python3 - "$work/server/muster.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
for row in db.execute(
    "SELECT collection, count(*), avg(length(body)),"
    " avg(length(collection) + length(key) + length(etag) + ifnull(length(partition), 0))"
    " FROM records GROUP BY collection"):
    print("%-18s %6d rows, body %6.0f bytes, other columns %4.0f bytes" % row)
pages, overflow = db.execute("SELECT count(*), sum(pagetype = 'overflow') FROM dbstat").fetchone()
print(f"{pages} pages, {overflow} of them overflow pages")
PY
