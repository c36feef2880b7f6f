#!/usr/bin/env bash
# The main job, on a fresh machine: build the gateway and the example policies, make a
# dev signing key, sign the example bundle, install it into a gateway data directory,
# run the bundle's fixtures, start a throwaway PostgreSQL 15 with a small schema holding
# PII, a throwaway OpenSSH sshd with a log holding PII and a throwaway JSON service
# (the HTTP tests' upstream), start the gateway (`airlock serve`) in front of them with a
# demo agent, and print the exact `airlock connect` lines to try. Ctrl-C stops
# everything.
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
# A throwaway PostgreSQL 15 with a small schema holding PII.
. scripts/throwaway-pg.sh
pg_start
upstream_password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
# A throwaway sshd: one account, airlock-ssh, which only the gateway's key logs in.
. scripts/throwaway-sshd.sh
cleanup() {
    [ -n "${gateway:-}" ] && kill "$gateway" 2>/dev/null || true
    [ -n "${orders:-}" ] && kill "$orders" 2>/dev/null || true
    pg_stop
    sshd_stop
}
trap cleanup EXIT INT TERM
sshd_start
# A throwaway JSON service (records with PII), which only the gateway's token reaches.
orders_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 tests/e2e/http_upstream.py "$orders_port" "$AIRLOCK_DATA/orders-received.jsonl" &
orders=$!
orders_token=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
mkdir -p "$sshd_dir/logs"
printf 'login ok for alice@example.com from 10.0.0.7\npayment retried for bob.chen@example.org\n' > "$sshd_dir/logs/app.log"
chown -R "$sshd_user:$sshd_user" "$sshd_dir/logs"
superuser -d postgres -c "CREATE ROLE airlock LOGIN PASSWORD '$upstream_password'"
# The role that ends a grant's backends: apart from the agents' one (README, "A grant's
# end reaches the server").
end_password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
superuser -d postgres -c "CREATE ROLE airlock_end LOGIN PASSWORD '$end_password'"
superuser -d postgres -c "GRANT pg_signal_backend TO airlock_end"
superuser -d postgres -c "CREATE DATABASE app OWNER airlock"
superuser -d app <<'SQL'
SET ROLE airlock;
CREATE TABLE schema_migrations (id int PRIMARY KEY, name text, applied_at timestamptz DEFAULT now());
INSERT INTO schema_migrations (id, name) VALUES (41, 'add_orders'), (42, 'add_customer_phone');
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, phone text, card_number text);
INSERT INTO customers VALUES
  (1, 'Alice Martin', 'alice@example.com', '+1 (555) 123-4567', '4111 1111 1111 1111'),
  (2, 'Bob Chen', 'bob.chen@example.org', '+44 20 7946 0958', '5500 0000 0000 0004');
SQL

# The gateway's configuration and its own upstream credential (never the agent's).
cat > "$AIRLOCK_DATA/airlock.toml" <<TOML
# Development configuration written by scripts/run.sh.
[agent-api]
listen = "127.0.0.1:7070"

[postgres]
listen = "127.0.0.1:6432"

[ssh]
listen = "127.0.0.1:2222"

[http]
listen = "127.0.0.1:8443"

[policy]
trusted-keys = ["$keys/bundle-signing.key.pub"]

[[target]]
name = "prod-db"
kind = "postgres"
upstream = "postgres://airlock@127.0.0.1:$pgport/app"
labels = { env = "prod" }
credential = "secret:prod-db"
end-as = "postgres://airlock_end@127.0.0.1:$pgport/postgres"
end-credential = "secret:prod-db-end"

[[target]]
name = "web-1"
kind = "ssh"
upstream = "ssh://$sshd_user@127.0.0.1:$sshd_port"
host-key = "$sshd_host_key"
credential = "secret:web-1"
labels = { env = "staging", ssh-allow = "cat $sshd_dir/logs/**", sftp-read = "$sshd_dir/logs/**" }

[[target]]
name = "orders-api"
kind = "http"
upstream = "http://127.0.0.1:$orders_port"
credential = "secret:orders-api"
labels = { env = "staging", http-allow = "GET /users/*; GET /stream; POST /orders" }
TOML
chmod 600 "$AIRLOCK_DATA/airlock.toml"
(umask 077 && printf 'prod-db = "%s"\nprod-db-end = "%s"\n' "$upstream_password" "$end_password" > "$AIRLOCK_DATA/secrets.toml")
(umask 077 && printf "web-1 = '''\n%s\n'''\n" "$(cat "$sshd_client_key")" >> "$AIRLOCK_DATA/secrets.toml")
(umask 077 && printf 'orders-api = "%s"\n' "$orders_token" >> "$AIRLOCK_DATA/secrets.toml")

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
for _ in $(seq 100); do
    [ -S "$AIRLOCK_DATA/admin.sock" ] && break
    sleep 0.1
done
agent="demo-$(date +%s)"
token=$("$airlock" agent add "$agent" --label team=demo | tail -n 1)
cat <<MESSAGE

Airlock is running: agent API http://127.0.0.1:7070, PostgreSQL gateway 127.0.0.1:6432,
SSH gateway 127.0.0.1:2222, HTTP gateway http://127.0.0.1:8443, in front of a throwaway
PostgreSQL 15 (port $pgport), a throwaway sshd (port $sshd_port) and a throwaway JSON
service (port $orders_port) whose credentials only the gateway holds.
Agent "$agent" is enrolled. As that agent, confirm migration 42 ran:

  export AIRLOCK_URL=http://127.0.0.1:7070 AIRLOCK_TOKEN=$token
  $airlock connect prod-db --task "confirm migration 42 ran" -- -c "SELECT * FROM schema_migrations WHERE id = 42"

Then see policy and masking at work:

  $airlock connect prod-db --task "look at the customers table" -- -c "SELECT * FROM customers"
  $airlock connect prod-db --task "look at the customers table" -- -c "UPDATE customers SET name = 'x'"

Over SSH: a log read through the masking module, then a second command smuggled after
a semicolon (denied, and nothing runs):

  $airlock connect web-1 --task "read the app log after the deploy" -- cat $sshd_dir/logs/app.log
  $airlock connect web-1 --task "read the app log after the deploy" -- "cat $sshd_dir/logs/app.log; rm -rf /tmp"

Over HTTP, with curl: a record read through the masking module, then a path outside the
target's rules spelled to look like one inside them (denied as the path it is):

  $airlock connect orders-api --task "look up customer 7 for the refund" -- -s /users/7
  $airlock connect orders-api --task "look up customer 7 for the refund" -- -s --path-as-is /users/../admin

Ask for --access write and the policy sends it to review; approve it as the operator:

  AIRLOCK_DATA=$AIRLOCK_DATA $airlock grants list
  AIRLOCK_DATA=$AIRLOCK_DATA $airlock grants approve GRANT_ID
  AIRLOCK_DATA=$AIRLOCK_DATA $airlock audit tail
  AIRLOCK_DATA=$AIRLOCK_DATA $airlock audit verify

Ctrl-C stops the gateway, the database, sshd and the JSON service.
MESSAGE
wait "$gateway"
