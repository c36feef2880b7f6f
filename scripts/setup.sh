#!/usr/bin/env bash
# Installs what building and testing Airlock needs on a fresh machine. Idempotent.
set -euo pipefail

# Debian packages: libclang-dev and protobuf-compiler to build pg_query; PostgreSQL 15 and pgbouncer
# for the tests and the benchmark; curl and openssl as the tests' real clients; OpenSSH's sshd,
# ssh, scp and sftp for the SSH gateway's tests; python3 for the HTTP tests' upstream and, with
# python3-venv, the MCP tests' client; nginx and wrk for the HTTP benchmark.
packages="libclang-dev protobuf-compiler postgresql-15 postgresql-client-15 pgbouncer curl openssl util-linux openssh-server openssh-client python3 python3-venv nginx-light wrk"
missing=""
for p in $packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing
fi

rustup target add wasm32-unknown-unknown >/dev/null
cd "$(dirname "$0")/.."

# The MCP tests' client: the official Python MCP SDK, in a virtual environment of the
# project's own.
if ! target/mcp-venv/bin/python -c "import mcp" 2>/dev/null; then
    python3 -m venv target/mcp-venv
    target/mcp-venv/bin/pip install -q --disable-pip-version-check "mcp==2.3.0"
fi
cargo build --release --locked -p airlock-gateway --bin airlock
