//! The `keepfs` command's one way to write to standard output and standard error (part of
//! the binary, not of the library). `println!` and `eprintln!` panic when a write fails
//! (a reader that went away, a full disk), so nothing in the command uses them:
//!
//! - [`out!`]: a line that is the command's result (a listing, a dry run, an export). It
//!   returns an error the command passes up with `?`. A reader that stopped reading
//!   (`keepfs ls | head -1`, EPIPE) ends the command quietly with exit 0; any other
//!   failed write (ENOSPC on /dev/full) is a one-line error, exit 1.
//! - [`report!`]: a line about work being done or done (the uid of a committed backup,
//!   the versions removed). Its failure stops nothing and changes no exit code: the work
//!   stands. When lines were lost for a reason other than a closed pipe, one warning on
//!   standard error says so and quotes the first lost line, or a JSON report whole on
//!   one line (so a backup's uid is never lost silently).
//! - [`note!`]: a message on standard error. When standard error itself cannot be
//!   written there is nowhere left to complain, so its errors are ignored.

use keepfs::error::Error;
use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// The context of the error a failed [`out!`] returns.
pub const STDOUT: &str = "cannot write to standard output";

/// The first [`report!`] line that could not be written, and why.
static LOST: Mutex<Option<(String, io::Error)>> = Mutex::new(None);

/// Writes a result line to standard output (see [`out!`]).
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::output::stdout_line(format_args!($($t)*)) };
}

/// Writes a line about work done to standard output (see [`report!`]).
macro_rules! report {
    ($($t:tt)*) => { $crate::cli::output::report_line(format_args!($($t)*)) };
}

/// Writes a message to standard error, ignoring failures (see [`note!`]).
macro_rules! note {
    ($($t:tt)*) => { $crate::cli::output::stderr_line(format_args!($($t)*)) };
}

fn write_line(w: &mut impl Write, args: fmt::Arguments) -> io::Result<()> {
    w.write_fmt(args)?;
    w.write_all(b"\n")?;
    w.flush()
}

pub fn stdout_line(args: fmt::Arguments) -> Result<(), Error> {
    write_line(&mut io::stdout().lock(), args).map_err(|e| Error::io(STDOUT, e))
}

pub fn report_line(args: fmt::Arguments) {
    if let Err(e) = write_line(&mut io::stdout().lock(), args) {
        let mut lost = LOST.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            *lost = Some((args.to_string(), e));
        }
    }
}

pub fn stderr_line(args: fmt::Arguments) {
    let _ = write_line(&mut io::stderr().lock(), args);
}

/// The error of a result line whose reader went away: not a failure of the command.
pub fn is_reader_gone(e: &Error) -> bool {
    matches!(e, Error::Io { context, source } if context == STDOUT && source.kind() == io::ErrorKind::BrokenPipe)
}

/// Whether `e` is a failed write to standard output (where an error cannot be reported).
pub fn is_stdout_error(e: &Error) -> bool {
    matches!(e, Error::Io { context, .. } if context == STDOUT)
}

/// Says, once, that report lines were lost (unless only because the reader left).
pub fn finish() {
    let lost = LOST.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((line, e)) = lost
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        // A report of several lines (pretty JSON) is quoted whole, on one line, so that
        // what it says (a backup's uid) is not lost with it; a long one is cut.
        let mut first: String = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) => v.to_string(),
            Err(_) => line.lines().next().unwrap_or_default().to_string(),
        };
        if let Some((cut, _)) = first.char_indices().nth(2000) {
            first.truncate(cut);
            first.push('…');
        }
        note!(
            "keepfs: warning: the work is done, but standard output could not be written ({e}); its first lost line: {first}"
        );
    }
}
