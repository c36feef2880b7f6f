# Sourced by scripts/run.sh and scripts/bench-postgres.sh: a throwaway PostgreSQL 15
# cluster on a free loopback port. PostgreSQL refuses to run as root, so the cluster
# belongs to the `postgres` system user. Sets pgdir, pgport; defines pg_stop and
# superuser (psql as the superuser over the cluster's Unix socket).
pgbin=/usr/lib/postgresql/15/bin

pg_start() {
    pgdir=$(mktemp -d /tmp/airlock-pg.XXXXXX)
    chown postgres:postgres "$pgdir"
    pgport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    runuser -u postgres -- "$pgbin/initdb" -D "$pgdir/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 >/dev/null
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
        -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1 $*" start >/dev/null
}

pg_stop() {
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$pgdir"
}

superuser() {
    runuser -u postgres -- psql -X -q -h "$pgdir" -p "$pgport" -v ON_ERROR_STOP=1 "$@"
}
