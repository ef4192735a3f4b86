//! Blocks and the objects that hold them: content ids, zero detection, and the
//! self-describing on-storage object format (header + payload, see docs/format.md).

use crate::transform;
use sha2::{Digest, Sha256};
use std::fmt;

/// Length in bytes of a content id.
pub const ID_LEN: usize = 32;

/// The content id of a block: SHA-256 of its plaintext. The all-zero id is reserved for
/// sparse (all-zero) blocks, which are never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; ID_LEN]);

impl BlockId {
    /// The reserved id of an all-zero block.
    pub const SPARSE: BlockId = BlockId([0; ID_LEN]);

    /// Computes the content id of `data` (SHA-256; sha2 uses the CPU's SHA extensions).
    pub fn of(data: &[u8]) -> BlockId {
        let digest = Sha256::digest(data);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest);
        BlockId(id)
    }

    pub fn is_sparse(&self) -> bool {
        *self == Self::SPARSE
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<BlockId> {
        let mut id = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(BlockId(id))
    }

    pub fn from_slice(s: &[u8]) -> Option<BlockId> {
        <[u8; ID_LEN]>::try_from(s).ok().map(BlockId)
    }

    /// The storage key of the object holding this block: `blocks/ab/cd/<hex>`. Two levels
    /// of fan-out keep directories of a file storage small (65,536 leaves).
    pub fn storage_key(&self) -> String {
        let h = self.to_hex();
        format!("blocks/{}/{}/{}", &h[0..2], &h[2..4], h)
    }

    /// Parses a key made by [`BlockId::storage_key`].
    pub fn from_storage_key(key: &str) -> Option<BlockId> {
        let name = key.strip_prefix("blocks/")?;
        let hex = name.rsplit('/').next()?;
        let id = BlockId::from_hex(hex)?;
        (id.storage_key() == key).then_some(id)
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", self.to_hex())
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True when every byte of `buf` is zero. Compares page-sized chunks against a static zero
/// page, which the compiler turns into vectorised memcmp: zero blocks cost almost nothing.
pub fn is_zero(buf: &[u8]) -> bool {
    static ZERO_PAGE: [u8; 4096] = [0; 4096];
    let mut chunks = buf.chunks_exact(ZERO_PAGE.len());
    chunks.all(|c| c == ZERO_PAGE) && {
        let rest = chunks.remainder();
        rest == &ZERO_PAGE[..rest.len()]
    }
}

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ObjectKind {
    Block = 1,
    Version = 2,
}

/// Magic number at the start of every object.
pub const OBJECT_MAGIC: [u8; 8] = *b"KEEPFSOB";
/// Object format version written by this build.
pub const OBJECT_FORMAT_VERSION: u16 = 1;
/// Length of the fixed part of an object header.
pub const OBJECT_HEADER_LEN: usize = 72;

/// Transform flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u16 = 1 << 0;
/// Transform flag (reserved for the encryption issue): the payload is AES-256-GCM sealed
/// and the envelope holds the key id, nonce and wrapped data key.
pub const FLAG_AES256GCM: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_ZSTD | FLAG_AES256GCM;

/// Why an object could not be decoded. Every variant means the stored bytes are damaged
/// or not an object of this format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("object is {0} bytes, shorter than its header")]
    TooShort(usize),
    #[error("object does not start with the keepfs magic number")]
    BadMagic,
    #[error("object format version {0} is not supported by this keepfs (it reads version 1)")]
    UnsupportedVersion(u16),
    #[error("object header checksum mismatch (header damaged)")]
    HeaderChecksum,
    #[error("object has unknown transform flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("object is of kind {found}, expected {expected}")]
    WrongKind { expected: u16, found: u16 },
    #[error("object length {found} does not match its header ({expected} bytes)")]
    Length { expected: u64, found: u64 },
    #[error("object payload checksum mismatch (payload damaged or truncated)")]
    PayloadChecksum,
    #[error("object payload does not decompress: {0}")]
    Decompress(String),
    #[error("object is encrypted; this repository has no key to open it")]
    Encrypted,
    #[error("decoded object is {found} bytes, its header says {expected}")]
    PlainLength { expected: u64, found: u64 },
    #[error("object content does not match its id (expected {expected}, got {found})")]
    ContentMismatch { expected: String, found: String },
}

/// The parsed fixed header of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    pub kind: u16,
    pub flags: u16,
    pub plain_len: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
    pub id: [u8; ID_LEN],
    pub envelope: Vec<u8>,
}

fn header_crc(bytes: &[u8], header_len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[0..36]);
    h.update(&bytes[40..header_len]);
    h.finalize()
}

/// Builds an object: header followed by the payload (`plain` compressed with zstd at
/// `level` when that makes it smaller; level 0 stores it as is).
pub fn encode_object(kind: ObjectKind, id: &[u8; ID_LEN], plain: &[u8], level: i32) -> Vec<u8> {
    let compressed =
        if level > 0 { transform::zstd::compress(plain, level).filter(|c| c.len() < plain.len()) } else { None };
    let (flags, payload): (u16, &[u8]) = match &compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, plain),
    };
    let mut out = Vec::with_capacity(OBJECT_HEADER_LEN + payload.len());
    out.extend_from_slice(&OBJECT_MAGIC);
    out.extend_from_slice(&OBJECT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // envelope length: no encryption yet
    out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // header crc, filled below
    out.extend_from_slice(id);
    debug_assert_eq!(out.len(), OBJECT_HEADER_LEN);
    let crc = header_crc(&out, OBJECT_HEADER_LEN);
    out[36..40].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parses and checks an object's header (magic, version, header checksum, flags). The
/// payload is not touched: this is what a light scrub needs.
pub fn parse_header(bytes: &[u8]) -> Result<(ObjectHeader, usize), ObjectError> {
    if bytes.len() < OBJECT_HEADER_LEN {
        return Err(ObjectError::TooShort(bytes.len()));
    }
    if bytes[0..8] != OBJECT_MAGIC {
        return Err(ObjectError::BadMagic);
    }
    let version = u16_at(bytes, 8);
    if version != OBJECT_FORMAT_VERSION {
        return Err(ObjectError::UnsupportedVersion(version));
    }
    let envelope_len = u16_at(bytes, 14) as usize;
    let header_len = OBJECT_HEADER_LEN + envelope_len;
    if bytes.len() < header_len {
        return Err(ObjectError::TooShort(bytes.len()));
    }
    if header_crc(bytes, header_len) != u32_at(bytes, 36) {
        return Err(ObjectError::HeaderChecksum);
    }
    let flags = u16_at(bytes, 12);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(ObjectError::UnknownFlags(flags));
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&bytes[40..72]);
    Ok((
        ObjectHeader {
            kind: u16_at(bytes, 10),
            flags,
            plain_len: u64_at(bytes, 16),
            payload_len: u64_at(bytes, 24),
            payload_crc: u32_at(bytes, 32),
            id,
            envelope: bytes[OBJECT_HEADER_LEN..header_len].to_vec(),
        },
        header_len,
    ))
}

/// Checks an object of the expected kind (both checksums, lengths) and returns its header
/// and its still-transformed payload.
fn checked_payload(bytes: &[u8], kind: ObjectKind) -> Result<(ObjectHeader, &[u8]), ObjectError> {
    let (header, header_len) = parse_header(bytes)?;
    if header.kind != kind as u16 {
        return Err(ObjectError::WrongKind { expected: kind as u16, found: header.kind });
    }
    let payload = &bytes[header_len..];
    if payload.len() as u64 != header.payload_len {
        return Err(ObjectError::Length {
            expected: header_len as u64 + header.payload_len,
            found: bytes.len() as u64,
        });
    }
    if crc32fast::hash(payload) != header.payload_crc {
        return Err(ObjectError::PayloadChecksum);
    }
    if header.flags & FLAG_AES256GCM != 0 {
        return Err(ObjectError::Encrypted);
    }
    Ok((header, payload))
}

/// Undoes the transforms of a checked payload into `out` (exactly `plain_len` bytes).
fn untransform(header: &ObjectHeader, payload: &[u8], out: &mut [u8]) -> Result<(), ObjectError> {
    let n = if header.flags & FLAG_ZSTD != 0 {
        transform::zstd::decompress_into(payload, out).map_err(|e| ObjectError::Decompress(e.to_string()))?
    } else if payload.len() == out.len() {
        out.copy_from_slice(payload);
        payload.len()
    } else {
        payload.len()
    };
    if n as u64 != header.plain_len {
        return Err(ObjectError::PlainLength { expected: header.plain_len, found: n as u64 });
    }
    Ok(())
}

/// Decodes an object of the expected kind: checks both checksums, undoes the transforms
/// and checks the plaintext length. The caller checks the content against its id.
pub fn decode_object(bytes: &[u8], kind: ObjectKind) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, payload) = checked_payload(bytes, kind)?;
    let mut plain = vec![0u8; header.plain_len.min(1 << 36) as usize];
    untransform(&header, payload, &mut plain)?;
    Ok((header, plain))
}

/// Decodes a block object and checks that its content hashes to `id`.
pub fn decode_block(bytes: &[u8], id: &BlockId) -> Result<Vec<u8>, ObjectError> {
    let (_, plain) = decode_object(bytes, ObjectKind::Block)?;
    check_content(&plain, id)?;
    Ok(plain)
}

/// Decodes a block object into the start of `out` (which must hold the whole block),
/// checks it against `id` and returns its length. Used where the destination buffer is
/// given (aligned buffers for direct I/O).
pub fn decode_block_into(bytes: &[u8], id: &BlockId, out: &mut [u8]) -> Result<usize, ObjectError> {
    let (header, payload) = checked_payload(bytes, ObjectKind::Block)?;
    let n = header.plain_len;
    if n > out.len() as u64 {
        return Err(ObjectError::PlainLength { expected: out.len() as u64, found: n });
    }
    let out = &mut out[..n as usize];
    untransform(&header, payload, out)?;
    check_content(out, id)?;
    Ok(n as usize)
}

fn check_content(plain: &[u8], id: &BlockId) -> Result<(), ObjectError> {
    let found = BlockId::of(plain);
    if found != *id {
        return Err(ObjectError::ContentMismatch { expected: id.to_hex(), found: found.to_hex() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 4 * 1024 * 1024 + 3]));
        let mut b = vec![0u8; 10_000];
        b[9_999] = 1;
        assert!(!is_zero(&b));
        b[9_999] = 0;
        b[0] = 7;
        assert!(!is_zero(&b));
    }

    #[test]
    fn object_roundtrip_compressible_and_random() {
        let compressible = vec![b'a'; 100_000];
        let id = BlockId::of(&compressible);
        let obj = encode_object(ObjectKind::Block, &id.0, &compressible, 1);
        assert!(obj.len() < 10_000, "compressible data must be compressed");
        assert_eq!(decode_block(&obj, &id).unwrap(), compressible);

        let mut x = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..50_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let id = BlockId::of(&random);
        let obj = encode_object(ObjectKind::Block, &id.0, &random, 3);
        assert_eq!(obj.len(), OBJECT_HEADER_LEN + random.len(), "incompressible data is stored as is");
        assert_eq!(decode_block(&obj, &id).unwrap(), random);
    }

    #[test]
    fn damage_is_detected() {
        let data = vec![b'x'; 5000];
        let id = BlockId::of(&data);
        let obj = encode_object(ObjectKind::Block, &id.0, &data, 1);
        let mut bad = obj.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(decode_block(&bad, &id), Err(ObjectError::PayloadChecksum));
        let mut bad = obj.clone();
        bad[17] ^= 1;
        assert_eq!(decode_block(&bad, &id), Err(ObjectError::HeaderChecksum));
        assert!(matches!(decode_block(&obj[..obj.len() - 5], &id), Err(ObjectError::Length { .. })));
        assert!(matches!(decode_block(&obj[..10], &id), Err(ObjectError::TooShort(10))));
        let other = BlockId::of(b"other");
        assert!(matches!(decode_block(&obj, &other), Err(ObjectError::ContentMismatch { .. })));
        assert!(matches!(decode_object(&obj, ObjectKind::Version), Err(ObjectError::WrongKind { .. })));
    }

    #[test]
    fn storage_keys_roundtrip() {
        let id = BlockId::of(b"hello");
        let key = id.storage_key();
        assert!(key.starts_with("blocks/2c/f2/2cf24dba"));
        assert_eq!(BlockId::from_storage_key(&key), Some(id));
        assert_eq!(BlockId::from_storage_key("blocks/zz/zz/zz"), None);
    }
}
