//! Space accounting: what each version takes in its storage, from the block indexes and
//! the objects' recorded sizes (one query per storage, no per-block SQL, no data read).
//! A block is *shared* when another version of the same storage references it too, and
//! *exclusive* otherwise: the exclusive blocks are what `rm` of the version followed by
//! `cleanup` frees.

use crate::block::BlockId;
use crate::error::Result;
use crate::repo::Repository;
use crate::version::{Status, Version};
use serde::Serialize;
use std::collections::{HashMap, HashSet};

/// One version's share of its storage. Byte counts of the image are plaintext; `stored`
/// counts are what the objects take in the storage (compressed, sealed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub uid: String,
    pub name: String,
    pub storage: String,
    /// The image's size.
    pub size: u64,
    /// Bytes held by sparse (all-zero) blocks: never stored.
    pub sparse: u64,
    /// Bytes in blocks other versions reference too.
    pub shared: u64,
    /// Bytes in blocks only this version references.
    pub exclusive: u64,
    /// Stored bytes of the distinct objects the version references.
    pub stored: u64,
    /// Stored bytes only this version references: what `rm` + `cleanup` would free.
    pub exclusive_stored: u64,
}

/// The usage of each of `selected` (versions without an index, still being written, are
/// left out), judged against every version of their storages.
pub fn storage_usage(repo: &Repository, selected: &[Version]) -> Result<Vec<Usage>> {
    let all = repo.list(None)?;
    let storages: HashSet<&str> = selected.iter().map(|v| v.storage.as_str()).collect();
    let mut out = Vec::new();
    for storage in storages {
        // How many versions reference each block (each version counted once per block).
        // Indexes are read one at a time, twice, so that memory holds one index and the
        // counts, not every index.
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for v in all.iter().filter(|v| v.storage == storage && v.status != Status::Incomplete) {
            let Ok(index) = repo.index(v.uid) else { continue };
            let distinct: HashSet<BlockId> = index.entries.data().map(|(_, id)| id).collect();
            for id in distinct {
                *refs.entry(id).or_default() += 1;
            }
        }
        let storage_id = repo.storage_id(storage)?;
        let sizes = repo.db.lock().object_sizes(storage_id)?;
        for v in selected.iter().filter(|v| v.storage == storage) {
            if v.status == Status::Incomplete {
                continue;
            }
            let Ok(index) = repo.index(v.uid) else { continue };
            let mut u = Usage {
                uid: v.uid.to_string(),
                name: v.name.clone(),
                storage: storage.to_string(),
                size: v.size,
                ..Default::default()
            };
            let mut seen = HashSet::new();
            u.sparse = index.size - index.data_bytes();
            for (i, id) in index.entries.data() {
                let len = index.block_len(i as usize) as u64;
                let only_here = refs.get(&id).copied().unwrap_or(0) <= 1;
                if only_here {
                    u.exclusive += len;
                } else {
                    u.shared += len;
                }
                if seen.insert(id) {
                    let stored = sizes.get(&id).copied().unwrap_or(0);
                    u.stored += stored;
                    if only_here {
                        u.exclusive_stored += stored;
                    }
                }
            }
            out.push(u);
        }
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    Ok(out)
}
