//! keepfs-face: the interface between the engine's write-session service and the faces
//! that serve it over a protocol (the FUSE filesystem, the NBD server).
//!
//! The rules that turn writes into versions live once, in the engine (`keepfs::session`):
//! one draft shared by every writer of a file, commit on the last writer's close, the
//! continuation for tools that close and reopen, `--discard-writes`, failed writes that
//! are never committed. A face only translates its protocol into these calls and their
//! `io::Error`s (each carrying the errno to answer) back. This crate holds no logic and
//! no dependencies, so that the engine depends on no face and a face on nothing heavier.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

/// One version as a face shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionEntry {
    /// `V0000000001`.
    pub uid: String,
    pub name: String,
    pub snapshot: String,
    pub date: SystemTime,
    /// The date as text (RFC 3339, UTC).
    pub date_text: String,
    pub size: u64,
    pub block_size: u32,
    /// `valid` or `invalid` (incomplete versions are not shown).
    pub status: String,
    pub protected: bool,
    pub labels: Vec<(String, String)>,
}

/// Bytes answered without copying them first: a slice of a shared block, or zeros.
pub enum ReadRef {
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>, Range<usize>),
    Zeros(usize),
}

/// A handle of the session service: a version open for reading, an overlay of a version
/// (copy-on-write), or a file being backed up (`incoming/`).
pub type Fh = u64;

/// Who opens or closes: a process for the filesystem, a connection for NBD. A draft is
/// committed when the last writer closes, and a close by the opener of a written handle
/// commits at once; an opener that reopens what it just committed continues it.
pub type Opener = u32;

/// What an open of a version's image gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: Fh,
    /// The handle reads through an overlay that may change under it (or that becomes a
    /// version): a face must not cache its bytes (FUSE: direct I/O).
    pub volatile: bool,
}

/// Where the bytes of an image lie, from an offset on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The image's size now.
    pub size: u64,
    /// The first range at or after the offset that may hold data; `None` when the rest
    /// is a hole (reads as zeros).
    pub data: Option<Range<u64>>,
}

/// The engine's write-session service, as a face uses it. Every call is safe from any
/// number of threads at once; none holds a lock of the service when it returns.
pub trait Sessions: Send + Sync + 'static {
    /// The versions to show (valid and invalid), oldest first; cached for a moment and
    /// refreshed at once after a commit through this service.
    fn versions(&self) -> io::Result<Arc<Vec<VersionEntry>>>;
    /// Bytes version `uid` holds in non-sparse blocks (what it occupies as a file).
    fn data_bytes(&self, uid: &str) -> io::Result<u64>;

    /// Opens version `uid`'s image. For reading: the live overlay if there is one, else
    /// the version (or, for an opener that committed an overlay of it a moment ago, the
    /// version that became). For writing: the live overlay, or a new one (or the
    /// continuation of the one this opener just committed).
    fn open_version(&self, uid: &str, writes: bool, opener: Opener) -> io::Result<Opened>;
    /// The size of version `uid`'s live overlay, if one is open.
    fn overlay_size(&self, uid: &str) -> Option<u64>;
    /// Changes the size of version `uid`'s live overlay (EPERM when none is open).
    fn resize_overlay(&self, uid: &str, size: u64) -> io::Result<()>;

    /// Starts a backup named `name` fed by writes; EEXIST when one is being written.
    fn create_incoming(&self, name: &str, writes: bool, opener: Opener) -> io::Result<Fh>;
    /// Opens the backup being written as `name` (or continues the one `opener` just
    /// committed under that name).
    fn open_incoming(&self, name: &str, writes: bool, opener: Opener) -> io::Result<Fh>;
    /// Whether `name` is being written (continuing it, as above, for its committer).
    fn incoming_exists(&self, name: &str, opener: Option<Opener>) -> bool;
    /// The size of the backup being written as `name`.
    fn incoming_size(&self, name: &str) -> Option<u64>;
    /// The names being written, sorted (continuations nobody wrote to are dropped).
    fn incoming_names(&self) -> Vec<String>;
    fn resize_incoming(&self, name: &str, size: u64) -> io::Result<()>;
    fn rename_incoming(&self, from: &str, to: &str) -> io::Result<()>;
    /// Discards the backup being written as `name` (EBUSY while it is open).
    fn remove_incoming(&self, name: &str) -> io::Result<()>;
    fn incoming_labels(&self, name: &str) -> io::Result<Vec<(String, String)>>;
    fn set_incoming_label(&self, name: &str, label: &str, value: &str) -> io::Result<()>;
    /// Returns whether the label existed.
    fn remove_incoming_label(&self, name: &str, label: &str) -> io::Result<bool>;
    fn incoming_snapshot(&self, name: &str) -> io::Result<String>;
    fn set_incoming_snapshot(&self, name: &str, snapshot: &str) -> io::Result<()>;

    /// Fills `buf` from `offset`; returns how many bytes were read (short only at the end).
    fn read(&self, fh: Fh, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The bytes at `offset` (at most `len`) without a copy, where the handle can give
    /// them so (a range inside one block of a version); `None` otherwise.
    fn read_ref(&self, fh: Fh, offset: u64, len: usize) -> io::Result<Option<ReadRef>>;
    /// Where the handle's data lies from `offset` on (SEEK_DATA/SEEK_HOLE, NBD block
    /// status): a version's sparse blocks are holes, and so are the blocks of a draft
    /// that nothing was written to and its base does not store. The end of a stretch of
    /// data is looked for up to byte `until` (a reader's range end; `u64::MAX` for
    /// SEEK_HOLE): past it the stretch may be cut short, so that asking about a range
    /// costs that range, not the rest of the image.
    fn extent(&self, fh: Fh, offset: u64, until: u64) -> io::Result<Extent>;
    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> io::Result<()>;
    /// A close by `opener` (close(2) on the filesystem): commits a written draft when
    /// `opener` opened the handle and is its last writer.
    fn flush(&self, fh: Fh, opener: Opener) -> io::Result<()>;
    /// The handle's last close: commits what its last writer wrote (or discards an
    /// overlay never written), then forgets the handle.
    fn release(&self, fh: Fh) -> io::Result<()>;
    /// Drops what only lives as long as the face: unwritten continuations, and overlays
    /// under `--discard-writes`.
    fn shutdown(&self);
}

/// A line on stderr (the log), ignoring a failure: `eprintln!` would panic a worker
/// thread when the log cannot be written, and a lost log line must not fail a request.
/// Shared by the session service and every face.
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}
