//! Random-access reading of a version's image, for the FUSE filesystem (and NBD later):
//! blocks come from the shared [`BlockCache`]; zero blocks never touch the storage; a
//! reader that goes sequentially gets the next blocks fetched in parallel ahead of it.

use crate::block::BlockId;
use crate::cache::{BlockCache, BlockData};
use crate::error::{Error, Result};
use crate::index::MappedIndex;
use crate::repo::{Repository, SessionGuard};
use crate::storage::SharedStorage;
use crate::version::{Version, VersionUid};
use crossbeam_channel::{Sender, unbounded};
use parking_lot::Mutex;
use std::sync::Arc;

/// Fetches blocks into the cache in the background.
pub struct Prefetcher {
    tx: Sender<(SharedStorage, BlockId)>,
    /// Blocks asked for so far (for tests and statistics).
    requested: std::sync::atomic::AtomicU64,
}

impl Prefetcher {
    pub fn start(cache: Arc<BlockCache>, threads: usize) -> Prefetcher {
        let (tx, rx) = unbounded::<(SharedStorage, BlockId)>();
        for _ in 0..threads.max(1) {
            let (rx, cache) = (rx.clone(), cache.clone());
            std::thread::spawn(move || {
                for (storage, id) in rx {
                    if cache.peek(&storage, &id).is_none() {
                        let _ = cache.get(&storage, &id);
                    }
                }
            });
        }
        Prefetcher { tx, requested: Default::default() }
    }

    /// How many blocks readers have asked to be fetched ahead of them.
    pub fn requested(&self) -> u64 {
        self.requested.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An open version image. Holds a session that locks the version against removal.
pub struct Image {
    pub version: Version,
    index: MappedIndex,
    storage: SharedStorage,
    cache: Arc<BlockCache>,
    prefetch: Option<Arc<Prefetcher>>,
    /// The stream a sequential reader is on, for read-ahead.
    cursor: Mutex<Cursor>,
    _session: SessionGuard,
}

/// How many blocks ahead a sequential reader is served.
const READ_AHEAD_BLOCKS: u64 = 16;

impl Image {
    pub fn size(&self) -> u64 {
        self.index.size
    }

    pub fn block_size(&self) -> u32 {
        self.index.block_size
    }

    pub fn index(&self) -> &MappedIndex {
        &self.index
    }

    pub fn storage(&self) -> &SharedStorage {
        &self.storage
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// The plaintext of block `idx` (`None` for a sparse block).
    pub fn block(&self, idx: usize) -> Result<Option<BlockData>> {
        let id = self.index.get(idx as u64);
        if id.is_sparse() {
            return Ok(None);
        }
        self.cache.get(&self.storage, &id).map(Some).map_err(|e| match e {
            crate::cache::FetchError::Damaged(m) => {
                Error::Damaged(format!("version {} block {idx}: {m}", self.version.uid))
            }
            crate::cache::FetchError::Unavailable(m) => {
                Error::Other(format!("version {} block {idx}: {m}", self.version.uid))
            }
        })
    }

    /// Fills `buf` from `offset`; returns the bytes read (short only at the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = self.index.size;
        if offset >= size {
            return Ok(0);
        }
        let len = buf.len().min((size - offset) as usize);
        let bs = self.index.block_size as u64;
        self.read_ahead(offset, len as u64);
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = (pos / bs) as usize;
            let within = (pos % bs) as usize;
            let n = (bs as usize - within).min(len - done);
            match self.block(idx)? {
                None => buf[done..done + n].fill(0),
                Some(data) => {
                    let avail = data.len().saturating_sub(within).min(n);
                    buf[done..done + avail].copy_from_slice(&data[within..within + avail]);
                    buf[done + avail..done + n].fill(0);
                }
            }
            done += n;
        }
        Ok(len)
    }

    /// The bytes at `offset` (at most `len`) when they lie inside one block: a range of
    /// the cached block, or a count of zeros. `None` when the range spans blocks.
    pub fn read_ref(&self, offset: u64, len: usize) -> Result<Option<(Option<BlockData>, std::ops::Range<usize>)>> {
        let size = self.index.size;
        if offset >= size {
            return Ok(Some((None, 0..0)));
        }
        let len = len.min((size - offset) as usize);
        let bs = self.index.block_size as u64;
        let idx = (offset / bs) as usize;
        let within = (offset % bs) as usize;
        if within + len > bs as usize {
            return Ok(None);
        }
        self.read_ahead(offset, len as u64);
        match self.block(idx)? {
            None => Ok(Some((None, 0..len))),
            Some(data) if data.len() >= within + len => Ok(Some((Some(data), within..within + len))),
            Some(_) => Ok(None),
        }
    }

    /// Fetches blocks ahead of a reader that streams, the way the kernel reads ahead:
    /// only after it has read a block's worth in order (a VM's scattered small reads
    /// never trigger it, so they do not churn the block cache), and then further ahead
    /// the longer the stream goes on (up to [`READ_AHEAD_BLOCKS`]). Requests that a
    /// client serves in parallel arrive a little out of order: a read within
    /// [`STREAM_SLACK`] of where the stream stands still continues it.
    fn read_ahead(&self, offset: u64, len: u64) {
        let Some(p) = &self.prefetch else { return };
        let bs = self.index.block_size as u64;
        let mut c = self.cursor.lock();
        let in_stream = offset + STREAM_SLACK >= c.end && offset <= c.end + STREAM_SLACK;
        if !in_stream {
            *c = Cursor { end: offset + len, streamed: len, ahead: 0 };
            return;
        }
        c.end = c.end.max(offset + len);
        c.streamed += len;
        let window = (c.streamed / bs).min(READ_AHEAD_BLOCKS);
        if window == 0 {
            return;
        }
        let next = c.end.div_ceil(bs);
        let last = (next + window).min(self.index.len());
        for (_, id) in self.index.data_in(next.max(c.ahead)..last) {
            p.requested.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = p.tx.send((self.storage.clone(), id));
        }
        c.ahead = c.ahead.max(last);
    }
}

/// Where a reader's stream stands (see [`Image::read_ahead`]).
#[derive(Default)]
struct Cursor {
    /// The end of the furthest read of the stream.
    end: u64,
    /// Bytes read in the stream so far.
    streamed: u64,
    /// Blocks before this one have been asked for.
    ahead: u64,
}

/// How far out of order a read may come and still continue a stream.
const STREAM_SLACK: u64 = 2 << 20;

impl Repository {
    /// Opens a committed version for random-access reading; it cannot be removed while
    /// open.
    pub fn open_image(
        &self,
        uid: VersionUid,
        cache: Arc<BlockCache>,
        prefetch: Option<Arc<Prefetcher>>,
    ) -> Result<Image> {
        let version = self.version(uid)?;
        let session = self.session(&format!("read {uid}"), false)?;
        session.lock_version(uid, "read")?;
        let index = self.mapped_index(uid)?;
        let storage = self.storage(&version.storage)?;
        Ok(Image { version, index, storage, cache, prefetch, cursor: Mutex::new(Cursor::default()), _session: session })
    }
}
