#!/usr/bin/env bash
# Runs every test Muster has: formatting, lints, Rust unit and integration tests, and the
# interop tests with Microsoft's own SDKs (which install their pinned packages themselves).
#
# Usage: scripts/test.sh [--no-interop]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

interop=1
[[ "${1:-}" == "--no-interop" ]] && interop=0

section() { printf '\n========== %s ==========\n' "$*"; }

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

section "cargo test"
cargo test --workspace --locked

if [[ $interop -eq 1 ]]; then
  section "interop: Microsoft SDKs against a running Muster"
  bash scripts/interop.sh
fi
