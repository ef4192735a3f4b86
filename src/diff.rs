//! Differences between two versions of an image, from their block indexes alone (no block
//! is read): the byte ranges whose content differs, as `rbd diff` reports them, so that
//! `keepfs diff A B --format json` can serve as `backup --hints` of B over A.

use crate::block::BlockId;
use crate::error::{Error, Result};
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

/// The ranges of `new` whose bytes differ from `old`'s, in order, adjacent ranges of the
/// same kind merged. Blocks past the end of `old` count as changed; a shorter `new` ends
/// the comparison at its end.
pub fn diff(old: &BlockIndex, new: &BlockIndex) -> Result<Vec<Change>> {
    if old.block_size != new.block_size {
        return Err(Error::Invalid(format!(
            "the versions have different block sizes ({} and {}): diff compares versions of one image",
            old.block_size, new.block_size
        )));
    }
    let bs = new.block_size as u64;
    let mut out: Vec<Change> = Vec::new();
    for (idx, &id) in new.entries.iter().enumerate() {
        let before = old.entries.get(idx).copied().unwrap_or(BlockId::SPARSE);
        let same_len = idx < old.entries.len() && old.block_len(idx) == new.block_len(idx);
        if id == before && (same_len || id.is_sparse()) {
            continue;
        }
        let (offset, length, exists) = (idx as u64 * bs, new.block_len(idx) as u64, !id.is_sparse());
        match out.last_mut() {
            Some(last) if last.exists == exists && last.offset + last.length == offset => last.length += length,
            _ => out.push(Change { offset, length, exists }),
        }
    }
    Ok(out)
}

/// The blocks of `new` a target holding `old` must have written to hold `new`: those
/// whose content id or length differs. Blocks past the end of `old` are changed, except
/// zero blocks when `zeros_past_old` (a file grown with `set_len` reads zeros there; a
/// block device may hold anything).
pub fn changed_blocks(old: &BlockIndex, new: &BlockIndex, zeros_past_old: bool) -> Result<Vec<usize>> {
    if old.block_size != new.block_size {
        return Err(Error::Invalid(format!(
            "the versions have different block sizes ({} and {}): a delta restore needs versions of one image",
            old.block_size, new.block_size
        )));
    }
    let old_size = old.size;
    let bs = new.block_size as u64;
    Ok(new
        .entries
        .iter()
        .enumerate()
        .filter(|&(idx, id)| match old.entries.get(idx) {
            Some(before) if before == id && old.block_len(idx) == new.block_len(idx) => false,
            // Zeros past the old end of a file that is grown (or kept) read as zeros.
            _ if zeros_past_old && id.is_sparse() && (idx as u64 * bs >= old_size || old.entries[idx].is_sparse()) => {
                false
            }
            _ => true,
        })
        .map(|(idx, _)| idx)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BlockId {
        BlockId([n; 32])
    }

    fn index(size: u64, entries: Vec<BlockId>) -> BlockIndex {
        BlockIndex { uid: 1, size, block_size: 4096, entries }
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
