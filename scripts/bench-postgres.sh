#!/usr/bin/env bash
# pgbench -S (-c 8 -j 2) against one throwaway PostgreSQL 15, side by side in one run:
# direct, through pgbouncer in session mode, and through Airlock with policy, masking
# and a durable record of every statement. Simple query protocol (-M simple): the one
# Airlock's PostgreSQL gateway speaks so far.
#
#   scripts/bench-postgres.sh [SECONDS-PER-RUN]   (default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
scripts/setup.sh >/dev/null
scripts/build-policies.sh >/dev/null
airlock=$PWD/target/release/airlock
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

. scripts/throwaway-pg.sh
pg_start "-c max_connections=100 -c shared_buffers=256MB"
work=$(mktemp -d /tmp/airlock-bench.XXXXXX)
chmod 700 "$work"
cleanup() {
    [ -n "${gateway:-}" ] && kill "$gateway" 2>/dev/null || true
    [ -f "$pgdir/pgbouncer.pid" ] && kill "$(cat "$pgdir/pgbouncer.pid")" 2>/dev/null || true
    pg_stop
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
superuser -d postgres -c "CREATE ROLE bench LOGIN PASSWORD '$password'"
superuser -d postgres -c "CREATE DATABASE bench OWNER bench"
PGPASSWORD=$password pgbench -i -s 10 -q -h 127.0.0.1 -p "$pgport" -U bench bench >/dev/null 2>&1

# pgbouncer, session mode (it will not run as root: it runs as postgres).
bport=$(free_port)
cat > "$pgdir/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$pgport dbname=bench user=bench password=$password
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = any
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = $pgdir/pgbouncer.log
pidfile = $pgdir/pgbouncer.pid
INI
chown postgres:postgres "$pgdir/pgbouncer.ini"
runuser -u postgres -- pgbouncer -d "$pgdir/pgbouncer.ini"

# Airlock: the example bundle, the bench database as a target, one agent, one grant.
data=$work/data
mkdir -m 700 "$data"
"$airlock" bundle keygen --out "$work/keys" >/dev/null
api=$(free_port)
agw=$(free_port)
cat > "$data/airlock.toml" <<TOML
[agent-api]
listen = "127.0.0.1:$api"
requests-per-minute = 100000
[postgres]
listen = "127.0.0.1:$agw"
[policy]
trusted-keys = ["$work/keys/bundle-signing.key.pub"]
[[target]]
name = "bench"
kind = "postgres"
upstream = "postgres://bench@127.0.0.1:$pgport/bench"
labels = { env = "staging" }
credential = "secret:bench"
TOML
(umask 077 && echo "bench = \"$password\"" > "$data/secrets.toml")
"$airlock" bundle sign example-policies --key "$work/keys/bundle-signing.key" --version 1 --out "$work/bundle" >/dev/null
"$airlock" --data "$data" bundle install "$work/bundle" >/dev/null
AIRLOCK_LOG=warn "$airlock" --data "$data" serve 2>"$work/gateway.log" &
gateway=$!
for _ in $(seq 100); do [ -S "$data/admin.sock" ] && break; sleep 0.1; done
token=$("$airlock" --data "$data" agent add bench | tail -n 1)
grant=$(curl -s -X POST "http://127.0.0.1:$api/v1/grants" -H "Authorization: Bearer $token" \
    -d '{"target":"bench","task":"benchmark read-only queries","access":"read","ttl":"10m"}')
grant_id=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
secret=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

run() {
    local label=$1 port=$2 user=$3 pass=$4 db=$5 out tps lat
    out=$(PGPASSWORD=$pass pgbench -S -M simple -c 8 -j 2 -T "$secs" -n -h 127.0.0.1 -p "$port" -U "$user" "$db" 2>&1)
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
    [ -n "$tps" ] || { echo "$label failed:"; echo "$out"; exit 1; }
    echo "$label $tps $lat"
}
echo "pgbench -S -M simple -c 8 -j 2 -T $secs, scale 10, PostgreSQL 15, $(nproc) cores"
direct=$(run direct "$pgport" bench "$password" bench)
bouncer=$(run pgbouncer "$bport" bench "$password" bench)
air=$(run airlock "$agw" "$grant_id" "$secret" bench)
statements=$("$airlock" --data "$data" audit tail -n 1000000 | grep -c '"sql.statement"' || true)
python3 - "$direct" "$bouncer" "$air" "$statements" <<'PY'
import sys
rows = [a.split() for a in sys.argv[1:4]]
base = float(rows[0][1])
print("| path | TPS | avg latency | ratio to direct |")
print("| --- | ---: | ---: | ---: |")
for name, tps, lat in rows:
    print(f"| {name} | {float(tps):,.0f} | {lat} ms | {float(tps) / base:.2f} |")
print(f"statements recorded durably by Airlock during its run: {sys.argv[4]}")
PY
