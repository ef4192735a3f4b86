#!/usr/bin/env python3
"""The catalog benchmark: the same work with the SQLite catalog (the same-run baseline)
and with a PostgreSQL catalog, reported as ratios.

Makes a deterministic image of random and zero blocks (64 KiB blocks, so that the
catalog work per byte is high), then with each catalog: an initial backup, an unchanged
re-backup (every block looked up and touched), --versions more re-backups, `ls --format
json`, a restore to /dev/null, `rm` of all but the newest version and `cleanup`. Prints
seconds per step, PostgreSQL / SQLite, the catalog's size afterwards, and how many
transactions the unchanged re-backup took on PostgreSQL (its lookups are batched: this is
the number of round trips that grows with the image).

With --tls-rootcert CA.pem, a third run on the same server over TLS
(`?sslmode=verify-full&sslrootcert=CA.pem`, a database of its own), reported against
the PostgreSQL run of the same invocation, which is then plain (`sslmode=disable`): the
cost of TLS. The server must have
`ssl = on` with a certificate CA.pem signed for the URL's host, and `host` (not only
`hostssl`) lines in pg_hba.conf so that the plain run connects too.

usage: contrib/bench/catalog.py --postgres postgresql://user:pw@127.0.0.1:5432/
       [--size-mib 256] [--versions 20] [--keepfs target/release/keepfs] [--workdir DIR]
       [--tls-rootcert CA.pem]
The PostgreSQL user must be allowed to create databases; the benchmark's database is
dropped at the end.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time

BS = 64 * 1024


def run(keepfs, env, *args):
    t = time.monotonic()
    out = subprocess.run([keepfs, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"keepfs {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return time.monotonic() - t, out.stdout


def psql(base, db, sql):
    subprocess.run(["psql", "-X", "-q", "-A", "-t", f"{base.rstrip('/')}/{db}", "-c", sql], check=True,
                   capture_output=True)


def pg_size(base, db):
    out = subprocess.run(["psql", "-X", "-A", "-t", f"{base.rstrip('/')}/{db}", "-c",
                          f"SELECT pg_database_size('{db}')"], check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def xacts(base, db):
    """Transactions the server has counted for db, once every finished client's are in
    (a backend reports its counts as it exits, a moment after its client)."""
    last = None
    while True:
        out = subprocess.run(["psql", "-X", "-A", "-t", f"{base.rstrip('/')}/postgres", "-c",
                              f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{db}'"],
                             check=True, capture_output=True, text=True)
        n = int(out.stdout.strip() or 0)
        if n == last:
            return n
        last = n
        time.sleep(0.3)


def work(keepfs, home, database, image, versions, counter=None):
    env = dict(os.environ, KEEPFS_HOME=home, KEEPFS_DATABASE=database)
    env.pop("KEEPFS_CONFIG", None)
    src = f"file://{image}"
    t = {}
    t["initial backup"], _ = run(keepfs, env, "backup", src, "vm", "-b", "64k")
    if counter:
        before = counter()
        t["unchanged backup"], _ = run(keepfs, env, "backup", src, "vm", "-b", "64k")
        t["transactions of the unchanged backup"] = counter() - before
    else:
        t["unchanged backup"], _ = run(keepfs, env, "backup", src, "vm", "-b", "64k")
    start = time.monotonic()
    for _ in range(versions):
        run(keepfs, env, "backup", src, "vm", "-b", "64k")
    t[f"{versions} more backups"] = time.monotonic() - start
    t["ls --format json"], out = run(keepfs, env, "ls", "--format", "json")
    uids = [v["uid"] for v in json.loads(out)]
    t["restore"], _ = run(keepfs, env, "restore", uids[-1], "file:///dev/null", "--force")
    start = time.monotonic()
    for uid in uids[:-1]:
        run(keepfs, env, "rm", "--force", uid)
    t["rm all but one"] = time.monotonic() - start
    t["cleanup"], _ = run(keepfs, env, "cleanup")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--postgres", required=True)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--keepfs", default="target/release/keepfs")
    ap.add_argument("--workdir")
    ap.add_argument("--tls-rootcert")
    a = ap.parse_args()
    if a.workdir and not os.path.isdir(a.workdir):
        raise SystemExit(f"catalog.py: --workdir {a.workdir} is not a directory; create it first")
    work_dir = tempfile.mkdtemp(prefix="keepfs-catalog-bench-", dir=a.workdir)
    try:
        rnd = random.Random(7)
        image = os.path.join(work_dir, "image")
        with open(image, "wb") as f:
            for i in range(a.size_mib * 1024 * 1024 // BS):
                f.write(bytes(BS) if i % 5 == 0 else rnd.randbytes(BS))
        db = f"keepfs_bench_{os.getpid()}"
        psql(a.postgres, "postgres", f"CREATE DATABASE {db}")
        try:
            sqlite_path = os.path.join(work_dir, "s", "keepfs.sqlite")
            base = work(a.keepfs, os.path.join(work_dir, "s"), sqlite_path, image, a.versions)
            # With a TLS run to compare with, the PostgreSQL run is plain for sure (the
            # default, sslmode=prefer, would encrypt on a server with TLS on).
            plain = "?sslmode=disable" if a.tls_rootcert else ""
            pg = work(a.keepfs, os.path.join(work_dir, "p"), f"{a.postgres.rstrip('/')}/{db}{plain}", image,
                      a.versions, counter=lambda: xacts(a.postgres, db))
            print(f"image {a.size_mib} MiB, 64 KiB blocks; seconds, SQLite (baseline) vs PostgreSQL")
            for k in base:
                print(f"  {k:22} {base[k]:8.2f} {pg[k]:8.2f}   x{pg[k] / max(base[k], 1e-9):.2f}")
            n = pg["transactions of the unchanged backup"]
            blocks = a.size_mib * 1024 * 1024 // BS
            print(f"  the unchanged backup took {n} PostgreSQL transactions for {blocks} blocks "
                  f"({blocks * 4 // 5} of them data, each looked up)")
            print(f"  catalog size after cleanup: SQLite {os.path.getsize(sqlite_path) >> 10} KiB, "
                  f"PostgreSQL {pg_size(a.postgres, db) >> 10} KiB (database, with its fixed overhead)")
            if a.tls_rootcert:
                psql(a.postgres, "postgres", f"CREATE DATABASE {db}_tls")
                url = f"{a.postgres.rstrip('/')}/{db}_tls?sslmode=verify-full&sslrootcert={a.tls_rootcert}"
                tls = work(a.keepfs, os.path.join(work_dir, "t"), url, image, a.versions)
                print("seconds, PostgreSQL plain (baseline) vs PostgreSQL over TLS (verify-full)")
                for k in pg:
                    print(f"  {k:22} {pg[k]:8.2f} {tls[k]:8.2f}   x{tls[k] / max(pg[k], 1e-9):.2f}")
        finally:
            psql(a.postgres, "postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(a.postgres, "postgres", f"DROP DATABASE IF EXISTS {db}_tls WITH (FORCE)")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
