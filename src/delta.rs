//! Delta restores: bringing a target that holds one version of an image (a standby copy,
//! last night's restore) to another version by writing only the blocks that differ
//! between the two, as their block indexes say (no block of the unchanged part is read
//! from the storage or written). Before anything is written, a random share of the
//! unchanged blocks is read back from the target and compared by checksum with the older
//! version (as `backup --hints` checks its base): a target that does not hold the older
//! version is refused. A file target is resized to the newer version's size; a block
//! device too small for it is refused.
//!
//! The target is updated in place, so an interrupted delta restore leaves a mix of the
//! two versions; running the same command again finishes it (the unchanged blocks are
//! still the older version's, the changed ones are all written again).
//!
//! Neither index is held: both are read from the catalog as streams, side by side, twice
//! (once to count the changes and draw the sample, once to hand the changed blocks to
//! the fetchers). Memory is the sample (a share of the unchanged blocks), not the image.

use crate::block::BlockId;
use crate::cache::FetchError;
use crate::diff::DeltaBlocks;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::BadBlock;
use crate::source::Url;
use crate::version::{Status, VersionUid};
use crossbeam_channel::bounded;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Clone, Debug)]
pub struct DeltaOptions {
    /// Percent of the unchanged blocks to read back from the target and compare with the
    /// older version first (at least one block unless 0; 0 skips the check).
    pub check_percent: u8,
}

impl Default for DeltaOptions {
    fn default() -> DeltaOptions {
        DeltaOptions { check_percent: DEFAULT_CHECK_PERCENT }
    }
}

/// Most unchanged zero blocks read back from the target before a delta restore (a huge
/// sparse image would otherwise mean reading terabytes of zeros).
const MAX_ZERO_SAMPLES: usize = 1024;

/// The default share of unchanged blocks checked (`restore --delta-check`).
pub const DEFAULT_CHECK_PERCENT: u8 = 1;

/// What a delta restore did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DeltaReport {
    /// The newer version's size (what the target now holds).
    pub bytes: u64,
    /// Blocks of the newer version.
    pub blocks: u64,
    /// Blocks that differ and were written (zero blocks included).
    pub blocks_written: u64,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Unchanged blocks read back from the target and found to be the older version's.
    pub blocks_checked: u64,
    /// Whether the target file's size was changed.
    pub resized: bool,
    #[serde(skip)]
    pub bad_blocks: Vec<BadBlock>,
}

impl Repository {
    /// Updates `url`, which holds version `from`, to hold version `to`.
    pub fn restore_delta(
        &self,
        from: VersionUid,
        to: VersionUid,
        url: &Url,
        opts: &DeltaOptions,
        progress: &dyn Progress,
    ) -> Result<DeltaReport> {
        let path = match url {
            Url::File(p) => p.clone(),
            Url::Null(_) | Url::Rbd(_) => {
                return Err(Error::Invalid(format!(
                    "a delta restore writes to a file or block device, not {url}: use file:///path (or a kernel-mapped /dev/rbdN)"
                )));
            }
        };
        let (old_v, new_v) = (self.version(from)?, self.version(to)?);
        if old_v.storage != new_v.storage {
            return Err(Error::Invalid(format!(
                "{from} is in storage '{}' and {to} in '{}': a delta restore compares blocks of one storage; restore {to} in full",
                old_v.storage, new_v.storage
            )));
        }
        let session = self.session(&format!("restore {from}..{to}"), false)?;
        session.lock_version(from, "restore")?;
        session.lock_version(to, "restore")?;
        // Warned once the versions are ours to read (an `rm` marks a version invalid first).
        if new_v.status == Status::Invalid {
            progress.warn(&format!("version {to} is marked invalid: damaged blocks will be restored as zeros"));
        }
        let storage = self.storage(&new_v.storage)?;
        let target = open_target(&path, from, to, old_v.size, new_v.size)?;
        let d = DeltaBlocks::new((old_v.size, old_v.block_size), (new_v.size, new_v.block_size), !target.is_device)?;
        let bs = new_v.block_size as usize;
        let (old_n, n) = d.counts();
        let common = old_n.min(n);

        // First walk of both indexes (read from the catalog as streams, side by side):
        // what changes, and a sample of what stays. The target must hold `from`: the
        // sample is read back before anything is written. Data blocks are sampled at the
        // given share; zero blocks too, but at most MAX_ZERO_SAMPLES of them; at least
        // one block when any stays.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        let percent = opts.check_percent.min(100);
        let mut plan = Plan::default();
        let mut next = 0u64;
        self.walk_delta(&old_v, &new_v, &d, |idx, before, id| {
            plan.zeros_in(next..idx.min(common), seed, percent);
            next = idx + 1;
            if d.changed(idx, before, id) {
                plan.changed += 1;
                plan.total += d.new_len(idx);
            } else if idx < common && before.is_sparse() {
                plan.zeros_in(idx..idx + 1, seed, percent);
            } else if idx < common {
                plan.unchanged(idx, before, seed, percent);
            }
        })?;
        plan.zeros_in(next..common, seed, percent);
        let mut sample = plan.sample;
        if percent > 0 {
            sample.extend(plan.zeros.iter().map(|&i| (i, BlockId::SPARSE)));
            if sample.is_empty() {
                match (plan.any_unchanged, plan.first_zero) {
                    (Some(pick), _) => sample.push(pick),
                    (None, Some(i)) => sample.push((i, BlockId::SPARSE)),
                    (None, None) => {}
                }
            }
        }
        let mut buf = vec![0u8; bs];
        let mut report = DeltaReport { bytes: new_v.size, blocks: n, ..Default::default() };
        for &(idx, expected) in &sample {
            let off = idx * bs as u64;
            let len = d.old_len(idx) as usize;
            target
                .file
                .read_exact_at(&mut buf[..len], off)
                .map_err(|e| Error::io(format!("cannot read restore target {} at byte {off}", path.display()), e))?;
            let id =
                if crate::block::is_zero(&buf[..len]) { BlockId::SPARSE } else { storage.codec().id_of(&buf[..len]) };
            if id != expected {
                return Err(Error::Refused(format!(
                    "{} does not hold {from}: its block {idx} (bytes {off}..{}) differs; restore {to} in full (`keepfs restore --force {to} {url}`)",
                    path.display(),
                    off + len as u64
                )));
            }
            report.blocks_checked += 1;
        }
        drop(sample);

        if !target.is_device && target.size != new_v.size {
            target
                .file
                .set_len(new_v.size)
                .map_err(|e| Error::io(format!("cannot resize restore target {}", path.display()), e))?;
            report.resized = true;
        }
        progress.begin(&format!("restore {from}..{to} ({})", new_v.name), plan.total);

        let fetchers = self.config.readers_for(&new_v.storage)?;
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let bad = parking_lot::Mutex::new(Vec::<BadBlock>::new());
        let failure = parking_lot::Mutex::new(None::<Error>);
        let fail = |e: Error| {
            stop.store(true, Ordering::Relaxed);
            failure.lock().get_or_insert(e);
        };
        let (job_tx, job_rx) = bounded::<(u64, BlockId)>(fetchers * 2);
        let storage_name = &new_v.storage;
        let walked = std::thread::scope(|s| {
            for _ in 0..fetchers {
                let (job_rx, storage) = (job_rx.clone(), storage.clone());
                let (d, target, path, stop, written, bad, fail) = (&d, &target, &path, &stop, &written, &bad, &fail);
                s.spawn(move || {
                    let mut buf = vec![0u8; bs];
                    for (idx, id) in job_rx {
                        if stop.load(Ordering::Relaxed) {
                            continue;
                        }
                        let len = d.new_len(idx) as usize;
                        let off = idx * bs as u64;
                        if id.is_sparse() {
                            buf[..len].fill(0);
                        } else {
                            match crate::restore::fetch_block_into(storage.as_ref(), &id, &mut buf) {
                                Ok(n) if n == len => {}
                                Ok(n) => {
                                    let reason = format!("object holds {n} bytes, the block needs {len}");
                                    bad.lock().push(crate::restore::bad_block(progress, idx, off, len, id, &reason));
                                    buf[..len].fill(0);
                                }
                                Err(FetchError::Damaged(reason)) => {
                                    bad.lock().push(crate::restore::bad_block(progress, idx, off, len, id, &reason));
                                    buf[..len].fill(0);
                                }
                                Err(FetchError::Unavailable(reason)) => {
                                    fail(Error::Other(format!(
                                        "storage '{storage_name}' is not available (block {idx}: {reason})"
                                    )));
                                    continue;
                                }
                            }
                        }
                        if let Err(e) = target.file.write_all_at(&buf[..len], off) {
                            fail(Error::io(format!("cannot write to {} at byte {off}", path.display()), e));
                            continue;
                        }
                        written.fetch_add(len as u64, Ordering::Relaxed);
                        progress.advance(len as u64);
                    }
                });
            }
            drop(job_rx);
            // The second walk hands the changed blocks to the fetchers as it finds them.
            let walked = self.walk_delta(&old_v, &new_v, &d, |idx, before, id| {
                if d.changed(idx, before, id) && !stop.load(Ordering::Relaxed) && job_tx.send((idx, id)).is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
            });
            drop(job_tx);
            walked
        });
        if let Err(e) = walked {
            failure.lock().get_or_insert(e);
        }
        progress.end();
        let again = format!(
            "the target now holds parts of both versions: run the same `keepfs restore --delta-from {from} {to} {url}` again to finish it"
        );
        if let Some(e) = failure.into_inner() {
            let _ = target.file.sync_all();
            return Err(Error::Other(format!("{e}; {again}")));
        }
        target.file.sync_all().map_err(|e| Error::io(format!("cannot flush {}", path.display()), e))?;
        report.bytes_written = written.into_inner();
        report.blocks_written = plan.changed;
        report.bad_blocks = bad.into_inner();
        if !report.bad_blocks.is_empty() {
            report.bad_blocks.sort_by_key(|b| b.index);
            let ids: Vec<BlockId> = report.bad_blocks.iter().map(|b| b.object).collect();
            self.mark_damaged(&new_v.storage, &ids)?;
            self.set_status(to, Status::Invalid)?;
        }
        Ok(report)
    }
}

/// What the first walk of a delta restore found: the changed blocks (counted, not
/// kept), and the unchanged ones to read back from the target first.
#[derive(Default)]
struct Plan {
    changed: u64,
    /// Bytes of the changed blocks.
    total: u64,
    /// Unchanged data blocks drawn, with their id in the older version.
    sample: Vec<(u64, BlockId)>,
    /// Unchanged zero blocks drawn (at most MAX_ZERO_SAMPLES).
    zeros: Vec<u64>,
    first_zero: Option<u64>,
    /// One unchanged data block drawn at random (reservoir of one): the check when the
    /// share draws nothing.
    any_unchanged: Option<(u64, BlockId)>,
    unchanged: u64,
}

impl Plan {
    /// Unchanged data block `idx`, `id` in the older version.
    fn unchanged(&mut self, idx: u64, id: BlockId, seed: u64, percent: u8) {
        self.unchanged += 1;
        if crate::scrub::sampled(seed, idx, percent) {
            self.sample.push((idx, id));
        }
        if mix(seed ^ self.unchanged).is_multiple_of(self.unchanged) {
            self.any_unchanged = Some((idx, id));
        }
    }

    /// Unchanged zero blocks `r` (zero in both versions).
    fn zeros_in(&mut self, r: std::ops::Range<u64>, seed: u64, percent: u8) {
        if r.start < r.end && self.first_zero.is_none() {
            self.first_zero = Some(r.start);
        }
        if percent == 0 {
            return;
        }
        for i in r {
            if self.zeros.len() >= MAX_ZERO_SAMPLES {
                return;
            }
            if crate::scrub::sampled(seed, i, percent) {
                self.zeros.push(i);
            }
        }
    }
}

/// A 64-bit mix (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Repository {
    /// Walks, in block order, every block of the newer version a delta restore may have
    /// to write (see [`DeltaBlocks`]): those holding data in either version (the two
    /// indexes read side by side as streams) and the extra ones, with the older and
    /// the newer id (sparse where a version has none). Holds no index.
    fn walk_delta(
        &self,
        old: &crate::version::Version,
        new: &crate::version::Version,
        d: &DeltaBlocks,
        mut each: impl FnMut(u64, BlockId, BlockId),
    ) -> Result<()> {
        let (last, tail) = d.extra();
        let n = d.counts().1;
        let mut extra = last.into_iter().chain(tail).peekable();
        self.walk_two(old, new, |idx, before, id| {
            if idx >= n {
                return;
            }
            while let Some(e) = extra.next_if(|&e| e < idx) {
                each(e, BlockId::SPARSE, BlockId::SPARSE);
            }
            extra.next_if(|&e| e == idx);
            each(idx, before, id);
        })?;
        for e in extra {
            each(e, BlockId::SPARSE, BlockId::SPARSE);
        }
        Ok(())
    }
}

struct Target {
    file: File,
    is_device: bool,
    /// Its size before the restore.
    size: u64,
}

/// Opens an existing file or block device for reading and writing. A file must have the
/// size of `from` (or of `to`: a delta restore that was interrupted after resizing it); a
/// block device must be large enough for `to`.
fn open_target(path: &Path, from: VersionUid, to: VersionUid, from_size: u64, to_size: u64) -> Result<Target> {
    let m = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Invalid(format!(
                "restore target {} does not exist; a delta restore updates a target that holds {from}: restore {to} in full instead",
                path.display()
            ))
        } else {
            Error::io(format!("cannot use restore target {}", path.display()), e)
        }
    })?;
    let t = m.file_type();
    if !m.is_file() && !t.is_block_device() {
        return Err(Error::Invalid(format!(
            "restore target {} is not a file or a block device; a delta restore updates one in place",
            path.display()
        )));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open restore target {}", path.display()), e))?;
    crate::restore::lock_exclusive(&file, path)?;
    if t.is_block_device() {
        let size = crate::restore::device_size(&file)
            .map_err(|e| Error::io(format!("cannot size restore target {}", path.display()), e))?;
        if size < to_size {
            return Err(Error::Refused(format!(
                "block device {} holds {size} bytes, version {to} needs {to_size}; grow it first",
                path.display()
            )));
        }
        return Ok(Target { file, is_device: true, size });
    }
    let size = m.len();
    if size != from_size && size != to_size {
        return Err(Error::Refused(format!(
            "{} does not hold {from}: it has {size} bytes, {from} has {from_size}; restore {to} in full (`keepfs restore --force`)",
            path.display()
        )));
    }
    Ok(Target { file, is_device: false, size })
}
