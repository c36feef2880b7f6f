#!/usr/bin/env bash
# pgbench -S (-c 8 -j 2) against one throwaway PostgreSQL 15, side by side in one run:
# direct, through pgbouncer in session mode, and through Airlock with policy, masking
# and a durable record of every statement; for each query mode (simple, extended,
# prepared).
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
gateways=()
cleanup() {
    for g in "${gateways[@]}"; do kill "$g" 2>/dev/null || true; done
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

# Airlock: the example bundle, the bench database as a target, one agent, one grant;
# one gateway per durability mode (strict, batched).
"$airlock" bundle keygen --out "$work/keys" >/dev/null
"$airlock" bundle sign example-policies --key "$work/keys/bundle-signing.key" --version 1 --out "$work/bundle" >/dev/null
# start_gateway DURABILITY: sets gw_port, gw_user, gw_secret.
start_gateway() {
    local data=$work/$1 api
    mkdir -m 700 "$data"
    api=$(free_port)
    gw_port=$(free_port)
    cat > "$data/airlock.toml" <<TOML
[agent-api]
listen = "127.0.0.1:$api"
requests-per-minute = 100000
[postgres]
listen = "127.0.0.1:$gw_port"
[record]
durability = "$1"
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
    "$airlock" --data "$data" bundle install "$work/bundle" >/dev/null
    AIRLOCK_LOG=warn "$airlock" --data "$data" serve 2>"$data/gateway.log" &
    gateways+=($!)
    for _ in $(seq 100); do [ -S "$data/admin.sock" ] && break; sleep 0.1; done
    local token grant
    token=$("$airlock" --data "$data" agent add bench | tail -n 1)
    grant=$(curl -s -X POST "http://127.0.0.1:$api/v1/grants" -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
        -d '{"target":"bench","task":"benchmark read-only queries","access":"read","ttl":"10m"}')
    gw_user=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
    gw_secret=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
}
start_gateway strict
strict=("$gw_port" "$gw_user" "$gw_secret")
start_gateway batched
batched=("$gw_port" "$gw_user" "$gw_secret")

run() {
    local label=$1 mode=$2 port=$3 user=$4 pass=$5 db=$6 out tps lat
    out=$(PGPASSWORD=$pass pgbench -S -M "$mode" -c 8 -j 2 -T "$secs" -n -h 127.0.0.1 -p "$port" -U "$user" "$db" 2>&1)
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
    [ -n "$tps" ] || { echo "$label $mode failed:"; echo "$out"; exit 1; }
    echo "$label $mode $tps $lat"
}
echo "pgbench -S -c 8 -j 2 -T $secs, scale 10, PostgreSQL 15, $(nproc) cores"
results=()
for mode in simple extended prepared; do
    results+=("$(run direct "$mode" "$pgport" bench "$password" bench)")
    results+=("$(run pgbouncer "$mode" "$bport" bench "$password" bench)")
    results+=("$(run airlock-strict "$mode" "${strict[@]}" bench)")
    results+=("$(run airlock-batched "$mode" "${batched[@]}" bench)")
done
statements=0
for mode in strict batched; do
    n=$("$airlock" --data "$work/$mode" sessions list |
        python3 -c 'import json,sys; print(sum(s["statements"] for s in json.load(sys.stdin)))')
    statements=$((statements + n))
done
python3 - "$statements" "${results[@]}" <<'PY'
import sys
print("| mode | path | TPS | avg latency | ratio to direct |")
print("| --- | --- | ---: | ---: | ---: |")
base = {}
for row in sys.argv[2:]:
    name, mode, tps, lat = row.split()
    base.setdefault(mode, float(tps))
    print(f"| {mode} | {name} | {float(tps):,.0f} | {lat} ms | {float(tps) / base[mode]:.2f} |")
print(f"statements Airlock checked and recorded during its runs: {sys.argv[1]}")
PY
