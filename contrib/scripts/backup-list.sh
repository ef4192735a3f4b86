#!/bin/sh
# Backs up every image a list names, then applies retention to each name: what
# keepfs-backup.service runs every night.
#
#   backup-list.sh LIST
#
# LIST has one "SOURCE NAME" a line (file:///dev/vg0/db db); blank lines and lines
# starting with # are skipped. Environment:
#   KEEPFS_RETENTION     rules for `keepfs enforce` (default latest7,days30,months12)
#   KEEPFS_BACKUP_OPTS   more options for every `keepfs backup` (e.g. "-l daily")
#   KEEPFS_METRICS_FILE  write the metrics textfile after each name (node exporter)
#   KEEPFS               the keepfs command (default: keepfs on PATH)
# An image that fails does not stop the others; the exit code is then 1 (or 3 when
# keepfs found damaged data). A retention that refuses (a version in use) is not a
# failure of the backup: its exit code 4 is reported, the run goes on.
set -u
list=${1:?usage: backup-list.sh LIST}
keepfs=${KEEPFS:-keepfs}
rules=${KEEPFS_RETENTION:-latest7,days30,months12}
[ -r "$list" ] || { echo "backup-list: cannot read $list" >&2; exit 2; }
if [ -n "${KEEPFS_METRICS_FILE:-}" ]; then set -- --metrics-file "$KEEPFS_METRICS_FILE"; else set --; fi
status=0
n=0
while read -r source name extra; do
    case "$source" in '' | '#'*) continue ;; esac
    n=$((n + 1))
    if [ -z "${name:-}" ] || [ -n "${extra:-}" ]; then
        echo "backup-list: $list: want \"SOURCE NAME\", got: $source ${name:-} ${extra:-}" >&2
        status=2
        continue
    fi
    # shellcheck disable=SC2086
    if "$keepfs" backup ${KEEPFS_BACKUP_OPTS:-} "$source" "$name" "$@" </dev/null; then
        "$keepfs" enforce "$rules" "name == \"$name\"" "$@" </dev/null
        rc=$?
        [ "$rc" = 0 ] || echo "backup-list: retention of $name: exit code $rc" >&2
    else
        rc=$?
        echo "backup-list: backup of $name from $source failed (exit code $rc)" >&2
        [ "$status" = 3 ] || status=$rc
    fi
done <"$list"
[ "$n" -gt 0 ] || echo "backup-list: $list names no image" >&2
exit "$status"
