//! `keepfs restore --delta-from UID1 UID2 TARGET` as an operator refreshing a standby copy
//! uses it: the target holds UID1, only the blocks that differ are written, the result is
//! byte-identical to a full restore of UID2, and a target that does not hold UID1 is
//! refused with exit 4 before anything is written.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::FileExt;

const BS: usize = 64 * 1024;

/// Writes `data` over block `idx` of the image `img`.
fn change_block(img: &mut [u8], idx: usize, seed: u64) {
    img[idx * BS..(idx + 1) * BS].copy_from_slice(&random_bytes(seed, BS));
}

/// The number after "wrote " in the delta restore's summary line ("wrote 3 of 64 block(s)").
fn blocks_written(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.contains(" block(s), ")).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let rest = line.split("wrote ").nth(1).expect("wrote N");
    rest.split(' ').next().unwrap().parse().expect("a count")
}

#[test]
fn a_standby_file_is_refreshed_by_writing_only_the_changed_blocks() {
    let repo = Repo::new();
    let mut img = mixed_image(301, 64, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let v1 = repo.backup("img", "vm1", &["-b", "64k"]);
    change_block(&mut img, 3, 302);
    change_block(&mut img, 10, 303);
    img[11 * BS..12 * BS].fill(0); // a block that became zeros is a change too
    fs::write(repo.path("img"), &img).unwrap();
    let v2 = repo.backup("img", "vm1", &["-b", "64k"]);
    let full = repo.restore_sha(&v2, "full");
    assert_eq!(full, sha256_file(&repo.path("img")));

    // The standby holds v1; the delta writes the three changed blocks and checks all the others.
    repo.ok(&["restore", &v1, &repo.url("standby")]);
    let r = repo.run(&["restore", "--delta-from", &v1, "--delta-check", "100", &v2, &repo.url("standby")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(blocks_written(&r.stderr), 3, "{}", r.stderr);
    assert!(r.stderr.contains("61 unchanged block(s) checked"), "{}", r.stderr);
    assert_eq!(sha256_file(&repo.path("standby")), full, "the delta restore equals a full restore");

    // v3 changes block 20. A canary in block 40 of the standby (unchanged from v2 to v3)
    // survives a delta restore without the check: block 40 was not written.
    change_block(&mut img, 20, 304);
    fs::write(repo.path("img"), &img).unwrap();
    let v3 = repo.backup("img", "vm1", &["-b", "64k"]);
    let standby = fs::OpenOptions::new().write(true).open(repo.path("standby")).unwrap();
    standby.write_all_at(b"canary", 40 * BS as u64).unwrap();
    drop(standby);
    let r = repo.run(&["restore", "--delta-from", &v2, "--delta-check", "0", &v3, &repo.url("standby")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(blocks_written(&r.stderr), 1, "{}", r.stderr);
    let got = fs::read(repo.path("standby")).unwrap();
    assert_eq!(&got[40 * BS..40 * BS + 6], b"canary", "an unchanged block was rewritten");
    assert_eq!(got[20 * BS..21 * BS], img[20 * BS..21 * BS], "the changed block was not written");

    // With the check, the canary (an unchanged block that is not v3's) is caught: exit 4,
    // one line, nothing written.
    let before = sha256_file(&repo.path("standby"));
    let r = repo.run(&["restore", "--delta-from", &v3, "--delta-check", "100", &v2, &repo.url("standby")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("does not hold {v3}: its block 40 ")), "{}", r.stderr);
    assert_eq!(sha256_file(&repo.path("standby")), before, "a refused delta restore wrote something");
}

#[test]
fn a_target_that_does_not_hold_uid1_is_refused() {
    let repo = Repo::new();
    let mut img = mixed_image(311, 32, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let v1 = repo.backup("img", "vm1", &["-b", "64k"]);
    change_block(&mut img, 0, 312);
    fs::write(repo.path("img"), &img).unwrap();
    let v2 = repo.backup("img", "vm1", &["-b", "64k"]);

    // Another image of the same size (every block differs): caught by the default 1%
    // sample (at least one block).
    fs::write(repo.path("other"), random_bytes(313, 32 * BS)).unwrap();
    let before = sha256_file(&repo.path("other"));
    let r = repo.run(&["restore", "--delta-from", &v1, &v2, &repo.url("other")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().starts_with("keepfs: error: "), "{}", r.stderr);
    assert!(r.error_line().contains(&format!("does not hold {v1}")), "{}", r.stderr);
    assert!(r.error_line().contains("restore") && r.error_line().contains("in full"), "{}", r.stderr);
    assert_eq!(sha256_file(&repo.path("other")), before);

    // A file of another size, a missing target, and flags that make no sense with a delta.
    fs::write(repo.path("short"), vec![7u8; 1000]).unwrap();
    let r = repo.run(&["restore", "--delta-from", &v1, &v2, &repo.url("short")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("has 1000 bytes"), "{}", r.stderr);
    let r = repo.run(&["restore", "--delta-from", &v1, &v2, &repo.url("missing")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("does not exist"), "{}", r.stderr);
    assert!(!repo.path("missing").exists());
    let r = repo.run(&["restore", "--delta-from", &v1, "--force", &v2, &repo.url("other")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = repo.run(&["restore", "--delta-from", "V9999999999", &v2, &repo.url("other")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("does not exist"), "{}", r.stderr);
}

#[test]
fn a_file_target_is_resized_both_ways() {
    let repo = Repo::new();
    let img = mixed_image(321, 20, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let small = repo.backup("img", "vm1", &["-b", "64k"]);
    let mut grown = img.clone();
    grown.extend(mixed_image(322, 6, BS, 4321));
    fs::write(repo.path("img"), &grown).unwrap();
    let big = repo.backup("img", "vm1", &["-b", "64k"]);

    repo.ok(&["restore", &small, &repo.url("t")]);
    let r = repo.run(&["restore", "--delta-from", &small, &big, &repo.url("t")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("resized to"), "{}", r.stderr);
    assert_eq!(fs::metadata(repo.path("t")).unwrap().len(), grown.len() as u64);
    assert_eq!(sha256_file(&repo.path("t")), sha256_file(&repo.path("img")));
    // The first 20 blocks are the same: only the new ones (the last one short) holding
    // data were written; the new zero blocks read as zeros in the grown file already.
    let new_data = grown[20 * BS..].chunks(BS).filter(|c| c.iter().any(|&b| b != 0)).count() as u64;
    assert!(new_data >= 3, "the test image should grow by data blocks");
    assert_eq!(blocks_written(&r.stderr), new_data, "{}", r.stderr);

    // And back: the file shrinks to the small version, nothing else is written.
    let r = repo.run(&["restore", "--delta-from", &big, &small, &repo.url("t")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(blocks_written(&r.stderr), 0, "{}", r.stderr);
    assert_eq!(fs::read(repo.path("t")).unwrap(), img);
}

/// A loop device stands in for a standby disk: the delta lands on the device, and a
/// device too small for UID2 is refused.
#[test]
fn a_block_device_target_is_updated_in_place_and_a_small_one_refused() {
    let repo = Repo::new();
    let mut img = mixed_image(331, 32, BS, 0);
    fs::write(repo.path("img"), &img).unwrap();
    let v1 = repo.backup("img", "vm1", &["-b", "64k"]);
    change_block(&mut img, 5, 332);
    change_block(&mut img, 31, 333);
    fs::write(repo.path("img"), &img).unwrap();
    let v2 = repo.backup("img", "vm1", &["-b", "64k"]);
    let mut bigger = img.clone();
    bigger.extend(random_bytes(334, 3 * BS));
    fs::write(repo.path("img"), &bigger).unwrap();
    let v3 = repo.backup("img", "vm1", &["-b", "64k"]);

    // A device exactly the size of v1 and v2 (32 blocks).
    let backing = repo.path("disk");
    fs::write(&backing, vec![0xAAu8; 32 * BS]).unwrap();
    let dev = LoopDevice::attach(&backing);
    let dev_url = format!("file://{}", dev.path);
    repo.ok(&["restore", "--force", &v1, &dev_url]);
    let r = repo.run(&["restore", "--delta-from", &v1, "--delta-check", "100", &v2, &dev_url]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(blocks_written(&r.stderr), 2, "{}", r.stderr);
    assert_eq!(sha256_file(std::path::Path::new(&dev.path)), sha_of(&img), "the device holds v2");
    let r = repo.run(&["restore", "--delta-from", &v2, &v3, &dev_url]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("grow it first"), "{}", r.stderr);
    assert_eq!(sha256_file(std::path::Path::new(&dev.path)), sha_of(&img), "a refused restore wrote something");
}

fn sha_of(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// A loop device over a file, detached when dropped (also when the test fails).
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(file: &std::path::Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) runs; this test needs root");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        LoopDevice { path: String::from_utf8_lossy(&out.stdout).trim().to_string() }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// Pairs of versions whose images grow, shrink, end in a short block or not, gain and lose
/// zero blocks: a delta restore (the indexes read from the catalog in pieces of 97 bytes,
/// as two streams side by side) gives what a full restore gives, and writes exactly the
/// blocks whose bytes differ (a zero block past the old end of a file excepted), counted
/// here from the images themselves.
#[test]
fn random_pairs_of_versions_delta_restore_as_a_full_restore_does() {
    let repo = Repo::new();
    let pieces = [("KEEPFS_TEST_INDEX_PIECE", "97")];
    for round in 0..6u64 {
        let old_blocks = 20 + (round as usize * 7) % 13;
        let new_blocks = 18 + (round as usize * 11) % 17;
        let old = mixed_image(400 + round, old_blocks, BS, [0, 100, 5000][round as usize % 3]);
        let mut new = mixed_image(400 + round, new_blocks, BS, [300, 0, 100][round as usize % 3]);
        for k in 0..4 {
            let idx = (round as usize * 5 + k * 7) % new_blocks;
            if k % 2 == 0 {
                change_block(&mut new, idx, 500 + round * 10 + k as u64);
            } else {
                new[idx * BS..(idx + 1) * BS].fill(0);
            }
        }
        fs::write(repo.path("img"), &old).unwrap();
        let v1 = repo.backup("img", "pairs", &["-b", "64k"]);
        fs::write(repo.path("img"), &new).unwrap();
        let v2 = repo.backup("img", "pairs", &["-b", "64k"]);

        let block = |img: &[u8], i: usize| img[i * BS..((i + 1) * BS).min(img.len())].to_vec();
        let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
        let (old_n, new_n) = (old.len().div_ceil(BS), new.len().div_ceil(BS));
        let expected = (0..new_n)
            .filter(|&i| {
                let b = block(&new, i);
                if i < old_n && block(&old, i) == b {
                    return false;
                }
                !(zero(&b) && (i >= old_n || zero(&block(&old, i))))
            })
            .count() as u64;

        let target = format!("standby{round}");
        repo.ok(&["restore", &v1, &repo.url(&target)]);
        let r =
            repo.run_env(&["restore", "--delta-from", &v1, "--delta-check", "100", &v2, &repo.url(&target)], &pieces);
        assert_eq!(r.code, 0, "round {round}: {}", r.stderr);
        assert_eq!(blocks_written(&r.stderr), expected, "round {round}: {}", r.stderr);
        assert_eq!(sha256_file(&repo.path(&target)), sha_of(&new), "round {round}");
        fs::remove_file(repo.path(&target)).unwrap();
    }
}
