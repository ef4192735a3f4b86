//! What a restore writes over, as an admin meets it: a file given to `--force` stays the
//! file it was (its owner, its other hard links, its ACL and extended attributes, the
//! symlink that names it), a symlink
//! to nothing is refused rather than replaced, and a restore the target's file system
//! cannot hold leaves nothing behind.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;

const NOBODY: u32 = 65534;

/// A repository holding one version of a 3 MiB image: (repo, uid, the image's sha256).
fn one_version() -> (Repo, String, String) {
    let repo = Repo::new();
    std::fs::write(repo.path("img"), mixed_image(41, 12, 256 << 10, 30)).unwrap();
    let uid = repo.backup("img", "vm", &["-b", "256k"]);
    let sha = sha256_file(&repo.path("img"));
    (repo, uid, sha)
}

fn is_root() -> bool {
    // SAFETY: a getter without failure modes.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_file_restored_over_keeps_its_owner_and_its_hard_links() {
    let (repo, uid, sha) = one_version();
    let out = repo.path("out");
    std::fs::write(&out, b"yesterday's disk").unwrap();
    if is_root() {
        std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let owner = std::fs::metadata(&out).unwrap();
    repo.ok(&["restore", "--force", &uid, &repo.url("out")]);
    let after = std::fs::metadata(&out).unwrap();
    assert_eq!(sha256_file(&out), sha);
    assert_eq!((after.uid(), after.gid()), (owner.uid(), owner.gid()), "the owner of a file restored over");
    assert_ne!(after.ino(), owner.ino(), "written beside the old file and renamed over it");

    // A second name for the same file: a rename would leave it on the old image. Refused,
    // naming --in-place, with nothing changed.
    let other = repo.path("same-disk");
    std::fs::hard_link(&out, &other).unwrap();
    std::fs::write(&out, b"changed since").unwrap();
    let ino = std::fs::metadata(&out).unwrap().ino();
    let r = repo.run(&["restore", "--force", &uid, &repo.url("out")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("has 2 hard links") && r.error_line().contains("--in-place"), "{}", r.stderr);
    assert_eq!(std::fs::read(&other).unwrap(), b"changed since");
    // With it, the file itself gets the image: both names show it.
    let r = repo.run(&["restore", "--force", "--in-place", &uid, &repo.url("out")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("in place: its old content is gone"), "{}", r.stderr);
    assert_eq!(std::fs::metadata(&out).unwrap().ino(), ino);
    assert_eq!(sha256_file(&other), sha);
    let after = std::fs::metadata(&out).unwrap();
    assert_eq!((after.uid(), after.gid(), after.nlink()), (owner.uid(), owner.gid(), 2));
    let left = || -> Vec<String> {
        std::fs::read_dir(repo.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("keepfs-restore"))
            .collect()
    };
    assert!(left().is_empty(), "{:?}", left());

    // A file of the version's size that no restore marked: `--continue` does not write
    // into it (it used to guess, and could leave another image's blocks where this one
    // has zeros).
    std::fs::write(&out, b"x").unwrap();
    std::fs::OpenOptions::new().write(true).open(&out).unwrap().set_len(3 << 20).unwrap();
    let r = repo.run(&["restore", "--continue", &uid, &repo.url("out")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("no interrupted restore"), "{}", r.stderr);
}

/// A POSIX ACL as the kernel stores it (`system.posix_acl_access`): owner rw, user
/// `nobody` r, group r, mask r, others nothing.
fn acl_giving_nobody_read() -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(0x01u16, 6u16, u32::MAX), (0x02, 4, NOBODY), (0x04, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)]
    {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    acl
}

/// A disk image given to a VM manager carries more than bytes: an ACL letting another
/// user read it, a note of its own. A file restored over keeps them, as `cp -a` would;
/// they used to be lost with the old file when the new one was renamed over it.
#[test]
fn a_file_restored_over_keeps_its_extended_attributes_and_acl() {
    let (repo, uid, sha) = one_version();
    let out = repo.path("out");
    std::fs::write(&out, b"yesterday's disk").unwrap();
    if let Err(e) = xattr::set(&out, "user.keepfs-test", b"db disk of vm 7") {
        eprintln!("skipped: this file system keeps no user extended attributes ({e})");
        return;
    }
    let acl = acl_giving_nobody_read();
    let with_acl = xattr::set(&out, "system.posix_acl_access", &acl).is_ok();
    let before = std::fs::metadata(&out).unwrap();
    repo.ok(&["restore", "--force", &uid, &repo.url("out")]);
    assert_eq!(sha256_file(&out), sha);
    assert_ne!(std::fs::metadata(&out).unwrap().ino(), before.ino(), "a new file, renamed over the old one");
    assert_eq!(xattr::get(&out, "user.keepfs-test").unwrap().as_deref(), Some(&b"db disk of vm 7"[..]));
    if with_acl {
        assert_eq!(xattr::get(&out, "system.posix_acl_access").unwrap(), Some(acl), "the ACL");
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, before.mode() & 0o777);
    } else {
        eprintln!("(this file system takes no POSIX ACLs: only the user attribute was checked)");
    }
}

/// An in-place restore killed half way (SIGKILL, through a storage throttled so that it
/// is still running) leaves its mark; `--continue` finishes it in place, checking every
/// block and writing zeros where the image has them.
#[test]
fn an_interrupted_restore_in_place_is_continued_in_place() {
    let (repo, uid, sha) = one_version();
    let out = repo.path("out");
    std::fs::write(&out, random_bytes(44, 3 << 20)).unwrap();
    let other = repo.path("same-disk");
    std::fs::hard_link(&out, &other).unwrap();
    let slow = repo.path("slow.toml");
    std::fs::write(
        &slow,
        format!(
            "home = \"{home}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{home}/storage\"\nread_bandwidth = \"64k\"\n",
            home = repo.home().display()
        ),
    )
    .unwrap();
    let url = repo.url("out");
    let mut child = repo
        .command(&["--config", slow.to_str().unwrap(), "restore", "--force", "--in-place", &uid, &url])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mark = repo.dir.path().join(format!(".out.keepfs-restore.{uid}.in-place"));
    common::mount::wait_until("the restore to mark its target", std::time::Duration::from_secs(30), || mark.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(sha256_file(&other), sha, "the restore was to be cut off");
    let r = repo.run(&["restore", "--continue", &uid, &repo.url("out")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&other), sha);
    assert!(!mark.exists(), "the mark goes once the restore is done");
}

#[test]
fn a_symlink_is_followed_and_a_link_to_nothing_is_refused() {
    let (repo, uid, sha) = one_version();
    let disk = repo.path("disk.img");
    std::fs::write(&disk, b"old").unwrap();
    let link = repo.path("current");
    std::os::unix::fs::symlink(&disk, &link).unwrap();

    // Without --force the file the link names is not written over.
    let r = repo.run(&["restore", &uid, &repo.url("current")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("exists (file); pass --force"), "{}", r.stderr);
    assert_eq!(std::fs::read(&disk).unwrap(), b"old");

    // With it, the link stays a link and the file it names gets the image.
    repo.ok(&["restore", "--force", &uid, &repo.url("current")]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read_link(&link).unwrap(), disk);
    assert_eq!(sha256_file(&disk), sha);

    // Root does not follow another user's link to a file that user does not own (a
    // link in a user's directory must not send a restore over a file of root's).
    if is_root() {
        let theirs = repo.path("theirs");
        std::os::unix::fs::symlink(&disk, &theirs).unwrap();
        std::os::unix::fs::lchown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
        let before = sha256_file(&disk);
        let r = repo.run(&["restore", "--force", &uid, &repo.url("theirs")]);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert!(r.error_line().contains("keepfs does not follow it"), "{}", r.stderr);
        assert_eq!(sha256_file(&disk), before);
    }

    // A link to a device (as /dev/vg0/lv is to /dev/dm-N) is written through and named
    // as it was given.
    let dev = repo.path("null-link");
    std::os::unix::fs::symlink("/dev/null", &dev).unwrap();
    let r = repo.run(&["restore", &uid, &repo.url("null-link")]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains(&format!("{} exists (character device)", dev.display())), "{}", r.stderr);

    // A link to nothing: refused (as `cp` refuses to write through one), link untouched,
    // nothing created where it points.
    let gone = repo.path("gone.img");
    let dangling = repo.path("dangling");
    std::os::unix::fs::symlink(&gone, &dangling).unwrap();
    for force in [false, true] {
        let mut args = vec!["restore"];
        if force {
            args.push("--force");
        }
        let url = repo.url("dangling");
        args.extend([uid.as_str(), url.as_str()]);
        let r = repo.run(&args);
        assert_eq!(r.code, 4, "{args:?}: {}", r.stderr);
        assert!(
            r.error_line().contains("is a symlink to") && r.error_line().contains("which does not exist"),
            "{}",
            r.stderr
        );
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        assert!(!gone.exists());
    }
}

/// A file system that cannot hold the image (here: a file size limit, as on a file
/// system with small files) fails before anything is written, with one line, and leaves
/// no partial file behind to fill the disk.
#[test]
fn a_restore_too_large_for_its_target_leaves_nothing_behind() {
    let (repo, uid, _) = one_version();
    let keepfs = env!("CARGO_BIN_EXE_keepfs");
    let url = repo.url("out");
    // 1 MiB at most per file, and the signal that limit sends ignored: the write fails
    // with EFBIG instead. The environment is the one the test's keepfs runs with.
    let script = format!("ulimit -f 1024; trap '' XFSZ; exec '{keepfs}' restore {uid} '{url}'");
    let env = repo.command(&[]);
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(&script);
    for (k, v) in env.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let r = sh.output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.trim_end().ends_with("(os error 27)") || stderr.contains("File too large"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().filter(|l| l.starts_with("keepfs: error")).count(), 1, "{stderr}");
    let left: Vec<_> = std::fs::read_dir(repo.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
