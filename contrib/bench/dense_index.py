#!/usr/bin/env python3
"""Memory per data block with dense images (issue 13, "Images of 200 TB").

huge_index.py measures images of zeros, whose index is a few bytes. Here every block
holds data and is unique: an image of N blocks of 4 KiB, each stamped with its number
(so it hashes apart but compresses well, and the file storage stays small). For two
image sizes it runs, in a fresh repository with its file storage:

    backup -b 4K IMAGE        (to a null storage: the pipeline and the index alone)
    backup -b 4K IMAGE        (every block new)
    backup -b 4K IMAGE        (every block deduplicated)
    restore to /dev/null      (a target that cannot be read back)
    restore to a file         (on tmpfs: repeats are copied from the target)
    scrub                     (metadata)
    rm the first version, cleanup

and prints each step's time and the peak RSS of that very process. The figure that
matters is the slope: (peak RSS at the large size - at the small size) / (data blocks
added), the bytes each data block costs that step, which is what bounds a dense 100 TB
image. Run with `--old` (a keepfs built from an earlier commit) to get the same-run
baseline.

With --null-only, only the backup to a null storage runs (fast, so larger sizes are
practical: the slope of a backup's memory between 1 and 4 GiB, once the fixed costs
have topped out).

With --readers, one repository per size is made by --new (its version objects written
as a large index's are: uncompressed, streamed; KEEPFS_TEST_STREAMED_INDEX=0, which
debug builds honour), holding the image twice; then each binary, on that same
repository, brings a file holding the first version to the second with `restore
--delta-from` and runs a `scrub` (which reads the version object).

With --encrypted, each binary backs up the image into a fresh encrypted repository (its
file storage in --workdir: put it on tmpfs) with its version object written as a large
index's (KEEPFS_TEST_STREAMED_INDEX=0: sealed from a file, not in memory, since the
change that added this mode), then runs a `scrub` (which reads that object), a `label`
change (which writes it again), a key rotation and `key rekey` (which moves every object
to the new key: the version object's header decides), and, the catalog removed, a
`database rebuild` (which reads it back into a new catalog).

With --mount, one repository per size is made by --new; each binary then mounts it,
reads the version's `data` to the end (`cat` to /dev/null) and gives the peak RSS of the
mount process and its anonymous part at the end (RssAnon: the process's own memory;
pages of a mapped file are page cache the kernel can take back).

With --mount --cow, instead of reading it, 16 blocks are written into the mounted
version's `data` (dd, conv=notrunc) and the copy-on-write version is waited for (it is
committed when the file is closed); the mount process's RssAnon is sampled meanwhile
and its highest value given: what committing a few written blocks over a large version
costs.

With --incoming, each binary mounts a fresh repository (block size 4 KiB, its file
storage in --workdir), copies the image into `incoming/` (dd, 1 MiB writes) and waits
for the version, committed at close: the time, the peak RSS of the mount process and
the highest RssAnon sampled meanwhile. What a draft holds per block written.

With --metadata, one repository per size is made by --new; each binary exports the
version's metadata (`metadata export`), removes the version and imports the document
back (`metadata import`).

With --nbd, one repository per size is made by --new; each binary serves it read-only
(`keepfs nbd --socket`), nbdcopy reads the version to null: and nbdinfo --map lists
its extents: the times, and the server's peak RSS.

With --cleanup, one binary (--new) makes a repository per size holding two images that
share half their blocks, removes the first, and runs `cleanup --dry-run` in one pass,
then `cleanup --dry-run` and `cleanup` with `cleanup_memory` set to --cleanup-memory
(default 8M) so that they go in slices; the one pass is the same-run baseline. Both dry
runs must plan the same deletions.

usage: contrib/bench/dense_index.py --new target/release/keepfs [--old OLD]
       [--sizes 256M,1G] [--workdir DIR] [--tmpfs /dev/shm]
       [--null-only | --readers | --encrypted | --mount [--cow] | --incoming | --metadata | --nbd
        | --cleanup]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

BS = 4096


def run(cmd, env):
    """(ok, seconds, peak RSS in MiB, stdout, stderr) of cmd, measured by GNU time."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    lines = p.stderr.strip().splitlines()
    rss = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else float("nan")
    return p.returncode == 0, dt, rss, p.stdout, "\n".join(lines[:-1])


def made_by_new(binaries, name, image, workdir):
    """A fresh repository `name` in `workdir` holding `image` backed up by --new: (home,
    environment, uid)."""
    home = os.path.join(workdir, name)
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    ok, _, _, uid, err = run([dict(binaries)["new"], "backup", "-b", "4K", image, "dense"], env)
    if not ok:
        sys.exit(f"backup failed: {err[-300:]}")
    return home, env, uid.strip()


def make_image(path, size, other_half=False):
    """Unique blocks; with other_half, the second half's blocks differ from the default's."""
    n = size // BS
    pad, other = b"\1" * (BS - 8), b"\2" * (BS - 8)
    with open(path, "wb") as f:
        for i in range(n):
            f.write(struct.pack("<Q", i) + (other if other_half and i >= n // 2 else pad))
    return n


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


STEPS = ["backup to null", "backup", "backup again", "restore /dev/null", "restore file", "scrub", "cleanup"]


def bench(binary, label, size, image, workdir, tmpfs, null_only=False):
    home = os.path.join(workdir, f"{label}-{size}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    out = {}

    def step(name, cmd):
        ok, dt, rss, stdout, err = run([binary, *cmd], env)
        if not ok:
            sys.exit(f"{label} {size} {name} failed: {err[-300:]}")
        out[name] = (dt, rss)
        return stdout.strip()

    null_conf = os.path.join(home, "null.toml")
    with open(null_conf, "w") as f:
        f.write('[[storage]]\nname = "null"\nkind = "null"\n')
    null_env = dict(env, KEEPFS_HOME=os.path.join(home, "null"))
    ok, dt, rss, _, err = run([binary, "--config", null_conf, "backup", "-b", "4K", image, "dense"], null_env)
    if not ok:
        sys.exit(f"{label} {size} backup to null failed: {err[-300:]}")
    out["backup to null"] = (dt, rss)
    shutil.rmtree(os.path.join(home, "null"), ignore_errors=True)
    if null_only:
        shutil.rmtree(home, ignore_errors=True)
        return out
    uid = step("backup", ["backup", "-b", "4K", image, "dense"])
    step("backup again", ["backup", "-b", "4K", image, "dense"])
    step("restore /dev/null", ["restore", "--force", uid, "file:///dev/null"])
    target = os.path.join(tmpfs, f"keepfs-dense-{label}.img")
    step("restore file", ["restore", "--force", uid, f"file://{target}"])
    os.remove(target)
    step("scrub", ["scrub", uid])
    ok, _, _, _, err = run([binary, "rm", "--force", uid], env)
    if not ok:
        sys.exit(f"rm failed: {err}")
    step("cleanup", ["cleanup"])
    shutil.rmtree(home, ignore_errors=True)
    return out


READER_STEPS = ["delta restore", "scrub"]
NBD_STEPS = ["nbdcopy to null:", "nbdinfo --map"]


def nbd(binaries, size, image, workdir):
    """One repository made by --new; each binary serves it read-only on a Unix socket
    and nbdcopy reads the whole version (structured replies: each read asks where the
    data lies), then nbdinfo --map asks for its extents. Times, and the server's peak
    RSS at the end."""
    home, env, uid = made_by_new(binaries, f"nbd-{size}", image, workdir)
    results = {}
    for label, binary in binaries:
        sock = os.path.join(home, "nbd.sock")
        log = open(os.path.join(home, "nbd.log"), "w")
        p = subprocess.Popen([binary, "nbd", "--read-only", "--socket", sock], env=env,
                             stdout=subprocess.DEVNULL, stderr=log)
        t = time.perf_counter()
        while not os.path.exists(sock):
            if p.poll() is not None or time.perf_counter() - t > 30:
                sys.exit(f"{label}: nbd failed: {open(log.name).read()[-300:]}")
            time.sleep(0.05)
        url = f"nbd+unix:///{uid}?socket={sock}"
        out = {}
        for name, cmd in (("nbdcopy to null:", ["nbdcopy", url, "null:"]),
                          ("nbdinfo --map", ["nbdinfo", "--map", url])):
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            out[name] = (time.perf_counter() - t, proc_kib(p.pid, "VmHWM") / 1024)
        p.terminate()
        p.wait()
        results[label] = out
    shutil.rmtree(home, ignore_errors=True)
    return results


METADATA_STEPS = ["metadata export", "metadata import"]


def metadata(binaries, size, image, workdir):
    """One repository made by --new; each binary exports the version's metadata, the
    version is removed, and the binary imports the document back."""
    home, env, uid = made_by_new(binaries, f"metadata-{size}", image, workdir)
    doc = os.path.join(home, "meta.json")
    results = {}
    for label, binary in binaries:
        out = {}
        for name, cmd in (("metadata export", ["metadata", "export", uid, doc]),
                          ("rm", ["rm", "--force", uid]),
                          ("metadata import", ["metadata", "import", doc])):
            ok, dt, rss, _, err = run([binary, *cmd], env)
            if not ok:
                sys.exit(f"{label} {size} {name} failed: {err[-300:]}")
            out[name] = (dt, rss)
        os.remove(doc)
        results[label] = out
    shutil.rmtree(home, ignore_errors=True)
    return results


CLEANUP_STEPS = ["dry run, one pass", "dry run, sliced", "cleanup, sliced"]


def cleanup(binary, size, image, workdir, budget):
    home = os.path.join(workdir, f"cleanup-{size}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home)
    env.pop("KEEPFS_CONFIG", None)
    conf = os.path.join(workdir, f"cleanup-{size}.toml")
    with open(conf, "w") as f:
        f.write(f'home = "{home}"\ncleanup_memory = "{budget}"\n'
                f'[[storage]]\nname = "default"\nkind = "file"\npath = "{home}/storage"\n')
    other = image + ".other"
    make_image(other, parse_size(size), other_half=True)
    uids = []
    for img in (image, other):
        ok, _, _, uid, err = run([binary, "backup", "-b", "4K", img, "dense"], env)
        if not ok:
            sys.exit(f"{size} backup failed: {err[-300:]}")
        uids.append(uid.strip())
    os.remove(other)
    ok, _, _, _, err = run([binary, "rm", "--force", uids[0]], env)
    if not ok:
        sys.exit(f"rm failed: {err}")
    out, plans = {}, []
    for name, cmd in (("dry run, one pass", ["cleanup", "--dry-run", "--format", "json"]),
                      ("dry run, sliced", ["--config", conf, "cleanup", "--dry-run", "--format", "json"]),
                      ("cleanup, sliced", ["--config", conf, "cleanup", "--format", "json"])):
        ok, dt, rss, stdout, err = run([binary, *cmd], env)
        if not ok:
            sys.exit(f"{size} {name} failed: {err[-300:]}")
        out[name] = (dt, rss)
        st = json.loads(stdout)["storages"][0]
        plans.append(st)
        print(f"  {size} {name}: {st.get('slices')} slice(s), {st['objects']} object(s) to delete, "
              f"{st['referenced']} referenced", flush=True)
    if plans[0]["objects"] != plans[1]["objects"] or plans[2].get("objects_deleted") != plans[0]["objects"]:
        sys.exit(f"{size}: the sliced cleanup planned or deleted otherwise: {plans}")
    shutil.rmtree(home, ignore_errors=True)
    os.remove(conf)
    return out


def readers(binaries, size, image, workdir, tmpfs):
    home = os.path.join(workdir, f"readers-{size}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    env = dict(os.environ, KEEPFS_HOME=home, KEEPFS_TEST_STREAMED_INDEX="0")
    env.pop("KEEPFS_CONFIG", None)
    new = dict(binaries)["new"]
    uids = []
    for _ in range(2):
        ok, _, _, out, err = run([new, "backup", "-b", "4K", image, "dense"], env)
        if not ok:
            sys.exit(f"backup failed: {err[-300:]}")
        uids.append(out.strip())
    target = os.path.join(tmpfs, "keepfs-dense-delta.img")
    results = {}
    for label, binary in binaries:
        ok, _, _, _, err = run([new, "restore", "--force", uids[0], f"file://{target}"], env)
        if not ok:
            sys.exit(f"restore failed: {err[-300:]}")
        out = {}
        for name, cmd in (("delta restore", ["restore", "--delta-from", uids[0], uids[1], f"file://{target}"]),
                          ("scrub", ["scrub", uids[0]])):
            ok, dt, rss, _, err = run([binary, *cmd], env)
            if not ok:
                sys.exit(f"{label} {size} {name} failed: {err[-300:]}")
            out[name] = (dt, rss)
        results[label] = out
    os.remove(target)
    shutil.rmtree(home, ignore_errors=True)
    return results


ENCRYPTED_STEPS = ["encrypted backup", "scrub", "label", "rekey", "rebuild"]
MOUNT_STEPS = ["mount, cat data: peak", "mount, cat data: anonymous"]
COW_STEPS = ["write 16 blocks, commit: peak", "write 16 blocks, commit: highest anonymous"]


def proc_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def unmount(p, mnt):
    """Unmounts `mnt` and waits for its mount process `p` to end."""
    while p.poll() is None:
        subprocess.run(["fusermount3", "-u", mnt], stderr=subprocess.DEVNULL)
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


def cow_commit(binary, env, p, data, mnt):
    """Writes 16 blocks into the mounted version's `data` and waits for the copy-on-write
    version to be committed (on close); returns (seconds, highest RssAnon in MiB seen
    meanwhile, sampled every 5 ms)."""
    before = len(json.loads(subprocess.run([binary, "ls", "--format", "json"], env=env, capture_output=True,
                                           text=True, check=True).stdout))
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/urandom", f"of={data}", "bs=4096", "count=16", "seek=1000", "conv=notrunc",
                    "status=none"], check=True)
    top = proc_kib(p.pid, "RssAnon")
    while True:
        top = max(top, proc_kib(p.pid, "RssAnon"))
        out = subprocess.run([binary, "ls", "--format", "json"], env=env, capture_output=True, text=True)
        if out.returncode == 0:
            vs = json.loads(out.stdout)
            if len(vs) > before and all(v["status"] == "valid" for v in vs):
                break
        if time.perf_counter() - t > 600:
            sys.exit("the copy-on-write version was not committed within 10 minutes")
        time.sleep(0.005)
    return time.perf_counter() - t, top / 1024


def mounted(binaries, size, image, workdir, cow=False):
    home, env, uid = made_by_new(binaries, f"mount-{size}", image, workdir)
    results = {}
    for label, binary in binaries:
        mnt = os.path.join(home, "mnt")
        os.makedirs(mnt, exist_ok=True)
        log = open(os.path.join(home, "mount.log"), "w")
        p = subprocess.Popen([binary, "mount", mnt], env=env, stdout=subprocess.DEVNULL, stderr=log)
        data = os.path.join(mnt, "by_version", uid, "data")
        t = time.perf_counter()
        while not os.path.exists(data):
            if p.poll() is not None or time.perf_counter() - t > 30:
                sys.exit(f"{label}: mount failed: {open(log.name).read()[-300:]}")
            time.sleep(0.05)
        if cow:
            dt, anon = cow_commit(binary, env, p, data, mnt)
            peak = proc_kib(p.pid, "VmHWM") / 1024
        else:
            t = time.perf_counter()
            subprocess.run(["cat", data], stdout=subprocess.DEVNULL, check=True)
            dt = time.perf_counter() - t
            peak, anon = proc_kib(p.pid, "VmHWM") / 1024, proc_kib(p.pid, "RssAnon") / 1024
        unmount(p, mnt)
        names = COW_STEPS if cow else MOUNT_STEPS
        results[label] = {names[0]: (dt, peak), names[1]: (dt, anon)}
    shutil.rmtree(home, ignore_errors=True)
    return results


INCOMING_STEPS = ["dd into incoming, commit: peak", "dd into incoming, commit: highest anonymous"]


def incoming(binary, label, size, image, workdir):
    home = os.path.join(workdir, f"incoming-{label}-{size}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    conf = os.path.join(home, "keepfs.toml")
    with open(conf, "w") as f:
        f.write('block_size = "4K"\n')
    env = dict(os.environ, KEEPFS_HOME=home, KEEPFS_CONFIG=conf)
    mnt = os.path.join(home, "mnt")
    os.makedirs(mnt)
    log = open(os.path.join(home, "mount.log"), "w")
    p = subprocess.Popen([binary, "mount", mnt], env=env, stdout=subprocess.DEVNULL, stderr=log)
    t = time.perf_counter()
    while not os.path.isdir(os.path.join(mnt, "incoming")):
        if p.poll() is not None or time.perf_counter() - t > 30:
            sys.exit(f"{label}: mount failed: {open(log.name).read()[-300:]}")
        time.sleep(0.05)
    t = time.perf_counter()
    dd = subprocess.Popen(["dd", f"if={image}", f"of={os.path.join(mnt, 'incoming', 'dense')}", "bs=1M",
                           "status=none"])
    top = 0
    while True:
        top = max(top, proc_kib(p.pid, "RssAnon"))
        if dd.poll() is not None:
            if dd.returncode != 0:
                sys.exit(f"{label}: dd into incoming failed")
            out = subprocess.run([binary, "ls", "--format", "json"], env=env, capture_output=True, text=True)
            if out.returncode == 0:
                vs = json.loads(out.stdout)
                if vs and all(v["status"] == "valid" for v in vs):
                    break
        if time.perf_counter() - t > 1800:
            sys.exit("the version was not committed within 30 minutes")
        time.sleep(0.01)
    dt = time.perf_counter() - t
    peak = proc_kib(p.pid, "VmHWM") / 1024
    unmount(p, mnt)
    shutil.rmtree(home, ignore_errors=True)
    return {INCOMING_STEPS[0]: (dt, peak), INCOMING_STEPS[1]: (dt, top / 1024)}


def encrypted(binary, label, size, image, workdir):
    home = os.path.join(workdir, f"encrypted-{label}-{size}")
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    key = os.path.join(home, "master.key")
    env = dict(os.environ, KEEPFS_HOME=home, KEEPFS_TEST_STREAMED_INDEX="0", KEEPFS_KEY_FILE=key)
    env.pop("KEEPFS_CONFIG", None)
    for cmd in (["key", "new", key], ["init", "--encrypt"]):
        ok, _, _, _, err = run([binary, *cmd], env)
        if not ok:
            sys.exit(f"{label} {' '.join(cmd)} failed: {err[-300:]}")
    out = {}
    ok, dt, rss, uid, err = run([binary, "backup", "-b", "4K", image, "dense"], env)
    if not ok:
        sys.exit(f"{label} {size} encrypted backup failed: {err[-300:]}")
    out["encrypted backup"] = (dt, rss)
    uid = uid.strip()
    for name, cmd in (("scrub", ["scrub", uid]), ("label", ["label", uid, "k=v"])):
        ok, dt, rss, _, err = run([binary, *cmd], env)
        if not ok:
            sys.exit(f"{label} {size} {name} failed: {err[-300:]}")
        out[name] = (dt, rss)
    # A key rotation, then the rekey that moves every object (and the version object)
    # to the new key; the rest runs under the new key.
    key2 = os.path.join(home, "second.key")
    for cmd in (["key", "new", key2], ["key", "rotate", "--new-key-file", key2]):
        ok, _, _, _, err = run([binary, *cmd], env)
        if not ok:
            sys.exit(f"{label} {' '.join(cmd)} failed: {err[-300:]}")
    env["KEEPFS_KEY_FILE"] = key2
    ok, dt, rss, _, err = run([binary, "key", "rekey"], env)
    if not ok:
        sys.exit(f"{label} {size} rekey failed: {err[-300:]}")
    out["rekey"] = (dt, rss)
    for f in os.listdir(home):
        if f.startswith("keepfs.sqlite"):
            os.remove(os.path.join(home, f))
    ok, dt, rss, _, err = run([binary, "database", "rebuild"], env)
    if not ok:
        sys.exit(f"{label} {size} rebuild failed: {err[-300:]}")
    out["rebuild"] = (dt, rss)
    shutil.rmtree(home, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", required=True)
    ap.add_argument("--old")
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--workdir", default="/tmp/keepfs-dense-bench")
    ap.add_argument("--tmpfs", default="/dev/shm")
    ap.add_argument("--null-only", action="store_true")
    ap.add_argument("--readers", action="store_true")
    ap.add_argument("--encrypted", action="store_true")
    ap.add_argument("--mount", action="store_true")
    ap.add_argument("--cow", action="store_true")
    ap.add_argument("--incoming", action="store_true")
    ap.add_argument("--cleanup", action="store_true")
    ap.add_argument("--metadata", action="store_true")
    ap.add_argument("--nbd", action="store_true")
    ap.add_argument("--cleanup-memory", default="8M")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    sizes = a.sizes.split(",")
    binaries = [(l, b) for l, b in (("old", a.old), ("new", a.new)) if b and not (a.cleanup and l == "old")]
    results = {}
    blocks = {}
    for size in sizes:
        image = os.path.join(a.tmpfs, f"keepfs-dense-{size}.img")
        blocks[size] = make_image(image, parse_size(size))
        try:
            for label, binary in binaries:
                if a.readers or a.mount or a.metadata or a.nbd:
                    if label == "old":
                        continue
                    made = (mounted(binaries, size, image, a.workdir, a.cow) if a.mount
                            else metadata(binaries, size, image, a.workdir) if a.metadata
                            else nbd(binaries, size, image, a.workdir) if a.nbd
                            else readers(binaries, size, image, a.workdir, a.tmpfs))
                    for lab, out in made.items():
                        results[(lab, size)] = out
                        print(lab, size, {k: f"{v[0]:.1f} s {v[1]:.0f} MiB" for k, v in out.items()}, flush=True)
                    continue
                if a.cleanup:
                    if label == "old":
                        continue
                    results[(label, size)] = cleanup(binary, size, image, a.workdir, a.cleanup_memory)
                elif a.incoming:
                    results[(label, size)] = incoming(binary, label, size, image, a.workdir)
                elif a.encrypted:
                    results[(label, size)] = encrypted(binary, label, size, image, a.workdir)
                else:
                    results[(label, size)] = bench(binary, label, size, image, a.workdir, a.tmpfs, a.null_only)
                print(label, size, {k: f"{v[0]:.1f} s {v[1]:.0f} MiB" for k, v in results[(label, size)].items()},
                      flush=True)
        finally:
            os.remove(image)
    print()
    cols = ["step"] + [f"{l} {s}" for s in sizes for l, _ in binaries]
    if len(sizes) >= 2:
        cols += [f"{l}: bytes/block" for l, _ in binaries]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    steps = (INCOMING_STEPS if a.incoming else NBD_STEPS if a.nbd else METADATA_STEPS if a.metadata else CLEANUP_STEPS if a.cleanup else READER_STEPS if a.readers else ENCRYPTED_STEPS if a.encrypted else (COW_STEPS if a.cow else MOUNT_STEPS) if a.mount
             else STEPS[:1] if a.null_only else STEPS)
    for st in steps:
        row = [st]
        for s in sizes:
            for l, _ in binaries:
                dt, rss = results[(l, s)][st]
                row.append(f"{dt:.1f} s, {rss:.0f} MiB")
        if len(sizes) >= 2:
            lo, hi = sizes[0], sizes[-1]
            for l, _ in binaries:
                d = (results[(l, hi)][st][1] - results[(l, lo)][st][1]) * 2**20 / (blocks[hi] - blocks[lo])
                row.append(f"{d:.0f}")
        print(" | ".join(row))


if __name__ == "__main__":
    main()
