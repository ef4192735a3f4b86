//! The safety net of sources read through mappings. A file truncated while it is mapped
//! raises SIGBUS at the next access past its new end; the bytes are gone and the thread
//! cannot go on. The handler says so in one line and exits with [`exit::FAILURE`]: the
//! version being written stays `incomplete` (the database only ever sees whole
//! transactions), so nothing half-read looks valid.
//!
//! The mapping code owns it: the first mapping a process makes installs the handler, so
//! every user of the library (the CLI, a mount, tests) has it. Only faults inside a live
//! source mapping are handled; any other SIGBUS goes to the handler that was there before
//! (Rust's own, or the default action).

use crate::error::exit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings tracked by address; a mapping beyond these is "untracked" and makes every
/// SIGBUS count as a source's while it lives.
const SLOTS: usize = 256;
static USED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static UNTRACKED: AtomicUsize = AtomicUsize::new(0);
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

const MESSAGE: &[u8] =
    b"keepfs: error: the source shrank or failed while being read (SIGBUS on its mapping); the version is left incomplete\n";

/// A live source mapping, known to the handler until [`unregister`].
pub struct Registration(Option<usize>);

/// Installs the handler (once per process) and records `len` bytes at `start` as a
/// source mapping. Call before the mapping is first read.
pub fn register(start: *const u8, len: usize) -> Registration {
    install();
    for i in 0..SLOTS {
        if USED[i].compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            LENS[i].store(len, Ordering::Release);
            STARTS[i].store(start as usize, Ordering::Release);
            return Registration(Some(i));
        }
    }
    UNTRACKED.fetch_add(1, Ordering::AcqRel);
    Registration(None)
}

/// Forgets a mapping; call before it is unmapped.
pub fn unregister(r: Registration) {
    match r.0 {
        Some(i) => {
            STARTS[i].store(0, Ordering::Release);
            USED[i].store(false, Ordering::Release);
        }
        None => {
            UNTRACKED.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in here; the handler only calls
        // async-signal-safe functions (atomics, write, sigaction, raise, _exit).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                let _ = PREVIOUS.set(previous);
            }
        }
    });
}

fn in_a_source_mapping(addr: usize) -> bool {
    if UNTRACKED.load(Ordering::Acquire) > 0 {
        return true;
    }
    (0..SLOTS).any(|i| {
        let start = STARTS[i].load(Ordering::Acquire);
        start != 0 && addr >= start && addr - start < LENS[i].load(Ordering::Acquire)
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    if code > 0 && in_a_source_mapping(addr) {
        // Several threads may fault at once: only the first one says so.
        static SAID: AtomicBool = AtomicBool::new(false);
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            if !SAID.swap(true, Ordering::SeqCst) {
                libc::write(2, MESSAGE.as_ptr() as *const libc::c_void, MESSAGE.len());
            }
            libc::_exit(exit::FAILURE);
        }
    }
    // Not a source's: give the signal to the handler from before. Returning repeats the
    // faulting access, which raises it again; a signal sent by a process is raised again.
    // SAFETY: sigaction(2) and raise(3) are async-signal-safe.
    unsafe {
        match PREVIOUS.get() {
            Some(previous) => libc::sigaction(sig, previous, std::ptr::null_mut()),
            None => libc::signal(sig, libc::SIG_DFL) as libc::c_int,
        };
        if code <= 0 {
            libc::raise(sig);
        }
    }
}
