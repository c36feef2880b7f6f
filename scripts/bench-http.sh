#!/usr/bin/env bash
# HTTP through Airlock against the upstream direct and against nginx as a keep-alive
# reverse proxy, side by side in one run, on loopback: wrk against a small static JSON
# response (nginx `return 200`), at 1 and 50 connections, requests/s and latency
# percentiles. Airlock runs the example bundle (http-allowlist decides each request;
# pii-mask applies to HTTP targets, so each JSON response is masked) and records every
# request and result, once per durability mode (strict: fsync'd before the answer is
# released; batched: queued before the request is sent). The static response is the
# same every time, so a session masks it once a second (its masked-body cache); the
# `fresh` rows ask for a body that differs in every response, masked every time.
#
#   scripts/bench-http.sh [SECONDS]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
scripts/setup.sh >/dev/null
scripts/build-policies.sh >/dev/null
airlock=$PWD/target/release/airlock
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/airlock-bench-http.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    sleep 0.2
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The upstream and the peer: one nginx, a static response on one port and a keep-alive
# reverse proxy to it on another.
origin=$(free_port)
proxy=$(free_port)
body='{"id":42,"status":"shipped","items":3}'
cat > "$work/nginx.conf" <<NGINX
user root;
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    keepalive_requests 1000000;
    upstream origin { server 127.0.0.1:$origin; keepalive 64; }
    server {
        listen 127.0.0.1:$origin;
        location / { default_type application/json; return 200 '$body'; }
        # A body no two responses share: every one is masked afresh.
        location /fresh/ { default_type application/json; return 200 '{"id":42,"request":"\$request_id"}'; }
    }
    server {
        listen 127.0.0.1:$proxy;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
NGINX
nginx -c "$work/nginx.conf" -g 'daemon on;'
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$origin/" >/dev/null && break; sleep 0.1; done

# Airlock in front of the origin, once per durability mode.
"$airlock" bundle keygen --out "$work/keys" >/dev/null
"$airlock" bundle sign example-policies --key "$work/keys/bundle-signing.key" --version 1 --out "$work/bundle" >/dev/null
start_gateway() {
    local mode=$1 data=$work/data-$1 api http
    mkdir -m 700 "$data"
    api=$(free_port)
    http=$(free_port)
    cat > "$data/airlock.toml" <<TOML
[agent-api]
listen = "127.0.0.1:$api"
requests-per-minute = 100000
[postgres]
listen = "127.0.0.1:0"
[ssh]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:$http"
[record]
durability = "$mode"
[policy]
trusted-keys = ["$work/keys/bundle-signing.key.pub"]
[[target]]
name = "orders"
kind = "http"
upstream = "http://127.0.0.1:$origin"
credential = "secret:orders"
labels = { env = "staging" }
TOML
    (umask 077 && printf 'orders = "upstream-token"\n' > "$data/secrets.toml")
    "$airlock" --data "$data" bundle install "$work/bundle" >/dev/null
    AIRLOCK_LOG=warn "$airlock" --data "$data" serve 2>"$data/gateway.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$data/admin.sock" ] && [ -f "$data/endpoints.json" ] && break; sleep 0.1; done
    local token grant
    token=$("$airlock" --data "$data" agent add bench | tail -n 1)
    grant=$(curl -s -X POST "http://127.0.0.1:$api/v1/grants" -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
        -d '{"target":"orders","task":"benchmark requests through the gateway","access":"read","ttl":"30m"}')
    echo "$http $(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connection"]["token"])')" > "$work/$mode.gateway"
}
start_gateway strict
start_gateway batched
read -r strict_port strict_token < "$work/strict.gateway"
read -r batched_port batched_token < "$work/batched.gateway"
curl -sf -H "Authorization: Bearer $strict_token" "http://127.0.0.1:$strict_port/orders/42" | grep -q shipped

# run LABEL CONNECTIONS URL [TOKEN]: one wrk run, as "LABEL C req/s p50-ms p99-ms".
run() {
    local label=$1 c=$2 url=$3 token=${4:-} threads=1 header=()
    [ "$c" -gt 1 ] && threads=2
    [ -n "$token" ] && header=(-H "Authorization: Bearer $token")
    wrk -t"$threads" -c"$c" -d"${seconds}s" --latency "${header[@]}" "$url" > "$work/wrk.out"
    python3 - "$label" "$c" "$work/wrk.out" <<'PY' || { cat "$work/wrk.out" >&2; exit 1; }
import re, sys
label, c, path = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read()
def ms(value):
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    sys.exit(f"{label} c={c}: {errors.group(1)} failed responses")
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
print(label, c, rps, p50, p99)
PY
}

echo "wrk ${seconds}s per run; nginx $(nginx -v 2>&1 | cut -d/ -f2), $(nproc) cores, loopback"
rows=()
for c in 1 50; do
    rows+=("$(run direct "$c" "http://127.0.0.1:$origin/orders/42")")
    rows+=("$(run nginx "$c" "http://127.0.0.1:$proxy/orders/42")")
    rows+=("$(run airlock-strict "$c" "http://127.0.0.1:$strict_port/orders/42" "$strict_token")")
    rows+=("$(run airlock-batched "$c" "http://127.0.0.1:$batched_port/orders/42" "$batched_token")")
    rows+=("$(run airlock-batched-fresh "$c" "http://127.0.0.1:$batched_port/fresh/42" "$batched_token")")
done
requests=$("$airlock" --data "$work/data-strict" audit tail -n 10000000 | grep -c '"kind":"http.request"' || true)

python3 - "$requests" "${rows[@]}" <<'PY'
import sys
requests, rows = sys.argv[1], sys.argv[2:]
runs = {}
for row in rows:
    label, c, rps, p50, p99 = row.split()
    runs[(label, c)] = (float(rps), float(p50), float(p99))
print("| path | conns | req/s | ratio to direct | p50 ms | p99 ms | p50 added vs direct |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for c in ("1", "50"):
    direct = runs[("direct", c)]
    for label in ("direct", "nginx", "airlock-strict", "airlock-batched", "airlock-batched-fresh"):
        rps, p50, p99 = runs[(label, c)]
        added = (p50 - direct[1]) * 1000
        print(f"| {label} | {c} | {rps:,.0f} | {rps / direct[0]:.2f}x | {p50:.3f} | {p99:.3f} | {added:+.0f} µs |")
for c in ("1", "50"):
    nginx = runs[("nginx", c)][0]
    for label in ("airlock-strict", "airlock-batched", "airlock-batched-fresh"):
        print(f"c={c}: {label} / nginx = {runs[(label, c)][0] / nginx:.2f}x")
print(f"http.request entries in the strict gateway's record: {requests}")
PY
