//! A version's block index for random access without holding its ids: what the mount
//! reads a version through. Which blocks hold data is kept in memory (for each chunk of
//! 256 blocks that has any: its number, a bitmap and where its ids start, 48 bytes, so
//! about 0.2 bytes a block); the ids themselves go, as the index is read out of the
//! catalog, into an unnamed spool file that is mapped into memory and read where a block
//! is asked for. The kernel keeps the pages of ids in use and may drop the others, so a
//! mounted dense version costs page cache, not the process's own memory, however large.

use super::writer::write_error;
use crate::block::{BlockId, ID_LEN};
use crate::error::{Error, Result};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// log2 of the blocks per chunk.
const CHUNK_SHIFT: u32 = 8;
const CHUNK_LEN: u64 = 1 << CHUNK_SHIFT;

/// The data blocks among 256 consecutive ones.
struct Chunk {
    /// Which chunk (block number >> 8).
    number: u64,
    /// Bit `s % 64` of word `s / 64` is set when block `s` of the chunk holds data.
    present: [u64; 4],
    /// The position, among all the data blocks, of the chunk's first: where its ids
    /// start in the file.
    first: u64,
}

impl Chunk {
    fn has(&self, slot: u64) -> bool {
        self.present[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    /// Data blocks before `slot` in the chunk.
    fn rank(&self, slot: u64) -> u64 {
        let word = (slot / 64) as usize;
        let below: u32 = self.present[..word].iter().map(|w| w.count_ones()).sum();
        let mask = (1u64 << (slot % 64)) - 1;
        (below + (self.present[word] & mask).count_ones()) as u64
    }
}

/// A version's index: [`MappedIndex::get`] a block's id, [`MappedIndex::data_in`] the
/// data blocks of a range, [`MappedIndex::next_data`] the next stretch of data.
pub struct MappedIndex {
    pub uid: u64,
    pub size: u64,
    pub block_size: u32,
    count: u64,
    chunks: Vec<Chunk>,
    /// The ids of the data blocks, in block order (none: no data block).
    ids: Option<memmap2::Mmap>,
}

impl MappedIndex {
    /// Blocks of the image, sparse ones included.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Plaintext length of block `idx` (only the last block may be short).
    pub fn block_len(&self, idx: u64) -> u64 {
        super::block_len(self.size, self.block_size, idx)
    }

    fn chunk(&self, number: u64) -> Option<&Chunk> {
        self.chunks.binary_search_by_key(&number, |c| c.number).ok().map(|at| &self.chunks[at])
    }

    /// The id of the `n`th data block.
    fn id_at(&self, n: u64) -> BlockId {
        let at = n as usize * ID_LEN;
        self.ids.as_ref().and_then(|m| m.get(at..at + ID_LEN)).and_then(BlockId::from_slice).unwrap_or(BlockId::SPARSE)
    }

    /// Block `idx`'s id (sparse past the end, and where it holds no data).
    pub fn get(&self, idx: u64) -> BlockId {
        let slot = idx % CHUNK_LEN;
        match self.chunk(idx >> CHUNK_SHIFT) {
            Some(c) if c.has(slot) => self.id_at(c.first + c.rank(slot)),
            _ => BlockId::SPARSE,
        }
    }

    /// The data blocks among blocks `range`, in order, without their ids.
    pub(crate) fn blocks_in(&self, range: Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (start, end) = (range.start, range.end);
        let from = self.chunks.partition_point(|c| c.number < start >> CHUNK_SHIFT);
        self.chunks[from..].iter().take_while(move |c| c.number << CHUNK_SHIFT < end).flat_map(move |c| {
            let base = c.number << CHUNK_SHIFT;
            let mut n = c.first;
            (0..CHUNK_LEN).filter_map(move |slot| {
                if !c.has(slot) {
                    return None;
                }
                n += 1;
                let idx = base + slot;
                (start <= idx && idx < end).then_some((idx, n - 1))
            })
        })
    }

    /// The data blocks among blocks `range`, in order, with their ids.
    pub fn data_in(&self, range: Range<u64>) -> impl Iterator<Item = (u64, BlockId)> + '_ {
        self.blocks_in(range).map(|(idx, n)| (idx, self.id_at(n)))
    }

    /// The first range at or after `offset` that holds data (clipped to start at
    /// `offset`), or `None` when the rest is sparse: SEEK_DATA/SEEK_HOLE on a mounted
    /// image. Reads no id.
    pub fn next_data(&self, offset: u64, until: u64) -> Option<Range<u64>> {
        let bs = self.block_size as u64;
        super::next_data(offset, self.size, bs, until, self.blocks_in(offset / bs..u64::MAX).map(|(i, _)| i))
    }
}

/// Builds a [`MappedIndex`] from the data blocks of an index handed over in block order.
pub struct MappedBuilder {
    out: BufWriter<std::fs::File>,
    chunks: Vec<Chunk>,
    data: u64,
    next: u64,
    dir: PathBuf,
}

impl MappedBuilder {
    /// A builder whose file of ids lies in `dir` (created with `modes` if need be).
    pub fn new(dir: &Path, modes: crate::perms::Modes) -> Result<MappedBuilder> {
        let out = super::writer::spool_file(dir, modes)?;
        Ok(MappedBuilder { out, chunks: Vec::new(), data: 0, next: 0, dir: dir.to_path_buf() })
    }

    /// Block `idx` (after the last one handed over) holds `id`.
    pub fn push(&mut self, idx: u64, id: BlockId) -> Result<()> {
        if idx < self.next {
            return Err(Error::Other(format!("block {idx} handed to the index after block {}", self.next)));
        }
        if id.is_sparse() {
            return Ok(());
        }
        self.next = idx + 1;
        let number = idx >> CHUNK_SHIFT;
        if self.chunks.last().is_none_or(|c| c.number != number) {
            self.chunks.push(Chunk { number, present: [0; 4], first: self.data });
        }
        if let Some(c) = self.chunks.last_mut() {
            let slot = idx % CHUNK_LEN;
            c.present[(slot / 64) as usize] |= 1 << (slot % 64);
        }
        self.data += 1;
        self.out.write_all(&id.0).map_err(|e| write_error(&self.dir, e))
    }

    /// The index of version `uid`, an image of `size` bytes in `count` blocks of
    /// `block_size`.
    pub fn finish(self, head: super::IndexHeader) -> Result<MappedIndex> {
        let dir = self.dir;
        let file = self.out.into_inner().map_err(|e| write_error(&dir, e.into_error()))?;
        let ids = if self.data == 0 {
            None
        } else {
            // SAFETY: the file is an unnamed temporary file of this process alone, written
            // in full above; nothing changes or truncates it while it is mapped.
            Some(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| write_error(&dir, e))?)
        };
        Ok(MappedIndex {
            uid: head.uid,
            size: head.size,
            block_size: head.block_size,
            count: head.count,
            chunks: self.chunks,
            ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{BlockIndex, Entries, IndexHeader};

    fn id(n: u64) -> BlockId {
        BlockId::of(&n.to_le_bytes())
    }

    /// Random indexes: every block's id, the data of random ranges and the next data
    /// from random offsets are what the map in memory says.
    #[test]
    fn a_mapped_index_answers_as_the_map_does() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let dir = tempfile::tempdir().unwrap();
        for case in 0..40u64 {
            let count = [0, 1, 255, 256, 257, 1000, 5000][case as usize % 7] + rnd(3);
            let size = if count == 0 { 0 } else { count * 4096 - rnd(4096) };
            let mut entries = Entries::sparse(count);
            let density = rnd(100);
            for i in 0..count {
                // Stretches of data and of holes, some whole chunks of each.
                if (i / (1 + rnd(300))) % 2 == 0 && rnd(100) < density {
                    entries.set(i, id(i * 7 + case));
                }
            }
            let index = BlockIndex { uid: 5, size, block_size: 4096, entries };
            let mut b = MappedBuilder::new(dir.path(), crate::perms::Modes::PRIVATE).unwrap();
            for (i, x) in index.entries.data() {
                b.push(i, x).unwrap();
            }
            let head = IndexHeader { uid: 5, size, block_size: 4096, count };
            let m = b.finish(head).unwrap();
            assert_eq!(m.len(), count);
            for i in 0..count + 3 {
                assert_eq!(m.get(i), index.entries.get(i), "case {case} block {i}");
            }
            for _ in 0..50 {
                let a = rnd(count + 2);
                let r = a..a + rnd(700);
                let want: Vec<_> = index.entries.data_in(r.clone()).collect();
                assert_eq!(m.data_in(r.clone()).collect::<Vec<_>>(), want, "case {case} {r:?}");
                let off = rnd(size + 10);
                assert_eq!(m.next_data(off, u64::MAX), index.next_data(off, u64::MAX), "case {case} offset {off}");
                let until = off + rnd(3 * 4096);
                let near = m.next_data(off, until);
                assert_eq!(near, index.next_data(off, until), "case {case} offset {off} until {until}");
                // The same stretch, cut short only past `until`.
                let whole = m.next_data(off, u64::MAX);
                assert_eq!(near.clone().map(|r| r.start), whole.clone().map(|r| r.start));
                if let (Some(n), Some(w)) = (near, whole) {
                    assert!(n.end <= w.end && (n.end == w.end || n.end >= until), "{n:?} {w:?} until {until}");
                }
            }
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is left in the spool");
    }

    #[test]
    fn blocks_handed_over_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = MappedBuilder::new(dir.path(), crate::perms::Modes::PRIVATE).unwrap();
        b.push(10, id(1)).unwrap();
        assert!(b.push(10, id(2)).is_err());
        assert!(b.push(3, id(2)).is_err());
        b.push(11, id(3)).unwrap();
    }
}
