//! Differential planning: a base version and hints (or the source's own diff) decide
//! which blocks a backup reads, checked against the base before the version is created;
//! after the read, the base's index fills the blocks not read.

use super::BackupOptions;
use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::index::{BlockIndex, IndexFile, IndexWriter, block_count};
use crate::repo::Repository;
use crate::source::{Source, Url};
use crate::version::{Stats, Version};

/// Most blocks called unchanged that a differential backup reads to check its hints
/// against the base (the sample is thinned evenly past this): a bound on its list (40
/// bytes a block) for images of billions of blocks.
const MAX_HINT_SAMPLES: u64 = 1 << 20;

/// What a differential backup reads and where the rest comes from.
pub(super) struct Differential {
    /// Blocks to read from the source.
    pub(super) wanted: crate::hints::Wanted,
    /// The base version, whose index gives the blocks not read (read from the catalog
    /// as a stream when they are merged, never held).
    pub(super) base: Option<Version>,
}

impl Repository {
    /// Fills the blocks a differential backup did not read: from the base where it has
    /// them, sparse past its end (rbd diff reports growth as changed regions). The blocks
    /// read (`read`, where those not read are sparse) and the base's index are walked
    /// side by side as streams (`read` on a thread of its own) into the version's index.
    pub(super) fn merge_base(&self, read: IndexFile, d: &Differential, stats: &mut Stats) -> Result<IndexFile> {
        let head = read.header();
        let (n, size, bs) = (head.count, head.size, head.block_size);
        let len = |idx: u64| crate::index::block_len(size, bs, idx);
        let mut out = self.index_writer(bs)?;
        let mut from_base = 0u64;
        let mut failed: Option<Error> = None;
        let read = &read;
        let (read_walk, walked) = crate::repo::walk_beside(
            |hand| BlockIndex::visit_reader(read.reader(), hand),
            |mut from_read| {
                let mut put = |i: u64, id: BlockId, out: &mut IndexWriter| match out.push(i, id) {
                    Ok(()) => true,
                    Err(e) => {
                        failed.get_or_insert(e);
                        false
                    }
                };
                let walked = match &d.base {
                    // Walked to the end even when the image shrank: the base's checksum,
                    // known only there, must hold before its ids go into this version.
                    Some(base) => self
                        .walk_index(base, |idx, id| {
                            if idx >= n || d.wanted.contains(idx) {
                                return true;
                            }
                            while let Some((i, x)) = from_read.next_if(|&(i, _)| i < idx) {
                                if !put(i, x, &mut out) {
                                    return false;
                                }
                            }
                            from_base += len(idx);
                            put(idx, id, &mut out)
                        })
                        .map(|_| ()),
                    None => Ok(()),
                };
                // The rest of the blocks read (drained even after a failure: the walker
                // ends then).
                let mut going = walked.is_ok();
                for (i, x) in from_read {
                    going = going && put(i, x, &mut out);
                }
                walked
            },
        );
        let read_walk = match read_walk {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(Error::Other("the blocks read were not all handed over".into())),
            Ok(Err(e)) => Err(Error::Other(format!("the index of the blocks read does not read back: {e}"))),
            Err(_) => Err(Error::Other("the thread reading the blocks read panicked".into())),
        };
        walked.and(read_walk)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let bytes = |r: std::ops::Range<u64>| (r.end * bs as u64).min(size) - r.start * bs as u64;
        let not_read: u64 = d.wanted.gaps().map(bytes).sum();
        stats.bytes_deduplicated += from_base;
        stats.bytes_sparse += not_read - from_base;
        out.finish(head.uid, size)
    }
}

impl Repository {
    /// Checks a base version and hints and decides which blocks to read. Errors here come
    /// before any version is created.
    pub(super) fn plan_differential(
        &self,
        opts: &mut BackupOptions,
        source: &dyn Source,
        url: &Url,
        session: &crate::repo::SessionGuard,
    ) -> Result<Option<Differential>> {
        let size = source.size();
        let base = match opts.base {
            None => None,
            Some(buid) => {
                let b = self.version(buid)?;
                // An invalid base is fine: the blocks that made it invalid are read again
                // below, whatever the hints say. An incomplete one has no index to trust.
                if b.status == crate::version::Status::Incomplete {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is incomplete; a base must be a finished backup (choose another)"
                    )));
                }
                if b.name != opts.name {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is a backup of '{}', not '{}'; a base must have the same name",
                        b.name, opts.name
                    )));
                }
                match opts.block_size {
                    Some(bs) if bs != b.block_size => {
                        return Err(Error::Invalid(format!(
                            "base version {buid} has blocks of {} bytes, this backup {bs}; use the base's block size",
                            b.block_size
                        )));
                    }
                    _ => opts.block_size = Some(b.block_size),
                }
                let storage = opts.storage.clone().unwrap_or_else(|| self.config.default_storage.clone());
                if storage != b.storage && opts.storage.is_some() {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is in storage '{}', this backup goes to '{storage}'; a base must be in the same storage",
                        b.storage
                    )));
                }
                opts.storage = Some(b.storage.clone());
                session.lock_version(buid, "base")?;
                // Checked end to end before anything is planned from it.
                self.walk_index(&b, |_, _| true)?;
                Some(b)
            }
        };
        let bs = opts.block_size.unwrap_or(self.config.block_size);
        let mut wanted = match (opts.hints.as_deref(), opts.diff_from.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(Error::Invalid("give --hints or --diff-from, not both".into()));
            }
            (None, Some(snap)) => {
                let Some(b) = &base else {
                    return Err(Error::Invalid(format!(
                        "--diff-from {snap} needs --base UID (the version of snapshot {snap})"
                    )));
                };
                if size < b.size {
                    return Err(Error::Invalid(format!(
                        "{url} holds {size} bytes, base {} {}: the image shrank since the base; back up without --base/--diff-from (an initial backup)",
                        b.uid, b.size
                    )));
                }
                crate::hints::wanted_blocks(source.changed_since(snap, opts.whole_object)?, size, bs)?
            }
            (Some(json), None) => crate::hints::parse_hints(json, size, bs)?,
            (None, None) => {
                if base.is_some() {
                    return Err(Error::Invalid(
                        "--base needs --hints or --diff-from (a backup without them reads everything anyway)".into(),
                    ));
                }
                return Ok(None);
            }
        };
        let Some(base) = base else {
            return Ok(Some(Differential { wanted, base: None }));
        };
        let n = wanted.len();
        let base_len = block_count(base.size, base.block_size);
        let block_len = |idx: u64, size: u64| crate::index::block_len(size, bs, idx);
        // Blocks whose length changed (the base's last, the new last) are read whole.
        for idx in [base_len.saturating_sub(1), n.saturating_sub(1)] {
            if idx < n && idx < base_len && block_len(idx, base.size) != block_len(idx, size) {
                wanted.insert(idx..idx + 1);
            }
        }
        let base_storage_name = base.storage.clone();
        // Blocks whose stored object a scrub found damaged are always read again.
        let base_storage_id = self.storage_id(&base_storage_name)?;
        let damaged = self.db().invalid_objects(base_storage_id)?;
        if !damaged.is_empty() {
            self.walk_index(&base, |idx, id| {
                if idx < n && damaged.contains(&id) {
                    wanted.insert(idx..idx + 1);
                }
                true
            })?;
        }
        // Trust, but verify: a sample of the blocks the hints call unchanged must match.
        let percent = opts.hints_check_percent.unwrap_or(1).min(100);
        // Found without a list of every unchanged block (that would be 8 bytes a block).
        let unchanged = || wanted.gaps().flat_map(|r| r.start..r.end.min(base_len)).map(|i| i as usize);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        let unchanged_count = unchanged().count() as u64;
        // At most MAX_HINT_SAMPLES (every k-th of the drawn sample): 40 bytes each held.
        let stride = (unchanged_count * percent as u64 / 100).div_ceil(MAX_HINT_SAMPLES).max(1) as usize;
        let mut sample: Vec<usize> = unchanged()
            .filter(|&i| crate::scrub::sampled(seed, i as u64, percent))
            .step_by(stride)
            .take(MAX_HINT_SAMPLES as usize)
            .collect();
        if sample.is_empty() && percent > 0 && unchanged_count > 0 {
            sample.extend(unchanged().nth((seed % unchanged_count) as usize));
        }
        // The base's ids of the sampled blocks (in block order; sparse where it has none),
        // from its index read as a stream.
        let mut base_ids = vec![BlockId::SPARSE; sample.len()];
        let mut at = 0;
        self.walk_index(&base, |idx, id| {
            while at < sample.len() && (sample[at] as u64) < idx {
                at += 1;
            }
            if at < sample.len() && sample[at] as u64 == idx {
                base_ids[at] = id;
            }
            at < sample.len()
        })?;
        let base_storage = self.storage(&base_storage_name)?;
        let mut buf = vec![0u8; bs as usize];
        for (idx, base_id) in sample.into_iter().zip(base_ids) {
            let off = idx as u64 * bs as u64;
            let len = (size - off).min(bs as u64) as usize;
            source
                .read_at(off, &mut buf[..len])
                .map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e))?;
            let id = if crate::block::is_zero(&buf[..len]) {
                BlockId::SPARSE
            } else {
                base_storage.codec().id_of(&buf[..len])
            };
            if id != base_id {
                if let Some(snap) = &opts.diff_from {
                    return Err(Error::Invalid(format!(
                        "the diff from snapshot {snap} is wrong: block {idx} (bytes {off}..{}) of {url} differs from base {} although librbd calls it unchanged; is {} really the version of snapshot {snap}? Back up without --base/--diff-from",
                        off + len as u64,
                        base.uid,
                        base.uid
                    )));
                }
                return Err(Error::Invalid(format!(
                    "the hints are wrong: block {idx} (bytes {off}..{}) of {url} differs from base {} although the hints call it unchanged; back up without --base/--hints or with fresh hints",
                    off + len as u64,
                    base.uid
                )));
            }
        }
        Ok(Some(Differential { wanted, base: Some(base) }))
    }
}
