//! A real `keepfs mount` in a child process, unmounted (and waited for) on drop.
#![allow(dead_code)]

use super::Repo;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct Mount {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub fn is_mounted(dir: &Path) -> bool {
    let Ok(canon) = dir.canonicalize() else { return false };
    let target = canon.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str())))
        .unwrap_or(false)
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let reached = super::poll_for(limit, || f().then_some(()));
    assert!(reached.is_some(), "timed out after {limit:?} waiting for {what}");
}

impl Mount {
    pub fn new(repo: &Repo, args: &[&str]) -> Mount {
        let dir = repo.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        Mount::at(repo, &dir, args)
    }

    pub fn at(repo: &Repo, dir: &Path, args: &[&str]) -> Mount {
        Mount::at_with_env(repo, dir, args, &[])
    }

    /// [`Mount::at`] with these environment variables set for the mount process.
    pub fn at_with_env(repo: &Repo, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Mount {
        let log = repo.path(&format!("mount-{}.log", std::process::id()));
        let logf = std::fs::File::create(&log).unwrap();
        let mut all = vec!["mount", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut command = repo.command(&all);
        command.envs(env.iter().copied());
        let child = command.stdout(Stdio::null()).stderr(logf).spawn().unwrap();
        let mut m = Mount { dir: dir.to_path_buf(), child: Some(child), log };
        let t = Instant::now();
        // The new mount says so once the kernel mount exists (a dead mount may still be
        // listed at the same place until the new process detaches it).
        while !(is_mounted(dir) && m.log_text().contains("keepfs: mounted at")) {
            if let Some(c) = m.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("keepfs mount exited with {status}: {}", m.log_text());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "not mounted: {}", m.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn unmount(&mut self) {
        if let Some(mut c) = self.child.take() {
            let unmount = || std::process::Command::new("fusermount3").arg("-u").arg(&self.dir).status();
            let _ = unmount();
            let t = Instant::now();
            let mut asked = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                // Refused while the kernel still finishes the release of a file just
                // closed (EBUSY on a loaded machine): asked again until it is done, so
                // the process ends as a user's unmount ends it, never killed with its
                // drafts left behind.
                if asked.elapsed() > Duration::from_millis(200) && is_mounted(&self.dir) {
                    let _ = unmount();
                    asked = Instant::now();
                }
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&self.dir).status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
    }
}
