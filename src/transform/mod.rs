//! Transforms applied to objects between the engine and a storage, and the [`Codec`]
//! that applies them: how a storage names its blocks (SHA-256, or HMAC-SHA256 under the
//! repository secret when it is encrypted), compresses them (zstd) and seals them
//! (AES-256-GCM envelopes, see [`aes`]). Every storage has exactly one codec.

pub mod aes;
pub mod zstd;

use crate::block::{BlockId, ID_LEN, ObjectError, ObjectHeader, ObjectKind};
use aes::{KeyId, MasterKey};
use hmac::{KeyInit, Mac};
use sha2::Sha256;

pub type HmacSha256 = hmac::Hmac<Sha256>;

/// The keys of an encrypted storage.
pub struct Keys {
    /// HMAC key for content ids (the repository secret): it never changes, so ids and
    /// deduplication survive master key rotations.
    id_mac: HmacSha256,
    /// Every master key at hand; `current` seals new objects.
    masters: Vec<MasterKey>,
    current: usize,
}

/// How one storage's objects are named, encoded and decoded.
pub struct Codec {
    keys: Option<Keys>,
}

static PLAIN: Codec = Codec { keys: None };

impl Codec {
    /// The codec of an unencrypted storage.
    pub fn plain() -> &'static Codec {
        &PLAIN
    }

    /// The codec of an encrypted storage: ids keyed by `secret`, new objects sealed by
    /// the master key `current` (which must be among `masters`).
    pub fn sealed(secret: &[u8; 32], masters: Vec<MasterKey>, current: KeyId) -> Option<Codec> {
        let current = masters.iter().position(|m| m.id() == current)?;
        let id_mac = <HmacSha256 as KeyInit>::new_from_slice(secret).ok()?;
        Some(Codec { keys: Some(Keys { id_mac, masters, current }) })
    }

    pub fn is_sealed(&self) -> bool {
        self.keys.is_some()
    }

    /// The master key new objects are sealed with.
    pub fn current_key(&self) -> Option<KeyId> {
        self.keys.as_ref().map(|k| k.masters[k.current].id())
    }

    pub(crate) fn current_master(&self) -> Option<&MasterKey> {
        self.keys.as_ref().map(|k| &k.masters[k.current])
    }

    pub(crate) fn master(&self, id: KeyId) -> Option<&MasterKey> {
        self.keys.as_ref().and_then(|k| k.masters.iter().find(|m| m.id() == id))
    }

    /// The content id of a block (or version object) under this codec.
    pub fn id_of(&self, data: &[u8]) -> BlockId {
        match &self.keys {
            None => BlockId::of(data),
            Some(k) => {
                let mut mac = k.id_mac.clone();
                mac.update(data);
                let mut id = [0u8; ID_LEN];
                id.copy_from_slice(&mac.finalize().into_bytes());
                BlockId(id)
            }
        }
    }

    /// Appends `src` to `dst` and returns the id of the bytes appended. The id is computed
    /// from the copy, piece by piece while each piece is still in the CPU cache: it is the
    /// id of exactly the bytes in `dst` even when `src` changes meanwhile (a mapped source
    /// being written), for about the cost of hashing alone.
    pub fn copy_and_id(&self, src: &[u8], dst: &mut Vec<u8>) -> BlockId {
        const PIECE: usize = 64 << 10;
        let mut h = self.id_hasher();
        dst.reserve(src.len());
        for piece in src.chunks(PIECE) {
            let at = dst.len();
            dst.extend_from_slice(piece);
            h.update(&dst[at..]);
        }
        h.finish()
    }

    /// The content id of bytes handed over in pieces (a large version object).
    pub fn id_hasher(&self) -> IdHasher {
        match &self.keys {
            None => IdHasher::Plain(<Sha256 as sha2::Digest>::new()),
            Some(k) => IdHasher::Keyed(k.id_mac.clone()),
        }
    }

    /// Builds an object (compressed at `level` when that helps, sealed when encrypted).
    /// Fails (and nothing may be written) when the plaintext is over its kind's bound or
    /// sealing fails.
    pub fn encode(
        &self,
        kind: ObjectKind,
        id: &[u8; ID_LEN],
        plain: &[u8],
        level: i32,
    ) -> Result<Vec<u8>, ObjectError> {
        crate::block::encode_with(self, kind, id, plain, level)
    }

    /// Checks and decodes an object of `kind`; the caller checks content against its id.
    pub fn decode(&self, bytes: &[u8], kind: ObjectKind) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
        crate::block::decode_with(self, bytes, kind)
    }

    /// Decodes a block object and checks that its content has the id `id`.
    pub fn decode_block(&self, bytes: &[u8], id: &BlockId) -> Result<Vec<u8>, ObjectError> {
        let (_, plain) = self.decode(bytes, ObjectKind::Block)?;
        self.check_content(&plain, id)?;
        Ok(plain)
    }

    /// Decodes a block object into the start of `out` and checks it; returns its length.
    pub fn decode_block_into(&self, bytes: &[u8], id: &BlockId, out: &mut [u8]) -> Result<usize, ObjectError> {
        let n = crate::block::decode_into_with(self, bytes, ObjectKind::Block, out)?;
        self.check_content(&out[..n], id)?;
        Ok(n)
    }

    pub fn check_content(&self, plain: &[u8], id: &BlockId) -> Result<(), ObjectError> {
        let found = self.id_of(plain);
        if found != *id {
            return Err(ObjectError::ContentMismatch { expected: id.to_hex(), found: found.to_hex() });
        }
        Ok(())
    }

    /// For key rotation: the object's header and envelope with its data key wrapped by the
    /// current master key (same length; the payload stays as it is), or `None` when the
    /// object is sealed with the current key already.
    pub fn rewrap_header(&self, bytes: &[u8]) -> Result<Option<Vec<u8>>, ObjectError> {
        crate::block::rewrap_with(self, bytes)
    }
}

/// A content id being computed (see [`Codec::id_hasher`]).
pub enum IdHasher {
    Plain(Sha256),
    Keyed(HmacSha256),
}

impl IdHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            IdHasher::Plain(s) => sha2::Digest::update(s, bytes),
            IdHasher::Keyed(m) => m.update(bytes),
        }
    }

    pub fn finish(self) -> BlockId {
        let mut id = [0u8; ID_LEN];
        match self {
            IdHasher::Plain(s) => id.copy_from_slice(&sha2::Digest::finalize(s)),
            IdHasher::Keyed(m) => id.copy_from_slice(&m.finalize().into_bytes()),
        }
        BlockId(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_computed_while_copying_is_the_id_of_the_copy() {
        let data: Vec<u8> = (0..(300u32 << 10) + 7).map(|i| (i * 31 % 251) as u8).collect();
        let current = MasterKey::new(&[7; aes::KEY_LEN]).id();
        let sealed = Codec::sealed(&[9; 32], vec![MasterKey::new(&[7; aes::KEY_LEN])], current).unwrap();
        for codec in [Codec::plain(), &sealed] {
            let mut copy = b"kept".to_vec();
            let id = codec.copy_and_id(&data, &mut copy);
            assert_eq!(&copy[..4], b"kept");
            assert_eq!(&copy[4..], &data[..]);
            assert_eq!(id, codec.id_of(&data));
        }
        assert_ne!(Codec::plain().id_of(&data), sealed.id_of(&data));
    }
}
