//! Real processes, real faults: a backup killed with SIGKILL, and cleanups racing a
//! running backup that deduplicates against objects no version references. A backup is
//! stopped in the state a test needs ([`Repo::freeze_backup`]) instead of being raced
//! against: on a loaded machine it is slower, on a fast one faster, never in between.

mod common;
use common::*;
use std::fs;

#[test]
fn kill_9_during_backup_leaves_an_incomplete_version_and_a_consistent_repository() {
    let repo = Repo::new();
    // 4k blocks of random data: thousands of small objects, each fsynced, so the backup
    // is still running when it is killed.
    fs::write(repo.path("img"), random_bytes(21, 48 << 20)).unwrap();
    let url = repo.url("img");
    let mut child = repo.command(&["backup", &url, "victim", "-b", "4k"]).spawn().unwrap();
    let frozen = repo.freeze_backup(&child, "objects to be written and some recorded", |s| {
        s.status.as_deref() == Some("incomplete") && s.stored >= 300 && s.recorded > 0
    });
    child.kill().unwrap(); // SIGKILL, mid-backup
    frozen.resume();
    child.wait().unwrap();

    let versions = repo.ls_json(None);
    let v = &versions.as_array().unwrap()[0];
    assert_eq!(v["status"], "incomplete", "{v}");
    let uid = v["uid"].as_str().unwrap().to_string();
    let r = repo.run(&["restore", &uid, &repo.url("out")]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("incomplete") && r.error_line().contains("keepfs rm"), "{}", r.stderr);
    assert!(!repo.path("out").exists(), "a refused restore writes nothing");

    // A cleanup now spares everything the killed run stored, for `backup --continue`,
    // and says so: every file in the storage is counted somewhere in its report (the
    // files of the killed run's unrecorded placeholders used to be kept unsaid).
    let r = repo.run(&["cleanup", "--dry-run", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    let plan = &plan["storages"][0];
    assert_eq!((plan["objects"].as_u64(), plan["orphans"].as_u64()), (Some(0), Some(0)), "{plan}");
    let counted: u64 = ["referenced", "unfinished", "kept_recent", "kept_for_continue", "kept_unrecorded"]
        .iter()
        .map(|k| plan[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {plan}")))
        .sum();
    let files = repo.block_objects() as u64;
    assert!(files > 0 && counted >= files, "{files} file(s), {counted} counted: {plan}");
    assert!(plan["spared"].to_string().contains(&uid), "{plan}");

    // The next backup of the same image completes and restores byte-identical; what the
    // killed run stored durably is deduplicated against.
    let good = repo.backup("img", "victim", &["-b", "4k"]);
    assert_ne!(good, uid);
    let stats = &repo.version(&good)["stats"];
    assert!(stats["bytes_deduplicated"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(repo.restore_sha(&good, "out"), sha256_file(&repo.path("img")));

    // Removing the incomplete version needs no --force (it never became a backup), and
    // cleanup then leaves a storage with exactly the objects the good version needs.
    repo.ok(&["rm", &uid]);
    let bytes =
        || -> u64 { files_under(&repo.storage().join("blocks")).iter().map(|f| f.metadata().unwrap().len()).sum() };
    let before = bytes();
    let files_before = repo.block_objects() as u64;
    let stale = repo.storage().join("tmp").join("stale.upload");
    fs::write(&stale, b"left by a killed write").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::options().write(true).open(&stale).unwrap().set_modified(an_hour_ago).unwrap();
    let temporaries = count_files(&repo.storage().join("tmp")) as u64;
    let r = repo.run(&["cleanup", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let done: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    // What it says it freed is what the storage lost, the killed run's unrecorded files
    // included (they used to be deleted uncounted).
    assert_eq!(done["storages"][0]["bytes_freed"].as_u64(), Some(before - bytes()), "{done}");
    let index_objects = {
        let obj = fs::read(repo.storage().join("versions").join(&good)).unwrap();
        let (_, index) = keepfs::repo::decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
        index.entries.iter().filter(|e| !e.is_sparse()).collect::<std::collections::HashSet<_>>().len()
    };
    assert_eq!(repo.block_objects(), index_objects);
    // Every file it deleted is counted, and said: the killed run's files of blocks it
    // never recorded too (a drill saw "deleted 0 object(s) and 0 orphaned file(s), freed
    // 8.0 MiB").
    let s = &done["storages"][0];
    let counted: u64 = ["objects_deleted", "orphans_deleted", "unfinished_files_deleted"]
        .iter()
        .map(|k| s[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {s}")))
        .sum();
    assert_eq!(counted, files_before - index_objects as u64, "{s}");
    assert_eq!(count_files(&repo.storage().join("tmp")), 0, "temporary files of the killed run are purged");
    // … and counted (a drill saw one removed and "0 orphaned file(s)" said).
    assert_eq!(done["storages"][0]["temporaries_deleted"].as_u64(), Some(temporaries), "{done}");
    assert_eq!(repo.restore_sha(&good, "out"), sha256_file(&repo.path("img")));
}

#[test]
fn cleanup_running_during_a_backup_never_deletes_what_the_backup_uses() {
    let repo = Repo::new();
    let old = random_bytes(31, 8 << 20);
    fs::write(repo.path("old"), &old).unwrap();
    let gone = repo.backup("old", "vm", &["-b", "4k"]);
    repo.ok(&["rm", "--force", &gone]);
    // Every object of `old` is now unreferenced: exactly what a cleanup deletes and what
    // the next backup deduplicates against.
    let mut new = random_bytes(32, 6 << 20);
    new.extend_from_slice(&old);
    new.extend_from_slice(&random_bytes(33, 2 << 20));
    fs::write(repo.path("new"), &new).unwrap();
    let url = repo.url("new");
    let unreferenced = repo.block_objects();
    let mut child =
        repo.command(&["backup", &url, "vm", "-b", "4k"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut cleanups = 0;
    let mut deleted_during_backup = 0u64;
    // The first cleanup runs while the backup is stopped early in the new data before
    // `old` (one reader goes through the image in order, at most 256 blocks ahead of what
    // it stored): the objects of `old` are unreferenced and not yet deduplicated against.
    let mut frozen = Some(repo.freeze_backup(&child, "the backup to store its first objects", |s| {
        let new_objects = s.stored.saturating_sub(unreferenced);
        s.status.as_deref() == Some("incomplete") && (1..1000).contains(&new_objects)
    }));
    loop {
        let r = repo.run(&["cleanup"]);
        if let Some(f) = frozen.take() {
            f.resume();
        }
        assert_eq!(r.code, 0, "{}", r.stderr);
        cleanups += 1;
        deleted_during_backup += r
            .stdout
            .split("deleted ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if child.try_wait().unwrap().is_some() {
            break;
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let uid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(cleanups >= 2, "cleanup ran {cleanups} times during the backup");
    assert!(deleted_during_backup > 0, "the cleanups deleted nothing: the race was not exercised");
    repo.ok(&["cleanup"]);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("new")));
}

#[test]
fn ls_works_while_a_backup_holds_the_database() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(41, 24 << 20)).unwrap();
    let url = repo.url("img");
    let mut child = repo.command(&["backup", &url, "busy", "-b", "4k"]).spawn().unwrap();
    let frozen = repo.freeze_backup(&child, "the backup to store objects", |s| {
        s.status.as_deref() == Some("incomplete") && s.stored > 10
    });
    let listed = repo.ls_json(None);
    assert_eq!(listed[0]["status"], "incomplete");
    // A running backup's version cannot be removed, even with --force.
    let uid = listed[0]["uid"].as_str().unwrap().to_string();
    let r = repo.run(&["rm", "--force", &uid]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("being backed up"), "{}", r.stderr);
    frozen.resume();
    assert!(child.wait().unwrap().success());
    assert_eq!(repo.version(&uid)["status"], "valid");
}

#[test]
fn a_source_truncated_during_the_backup_gives_a_clear_error_and_no_valid_version() {
    let repo = Repo::new();
    // A large sparse file with a few bytes of data in every 4 MiB block, different in
    // each (holes alone are not read at all): every block is mapped, hashed and stored,
    // so the objects stored tell how far the backup is; little disk space.
    let img = repo.path("shrinking");
    let blocks = (16u64 << 30) / (4 << 20);
    let marks: Vec<[u8; 8]> = (0..blocks).map(|b| b.to_le_bytes()).collect();
    let bytes: Vec<(u64, &[u8])> = marks.iter().enumerate().map(|(b, m)| (b as u64 * (4 << 20), &m[..])).collect();
    let f = sparse_file(&img, 16 << 30, &bytes);
    let url = repo.url("shrinking");
    let child = repo.command(&["backup", &url, "shrinks"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Stopped with most of the image still to read, truncated, continued.
    let frozen = repo.freeze_backup(&child, "the backup to be reading", |s| {
        s.status.as_deref() == Some("incomplete") && s.stored >= 1 && (s.stored as u64) < blocks / 2
    });
    f.set_len(1 << 20).unwrap();
    frozen.resume();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("shrank"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("keepfs: error:")).count(), 1, "{stderr}");
    assert_eq!(repo.ls_json(None)[0]["status"], "incomplete");
}

#[test]
fn a_killed_backup_is_continued() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(51, 40 << 20)).unwrap();
    let url = repo.url("img");
    let mut child = repo.command(&["backup", &url, "cont", "-b", "4k", "-l", "k=v"]).spawn().unwrap();
    let frozen = repo.freeze_backup(&child, "objects to be written and some recorded", |s| {
        s.status.as_deref() == Some("incomplete") && s.stored >= 400 && s.recorded > 0
    });
    child.kill().unwrap();
    frozen.resume();
    child.wait().unwrap();
    let uid = repo.ls_json(None)[0]["uid"].as_str().unwrap().to_string();
    let stored_before = repo.block_objects();

    // Wrong name, a changed source, an unknown uid: one-line errors, nothing changes.
    fs::write(repo.path("other"), random_bytes(52, 1 << 20)).unwrap();
    let other = repo.url("other");
    for (args, needle) in [
        (vec!["backup", "--continue", &uid, &url, "wrong-name"], "not 'wrong-name'"),
        (vec!["backup", "--continue", &uid, &other, "cont"], "the source changed"),
        (vec!["backup", "--continue", "V0000000099", &url, "cont"], "does not exist"),
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains(needle), "{args:?}: {}", r.stderr);
    }
    assert_eq!(repo.version(&uid)["status"], "incomplete");

    // Two continuations of one version at once: the second is refused.
    let first = repo
        .command(&["backup", "--continue", &uid, &url, "cont"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let frozen = repo.freeze_backup(&first, "the first continuation to take the version over", |s| {
        s.status.as_deref() == Some("incomplete") && s.owner_pid == Some(first.id())
    });
    let second = repo.run(&["backup", "--continue", &uid, &url, "cont"]);
    assert_eq!(second.code, 4, "{}", second.stderr);
    assert!(second.error_line().contains("being written by another running backup"), "{}", second.stderr);
    // Naming it, so that an admin can tell whether it still runs.
    assert!(second.error_line().contains(&format!("(pid {} on ", first.id())), "{}", second.stderr);
    assert!(second.error_line().contains("last heartbeat"), "{}", second.stderr);
    frozen.resume();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), uid, "the same version is finished");

    let v = repo.version(&uid);
    assert_eq!(v["status"], "valid");
    assert_eq!(v["labels"]["k"], "v");
    // Blocks the killed run stored and recorded (rows follow each durable batch) are not
    // written again; files it wrote after its last recorded batch are, harmlessly.
    let dedup = v["stats"]["bytes_deduplicated"].as_u64().unwrap();
    let written = v["stats"]["bytes_written"].as_u64().unwrap();
    assert!(dedup > 0, "{v}");
    assert_eq!(dedup + written, 40 << 20, "{v}");
    assert!(stored_before > 0);
    assert_eq!(repo.restore_sha(&uid, "o"), sha256_file(&repo.path("img")));
    // Continuing a valid version is refused.
    let r = repo.run(&["backup", "--continue", &uid, &url, "cont"]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("only an incomplete version can be continued"), "{}", r.stderr);
}

/// A cleanup stopped right after it marked a batch of objects for deletion (its mark
/// committed, its deletes not yet done or under way) holds those objects; a backup that
/// needs the same blocks meets the marks. Whether the cleanup then goes on or is killed
/// with SIGKILL, the backup stores the blocks anew, its version restores byte-identical,
/// and later cleanups delete nothing it needs.
fn backup_meets_blocks_a_cleanup_is_deleting(kill_cleanup: bool) {
    let repo = Repo::new();
    // 1,024 objects of 4 KiB: four batches of the cleanup's 256.
    fs::write(repo.path("img"), random_bytes(41, 4 << 20)).unwrap();
    let gone = repo.backup("img", "vm", &["-b", "4k"]);
    repo.ok(&["rm", "--force", &gone]);

    // The cleanup stalls for a while after each mark (a test build's fault point), so that
    // it is stopped there, not raced.
    let mut cleanup = repo
        .command(&["cleanup"])
        .env("KEEPFS_TEST_CLEANUP_STALL_MS", "3000")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stopped = repo.freeze_backup(&cleanup, "the cleanup to mark its first batch", |s| s.deleting > 0);

    let url = repo.url("img");
    let mut backup = repo
        .command(&["backup", &url, "vm", "-b", "4k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The backup looks its blocks up and meets the marks: it says that it waits.
    let (said_tx, said) = std::sync::mpsc::channel();
    let stderr = backup.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("waiting for a cleanup") {
                let _ = said_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    said.recv_timeout(POLL_LIMIT).expect("the backup never said it waits for the cleanup");
    // While the cleanup is stopped, what it marked stays marked: the backup writes none of it.
    let marked = repo.deleting_objects();
    assert!(marked > 0, "the cleanup's marks are gone while it is stopped");
    assert!(backup.try_wait().unwrap().is_none(), "the backup finished while the cleanup held its blocks");
    if kill_cleanup {
        cleanup.kill().unwrap(); // SIGKILL while stopped: its marks stay, its session dies
    }
    stopped.resume();
    let status = cleanup.wait().unwrap();
    assert_eq!(status.success(), !kill_cleanup, "cleanup: {status:?}");

    let out = backup.wait_with_output().unwrap();
    let stderr = reader.join().unwrap();
    assert!(out.status.success(), "backup: {stderr}");
    let uid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));

    // The next cleanup finishes what a killed one left and deletes nothing referenced.
    repo.ok(&["cleanup"]);
    assert_eq!(repo.block_objects(), 1024, "exactly the version's objects are left");
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));
    let r = repo.run(&["deep-scrub", &uid]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_backup_waits_for_a_cleanup_that_is_deleting_its_blocks() {
    backup_meets_blocks_a_cleanup_is_deleting(false);
}

#[test]
fn a_cleanup_killed_after_marking_leaves_marks_that_a_backup_and_the_next_cleanup_finish() {
    backup_meets_blocks_a_cleanup_is_deleting(true);
}

/// A full disk where the backup writes its block index (`$KEEPFS_HOME/spool`, here a
/// tmpfs of 1 MiB, too small for the ids of 40,000 blocks): one line naming the
/// directory and the cause, exit 1, the version left incomplete and nothing left in the
/// spool; once there is room, `--continue` finishes it and it restores byte-identical.
#[test]
fn a_full_spool_stops_a_backup_with_a_clear_error_and_continue_finishes_it() {
    let repo = Repo::new();
    let spool = repo.home().join("spool");
    fs::create_dir_all(&spool).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&spool)
        .status()
        .expect("mount runs; this test needs root (CI runs as root)");
    assert!(mounted.success(), "mounting a tmpfs needs root (CI runs as root)");
    let img: Vec<u8> = (0..40_000u64)
        .flat_map(|i| {
            let mut b = vec![1u8; 4096];
            b[..8].copy_from_slice(&i.to_le_bytes());
            b
        })
        .collect();
    fs::write(repo.path("img"), &img).unwrap();
    let r = repo.run(&["backup", &repo.url("img"), "vm", "-b", "4k"]);
    let free = std::process::Command::new("umount").arg(&spool).status();
    assert!(free.is_ok_and(|s| s.success()));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("keepfs: error")).count(), 1, "{}", r.stderr);
    assert!(
        r.error_line().contains(&format!("cannot write the block index file in {}", spool.display())),
        "{}",
        r.stderr
    );
    assert!(r.error_line().contains("No space left on device"), "{}", r.stderr);
    let uid = repo.ls_json(None)[0]["uid"].as_str().unwrap().to_string();
    assert_eq!(repo.version(&uid)["status"], "incomplete");
    repo.ok(&["backup", "--continue", &uid, &repo.url("img"), "vm", "-b", "4k"]);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));
    assert_eq!(fs::read_dir(&spool).unwrap().count(), 0);

    // A rebuild keeps a large version object's index in the spool too (every object is
    // large with the threshold at nothing): a full spool stops it with one line naming
    // the directory and the way on, and the next run, with room, finishes it.
    let streamed = [("KEEPFS_TEST_STREAMED_INDEX", "0")];
    let r = repo.run_env(&["metadata", "backup"], &streamed); // written again, the large way
    assert_eq!(r.code, 0, "{}", r.stderr);
    let object = fs::read(repo.storage().join("versions").join(&uid)).unwrap();
    assert_eq!(u16::from_le_bytes([object[12], object[13]]), 0, "stored uncompressed");
    repo.lose_catalog();
    let mounted =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(&spool).status();
    assert!(mounted.is_ok_and(|s| s.success()));
    let r = repo.run_env(&["database", "rebuild"], &streamed);
    let free = std::process::Command::new("umount").arg(&spool).status();
    assert!(free.is_ok_and(|s| s.success()));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("keepfs: error")).count(), 1, "{}", r.stderr);
    let line = r.error_line();
    assert!(line.contains(&format!("cannot write the block index file in {}", spool.display())), "{line}");
    assert!(line.contains("No space left on device") && line.contains("run `keepfs database rebuild` again"), "{line}");
    let r = repo.run_env(&["database", "rebuild"], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));
    assert_eq!(fs::read_dir(&spool).unwrap().count(), 0);
}

/// A tmpfs of `size` mounted on `dir` for the life of the guard (tests run as root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs; this test needs root (CI runs as root)");
        assert!(st.success(), "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(dir.to_path_buf())
    }

    /// Fills it: a file written until the file system refuses another byte.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..1]).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk under the catalog says so. `database migrate --to` a file on a full file
/// system fails naming the target and leaves no file there (a drill found a 4 KiB
/// `new.sqlite` left, refusing the retry as "the file exists", and an error that read as
/// if the repository's own catalog were full); with room, the retry migrates. A home
/// whose file system is full fails every command with "its file system is full", not
/// SQLite's "disk I/O error", which reads as a failing disk.
#[test]
fn a_full_disk_under_a_catalog_is_said_and_a_failed_migration_leaves_nothing() {
    if sqlite_only("a full disk under the SQLite file") {
        return;
    }
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(91, 1 << 20)).unwrap();
    repo.backup("img", "vm", &["-b", "64k"]);
    let target = Tmpfs::mount(&repo.path("target"), "1m");
    let filler = target.fill();
    let to = target.0.join("new.sqlite");
    let r = repo.run(&["database", "migrate", "--to", to.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("keepfs: error")).count(), 1, "{}", r.stderr);
    let line = r.error_line();
    assert!(
        line.contains(&format!("migrating into {}", to.display())) && line.contains("nothing was left there"),
        "{line}"
    );
    let left: Vec<_> = fs::read_dir(&target.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("filler")], "only the filler is there");
    fs::remove_file(&filler).unwrap();
    repo.ok(&["database", "migrate", "--to", to.to_str().unwrap()]);
    drop(target);

    // A home on a file system with no room left: every command says the disk is full.
    let other = Repo::new();
    let home = Tmpfs::mount(&other.home(), "4m");
    other.ok(&["init"]);
    fs::write(other.path("img"), random_bytes(92, 64 << 10)).unwrap();
    let v = other.backup("img", "vm", &[]);
    home.fill();
    // (A command that writes little may still get by where SQLite reuses pages it has,
    // as a label did in CI: a backup needs new room in the catalog and the spool.)
    let img = other.url("img");
    let r = other.run(&["backup", &img, "vm"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    let line = r.error_line();
    assert!(line.contains("full") && !line.contains("disk I/O error"), "{line}");
    // Whatever a small change does there, it never says "disk I/O error".
    let r = other.run(&["label", &v, "k=v"]);
    assert!(r.code == 0 || !r.error_line().contains("disk I/O error"), "{}", r.stderr);
    drop(home);
}
