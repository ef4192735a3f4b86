//! An encrypted storage: another storage together with the codec (keyed ids, sealed
//! objects) that its keyring unlocked. Everything else passes straight through.

use super::{ListEntry, SharedStorage, Storage, StorageResult};
use crate::transform::Codec;
use std::time::SystemTime;

pub struct SealedStorage {
    inner: SharedStorage,
    codec: Codec,
}

impl SealedStorage {
    pub fn new(inner: SharedStorage, codec: Codec) -> SealedStorage {
        SealedStorage { inner, codec }
    }
}

impl Storage for SealedStorage {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.inner.get_fresh(key)
    }
    fn exists(&self, key: &str) -> StorageResult<bool> {
        self.inner.exists(key)
    }
    fn delete(&self, key: &str) -> StorageResult<()> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> StorageResult<Vec<ListEntry>> {
        self.inner.list(prefix)
    }
    fn sync(&self) -> StorageResult<()> {
        self.inner.sync()
    }
    fn purge_temporary(&self, older_than: SystemTime) -> StorageResult<u64> {
        self.inner.purge_temporary(older_than)
    }
    fn codec(&self) -> &Codec {
        &self.codec
    }
    fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        self.inner.delete_many(keys)
    }
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        self.inner.replace_prefix(key, object, prefix)
    }
}
