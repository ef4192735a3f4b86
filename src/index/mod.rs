//! The block index of a version: which object holds each block of the image, and its
//! stored encoding. In memory an index holds only its non-sparse entries (about 33
//! bytes each, see [`Entries`]) and the block count, so a run of sparse blocks
//! costs nothing however long it is: a 200 TB image of zeros is a few bytes, in memory
//! and stored. Stored (format 2) it is a fixed header followed by one zstd frame of
//! runs (so many sparse blocks, so many ids); format 1 (a 32-byte id for every block,
//! sparse or not) is still read. Layouts in docs/format.md.

use crate::block::{BlockId, ID_LEN};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::ops::Range;

mod blockset;
mod entries;
mod mapped;
mod writer;
pub use blockset::BlockSet;
pub use entries::Entries;
pub use mapped::{MappedBuilder, MappedIndex};
pub use writer::{IndexFile, IndexFileReader, IndexWriter, KeptIndex, RUN_MAX, Runs, Tee};

pub const INDEX_MAGIC: [u8; 8] = *b"KEEPFSIX";
/// The format this build writes.
pub const INDEX_FORMAT_VERSION: u16 = 2;
/// The first format (one 32-byte entry per block): read, never written.
pub const INDEX_FORMAT_V1: u16 = 1;
pub const INDEX_HEADER_LEN: usize = 80;
/// Most blocks a version may have: 16 PiB at 4 MiB blocks, 16 TiB at 4 KiB. Nothing is
/// held per block, sparse or not, so the bound is only what keeps block numbers and
/// offsets far from overflowing.
pub const MAX_BLOCKS_PER_VERSION: u64 = 1 << 32;
/// Most non-sparse blocks a version may have: each takes 32 bytes in the stored index,
/// which must fit in one SQLite value (whose default limit is 10^9 bytes). 114 TiB of
/// data at 4 MiB blocks, 114 GiB at 4 KiB, 915 TiB at 32 MiB.
pub const MAX_DATA_BLOCKS_PER_VERSION: u64 = 30_000_000;
/// The longest stored index (either format): the header and 32 bytes per data block.
pub const MAX_INDEX_LEN: u64 = INDEX_HEADER_LEN as u64 + ID_LEN as u64 * MAX_DATA_BLOCKS_PER_VERSION;
/// zstd level of the stored index (ids do not compress; runs and their lengths do).
const INDEX_ZSTD_LEVEL: i32 = 3;
/// Bytes of a run's header in the body: sparse blocks, then data blocks (u64 each).
const RUN_HEADER_LEN: u64 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is {0} bytes, shorter than its header")]
    TooShort(usize),
    #[error("index does not start with the keepfs index magic number")]
    BadMagic,
    #[error("index format version {0} is not supported (this keepfs reads versions 1 and 2)")]
    UnsupportedVersion(u16),
    #[error("index entry size {0} is not supported")]
    EntrySize(u16),
    #[error("index holds {found} entries but an image of {size} bytes in blocks of {block_size} needs {expected}")]
    EntryCount { size: u64, block_size: u32, expected: u64, found: u64 },
    #[error("index checksum mismatch (index damaged)")]
    Checksum,
    #[error("index body is malformed: {0}")]
    Malformed(String),
    #[error("index belongs to another version or does not match the version's size and block size")]
    Foreign,
}

/// Number of blocks an image of `size` bytes has at `block_size` (the last may be short).
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

/// Bytes of block `idx` of an image of `size` bytes in blocks of `block_size` (only the
/// last may be short).
pub fn block_len(size: u64, block_size: u32, idx: u64) -> u64 {
    (size - idx * block_size as u64).min(block_size as u64)
}

/// The first stretch of data at or after `offset` of an image of `size` bytes in blocks
/// of `bs`, from its data blocks from `offset`'s block on (`blocks`, in order), clipped
/// to start at `offset`: SEEK_DATA/SEEK_HOLE. Its end is looked for up to byte `until`
/// only: a stretch that goes on past `until` ends at (the block boundary after) it. A
/// reader asking about a range passes its end; SEEK_HOLE passes `u64::MAX`. Without
/// it, each 256 KiB read of a dense 200 TB export would walk to the end of the image.
pub(crate) fn next_data(
    offset: u64,
    size: u64,
    bs: u64,
    until: u64,
    mut blocks: impl Iterator<Item = u64>,
) -> Option<Range<u64>> {
    if offset >= size {
        return None;
    }
    let first = blocks.next()?;
    let last = until.div_ceil(bs).max(first + 1);
    let mut end = first + 1;
    for i in blocks {
        if i != end || end >= last {
            break;
        }
        end += 1;
    }
    Some((first * bs).max(offset)..(end * bs).min(size))
}

/// Refuses an image with more blocks than a version may have ([`MAX_BLOCKS_PER_VERSION`]).
pub fn check_block_count(size: u64, block_size: u32) -> crate::error::Result<()> {
    let n = block_count(size, block_size.max(1));
    if n > MAX_BLOCKS_PER_VERSION {
        return Err(crate::error::Error::Invalid(format!(
            "an image of {size} bytes in blocks of {block_size} has {n} blocks, more than a version may have ({MAX_BLOCKS_PER_VERSION}): use a larger block size (-b)"
        )));
    }
    Ok(())
}

/// The error for a version with more non-sparse blocks than its index may hold.
pub fn too_much_data(data_blocks: u64, block_size: u32) -> crate::error::Error {
    crate::error::Error::Invalid(format!(
        "the image holds more than {MAX_DATA_BLOCKS_PER_VERSION} non-zero blocks of {block_size} bytes ({data_blocks} so far), more than one version's index may hold: use a larger block size (-b)"
    ))
}

/// A version's block map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockIndex {
    pub uid: u64,
    pub size: u64,
    pub block_size: u32,
    pub entries: Entries,
}

impl BlockIndex {
    /// A map with every block sparse.
    pub fn new_sparse(uid: u64, size: u64, block_size: u32) -> BlockIndex {
        BlockIndex { uid, size, block_size, entries: Entries::sparse(block_count(size, block_size)) }
    }

    /// Plaintext length of block `idx` (only the last block may be short).
    pub fn block_len(&self, idx: usize) -> usize {
        block_len(self.size, self.block_size, idx as u64) as usize
    }

    /// Bytes of the image that non-sparse blocks hold: what the version occupies as a
    /// file (`st_blocks` of a mounted `data`), however large it looks.
    pub fn data_bytes(&self) -> u64 {
        self.entries.data().map(|(i, _)| self.block_len(i as usize) as u64).sum()
    }

    /// The first range at or after `offset` that holds non-sparse blocks (clipped to
    /// start at `offset`), or `None` when the rest of the image is sparse. Answers
    /// SEEK_DATA/SEEK_HOLE on a mounted image. Walks the data blocks from `offset` on
    /// only, so a reader walking the image extent by extent costs one pass over them.
    pub fn next_data(&self, offset: u64, until: u64) -> Option<Range<u64>> {
        let bs = self.block_size as u64;
        next_data(offset, self.size, bs, until, self.entries.data_in(offset / bs..u64::MAX).map(|(i, _)| i))
    }

    fn header(&self, version: u16, tail: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(ID_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.entries.len().to_le_bytes());
        out.extend_from_slice(&[0u8; 32]); // checksum, filled in last
        out.extend_from_slice(&tail.to_le_bytes());
        debug_assert_eq!(out.len(), INDEX_HEADER_LEN);
        out
    }

    /// The stored form (format 2): the header, then one zstd frame of runs, each a
    /// count of sparse blocks, a count of data blocks and their ids. Refused (nothing
    /// is written) when it would be longer than [`MAX_INDEX_LEN`].
    pub fn encode(&self) -> crate::error::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// [`BlockIndex::encode`] appended to `out` (the frame is compressed straight into
    /// it: no second copy of a large index). On an error `out` is as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> crate::error::Result<()> {
        use crate::error::Error;
        if self.entries.data_count() > MAX_DATA_BLOCKS_PER_VERSION {
            return Err(too_much_data(self.entries.data_count(), self.block_size));
        }
        let start = out.len();
        out.extend_from_slice(&[0u8; INDEX_HEADER_LEN]);
        let written = (|| -> std::io::Result<u64> {
            let z = zstd::stream::write::Encoder::new(&mut *out, INDEX_ZSTD_LEVEL)?;
            let mut runs = writer::Runs::new(z);
            for (idx, id) in self.entries.data() {
                runs.push(idx, id)?;
            }
            let (z, body_len) = runs.finish(self.entries.len())?;
            z.finish()?;
            Ok(body_len)
        })();
        let body_len = match written {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                return Err(Error::Other(format!("cannot compress the block index: {e}")));
            }
        };
        let len = out.len() - start;
        if len as u64 > MAX_INDEX_LEN {
            out.truncate(start);
            return Err(writer::too_long(self.uid, len as u64));
        }
        let head = writer::header(self.uid, self.size, self.block_size, self.entries.len(), body_len);
        out[start..start + INDEX_HEADER_LEN].copy_from_slice(&head);
        let sum = Sha256::digest(&out[start..]);
        out[start + 40..start + 72].copy_from_slice(&sum);
        Ok(())
    }

    /// The first format (one 32-byte entry per block). Not written by keepfs any more:
    /// kept to make samples of old repositories in tests.
    #[doc(hidden)]
    pub fn encode_v1(&self) -> Vec<u8> {
        let mut out = self.header(INDEX_FORMAT_V1, 0);
        out.reserve(self.entries.len() as usize * ID_LEN);
        for id in self.entries.iter() {
            out.extend_from_slice(&id.0);
        }
        let sum = Sha256::digest(&out);
        out[40..72].copy_from_slice(&sum);
        out
    }

    /// Reads a stored index of either format, checking everything before trusting it:
    /// memory is bounded by the data blocks it names, never by what a header claims.
    pub fn decode(bytes: &[u8]) -> Result<BlockIndex, IndexError> {
        let mut entries = Entries::default();
        let head = Self::visit(bytes, |idx, id| entries.set(idx, id))?;
        entries.resize(head.count);
        Ok(BlockIndex { uid: head.uid, size: head.size, block_size: head.block_size, entries })
    }

    /// Checks a stored index as [`BlockIndex::decode`] does, handing each data block
    /// (block number, id) to `each` in block order instead of keeping them: what a
    /// reader that needs no map (a comparison, a count) uses, in constant memory.
    /// Blocks are handed over while the body is checked: on an error, discard them.
    pub fn visit(bytes: &[u8], mut each: impl FnMut(u64, BlockId)) -> Result<IndexHeader, IndexError> {
        let head = Self::visit_reader(bytes, |i, id| {
            each(i, id);
            true
        })?;
        // `each` never stops the walk, so it went to the end.
        head.ok_or_else(|| IndexError::Malformed("stopped early".into()))
    }

    /// [`BlockIndex::visit`] over a reader: the stored index is read as it is walked, so
    /// an index of any size is checked in constant memory (restore streams one from
    /// the catalog this way). `each` returns false to stop the walk: then nothing more
    /// is read or checked and the result is `None`. The checksum covers the whole
    /// index, so it is known only at the end: a body found malformed is reported as a
    /// checksum mismatch when that is what it is, as [`BlockIndex::decode`] does. An
    /// error of the reader itself is reported as [`IndexError::Malformed`]: a caller
    /// whose reader can fail for other reasons (a database) asks it first.
    pub fn visit_reader<R: Read>(
        mut r: R,
        mut each: impl FnMut(u64, BlockId) -> bool,
    ) -> Result<Option<IndexHeader>, IndexError> {
        let mut bytes = [0u8; INDEX_HEADER_LEN];
        let got = read_full(&mut r, &mut bytes)?;
        if got < INDEX_HEADER_LEN {
            return Err(IndexError::TooShort(got));
        }
        if bytes[0..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != INDEX_FORMAT_VERSION && version != INDEX_FORMAT_V1 {
            return Err(IndexError::UnsupportedVersion(version));
        }
        let entry_size = u16::from_le_bytes([bytes[10], bytes[11]]);
        if entry_size as usize != ID_LEN {
            return Err(IndexError::EntrySize(entry_size));
        }
        let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let block_size = le32(12);
        let uid = le64(16);
        let size = le64(24);
        let count = le64(32);
        let tail = le64(72);
        let expected = if block_size == 0 { u64::MAX } else { block_count(size, block_size) };
        let count_error = IndexError::EntryCount { size, block_size, expected, found: count };
        if count != expected || count > MAX_BLOCKS_PER_VERSION {
            return Err(count_error);
        }
        let mut body = Hashing { inner: r, hasher: Sha256::new(), n: 0 };
        body.hasher.update(&bytes[0..40]);
        body.hasher.update([0u8; 32]);
        body.hasher.update(&bytes[72..]);
        let walked = if version == INDEX_FORMAT_V1 {
            visit_v1_body(&mut body, count, &mut each).map(|going| (going, 0))
        } else {
            decode_runs(&mut body, tail, count, &mut each)
        };
        let past_frame = match walked {
            Ok((false, _)) => return Ok(None),
            Ok((true, past)) => past,
            Err(_) => 0,
        };
        // What follows the body still counts towards the checksum (and is an error).
        let trailing = past_frame + body.drain()?;
        if version == INDEX_FORMAT_V1 && body.n != count.saturating_mul(ID_LEN as u64) {
            return Err(count_error);
        }
        if body.hasher.finalize().as_slice() != &bytes[40..72] {
            return Err(IndexError::Checksum);
        }
        walked?;
        if trailing > 0 {
            return Err(IndexError::Malformed("longer than its header says".into()));
        }
        Ok(Some(IndexHeader { uid, size, block_size, count }))
    }
}

/// Reads until `buf` is full or the reader ends; how many bytes it got.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, IndexError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IndexError::Malformed(format!("cannot read: {e}"))),
        }
    }
    Ok(got)
}

/// The body of a stored index as it is read: hashed and counted as it passes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    /// Bytes of the body read so far.
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    /// Reads the rest of the body (hashed like the rest); how many bytes that was.
    fn drain(&mut self) -> Result<u64, IndexError> {
        let before = self.n;
        let mut buf = [0u8; 8192];
        while read_full(self, &mut buf)? > 0 {}
        Ok(self.n - before)
    }
}

/// Reads a format 1 body (an id for every block) of `count` blocks, handing each data
/// block to `each`; false when `each` stopped the walk. A body that ends early is left
/// to the caller's length check.
fn visit_v1_body(
    body: &mut impl Read,
    count: u64,
    each: &mut impl FnMut(u64, BlockId) -> bool,
) -> Result<bool, IndexError> {
    let mut id = [0u8; ID_LEN];
    for i in 0..count {
        if read_full(body, &mut id)? < ID_LEN {
            return Ok(true);
        }
        if id != [0u8; ID_LEN] && !each(i, BlockId(id)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Finds the blocks of an image whose content an earlier block has too, as the index is
/// walked in block order (a restore fetches such a block once, a scrub checks it once),
/// in bounded memory: ids are remembered for the most recently seen `distinct` of them
/// (about 80 bytes each), and at most `most` repeats are kept (16 bytes each). A repeat
/// past those bounds is not found, and is treated like any other block.
pub struct Repeats {
    firsts: lru::LruCache<BlockId, u64>,
    most: usize,
    /// (block, the earlier block with its content), in block order.
    pub found: Vec<(u64, u64)>,
}

impl Repeats {
    /// What restore and scrub use: the 65,536 most recently seen distinct ids (about 5
    /// MiB) and 1,048,576 repeats (16 MiB). An image with fewer distinct data blocks has
    /// every repeat found; in a larger one, a repeat of a block seen long before (more
    /// than 65,536 other contents ago) is fetched or checked again.
    pub fn bounded() -> Repeats {
        Repeats::new(1 << 16, 1 << 20)
    }

    pub fn new(distinct: usize, most: usize) -> Repeats {
        let cap = std::num::NonZeroUsize::new(distinct).unwrap_or(std::num::NonZeroUsize::MIN);
        Repeats { firsts: lru::LruCache::sparse(cap), most, found: Vec::new() }
    }

    /// Notes block `idx` holding `id`: true when it repeats an earlier block (then it is
    /// in `found`).
    pub fn note(&mut self, idx: u64, id: BlockId) -> bool {
        match self.firsts.get(&id) {
            Some(&first) if self.found.len() < self.most => {
                self.found.push((idx, first));
                true
            }
            Some(_) => false,
            None => {
                self.firsts.put(id, idx);
                false
            }
        }
    }
}

/// What an index says, block by block, in 32 bytes: two stored indexes (of either
/// format, encoded apart) say the same when their digests are equal. Fed while walking
/// one, so neither is held.
#[derive(Default)]
pub struct IndexDigest(Sha256);

impl IndexDigest {
    pub fn add(&mut self, idx: u64, id: BlockId) {
        self.0.update(idx.to_le_bytes());
        self.0.update(id.0);
    }

    pub fn finish(mut self, head: &IndexHeader) -> [u8; 32] {
        for n in [head.uid, head.size, head.block_size as u64, head.count] {
            self.0.update(n.to_le_bytes());
        }
        self.0.finalize().into()
    }
}

/// What the header of a stored index says (once checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    pub uid: u64,
    pub size: u64,
    pub block_size: u32,
    pub count: u64,
}

/// Reads the runs of a format 2 body (one zstd frame of `body_len` bytes) of `count`
/// blocks, handing each data block to `each`, checking that they cover exactly its
/// blocks and that the frame holds nothing more. Returns false when `each` stopped the
/// walk, and how many bytes it read past the frame's end (what follows the frame is
/// the caller's to judge).
fn decode_runs(
    frame: &mut impl Read,
    body_len: u64,
    count: u64,
    each: &mut impl FnMut(u64, BlockId) -> bool,
) -> Result<(bool, u64), IndexError> {
    let bad = |m: &str| IndexError::Malformed(m.to_string());
    let z = zstd::stream::read::Decoder::with_buffer(std::io::BufReader::with_capacity(256 << 10, frame))
        .map_err(|e| bad(&format!("cannot decompress: {e}")))?;
    let mut body = std::io::BufReader::with_capacity(64 << 10, z.single_frame().take(body_len));
    let read = |body: &mut dyn Read, buf: &mut [u8]| {
        body.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("shorter than its header says"),
            _ => bad(&format!("cannot decompress: {e}")),
        })
    };
    let (mut at, mut consumed, mut data) = (0u64, 0u64, 0u64);
    let mut run = [0u8; RUN_HEADER_LEN as usize];
    let mut id = [0u8; ID_LEN];
    while at < count {
        read(&mut body, &mut run)?;
        let sparse = u64::from_le_bytes(run[0..8].try_into().unwrap_or([0; 8]));
        let n = u64::from_le_bytes(run[8..16].try_into().unwrap_or([0; 8]));
        at = at
            .checked_add(sparse)
            .filter(|&a| a <= count)
            .ok_or_else(|| bad("a run of sparse blocks passes the end"))?;
        if at.checked_add(n).is_none_or(|end| end > count) {
            return Err(bad("a run of data blocks passes the end"));
        }
        if sparse == 0 && n == 0 {
            return Err(bad("an empty run"));
        }
        data += n;
        if data > MAX_DATA_BLOCKS_PER_VERSION {
            return Err(bad(&format!("more than {MAX_DATA_BLOCKS_PER_VERSION} data blocks")));
        }
        for _ in 0..n {
            read(&mut body, &mut id)?;
            if id == [0u8; ID_LEN] {
                return Err(bad("a data block with the sparse id"));
            }
            if !each(at, BlockId(id)) {
                return Ok((false, 0));
            }
            at += 1;
        }
        consumed += RUN_HEADER_LEN + n * ID_LEN as u64;
    }
    if consumed != body_len {
        return Err(bad("longer than its runs"));
    }
    // Nothing may follow the body in the frame (the body's own buffer holds nothing
    // more: it read through a limit of exactly the body's length).
    let mut z = body.into_inner().into_inner();
    match z.read(&mut [0u8; 1]) {
        Ok(0) => {}
        Ok(_) => return Err(bad("longer than its header says")),
        Err(e) => return Err(bad(&format!("cannot decompress: {e}"))),
    }
    Ok((true, z.into_inner().buffer().len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BlockId {
        BlockId([n; ID_LEN])
    }

    #[test]
    fn data_ranges_for_seek_data_and_seek_hole() {
        // 11 blocks of 4096, the last 5 bytes long; data in blocks 2-3 and 10.
        let mut idx = BlockIndex::new_sparse(1, 10 * 4096 + 5, 4096);
        for i in [2, 3, 10] {
            idx.entries.set(i, BlockId::of(&[i as u8]));
        }
        assert_eq!(idx.next_data(0, u64::MAX), Some(8192..16384));
        assert_eq!(idx.next_data(9000, u64::MAX), Some(9000..16384), "inside data: from the offset on");
        assert_eq!(idx.next_data(16384, u64::MAX), Some(40960..40965), "the short last block");
        assert_eq!(idx.next_data(40964, u64::MAX), Some(40964..40965));
        assert_eq!(idx.next_data(40965, u64::MAX), None, "past the end");
        idx.entries.set(10, BlockId::SPARSE);
        assert_eq!(idx.next_data(16384, u64::MAX), None, "sparse to the end");
        assert_eq!(BlockIndex::new_sparse(1, 0, 4096).next_data(0, u64::MAX), None);
        // Looked for up to `until` only: the stretch of blocks 2-3 ends after block 2 when
        // asked about bytes up to 8193 or less (whole blocks), never before its start.
        assert_eq!(idx.next_data(0, 8193), Some(8192..12288));
        assert_eq!(idx.next_data(0, 1), Some(8192..12288), "at least one block of data");
        assert_eq!(idx.next_data(0, 12289), Some(8192..16384));
    }

    #[test]
    fn roundtrip_and_damage() {
        let mut idx = BlockIndex::new_sparse(7, 10 * 4096 + 5, 4096);
        assert_eq!(idx.entries.len(), 11);
        assert_eq!(idx.block_len(10), 5);
        assert_eq!(idx.block_len(9), 4096);
        idx.entries.set(3, BlockId::of(b"three"));
        let bytes = idx.encode().unwrap();
        assert_eq!(BlockIndex::decode(&bytes).unwrap(), idx);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert_eq!(BlockIndex::decode(&bad), Err(IndexError::Checksum));
        assert_eq!(BlockIndex::decode(&bytes[..bytes.len() - 1]), Err(IndexError::Checksum));
        assert_eq!(BlockIndex::decode(b"short"), Err(IndexError::TooShort(5)));
        let mut future = bytes.clone();
        future[8] = 3;
        assert_eq!(BlockIndex::decode(&future), Err(IndexError::UnsupportedVersion(3)));
    }

    #[test]
    fn format_1_still_reads() {
        let mut idx = BlockIndex::new_sparse(7, 10 * 4096 + 5, 4096);
        idx.entries.set(3, BlockId::of(b"three"));
        let bytes = idx.encode_v1();
        assert_eq!(bytes.len(), INDEX_HEADER_LEN + 11 * 32);
        assert_eq!(BlockIndex::decode(&bytes).unwrap(), idx);
        let mut bad = bytes.clone();
        bad[INDEX_HEADER_LEN + 3 * 32] ^= 0x80;
        assert_eq!(BlockIndex::decode(&bad), Err(IndexError::Checksum));
        assert!(matches!(BlockIndex::decode(&bytes[..bytes.len() - 32]), Err(IndexError::EntryCount { .. })));
    }

    /// Re-signs a format 2 index whose body was replaced, as a writer with a bug would.
    fn forged(idx: &BlockIndex, body: &[u8], claimed_len: u64) -> Vec<u8> {
        let mut out = idx.header(INDEX_FORMAT_VERSION, claimed_len);
        out.extend_from_slice(&zstd::bulk::compress(body, 3).unwrap());
        let sum = Sha256::digest(&out);
        out[40..72].copy_from_slice(&sum);
        out
    }

    #[test]
    fn malformed_runs_are_refused_even_with_a_good_checksum() {
        let idx = BlockIndex::new_sparse(1, 10 * 4096, 4096);
        let run = |sparse: u64, ids: &[BlockId]| {
            let mut b = Vec::new();
            b.extend_from_slice(&sparse.to_le_bytes());
            b.extend_from_slice(&(ids.len() as u64).to_le_bytes());
            ids.iter().for_each(|i| b.extend_from_slice(&i.0));
            b
        };
        let ok = run(10, &[]);
        assert_eq!(BlockIndex::decode(&forged(&idx, &ok, 16)).unwrap(), idx);
        let too_long = run(11, &[]);
        assert!(matches!(BlockIndex::decode(&forged(&idx, &too_long, 16)), Err(IndexError::Malformed(_))));
        let short = run(5, &[]);
        assert!(matches!(BlockIndex::decode(&forged(&idx, &short, 16)), Err(IndexError::Malformed(_))));
        let zero_id = run(9, &[BlockId::SPARSE]);
        assert!(matches!(BlockIndex::decode(&forged(&idx, &zero_id, 48)), Err(IndexError::Malformed(_))));
        let trailing = [ok.clone(), vec![0u8; 4]].concat();
        assert!(matches!(BlockIndex::decode(&forged(&idx, &trailing, 16)), Err(IndexError::Malformed(_))));
        assert!(matches!(BlockIndex::decode(&forged(&idx, &trailing, 20)), Err(IndexError::Malformed(_))));
        assert!(matches!(BlockIndex::decode(&forged(&idx, &ok, 1 << 40)), Err(IndexError::Malformed(_))));
    }

    /// Hands out at most `step` bytes a read, as a catalog read in pieces does at a
    /// piece's edge; fails once `fail_at` bytes were read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
        fail_at: usize,
        at: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at >= self.fail_at {
                return Err(std::io::Error::other("the database went away"));
            }
            let n = buf.len().min(self.step).min(self.bytes.len() - self.at);
            buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn trickle(bytes: &[u8], step: usize) -> Trickle<'_> {
        Trickle { bytes, step, fail_at: usize::MAX, at: 0 }
    }

    #[test]
    fn a_stored_index_read_in_pieces_is_walked_as_when_held_whole() {
        // Data, holes and repeats across several groups, in both formats, read 1, 7 and
        // 4096 bytes at a time.
        let mut idx = BlockIndex::new_sparse(3, 1_000 * 4096 + 17, 4096);
        for i in (0..1_001u64).filter(|i| i % 3 != 0 || i % 7 == 0) {
            idx.entries.set(i, id((i % 251) as u8 + 1));
        }
        let want: Vec<(u64, BlockId)> = idx.entries.data().collect();
        for bytes in [idx.encode().unwrap(), idx.encode_v1()] {
            for step in [1, 7, 4096] {
                let mut got = Vec::new();
                let head = BlockIndex::visit_reader(trickle(&bytes, step), |i, b| {
                    got.push((i, b));
                    true
                });
                let head = head.unwrap().unwrap();
                assert_eq!((head.uid, head.size, head.block_size, head.count), (3, idx.size, 4096, 1_001));
                assert_eq!(got, want, "step {step}");
            }
            // Stopped by the walker: nothing more is read, nothing is judged.
            let mut seen = 0;
            let r = BlockIndex::visit_reader(trickle(&bytes, 64), |_, _| {
                seen += 1;
                seen < 10
            });
            assert_eq!(r, Ok(None));
            assert_eq!(seen, 10);
            // A reader that fails half way is an error, never a shorter index.
            let failing = Trickle { fail_at: bytes.len() / 2, ..trickle(&bytes, 100) };
            let r = BlockIndex::visit_reader(failing, |_, _| true);
            assert!(matches!(r, Err(IndexError::Malformed(ref m)) if m.contains("went away")), "{r:?}");
            // Damage found by the checksum at the end, whatever the body looked like.
            let mut bad = bytes.clone();
            bad[INDEX_HEADER_LEN + 40] ^= 1;
            assert!(matches!(
                BlockIndex::visit_reader(trickle(&bad, 7), |_, _| true),
                Err(IndexError::Checksum | IndexError::EntryCount { .. })
            ));
        }
    }

    #[test]
    fn bytes_after_the_frame_are_refused_even_with_a_good_checksum() {
        let idx = BlockIndex::new_sparse(1, 10 * 4096, 4096);
        let mut body = Vec::new();
        body.extend_from_slice(&10u64.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        let mut out = forged(&idx, &body, 16);
        assert!(BlockIndex::decode(&out).is_ok());
        out.extend_from_slice(b"junk");
        let sum = {
            let mut h = Sha256::new();
            h.update(&out[0..40]);
            h.update([0u8; 32]);
            h.update(&out[72..]);
            h.finalize()
        };
        out[40..72].copy_from_slice(&sum);
        assert!(matches!(BlockIndex::decode(&out), Err(IndexError::Malformed(_))));
    }

    #[test]
    fn sparse_runs_take_no_space() {
        // 200 TB at 4 MiB blocks: 47.7 million blocks, two of them data.
        let size = 200_000_000_000_000u64;
        let mut idx = BlockIndex::new_sparse(9, size, 4 << 20);
        idx.entries.set(5, id(1));
        idx.entries.set(40_000_000, id(2));
        let bytes = idx.encode().unwrap();
        assert!(bytes.len() < 300, "{} bytes", bytes.len());
        let back = BlockIndex::decode(&bytes).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.entries.data_count(), 2);
        assert_eq!(back.data_bytes(), 8 << 20);
        let runs: Vec<_> = back.entries.sparse_runs().collect();
        assert_eq!(runs, vec![0..5, 6..40_000_000, 40_000_001..back.entries.len()]);
        assert_eq!(back.next_data(0, u64::MAX), Some((5 << 22)..(6 << 22)));
    }

    #[test]
    fn entries_grow_and_shrink() {
        let mut e = Entries::default();
        e.set(3, id(3));
        e.set(1, id(1));
        assert_eq!(e.len(), 4);
        assert_eq!(e.iter().collect::<Vec<_>>(), vec![BlockId::SPARSE, id(1), BlockId::SPARSE, id(3)]);
        e.resize(2);
        assert_eq!(e.data().collect::<Vec<_>>(), vec![(1, id(1))]);
        e.resize(5);
        assert_eq!(e.sparse_runs().collect::<Vec<_>>(), vec![0..1, 2..5]);
        e.set(1, BlockId::SPARSE);
        assert_eq!(e.data_count(), 0);
        assert_eq!(e.sparse_runs().collect::<Vec<_>>(), vec![0..5]);
    }

    #[test]
    fn repeats_point_at_an_earlier_occurrence_within_the_bounds() {
        let (a, b) = (id(1), id(2));
        let mut r = Repeats::new(4, 8);
        let found: Vec<bool> = [(0, a), (1, b), (3, a), (5, b), (6, a)].iter().map(|&(i, x)| r.note(i, x)).collect();
        assert_eq!(found, vec![false, false, true, true, true]);
        assert_eq!(r.found, vec![(3, 0), (5, 1), (6, 0)]);
        // Ids that agree in their first bytes are told apart.
        let twin = |n: u8| {
            let mut x = [7u8; ID_LEN];
            x[31] = n;
            BlockId(x)
        };
        let mut r = Repeats::new(4, 8);
        assert!(!r.note(0, twin(1)) && !r.note(1, twin(2)) && r.note(2, twin(1)));
        assert_eq!(r.found, vec![(2, 0)]);
        // Past the bounds a repeat is not one: the least recently seen id is forgotten,
        // and no more are kept than asked.
        let mut r = Repeats::new(2, 1);
        assert!(!r.note(0, id(1)) && !r.note(1, id(2)) && !r.note(2, id(3)));
        assert!(!r.note(3, id(1)), "forgotten: the two most recent are 2 and 3");
        assert!(r.note(4, id(3)));
        assert!(!r.note(5, id(3)), "one repeat kept at most");
        assert_eq!(r.found, vec![(4, 2)]);
    }

    #[test]
    fn empty_image_has_no_entries() {
        let idx = BlockIndex::new_sparse(1, 0, 4 << 20);
        assert!(idx.entries.is_empty());
        assert_eq!(BlockIndex::decode(&idx.encode().unwrap()).unwrap(), idx);
        assert_eq!(BlockIndex::decode(&idx.encode_v1()).unwrap(), idx);
    }
}
