#!/usr/bin/env bash
# Runs the parser properties of tests/properties.rs with many cases: the
# stable-toolchain stand-in for libFuzzer (cargo-fuzz needs nightly, which
# this project's machines cannot install). CI runs the same file with the
# default 256 cases per property as part of `cargo test`.
#
#   scripts/fuzz.sh [CASES]        default 100000 cases per property
#   FUZZ_PROFILE=dev scripts/fuzz.sh 5000   (CI: no release build)
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --profile "${FUZZ_PROFILE:-release}" --locked --test properties -- --test-threads 2
echo "fuzz.sh: $cases cases per property, $(( $(date +%s) - start )) s"
