#!/usr/bin/python3
"""A VM boot's reads, recorded and replayed through the mount and through NBD.

A VM booted from a backup reads in small scattered requests. This records them once,
for real: it builds a root filesystem (busybox, plus a copy of the host's shared
libraries that its init reads, as a boot loads programs and libraries), boots it with
qemu (the host's kernel and initrd) from a plain local file, and records every read the
guest made (qemu's `blk_co_preadv` trace event). It backs the image up with keepfs and
replays the same reads, in the same order, against:

- the local file (the baseline, cold and warm page cache),
- `keepfs mount`'s `by_version/<uid>/data`, opened read-only and read-write (a
  read-write handle reads through the copy-on-write overlay),
- `keepfs nbd`, a read-only and a writable export (python3-libnbd),

each cold (a fresh keepfs process, page cache dropped) and warm (the same replay again,
best of three),
at queue depth 1 and 16, and counts what the keepfs process read from the repository's
storage for the cold replay (/proc/PID/io rchar). All of it twice: the reads in the order
the boot made them, and the same reads scattered (shuffled with a fixed seed), the way
a VM with many processes interleaves them. With --old PATH, the mount rows are
repeated with another keepfs binary (e.g. a build of an older commit), in the same run.

usage: contrib/bench/bootpattern.py [--keepfs PATH] [--old PATH] [--workdir DIR] [--payload-mib N]
Needs root (FUSE, drop_caches), qemu-system-x86_64, a kernel and initrd in /boot,
busybox-static, mkfs.ext4, python3-libnbd.
"""
import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import nbd


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def build_image(work, payload_mib):
    root = os.path.join(work, "rootfs")
    shutil.rmtree(root, ignore_errors=True)
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "payload"]:
        os.makedirs(os.path.join(root, d))
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    total = 0
    for f in sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")):
        if os.path.islink(f) or not os.path.isfile(f):
            continue
        n = os.path.getsize(f)
        if total + n > payload_mib << 20:
            continue
        shutil.copy(f, os.path.join(root, "payload"))
        total += n
    init = os.path.join(root, "sbin/init")
    with open(init, "w") as f:
        f.write("#!/bin/busybox sh\n"
                "/bin/busybox find /payload -type f -exec /bin/busybox cat {} + > /dev/null\n"
                "/bin/busybox echo keepfs-bench: payload read\n"
                "/bin/busybox poweroff -f\n")
    os.chmod(init, 0o755)
    img = os.path.join(work, "root.img")
    with open(img, "wb") as f:
        f.truncate((payload_mib + 128) << 20)
    sh("mkfs.ext4", "-q", "-F", "-d", root, img)
    shutil.rmtree(root)
    return img, total


def record_boot(work, img):
    kernel = sorted(glob.glob("/boot/vmlinuz-*"))[-1]
    initrd = sorted(glob.glob("/boot/initrd.img-*"))[-1]
    trace = os.path.join(work, "trace.log")
    if os.path.exists(trace):
        os.remove(trace)
    out = subprocess.run(
        ["timeout", "600", "qemu-system-x86_64", "-m", "512", "-nographic", "-no-reboot",
         "-kernel", kernel, "-initrd", initrd,
         "-drive", f"file={img},format=raw,if=virtio,cache=none",
         "-append", "root=/dev/vda ro console=ttyS0 panic=-1 quiet",
         "-trace", f"enable=blk_co_preadv,file={trace}"],
        capture_output=True, text=True)
    if "keepfs-bench: payload read" not in out.stdout:
        sys.exit(f"the VM did not boot:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
    reads = []
    with open(trace) as f:
        for line in f:
            m = re.search(r"blk_co_preadv .*offset (\d+) bytes (\d+)", line)
            if m:
                reads.append((int(m.group(1)), int(m.group(2))))
    if not reads:
        sys.exit("qemu recorded no reads (is its trace backend 'log'?)")
    return reads


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def rchar(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def replay_file(path, reads, depth, write_mode):
    fd = os.open(path, os.O_RDWR if write_mode else os.O_RDONLY)
    try:
        if depth == 1:
            t = time.perf_counter()
            for off, n in reads:
                os.pread(fd, n, off)
            return time.perf_counter() - t
        it = iter(reads)
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    r = next(it, None)
                if r is None:
                    return
                os.pread(fd, r[1], r[0])

        threads = [threading.Thread(target=worker) for _ in range(depth)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t
    finally:
        os.close(fd)


def replay_nbd(uri, reads, depth):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        t = time.perf_counter()
        if depth == 1:
            for off, n in reads:
                h.pread(n, off)
        else:
            pending = list(reversed(reads))
            while pending or h.aio_in_flight() > 0:
                while pending and h.aio_in_flight() < depth:
                    off, n = pending.pop()
                    # A completion callback that returns 1 retires the command itself.
                    h.aio_pread(nbd.Buffer(n), off, completion=lambda *_: 1)
                h.poll(-1)
        return time.perf_counter() - t
    finally:
        h.shutdown()


def best(run, times=3):
    """The fastest of a few runs: on a shared machine the others measure its load."""
    return min(run() for _ in range(times))


def wait_for(what, check, limit=60):
    end = time.time() + limit
    while not check():
        if time.time() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def mounted(mnt):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mnt for line in f)


def with_mount(keepfs, env, mnt, log):
    os.makedirs(mnt, exist_ok=True)
    p = subprocess.Popen([keepfs, "mount", mnt], env=env, stdout=log, stderr=log)
    wait_for("the mount", lambda: mounted(mnt))
    return p


def stop(p, mnt=None):
    if mnt:
        subprocess.run(["fusermount3", "-u", mnt])
    else:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keepfs")
    ap.add_argument("--old", help="another keepfs binary whose mount rows are measured too")
    ap.add_argument("--workdir", default="/tmp/keepfs-bootpattern")
    ap.add_argument("--payload-mib", type=int, default=48)
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    keepfs = a.keepfs
    if keepfs is None:
        sh("cargo", "build", "--release", "--quiet", cwd=root)
        keepfs = os.path.join(root, "target", "release", "keepfs")
    work = a.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    img, payload = build_image(work, a.payload_mib)
    reads = record_boot(work, img)
    total = sum(n for _, n in reads)
    sizes = sorted(n for _, n in reads)
    print(f"recorded boot: {len(reads)} reads, {total / 1e6:.1f} MB, median {sizes[len(sizes) // 2]} B, "
          f"largest {sizes[-1]} B, image {os.path.getsize(img) >> 20} MiB, {payload >> 20} MiB of libraries read by init")

    rows = []
    patterns = [("boot order", reads)]
    scattered = list(reads)
    random.Random(7).shuffle(scattered)
    patterns.append(("scattered", scattered))

    def local():
        drop_caches()
        cold = replay_file(img, reads, 1, False)
        warm = best(lambda: replay_file(img, reads, 1, False))
        q16 = best(lambda: replay_file(img, reads, 16, False))
        rows.append(("local file (baseline)", cold, warm, q16, None))

    def mount_rows(binary, label):
        home = os.path.join(work, "repo-" + label)
        env = dict(os.environ, KEEPFS_HOME=home)
        env.pop("KEEPFS_CONFIG", None)
        uid = subprocess.run([binary, "backup", "file://" + img, "boot"], env=env, check=True,
                             capture_output=True, text=True).stdout.strip().split()[-1]
        mnt = os.path.join(work, "mnt")
        for mode in ("read-only", "read-write"):
            with open(os.path.join(work, "mount.log"), "a") as log:
                p = with_mount(binary, env, mnt, log)
                data = os.path.join(mnt, "by_version", uid, "data")
                drop_caches()
                r0 = rchar(p.pid)
                cold = replay_file(data, reads, 1, mode == "read-write")
                fetched = rchar(p.pid) - r0
                warm = best(lambda: replay_file(data, reads, 1, mode == "read-write"))
                q16 = best(lambda: replay_file(data, reads, 16, mode == "read-write"))
                stop(p, mnt)
            rows.append((f"{label}: mount, {mode} handle", cold, warm, q16, fetched))
        return env, uid

    def nbd_rows(binary, env, uid):
        for mode, args in (("read-only", ["--read-only"]), ("writable", ["--discard-writes"])):
            p = subprocess.Popen([binary, "nbd", "--listen", "127.0.0.1:0", *args], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            first = p.stderr.readline()
            m = re.search(r"serving NBD on (\S+)", first)
            if not m:
                p.kill()
                sys.exit(f"keepfs nbd did not start: {first}")
            uri = f"nbd://{m.group(1)}/{uid}"
            drop_caches()
            r0 = rchar(p.pid)
            cold = replay_nbd(uri, reads, 1)
            fetched = rchar(p.pid) - r0
            warm = best(lambda: replay_nbd(uri, reads, 1))
            q16 = best(lambda: replay_nbd(uri, reads, 16))
            stop(p)
            rows.append((f"this build: nbd, {mode} export", cold, warm, q16, fetched))

    for pattern, reads in patterns:
        rows = []
        local()
        env, uid = mount_rows(keepfs, "this build")
        nbd_rows(keepfs, env, uid)
        if a.old:
            mount_rows(a.old, "old build")
        shutil.rmtree(os.path.join(work, "repo-this build"), ignore_errors=True)
        shutil.rmtree(os.path.join(work, "repo-old build"), ignore_errors=True)
        base = rows[0][2]
        print(f"\nreads in {pattern}:")
        print(f"{'replayed through':40} {'cold s':>7} {'warm s':>7} {'warm x':>7} {'QD16 s':>7} {'fetched':>9}")
        for label, cold, warm, q16, fetched in rows:
            f = f"{fetched / 1e6:.0f} MB" if fetched is not None else ""
            print(f"{label:40} {cold:7.3f} {warm:7.3f} {warm / base:7.1f} {q16:7.3f} {f:>9}")
    print("warm x: warm QD1 replay time as a multiple of the local file's; fetched: what the keepfs "
          "process read from the repository's storage during the cold replay (rchar)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
