//! What scripts read: `--format json` prints exactly one JSON object on stdout for every
//! command that reports something (errors included, exit codes unchanged), listings take
//! backy2's `-m` (cells separated by '|') and `-s` (no header), table dates say UTC, and
//! a reader that stops reading (`| head -1`) is not a crash.

mod common;
use common::*;
use serde_json::Value;
use std::fs;

const BS: usize = 64 * 1024;

/// Parses stdout as exactly one JSON object.
fn one_object(stdout: &str) -> Value {
    let v: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not one JSON value ({e}): {stdout}"));
    assert!(v.is_object(), "not an object: {v}");
    v
}

fn json_ok(repo: &Repo, args: &[&str]) -> Value {
    one_object(&repo.ok(args))
}

#[test]
fn reporting_commands_print_one_json_object() {
    let repo = Repo::new();
    let mut img = mixed_image(501, 16, BS, 100);
    fs::write(repo.path("img"), &img).unwrap();
    let url = repo.url("img");

    let b = json_ok(&repo, &["backup", &url, "vm1", "-b", "64k", "--format", "json"]);
    let v1 = b["uid"].as_str().expect("uid").to_string();
    assert_eq!(b["name"], "vm1");
    assert_eq!(b["size"], img.len() as u64);
    assert_eq!(b["status"], "valid");
    assert_eq!(b["stats"]["bytes_read"], img.len() as u64, "{b}");

    img[0..BS].copy_from_slice(&random_bytes(502, BS));
    fs::write(repo.path("img"), &img).unwrap();
    let v2 =
        json_ok(&repo, &["backup", &url, "vm1", "-b", "64k", "--format", "json"])["uid"].as_str().unwrap().to_string();

    let r = json_ok(&repo, &["restore", "--format", "json", &v1, &repo.url("out")]);
    assert_eq!(r["uid"], v1.as_str());
    assert_eq!(r["bytes"], img.len() as u64);
    assert_eq!(r["damaged_blocks"], serde_json::json!([]));

    let d = json_ok(&repo, &["restore", "--format", "json", "--delta-from", &v1, &v2, &repo.url("out")]);
    assert_eq!(d["from"], v1.as_str());
    assert_eq!(d["uid"], v2.as_str());
    assert_eq!(d["blocks_written"], 1);
    assert_eq!(d["bytes_written"], BS as u64);
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img")));

    for cmd in ["scrub", "deep-scrub"] {
        let s = json_ok(&repo, &[cmd, "--format", "json", &v2]);
        assert_eq!(s["versions"][0]["uid"], v2.as_str(), "{cmd}");
        assert_eq!(s["versions"][0]["ok"], true, "{cmd}");
        assert_eq!(s["versions"][0]["deep"], cmd == "deep-scrub");
        assert!(s["versions"][0]["objects"].as_u64().unwrap() > 0);
    }
    let s = json_ok(&repo, &["batch-deep-scrub", "--format", "json"]);
    assert_eq!(s["versions"].as_array().unwrap().len(), 2);
    assert_eq!(s["damaged_versions"], 0);

    let e = json_ok(&repo, &["enforce", "latest1", "--dry-run", "--format", "json"]);
    assert_eq!(e["dry_run"], true);
    assert_eq!(e["removed"][0]["uid"], v1.as_str());
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), 2, "a dry run removed something");

    let rm = json_ok(&repo, &["rm", "--force", "--format", "json", &v1]);
    assert_eq!(rm["dry_run"], false);
    assert_eq!(rm["removed"][0]["uid"], v1.as_str());
    assert_eq!(rm["removed"][0]["name"], "vm1");

    let c = json_ok(&repo, &["cleanup", "--format", "json"]);
    assert_eq!(c["storages"][0]["storage"], "default");
    assert!(c["storages"][0]["objects_deleted"].is_u64(), "{c}");
    assert!(c["storages"][0]["bytes_freed"].is_u64(), "{c}");
    assert_eq!(c["dry_run"], false);
    let e = json_ok(&repo, &["enforce", "latest1", "--format", "json"]);
    assert_eq!(e["removed"], serde_json::json!([]));
    assert_eq!(e["kept"], serde_json::json!([]));
}

#[test]
fn errors_are_json_too_with_the_same_exit_codes() {
    let repo = Repo::new();
    fs::write(repo.path("img"), mixed_image(511, 4, BS, 0)).unwrap();
    let uid = repo.backup("img", "vm1", &["-b", "64k"]);

    let r = repo.run(&["restore", "--format", "json", "V9999999999", &repo.url("out")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let e = one_object(&r.stdout);
    assert_eq!(e["exit_code"], 2);
    assert!(e["error"].as_str().unwrap().contains("does not exist"), "{e}");
    assert!(r.error_line().starts_with("keepfs: error: "), "the one-line error still goes to stderr");

    // Refused (4): an existing target without --force.
    fs::write(repo.path("there"), b"x").unwrap();
    let r = repo.run(&["restore", "--format", "json", &uid, &repo.url("there")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(one_object(&r.stdout)["exit_code"], 4);

    // A listing's error too.
    let r = repo.run(&["ls", "--format", "json", "name =="]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(one_object(&r.stdout)["exit_code"], 2);
    // A command line that clap refuses (a missing argument), asked for JSON.
    let r = repo.run(&["restore", "--format", "json", &uid]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let e = one_object(&r.stdout);
    assert_eq!(e["exit_code"], 2);
    assert!(e["error"].as_str().unwrap().contains("required"), "{e}");
    // Without --format json, errors stay off stdout.
    let r = repo.run(&["ls", "name =="]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stdout, "");
}

#[test]
fn listings_take_machine_output_and_skip_header() {
    let repo = Repo::new();
    fs::write(repo.path("img"), mixed_image(521, 8, BS, 0)).unwrap();
    let a = repo.backup("img", "vm|1", &["-b", "64k", "-l", "env=prod"]);
    let b = repo.backup("img", "vm2", &["-b", "64k"]);

    let out = repo.ok(&["-m", "ls"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(header[0], "uid");
    assert_eq!(header[1], "date (UTC)");
    // A '|' inside a cell is escaped: split on unescaped pipes only.
    let cells = split_unescaped(lines[1]);
    assert_eq!(cells.len(), header.len(), "{}", lines[1]);
    assert_eq!(cells[0], a);
    assert_eq!(cells[2], "vm|1");
    assert_eq!(cells[4], (8 * BS).to_string());

    let out = repo.ok(&["-m", "-s", "ls"]);
    let uids: Vec<String> = out.lines().map(|l| split_unescaped(l)[0].clone()).collect();
    assert_eq!(uids, vec![a.clone(), b.clone()]);

    // Sizes are bytes with -m, and -s drops the header of every listing.
    let out = repo.ok(&["-m", "-s", "storage-usage"]);
    let first = split_unescaped(out.lines().next().unwrap());
    assert_eq!(first[0], a);
    assert_eq!(first[3], (8 * BS).to_string());
    let out = repo.ok(&["-s", "storage", "list"]);
    assert!(out.starts_with("default "), "{out}");
    let out = repo.ok(&["-m", "stats"]);
    assert!(out.lines().next().unwrap().starts_with("uid|name|date (UTC)|"), "{out}");

    // Tables say their dates are UTC.
    let table = repo.ok(&["ls"]);
    assert!(table.lines().next().unwrap().contains("date (UTC)"), "{table}");
}

/// Cells of a `-m` line: split on '|' not preceded by '\', unescaped.
fn split_unescaped(line: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cells.last_mut().unwrap().push(chars.next().unwrap_or('\\')),
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells
}

/// `keepfs -m diff A B | head -1` with far more output than a pipe holds: head leaves,
/// keepfs gets EPIPE and ends quietly with exit 0 (no panic, no error line).
#[test]
fn a_closed_pipe_is_not_a_crash() {
    let repo = Repo::new();
    let bs = 4096;
    let blocks = 8192;
    // Zeros, then the same with every other block made of ones: 4096 ranges to list,
    // and only one block object to store.
    let a = vec![0u8; blocks * bs];
    let mut b = a.clone();
    for i in (0..blocks).step_by(2) {
        b[i * bs..(i + 1) * bs].fill(1);
    }
    fs::write(repo.path("a"), &a).unwrap();
    let va = repo.backup("a", "vm1", &["-b", "4k"]);
    fs::write(repo.path("a"), &b).unwrap();
    let vb = repo.backup("a", "vm1", &["-b", "4k"]);
    for listing in [format!("-m diff {va} {vb}"), format!("diff --format json {va} {vb}"), "-m ls".to_string()] {
        let script = format!("'{KEEPFS}' {listing} | head -c 10 >/dev/null; echo \"${{PIPESTATUS[0]}}\"");
        let mut cmd = std::process::Command::new("bash");
        cmd.args(["-c", &script]).env("KEEPFS_HOME", repo.home()).env_remove("KEEPFS_CONFIG");
        if let Some(db) = &repo.catalog {
            cmd.env("KEEPFS_DATABASE", &db.url);
        }
        let out = output_within(cmd, COMMAND_LIMIT, &listing);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stdout.trim(), "0", "keepfs {listing} | head: exit {stdout}, stderr {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("error"), "{stderr}");
    }
}

/// Damage keeps its exit code (3) with --format json, and the object lists it.
#[test]
fn damage_found_is_listed_in_the_json_with_exit_3() {
    let repo = Repo::new();
    let img = random_bytes(541, 4 * BS);
    fs::write(repo.path("img"), &img).unwrap();
    let uid = repo.backup("img", "vm1", &["-b", "64k"]);
    let object = repo.object_file(&img[2 * BS..3 * BS]);
    let len = fs::metadata(&object).unwrap().len();
    flip_bit(&object, len - 10, 0x01);

    let r = repo.run(&["deep-scrub", "--format", "json", &uid]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let s = one_object(&r.stdout);
    assert_eq!(s["damaged_versions"], 1);
    assert_eq!(s["versions"][0]["ok"], false);
    assert_eq!(s["versions"][0]["damaged_blocks"][0]["index"], 2, "{s}");
    assert_eq!(s["versions"][0]["damaged_blocks"][0]["offset"], 2 * BS as u64, "{s}");

    let r = repo.run(&["restore", "--format", "json", &uid, &repo.url("out")]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let j = one_object(&r.stdout);
    assert_eq!(j["damaged_blocks"][0]["index"], 2, "{j}");
}
