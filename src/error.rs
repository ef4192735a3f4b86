//! The engine's error type, and the one place where errors become exit codes.

use crate::block::ObjectError;
use crate::index::IndexError;
use crate::storage::StorageError;
use std::io;

/// Exit codes of the `keepfs` command (documented in README.md).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Something failed (I/O, storage, database); the message says what.
    pub const FAILURE: i32 = 1;
    /// The command line or its input is wrong (bad URL, unknown uid, malformed filter).
    pub const USAGE: i32 = 2;
    /// Damaged data was found (a restore wrote zeros for unreadable blocks, a scrub failed).
    pub const DATA_DAMAGED: i32 = 3;
    /// keepfs refused to act (would overwrite, protected, too young, in use) without --force.
    pub const REFUSED: i32 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from the user: a URL, a name, a filter, a block size.
    #[error("{0}")]
    Invalid(String),
    #[error("version {0} does not exist (`keepfs ls` lists the versions)")]
    VersionNotFound(String),
    /// A policy said no; the message says how to override it.
    #[error("{0}")]
    Refused(String),
    /// The storage belongs to another catalog (see `owner`): this one may read it, not
    /// write to it.
    #[error("{0}")]
    NotOwner(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("metadata database: {0}{hint}", hint = damaged_database_hint(.0))]
    Database(#[from] rusqlite::Error),
    /// The PostgreSQL catalog failed (connection lost or refused, a statement failed).
    #[error("catalog: {0}")]
    Catalog(String),
    #[error("{context}: {source}")]
    Object {
        context: String,
        #[source]
        source: ObjectError,
    },
    #[error("{context}: {source}")]
    Index {
        context: String,
        #[source]
        source: IndexError,
    },
    #[error(transparent)]
    Rbd(#[from] crate::rbd::RbdError),
    #[error("configuration: {0}")]
    Config(String),
    /// The key given does not open a storage's keyring, or is one it was rotated away
    /// from; the message says which key it needs.
    #[error("{0}")]
    Key(String),
    /// The work finished but found damaged data; the message lists what.
    #[error("{0}")]
    Damaged(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid(_) | Error::VersionNotFound(_) | Error::Config(_) | Error::Key(_) => exit::USAGE,
            Error::Storage(StorageError::Misconfigured { .. }) => exit::USAGE,
            Error::Refused(_) | Error::NotOwner(_) => exit::REFUSED,
            Error::Damaged(_) => exit::DATA_DAMAGED,
            Error::Database(e) if database_damaged(e) => exit::DATA_DAMAGED,
            Error::Rbd(e) => {
                use crate::rbd::RbdErrorKind as K;
                match e.kind {
                    K::NotFound | K::Config | K::Invalid | K::Unsupported => exit::USAGE,
                    K::Exists => exit::REFUSED,
                    K::Failed => exit::FAILURE,
                }
            }
            _ => exit::FAILURE,
        }
    }

    /// The errno a filesystem (or any other face) answers for this error: the one place
    /// where engine errors become errno values. A full disk or an exceeded quota anywhere
    /// in the chain of causes (the spool, the storage, the database) stays ENOSPC or
    /// EDQUOT, so `cp` says "No space left on device", not "Input/output error".
    pub fn errno(&self) -> i32 {
        match self {
            Error::VersionNotFound(_) => libc::ENOENT,
            Error::Invalid(_) | Error::Config(_) => libc::EINVAL,
            Error::Refused(_) => libc::EBUSY,
            // Read-only to this catalog: "busy" would say to try again.
            Error::NotOwner(_) => libc::EROFS,
            // The server lacks the key: no client request is wrong (not EINVAL).
            Error::Key(_) => libc::EACCES,
            _ => space_errno(self).unwrap_or(libc::EIO),
        }
    }
}

/// ENOSPC or EDQUOT when `e` or any of its causes is a full disk or an exceeded quota
/// (EFBIG for an image larger than a version may be).
fn space_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            match (io.raw_os_error(), io.kind()) {
                (Some(n @ (libc::ENOSPC | libc::EDQUOT | libc::EFBIG)), _) => return Some(n),
                (_, io::ErrorKind::StorageFull) => return Some(libc::ENOSPC),
                (_, io::ErrorKind::QuotaExceeded) => return Some(libc::EDQUOT),
                _ => {}
            }
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = c.downcast_ref::<rusqlite::Error>()
            && f.code == rusqlite::ErrorCode::DiskFull
        {
            return Some(libc::ENOSPC);
        }
        cause = c.source();
    }
    None
}

/// Whether SQLite says the database file itself is damaged (overwritten pages, not a
/// database at all).
pub fn database_damaged(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// What to do about a damaged database file, for its error line.
fn damaged_database_hint(e: &rusqlite::Error) -> &'static str {
    if database_damaged(e) {
        " (the database file is damaged: `keepfs database rebuild --replace-damaged` moves it aside, keeping it, and rebuilds it from the storage)"
    } else {
        ""
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
