//! The block index of a version: which object holds each block of the image, and its
//! stored encoding. In memory an index holds only its non-sparse entries (about 33
//! bytes each, see [`Entries`]) and the block count, so a run of sparse blocks
//! costs nothing however long it is: a 200 TB image of zeros is a few bytes, in memory
//! and stored. Stored (format 2) it is a fixed header followed by one zstd frame of
//! runs (so many sparse blocks, so many ids); format 1 (a 32-byte id for every block,
//! sparse or not) is still read. Layouts in docs/format.md.

use crate::block::{BlockId, ID_LEN};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;

mod entries;
pub use entries::Entries;

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

/// Counts what goes through it, so the encoder knows the uncompressed body length.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl BlockIndex {
    /// A map with every block sparse.
    pub fn new_sparse(uid: u64, size: u64, block_size: u32) -> BlockIndex {
        BlockIndex { uid, size, block_size, entries: Entries::sparse(block_count(size, block_size)) }
    }

    /// Plaintext length of block `idx` (only the last block may be short).
    pub fn block_len(&self, idx: usize) -> usize {
        let start = idx as u64 * self.block_size as u64;
        (self.size - start).min(self.block_size as u64) as usize
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
    pub fn next_data(&self, offset: u64) -> Option<Range<u64>> {
        if offset >= self.size {
            return None;
        }
        let bs = self.block_size as u64;
        let mut run = self.entries.data_in(offset / bs..u64::MAX).map(|(i, _)| i);
        let first = run.next()?;
        let mut end = first + 1;
        for i in run {
            if i != end {
                break;
            }
            end += 1;
        }
        Some((first * bs).max(offset)..(end * bs).min(self.size))
    }

    /// The blocks whose content an earlier block of the image has too, each with the
    /// number of the first such block (sparse blocks have none): a restore fetches such
    /// a block once.
    pub fn repeats(&self) -> HashMap<u64, u64> {
        self.repeats_among(|_| true)
    }

    /// [`BlockIndex::repeats`] among the data blocks `pick` chooses only. Holds 16 bytes
    /// a chosen block while it works (the first 8 bytes of its id and its number,
    /// sorted; full ids are compared only where those agree), then the repeats.
    pub fn repeats_among(&self, pick: impl Fn(u64) -> bool) -> HashMap<u64, u64> {
        let mut keyed: Vec<(u64, u64)> =
            self.entries.data().filter(|&(i, _)| pick(i)).map(|(i, id)| (id.short(), i)).collect();
        keyed.sort_unstable();
        let mut out = HashMap::new();
        for group in keyed.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
            // In block order; the full ids of a group are nearly always one id, so this
            // map stays tiny even when a whole image repeats one block.
            let mut first: HashMap<BlockId, u64> = HashMap::new();
            for &(_, i) in group {
                let f = *first.entry(self.entries.get(i)).or_insert(i);
                if f != i {
                    out.insert(i, f);
                }
            }
        }
        out
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
        out.extend_from_slice(&self.header(INDEX_FORMAT_VERSION, 0));
        let io_err = |e: std::io::Error| Error::Other(format!("cannot compress the block index: {e}"));
        let written = (|| -> std::io::Result<u64> {
            let mut z = zstd::stream::write::Encoder::new(&mut *out, INDEX_ZSTD_LEVEL)?;
            let mut body = Counted { inner: &mut z, n: 0 };
            let mut end = 0u64; // the block after the last one written
            for Range { start, end: stop } in self.entries.data_runs() {
                body.write_all(&(start - end).to_le_bytes())?;
                body.write_all(&(stop - start).to_le_bytes())?;
                for (_, id) in self.entries.data_in(start..stop) {
                    body.write_all(&id.0)?;
                }
                end = stop;
            }
            if end < self.entries.len() {
                body.write_all(&(self.entries.len() - end).to_le_bytes())?;
                body.write_all(&0u64.to_le_bytes())?;
            }
            let n = body.n;
            z.finish()?;
            Ok(n)
        })();
        let body_len = match written {
            Ok(n) => n,
            Err(e) => {
                out.truncate(start);
                return Err(io_err(e));
            }
        };
        let len = out.len() - start;
        if len as u64 > MAX_INDEX_LEN {
            out.truncate(start);
            return Err(Error::Invalid(format!(
                "the block index of version {} would take {len} bytes, more than one version's index may ({MAX_INDEX_LEN}): use a larger block size (-b)",
                crate::version::VersionUid(self.uid),
            )));
        }
        out[start + 72..start + 80].copy_from_slice(&body_len.to_le_bytes());
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

    /// Whether `stored` (checked as [`BlockIndex::decode`] does) is this index, compared
    /// block by block without decoding it into a second map.
    pub fn matches_stored(&self, stored: &[u8]) -> Result<bool, IndexError> {
        let mut mine = self.entries.data();
        let mut same = true;
        let head = Self::visit(stored, |i, id| same = same && mine.next() == Some((i, id)))?;
        Ok(same
            && mine.next().is_none()
            && head
                == IndexHeader {
                    uid: self.uid,
                    size: self.size,
                    block_size: self.block_size,
                    count: self.entries.len(),
                })
    }

    /// Checks a stored index as [`BlockIndex::decode`] does, handing each data block
    /// (block number, id) to `each` in block order instead of keeping them: what a
    /// reader that needs no map (a comparison, a count) uses, in constant memory.
    /// Blocks are handed over while the body is checked: on an error, discard them.
    pub fn visit(bytes: &[u8], mut each: impl FnMut(u64, BlockId)) -> Result<IndexHeader, IndexError> {
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(IndexError::TooShort(bytes.len()));
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
        let body = &bytes[INDEX_HEADER_LEN..];
        let count_error = IndexError::EntryCount { size, block_size, expected, found: count };
        if count != expected || count > MAX_BLOCKS_PER_VERSION {
            return Err(count_error);
        }
        if version == INDEX_FORMAT_V1 && body.len() as u64 != count.saturating_mul(ID_LEN as u64) {
            return Err(count_error);
        }
        let mut hasher = Sha256::new();
        hasher.update(&bytes[0..40]);
        hasher.update([0u8; 32]);
        hasher.update(&bytes[72..]);
        if hasher.finalize().as_slice() != &bytes[40..72] {
            return Err(IndexError::Checksum);
        }
        if version == INDEX_FORMAT_V1 {
            for (i, c) in body.chunks_exact(ID_LEN).enumerate() {
                let id = BlockId::from_slice(c).unwrap_or(BlockId::SPARSE);
                if !id.is_sparse() {
                    each(i as u64, id);
                }
            }
        } else {
            decode_runs(body, tail, count, &mut each)?;
        }
        Ok(IndexHeader { uid, size, block_size, count })
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
/// blocks and that the frame holds nothing more.
fn decode_runs(frame: &[u8], body_len: u64, count: u64, each: &mut impl FnMut(u64, BlockId)) -> Result<(), IndexError> {
    let bad = |m: &str| IndexError::Malformed(m.to_string());
    let z = zstd::stream::read::Decoder::with_buffer(frame).map_err(|e| bad(&format!("cannot decompress: {e}")))?;
    let mut body = z.single_frame().take(body_len);
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
            each(at, BlockId(id));
            at += 1;
        }
        consumed += RUN_HEADER_LEN + n * ID_LEN as u64;
    }
    if consumed != body_len {
        return Err(bad("longer than its runs"));
    }
    // Nothing may follow the body in the frame, nor the frame in the index.
    let mut rest = body.into_inner();
    match rest.read(&mut [0u8; 1]) {
        Ok(0) => {}
        Ok(_) => return Err(bad("longer than its header says")),
        Err(e) => return Err(bad(&format!("cannot decompress: {e}"))),
    }
    Ok(())
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
        assert_eq!(idx.next_data(0), Some(8192..16384));
        assert_eq!(idx.next_data(9000), Some(9000..16384), "inside data: from the offset on");
        assert_eq!(idx.next_data(16384), Some(40960..40965), "the short last block");
        assert_eq!(idx.next_data(40964), Some(40964..40965));
        assert_eq!(idx.next_data(40965), None, "past the end");
        idx.entries.set(10, BlockId::SPARSE);
        assert_eq!(idx.next_data(16384), None, "sparse to the end");
        assert_eq!(BlockIndex::new_sparse(1, 0, 4096).next_data(0), None);
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
        assert_eq!(back.next_data(0), Some((5 << 22)..(6 << 22)));
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
    fn repeats_point_at_the_first_occurrence() {
        let (a, b) = (id(1), id(2));
        let ix = BlockIndex {
            uid: 1,
            size: 6 * 4096,
            block_size: 4096,
            entries: [a, b, BlockId::SPARSE, a, BlockId::SPARSE, b].into_iter().collect(),
        };
        assert_eq!(ix.repeats(), HashMap::from([(3, 0), (5, 1)]));
        assert_eq!(ix.repeats_among(|i| i != 0), HashMap::from([(5, 1)]), "block 3 is the first chosen copy");
    }

    #[test]
    fn repeats_tell_ids_apart_that_share_their_first_bytes() {
        // Ids that agree in the 8 bytes the sort uses, and differ after them.
        let twin = |n: u8| {
            let mut b = [7u8; ID_LEN];
            b[31] = n;
            BlockId(b)
        };
        let (a, b) = (twin(1), twin(2));
        let ix = BlockIndex {
            uid: 1,
            size: 6 * 4096,
            block_size: 4096,
            entries: [b, a, b, a, a, id(9)].into_iter().collect(),
        };
        assert_eq!(ix.repeats(), HashMap::from([(2, 0), (3, 1), (4, 1)]));
    }

    #[test]
    fn empty_image_has_no_entries() {
        let idx = BlockIndex::new_sparse(1, 0, 4 << 20);
        assert!(idx.entries.is_empty());
        assert_eq!(BlockIndex::decode(&idx.encode().unwrap()).unwrap(), idx);
        assert_eq!(BlockIndex::decode(&idx.encode_v1()).unwrap(), idx);
    }
}
