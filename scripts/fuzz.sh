#!/usr/bin/env bash
# Builds the coverage-guided fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) and runs each in
# turn. See fuzz/README.md for why cargo-fuzz and how this runs on a stable toolchain.
#
# Usage: scripts/fuzz.sh [--smoke] [--seconds N] [--jobs N] [target...]
#   --smoke      build, then run every target for 5 s on a throw-away corpus (CI)
#   --seconds N  run each target N seconds (default 600) growing fuzz/corpus/<target>
#   --jobs N     run N targets at once (default 1)
#   target...    only these targets (default: all, as listed by `cargo fuzz list`)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler (libFuzzer is built
# from source by libfuzzer-sys). A finding leaves its input in fuzz/artifacts/<target>/ and makes
# the script exit non-zero; reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target>
# fuzz/artifacts/<target>/<file>` in fuzz/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=600
smoke=0
jobs=1
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; seconds=5; shift ;;
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -*) echo "unknown option: $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

if ! command -v cargo-fuzz >/dev/null; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# cargo-fuzz passes nightly-only flags (-Z); RUSTC_BOOTSTRAP lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
# -s none: no AddressSanitizer. The code under test is safe Rust, where ASan finds nothing
# that a panic or a debug assertion doesn't, at half the speed (fuzz/README.md).
fuzz_flags=(-s none)

started=$(date +%s)
echo "building fuzz targets..."
cargo fuzz build "${fuzz_flags[@]}"
echo "build took $(( $(date +%s) - started )) s"

if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p logs
tmp_corpus=""
if [[ $smoke -eq 1 ]]; then
  tmp_corpus=$(mktemp -d)
  trap 'rm -rf "$tmp_corpus"' EXIT
fi

dict_for() {
  case "$1" in
    mqtt_*) echo "-dict=dicts/mqtt.dict" ;;
    http_*|json_models|twin_patch|sas_token) echo "-dict=dicts/json.dict" ;;
    *) echo "" ;;
  esac
}

run_one() {
  local t="$1" corpus log
  if [[ -n "$tmp_corpus" ]]; then corpus="$tmp_corpus/$t"; else corpus="corpus/$t"; fi
  mkdir -p "$corpus" "artifacts/$t" "seeds/$t"
  log="logs/$t.log"
  local dict
  dict=$(dict_for "$t")
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: runaway memory is a finding.
  if nice -n 19 cargo fuzz run "${fuzz_flags[@]}" "$t" "$corpus" "seeds/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=16384 \
      -print_final_stats=1 -artifact_prefix="artifacts/$t/" $dict >"$log" 2>&1; then
    local execs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    echo "ok   $t: ${seconds} s, $execs executions, corpus $(find "$corpus" -type f | wc -l) inputs"
  else
    echo "FAIL $t: see fuzz/$log and fuzz/artifacts/$t/"
    return 1
  fi
}

failed=0
running=0
for t in "${targets[@]}"; do
  if [[ $jobs -le 1 ]]; then
    run_one "$t" || failed=1
  else
    run_one "$t" &
    running=$((running + 1))
    if [[ $running -ge $jobs ]]; then
      wait -n || failed=1
      running=$((running - 1))
    fi
  fi
done
while [[ $running -gt 0 ]]; do
  wait -n || failed=1
  running=$((running - 1))
done
echo "fuzz.sh finished in $(( $(date +%s) - started )) s"
exit $failed
