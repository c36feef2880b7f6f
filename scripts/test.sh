#!/usr/bin/env bash
# Sets up a fresh machine and runs every check and test: formatting, clippy, the
# example policies' fixtures, unit tests and the end-to-end tests (real binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
scripts/build-policies.sh
cargo test --release --locked --workspace
