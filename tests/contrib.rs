//! What contrib/ ships, used as an operator would: the example configurations pass
//! `keepfs config check`, the systemd units pass `systemd-analyze verify` (with the
//! binary they name pointed at this build), the nightly backup script backs up a list
//! of images and applies retention, and an fstab-style `mount -t fuse.keepfs` mounts a
//! repository (mount(8) -> mount.fuse3 -> `keepfs mount DIR -o OPTIONS`), and the
//! benchmark scripts at least parse and say how they are used. Needs root for the mount
//! (CI runs as root).

mod common;
use common::mount::{is_mounted, wait_until};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(rel)
}

/// The benchmarks of contrib/bench/ are run by hand, not by CI (their figures belong in
/// the README, not in assertions); a script broken since its last run would be found
/// only when someone needs its figures. Each Python one answers `--help` (bootpattern.py
/// needs python3-libnbd for that, which CI does not install: parsed only); each shell
/// one passes `bash -n`.
#[test]
fn benchmark_scripts_parse_and_answer_help() {
    let mut seen = 0;
    for e in std::fs::read_dir(contrib("bench")).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let out = match path.extension().and_then(|x| x.to_str()) {
            Some("py") if name == "bootpattern.py" => {
                // Parsed only: py_compile would leave __pycache__ in the source tree.
                let parse = "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])";
                Command::new("python3").args(["-c", parse]).arg(&path).output().unwrap()
            }
            Some("py") => Command::new("python3").arg(&path).arg("--help").output().unwrap(),
            Some("sh") => Command::new("bash").arg("-n").arg(&path).output().unwrap(),
            _ => continue,
        };
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        seen += 1;
    }
    assert!(seen >= 8, "{seen} scripts");
}

#[test]
fn example_configurations_pass_config_check() {
    let repo = Repo::new();
    for (file, expect) in [
        ("file.toml", "file /srv/backup/keepfs"),
        ("s3.toml", "s3 https://s3.eu-west-1.amazonaws.com region eu-west-1 bucket backups"),
        ("encrypted.toml", "key file /etc/keepfs/master.key"),
    ] {
        let path = contrib(&format!("config/{file}"));
        // The S3 example takes its credentials from the environment, as the units do
        // from /etc/keepfs/keepfs.env; they are never printed.
        let env = [("AWS_ACCESS_KEY_ID", "EXAMPLEKEYID"), ("AWS_SECRET_ACCESS_KEY", "example-secret-never-shown")];
        let r = repo.run_env(&["--config", path.to_str().unwrap(), "config", "check"], &env);
        assert_eq!(r.code, 0, "{file}: {}{}", r.stdout, r.stderr);
        assert!(!r.stdout.contains("example-secret-never-shown"), "{}", r.stdout);
        assert!(r.stdout.contains(expect), "{file}: no '{expect}' in:\n{}", r.stdout);
    }
}

/// The units with /usr/bin/keepfs and /usr/share/keepfs/backup-list.sh replaced by the
/// files of this tree, in a directory of their own.
fn units_for_this_build(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(contrib("systemd")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("keepfs-") || name.starts_with("keepfs-rbd") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/bin/keepfs", KEEPFS)
            .replace("/usr/share/keepfs/backup-list.sh", contrib("scripts/backup-list.sh").to_str().unwrap());
        std::fs::write(dir.join(&name), text).unwrap();
        out.push(dir.join(name));
    }
    out.sort();
    out
}

#[test]
fn systemd_units_verify_and_name_real_flags() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_this_build(dir.path());
    let names: Vec<_> = units.iter().map(|u| u.file_name().unwrap().to_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "keepfs-backup.service",
            "keepfs-backup.timer",
            "keepfs-deep-scrub.service",
            "keepfs-deep-scrub.timer",
            "keepfs-mount.service"
        ]
    );
    // Every flag an ExecStart gives keepfs is one its help lists.
    for u in &units {
        for line in std::fs::read_to_string(u).unwrap().lines() {
            let Some(cmd) = line.strip_prefix("ExecStart=") else { continue };
            let words: Vec<&str> = cmd.split_whitespace().collect();
            if words[0] != KEEPFS {
                continue;
            }
            let help = Command::new(KEEPFS).arg(words[1]).arg("--help").output().unwrap();
            let help = String::from_utf8_lossy(&help.stdout);
            for w in words.iter().filter(|w| w.starts_with('-')) {
                assert!(help.contains(&format!(" {w}")), "{}: keepfs {} has no {w}", u.display(), words[1]);
            }
        }
    }
    // --man=no: the man pages the units name are installed by the .deb, not here.
    let verify = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&units).output();
    match verify {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            // Warnings about the host's own units (systemd-analyze loads their
            // dependencies too) are not ours.
            let ours: Vec<&str> = err.lines().filter(|l| l.contains("keepfs")).collect();
            assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{err}");
        }
        Err(e) => panic!("systemd-analyze (package systemd) is needed to check the units: {e}"),
    }
}

#[test]
fn nightly_backup_script_backs_up_a_list_and_applies_retention() {
    let repo = Repo::new();
    let a = random_bytes(1, 200_000);
    let b = random_bytes(2, 300_000);
    std::fs::write(repo.path("a.img"), &a).unwrap();
    std::fs::write(repo.path("b.img"), &b).unwrap();
    let list = repo.path("backup.list");
    std::fs::write(&list, format!("# nightly\n{} vm-a\n\n{} vm-b\n", repo.url("a.img"), repo.url("b.img"))).unwrap();
    let prom = repo.path("keepfs.prom");
    let script = contrib("scripts/backup-list.sh");
    let run = || {
        let mut c = Command::new("sh");
        c.arg(&script)
            .arg(&list)
            .env("KEEPFS", KEEPFS)
            .env("KEEPFS_HOME", repo.home())
            .env_remove("KEEPFS_CONFIG")
            .env("KEEPFS_RETENTION", "latest2")
            .env("KEEPFS_BACKUP_OPTS", "-l daily")
            .env("KEEPFS_METRICS_FILE", &prom);
        output_within(c, COMMAND_LIMIT, "backup-list.sh")
    };
    for _ in 0..3 {
        let out = run();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Three nights, latest2 kept per name.
    let a_uids = repo.valid_uids("name == \"vm-a\"");
    let b_uids = repo.valid_uids("name == \"vm-b\"");
    assert_eq!((a_uids.len(), b_uids.len()), (2, 2));
    assert_eq!(repo.restore_sha(&a_uids[1], "a.out"), sha256_file(&repo.path("a.img")));
    assert_eq!(repo.restore_sha(&b_uids[1], "b.out"), sha256_file(&repo.path("b.img")));
    assert!(repo.version(&a_uids[0])["labels"]["daily"].is_string());
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains(r#"keepfs_versions{name="vm-b",status="valid"} 2.0"#), "{text}");

    // A source that is gone fails its line, not the others; the exit code says so.
    std::fs::write(&list, format!("file:///nonexistent/x.img gone\n{} vm-a\n", repo.url("a.img"))).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("backup-list: backup of gone from file:///nonexistent/x.img failed")
    );
    assert_eq!(repo.valid_uids("name == \"vm-a\"").len(), 2);
}

fn root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// /etc/fstab's `mount DIR fuse.keepfs OPTIONS 0 0`, run as `mount -t fuse.keepfs` in a
/// mount namespace of its own where /usr/local/bin holds this build as `keepfs`
/// (mount(8) runs its helpers with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:...,
/// where the .deb's /usr/bin/keepfs or `cargo install --root /usr/local` put it).
#[test]
fn fstab_line_mounts_with_mount_t_fuse_keepfs() {
    assert!(root(), "this test mounts a filesystem with mount(8): run it as root (CI does)");
    let repo = Repo::new();
    let image = random_bytes(5, 500_000);
    std::fs::write(repo.path("d.img"), &image).unwrap();
    let uid = repo.backup("d.img", "d", &[]);
    let bin = repo.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(KEEPFS, bin.join("keepfs")).unwrap();
    let mnt = repo.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let config = repo.path("keepfs.toml");
    std::fs::write(&config, format!("home = \"{}\"\n", repo.home().display())).unwrap();
    let fstab = repo.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "mount {} fuse.keepfs ro,config={},nofail,x-systemd.after=network-online.target 0 0\n",
            mnt.display(),
            config.display()
        ),
    )
    .unwrap();
    let script = format!(
        "set -e
mount --bind {bin} /usr/local/bin
mount -T {fstab} {mnt}
ls {mnt}/by_version
sha256sum {mnt}/by_version/{uid}/data
if touch {mnt}/incoming/x 2>/dev/null; then echo writable; exit 1; fi
umount {mnt}",
        bin = bin.display(),
        fstab = fstab.display(),
        mnt = mnt.display()
    );
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let out = output_within(c, Duration::from_secs(60), "mount -T fstab in a namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(repo.home().join("mount.log")).unwrap_or_default();
    assert!(out.status.success(), "{stdout}{}\nmount.log:\n{log}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().any(|l| l == uid), "{stdout}");
    let want = sha256_file(&repo.path("d.img"));
    assert!(stdout.contains(&format!("{want}  {}/by_version/{uid}/data", mnt.display())), "{stdout}");
    // The mount was the namespace's alone, and its server (whose pid `keepfs mount`
    // printed once mounted) ends after umount.
    assert!(!is_mounted(&mnt));
    let pid = stdout
        .lines()
        .find(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| panic!("no server pid in: {stdout}"));
    let proc = PathBuf::from(format!("/proc/{pid}"));
    wait_until("the unmounted server to end", Duration::from_secs(20), || !proc.exists());
}
