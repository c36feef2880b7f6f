#!/usr/bin/env bash
# The main job, on a fresh machine: build the gateway and the example policies, make a
# dev signing key, sign the example bundle, install it into a gateway data directory,
# and run the bundle's fixtures through the installed policy set.
#
#   AIRLOCK_DATA   the gateway's data directory (default: ./.airlock-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-policies.sh

export AIRLOCK_DATA=${AIRLOCK_DATA:-$PWD/.airlock-dev}
airlock=target/release/airlock
mkdir -p "$AIRLOCK_DATA" && chmod 700 "$AIRLOCK_DATA"
keys="$AIRLOCK_DATA/dev-keys"
if [ ! -f "$keys/bundle-signing.key" ]; then
    "$airlock" bundle keygen --out "$keys"
fi
if [ ! -f "$AIRLOCK_DATA/airlock.toml" ]; then
    cat > "$AIRLOCK_DATA/airlock.toml" <<TOML
# Development configuration written by scripts/run.sh.
[policy]
trusted-keys = ["$keys/bundle-signing.key.pub"]
TOML
    chmod 600 "$AIRLOCK_DATA/airlock.toml"
fi

# Versions must only increase: seconds since the epoch do.
version=$(date +%s)
bundle="$AIRLOCK_DATA/signed/example-v$version"
"$airlock" bundle sign example-policies --key "$keys/bundle-signing.key" --version "$version" --out "$bundle"
"$airlock" bundle verify "$bundle" --trust "$keys/bundle-signing.key.pub"
"$airlock" bundle install "$bundle"
"$airlock" bundle status
"$airlock" policy test "$AIRLOCK_DATA/policy/current" example-policies/bundle-fixtures
