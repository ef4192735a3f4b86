//! Images of hundreds of terabytes (issue 13): a mostly sparse image backs up and
//! restores in bounded memory with an index of a few bytes; repositories written before
//! index format 2 keep reading; `rm` + `cleanup` give the database's space back.
//! Speed and memory figures are in contrib/bench/huge_index.py, not here.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const TIB: u64 = 1 << 40;

/// Peak resident memory of the largest child process this test binary has waited for.
fn peak_child_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

/// A directory on tmpfs, which holds sparse files of any size (ext4 stops at 16 TiB).
fn tmpfs_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm (tmpfs)")
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// A 200 TiB VM disk holding a few MiB (a sparse file on tmpfs): backed up, restored
/// byte-identical where it has data and as holes elsewhere, and its stored index, the
/// database and the memory of both commands stay small.
#[test]
fn a_200_tib_sparse_disk_backs_up_and_restores_in_bounded_memory() {
    let repo = Repo::new();
    let shm = tmpfs_dir();
    let size = 200 * TIB;
    let img = shm.path().join("disk.img");
    let pieces: Vec<(u64, Vec<u8>)> = vec![
        (0, random_bytes(1, 1 << 20)),                            // boot sector and more
        (77 * TIB + 12345, random_bytes(2, 3 << 20)),             // across a block boundary
        (size - (5 << 20) - 17, random_bytes(3, (5 << 20) + 17)), // up to the very end
    ];
    let refs: Vec<(u64, &[u8])> = pieces.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    drop(sparse_file(&img, size, &refs));

    let url = format!("file://{}", img.display());
    let uid = repo.ok(&["backup", &url, "disk"]).trim().to_string();
    let v = repo.version(&uid);
    assert_eq!(v["size"], size);
    assert_eq!(v["status"], "valid");
    // 52 million blocks of 4 MiB, 4 of them data: the version object (its metadata and
    // its index) and the whole database stay tiny.
    let object = repo.storage().join("versions").join(&uid);
    assert!(file_len(&object) < 4096, "version object is {} bytes", file_len(&object));
    repo.checkpoint_db();
    assert!(file_len(&repo.db_file()) < (1 << 20), "database is {} bytes", file_len(&repo.db_file()));

    let out = shm.path().join("restored.img");
    repo.ok(&["restore", &uid, &format!("file://{}", out.display())]);
    let restored = fs::File::open(&out).unwrap();
    assert_eq!(restored.metadata().unwrap().len(), size);
    for (off, data) in &pieces {
        let mut back = vec![0u8; data.len()];
        restored.read_exact_at(&mut back, *off).unwrap();
        assert!(back == *data, "the data at byte {off} came back");
    }
    // Only the blocks with data were written: the rest are holes (a few 4 MiB blocks).
    let allocated = restored.metadata().unwrap().blocks() * 512;
    assert!(allocated <= 4 * (4 << 20), "restored file allocates {allocated} bytes");

    // storage-usage counts the sparse bytes from the runs.
    let usage: serde_json::Value = serde_json::from_str(&repo.ok(&["storage-usage", "--format", "json"])).unwrap();
    let sparse = usage[0]["sparse"].as_u64().unwrap();
    assert_eq!(sparse, size - 4 * (4 << 20), "four blocks hold data");

    // rm + cleanup read the 52-million-block index too, in the same bound, and take
    // every block it had.
    repo.ok(&["rm", "--force", &uid]);
    let done = repo.ok(&["cleanup"]);
    assert!(done.contains("deleted 4 object(s)"), "{done}");
    assert_eq!(repo.block_objects(), 0);
    assert!(peak_child_rss_bytes() < 512 << 20, "a keepfs command peaked at {} bytes", peak_child_rss_bytes());
}

/// `null://200T`: an image of nothing but zeros. Backup and restore to a 200 TiB file
/// (all holes); the stored index is a few bytes, not the 1.6 GB of 32 bytes a block.
#[test]
fn a_200_tib_null_image_has_a_tiny_index() {
    let repo = Repo::new();
    let shm = tmpfs_dir();
    let uid = repo.ok(&["backup", "null://200T", "zeros"]).trim().to_string();
    assert_eq!(repo.version(&uid)["size"], 200 * TIB);
    let object = repo.storage().join("versions").join(&uid);
    assert!(file_len(&object) < 4096, "version object is {} bytes", file_len(&object));
    let out = shm.path().join("zeros.img");
    repo.ok(&["restore", &uid, &format!("file://{}", out.display())]);
    let m = fs::metadata(&out).unwrap();
    assert_eq!((m.len(), m.blocks()), (200 * TIB, 0), "a 200 TiB file of holes");
    repo.ok(&["deep-scrub", &uid]);
    assert!(peak_child_rss_bytes() < 512 << 20, "a keepfs command peaked at {} bytes", peak_child_rss_bytes());
}

/// Rewrites every index in the database in format 1 (one 32-byte entry per block), as
/// keepfs wrote them before format 2, and turns the database's auto-vacuum off, as it
/// was: the repository an older keepfs left.
fn make_it_an_old_repository(repo: &Repo) {
    let conn = rusqlite::Connection::open(repo.db_file()).unwrap();
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT uid, data FROM version_index")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (uid, data) in rows {
        let old = keepfs::index::BlockIndex::decode(&data).unwrap().encode_v1();
        conn.execute("UPDATE version_index SET data=?2 WHERE uid=?1", rusqlite::params![uid, old]).unwrap();
    }
    conn.execute_batch("PRAGMA auto_vacuum = NONE; VACUUM;").unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)).unwrap();
}

/// An old repository (format 1 indexes, 8 MiB for a 1 TiB version) still restores,
/// scrubs, diffs and lists; `rm` + `cleanup` then give the space back: the database file
/// shrinks, first by converting it to incremental auto-vacuum, later incrementally.
#[test]
fn an_old_repository_still_reads_and_cleanup_shrinks_its_database() {
    if sqlite_only("an old repository's SQLite file and its shrinking") {
        return;
    }
    let repo = Repo::new();
    let bs = 64 * 1024;
    fs::write(repo.path("a"), mixed_image(5, 40, bs, 999)).unwrap();
    let a = repo.backup("a", "a", &["-b", "64k"]);
    let mut changed = mixed_image(5, 40, bs, 999);
    changed[3 * bs..4 * bs].copy_from_slice(&random_bytes(6, bs));
    fs::write(repo.path("b"), &changed).unwrap();
    let b = repo.backup("b", "a", &["-b", "64k"]);
    let big1 = repo.ok(&["backup", "null://1T", "zeros"]).trim().to_string();
    let big2 = repo.ok(&["backup", "null://1T", "zeros"]).trim().to_string();
    make_it_an_old_repository(&repo);
    let before = file_len(&repo.db_file());
    assert!(before > 16 << 20, "two 1 TiB format 1 indexes: {before} bytes");

    // Everything reads the old format.
    assert_eq!(repo.restore_sha(&a, "out"), sha256_file(&repo.path("a")));
    assert_eq!(repo.restore_sha(&b, "out"), sha256_file(&repo.path("b")));
    repo.ok(&["deep-scrub", &a]);
    repo.ok(&["scrub", &big1]);
    let diff: serde_json::Value = serde_json::from_str(&repo.ok(&["diff", &a, &b, "--format", "json"])).unwrap();
    assert_eq!(diff[0]["offset"], 3 * bs as u64, "{diff}");
    assert_eq!(diff[0]["length"], bs as u64, "{diff}");
    assert_eq!(repo.valid_uids("name == \"zeros\"").len(), 2);

    // rm + cleanup of one 1 TiB version: the database converts and shrinks by its index
    // (8 MiB; a little less comes back than the blob, pages of other tables move too).
    repo.ok(&["rm", "--force", &big1]);
    let r = repo.run(&["cleanup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("database: returned"), "{}", r.stdout);
    let after_first = file_len(&repo.db_file());
    assert!(after_first + (7 << 20) <= before, "database {before} -> {after_first} bytes");
    // And again, now incrementally (the database is converted).
    repo.ok(&["rm", "--force", &big2]);
    repo.ok(&["cleanup"]);
    let after_second = file_len(&repo.db_file());
    assert!(after_second + (7 << 20) <= after_first, "database {after_first} -> {after_second} bytes");
    let conn = rusqlite::Connection::open(repo.db_file()).unwrap();
    assert_eq!(conn.query_row("PRAGMA auto_vacuum", [], |r| r.get::<_, i64>(0)).unwrap(), 2, "incremental");
    // What is left still restores.
    assert_eq!(repo.restore_sha(&b, "out"), sha256_file(&repo.path("b")));
}
