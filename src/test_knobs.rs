//! Test builds only: the `KEEPFS_TEST_*` environment variables through which tests
//! set stalls, windows and sizes, for faults and shapes no real part shows on demand
//! (a slow network, a process stopped between two steps, an index read in many
//! pieces). Release builds read no such variable.

use std::time::Duration;

/// The number `name` sets, in a test build; `None` in a release build or when unset.
pub(crate) fn number(name: &str) -> Option<u64> {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()) {
        return Some(n);
    }
    let _ = name;
    None
}

/// The duration `name` sets in milliseconds (see [`number`]).
pub(crate) fn millis(name: &str) -> Option<Duration> {
    number(name).map(Duration::from_millis)
}

/// Sleeps for as long as `name` says (see [`millis`]).
pub(crate) fn stall(name: &str) {
    if let Some(d) = millis(name) {
        std::thread::sleep(d);
    }
}

/// Stops this process (SIGSTOP) the first time it passes here with `name` set, for a
/// test to take it on from that state (it sees the process stopped in /proc, acts, and
/// sends SIGCONT): the moment between two steps that a race needs, without racing it.
/// Once per process, whatever the name: a test sets one such knob per process.
pub(crate) fn stop_here(name: &str) {
    #[cfg(debug_assertions)]
    {
        static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if std::env::var_os(name).is_some() && !STOPPED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: raise has no memory effects.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
    let _ = name;
}
