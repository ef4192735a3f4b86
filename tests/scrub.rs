//! Scrubbing with real damage to object files: a flipped payload bit (deep scrub finds
//! it, light does not), a truncated object and a missing one (light finds both); damage
//! taints every version sharing the block; the next backup stores the block again and a
//! clean deep scrub makes the version valid again; --source and -p.

mod common;
use common::*;
use std::fs;

const BS: usize = 64 * 1024;

#[test]
fn damage_is_found_marked_and_repaired() {
    let repo = Repo::new();
    let img = mixed_image(301, 20, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let a = repo.backup("img", "s", &["-b", "64k"]);
    let b = repo.backup("img", "other", &["-b", "64k"]); // shares every block
    assert_eq!(repo.run(&["scrub", &a]).code, 0);
    assert_eq!(repo.run(&["deep-scrub", &a]).code, 0);

    // Flip one payload bit of block 3's object.
    let obj = repo.object_file(&img[3 * BS..4 * BS]);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x10;
    fs::write(&obj, &bytes).unwrap();
    assert_eq!(repo.run(&["scrub", &a]).code, 0, "a light scrub does not read payloads");
    let r = repo.run(&["deep-scrub", &a]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("{a} block 3 (bytes {}..{})", 3 * BS, 4 * BS)), "{}", r.stderr);
    assert_eq!(repo.version(&a)["status"], "invalid");
    assert_eq!(repo.version(&b)["status"], "invalid", "a version sharing the block is tainted too");

    // The next backup stores the block again; a clean deep scrub revalidates.
    let c = repo.backup("img", "s", &["-b", "64k"]);
    assert_eq!(repo.version(&c)["stats"]["bytes_written"], BS as u64, "only the damaged block is stored again");
    let r = repo.run(&["deep-scrub", &a]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("valid again"), "{}", r.stderr);
    assert_eq!(repo.version(&a)["status"], "valid");
    assert_eq!(repo.restore_sha(&a, "o"), sha256_file(&repo.path("img")));
    // batch-deep-scrub takes the others.
    let r = repo.run(&["batch-deep-scrub", "status == \"invalid\""]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(repo.version(&b)["status"], "valid");
}

/// An image whose blocks repeat: each object is checked once, and a damaged one is
/// reported at every block that holds it (the copies share their first block's verdict).
#[test]
fn a_damaged_object_is_reported_at_every_block_that_repeats_it() {
    let repo = Repo::new();
    let a = random_bytes(311, BS);
    let b = random_bytes(312, BS);
    let c = random_bytes(313, BS);
    let zero = vec![0u8; BS];
    // Blocks: a b a 0 c a b  (a at 0, 2, 5; b at 1, 6)
    let img = [&a[..], &b, &a, &zero, &c, &a, &b].concat();
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "r", &["-b", "64k"]);
    let r = repo.run(&["deep-scrub", &uid]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(": 3 object(s)"), "three distinct objects are checked: {}", r.stderr);

    let obj = repo.object_file(&a);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x10;
    fs::write(&obj, &bytes).unwrap();
    let r = repo.run(&["deep-scrub", &uid]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    for blk in [0, 2, 5] {
        let at = format!("{uid} block {blk} (bytes {}..{})", blk * BS, (blk + 1) * BS);
        assert!(r.stderr.contains(&at), "block {blk} holds the damaged object: {}", r.stderr);
    }
    for blk in [1, 3, 4, 6] {
        assert!(!r.stderr.contains(&format!("{uid} block {blk} ")), "block {blk} is intact: {}", r.stderr);
    }
    // A sample reports only blocks of the damaged object, and fails exactly when it
    // reports one.
    for _ in 0..4 {
        let r = repo.run(&["deep-scrub", &uid, "-p", "50"]);
        let reported: Vec<usize> = (0..7).filter(|b| r.stderr.contains(&format!("{uid} block {b} "))).collect();
        assert!(reported.iter().all(|b| [0, 2, 5].contains(b)), "{reported:?}: {}", r.stderr);
        assert_eq!(r.code, if reported.is_empty() { 0 } else { 3 }, "{}", r.stderr);
    }
}

#[test]
fn light_scrub_finds_truncated_and_missing_objects() {
    let repo = Repo::new();
    let img = mixed_image(302, 10, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "t", &["-b", "64k"]);
    let truncated = repo.object_file(&img[3 * BS..4 * BS]);
    let len = fs::metadata(&truncated).unwrap().len();
    fs::OpenOptions::new().write(true).open(&truncated).unwrap().set_len(len - 100).unwrap();
    let missing = repo.object_file(&img[4 * BS..5 * BS]);
    fs::remove_file(&missing).unwrap();
    let r = repo.run(&["scrub", &uid]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("block 3 ") && r.stderr.contains("length"), "{}", r.stderr);
    assert!(r.stderr.contains("block 4 ") && r.stderr.contains("missing"), "{}", r.stderr);
    assert_eq!(repo.version(&uid)["status"], "invalid");
    let r = repo.run(&["batch-scrub", "name == \"t\""]);
    assert_eq!(r.code, 3);
}

#[test]
fn deep_scrub_against_the_source_and_percentages() {
    let repo = Repo::new();
    let img = mixed_image(303, 40, BS, 100);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "p", &["-b", "64k"]);
    let src = repo.url("img");
    assert_eq!(repo.run(&["deep-scrub", &uid, "--source", &src]).code, 0);
    let mut changed = img.clone();
    changed[7 * BS + 5] ^= 1;
    fs::write(repo.path("changed"), &changed).unwrap();
    let r = repo.run(&["deep-scrub", &uid, "-s", &repo.url("changed")]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("block 7 ") && r.stderr.contains("differs from the source"), "{}", r.stderr);

    let full = repo.run(&["deep-scrub", &uid]);
    let part = repo.run(&["deep-scrub", &uid, "-p", "30"]);
    let count = |s: &str| -> u64 {
        s.split(": ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap()
    };
    assert!(count(&part.stderr) < count(&full.stderr), "{} vs {}", part.stderr, full.stderr);
    // A small sample of a small version still checks something (a drill saw 18 of 30
    // runs of `-p 10` over 5 blocks check 0 objects and say "all good").
    fs::write(repo.path("small"), random_bytes(304, 3 * BS)).unwrap();
    let small = repo.backup("small", "small", &["-b", "64k"]);
    for _ in 0..20 {
        let r = repo.run(&["deep-scrub", &small, "-p", "1"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(count(&r.stderr) >= 1, "{}", r.stderr);
    }
    for bad in [vec!["scrub", &uid, "-p", "0"], vec!["scrub", &uid, "-p", "101"]] {
        let r = repo.run(&bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("between 1 and 100"), "{}", r.stderr);
    }
    // --source belongs to deep-scrub only (a usage error from the argument parser).
    assert_eq!(repo.run(&["scrub", &uid, "--source", &src]).code, 2);
}

/// Three versions of different images; returns their uids.
fn three_versions(repo: &Repo, seed: u64) -> Vec<String> {
    (0..3)
        .map(|i| {
            fs::write(repo.path(&format!("img{i}")), mixed_image(seed + i, 12, BS, 100)).unwrap();
            repo.backup(&format!("img{i}"), &format!("vm{i}"), &["-b", "64k"])
        })
        .collect()
}

/// A scrub compares what the catalog's index and the version object's index say, block
/// by block, as streams, not their bytes: the same index in the first format says the
/// same (all good); one block pointing at another stored object is a difference in the
/// block index, and nothing else.
#[test]
fn scrub_compares_what_the_catalog_and_the_version_object_say_about_each_block() {
    use keepfs::index::BlockIndex;
    let repo = Repo::new();
    let uids = three_versions(&repo, 77);
    let b = &uids[1];
    repo.edit_index(b, |data| *data = BlockIndex::decode(data).unwrap().encode_v1());
    let r = repo.run(&["scrub", b]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("all good"), "{}", r.stderr);

    repo.edit_index(b, |data| {
        let mut ix = BlockIndex::decode(data).unwrap();
        let blocks: Vec<_> = ix.entries.data().take(2).collect();
        ix.entries.set(blocks[0].0, blocks[1].1);
        *data = ix.encode().unwrap();
    });
    let r = repo.run(&["scrub", b]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("differs from the database in: block index;"), "{}", r.stderr);
}

/// A bit flipped in a version's own object in the storage (`versions/<uid>`, what a
/// database rebuild reads) is damage every scrub finds, names and says how to repair;
/// the batch goes on, and `metadata backup` writes the object again from the database.
#[test]
fn scrubs_check_the_version_object_in_the_storage() {
    let repo = Repo::new();
    let uids = three_versions(&repo, 311);
    let (a, b, c) = (&uids[0], &uids[1], &uids[2]);
    let object = repo.storage().join("versions").join(b);
    let intact = fs::read(&object).unwrap();
    flip_bit(&object, intact.len() as u64 / 2, 0x04);

    for cmd in ["scrub", "deep-scrub"] {
        let r = repo.run(&[cmd, b]);
        assert_eq!(r.code, 3, "{cmd}: {}", r.stderr);
        assert!(!r.stderr.contains("all good"), "{cmd}: {}", r.stderr);
        let line = r.stderr.lines().find(|l| l.starts_with("keepfs: damaged:")).unwrap_or_default();
        assert!(line.contains(&format!("versions/{b}")) && line.contains("damaged"), "{cmd}: {}", r.stderr);
        assert!(line.contains(&format!("keepfs metadata backup 'uid == \"{b}\"'")), "{cmd}: {}", r.stderr);
    }
    for cmd in ["batch-scrub", "batch-deep-scrub"] {
        let r = repo.run(&[cmd]);
        assert_eq!(r.code, 3, "{cmd}: {}", r.stderr);
        for good in [a, c] {
            assert!(r.stderr.contains(&format!("scrubbed {good}: ")), "{cmd} goes on past {b}: {}", r.stderr);
        }
        assert_eq!(r.stderr.matches("all good").count(), 2, "{cmd}: {}", r.stderr);
    }
    // The blocks and the database's metadata are intact: the version restores as it was.
    assert_eq!(repo.restore_sha(b, "o"), sha256_file(&repo.path("img1")));

    // The repair the message names.
    repo.ok(&["metadata", "backup", &format!("uid == \"{b}\"")]);
    let r = repo.run(&["deep-scrub", b]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("all good"), "{}", r.stderr);

    // An intact object that says something other than the database is damage too: here
    // another version's object in its place (a misplaced file, a restore of the wrong key).
    fs::copy(repo.storage().join("versions").join(a), &object).unwrap();
    let r = repo.run(&["scrub", b]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("differs from the database in: uid"), "{}", r.stderr);
    // And a missing one.
    fs::remove_file(&object).unwrap();
    let r = repo.run(&["scrub", b]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("versions/{b} is missing")), "{}", r.stderr);
    repo.ok(&["metadata", "backup"]);
    assert_eq!(fs::read(&object).unwrap().len(), intact.len());
    assert_eq!(repo.run(&["batch-deep-scrub"]).code, 0);
}

/// A large version object (stored uncompressed, as a stream) is checked as a stream of
/// ranged reads, never held: the test lowers the threshold (64 MiB) to nothing, so that
/// these small ones go both ways. Each damage a whole reading finds is found: a bit
/// flipped in the index, in the fields, in the header; a byte more or less; another
/// version's object in its place.
#[test]
fn a_version_object_checked_as_a_stream_finds_what_a_whole_reading_finds() {
    let repo = Repo::new();
    let streamed = [("KEEPFS_TEST_STREAMED_INDEX", "0")];
    let mut uids = Vec::new();
    for i in 0..2u64 {
        fs::write(repo.path(&format!("img{i}")), mixed_image(501 + i, 12, BS, 100)).unwrap();
        let r = repo.run_env(&["backup", &repo.url(&format!("img{i}")), "vm", "-b", "64k"], &streamed);
        assert_eq!(r.code, 0, "{}", r.stderr);
        uids.push(r.stdout.trim().to_string());
    }
    let (a, b) = (&uids[0], &uids[1]);
    let object = repo.storage().join("versions").join(b);
    let intact = fs::read(&object).unwrap();
    let scrub = |expect: &str| {
        let r = repo.run_env(&["deep-scrub", b], &streamed);
        if expect.is_empty() {
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert!(r.stderr.contains("all good"), "{}", r.stderr);
        } else {
            assert_eq!(r.code, 3, "{expect}: {}", r.stderr);
            let line = r.stderr.lines().find(|l| l.starts_with("keepfs: damaged:")).unwrap_or_default();
            assert!(line.contains(&format!("versions/{b}")), "{expect}: {}", r.stderr);
            assert!(line.contains(expect), "{expect}: {}", r.stderr);
        }
    };
    scrub("");
    let n = intact.len();
    for (what, at) in [("payload checksum", n - 20), ("payload checksum", 72 + 30), ("header", 20)] {
        let mut bad = intact.clone();
        bad[at] ^= 0x08;
        fs::write(&object, &bad).unwrap();
        scrub(what);
    }
    let mut longer = intact.clone();
    longer.push(0);
    fs::write(&object, &longer).unwrap();
    scrub("does not match its header");
    fs::write(&object, &intact[..n - 1]).unwrap();
    scrub("does not match its header");
    fs::copy(repo.storage().join("versions").join(a), &object).unwrap();
    scrub("differs from the database in: uid");
    fs::write(&object, &intact).unwrap();
    scrub("");
}

/// A bit flipped in a version's block index inside the database file: found on use and
/// by scrubs (exit 3, the version marked invalid, the batch goes on), cleanup refuses to
/// guess what the index referenced, and `metadata restore --force` repairs it from the
/// copy in the storage.
#[test]
fn a_damaged_index_in_the_database_is_damage_and_is_repaired_from_the_storage() {
    if sqlite_only("damaging the database file") {
        return;
    }
    let repo = Repo::new();
    let uids = three_versions(&repo, 321);
    let (a, b, c) = (&uids[0], &uids[1], &uids[2]);
    let objects = repo.block_objects();

    // Flip a bit of b's index where SQLite keeps it in the database file.
    repo.checkpoint_db();
    let blob: Vec<u8> = {
        let conn = rusqlite::Connection::open(repo.db_file()).unwrap();
        let n: i64 = b[1..].parse().unwrap();
        conn.query_row("SELECT data FROM version_index WHERE uid = ?1", [n], |r| r.get(0)).unwrap()
    };
    let file = fs::read(repo.db_file()).unwrap();
    let places: Vec<usize> = file.windows(blob.len()).enumerate().filter(|(_, w)| *w == blob).map(|(i, _)| i).collect();
    assert!(!places.is_empty(), "the index is in the database file");
    for at in places {
        flip_bit(&repo.db_file(), (at + 80 + 5 * 32 + 3) as u64, 0x20); // block 5's id
    }

    let r = repo.run(&["restore", b, &repo.url("out")]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.error_line().contains("index checksum mismatch"), "{}", r.stderr);
    assert!(r.error_line().contains(&format!("keepfs metadata restore --force {b}")), "{}", r.stderr);
    assert_eq!(repo.version(b)["status"], "invalid");

    let r = repo.run(&["batch-deep-scrub"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    for good in [a, c] {
        assert!(r.stderr.contains(&format!("deep-scrubbed {good}: ")), "the batch goes on: {}", r.stderr);
    }
    assert!(r.stderr.contains(&format!("deep-scrubbed {b}: its metadata is damaged")), "{}", r.stderr);

    // Cleanup cannot know what the damaged index references: it deletes nothing.
    let r = repo.run(&["cleanup"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.error_line().contains("index checksum mismatch"), "{}", r.stderr);
    assert_eq!(repo.block_objects(), objects);

    // An export streams the index out as it checks it: a damaged one stops it with the
    // same words (exit 3), and no file is left that looks whole.
    let out = repo.path("meta.json");
    let r = repo.run(&["metadata", "export", b, out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.error_line().contains("index checksum mismatch"), "{}", r.stderr);
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(repo.path(""))
            .unwrap()
            .filter(|e| { e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp") })
            .count(),
        0,
        "no temporary file is left"
    );

    // Without --force the existing record is kept; the error names the flag.
    let r = repo.run(&["metadata", "restore", b]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("--force"), "{}", r.stderr);
    assert_eq!(repo.ok(&["metadata", "restore", "--force", b]).trim(), b.as_str());
    assert_eq!(repo.version(b)["status"], "valid", "every block it names is there and none known damaged");
    let r = repo.run(&["deep-scrub", b]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("all good"), "{}", r.stderr);
    assert_eq!(repo.restore_sha(b, "o"), sha256_file(&repo.path("img1")));
    assert!(repo.ok(&["cleanup"]).contains("deleted 0 object(s)"));
}

/// `storage-usage` leaves out a version whose index is damaged as if it were not there:
/// the blocks it shares with another are that one's alone, even though the damage (a
/// wrong checksum) shows only once every block of it was read.
#[test]
fn storage_usage_leaves_out_a_version_whose_index_is_damaged() {
    let repo = Repo::new();
    fs::write(repo.path("img"), mixed_image(909, 12, BS, 0)).unwrap();
    let a = repo.backup("img", "a", &["-b", "64k"]);
    let b = repo.backup("img", "b", &["-b", "64k"]);
    let usage =
        || -> serde_json::Value { serde_json::from_str(&repo.ok(&["storage-usage", "--format", "json"])).unwrap() };
    let row = |u: &serde_json::Value, uid: &str| u.as_array().unwrap().iter().find(|x| x["uid"] == uid).cloned();
    let before = row(&usage(), &a).unwrap();
    let data = before["shared"].as_u64().unwrap();
    assert!(data > 0 && before["exclusive"] == 0, "a and b hold the same blocks: {before}");
    repo.edit_index(&b, |index| index[45] ^= 1); // the index's checksum
    let after = usage();
    assert!(row(&after, &b).is_none(), "{after}");
    let a_now = row(&after, &a).unwrap();
    assert_eq!((a_now["shared"].as_u64(), a_now["exclusive"].as_u64()), (Some(0), Some(data)), "{a_now}");
    assert_eq!(a_now["exclusive_stored"], before["stored"]);
}
