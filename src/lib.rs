//! keepfs: block-level, deduplicating backup of disk images and block devices.
//!
//! The engine is this library; the `keepfs` command is a thin face over
//! [`repo::Repository`], and the FUSE filesystem (crate keepfs-fs) a thin face over the
//! write-session service ([`session::SessionService`]), through the small interface of
//! crate keepfs-face. The engine depends on no face.

pub mod backup;
pub mod bench;
pub mod block;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod delta;
pub mod diff;
pub mod error;
pub mod filter;
pub mod gc;
pub mod hints;
pub mod index;
pub mod ingest;
pub mod keys;
pub mod metadata;
pub mod metrics;
pub mod named_file;
pub mod owner;
pub mod perms;
pub mod progress;
pub mod rbd;
pub mod record;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod scrub;
pub mod session;
pub mod slice;
pub mod source;
pub mod storage;
mod test_knobs;
pub mod transform;
pub mod units;
pub mod usage;
pub mod version;
pub mod version_object;

pub use error::{Error, Result};
pub use repo::Repository;
