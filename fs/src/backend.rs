//! What the filesystem asks of the engine. The FUSE code never opens the database or a
//! storage: it talks to these traits, which the keepfs engine implements (and which keep
//! this crate free of the engine's dependencies). Errors are `io::Error`s carrying the
//! errno the filesystem should answer; the engine side logs the full message.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// One version as the filesystem shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionEntry {
    /// `V0000000001`.
    pub uid: String,
    pub name: String,
    pub snapshot: String,
    pub date: SystemTime,
    /// The date as shown in the `date` file (RFC 3339, UTC).
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
    Shared(Arc<dyn AsRef<[u8]> + Send + Sync>, std::ops::Range<usize>),
    Zeros(usize),
}

/// A version's image, open for reading.
pub trait ImageHandle: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; returns how many bytes were read (short only at the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The bytes at `offset` (at most `len`, short only at the end) without a copy, where
    /// the image can give them so (a range inside one block); `None` otherwise.
    fn read_ref(&self, _offset: u64, _len: usize) -> io::Result<Option<ReadRef>> {
        Ok(None)
    }
    /// The first range at or after `offset` that may hold data, `None` when the rest of
    /// the image is a hole. Answers SEEK_DATA/SEEK_HOLE, so that `cp`, `qemu-img` and a
    /// keepfs backup of a mounted image skip what the version holds as sparse. By default
    /// everything may be data.
    fn next_data(&self, offset: u64) -> Option<std::ops::Range<u64>> {
        (offset < self.size()).then(|| offset..self.size())
    }
}

/// A writable image that becomes a version when committed (an `incoming/` file, or a
/// copy-on-write overlay of a version's `data`).
pub trait DraftHandle: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn set_size(&mut self, size: u64) -> io::Result<()>;
    fn set_name(&mut self, name: &str) -> io::Result<()>;
    fn labels(&self) -> Vec<(String, String)>;
    fn set_label(&mut self, name: &str, value: &str) -> io::Result<()>;
    /// Returns whether the label existed.
    fn remove_label(&mut self, name: &str) -> bool;
    fn snapshot(&self) -> String;
    fn set_snapshot(&mut self, snapshot: &str) -> io::Result<()>;
    /// Makes the draft a valid version; returns its uid.
    fn commit(self: Box<Self>) -> io::Result<String>;
    /// Drops the draft and the incomplete version behind it.
    fn discard(self: Box<Self>) -> io::Result<()>;
}

pub trait Backend: Send + Sync + 'static {
    /// The versions to show (valid and invalid), oldest first.
    fn versions(&self) -> io::Result<Vec<VersionEntry>>;
    /// Opens a version for reading (it cannot be removed while open).
    fn open_image(&self, uid: &str) -> io::Result<Arc<dyn ImageHandle>>;
    /// Starts a backup named `name` fed by writes (`incoming/<name>`).
    fn new_incoming(&self, name: &str) -> io::Result<Box<dyn DraftHandle>>;
    /// Continues the incoming backup that has just become version `uid` (a tool that
    /// closes and reopens the file it is writing): a draft over it with its name, labels
    /// and snapshot name; committed, the new version replaces `uid`.
    fn continue_incoming(&self, uid: &str) -> io::Result<Box<dyn DraftHandle>>;
    /// Continues the copy-on-write overlay that has just become version `uid` (a tool
    /// such as fio writes, closes, and reopens `data` to verify): a draft over `uid`
    /// with its name and labels; committed, the new version replaces `uid`.
    fn continue_cow(&self, uid: &str) -> io::Result<Box<dyn DraftHandle>>;
    /// Bytes of version `uid` held by non-sparse blocks (what the file occupies).
    fn data_bytes(&self, uid: &str) -> io::Result<u64>;
    /// Starts a copy-on-write overlay of version `uid`; committed, it becomes a new
    /// version of the same name labelled `keepfs.cow-of=<uid>`.
    fn new_cow(&self, uid: &str) -> io::Result<Box<dyn DraftHandle>>;
}
