//! A decorator that injects faults into another storage, for the failures a real storage
//! cannot be made to show on demand: fail the next N writes or reads, truncate reads,
//! flip a byte, slow every call down.

use super::{Storage, StorageError, StorageResult};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Faults {
    fail_puts: u32,
    fail_gets: u32,
    truncate_gets: u32,
    corrupt_gets: u32,
    delay: Duration,
    /// Gets that still succeed before the storage "dies" (every later get fails).
    gets_before_death: Option<u32>,
    /// Puts that still succeed before writes "die" (every later put fails).
    puts_before_death: Option<u32>,
    /// Puts that succeeded.
    puts_done: u64,
    /// Entries listings have handed out.
    listed: u64,
}

pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    faults: Mutex<Faults>,
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>) -> FaultyStorage {
        FaultyStorage { inner, faults: Mutex::new(Faults::default()) }
    }
    /// The next `n` puts fail (transiently).
    pub fn fail_next_puts(&self, n: u32) {
        self.faults.lock().fail_puts = n;
    }
    /// The next `n` gets fail (transiently).
    pub fn fail_next_gets(&self, n: u32) {
        self.faults.lock().fail_gets = n;
    }
    /// The next `n` gets return only the first half of the object.
    pub fn truncate_next_gets(&self, n: u32) {
        self.faults.lock().truncate_gets = n;
    }
    /// The next `n` gets return the object with its last byte flipped.
    pub fn corrupt_next_gets(&self, n: u32) {
        self.faults.lock().corrupt_gets = n;
    }
    /// After `n` more successful gets the storage dies: every get fails until
    /// [`FaultyStorage::revive`]. A server that goes away in the middle of a restore.
    pub fn die_after_gets(&self, n: u32) {
        self.faults.lock().gets_before_death = Some(n);
    }
    /// After `n` more successful puts every put fails until [`FaultyStorage::revive`]:
    /// a storage outage in the middle of a backup.
    pub fn die_after_puts(&self, n: u32) {
        self.faults.lock().puts_before_death = Some(n);
    }
    /// Undoes [`FaultyStorage::die_after_gets`] and [`FaultyStorage::die_after_puts`].
    pub fn revive(&self) {
        let mut f = self.faults.lock();
        f.gets_before_death = None;
        f.puts_before_death = None;
    }
    /// How many puts have succeeded so far.
    pub fn puts_done(&self) -> u64 {
        self.faults.lock().puts_done
    }
    /// How many entries listings have handed to their callers so far.
    pub fn listed(&self) -> u64 {
        self.faults.lock().listed
    }
    /// Every call sleeps this long first.
    pub fn set_delay(&self, d: Duration) {
        self.faults.lock().delay = d;
    }
    fn take(counter: &mut u32) -> bool {
        if *counter > 0 {
            *counter -= 1;
            true
        } else {
            false
        }
    }
    fn pause(&self) {
        let d = self.faults.lock().delay;
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

impl Storage for FaultyStorage {
    super::pass_to_inner!(name, sync, purge_temporary, codec, delete_many, put_new);
    fn list_each(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(super::ListEntry) -> std::ops::ControlFlow<()>,
    ) -> StorageResult<()> {
        self.inner.list_each(prefix, &mut |e| {
            self.faults.lock().listed += 1;
            each(e)
        })
    }
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.pause();
        {
            let mut f = self.faults.lock();
            let dead = match &mut f.puts_before_death {
                Some(0) => true,
                Some(n) => {
                    *n -= 1;
                    false
                }
                None => false,
            };
            if dead || Self::take(&mut f.fail_puts) {
                return Err(StorageError::Injected {
                    storage: self.name().to_string(),
                    op: "put",
                    key: key.to_string(),
                });
            }
        }
        self.inner.put(key, data)?;
        self.faults.lock().puts_done += 1;
        Ok(())
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.faulty_get(key, false)
    }
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.faulty_get(key, true)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.pause();
        self.inner.exists(key)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.pause();
        self.inner.delete(key)
    }
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        self.pause();
        self.inner.replace_prefix(key, object, prefix)
    }
}

impl FaultyStorage {
    fn faulty_get(&self, key: &str, fresh: bool) -> StorageResult<Vec<u8>> {
        self.pause();
        let mut f = self.faults.lock();
        let dead = match &mut f.gets_before_death {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        };
        if dead || Self::take(&mut f.fail_gets) {
            return Err(StorageError::Injected { storage: self.name().to_string(), op: "get", key: key.to_string() });
        }
        let truncate = Self::take(&mut f.truncate_gets);
        let corrupt = Self::take(&mut f.corrupt_gets);
        drop(f);
        let mut data = if fresh { self.inner.get_fresh(key)? } else { self.inner.get(key)? };
        if truncate {
            data.truncate(data.len() / 2);
        }
        if corrupt && let Some(last) = data.last_mut() {
            *last ^= 0x01;
        }
        Ok(data)
    }
}
