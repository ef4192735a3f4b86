#!/usr/bin/env bash
# Backs up an LVM logical volume from a snapshot: creates the snapshot, backs it up with
# keepfs, and removes the snapshot again, also when the backup fails or the script is
# interrupted.
#
#   lvm-backup.sh VG/LV NAME [SNAPSHOT_SIZE] [-- KEEPFS_BACKUP_OPTIONS...]
#
# SNAPSHOT_SIZE is the copy-on-write space of the snapshot (lvcreate -L, default 1G):
# what the volume may change while the backup runs. The version gets the snapshot's
# name (keepfs backup -s). Prints the new version uid. Exit code: keepfs's (0, 1, 2, 3,
# 4), or 1 when the snapshot cannot be made. KEEPFS names the keepfs command.
set -euo pipefail
usage() { echo "usage: lvm-backup.sh VG/LV NAME [SNAPSHOT_SIZE] [-- KEEPFS_BACKUP_OPTIONS...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
vglv=$1 name=$2
shift 2
size=1G
if [ $# -gt 0 ] && [ "$1" != "--" ]; then size=$1; shift; fi
if [ $# -gt 0 ]; then [ "$1" = "--" ] || usage; shift; fi
keepfs=${KEEPFS:-keepfs}
vg=${vglv%%/*} lv=${vglv#*/}
[ -n "$vg" ] && [ -n "$lv" ] && [ "$vg" != "$vglv" ] || { echo "lvm-backup: '$vglv' is not VG/LV" >&2; exit 2; }
snap="$lv-keepfs-$(date -u +%Y%m%dT%H%M%S)-$$"

made=""
cleanup() {
    if [ -n "$made" ]; then
        lvremove -f -q "$vg/$snap" >/dev/null || echo "lvm-backup: could not remove the snapshot $vg/$snap: remove it with lvremove" >&2
        made=""
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

lvcreate -q -s -n "$snap" -L "$size" "$vg/$lv" >/dev/null || { echo "lvm-backup: cannot snapshot $vg/$lv" >&2; exit 1; }
made=yes
set +e
"$keepfs" backup -s "$snap" "$@" "file:///dev/$vg/$snap" "$name"
rc=$?
set -e
exit "$rc"
