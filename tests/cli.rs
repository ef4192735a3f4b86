//! The core CLI as a user meets it: back up, list, restore, compare sha256, remove,
//! clean up, and the one-line errors for every kind of mistake.

mod common;
use common::*;
use std::fs;

const BS: usize = 64 * 1024;

#[test]
fn images_of_every_shape_restore_byte_identical() {
    let repo = Repo::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("mixed-with-short-tail", mixed_image(1, 23, BS, 1234)),
        ("exact-blocks", mixed_image(2, 10, BS, 0)),
        ("smaller-than-a-block", random_bytes(3, 777)),
        ("all-zero", vec![0u8; 5 * BS + 17]),
        ("empty", Vec::new()),
    ];
    for (name, data) in &cases {
        fs::write(repo.path(name), data).unwrap();
        let uid = repo.backup(name, name, &["-b", "64k"]);
        assert!(uid.starts_with('V') && uid.len() == 11, "uid {uid}");
        let v = repo.version(&uid);
        assert_eq!(v["size"], data.len() as u64);
        assert_eq!(v["status"], "valid");
        assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path(name)), "{name}");
    }
    // The default block size (4M) with a size that is not a multiple of it.
    let big = mixed_image(4, 3, 4 << 20, 99_999);
    fs::write(repo.path("big"), &big).unwrap();
    let uid = repo.backup("big", "big", &[]);
    assert_eq!(repo.version(&uid)["block_size"], 4 << 20);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("big")));
}

/// An image of 1,100 blocks of 4 KiB: the index groups blocks by 256 in memory, and
/// here data, holes and repeats sit on both sides of every group boundary (blocks 255,
/// 256, 511, 512, ...). It backs up, restores (to a new file, over an existing one with
/// --sparse, and as a delta), diffs against a changed copy block for block,
/// and scrubs.
#[test]
fn an_image_across_the_index_groups_of_256_blocks_restores_and_diffs_block_for_block() {
    const B: usize = 4096;
    let repo = Repo::new();
    let n = 1100;
    let mut img = vec![0u8; n * B + 100];
    let holes = [0, 254, 256, 257, 511, 767, 768, 1023, 1024];
    for i in 0..n {
        if holes.contains(&i) {
            continue;
        }
        // Every 7th block repeats block 1; the rest are unique.
        let content = if i % 7 == 0 { random_bytes(1, B) } else { random_bytes(10_000 + i as u64, B) };
        img[i * B..(i + 1) * B].copy_from_slice(&content);
    }
    img[n * B..].copy_from_slice(&random_bytes(3, 100)); // a short last block
    fs::write(repo.path("img"), &img).unwrap();
    let a = repo.backup("img", "groups", &["-b", "4k"]);
    let want = sha256_file(&repo.path("img"));
    assert_eq!(repo.restore_sha(&a, "out"), want);
    repo.ok(&["restore", "--force", "--sparse", &a, &repo.url("out")]);
    assert_eq!(sha256_file(&repo.path("out")), want, "over an existing file");
    let r = repo.run(&["deep-scrub", &a]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Change blocks on both sides of group boundaries: data to hole, hole to data,
    // data to other data.
    let mut img2 = img.clone();
    img2[255 * B..256 * B].fill(0); // data -> hole
    img2[256 * B..257 * B].copy_from_slice(&random_bytes(4, B)); // hole -> data
    img2[512 * B + 9] ^= 1; // data -> other data
    img2[1023 * B..1024 * B].copy_from_slice(&random_bytes(5, B)); // hole -> data
    fs::write(repo.path("img2"), &img2).unwrap();
    let b = repo.backup("img2", "groups", &["-b", "4k"]);
    assert_eq!(repo.restore_sha(&b, "out2"), sha256_file(&repo.path("img2")));
    let json: serde_json::Value = serde_json::from_str(&repo.ok(&["diff", "--format", "json", &a, &b])).unwrap();
    let want = serde_json::json!([
        {"offset": 255 * B, "length": B, "exists": "false"},
        {"offset": 256 * B, "length": B, "exists": "true"},
        {"offset": 512 * B, "length": B, "exists": "true"},
        {"offset": 1023 * B, "length": B, "exists": "true"},
    ]);
    assert_eq!(json, want, "{json}");
    // Both indexes read from the catalog in pieces of 97 bytes, walked side by side.
    let r = repo.run_env(&["diff", "--format", "json", &a, &b], &[("KEEPFS_TEST_INDEX_PIECE", "97")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(), want);
    assert_eq!(repo.version(&b)["stats"]["bytes_written"], (3 * B) as u64, "only the three new blocks are stored");
    // `out` holds a: a delta restore writes only what differs.
    repo.ok(&["restore", "--delta-from", &a, &b, &repo.url("out")]);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img2")), "delta restore of b over a");
}

/// Restore, deep-scrub and cleanup read a version's index out of the catalog a piece at
/// a time, never whole (here pieces of 97 bytes, which cut across the header, the runs
/// and the ids): holes, data and repeats across the index's groups restore
/// byte-identical, to a new file and over an existing one. A restore reads the index end
/// to end and checks it before anything is written: a flip near its end makes it refuse
/// with the repair to run, write no file, and mark the version invalid; once repaired it
/// restores again, deep-scrubs clean, and cleanup keeps exactly the objects it names.
#[test]
fn restore_scrub_and_cleanup_read_the_index_from_the_catalog_in_pieces() {
    const B: usize = 4096;
    let repo = Repo::new();
    let n = 700;
    let mut img = vec![0u8; n * B + 10];
    for i in (0..n).filter(|i| i % 5 != 0) {
        // Every third block repeats one content; the rest are unique.
        let content = if i % 3 == 0 { random_bytes(1, B) } else { random_bytes(20_000 + i as u64, B) };
        img[i * B..(i + 1) * B].copy_from_slice(&content);
    }
    img[n * B..].copy_from_slice(&random_bytes(2, 10));
    fs::write(repo.path("img"), &img).unwrap();
    let a = repo.backup("img", "streamed", &["-b", "4k"]);
    let want = sha256_file(&repo.path("img"));
    let pieces = [("KEEPFS_TEST_INDEX_PIECE", "97")];
    let restore = |args: &[&str]| {
        let r = repo.run_env(args, &pieces);
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    restore(&["restore", &a, &repo.url("out")]);
    assert_eq!(sha256_file(&repo.path("out")), want);
    fs::write(repo.path("out"), random_bytes(3, img.len())).unwrap();
    restore(&["restore", "--force", &a, &repo.url("out")]);
    assert_eq!(sha256_file(&repo.path("out")), want, "over an existing file");

    repo.edit_index(&a, |data| {
        let at = data.len() - 40;
        data[at] ^= 0x10;
    });
    let r = repo.run_env(&["restore", &a, &repo.url("again")], &pieces);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains("index checksum mismatch"), "{}", r.stderr);
    assert!(r.error_line().contains(&format!("keepfs metadata restore --force {a}")), "{}", r.stderr);
    let written: Vec<_> = fs::read_dir(repo.path(""))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("again"))
        .collect();
    assert!(written.is_empty(), "nothing is written from a damaged index: {written:?}");
    assert_eq!(repo.version(&a)["status"], "invalid");
    repo.ok(&["metadata", "restore", "--force", &a]);
    restore(&["restore", &a, &repo.url("again")]);
    assert_eq!(sha256_file(&repo.path("again")), want, "repaired from the storage");

    // Cleanup and deep-scrub read every index in pieces too: every object the version
    // names is marked and kept, and checked.
    let objects = repo.block_objects();
    let r = repo.run_env(&["cleanup"], &pieces);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("deleted 0 object(s)"), "{}", r.stdout);
    assert_eq!(repo.block_objects(), objects);
    let r = repo.run_env(&["deep-scrub", &a], &pieces);
    assert_eq!(r.code, 0, "{}", r.stderr);
    repo.ok(&["rm", "--force", &a]);
    let r = repo.run_env(&["cleanup"], &pieces);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.block_objects(), 0);
}

/// A version object whose index is large is built and stored as a stream from the
/// index's file, uncompressed (its index is a zstd frame already), not in memory. The
/// test lowers the threshold (64 MiB) to nothing, so every index goes that way: the
/// object checks in a deep-scrub, the catalog comes back from it alone, and the
/// version restores byte-identical.
#[test]
fn a_version_object_streamed_from_its_index_file_is_the_whole_version() {
    const B: usize = 4096;
    let repo = Repo::new();
    let img = mixed_image(404, 300, B, 123);
    fs::write(repo.path("img"), &img).unwrap();
    let streamed = [("KEEPFS_TEST_STREAMED_INDEX", "0")];
    let r = repo.run_env(&["backup", &repo.url("img"), "big", "-b", "4k"], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let a = r.stdout.trim().to_string();
    let object = fs::read(repo.storage().join("versions").join(&a)).unwrap();
    let flags = u16::from_le_bytes([object[12], object[13]]);
    assert_eq!(flags, 0, "stored as it was streamed, not compressed");
    let r = repo.run_env(&["deep-scrub", &a], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A label written again from the catalog's index, read as a stream into a file.
    let r = repo.run_env(&["label", &a, "env=prod"], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = repo.run_env(&["deep-scrub", &a], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Rebuilt from it read as a stream (its index kept in a spool file), then read
    // whole: the same version either way.
    repo.lose_catalog();
    let r = repo.run_env(&["database", "rebuild"], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.version(&a)["status"], "valid");
    assert_eq!(repo.version(&a)["labels"]["env"], "prod");
    assert_eq!(repo.restore_sha(&a, "out"), sha256_file(&repo.path("img")));
    let streamed_version = repo.version(&a);
    repo.lose_catalog();
    repo.ok(&["database", "rebuild"]);
    assert_eq!(repo.version(&a), streamed_version);
    assert_eq!(repo.restore_sha(&a, "out"), sha256_file(&repo.path("img")));
    // The repair of a damaged index reads it the same way.
    let r = repo.run_env(&["metadata", "restore", "--force", &a], &streamed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.version(&a), streamed_version);
    assert_eq!(repo.restore_sha(&a, "out"), sha256_file(&repo.path("img")));
    // The file the index was written to has no name: nothing is left in the spool.
    let spool = repo.home().join("spool");
    assert_eq!(fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "{spool:?}");
}

/// `metadata restore --force` replaces a version's index only while no reader holds the
/// version (a reader streams the index a piece at a time): a restore stopped half way
/// through keeps it off with a one-line refusal, then finishes byte-identical, and the
/// replacement goes through once it is done.
#[test]
fn metadata_restore_keeps_off_a_version_while_a_restore_reads_it() {
    if sqlite_only("the test watches the version locks in the SQLite file") {
        return;
    }
    const B: usize = 4096;
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(7, 2048 * B)).unwrap();
    let a = repo.backup("img", "locked", &["-b", "4k"]);
    let n: i64 = a[1..].parse().unwrap();
    let mut child = repo
        .command(&["restore", &a, &repo.url("out")])
        .env("KEEPFS_TEST_INDEX_PIECE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let db = repo.db_file();
    let frozen = poll(|| {
        let conn = rusqlite::Connection::open(&db).ok()?;
        let q = "SELECT count(*) FROM version_locks WHERE uid=?1 AND purpose='restore'";
        let locked: i64 = conn.query_row(q, [n], |r| r.get(0)).ok()?;
        (locked > 0).then(|| stop(&child))
    })
    .expect("the restore locks its version");
    let r = repo.run(&["metadata", "restore", "--force", &a]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("version {a} is in use (restore by pid")), "{}", r.stderr);
    frozen.resume();
    assert!(child.wait().unwrap().success());
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img")));
    assert_eq!(repo.ok(&["metadata", "restore", "--force", &a]).trim(), a.as_str());
}

#[test]
fn zero_blocks_are_never_stored_and_sparse_restore_leaves_holes() {
    let repo = Repo::new();
    let mut img = vec![0u8; 40 * BS];
    img[20 * BS..21 * BS].copy_from_slice(&random_bytes(9, BS));
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "sparse", &["-b", "64k"]);
    assert_eq!(repo.block_objects(), 1, "only the one non-zero block is stored");
    let v = repo.version(&uid);
    assert_eq!(v["stats"]["bytes_sparse"], 39 * BS as u64);
    assert_eq!(v["stats"]["bytes_read"], 40 * BS as u64, "zeros written out are read");
    let out = repo.url("sparse-out");
    repo.ok(&["restore", "--sparse", &uid, &out]);
    assert_eq!(sha256_file(&repo.path("sparse-out")), sha256_file(&repo.path("img")));
    let meta = fs::metadata(repo.path("sparse-out")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 4 * BS as u64, "sparse restore allocated {} bytes", meta.blocks() * 512);
}

/// The holes of a sparse image file are found with SEEK_DATA and never read: a backup of
/// a 1 GiB file holding three small data regions reads only the blocks holding them, and
/// the restore is byte-identical. (Zeros written out are read and found zero: see above.)
#[test]
fn holes_of_a_sparse_source_are_never_read() {
    let repo = Repo::new();
    let img = repo.path("sparse.img");
    let (a, b, c) = (random_bytes(40, 70_000), random_bytes(41, 200_000), random_bytes(42, 1000));
    sparse_file(&img, 1 << 30, &[(0, &a), ((512 << 20) + 4097, &b), ((1 << 30) - 1000, &c)]);
    repo.backup("sparse.img", "holes", &["-b", "64k"]);
    let v = &repo.ls_json(None)[0];
    assert_eq!(v["status"], "valid");
    // Data blocks: 0-1 (70 000 bytes), 8192-8195 (from 512 MiB + 4097), the last one.
    let data_blocks = 2 + 4 + 1;
    assert_eq!(v["stats"]["bytes_read"], data_blocks * BS as u64, "{v}");
    assert_eq!(v["stats"]["bytes_sparse"], (1u64 << 30) - data_blocks * BS as u64, "{v}");
    assert_eq!(repo.block_objects(), data_blocks as usize);
    let uid = v["uid"].as_str().unwrap();
    repo.ok(&["restore", "--sparse", uid, &repo.url("restored")]);
    assert_eq!(sha256_file(&repo.path("restored")), sha256_file(&img));
}

#[test]
fn deduplication_across_versions_and_names() {
    let repo = Repo::new();
    let img = mixed_image(5, 40, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let v1 = repo.backup("img", "db", &["-b", "64k"]);
    let objects = repo.block_objects();
    assert!(objects > 0);

    // The same image again, under another name: not one new object.
    let v2 = repo.backup("img", "other-name", &["-b", "64k"]);
    assert_eq!(repo.block_objects(), objects);
    let s = &repo.version(&v2)["stats"];
    assert_eq!(s["bytes_written"], 0, "{s}");
    assert_eq!(s["bytes_deduplicated"].as_u64().unwrap() + s["bytes_sparse"].as_u64().unwrap(), img.len() as u64);

    // A copy with two blocks changed stores exactly two new objects.
    let mut changed = img.clone();
    changed[3 * BS + 10] ^= 0xff;
    changed[33 * BS + 99] ^= 0xff;
    fs::write(repo.path("changed"), &changed).unwrap();
    let v3 = repo.backup("changed", "db", &["-b", "64k"]);
    assert_eq!(repo.block_objects(), objects + 2);
    assert_eq!(repo.version(&v3)["stats"]["bytes_written"], 2 * BS as u64);

    assert_eq!(repo.restore_sha(&v1, "o1"), sha256_file(&repo.path("img")));
    assert_eq!(repo.restore_sha(&v3, "o3"), sha256_file(&repo.path("changed")));
}

#[test]
fn rm_and_cleanup_free_exactly_the_unreferenced_objects() {
    let repo = Repo::new();
    let a = mixed_image(6, 20, BS, 0);
    let mut b = a.clone();
    // b shares everything with a except four random blocks.
    for i in [3usize, 4, 8, 9] {
        b[i * BS..(i + 1) * BS].copy_from_slice(&random_bytes(600 + i as u64, BS));
    }
    fs::write(repo.path("a"), &a).unwrap();
    fs::write(repo.path("b"), &b).unwrap();
    let va = repo.backup("a", "vm", &["-b", "64k"]);
    let after_a = repo.block_objects();
    let vb = repo.backup("b", "vm", &["-b", "64k"]);
    assert_eq!(repo.block_objects(), after_a + 4);

    // The blocks only `a` has: 3, 4, 8, 9 (all distinct random blocks of a).
    let only_a = 4;
    let dry = repo.ok(&["rm", "--dry-run", "--force", &va]);
    assert!(dry.contains(&format!("would remove {va}")), "{dry}");
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 2, "dry run removes nothing");
    repo.ok(&["rm", "--force", &va]);
    assert!(!repo.storage().join("versions").join(&va).exists(), "version object removed");

    let plan = repo.ok(&["cleanup", "--dry-run"]);
    assert!(plan.contains(&format!("would delete {only_a} unreferenced object(s)")), "{plan}");
    assert_eq!(repo.block_objects(), after_a + 4, "dry run deletes nothing");
    let done = repo.ok(&["cleanup"]);
    assert!(done.contains(&format!("deleted {only_a} object(s)")), "{done}");
    assert_eq!(repo.block_objects(), after_a + 4 - only_a);
    assert_eq!(repo.restore_sha(&vb, "ob"), sha256_file(&repo.path("b")));
    // Nothing more to do.
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
}

/// The embedded default's repository, as a configuration file that sets `cleanup_memory`
/// to `budget`: its path.
fn budget_config(repo: &Repo, budget: &str) -> String {
    let cfg = repo.path(&format!("budget-{budget}.toml"));
    fs::write(
        &cfg,
        format!(
            "home = \"{h}\"\ncleanup_memory = \"{budget}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{h}/storage\"\n",
            h = repo.home().display()
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_string()
}

/// A storage with more objects than `cleanup_memory` holds is cleaned up a slice of its
/// ids at a time (each slice walks every index again). The slices together plan and
/// delete exactly what one pass does, orphaned files included, and keep every object a
/// version still needs.
#[test]
fn a_cleanup_over_its_memory_budget_goes_in_slices_and_deletes_the_same() {
    let repo = Repo::new();
    let a = mixed_image(41, 60, BS, 0);
    let mut b = a.clone();
    let mut c = a.clone();
    for i in (3..60).step_by(5) {
        b[i * BS..(i + 1) * BS].copy_from_slice(&random_bytes(4100 + i as u64, BS));
        c[(i + 1) * BS..(i + 2) * BS].copy_from_slice(&random_bytes(4200 + i as u64, BS));
    }
    for (name, img) in [("a", &a), ("b", &b), ("c", &c)] {
        fs::write(repo.path(name), img).unwrap();
    }
    let va = repo.backup("a", "vm", &["-b", "64k"]);
    let vb = repo.backup("b", "vm", &["-b", "64k"]);
    let vc = repo.backup("c", "vm", &["-b", "64k"]);
    repo.ok(&["rm", "--force", &va, &vb]);
    // Files a killed backup left behind, older than any cutoff and incomplete_grace.
    let mut orphans = Vec::new();
    for n in 0..5u64 {
        let id = keepfs::block::BlockId::of(&random_bytes(4300 + n, 64));
        let path = repo.storage().join(id.storage_key());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let f = fs::File::create(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400)).unwrap();
        orphans.push(path);
    }

    // The same repository through a configuration that gives cleanup 3 KiB: with some
    // 60 objects at 64 bytes each, that is two slices or more.
    let cfg = budget_config(&repo, "3K");
    let small = [("KEEPFS_CONFIG", cfg.as_str())];
    let json = |r: Run| -> serde_json::Value {
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        let all: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
        all["storages"][0].clone()
    };
    let whole = json(repo.run(&["cleanup", "--dry-run", "--format", "json"]));
    let sliced = json(repo.run_env(&["cleanup", "--dry-run", "--format", "json"], &small));
    assert_eq!(whole["slices"], 1, "{whole}");
    let slices = sliced["slices"].as_u64().unwrap();
    assert!(slices >= 2, "{sliced}");
    for key in ["objects", "orphans", "bytes", "referenced", "kept_recent", "unfinished"] {
        assert_eq!(whole[key], sliced[key], "{key}: {whole} vs {sliced}");
    }
    assert_eq!(sliced["orphans"], 5, "{sliced}");
    assert!(sliced["objects"].as_u64().unwrap() >= 20, "{sliced}");

    // For people: each slice says what it would delete; the lines name the same objects.
    let listed = |out: &str| -> Vec<String> {
        let mut l: Vec<String> = out.lines().filter(|l| l.starts_with("  ")).map(str::to_string).collect();
        l.sort();
        l
    };
    let r = repo.run_env(&["cleanup", "--dry-run"], &small);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("cleaning up in {slices} slices")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("(slice {slices}/{slices}): would delete")), "{}", r.stdout);
    assert_eq!(listed(&r.stdout), listed(&repo.ok(&["cleanup", "--dry-run"])));

    let before = repo.block_objects();
    let done = json(repo.run_env(&["cleanup", "--format", "json"], &small));
    assert_eq!(done["objects_deleted"], whole["objects"], "{done}");
    assert_eq!(done["orphans_deleted"], 5, "{done}");
    assert_eq!(done["bytes_freed"], whole["bytes"], "{done}");
    assert!(orphans.iter().all(|p| !p.exists()));
    assert_eq!(repo.block_objects() as u64, before as u64 - 5 - whole["objects"].as_u64().unwrap());
    assert_eq!(repo.block_objects() as u64, whole["referenced"].as_u64().unwrap(), "only what vc names is left");
    assert_eq!(repo.restore_sha(&vc, "oc"), sha256_file(&repo.path("c")));
    let r = repo.run(&["deep-scrub", &vc]);
    assert_eq!(r.code, 0, "deep-scrub after a sliced cleanup: {}{}", r.stdout, r.stderr);
    let again = json(repo.run_env(&["cleanup", "--dry-run", "--format", "json"], &small));
    assert_eq!((again["objects"].as_u64(), again["orphans"].as_u64()), (Some(0), Some(0)), "{again}");
}

#[test]
fn protection_and_minimum_age() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(7, 3 * BS)).unwrap();
    let uid = repo.backup("img", "p", &["-b", "64k"]);
    let r = repo.run(&["rm", &uid]);
    assert_eq!(r.code, 4, "too young: {}", r.stderr);
    assert!(r.error_line().contains("younger than 6 days"), "{}", r.stderr);
    repo.ok(&["protect", &uid]);
    assert_eq!(repo.version(&uid)["protected"], true);
    let r = repo.run(&["rm", &uid]);
    assert_eq!(r.code, 4);
    assert!(r.error_line().contains("is protected"), "{}", r.stderr);
    repo.ok(&["unprotect", &uid]);
    assert_eq!(repo.version(&uid)["protected"], false);
    repo.ok(&["rm", "--force", &uid]);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 0);
}

#[test]
fn ls_filters_and_labels() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(8, BS)).unwrap();
    let a = repo.backup("img", "db", &["-b", "64k", "-l", "env=prod", "-l", "tier", "-s", "snap1"]);
    let b = repo.backup("img", "db", &["-b", "64k", "-l", "env=test"]);
    let c = repo.backup("img", "web", &["-b", "64k"]);
    let uids = |f: &str| -> Vec<String> {
        repo.ls_json(Some(f)).as_array().unwrap().iter().map(|v| v["uid"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(uids(r#"name == "db" and labels["env"] == "prod""#), vec![a.clone()]);
    assert_eq!(uids(r#"name == "db""#), vec![a.clone(), b.clone()]);
    assert_eq!(uids(r#"not name == "db" or snapshot == "snap1""#), vec![a.clone(), c.clone()]);
    assert_eq!(uids(&format!("uid > {a} and uid <= {c}")), vec![b.clone(), c.clone()]);
    assert_eq!(uids(r#"labels["tier"] == """#), vec![a.clone()]);
    assert_eq!(uids(r#"date >= "2000-01-01" and status == "valid" and size == 64k"#).len(), 3);
    let v = repo.version(&a);
    assert_eq!(v["labels"]["env"], "prod");
    assert_eq!(v["labels"]["tier"], "");
    assert_eq!(v["snapshot"], "snap1");
    let table = repo.ok(&["ls"]);
    assert!(table.lines().next().unwrap().starts_with("uid"), "{table}");
    assert_eq!(table.lines().count(), 4);
    assert!(table.contains("env=prod,tier"));
}

/// A command line the parser refuses is one line too, naming what is wrong (with the
/// tip and the usage folded in), exit 2; JSON asked for gets the same message. Help and
/// version that cannot be written (a full disk) are a failure, not a silent success.
#[test]
fn command_line_mistakes_are_one_line_and_help_that_cannot_be_written_fails() {
    let repo = Repo::new();
    for (args, says) in [
        (vec!["bakup"], "unrecognized subcommand 'bakup'; tip: a similar subcommand exists: 'backup'"),
        (vec!["backup"], "the following required arguments were not provided: <SOURCE> <NAME> (usage: keepfs backup"),
        (vec!["ls", "--foo"], "unexpected argument '--foo' found"),
        (vec!["ls", "--format", "xml"], "invalid value 'xml' for '--format <FORMAT>' [possible values: table, json]"),
        (vec!["completion", "tcsh"], "invalid value 'tcsh'"),
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("keepfs: error: ") && r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    let r = repo.run(&["backup", "--format", "json", "null://1M"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(doc["error"].as_str().unwrap().contains("not provided: <NAME>"), "{doc}");
    for flag in ["--help", "-V"] {
        let mut c = repo.command(&[flag]);
        c.stdout(fs::OpenOptions::new().write(true).open("/dev/full").unwrap());
        let out = c.output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("No space left on device"));
    }
}

#[test]
fn user_mistakes_give_one_line_errors() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(10, BS)).unwrap();
    let uid = repo.backup("img", "x", &["-b", "64k"]);
    let existing = repo.url("img");
    let missing = repo.url("nope");
    // Sources that are not images: a FIFO nobody writes to (opening it used to block
    // forever), a socket, a directory (exit 1 before), a character device (/dev/zero
    // made a valid empty version).
    let fifo = repo.path("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(repo.path("socket")).unwrap();
    fs::create_dir(repo.path("dir")).unwrap();
    let (fifo, socket, dir) = (repo.url("fifo"), repo.url("socket"), repo.url("dir"));
    let long_name = "n".repeat(256);
    let deep_filter = format!("{}name == 'x'{}", "(".repeat(7000), ")".repeat(7000));
    #[allow(unused_mut)]
    let mut cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["backup", "file:///dev/zero", "x"], 2, "is a character device, not an image"),
        (vec!["backup", &fifo, "x"], 2, "is a FIFO (named pipe), not an image"),
        (vec!["backup", &socket, "x"], 2, "is a socket, not an image"),
        (vec!["backup", &dir, "x"], 2, "is a directory, not an image"),
        // Kernel pseudo-files: "Invalid argument", or a backup failed halfway (size 4096).
        (vec!["backup", "/proc/version", "x"], 2, "is a file of the kernel's procfs"),
        (vec!["backup", "/sys/kernel/uevent_seqnum", "x"], 2, "kernel's sysfs"),
        (vec!["deep-scrub", &uid, "--source", &fifo], 2, "is a FIFO"),
        (vec!["restore", &uid, &fifo], 2, "is a pipe or socket"),
        (vec!["restore", &uid, "-"], 2, "cannot write to standard output"),
        (vec!["database", "migrate", "--to", "/dev/null"], 4, "the file exists"),
        (vec!["restore", &uid, "file:///dev/null"], 4, "exists (character device); pass --force"),
        (vec!["backup", &existing, "."], 2, "not a usable backup name"),
        (vec!["backup", &existing, ".."], 2, "not a usable backup name"),
        (vec!["backup", &existing, "a/b"], 2, "not a usable backup name"),
        (vec!["backup", &existing, "two\nlines"], 2, "not a usable backup name"),
        (vec!["backup", &existing, &long_name], 2, "not a usable backup name"),
        (vec!["backup", &existing, "x", "-s", "snap\nshot"], 2, "not a usable snapshot name"),
        (vec!["backup", &existing, "x", "-l", "env=a\tb"], 2, "control characters"),
        (vec!["label", &uid, "env=a\nb"], 2, "control characters"),
        (vec!["protect", "1"], 2, "did you mean V0000000001?"),
        (vec!["restore", "v0000000001", "file:///tmp/keepfs-never"], 2, "not a version uid"),
        (vec!["rm", "V1"], 2, "not a version uid"),
        (vec!["protect", &uid, "V0000000042"], 2, "V0000000042 does not exist"),
        (vec!["unprotect", &uid, "V0000000042"], 2, "V0000000042 does not exist"),
        (vec!["rm", &uid, "V0000000042"], 2, "V0000000042 does not exist"),
        (vec!["ls", &deep_filter], 2, "nested"),
        (vec!["restore", &uid, &existing], 4, "pass --force"),
        (vec!["backup", "/tmp/keepfs-plain-never", "x"], 2, "does not exist"),
        (vec!["backup", "file://relative.img", "x"], 2, "is a relative path in a URL: use file:///"),
        (vec!["backup", "s3://pool/img", "x"], 2, "unsupported scheme"),
        (vec!["backup", "rbd:img", "x"], 2, "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]"),
        (vec!["backup", &missing, "x"], 2, "does not exist"),
        (vec!["backup", "null://12Q", "x"], 2, "unknown unit"),
        (vec!["backup", &existing, "x", "-b", "3M"], 2, "power of two"),
        (vec!["backup", &existing, "x", "-b", "64M"], 2, "power of two"),
        (vec!["backup", &existing, "x", "-l", "bad label=1"], 2, "not a label name"),
        (vec!["backup", &existing, ""], 2, "not a usable backup name"),
        (vec!["backup", &existing, "x", "-S", "tape"], 2, "no storage named 'tape'"),
        (vec!["restore", "V0000000099", "file:///tmp/keepfs-never"], 2, "does not exist"),
        (vec!["restore", "banana", "file:///tmp/keepfs-never"], 2, "not a version uid"),
        (vec!["restore", &uid, "null://1G"], 2, "use file:///path"),
        (vec!["rm", "V0000000042"], 2, "does not exist"),
        (vec!["ls", "name = 'x'"], 2, "column 6"),
        (vec!["ls", "size > true"], 2, "filter:"),
        (vec!["protect", "V0000000042"], 2, "does not exist"),
        // A file, directory or address that is not there or not one (exit 1 before).
        (vec!["metadata", "import", "/tmp/keepfs-never.json"], 2, "name a metadata export file"),
        (vec!["metadata", "import", "/tmp"], 2, "Is a directory"),
        (vec!["mount", "/tmp/keepfs-never/mnt"], 2, "does not exist; make it first"),
        (vec!["nbd", "--listen", "notanaddr"], 2, "give HOST:PORT of this host"),
        (vec!["nbd", "--listen", "999.1.1.1:1"], 2, "give HOST:PORT of this host"),
        (vec!["key", "new", "/tmp/keepfs-never/k"], 2, "its directory does not exist"),
        (vec!["database", "migrate", "--to", "/tmp/keepfs-never/new.sqlite"], 2, "keepfs-never does not exist"),
    ];
    // A keepfs built without the rbd feature says how to get one (with it: tests/rbd.rs).
    #[cfg(not(feature = "rbd"))]
    cases.push((vec!["backup", "rbd://pool/img@s", "x"], 2, "built without Ceph RBD support"));
    for (args, code, needle) in cases {
        let r = repo.run(&args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?} printed more than one line: {}", r.stderr);
        assert!(r.stderr.starts_with("keepfs: error: ") && r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?} printed to stdout: {}", r.stdout);
    }
    // /dev/null stays a target (the README's restore benchmark).
    let r = repo.run(&["restore", "--force", &uid, "file:///dev/null"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Failed backups left nothing looking valid; failed commands changed nothing.
    let versions = repo.ls_json(None);
    assert_eq!(versions.as_array().unwrap().len(), 1);
    assert_eq!(versions[0]["protected"], false, "`protect {uid} V0000000042` protected nothing");
    assert!(versions[0]["labels"].as_object().unwrap().is_empty(), "{versions}");
    // A bad config file is one line too.
    fs::write(repo.path("bad.toml"), "block_size = \"3M\"\n").unwrap();
    let cfg = repo.path("bad.toml");
    let r = repo.run(&["--config", cfg.to_str().unwrap(), "ls"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("configuration: ") && r.stderr.lines().count() == 1, "{}", r.stderr);
}

#[test]
fn a_corrupted_object_is_detected_and_named_on_restore() {
    let repo = Repo::new();
    let img = mixed_image(11, 10, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "c", &["-b", "64k"]);
    // Block 3 is random: find its object by content id and flip one byte in its file.
    let id = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&img[3 * BS..4 * BS]));
    let obj = repo.object_file(&img[3 * BS..4 * BS]);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01;
    fs::write(&obj, &bytes).unwrap();

    let out = repo.url("out");
    let r = repo.run(&["restore", &uid, &out]);
    assert_eq!(r.code, 3, "damaged data has its own exit code: {}", r.stderr);
    assert!(r.stderr.contains(&format!("block 3 (bytes {}..{}) object {id}", 3 * BS, 4 * BS)), "{}", r.stderr);
    assert!(r.stderr.contains("checksum"), "{}", r.stderr);
    let restored = fs::read(repo.path("out")).unwrap();
    assert_eq!(restored.len(), img.len());
    assert!(restored[3 * BS..4 * BS].iter().all(|b| *b == 0), "the bad block is written as zeros");
    assert_eq!(restored[..3 * BS], img[..3 * BS]);
    assert_eq!(restored[4 * BS..], img[4 * BS..]);
    assert_eq!(repo.version(&uid)["status"], "invalid");
    // A missing object is reported the same way.
    fs::remove_file(&obj).unwrap();
    let r = repo.run(&["restore", "--force", &uid, &out]);
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("missing"), "{}", r.stderr);
}

#[test]
fn a_block_repeated_in_an_image_is_restored_everywhere_it_occurs() {
    let repo = Repo::new();
    let (a, b) = (random_bytes(31, BS), random_bytes(32, BS));
    let img: Vec<u8> = [&a, &b, &a, &a, &b].iter().flat_map(|p| p.iter().copied()).collect();
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "rep", &["-b", "64k"]);
    assert_eq!(repo.block_objects(), 2);
    assert_eq!(repo.restore_sha(&uid, "out"), sha256_file(&repo.path("img")));
    // Damage a's object: every occurrence of a is named and written as zeros, b's are right.
    let obj = repo.object_file(&a);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    fs::write(&obj, &bytes).unwrap();
    let r = repo.run(&["restore", &uid, &repo.url("out")]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    for idx in [0, 2, 3] {
        assert!(r.stderr.contains(&format!("block {idx} (bytes {}..", idx * BS)), "block {idx}: {}", r.stderr);
    }
    assert!(!r.stderr.contains("block 1 ") && !r.stderr.contains("block 4 "), "{}", r.stderr);
    let out = fs::read(repo.path("out")).unwrap();
    for (i, chunk) in out.chunks(BS).enumerate() {
        let want: &[u8] = if i == 1 || i == 4 { &b } else { &[0u8; BS] };
        assert!(chunk == want, "block {i}");
    }
}

#[test]
fn null_source_and_sizes() {
    let repo = Repo::new();
    let uid = repo.ok(&["backup", "null://200G", "perftest"]).trim().to_string();
    let v = repo.version(&uid);
    assert_eq!(v["size"], 200u64 << 30);
    assert_eq!(v["stats"]["bytes_sparse"], 200u64 << 30);
    assert_eq!(repo.block_objects(), 0);
    // Restoring it sparse to a file gives a file of the right size and no data.
    let out = repo.url("n");
    repo.ok(&["restore", "--sparse", &uid, &out]);
    assert_eq!(fs::metadata(repo.path("n")).unwrap().len(), 200u64 << 30);
}

#[test]
fn version_objects_make_the_storage_self_sufficient() {
    let repo = Repo::new();
    fs::write(repo.path("img"), mixed_image(12, 6, BS, 10)).unwrap();
    let uid = repo.backup("img", "meta", &["-b", "64k", "-l", "k=v"]);
    let obj = fs::read(repo.storage().join("versions").join(&uid)).unwrap();
    let (v, index) = keepfs::repo::decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
    assert_eq!(v.uid.to_string(), uid);
    assert_eq!(v.name, "meta");
    assert_eq!(v.labels.get("k").map(String::as_str), Some("v"));
    assert_eq!(index.size, 6 * BS as u64 + 10);
    assert_eq!(index.entries.len(), 7);
    // Every non-sparse entry names an object that is in the storage.
    for e in index.entries.iter().filter(|e| !e.is_sparse()) {
        assert!(repo.storage().join(e.storage_key()).exists());
    }
}

#[test]
fn labels_change_and_reach_the_storage_copy() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(201, BS)).unwrap();
    let uid = repo.backup("img", "l", &["-b", "64k", "-l", "keep=1", "-l", "gone=x"]);
    repo.ok(&["label", &uid, "env=prod", "tier=", "flag", "gone-", "never-there-"]);
    let v = repo.version(&uid);
    let labels = v["labels"].as_object().unwrap();
    assert_eq!(labels.len(), 4, "{labels:?}");
    assert_eq!(v["labels"]["env"], "prod");
    assert_eq!(v["labels"]["tier"], "");
    assert_eq!(v["labels"]["flag"], "");
    assert_eq!(v["labels"]["keep"], "1");
    repo.ok(&["label", &uid, "env=test"]);
    assert_eq!(repo.version(&uid)["labels"]["env"], "test");
    // The version object in the storage follows.
    let obj = fs::read(repo.storage().join("versions").join(&uid)).unwrap();
    let (stored, _) = keepfs::repo::decode_version_object(keepfs::transform::Codec::plain(), &obj).unwrap();
    assert_eq!(stored.labels.get("env").map(String::as_str), Some("test"));
    assert!(!stored.labels.contains_key("gone"));
    for (args, needle) in [
        (vec!["label", &uid, "bad name=1"], "not a label name"),
        (vec!["label", "V0000000099", "a=b"], "does not exist"),
        (vec!["label", &uid, "=x"], "not a label name"),
    ] {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle) && r.stderr.lines().count() == 1, "{args:?}: {}", r.stderr);
    }
}

#[test]
fn expiry_dates_and_ls_expired() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(202, BS)).unwrap();
    let old = repo.backup("img", "e", &["-b", "64k", "--expire", "2020-01-01"]);
    let future = repo.backup("img", "e", &["-b", "64k", "-e", "2999-12-31 23:00:00"]);
    let never = repo.backup("img", "e", &["-b", "64k"]);
    assert_eq!(repo.version(&old)["expire"], "2020-01-01T00:00:00Z");
    let expired = |repo: &Repo| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&repo.ok(&["ls", "--expired", "--format", "json"])).unwrap();
        v.as_array().unwrap().iter().map(|v| v["uid"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(expired(&repo), vec![old.clone()]);
    repo.ok(&["expire", &never, "2021-06-01T12:00:00Z"]);
    assert_eq!(expired(&repo), vec![old.clone(), never.clone()]);
    repo.ok(&["expire", &old, ""]);
    assert!(repo.version(&old).get("expire").is_none(), "cleared");
    assert_eq!(expired(&repo), vec![never.clone()]);
    assert!(repo.ok(&["ls"]).lines().next().unwrap().contains("expire"));
    let _ = future;
    for args in [vec!["expire", &never, "someday"], vec!["backup", "null://1M", "x", "--expire", "31/12/2030"]] {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("expiry date") && r.stderr.lines().count() == 1, "{}", r.stderr);
    }
}

#[test]
fn due_and_sla_follow_the_schedulers() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(61, 3, 64 * 1024, 0)).unwrap();
    let config = repo.path("keepfs.toml");
    fs::write(
        &config,
        format!(
            "home = \"{}\"\n[[scheduler]]\nname = \"often\"\ninterval = \"2s\"\nkeep = 2\nsla = \"1s\"\n\
             [[scheduler]]\nname = \"twice\"\ninterval = \"1h\"\nkeep = 2\nsla = \"30m\"\n",
            repo.home().display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let due = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["--config", cfg, "due", "--format", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&repo.ok(&a)).unwrap()
    };
    // A name never backed up is due since 1970 for every scheduler asked about.
    let rows = due(&["-s", "hourly,daily", "db"]);
    assert_eq!(rows[0]["schedulers"], serde_json::json!(["hourly", "daily"]));
    assert_eq!(rows[0]["due_since"], "1970-01-01T00:00:00Z");
    repo.ok(&[
        "--config",
        cfg,
        "backup",
        &repo.url("a"),
        "db",
        "-b",
        "64k",
        "-l",
        "daily",
        "-l",
        "often",
        "-l",
        "twice",
    ]);
    let backed_up = std::time::Instant::now();
    // Just backed up: daily is not due; the 2-second scheduler is, one second later. Only
    // "later" is asserted for the 2-second scheduler: a loaded machine may be slow, never fast.
    assert_eq!(due(&["-s", "daily,twice", "db"]), serde_json::json!([]));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let rows = due(&["-s", "often,daily"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["name"], "db");
    assert_eq!(rows[0]["schedulers"], serde_json::json!(["often"]));
    let table = repo.ok(&["--config", cfg, "due", "-s", "often"]);
    assert!(
        table.starts_with("name  schedulers  expire_date") && table.lines().nth(1).unwrap().starts_with("db    often")
    );

    let breaches = |schedulers: &str| -> Vec<String> {
        let sla: serde_json::Value =
            serde_json::from_str(&repo.ok(&["--config", cfg, "sla", "-s", schedulers, "--format", "json"])).unwrap();
        sla.as_array().unwrap().iter().map(|b| b["breach"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(
        breaches("daily,twice"),
        vec!["daily: Too few backups. Found 1, should be 8.", "twice: Too few backups. Found 1, should be 2."]
    );
    // interval + sla = 3 s after the backup (its date is before the command returned), the
    // latest backup of the 2-second scheduler is too old.
    std::thread::sleep(std::time::Duration::from_millis(3100).saturating_sub(backed_up.elapsed()));
    let often = breaches("often");
    assert_eq!(often.len(), 2, "{often:?}");
    assert_eq!(often[0], "often: Too few backups. Found 1, should be 2.");
    assert!(
        often[1].starts_with("often: Latest backup is too old. It is from ")
            && often[1].ends_with(", should be at most 3s old."),
        "{often:?}"
    );
    let r = repo.run(&["--config", cfg, "sla", "-s", "fortnightly"]);
    assert_eq!(r.code, 2);
    assert!(
        r.error_line()
            .contains("unknown scheduler 'fortnightly' (configured: hourly, daily, weekly, monthly, often, twice)"),
        "{}",
        r.stderr
    );
    fs::write(&config, "[[scheduler]]\nname = \"x\"\ninterval = \"1d\"\nkeep = 3\nsla = \"2y\"\n").unwrap();
    let r = repo.run(&["--config", cfg, "due"]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("scheduler 'x' sla: '2y': unknown unit 'y'"), "{}", r.stderr);
}

#[test]
fn backy2_automatic_tags() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(62, 2, 64 * 1024, 0)).unwrap();
    let first = repo.backup("a", "db", &["-b", "64k", "--auto-tags"]);
    let second = repo.backup("a", "db", &["-b", "64k", "--auto-tags", "-l", "k=v"]);
    let plain = repo.backup("a", "db", &["-b", "64k"]);
    let labels = |uid: &str| repo.version(uid)["labels"].clone();
    assert_eq!(labels(&first), serde_json::json!({"b_daily": "", "b_weekly": "", "b_monthly": ""}));
    assert_eq!(labels(&second), serde_json::json!({"k": "v"}), "the period's first backup has the tags already");
    assert_eq!(labels(&plain), serde_json::json!({}));
    let tagged = repo.ls_json(Some("labels[\"b_weekly\"] == \"\""));
    assert_eq!(tagged.as_array().unwrap().len(), 1);
}

/// Where a command's standard output or error goes in the tests of broken outputs.
enum Out {
    /// A pipe whose reader has already gone (every write fails with EPIPE).
    ClosedPipe,
    /// /dev/full: every write fails with ENOSPC.
    Full,
    /// Captured, to be read.
    Piped,
}

/// Runs keepfs with stdout and stderr going to `stdout` and `stderr`; returns the exit
/// code and what was captured on stderr (empty unless `stderr` is `Piped`).
fn run_into(repo: &Repo, args: &[&str], stdout: Out, stderr: Out) -> (i32, String) {
    use std::process::Stdio;
    let to = |o: Out| -> Stdio {
        match o {
            Out::ClosedPipe => {
                use std::os::fd::{FromRawFd, OwnedFd};
                let mut fds = [0; 2];
                // SAFETY: pipe(2) fills two descriptors that are then owned here.
                assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                // SAFETY: the two descriptors pipe2 just made, owned by nothing else.
                let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
                drop(reader);
                writer.into()
            }
            Out::Full => fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full").into(),
            Out::Piped => Stdio::piped(),
        }
    };
    let mut c = repo.command(args);
    c.stdin(Stdio::null()).stdout(to(stdout)).stderr(to(stderr));
    let out = c.spawn().expect("start keepfs").wait_with_output().expect("wait for keepfs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// println! panicked (exit 101) on a closed pipe or a full disk, even after a backup had
/// committed its version. A reader that leaves ends the output quietly (exit 0); a
/// failed write is a one-line error (exit 1); work that was done is never reported as
/// failed, and a lost uid is quoted on stderr.
#[test]
fn closed_pipes_and_full_disks_never_panic_and_never_hide_done_work() {
    let repo = Repo::new();
    fs::write(repo.path("img"), random_bytes(20, 3 * BS)).unwrap();
    let uid = repo.backup("img", "vm", &["-b", "64k"]);
    repo.backup("img", "vm", &["-b", "64k"]);
    let listings: Vec<Vec<&str>> = vec![
        vec!["ls"],
        vec!["ls", "--format", "json"],
        vec!["due"],
        vec!["sla"],
        vec!["storage", "list"],
        vec!["cleanup", "--dry-run"],
        vec!["rm", "--dry-run", "--force", &uid],
        vec!["enforce", "latest1", "--dry-run"],
        vec!["metadata", "export", &uid, "-"],
    ];
    for args in &listings {
        let (code, err) = run_into(&repo, args, Out::ClosedPipe, Out::Piped);
        assert_eq!((code, err.as_str()), (0, ""), "{args:?} into a closed pipe");
        let (code, err) = run_into(&repo, args, Out::Full, Out::Piped);
        assert_eq!(code, 1, "{args:?} into /dev/full: {err}");
        assert_eq!(
            err, "keepfs: error: cannot write to standard output: No space left on device (os error 28)\n",
            "{args:?}"
        );
        // Messages on a stderr that cannot be written are dropped, not a panic.
        let (code, _) = run_into(&repo, args, Out::Piped, Out::ClosedPipe);
        assert_eq!(code, 0, "{args:?} with a closed stderr");
    }
    // Scrubs report on stderr; `keepfs batch-scrub |& head` closes it.
    assert_eq!(run_into(&repo, &["batch-scrub"], Out::Piped, Out::ClosedPipe).0, 0);
    assert_eq!(run_into(&repo, &["batch-scrub"], Out::Piped, Out::Full).0, 0);
    // An error still has its exit code when it cannot be printed.
    assert_eq!(run_into(&repo, &["ls", "name = 'x'"], Out::Piped, Out::Full).0, 2);

    // A backup whose uid cannot be printed has still committed its version: exit 0, and
    // the uid is on stderr.
    let url = repo.url("img");
    let (code, err) = run_into(&repo, &["backup", &url, "full"], Out::Full, Out::Piped);
    assert_eq!(code, 0, "{err}");
    let made = repo.ls_json(Some("name == 'full'"));
    let made = made[0]["uid"].as_str().unwrap();
    assert_eq!(repo.version(made)["status"], "valid");
    let warning = err.lines().last().unwrap();
    assert!(
        warning.starts_with("keepfs: warning: ") && warning.ends_with(made) && warning.contains("No space left"),
        "{err}"
    );
    // The same in JSON (pretty, several lines): the whole object is quoted, in one line.
    let (code, err) = run_into(&repo, &["backup", "--format", "json", &url, "full-json"], Out::Full, Out::Piped);
    assert_eq!(code, 0, "{err}");
    let json_uid = repo.ls_json(Some("name == 'full-json'"))[0]["uid"].as_str().unwrap().to_string();
    let warning = err.lines().last().unwrap();
    let quoted: serde_json::Value =
        serde_json::from_str(warning.split("its first lost line: ").nth(1).unwrap()).unwrap();
    assert_eq!(quoted["uid"], json_uid.as_str(), "{err}");
    let (code, err) = run_into(&repo, &["backup", &url, "gone"], Out::ClosedPipe, Out::Piped);
    assert_eq!(code, 0, "{err}");
    assert_eq!(repo.ls_json(Some("name == 'gone'"))[0]["status"], "valid");
    assert!(!err.contains("warning"), "a reader that left is not worth a warning: {err}");
    // A removal goes on whatever becomes of its list.
    let (code, err) = run_into(&repo, &["rm", "--force", made], Out::Full, Out::Piped);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("keepfs: warning: ") && err.contains(&format!("removing {made}")), "{err}");
    assert!(repo.ls_json(Some("name == 'full'")).as_array().unwrap().is_empty(), "removed");
}

/// `keepfs cleanup --dry-run | head -c1`: a real reader that reads one byte and leaves
/// while keepfs still has more than a pipe's buffer (64 KiB) to write.
#[test]
fn a_reader_that_leaves_early_ends_the_output_quietly() {
    let repo = Repo::new();
    // 1024 distinct 4 KiB blocks: a dry-run cleanup lists ~90 KiB of object lines.
    fs::write(repo.path("img"), random_bytes(21, 1024 * 4096)).unwrap();
    let uid = repo.backup("img", "vm", &["-b", "4k"]);
    repo.ok(&["rm", "--force", &uid]);
    let mut child = repo
        .command(&["cleanup", "--dry-run"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    use std::io::Read;
    stdout.read_exact(&mut one).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), err.as_ref()), (Some(0), ""));
    assert_eq!(repo.block_objects(), 1024, "a dry run deletes nothing");
}

/// A bare path names the file it says (a relative one in the working directory), for
/// backup and restore alike; `keepfs stats` then reports what each backup did.
#[test]
fn bare_paths_name_files_and_stats_report_each_backup() {
    let repo = Repo::new();
    let img = mixed_image(811, 12, 64 * 1024, 100);
    std::fs::write(repo.path("disk.img"), &img).unwrap();
    let here = |args: &[&str]| {
        let out = repo.command(args).current_dir(repo.dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let uid = here(&["backup", "disk.img", "vm", "-b", "64k"]);
    here(&["restore", &uid, "restored.img"]);
    assert_eq!(sha256_file(&repo.path("restored.img")), sha256_file(&repo.path("disk.img")));
    let again = here(&["backup", &repo.path("disk.img").display().to_string(), "vm", "-b", "64k"]);

    let stats: serde_json::Value = serde_json::from_str(&repo.ok(&["stats", "--format", "json"])).unwrap();
    let rows = stats.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let first = &rows[0];
    assert_eq!(first["uid"], uid.as_str());
    assert_eq!(first["size"], img.len() as u64);
    let s = &first["stats"];
    let (written, sparse) = (s["bytes_written"].as_u64().unwrap(), s["bytes_sparse"].as_u64().unwrap());
    assert_eq!(written + sparse + s["bytes_deduplicated"].as_u64().unwrap(), img.len() as u64, "{s}");
    assert_eq!(rows[1]["uid"], again.as_str());
    assert_eq!(rows[1]["stats"]["bytes_written"], 0, "the second backup stored nothing new");
    let table = repo.ok(&["stats", "name == \"vm\""]);
    assert!(table.starts_with("uid") && table.contains(&uid) && table.contains("MB/s"), "{table}");
}

/// storage-usage tells shared from exclusive blocks, and the exclusive ones are exactly
/// what `rm` and `cleanup` then free.
#[test]
fn storage_usage_says_what_rm_and_cleanup_free() {
    const B: usize = 64 * 1024;
    let repo = Repo::new();
    let (x, y, z, w) = (random_bytes(1, B), random_bytes(2, B), random_bytes(3, B), random_bytes(4, B));
    let zero = vec![0u8; B];
    let image = |name: &str, blocks: &[&Vec<u8>]| {
        std::fs::write(repo.path(name), blocks.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>()).unwrap();
    };
    image("a", &[&x, &y, &z, &zero]);
    image("b", &[&x, &y, &w, &zero]);
    image("c", &[&x, &zero, &zero, &zero]);
    // A block twice in one version only: exclusive both times, stored once.
    let v = random_bytes(5, B);
    image("d", &[&v, &zero, &v, &zero]);
    let a = repo.backup("a", "a", &["-b", "64k"]);
    let b = repo.backup("b", "b", &["-b", "64k"]);
    let c = repo.backup("c", "c", &["-b", "64k"]);
    let sizes = |files: Vec<std::path::PathBuf>| -> std::collections::HashMap<std::path::PathBuf, u64> {
        files.into_iter().map(|p| (p.clone(), p.metadata().unwrap().len())).collect()
    };
    let objects_before_d = sizes(files_under(&repo.storage().join("blocks")));
    let d = repo.backup("d", "d", &["-b", "64k"]);
    let v_object: Vec<u64> = sizes(files_under(&repo.storage().join("blocks")))
        .into_iter()
        .filter(|(p, _)| !objects_before_d.contains_key(p))
        .map(|(_, n)| n)
        .collect();
    assert_eq!(v_object.len(), 1, "d stored one object");
    let usage: serde_json::Value = serde_json::from_str(&repo.ok(&["storage-usage", "--format", "json"])).unwrap();
    let row = |uid: &str| usage.as_array().unwrap().iter().find(|u| u["uid"] == uid).unwrap().clone();
    let b64 = B as u64;
    let (ua, ub, uc) = (row(&a), row(&b), row(&c));
    assert_eq!(
        (ua["shared"].as_u64(), ua["exclusive"].as_u64(), ua["sparse"].as_u64()),
        (Some(2 * b64), Some(b64), Some(b64))
    );
    assert_eq!((ub["shared"].as_u64(), ub["exclusive"].as_u64()), (Some(2 * b64), Some(b64)));
    assert_eq!(
        (uc["shared"].as_u64(), uc["exclusive"].as_u64(), uc["sparse"].as_u64()),
        (Some(b64), Some(0), Some(3 * b64))
    );
    assert!(ua["exclusive_stored"].as_u64().unwrap() > 0);
    assert_eq!(uc["exclusive_stored"], 0, "c frees nothing");
    let ud = row(&d);
    assert_eq!(
        (ud["shared"].as_u64(), ud["exclusive"].as_u64(), ud["sparse"].as_u64()),
        (Some(0), Some(2 * b64), Some(2 * b64))
    );
    assert_eq!((ud["stored"].as_u64(), ud["exclusive_stored"].as_u64()), (Some(v_object[0]), Some(v_object[0])));
    // Within a budget of 300 bytes (128 a object: slices of about two objects each) the
    // accounting goes a slice at a time, and adds up to the same figures.
    let cfg = budget_config(&repo, "300");
    let r = repo.run_env(&["storage-usage", "--format", "json"], &[("KEEPFS_CONFIG", &cfg)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sliced: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(sliced, usage);
    let table = repo.ok(&["storage-usage", "name == \"a\""]);
    assert!(table.contains(&a) && table.lines().last().unwrap().starts_with("total"), "{table}");

    let before = repo.block_objects();
    let size_before: u64 =
        files_under(&repo.storage().join("blocks")).iter().map(|p| p.metadata().unwrap().len()).sum();
    repo.ok(&["rm", "--force", &a]);
    repo.ok(&["cleanup"]);
    assert_eq!(repo.block_objects(), before - 1, "only a's exclusive block went");
    let size_after: u64 = files_under(&repo.storage().join("blocks")).iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(size_before - size_after, ua["exclusive_stored"].as_u64().unwrap(), "freed what storage-usage said");
}

/// `config check` shows what a configuration resolves to, never a secret, and makes no
/// repository; a wrong file is a one-line error with exit 2.
#[test]
fn config_check_shows_what_it_resolved_and_no_secret() {
    let repo = Repo::new();
    let cfg = repo.path("k.toml");
    std::fs::write(
        &cfg,
        format!(
            "home = \"{}\"\n[[storage]]\nname = \"s3\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\n\
             region = \"garage\"\nbucket = \"backups\"\naccess_key = \"AKIDEXAMPLE\"\nsecret_key = \"SUPERSECRET\"\n\
             addressing = \"path\"\nkey_file = \"/root/k.key\"\n",
            repo.home().display()
        ),
    )
    .unwrap();
    let shown = repo.ok(&["--config", cfg.to_str().unwrap(), "config", "check"]);
    assert!(shown.contains("bucket backups") && shown.contains("key file /root/k.key"), "{shown}");
    assert!(!shown.contains("SUPERSECRET") && !shown.contains("AKIDEXAMPLE"), "{shown}");
    let embedded = repo.ok(&["config", "check"]);
    assert!(embedded.contains("embedded default") && embedded.contains("storage default: file"), "{embedded}");
    // The host name sessions are recorded under, and where it comes from.
    let named = repo.run_env(&["config", "check"], &[("KEEPFS_HOST", "hv-07")]);
    assert!(named.stdout.contains("host: hv-07 (KEEPFS_HOST)"), "{}", named.stdout);
    // A shared catalog: where its password comes from, never the password.
    let url = "postgresql://keepfs:pg-SECRET@db.example/keepfs";
    let shared = repo.run_env(&["config", "check"], &[("KEEPFS_DATABASE", url)]);
    assert!(shared.stdout.contains("database password: in the URL"), "{}", shared.stdout);
    assert!(!shared.stdout.contains("pg-SECRET"), "{}", shared.stdout);
    assert!(!repo.home().exists(), "checking made no repository");
    std::fs::write(&cfg, "bogus = 1\n").unwrap();
    let bad = repo.run(&["--config", cfg.to_str().unwrap(), "config", "check"]);
    assert_eq!(bad.code, 2);
    assert!(bad.error_line().contains("unknown field `bogus`"), "{}", bad.stderr);
}

/// With no configuration, root's repository is /var/lib/keepfs (a system tool's place),
/// unless an earlier keepfs left one in root's ~/.local/share/keepfs, which stays in use.
#[test]
fn root_uses_var_lib_keepfs_unless_it_already_has_a_repository_at_home() {
    let repo = Repo::new();
    let home_dir = repo.path("roothome");
    std::fs::create_dir_all(&home_dir).unwrap();
    let check = || {
        let out = std::process::Command::new(KEEPFS)
            .args(["config", "check"])
            .env_remove("KEEPFS_HOME")
            .env_remove("KEEPFS_CONFIG")
            .env("HOME", &home_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("home: ")).unwrap().to_string()
    };
    let user_home = home_dir.join(".local/share/keepfs");
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert_eq!(check(), "home: /var/lib/keepfs");
    } else {
        assert_eq!(check(), format!("home: {}", user_home.display()));
    }
    std::fs::create_dir_all(&user_home).unwrap();
    assert_eq!(check(), format!("home: {}", user_home.display()), "an existing repository stays in use");
}

/// `metadata export FILE` and `--metrics-file FILE` write what FILE is: a symbolic link's
/// target (the link stays), a FIFO's reader, a character device (`/dev/full` fails with
/// "no space" and stays a device); a directory is refused. They used to rename a new
/// file over it, which turned `/dev/full` into a regular file.
#[test]
fn an_export_writes_into_pipes_devices_and_links_instead_of_replacing_them() {
    use std::os::unix::fs::FileTypeExt;
    let repo = Repo::new();
    fs::write(repo.path("a"), random_bytes(83, 2 * 65536)).unwrap();
    let a = repo.backup("a", "a", &["-b", "64k"]);
    // A symbolic link: its target gets the document.
    let real = repo.path("real.json");
    let link = repo.path("link.json");
    std::os::unix::fs::symlink("real.json", &link).unwrap();
    repo.ok(&["metadata", "export", &a, link.to_str().unwrap()]);
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&real).unwrap()).unwrap();
    assert_eq!(doc["versions"][0]["uid"], a.as_str(), "{doc}");
    // A FIFO: its reader gets the document.
    let fifo = repo.path("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    repo.ok(&["metadata", "export", &a, fifo.to_str().unwrap()]);
    let read: serde_json::Value = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    assert_eq!(read, doc);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO stays a FIFO");
    // A character device that takes nothing: "no space", and it stays a device.
    let r = repo.run(&["metadata", "export", &a, "/dev/full"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.error_line().contains("cannot write /dev/full") && r.error_line().contains("No space left"),
        "{}",
        r.stderr
    );
    assert!(fs::metadata("/dev/full").unwrap().file_type().is_char_device(), "/dev/full is still a device");
    let r = repo.run(&["--metrics-file", "/dev/full", "ls"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(fs::metadata("/dev/full").unwrap().file_type().is_char_device(), "/dev/full is still a device");
    // A directory: refused, in one line.
    let dir = repo.path("adir");
    fs::create_dir(&dir).unwrap();
    let r = repo.run(&["metadata", "export", &a, dir.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().ends_with("is a directory; name a file"), "{}", r.stderr);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing was left in it");
}

/// A uid named twice is one version: `rm V V` removes it once and says so once, an
/// export holds it once, and a document that holds a version twice (made by hand, or by
/// an older keepfs) is refused whole instead of importing its versions and then failing
/// with a database error.
#[test]
fn a_uid_named_twice_is_one_version() {
    let repo = Repo::new();
    fs::write(repo.path("a"), random_bytes(81, 3 * 65536)).unwrap();
    fs::write(repo.path("b"), random_bytes(82, 3 * 65536)).unwrap();
    let a = repo.backup("a", "a", &["-b", "64k"]);
    let b = repo.backup("b", "b", &["-b", "64k"]);
    let doc = repo.path("twice.json");
    repo.ok(&["metadata", "export", &a, &b, &a, doc.to_str().unwrap()]);
    let exported: serde_json::Value = serde_json::from_slice(&fs::read(&doc).unwrap()).unwrap();
    assert_eq!(exported["versions"].as_array().unwrap().len(), 2, "{exported}");
    // Into a directory that is not there: said so, without the name of a temporary file.
    let nowhere = repo.path("nowhere/x.json");
    let r = repo.run(&["metadata", "export", &a, nowhere.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().ends_with("nowhere does not exist") && !r.stderr.contains("nowhere/.tmp"), "{}", r.stderr);

    let r = repo.run(&["rm", "--force", "--dry-run", &a, &a]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.matches("would remove").count(), 1, "{}", r.stdout);
    let r = repo.run(&["rm", "--force", &a, &b, &a]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("removed 2 version(s)"), "{}", r.stderr);

    // The same version twice in one document: nothing goes in.
    let mut doubled = exported.clone();
    let first = doubled["versions"][0].clone();
    doubled["versions"].as_array_mut().unwrap().push(first);
    fs::write(&doc, serde_json::to_vec(&doubled).unwrap()).unwrap();
    let r = repo.run(&["metadata", "import", doc.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("holds version {a} twice; nothing was imported")), "{}", r.stderr);
    assert!(repo.ls_json(None).as_array().unwrap().is_empty(), "{}", repo.ls_json(None));
    fs::write(&doc, serde_json::to_vec(&exported).unwrap()).unwrap();
    let imported = repo.ok(&["metadata", "import", doc.to_str().unwrap()]);
    assert_eq!(imported.split_whitespace().collect::<Vec<_>>(), [a.as_str(), b.as_str()]);
    assert_eq!(repo.restore_sha(&a, "out"), sha256_file(&repo.path("a")));
}

/// An expiry the catalog cannot keep (after the year 9999) is refused with one line,
/// instead of being accepted and then read back as no expiry at all; and a version
/// without a finished backup's figures shows no rate in `stats` (it used to show its size
/// over a millisecond).
#[test]
fn an_expiry_past_9999_is_refused_and_an_incomplete_version_has_no_rate() {
    let repo = Repo::new();
    fs::write(repo.path("a"), random_bytes(83, 65536)).unwrap();
    let a = repo.backup("a", "a", &["-b", "64k"]);
    for args in [vec!["expire", a.as_str(), "+10000-01-01"], vec!["backup", "--expire", "+10000-01-01"]] {
        let mut args = args;
        let url = repo.url("a");
        if args[0] == "backup" {
            args.extend([url.as_str(), "far"]);
        }
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains("outside the years 0 to 9999"), "{}", r.stderr);
    }
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "no version was made");
    repo.ok(&["expire", &a, "9999-12-31"]);
    assert!(repo.version(&a)["expire"].as_str().unwrap().starts_with("9999-12-31"), "{}", repo.version(&a));

    let stats: serde_json::Value = serde_json::from_str(&repo.ok(&["stats", "--format", "json"])).unwrap();
    assert!(stats[0]["bytes_per_second"].as_u64().is_some_and(|r| r > 0), "{stats}");
    let engine = keepfs::Repository::open(repo.engine_config()).unwrap();
    engine.set_status(keepfs::version::VersionUid::parse(&a).unwrap(), keepfs::version::Status::Incomplete).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&repo.ok(&["stats", "--format", "json"])).unwrap();
    assert!(stats[0]["bytes_per_second"].is_null(), "{stats}");
    let table = repo.ok(&["stats"]);
    assert!(table.lines().nth(1).is_some_and(|l| l.trim_end().ends_with(" -")), "{table}");
}

/// A mistyped KEEPFS_HOME: a command that only reads (or names a version) says there is
/// no repository there, answers as for an empty one, and creates nothing. It used to
/// leave a new, empty repository behind and list "no backups" as if they were gone.
#[test]
fn reading_where_no_repository_exists_says_so_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("keepfs-hmoe");
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(KEEPFS);
        c.args(args).env("KEEPFS_HOME", &typo).env_remove("KEEPFS_CONFIG").env_remove("KEEPFS_DATABASE");
        let out = output_within(c, COMMAND_LIMIT, &format!("keepfs {args:?}"));
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let note = format!("keepfs: no repository at {} yet", typo.display());
    let r = run(&["ls", "--format", "json"]);
    assert_eq!((r.code, r.stdout.trim()), (0, "[]"), "{}", r.stderr);
    assert!(r.stderr.starts_with(&note) && r.stderr.lines().count() == 1, "{}", r.stderr);
    for args in [
        &["stats"][..],
        &["storage", "list"],
        &["storage-usage"],
        &["batch-scrub"],
        &["enforce", "latest3", "--dry-run"],
        &["enforce", "latest3"],
        &["cleanup"],
        &["cleanup", "--dry-run"],
        &["database", "sessions"],
    ] {
        let r = run(args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with(&note), "{args:?}: {}", r.stderr);
    }
    // A cleanup's JSON is still one object; a storage it does not know is still named.
    let r = run(&["cleanup", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["storages"].as_array().map(|a| a.len()), Some(0), "{j}");
    let r = run(&["cleanup", "-S", "offsite"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("no storage named 'offsite' is configured"), "{}", r.stderr);
    // Naming a version: not found (exit 2), in one line that says why.
    let out = dir.path().join("out");
    for args in [
        vec!["restore", "V0000000001", out.to_str().unwrap()],
        vec!["rm", "--force", "V0000000001"],
        vec!["scrub", "V0000000001"],
    ] {
        let r = run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(
            r.error_line().contains(&format!(
                "version V0000000001 does not exist: there is no repository at {} yet",
                typo.display()
            )),
            "{args:?}: {}",
            r.stderr
        );
    }
    // A continuation, or a key change: nothing to continue or change, nothing made.
    let img0 = format!("file://{}", dir.path().join("none.img").display());
    for args in [
        vec!["backup", "--continue", "V0000000001", &img0, "vm"],
        vec!["key", "rekey"],
        vec!["key", "remove", "0123456789abcdef"],
    ] {
        let r = run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains(&format!("there is no repository at {}", typo.display())), "{}", r.stderr);
    }
    // Nothing to migrate.
    let r = run(&["database", "migrate", "--to", dir.path().join("new.sqlite").to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("to migrate (no repository at"), "{}", r.stderr);
    assert!(!dir.path().join("new.sqlite").exists());
    assert!(!typo.exists(), "reading created {}", typo.display());
    assert!(!out.exists());
    // A home that cannot be looked into is not taken for a missing one: the command
    // fails saying why (it used to answer "no repository" over existing backups).
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for home in [file.clone(), file.join("home")] {
        let mut c = std::process::Command::new(KEEPFS);
        c.args(["ls"]).env("KEEPFS_HOME", &home).env_remove("KEEPFS_CONFIG").env_remove("KEEPFS_DATABASE");
        let r = output_within(c, COMMAND_LIMIT, "keepfs ls");
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_ne!(r.status.code(), Some(0), "{}: {stderr}", home.display());
        assert!(!stderr.contains("no repository"), "{}: {stderr}", home.display());
        assert!(stderr.contains("is not a directory") || stderr.contains("Not a directory"), "{stderr}");
    }
    // A backup makes the repository; from then on nothing is said.
    let img = dir.path().join("img");
    std::fs::write(&img, random_bytes(5, 256 << 10)).unwrap();
    let r = run(&["backup", &format!("file://{}", img.display()), "vm", "-b", "64k"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(&["ls", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("no repository"), "{}", r.stderr);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap().as_array().unwrap().len(), 1);
}
