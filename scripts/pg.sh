#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for Muster's tests and for trying `muster serve --store
# postgres://...`: Debian's postgresql binaries, an unprivileged cluster in a directory of
# its own, listening on one loopback address and a free port, with TLS (a throwaway CA,
# DIR/ca.crt, and a certificate for that address) so `sslmode=require` and `verify-full` can be tried.
#
#   scripts/pg.sh start [DIR]   initdb + start; prints the URL (also in DIR/url)
#   scripts/pg.sh env [DIR]     prints `export MUSTER_STORE=...` for a started cluster
#   scripts/pg.sh stop [DIR]    stops the cluster and removes DIR
#
# DIR defaults to $MUSTER_PG_DIR or /tmp/muster-pg. The address is $MUSTER_PG_HOST
# (default 127.0.0.1). Run as root, the cluster runs as the `postgres` user (initdb refuses
# root). Exit status 3: the PostgreSQL binaries are not installed (apt-get install postgresql).
set -euo pipefail

cmd=${1:-}
dir=${2:-${MUSTER_PG_DIR:-/tmp/muster-pg}}
host=${MUSTER_PG_HOST:-127.0.0.1}

find_bin() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [[ -z $bin || ! -x $bin/initdb || ! -x $bin/pg_ctl ]]; then
    echo "pg.sh: PostgreSQL binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)" >&2
    exit 3
  fi
  echo "$bin"
}

# Runs a PostgreSQL binary as the cluster's owner.
as_owner() {
  if ((EUID == 0)); then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "pg.sh: no free port found on $host" >&2
  exit 1
}

start() {
  local bin port
  bin=$(find_bin)
  if [[ -f $dir/url ]]; then
    echo "pg.sh: a cluster is already started in $dir (scripts/pg.sh stop $dir first)" >&2
    exit 1
  fi
  mkdir -p "$dir"
  chmod 700 "$dir"
  ((EUID == 0)) && chown postgres: "$dir"
  as_owner "$bin/initdb" -D "$dir/data" -A trust -U muster -E UTF8 --locale=C --no-sync --wal-segsize=1 >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    exit 1
  }
  # TLS: a throwaway CA (ca.crt, for sslrootcert) and a server certificate for the address.
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj "/CN=muster test cluster CA" -keyout ca.key -out ca.crt
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$host" \
      -keyout data/server.key -out server.csr
    printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n' "$host" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out data/server.crt
    rm -f ca.key server.csr server.ext ca.srl
  ) >/dev/null 2>&1
  chmod 600 "$dir/data/server.key"
  chmod 644 "$dir/ca.crt"
  ((EUID == 0)) && chown postgres: "$dir/data/server.key" "$dir/data/server.crt"
  for _ in 1 2 3; do
    port=$(free_port)
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 30 \
      -o "-c listen_addresses=$host -p $port -c unix_socket_directories=$dir -c ssl=on -c fsync=off -c max_connections=200" \
      start >/dev/null; then
      echo "postgres://muster@$host:$port/muster" >"$dir/url"
      as_owner "$bin/psql" -h "$dir" -p "$port" -U muster -d postgres -q -c 'CREATE DATABASE muster' >/dev/null
      cat "$dir/url"
      return
    fi
  done
  cat "$dir/postgres.log" >&2
  exit 1
}

stop() {
  local bin
  if [[ -d $dir/data ]]; then
    bin=$(find_bin)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  env)
    [[ -f $dir/url ]] || { echo "pg.sh: no cluster started in $dir" >&2; exit 1; }
    echo "export MUSTER_STORE=$(cat "$dir/url")"
    ;;
  *)
    echo "usage: scripts/pg.sh start|stop|env [DIR]" >&2
    exit 2
    ;;
esac
