#!/usr/bin/env python3
"""keepfs throughput benchmark.

Creates a deterministic ~2 GiB mixed image (about 40% zero blocks, 40% compressible,
20% random, some duplicated blocks) and a copy with ~2% of its blocks changed, then
prints, in one run with a warm page cache, the same-run baseline `openssl dgst -sha256`
of the image and keepfs's initial backup, unchanged re-backup, backup of the changed
copy and restore, each in MB/s and as a ratio to the baseline, with storage used and
peak RSS. Finally backs up null://1T to a null storage (memory and database size).

Then the initial backup and the restore are repeated against other storages in the same
run: an encrypted file storage (AES-256-GCM, keyed ids) and, when `garage` is installed,
a local Garage S3 server (plain and encrypted; the plain one restored a second time from
the local read cache), next to the plain file storage.

With nbdcopy installed (libnbd-bin), the same version is also served by `keepfs nbd`:
`nbdcopy` of the export to null: next to `keepfs restore` to /dev/null in the same run,
and random 4 KiB reads (fio's nbd engine, queue depth 1 and 16) next to the same reads
of the mounted `data` file.

With --fuse (default when run as root with /dev/fuse), the same image is also read
and written through `keepfs mount`: restore to /dev/null next to `dd` of the mounted
`data` file (cold and warm page cache), random 4 KiB reads (fio), and `cp` into
`incoming/` next to `keepfs backup` of the same file into an equally fresh repository.

usage: contrib/bench/bench.py [--size-mib N] [--workdir DIR] [--keepfs PATH] [--no-fuse] [--no-nbd] [--no-storages]
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import time

BS = 4 << 20


def make_images(path, changed_path, size_mib, seed=42):
    blocks = size_mib * (1 << 20) // BS
    if os.path.exists(path) and os.path.getsize(path) == blocks * BS and os.path.exists(changed_path):
        return blocks
    rnd = random.Random(seed)
    # Compressible data: random bytes mapped onto a 16-letter alphabet (~2:1 with zstd).
    table = bytes(b"etaoinshrdlucmfw"[i % 16] for i in range(256))
    kinds = []
    with open(path, "wb") as f:
        written = []
        for i in range(blocks):
            r = rnd.random()
            if r < 0.40:
                kinds.append("zero")
                f.write(bytes(BS))
                continue
            if written and r < 0.45:
                kinds.append("dup")
                f.write(written[rnd.randrange(len(written))])
                continue
            if r < 0.80:
                kinds.append("text")
                data = rnd.randbytes(BS).translate(table)
            else:
                kinds.append("random")
                data = rnd.randbytes(BS)
            f.write(data)
            if len(written) < 16:
                written.append(data)
    shutil.copyfile(path, changed_path)
    with open(changed_path, "r+b") as f:
        for i in range(blocks):
            if rnd.random() < 0.02:
                f.seek(i * BS + rnd.randrange(BS - 8))
                f.write(rnd.randbytes(8))
    return blocks


def warm(path):
    """Puts `path` in the page cache and writes back what earlier steps left dirty, so
    that every step starts from the same state (keepfs drops what it has read from the
    cache, as backy2 and Benji do)."""
    os.sync()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def timed(cmd, env=None):
    """Runs cmd; returns (seconds, peak RSS in MiB of that very process, stdout)."""
    t = time.perf_counter()
    with open(os.devnull, "w") as null:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = p.stdout.read(), p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{stderr}")
    return dt, usage.ru_maxrss / 1024, stdout


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(log):
    try:
        with open(log) as f:
            return "keepfs: mounted at" in f.read()
    except FileNotFoundError:
        return False


def start_mount(keepfs, env, mnt, log, args=()):
    os.makedirs(mnt, exist_ok=True)
    p = subprocess.Popen([keepfs, "mount", mnt, *args], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    t = time.time()
    while not mounted(log):
        if p.poll() is not None or time.time() - t > 20:
            sys.exit(f"keepfs mount failed: {open(log).read()}")
        time.sleep(0.05)
    return p


def stop_mount(p, mnt):
    subprocess.run(["fusermount3", "-u", mnt])
    p.wait(timeout=30)


def fuse_bench(keepfs, env, img, size, uid, backup_mbs, workdir):
    mnt = os.path.join(workdir, "mnt")
    log = os.path.join(workdir, "mount.log")
    rows = []
    drop_caches()
    dt, _, _ = timed([keepfs, "restore", "--force", uid, "file:///dev/null"], env)
    restore = size / dt / 1e6
    rows.append(("keepfs restore to /dev/null", dt, restore, "restore"))
    rand = None
    for mode, args in (("", []), (" (--page-cache)", ["--page-cache"])):
        m = start_mount(keepfs, env, mnt, log, args)
        data = os.path.join(mnt, "by_version", uid, "data")
        try:
            drop_caches()
            dt, _, _ = timed(["dd", f"if={data}", "of=/dev/null", "bs=4M"])
            rows.append((f"dd of mounted data, cold{mode}", dt, size / dt / 1e6, "restore"))
            dt, _, _ = timed(["dd", f"if={data}", "of=/dev/null", "bs=4M"])
            rows.append((f"dd of mounted data, warm{mode}", dt, size / dt / 1e6, "restore"))
            if rand is None and shutil.which("fio"):
                drop_caches()
                out = subprocess.run(
                    ["fio", "--name=rand", f"--filename={data}", "--rw=randread", "--bs=4k", "--runtime=10",
                     "--time_based", "--readonly", "--output-format=terse", "--terse-version=3", "--numjobs=1",
                     "--iodepth=1", "--invalidate=1"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                if out.returncode == 0:
                    rand = int(out.stdout.split(";")[7])
        finally:
            stop_mount(m, mnt)
    # cp into incoming/ of a fresh repository, next to keepfs backup into another fresh one.
    homes = [os.path.join(workdir, "repo-cp"), os.path.join(workdir, "repo-backup")]
    for h in homes:
        shutil.rmtree(h, ignore_errors=True)
    env_cp = dict(env, KEEPFS_HOME=homes[0])
    env_bk = dict(env, KEEPFS_HOME=homes[1])
    warm(img)
    dt, _, _ = timed([keepfs, "backup", "file://" + img, "x"], env_bk)
    rows.append(("keepfs backup (fresh repository)", dt, size / dt / 1e6, "backup"))
    backup_fresh = size / dt / 1e6
    m = start_mount(keepfs, env_cp, mnt, log)
    try:
        warm(img)
        dt, _, _ = timed(["cp", img, os.path.join(mnt, "incoming", "x")])
        rows.append(("cp into incoming/ (fresh repository)", dt, size / dt / 1e6, "backup"))
        warm(img)
        dt, _, _ = timed(["cp", img, os.path.join(mnt, "incoming", "y")])
        rows.append(("cp into incoming/ (all blocks stored)", dt, size / dt / 1e6, None))
    finally:
        stop_mount(m, mnt)
    print()
    print("through the FUSE mount (same image):")
    print(f"{'step':44} {'seconds':>8} {'MB/s':>8} {'vs ref':>7}")
    refs = {"restore": restore, "backup": backup_fresh}
    for label, dt, mbs, ref in rows:
        ratio = f"{mbs / refs[ref]:7.2f}" if ref else ""
        print(f"{label:44} {dt:8.2f} {mbs:8.0f} {ratio}")
    print("(vs ref: dd rows against keepfs restore to /dev/null, cp rows against keepfs backup)")
    if rand is not None:
        print(f"random 4 KiB reads of mounted data (fio, 1 job, cold cache): {rand} IOPS")


def start_nbd(keepfs, env, args=()):
    """Starts `keepfs nbd` on a port the kernel picks; returns (process, host:port)."""
    p = subprocess.Popen([keepfs, "nbd", "--listen", "127.0.0.1:0", *args], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if not line.startswith("keepfs: serving NBD on "):
        sys.exit(f"keepfs nbd did not start: {line}")
    return p, line.split()[4]


def fio_iops(args):
    out = subprocess.run(["fio", "--name=rand", "--rw=randread", "--bs=4k", "--runtime=10", "--time_based",
                          "--readonly", "--output-format=terse", "--terse-version=3", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        return None
    return sum(int(line.split(";")[7]) for line in out.stdout.splitlines() if line.count(";") > 10)


def nbd_bench(keepfs, env, size, uid, workdir):
    """nbdcopy of the export next to keepfs restore of the same version, same run; random
    4 KiB reads through NBD next to the same through the mount."""
    rows = []
    drop_caches()
    dt, _, _ = timed([keepfs, "restore", "--force", uid, "file:///dev/null"], env)
    restore = size / dt / 1e6
    rows.append(("keepfs restore to /dev/null (reference)", dt, restore))
    p, addr = start_nbd(keepfs, env, ["--read-only"])
    rand = {}
    try:
        drop_caches()
        dt, _, _ = timed(["nbdcopy", f"nbd://{addr}/{uid}", "null:"])
        rows.append(("nbdcopy nbd://…/uid null: (cold)", dt, size / dt / 1e6))
        dt, _, _ = timed(["nbdcopy", f"nbd://{addr}/{uid}", "null:"])
        rows.append(("nbdcopy nbd://…/uid null: (warm block cache)", dt, size / dt / 1e6))
        if shutil.which("fio"):
            for qd in (1, 16):
                drop_caches()
                rand[f"nbd QD{qd}"] = fio_iops(["--ioengine=nbd", f"--uri=nbd://{addr}/{uid}", f"--iodepth={qd}"])
    finally:
        p.terminate()
        p.wait(timeout=60)
    if shutil.which("fio") and os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        mnt = os.path.join(workdir, "mnt")
        m = start_mount(keepfs, env, mnt, os.path.join(workdir, "mount.log"))
        try:
            data = os.path.join(mnt, "by_version", uid, "data")
            for jobs in (1, 16):
                drop_caches()
                rand[f"mount {jobs} job(s)"] = fio_iops([f"--filename={data}", f"--numjobs={jobs}", "--ioengine=psync"])
        finally:
            stop_mount(m, mnt)
    print()
    print("through NBD (same version):")
    print(f"{'step':44} {'seconds':>8} {'MB/s':>8} {'vs ref':>7}")
    for label, dt, mbs in rows:
        print(f"{label:44} {dt:8.2f} {mbs:8.0f} {mbs / restore:7.2f}")
    if rand:
        print("random 4 KiB reads, cold cache, IOPS: " + ", ".join(f"{k} {v}" for k, v in rand.items()))


def storage_bench(keepfs, root, img, size, workdir):
    """Initial backup and restore of the same image into other kinds of storage."""
    key = os.path.join(workdir, "bench.key")
    if not os.path.exists(key):
        subprocess.run([keepfs, "key", "new", key], check=True, stderr=subprocess.DEVNULL)
    setups = [("file, plain", "", False, False), ("file, encrypted", "", True, False)]
    garage_env = None
    if shutil.which("garage") or os.path.exists(os.path.expanduser("~/.cargo/bin/garage")):
        gdir = os.path.join(workdir, "garage")
        shutil.rmtree(gdir, ignore_errors=True)  # a fresh server each run
        genv = dict(os.environ, GARAGE_DIR=gdir, GARAGE_PORT="39400", S3_BUCKET="bench")
        subprocess.run([os.path.join(root, "contrib", "garage", "start-garage.sh")], env=genv, check=True,
                       stderr=subprocess.DEVNULL)
        garage_env = {}
        with open(os.path.join(gdir, "env.sh")) as f:
            for line in f:
                k, v = line.replace("export ", "").strip().split("=", 1)
                garage_env[k] = v
        run_id = str(int(time.time()))
        for enc in (False, True):
            tag = "encrypted" if enc else "plain"
            setups.append((f"S3 (local Garage), {tag}",
                           f'[[storage]]\nname = "s3"\nkind = "s3"\nendpoint = "{garage_env["S3_ENDPOINT"]}"\n'
                           f'region = "garage"\nbucket = "bench"\nprefix = "{run_id}-{tag}"\n'
                           f'access_key = "{garage_env["AWS_ACCESS_KEY_ID"]}"\n'
                           f'secret_key = "{garage_env["AWS_SECRET_ACCESS_KEY"]}"\n'
                           + (f'read_cache_dir = "{os.path.join(workdir, "read-cache")}"\n' if not enc else ""),
                           enc, not enc))
    rows = []
    out = os.path.join(workdir, "restored-s.img")
    shutil.rmtree(os.path.join(workdir, "read-cache"), ignore_errors=True)
    for label, storage_toml, enc, cached in setups:
        home = os.path.join(workdir, "repo-" + label.replace(" ", "").replace(",", "-").replace("(", "").replace(")", ""))
        shutil.rmtree(home, ignore_errors=True)
        os.makedirs(home)
        cfg = os.path.join(home, "keepfs.toml")
        with open(cfg, "w") as f:
            f.write(f'home = "{home}"\n{storage_toml}')
        env = dict(os.environ, KEEPFS_KEY_FILE=key)
        env.pop("KEEPFS_PASSPHRASE", None)
        if enc:
            subprocess.run([keepfs, "--config", cfg, "init", "--encrypt"], env=env, check=True, stderr=subprocess.DEVNULL)
        warm(img)
        bdt, _, uid = timed([keepfs, "--config", cfg, "backup", "file://" + img, "bench"], env)
        if os.path.exists(out):
            os.remove(out)
        drop_caches() if os.geteuid() == 0 else None
        rdt, _, _ = timed([keepfs, "--config", cfg, "restore", uid.strip(), "file://" + out], env)
        same = subprocess.run(["cmp", img, out]).returncode == 0
        os.remove(out)
        rows.append((label, bdt, size / bdt / 1e6, rdt, size / rdt / 1e6, same))
        if cached:
            # The first restore filled the local read cache; the second reads from it.
            drop_caches() if os.geteuid() == 0 else None
            rdt, _, _ = timed([keepfs, "--config", cfg, "restore", uid.strip(), "file://" + out], env)
            same = subprocess.run(["cmp", img, out]).returncode == 0
            os.remove(out)
            rows.append(("  same, 2nd restore (read cache)", None, None, rdt, size / rdt / 1e6, same))
    print()
    print("other storages (initial backup and restore of the same image, same run):")
    print(f"{'storage':32} {'backup s':>9} {'MB/s':>6} {'vs file':>8} {'restore s':>10} {'MB/s':>6} {'vs file':>8}  identical")
    plain_backup, plain_restore = rows[0][2], rows[0][4]
    for label, bdt, bm, rdt, rm, same in rows:
        b = f"{bdt:9.2f} {bm:6.0f} {bm / plain_backup:8.2f}" if bdt is not None else f"{'':9} {'':6} {'':8}"
        print(f"{label:32} {b} {rdt:10.2f} {rm:6.0f} {rm / plain_restore:8.2f}  {'yes' if same else 'NO'}")
    if garage_env is not None:
        with open(os.path.join(workdir, "garage", "pid")) as f:
            subprocess.run(["kill", f.read().strip()])
    return all(r[5] for r in rows)


def sparse_bench(keepfs, env, workdir):
    """A sparse 8 GiB image file holding 128 MiB of data in four places (a thin VM disk):
    keepfs reads only the data (SEEK_DATA); the baseline reads every hole as zeros."""
    path = os.path.join(workdir, "sparse.img")
    size = 8 << 30
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(4):
            f.seek(i * (size // 4) + 12345)
            f.write(os.urandom(32 << 20))
    base_t, _, _ = timed(["openssl", "dgst", "-sha256", path])
    dt, rss, uid = timed([keepfs, "backup", "file://" + path, "sparse"], env)
    out = os.path.join(workdir, "sparse-restored.img")
    if os.path.exists(out):
        os.remove(out)
    rt, _, _ = timed([keepfs, "restore", "--sparse", uid.strip(), "file://" + out], env)
    same = subprocess.run(["cmp", path, out]).returncode == 0
    print(f"sparse 8 GiB image, 128 MiB of data: openssl dgst -sha256 {base_t:.2f} s "
          f"({size / base_t / 1e6:.0f} MB/s); keepfs backup {dt:.2f} s ({size / dt / 1e6:.0f} MB/s of image, "
          f"{base_t / dt:.1f}x the baseline, peak RSS {rss:.0f} MiB); restore --sparse {rt:.2f} s; "
          f"identical: {'yes' if same else 'NO'}")
    os.remove(out)
    os.remove(path)
    return same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--workdir", default="/tmp/keepfs-bench")
    ap.add_argument("--keepfs", default=None)
    ap.add_argument("--skip-null", action="store_true")
    ap.add_argument("--skip-sparse", action="store_true")
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--no-nbd", action="store_true")
    ap.add_argument("--no-storages", action="store_true", help="skip the encrypted and S3 storage rows")
    ap.add_argument("--many", type=int, default=100, help="versions of null://1T for the metadata scale test")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    keepfs = a.keepfs
    if keepfs is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=root, check=True)
        keepfs = os.path.join(root, "target", "release", "keepfs")
    os.makedirs(a.workdir, exist_ok=True)
    img = os.path.join(a.workdir, "mixed.img")
    changed = os.path.join(a.workdir, "mixed-changed.img")
    blocks = make_images(img, changed, a.size_mib)
    size = blocks * BS
    home = os.path.join(a.workdir, "repo")
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    out = os.path.join(a.workdir, "restored.img")

    rows = []
    warm(img)
    base_t, _, _ = timed(["openssl", "dgst", "-sha256", img])
    base = size / base_t / 1e6
    rows.append(("openssl dgst -sha256 (baseline)", base_t, base, None, None))

    def step(label, cmd, image=img):
        warm(image)
        dt, rss, stdout = timed(cmd, env)
        rows.append((label, dt, size / dt / 1e6, rss, du(os.path.join(home, "storage"))))
        return stdout.strip()

    uid = step("keepfs backup (initial)", [keepfs, "backup", "file://" + img, "bench"])
    step("keepfs backup (all blocks stored)", [keepfs, "backup", "file://" + img, "bench"])
    step("keepfs backup (2% changed)", [keepfs, "backup", "file://" + changed, "bench"], changed)
    if os.path.exists(out):
        os.remove(out)
    step("keepfs restore to file", [keepfs, "restore", uid, "file://" + out])
    same = subprocess.run(["cmp", img, out]).returncode == 0
    os.remove(out)

    print(f"keepfs benchmark: {size / 2**30:.2f} GiB mixed image ({blocks} blocks of 4 MiB), {os.cpu_count()} CPUs")
    print(f"{'step':38} {'seconds':>8} {'MB/s':>8} {'x base':>7} {'peak RSS':>9} {'storage':>10}")
    for label, dt, mbs, rss, used in rows:
        rss_s = f"{rss:.0f} MiB" if rss is not None else ""
        used_s = f"{used / 2**20:.0f} MiB" if used is not None else ""
        print(f"{label:38} {dt:8.2f} {mbs:8.0f} {mbs / base:7.2f} {rss_s:>9} {used_s:>10}")
    print(f"restored image identical to the source: {'yes' if same else 'NO'}")

    if not a.no_storages:
        same = storage_bench(keepfs, root, img, size, a.workdir) and same

    if not a.no_fuse and os.geteuid() == 0 and os.path.exists("/dev/fuse"):
        fuse_bench(keepfs, env, img, size, uid, rows[1][2], a.workdir)

    if not a.no_nbd and shutil.which("nbdcopy"):
        nbd_bench(keepfs, env, size, uid, a.workdir)

    if not a.skip_sparse:
        same = sparse_bench(keepfs, env, a.workdir) and same

    if not a.skip_null:
        nhome = os.path.join(a.workdir, "null-repo")
        shutil.rmtree(nhome, ignore_errors=True)
        os.makedirs(nhome)
        cfg = os.path.join(nhome, "keepfs.toml")
        with open(cfg, "w") as f:
            f.write(f'home = "{nhome}"\n[[storage]]\nname = "null"\nkind = "null"\n')
        dt, rss, _ = timed([keepfs, "--config", cfg, "backup", "null://1T", "null1t"], env)
        db = sum(os.path.getsize(os.path.join(nhome, f)) for f in os.listdir(nhome) if f.startswith("keepfs.sqlite"))
        print(f"null://1T to null storage: {dt:.1f} s, peak RSS {rss:.0f} MiB, metadata database {db / 2**20:.1f} MiB")
        # 100 versions of a 1 TiB image (262,144 index entries each): list, restore one, clean up.
        t = time.perf_counter()
        for _ in range(a.many - 1):
            timed([keepfs, "--config", cfg, "backup", "null://1T", "null1t"], env)
        many_dt = time.perf_counter() - t
        ls_dt, _, out = timed([keepfs, "--config", cfg, "ls", "--format", "json"], env)
        count = out.count('"uid"')
        rs_dt, rs_rss, _ = timed([keepfs, "--config", cfg, "restore", "--sparse", "--force", "V0000000050", "file:///dev/null"], env)
        gc_dt, gc_rss, _ = timed([keepfs, "--config", cfg, "cleanup"], env)
        db = sum(os.path.getsize(os.path.join(nhome, f)) for f in os.listdir(nhome) if f.startswith("keepfs.sqlite"))
        print(f"{count} versions of null://1T: {a.many - 1} more backups {many_dt:.1f} s; ls {ls_dt:.2f} s; "
              f"restore of one {rs_dt:.2f} s (RSS {rs_rss:.0f} MiB); cleanup {gc_dt:.2f} s (RSS {gc_rss:.0f} MiB); "
              f"database {db / 2**20:.0f} MiB")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
