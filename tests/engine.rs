//! The engine through its library API, with faults a real storage cannot be made to show
//! on demand: failing and truncated transfers (the fault-injecting storage decorator) and
//! the states a crashed cleanup leaves behind. Each test's repository is a `Repo` of
//! tests/common: on the test's own PostgreSQL catalog when `KEEPFS_TEST_POSTGRES` is set.

mod common;
use common::*;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::config::Config;
use keepfs::progress::Silent;
use keepfs::restore::RestoreOptions;
use keepfs::source::Url;
use keepfs::storage::fault::FaultyStorage;
use keepfs::version::Status;
use std::fs;
use std::sync::Arc;

const BS: u32 = 64 * 1024;

fn open(t: &Repo) -> (Repository, Arc<FaultyStorage>) {
    let mut repo = Repository::open(t.engine_config()).unwrap();
    // Claimed for this catalog first (its `owner` object is a put of its own), so that
    // the faults below count the backups' puts only. (A catalog lost and made again is
    // not the owner until its rebuild says so: refused here, which is fine.)
    match repo.storage_to_write("default") {
        Ok(_) | Err(keepfs::error::Error::NotOwner(_)) => {}
        Err(e) => panic!("{e}"),
    }
    let mut faulty = None;
    repo.wrap_storage("default", |inner| {
        let f = Arc::new(FaultyStorage::new(inner));
        faulty = Some(f.clone());
        f
    })
    .unwrap();
    (repo, faulty.unwrap())
}

/// Runs one statement on the repository's catalog (the SQLite file, or the test's
/// PostgreSQL database): the first column of its first row, when it returns one.
fn catalog_sql(t: &Repo, sql: &str) -> Option<i64> {
    match &t.catalog {
        Some(db) => {
            let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
            c.query(sql, &[]).unwrap().first().map(|r| r.get(0))
        }
        None => {
            let conn = rusqlite::Connection::open(t.home().join("keepfs.sqlite")).unwrap();
            let mut st = conn.prepare(sql).unwrap();
            let mut rows = st.query([]).unwrap();
            rows.next().unwrap().map(|r| r.get(0).unwrap())
        }
    }
}

fn opts(name: &str) -> BackupOptions {
    BackupOptions { name: name.into(), block_size: Some(BS), ..Default::default() }
}

fn restore_to(
    repo: &Repository,
    uid: keepfs::version::VersionUid,
    path: &std::path::Path,
) -> keepfs::restore::RestoreReport {
    let _ = fs::remove_file(path);
    repo.restore(uid, &Url::File(path.to_path_buf()), &RestoreOptions::default(), &Silent).unwrap()
}

#[test]
fn transient_write_failures_are_retried() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let img = dir.path().join("img");
    fs::write(&img, mixed_image(51, 12, BS as usize, 5)).unwrap();
    faults.fail_next_puts(2);
    let v = repo.backup(&Url::File(img.clone()), &opts("r"), &Silent).unwrap();
    assert_eq!(v.status, Status::Valid);
    let out = dir.path().join("out");
    assert!(restore_to(&repo, v.uid, &out).bad_blocks.is_empty());
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

#[test]
fn a_storage_that_keeps_failing_leaves_an_incomplete_version_and_a_clear_error() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let img = dir.path().join("img");
    fs::write(&img, mixed_image(52, 12, BS as usize, 0)).unwrap();
    faults.fail_next_puts(1000);
    let err = repo.backup(&Url::File(img.clone()), &opts("f"), &Silent).unwrap_err().to_string();
    assert!(err.contains("left incomplete") && err.contains("injected fault on put"), "{err}");
    let versions = repo.list(None).unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].status, Status::Incomplete);
    // Once the storage is back, a backup works and the incomplete one can go.
    faults.fail_next_puts(0);
    let v = repo.backup(&Url::File(img.clone()), &opts("f"), &Silent).unwrap();
    assert_eq!(v.status, Status::Valid);
    let plan = repo.plan_remove(&[versions[0].uid], false).unwrap();
    repo.apply_remove(&plan).unwrap();
}

#[test]
fn truncated_and_failed_reads_are_fetched_again() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let img = dir.path().join("img");
    fs::write(&img, mixed_image(53, 15, BS as usize, 0)).unwrap();
    let v = repo.backup(&Url::File(img.clone()), &opts("t"), &Silent).unwrap();
    faults.truncate_next_gets(1);
    faults.fail_next_gets(2);
    let out = dir.path().join("out");
    let report = restore_to(&repo, v.uid, &out);
    assert!(report.bad_blocks.is_empty(), "{:?}", report.bad_blocks);
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

#[test]
fn persistent_corruption_becomes_named_zero_blocks_and_an_invalid_version() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let img = dir.path().join("img");
    let data = mixed_image(54, 10, BS as usize, 0);
    fs::write(&img, &data).unwrap();
    let v = repo.backup(&Url::File(img.clone()), &opts("c"), &Silent).unwrap();
    faults.corrupt_next_gets(1_000);
    let out = dir.path().join("out");
    let report = restore_to(&repo, v.uid, &out);
    let stored_blocks = repo.index(v.uid).unwrap().entries.iter().filter(|e| !e.is_sparse()).count();
    assert_eq!(report.bad_blocks.len(), stored_blocks);
    assert!(report.bad_blocks.iter().all(|b| b.reason.contains("checksum")), "{:?}", report.bad_blocks[0]);
    assert_eq!(repo.version(v.uid).unwrap().status, Status::Invalid);
    assert_eq!(fs::metadata(&out).unwrap().len(), data.len() as u64);
}

#[test]
fn a_restore_stopped_by_a_dead_storage_marks_nothing_and_continues() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let img = dir.path().join("img");
    let data: Vec<u8> = (0..40u64).flat_map(|i| random_bytes(5500 + i, BS as usize)).collect();
    fs::write(&img, &data).unwrap();
    let v = repo.backup(&Url::File(img.clone()), &opts("d"), &Silent).unwrap();
    let out = dir.path().join("out");
    let url = Url::File(out.clone());
    faults.die_after_gets(12);
    let err = repo.restore(v.uid, &url, &RestoreOptions::default(), &Silent).unwrap_err().to_string();
    assert!(err.contains("is not available") && err.contains("--continue"), "{err}");
    assert!(!out.exists(), "an unfinished restore never appears under the target's name");
    assert!(keepfs::restore::partial_path(&out, v.uid).exists());
    assert_eq!(repo.version(v.uid).unwrap().status, Status::Valid, "an outage is not damage");
    // Continuing before the storage is back fails the same way; afterwards it finishes,
    // fetching only what is missing.
    faults.revive();
    let resume = RestoreOptions { resume: true, ..Default::default() };
    let report = repo.restore(v.uid, &url, &resume, &Silent).unwrap();
    assert!(report.bad_blocks.is_empty());
    assert!(report.blocks_kept >= 8 && report.blocks_kept < 40, "kept {}", report.blocks_kept);
    assert_eq!(sha256_file(&out), sha256_file(&img));
    assert!(!keepfs::restore::partial_path(&out, v.uid).exists());
    // Nothing left to continue now.
    let err = repo.restore(v.uid, &url, &resume, &Silent).unwrap_err().to_string();
    assert!(err.contains("no interrupted restore"), "{err}");
}

/// A cleanup that died after tombstoning objects, or after deleting some of their files:
/// the next backup must store those blocks again instead of trusting the rows.
#[test]
fn tombstones_left_by_a_crashed_cleanup_are_never_trusted() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, _) = open(&t);
    let img = dir.path().join("img");
    fs::write(&img, mixed_image(55, 20, BS as usize, 0)).unwrap();
    let first = repo.backup(&Url::File(img.clone()), &opts("x"), &Silent).unwrap();
    let ids: Vec<_> = repo.index(first.uid).unwrap().entries.data().map(|(_, id)| id).collect();
    let plan = repo.plan_remove(&[first.uid], true).unwrap();
    repo.apply_remove(&plan).unwrap();

    // Simulate the crash: every row tombstoned, half the files already deleted.
    catalog_sql(&t, "UPDATE objects SET state = 1");
    let storage = dir.path().join("home/storage");
    for id in ids.iter().step_by(2) {
        fs::remove_file(storage.join(id.storage_key())).unwrap();
    }

    let second = repo.backup(&Url::File(img.clone()), &opts("x"), &Silent).unwrap();
    for id in &ids {
        assert!(storage.join(id.storage_key()).exists(), "object {id} was not stored again");
    }
    let live = catalog_sql(&t, "SELECT COUNT(*) FROM objects WHERE state = 0").unwrap();
    assert_eq!(live as usize, ids.iter().collect::<std::collections::HashSet<_>>().len());
    // The next cleanup deletes nothing the new version needs.
    let plan = repo.plan_cleanup("default").unwrap();
    assert!(plan.objects.is_empty(), "{} objects planned", plan.objects.len());
    repo.apply_cleanup(&plan).unwrap();
    let out = dir.path().join("out");
    assert!(restore_to(&repo, second.uid, &out).bad_blocks.is_empty());
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

#[test]
fn an_object_file_without_a_row_is_swept_only_when_old() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, _) = open(&t);
    let storage = dir.path().join("home/storage");
    let orphan = keepfs::block::BlockId::of(b"orphan");
    let path = storage.join(orphan.storage_key());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"left by a killed backup").unwrap();
    // Just written: file times lag the clock by up to a tick, so it is kept for now.
    assert!(repo.plan_cleanup("default").unwrap().orphans.is_empty());
    // No writer is running, so the cutoff is now; but a file no row names may be a block
    // of another host's backup (a catalog of its own, not seen here): it is kept until
    // it is older than incomplete_grace (1 day) too.
    let file = fs::File::options().write(true).open(&path).unwrap();
    let ago = |secs: u64| std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    file.set_modified(ago(3600)).unwrap();
    let plan = repo.plan_cleanup("default").unwrap();
    assert!(plan.orphans.is_empty());
    assert_eq!(plan.kept_unrecorded, 1);
    assert!(plan.unrecorded_line("storage default").unwrap().contains("incomplete_grace (1d)"));
    // A file newer than the cutoff is kept.
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600)).unwrap();
    assert!(repo.plan_cleanup("default").unwrap().orphans.is_empty());
    // Older than both: it goes.
    file.set_modified(ago(2 * 86400)).unwrap();
    let plan = repo.plan_cleanup("default").unwrap();
    assert_eq!(plan.kept_unrecorded, 0);
    assert_eq!(repo.apply_cleanup(&plan).unwrap().orphans_deleted, 1);
    assert!(!path.exists());
}

/// An image of `blocks` distinct random blocks (nothing zero, nothing repeated).
fn distinct_blocks(seed: u64, blocks: usize) -> Vec<u8> {
    (0..blocks).flat_map(|i| random_bytes(seed * 1000 + i as u64, BS as usize)).collect()
}

/// A storage outage stops a backup halfway; a retention job's cleanup runs before the
/// storage is back. The objects the backup stored are spared (for `incomplete_grace`,
/// a day by default), so `backup --continue` uploads only the blocks still missing.
/// With a grace of 0 a cleanup takes the objects of an incomplete version at once.
#[test]
fn cleanup_spares_what_backup_continue_will_use() {
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, faults) = open(&t);
    let storage = dir.path().join("home/storage");
    let img = dir.path().join("img");
    fs::write(&img, distinct_blocks(61, 12)).unwrap();
    faults.die_after_puts(5);
    let err = repo.backup(&Url::File(img.clone()), &opts("vm"), &Silent).unwrap_err().to_string();
    assert!(err.contains("left incomplete"), "{err}");
    let uid = repo.list(None).unwrap()[0].uid;
    assert_eq!(count_files(&storage.join("blocks")), 5, "the blocks stored before the outage");

    let plan = repo.plan_cleanup("default").unwrap();
    assert!(plan.objects.is_empty() && plan.orphans.is_empty(), "planned: {:?} {:?}", plan.objects, plan.orphans);
    assert_eq!(plan.kept_for_continue, 5);
    assert_eq!(plan.spared.len(), 1);
    assert_eq!(plan.spared[0].uid, uid);
    assert!(plan.spared[0].running.is_none());
    let day = plan.spared[0].until_ms - plan.spared[0].active_ms;
    assert_eq!(day, 24 * 3600 * 1000, "spared for the default grace, a day");
    let lines = plan.spared_lines().join("\n");
    assert!(lines.contains("sparing 5 unreferenced object(s)"), "{lines}");
    assert!(lines.contains(&format!("{uid}: its backup stopped at ")) && lines.contains("spared until "), "{lines}");
    let report = repo.apply_cleanup(&plan).unwrap();
    assert_eq!((report.objects_deleted, report.orphans_deleted), (0, 0));
    assert_eq!(count_files(&storage.join("blocks")), 5);

    // The storage is back: the continuation sends only the 7 missing blocks (and the
    // version object).
    faults.revive();
    let before = faults.puts_done();
    let cont = BackupOptions { continue_uid: Some(uid), ..opts("vm") };
    let v = repo.backup(&Url::File(img.clone()), &cont, &Silent).unwrap();
    assert_eq!((v.uid, v.status), (uid, Status::Valid));
    assert_eq!(faults.puts_done() - before, 7 + 1, "puts of the continuation");
    assert_eq!(v.stats.bytes_written, 7 * BS as u64);
    assert_eq!(v.stats.bytes_deduplicated, 5 * BS as u64);
    let out = dir.path().join("out");
    assert!(restore_to(&repo, uid, &out).bad_blocks.is_empty());
    assert_eq!(sha256_file(&out), sha256_file(&img));

    // A second outage leaves another incomplete version; `cleanup --dry-run` says what it
    // spares and until when.
    let img2 = dir.path().join("img2");
    fs::write(&img2, distinct_blocks(62, 6)).unwrap();
    faults.die_after_puts(3);
    repo.backup(&Url::File(img2.clone()), &opts("vm2"), &Silent).unwrap_err();
    faults.revive();
    let uid2 = repo.list(None).unwrap().into_iter().find(|v| v.status == Status::Incomplete).unwrap().uid;
    let dry = t.command(&["cleanup", "--dry-run"]).output().unwrap();
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{said} {}", String::from_utf8_lossy(&dry.stderr));
    assert!(said.contains("would delete 0 unreferenced object(s)"), "{said}");
    assert!(said.contains("sparing 3 unreferenced object(s)"), "{said}");
    assert!(said.contains(&format!("{uid2}: its backup stopped at ")) && said.contains("spared until "), "{said}");

    // With no grace (as a day later), cleanup takes them; the valid version keeps its 12.
    let mut config = t.engine_config();
    config.incomplete_grace = chrono::Duration::zero();
    let impatient = Repository::open(config).unwrap();
    let plan = impatient.plan_cleanup("default").unwrap();
    assert!(plan.spared.is_empty());
    assert_eq!(plan.objects.len(), 3);
    assert_eq!(impatient.apply_cleanup(&plan).unwrap().objects_deleted, 3);
    assert_eq!(count_files(&storage.join("blocks")), 12);
    assert!(restore_to(&repo, uid, &out).bad_blocks.is_empty());
}

/// An image with more blocks than a version may have (2^32) is refused at the start,
/// naming the way out, with nothing created.
#[test]
fn an_image_with_too_many_blocks_is_refused_before_anything_is_written() {
    let t = Repo::new();
    let (repo, _) = open(&t);
    let o = BackupOptions { name: "huge".into(), block_size: Some(4096), ..Default::default() };
    let err = repo.backup(&Url::Null(1 << 45), &o, &Silent).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("8589934592 blocks") && msg.contains("use a larger block size"), "{msg}");
    assert!(repo.list(None).unwrap().is_empty(), "no version was created");
    // 1 TiB at 4 KiB blocks (268 million, sparse blocks cost nothing) is within the bound.
    assert!(keepfs::index::check_block_count(1 << 40, 4096).is_ok());
}

/// A rebuild the storage interrupts (it dies after the first version object) keeps what
/// it rebuilt, says to run it again, and the next run adds the rest.
#[test]
fn an_interrupted_database_rebuild_goes_on_when_run_again() {
    let t = Repo::new();
    let dir = &t.dir;
    let mut images = Vec::new();
    {
        let (repo, _) = open(&t);
        for i in 0..3u64 {
            let img = dir.path().join(format!("img{i}"));
            fs::write(&img, mixed_image(61 + i, 6, BS as usize, 0)).unwrap();
            let v = repo.backup(&Url::File(img.clone()), &opts(&format!("n{i}")), &Silent).unwrap();
            images.push((v.uid, img));
        }
    }
    t.lose_catalog();
    let (repo, faults) = open(&t);
    repo.storage("default").unwrap(); // its keyring (none) is read before the first use
    faults.die_after_gets(2); // the storage's owner, then the first version object
    let err = repo.rebuild_database().unwrap_err().to_string();
    assert!(err.contains("database rebuild stopped") && err.contains("run `keepfs database rebuild` again"), "{err}");
    assert_eq!(repo.list(None).unwrap().len(), 1, "what was rebuilt stays");
    faults.revive();
    let report = repo.rebuild_database().unwrap();
    assert_eq!((report.versions, report.already, report.damaged.len()), (2, 1, 0));
    for (uid, img) in &images {
        let out = dir.path().join("out");
        assert!(restore_to(&repo, *uid, &out).bad_blocks.is_empty());
        assert_eq!(sha256_file(&out), sha256_file(img), "{uid}");
    }
    // Finished cleanly: the database is a live one again.
    assert!(matches!(repo.rebuild_database(), Err(keepfs::error::Error::Refused(_))));
}

/// A rebuild whose catalog refuses to record a batch of the objects it lists stops the
/// listing there (a storage of millions of objects is not listed to its end first) and
/// says what failed; once the catalog takes them, a rebuild records them all.
#[test]
fn a_rebuild_stops_listing_when_the_catalog_refuses_a_batch() {
    let t = Repo::new();
    let img = t.dir.path().join("img");
    // 2,500 distinct 4 KiB blocks: two full batches of 1,000 and a rest.
    fs::write(&img, random_bytes(71, 2500 * 4096)).unwrap();
    let uid = {
        let (repo, _) = open(&t);
        let o = BackupOptions { name: "many".into(), block_size: Some(4096), ..Default::default() };
        repo.backup(&Url::File(img.clone()), &o, &Silent).unwrap().uid
    };
    t.lose_catalog();
    let (repo, faults) = open(&t);
    // The catalog refuses new object rows (a real trigger in the real catalog).
    let refuse = |on: bool| match &t.catalog {
        Some(db) => {
            let mut c = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
            c.batch_execute(if on {
                "CREATE FUNCTION refuse_rows() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'test: no new rows'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER refuse BEFORE INSERT ON objects FOR EACH ROW EXECUTE FUNCTION refuse_rows();"
            } else {
                "DROP TRIGGER refuse ON objects; DROP FUNCTION refuse_rows();"
            })
            .unwrap();
        }
        None => {
            let c = rusqlite::Connection::open(t.home().join("keepfs.sqlite")).unwrap();
            c.execute_batch(if on {
                "CREATE TRIGGER refuse BEFORE INSERT ON objects BEGIN SELECT RAISE(ABORT, 'test: no new rows'); END;"
            } else {
                "DROP TRIGGER refuse;"
            })
            .unwrap();
        }
    };
    refuse(true);
    let before = faults.listed();
    let err = repo.rebuild_database().unwrap_err().to_string();
    assert!(err.contains("test: no new rows") && err.contains("run `keepfs database rebuild` again"), "{err}");
    // The version objects' listing, then the first batch of blocks, and no further.
    assert_eq!(faults.listed() - before, 1 + 1000, "{err}");
    refuse(false);
    let report = repo.rebuild_database().unwrap();
    assert_eq!((report.versions, report.already, report.objects), (0, 1, 2500));
    let out = t.dir.path().join("out");
    assert!(restore_to(&repo, uid, &out).bad_blocks.is_empty());
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// A source that changes while it is backed up (a live VM disk, a file being written) is
/// read through a mapping: the bytes of a block must be read once, so that the object
/// stored under an id holds the bytes that id was computed from. The hook rewrites block 3
/// of the image right after its id is computed and before it is compressed and stored.
#[test]
fn a_block_that_changes_after_it_was_hashed_is_stored_as_hashed() {
    use std::os::unix::fs::FileExt;
    let t = Repo::new();
    let dir = &t.dir;
    let (mut repo, _) = open(&t);
    assert!(repo.config.mmap_sources, "the embedded configuration maps sources");
    let img = dir.path().join("img");
    let original = random_bytes(61, 8 * BS as usize);
    fs::write(&img, &original).unwrap();
    let writer = fs::OpenOptions::new().write(true).open(&img).unwrap();
    let changed_block = random_bytes(62, BS as usize);
    let once = std::sync::Once::new();
    let hook_block = changed_block.clone();
    repo.after_hash = Some(Arc::new(move |idx| {
        if idx == 3 {
            once.call_once(|| writer.write_all_at(&hook_block, 3 * BS as u64).unwrap());
        }
    }));
    let v = repo.backup(&Url::File(img.clone()), &opts("live"), &Silent).unwrap();
    assert_eq!(v.status, Status::Valid);
    assert_eq!(&fs::read(&img).unwrap()[3 * BS as usize..4 * BS as usize], &changed_block[..], "the hook ran");

    // Every stored object matches its id, and the version holds the image as read: block
    // 3 as it was when it was hashed.
    let deep = keepfs::scrub::ScrubOptions { deep: true, percent: 100, source: None };
    let report = repo.scrub(v.uid, &deep, &Silent).unwrap();
    assert!(report.bad.is_empty(), "{:?}", report.bad);
    let out = dir.path().join("out");
    assert!(restore_to(&repo, v.uid, &out).bad_blocks.is_empty());
    fs::write(dir.path().join("as-hashed"), &original).unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&dir.path().join("as-hashed")));

    // The next backup sees the new bytes, deduplicates the rest onto verified objects,
    // and restores byte-identical.
    repo.after_hash = None;
    let next = repo.backup(&Url::File(img.clone()), &opts("live"), &Silent).unwrap();
    assert!(repo.scrub(next.uid, &deep, &Silent).unwrap().bad.is_empty());
    assert!(restore_to(&repo, next.uid, &out).bad_blocks.is_empty());
    assert_eq!(sha256_file(&out), sha256_file(&img));
}

/// The scenario of [`a_source_truncated_while_mapped_is_a_one_line_error_not_a_crash`],
/// run in a child process (it ends its process); the variable names its directory.
const TRUNCATE_SCENARIO: &str = "KEEPFS_TEST_TRUNCATE_MAPPED_SOURCE";

#[test]
#[ignore = "a scenario that ends its process: run by a_source_truncated_while_mapped_is_a_one_line_error_not_a_crash"]
fn scenario_truncate_a_mapped_source_mid_backup() {
    let Some(dir) = std::env::var_os(TRUNCATE_SCENARIO) else { return };
    let dir = std::path::PathBuf::from(dir);
    let mut config = Config::embedded(dir.join("home"));
    // The parent's test catalog, when it has one.
    config.database_url = std::env::var("KEEPFS_DATABASE").ok();
    let mut repo = Repository::open(config).unwrap();
    let img = dir.join("img");
    let file = fs::OpenOptions::new().write(true).open(&img).unwrap();
    // The first block hashed truncates the image. Until then no block has finished, so at
    // most the 256 blocks of the buffer pool were read: the other half of the image's one
    // mapped window (512 blocks) is read after the truncation.
    let once = std::sync::Once::new();
    repo.after_hash = Some(Arc::new(move |_| once.call_once(|| file.set_len(0).unwrap())));
    let r = repo.backup(&Url::File(img), &opts("shrinks"), &Silent);
    eprintln!("not reached: the backup returned {:?}", r.map(|v| v.status));
    std::process::exit(99);
}

/// A source truncated while it is read through a mapping raises SIGBUS in whichever
/// program uses the library, not only in the keepfs command: the library turns it into a
/// one-line error and exit status 1, and the version stays incomplete.
#[test]
fn a_source_truncated_while_mapped_is_a_one_line_error_not_a_crash() {
    let t = Repo::new();
    let dir = &t.dir;
    fs::write(dir.path().join("img"), random_bytes(71, 512 * BS as usize)).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "scenario_truncate_a_mapped_source_mid_backup", "--ignored", "--test-threads=1"])
        .env(TRUNCATE_SCENARIO, dir.path())
        .env_remove("KEEPFS_DATABASE");
    if let Some(db) = &t.catalog {
        child.env("KEEPFS_DATABASE", &db.url);
    }
    let out = output_within(child, COMMAND_LIMIT, "the truncation scenario");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("keepfs: error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("the source shrank"), "{stderr}");
    let repo = Repository::open(t.engine_config()).unwrap();
    let versions = repo.list(None).unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].status, Status::Incomplete);
}

/// Read-ahead serves streams, not scattered reads: a VM's random 4 KiB reads ask for no
/// block ahead (they would churn the block cache), a sequential reader, even one whose
/// requests arrive a little out of order, gets the blocks ahead of it fetched.
#[test]
fn read_ahead_follows_streams_and_ignores_scattered_reads() {
    use keepfs::cache::BlockCache;
    use keepfs::session::image::Prefetcher;
    let t = Repo::new();
    let dir = &t.dir;
    let (repo, _) = open(&t);
    let img = dir.path().join("img");
    fs::write(&img, distinct_blocks(71, 256)).unwrap();
    let uid = repo.backup(&Url::File(img.clone()), &opts("vm"), &Silent).unwrap().uid;
    let cache = Arc::new(BlockCache::new(64 << 20));
    let prefetch = Arc::new(Prefetcher::start(cache.clone(), 2));
    let image = repo.open_image(uid, cache.clone(), Some(prefetch.clone())).unwrap();
    let mut buf = vec![0u8; 4096];
    let size = 256 * BS as u64;
    for i in 0..200u64 {
        // Scattered: each read far from the one before.
        let off = (i * 7_919 * 4096 + (i % 2) * size / 2) % (size - 4096);
        image.read_at(off, &mut buf).unwrap();
    }
    assert_eq!(prefetch.requested(), 0, "no read-ahead for scattered reads");
    let mut chunk = vec![0u8; 32 * 1024];
    for pair in 0..64u64 {
        // Sequential 32 KiB requests, each pair served out of order.
        for off in [pair * 65536 + 32768, pair * 65536] {
            image.read_at(off, &mut chunk).unwrap();
        }
    }
    let asked = prefetch.requested();
    assert!(asked >= 32, "a stream is read ahead: {asked} blocks asked for");
    let want = fs::read(&img).unwrap();
    image.read_at(100_000, &mut chunk).unwrap();
    assert_eq!(&chunk[..], &want[100_000..100_000 + chunk.len()]);
}

/// A backup that stopped before storing anything spares nothing: the cleanup's report
/// says which backups may still store objects, not "sparing 0 object(s)" (a drill found
/// that header over a running backup that had written nothing yet).
#[test]
fn a_backup_that_stored_nothing_is_named_without_a_count_of_nothing() {
    let t = Repo::new();
    let (repo, faults) = open(&t);
    let img = t.dir.path().join("img");
    fs::write(&img, distinct_blocks(62, 4)).unwrap();
    faults.die_after_puts(0);
    assert!(repo.backup(&Url::File(img), &opts("vm"), &Silent).is_err());
    let uid = repo.list(None).unwrap()[0].uid;
    let plan = repo.plan_cleanup("default").unwrap();
    assert_eq!((plan.kept_for_continue, plan.spared.len()), (0, 1));
    let lines = plan.spared_lines();
    assert_eq!(lines[0], "storage default: backups that may still store objects here:", "{lines:?}");
    assert!(lines[1].contains(&format!("{uid}: its backup stopped at ")), "{lines:?}");
}
