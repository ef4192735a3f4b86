//! The process title (part of the binary): what `ps axfu` shows for a running keepfs, as
//! backy2 did: `keepfs [backing up vm1 43% 850 MB/s ETA 2m]`.
//!
//! `ps` shows a process's arguments, which the kernel reads from the process's own memory
//! (the argv strings on its initial stack), so the title is written there, the way
//! setproctitle(3) does it. Done right, that means:
//!
//! - [`init`] runs first in `main`, before any thread exists: it finds the argv area and
//!   the environment strings after it (`/proc/self/stat` fields 48-51), moves the
//!   environment strings to the heap (repointing `environ`, so `getenv` keeps working)
//!   and keeps a copy of the original arguments. The title may then use both areas.
//! - [`set`] writes the title, NUL-padded. When it runs past the argv area the kernel
//!   reads on into the old environment area (it does so when the last byte of argv is
//!   not NUL); the area's last byte always stays NUL.
//! - [`reset`] puts the original arguments back (the title of an idle process, and what
//!   `std::env::args` reads, since it reads the same memory).
//!
//! The thread name (`/proc/self/comm`, what `top` and `ps -o comm` show, 15 bytes) is
//! set as well. No crate does this whole job (the `proctitle` crate sets only the thread
//! name, which `ps axfu` does not show). Where anything looks unusual (no /proc, areas not
//! adjacent) the title is left alone and only the thread name changes.

use std::sync::Mutex;

struct Area {
    /// Start of the argv strings.
    start: usize,
    /// One past the last byte the title may use.
    end: usize,
    /// The original argv bytes (NULs included).
    original: Vec<u8>,
}

static AREA: Mutex<Option<Area>> = Mutex::new(None);

/// Fields 48 to 51 of /proc/self/stat: arg_start, arg_end, env_start, env_end.
fn stat_areas() -> Option<[usize; 4]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The second field (the command name) may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let get = |n: usize| fields.get(n - 3)?.parse::<usize>().ok();
    Some([get(48)?, get(49)?, get(50)?, get(51)?])
}

/// Prepares the argv area for titles. Call it first in `main`, before any thread starts
/// (it rewrites `environ`).
pub fn init() {
    let Some([arg_start, arg_end, env_start, env_end]) = stat_areas() else { return };
    if arg_start == 0 || arg_end <= arg_start || arg_end - arg_start > 1 << 20 {
        return;
    }
    // SAFETY: [arg_start, arg_end) is this process's argv area, as the kernel reports it.
    let original = unsafe { std::slice::from_raw_parts(arg_start as *const u8, arg_end - arg_start) }.to_vec();
    let mut end = arg_end;
    // The environment strings follow the arguments directly: copy them to the heap and
    // repoint environ at the copies, so that the title may grow over the old ones.
    if env_start == arg_end
        && env_end > env_start
        && env_end - env_start <= 1 << 20
        && relocate_environ(env_start, env_end)
    {
        end = env_end;
    }
    *AREA.lock().unwrap_or_else(|p| p.into_inner()) = Some(Area { start: arg_start, end, original });
}

/// Moves every environment string inside [start, end) to the heap. False (nothing
/// changed) when an entry points elsewhere already (someone called setenv).
fn relocate_environ(start: usize, end: usize) -> bool {
    unsafe extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    // SAFETY: reads and rewrites the environ array while no other thread exists (see
    // `init`); each string is NUL-terminated; the copies are leaked on purpose (they
    // live as long as the process, as the originals did).
    unsafe {
        let env = environ;
        if env.is_null() {
            return false;
        }
        let mut n = 0;
        while !(*env.add(n)).is_null() {
            let p = *env.add(n) as usize;
            if p < start || p >= end {
                return false;
            }
            n += 1;
        }
        for i in 0..n {
            let s = std::ffi::CStr::from_ptr(*env.add(i));
            *env.add(i) = s.to_owned().into_raw();
        }
    }
    true
}

/// Shows `text` as the process's arguments (and the first 15 bytes as its thread name).
pub fn set(text: &str) {
    set_comm(text);
    let guard = AREA.lock().unwrap_or_else(|p| p.into_inner());
    let Some(area) = guard.as_ref() else { return };
    let room = area.end - area.start;
    let mut bytes = vec![0u8; room];
    // Keep the last byte NUL; cut at a character boundary.
    let mut n = text.len().min(room - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    bytes[..n].copy_from_slice(&text.as_bytes()[..n]);
    // SAFETY: the area belongs to this process and nothing else points into it any
    // more (environ was moved; std's argv is only read at startup and after `reset`).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), area.start as *mut u8, room) };
}

/// Puts the original arguments back.
pub fn reset() {
    set_comm("keepfs");
    let guard = AREA.lock().unwrap_or_else(|p| p.into_inner());
    let Some(area) = guard.as_ref() else { return };
    let room = area.end - area.start;
    let mut bytes = vec![0u8; room];
    bytes[..area.original.len()].copy_from_slice(&area.original);
    // SAFETY: as in `set`.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), area.start as *mut u8, room) };
}

fn set_comm(text: &str) {
    let mut name = [0u8; 16];
    let b = text.as_bytes();
    let n = b.len().min(15);
    name[..n].copy_from_slice(&b[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

/// `backing up vm1 43% 850 MB/s ETA 2m`'s rate and time: a short human duration.
pub fn eta(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs.div_ceil(60)),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The title of a long operation: `keepfs [LABEL PCT% RATE MB/s ETA T]`.
pub fn progress_title(label: &str, done: u64, total: u64, secs: f64) -> String {
    let pct = done.saturating_mul(100) / total.max(1);
    if done == 0 || secs <= 0.0 {
        return format!("keepfs [{label} {pct}%]");
    }
    let rate = done as f64 / secs;
    let left = (total.saturating_sub(done) as f64 / rate).ceil() as u64;
    format!("keepfs [{label} {pct}% {:.0} MB/s ETA {}]", rate / 1e6, eta(left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_read_like_backy2s() {
        assert_eq!(progress_title("backing up vm1", 0, 100, 0.0), "keepfs [backing up vm1 0%]");
        assert_eq!(
            progress_title("backing up vm1", 430_000_000, 1_000_000_000, 0.5),
            "keepfs [backing up vm1 43% 860 MB/s ETA 1s]"
        );
        assert_eq!(eta(119), "2m");
        assert_eq!(eta(3700), "1h1m");
    }
}
