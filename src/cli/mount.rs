//! The mount point and the processes around a server: checking and cleaning a mount
//! point, `mount --daemon`, signals that unmount or stop, and process limits.

use keepfs::error::{Error, Result, exit};
use std::time::Instant;

use super::mount_options;

pub(crate) fn is_mounted(dir: &std::path::Path) -> bool {
    let Ok(canon) = dir.canonicalize() else { return false };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target.as_str())))
        .unwrap_or(false)
}

/// Checks the mount point, cleaning up a mount left by a keepfs that was killed.
pub(crate) fn prepare_mountpoint(dir: &std::path::Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if is_mounted(dir) {
                return Err(Error::Refused(format!(
                    "{} is already a mount point; unmount it first (fusermount3 -u {})",
                    dir.display(),
                    dir.display()
                )));
            }
            Ok(())
        }
        Ok(_) => Err(Error::Invalid(format!("{} is not a directory", dir.display()))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // The FUSE server of an earlier mount died: detach the dead mount.
            let ok = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
                || std::process::Command::new("umount")
                    .arg("-l")
                    .arg(dir)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if !ok {
                return Err(Error::Other(format!(
                    "{} is a dead keepfs mount and could not be detached; run `fusermount3 -u -z {}` as its owner",
                    dir.display(),
                    dir.display()
                )));
            }
            note!("keepfs: detached the dead mount left at {}", dir.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Invalid(format!(
            "mount point {} does not exist; make it first (mkdir -p {})",
            dir.display(),
            dir.display()
        ))),
        Err(e) => Err(Error::io(format!("cannot use mount point {}", dir.display()), e)),
    }
}

/// The kernel offers FUSE filesystems 128 KiB of read-ahead, which leaves sequential
/// readers of `data` waiting on small requests; one block's worth measured 35% faster
/// cold reads. Only root may raise it (sysfs); otherwise the default stays.
/// (The device number comes from mountinfo: a stat of the mount point would wait for
/// the filesystem, which is not serving requests yet.)
pub(crate) fn raise_read_ahead(mountpoint: &std::path::Path, kb: u32) {
    let Ok(canon) = mountpoint.canonicalize() else { return };
    let target = canon.to_string_lossy().replace(' ', "\\040");
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let dev =
        info.lines().rev().filter(|l| l.split(' ').nth(4) == Some(target.as_str())).find_map(|l| l.split(' ').nth(2));
    if let Some(dev) = dev {
        let _ = std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), format!("{kb}\n"));
    }
}

/// SIGINT and SIGTERM unmount cleanly (the session then ends and `mount` returns).
pub(crate) fn unmount_on_signal(dir: &std::path::Path) {
    let dir = dir.to_path_buf();
    on_signal(move |sig| {
        note!("keepfs: signal {sig}: unmounting {}", dir.display());
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&dir).status();
    });
}

/// The session service a face (the mount, the NBD server) serves: overlays become
/// versions, or with `discard` meet the face's `discarded` fate.
/// Limits glibc's malloc to two arenas in a long-running face (mount, nbd). By default
/// each thread that allocates gets an arena of its own (up to 8 a core) and each keeps
/// the block buffers freed into it: reading a dense 4 GiB version through a mount grew
/// the process's own memory 46 bytes a block that way, against 8 with two arenas
/// (`contrib/bench/dense_index.py --mount`); the read took no longer (0.96x).
pub(crate) fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator; called before the face's
    // threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Raises the soft limit of open files to the hard one, for a command that holds one
/// spool file per version until all are checked (`metadata import` and `restore` of
/// many versions: the usual soft limit of 1024 is a repository of 1,024 versions). Past
/// the hard limit the command fails with "Too many open files" and records nothing.
pub(crate) fn more_open_files() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the plain struct given; a failure
    // leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// On SIGINT or SIGTERM the NBD server stops: no new clients, every connection ends, and
/// what each wrote becomes a version (as at a disconnect) before the process exits.
pub(crate) fn stop_on_signal(stopper: keepfs_nbd::Stopper) {
    on_signal(move |sig| {
        note!("keepfs: signal {sig}: stopping the NBD server");
        stopper.stop();
    });
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after it)
/// and runs `then` on a thread of its own when one arrives. Call it before any thread
/// exists.
pub(crate) fn on_signal(then: impl FnOnce(libc::c_int) + Send + 'static) {
    // SAFETY: signal mask calls on a zeroed, then filled sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits on the signals blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        then(sig);
    });
}

/// Starts the mount in a detached child and returns once it is mounted. The child's
/// messages go to `log` (it must not hold on to the caller's terminal or pipes).
pub(crate) fn mount_daemon(dir: &std::path::Path, log: &std::path::Path, modes: keepfs::perms::Modes) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| Error::io("cannot find the keepfs executable", e))?;
    let args: Vec<String> = mount_options::effective_args().into_iter().skip(1).filter(|a| a != "--daemon").collect();
    let mut cmd = std::process::Command::new(exe);
    // Made as every file of the home is (`file_mode`, owner-only by default).
    let logf = modes
        .options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("cannot open the mount log {}", log.display()), e))?;
    // A log an older keepfs made readable by others is narrowed to `file_mode` too: it
    // names versions, paths and errors. Only ever narrowed, never widened, and only a
    // regular file of this user's (not what a link leads to, /dev/null say); a failure
    // is a warning, the mount goes on.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if let Ok(m) = logf.metadata()
            && m.is_file()
            && m.uid() == me
            && m.permissions().mode() & 0o777 & !modes.file != 0
        {
            let narrowed = m.permissions().mode() & 0o777 & modes.file;
            if let Err(e) = logf.set_permissions(std::fs::Permissions::from_mode(narrowed)) {
                keepfs_face::log!("keepfs: warning: cannot narrow the mode of the mount log {}: {e}", log.display());
            }
        }
    }
    cmd.args(&args).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(logf);
    // SAFETY: setsid in the child before exec detaches it from the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    // Mounted is: a file system at `dir` that answers, and not the one there before (a
    // dead mount the child detaches first is listed, but answers ENOTCONN; a live one
    // makes the child fail).
    use std::os::unix::fs::MetadataExt;
    let dev = |d: &std::path::Path| std::fs::metadata(d).map(|m| m.dev()).ok();
    let before = dev(dir);
    let logged_before = std::fs::metadata(log).map(|m| m.len() as usize).unwrap_or(0);
    let mut child = cmd.spawn().map_err(|e| Error::io("cannot start the mount process", e))?;
    let t = Instant::now();
    while t.elapsed().as_secs() < 30 {
        if let Some(status) = child.try_wait().map_err(|e| Error::io("mount process", e))? {
            // Its own error line and exit code, as the foreground mount gives them (they
            // were only in the log, behind "exited (exit status: 4)").
            let said = std::fs::read(log).ok().and_then(|t| {
                let new = String::from_utf8_lossy(t.get(logged_before..)?).into_owned();
                new.lines().rev().find_map(|l| l.strip_prefix("keepfs: error: ").map(str::to_string))
            });
            if let (Some(reason), Some(code)) = (said, status.code().filter(|c| *c != 0)) {
                note!("keepfs: error: {reason}");
                return Ok(code);
            }
            return Err(Error::Other(format!(
                "the mount process exited ({status}) before mounting {}; see {}",
                dir.display(),
                log.display()
            )));
        }
        if is_mounted(dir) && dev(dir).is_some_and(|d| Some(d) != before) {
            note!("keepfs: mounted at {} (server pid {}, log {})", dir.display(), child.id(), log.display());
            report!("{}", child.id());
            return Ok(exit::OK);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(Error::Other(format!("{} was not mounted within 30 s", dir.display())))
}
