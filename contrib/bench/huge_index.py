#!/usr/bin/env python3
"""keepfs with images of 1, 16 and 200 TiB (issue 13, "Images of 200 TB").

For each size, backs up `null://SIZE` (all sparse, 4 MiB blocks) into a fresh repository
with its file storage, restores it to a sparse file on tmpfs (ext4 files stop at 16 TiB),
then removes it and runs `cleanup`. Prints per step the time and the peak RSS of that
very process, the stored index (database value and version object), and the database
file before and after rm + cleanup.

The same steps run, in the same run, with a baseline binary (`--old`, e.g. keepfs built
from main 5f2c975, before index format 2) so that every figure has its same-run
reference; a step the baseline refuses is printed as such. Finally the new binary's
first `cleanup` on the baseline's 16 TiB repository (rm'd version) shows the one-time
conversion of an old database (VACUUM) and what it gives back.

usage: contrib/bench/huge_index.py --new target/release/keepfs [--old OLD] [--sizes 1T,16T,200T,200T@8M]
       [--workdir DIR] [--tmpfs /dev/shm]
"""
import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import time


def timed(cmd, env):
    """Runs cmd; returns (ok, seconds, peak RSS MiB, stdout, stderr) of that very process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.stdout.read(), p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    return os.waitstatus_to_exitcode(status) == 0, dt, usage.ru_maxrss / 1024, stdout, stderr


def db_bytes(home):
    return sum(os.path.getsize(os.path.join(home, f)) for f in os.listdir(home) if f.startswith("keepfs.sqlite"))


def index_bytes(home, uid):
    con = sqlite3.connect(os.path.join(home, "keepfs.sqlite"))
    try:
        row = con.execute("SELECT length(data) FROM version_index WHERE uid=?", (int(uid[1:]),)).fetchone()
        return row[0] if row else None
    finally:
        con.close()


def mib(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} B"


def bench(binary, label, size, workdir, tmpfs, keep=False):
    home = os.path.join(workdir, f"{label}-{size.replace('@', '-')}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    row = {"binary": label, "size": size}
    image, _, bs = size.partition("@")
    extra = ["-b", bs] if bs else []
    ok, dt, rss, out, err = timed([binary, "backup", *extra, f"null://{image}", "huge"], env)
    if not ok:
        row["backup"] = "refused: " + err.strip().splitlines()[-1][:150]
        return row, home
    uid = out.strip()
    row["backup"] = f"{dt:6.1f} s {rss:6.0f} MiB"
    row["index"] = mib(index_bytes(home, uid))
    row["object"] = mib(os.path.getsize(os.path.join(home, "storage", "versions", uid)))
    target = os.path.join(tmpfs, f"keepfs-huge-{label}-{size.replace('@', '-')}.img")
    ok, dt, rss, _, err = timed([binary, "restore", "--force", uid, f"file://{target}"], env)
    row["restore"] = f"{dt:6.1f} s {rss:6.0f} MiB" if ok else "failed: " + err.strip()[-150:]
    if os.path.exists(target):
        os.remove(target)
    row["db"] = mib(db_bytes(home))
    ok, _, _, _, err = timed([binary, "rm", "--force", uid], env)
    if not ok:
        sys.exit(f"rm failed: {err}")
    if keep:
        row["cleanup"] = "(kept for the conversion row)"
        return row, home
    ok, dt, rss, _, err = timed([binary, "cleanup"], env)
    row["cleanup"] = f"{dt:6.1f} s {rss:6.0f} MiB"
    row["db_after"] = mib(db_bytes(home))
    return row, home


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", required=True, help="the keepfs binary to measure")
    ap.add_argument("--old", help="the baseline binary (e.g. built from main 5f2c975)")
    ap.add_argument("--sizes", default="1T,16T,200T,200T@8M",
                    help="image sizes, SIZE@BS for another block size (the old binary refuses 200T at 4M)")
    ap.add_argument("--workdir", default="/tmp/keepfs-huge-bench")
    ap.add_argument("--tmpfs", default="/dev/shm")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    old_16t_home = None
    for size in a.sizes.split(","):
        for label, binary in (("old", a.old), ("new", a.new)):
            if not binary:
                continue
            keep = label == "old" and size == "16T"
            row, home = bench(binary, label, size, a.workdir, a.tmpfs, keep=keep)
            if keep:
                old_16t_home = home
            rows.append(row)
            print(row, flush=True)
    print()
    cols = ["size", "binary", "backup", "restore", "index", "object", "db", "cleanup", "db_after"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if old_16t_home and a.old:
        env = dict(os.environ, KEEPFS_HOME=old_16t_home)
        env.pop("KEEPFS_CONFIG", None)
        before = db_bytes(old_16t_home)
        ok, dt, rss, out, err = timed([a.old, "cleanup"], env)
        after_old = db_bytes(old_16t_home)
        ok, dt, rss, out, err = timed([a.new, "cleanup"], env)
        after_new = db_bytes(old_16t_home)
        print(f"\nold 16T repository after rm: database {mib(before)}; old cleanup leaves {mib(after_old)}; "
              f"new cleanup (one-time VACUUM conversion) {dt:.1f} s, {rss:.0f} MiB RSS, leaves {mib(after_new)}"
              f" ({'; '.join(l for l in out.splitlines() if l.startswith('database:'))})")


if __name__ == "__main__":
    main()
