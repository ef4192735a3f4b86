//! Blocks and the objects that hold them: content ids, zero detection, and the
//! self-describing on-storage object format (header + payload, see docs/format.md).

use crate::transform::{self, Codec, aes};
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

    /// The first 8 bytes of the id as a number: what a set of millions of ids keeps
    /// where a rare collision only costs a second look (or keeps an object).
    pub fn short(&self) -> u64 {
        u64::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3], self.0[4], self.0[5], self.0[6], self.0[7]])
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

/// The largest block (the largest block size a version may have, see
/// [`crate::units::check_block_size`]).
pub const MAX_BLOCK_LEN: u64 = 32 << 20;
/// The longest metadata JSON of a version object (its fields and labels).
pub const MAX_VERSION_JSON_LEN: u64 = 16 << 20;
/// The longest plaintext of a version object: its 16-byte header, metadata JSON and
/// block index (see docs/format.md).
pub const MAX_VERSION_PLAIN_LEN: u64 = 16 + MAX_VERSION_JSON_LEN + crate::index::MAX_INDEX_LEN;

/// The longest plaintext an object of `kind` (its raw header value) may claim; `None`
/// for a kind this build does not know.
pub fn max_plain_len(kind: u16) -> Option<u64> {
    match kind {
        k if k == ObjectKind::Block as u16 => Some(MAX_BLOCK_LEN),
        k if k == ObjectKind::Version as u16 => Some(MAX_VERSION_PLAIN_LEN),
        _ => None,
    }
}

/// Transform flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u16 = 1 << 0;
/// Transform flag: the payload is AES-256-GCM sealed (ciphertext followed by its 16-byte
/// tag) and the envelope holds the master key id, the wrapped data key and the nonce.
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
    #[error("object is encrypted (master key {key_id}) but its storage is not: it does not belong here")]
    Encrypted { key_id: String },
    #[error("object is sealed with master key {key_id}, which is not in this storage's keyring (a removed key?)")]
    UnknownKey { key_id: String },
    #[error("object is not encrypted but its storage is: refused (objects of an encrypted storage are always sealed)")]
    NotEncrypted,
    #[error("object fails authentication ({0}): it was altered or belongs to another object")]
    Authentication(&'static str),
    #[error(
        "object header claims {claimed} bytes of plaintext, more than an object of kind {kind} can hold ({max}): header damaged"
    )]
    TooLarge { kind: u16, claimed: u64, max: u64 },
    /// Not damage: building an object failed (its plaintext is over the bound of its
    /// kind, or AES-GCM refused to seal it). Nothing is written.
    #[error("cannot build an object of {len} bytes: {reason}")]
    Encode { len: u64, reason: String },
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

impl From<aes::OpenError> for ObjectError {
    fn from(e: aes::OpenError) -> ObjectError {
        match e {
            aes::OpenError::UnknownKey(k) => ObjectError::UnknownKey { key_id: k.to_hex() },
            aes::OpenError::DataKey => ObjectError::Authentication("wrapped data key"),
            aes::OpenError::Payload => ObjectError::Authentication("payload"),
            aes::OpenError::Envelope => ObjectError::Authentication("envelope length"),
            aes::OpenError::Seal(e) => ObjectError::Encode { len: aes::KEY_LEN as u64, reason: e.to_string() },
        }
    }
}

fn header_crc(bytes: &[u8], header_len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[0..36]);
    h.update(&bytes[40..header_len]);
    h.finalize()
}

/// Builds an unencrypted object: header followed by the payload (`plain` compressed with
/// zstd at `level` when that makes it smaller; level 0 stores it as is). A plaintext over
/// the bound of its kind ([`max_plain_len`]) is refused: no reader would accept it.
pub fn encode_object(kind: ObjectKind, id: &[u8; ID_LEN], plain: &[u8], level: i32) -> Result<Vec<u8>, ObjectError> {
    encode_with(Codec::plain(), kind, id, plain, level)
}

/// The associated data that binds a sealed payload to its header: format version, kind,
/// flags, envelope length, plaintext and payload lengths (bytes 8..32), and the id.
fn sealing_aad(header: &[u8]) -> [u8; 24 + ID_LEN] {
    let mut aad = [0u8; 24 + ID_LEN];
    aad[..24].copy_from_slice(&header[8..32]);
    aad[24..].copy_from_slice(&header[40..72]);
    aad
}

pub(crate) fn encode_with(
    codec: &Codec,
    kind: ObjectKind,
    id: &[u8; ID_LEN],
    plain: &[u8],
    level: i32,
) -> Result<Vec<u8>, ObjectError> {
    check_plain_len(kind, plain.len() as u64)?;
    let compressed =
        if level > 0 { transform::zstd::compress(plain, level).filter(|c| c.len() < plain.len()) } else { None };
    let payload: &[u8] = compressed.as_deref().unwrap_or(plain);
    let header_len = object_header_len(codec);
    let mut out = Vec::with_capacity(header_len + payload.len() + aes::TAG_LEN);
    out.resize(header_len, 0);
    out.extend_from_slice(payload);
    finish_object(codec, kind, id, plain.len() as u64, compressed.is_some(), &mut out)?;
    Ok(out)
}

/// Refuses a plaintext over its kind's bound (nothing may be written).
pub(crate) fn check_plain_len(kind: ObjectKind, len: u64) -> Result<(), ObjectError> {
    let max = max_plain_len(kind as u16).unwrap_or(0);
    if len > max {
        return Err(ObjectError::Encode {
            len,
            reason: format!("more than an object of kind {} may hold ({max} bytes)", kind as u16),
        });
    }
    Ok(())
}

/// Bytes of an object's header, envelope included, under `codec`.
pub(crate) fn object_header_len(codec: &Codec) -> usize {
    OBJECT_HEADER_LEN + if codec.current_master().is_some() { aes::ENVELOPE_LEN } else { 0 }
}

/// Writes the fields of an object header into `out` (its first [`OBJECT_HEADER_LEN`]
/// bytes), CRCs zeroed.
fn write_header(
    out: &mut [u8],
    kind: ObjectKind,
    flags: u16,
    envelope_len: usize,
    plain_len: u64,
    payload_len: u64,
    id: &[u8; ID_LEN],
) {
    out[0..8].copy_from_slice(&OBJECT_MAGIC);
    out[8..10].copy_from_slice(&OBJECT_FORMAT_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&(kind as u16).to_le_bytes());
    out[12..14].copy_from_slice(&flags.to_le_bytes());
    out[14..16].copy_from_slice(&(envelope_len as u16).to_le_bytes());
    out[16..24].copy_from_slice(&plain_len.to_le_bytes());
    out[24..32].copy_from_slice(&payload_len.to_le_bytes());
    out[32..40].fill(0);
    out[40..72].copy_from_slice(id);
}

/// Makes an object of `out`: [`object_header_len`] bytes to fill, then the payload (the
/// plaintext of `plain_len` bytes, zstd-compressed when `compressed`), which is sealed
/// in place (its tag appended) when the codec seals.
pub(crate) fn finish_object(
    codec: &Codec,
    kind: ObjectKind,
    id: &[u8; ID_LEN],
    plain_len: u64,
    compressed: bool,
    out: &mut Vec<u8>,
) -> Result<(), ObjectError> {
    let master = codec.current_master();
    let header_len = object_header_len(codec);
    let mut flags = if compressed { FLAG_ZSTD } else { 0 };
    let (envelope_len, tag_len) = match master {
        Some(_) => {
            flags |= FLAG_AES256GCM;
            (aes::ENVELOPE_LEN, aes::TAG_LEN)
        }
        None => (0, 0),
    };
    let payload_len = (out.len() - header_len + tag_len) as u64;
    write_header(&mut out[..OBJECT_HEADER_LEN], kind, flags, envelope_len, plain_len, payload_len, id);
    if let Some(master) = master {
        let aad = sealing_aad(out);
        let (envelope, tag) = aes::seal(master, id, &aad, &mut out[header_len..])
            .map_err(|e| ObjectError::Encode { len: plain_len, reason: e.to_string() })?;
        out[OBJECT_HEADER_LEN..header_len].copy_from_slice(&envelope);
        out.extend_from_slice(&tag);
    }
    let payload_crc = crc32fast::hash(&out[header_len..]);
    out[32..36].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = header_crc(out, header_len);
    out[36..40].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The header of an unsealed object whose payload is stored from elsewhere (a large
/// version object, streamed from files): `payload_len` bytes (the plaintext, or its
/// zstd frame when `compressed`) whose CRC-32 is `payload_crc`.
pub(crate) fn plain_object_header(
    kind: ObjectKind,
    id: &[u8; ID_LEN],
    plain_len: u64,
    compressed: bool,
    payload_len: u64,
    payload_crc: u32,
) -> Vec<u8> {
    let mut out = vec![0u8; OBJECT_HEADER_LEN];
    let flags = if compressed { FLAG_ZSTD } else { 0 };
    write_header(&mut out, kind, flags, 0, plain_len, payload_len, id);
    out[32..36].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = header_crc(&out, OBJECT_HEADER_LEN);
    out[36..40].copy_from_slice(&crc.to_le_bytes());
    out
}

/// An uncompressed sealed object whose plaintext is handed over in pieces (a large
/// version object, sealed into a file as it is read from another): the header, the
/// envelope and the associated data are fixed first, the checksums and the tag when the
/// last piece is in. The bytes are those [`finish_object`] makes of the same plaintext.
pub(crate) struct SealingObject {
    header: Vec<u8>,
    stream: aes::SealStream,
    crc: crc32fast::Hasher,
    plain_len: u64,
    /// Plaintext bytes still to come.
    left: u64,
}

impl SealingObject {
    /// Starts an object of `kind` whose content id is `id` and plaintext `plain_len`
    /// bytes, sealed with the codec's current master key.
    pub(crate) fn new(codec: &Codec, kind: ObjectKind, id: &[u8; ID_LEN], plain_len: u64) -> Result<Self, ObjectError> {
        check_plain_len(kind, plain_len)?;
        let encode = |reason: String| ObjectError::Encode { len: plain_len, reason };
        let master = codec.current_master().ok_or_else(|| encode("the storage is not encrypted".into()))?;
        let mut header = vec![0u8; OBJECT_HEADER_LEN + aes::ENVELOPE_LEN];
        let payload_len = plain_len + aes::TAG_LEN as u64;
        write_header(&mut header, kind, FLAG_AES256GCM, aes::ENVELOPE_LEN, plain_len, payload_len, id);
        let stream = aes::seal_stream(master, id, &sealing_aad(&header)).map_err(|e| encode(e.to_string()))?;
        header[OBJECT_HEADER_LEN..].copy_from_slice(stream.envelope());
        Ok(SealingObject { header, stream, crc: crc32fast::Hasher::new(), plain_len, left: plain_len })
    }

    /// Seals the next piece of the plaintext in place.
    pub(crate) fn seal(&mut self, piece: &mut [u8]) -> Result<(), ObjectError> {
        let len = self.plain_len;
        if piece.len() as u64 > self.left {
            return Err(ObjectError::Encode { len, reason: "more plaintext than its header says".into() });
        }
        self.left -= piece.len() as u64;
        self.stream.seal(piece).map_err(|e| ObjectError::Encode { len, reason: e.to_string() })?;
        self.crc.update(piece);
        Ok(())
    }

    /// The object's header (envelope included) and the tag that follows the ciphertext.
    pub(crate) fn finish(self) -> Result<(Vec<u8>, [u8; aes::TAG_LEN]), ObjectError> {
        let len = self.plain_len;
        if self.left != 0 {
            return Err(ObjectError::Encode { len, reason: format!("{} bytes of plaintext missing", self.left) });
        }
        let tag = self.stream.finish().map_err(|e| ObjectError::Encode { len, reason: e.to_string() })?;
        let mut crc = self.crc;
        crc.update(&tag);
        let mut header = self.header;
        header[32..36].copy_from_slice(&crc.finalize().to_le_bytes());
        let header_crc = header_crc(&header, header.len());
        header[36..40].copy_from_slice(&header_crc.to_le_bytes());
        Ok((header, tag))
    }
}

/// Starts opening the payload of a sealed object, uncompressed, in pieces; `header_bytes`
/// are its header's bytes (for the associated data). Refuses what [`check_seal`]
/// refuses.
pub(crate) fn open_stream(
    codec: &Codec,
    header: &ObjectHeader,
    header_bytes: &[u8],
) -> Result<aes::OpenStream, ObjectError> {
    check_seal(codec, header)?;
    if header.flags != FLAG_AES256GCM || header_bytes.len() < OBJECT_HEADER_LEN {
        return Err(ObjectError::UnknownFlags(header.flags));
    }
    let aad = sealing_aad(header_bytes);
    Ok(aes::open_stream(|k| codec.master(k), &header.envelope, &header.id, &aad)?)
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
    // A length decides an allocation when the object is decoded: one no object of its
    // kind can have is damage, found before anything is allocated.
    let kind = u16_at(bytes, 10);
    let plain_len = u64_at(bytes, 16);
    if let Some(max) = max_plain_len(kind)
        && plain_len > max
    {
        return Err(ObjectError::TooLarge { kind, claimed: plain_len, max });
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&bytes[40..72]);
    Ok((
        ObjectHeader {
            kind,
            flags,
            plain_len,
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
    Ok((header, payload))
}

/// Whether an object's sealing fits its storage's codec, from the header alone: a sealed
/// object in a plain storage, a plain object in an encrypted one, and a sealed object
/// whose master key is not at hand are refused (decoding and the light scrub both ask).
pub(crate) fn check_seal(codec: &Codec, header: &ObjectHeader) -> Result<(), ObjectError> {
    let key = aes::envelope_key(&header.envelope);
    match (header.flags & FLAG_AES256GCM != 0, codec.is_sealed()) {
        (false, false) => Ok(()),
        (false, true) => Err(ObjectError::NotEncrypted),
        (true, false) => Err(ObjectError::Encrypted { key_id: key.map(|k| k.to_hex()).unwrap_or_default() }),
        (true, true) => {
            let key = key.ok_or(ObjectError::Authentication("envelope length"))?;
            match codec.master(key) {
                Some(_) => Ok(()),
                None => Err(ObjectError::UnknownKey { key_id: key.to_hex() }),
            }
        }
    }
}

thread_local! {
    /// Where a sealed and compressed payload is decrypted before it is decompressed;
    /// kept per thread so that restores and reads do not allocate per block.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Undoes the transforms of a checked object into `out` (exactly `plain_len` bytes):
/// opens the seal (when the codec is encrypted; a sealed object in a plain storage and a
/// plain object in an encrypted one are both refused), then decompresses.
fn untransform(
    codec: &Codec,
    bytes: &[u8],
    header: &ObjectHeader,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), ObjectError> {
    check_seal(codec, header)?;
    let n = if header.flags & FLAG_AES256GCM != 0 {
        if payload.len() < aes::TAG_LEN {
            return Err(ObjectError::Authentication("payload shorter than its tag"));
        }
        let (body, tag) = payload.split_at(payload.len() - aes::TAG_LEN);
        let aad = sealing_aad(bytes);
        let open = |out: &mut [u8]| {
            aes::open(|k| codec.master(k), &header.envelope, &header.id, &aad, body, tag, out)
                .map_err(ObjectError::from)
        };
        if header.flags & FLAG_ZSTD != 0 {
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                s.resize(body.len(), 0);
                open(&mut s)?;
                transform::zstd::decompress_into(&s, out).map_err(|e| ObjectError::Decompress(e.to_string()))
            })?
        } else if body.len() == out.len() {
            // Decrypted straight into the destination: no copy.
            open(out)?;
            body.len()
        } else {
            body.len()
        }
    } else if header.flags & FLAG_ZSTD != 0 {
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

/// Decodes an unencrypted object of the expected kind: checks both checksums, undoes the
/// transforms and checks the plaintext length. The caller checks the content against its id.
pub fn decode_object(bytes: &[u8], kind: ObjectKind) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    decode_with(Codec::plain(), bytes, kind)
}

pub(crate) fn decode_with(
    codec: &Codec,
    bytes: &[u8],
    kind: ObjectKind,
) -> Result<(ObjectHeader, Vec<u8>), ObjectError> {
    let (header, payload) = checked_payload(bytes, kind)?;
    // The header's plaintext length is within its kind's bound (parse_header); an
    // uncompressed payload must be exactly that long, which is checked before allocating.
    if header.flags & FLAG_ZSTD == 0 {
        let tag = if header.flags & FLAG_AES256GCM != 0 { aes::TAG_LEN as u64 } else { 0 };
        let found = (payload.len() as u64).saturating_sub(tag);
        if found != header.plain_len {
            return Err(ObjectError::PlainLength { expected: header.plain_len, found });
        }
    }
    let mut plain = vec![0u8; header.plain_len as usize];
    untransform(codec, bytes, &header, payload, &mut plain)?;
    Ok((header, plain))
}

/// Decodes into the start of `out` (which must hold the whole plaintext); returns its length.
pub(crate) fn decode_into_with(
    codec: &Codec,
    bytes: &[u8],
    kind: ObjectKind,
    out: &mut [u8],
) -> Result<usize, ObjectError> {
    let (header, payload) = checked_payload(bytes, kind)?;
    let n = header.plain_len;
    if n > out.len() as u64 {
        return Err(ObjectError::PlainLength { expected: out.len() as u64, found: n });
    }
    untransform(codec, bytes, &header, payload, &mut out[..n as usize])?;
    Ok(n as usize)
}

/// The header and envelope of a sealed object with its data key rewrapped by the codec's
/// current master key; `None` when it is sealed with that key already.
pub(crate) fn rewrap_with(codec: &Codec, bytes: &[u8]) -> Result<Option<Vec<u8>>, ObjectError> {
    let (header, header_len) = parse_header(bytes)?;
    if header.flags & FLAG_AES256GCM == 0 {
        return Err(ObjectError::NotEncrypted);
    }
    let (Some(current), Some(key)) = (codec.current_master(), aes::envelope_key(&header.envelope)) else {
        return Err(ObjectError::Authentication("envelope length"));
    };
    if key == current.id() {
        return Ok(None);
    }
    let envelope = aes::rewrap(|k| codec.master(k), current, &header.envelope, &header.id)?;
    let mut prefix = bytes[..header_len].to_vec();
    prefix[OBJECT_HEADER_LEN..header_len].copy_from_slice(&envelope);
    let crc = header_crc(&prefix, header_len);
    prefix[36..40].copy_from_slice(&crc.to_le_bytes());
    Ok(Some(prefix))
}

/// Decodes an unencrypted block object and checks that its content hashes to `id`.
pub fn decode_block(bytes: &[u8], id: &BlockId) -> Result<Vec<u8>, ObjectError> {
    Codec::plain().decode_block(bytes, id)
}

/// Decodes an unencrypted block object into the start of `out`, checks it against `id`
/// and returns its length.
pub fn decode_block_into(bytes: &[u8], id: &BlockId, out: &mut [u8]) -> Result<usize, ObjectError> {
    Codec::plain().decode_block_into(bytes, id, out)
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
        let obj = encode_object(ObjectKind::Block, &id.0, &compressible, 1).unwrap();
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
        let obj = encode_object(ObjectKind::Block, &id.0, &random, 3).unwrap();
        assert_eq!(obj.len(), OBJECT_HEADER_LEN + random.len(), "incompressible data is stored as is");
        assert_eq!(decode_block(&obj, &id).unwrap(), random);
    }

    #[test]
    fn damage_is_detected() {
        let data = vec![b'x'; 5000];
        let id = BlockId::of(&data);
        let obj = encode_object(ObjectKind::Block, &id.0, &data, 1).unwrap();
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

    /// An object whose header claims `plain_len`, its header checksum made to match (as
    /// damage could, or anyone who can write to the storage).
    fn claiming(kind: ObjectKind, plain_len: u64) -> Vec<u8> {
        let data = vec![b'y'; 5000];
        let mut obj = encode_object(kind, &BlockId::of(&data).0, &data, 1).unwrap();
        obj[16..24].copy_from_slice(&plain_len.to_le_bytes());
        let crc = header_crc(&obj, OBJECT_HEADER_LEN);
        obj[36..40].copy_from_slice(&crc.to_le_bytes());
        obj
    }

    #[test]
    fn a_header_claiming_a_huge_plaintext_is_damage_before_any_allocation() {
        // 64 GiB: decoding allocated this much before reading anything else.
        let obj = claiming(ObjectKind::Block, 1 << 36);
        let err = decode_object(&obj, ObjectKind::Block).unwrap_err();
        assert_eq!(err, ObjectError::TooLarge { kind: 1, claimed: 1 << 36, max: MAX_BLOCK_LEN });
        assert!(err.to_string().contains("header damaged"), "{err}");
        // The light scrub's check (the header alone) sees it too.
        assert!(matches!(parse_header(&obj), Err(ObjectError::TooLarge { .. })));
        // Just over the largest block; a version object has its own, larger bound.
        assert!(matches!(
            decode_object(&claiming(ObjectKind::Block, MAX_BLOCK_LEN + 1), ObjectKind::Block),
            Err(ObjectError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_object(&claiming(ObjectKind::Version, MAX_VERSION_PLAIN_LEN + 1), ObjectKind::Version),
            Err(ObjectError::TooLarge { kind: 2, .. })
        ));
        // Within the bound, but an uncompressed payload of another length: refused before
        // allocating what the header claims.
        let data = common_random(5000);
        let mut obj = encode_object(ObjectKind::Block, &BlockId::of(&data).0, &data, 1).unwrap();
        assert_eq!(obj[12] as u16 & FLAG_ZSTD, 0);
        obj[16..24].copy_from_slice(&(MAX_BLOCK_LEN).to_le_bytes());
        let crc = header_crc(&obj, OBJECT_HEADER_LEN);
        obj[36..40].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_object(&obj, ObjectKind::Block).unwrap_err(),
            ObjectError::PlainLength { expected: MAX_BLOCK_LEN, found: 5000 }
        );
    }

    fn common_random(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn an_object_over_its_kinds_bound_is_not_built() {
        let big = vec![1u8; MAX_BLOCK_LEN as usize + 1];
        let err = encode_object(ObjectKind::Block, &[0u8; 32], &big, 0).unwrap_err();
        assert!(matches!(err, ObjectError::Encode { len, .. } if len == MAX_BLOCK_LEN + 1), "{err}");
        assert!(encode_object(ObjectKind::Block, &[0u8; 32], &big[..MAX_BLOCK_LEN as usize], 0).is_ok());
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
