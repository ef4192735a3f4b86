//! Differences between two versions of an image, from their block indexes alone (no block
//! is read): the byte ranges whose content differs, as `rbd diff` reports them, so that
//! `keepfs diff A B --format json` can serve as `backup --hints` of B over A.

use crate::block::BlockId;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::index::BlockIndex;
use serde::Serialize;

/// A range of the newer version that differs from the older one. `exists` is false
/// where the newer version holds zeros there (rbd's "discarded").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub offset: u64,
    pub length: u64,
    #[serde(serialize_with = "as_rbd_bool")]
    pub exists: bool,
}

/// rbd writes `"exists": "true"` as a string.
fn as_rbd_bool<S: serde::Serializer>(b: &bool, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(if *b { "true" } else { "false" })
}

/// The ranges of a newer version whose bytes differ from an older one's, in order,
/// adjacent ranges of the same kind merged: built from the blocks that hold data in
/// either version, handed over in block order with the old and the new id (sparse where
/// a version has none), holding only the changes. Blocks past the end of the older
/// version count as changed; a shorter newer version ends the comparison at its end.
pub struct Differ {
    old: (u64, u64),
    new: (u64, u64),
    bs: u32,
    out: Vec<Change>,
}

impl Differ {
    /// For versions of (size, block size) `old` and `new`; refused when their block
    /// sizes differ.
    pub fn new(old: (u64, u32), new: (u64, u32)) -> Result<Differ> {
        if old.1 != new.1 {
            return Err(Error::Invalid(format!(
                "the versions have different block sizes ({} and {}): diff compares versions of one image",
                old.1, new.1
            )));
        }
        let bs = new.1;
        let count = |size: u64| crate::index::block_count(size, bs.max(1));
        Ok(Differ { old: (old.0, count(old.0)), new: (new.0, count(new.0)), bs, out: Vec::new() })
    }

    fn len(&self, size: u64, idx: u64) -> u64 {
        crate::index::block_len(size, self.bs, idx)
    }

    /// Block `idx`, with id `before` in the old version and `id` in the new one.
    pub fn block(&mut self, idx: u64, before: BlockId, id: BlockId) {
        if idx >= self.new.1 {
            return;
        }
        let same_len = idx < self.old.1 && self.len(self.old.0, idx) == self.len(self.new.0, idx);
        if id == before && (same_len || id.is_sparse()) {
            return;
        }
        let (offset, length, exists) = (idx * self.bs as u64, self.len(self.new.0, idx), !id.is_sparse());
        match self.out.last_mut() {
            Some(last) if last.exists == exists && last.offset + last.length == offset => last.length += length,
            _ => self.out.push(Change { offset, length, exists }),
        }
    }

    pub fn finish(self) -> Vec<Change> {
        self.out
    }
}

/// Which blocks a delta restore writes: a target holding the older version must have
/// written those of the newer whose content id or length differs. Blocks past the end of
/// the older one are changed, except zero blocks when `zeros_past_old` (a file grown
/// with `set_len` reads zeros there; a block device may hold anything).
#[derive(Clone, Copy, Debug)]
pub struct DeltaBlocks {
    /// (size, block count) of the older and the newer version.
    old: (u64, u64),
    new: (u64, u64),
    bs: u32,
    zeros_past_old: bool,
}

impl DeltaBlocks {
    /// For versions of (size, block size) `old` and `new`; refused when their block
    /// sizes differ.
    pub fn new(old: (u64, u32), new: (u64, u32), zeros_past_old: bool) -> Result<DeltaBlocks> {
        if old.1 != new.1 {
            return Err(Error::Invalid(format!(
                "the versions have different block sizes ({} and {}): a delta restore needs versions of one image",
                old.1, new.1
            )));
        }
        let bs = new.1.max(1);
        let count = |size: u64| crate::index::block_count(size, bs);
        Ok(DeltaBlocks { old: (old.0, count(old.0)), new: (new.0, count(new.0)), bs, zeros_past_old })
    }

    /// Blocks of the older and of the newer version.
    pub fn counts(&self) -> (u64, u64) {
        (self.old.1, self.new.1)
    }

    /// Bytes of block `idx` of the newer version.
    pub fn new_len(&self, idx: u64) -> u64 {
        crate::index::block_len(self.new.0, self.bs, idx)
    }

    /// Bytes of block `idx` of the older version.
    pub fn old_len(&self, idx: u64) -> u64 {
        crate::index::block_len(self.old.0, self.bs, idx)
    }

    /// Whether block `idx` of the newer version, `id` there and `before` in the older,
    /// must be written.
    pub fn changed(&self, idx: u64, before: BlockId, id: BlockId) -> bool {
        let old_n = self.old.1;
        if idx < old_n && before == id && self.old_len(idx) == self.new_len(idx) {
            return false;
        }
        // Zeros past the old end of a file that is grown (or kept) read as zeros.
        !(self.zeros_past_old && id.is_sparse() && (idx >= old_n || before.is_sparse()))
    }

    /// The blocks that may differ besides those holding data in either version: the
    /// older version's last (it may be shorter), and on a device every block past the
    /// older version's end.
    pub fn extra(&self) -> (Option<u64>, std::ops::Range<u64>) {
        let (old_n, n) = (self.old.1, self.new.1);
        let last = old_n.checked_sub(1).filter(|&l| l < n);
        let tail = if self.zeros_past_old { 0..0 } else { old_n.min(n)..n };
        (last, tail)
    }
}

/// The blocks of `new` a target holding `old` must have written to hold `new` (see
/// [`DeltaBlocks`]), from two indexes held in memory: the tests' reference for the
/// streamed delta restore.
#[cfg(test)]
pub fn changed_blocks(old: &BlockIndex, new: &BlockIndex, zeros_past_old: bool) -> Result<Vec<u64>> {
    if old.block_size != new.block_size {
        return Err(Error::Invalid(format!(
            "the versions have different block sizes ({} and {}): a delta restore needs versions of one image",
            old.block_size, new.block_size
        )));
    }
    let (n, old_n) = (new.entries.len(), old.entries.len());
    // Only a block that holds data in either version, the old last block (it may be
    // shorter), or a block past the old end of a device can differ: walk those, in order.
    let mut candidates: std::collections::BTreeSet<u64> =
        new.entries.data().map(|(i, _)| i).chain(old.entries.data_in(0..n).map(|(i, _)| i)).collect();
    if old_n > 0 && old_n - 1 < n {
        candidates.insert(old_n - 1);
    }
    if !zeros_past_old {
        candidates.extend(old_n.min(n)..n);
    }
    Ok(candidates
        .into_iter()
        .filter(|&idx| {
            let (id, i) = (new.entries.get(idx), idx as usize);
            if idx < old_n && old.entries.get(idx) == id && old.block_len(i) == new.block_len(i) {
                return false;
            }
            // Zeros past the old end of a file that is grown (or kept) read as zeros.
            !(zeros_past_old && id.is_sparse() && (idx >= old_n || old.entries.get(idx).is_sparse()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BlockId {
        BlockId([n; 32])
    }

    /// [`Differ`] over two indexes held in memory (`Repository::diff` feeds it from the
    /// catalog as streams).
    fn diff(old: &BlockIndex, new: &BlockIndex) -> Result<Vec<Change>> {
        let mut d = Differ::new((old.size, old.block_size), (new.size, new.block_size))?;
        let (mut a, mut b) = (old.entries.data().peekable(), new.entries.data().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(&(i, _)), None) => i,
                (None, Some(&(j, _))) => j,
                (Some(&(i, _)), Some(&(j, _))) => i.min(j),
            };
            let before = a.next_if(|&(i, _)| i == next).map_or(BlockId::SPARSE, |(_, id)| id);
            let id = b.next_if(|&(j, _)| j == next).map_or(BlockId::SPARSE, |(_, id)| id);
            d.block(next, before, id);
        }
        Ok(d.finish())
    }

    fn index(size: u64, entries: Vec<BlockId>) -> BlockIndex {
        BlockIndex { uid: 1, size, block_size: 4096, entries: entries.into_iter().collect() }
    }

    #[test]
    fn changed_ranges_merge_and_zeros_do_not_exist() {
        let s = BlockId::SPARSE;
        let old = index(5 * 4096, vec![id(1), id(2), id(3), s, id(5)]);
        let new = index(7 * 4096 - 100, vec![id(1), id(9), id(8), id(4), s, s, id(7)]);
        assert_eq!(
            diff(&old, &new).unwrap(),
            vec![
                Change { offset: 4096, length: 3 * 4096, exists: true },
                Change { offset: 4 * 4096, length: 4096, exists: false },
                Change { offset: 6 * 4096, length: 4096 - 100, exists: true },
            ]
        );
        assert!(diff(&old, &old).unwrap().is_empty());
        let other = BlockIndex { block_size: 8192, ..index(4096, vec![id(1)]) };
        assert!(diff(&old, &other).unwrap_err().to_string().contains("different block sizes"));
    }

    #[test]
    fn changed_blocks_of_a_file_and_of_a_device() {
        let s = BlockId::SPARSE;
        let old = index(3 * 4096 - 10, vec![id(1), id(2), s]);
        let new = index(6 * 4096, vec![id(1), id(3), s, id(4), s, s]);
        // Block 2 grows from 4086 zero bytes to 4096: a file reads zeros there.
        assert_eq!(changed_blocks(&old, &new, true).unwrap(), vec![1, 3]);
        assert_eq!(changed_blocks(&old, &new, false).unwrap(), vec![1, 2, 3, 4, 5]);
        assert!(changed_blocks(&old, &old, false).unwrap().is_empty());
    }
}
