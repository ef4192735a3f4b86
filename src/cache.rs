//! A shared cache of verified, decompressed blocks, keyed by storage and content id (so
//! a block shared by many versions is cached once). Concurrent requests for the same
//! block wait for one fetch instead of fetching it again.

use crate::block::{BlockId, ObjectError};
use crate::storage::{Storage, retry};
use lru::LruCache;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::Arc;

pub type BlockData = Arc<Vec<u8>>;
type Key = (usize, BlockId);

#[derive(Default)]
struct Flight {
    result: Mutex<Option<Result<BlockData, FetchError>>>,
    done: Condvar,
}

pub struct BlockCache {
    lru: Mutex<(LruCache<Key, BlockData>, usize)>,
    capacity_bytes: usize,
    in_flight: Mutex<HashMap<Key, Arc<Flight>>>,
}

const FETCH_ATTEMPTS: u32 = 4;

/// Why a block could not be had. The difference decides what happens to the repository:
/// a damaged object is marked invalid (with every version that references it); an
/// unavailable storage marks nothing, and the operation stops so that it can be run
/// again (or continued) when the storage is back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The object is missing, or its bytes fail a check.
    Damaged(String),
    /// The storage did not answer (after retries): a dead server, a network error.
    Unavailable(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Damaged(m) | FetchError::Unavailable(m) => f.write_str(m),
        }
    }
}

impl From<crate::storage::StorageError> for FetchError {
    fn from(e: crate::storage::StorageError) -> FetchError {
        match e {
            crate::storage::StorageError::NotFound { .. } => FetchError::Damaged(e.to_string()),
            other => FetchError::Unavailable(other.to_string()),
        }
    }
}

/// Where the first read of an object may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// A local copy will do (restore, the mount).
    Cached,
    /// The storage itself (a deep-scrub verifies what the storage holds).
    Fresh,
}

/// Fetches a block's object and decodes it with `decode`, fetching once more from the
/// storage itself if the bytes do not decode (a truncated transfer is transient, a local
/// copy may be stale; a damaged object fails every time). Transient storage errors are
/// retried.
pub fn fetch_verified<T>(
    storage: &dyn Storage,
    id: &BlockId,
    first: Read,
    mut decode: impl FnMut(&[u8]) -> Result<T, ObjectError>,
) -> Result<T, FetchError> {
    let key = id.storage_key();
    let mut last = String::new();
    for read in [first, Read::Fresh] {
        let bytes = retry(FETCH_ATTEMPTS, || match read {
            Read::Cached => storage.get(&key),
            Read::Fresh => storage.get_fresh(&key),
        })?;
        match decode(&bytes) {
            Ok(b) => return Ok(b),
            // A missing key is not damage: say which key the object needs (once the
            // storage itself, not a local copy, says so).
            Err(e @ ObjectError::UnknownKey { .. }) if read == Read::Fresh => {
                return Err(FetchError::Unavailable(format!("object {id}: {e}")));
            }
            Err(e) => last = format!("object {id}: {e}"),
        }
    }
    Err(FetchError::Damaged(last))
}

/// Fetches and verifies one block.
pub fn fetch_block(storage: &dyn Storage, id: &BlockId, first: Read) -> Result<Vec<u8>, FetchError> {
    fetch_verified(storage, id, first, |bytes| storage.codec().decode_block(bytes, id))
}

impl BlockCache {
    pub fn new(capacity_bytes: usize) -> BlockCache {
        BlockCache {
            lru: Mutex::new((LruCache::unbounded(), 0)),
            capacity_bytes,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn key(storage: &Arc<dyn Storage>, id: &BlockId) -> Key {
        (Arc::as_ptr(storage) as *const () as usize, *id)
    }

    pub fn peek(&self, storage: &Arc<dyn Storage>, id: &BlockId) -> Option<BlockData> {
        self.lru.lock().0.get(&Self::key(storage, id)).cloned()
    }

    /// Adds a block (e.g. one just written) to the cache.
    pub fn insert(&self, storage: &Arc<dyn Storage>, id: &BlockId, data: BlockData) {
        let mut g = self.lru.lock();
        let (lru, used) = &mut *g;
        if let Some(old) = lru.put(Self::key(storage, id), data.clone()) {
            *used -= old.len();
        }
        *used += data.len();
        while *used > self.capacity_bytes {
            match lru.pop_lru() {
                Some((_, v)) => *used -= v.len(),
                None => break,
            }
        }
    }

    /// The block, from the cache or fetched (once, however many threads ask at a time).
    pub fn get(&self, storage: &Arc<dyn Storage>, id: &BlockId) -> Result<BlockData, FetchError> {
        if let Some(d) = self.peek(storage, id) {
            return Ok(d);
        }
        let key = Self::key(storage, id);
        let (flight, leader) = {
            let mut f = self.in_flight.lock();
            match f.get(&key) {
                Some(fl) => (fl.clone(), false),
                None => {
                    let fl = Arc::new(Flight::default());
                    f.insert(key, fl.clone());
                    (fl, true)
                }
            }
        };
        if leader {
            let r = fetch_block(storage.as_ref(), id, Read::Cached).map(Arc::new);
            if let Ok(d) = &r {
                self.insert(storage, id, d.clone());
            }
            *flight.result.lock() = Some(r.clone());
            flight.done.notify_all();
            self.in_flight.lock().remove(&key);
            return r;
        }
        let mut res = flight.result.lock();
        while res.is_none() {
            flight.done.wait(&mut res);
        }
        res.clone().unwrap_or_else(|| Err(FetchError::Unavailable("fetch vanished".into())))
    }
}
