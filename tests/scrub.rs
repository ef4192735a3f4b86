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
    for bad in [vec!["scrub", &uid, "-p", "0"], vec!["scrub", &uid, "-p", "101"]] {
        let r = repo.run(&bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains("between 1 and 100"), "{}", r.stderr);
    }
    // --source belongs to deep-scrub only (a usage error from the argument parser).
    assert_eq!(repo.run(&["scrub", &uid, "--source", &src]).code, 2);
}
