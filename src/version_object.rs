//! The version object (`versions/<uid>`): a version's fields, labels and block index in
//! its storage, what makes the storage alone enough to restore every version (and to
//! rebuild the catalog). Building it (in memory; for a large index, as a stream from the
//! index's file), reading it back, and checking a large one as a stream of ranged reads
//! (a scrub). Layout in docs/format.md, "Version object".

use crate::block::ObjectKind;
use crate::error::{Error, Result};
use crate::index::{BlockIndex, IndexFile};
use crate::transform::Codec;
use crate::version::{Version, VersionUid};

/// The storage key of a version's metadata object.
pub fn version_key(uid: VersionUid) -> String {
    format!("versions/{uid}")
}

const VERSION_OBJECT_MAGIC: [u8; 8] = *b"KEEPFSVM";
const VERSION_OBJECT_FORMAT: u16 = 1;

/// Builds the storage object that makes a version restorable from the storage alone: its
/// fields and labels (JSON) followed by its block index. Layout in docs/format.md.
pub fn encode_version_object(codec: &Codec, version: &Version, index: &BlockIndex) -> Result<Vec<u8>> {
    crate::index::check_block_count(index.size, index.block_size)?;
    let mut plain = version_object_head(version)?;
    index.encode_into(&mut plain)?;
    seal_version_object(codec, version, &plain)
}

/// The start of a version object's plaintext: magic, format, its fields as JSON.
fn version_object_head(version: &Version) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(version).map_err(|e| Error::Other(format!("cannot encode version metadata: {e}")))?;
    if json.len() as u64 > crate::block::MAX_VERSION_JSON_LEN {
        return Err(Error::Invalid(format!(
            "the metadata of version {} is {} bytes, more than a version may carry ({}): use fewer or shorter labels",
            version.uid,
            json.len(),
            crate::block::MAX_VERSION_JSON_LEN
        )));
    }
    let mut plain = Vec::with_capacity(16 + json.len() + crate::index::INDEX_HEADER_LEN);
    plain.extend_from_slice(&VERSION_OBJECT_MAGIC);
    plain.extend_from_slice(&VERSION_OBJECT_FORMAT.to_le_bytes());
    plain.extend_from_slice(&0u16.to_le_bytes());
    plain.extend_from_slice(&(json.len() as u32).to_le_bytes());
    plain.extend_from_slice(&json);
    Ok(plain)
}

/// The version object of a plaintext (its head, then its index): compressed, and sealed
/// if the storage is encrypted.
pub fn seal_version_object(codec: &Codec, version: &Version, plain: &[u8]) -> Result<Vec<u8>> {
    let id = codec.id_of(plain);
    codec
        .encode(ObjectKind::Version, &id.0, plain, 3)
        .map_err(|e| Error::Object { context: format!("version object of {}", version.uid), source: e })
}

/// A version object whose index is longer than 64 MiB is built and stored as a stream
/// from the index's file (uncompressed: its index is a zstd frame already), not in
/// memory; smaller ones are built as [`encode_version_object`] does.
fn streamed_version_index_len() -> u64 {
    #[cfg(debug_assertions)]
    if let Some(n) = std::env::var("KEEPFS_TEST_STREAMED_INDEX").ok().and_then(|v| v.parse::<u64>().ok()) {
        return n;
    }
    64 << 20
}

/// Stores the version object of `version`, whose stored index is `index`, under its key
/// (retrying transient failures). Memory stays small for any index in a plain storage;
/// an encrypted one seals the object in memory (AES-GCM in one pass): one copy of the
/// index.
pub fn store_version_object(storage: &dyn crate::storage::Storage, version: &Version, index: &IndexFile) -> Result<()> {
    use crate::backup::STORAGE_ATTEMPTS;
    use crate::storage::{LargeObject, Piece, retry};
    let key = version_key(version.uid);
    let codec = storage.codec();
    let context = || format!("version object of {}", version.uid);
    let mut plain = version_object_head(version)?;
    if index.len() <= streamed_version_index_len() {
        plain.extend_from_slice(&index.to_vec()?);
        let object = seal_version_object(codec, version, &plain)?;
        return Ok(retry(STORAGE_ATTEMPTS, || storage.put(&key, &object))?);
    }
    let head = plain;
    let plain_len = head.len() as u64 + index.len();
    crate::block::check_plain_len(ObjectKind::Version, plain_len)
        .map_err(|e| Error::Object { context: context(), source: e })?;
    let read_err = |e: std::io::Error| Error::io("cannot read the block index file", e);
    // One pass for the content id (and the payload's CRC: the payload is the plaintext).
    let mut id = codec.id_hasher();
    let mut crc = crc32fast::Hasher::new();
    id.update(&head);
    crc.update(&head);
    let mut r = index.reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut r, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        id.update(&buf[..n]);
        crc.update(&buf[..n]);
    }
    drop(buf);
    let id = id.finish();
    if codec.is_sealed() {
        let header_len = crate::block::object_header_len(codec);
        let mut out = Vec::with_capacity(header_len + plain_len as usize + 16);
        out.resize(header_len, 0);
        out.extend_from_slice(&head);
        std::io::Read::read_to_end(&mut index.reader(), &mut out).map_err(read_err)?;
        crate::block::finish_object(codec, ObjectKind::Version, &id.0, plain_len, false, &mut out)
            .map_err(|e| Error::Object { context: context(), source: e })?;
        return Ok(retry(STORAGE_ATTEMPTS, || storage.put(&key, &out))?);
    }
    let header =
        crate::block::plain_object_header(ObjectKind::Version, &id.0, plain_len, false, plain_len, crc.finalize());
    let object = LargeObject {
        pieces: vec![
            Piece::Bytes(&header),
            Piece::Bytes(&head),
            Piece::File { file: index.file(), offset: 0, len: index.len() },
        ],
    };
    Ok(retry(STORAGE_ATTEMPTS, || storage.put_large(&key, &object))?)
}

/// Reads a version object back but its block index: the version, the plaintext, and
/// where in it the stored index starts (not checked yet: `BlockIndex::decode` or
/// `BlockIndex::visit` does that).
pub fn decode_version_object_parts(codec: &Codec, bytes: &[u8]) -> Result<(Version, Vec<u8>, usize)> {
    let ctx = |m: &str| Error::Other(format!("version object: {m}"));
    let (header, plain) = codec
        .decode(bytes, ObjectKind::Version)
        .map_err(|e| Error::Object { context: "version object".into(), source: e })?;
    if codec.id_of(&plain).0 != header.id {
        return Err(ctx("content does not match its checksum"));
    }
    if plain.len() < 16 || plain[0..8] != VERSION_OBJECT_MAGIC {
        return Err(ctx("bad magic number"));
    }
    let fmt = u16::from_le_bytes([plain[8], plain[9]]);
    if fmt != VERSION_OBJECT_FORMAT {
        return Err(ctx(&format!("format version {fmt} is not supported")));
    }
    let json_len = u32::from_le_bytes([plain[12], plain[13], plain[14], plain[15]]) as usize;
    let json = plain.get(16..16 + json_len).ok_or_else(|| ctx("truncated metadata"))?;
    let version: Version = serde_json::from_slice(json).map_err(|e| ctx(&format!("bad metadata: {e}")))?;
    Ok((version, plain, 16 + json_len))
}

/// Reads a version object back (the inverse of [`encode_version_object`]).
pub fn decode_version_object(codec: &Codec, bytes: &[u8]) -> Result<(Version, BlockIndex)> {
    let (version, plain, at) = decode_version_object_parts(codec, bytes)?;
    let index = BlockIndex::decode(&plain[at..])
        .map_err(|e| Error::Index { context: format!("index of {}", version.uid), source: e })?;
    Ok((version, index))
}

/// What reading a version object as a stream found.
pub(crate) enum Streamed {
    /// Not a large object stored as a stream (compressed, sealed, or small): read it
    /// whole.
    NotLarge,
    /// It decodes: its fields, and the [`crate::index::IndexDigest`] of its index.
    Read { version: Box<Version>, index: [u8; 32] },
    /// It fails its checks: what is wrong.
    Damaged(String),
}

/// Bytes per ranged read of a version object read as a stream.
const RANGE_PIECE: u64 = 4 << 20;

/// Reads a large version object (plain, uncompressed: how one is stored when its index
/// is over the threshold of [`store_version_object`]) as a stream of ranged reads,
/// checking what decoding it whole checks: header, length, payload checksum, content id,
/// magic, format, fields, and the index (given back as its digest, never held). The
/// checksums are known only at the end: a body that is malformed and fails them is
/// reported as failing them (damage, whatever it looks like). An error is the storage's.
pub(crate) fn read_streamed(
    storage: &dyn crate::storage::Storage,
    key: &str,
) -> crate::storage::StorageResult<Streamed> {
    use crate::backup::STORAGE_ATTEMPTS;
    use crate::block::{OBJECT_HEADER_LEN, ObjectError, parse_header};
    use crate::storage::retry;
    use std::io::Read;
    let codec = storage.codec();
    if codec.is_sealed() {
        return Ok(Streamed::NotLarge); // sealed objects are opened whole (AES-GCM)
    }
    let head = retry(STORAGE_ATTEMPTS, || {
        storage.get_range(key, 0, (OBJECT_HEADER_LEN + crate::transform::aes::ENVELOPE_LEN) as u64)
    })?;
    let Ok((header, header_len)) = parse_header(&head) else {
        return Ok(Streamed::NotLarge); // the whole reading names the damage
    };
    if header.flags != 0 || header.payload_len <= streamed_version_index_len() {
        return Ok(Streamed::NotLarge);
    }
    if header.kind != ObjectKind::Version as u16 {
        let e = ObjectError::WrongKind { expected: ObjectKind::Version as u16, found: header.kind };
        return Ok(Streamed::Damaged(e.to_string()));
    }
    let end = header_len as u64 + header.payload_len;
    let mut body = Ranged {
        storage,
        key,
        at: header_len as u64,
        end,
        piece: Vec::new(),
        used: 0,
        failed: None,
        longer: false,
        crc: crc32fast::Hasher::new(),
        id: codec.id_hasher(),
        read: 0,
    };
    let decoded = decode_streamed(&mut body);
    // The rest (after a failure) still counts towards the checksums.
    let mut sink = vec![0u8; 64 << 10];
    while matches!(body.read(&mut sink), Ok(n) if n > 0) {}
    if let Some(e) = body.failed {
        return Err(e);
    }
    let found = header_len as u64 + body.read + body.longer as u64;
    if body.read != header.payload_len || body.longer {
        return Ok(Streamed::Damaged(ObjectError::Length { expected: end, found }.to_string()));
    }
    if body.crc.finalize() != header.payload_crc {
        return Ok(Streamed::Damaged(ObjectError::PayloadChecksum.to_string()));
    }
    if header.plain_len != header.payload_len {
        let e = ObjectError::PlainLength { expected: header.plain_len, found: header.payload_len };
        return Ok(Streamed::Damaged(e.to_string()));
    }
    if body.id.finish().0 != header.id {
        return Ok(Streamed::Damaged("version object: content does not match its checksum".into()));
    }
    Ok(match decoded {
        Ok((version, index)) => Streamed::Read { version: Box::new(version), index },
        Err(m) => Streamed::Damaged(m),
    })
}

/// The fields and index digest of a version object's plaintext, read from `r`.
fn decode_streamed(r: &mut impl std::io::Read) -> std::result::Result<(Version, [u8; 32]), String> {
    let ctx = |m: &str| format!("version object: {m}");
    let mut head = [0u8; 16];
    r.read_exact(&mut head).map_err(|_| ctx("truncated metadata"))?;
    if head[0..8] != VERSION_OBJECT_MAGIC {
        return Err(ctx("bad magic number"));
    }
    let fmt = u16::from_le_bytes([head[8], head[9]]);
    if fmt != VERSION_OBJECT_FORMAT {
        return Err(ctx(&format!("format version {fmt} is not supported")));
    }
    let json_len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as u64;
    if json_len > crate::block::MAX_VERSION_JSON_LEN {
        return Err(ctx("truncated metadata"));
    }
    let mut json = vec![0u8; json_len as usize];
    r.read_exact(&mut json).map_err(|_| ctx("truncated metadata"))?;
    let version: Version = serde_json::from_slice(&json).map_err(|e| ctx(&format!("bad metadata: {e}")))?;
    let mut digest = crate::index::IndexDigest::default();
    let walked = BlockIndex::visit_reader(r, |i, id| {
        digest.add(i, id);
        true
    });
    match walked {
        Ok(Some(head)) => Ok((version, digest.finish(&head))),
        Ok(None) => Err(ctx("index stopped early")),
        Err(e) => Err(Error::Index { context: format!("index of {}", version.uid), source: e }.to_string()),
    }
}

/// The payload of an object read a range at a time, hashed (CRC-32 and content id) as
/// it passes. A storage error ends it (kept in `failed`); so does the payload's end,
/// where one byte more is asked for to find an object longer than its header says.
struct Ranged<'a> {
    storage: &'a dyn crate::storage::Storage,
    key: &'a str,
    at: u64,
    end: u64,
    piece: Vec<u8>,
    used: usize,
    failed: Option<crate::storage::StorageError>,
    longer: bool,
    crc: crc32fast::Hasher,
    id: crate::transform::IdHasher,
    /// Payload bytes read.
    read: u64,
}

impl std::io::Read for Ranged<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.used == self.piece.len() {
            if self.at >= self.end || self.failed.is_some() {
                return Ok(0);
            }
            let want = (self.end - self.at).min(RANGE_PIECE);
            let last = self.at + want == self.end;
            let (storage, key, at) = (self.storage, self.key, self.at);
            let got = crate::storage::retry(crate::backup::STORAGE_ATTEMPTS, || {
                storage.get_range(key, at, want + last as u64)
            });
            let mut piece = match got {
                Ok(p) => p,
                Err(e) => {
                    self.failed = Some(e);
                    return Err(std::io::Error::other("the storage failed"));
                }
            };
            if piece.len() as u64 > want {
                self.longer = true;
                piece.truncate(want as usize);
            }
            if (piece.len() as u64) < want {
                self.end = self.at + piece.len() as u64; // shorter than its header says
            }
            self.at += piece.len() as u64;
            self.crc.update(&piece);
            self.id.update(&piece);
            self.read += piece.len() as u64;
            self.piece = piece;
            self.used = 0;
            if self.piece.is_empty() {
                return Ok(0);
            }
        }
        let n = (self.piece.len() - self.used).min(buf.len());
        buf[..n].copy_from_slice(&self.piece[self.used..self.used + n]);
        self.used += n;
        Ok(n)
    }
}
