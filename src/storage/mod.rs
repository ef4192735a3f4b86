//! Where objects live. A storage is a small trait (put / get / exists / delete / list /
//! sync) over string keys, so that file, null and S3 storages and decorators (fault
//! injection in tests, a local read cache, a bandwidth limit) are interchangeable.

/// Writes the named [`Storage`] methods of a decorator as calls of the same method on
/// `self.inner`, so that each decorator spells out only what it changes, and none falls
/// back by omission on a default that is wrong for it (`delete_many`, `replace_prefix`).
macro_rules! pass_to_inner {
    (@ name) => {
        fn name(&self) -> &str {
            self.inner.name()
        }
    };
    (@ put) => {
        fn put(&self, key: &str, data: &[u8]) -> $crate::storage::StorageResult<()> {
            self.inner.put(key, data)
        }
    };
    (@ put_new) => {
        fn put_new(&self, key: &str, data: &[u8]) -> $crate::storage::StorageResult<bool> {
            self.inner.put_new(key, data)
        }
    };
    (@ put_large) => {
        fn put_large(&self, key: &str, object: &$crate::storage::LargeObject<'_>) -> $crate::storage::StorageResult<()> {
            self.inner.put_large(key, object)
        }
    };
    (@ get_range) => {
        fn get_range(&self, key: &str, offset: u64, len: u64) -> $crate::storage::StorageResult<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
    };
    (@ get) => {
        fn get(&self, key: &str) -> $crate::storage::StorageResult<Vec<u8>> {
            self.inner.get(key)
        }
    };
    (@ get_fresh) => {
        fn get_fresh(&self, key: &str) -> $crate::storage::StorageResult<Vec<u8>> {
            self.inner.get_fresh(key)
        }
    };
    (@ exists) => {
        fn exists(&self, key: &str) -> $crate::storage::StorageResult<bool> {
            self.inner.exists(key)
        }
    };
    (@ delete) => {
        fn delete(&self, key: &str) -> $crate::storage::StorageResult<()> {
            self.inner.delete(key)
        }
    };
    (@ delete_many) => {
        fn delete_many(
            &self,
            keys: &[String],
            by: Option<$crate::storage::Deadline>,
        ) -> $crate::storage::StorageResult<()> {
            self.inner.delete_many(keys, by)
        }
    };
    (@ list_each) => {
        fn list_each(
            &self,
            prefix: &str,
            each: &mut dyn FnMut($crate::storage::ListEntry) -> std::ops::ControlFlow<()>,
        ) -> $crate::storage::StorageResult<()> {
            self.inner.list_each(prefix, each)
        }
    };
    (@ sync) => {
        fn sync(&self) -> $crate::storage::StorageResult<()> {
            self.inner.sync()
        }
    };
    (@ purge_temporary) => {
        fn purge_temporary(&self, older_than: std::time::SystemTime) -> $crate::storage::StorageResult<u64> {
            self.inner.purge_temporary(older_than)
        }
    };
    (@ codec) => {
        fn codec(&self) -> &$crate::transform::Codec {
            self.inner.codec()
        }
    };
    (@ replace_prefix) => {
        fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> $crate::storage::StorageResult<()> {
            self.inner.replace_prefix(key, object, prefix)
        }
    };
    ($($method:ident),* $(,)?) => {
        $($crate::storage::pass_to_inner!(@ $method);)*
    };
}
pub(crate) use pass_to_inner;

pub mod disk_cache;
pub mod fault;
pub mod file;
pub mod null;
pub mod s3;
pub mod sealed;
pub mod throttle;

use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::SystemTime;

/// Errors of one storage. Messages name the storage and the key.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} is missing from storage '{storage}'")]
    NotFound { storage: String, key: String },
    #[error("storage '{storage}': cannot {op} {key}: {source}")]
    Io {
        storage: String,
        op: &'static str,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("storage '{storage}' discards data (kind null); it has nothing to read back")]
    Discarding { storage: String },
    /// The server's answer says the storage's configuration is wrong: credentials it
    /// refuses, a bucket it does not have, or no S3 service at the endpoint. Final, and
    /// the user's to fix (exit 2, as a wrong database password is).
    #[error("storage '{storage}': cannot {op} {key}: {message}")]
    Misconfigured { storage: String, op: &'static str, key: String, message: String },
    #[error("storage '{storage}': injected fault on {op} {key}")]
    Injected { storage: String, op: &'static str, key: String },
}

impl StorageError {
    /// Whether retrying the same call may succeed (a timeout, a dropped connection, an
    /// injected fault). A missing object or a discarding storage is final.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::NotFound { .. } | StorageError::Discarding { .. } | StorageError::Misconfigured { .. } => {
                false
            }
            StorageError::Injected { .. } => true,
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
        }
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// One object found by [`Storage::list`].
#[derive(Clone, Debug)]
pub struct ListEntry {
    pub key: String,
    pub size: u64,
    /// When the object was last written; cleanup never sweeps an unknown object younger
    /// than its cutoff.
    pub modified: SystemTime,
}

/// One piece of a [`LargeObject`]: bytes in memory, or `len` bytes of a file from
/// `offset`.
pub enum Piece<'a> {
    Bytes(&'a [u8]),
    File { file: &'a std::fs::File, offset: u64, len: u64 },
}

/// An object handed over as pieces (a version object with a large block index, whose
/// index is in a file): read again for each attempt, never held whole by a storage
/// that can stream it.
pub struct LargeObject<'a> {
    pub pieces: Vec<Piece<'a>>,
}

impl LargeObject<'_> {
    pub fn len(&self) -> u64 {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len() as u64,
                Piece::File { len, .. } => *len,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the whole object that owns what it reads (an HTTP body outlives the
    /// borrow): the small pieces are copied, the files opened again.
    pub fn reader(&self) -> io::Result<PiecesReader> {
        let mut parts = std::collections::VecDeque::new();
        for p in &self.pieces {
            parts.push_back(match p {
                Piece::Bytes(b) => OwnedPiece::Bytes(b.to_vec(), 0),
                Piece::File { file, offset, len } => OwnedPiece::File(file.try_clone()?, *offset, offset + len),
            });
        }
        Ok(PiecesReader { parts })
    }

    /// The whole object in memory: what a storage that cannot stream does.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        io::Read::read_to_end(&mut self.reader()?, &mut out)?;
        Ok(out)
    }
}

enum OwnedPiece {
    Bytes(Vec<u8>, usize),
    File(std::fs::File, u64, u64),
}

/// Reads a [`LargeObject`] from its start (see [`LargeObject::reader`]).
pub struct PiecesReader {
    parts: std::collections::VecDeque<OwnedPiece>,
}

impl io::Read for PiecesReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        while let Some(part) = self.parts.front_mut() {
            let n = match part {
                OwnedPiece::Bytes(b, at) => {
                    let n = (b.len() - *at).min(buf.len());
                    buf[..n].copy_from_slice(&b[*at..*at + n]);
                    *at += n;
                    n
                }
                OwnedPiece::File(f, at, end) => {
                    let want = (*end - *at).min(buf.len() as u64) as usize;
                    if want == 0 {
                        0
                    } else {
                        let n = f.read_at(&mut buf[..want], *at)?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "a file of the object was cut short",
                            ));
                        }
                        *at += n as u64;
                        n
                    }
                }
            };
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            self.parts.pop_front();
        }
        Ok(0)
    }
}

pub trait Storage: Send + Sync {
    /// The configured name of this storage.
    fn name(&self) -> &str;
    /// Stores `data` under `key`, replacing any object there. An object never appears
    /// half-written under its final key.
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()>;
    /// Writes `key` only where nothing is there yet: false when something was. Atomic
    /// where the storage can make it so (a file storage's link, S3's `If-None-Match`);
    /// here a check, then a put.
    fn put_new(&self, key: &str, data: &[u8]) -> StorageResult<bool> {
        if self.exists(key)? {
            return Ok(false);
        }
        self.put(key, data)?;
        Ok(true)
    }
    /// Stores an object given in pieces, as `put` does. The default reads it whole into
    /// memory and puts it; the file, S3 and null storages stream it.
    fn put_large(&self, key: &str, object: &LargeObject<'_>) -> StorageResult<()> {
        let data = object.to_vec().map_err(|source| StorageError::Io {
            storage: self.name().to_string(),
            op: "read the pieces of",
            key: key.to_string(),
            source,
        })?;
        self.put(key, &data)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>>;
    /// Like `get`, but from the storage itself, past any local cache: what a deep-scrub
    /// verifies, and the second try when a cached copy does not decode. Decorators must
    /// pass it through (no default, so that none can forget).
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>>;
    /// Up to `len` bytes of an object from `offset`, from the storage itself (past any
    /// cache): fewer at its end, none past it. What checks a large version object as a
    /// stream. The default reads the whole object; file and S3 storages read the range.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        let all = self.get_fresh(key)?;
        let start = offset.min(all.len() as u64) as usize;
        let end = offset.saturating_add(len).min(all.len() as u64) as usize;
        Ok(all[start..end].to_vec())
    }
    fn exists(&self, key: &str) -> StorageResult<bool>;
    /// Deletes `key`; deleting a missing object is not an error.
    fn delete(&self, key: &str) -> StorageResult<()>;
    /// Hands every object whose key starts with `prefix` to `each`, in no particular
    /// order, as the listing goes: what walks a storage of millions of objects without
    /// holding their names (cleanup). The listing stops early when `each` breaks (no
    /// more requests are made): what a caller that failed does instead of listing on.
    fn list_each(&self, prefix: &str, each: &mut dyn FnMut(ListEntry) -> ControlFlow<()>) -> StorageResult<()>;
    /// Every object whose key starts with `prefix`, by key.
    fn list(&self, prefix: &str) -> StorageResult<Vec<ListEntry>> {
        let mut out = Vec::new();
        self.list_each(prefix, &mut |e| {
            out.push(e);
            ControlFlow::Continue(())
        })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
    /// Makes every `put` that has returned durable (directory fsyncs for a file storage).
    /// A version is committed only after this returns.
    fn sync(&self) -> StorageResult<()>;
    /// Removes leftovers of interrupted writes older than `older_than`.
    fn purge_temporary(&self, _older_than: SystemTime) -> StorageResult<u64> {
        Ok(0)
    }
    /// Deletes several objects (missing ones are not an error). The default deletes one
    /// by one; S3 sends batches of up to 1000 keys. With `by`, no request is started
    /// after it, and none is waited for past it (see [`Deadline`]).
    fn delete_many(&self, keys: &[String], by: Option<Deadline>) -> StorageResult<()> {
        for k in keys {
            if by.is_some_and(|d| d.left().is_none()) {
                return Err(Deadline::passed(self.name(), "delete", k, ""));
            }
            self.delete(k)?;
        }
        Ok(())
    }
    /// How this storage's objects are named and encoded. A storage is opened plain; the
    /// repository wraps an encrypted one in [`sealed::SealedStorage`], and decorators
    /// must pass this through (no default, so that none can forget).
    fn codec(&self) -> &crate::transform::Codec;
    /// Replaces the first `prefix.len()` bytes of an object (a rewrapped header, for key
    /// rotation) without changing its length. `object` is the object as the caller just
    /// read it: the default writes it back whole with the new prefix (no second read); a
    /// storage that can replace part of an object in place ignores it.
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        if object.len() < prefix.len() {
            return Err(StorageError::Io {
                storage: self.name().to_string(),
                op: "rewrite",
                key: key.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, "object shorter than its new header"),
            });
        }
        let mut data = object.to_vec();
        data[..prefix.len()].copy_from_slice(prefix);
        self.put(key, &data)
    }
}

pub type SharedStorage = Arc<dyn Storage>;

/// A moment by which storage requests must be over: a cleanup's deletes may not land
/// after other hosts could take the cleanup for dead. Measured on the clock that counts
/// a suspended machine's sleep too (`CLOCK_BOOTTIME`), so that a machine that slept
/// through its deadline does not send its request on waking.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(std::time::Duration);

impl Deadline {
    /// `d` from now.
    pub fn after(d: std::time::Duration) -> Deadline {
        Deadline(boot_time() + d)
    }

    /// The time left, or none once it has passed.
    pub fn left(&self) -> Option<std::time::Duration> {
        Some(self.0.saturating_sub(boot_time())).filter(|d| !d.is_zero())
    }

    /// The error of a request given up at its deadline (final, not retried); `last` is
    /// what went wrong with the attempt before, if one was made.
    pub fn passed(storage: &str, op: &'static str, key: &str, last: &str) -> StorageError {
        let mut msg = "gave up when its time ran out (so that no request outlasts it)".to_string();
        if !last.is_empty() {
            msg.push_str(&format!("; the last attempt: {last}"));
        }
        StorageError::Io { storage: storage.to_string(), op, key: key.to_string(), source: io::Error::other(msg) }
    }
}

/// Time since boot, suspended time included.
fn boot_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_BOOTTIME always exists
    // on Linux, and on failure `ts` stays zero (a deadline then never passes early).
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// How many times a storage request is tried before its failure is final (see [`retry`]).
pub const STORAGE_ATTEMPTS: u32 = 4;

/// Calls `f` until it succeeds, fails for good, or `attempts` transient failures have
/// happened, sleeping a little longer after each.
pub fn retry<T>(attempts: u32, mut f: impl FnMut() -> StorageResult<T>) -> StorageResult<T> {
    let mut delay = std::time::Duration::from_millis(50);
    let mut n = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && n < attempts => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
                n += 1;
            }
            other => return other,
        }
    }
}
