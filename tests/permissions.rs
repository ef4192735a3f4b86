//! Who can read a repository: everything keepfs creates (home, database with its -wal
//! and -shm files, storage directories and objects, spool files, read cache copies) is
//! its owner's alone, whatever the umask lets through. With `KEEPFS_TEST_POSTGRES` set the
//! catalog is a PostgreSQL database and the same holds for every file keepfs still makes.

mod common;
use common::*;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::cache::BlockCache;
use keepfs::config::ReadCacheConfig;
use keepfs::progress::Silent;
use keepfs::restore::RestoreOptions;
use keepfs::session::draft::{Draft, DraftOptions};
use keepfs::source::Url;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BS: u32 = 64 * 1024;

/// Every directory and file under `root` (itself included) with its mode.
fn tree(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        out.push((p.clone(), meta.permissions().mode() & 0o7777));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// Asserts that nothing under `root` gives the group or others any access.
fn assert_owner_only(root: &Path, must_have: &[&str]) {
    let all = tree(root);
    let open: Vec<String> =
        all.iter().filter(|(_, m)| m & 0o077 != 0).map(|(p, m)| format!("{:04o} {}", m, p.display())).collect();
    assert!(open.is_empty(), "readable by others:\n{}", open.join("\n"));
    for name in must_have {
        assert!(
            all.iter().any(|(p, _)| p.to_string_lossy().contains(name)),
            "{name} not found under {}: {all:?}",
            root.display()
        );
    }
    for (p, _) in &all {
        assert_eq!(std::fs::metadata(p).unwrap().uid(), unsafe { libc::geteuid() });
    }
}

/// The embedded default, as a new user gets it: a backup, a second one while another
/// connection holds the database open (so its -wal and -shm files exist), a restore,
/// and a cleanup. The process umask is the usual 022, which let everything be
/// world-readable before. (On a PostgreSQL catalog there is no database file to check,
/// and the rest holds the same.)
#[test]
fn a_new_repository_is_readable_by_its_owner_only() {
    let repo = Repo::new();
    let sqlite = repo.catalog.is_none();
    std::fs::write(repo.path("img"), mixed_image(5, 9, BS as usize, 100)).unwrap();
    let uid = repo.backup("img", "vm", &["-b", "64k"]);
    let db = sqlite.then(|| keepfs::catalog::SqliteCatalog::open(&repo.home().join("keepfs.sqlite")).unwrap());
    std::fs::write(repo.path("img2"), mixed_image(6, 9, BS as usize, 0)).unwrap();
    repo.backup("img2", "vm2", &["-b", "64k"]);
    let db_files: &[&str] = if sqlite { &["keepfs.sqlite-wal", "keepfs.sqlite-shm"] } else { &[] };
    assert_owner_only(&repo.home(), &[db_files, &["storage/blocks/", "storage/versions/V"]].concat());
    drop(db);
    repo.ok(&["restore", &uid, &repo.url("out")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img")));
    // A new restore target is as private as the backup it came from.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo.path("out")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the restored disk is {mode:o}");
    // One restored over keeps its mode.
    std::fs::set_permissions(repo.path("out"), std::fs::Permissions::from_mode(0o640)).unwrap();
    repo.ok(&["restore", "--force", &uid, &repo.url("out")]);
    let mode = std::fs::metadata(repo.path("out")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "restored over: {mode:o}");
    repo.ok(&["rm", "--force", &uid]);
    repo.ok(&["cleanup"]);
    let db_files: &[&str] = if sqlite { &["keepfs.sqlite"] } else { &[] };
    assert_owner_only(&repo.home(), &[db_files, &["storage/tmp"]].concat());
    // A mount in the background logs to the home, privately too (it was 0644), and a
    // log an older keepfs left readable by others is narrowed.
    let old_log = repo.home().join("mount.log");
    std::fs::write(&old_log, "keepfs: an older mount's line\n").unwrap();
    std::fs::set_permissions(&old_log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mnt = repo.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    repo.ok(&["mount", "--daemon", mnt.to_str().unwrap()]);
    let unmounted = std::process::Command::new("fusermount3").arg("-u").arg(&mnt).status().unwrap();
    assert!(unmounted.success());
    assert_owner_only(&repo.home(), &["mount.log"]);
}

/// What the engine writes besides the storage: a draft's spool file (blocks written
/// through the filesystem, spilled from memory) and a storage's read cache copies.
#[test]
fn spool_and_read_cache_files_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, _db) = embedded_config(dir.path().join("home"));
    let cache_dir = dir.path().join("cache");
    config.storages[0].read_cache = Some(ReadCacheConfig { dir: cache_dir.clone(), max_bytes: 64 << 20 });
    let repo = Arc::new(Repository::open(config).unwrap());
    let img = dir.path().join("img");
    std::fs::write(&img, mixed_image(7, 8, BS as usize, 0)).unwrap();
    let opts = BackupOptions { name: "vm".into(), block_size: Some(BS), ..Default::default() };
    let v = repo.backup(&Url::File(img.clone()), &opts, &Silent).unwrap();
    let out = dir.path().join("out");
    repo.restore(v.uid, &Url::File(out.clone()), &RestoreOptions::default(), &Silent).unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&img));
    assert_owner_only(&cache_dir, &["cache/default/blocks/"]);

    let base = Arc::new(repo.open_image(v.uid, Arc::new(BlockCache::new(1 << 20)), None).unwrap());
    let mut draft = Draft::start(
        repo.clone(),
        DraftOptions {
            backup: BackupOptions { name: "vm".into(), block_size: Some(BS), ..Default::default() },
            base: Some(base),
            streaming: false,
            memory_blocks: 1,
            spool_blocks: 6,
        },
    )
    .unwrap();
    // Partial blocks, so they stay in the spool instead of going to the engine.
    for i in 0..4u64 {
        draft.write_at(i * BS as u64 + 10, &random_bytes(i, 100)).unwrap();
    }
    assert_owner_only(&dir.path().join("home"), &["home/spool"]);
    // The spool files are unnamed (nothing outlives the process): they are this
    // process's open files in the spool directory, owner-only too.
    let spool = dir.path().join("home").join("spool");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "a spool file has a name");
    let open: Vec<u32> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let fd = e.ok()?.path();
            let target = std::fs::read_link(&fd).ok()?;
            target.starts_with(&spool).then(|| std::fs::metadata(&fd).unwrap().permissions().mode() & 0o7777)
        })
        .collect();
    assert!(!open.is_empty(), "no spool file open in {}", spool.display());
    assert!(open.iter().all(|m| m & 0o077 == 0), "spool files readable by others: {open:?}");
    draft.commit().unwrap();
    assert_owner_only(&dir.path().join("home"), &["storage/versions/V0000000002"]);
}

/// A repository a group shares: `file_mode = "0660"` makes files 0660 and directories
/// 0770 (under a umask of 002, which lets both through).
#[test]
fn file_mode_shares_a_repository_with_a_group() {
    use std::os::unix::process::CommandExt;
    let repo = Repo::new();
    let home = repo.home();
    let config = repo.path("keepfs.toml");
    std::fs::write(&config, format!("home = \"{}\"\nfile_mode = \"0660\"\n", home.display())).unwrap();
    std::fs::write(repo.path("img"), mixed_image(8, 6, BS as usize, 0)).unwrap();
    let url = repo.url("img");
    let mut cmd = std::process::Command::new(KEEPFS);
    cmd.args(["--config", config.to_str().unwrap(), "backup", "-b", "64k", &url, "shared"]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o002);
            Ok(())
        });
    }
    let out = output_within(cmd, COMMAND_LIMIT, "keepfs backup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = tree(&home);
    assert!(all.len() > 5, "{all:?}");
    for (p, mode) in &all {
        let want = if p.is_dir() { 0o770 } else { 0o660 };
        assert_eq!(*mode, want, "{:04o} {}", mode, p.display());
    }
}
