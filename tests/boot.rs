//! Booting a VM straight from a backup: qemu (TCG, no KVM needed) boots Debian's kernel
//! with its root filesystem on `by_version/<uid>/data` of the mount, or on
//! `nbd://127.0.0.1/<uid>` of `keepfs nbd`, as a virtio disk. The image's init
//! writes a marker and powers off. The marker must land in a new copy-on-write version
//! only; the backed-up version stays byte for byte the same. Needs qemu-system-x86,
//! linux-image-amd64 and busybox-static (.ci/run installs them).

mod common;
use common::mount::{Mount, wait_until};
use common::nbd::Server;
use common::*;
use std::fs;
use std::process::Command;
use std::time::Duration;

fn one(pattern: &str) -> String {
    let dir = std::path::Path::new("/boot");
    let found = fs::read_dir(dir).ok().and_then(|rd| {
        rd.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(pattern)))
    });
    found
        .unwrap_or_else(|| panic!("no /boot/{pattern}*: install linux-image-amd64 (bash .ci/run does)"))
        .to_string_lossy()
        .into_owned()
}

fn debugfs_cat(image: &std::path::Path, file: &str) -> Option<String> {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat {file}")).arg(image).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (!text.is_empty()).then_some(text)
}

/// A root filesystem whose init writes a marker and powers off, backed up as `bootvm`.
fn backed_up_root(repo: &Repo) -> (String, String) {
    assert!(std::path::Path::new("/bin/busybox").exists(), "install busybox-static (bash .ci/run does)");
    let root = repo.path("rootfs");
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let init = "#!/bin/busybox sh\n\
        /bin/busybox echo \"keepfs-boot: init running\"\n\
        /bin/busybox echo \"booted from a keepfs backup\" > /marker\n\
        /bin/busybox sync\n\
        /bin/busybox echo \"keepfs-boot: marker written\"\n\
        /bin/busybox poweroff -f\n";
    fs::write(root.join("sbin/init"), init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    let img = repo.path("root.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let ok = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&root).arg(&img).status().unwrap().success();
    assert!(ok, "mkfs.ext4");
    (sha256_file(&img), repo.backup("root.img", "bootvm", &[]))
}

/// Boots the VM with its root disk at `drive` (a qemu `file=` value) until it powers off.
fn boot(drive: &str) {
    let (kernel, initrd) = (one("vmlinuz-"), one("initrd.img-"));
    let out = Command::new("timeout")
        .arg("300")
        .arg("qemu-system-x86_64")
        .args(["-m", "512", "-nographic", "-no-reboot", "-kernel", &kernel, "-initrd", &initrd])
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=virtio"))
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet"])
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu failed: {}\n{console}", String::from_utf8_lossy(&out.stderr));
    assert!(console.contains("keepfs-boot: init running"), "the VM never ran init:\n{console}");
    assert!(console.contains("keepfs-boot: marker written"), "{console}");
}

/// The marker is in the one copy-on-write version only; the original is unchanged.
fn check_versions_after_boot(repo: &Repo, uid: &str, original_sha: &str) {
    wait_until("the copy-on-write version", Duration::from_secs(30), || {
        repo.valid_uids("name == \"bootvm\"").len() == 2
    });
    let versions = repo.ls_json(Some("name == \"bootvm\""));
    let cow = versions.as_array().unwrap().iter().find(|v| v["uid"] != uid).unwrap().clone();
    assert_eq!(cow["labels"]["keepfs.cow-of"], uid);
    let cow_uid = cow["uid"].as_str().unwrap().to_string();
    let cow_img = repo.path("cow.img");
    repo.ok(&["restore", &cow_uid, &format!("file://{}", cow_img.display())]);
    assert_eq!(debugfs_cat(&cow_img, "/marker").as_deref(), Some("booted from a keepfs backup\n"));
    assert_eq!(repo.restore_sha(uid, "orig.img"), original_sha);
    let orig_img = repo.path("orig2.img");
    repo.ok(&["restore", uid, &format!("file://{}", orig_img.display())]);
    assert_eq!(debugfs_cat(&orig_img, "/marker"), None);
}

#[test]
fn a_vm_boots_from_a_backup_and_its_writes_become_a_new_version() {
    let repo = Repo::new();
    let (original_sha, uid) = backed_up_root(&repo);
    let m = Mount::new(&repo, &[]);
    boot(&m.p(&format!("by_version/{uid}/data")).display().to_string());
    check_versions_after_boot(&repo, &uid, &original_sha);
    drop(m);
}

#[test]
fn a_vm_boots_over_nbd_and_its_writes_become_a_new_version() {
    let repo = Repo::new();
    let (original_sha, uid) = backed_up_root(&repo);
    let srv = Server::start(&repo, &[]);
    boot(&srv.url(&uid));
    check_versions_after_boot(&repo, &uid, &original_sha);
    let (status, log) = srv.stop();
    assert!(status.success(), "{log}");
}
