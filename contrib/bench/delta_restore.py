#!/usr/bin/env python3
"""Delta restore next to a full restore, in one run.

Makes a deterministic image (default 1 GiB, 4 MiB blocks, incompressible), backs it up
as V1, changes a share of its blocks (default 2%), backs that up as V2, restores V1 to a
standby file, then times, in the same run with the same warm repository:

  baseline: keepfs restore V2 to a new file (a full restore)
  delta:    keepfs restore --delta-from V1 V2 standby (writes only the changed blocks)

and prints both times, the ratio baseline/delta, and checks both results have the same
sha256. Also runs `keepfs bench --cpu-only` and prints its table.

usage: contrib/bench/delta_restore.py [--size-mib N] [--changed-percent P] [--keepfs PATH] [--workdir DIR]
"""
import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

BS = 4 << 20


def run(keepfs, home, *args):
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    t = time.monotonic()
    out = subprocess.run([keepfs, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"keepfs {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out.stdout.strip(), time.monotonic() - t


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--changed-percent", type=float, default=2.0)
    ap.add_argument("--keepfs", default="target/release/keepfs")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="keepfs-delta-", dir=a.workdir)
    try:
        home = os.path.join(work, "home")
        img = os.path.join(work, "img")
        blocks = a.size_mib * (1 << 20) // BS
        rng = random.Random(42)
        with open(img, "wb") as f:
            for _ in range(blocks):
                f.write(rng.randbytes(BS))
        v1, _ = run(a.keepfs, home, "backup", img, "vm1")
        changed = sorted(rng.sample(range(blocks), max(1, int(blocks * a.changed_percent / 100))))
        with open(img, "r+b") as f:
            for i in changed:
                f.seek(i * BS)
                f.write(rng.randbytes(BS))
        v2, _ = run(a.keepfs, home, "backup", img, "vm1")
        standby = os.path.join(work, "standby")
        run(a.keepfs, home, "restore", v1, standby)
        full = os.path.join(work, "full")
        _, t_full = run(a.keepfs, home, "restore", v2, full)
        _, t_delta = run(a.keepfs, home, "restore", "--delta-from", v1, v2, standby)
        same = sha256(full) == sha256(standby) == sha256(img)
        print(f"image {a.size_mib} MiB, {len(changed)} of {blocks} blocks changed ({a.changed_percent}%)")
        print(f"full restore (baseline)   {t_full:8.2f} s  1.00")
        print(f"delta restore             {t_delta:8.2f} s  {t_full / t_delta:.1f}x faster")
        print(f"same sha256: {'yes' if same else 'NO'}")
        table, _ = run(a.keepfs, home, "bench", "--cpu-only")
        print(table)
        if not same:
            sys.exit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
