//! contrib/scripts/lvm-backup.sh against a real LVM volume group on a loop device: the
//! snapshot is backed up and removed, also when the backup fails. Needs root, loop
//! devices and the kernel's device-mapper with the snapshot target; ignored by default
//! because some kernels (containers, this project's development machines) have no
//! device-mapper: `.ci/run` runs it with `--ignored` where `dmsetup targets` lists
//! `snapshot`, and says so where not.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A volume group on a loop device over a sparse file; everything torn down on drop
/// (also when the test fails).
struct VolumeGroup {
    name: String,
    loop_dev: String,
    _file: tempfile::TempDir,
}

impl VolumeGroup {
    fn new() -> VolumeGroup {
        // SAFETY: getuid has no preconditions.
        assert_eq!(unsafe { libc::getuid() }, 0, "the LVM test needs root (losetup, pvcreate): CI runs as root");
        assert!(
            Path::new("/dev/mapper/control").exists(),
            "no /dev/mapper/control: the kernel has no device-mapper, LVM cannot work here"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pv.img");
        std::fs::File::create(&file).unwrap().set_len(96 << 20).unwrap();
        let loop_dev = run("losetup", &["-f", "--show", file.to_str().unwrap()]);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("keepfstest{}x{nanos}", std::process::id());
        let vg = VolumeGroup { name, loop_dev, _file: dir };
        run("pvcreate", &["-q", &vg.loop_dev]);
        run("vgcreate", &["-q", &vg.name, &vg.loop_dev]);
        vg
    }

    fn lvs(&self) -> Vec<String> {
        run("lvs", &["--noheadings", "-o", "lv_name", &self.name]).lines().map(|l| l.trim().to_string()).collect()
    }
}

impl Drop for VolumeGroup {
    fn drop(&mut self) {
        let _ = Command::new("vgremove").args(["-f", "-q", &self.name]).status();
        let _ = Command::new("pvremove").args(["-q", &self.loop_dev]).status();
        let _ = Command::new("losetup").args(["-d", &self.loop_dev]).status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/scripts/lvm-backup.sh")
}

#[test]
#[ignore = "needs root, loop devices and device-mapper snapshots (.ci/run runs it where the kernel has them)"]
fn lvm_backup_script_backs_up_a_snapshot_and_removes_it() {
    let vg = VolumeGroup::new();
    run("lvcreate", &["-q", "-L", "32M", "-n", "data", &vg.name]);
    let dev = format!("/dev/{}/data", vg.name);
    let data = mixed_image(11, 8, 4 << 20, 0);
    std::fs::write(&dev, &data).unwrap();
    let repo = Repo::new();
    let vglv = format!("{}/data", vg.name);
    let backup = |extra: &[&str]| {
        let mut c = Command::new("bash");
        c.arg(script()).args([&vglv, "db", "16M"]).args(extra).env("KEEPFS", KEEPFS).env("KEEPFS_HOME", repo.home());
        output_within(c, COMMAND_LIMIT, "lvm-backup.sh")
    };
    let out = backup(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(vg.lvs(), ["data"], "the snapshot is removed");
    assert!(repo.version(&uid)["snapshot"].as_str().unwrap().starts_with("data-keepfs-"));
    // The volume as it was (32 MiB: the data, then zeros), restored byte for byte.
    assert_eq!(repo.restore_sha(&uid, "r.img"), sha256_file(Path::new(&dev)));

    // A backup that fails (a block size keepfs refuses) still removes the snapshot,
    // and the script exits with keepfs's code.
    let out = backup(&["--", "-b", "3k"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(vg.lvs(), ["data"], "the snapshot is removed after a failed backup");
}
