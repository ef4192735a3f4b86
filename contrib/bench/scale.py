#!/usr/bin/env python3
"""Scale figures for issue 13, with the SQLite catalog (the same-run baseline) and a
PostgreSQL catalog:

1. --versions (default 1000) versions of a 1 TiB null:// image: the catalog's size, the
   time and peak RSS of `ls` and `ls --format json`, of a `cleanup` that reads every
   version's index (two catalog round trips each), and of `rm` of all but the newest
   version plus `cleanup`.
2. --writers (default 4) processes backing up different images into one repository at
   once, next to one process backing up the same images one after the other: aggregate
   MB/s.

usage: contrib/bench/scale.py --postgres postgresql://user:pw@127.0.0.1:5432/
       [--versions 1000] [--writers 4] [--image-mib 128] [--keepfs target/release/keepfs]
The PostgreSQL user must be allowed to create databases; the benchmark's databases are
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


def run(keepfs, env, *args):
    """Runs keepfs; returns (seconds, stdout)."""
    t = time.monotonic()
    out = subprocess.run([keepfs, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"keepfs {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return time.monotonic() - t, out.stdout


def peak_rss(keepfs, env, *args):
    """Seconds and peak RSS (MiB) of one keepfs command, from /usr/bin/time."""
    t = time.monotonic()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", keepfs, *args], env=env, capture_output=True, text=True)
    dt = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"keepfs {' '.join(args)} failed: {out.stderr.strip()}")
    rss_kib = int(out.stderr.strip().splitlines()[-1])
    return dt, rss_kib / 1024


def psql(base, db, sql):
    return subprocess.run(["psql", "-X", "-q", "-A", "-t", f"{base.rstrip('/')}/{db}", "-c", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def engine_env(work, name, pg_base):
    home = os.path.join(work, name)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    env.pop("KEEPFS_DATABASE", None)
    db = None
    if name.startswith("pg"):
        db = f"keepfs_scale_{name}_{os.getpid()}"
        psql(pg_base, "postgres", f"CREATE DATABASE {db}")
        env["KEEPFS_DATABASE"] = f"{pg_base.rstrip('/')}/{db}"
    return home, env, db


def catalog_size(home, pg_base, db):
    if db:
        return int(psql(pg_base, db, f"SELECT pg_database_size('{db}')"))
    return sum(os.path.getsize(os.path.join(home, f)) for f in os.listdir(home) if f.startswith("keepfs.sqlite"))


def many_versions(keepfs, work, name, pg_base, versions):
    home, env, db = engine_env(work, name, pg_base)
    t = time.monotonic()
    for _ in range(versions):
        run(keepfs, env, "backup", "null://1T", "big")
    backups = time.monotonic() - t
    size = catalog_size(home, pg_base, db)
    ls_t, ls_rss = peak_rss(keepfs, env, "ls")
    json_t, json_rss = peak_rss(keepfs, env, "ls", "--format", "json")
    _, out = run(keepfs, env, "ls", "--format", "json")
    uids = [v["uid"] for v in json.loads(out)]
    full_t, full_rss = peak_rss(keepfs, env, "cleanup")
    t = time.monotonic()
    # rm takes several uids at once.
    for i in range(0, len(uids) - 1, 200):
        run(keepfs, env, "rm", "--force", *uids[i:min(i + 200, len(uids) - 1)])
    rm_t = time.monotonic() - t
    clean_t, clean_rss = peak_rss(keepfs, env, "cleanup")
    after = catalog_size(home, pg_base, db)
    return dict(name=name, backups=backups, size=size, after=after, ls=ls_t, ls_rss=ls_rss, json=json_t,
                json_rss=json_rss, full=full_t, full_rss=full_rss, rm=rm_t, cleanup=clean_t, cleanup_rss=clean_rss), db


def writers(keepfs, work, name, pg_base, images, together):
    home, env, db = engine_env(work, name, pg_base)
    t = time.monotonic()
    if together:
        procs = [subprocess.Popen([keepfs, "backup", f"file://{img}", f"w{i}"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i, img in enumerate(images)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"a concurrent backup failed: {err.strip()}")
    else:
        for i, img in enumerate(images):
            run(keepfs, env, "backup", f"file://{img}", f"w{i}")
    dt = time.monotonic() - t
    return sum(os.path.getsize(i) for i in images) / dt / 1e6, db


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--postgres", required=True)
    ap.add_argument("--versions", type=int, default=1000)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--image-mib", type=int, default=128)
    ap.add_argument("--keepfs", default="target/release/keepfs")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="keepfs-scale-")
    dbs = []
    try:
        rows = []
        for name in ("sqlite", "pg"):
            r, db = many_versions(a.keepfs, work, name, a.postgres, a.versions)
            rows.append(r)
            dbs.append(db)
        print(f"{a.versions} versions of null://1T (4 MiB blocks):")
        print(f"{'catalog':8} {'backups s':>9} {'size':>9} {'after':>9} {'ls s':>6} {'ls MiB':>7} "
              f"{'json s':>6} {'full cl s':>9} {'MiB':>4} {'rm s':>6} {'cleanup s':>9} {'cl MiB':>7}")
        for r in rows:
            print(f"{r['name']:8} {r['backups']:9.1f} {r['size'] / 2**20:8.1f}M {r['after'] / 2**20:8.1f}M "
                  f"{r['ls']:6.2f} {r['ls_rss']:7.0f} {r['json']:6.2f} {r['full']:9.2f} {r['full_rss']:4.0f} {r['rm']:6.1f} {r['cleanup']:9.2f} "
                  f"{r['cleanup_rss']:7.0f}")
        base, pg = rows
        print(f"PostgreSQL / SQLite: ls {pg['ls'] / base['ls']:.2f}, cleanup of every version "
              f"{pg['full'] / base['full']:.2f}, cleanup {pg['cleanup'] / base['cleanup']:.2f}, "
              f"backups {pg['backups'] / base['backups']:.2f}")

        if a.writers == 0:
            return
        rnd = random.Random(5)
        images = []
        for i in range(a.writers):
            path = os.path.join(work, f"img{i}")
            with open(path, "wb") as f:
                for _ in range(a.image_mib):
                    f.write(rnd.randbytes(1 << 20))
            images.append(path)
        print(f"\n{a.writers} writers of {a.image_mib} MiB random images into one repository (aggregate MB/s):")
        for name in ("sqlite", "pg"):
            one, db1 = writers(a.keepfs, work, name + "1", a.postgres, images, False)
            many, db2 = writers(a.keepfs, work, name + "n", a.postgres, images, True)
            dbs += [db1, db2]
            print(f"{name:8} one after the other {one:7.0f}   {a.writers} at once {many:7.0f}   ratio {many / one:.2f}")
    finally:
        for db in dbs:
            if db:
                psql(a.postgres, "postgres", f"DROP DATABASE IF EXISTS {db}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
