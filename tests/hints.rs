//! Differential backups with `rbd diff`-style hints and a base version.

mod common;
use common::*;
use std::fs;

const BS: usize = 64 * 1024;

fn hints(repo: &Repo, name: &str, extents: &[(usize, usize)]) -> String {
    let list: Vec<String> =
        extents.iter().map(|(o, l)| format!(r#"{{"offset":{o},"length":{l},"exists":"true"}}"#)).collect();
    let p = repo.path(name);
    fs::write(&p, format!("[{}]", list.join(","))).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn only_hinted_blocks_are_read_and_the_rest_comes_from_the_base() {
    let repo = Repo::new();
    let a = mixed_image(501, 20, BS, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let base = repo.backup("a", "rbd", &["-b", "64k"]);
    let mut b = a.clone();
    b[3 * BS + 120] ^= 0xff;
    b[11 * BS - 5] ^= 0xff; // block 10
    b[11 * BS + 5] ^= 0xff; // block 11
    // Three more blocks at the end: growth, reported as changed.
    b.extend(random_bytes(502, 3 * BS));
    fs::write(repo.path("b"), &b).unwrap();
    let h = hints(&repo, "diff.json", &[(3 * BS + 100, 50), (11 * BS - 10, 20), (20 * BS, 3 * BS)]);
    let v = repo.backup("b", "rbd", &["--hints", &h, "--base", &base, "--hints-check", "100"]);
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("b")));
    let st = &repo.version(&v)["stats"];
    assert_eq!(st["bytes_read"], 6 * BS as u64, "blocks 3, 10, 11 and the 3 new ones: {st}");
    // The blocks not read come from the base: its zero blocks as sparse, the rest as
    // deduplicated.
    let unread: Vec<usize> = (0..20).filter(|i| ![3, 10, 11].contains(i)).collect();
    let zero = unread.iter().filter(|&&i| a[i * BS..(i + 1) * BS].iter().all(|&x| x == 0)).count();
    assert!(zero > 0 && zero < unread.len(), "the base has zero and data blocks");
    assert_eq!(st["bytes_sparse"], (zero * BS) as u64, "{st}");
    assert_eq!(st["bytes_deduplicated"], ((unread.len() - zero) * BS) as u64, "{st}");
    assert_eq!(repo.version(&v)["block_size"], BS as u64, "the base's block size");
}

#[test]
fn wrong_hints_are_caught_before_anything_is_written() {
    let repo = Repo::new();
    let a = mixed_image(503, 16, BS, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let base = repo.backup("a", "rbd", &["-b", "64k"]);
    let mut b = a.clone();
    b[2 * BS + 1] ^= 1; // hinted
    b[9 * BS + 1] ^= 1; // not hinted: the hints lie
    fs::write(repo.path("b"), &b).unwrap();
    let h = hints(&repo, "diff.json", &[(2 * BS, BS)]);
    let r = repo.run(&["backup", &repo.url("b"), "rbd", "--hints", &h, "--base", &base, "--hints-check", "100"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("the hints are wrong: block 9"), "{}", r.stderr);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "no version was started");
}

#[test]
fn hints_without_a_base_mark_the_used_regions() {
    let repo = Repo::new();
    let a = mixed_image(504, 10, BS, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let h = hints(&repo, "used.json", &[(BS, 2 * BS), (7 * BS + 3, 1)]);
    let v = repo.backup("a", "init", &["-b", "64k", "--hints", &h]);
    let mut expected = vec![0u8; a.len()];
    for blk in [1usize, 2, 7] {
        expected[blk * BS..(blk + 1) * BS].copy_from_slice(&a[blk * BS..(blk + 1) * BS]);
    }
    fs::write(repo.path("expected"), &expected).unwrap();
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("expected")));
}

#[test]
fn a_damaged_base_block_is_read_again_whatever_the_hints_say() {
    let repo = Repo::new();
    let a = mixed_image(505, 12, BS, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let first = repo.backup("a", "rbd", &["-b", "64k"]);
    let base = repo.backup("a", "rbd", &["-b", "64k"]);
    // A restore of `first` finds block 8's object damaged (and marks it so).
    let obj = repo.object_file(&a[8 * BS..9 * BS]);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    fs::write(&obj, &bytes).unwrap();
    assert_eq!(repo.run(&["restore", &first, &repo.url("bad")]).code, 3);
    // Like a scrub, the restore marks every version sharing the object invalid; an
    // invalid base is still a base, its damaged blocks are what gets read again.
    assert_eq!(repo.version(&base)["status"], "invalid");
    let h = hints(&repo, "diff.json", &[(0, 1)]);
    let v = repo.backup("a", "rbd", &["--hints", &h, "--base", &base, "--hints-check", "0"]);
    let st = &repo.version(&v)["stats"];
    assert_eq!(st["bytes_read"], 2 * BS as u64, "block 0 (hinted) and block 8 (damaged): {st}");
    assert_eq!(st["bytes_written"], BS as u64, "the damaged block is stored again: {st}");
    assert_eq!(repo.restore_sha(&v, "o"), sha256_file(&repo.path("a")));
}

#[test]
fn hint_and_base_mistakes_are_one_line_errors() {
    let repo = Repo::new();
    fs::write(repo.path("a"), mixed_image(506, 8, BS, 0)).unwrap();
    let base = repo.backup("a", "rbd", &["-b", "64k"]);
    let good = hints(&repo, "good.json", &[(0, 10)]);
    let junk = repo.path("junk.json");
    fs::write(&junk, "not json").unwrap();
    let junk = junk.to_string_lossy().into_owned();
    let beyond = hints(&repo, "beyond.json", &[(8 * BS - 1, 2)]);
    let url = repo.url("a");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["backup", &url, "rbd", "--hints", &junk, "--base", &base], "not rbd diff JSON"),
        (vec!["backup", &url, "rbd", "--hints", &beyond, "--base", &base], "past the image"),
        (vec!["backup", &url, "rbd", "--hints", "/nonexistent.json"], "cannot read hints file"),
        (vec!["backup", &url, "rbd", "--hints", &good, "--base", &base, "-b", "128k"], "use the base's block size"),
        (vec!["backup", &url, "other", "--hints", &good, "--base", &base], "must have the same name"),
        (vec!["backup", &url, "rbd", "--base", &base], "--base needs --hints"),
        (vec!["backup", &url, "rbd", "--hints", &good, "--base", "V0000000099"], "does not exist"),
    ];
    for (args, needle) in cases {
        let r = repo.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.error_line().contains(needle) && r.stderr.lines().count() == 1, "{args:?}: {}", r.stderr);
    }
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 1, "no failed attempt left a version");
}

/// `keepfs diff` reads two versions' indexes and prints what changed, in rbd diff's JSON:
/// fed back as `--hints` over the older version it makes the newer image again while
/// reading only the changed blocks.
#[test]
fn diff_of_two_versions_is_usable_as_hints() {
    let repo = Repo::new();
    let a = mixed_image(601, 16, BS, 0);
    fs::write(repo.path("a"), &a).unwrap();
    let va = repo.backup("a", "vm", &["-b", "64k"]);
    let mut b = a.clone();
    b[3 * BS + 7] ^= 0xff; // block 3 changes
    b[4 * BS..5 * BS].fill(0xab); // block 4 too (adjacent: one range)
    b[9 * BS..10 * BS].fill(0); // block 9 becomes zeros
    b.extend_from_slice(&random_bytes(602, BS / 2)); // and it grows by half a block
    fs::write(repo.path("b"), &b).unwrap();
    let vb = repo.backup("b", "vm", &["-b", "64k"]);

    let table = repo.ok(&["diff", &va, &vb]);
    assert!(table.lines().next().unwrap().starts_with("offset"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&repo.ok(&["diff", "--format", "json", &va, &vb])).unwrap();
    let mut want = vec![
        serde_json::json!({"offset": 3 * BS, "length": 2 * BS, "exists": "true"}),
        serde_json::json!({"offset": 16 * BS, "length": BS / 2, "exists": "true"}),
    ];
    if a[9 * BS..10 * BS].iter().any(|&x| x != 0) {
        want.insert(1, serde_json::json!({"offset": 9 * BS, "length": BS, "exists": "false"}));
    }
    assert_eq!(json, serde_json::Value::Array(want), "{json}");
    assert_eq!(repo.ok(&["diff", "--format", "json", &va, &va]).trim(), "[]");

    // As hints for a backup of b over a: only the changed blocks are read.
    fs::write(repo.path("changes.json"), repo.ok(&["diff", "--format", "json", &va, &vb])).unwrap();
    let hints = repo.path("changes.json");
    let vc = repo.backup("b", "vm", &["-b", "64k", "--hints", hints.to_str().unwrap(), "--base", &va]);
    assert_eq!(repo.restore_sha(&vc, "c.out"), sha256_file(&repo.path("b")));
    assert!(repo.version(&vc)["stats"]["bytes_read"].as_u64().unwrap() < (6 * BS) as u64);
    assert_eq!(repo.ok(&["diff", "--format", "json", &vb, &vc]).trim(), "[]", "the same image");
}

/// Shell completions and man pages come from the command definitions.
#[test]
fn completions_and_man_pages_are_generated() {
    let repo = Repo::new();
    let bash = repo.ok(&["completion", "bash"]);
    assert!(bash.contains("keepfs") && bash.contains("deep-scrub") && bash.contains("nbd"), "{bash}");
    for shell in ["zsh", "fish"] {
        assert!(repo.ok(&["completion", shell]).contains("backup"), "{shell}");
    }
    let dir = repo.path("man");
    repo.ok(&["man", dir.to_str().unwrap()]);
    let page = fs::read_to_string(dir.join("keepfs-diff.1")).unwrap();
    assert!(page.contains(".TH") && page.contains("rbd diff"), "{page}");
    assert!(dir.join("keepfs.1").exists() && dir.join("keepfs-database-rebuild.1").exists());
    assert!(!repo.home().exists(), "no repository was made for this");
}
