# Sourced by scripts/run.sh and scripts/bench-ssh.sh: a throwaway OpenSSH sshd on a
# free loopback port. It runs as root (an sshd that is not root cannot give a session a
# terminal) and lets in one unprivileged account, airlock-ssh, by key only. Sets
# sshd_dir, sshd_port, sshd_user, sshd_host_key (the `ssh-ed25519 AAAA…` a target pins)
# and sshd_client_key (the private key file the gateway logs in with); defines
# sshd_stop.
sshd_user=airlock-ssh

sshd_start() {
    id "$sshd_user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$sshd_user"
    usermod -p '*' "$sshd_user"
    mkdir -p /run/sshd
    sshd_dir=$(mktemp -d /tmp/airlock-sshd.XXXXXX)
    chmod 711 "$sshd_dir"
    ssh-keygen -q -t ed25519 -N '' -f "$sshd_dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$sshd_dir/client_key"
    cp "$sshd_dir/client_key.pub" "$sshd_dir/authorized_keys"
    sshd_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat > "$sshd_dir/sshd_config" <<CONF
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $sshd_dir/host_key
PidFile $sshd_dir/sshd.pid
AuthorizedKeysFile $sshd_dir/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $sshd_user
Subsystem sftp internal-sftp
MaxStartups 100
MaxSessions 100
CONF
    /usr/sbin/sshd -f "$sshd_dir/sshd_config" -E "$sshd_dir/sshd.log"
    for _ in $(seq 100); do [ -f "$sshd_dir/sshd.pid" ] && break; sleep 0.1; done
    sshd_host_key=$(cut -d' ' -f1,2 "$sshd_dir/host_key.pub")
    sshd_client_key=$sshd_dir/client_key
}

sshd_stop() {
    [ -n "${sshd_dir:-}" ] || return 0
    [ -f "$sshd_dir/sshd.pid" ] && kill "$(cat "$sshd_dir/sshd.pid")" 2>/dev/null || true
    rm -rf "$sshd_dir"
}
