//! A size-bounded local directory of block objects read from a (remote) storage, so
//! that repeated restores and the FUSE mount do not fetch the same block over the
//! network twice.
//!
//! Only block objects are kept: their names are their content ids, so a copy cannot go
//! stale by a later backup. Key rotation rewrites headers through `replace_prefix`, and
//! cleanup deletes through `delete_many`; both drop the copy here. Copies are kept as
//! read, sealed when the storage is encrypted, so the cache holds no plaintext.
//!
//! Each file ends with an 8-byte trailer (CRC-32 of the object, then the magic `KFC1`);
//! a copy that fails it is deleted and fetched again. The codec stays the last word: a
//! copy that does not decode is fetched again with `get_fresh` before anything is
//! called damaged (cache.rs), and a deep-scrub always reads past the cache.
//!
//! The size bound is kept by each process over the files it knows: the directory is
//! scanned on first use (least recently used first, by modification time, which a hit
//! refreshes). Several processes sharing one directory may exceed the bound by what the
//! others added since they scanned. Failing to write a copy (a full local disk) never
//! fails a read.

use super::{SharedStorage, Storage, StorageResult};
use lru::LruCache;
use parking_lot::Mutex;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const TRAILER_MAGIC: [u8; 4] = *b"KFC1";
const TRAILER_LEN: usize = 8;
/// Temporary files older than this are leftovers of a killed process.
const STALE_TEMP: Duration = Duration::from_secs(3600);

pub struct DiskCache {
    inner: SharedStorage,
    dir: PathBuf,
    max_bytes: u64,
    /// Known copies (key → file size), least recently used first; `None` until the
    /// directory has been scanned.
    known: Mutex<Option<Known>>,
    temp_counter: AtomicU64,
    /// Modes of new copies and directories (owner-only unless configured).
    modes: crate::perms::Modes,
}

struct Known {
    lru: LruCache<String, u64>,
    bytes: u64,
}

/// Counters for tests and `storage stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUse {
    pub files: u64,
    pub bytes: u64,
}

fn cacheable(key: &str) -> bool {
    key.starts_with("blocks/")
        && !key.contains("..")
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_' || b == b'-')
}

impl DiskCache {
    /// Keeps copies of `inner`'s blocks under `dir` (created when missing), at most
    /// `max_bytes` of them.
    pub fn new(inner: SharedStorage, dir: PathBuf, max_bytes: u64) -> DiskCache {
        DiskCache {
            inner,
            dir,
            max_bytes,
            known: Mutex::new(None),
            temp_counter: AtomicU64::new(0),
            modes: crate::perms::Modes::PRIVATE,
        }
    }

    /// New copies and directories get `modes` (owner-only by default).
    pub fn with_modes(mut self, modes: crate::perms::Modes) -> DiskCache {
        self.modes = modes;
        self
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// What the cache holds as this process sees it.
    pub fn usage(&self) -> CacheUse {
        let mut known = self.known.lock();
        let k = known.get_or_insert_with(|| self.scan());
        CacheUse { files: k.lru.len() as u64, bytes: k.bytes }
    }

    /// The copies on disk, oldest first; removes temporary files of killed processes.
    fn scan(&self) -> Known {
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        let mut stack = vec![self.dir.join("blocks")];
        while let Some(d) = stack.pop() {
            let Ok(entries) = fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(e.path());
                } else if let Ok(rel) = e.path().strip_prefix(&self.dir) {
                    let key = rel.to_string_lossy().into_owned();
                    if cacheable(&key) {
                        found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), key, meta.len()));
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.dir.join("tmp")) {
            let now = SystemTime::now();
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() > STALE_TEMP)
                    .unwrap_or(false);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        found.sort();
        let mut known = Known { lru: LruCache::unbounded(), bytes: 0 };
        for (_, key, size) in found {
            known.bytes += size;
            known.lru.put(key, size);
        }
        self.evict(&mut known);
        known
    }

    fn evict(&self, known: &mut Known) {
        while known.bytes > self.max_bytes {
            let Some((key, size)) = known.lru.pop_lru() else { break };
            known.bytes -= size;
            let _ = fs::remove_file(self.path_of(&key));
        }
    }

    fn remember(&self, key: &str, size: u64) {
        let mut known = self.known.lock();
        let k = known.get_or_insert_with(|| self.scan());
        if let Some(old) = k.lru.put(key.to_string(), size) {
            k.bytes -= old;
        }
        k.bytes += size;
        self.evict(k);
    }

    fn forget(&self, key: &str) {
        let _ = fs::remove_file(self.path_of(key));
        if let Some(k) = self.known.lock().as_mut()
            && let Some(size) = k.lru.pop(key)
        {
            k.bytes -= size;
        }
    }

    /// The cached copy of `key`, if there is a sound one.
    fn read_copy(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.path_of(key);
        let mut data = fs::read(&path).ok()?;
        let n = data.len();
        let sound = n >= TRAILER_LEN
            && data[n - 4..] == TRAILER_MAGIC
            && crc32fast::hash(&data[..n - TRAILER_LEN]).to_le_bytes() == data[n - TRAILER_LEN..n - 4];
        if !sound {
            self.forget(key);
            return None;
        }
        // A hit makes the copy the most recently used, here and for the next scan.
        if let Ok(f) = fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        self.remember(key, n as u64);
        data.truncate(n - TRAILER_LEN);
        Some(data)
    }

    /// Writes a copy (temporary file, then rename: a reader never sees half a copy).
    fn write_copy(&self, key: &str, data: &[u8]) {
        let size = (data.len() + TRAILER_LEN) as u64;
        if size > self.max_bytes {
            return;
        }
        if self.try_write_copy(key, data).is_ok() {
            self.remember(key, size);
        }
    }

    fn try_write_copy(&self, key: &str, data: &[u8]) -> std::io::Result<()> {
        let final_path = self.path_of(key);
        let tmp_dir = self.dir.join("tmp");
        self.modes.create_dir_all(&tmp_dir)?;
        if let Some(parent) = final_path.parent() {
            self.modes.create_dir_all(parent)?;
        }
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = tmp_dir.join(format!("{}-{n}", std::process::id()));
        let written = (|| {
            let mut f = self.modes.options().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(data)?;
            f.write_all(&crc32fast::hash(data).to_le_bytes())?;
            f.write_all(&TRAILER_MAGIC)?;
            fs::rename(&tmp, &final_path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    fn has_copy(&self, key: &str) -> bool {
        Path::exists(&self.path_of(key))
    }
}

impl Storage for DiskCache {
    super::pass_to_inner!(name, exists, list_each, sync, purge_temporary, codec, put_new);
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        if cacheable(key) {
            self.forget(key);
        }
        self.inner.put(key, data)
    }
    /// Past the cache, like `get_fresh`.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn put_large(&self, key: &str, object: &super::LargeObject<'_>) -> StorageResult<()> {
        if cacheable(key) {
            self.forget(key);
        }
        self.inner.put_large(key, object)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        if !cacheable(key) {
            return self.inner.get(key);
        }
        if let Some(data) = self.read_copy(key) {
            return Ok(data);
        }
        let data = self.inner.get(key)?;
        self.write_copy(key, &data);
        Ok(data)
    }
    /// Reads past the cache; a copy already held is replaced by what the storage holds
    /// (a deep-scrub does not fill the cache with every block it verifies).
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        let data = self.inner.get_fresh(key)?;
        if cacheable(key) && self.has_copy(key) {
            self.write_copy(key, &data);
        }
        Ok(data)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner.delete(key)?;
        if cacheable(key) {
            self.forget(key);
        }
        Ok(())
    }
    fn delete_many(&self, keys: &[String], by: Option<super::Deadline>) -> StorageResult<()> {
        self.inner.delete_many(keys, by)?;
        for k in keys.iter().filter(|k| cacheable(k)) {
            self.forget(k);
        }
        Ok(())
    }
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        if cacheable(key) {
            self.forget(key);
        }
        self.inner.replace_prefix(key, object, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::file::FileStorage;
    use std::sync::Arc;

    fn setup(max: u64) -> (tempfile::TempDir, Arc<FileStorage>, DiskCache) {
        let t = tempfile::tempdir().unwrap();
        let remote = Arc::new(FileStorage::open("r", &t.path().join("remote")).unwrap());
        let cache = DiskCache::new(remote.clone(), t.path().join("cache"), max);
        (t, remote, cache)
    }

    fn key(i: u8) -> String {
        format!("blocks/0{i}/00/0{i}00{}", "ab".repeat(30))
    }

    #[test]
    fn copies_are_kept_bounded_checked_and_dropped() {
        let (t, remote, cache) = setup(3 * 1008);
        for i in 0..5u8 {
            remote.put(&key(i), &[i; 1000]).unwrap();
        }
        // Reads fill the cache; the bound keeps the three most recent.
        for i in 0..5u8 {
            assert_eq!(cache.get(&key(i)).unwrap(), vec![i; 1000]);
        }
        assert_eq!(cache.usage(), CacheUse { files: 3, bytes: 3 * 1008 });
        assert!(!t.path().join("cache").join(key(0)).exists());
        assert!(t.path().join("cache").join(key(4)).exists());
        // A hit is served from the copy even when the remote object is gone.
        remote.delete(&key(4)).unwrap();
        assert_eq!(cache.get(&key(4)).unwrap(), vec![4; 1000]);
        // A damaged copy is dropped and fetched again.
        let p = t.path().join("cache").join(key(3));
        let mut b = fs::read(&p).unwrap();
        b[10] ^= 1;
        fs::write(&p, &b).unwrap();
        assert_eq!(cache.get(&key(3)).unwrap(), vec![3; 1000]);
        assert_eq!(fs::read(&p).unwrap()[10], 3, "the copy was rewritten");
        // get_fresh reads the remote and replaces the copy.
        remote.put(&key(3), &[9; 1000]).unwrap();
        assert_eq!(cache.get_fresh(&key(3)).unwrap(), vec![9; 1000]);
        assert_eq!(cache.get(&key(3)).unwrap(), vec![9; 1000]);
        // Writes, deletes and header rewrites through the cache drop the copy.
        cache.put(&key(3), &[7; 1000]).unwrap();
        assert!(!p.exists());
        assert_eq!(cache.get(&key(3)).unwrap(), vec![7; 1000]);
        let object = cache.get(&key(3)).unwrap();
        cache.replace_prefix(&key(3), &object, &[8; 10]).unwrap();
        assert_eq!(&cache.get(&key(3)).unwrap()[..11], &[8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 7]);
        cache.delete_many(&[key(3)], None).unwrap();
        assert!(!p.exists());
        // Other objects (version objects, the keyring) are never cached.
        remote.put("versions/V0000000001", b"v").unwrap();
        assert_eq!(cache.get("versions/V0000000001").unwrap(), b"v");
        assert!(!t.path().join("cache/versions").exists());
        // A new process finds what an earlier one left, least recently used first.
        let again = DiskCache::new(remote.clone(), t.path().join("cache"), 2 * 1008);
        assert_eq!(again.usage().files, 2);
    }
}
