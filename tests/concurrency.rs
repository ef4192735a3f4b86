//! Several keepfs processes on one repository at once, the way a host runs them: backups
//! of different images, restores, scrubs, removals and cleanups side by side. Each pair
//! that must not interfere is run for real; what must be refused is refused, and a
//! process killed while it holds a version releases it.
//! (The mount's pairs are in tests/mount.rs; cleanup racing a backup and two
//! continuations of one backup are in tests/crash.rs.)

mod common;
use common::mount::wait_until;
use common::*;
use std::fs;
use std::process::Stdio;
use std::time::Duration;

fn mkfifo(path: &std::path::Path) {
    let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

/// A restore (slowed down by a storage that answers late) and a deep scrub waiting for
/// its --source (a pipe with no writer yet) hold their versions: `rm` and `enforce` in
/// other processes are refused, and a killed holder releases its version.
#[test]
fn versions_in_use_cannot_be_removed_and_dead_holders_release_them() {
    let repo = Repo::new();
    let img = mixed_image(71, 40, 64 * 1024, 0);
    fs::write(repo.path("a"), &img).unwrap();
    let v = repo.backup("a", "db", &["-b", "64k"]);
    let w = repo.backup("a", "web", &["-b", "64k"]);
    let newer = repo.backup("a", "db", &["-b", "64k"]);

    // This process restores v through a storage that takes 50 ms per object.
    let mut engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    let mut slow = None;
    engine
        .wrap_storage("default", |inner| {
            let f = std::sync::Arc::new(keepfs::storage::fault::FaultyStorage::new(inner));
            f.set_delay(Duration::from_millis(50));
            slow = Some(f.clone());
            f
        })
        .unwrap();
    let vuid = keepfs::version::VersionUid::parse(&v).unwrap();
    let out = repo.path("out");
    std::thread::scope(|s| {
        let restore = s.spawn(|| {
            let opts = keepfs::restore::RestoreOptions::default();
            engine.restore(vuid, &keepfs::source::Url::File(out.clone()), &opts, &keepfs::progress::Silent)
        });
        // Another process deep-scrubs w through a storage throttled to 4 kB/s (a 64 KiB
        // block takes 16 s). (It used to wait on a FIFO as its source; keepfs now refuses
        // FIFOs as sources instead of blocking on them.)
        let slow_config = repo.path("slow.toml");
        fs::write(
            &slow_config,
            format!(
                "home = \"{home}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{home}/storage\"\nread_bandwidth = \"4k\"\n",
                home = repo.home().display()
            ),
        )
        .unwrap();
        let mut scrub = repo.command(&["--config", slow_config.to_str().unwrap(), "deep-scrub", &w]).spawn().unwrap();
        wait_until("both versions to be locked", Duration::from_secs(30), || {
            repo.run(&["rm", "--force", "--dry-run", &v]).code == 4
                && repo.run(&["rm", "--force", "--dry-run", &w]).code == 4
        });
        for (uid, what) in [(&v, "restore"), (&w, "scrub")] {
            let r = repo.run(&["rm", "--force", uid]);
            assert_eq!(r.code, 4, "{}", r.stderr);
            assert!(r.error_line().contains(&format!("is in use ({what} by pid")), "{}", r.stderr);
        }
        // Processes of this machine that still run hold their locks however old their
        // heartbeats (a catalog down for more than 10 minutes stops every beat): taking
        // them for dead lost a mount reader's lock, and cleanup deleted its blocks (found
        // by a drill).
        repo.catalog_sql("UPDATE sessions SET heartbeat_ms = heartbeat_ms - 11 * 60 * 1000");
        for (uid, what) in [(&v, "restore"), (&w, "scrub")] {
            let r = repo.run(&["rm", "--force", uid]);
            assert_eq!(r.code, 4, "{}", r.stderr);
            assert!(r.error_line().contains(&format!("is in use ({what} by pid")), "{}", r.stderr);
        }
        // Retention would remove v (latest1 keeps only the newer one) but keeps it, and says
        // so; its dry run says the same, with the same exit code (it used to say "would
        // remove" and exit 0).
        let r = repo.run(&["enforce", "latest1", "name == \"db\"", "--dry-run"]);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert!(r.stderr.contains(&format!("would keep {v}: version {v} is in use")), "{}", r.stderr);
        assert!(!r.stdout.contains(&format!("would remove {v}")), "{}", r.stdout);
        let r = repo.run(&["enforce", "latest1", "name == \"db\""]);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert!(r.stderr.contains(&format!("kept {v}: version {v} is in use")), "{}", r.stderr);
        assert_eq!(repo.version(&newer)["status"], "valid");

        // The scrub is killed: its lock goes with it, even before it is reaped (a zombie
        // has ended; it only waits for its parent).
        scrub.kill().unwrap();
        let pid = scrub.id();
        wait_until("the killed scrub to be a zombie", Duration::from_secs(30), || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        });
        let plan = repo.ok(&["rm", "--force", "--dry-run", &w]);
        assert!(plan.contains(&format!("would remove {w}")), "{plan}");
        scrub.wait().unwrap();

        // The restore finishes, with the right bytes, and lets go.
        let report = restore.join().unwrap().unwrap();
        assert!(report.bad_blocks.is_empty());
    });
    assert_eq!(sha256_file(&out), sha256_file(&repo.path("a")));
    repo.ok(&["rm", "--force", &v, &w]);
    mkfifo(&repo.path("src"));
    let r = repo.run(&["restore", "--force", &newer, &repo.url("src")]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("is a pipe or socket"), "{}", r.stderr);
}

/// Two backups of different images, a restore, a deep scrub and cleanups, all at once.
#[test]
fn backups_restores_scrubs_and_cleanups_run_side_by_side() {
    let repo = Repo::new();
    let bs = 64 * 1024;
    let a = mixed_image(72, 200, bs, 0);
    // b shares its first half with a: the two backups deduplicate against each other.
    let mut b = a[..100 * bs].to_vec();
    b.extend(mixed_image(73, 100, bs, 999));
    fs::write(repo.path("a"), &a).unwrap();
    fs::write(repo.path("b"), &b).unwrap();
    fs::write(repo.path("old"), mixed_image(74, 60, bs, 0)).unwrap();
    let old = repo.backup("old", "old", &["-b", "64k"]);

    let spawn = |args: &[&str]| repo.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (ua, ub, uo) = (repo.url("a"), repo.url("b"), repo.url("o"));
    let jobs = vec![
        ("backup a", spawn(&["backup", &ua, "a", "-b", "64k"])),
        ("backup b", spawn(&["backup", &ub, "b", "-b", "64k"])),
        ("restore", spawn(&["restore", &old, &uo])),
        ("deep-scrub", spawn(&["deep-scrub", &old])),
        ("cleanup", spawn(&["cleanup"])),
    ];
    let mut outputs = Vec::new();
    for (what, child) in jobs {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        outputs.push((what, String::from_utf8_lossy(&out.stdout).trim().to_string()));
    }
    // A cleanup afterwards finds nothing to delete: every object is referenced.
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
    assert_eq!(sha256_file(&repo.path("o")), sha256_file(&repo.path("old")));
    let va = &outputs[0].1;
    let vb = &outputs[1].1;
    assert_eq!(repo.version(va)["status"], "valid");
    assert_eq!(repo.version(vb)["status"], "valid");
    assert_eq!(repo.restore_sha(va, "ra"), sha256_file(&repo.path("a")));
    assert_eq!(repo.restore_sha(vb, "rb"), sha256_file(&repo.path("b")));
    // Shared blocks are stored once, whichever backup got there first (content-addressed:
    // two backups racing on a new block may both write it, under the same name).
    let old_img = fs::read(repo.path("old")).unwrap();
    let distinct: std::collections::HashSet<&[u8]> =
        a.chunks(bs).chain(b.chunks(bs)).chain(old_img.chunks(bs)).filter(|c| c.iter().any(|&x| x != 0)).collect();
    assert_eq!(repo.block_objects(), distinct.len());
}

/// A restore killed with -9 is finished by `restore --continue`; a plain restore of the
/// same target afterwards starts over; a second restore to a target being written is
/// refused.
#[test]
fn a_killed_restore_is_continued() {
    let repo = Repo::new();
    let img = random_bytes(75, 24 << 20);
    fs::write(repo.path("img"), &img).unwrap();
    let v = repo.backup("img", "r", &["-b", "4k"]);
    let target = repo.path("out");
    let url = repo.url("out");
    let partial = target.parent().unwrap().join(format!(".out.keepfs-restore.{v}"));
    let mut child = repo.command(&["restore", &v, &url]).spawn().unwrap();
    wait_until("the restore to start writing", Duration::from_secs(30), || partial.exists() || target.exists());
    let second = repo.run(&["restore", &v, &url]);
    child.kill().unwrap();
    let finished = child.wait().unwrap().success();
    if !finished {
        assert_eq!(second.code, 4, "{}", second.stderr);
        assert!(second.error_line().contains("another keepfs restore is writing"), "{}", second.stderr);
        assert!(!target.exists(), "a killed restore never leaves a file under the target's name");
        let r = repo.run(&["restore", "--continue", &v, &url]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("already there"), "{}", r.stderr);
    }
    assert_eq!(sha256_file(&target), sha256_file(&repo.path("img")));
    assert!(!partial.exists());
    let r = repo.run(&["restore", "--continue", &v, &url]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("no interrupted restore"), "{}", r.stderr);
}

/// Two hosts' first backups into a new repository: one (stopped by the test between
/// reading the storage's owner and reading the catalog's id) sees no owner; the other
/// claims the storage meanwhile, committing the id and writing the owner. The first goes
/// on and backs up: the owner it then meets names its own catalog. (With the id read
/// first, it read no id, then the other's owner, and refused its own catalog as
/// another's: exit 4, found by the multi-host drill on S3.)
#[test]
fn a_host_that_meets_another_hosts_first_claim_of_the_storage_backs_up() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(14, 3 * 64 * 1024)).unwrap();
    let url = repo.url("img");
    let slow = Stoppable::start(&repo, &["backup", &url, "slow", "-b", "64k"], "KEEPFS_TEST_STOP_BETWEEN_OWNER_READS");
    assert!(!repo.storage().join("owner").exists(), "nobody claimed the storage yet");
    let quick = repo.backup("img", "quick", &["-b", "64k"]);
    assert!(repo.storage().join("owner").exists());
    let slow = slow.finish();
    for uid in [&quick, &slow] {
        assert_eq!(repo.restore_sha(uid, "out"), sha256_file(&repo.path("img")));
    }
}

/// The same first claim, with the other host's version caught between its object going
/// to the storage and its row turning valid: the first host, seeing no owner, finds a
/// version object its catalog lists only as incomplete. It reads the owner again and
/// backs up, instead of refusing a version "this catalog does not know" (found by a
/// review of the race above).
#[test]
fn a_host_that_meets_another_hosts_version_being_committed_on_a_new_storage_backs_up() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(15, 3 * 64 * 1024)).unwrap();
    let url = repo.url("img");
    let first =
        Stoppable::start(&repo, &["backup", &url, "first", "-b", "64k"], "KEEPFS_TEST_STOP_BETWEEN_OWNER_READS");
    let other = Stoppable::start(&repo, &["backup", &url, "other", "-b", "64k"], "KEEPFS_TEST_STOP_BEFORE_VALID");
    assert_eq!(count_files(&repo.storage().join("versions")), 1, "the other's version object is stored");
    assert_eq!(repo.ls_json(None)[0]["status"], "incomplete");
    let first = first.finish();
    let other = other.finish();
    for uid in [&first, &other] {
        assert_eq!(repo.restore_sha(uid, "out"), sha256_file(&repo.path("img")));
    }
}

/// `rm` of a version whose backup runs says whose backup it is and since when it is
/// silent: a killed backup of another host holds its version until its heartbeat is 10
/// minutes old, and the line says so (a drill was told only "wait for it to finish").
#[test]
fn rm_of_a_version_being_backed_up_names_the_backup_and_how_long_it_holds() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(16, 3 * 64 * 1024)).unwrap();
    let url = repo.url("img");
    let far = Stoppable::start_with_env(
        &repo,
        &["backup", &url, "far", "-b", "64k"],
        "KEEPFS_TEST_STOP_BEFORE_VALID",
        &[("KEEPFS_HOST", "hv-far")],
    );
    let uid = repo.ls_json(None)[0]["uid"].as_str().unwrap().to_string();
    let r = repo.run(&["rm", &uid]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let line = r.error_line();
    let pid = format!("pid {} on hv-far", far.pid());
    let busy = format!("version {uid} is being backed up right now");
    for part in [busy.as_str(), pid.as_str(), "last heartbeat", "10 min after"] {
        assert!(line.contains(part), "{part:?} missing: {line}");
    }
    let done = far.finish();
    assert_eq!(done, uid);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));
}

/// A host is named by the system's host name, unless `KEEPFS_HOST` (or the
/// configuration's `host`, tested with the PostgreSQL catalog) names it: the name every
/// version and session records, by which other hosts tell its sessions apart.
#[test]
fn a_host_is_the_systems_host_name_unless_keepfs_host_names_it() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(12, 3 * 64 * 1024)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    let system = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    assert!(!system.is_empty());
    assert_eq!(repo.version(&v)["host"], system.as_str());
    let r = repo.run_env(&["backup", &repo.url("img"), "vm", "-b", "64k"], &[("KEEPFS_HOST", "hv-named")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.version(r.stdout.trim())["host"], "hv-named");
}

/// One cleanup per storage at a time, on either catalog: while this process holds the
/// claim, `keepfs cleanup` is refused with one line naming the holder (exit 4) and
/// deletes nothing (a dry run still plans); once the claim is let go, cleanup runs.
#[test]
fn only_one_cleanup_runs_per_storage_at_a_time() {
    let repo = Repo::new();
    std::fs::write(repo.path("img"), random_bytes(9, 4 * 64 * 1024)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    repo.ok(&["rm", "--force", &v]);
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    let claim = engine.claim_cleanup("default").unwrap();
    let r = repo.run(&["cleanup"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let me = format!("a cleanup of storage 'default' is running (pid {} on ", std::process::id());
    assert!(r.error_line().contains(&me) && r.error_line().contains("wait for it to finish"), "{}", r.stderr);
    assert_eq!(repo.block_objects(), 4, "the refused cleanup deleted nothing");
    assert!(repo.ok(&["cleanup", "--dry-run"]).contains("would delete 4 unreferenced object(s)"));
    drop(claim);
    let done = repo.ok(&["cleanup"]);
    assert!(done.contains("deleted 4 object(s)"), "{done}");
    assert_eq!(repo.block_objects(), 0);
}

/// Two cleanups of one storage never both run, however their starts interleave: one
/// that registered before another took the lease, and claims after it did, is refused
/// with one line naming the holder, and deletes nothing. (It once judged the holder by
/// a list of live sessions read before the holder existed, took the lease over, and two
/// cleanups marked and deleted side by side.)
#[test]
fn a_cleanup_that_claims_after_another_took_the_lease_is_refused() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(31, 4 * 65536)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    repo.ok(&["rm", "--force", &v]);
    // The first cleanup registers, then stalls before it claims.
    let first = repo
        .command(&["cleanup"])
        .env("KEEPFS_TEST_CLAIM_STALL_MS", "4000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    let pid = first.id();
    wait_until("the first cleanup's session", Duration::from_secs(60), || {
        engine.live_sessions().unwrap().iter().any(|s| s.process.pid == pid && s.purpose == "cleanup")
    });
    // Meanwhile another one takes the lease (this process, through the engine).
    let claim = engine.claim_cleanup("default").unwrap();
    let out = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let holder = format!("a cleanup of storage 'default' is running (pid {} on ", std::process::id());
    assert!(stderr.lines().any(|l| l.starts_with("keepfs: error: ") && l.contains(&holder)), "{stderr}");
    // Refused before it planned: it does not say what it is deleting, only why not.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("deleting") && !stderr.contains("deleting"), "{stdout}{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(repo.block_objects(), 4, "the refused cleanup deleted nothing");
    drop(claim);
    assert!(repo.ok(&["cleanup"]).contains("deleted 4 object(s)"));
    assert_eq!(repo.block_objects(), 0);
}

/// A process in another pid namespace (a container) under the same host name holds a
/// version. Its pid means nothing here (pid 1 here is another process), so it is judged
/// by its heartbeat, as another host's, and not taken for dead: `rm` is refused naming
/// it, with one warning that says why. (Sessions were judged by pid whenever the host
/// name matched, so the version was removed under the running scrub.)
#[test]
fn a_session_of_another_pid_namespace_under_the_same_host_name_is_not_taken_for_dead() {
    let unshare = ["--pid", "--fork", "--kill-child", "--mount-proc"];
    if !std::process::Command::new("unshare").args(unshare).arg("true").status().is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot make a pid namespace here (unshare needs root)");
        return;
    }
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(75, 8, 64 * 1024, 0)).unwrap();
    let v = repo.backup("a", "db", &["-b", "64k"]);
    // The scrub reads through a storage throttled to 4 kB/s: a 64 KiB block takes 16 s.
    let slow_config = repo.path("slow.toml");
    let mut top = format!("home = \"{home}\"\n", home = repo.home().display());
    if let Some(db) = &repo.catalog {
        top.push_str(&format!("database = \"{}\"\n", db.url));
    }
    fs::write(
        &slow_config,
        format!(
            "{top}[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{home}/storage\"\nread_bandwidth = \"4k\"\n",
            home = repo.home().display()
        ),
    )
    .unwrap();
    let args = ["--config", slow_config.to_str().unwrap(), "deep-scrub", &v];
    let inner = repo.command(&args);
    let mut outer = std::process::Command::new("unshare");
    outer.args(unshare).arg(KEEPFS).args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, val) in inner.get_envs() {
        match val {
            Some(val) => outer.env(k, val),
            None => outer.env_remove(k),
        };
    }
    let mut scrub = outer.spawn().unwrap();
    wait_until("the scrub to lock its version", Duration::from_secs(60), || {
        repo.run(&["rm", "--force", "--dry-run", &v]).code == 4
    });
    let r = repo.run(&["rm", "--force", &v]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("is in use (scrub by pid 1 on "), "{}", r.stderr);
    assert!(r.stderr.contains("is of another machine or container"), "{}", r.stderr);
    assert_eq!(repo.version(&v)["status"], "valid");
    scrub.kill().unwrap();
    scrub.wait().unwrap();
}

/// Taking a version in (`metadata import`) finds its blocks in the storage and then
/// records the version that references them; a cleanup in between would find them
/// unreferenced and could delete them under a version recorded valid. So an import
/// holds off cleanup, and is refused, with one line, while a cleanup runs.
#[test]
fn metadata_is_not_taken_in_while_a_cleanup_runs() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(33, 4 * 65536)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    let doc = repo.path("v.json");
    repo.ok(&["metadata", "export", &v, doc.to_str().unwrap()]);
    repo.ok(&["rm", "--force", &v]);
    // A cleanup runs (this process holds its claim): the blocks are unreferenced now.
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    let claim = engine.claim_cleanup("default").unwrap();
    let r = repo.run(&["metadata", "import", doc.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains("a cleanup of storage 'default' is running"), "{}", r.stderr);
    assert!(r.error_line().contains("versions are taken in only while no cleanup runs"), "{}", r.stderr);
    assert!(repo.ls_json(None).as_array().unwrap().is_empty(), "nothing was taken in");
    drop(claim);
    assert_eq!(repo.ok(&["metadata", "import", doc.to_str().unwrap()]).trim(), v);
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
    assert_eq!(repo.restore_sha(&v, "out"), sha256_file(&repo.path("img")));
}

/// A session id is never given twice. SQLite gives a new row the largest id plus one,
/// so the newest session, once ended, handed its id to the next: a backup started after
/// a cleanup that stopped with rows marked `deleting` took the cleanup's id, passed for
/// it, and waited 10 minutes for "the cleanup" to finish.
#[test]
fn a_session_id_is_never_given_twice() {
    let repo = Repo::new();
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    let first = engine.session("cleanup", false).unwrap().id;
    let second = engine.session("backup", true).unwrap().id;
    assert!(second > first, "session {first} ended, and the next was given {second}");
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    assert!(engine.session("backup", true).unwrap().id > second, "nor after the catalog is opened again");
}

/// `database migrate` refuses to start while anything uses the repository; and from
/// that check on, nothing can start until it is done: a backup begun during the copy
/// would write into the catalog being left (and be missing from the new one). A
/// migration that dies lets go (the catalog stays the repository's); one that finishes
/// leaves the old catalog refusing every command.
#[test]
fn nothing_starts_on_a_catalog_while_it_is_being_migrated() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(35, 4 * 65536)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    let config = repo.engine_config();
    let catalog = keepfs::catalog::open(&config.catalog_location(), config.modes).unwrap();
    let to = repo.path("moved.sqlite");
    let mut migrate = repo
        .command(&["database", "migrate", "--to", to.to_str().unwrap()])
        .env("KEEPFS_TEST_MIGRATE_STALL_MS", "120000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the migration to hold the catalog", Duration::from_secs(30), || {
        catalog.repository_state("moving").unwrap().is_some()
    });
    // (Reading the list is harmless, and goes on.)
    repo.ok(&["ls"]);
    // A server too: one serving without a session would be invisible to the migration
    // (it warned and served on, writing into the catalog being left).
    let sock = repo.path("nbd.sock");
    // mount --daemon says the same, with the same exit code (it said "the mount process
    // exited (exit status: 4)", the reason only in its log).
    let mnt = repo.path("mnt");
    fs::create_dir(&mnt).unwrap();
    for args in [
        vec!["backup", &repo.url("img"), "late", "-b", "64k"],
        vec!["restore", &v, &repo.url("o")],
        vec!["nbd", "--socket", sock.to_str().unwrap()],
        vec!["mount", "--daemon", mnt.to_str().unwrap()],
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        assert!(
            r.error_line().contains("`database migrate` (pid ") && r.error_line().contains("is moving this catalog"),
            "{}",
            r.stderr
        );
    }
    assert!(!sock.exists(), "the refused server left its socket");
    // Killed mid-copy: the catalog is the repository's again, nothing was marked moved.
    migrate.kill().unwrap();
    migrate.wait().unwrap();
    let late = repo.backup("img", "late", &["-b", "64k"]);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 2);
    // A migration run to its end: the old catalog refuses from then on.
    let _ = fs::remove_file(&to);
    repo.ok(&["database", "migrate", "--to", to.to_str().unwrap()]);
    let r = repo.run(&["ls"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let moved = repo.run_env(&["ls", "--format", "json"], &[("KEEPFS_DATABASE", to.to_str().unwrap())]);
    assert_eq!(moved.code, 0, "{}", moved.stderr);
    assert!(moved.stdout.contains(&late) && moved.stdout.contains(&v), "{}", moved.stdout);
}

/// Two imports of one document at once: each checks that the uid is new, then puts the
/// version in; the second to reach the catalog met a raw "UNIQUE constraint failed"
/// (exit 1). The catalog itself now refuses it with one line, and changes nothing.
#[test]
fn a_version_put_in_twice_is_refused_by_the_catalog_in_one_line() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(36, 4 * 65536)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    let config = repo.engine_config();
    let engine = keepfs::Repository::open(config.clone()).unwrap();
    let version = engine.version(keepfs::version::VersionUid::parse(&v).unwrap()).unwrap();
    let mut catalog = keepfs::catalog::open(&config.catalog_location(), config.modes).unwrap();
    let index = [0u8; 64];
    let e = catalog.insert_version_record(&version, keepfs::catalog::IndexBytes::of(&mut &index[..])).unwrap_err();
    assert!(matches!(e, keepfs::Error::Refused(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("version {v} is in the catalog already")), "{e}");
    assert_eq!(repo.restore_sha(&v, "out"), sha256_file(&repo.path("img")), "the version is as it was");
}

/// An admin asks who is using the repository (what `database migrate` or `key remove`
/// is waiting for): `database sessions` lists every live session with its host, pid and
/// purpose; a server killed with SIGKILL is gone from the list at once.
#[test]
fn database_sessions_shows_who_uses_the_repository_on_every_host() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(37, 4 * 65536)).unwrap();
    repo.backup("img", "vm", &["-b", "64k"]);
    // Listed from the server's own host, which judges it by its process.
    let sessions = || -> Vec<serde_json::Value> {
        let r = repo.run_env(&["database", "sessions", "--format", "json"], &[("KEEPFS_HOST", "hv-07")]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap().as_array().unwrap().clone()
    };
    assert!(sessions().is_empty(), "nothing runs: {:?}", sessions());
    let sock = repo.path("nbd.sock");
    let mut server = repo
        .command(&["nbd", "--socket", sock.to_str().unwrap()])
        .env("KEEPFS_HOST", "hv-07")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the server's session", Duration::from_secs(60), || !sessions().is_empty());
    let listed = sessions();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let s = &listed[0];
    assert_eq!((s["host"].as_str(), s["pid"].as_u64()), (Some("hv-07"), Some(server.id() as u64)), "{s}");
    assert_eq!((s["purpose"].as_str(), s["writes"].as_bool()), (Some("serve"), Some(false)), "{s}");
    assert!(s["started"].as_str().unwrap().ends_with('Z') && s["heartbeat"].as_str().is_some(), "{s}");
    let table = repo.run_env(&["database", "sessions"], &[("KEEPFS_HOST", "hv-08")]).stdout;
    assert!(table.lines().any(|l| l.contains("hv-07") && l.contains("serve")), "{table}");
    server.kill().unwrap();
    server.wait().unwrap();
    // Another host cannot see the process: it goes by the heartbeat, fresh for 10 minutes.
    let elsewhere = repo.run_env(&["database", "sessions"], &[("KEEPFS_HOST", "hv-08")]);
    assert!(elsewhere.stdout.contains("hv-07"), "{}", elsewhere.stdout);
    // Its own host sees it dead, and removes it for everyone.
    assert!(sessions().is_empty(), "a killed server is not listed: {:?}", sessions());
    let elsewhere = repo.run_env(&["database", "sessions"], &[("KEEPFS_HOST", "hv-08")]);
    assert!(!elsewhere.stdout.contains("hv-07"), "{}", elsewhere.stdout);
}

/// A host configured with another name for the shared storage directory (`nfs` where
/// the others say `default`): its backups went in under that name, and a cleanup of
/// `default` took their blocks for orphans and deleted them. Such a storage is now
/// refused before anything is written; another spelling of the same path (`./`, a
/// trailing slash) under the same name is the same storage; and one configuration
/// naming one place twice is refused as a configuration error.
#[test]
fn a_second_name_for_one_storage_place_is_refused_before_it_writes() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(38, 4 * 65536)).unwrap();
    let v = repo.backup("img", "vm", &["-b", "64k"]);
    let home = repo.home().display().to_string();
    let database = match &repo.catalog {
        Some(db) => db.url.clone(),
        None => format!("{home}/keepfs.sqlite"),
    };
    let made = std::cell::Cell::new(0);
    let config = |storages: &str| {
        made.set(made.get() + 1);
        let path = repo.path(&format!("host-{}.toml", made.get()));
        fs::write(&path, format!("home = \"{home}\"\ndatabase = \"{database}\"\n{storages}")).unwrap();
        path.to_str().unwrap().to_string()
    };
    let storage =
        |name: &str, path: &str| format!("[[storage]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{path}\"\n");
    let other_name = config(&storage("nfs", &format!("{home}/./storage/")));
    let r = repo.run(&["--config", &other_name, "backup", &repo.url("img"), "vm2", "-b", "64k"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.error_line().contains(&format!(
            "storage 'nfs' is at file:{home}/storage, which this catalog knows as storage 'default'"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "nothing was written");
    // The same place spelled otherwise, under its own name, is the same storage.
    let respelled = config(&storage("default", &format!("{home}//storage/.")));
    assert_eq!(repo.run(&["--config", &respelled, "ls"]).code, 0);
    let r = repo.run(&["--config", &respelled, "cleanup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.restore_sha(&v, "out"), sha256_file(&repo.path("img")));
    // The same name at a place without its blocks (a mistyped path, a share not
    // mounted): a backup there deduplicated against the catalog, stored nothing, and
    // left a version that could not be restored. Refused.
    fs::create_dir(repo.path("empty")).unwrap();
    let unmounted = config(&storage("default", repo.path("empty").to_str().unwrap()));
    let r = repo.run(&["--config", &unmounted, "backup", &repo.url("img"), "vm3", "-b", "64k"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    // (A shared catalog knows its repository by the default storage's place already.)
    assert!(
        (r.error_line().contains("which holds no blocks, but this catalog's storage 'default' keeps")
            && r.error_line().contains("a backup here would reference blocks that are not here"))
            || (repo.catalog.is_some() && r.error_line().contains("belongs to another repository")),
        "{}",
        r.stderr
    );
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "nothing was written");
    // One configuration naming one place twice, spelled apart by `..`.
    let dotdot = config(&format!(
        "{}{}",
        storage("default", &format!("{home}/storage")),
        storage("copy", &format!("{home}/storage/../storage"))
    ));
    let r = repo.run(&["--config", &dotdot, "ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("storages 'default' and 'copy' are both at"), "{}", r.stderr);
    // One configuration naming one place twice.
    let twice = config(&format!(
        "{}{}",
        storage("default", &format!("{home}/storage")),
        storage("copy", &format!("{home}/storage/"))
    ));
    let r = repo.run(&["--config", &twice, "ls"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("storages 'default' and 'copy' are both at"), "{}", r.stderr);

    // A catalog an older keepfs made records no places. The misnamed host comes first:
    // its name is new to the catalog, and the place holds blocks, so it is refused
    // rather than recorded (which would have locked out every host naming it right).
    assert_eq!(repo.catalog_sql("DELETE FROM repository_state WHERE name LIKE 'storage_at:%'"), 1);
    let r = repo.run(&["--config", &other_name, "ls"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.error_line()
            .contains("which holds blocks already, but this catalog has no storage of that name (it has default)"),
        "{}",
        r.stderr
    );
    repo.ok(&["ls"]);
    let r = repo.run(&["--config", &other_name, "ls"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("which this catalog knows as storage 'default'"), "{}", r.stderr);

    // Moved to another catalog, the places go along.
    if repo.catalog.is_none() {
        let to = repo.path("moved.sqlite");
        repo.ok(&["database", "migrate", "--to", to.to_str().unwrap()]);
        let moved = repo.run_env(&["--config", &other_name, "ls"], &[("KEEPFS_DATABASE", to.to_str().unwrap())]);
        assert_eq!(moved.code, 4, "{}", moved.stderr);
        assert!(moved.error_line().contains("which this catalog knows as storage 'default'"), "{}", moved.stderr);
    }
}

/// Two catalogs on one storage (a host whose configuration lacks the shared `database`,
/// a `database rebuild` into a new file while the first catalog is in use) deleted each
/// other's blocks in a drill: the second catalog's cleanup took the first's blocks for
/// orphans, and their first backups both got V0000000001, the second's version object
/// over the first's. The storage's `owner` names the catalog that owns it: any other is
/// refused before it writes, removes or cleans up (exit 4, naming the owner), until
/// `database rebuild --take-over`, after which the first is refused in turn. A catalog
/// made again where it was (lost, then rebuilt) is the owner without asking; one that
/// loses the storage while it backs up stops before it commits.
#[test]
fn a_second_catalog_on_one_storage_is_refused_before_it_writes_or_deletes() {
    let first = Repo::new();
    fs::write(first.path("img"), random_bytes(61, 6 * 65536)).unwrap();
    let v1 = first.backup("img", "vm", &["-b", "64k"]);
    let storage = first.storage();
    let owner: serde_json::Value = serde_json::from_slice(&fs::read(storage.join("owner")).unwrap()).unwrap();
    assert_eq!(owner["format"], "keepfs-owner", "{owner}");
    // A second catalog, its own SQLite file, the first's storage.
    let second = Repo::with_database(&format!("{}/keepfs.sqlite", Repo::new().home().display()), "", "");
    let cfg = format!(
        "home = \"{home}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{}\"\n",
        storage.display(),
        home = second.home().display()
    );
    fs::write(second.path("keepfs.toml"), cfg).unwrap();
    let objects = first.block_objects();
    // A rebuild only reads: the second catalog can restore, and is told it cannot write.
    let r = second.run_cfg(&["database", "rebuild"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("this one can restore from it, not write to it"), "{}", r.stderr);
    let out = second.path("read.img");
    second.ok_cfg(&["restore", &v1, &format!("file://{}", out.display())]);
    assert_eq!(sha256_file(&out), sha256_file(&first.path("img")));
    // Its mount reads; a write through it is EROFS ("busy" said to try again).
    {
        let cfg = second.config_file();
        let m = common::mount::Mount::new(&second, &["--config", &cfg]);
        assert_eq!(sha256_file(&m.p(&format!("by_version/{v1}/data"))), sha256_file(&first.path("img")));
        let data = m.p(&format!("by_version/{v1}/data"));
        let w = fs::OpenOptions::new().write(true).open(&data);
        let err = w.and_then(|mut f| std::io::Write::write_all(&mut f, b"x").and_then(|_| f.sync_all())).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        // `cp` opens with O_TRUNC: EROFS too (it was EPERM).
        let err = fs::OpenOptions::new().write(true).truncate(true).open(&data).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    for args in [
        vec!["backup".to_string(), first.url("img"), "other".into(), "-b".into(), "64k".into()],
        vec!["cleanup".into()],
        vec!["rm".into(), "--force".into(), v1.clone()],
        vec!["label".into(), v1.clone(), "k=v".into()],
        vec!["protect".into(), v1.clone()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = second.run_cfg(&args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
        // Nothing said as if it were under way (rm said "removing V…" before it was refused).
        assert_eq!(r.stdout.trim(), "", "{args:?}");
        let line = r.error_line();
        assert!(
            line.contains("storage 'default' belongs to another catalog (")
                && line.contains(owner["location"].as_str().unwrap())
                && line.contains("--take-over"),
            "{args:?}: {line}"
        );
    }
    assert_eq!(first.block_objects(), objects, "nothing written or deleted");
    // And nothing changed in the second catalog on the way to a refusal.
    let v = &serde_json::from_str::<serde_json::Value>(&second.ok_cfg(&["ls", "--format", "json"])).unwrap()[0];
    assert_eq!((v["status"].as_str(), v["protected"].as_bool()), (Some("valid"), Some(false)), "{v}");
    assert!(v["labels"].get("k").is_none(), "{v}");
    assert_eq!(first.restore_sha(&v1, "out"), sha256_file(&first.path("img")));
    first.backup("img", "vm", &["-b", "64k"]);

    // The first catalog, lost and rebuilt where it was: the storage's owner still.
    first.lose_catalog();
    first.ok(&["database", "rebuild"]);
    first.ok(&["cleanup"]);
    assert_eq!(first.restore_sha(&v1, "out"), sha256_file(&first.path("img")));

    // The first catalog backs up while the second takes the storage over: it stops
    // before it commits, and its blocks stay for the new owner's cleanup to judge.
    fs::write(first.path("big"), random_bytes(62, 256 * 4096)).unwrap();
    let child = first
        .command(&["backup", &first.url("big"), "late", "-b", "4k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let frozen = first.freeze_backup(&child, "blocks to be written", |s| s.stored >= 10);
    let r = second.run_cfg(&["database", "rebuild", "--take-over"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("storage 'default' is this catalog's now"), "{}", r.stderr);
    frozen.resume();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("belongs to another catalog") && err.contains("left incomplete"), "{err}");
    let taken: serde_json::Value = serde_json::from_str(&second.ok_cfg(&["ls", "--format", "json"])).unwrap();
    assert_eq!(taken.as_array().unwrap().len(), 2, "the second catalog has the first's two versions: {taken}");
    // Now the first is refused, and the second owns what it rebuilt.
    let r = first.run(&["cleanup"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    second.ok_cfg(&["cleanup"]);
    let out = second.path("out2");
    second.ok_cfg(&["restore", &v1, &format!("file://{}", out.display())]);
    assert_eq!(sha256_file(&out), sha256_file(&first.path("img")));

    // The owner object lost (deleted by hand): a catalog that does not know every
    // version there does not claim the storage; the one that does, does.
    let v3 = second.ok_cfg(&["backup", &first.url("img"), "third", "-b", "64k"]).trim().to_string();
    fs::remove_file(storage.join("owner")).unwrap();
    let r = first.run(&["backup", &first.url("img"), "vm", "-b", "64k"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("{v3} that this catalog does not know")), "{}", r.stderr);
    second.ok_cfg(&["backup", &first.url("img"), "third", "-b", "64k"]);
    assert_eq!(first.run(&["cleanup"]).code, 4);
}
