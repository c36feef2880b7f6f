#!/usr/bin/env bash
# The main job, on a fresh machine: build the gateway and the example policies, make a
# dev signing key, sign the example bundle, install it into a gateway data directory,
# run the bundle's fixtures, then start the gateway (`airlock serve`) with a demo agent
# and print the request to try. Ctrl-C stops it.
#
#   AIRLOCK_DATA   the gateway's data directory (default: ./.airlock-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-policies.sh

export AIRLOCK_DATA=${AIRLOCK_DATA:-$PWD/.airlock-dev}
airlock=$PWD/target/release/airlock
mkdir -p "$AIRLOCK_DATA" && chmod 700 "$AIRLOCK_DATA"
keys="$AIRLOCK_DATA/dev-keys"
if [ ! -f "$keys/bundle-signing.key" ]; then
    "$airlock" bundle keygen --out "$keys"
fi
if [ ! -f "$AIRLOCK_DATA/airlock.toml" ]; then
    cat > "$AIRLOCK_DATA/airlock.toml" <<TOML
# Development configuration written by scripts/run.sh.
[agent-api]
listen = "127.0.0.1:7070"

[policy]
trusted-keys = ["$keys/bundle-signing.key.pub"]

[[target]]
name = "prod-db"
kind = "postgres"
upstream = "127.0.0.1:5432"
labels = { env = "prod" }
credential = "secret:prod-db"
TOML
    chmod 600 "$AIRLOCK_DATA/airlock.toml"
fi
if [ ! -f "$AIRLOCK_DATA/secrets.toml" ]; then
    # The gateway's upstream credentials, never the agent's (a placeholder until the
    # PostgreSQL gateway exists).
    (umask 077 && echo 'prod-db = "dev-placeholder"' > "$AIRLOCK_DATA/secrets.toml")
fi

# Versions must only increase: seconds since the epoch do.
version=$(date +%s)
bundle="$AIRLOCK_DATA/signed/example-v$version"
"$airlock" bundle sign example-policies --key "$keys/bundle-signing.key" --version "$version" --out "$bundle"
"$airlock" bundle verify "$bundle" --trust "$keys/bundle-signing.key.pub"
"$airlock" bundle install "$bundle"
"$airlock" bundle status
"$airlock" policy test "$AIRLOCK_DATA/policy/current" example-policies/bundle-fixtures

"$airlock" serve &
gateway=$!
trap 'kill $gateway 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 100); do
    [ -S "$AIRLOCK_DATA/admin.sock" ] && break
    sleep 0.1
done
agent="demo-$(date +%s)"
token=$("$airlock" agent add "$agent" --label team=demo | tail -n 1)
cat <<MESSAGE

The gateway is running: agent API on http://127.0.0.1:7070, admin socket in $AIRLOCK_DATA.
Agent "$agent" is enrolled. Ask for a grant as that agent:

  curl -s -X POST http://127.0.0.1:7070/v1/grants \\
       -H "Authorization: Bearer $token" \\
       -d '{"target":"prod-db","task":"confirm migration 42 ran","access":"read","ttl":"10m"}'

Ask for access=write instead and the policy sends it to review; approve it as the operator:

  AIRLOCK_DATA=$AIRLOCK_DATA $airlock grants list
  AIRLOCK_DATA=$AIRLOCK_DATA $airlock grants approve GRANT_ID
  AIRLOCK_DATA=$AIRLOCK_DATA $airlock audit verify

Ctrl-C stops the gateway.
MESSAGE
wait "$gateway"
