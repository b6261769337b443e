#!/usr/bin/env bash
# Registrations/s of one Muster node on SQLite, one node on PostgreSQL and three nodes on
# PostgreSQL (scripts/cluster.sh: one address, shared ports, --reuse-port), measured the same
# way: `muster bench register` with one symmetric-key group, a warm-up, then the measured run.
# On one machine the nodes share its cores, so this shows the cost of PostgreSQL and of
# spreading over nodes, not scale-out (BENCHMARKS.md, "Several nodes on PostgreSQL").
#
#   scripts/bench-cluster.sh [OUT_DIR]     JSON reports in OUT_DIR (default target/bench-cluster)
#
# Environment: MUSTER_BIN (default target/release/muster: build it first), BENCH_HOST (a
# loopback address, default 127.0.0.9), BENCH_MODE (default https-keepalive), BENCH_COUNT
# (default 3000), BENCH_WARMUP (default 300), BENCH_CONCURRENCY (default 64).
# BENCH_KILL_AFTER_S=N: after the 3-node run, one more open-loop run at BENCH_RATE devices/s
# (default 250) during which node 2 is killed (SIGKILL) N seconds in: the latency while a node
# dies. `muster bench` does not retry, so the devices whose exchange died with the node are
# counted as errors (an SDK would retry them).
#
# For the PostgreSQL setups it also prints the database's transactions (pg_stat_database,
# read once the nodes have stopped, so every backend has reported) per registration: about
# the round trips each costs, setup and sweeps included.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=${1:-$ROOT/target/bench-cluster}
bin=${MUSTER_BIN:-$ROOT/target/release/muster}
host=${BENCH_HOST:-127.0.0.9}
mode=${BENCH_MODE:-https-keepalive}
count=${BENCH_COUNT:-3000}
warmup=${BENCH_WARMUP:-300}
concurrency=${BENCH_CONCURRENCY:-64}
READY_TIMEOUT_S=60

[[ -x $bin ]] || { echo "bench-cluster.sh: no muster binary at $bin (cargo build --release -p muster)" >&2; exit 1; }
[[ $host == 127.* ]] || { echo "bench-cluster.sh: BENCH_HOST must be loopback" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d /tmp/muster-bench-cluster.XXXXXX)
chmod 711 "$work"
serve_pid=
cleanup() {
  [[ -n $serve_pid ]] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null || true
  [[ -f $work/cluster/nodes ]] && MUSTER_CLUSTER_HOST=$host bash "$ROOT/scripts/cluster.sh" stop "$work/cluster" >/dev/null || true
  [[ -d $work/pg ]] && bash "$ROOT/scripts/pg.sh" stop "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts one `muster serve` on $host with extra options; waits for its connection.json.
serve() {
  local data=$1
  shift
  mkdir -p "$data"
  env -i PATH="$PATH" HOME="${HOME:-/root}" "$bin" serve --data-dir "$data" --dps-host "$host" \
    --https-port 0 --mqtt-port 0 --amqp-port 0 "$@" </dev/null >"$data.log" 2>&1 &
  serve_pid=$!
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until [[ -f $data/connection.json ]]; do
    kill -0 "$serve_pid" 2>/dev/null || { tail -20 "$data.log" >&2; exit 1; }
    ((SECONDS < deadline)) || { echo "bench-cluster.sh: serve not ready" >&2; exit 1; }
    sleep 0.2 # poll interval
  done
}

stop_serve() {
  kill "$serve_pid"
  wait "$serve_pid" || true
  serve_pid=
}

# Creates the group through the node whose data dir is $1, then the warm-up and the run.
bench() {
  local data=$1 label=$2 pid=${3:-}
  "$bin" enrollment-group create --group-id bench --data-dir "$data" >/dev/null
  local key
  key=$("$bin" enrollment-group show bench --show-keys --data-dir "$data" --output json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
  "$bin" bench register --data-dir "$data" --group-key "$key" --mode "$mode" \
    --prefix warm- --count "$warmup" --concurrency "$concurrency" >/dev/null
  local extra=()
  [[ -n $pid ]] && extra+=(--server-pid "$pid")
  "$bin" bench register --data-dir "$data" --group-key "$key" --mode "$mode" \
    --count "$count" --concurrency "$concurrency" --label "$label" "${extra[@]}" --json \
    | tee "$out/$label.json"
  echo
}

# Transactions of the database $1 (a URL) divided by the registrations made.
transactions_per_registration() {
  local n
  n=$(psql "$1" -Atc "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
  python3 -c "import sys; print(f'{sys.argv[3]}: {int(sys.argv[1])} PostgreSQL transactions, {int(sys.argv[1]) / int(sys.argv[2]):.1f} per registration')" \
    "$n" "$((count + warmup))" "$2" | tee "$out/$2.transactions"
}

echo "== 1 node, SQLite"
serve "$work/sqlite"
bench "$work/sqlite" "1-node-sqlite" "$serve_pid"
stop_serve

echo "== 1 node, PostgreSQL"
MUSTER_PG_HOST=$host bash "$ROOT/scripts/pg.sh" start "$work/pg" >"$work/pg.url"
serve "$work/pg1" --store "$(cat "$work/pg.url")" --sealing-key "$work/pg.key"
bench "$work/pg1" "1-node-postgres" "$serve_pid"
stop_serve
transactions_per_registration "$(cat "$work/pg.url")" "1-node-postgres"
bash "$ROOT/scripts/pg.sh" stop "$work/pg" >/dev/null

echo "== 3 nodes, PostgreSQL (scripts/cluster.sh)"
MUSTER_BIN=$bin MUSTER_CLUSTER_HOST=$host MUSTER_CLUSTER_NODES=3 \
  MUSTER_CLUSTER_HTTPS_PORT=18643 MUSTER_CLUSTER_MQTT_PORT=18683 MUSTER_CLUSTER_AMQP_PORT=18671 \
  MUSTER_CLUSTER_ADMIN_PORT=18700 bash "$ROOT/scripts/cluster.sh" start "$work/cluster" >/dev/null
bench "$work/cluster/node-1/data" "3-nodes-postgres"
while read -r _ pid _; do kill -TERM "$pid" 2>/dev/null || true; done <"$work/cluster/nodes"
deadline=$((SECONDS + 30))
while read -r _ pid _; do
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done # poll interval
done <"$work/cluster/nodes"
transactions_per_registration "$(cat "$work/cluster/url")" "3-nodes-postgres"

[[ -n ${BENCH_KILL_AFTER_S:-} ]] || exit 0
echo "== 3 nodes, PostgreSQL, node 2 killed ${BENCH_KILL_AFTER_S} s into an open-loop run"
MUSTER_CLUSTER_HOST=$host bash "$ROOT/scripts/cluster.sh" stop "$work/cluster" >/dev/null
MUSTER_BIN=$bin MUSTER_CLUSTER_HOST=$host MUSTER_CLUSTER_NODES=3 \
  MUSTER_CLUSTER_HTTPS_PORT=18643 MUSTER_CLUSTER_MQTT_PORT=18683 MUSTER_CLUSTER_AMQP_PORT=18671 \
  MUSTER_CLUSTER_ADMIN_PORT=18700 bash "$ROOT/scripts/cluster.sh" start "$work/cluster" >/dev/null
data=$work/cluster/node-1/data
"$bin" enrollment-group create --group-id bench --data-dir "$data" >/dev/null
key=$("$bin" enrollment-group show bench --show-keys --data-dir "$data" --output json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
"$bin" bench register --data-dir "$data" --group-key "$key" --mode "$mode" \
  --prefix warm- --count "$warmup" --concurrency "$concurrency" >/dev/null
"$bin" bench register --data-dir "$data" --group-key "$key" --mode "$mode" --count "$count" \
  --rate "${BENCH_RATE:-250}" --concurrency 256 --label 3-nodes-kill --json >"$out/3-nodes-kill.json" &
bench_pid=$!
sleep "$BENCH_KILL_AFTER_S" # the kill's moment in the run, as asked
kill -KILL "$(awk '$1 == 2 { print $2 }' "$work/cluster/nodes")"
wait "$bench_pid"
cat "$out/3-nodes-kill.json"
