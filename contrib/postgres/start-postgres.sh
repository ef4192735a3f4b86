#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server from Debian's packages for the tests that run
# against a PostgreSQL catalog (KEEPFS_TEST_POSTGRES), and prints that variable's value.
#   PG_DIR   its data, socket and log (default /tmp/keepfs-pg); removed by stop-postgres.sh
#   PG_PORT  the TCP port on 127.0.0.1 (default 55433)
# Password authentication (scram-sha-256) for user keepfs, password keepfs-test, who may
# create databases (each test repository gets its own). As root the server runs as the
# postgres user (PostgreSQL refuses to run as root).
set -euo pipefail
PG_DIR=${PG_DIR:-/tmp/keepfs-pg}
PG_PORT=${PG_PORT:-55433}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ]; then
    echo "start-postgres: no PostgreSQL server installed (apt-get install postgresql)" >&2
    exit 1
fi
as_pg=()
if [ "$(id -u)" = 0 ]; then
    as_pg=(runuser -u postgres --)
fi
rm -rf "$PG_DIR"
mkdir -p "$PG_DIR"
[ "$(id -u)" != 0 ] || chown postgres "$PG_DIR"
"${as_pg[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres -A trust >"$PG_DIR/initdb.log" 2>&1
cat >"$PG_DIR/data/pg_hba.conf" <<HBA
local all all trust
host all all 127.0.0.1/32 scram-sha-256
HBA
# fsync off: a test server's data is thrown away; durability is not what is tested here.
"${as_pg[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
"${as_pg[@]}" "$bin/psql" -q -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE keepfs LOGIN CREATEDB PASSWORD 'keepfs-test'"
echo "postgresql://keepfs:keepfs-test@127.0.0.1:$PG_PORT/"
