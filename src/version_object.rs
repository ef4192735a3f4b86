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

/// A version object whose index is longer than 8 MiB is built and stored as a stream
/// from the index's file (uncompressed: its index is a zstd frame already), not in
/// memory; smaller ones are built as [`encode_version_object`] does, which holds the
/// index two or three times over for a moment (plaintext, a read of the file, the
/// compressed object). At 8 MiB (262,144 data blocks: a dense 1 TiB image at 4 MiB
/// blocks) that is some 24 MiB; it was 64 MiB, up to 190 MiB at a commit or a label.
fn streamed_version_index_len() -> u64 {
    crate::test_knobs::number("KEEPFS_TEST_STREAMED_INDEX").unwrap_or(8 << 20)
}

/// Whether an object of `len` bytes may be a large version object, read as a stream
/// (one no longer than the threshold is read whole, without asking for its header first).
pub(crate) fn may_be_streamed(len: u64) -> bool {
    len > streamed_version_index_len()
}

/// Stores the version object of `version`, whose stored index is `index`, under its key
/// (retrying transient failures). Memory stays small for any index: in an encrypted
/// storage a large object is sealed into a spool file first (one more copy of the index,
/// on disk, gone with the call).
pub fn store_version_object(storage: &dyn crate::storage::Storage, version: &Version, index: &IndexFile) -> Result<()> {
    store_with(storage, version, index, streamed_version_index_len())
}

/// [`store_version_object`], streaming an index longer than `streamed` bytes.
fn store_with(
    storage: &dyn crate::storage::Storage,
    version: &Version,
    index: &IndexFile,
    streamed: u64,
) -> Result<()> {
    use crate::storage::STORAGE_ATTEMPTS;
    use crate::storage::{LargeObject, Piece, retry};
    let key = version_key(version.uid);
    let codec = storage.codec();
    let context = || format!("version object of {}", version.uid);
    let mut plain = version_object_head(version)?;
    if index.len() <= streamed {
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
        // Sealed into a file beside the index's, a piece at a time (AES-GCM in pieces
        // gives the bytes of one pass), then stored from it as a plain one is.
        let sealing = crate::block::SealingObject::new(codec, ObjectKind::Version, &id.0, plain_len)
            .map_err(|e| Error::Object { context: context(), source: e })?;
        let (header, sealed) = seal_into_file(sealing, &head, index).map_err(|e| match e {
            Sealed::Io(e) => {
                Error::io(format!("cannot write the sealed version object in {}", index.dir().display()), e)
            }
            Sealed::Object(e) => Error::Object { context: context(), source: e },
        })?;
        let object = LargeObject {
            pieces: vec![
                Piece::Bytes(&header),
                Piece::File { file: &sealed, offset: 0, len: plain_len + crate::transform::aes::TAG_LEN as u64 },
            ],
        };
        return Ok(retry(STORAGE_ATTEMPTS, || storage.put_large(&key, &object))?);
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

/// Why sealing a version object into a file failed.
enum Sealed {
    Io(std::io::Error),
    Object(crate::block::ObjectError),
}

/// Seals `head` and then the index of `index` into an unnamed file in the index's spool
/// directory: the ciphertext and its tag. Gives back the object's header and that file.
fn seal_into_file(
    mut sealing: crate::block::SealingObject,
    head: &[u8],
    index: &IndexFile,
) -> std::result::Result<(Vec<u8>, std::fs::File), Sealed> {
    use std::io::{Read, Write};
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        crate::perms::Modes::PRIVATE.unnamed_file(index.dir()).map_err(Sealed::Io)?,
    );
    let mut buf = head.to_vec();
    sealing.seal(&mut buf).map_err(Sealed::Object)?;
    out.write_all(&buf).map_err(Sealed::Io)?;
    buf.resize(1 << 20, 0);
    let mut r = index.reader();
    loop {
        let n = r.read(&mut buf).map_err(Sealed::Io)?;
        if n == 0 {
            break;
        }
        sealing.seal(&mut buf[..n]).map_err(Sealed::Object)?;
        out.write_all(&buf[..n]).map_err(Sealed::Io)?;
    }
    let (header, tag) = sealing.finish().map_err(Sealed::Object)?;
    out.write_all(&tag).map_err(Sealed::Io)?;
    let file = out.into_inner().map_err(|e| Sealed::Io(e.into_error()))?;
    Ok((header, file))
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
    /// Not a large object stored as a stream (compressed, or small): read it whole.
    NotLarge,
    /// It decodes: its fields, the [`crate::index::IndexDigest`] of its index, and the
    /// index itself in a spool file when it was asked to be kept.
    Read { version: Box<Version>, index: [u8; 32], kept: Option<IndexFile> },
    /// It fails its checks: what is wrong.
    Damaged(String),
    /// The index could not be kept (a local error: the spool's disk is full).
    NotKept(Error),
}

/// Where to keep a streamed version object's index: a spool directory.
#[derive(Clone)]
pub(crate) struct Keep {
    pub dir: std::path::PathBuf,
    pub modes: crate::perms::Modes,
}

/// A version's index as read from its version object: kept in a spool file (a large
/// object, read as a stream), or decoded (a small one, read whole).
pub(crate) enum Recovered {
    Kept(IndexFile),
    Whole(BlockIndex),
}

impl Recovered {
    /// The uid its index says it is of.
    pub fn uid(&self) -> u64 {
        match self {
            Recovered::Kept(file) => file.header().uid,
            Recovered::Whole(index) => index.uid,
        }
    }

    /// Hands every data block to `each`, in block order (a kept one is read back from
    /// its file, checked again).
    pub fn walk(&self, mut each: impl FnMut(u64, crate::block::BlockId)) -> Result<()> {
        match self {
            Recovered::Kept(file) => {
                BlockIndex::visit_reader(file.reader(), |i, id| {
                    each(i, id);
                    true
                })
                .map_err(|e| {
                    let uid = crate::version::VersionUid(file.header().uid);
                    Error::Index { context: format!("index of {uid}"), source: e }
                })?;
            }
            Recovered::Whole(index) => index.entries.data().for_each(|(i, id)| each(i, id)),
        }
        Ok(())
    }

    /// Calls `f` with the stored index as a stream (for the catalog).
    pub fn with_bytes<T>(&self, f: impl FnOnce(crate::catalog::IndexBytes<'_>) -> Result<T>) -> Result<T> {
        match self {
            Recovered::Kept(file) => f(crate::catalog::IndexBytes { len: file.len(), bytes: &mut file.reader() }),
            Recovered::Whole(index) => {
                let encoded = index.encode()?;
                f(crate::catalog::IndexBytes::of(&mut &encoded[..]))
            }
        }
    }
}

/// What reading a version object found.
pub(crate) enum Found {
    Read(Box<Version>, Recovered),
    /// It fails its checks (twice, when read as a stream): what is wrong.
    Damaged(String),
    /// There is no such object.
    Missing,
}

/// Reads the version object `key` back, its fields and its index: as a stream, the index
/// kept in a file in `keep`, when it may be large (`len`, its length if known, is over
/// the threshold), else whole. An error is the storage's, or a local one (the spool).
pub(crate) fn read_version_object(
    storage: &dyn crate::storage::Storage,
    key: &str,
    keep: Keep,
    len: Option<u64>,
) -> Result<Found> {
    use crate::storage::StorageError;
    let mut streamed = Ok(Streamed::NotLarge);
    if len.is_none_or(may_be_streamed) {
        for _ in 0..2 {
            // Read in ranges, it may have been rewritten between two of them: damage is
            // what a second reading finds too.
            streamed = read_streamed_kept(storage, key, keep.clone());
            if !matches!(streamed, Ok(Streamed::Damaged(_))) {
                break;
            }
        }
    }
    match streamed {
        Ok(Streamed::Read { version, kept: Some(index), .. }) => {
            return Ok(Found::Read(version, Recovered::Kept(index)));
        }
        Ok(Streamed::Damaged(e)) => return Ok(Found::Damaged(e)),
        Ok(Streamed::NotKept(e)) => return Err(e),
        Err(StorageError::NotFound { .. }) => return Ok(Found::Missing),
        Err(e) => return Err(e.into()),
        Ok(Streamed::NotLarge | Streamed::Read { kept: None, .. }) => {}
    }
    let bytes = match crate::storage::retry(crate::storage::STORAGE_ATTEMPTS, || storage.get_fresh(key)) {
        Ok(bytes) => bytes,
        Err(StorageError::NotFound { .. }) => return Ok(Found::Missing),
        Err(e) => return Err(e.into()),
    };
    Ok(match decode_version_object(storage.codec(), &bytes) {
        Ok((v, index)) => Found::Read(Box::new(v), Recovered::Whole(index)),
        Err(e) => Found::Damaged(e.to_string()),
    })
}

/// Bytes per ranged read of a version object read as a stream.
const RANGE_PIECE: u64 = 4 << 20;

/// Reads a large version object (uncompressed, sealed or not: how one is stored when its
/// index is over the threshold of [`store_version_object`]) as a stream of ranged reads,
/// checking what decoding it whole checks: header, length, payload checksum, seal,
/// content id, magic, format, fields, and the index (given back as its digest, never
/// held). The
/// checksums are known only at the end: a body that is malformed and fails them is
/// reported as failing them (damage, whatever it looks like). An error is the storage's.
pub(crate) fn read_streamed(
    storage: &dyn crate::storage::Storage,
    key: &str,
) -> crate::storage::StorageResult<Streamed> {
    read_streamed_with(storage, key, streamed_version_index_len(), None)
}

/// [`read_streamed`], keeping the index (as it is stored, checked) in a file in `keep`:
/// what a rebuild records a large version from without holding its index.
pub(crate) fn read_streamed_kept(
    storage: &dyn crate::storage::Storage,
    key: &str,
    keep: Keep,
) -> crate::storage::StorageResult<Streamed> {
    read_streamed_with(storage, key, streamed_version_index_len(), Some(keep))
}

/// [`read_streamed`], for an object whose payload is longer than `streamed` bytes.
fn read_streamed_with(
    storage: &dyn crate::storage::Storage,
    key: &str,
    streamed: u64,
    keep: Option<Keep>,
) -> crate::storage::StorageResult<Streamed> {
    use crate::block::{OBJECT_HEADER_LEN, ObjectError, parse_header};
    use crate::storage::STORAGE_ATTEMPTS;
    use crate::storage::retry;
    use std::io::Read;
    let codec = storage.codec();
    let head = retry(STORAGE_ATTEMPTS, || {
        storage.get_range(key, 0, (OBJECT_HEADER_LEN + crate::transform::aes::ENVELOPE_LEN) as u64)
    })?;
    let Ok((header, header_len)) = parse_header(&head) else {
        return Ok(Streamed::NotLarge); // the whole reading names the damage
    };
    if header.flags & crate::block::FLAG_ZSTD != 0 || header.payload_len <= streamed {
        return Ok(Streamed::NotLarge);
    }
    if header.kind != ObjectKind::Version as u16 {
        let e = ObjectError::WrongKind { expected: ObjectKind::Version as u16, found: header.kind };
        return Ok(Streamed::Damaged(e.to_string()));
    }
    let stream = if codec.is_sealed() {
        match crate::block::open_stream(codec, &header, &head) {
            Ok(stream) => Some(stream),
            Err(e) => return Ok(Streamed::Damaged(e.to_string())),
        }
    } else if let Err(e) = crate::block::check_seal(codec, &header) {
        return Ok(Streamed::Damaged(e.to_string()));
    } else {
        None
    };
    let sealed = stream.is_some();
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
        read: 0,
    };
    let mut plain = Plain::new(&mut body, stream, codec.id_hasher());
    let decoded = decode_streamed(&mut plain, keep);
    // The rest (after a failure) still counts towards the checksums.
    let mut sink = vec![0u8; 64 << 10];
    while matches!(plain.read(&mut sink), Ok(n) if n > 0) {}
    let (authentic, id) = (plain.authentic, plain.id.finish());
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
    let tag_len = if sealed { crate::transform::aes::TAG_LEN as u64 } else { 0 };
    if header.plain_len + tag_len != header.payload_len {
        let found = header.payload_len.saturating_sub(tag_len);
        let e = ObjectError::PlainLength { expected: header.plain_len, found };
        return Ok(Streamed::Damaged(e.to_string()));
    }
    if !authentic {
        return Ok(Streamed::Damaged(ObjectError::Authentication("payload").to_string()));
    }
    if id.0 != header.id {
        return Ok(Streamed::Damaged("version object: content does not match its checksum".into()));
    }
    Ok(match decoded {
        Ok((version, index, kept)) => Streamed::Read { version: Box::new(version), index, kept },
        Err(NotRead::Damaged(m)) => Streamed::Damaged(m),
        Err(NotRead::NotKept(e)) => Streamed::NotKept(e),
    })
}

/// The plaintext of a payload read by [`Ranged`]: opened as it passes when it is sealed
/// (its last 16 bytes, the tag, held back and checked at the end), and hashed into its
/// content id. Until the end it is not authenticated: only checks may be made of it.
struct Plain<'a, 'b> {
    body: &'a mut Ranged<'b>,
    /// The open seal, until the end of the payload.
    stream: Option<crate::transform::aes::OpenStream>,
    sealed: bool,
    buf: Vec<u8>,
    /// Opened bytes not given out yet: `buf[start..ready]`; `buf[ready..end]` are read
    /// but held back (they may be the tag).
    start: usize,
    ready: usize,
    end: usize,
    eof: bool,
    /// Whether the tag authenticated what was opened (always, unsealed).
    authentic: bool,
    id: crate::transform::IdHasher,
}

impl<'a, 'b> Plain<'a, 'b> {
    fn new(
        body: &'a mut Ranged<'b>,
        stream: Option<crate::transform::aes::OpenStream>,
        id: crate::transform::IdHasher,
    ) -> Self {
        let sealed = stream.is_some();
        let buf = if sealed { vec![0u8; 1 << 20] } else { Vec::new() };
        Plain { body, stream, sealed, buf, start: 0, ready: 0, end: 0, eof: false, authentic: !sealed, id }
    }

    /// Opens what follows the bytes given out, holding the last 16 read back.
    fn fill(&mut self) -> std::io::Result<()> {
        use crate::transform::aes::TAG_LEN;
        use std::io::Read;
        self.buf.copy_within(self.ready..self.end, 0);
        self.end -= self.ready;
        (self.start, self.ready) = (0, 0);
        while !self.eof && self.end <= TAG_LEN {
            let n = self.body.read(&mut self.buf[self.end..])?;
            self.eof = n == 0;
            self.end += n;
        }
        let ready = self.end.saturating_sub(TAG_LEN);
        if let Some(stream) = self.stream.as_mut()
            && stream.open(&mut self.buf[..ready]).is_err()
        {
            self.stream = None; // fails authentication at the end
        }
        self.ready = ready;
        if self.eof {
            self.authentic = self.stream.take().is_some_and(|s| s.finish(&self.buf[ready..self.end]).is_ok());
        }
        Ok(())
    }
}

impl std::io::Read for Plain<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = if self.sealed {
            if self.start == self.ready {
                if self.eof {
                    return Ok(0);
                }
                self.fill()?;
            }
            let n = (self.ready - self.start).min(out.len());
            out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            n
        } else {
            self.body.read(out)?
        };
        self.id.update(&out[..n]);
        Ok(n)
    }
}

/// Why [`decode_streamed`] gave nothing.
enum NotRead {
    Damaged(String),
    NotKept(Error),
}

/// The fields and index digest of a version object's plaintext, read from `r`, and its
/// index kept in a file in `keep` when asked.
fn decode_streamed(
    r: &mut impl std::io::Read,
    keep: Option<Keep>,
) -> std::result::Result<(Version, [u8; 32], Option<IndexFile>), NotRead> {
    let ctx = |m: &str| NotRead::Damaged(format!("version object: {m}"));
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
    let mut kept = match keep {
        Some(keep) => Some(crate::index::KeptIndex::new(&keep.dir, keep.modes).map_err(NotRead::NotKept)?),
        None => None,
    };
    let mut digest = crate::index::IndexDigest::default();
    let mut data_blocks = 0u64;
    let mut each = |i, id| {
        digest.add(i, id);
        data_blocks += 1;
        true
    };
    let walked = match kept.as_mut() {
        Some(k) => BlockIndex::visit_reader(k.tee(r), &mut each),
        None => BlockIndex::visit_reader(r, &mut each),
    };
    let head = match walked {
        Ok(Some(head)) => head,
        Ok(None) => return Err(ctx("index stopped early")),
        Err(e) => {
            if let Some(e) = kept.and_then(|k| k.failed()) {
                return Err(NotRead::NotKept(e));
            }
            let e = Error::Index { context: format!("index of {}", version.uid), source: e };
            return Err(NotRead::Damaged(e.to_string()));
        }
    };
    let kept = match kept {
        Some(k) => Some(k.finish(head, data_blocks).map_err(NotRead::NotKept)?),
        None => None,
    };
    Ok((version, digest.finish(&head), kept))
}

/// The payload of an object read a range at a time, its CRC-32 computed as it passes. A
/// storage error ends it (kept in `failed`); so does the payload's end, where one byte
/// more is asked for to find an object longer than its header says.
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
            let got = crate::storage::retry(crate::storage::STORAGE_ATTEMPTS, || {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockId;
    use crate::index::{IndexDigest, IndexWriter};
    use crate::storage::{file::FileStorage, sealed::SealedStorage};
    use crate::transform::aes::{KeyId, MasterKey};

    fn sealed_codec() -> (Codec, KeyId) {
        let master = MasterKey::new(&[7u8; 32]);
        let id = master.id();
        (Codec::sealed(&[9u8; 32], vec![master], id).unwrap(), id)
    }

    /// Rewrites an object's checksums after it was altered (what damage that keeps them
    /// right looks like).
    fn fix_crcs(obj: &mut [u8]) {
        let header_len = 72 + u16::from_le_bytes([obj[14], obj[15]]) as usize;
        let payload = crc32fast::hash(&obj[header_len..]);
        obj[32..36].copy_from_slice(&payload.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&obj[0..36]);
        h.update(&obj[40..header_len]);
        obj[36..40].copy_from_slice(&h.finalize().to_le_bytes());
    }

    /// A large version object, sealed or not, is stored from its index's file and read
    /// back as a stream: whole, it decodes to the same version and index; as a stream,
    /// it gives the index's digest; altered (with its checksums made right again), cut
    /// short or given a byte more, the stream names what a whole reading names.
    #[test]
    fn a_large_version_object_sealed_or_not_is_stored_and_read_as_a_stream() {
        for sealed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let inner: crate::storage::SharedStorage =
                std::sync::Arc::new(FileStorage::open("default", &dir.path().join("store")).unwrap());
            let storage: crate::storage::SharedStorage =
                if sealed { std::sync::Arc::new(SealedStorage::new(inner, sealed_codec().0)) } else { inner };
            let spool = dir.path().join("spool");
            let mut w = IndexWriter::new(&spool, crate::perms::Modes::PRIVATE, 4096).unwrap();
            for i in 0..50_000u64 {
                if i % 7 != 3 {
                    w.push(i, BlockId::of(&i.to_le_bytes())).unwrap();
                }
            }
            let index = w.finish(42, 50_000 * 4096 + 100).unwrap();
            let mut v = crate::version::test_version(42, "vm", chrono::Utc::now());
            v.labels.insert("k".into(), "v".into());
            v.size = 50_000 * 4096 + 100;
            store_with(storage.as_ref(), &v, &index, 0).unwrap();
            assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "no spool file is left");
            let key = version_key(v.uid);
            let path = dir.path().join("store").join(&key);
            let intact = std::fs::read(&path).unwrap();
            let flags = u16::from_le_bytes([intact[12], intact[13]]);
            assert_eq!(flags, if sealed { crate::block::FLAG_AES256GCM } else { 0 }, "not compressed");

            let (whole, decoded) = decode_version_object(storage.codec(), &intact).unwrap();
            assert_eq!(whole.labels, v.labels);
            assert_eq!(decoded.encode().unwrap(), index.to_vec().unwrap());
            let mut digest = IndexDigest::default();
            let head = BlockIndex::visit(&index.to_vec().unwrap(), |i, id| digest.add(i, id)).unwrap();
            let digest = digest.finish(&head);
            let keep = Keep { dir: spool.clone(), modes: crate::perms::Modes::PRIVATE };
            match read_streamed_with(storage.as_ref(), &key, 0, Some(keep)).unwrap() {
                Streamed::Read { version, index: read, kept } => {
                    assert_eq!(version.labels, v.labels);
                    assert_eq!(read, digest);
                    // Kept, it is the stored index, byte for byte.
                    let kept = kept.unwrap();
                    assert_eq!(kept.to_vec().unwrap(), index.to_vec().unwrap());
                    assert_eq!((kept.header(), kept.data_blocks()), (index.header(), index.data_blocks()));
                }
                Streamed::NotLarge => panic!("read whole"),
                Streamed::Damaged(e) => panic!("{e}"),
                Streamed::NotKept(e) => panic!("{e}"),
            }
            assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "no spool file is left");

            let header_len = crate::block::object_header_len(storage.codec());
            let n = intact.len();
            let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
            for at in [header_len + 3, header_len + 200, n / 2, n - 1, n - 20] {
                let mut bad = intact.clone();
                bad[at] ^= 0x10;
                fix_crcs(&mut bad);
                let words = if sealed { "fails authentication" } else { "content does not match" };
                cases.push((words, bad));
            }
            let mut longer = intact.clone();
            longer.push(1);
            cases.push(("does not match its header", longer));
            cases.push(("does not match its header", intact[..n - 1].to_vec()));
            if sealed {
                let mut bad = intact.clone();
                bad[72 + 30] ^= 1; // the wrapped data key
                fix_crcs(&mut bad);
                cases.push(("fails authentication (wrapped data key)", bad));
            }
            for (words, bad) in cases {
                std::fs::write(&path, &bad).unwrap();
                let whole = decode_version_object(storage.codec(), &bad).map(|_| ()).unwrap_err().to_string();
                match read_streamed_with(storage.as_ref(), &key, 0, None).unwrap() {
                    Streamed::Damaged(e) => {
                        assert!(e.contains(words), "{e}");
                        assert!(whole.ends_with(&e), "whole: {whole}; streamed: {e}");
                    }
                    Streamed::Read { .. } => panic!("{words}: not found; whole: {whole}"),
                    Streamed::NotLarge => panic!("read whole"),
                    Streamed::NotKept(e) => panic!("{e}"),
                }
            }
        }
    }
}
