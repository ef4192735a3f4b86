//! The `keepfs` command (part of the binary, not of the library): its arguments (`args`),
//! what each command does (`commands`), where no repository exists (`absent`), the mount
//! point and server processes (`mount`), and everything it writes: lines (`output`, the
//! only writer of stdout and stderr), tables and JSON (`print`), progress (`progress`)
//! and the process title (`title`). Errors become one line on stderr and an exit code
//! (see `keepfs::error::exit`).

#[macro_use]
pub(crate) mod output;
pub(crate) mod absent;
pub(crate) mod args;
pub(crate) mod commands;
pub(crate) mod help;
pub(crate) mod mount;
pub(crate) mod mount_options;
pub(crate) mod print;
pub(crate) mod progress;
pub(crate) mod title;
