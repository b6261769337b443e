#!/usr/bin/env bash
# The benchmark suite of issue #8, from a fresh clone: builds `muster`, starts `muster serve` on
# a loopback address with a fresh data dir and one symmetric-key enrollment group, then
#   1. the load generator in each mode (https-fresh, https-keepalive, mqtt-fresh, amqp-fresh): a warm-up,
#      then the measured run, with the server's CPU time and memory;
#   2. the TLS reference (handshake + fixed answer only; over MQTT also CONNECT/CONNACK and
#      SUBSCRIBE/SUBACK) with the same connection behaviour, https-fresh, https-keepalive and
#      mqtt-fresh, so registration rates can be read as a fraction of it;
#   3. an open-loop run at half the measured keep-alive rate, for latency percentiles;
#   4. the service API: bulk creation of individual enrollments and paging-query latency,
#      then again after seeding registration records into the group (server stopped);
#   5. attestation cost as enrollment groups grow: a fresh server with 1, then 100, then
#      10,000 symmetric-key groups; server CPU per forged token, first registration,
#      re-registration and forged token for a registered id (`muster bench attestation`);
#   6. the scaling curve, https-keepalive rate and server CPU per registration (the same
#      `bench register --server-pid` report):
#      - as registration records grow: a fresh server whose group `bench` holds 0, then
#        100,000, then 1,000,000 seeded records (`bench seed-records` while it is stopped, the
#        same data dir grown, so 1,000,000 are seeded in all; a warm-up after each restart);
#      - as enrollment groups grow: a fresh server topped up to 1, 100, then 10,000
#        symmetric-key groups (`bench seed-groups`); its devices belong in turn to the last 8
#        groups in id order (all of them below 8): more than the 4 recently matched groups
#        attestation tries first, so each new id is matched by a search through the groups.
#        New ids, then the same ids registering again (their record names the group). Fewer
#        devices here (BENCH_SCALE_GROUP_COUNT), and 4 in flight: beyond the server's bound on
#        concurrent group searches (half the cores searching, four waiting each: 5 on 2 cores)
#        new ids would be answered 429;
#   7. (full runs, when scripts/interop.sh has made .interop/venv) Microsoft's Python SDK
#      registering devices one process at a time, process start to `assigned`, against a
#      second server on the standard ports 443/8883 of BENCH_SDK_HOST (127.0.0.11), since the
#      SDK has no port option.
# The server's idle resident set is read once it has started, before any load.
# It prints a summary and writes every report into one JSON file. Every process it starts is
# stopped on exit.
#
# Usage: scripts/bench.sh [--smoke] [--out FILE]
#   --smoke   tiny counts (20 devices, 1,000 enrollments, 10,000 records, 1 and 40 groups;
#             scaling curve at 0/1,000/3,000 records and 1/3/20 groups) with the debug build,
#             to prove the commands run (scripts/test.sh does this)
#   --out     JSON results [default: $CARGO_TARGET_DIR/bench/results.json]
# Sizes can be overridden: BENCH_COUNT, BENCH_WARMUP, BENCH_CONCURRENCY, BENCH_ENROLLMENTS,
# BENCH_RECORDS, BENCH_QUERIES, BENCH_SDK_COUNT (10), BENCH_ATTEST_GROUPS ("1 100 10000"),
# BENCH_ATTEST_COUNT (300); the scaling curve: BENCH_SCALE_RECORDS ("0 100000 1000000",
# ascending), BENCH_SCALE_COUNT (BENCH_COUNT), BENCH_SCALE_GROUPS ("1 100 10000", ascending),
# BENCH_SCALE_GROUP_COUNT (1000 devices per group count), BENCH_SCALE_GROUP_CONCURRENCY (4);
# addresses: BENCH_HOST (127.0.0.9), BENCH_PORT_BASE (18440).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

smoke=0
out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

target_dir="${CARGO_TARGET_DIR:-target}"
if [[ $smoke -eq 1 ]]; then
  count=${BENCH_COUNT:-20}; warmup=${BENCH_WARMUP:-5}; conc=${BENCH_CONCURRENCY:-4}
  enrollments=${BENCH_ENROLLMENTS:-1000}; records=${BENCH_RECORDS:-10000}; queries=${BENCH_QUERIES:-10}
  attest_groups=${BENCH_ATTEST_GROUPS:-"1 40"}; attest_count=${BENCH_ATTEST_COUNT:-5}
  scale_records=${BENCH_SCALE_RECORDS:-"0 1000 3000"}; scale_groups=${BENCH_SCALE_GROUPS:-"1 3 20"}
  scale_group_count=${BENCH_SCALE_GROUP_COUNT:-20}
  host=${BENCH_HOST:-127.0.0.10}; base=${BENCH_PORT_BASE:-18450}
  cargo build -p muster --locked --quiet
  bin="$target_dir/debug/muster"
else
  count=${BENCH_COUNT:-10000}; warmup=${BENCH_WARMUP:-1000}; conc=${BENCH_CONCURRENCY:-64}
  enrollments=${BENCH_ENROLLMENTS:-100000}; records=${BENCH_RECORDS:-1000000}; queries=${BENCH_QUERIES:-200}
  attest_groups=${BENCH_ATTEST_GROUPS:-"1 100 10000"}; attest_count=${BENCH_ATTEST_COUNT:-300}
  scale_records=${BENCH_SCALE_RECORDS:-"0 100000 1000000"}
  scale_groups=${BENCH_SCALE_GROUPS:-"1 100 10000"}; scale_group_count=${BENCH_SCALE_GROUP_COUNT:-1000}
  host=${BENCH_HOST:-127.0.0.9}; base=${BENCH_PORT_BASE:-18440}
  cargo build --release -p muster --locked --quiet
  bin="$target_dir/release/muster"
fi
scale_count=${BENCH_SCALE_COUNT:-$count}; scale_group_conc=${BENCH_SCALE_GROUP_CONCURRENCY:-4}
https_port=$((base + 3)); mqtt_port=$((base + 4)); ref_port=$((base + 5)); ref_mqtt_port=$((base + 6))
out="${out:-$target_dir/bench/results.json}"
mkdir -p "$(dirname "$out")"

work=$(mktemp -d)
data="$work/server"
results="$work/results"
mkdir -p "$results"
server_pid=""
ref_pid=""
stop_pid() { # PID: SIGTERM, then wait for it
  [[ -n "$1" ]] || return 0
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  stop_pid "$ref_pid"
  stop_pid "$server_pid"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until HOST:PORT accepts connections while process PID lives.
wait_port() {
  local port="$1" pid="$2" log="$3"
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "process $pid exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "nothing listens on $host:$port" >&2; exit 1
}

start_server() {
  rm -f "$data/connection.json"
  "$bin" serve --data-dir "$data" --dps-host "$host" --https-port "$https_port" \
    --mqtt-port "$mqtt_port" --amqp-port 0 >>"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 300); do
    [[ -f "$data/connection.json" ]] && return 0
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "muster serve did not start" >&2; exit 1
}
stop_server() { stop_pid "$server_pid"; server_pid=""; }

step() { printf '\n== %s\n' "$*" >&2; }

# register NAME ARGS...: a measured run whose JSON report goes to results/NAME.json.
register() {
  local name="$1"; shift
  "$bin" bench register --data-dir "$data" --label "$name" --json "$@" >"$results/$name.json"
  python3 - "$results/$name.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency"]
print(f'   {r["assigned"]}/{r["attempted"]} assigned, {r["throughput_per_sec"]:.0f}/s, '
      f'p50 {l["p50_ms"]:.1f} p99 {l["p99_ms"]:.1f} max {l["max_ms"]:.1f} ms, errors {r["errors_by_kind"]}')
PY
}

step "muster serve on $host:$https_port (MQTT $mqtt_port), data in $data"
start_server
# Idle: started, nothing asked of it yet.
awk '/^VmRSS/ {print "{\"idle_rss_kib\": " $2 "}"}' "/proc/$server_pid/status" >"$results/idle.json"
key=$("$bin" enrollment-group create --data-dir "$data" --group-id bench --show-keys -o json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
export MUSTER_GROUP_KEY="$key"

for mode in https-fresh https-keepalive mqtt-fresh amqp-fresh; do
  step "$mode: warm-up ($warmup), then $count devices, concurrency $conc"
  "$bin" bench register --data-dir "$data" --mode "$mode" --prefix "warm-$mode-" \
    --count "$warmup" --concurrency "$conc" --json >/dev/null
  register "$mode" --mode "$mode" --prefix "$mode-" --count "$count" --concurrency "$conc" \
    --server-pid "$server_pid"
done

step "TLS reference on $host:$ref_port, MQTT on $ref_mqtt_port (handshake + fixed answer)"
"$bin" bench tls-reference --data-dir "$data" --listen "$host:$ref_port" \
  --mqtt-listen "$host:$ref_mqtt_port" >"$work/reference.out" 2>"$work/reference.log" &
ref_pid=$!
wait_port "$ref_port" "$ref_pid" "$work/reference.log"
wait_port "$ref_mqtt_port" "$ref_pid" "$work/reference.log"
reference=(--target tls-reference --endpoint "$host:$ref_port" --mqtt-endpoint "$host:$ref_mqtt_port")
for mode in https-fresh https-keepalive mqtt-fresh; do
  step "reference $mode: warm-up, then $count requests"
  "$bin" bench register --data-dir "$data" "${reference[@]}" --mode "$mode" --count "$warmup" \
    --concurrency "$conc" --json >/dev/null
  register "reference-$mode" "${reference[@]}" --mode "$mode" --count "$count" \
    --concurrency "$conc" --server-pid "$ref_pid"
done
stop_pid "$ref_pid"; ref_pid=""

rate=$(python3 -c 'import json,sys; print("%.1f" % max(1.0, json.load(open(sys.argv[1]))["throughput_per_sec"] / 2))' \
  "$results/https-keepalive.json")
step "https-keepalive at a fixed $rate devices/s (half the measured maximum)"
# The pool is opened by an in-process warm-up first (--warmup): a gateway's connections are
# open at steady state, and 128 would-be connections opened in the first scheduled
# milliseconds would also meet the server's bound on connections per address before their
# first answer (--max-unauthenticated-per-address, 256).
register "https-keepalive-half-rate" --mode https-keepalive --prefix "rate-" --count "$count" \
  --rate "$rate" --concurrency $((conc * 2)) --warmup "$warmup" --server-pid "$server_pid"

step "service API: bulk-create $enrollments enrollments, $queries paging queries"
"$bin" bench service-api --data-dir "$data" --enrollments "$enrollments" --queries "$queries" \
  --group-id bench --server-pid "$server_pid" --json >"$results/service-api.json"

step "seed $records registration records into group bench (server stopped)"
stop_server
"$bin" bench seed-records --data-dir "$data" --group-id bench --count "$records" --json \
  >"$results/seed-records.json"
start_server
step "service API: $queries paging queries over $records+ records"
"$bin" bench service-api --data-dir "$data" --enrollments 0 --queries "$queries" \
  --group-id bench --server-pid "$server_pid" --json >"$results/service-api-seeded.json"
stop_server

step "attestation with $attest_groups groups (a fresh server), $attest_count devices per phase"
suite_data="$data"; data="$work/attest-server"
start_server
for n in $attest_groups; do
  "$bin" bench attestation --data-dir "$data" --groups "$n" --count "$attest_count" \
    --server-pid "$server_pid" --json >"$results/attestation-$n.json"
  python3 - "$results/attestation-$n.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f'   {r["groups"]} groups: ' + ", ".join(
    f'{p["phase"]} {p["server_cpu_ms_per_request"]:.3f} ms' for p in r["phases"]))
PY
done
stop_server
data="$suite_data"

# The scaling curve (issue #19): https-keepalive as registration records, then groups, grow.
step "scaling curve: https-keepalive with $scale_records records in group bench (a fresh server), $scale_count devices"
data="$work/scale-records"
start_server
MUSTER_GROUP_KEY=$("$bin" enrollment-group create --data-dir "$data" --group-id bench --show-keys -o json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
seeded=0
for n in $scale_records; do
  if ((n < seeded)); then echo "BENCH_SCALE_RECORDS must be ascending: $scale_records" >&2; exit 2; fi
  if ((n > seeded)); then
    stop_server
    "$bin" bench seed-records --data-dir "$data" --group-id bench --prefix seed- --start "$seeded" \
      --count $((n - seeded)) --json >"$results/scale-seed-$n.json"
    seeded=$n
    start_server
  fi
  "$bin" bench register --data-dir "$data" --mode https-keepalive --prefix "scale-warm-$n-" \
    --count "$warmup" --concurrency "$conc" --json >/dev/null
  register "scale-records-$n" --mode https-keepalive --prefix "scale-$n-" --count "$scale_count" \
    --concurrency "$conc" --server-pid "$server_pid"
done
stop_server

step "scaling curve: $scale_groups groups (a fresh server), $scale_group_count devices of the last 8 groups, $scale_group_conc in flight"
data="$work/scale-groups"
start_server
previous=0
for n in $scale_groups; do
  if ((n < previous)); then echo "BENCH_SCALE_GROUPS must be ascending: $scale_groups" >&2; exit 2; fi
  previous=$n
  "$bin" bench seed-groups --data-dir "$data" --groups "$n" --spread $((n < 8 ? n : 8)) \
    --keys-file "$work/scale-group-keys" --json >"$results/scale-topup-groups-$n.json"
  # The first request after the groups changed fills the server's group cache.
  "$bin" bench register --data-dir "$data" --group-keys-file "$work/scale-group-keys" \
    --mode https-keepalive --prefix "scale-g$n-warm-" \
    --count $((scale_group_count / 20 > 3 ? scale_group_count / 20 : 3)) \
    --concurrency "$scale_group_conc" --json >/dev/null
  for round in new again; do
    register "scale-groups-$n-$round" --group-keys-file "$work/scale-group-keys" \
      --mode https-keepalive --prefix "scale-g$n-" --count "$scale_group_count" \
      --concurrency "$scale_group_conc" --server-pid "$server_pid"
  done
done
stop_server
data="$suite_data"
export MUSTER_GROUP_KEY="$key"

sdk_python="$PWD/.interop/venv/bin/python"
if [[ $smoke -eq 0 && -x "$sdk_python" ]] && "$sdk_python" -c 'import azure.iot.device' 2>/dev/null; then
  sdk_count=${BENCH_SDK_COUNT:-10}
  host=${BENCH_SDK_HOST:-127.0.0.11}; https_port=443; mqtt_port=8883; data="$work/sdk-server"
  step "Python SDK (azure-iot-device): $sdk_count devices, one process each, on $host:443/8883"
  start_server
  sdk_key=$("$bin" enrollment-group create --data-dir "$data" --group-id sdk --show-keys -o json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["attestation"]["symmetricKey"]["primaryKey"])')
  NO_PROXY="127.0.0.0/8,localhost" python3 scripts/bench_python_sdk.py "$sdk_python" \
    "$data/connection.json" "$sdk_key" "$sdk_count" >"$results/python-sdk.json"
  stop_server
else
  step "Python SDK step skipped (smoke run, or no .interop/venv: run scripts/interop.sh once)"
fi

python3 - "$results" "$out" "$smoke" <<'PY'
import json, os, platform, sys
results, out, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
runs = {}
for name in sorted(os.listdir(results)):
    with open(os.path.join(results, name)) as f:
        runs[name[:-5]] = json.load(f)
summary = {"smoke": smoke, "machine": {"cpus": os.cpu_count(), "kernel": platform.release()}, "runs": runs}
ref = {m: runs.get(f"reference-{m}", {}).get("throughput_per_sec")
       for m in ("https-fresh", "https-keepalive", "mqtt-fresh")}
print("\n%-26s %13s %9s %8s %8s %8s %8s %10s %9s" % (
    "run", "assigned", "per s", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU ms/dev", "peak MiB"))
for name in ("https-fresh", "https-keepalive", "mqtt-fresh", "amqp-fresh", "reference-https-fresh",
             "reference-https-keepalive", "reference-mqtt-fresh", "https-keepalive-half-rate"):
    r = runs.get(name)
    if not r:
        continue
    l, s = r["latency"], r.get("server") or {}
    cpu = (s.get("cpu_secs", 0) * 1000 / r["assigned"]) if r["assigned"] else 0
    print("%-26s %13s %9.0f %8.1f %8.1f %8.1f %8.1f %10.3f %9.1f" % (
        name, f'{r["assigned"]}/{r["attempted"]}', r["throughput_per_sec"], l["p50_ms"], l["p90_ms"],
        l["p99_ms"], l["max_ms"], cpu, s.get("peak_rss_kib", 0) / 1024))
fractions = {}
for mode, ref_rate in ref.items():
    if ref_rate and mode in runs:
        fractions[mode] = runs[mode]["throughput_per_sec"] / ref_rate
        c = runs[f"reference-{mode}"].get("reference") or {}
        print(f"{mode}: {fractions[mode]:.0%} of the {'MQTT ' if mode.startswith('mqtt') else ''}TLS reference "
              f"(reference saw {c.get('connections')} connections, {c.get('resumed_handshakes')} resumed)")
summary["fraction_of_reference"] = fractions
idle = runs.get("idle", {}).get("idle_rss_kib")
if idle:
    print(f"idle RSS after start: {idle / 1024:.1f} MiB")
sdk = runs.get("python-sdk")
if sdk and "start_to_assigned_ms" in sdk:
    a, e = sdk["start_to_assigned_ms"], sdk["start_to_exit_ms"]
    print(f"Python SDK, process start to assigned: p50 {a['p50']:.0f} max {a['max']:.0f} ms "
          f"(to exit: p50 {e['p50']:.0f} ms), {sdk['assigned']}/{sdk['devices']} assigned")
for name in ("service-api", "service-api-seeded"):
    r = runs.get(name, {})
    b = r.get("bulk_create")
    if b:
        print(f"bulk create: {b['enrollments'] - b['failed_items']} enrollments in {b['secs']:.2f} s "
              f"({b['enrollments_per_sec']:.0f}/s, {b['calls']} calls)")
    for q in r.get("queries", []):
        l = q["latency"]
        rss = (q.get("server") or {}).get("peak_rss_kib", 0) / 1024
        print(f"query {q['collection']} ({q['items']} items, {name}): p50 {l['p50_ms']:.1f} p90 {l['p90_ms']:.1f} "
              f"p99 {l['p99_ms']:.1f} max {l['max_ms']:.1f} ms over {q['queries']} pages of {q['page_size']}, "
              f"server peak RSS {rss:.1f} MiB")
attest = sorted((r for n, r in runs.items() if n.startswith("attestation-")), key=lambda r: r["groups"])
for r in attest:
    cells = ", ".join(f'{p["phase"]} {p["server_cpu_ms_per_request"]:.3f}' for p in r["phases"])
    print(f"attestation with {r['groups']} groups, server CPU ms per request: {cells}")
s = runs.get("seed-records")
if s:
    print(f"seed-records: {s['records']} in {s['secs']:.2f} s ({s['records_per_sec']:.0f}/s)")

def per_reg_cpu_ms(r):
    cpu = (r.get("server") or {}).get("cpu_secs")
    return cpu * 1000 / r["assigned"] if cpu is not None and r["assigned"] else None

def cell(v, fmt):
    return "-" if v is None else format(v, fmt)

scaling = {"records": [], "groups": []}
rec = sorted((int(n[len("scale-records-"):]), r) for n, r in runs.items() if n.startswith("scale-records-"))
base_rate = rec[0][1]["throughput_per_sec"] if rec and rec[0][0] == 0 else None
for n, r in rec:
    scaling["records"].append({
        "records": n, "devices": r["attempted"], "assigned": r["assigned"],
        "per_sec": r["throughput_per_sec"], "server_cpu_ms_per_registration": per_reg_cpu_ms(r),
        "ratio_to_0_records": r["throughput_per_sec"] / base_rate if base_rate else None,
        "p99_ms": r["latency"]["p99_ms"]})
groups = sorted({int(n.split("-")[2]) for n in runs if n.startswith("scale-groups-")})
for n in groups:
    new, again = runs.get(f"scale-groups-{n}-new"), runs.get(f"scale-groups-{n}-again")
    row = {"groups": n}
    for name, r in (("new", new), ("again", again)):
        if r:
            row[name] = {"devices": r["attempted"], "assigned": r["assigned"],
                         "per_sec": r["throughput_per_sec"],
                         "server_cpu_ms_per_registration": per_reg_cpu_ms(r),
                         "errors_by_kind": r["errors_by_kind"]}
    scaling["groups"].append(row)
if rec or groups:
    print("\nscaling (https-keepalive)")
if rec:
    r0 = rec[0][1]
    print(f"  existing records ({r0['attempted']} devices, {r0['concurrency']} in flight)")
    print("  %12s %13s %9s %10s %8s %13s" % ("records", "assigned", "per s", "CPU ms/reg", "p99 ms", "vs 0 records"))
    for row in scaling["records"]:
        ratio = row["ratio_to_0_records"]
        print("  %12s %13s %9.0f %10s %8.1f %13s" % (
            f'{row["records"]:,}', f'{row["assigned"]}/{row["devices"]}', row["per_sec"],
            cell(row["server_cpu_ms_per_registration"], ".3f"), row["p99_ms"],
            "-" if ratio is None else f"{ratio:.0%}"))
    seeds = [runs[n] for n in runs if n.startswith("scale-seed-")]
    if seeds:
        print(f"  seeded {sum(x['records'] for x in seeds):,} records in {sum(x['secs'] for x in seeds):.1f} s")
if groups:
    first = runs.get(f"scale-groups-{groups[0]}-new") or {}
    print(f"  enrollment groups ({first.get('attempted')} devices spread over the last 8 groups or all, "
          f"{first.get('concurrency')} in flight: new ids, then the same ids again)")
    print("  %12s %13s %11s %9s %12s %14s" % (
        "groups", "assigned", "new ids/s", "again/s", "CPU ms new", "CPU ms again"))
    for row in scaling["groups"]:
        new, again = row.get("new") or {}, row.get("again") or {}
        assigned = "/".join(str(x.get("assigned", "-")) for x in (new, again))
        print("  %12s %13s %11s %9s %12s %14s" % (
            f'{row["groups"]:,}', assigned, cell(new.get("per_sec"), ".0f"), cell(again.get("per_sec"), ".0f"),
            cell(new.get("server_cpu_ms_per_registration"), ".3f"),
            cell(again.get("server_cpu_ms_per_registration"), ".3f")))
summary["scaling"] = scaling
with open(out, "w") as f:
    json.dump(summary, f, indent=2)
print(f"\nresults: {out}")
PY
