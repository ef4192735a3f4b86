//! An encrypted storage: another storage together with the codec (keyed ids, sealed
//! objects) that its keyring unlocked. Everything else passes straight through.

use super::{SharedStorage, Storage};
use crate::transform::Codec;

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
    super::pass_to_inner!(
        name,
        put,
        put_large,
        put_new,
        get,
        get_range,
        get_fresh,
        exists,
        delete,
        list_each,
        sync,
        purge_temporary,
        delete_many,
        replace_prefix
    );
    fn codec(&self) -> &Codec {
        &self.codec
    }
}
