#!/usr/bin/env bash
# Stops the server start-postgres.sh started and removes its directory.
set -uo pipefail
PG_DIR=${PG_DIR:-/tmp/keepfs-pg}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
as_pg=()
if [ "$(id -u)" = 0 ]; then
    as_pg=(runuser -u postgres --)
fi
[ -z "$bin" ] || [ ! -d "$PG_DIR/data" ] || "${as_pg[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null
rm -rf "$PG_DIR"
