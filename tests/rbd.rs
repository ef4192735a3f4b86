//! Ceph RBD as a source and a restore target, against a real one-node cluster: the one
//! named by `KEEPFS_TEST_CEPH_CONF` (a ceph.conf; CI passes the cluster it starts), or
//! else one this binary starts with contrib/ceph/start-ceph.sh under
//! /tmp/keepfs-rbd-ceph-test (mon ports 3321/6821) and stops when it exits. Without a
//! cluster every test fails with the reason. The tests share the cluster; each uses its
//! own image names. Everything is checked with the real `rbd` CLI (`rbd export`, `rbd diff`).
#![cfg(feature = "rbd")]

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const TEST_DIR: &str = "/tmp/keepfs-rbd-ceph-test";

struct Ceph {
    conf: String,
    keyring: String,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ceph").join(name)
}

extern "C" fn stop_cluster() {
    let _ = Command::new("bash")
        .arg(script("stop-ceph.sh"))
        .env("CEPH_DEV_DIR", TEST_DIR)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn start() -> Result<Ceph, String> {
    let conf = match std::env::var("KEEPFS_TEST_CEPH_CONF") {
        Ok(conf) if !conf.is_empty() => conf,
        _ => {
            let mut c = Command::new("bash");
            c.arg(script("start-ceph.sh"))
                .env("CEPH_DEV_DIR", TEST_DIR)
                .env("CEPH_DEV_MON_PORT", "3321")
                .env("CEPH_DEV_MON_V1_PORT", "6821")
                .env("CEPH_DEV_OSD_PORTS", "6830 6899")
                .env("CEPH_DEV_RGW", "0")
                .env("CEPH_DEV_OSD_SIZE", "10G");
            let out = output_within(c, std::time::Duration::from_secs(900), "contrib/ceph/start-ceph.sh");
            // Stopped when this test binary exits, whatever the tests did.
            // SAFETY: registers a plain function.
            unsafe { libc::atexit(stop_cluster) };
            if !out.status.success() {
                let log = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                return Err(format!(
                    "contrib/ceph/start-ceph.sh failed ({}):\n{}",
                    out.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            format!("{TEST_DIR}/ceph.conf")
        }
    };
    let text = std::fs::read_to_string(&conf).map_err(|e| format!("cannot read {conf}: {e}"))?;
    let keyring = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("keyring = ").filter(|k| !k.contains('$')).map(String::from))
        .ok_or_else(|| format!("{conf} names no client keyring"))?;
    Ok(Ceph { conf, keyring })
}

fn ceph() -> &'static Ceph {
    static CEPH: OnceLock<Result<Ceph, String>> = OnceLock::new();
    match CEPH.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("no Ceph cluster for the RBD tests (set KEEPFS_TEST_CEPH_CONF or let them start one): {e}"),
    }
}

/// Runs the real rbd CLI; it must succeed.
fn rbd(args: &[&str]) -> String {
    let mut c = Command::new("rbd");
    c.arg("--conf").arg(&ceph().conf).args(args);
    let out = output_within(c, COMMAND_LIMIT, &format!("rbd {args:?}"));
    assert!(out.status.success(), "rbd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique image name for this run of this test.
fn image(name: &str) -> String {
    format!("k{}-{name}", std::process::id())
}

/// sha256 of `rbd export SPEC` (the reference).
fn export_sha(repo: &Repo, spec: &str) -> String {
    let out = repo.path("export.img");
    let _ = std::fs::remove_file(&out);
    rbd(&["export", "--no-progress", spec, &out.to_string_lossy()]);
    let s = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    s
}

fn kf(repo: &Repo, args: &[&str]) -> Run {
    repo.run_env(args, &[("CEPH_CONF", &ceph().conf)])
}

fn kf_ok(repo: &Repo, args: &[&str]) -> String {
    let r = kf(repo, args);
    assert_eq!(r.code, 0, "keepfs {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
    r.stdout.trim().to_string()
}

/// Imports `data` as image `name` in pool rbd.
fn import(repo: &Repo, name: &str, data: &[u8]) {
    let f = repo.path("import.img");
    std::fs::write(&f, data).unwrap();
    rbd(&["import", "--no-progress", &f.to_string_lossy(), &format!("rbd/{name}")]);
    std::fs::remove_file(&f).unwrap();
}

/// Writes `data` at `offset` into image `name` through librbd's Python binding (Debian's
/// python3-rbd, installed with the cluster), as another program using the image would.
fn write_at(repo: &Repo, name: &str, offset: usize, data: &[u8]) {
    let f = repo.path("write.bin");
    std::fs::write(&f, data).unwrap();
    let script = "import sys, rados, rbd\n\
        c = rados.Rados(conffile=sys.argv[1]); c.connect(timeout=60)\n\
        io = c.open_ioctx('rbd'); img = rbd.Image(io, sys.argv[2])\n\
        img.write(open(sys.argv[4], 'rb').read(), int(sys.argv[3])); img.flush(); img.close()\n\
        io.close(); c.shutdown()\n";
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c").arg(script).arg(&ceph().conf).arg(name).arg(offset.to_string()).arg(&f);
    let out = output_within(c, COMMAND_LIMIT, "python3-rbd write");
    assert!(out.status.success(), "python3-rbd write: {}", String::from_utf8_lossy(&out.stderr));
}

fn bytes_read(repo: &Repo, uid: &str) -> u64 {
    repo.version(uid)["stats"]["bytes_read"].as_u64().unwrap()
}

#[test]
fn snapshots_back_up_initially_and_differentially_and_restore_to_images_and_files() {
    let repo = Repo::new();
    let img = image("vm1");
    const MB: usize = 1 << 20;
    // 40 MiB: 24 MiB of mixed data, the rest never written (unallocated).
    let mut data = mixed_image(1101, 24, MB, 0);
    data.resize(40 * MB, 0);
    import(&repo, &img, &data);
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@s1")]);

    // Initial backup: unallocated objects are not read.
    let v1 = kf_ok(&repo, &["backup", "-b", "1M", &format!("rbd:rbd/{img}@s1"), "vm1"]);
    assert_eq!(repo.version(&v1)["snapshot"], "s1", "the snapshot name comes from the URL");
    assert!(bytes_read(&repo, &v1) <= 24 * MB as u64, "{}", repo.version(&v1)["stats"]);
    let s1 = export_sha(&repo, &format!("rbd/{img}@s1"));

    // Differential with --diff-from: only what librbd says changed is read (4 KiB in
    // block 2, 8 KiB across the border of blocks 9 and 10).
    write_at(&repo, &img, 2 * MB + 4096, &random_bytes(1102, 4096));
    write_at(&repo, &img, 10 * MB - 4096, &random_bytes(1103, 8192));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@s2")]);
    let v2 = kf_ok(
        &repo,
        &["backup", "--diff-from", "s1", "--base", &v1, "--hints-check", "100", &format!("rbd:rbd/{img}@s2"), "vm1"],
    );
    assert_eq!(bytes_read(&repo, &v2), 3 * MB as u64, "blocks 2, 9, 10: {}", repo.version(&v2)["stats"]);
    let s2 = export_sha(&repo, &format!("rbd/{img}@s2"));

    // The same with --whole-object, and with --hints from `rbd diff --format=json`
    // (backy2's form of the URL, and a namespace-less pool).
    write_at(&repo, &img, 30 * MB, &random_bytes(1104, 4096));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@s3")]);
    let v3 = kf_ok(
        &repo,
        &["backup", "--diff-from", "s2", "--whole-object", "--base", &v2, &format!("rbd:rbd/{img}@s3"), "vm1"],
    );
    let json = rbd(&["diff", "--from-snap", "s2", &format!("rbd/{img}@s3"), "--format=json"]);
    std::fs::write(repo.path("vm1.diff"), &json).unwrap();
    let v3h = kf_ok(
        &repo,
        &[
            "backup",
            "--hints",
            &repo.path("vm1.diff").to_string_lossy(),
            "--base",
            &v2,
            &format!("rbd://rbd/{img}@s3"),
            "vm1",
        ],
    );
    let s3 = export_sha(&repo, &format!("rbd/{img}@s3"));

    // Every version restores to a new image and to a file, equal to rbd export.
    for (uid, sha) in [(&v1, &s1), (&v2, &s2), (&v3, &s3), (&v3h, &s3)] {
        let target = format!("{img}-r{uid}");
        kf_ok(&repo, &["restore", uid, &format!("rbd:rbd/{target}")]);
        assert_eq!(&export_sha(&repo, &format!("rbd/{target}")), sha, "{uid} restored to an image");
        assert_eq!(&repo.restore_sha(uid, "out.img"), sha, "{uid} restored to a file");
    }
    // The created image has the version's size and the default features.
    let info: serde_json::Value =
        serde_json::from_str(&rbd(&["info", "--format", "json", &format!("rbd/{img}-r{v1}")])).unwrap();
    assert_eq!(info["size"], 40 * MB as u64);
    assert_eq!(
        info["features"],
        serde_json::json!(["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"])
    );
    // No temporary image is left behind.
    let images = rbd(&["ls", "rbd"]);
    assert!(!images.contains(".keepfs-restore."), "{images}");

    // deep-scrub compares with the snapshot; a different snapshot is found different.
    kf_ok(&repo, &["deep-scrub", "--source", &format!("rbd:rbd/{img}@s2"), &v2]);
    let r = kf(&repo, &["deep-scrub", "--source", &format!("rbd:rbd/{img}@s1"), &v2]);
    assert_eq!(r.code, 3, "s1 differs from the version of s2: {}", r.stderr);
}

#[test]
fn a_lying_diff_is_refused_before_any_version_exists() {
    let repo = Repo::new();
    let img = image("liar");
    import(&repo, &img, &random_bytes(1201, 8 << 20));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@a")]);
    let v1 = kf_ok(&repo, &["backup", "-b", "1M", &format!("rbd:rbd/{img}@a"), "liar"]);
    // Overwrite everything so that any sampled block differs.
    import_over(&repo, &img, &random_bytes(1202, 8 << 20));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@b")]);
    let before = repo.ls_json(None).as_array().unwrap().len();
    // Hints that say nothing changed.
    std::fs::write(repo.path("empty.diff"), "[]").unwrap();
    let r = kf(
        &repo,
        &[
            "backup",
            "--hints",
            &repo.path("empty.diff").to_string_lossy(),
            "--base",
            &v1,
            "--hints-check",
            "100",
            &format!("rbd:rbd/{img}@b"),
            "liar",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("the hints are wrong"), "{}", r.stderr);
    // A diff from the wrong snapshot (b to b: nothing changed) against the version of a.
    let r = kf(
        &repo,
        &["backup", "--diff-from", "b", "--base", &v1, "--hints-check", "100", &format!("rbd:rbd/{img}@b"), "liar"],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("the diff from snapshot b is wrong"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert_eq!(repo.ls_json(None).as_array().unwrap().len(), before, "no version was created");
}

/// Rewrites the content of an existing image with the rbd CLI: `data` is imported as
/// another image, whose `export-diff` is applied with `import-diff`.
fn import_over(repo: &Repo, name: &str, data: &[u8]) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tmp = format!("{name}-src-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    import(repo, &tmp, data);
    let diff = repo.path("over.diff");
    let _ = std::fs::remove_file(&diff);
    // Of the image itself, not a snapshot: import-diff then creates no snapshot either.
    rbd(&["export-diff", "--no-progress", &format!("rbd/{tmp}"), &diff.to_string_lossy()]);
    rbd(&["import-diff", "--no-progress", &diff.to_string_lossy(), &format!("rbd/{name}")]);
    std::fs::remove_file(&diff).unwrap();
    rbd(&["rm", "--no-progress", &format!("rbd/{tmp}")]);
}

#[test]
fn rbd_backup_runs_the_nightly_routine() {
    let repo = Repo::new();
    let img = image("night");
    const MB: usize = 1 << 20;
    import(&repo, &img, &mixed_image(1301, 16, MB, 0));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@keep-me")]);
    let spec = format!("rbd/{img}");
    let mut uids = Vec::new();
    for run in 0..3 {
        if run > 0 {
            write_at(&repo, &img, run * 5 * MB, &random_bytes(1302 + run as u64, 4096));
        }
        let r = kf(&repo, &["rbd-backup", &spec]);
        assert_eq!(r.code, 0, "run {run}: {}", r.stderr);
        let uid = r.stdout.trim().to_string();
        let how = if run == 0 { "initial" } else { "differential from b-" };
        assert!(r.stderr.contains(how), "run {run}: {}", r.stderr);
        let snaps: serde_json::Value = serde_json::from_str(&rbd(&["snap", "ls", "--format", "json", &spec])).unwrap();
        let names: Vec<&str> = snaps.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        let b: Vec<&&str> = names.iter().filter(|n| n.starts_with("b-")).collect();
        assert_eq!(b.len(), 1, "one b- snapshot left after run {run}: {names:?}");
        assert!(names.contains(&"keep-me"), "other snapshots untouched: {names:?}");
        let v = repo.version(&uid);
        assert_eq!(v["name"], img.as_str());
        assert_eq!(&v["snapshot"], b[0], "the version records its snapshot");
        assert_eq!(repo.restore_sha(&uid, "out.img"), export_sha(&repo, &format!("{spec}@{}", b[0])));
        uids.push(uid);
    }
    for uid in &uids[1..] {
        assert_eq!(bytes_read(&repo, uid), 4 * MB as u64, "one 4 MiB block changed: {}", repo.version(uid)["stats"]);
    }

    // --all: every image of a pool (here a namespace of its own), with a summary.
    let ns = image("ns");
    rbd(&["namespace", "create", &format!("rbd/{ns}")]);
    let f = repo.path("ns.img");
    for (i, name) in ["a", "b"].iter().enumerate() {
        std::fs::write(&f, random_bytes(1310 + i as u64, 2 * MB)).unwrap();
        rbd(&["import", "--no-progress", &f.to_string_lossy(), &format!("rbd/{ns}/{name}")]);
    }
    for run in 0..2 {
        let r = kf(&repo, &["rbd-backup", "--all", &format!("rbd/{ns}")]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("2 image(s), 2 backed up, 0 failed"), "{}", r.stderr);
        assert_eq!(r.stdout.lines().count(), 2, "one uid per image: {}", r.stdout);
        let how = if run == 0 { "initial" } else { "differential" };
        assert_eq!(r.stderr.matches(how).count(), 2, "run {run}: {}", r.stderr);
    }
    let b = repo.valid_uids("name == \"b\"");
    assert_eq!(b.len(), 2);
    let snaps: serde_json::Value =
        serde_json::from_str(&rbd(&["snap", "ls", "--format", "json", &format!("rbd/{ns}/b")])).unwrap();
    let snap = snaps[0]["name"].as_str().unwrap();
    assert_eq!(repo.restore_sha(&b[1], "out.img"), export_sha(&repo, &format!("rbd/{ns}/b@{snap}")));

    // A pool that does not exist: one line, exit 2.
    let r = kf(&repo, &["rbd-backup", "--all", "no-such-pool"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("pool 'no-such-pool' does not exist"), "{}", r.stderr);
}

#[test]
fn restore_into_an_existing_image_needs_force_and_sparse_discards() {
    let repo = Repo::new();
    let img = image("exist");
    const MB: usize = 1 << 20;
    // The version: data, then 8 MiB of zeros, then data.
    let mut data = mixed_image(1401, 4, MB, 0);
    data.extend(vec![0u8; 8 * MB]);
    data.extend(random_bytes(1402, 4 * MB));
    import(&repo, &img, &data);
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@s")]);
    let v = kf_ok(&repo, &["backup", "-b", "1M", &format!("rbd:rbd/{img}@s"), "exist"]);
    let want = export_sha(&repo, &format!("rbd/{img}@s"));

    // Another image full of other data: refused without --force (exit 4), untouched.
    let other = image("exist-target");
    import(&repo, &other, &random_bytes(1403, 16 * MB));
    let before = export_sha(&repo, &format!("rbd/{other}"));
    let r = kf(&repo, &["restore", &v, &format!("rbd:rbd/{other}")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("exists") && r.error_line().contains("--force"), "{}", r.stderr);
    assert_eq!(export_sha(&repo, &format!("rbd/{other}")), before, "untouched");

    // --sparse --force: the zero blocks are discarded, so the image equals the version.
    kf_ok(&repo, &["restore", "--sparse", "--force", &v, &format!("rbd:rbd/{other}")]);
    assert_eq!(export_sha(&repo, &format!("rbd/{other}")), want);
    // --force without --sparse writes the zeros.
    import_over(&repo, &other, &random_bytes(1404, 16 * MB));
    kf_ok(&repo, &["restore", "--force", &v, &format!("rbd:rbd/{other}")]);
    assert_eq!(export_sha(&repo, &format!("rbd/{other}")), want);

    // --continue finishes a restore whose temporary image exists (here: empty).
    let cont = image("cont");
    rbd(&["create", "--size", "16M", &format!("rbd/{cont}.keepfs-restore.{v}")]);
    kf_ok(&repo, &["restore", "--continue", &v, &format!("rbd:rbd/{cont}")]);
    assert_eq!(export_sha(&repo, &format!("rbd/{cont}")), want);
    let r = kf(&repo, &["restore", "--continue", &v, &format!("rbd:rbd/{}", image("nothing"))]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("no interrupted restore"), "{}", r.stderr);
}

#[test]
fn missing_things_unreachable_clusters_and_wrong_credentials_are_one_line_errors() {
    let repo = Repo::new();
    let img = image("err");
    import(&repo, &img, &random_bytes(1501, 1 << 20));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@s")]);
    let cases = [
        (format!("rbd:nopool/{img}@s"), "Ceph pool 'nopool' does not exist"),
        (format!("rbd:rbd/{img}-missing@s"), "does not exist (`rbd ls rbd`"),
        (format!("rbd:rbd/{img}@missing"), "snapshot 'missing' of RBD image"),
    ];
    for (url, want) in &cases {
        let r = kf(&repo, &["backup", url, "x"]);
        assert_eq!(r.code, 2, "{url}: {}", r.stderr);
        assert!(r.error_line().contains(want), "{url}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    }
    let r = kf(&repo, &["backup", "--diff-from", "nosnap", "--base", "V0000000001", &format!("rbd:rbd/{img}@s"), "x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // A cluster nobody answers for: a timeout (3 s), not a hang.
    let conf = repo.path("dead.conf");
    std::fs::write(&conf, format!("[global]\nmon host = v2:127.0.0.1:3329\nkeyring = {}\n", ceph().keyring)).unwrap();
    let cfg = repo.path("dead.toml");
    std::fs::write(
        &cfg,
        format!("home = \"{}\"\n[rbd]\nconf = \"{}\"\ntimeout = 3\n", repo.home().display(), conf.display()),
    )
    .unwrap();
    let r = repo.run_env(&["backup", &format!("rbd:rbd/{img}@s"), "x"], &[("KEEPFS_CONFIG", &cfg.to_string_lossy())]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("cannot reach the Ceph cluster") && r.error_line().contains("3 s"), "{}", r.stderr);

    // Wrong credentials: a keyring with another key for client.admin.
    let keyring = repo.path("wrong.keyring");
    std::fs::write(&keyring, "[client.admin]\n\tkey = AQBvaBFZAAAAABAA9VHgwCg3rWn8fMaX8KL01A==\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "home = \"{}\"\n[rbd]\nconf = \"{}\"\nkeyring = \"{}\"\ntimeout = 10\n",
            repo.home().display(),
            ceph().conf,
            keyring.display()
        ),
    )
    .unwrap();
    let r = repo.run_env(&["backup", &format!("rbd:rbd/{img}@s"), "x"], &[("KEEPFS_CONFIG", &cfg.to_string_lossy())]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("refused client.admin"), "{}", r.stderr);
    assert!(repo.ls_json(None).as_array().unwrap().is_empty(), "nothing was created");
}

#[test]
fn an_image_that_grew_is_backed_up_differentially_and_one_that_shrank_is_refused() {
    let repo = Repo::new();
    let img = image("resize");
    const MB: usize = 1 << 20;
    import(&repo, &img, &random_bytes(1601, 5 * MB + 4096));
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@a")]);
    let v1 = kf_ok(&repo, &["backup", "-b", "1M", &format!("rbd:rbd/{img}@a"), "resize"]);
    // Grown at the end (the old last block was partial), with data written past the old end.
    rbd(&["resize", "--no-progress", "--size", "12M", &format!("rbd/{img}")]);
    import_over(
        &repo,
        &img,
        &[random_bytes(1601, 5 * MB + 4096), vec![0; 3 * MB], random_bytes(1602, 4 * MB - 4096)].concat(),
    );
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@b")]);
    let v2 = kf_ok(
        &repo,
        &["backup", "--diff-from", "a", "--base", &v1, "--hints-check", "100", &format!("rbd:rbd/{img}@b"), "resize"],
    );
    assert_eq!(repo.version(&v2)["size"], 12 * MB as u64);
    assert_eq!(repo.restore_sha(&v2, "out.img"), export_sha(&repo, &format!("rbd/{img}@b")));
    // Shrunk below the base: refused, one line.
    rbd(&["resize", "--no-progress", "--allow-shrink", "--size", "2M", &format!("rbd/{img}")]);
    rbd(&["snap", "create", "--no-progress", &format!("rbd/{img}@c")]);
    let r = kf(&repo, &["backup", "--diff-from", "b", "--base", &v2, &format!("rbd:rbd/{img}@c"), "resize"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("shrank since the base"), "{}", r.stderr);
}
