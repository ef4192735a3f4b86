#!/usr/bin/env bash
# RBD benchmark: `keepfs backup rbd:POOL/IMG@snap` next to `rbd export POOL/IMG@snap
# /dev/null` of the same snapshot, in the same run, reported as a ratio. The image is
# SIZE_MIB of random data (incompressible, nothing sparse), imported with `rbd import`.
# Also prints `keepfs backup` of the same bytes from a local file (the file pipeline),
# and into a null storage (reading, hashing and compressing only: the source's share).
#
# Cluster: $CEPH_CONF when set (pool rbd must exist), else a throwaway one started with
# contrib/ceph/start-ceph.sh in /tmp/keepfs-rbd-ceph-bench (mon ports 3322/6822) and
# stopped at the end.
#
# usage: contrib/bench/rbd.sh [SIZE_MIB (default 2048)]   (keepfs built with --features rbd:
#        KEEPFS=target/release/keepfs; default: the one on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MIB=${1:-2048}
KEEPFS=${KEEPFS:-keepfs}
WORK=$(mktemp -d /tmp/keepfs-rbd-bench.XXXXXX)
started=""
cleanup() {
    rbd --conf "$CEPH_CONF" snap purge --no-progress "rbd/$IMG" >/dev/null 2>&1 || true
    for i in "$IMG" "$IMG-import" "$IMG-restore"; do
        rbd --conf "$CEPH_CONF" rm --no-progress "rbd/$i" >/dev/null 2>&1 || true
    done
    [ -z "$started" ] || CEPH_DEV_DIR=$started bash contrib/ceph/stop-ceph.sh >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
IMG=bench-$$
trap cleanup EXIT
if [ -z "${CEPH_CONF:-}" ]; then
    started=/tmp/keepfs-rbd-ceph-bench
    CEPH_DEV_DIR=$started CEPH_DEV_MON_PORT=3322 CEPH_DEV_MON_V1_PORT=6822 CEPH_DEV_OSD_PORTS="6830 6899" \
        CEPH_DEV_RGW=0 CEPH_DEV_OSD_SIZE=$((SIZE_MIB * 3 / 1024 + 4))G bash contrib/ceph/start-ceph.sh >"$WORK/ceph.log" 2>&1 \
        || { tail -20 "$WORK/ceph.log" >&2; exit 1; }
    export CEPH_CONF=$started/ceph.conf
fi
RBD() { rbd --conf "$CEPH_CONF" "$@"; }
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.0f", b/s/1e6}'; }

# openssl rand takes at most 2^31-1 bytes at a time: 64 MiB pieces.
for ((i = 0; i < SIZE_MIB; i += 64)); do
    openssl rand $(((SIZE_MIB - i < 64 ? SIZE_MIB - i : 64) << 20))
done >"$WORK/image"
RBD import --no-progress "$WORK/image" "rbd/$IMG"
RBD snap create --no-progress "rbd/$IMG@snap"
BYTES=$((SIZE_MIB << 20))
export KEEPFS_HOME=$WORK/home-rbd
unset KEEPFS_CONFIG

# Same run, alternating: export, keepfs, export, keepfs; the better of two each.
best_export=999999 best_keepfs=999999
for round in 1 2; do
    t0=$(now); RBD export --no-progress "rbd/$IMG@snap" - >/dev/null; t1=$(now)
    e=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
    rm -rf "$KEEPFS_HOME"
    t0=$(now); "$KEEPFS" backup "rbd:rbd/$IMG@snap" bench >/dev/null 2>>"$WORK/keepfs.log"; t1=$(now)
    k=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
    printf 'round %d: rbd export %.2fs (%s MB/s), keepfs backup rbd: %.2fs (%s MB/s)\n' \
        "$round" "$e" "$(mbps $BYTES "$e")" "$k" "$(mbps $BYTES "$k")"
    best_export=$(awk -v a="$best_export" -v b="$e" 'BEGIN{print (b<a)?b:a}')
    best_keepfs=$(awk -v a="$best_keepfs" -v b="$k" 'BEGIN{print (b<a)?b:a}')
done
# Restore of the last version into a new image next to `rbd import` of the same bytes.
t0=$(now); RBD import --no-progress "$WORK/image" "rbd/$IMG-import"; t1=$(now)
ri=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
t0=$(now); "$KEEPFS" restore V0000000001 "rbd:rbd/$IMG-restore" 2>>"$WORK/keepfs.log"; t1=$(now)
rr=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
[ "$(RBD export --no-progress "rbd/$IMG-restore" - | sha256sum)" = "$(sha256sum <"$WORK/image")" ] \
    || { echo "restored image differs" >&2; exit 1; }
export KEEPFS_HOME=$WORK/home-file
t0=$(now); "$KEEPFS" backup "$WORK/image" bench >/dev/null 2>>"$WORK/keepfs.log"; t1=$(now)
f=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
printf 'home = "%s"\n[[storage]]\nname = "null"\nkind = "null"\n' "$WORK/home-null" >"$WORK/null.toml"
t0=$(now); KEEPFS_CONFIG=$WORK/null.toml "$KEEPFS" backup "rbd:rbd/$IMG@snap" bench >/dev/null 2>>"$WORK/keepfs.log"; t1=$(now)
n=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
t0=$(now); RBD export --no-progress "rbd/$IMG@snap" - >/dev/null; t1=$(now)
e3=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
best_export=$(awk -v a="$best_export" -v b="$e3" 'BEGIN{print (b<a)?b:a}')
echo
printf '%-40s %8s %8s %8s\n' "$SIZE_MIB MiB random data" seconds MB/s ratio
printf '%-40s %8.2f %8s %8s\n' "rbd export @snap /dev/null (baseline)" "$best_export" "$(mbps $BYTES "$best_export")" 1.00
printf '%-40s %8.2f %8s %8.2f\n' "keepfs backup rbd:…@snap" "$best_keepfs" "$(mbps $BYTES "$best_keepfs")" \
    "$(awk -v a="$best_export" -v b="$best_keepfs" 'BEGIN{print a/b}')"
printf '%-40s %8.2f %8s %8.2f\n' "keepfs backup of the same bytes (file)" "$f" "$(mbps $BYTES "$f")" \
    "$(awk -v a="$best_export" -v b="$f" 'BEGIN{print a/b}')"
printf '%-40s %8.2f %8s %8.2f\n' "keepfs backup rbd:…@snap, null storage" "$n" "$(mbps $BYTES "$n")" \
    "$(awk -v a="$best_export" -v b="$n" 'BEGIN{print a/b}')"
printf '%-40s %8.2f %8s %8s\n' "rbd import of the same bytes (baseline)" "$ri" "$(mbps $BYTES "$ri")" 1.00
printf '%-40s %8.2f %8s %8.2f\n' "keepfs restore to a new image" "$rr" "$(mbps $BYTES "$rr")" \
    "$(awk -v a="$ri" -v b="$rr" 'BEGIN{print a/b}')"
echo "(ratio = baseline time / time: above 1 is faster than rbd export; best of the runs)"
