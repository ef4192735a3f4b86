//! The block index of a version: which object holds each block of the image. A fixed
//! header followed by one fixed-width entry (a content id) per block, in the spirit of
//! Proxmox Backup's fixed index. It is what makes a 1 TiB version one 8 MiB value instead
//! of 262,144 SQL rows. Layout in docs/format.md.

use crate::block::{BlockId, ID_LEN};
use sha2::{Digest, Sha256};

pub const INDEX_MAGIC: [u8; 8] = *b"KEEPFSIX";
pub const INDEX_FORMAT_VERSION: u16 = 1;
pub const INDEX_HEADER_LEN: usize = 80;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is {0} bytes, shorter than its header")]
    TooShort(usize),
    #[error("index does not start with the keepfs index magic number")]
    BadMagic,
    #[error("index format version {0} is not supported (this keepfs reads version 1)")]
    UnsupportedVersion(u16),
    #[error("index entry size {0} is not supported")]
    EntrySize(u16),
    #[error("index holds {found} entries but an image of {size} bytes in blocks of {block_size} needs {expected}")]
    EntryCount { size: u64, block_size: u32, expected: u64, found: u64 },
    #[error("index checksum mismatch (index damaged)")]
    Checksum,
    #[error("index belongs to another version or does not match the version's size and block size")]
    Foreign,
}

/// Number of blocks an image of `size` bytes has at `block_size` (the last may be short).
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

/// Refuses an image with more blocks than a version may have
/// ([`crate::block::MAX_BLOCKS_PER_VERSION`]: its index must fit in one database value).
pub fn check_block_count(size: u64, block_size: u32) -> crate::error::Result<()> {
    let n = block_count(size, block_size.max(1));
    if n > crate::block::MAX_BLOCKS_PER_VERSION {
        return Err(crate::error::Error::Invalid(format!(
            "an image of {size} bytes in blocks of {block_size} has {n} blocks, more than a version may have ({}): use a larger block size (-b)",
            crate::block::MAX_BLOCKS_PER_VERSION
        )));
    }
    Ok(())
}

/// A version's block map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockIndex {
    pub uid: u64,
    pub size: u64,
    pub block_size: u32,
    pub entries: Vec<BlockId>,
}

impl BlockIndex {
    /// A map with every block sparse.
    pub fn new_sparse(uid: u64, size: u64, block_size: u32) -> BlockIndex {
        let n = block_count(size, block_size) as usize;
        BlockIndex { uid, size, block_size, entries: vec![BlockId::SPARSE; n] }
    }

    /// Plaintext length of block `idx` (only the last block may be short).
    pub fn block_len(&self, idx: usize) -> usize {
        let start = idx as u64 * self.block_size as u64;
        (self.size - start).min(self.block_size as u64) as usize
    }

    /// Bytes of the image that non-sparse blocks hold: what the version occupies as a
    /// file (`st_blocks` of a mounted `data`), however large it looks.
    pub fn data_bytes(&self) -> u64 {
        (0..self.entries.len()).filter(|&i| !self.entries[i].is_sparse()).map(|i| self.block_len(i) as u64).sum()
    }

    /// The first range at or after `offset` that holds non-sparse blocks (clipped to
    /// start at `offset`), or `None` when the rest of the image is sparse. Answers
    /// SEEK_DATA/SEEK_HOLE on a mounted image. Scans from `offset` on only, so a reader
    /// walking the image extent by extent costs one pass over the index.
    pub fn next_data(&self, offset: u64) -> Option<std::ops::Range<u64>> {
        if offset >= self.size {
            return None;
        }
        let bs = self.block_size as u64;
        let from = usize::try_from(offset / bs).ok()?;
        let first = from + self.entries.get(from..)?.iter().position(|e| !e.is_sparse())?;
        let end =
            first + self.entries[first..].iter().position(|e| e.is_sparse()).unwrap_or(self.entries.len() - first);
        Some((first as u64 * bs).max(offset)..(end as u64 * bs).min(self.size))
    }

    /// For each block, the index of the earlier block with the same content, if there is
    /// one (sparse blocks have none): a restore fetches such a block once.
    pub fn repeats(&self) -> Vec<Option<u64>> {
        let mut first: std::collections::HashMap<BlockId, u64> = std::collections::HashMap::new();
        self.entries
            .iter()
            .enumerate()
            .map(|(idx, id)| {
                if id.is_sparse() {
                    return None;
                }
                let first = *first.entry(*id).or_insert(idx as u64);
                (first != idx as u64).then_some(first)
            })
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * ID_LEN);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(ID_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 32]); // checksum, filled below
        out.extend_from_slice(&[0u8; 8]); // reserved
        debug_assert_eq!(out.len(), INDEX_HEADER_LEN);
        for e in &self.entries {
            out.extend_from_slice(&e.0);
        }
        let sum = Sha256::digest(&out);
        out[40..72].copy_from_slice(&sum);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BlockIndex, IndexError> {
        if bytes.len() < INDEX_HEADER_LEN {
            return Err(IndexError::TooShort(bytes.len()));
        }
        if bytes[0..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != INDEX_FORMAT_VERSION {
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
        let expected = if block_size == 0 { u64::MAX } else { block_count(size, block_size) };
        let body = &bytes[INDEX_HEADER_LEN..];
        if count != expected || body.len() as u64 != count.saturating_mul(ID_LEN as u64) {
            return Err(IndexError::EntryCount { size, block_size, expected, found: count });
        }
        let mut hasher = Sha256::new();
        hasher.update(&bytes[0..40]);
        hasher.update([0u8; 32]);
        hasher.update(&bytes[72..]);
        if hasher.finalize().as_slice() != &bytes[40..72] {
            return Err(IndexError::Checksum);
        }
        let entries = body.chunks_exact(ID_LEN).map(|c| BlockId::from_slice(c).unwrap_or(BlockId::SPARSE)).collect();
        Ok(BlockIndex { uid, size, block_size, entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_for_seek_data_and_seek_hole() {
        // 11 blocks of 4096, the last 5 bytes long; data in blocks 2-3 and 10.
        let mut idx = BlockIndex::new_sparse(1, 10 * 4096 + 5, 4096);
        for i in [2, 3, 10] {
            idx.entries[i] = BlockId::of(&[i as u8]);
        }
        assert_eq!(idx.next_data(0), Some(8192..16384));
        assert_eq!(idx.next_data(9000), Some(9000..16384), "inside data: from the offset on");
        assert_eq!(idx.next_data(16384), Some(40960..40965), "the short last block");
        assert_eq!(idx.next_data(40964), Some(40964..40965));
        assert_eq!(idx.next_data(40965), None, "past the end");
        idx.entries[10] = BlockId::SPARSE;
        assert_eq!(idx.next_data(16384), None, "sparse to the end");
        assert_eq!(BlockIndex::new_sparse(1, 0, 4096).next_data(0), None);
    }

    #[test]
    fn roundtrip_and_damage() {
        let mut idx = BlockIndex::new_sparse(7, 10 * 4096 + 5, 4096);
        assert_eq!(idx.entries.len(), 11);
        assert_eq!(idx.block_len(10), 5);
        assert_eq!(idx.block_len(9), 4096);
        idx.entries[3] = BlockId::of(b"three");
        let bytes = idx.encode();
        assert_eq!(bytes.len(), INDEX_HEADER_LEN + 11 * 32);
        assert_eq!(BlockIndex::decode(&bytes).unwrap(), idx);
        let mut bad = bytes.clone();
        bad[INDEX_HEADER_LEN + 3 * 32] ^= 0x80;
        assert_eq!(BlockIndex::decode(&bad), Err(IndexError::Checksum));
        assert!(matches!(BlockIndex::decode(&bytes[..bytes.len() - 32]), Err(IndexError::EntryCount { .. })));
        assert_eq!(BlockIndex::decode(b"short"), Err(IndexError::TooShort(5)));
    }

    #[test]
    fn repeats_point_at_the_first_occurrence() {
        let (a, b) = (BlockId([1; ID_LEN]), BlockId([2; ID_LEN]));
        let ix = BlockIndex {
            uid: 1,
            size: 6 * 4096,
            block_size: 4096,
            entries: vec![a, b, BlockId::SPARSE, a, BlockId::SPARSE, b],
        };
        assert_eq!(ix.repeats(), vec![None, None, None, Some(0), None, Some(1)]);
    }

    #[test]
    fn empty_image_has_no_entries() {
        let idx = BlockIndex::new_sparse(1, 0, 4 << 20);
        assert!(idx.entries.is_empty());
        assert_eq!(BlockIndex::decode(&idx.encode()).unwrap(), idx);
    }
}
