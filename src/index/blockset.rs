//! A set of block numbers held as bitmaps: chunks of 256 blocks, each a 32-byte bitmap,
//! only chunks with a member kept (in an ordered map). Dense, it costs about a quarter of
//! a byte a block (a `BTreeMap<u64, _>` took 20 or more); sparse, a chunk a member. It
//! answers "the first member at or after n" without walking the blocks between, which is
//! what a draft's holes (SEEK_DATA, NBD block status) and its commit need.

use std::collections::BTreeMap;

/// log2 of the blocks per chunk.
const SHIFT: u32 = 8;
const MASK: u64 = (1 << SHIFT) - 1;
const WORDS: usize = 1 << (SHIFT - 6);

#[derive(Clone, Debug, Default)]
pub struct BlockSet {
    chunks: BTreeMap<u64, [u64; WORDS]>,
    len: u64,
}

impl BlockSet {
    pub fn contains(&self, idx: u64) -> bool {
        let bit = idx & MASK;
        self.chunks.get(&(idx >> SHIFT)).is_some_and(|c| c[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Adds `idx`; true when it was not a member.
    pub fn insert(&mut self, idx: u64) -> bool {
        let bit = idx & MASK;
        let word = &mut self.chunks.entry(idx >> SHIFT).or_default()[(bit / 64) as usize];
        let new = *word & (1 << (bit % 64)) == 0;
        *word |= 1 << (bit % 64);
        self.len += new as u64;
        new
    }

    /// Removes `idx`; true when it was a member.
    pub fn remove(&mut self, idx: u64) -> bool {
        let bit = idx & MASK;
        let Some(c) = self.chunks.get_mut(&(idx >> SHIFT)) else { return false };
        let word = &mut c[(bit / 64) as usize];
        let was = *word & (1 << (bit % 64)) != 0;
        *word &= !(1 << (bit % 64));
        if c.iter().all(|w| *w == 0) {
            self.chunks.remove(&(idx >> SHIFT));
        }
        self.len -= was as u64;
        was
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first member at or after `from`.
    pub fn next_at(&self, from: u64) -> Option<u64> {
        for (&key, c) in self.chunks.range(from >> SHIFT..) {
            let base = key << SHIFT;
            let first = from.saturating_sub(base).min(MASK + 1);
            for (w, &word) in c.iter().enumerate() {
                let lo = w as u64 * 64;
                if lo + 64 <= first {
                    continue;
                }
                let masked = if first > lo { word & (u64::MAX << (first - lo)) } else { word };
                if masked != 0 {
                    return Some(base + lo + masked.trailing_zeros() as u64);
                }
            }
        }
        None
    }

    /// The members of `range`, in order.
    pub fn iter_in(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = u64> + '_ {
        let mut at = range.start;
        std::iter::from_fn(move || {
            let i = self.next_at(at).filter(|&i| i < range.end)?;
            at = i + 1;
            Some(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The set against a `BTreeSet` under a random walk of inserts, removals and
    /// searches, across chunk and word edges.
    #[test]
    fn behaves_like_an_ordered_set() {
        let mut s = BlockSet::default();
        let mut model = BTreeSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let idx = match x % 4 {
                0 => x % 2048,
                1 => (x >> 8) % 64 + 250,
                2 => u64::MAX - (x >> 16) % 300,
                _ => (x >> 4) % 1_000_000,
            };
            match (x >> 40) % 3 {
                0 => assert_eq!(s.insert(idx), model.insert(idx)),
                1 => assert_eq!(s.remove(idx), model.remove(&idx)),
                _ => {
                    assert_eq!(s.contains(idx), model.contains(&idx));
                    assert_eq!(s.next_at(idx), model.range(idx..).next().copied(), "next at {idx}");
                }
            }
            assert_eq!(s.len(), model.len() as u64);
        }
        let all: Vec<u64> = s.iter_in(0..u64::MAX).collect();
        assert_eq!(all, model.range(..u64::MAX).copied().collect::<Vec<_>>());
        let mid: Vec<u64> = s.iter_in(255..70_000).collect();
        assert_eq!(mid, model.range(255..70_000).copied().collect::<Vec<_>>());
        assert_eq!(s.next_at(u64::MAX), model.range(u64::MAX..).next().copied());
    }

    #[test]
    fn a_dense_million_blocks_take_bitmaps_only() {
        let mut s = BlockSet::default();
        for i in 0..1_000_000u64 {
            s.insert(i);
        }
        assert_eq!(s.chunks.len(), 1_000_000usize.div_ceil(256));
        assert_eq!(s.iter_in(999_990..2_000_000).count(), 10);
    }
}
