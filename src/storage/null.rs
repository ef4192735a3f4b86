//! A storage that throws everything away (as backy2's null backend): for throughput and
//! memory tests of the rest of the engine. Reads fail with a clear error.

use super::{ListEntry, Storage, StorageError, StorageResult};

pub struct NullStorage {
    name: String,
}

impl NullStorage {
    pub fn new(name: &str) -> NullStorage {
        NullStorage { name: name.to_string() }
    }
}

impl Storage for NullStorage {
    fn name(&self) -> &str {
        &self.name
    }
    fn codec(&self) -> &crate::transform::Codec {
        crate::transform::Codec::plain()
    }
    fn put(&self, _key: &str, _data: &[u8]) -> StorageResult<()> {
        Ok(())
    }
    fn put_large(&self, _key: &str, _object: &super::LargeObject<'_>) -> StorageResult<()> {
        Ok(())
    }
    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.get(key)
    }
    fn get(&self, _key: &str) -> StorageResult<Vec<u8>> {
        Err(StorageError::Discarding { storage: self.name.clone() })
    }
    fn get_range(&self, _key: &str, _offset: u64, _len: u64) -> StorageResult<Vec<u8>> {
        Err(StorageError::Discarding { storage: self.name.clone() })
    }
    fn exists(&self, _key: &str) -> StorageResult<bool> {
        Ok(false)
    }
    fn delete(&self, _key: &str) -> StorageResult<()> {
        Ok(())
    }
    fn list_each(
        &self,
        _prefix: &str,
        _each: &mut dyn FnMut(ListEntry) -> std::ops::ControlFlow<()>,
    ) -> StorageResult<()> {
        Ok(())
    }
    fn sync(&self) -> StorageResult<()> {
        Ok(())
    }
}
