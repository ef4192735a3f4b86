//! The process title of long operations, as an operator sees it with `ps axfu`:
//! `keepfs [backing up vm1 43% 850 MB/s ETA 2m]` while a backup runs (backy2 did this),
//! and the original command line again once the work is done.

mod common;
use common::mount::wait_until;
use common::*;
use std::fs;
use std::time::Duration;

/// A repository whose storage takes writes at 128 kB/s, so that a backup of 2 MiB of
/// random data runs for seconds.
fn slow_config(repo: &Repo) -> String {
    let path = repo.path("slow.toml");
    fs::write(
        &path,
        format!(
            "home = \"{home}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{home}/storage\"\nwrite_bandwidth = \"128k\"\nread_bandwidth = \"128k\"\n",
            home = repo.home().display()
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// What `ps -o args=` shows for a process.
fn ps_args(pid: u32) -> String {
    let out = std::process::Command::new("ps").args(["-o", "args=", "-p", &pid.to_string()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

#[test]
fn a_running_backup_and_restore_show_their_progress_in_ps() {
    let repo = Repo::new();
    let config = slow_config(&repo);
    fs::write(repo.path("img"), random_bytes(401, 2 << 20)).unwrap();
    let url = repo.url("img");
    // A short command line: the title needs more room than the arguments had.
    let child = repo
        .command(&["--config", &config, "backup", &url, "vm1", "-b", "64k"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut seen = String::new();
    wait_until("the backup's title to show its rate and ETA", Duration::from_secs(60), || {
        seen = cmdline(pid);
        seen.contains("MB/s ETA ")
    });
    assert!(seen.starts_with("keepfs [backing up vm1 "), "{seen}");
    assert!(seen.ends_with(']'), "{seen}");
    let pct: u32 = seen["keepfs [backing up vm1 ".len()..].split('%').next().unwrap().parse().expect("a percentage");
    assert!(pct <= 100, "{seen}");
    // ps shows the same (it reads the same memory).
    let shown = ps_args(pid);
    assert!(shown.starts_with("keepfs [backing up vm1 "), "ps shows {shown}");
    // The thread name (top, ps -o comm) says keepfs too.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(comm.starts_with("keepfs"), "{comm}");

    // The backup finishes normally and its version is good.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(repo.version(&uid)["status"], "valid");

    // A restore through the same slow storage shows "restoring V...".
    let target = repo.url("out");
    let child = repo
        .command(&["--config", &config, "restore", &uid, &target])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until("the restore's title", Duration::from_secs(60), || {
        seen = cmdline(pid);
        seen.starts_with(&format!("keepfs [restoring {uid} "))
    });
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256_file(&repo.path("out")), sha256_file(&repo.path("img")));
}
