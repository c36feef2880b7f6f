#!/usr/bin/env bash
# Builds every example policy into example-policies/build/NAME.wasm with the real
# `airlock policy build`, and runs each one's fixtures through the real host.
set -euo pipefail
cd "$(dirname "$0")/.."
airlock=target/release/airlock
mkdir -p example-policies/build
for crate in example-policies/*/; do
    name=$(basename "$crate")
    [ -f "$crate/Cargo.toml" ] || continue
    "$airlock" policy build "$crate" --out "example-policies/build/$name.wasm"
    "$airlock" policy test "example-policies/build/$name.wasm" "$crate/fixtures"
done
