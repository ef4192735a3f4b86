//! Space accounting: what each version takes in its storage, from the block indexes and
//! the objects' recorded sizes (one query per storage, no per-block SQL, no data read).
//! A block is *shared* when another version of the same storage references it too, and
//! *exclusive* otherwise: the exclusive blocks are what `rm` of the version followed by
//! `cleanup` frees.

use crate::block::BlockId;
use crate::catalog::OBJECT_PRESENT;
use crate::error::Result;
use crate::repo::Repository;
use crate::slice::Slice;
use crate::version::{Status, Version};
use serde::Serialize;
use std::collections::HashMap;

/// What the accounting keeps per distinct block of a storage.
#[derive(Default)]
struct Refs {
    /// Versions that reference it.
    count: u32,
    /// The last walk (a version's) that met it: each version counts once per block.
    last: u32,
}

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

/// Estimated bytes the accounting holds per object of a storage: a count (a 32-byte id
/// and 8 bytes in a hash map) and a stored size (the same), with the maps' slack.
const BYTES_PER_OBJECT: u64 = 128;

/// The usage of each of `selected` (versions without an index, still being written, are
/// left out), judged against every version of their storages. A storage with more
/// objects than `cleanup_memory` holds this way is accounted a slice of its ids at a
/// time (each slice walks the indexes again); the sums over the slices are exact.
pub fn storage_usage(repo: &Repository, selected: &[Version]) -> Result<Vec<Usage>> {
    let all = repo.list(None)?;
    let storages: std::collections::BTreeSet<&str> = selected.iter().map(|v| v.storage.as_str()).collect();
    let mut out = Vec::new();
    for storage in storages {
        let storage_id = repo.storage_id(storage)?;
        let slices = repo.slices_within_budget(storage, BYTES_PER_OBJECT)?;
        let chosen: Vec<&Version> =
            selected.iter().filter(|v| v.storage == storage && v.status != Status::Incomplete).collect();
        // Per chosen version: its usage so far and its data bytes, or None once it is
        // left out (removed since it was listed, or its index damaged).
        let mut sums: Vec<Option<(Usage, u64)>> = chosen
            .iter()
            .map(|v| {
                let u = Usage {
                    uid: v.uid.to_string(),
                    name: v.name.clone(),
                    storage: storage.to_string(),
                    size: v.size,
                    ..Default::default()
                };
                Some((u, 0))
            })
            .collect();
        for slice in Slice::all(slices) {
            account_slice(repo, storage, storage_id, &all, &chosen, &mut sums, slice)?;
        }
        for (mut u, data) in sums.into_iter().flatten() {
            u.sparse = u.size.saturating_sub(data);
            out.push(u);
        }
    }
    out.sort_by(|a, b| a.uid.cmp(&b.uid));
    Ok(out)
}

/// Adds what the blocks of `slice` contribute to each chosen version's usage.
fn account_slice(
    repo: &Repository,
    storage: &str,
    storage_id: i64,
    all: &[Version],
    chosen: &[&Version],
    sums: &mut [Option<(Usage, u64)>],
    slice: Slice,
) -> Result<()> {
    // How many versions reference each block (each version counted once per block), and
    // the last pass that met it. Indexes are walked as streams, one at a time, twice:
    // memory holds these counts, never an index.
    let mut refs: HashMap<BlockId, Refs> = HashMap::new();
    let mut pass = 0u32;
    for v in all.iter().filter(|v| v.storage == storage && v.status != Status::Incomplete) {
        pass += 1;
        // As it is now (a `metadata restore --force` may have changed it since the list).
        let Ok(v) = repo.version(v.uid) else { continue };
        let walked = repo.walk_index(&v, |_, id| {
            if slice.holds_id(&id) {
                let r = refs.entry(id).or_default();
                if r.last != pass {
                    (r.count, r.last) = (r.count + 1, pass);
                }
            }
            true
        });
        if walked.is_err() {
            // Not counted, as if it had not been walked: the blocks it handed over before
            // its damage showed are taken back.
            refs.retain(|_, r| {
                if r.last == pass {
                    r.count -= 1;
                }
                r.count > 0
            });
        }
    }
    let mut sizes: HashMap<BlockId, u64> = HashMap::new();
    repo.db.lock().for_each_object(storage_id, &mut |row| {
        if row.state == OBJECT_PRESENT && slice.holds_id(&row.id) {
            sizes.insert(row.id, row.stored_size);
        }
    })?;
    for (v, sum) in chosen.iter().zip(sums.iter_mut()) {
        let Some((u, data)) = sum else { continue };
        pass += 1;
        let Ok(v) = repo.version(v.uid) else {
            *sum = None;
            continue;
        };
        // As it is now (a `metadata restore --force` may have changed it since the list).
        u.size = v.size;
        let walked = repo.walk_index(&v, |i, id| {
            if !slice.holds_id(&id) {
                return true;
            }
            let len = crate::index::block_len(v.size, v.block_size, i);
            *data += len;
            let r = refs.entry(id).or_default();
            let only_here = r.count <= 1;
            if only_here {
                u.exclusive += len;
            } else {
                u.shared += len;
            }
            if r.last != pass {
                r.last = pass;
                let stored = sizes.get(&id).copied().unwrap_or(0);
                u.stored += stored;
                if only_here {
                    u.exclusive_stored += stored;
                }
            }
            true
        });
        if walked.is_err() {
            *sum = None;
        }
    }
    Ok(())
}
