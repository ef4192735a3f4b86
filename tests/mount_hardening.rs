//! What independent tools and fault drills did to the mount: a close that commits while
//! others list, rename and stat (it used to deadlock), fio's write-close-reopen-verify on
//! copy-on-write, sparse versions that must look sparse to `stat`, `du` and `cp`, and a
//! full disk that must say so. Needs root and /dev/fuse (CI has both).

mod common;
use common::mount::{Mount, wait_until};
use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// A configuration whose storage writes at most 4 MB/s: every commit of a few MiB takes
/// long enough for the other threads to run into it.
fn slow_commit_config(repo: &Repo) -> String {
    let path = repo.path("slow.toml");
    let home = repo.home();
    fs::write(
        &path,
        format!(
            "home = \"{h}\"\nblock_size = \"1M\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\n\
             path = \"{h}/storage\"\nwrite_bandwidth = \"4M\"\n",
            h = home.display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `work` and fails the test if it does not finish within `limit`: a wedged mount
/// is killed (so that the stuck threads return) and named as the failure.
fn within_deadline(m: &mut Mount, limit: Duration, what: &str, work: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        work();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if let Some(c) = m.child.as_mut() {
                let _ = c.kill();
            }
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&m.dir).status();
            panic!("{what} did not finish within {limit:?}: the mount is wedged\n{}", m.log_text());
        }
    }
}

/// Issue 9.1: `ls incoming/`, `mv` within it, `stat` and listings of by_version/ while
/// writers (`cp` into incoming/, writes to a version's data) close and commit.
#[test]
fn listing_renaming_and_stat_while_writers_commit_never_wedge_the_mount() {
    let repo = Repo::new();
    let cfg = slow_commit_config(&repo);
    fs::write(repo.path("base.img"), random_bytes(5, 4 << 20)).unwrap();
    let base = repo.ok(&["--config", &cfg, "backup", &repo.url("base.img"), "base"]).trim().to_string();
    let mut m = Mount::new(&repo, &["--config", &cfg]);
    let dir = m.dir.clone();
    let rounds = 6;
    let expected: Vec<(String, String)> = (0..rounds)
        .map(|r| {
            let data = random_bytes(100 + r, 3 << 20);
            let name = format!("w{r}");
            let p = repo.path(&name);
            fs::write(&p, &data).unwrap();
            (name, sha256_file(&p))
        })
        .collect();
    let src: Vec<_> = expected.iter().map(|(n, _)| repo.path(n)).collect();
    let base_uid = base.clone();
    let hammered = Arc::new(AtomicUsize::new(0));
    let counter = hammered.clone();
    within_deadline(&mut m, Duration::from_secs(240), "writers closing beside ls/mv/stat", move || {
        let inc = dir.join("incoming");
        for (r, src) in src.iter().enumerate() {
            // A file created and left unwritten stays in incoming/ for mv to move about.
            let tmp = inc.join(format!("tmp{r}"));
            fs::File::create(&tmp).unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let mut threads = Vec::new();
            {
                let (src, inc, done) = (src.clone(), inc.clone(), done.clone());
                threads.push(std::thread::spawn(move || {
                    let mut f = fs::File::create(inc.join(format!("w{r}"))).unwrap();
                    f.write_all(&fs::read(&src).unwrap()).unwrap();
                    drop(f); // the slow commit happens here
                    done.store(true, Ordering::SeqCst);
                }));
            }
            {
                let (dir, base, done) = (dir.clone(), base_uid.clone(), done.clone());
                threads.push(std::thread::spawn(move || {
                    let data = dir.join(format!("by_version/{base}/data"));
                    let f = fs::OpenOptions::new().write(true).open(&data).unwrap();
                    std::os::unix::fs::FileExt::write_all_at(&f, &random_bytes(200 + r as u64, 2 << 20), 1 << 20)
                        .unwrap();
                    drop(f); // a copy-on-write commit
                    while !done.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                }));
            }
            for k in 0..3 {
                let (dir, inc, done, counter) = (dir.clone(), inc.clone(), done.clone(), counter.clone());
                threads.push(std::thread::spawn(move || {
                    let (a, b) = (inc.join(format!("tmp{r}")), inc.join(format!("tmp{r}-moved")));
                    while !done.load(Ordering::SeqCst) {
                        match k {
                            0 => {
                                for e in fs::read_dir(&inc).unwrap().flatten() {
                                    let _ = fs::metadata(e.path());
                                }
                            }
                            1 => {
                                if fs::rename(&a, &b).is_ok() {
                                    fs::rename(&b, &a).unwrap();
                                }
                            }
                            _ => {
                                for e in fs::read_dir(dir.join("by_version")).unwrap().flatten() {
                                    let _ = fs::metadata(e.path().join("data"));
                                }
                            }
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in threads {
                t.join().unwrap();
            }
            fs::remove_file(&tmp).unwrap();
        }
    });
    assert!(hammered.load(Ordering::Relaxed) >= rounds as usize * 3, "the other threads ran");
    drop(m);
    for (name, sha) in &expected {
        let uids = repo.valid_uids(&format!("name == \"{name}\""));
        assert_eq!(uids.len(), 1, "{name}: {uids:?}");
        assert_eq!(&repo.restore_sha(&uids[0], &format!("{name}.out")), sha, "{name}");
    }
    let cows = repo.cow_versions(&base);
    assert_eq!(cows.len(), rounds as usize, "one copy-on-write version per round: {cows:?}");
    assert!(repo.valid_uids("name == \"tmp0\"").is_empty(), "unwritten files are no versions");
}

/// Issue 9.2: fio writes a version's data, closes it, reopens it in the same process and
/// verifies every block. The reopen continues the overlay, so fio reads what it wrote,
/// and a job that writes again replaces the version its first close made.
#[test]
fn fio_write_then_verify_on_a_versions_data() {
    fio_write_then_verify(&[]);
}

/// The same through the page cache: the writer's handle is cached (it is the file's only
/// handle), and afterwards the file shows the original, not the overlay's cached pages.
#[test]
fn fio_write_then_verify_through_the_page_cache() {
    fio_write_then_verify(&["--page-cache"]);
}

fn fio_write_then_verify(mount_args: &[&str]) {
    if Command::new("fio").arg("--version").output().is_err() {
        panic!("fio is not installed (apt-get install fio; .ci/run installs it)");
    }
    let repo = Repo::new();
    let img = mixed_image(9, 16, 1 << 20, 0);
    fs::write(repo.path("vm.img"), &img).unwrap();
    let uid = repo.backup("vm.img", "vm", &["-b", "1M"]);
    let m = Mount::new(&repo, mount_args);
    let data = m.p(&format!("by_version/{uid}/data"));
    for (job, rw) in [("seq", "write"), ("rand", "randwrite")] {
        let out = Command::new("fio")
            .args([
                &format!("--name={job}"),
                &format!("--filename={}", data.display()),
                &format!("--rw={rw}"),
                "--bs=64k",
                "--size=8M",
                "--offset=4M",
                "--ioengine=psync",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--randrepeat=1",
                "--output-format=terse",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fio {job}: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            m.log_text()
        );
    }
    // The original is untouched; the writes are new versions of vm, whose bytes outside
    // fio's range are the original's.
    let before = sha256_file(&repo.path("vm.img"));
    assert_eq!(sha256_file(&data), before, "by_version/{uid}/data is the original again");
    let cows = repo.cow_versions(&uid);
    assert!(!cows.is_empty() && cows.len() <= 2, "one version per fio job at most: {cows:?}");
    let last = cows.last().unwrap();
    let out = repo.path("last.img");
    repo.ok(&["restore", last, &format!("file://{}", out.display())]);
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), img.len());
    assert_eq!(got[..4 << 20], img[..4 << 20], "before fio's range");
    assert_eq!(got[12 << 20..], img[12 << 20..], "after fio's range");
    assert_ne!(got[4 << 20..12 << 20], img[4 << 20..12 << 20], "fio's pattern is stored");
    // What the mount shows under the new version is what was restored.
    assert_eq!(sha256_file(&m.p(&format!("by_version/{last}/data"))), sha256_file(&out));
    let deep = repo.run(&["deep-scrub", last]);
    assert_eq!(deep.code, 0, "{}", deep.stderr);
}

/// Issue 9.3: a mostly sparse version occupies what its data blocks hold, so `du`,
/// `stat` and coreutils `cp` (which looks for holes only when st_blocks is small) treat
/// it as sparse.
#[test]
fn a_sparse_version_looks_sparse_to_stat_du_and_cp() {
    const MIB: u64 = 1 << 20;
    let repo = Repo::new();
    let img = repo.path("thin.img");
    sparse_file(&img, 1024 * MIB, &[(5 * MIB, &random_bytes(1, MIB as usize)), (700 * MIB, &random_bytes(2, 3000))]);
    let uid = repo.backup("thin.img", "thin", &["-b", "1M"]);
    let m = Mount::new(&repo, &[]);
    let data = m.p(&format!("by_version/{uid}/data"));
    let meta = fs::metadata(&data).unwrap();
    assert_eq!(meta.len(), 1024 * MIB);
    assert_eq!(meta.blocks() * 512, 2 * MIB, "two data blocks, not 1 GiB");
    let du = Command::new("du").arg("-k").arg(&data).output().unwrap();
    let kib: u64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(kib, 2048, "du of two 1 MiB blocks");
    let copy = repo.path("copy.img");
    let out = Command::new("cp").arg(&data).arg(&copy).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256_file(&copy), sha256_file(&img));
    assert!(fs::metadata(&copy).unwrap().blocks() * 512 < 8 * MIB, "cp wrote holes, not 1 GiB of zeros");
}

/// Issue 9.4: `cp` into incoming/ on a full disk fails with "No space left on device",
/// leaves no incomplete version behind, and after `cleanup` the repository takes
/// backups again.
#[test]
fn a_full_disk_through_the_mount_is_enospc_and_leaves_nothing_half_made() {
    let repo = Repo::new();
    let home = repo.home();
    fs::create_dir_all(&home).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&home).status().unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _tmpfs = Unmount(home.clone());
    repo.ok(&["init"]);
    let big = repo.path("big.img");
    fs::write(&big, random_bytes(3, 64 << 20)).unwrap();
    let m = Mount::new(&repo, &[]);
    let out = Command::new("cp").arg(&big).arg(m.p("incoming/big")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cp of 64 MiB into 24 MiB succeeded?");
    assert!(err.contains("No space left on device"), "cp said: {err}\nmount log: {}", m.log_text());
    // The log says why once, not twice over ("…: No space left on device (os error 28):
    // No space left on device (os error 28)").
    // (Which line says it depends on where the write failed: a block's, or the backup's.)
    let log = m.log_text();
    for said in log.lines().filter(|l| l.contains("No space left on device")) {
        assert_eq!(said.matches("No space left on device").count(), 1, "{said}");
    }
    wait_until("the failed backup to be gone from incoming/", LIMIT, || !m.p("incoming/big").exists());
    let all = repo.ls_json(None);
    assert_eq!(all.as_array().unwrap().len(), 0, "nothing half-made is left: {all}");
    drop(m);
    repo.ok(&["cleanup"]);
    fs::write(repo.path("small.img"), random_bytes(4, 1 << 20)).unwrap();
    let uid = repo.backup("small.img", "small", &[]);
    assert_eq!(repo.restore_sha(&uid, "small.out"), sha256_file(&repo.path("small.img")));
}

/// `mount --allow-other --uid U --gid G --mode 0640` opens the mount to one service user
/// (libvirt's qemu) and to nobody else: the kernel checks the owner and modes given.
#[test]
fn allow_other_lets_the_named_user_in_and_nobody_else() {
    let repo = Repo::new();
    fs::write(repo.path("vm.img"), random_bytes(21, 3 << 20)).unwrap();
    let uid = repo.backup("vm.img", "vm", &[]);
    // The test's own temporary directory must be passable for the other users.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(repo.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let m = Mount::new(&repo, &["--allow-other", "--uid", "65534", "--gid", "65534", "--mode", "0640"]);
    let data = m.p(&format!("by_version/{uid}/data"));
    let meta = fs::metadata(&data).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (65534, 65534, 0o640));
    assert_eq!(fs::metadata(m.p("by_version")).unwrap().mode() & 0o777, 0o550);
    let as_user = |uid: u32, cmd: &str| {
        Command::new("setpriv")
            .args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups", "sh", "-c", cmd])
            .output()
            .unwrap()
    };
    let read = as_user(65534, &format!("sha256sum < {}", data.display()));
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    assert!(String::from_utf8_lossy(&read.stdout).starts_with(&sha256_file(&repo.path("vm.img"))));
    let other = as_user(12345, &format!("cat {} > /dev/null", data.display()));
    assert!(!other.status.success(), "another user was let in");
    assert!(String::from_utf8_lossy(&other.stderr).contains("Permission denied"), "{:?}", other);
}

/// `--page-cache` with writers. A writer that is the file's only handle is cached: it
/// reads its writes back from memory and can write through a shared mapping, and a
/// handle that attaches to its overlay shares that view. After its close no handle of the
/// original reads the overlay's pages. A reader of the original that was open before a
/// writer keeps reading the original (the writer then reads and writes directly).
#[test]
fn page_cache_never_shows_an_overlays_bytes_to_readers_of_the_original() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let repo = Repo::new();
    let img = mixed_image(31, 8, 1 << 20, 0);
    fs::write(repo.path("vm.img"), &img).unwrap();
    let original = sha256_file(&repo.path("vm.img"));
    let uid = repo.backup("vm.img", "vm", &["-b", "1M"]);
    let m = Mount::new(&repo, &["--page-cache"]);
    let data = m.p(&format!("by_version/{uid}/data"));
    let at = 1usize << 20;
    // Another process warms the page cache with the original.
    assert_eq!(sha256_of(&data), original);

    let w = fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
    w.write_all_at(&[0x55; 65536], at as u64).unwrap();
    let mut buf = vec![0u8; 65536];
    w.read_exact_at(&mut buf, at as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55), "the writer reads its own writes");
    let len = 4 << 20;
    // SAFETY: a fresh shared mapping of the open file, unmapped below; the offsets lie
    // inside its `len` bytes.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            w.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "a shared mapping of the only writer's handle: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(*(p as *const u8).add(at), 0x55, "the mapping shows the overlay");
        std::ptr::write_bytes((p as *mut u8).add(2 << 20), 0x66, 4096);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "{}", std::io::Error::last_os_error());
        libc::munmap(p, len);
    }
    // Another process opening the file meanwhile shares the overlay, mapped writes too.
    let out = Command::new("dd")
        .args([&format!("if={}", data.display()), "bs=4096", "skip=512", "count=1", "status=none"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, vec![0x66; 4096], "{}", String::from_utf8_lossy(&out.stderr));
    drop(w);
    wait_until("the copy-on-write version", LIMIT, || repo.cow_versions(&uid).len() == 1);
    // Read by another process: the writer's own process would get its new version back
    // for a few seconds (the reopen continuation of tools that close and reopen).
    assert_eq!(sha256_of(&data), original, "the original, not the overlay's pages");
    let mut want = img.clone();
    want[at..at + 65536].fill(0x55);
    want[2 << 20..(2 << 20) + 4096].fill(0x66);
    let cow = repo.cow_versions(&uid)[0].clone();
    assert!(fs::read(m.p(&format!("by_version/{cow}/data"))).unwrap() == want, "the new version holds both writes");

    // A reader of the original open before a writer of another version's file: it keeps
    // reading the original while the writer writes (directly) and after.
    let cow_data = m.p(&format!("by_version/{cow}/data"));
    let r = fs::File::open(&cow_data).unwrap();
    r.read_exact_at(&mut buf, at as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55));
    let w = fs::OpenOptions::new().write(true).open(&cow_data).unwrap();
    w.write_all_at(&[0x77; 65536], at as u64).unwrap();
    r.read_exact_at(&mut buf, at as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55), "the earlier reader still reads the original");
    drop(w);
    wait_until("the second copy-on-write version", LIMIT, || repo.cow_versions(&cow).len() == 1);
    r.read_exact_at(&mut buf, at as u64).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55), "and after the writer's version was made");
    drop(r);
    let want_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&want))
    };
    assert_eq!(sha256_of(&cow_data), want_sha, "the file is still the version it names");
}

/// sha256 of a file as another process (coreutils) reads it.
fn sha256_of(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// fsx and `qemu-io write -P` write the same bytes into several blocks at once, then read
/// them back: the copies are found while the first is still being stored, and reading
/// one gave EIO ("object … is missing") until that object existed; a write into one
/// then lost the whole file. A `kill -9` of the mount also left its drafts' spool files
/// in the spool directory for ever.
#[test]
fn blocks_alike_read_back_through_the_mount_and_a_killed_mount_leaves_no_spool() {
    let repo = Repo::new();
    let cfg = repo.path("small.toml");
    fs::write(
        &cfg,
        format!(
            "home = \"{h}\"\nblock_size = \"64K\"\nspool_memory = \"256K\"\nspool_size = \"1M\"\n\
             [[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{h}/storage\"\n",
            h = repo.home().display()
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let mut m = Mount::new(&repo, &["--config", &cfg]);
    use std::os::unix::fs::FileExt;
    let mut model = Vec::new();
    {
        let f = fs::OpenOptions::new().read(true).write(true).create_new(true).open(m.p("incoming/alike")).unwrap();
        for round in 0..20u64 {
            let block = random_bytes(700 + round, 64 << 10);
            let two = block.repeat(2);
            let at = model.len() as u64;
            f.write_all_at(&two, at).unwrap();
            model.extend_from_slice(&two);
            let mut back = vec![0u8; 1];
            f.read_exact_at(&mut back, at + (64 << 10)).unwrap();
            assert_eq!(back[0], block[0], "round {round}");
            f.write_all_at(b"x", at + (64 << 10) + 10).unwrap();
            model[at as usize + (64 << 10) + 10] = b'x';
        }
    }
    wait_until("the copy to become a version", LIMIT, || repo.ls_json(None).as_array().is_some_and(|a| a.len() == 1));
    let uid = repo.ls_json(None)[0]["uid"].as_str().unwrap().to_string();
    let out = repo.path("out");
    repo.ok(&["restore", &uid, &repo.url("out")]);
    assert!(fs::read(&out).unwrap() == model, "the version differs from what was written");

    // A draft spilling into its spool when the mount is killed: nothing stays behind.
    let f = fs::OpenOptions::new().write(true).create_new(true).open(m.p("incoming/killed")).unwrap();
    for k in 0..64u64 {
        f.write_all_at(&random_bytes(800 + k, 1000), k * (64 << 10) + 7).unwrap();
    }
    if let Some(c) = m.child.as_mut() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    drop(f);
    let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&m.dir).status();
    let spool = repo.home().join("spool");
    let left: Vec<_> = fs::read_dir(&spool).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", spool.display());
}
