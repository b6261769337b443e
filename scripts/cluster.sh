#!/usr/bin/env bash
# A throwaway Muster cluster on this machine: a PostgreSQL cluster (scripts/pg.sh) and N
# `muster serve` nodes on one loopback address and the same ports, bound with --reuse-port
# so the kernel spreads the connections among them. For trying a cluster and for the
# interop tests (tests/interop/muster_server.py with MUSTER_CLUSTER=N); docs/cluster.md
# describes a production setup.
#
#   scripts/cluster.sh start [DIR]   start PostgreSQL and the nodes; prints URLs and pids
#   scripts/cluster.sh stop [DIR]    stop the nodes (SIGTERM, SIGKILL after 15 s) and
#                                    PostgreSQL, and remove DIR
#
# DIR defaults to $MUSTER_CLUSTER_DIR or /tmp/muster-cluster. Environment:
#   MUSTER_CLUSTER_HOST        loopback address every node shares (default: $MUSTER_DPS_HOST,
#                              else 127.0.0.2); PostgreSQL listens there too
#   MUSTER_CLUSTER_NODES       number of nodes (default 3)
#   MUSTER_CLUSTER_NODE_HOSTS  comma-separated extra address per node (node i also listens
#                              on the i-th, alone, so a test can reach a chosen node); optional
#   MUSTER_CLUSTER_ADMIN_PORT  node i's plain-HTTP admin listener (/healthz, /readyz,
#                              /metrics) is HOST:(this + i) (default 9400)
#   MUSTER_CLUSTER_HTTPS_PORT, _MQTT_PORT, _AMQP_PORT   shared ports (443, 8883, 5671)
#   MUSTER_BIN                 the muster binary (default target/debug/muster)
#
# Identity: node 1 starts first and creates the local CA, the issuing CA and the server
# certificate in its data dir; the other nodes get copies of both CAs and serve node 1's
# certificate (--tls-cert/--tls-key), so every node presents the same identity. They share
# the sealing key file DIR/store.key; the ID scope and the hub's policies come from the
# database. Files: DIR/url (the database), DIR/pgdir (where PostgreSQL lives), DIR/nodes (one line per node: index, pid, admin
# URL, data dir), DIR/node-I.log. The nodes run with no MUSTER_* variables but these.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd=${1:-}
dir=${2:-${MUSTER_CLUSTER_DIR:-/tmp/muster-cluster}}
host=${MUSTER_CLUSTER_HOST:-${MUSTER_DPS_HOST:-127.0.0.2}}
nodes=${MUSTER_CLUSTER_NODES:-3}
admin_base=${MUSTER_CLUSTER_ADMIN_PORT:-9400}
https_port=${MUSTER_CLUSTER_HTTPS_PORT:-443}
mqtt_port=${MUSTER_CLUSTER_MQTT_PORT:-8883}
amqp_port=${MUSTER_CLUSTER_AMQP_PORT:-5671}
bin=${MUSTER_BIN:-$ROOT/target/debug/muster}
IFS=, read -r -a node_hosts <<<"${MUSTER_CLUSTER_NODE_HOSTS:-}"
READY_TIMEOUT_S=60
STOP_GRACE_S=15

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Polls until node $1's admin listener answers /readyz with 200 (bounded).
wait_ready() {
  local i=$1 pid=$2 url=$3 deadline=$((SECONDS + READY_TIMEOUT_S))
  until curl -fsS -o /dev/null --max-time 2 "$url/readyz" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -30 "$dir/node-$i.log" >&2
      die "node $i exited before it was ready (log: $dir/node-$i.log)"
    fi
    ((SECONDS < deadline)) || die "node $i not ready after ${READY_TIMEOUT_S}s (log: $dir/node-$i.log)"
    sleep 0.2 # poll interval
  done
}

start_node() {
  local i=$1 data=$dir/node-$i/data
  local admin="$host:$((admin_base + i))"
  local listen=$host
  local extra=${node_hosts[$((i - 1))]:-}
  [[ -n $extra ]] && listen+=",$extra"
  local args=(serve --data-dir "$data" --store "$(cat "$dir/url")" --sealing-key "$dir/store.key"
    --dps-host "$host" --listen "$listen" --reuse-port --admin-listen "$admin"
    --https-port "$https_port" --mqtt-port "$mqtt_port" --amqp-port "$amqp_port")
  mkdir -p "$data"
  chmod 700 "$dir/node-$i" "$data"
  if ((i == 1)); then
    for h in "${node_hosts[@]}"; do
      [[ -n $h ]] && args+=(--extra-host "$h")
    done
  else
    local first=$dir/node-1/data
    for f in ca.pem ca.key issuing-ca.pem issuing-ca.key; do
      [[ -f $first/$f ]] && cp -p "$first/$f" "$data/$f"
    done
    args+=(--tls-cert "$first/server.pem" --tls-key "$first/server.key")
  fi
  env -i PATH="$PATH" HOME="${HOME:-/root}" RUST_LOG="${RUST_LOG:-info}" RUST_BACKTRACE=1 \
    setsid "$bin" "${args[@]}" </dev/null >"$dir/node-$i.log" 2>&1 &
  local pid=$!
  wait_ready "$i" "$pid" "http://$admin"
  echo "$i $pid http://$admin $data" >>"$dir/nodes"
  echo "node $i: pid $pid, admin http://$admin, listens on $listen (log $dir/node-$i.log)"
}

start() {
  [[ -x $bin ]] || die "muster binary not found at $bin (cargo build -p muster, or set MUSTER_BIN)"
  [[ $host == 127.* ]] || die "MUSTER_CLUSTER_HOST must be a loopback address, got $host"
  [[ -f $dir/nodes ]] && die "a cluster is already started in $dir (scripts/cluster.sh stop $dir first)"
  mkdir -p "$dir"
  chmod 700 "$dir"
  # Whatever fails from here on, nothing is left running (the failing node's log was shown).
  trap 'rc=$?; if ((rc)); then stop; fi' EXIT
  # PostgreSQL runs as `postgres` when we are root, so its directory is one of its own
  # under /tmp (DIR's parents may be closed to others); DIR/pgdir names it.
  local pgroot
  pgroot=$(mktemp -d /tmp/muster-cluster-pg.XXXXXX)
  chmod 711 "$pgroot"
  echo "$pgroot" >"$dir/pgdir"
  MUSTER_PG_HOST=$host bash "$ROOT/scripts/pg.sh" start "$pgroot/pg" >"$dir/url"
  : >"$dir/nodes"
  for ((i = 1; i <= nodes; i++)); do
    start_node "$i"
  done
  echo "database: $(cat "$dir/url")"
  echo "devices and services: https://$host:$https_port, mqtts://$host:$mqtt_port, amqps://$host:$amqp_port"
  echo "connection info: $dir/node-1/data/connection.json"
}

stop() {
  if [[ -f $dir/nodes ]]; then
    local pids=()
    while read -r _ pid _; do pids+=("$pid"); done <"$dir/nodes"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + STOP_GRACE_S))
    for pid in "${pids[@]}"; do
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "cluster.sh: node pid $pid ignored SIGTERM for ${STOP_GRACE_S}s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done
  fi
  if [[ -f $dir/pgdir ]]; then
    local pgroot
    pgroot=$(cat "$dir/pgdir")
    bash "$ROOT/scripts/pg.sh" stop "$pgroot/pg"
    rmdir "$pgroot" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: scripts/cluster.sh start|stop [DIR]" >&2
    exit 2
    ;;
esac
