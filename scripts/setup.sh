#!/usr/bin/env bash
# Installs what building and testing Airlock needs on a fresh machine. Idempotent.
set -euo pipefail
rustup target add wasm32-unknown-unknown >/dev/null
cd "$(dirname "$0")/.."
cargo build --release --locked -p airlock-gateway --bin airlock
