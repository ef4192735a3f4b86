//! A bandwidth limit for another storage: reads and writes each reserve their bytes'
//! share of time on a shared clock (a token bucket with no burst), so that all threads
//! of a process together stay under the configured rate.

use super::{SharedStorage, Storage, StorageResult};
use parking_lot::Mutex;
use std::time::{Duration, Instant};

struct Rate {
    bytes_per_sec: u64,
    next_free: Mutex<Instant>,
}

impl Rate {
    fn new(bytes_per_sec: u64) -> Rate {
        Rate { bytes_per_sec, next_free: Mutex::new(Instant::now()) }
    }
    /// Waits until `bytes` may pass.
    fn pass(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let start = {
            let mut next = self.next_free.lock();
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

pub struct ThrottledStorage {
    inner: SharedStorage,
    read: Option<Rate>,
    write: Option<Rate>,
}

impl ThrottledStorage {
    /// Limits in bytes per second (`None`: unlimited).
    pub fn new(inner: SharedStorage, read: Option<u64>, write: Option<u64>) -> ThrottledStorage {
        ThrottledStorage {
            inner,
            read: read.filter(|r| *r > 0).map(Rate::new),
            write: write.filter(|r| *r > 0).map(Rate::new),
        }
    }
}

impl ThrottledStorage {
    /// Holds data just read until the read rate allows it.
    fn read_paced(&self, data: Vec<u8>) -> StorageResult<Vec<u8>> {
        if let Some(r) = &self.read {
            r.pass(data.len());
        }
        Ok(data)
    }
}

impl Storage for ThrottledStorage {
    super::pass_to_inner!(name, exists, delete, delete_many, list_each, sync, purge_temporary, codec, put_new);
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        if let Some(r) = &self.write {
            r.pass(data.len());
        }
        self.inner.put(key, data)
    }
    fn put_large(&self, key: &str, object: &super::LargeObject<'_>) -> StorageResult<()> {
        if let Some(r) = &self.write {
            r.pass(object.len() as usize);
        }
        self.inner.put_large(key, object)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.read_paced(self.inner.get(key)?)
    }
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.read_paced(self.inner.get_fresh(key)?)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        self.read_paced(self.inner.get_range(key, offset, len)?)
    }
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        if let Some(r) = &self.write {
            r.pass(prefix.len());
        }
        self.inner.replace_prefix(key, object, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_spaces_transfers() {
        let r = Rate::new(1_000_000);
        let t = Instant::now();
        for _ in 0..5 {
            r.pass(50_000); // 50 ms each at 1 MB/s
        }
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(195), "{took:?}");
    }
}
