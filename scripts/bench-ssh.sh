#!/usr/bin/env bash
# SSH through Airlock against OpenSSH direct, side by side in one run, on loopback:
# bulk transfer (scp of a SIZE-MiB file, download and upload, MB/s) and command latency
# (`ssh host true` COUNT times on fresh connections and over one multiplexed
# connection, p50 and p99). Airlock runs the example bundle (ssh-allowlist, pii-mask on
# exec output) with a strict (fsync'd) record of every request and SFTP operation.
#
#   scripts/bench-ssh.sh [SIZE-MiB] [COUNT]   (defaults 256, 200)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-256}
count=${2:-200}
scripts/setup.sh >/dev/null
scripts/build-policies.sh >/dev/null
airlock=$PWD/target/release/airlock
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/airlock-bench-ssh.XXXXXX)
chmod 711 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ssh -S "$work/ctl-direct" -O exit x 2>/dev/null || true
    ssh -S "$work/ctl-airlock" -O exit x 2>/dev/null || true
    sshd_stop
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# The upstream: a throwaway sshd, one unprivileged account, key only.
. scripts/throwaway-sshd.sh
sshd_start
user=$sshd_user
sport=$sshd_port
files=$work/files
mkdir "$files"
head -c $((size << 20)) /dev/urandom > "$files/blob"
chown -R "$user:$user" "$files"
echo "[127.0.0.1]:$sport $sshd_host_key" > "$work/known_hosts"

# Airlock in front of it.
"$airlock" bundle keygen --out "$work/keys" >/dev/null
"$airlock" bundle sign example-policies --key "$work/keys/bundle-signing.key" --version 1 --out "$work/bundle" >/dev/null
data=$work/data
mkdir -m 700 "$data"
api=$(free_port)
gport=$(free_port)
cat > "$data/airlock.toml" <<TOML
[agent-api]
listen = "127.0.0.1:$api"
requests-per-minute = 100000
[postgres]
listen = "127.0.0.1:0"
[ssh]
listen = "127.0.0.1:$gport"
[policy]
trusted-keys = ["$work/keys/bundle-signing.key.pub"]
[[target]]
name = "web"
kind = "ssh"
upstream = "ssh://$user@127.0.0.1:$sport"
host-key = "$sshd_host_key"
credential = "secret:web"
labels = { env = "staging", ssh-allow = "true", sftp-read = "$files/**", sftp-write = "$files/**", sftp-unmasked = "allow" }
TOML
(umask 077 && printf "web = '''\n%s\n'''\n" "$(cat "$sshd_client_key")" > "$data/secrets.toml")
"$airlock" --data "$data" bundle install "$work/bundle" >/dev/null
AIRLOCK_LOG=warn "$airlock" --data "$data" serve 2>"$data/gateway.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$data/admin.sock" ] && [ -f "$data/endpoints.json" ] && break; sleep 0.1; done
token=$("$airlock" --data "$data" agent add bench | tail -n 1)
grant=$(curl -s -X POST "http://127.0.0.1:$api/v1/grants" -H "Authorization: Bearer $token" -H "Content-Type: application/json" \
    -d '{"target":"web","task":"benchmark bulk transfer and command latency","access":"write","ttl":"30m"}')
gid=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
gsecret=$(echo "$grant" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
gkey=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ssh_host_key"])' "$data/endpoints.json")
echo "[127.0.0.1]:$gport $gkey" >> "$work/known_hosts"
printf '#!/bin/sh\necho %s\n' "$gsecret" > "$work/askpass"
chmod 700 "$work/askpass"

common=(-F /dev/null -o UserKnownHostsFile="$work/known_hosts" -o StrictHostKeyChecking=yes -o BatchMode=no)
direct_opts=("${common[@]}" -i "$sshd_client_key" -o PreferredAuthentications=publickey)
airlock_opts=("${common[@]}" -o PreferredAuthentications=password -o PubkeyAuthentication=no)
export SSH_ASKPASS=$work/askpass SSH_ASKPASS_REQUIRE=force
now() { date +%s.%N; }

# scp_rate LABEL DIRECTION PORT DEST OPTS...: MB/s of one scp.
scp_rate() {
    local label=$1 direction=$2 port=$3 dest=$4 start end
    shift 4
    rm -f "$work/local-blob" "$files/up-blob"
    start=$(now)
    if [ "$direction" = down ]; then
        scp -q "$@" -P "$port" "$dest:$files/blob" "$work/local-blob"
        cmp -s "$work/local-blob" "$files/blob" || { echo "$label: download differs"; exit 1; }
    else
        scp -q "$@" -P "$port" "$files/blob" "$dest:$files/up-blob"
        cmp -s "$files/up-blob" "$files/blob" || { echo "$label: upload differs"; exit 1; }
    fi
    end=$(now)
    python3 -c "print('$label $direction %.1f' % ($size * 1.048576 / ($end - $start)))"
}

# latencies LABEL PORT DEST OPTS...: per-command wall times in ms, one per line.
latencies() {
    local port=$1 dest=$2 start end
    shift 2
    for _ in $(seq "$count"); do
        start=$(now)
        ssh "$@" -p "$port" "$dest" true
        end=$(now)
        python3 -c "print(($end - $start) * 1000)"
    done
}

echo "scp of $size MiB, ssh true x$count; OpenSSH $(ssh -V 2>&1 | cut -d, -f1), $(nproc) cores, loopback"
results=()
for direction in down up; do
    results+=("$(scp_rate direct "$direction" "$sport" "$user@127.0.0.1" "${direct_opts[@]}")")
    results+=("$(scp_rate airlock "$direction" "$gport" "$gid@127.0.0.1" "${airlock_opts[@]}")")
done
latencies "$sport" "$user@127.0.0.1" "${direct_opts[@]}" > "$work/lat-direct"
latencies "$gport" "$gid@127.0.0.1" "${airlock_opts[@]}" > "$work/lat-airlock"
# One multiplexed connection each: the per-command cost without the handshake.
ssh "${direct_opts[@]}" -p "$sport" -o ControlMaster=yes -o ControlPath="$work/ctl-direct" -o ControlPersist=300 -fN "$user@127.0.0.1"
ssh "${airlock_opts[@]}" -p "$gport" -o ControlMaster=yes -o ControlPath="$work/ctl-airlock" -o ControlPersist=300 -fN "$gid@127.0.0.1"
latencies "$sport" "$user@127.0.0.1" "${direct_opts[@]}" -o ControlPath="$work/ctl-direct" > "$work/lat-direct-mux"
latencies "$gport" "$gid@127.0.0.1" "${airlock_opts[@]}" -o ControlPath="$work/ctl-airlock" > "$work/lat-airlock-mux"
requests=$("$airlock" --data "$data" audit tail -n 100000 | grep -c '"kind":"ssh.request"' || true)

python3 - "$work" "$requests" "${results[@]}" <<'PY'
import sys
work, requests, rows = sys.argv[1], sys.argv[2], sys.argv[3:]
rate = {}
for row in rows:
    label, direction, mbs = row.split()
    rate[(label, direction)] = float(mbs)
print("| bulk (scp) | direct MB/s | Airlock MB/s | Airlock / direct |")
print("| --- | --- | --- | --- |")
for d, name in (("down", "download"), ("up", "upload")):
    a, b = rate[("direct", d)], rate[("airlock", d)]
    print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
print()
print("| `ssh host true` | direct p50 / p99 ms | Airlock p50 / p99 ms | added p50 ms |")
print("| --- | --- | --- | --- |")
for suffix, name in (("", "new connection each"), ("-mux", "one multiplexed connection")):
    d = [float(x) for x in open(f"{work}/lat-direct{suffix}")]
    a = [float(x) for x in open(f"{work}/lat-airlock{suffix}")]
    print(f"| {name} | {pct(d, 50):.1f} / {pct(d, 99):.1f} | {pct(a, 50):.1f} / {pct(a, 99):.1f} | {pct(a, 50) - pct(d, 50):.1f} |")
print()
print(f"Airlock recorded {requests} channel requests (strict durability).")
PY
