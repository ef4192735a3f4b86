//! The entries of a block index in memory: a content id for each block of an image,
//! held compactly. Only non-sparse blocks take space, about 33 bytes each (their
//! 32-byte id and a bit), so a run of sparse blocks costs nothing however long, and a
//! dense image costs little more than its stored index.
//!
//! Blocks are grouped in chunks of 256: a chunk holds a bitmap of its non-sparse
//! blocks and their ids in block order, and only chunks with data exist (in an ordered
//! map). A general map from block number to id (a `BTreeMap<u64, BlockId>`) took
//! 70–80 bytes a block when filled in order, as a backup does.

use crate::block::BlockId;
use std::collections::BTreeMap;
use std::ops::Range;

/// log2 of the blocks per chunk.
const CHUNK_SHIFT: u32 = 8;
const CHUNK_LEN: u64 = 1 << CHUNK_SHIFT;
const WORDS: usize = (CHUNK_LEN / 64) as usize;

/// The non-sparse blocks among 256 consecutive ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Chunk {
    /// Bit `s` of word `s / 64` is set when block `s` of the chunk holds data.
    present: [u64; WORDS],
    /// The ids of the blocks that hold data, in block order.
    ids: Vec<BlockId>,
}

impl Chunk {
    fn has(&self, slot: usize) -> bool {
        self.present[slot / 64] & (1 << (slot % 64)) != 0
    }

    /// Number of data blocks before `slot`: where its id is (or goes) in `ids`.
    fn rank(&self, slot: usize) -> usize {
        let word = slot / 64;
        let below: u32 = self.present[..word].iter().map(|w| w.count_ones()).sum();
        let mask = (1u64 << (slot % 64)) - 1;
        (below + (self.present[word] & mask).count_ones()) as usize
    }

    fn get(&self, slot: usize) -> Option<BlockId> {
        self.has(slot).then(|| self.ids[self.rank(slot)])
    }

    /// Sets a slot's id; true when the slot held no data before.
    fn set(&mut self, slot: usize, id: BlockId) -> bool {
        let at = self.rank(slot);
        if self.has(slot) {
            self.ids[at] = id;
            false
        } else {
            self.present[slot / 64] |= 1 << (slot % 64);
            self.ids.insert(at, id);
            true
        }
    }

    /// Makes a slot sparse; true when it held data.
    fn remove(&mut self, slot: usize) -> bool {
        if !self.has(slot) {
            return false;
        }
        let at = self.rank(slot);
        self.present[slot / 64] &= !(1 << (slot % 64));
        self.ids.remove(at);
        true
    }

    /// Makes slots `from..` sparse; returns how many held data.
    fn truncate(&mut self, from: usize) -> u64 {
        let keep = self.rank(from);
        let cut = self.ids.len() - keep;
        self.ids.truncate(keep);
        for (w, word) in self.present.iter_mut().enumerate() {
            let first = w * 64;
            if from <= first {
                *word = 0;
            } else if from < first + 64 {
                *word &= (1u64 << (from - first)) - 1;
            }
        }
        cut as u64
    }

    /// The slots that hold data, in order.
    fn slots(&self) -> Slots {
        Slots { present: self.present, front: 0, back: CHUNK_LEN as usize, left: self.ids.len() }
    }

    /// The data blocks among slots `lo..hi`, with their ids: found without walking the
    /// slots before `lo` (a run is written by its range, so a scan from the chunk's
    /// start would make writing an index quadratic in the runs of a chunk).
    fn between(&self, lo: usize, hi: usize) -> impl DoubleEndedIterator<Item = (usize, &BlockId)> + '_ {
        let (a, b) = (self.rank(lo), if hi >= CHUNK_LEN as usize { self.ids.len() } else { self.rank(hi) });
        Slots { present: self.present, front: lo, back: hi, left: b - a }.zip(self.ids[a..b].iter())
    }
}

/// The set bits of a chunk's bitmap, from either end.
#[derive(Clone)]
struct Slots {
    present: [u64; WORDS],
    /// Bits below `front` and at or above `back` are taken.
    front: usize,
    back: usize,
    left: usize,
}

impl Iterator for Slots {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        while self.front < self.back {
            let (w, b) = (self.front / 64, self.front % 64);
            let bits = self.present[w] >> b;
            if bits == 0 {
                self.front = (w + 1) * 64;
                continue;
            }
            let slot = self.front + bits.trailing_zeros() as usize;
            if slot >= self.back {
                break;
            }
            self.front = slot + 1;
            self.left -= 1;
            return Some(slot);
        }
        self.front = self.back;
        None
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl DoubleEndedIterator for Slots {
    fn next_back(&mut self) -> Option<usize> {
        while self.back > self.front {
            let last = self.back - 1;
            let (w, b) = (last / 64, last % 64);
            let bits = self.present[w] & (u64::MAX >> (63 - b));
            if bits == 0 {
                self.back = w * 64;
                continue;
            }
            let slot = w * 64 + 63 - bits.leading_zeros() as usize;
            if slot < self.front {
                break;
            }
            self.back = slot;
            self.left -= 1;
            return Some(slot);
        }
        self.back = self.front;
        None
    }
}

impl ExactSizeIterator for Slots {}

/// The entries of an index: a content id for each of `len` blocks, all sparse except
/// those held in chunks. Memory is proportional to the non-sparse blocks only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    len: u64,
    /// Non-sparse blocks.
    count: u64,
    /// Chunk number → its data blocks; never an empty chunk (so equal entries are equal).
    chunks: BTreeMap<u64, Chunk>,
}

fn split(idx: u64) -> (u64, usize) {
    (idx >> CHUNK_SHIFT, (idx & (CHUNK_LEN - 1)) as usize)
}

impl Entries {
    /// `len` sparse blocks.
    pub fn sparse(len: u64) -> Entries {
        Entries { len, count: 0, chunks: BTreeMap::new() }
    }

    /// Number of blocks, sparse ones included.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The id of block `idx` (sparse for a sparse block and past the end).
    pub fn get(&self, idx: u64) -> BlockId {
        let (c, s) = split(idx);
        self.chunks.get(&c).and_then(|ch| ch.get(s)).unwrap_or(BlockId::SPARSE)
    }

    /// Sets block `idx`, growing the entries (with sparse blocks) to reach it.
    pub fn set(&mut self, idx: u64, id: BlockId) {
        if idx >= self.len {
            self.len = idx + 1;
        }
        let (c, s) = split(idx);
        if id.is_sparse() {
            if let Some(ch) = self.chunks.get_mut(&c)
                && ch.remove(s)
            {
                self.count -= 1;
                if ch.ids.is_empty() {
                    self.chunks.remove(&c);
                }
            }
        } else if self.chunks.entry(c).or_default().set(s, id) {
            self.count += 1;
        }
    }

    /// Grows (with sparse blocks) or cuts the entries to `len` blocks.
    pub fn resize(&mut self, len: u64) {
        if len < self.len {
            let (c, s) = split(len);
            for (_, gone) in self.chunks.split_off(&(c + 1)) {
                self.count -= gone.ids.len() as u64;
            }
            if let Some(ch) = self.chunks.get_mut(&c) {
                self.count -= ch.truncate(s);
                if ch.ids.is_empty() {
                    self.chunks.remove(&c);
                }
            }
        }
        self.len = len;
    }

    /// Number of non-sparse blocks.
    pub fn data_count(&self) -> u64 {
        self.count
    }

    /// The non-sparse blocks, in order: (block number, id).
    pub fn data(&self) -> impl DoubleEndedIterator<Item = (u64, BlockId)> + '_ {
        self.chunks.iter().flat_map(|(&c, ch)| {
            let base = c << CHUNK_SHIFT;
            ch.slots().zip(ch.ids.iter()).map(move |(s, &id)| (base + s as u64, id))
        })
    }

    /// The non-sparse blocks among blocks `range`, in order.
    pub fn data_in(&self, range: Range<u64>) -> impl Iterator<Item = (u64, BlockId)> + '_ {
        let range = range.start..range.end.max(range.start);
        let (first, last) = (range.start >> CHUNK_SHIFT, range.end.saturating_sub(1) >> CHUNK_SHIFT);
        let chunks = if range.is_empty() { self.chunks.range(1..1) } else { self.chunks.range(first..=last) };
        chunks.flat_map(move |(&c, ch)| {
            let base = c << CHUNK_SHIFT;
            let lo = if c == first { split(range.start).1 } else { 0 };
            let hi = if c == last { split(range.end - 1).1 + 1 } else { CHUNK_LEN as usize };
            ch.between(lo, hi).map(move |(s, &id)| (base + s as u64, id))
        })
    }

    /// Every block's id, sparse ones included (one step per block: for small images).
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        (0..self.len).map(|i| self.get(i))
    }

    /// The runs of sparse blocks, in order, as ranges of block numbers.
    pub fn sparse_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut next = 0u64;
        let mut data = self.data().map(|(i, _)| i);
        let mut done = false;
        std::iter::from_fn(move || {
            while !done {
                match data.next() {
                    Some(i) => {
                        let run = next..i;
                        next = i + 1;
                        if !run.is_empty() {
                            return Some(run);
                        }
                    }
                    None => {
                        done = true;
                        let run = next..self.len;
                        if !run.is_empty() {
                            return Some(run);
                        }
                    }
                }
            }
            None
        })
    }

    /// The runs of consecutive data blocks, in order, as ranges of block numbers.
    pub fn data_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut data = self.data().map(|(i, _)| i).peekable();
        std::iter::from_fn(move || {
            let start = data.next()?;
            let mut stop = start + 1;
            while data.next_if_eq(&stop).is_some() {
                stop += 1;
            }
            Some(start..stop)
        })
    }
}

impl FromIterator<BlockId> for Entries {
    fn from_iter<T: IntoIterator<Item = BlockId>>(iter: T) -> Entries {
        let mut e = Entries::default();
        for (i, id) in iter.into_iter().enumerate() {
            e.set(i as u64, id);
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::ID_LEN;

    fn id(n: u64) -> BlockId {
        let mut b = [0u8; ID_LEN];
        b[..8].copy_from_slice(&(n + 1).to_le_bytes());
        BlockId(b)
    }

    /// A small deterministic generator (no crate needed for a test's shuffles).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random sets, clears and resizes agree with a plain ordered map at every step.
    #[test]
    fn behaves_as_an_ordered_map() {
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let span = [10, 300, 3000][seed as usize % 3];
            let mut e = Entries::default();
            let mut m: BTreeMap<u64, BlockId> = BTreeMap::new();
            let mut len = 0u64;
            for step in 0..2000u64 {
                match rng.below(10) {
                    0 => {
                        let l = rng.below(span);
                        e.resize(l);
                        m.retain(|&k, _| k < l);
                        len = l;
                    }
                    1..=3 => {
                        let i = rng.below(span);
                        e.set(i, BlockId::SPARSE);
                        m.remove(&i);
                        len = len.max(i + 1);
                    }
                    _ => {
                        let i = rng.below(span);
                        e.set(i, id(step));
                        m.insert(i, id(step));
                        len = len.max(i + 1);
                    }
                }
                assert_eq!(e.len(), len);
                assert_eq!(e.data_count(), m.len() as u64);
                let probe = rng.below(span + 5);
                assert_eq!(e.get(probe), m.get(&probe).copied().unwrap_or(BlockId::SPARSE));
                if step % 97 == 0 {
                    let want: Vec<_> = m.iter().map(|(&k, &v)| (k, v)).collect();
                    assert_eq!(e.data().collect::<Vec<_>>(), want);
                    let back: Vec<_> = e.data().rev().collect();
                    assert_eq!(back, want.iter().rev().copied().collect::<Vec<_>>());
                    let (a, b) = (rng.below(span + 5), rng.below(span + 5));
                    let r = a.min(b)..a.max(b);
                    let want_in: Vec<_> = m.range(r.clone()).map(|(&k, &v)| (k, v)).collect();
                    assert_eq!(e.data_in(r).collect::<Vec<_>>(), want_in);
                    assert!(e.chunks.values().all(|c| !c.ids.is_empty()), "no empty chunk is kept");
                }
            }
        }
    }

    #[test]
    fn slots_from_both_ends_meet() {
        let mut ch = Chunk::default();
        for s in [0, 1, 63, 64, 128, 200, 255] {
            ch.set(s, id(s as u64));
        }
        let mut it = ch.slots();
        assert_eq!(it.len(), 7);
        assert_eq!((it.next(), it.next_back(), it.next(), it.next_back()), (Some(0), Some(255), Some(1), Some(200)));
        assert_eq!(it.collect::<Vec<_>>(), vec![63, 64, 128]);
        assert_eq!(ch.truncate(64), 4);
        assert_eq!(ch.slots().collect::<Vec<_>>(), vec![0, 1, 63]);
    }

    #[test]
    fn runs_of_data_and_of_holes() {
        let mut e = Entries::sparse(600);
        for i in (5..10).chain(255..258).chain([599]) {
            e.set(i, id(i));
        }
        assert_eq!(e.data_runs().collect::<Vec<_>>(), vec![5..10, 255..258, 599..600]);
        assert_eq!(e.sparse_runs().collect::<Vec<_>>(), vec![0..5, 10..255, 258..599]);
    }
}
