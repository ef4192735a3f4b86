//! Scrubbing: checking that what a version references is still in its storage and intact.
//! A light scrub fetches each object and checks its header (magic, version, header
//! checksum, kind, id, length); a deep scrub decodes every block and verifies its content
//! against its id, and optionally against the original source. Either may check a random
//! share of the blocks. A damaged object marks every version referencing it invalid (never
//! deleted); a complete deep scrub that finds a version's blocks all good makes it valid
//! again. The next backup stores blocks marked damaged again, whatever it finds stored.
//! Every scrub also checks the version's metadata: its block index in the database and
//! its version object in the storage (what a database rebuild reads), which must decode
//! and say what the database says; damage there is reported with the command that
//! repairs it.

use crate::block::{BlockId, ObjectKind, parse_header};
use crate::cache::{FetchError, Read, fetch_block, fetch_verified};
use crate::error::{Error, Result};
use crate::index::{BlockIndex, IndexDigest, IndexError};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::BadBlock;
use crate::source::{Url, open_source};
use crate::version::{Status, Version, VersionUid};
use crossbeam_channel::bounded;
use std::collections::{HashMap, HashSet};

/// Objects marked valid again per catalog call after a clean deep scrub.
const VALID_BATCH: usize = 10_000;

#[derive(Clone, Debug)]
pub struct ScrubOptions {
    /// Decode and verify every block (deep) instead of checking headers (light).
    pub deep: bool,
    /// Share of the blocks to check, 1 to 100.
    pub percent: u8,
    /// Compare each block with the original image too (deep only).
    pub source: Option<Url>,
}

#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    /// Distinct objects checked.
    pub objects: u64,
    /// Blocks (by index) whose object or content is bad.
    pub bad: Vec<BadBlock>,
    /// The version was invalid and is valid again.
    pub revalidated: bool,
    /// Damage found in the version's metadata: its block index in the database, or its
    /// version object in the storage (missing, failing its checks, or saying something
    /// other than the database). Each names the repair.
    pub metadata: Vec<String>,
}

impl ScrubReport {
    /// Whether the scrub found anything damaged.
    pub fn damaged(&self) -> bool {
        !self.bad.is_empty() || !self.metadata.is_empty()
    }
}

/// The reason given for a block whose stored copy is fine but differs from the source.
const SOURCE_DIFFERS: &str = "differs from the source";

/// Light check of one object: there, a well-formed block object for this id, whole.
fn light_check(
    codec: &crate::transform::Codec,
    bytes: &[u8],
    id: &BlockId,
) -> std::result::Result<(), crate::block::ObjectError> {
    use crate::block::ObjectError;
    let (h, header_len) = parse_header(bytes)?;
    crate::block::check_seal(codec, &h)?;
    if h.kind != ObjectKind::Block as u16 {
        return Err(ObjectError::WrongKind { expected: ObjectKind::Block as u16, found: h.kind });
    }
    if h.id != id.0 {
        return Err(ObjectError::ContentMismatch { expected: id.to_hex(), found: hex::encode(h.id) });
    }
    let want = header_len as u64 + h.payload_len;
    if bytes.len() as u64 != want {
        return Err(ObjectError::Length { expected: want, found: bytes.len() as u64 });
    }
    Ok(())
}

/// Whether block `idx` is in a `percent` sample drawn with `seed` (cheap, uniform).
pub(crate) fn sampled(seed: u64, idx: u64, percent: u8) -> bool {
    if percent >= 100 {
        return true;
    }
    let mut x = seed ^ idx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % 100 < percent as u64
}

/// A number below `n` (n ≥ 1) drawn with `seed` for the `n`th item.
fn draw(seed: u64, n: u64) -> u64 {
    let mut x = seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^= x >> 32;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x % n
}

/// The fields of a version its version object must carry as the database has them (the
/// status is not among them: scrubs and restores change it in the database only).
fn differing_fields(db: &Version, stored: &Version) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differ = |same: bool, name| {
        if !same {
            out.push(name)
        }
    };
    differ(db.uid == stored.uid, "uid");
    differ(db.date == stored.date, "date");
    differ(db.name == stored.name, "name");
    differ(db.snapshot == stored.snapshot, "snapshot");
    differ(db.size == stored.size, "size");
    differ(db.block_size == stored.block_size, "block size");
    differ(db.protected == stored.protected, "protection");
    differ(db.labels == stored.labels, "labels");
    differ(db.expire == stored.expire, "expiry date");
    out
}

impl Repository {
    /// Checks a version's own object in its storage (`versions/<uid>`, what `database
    /// rebuild` and `metadata restore` read): present, passing the codec's checks (header,
    /// seal, payload checksum), decodable, and holding the fields and, when given, the
    /// block index the database holds (given as its [`IndexDigest`]). `Ok(Some(problem))`
    /// names the damage and the repair; an error means the storage did not answer.
    pub(crate) fn check_version_object(&self, version: &Version, index: Option<&[u8; 32]>) -> Result<Option<String>> {
        let uid = version.uid;
        let key = crate::repo::version_key(uid);
        let storage = self.storage(&version.storage)?;
        let repair = match index {
            Some(_) => format!(
                "the database's copy is intact: `keepfs metadata backup 'uid == \"{uid}\"'` writes it again"
            ),
            None => "the database's copy is damaged too: import a metadata export of it (`keepfs metadata import`) if you have one".to_string(),
        };
        let mut mismatch = None;
        // A label or expiry change rewrites the object after the database: look twice
        // before calling a difference damage.
        for pass in 0..2 {
            let stopped = |e: &dyn std::fmt::Display| {
                Error::Other(format!(
                    "scrub of {uid} stopped: {e}; nothing was marked damaged, run it again when the storage is back"
                ))
            };
            let damaged = |e: &dyn std::fmt::Display| {
                format!("{uid}: its version object {key} in storage '{}' is damaged ({e}); {repair}", version.storage)
            };
            let missing =
                || format!("{uid}: its version object {key} is missing from storage '{}'; {repair}", version.storage);
            // A large one is read as a stream of ranges (never held), a small one whole.
            let (stored, same_index) = match crate::version_object::read_streamed(storage.as_ref(), &key) {
                Ok(crate::version_object::Streamed::Read { version: stored, index: digest, .. }) => {
                    (*stored, index.is_none_or(|want| digest == *want))
                }
                // Read in ranges, it may have been rewritten between two of them: damage
                // is what a second reading finds too.
                Ok(crate::version_object::Streamed::Damaged(_)) if pass == 0 => continue,
                Ok(crate::version_object::Streamed::Damaged(e)) => return Ok(Some(damaged(&e))),
                Ok(crate::version_object::Streamed::NotKept(e)) => return Err(e), // nothing is kept here
                Err(crate::storage::StorageError::NotFound { .. }) => return Ok(Some(missing())),
                Err(crate::storage::StorageError::Discarding { .. }) => return Ok(None),
                Err(e) => return Err(stopped(&e)),
                Ok(crate::version_object::Streamed::NotLarge) => {
                    let bytes = match crate::storage::retry(4, || storage.get_fresh(&key)) {
                        Ok(bytes) => bytes,
                        Err(crate::storage::StorageError::NotFound { .. }) => return Ok(Some(missing())),
                        Err(crate::storage::StorageError::Discarding { .. }) => return Ok(None),
                        Err(e) => return Err(stopped(&e)),
                    };
                    let (stored, plain, at) = match crate::repo::decode_version_object_parts(storage.codec(), &bytes) {
                        Ok(decoded) => decoded,
                        Err(e) => return Ok(Some(damaged(&e))),
                    };
                    drop(bytes);
                    // Compared by digest, as a stream: no map of a large index is built.
                    let mut digest = IndexDigest::default();
                    let same_index = BlockIndex::visit(&plain[at..], |i, id| digest.add(i, id))
                        .map(|head| index.is_none_or(|want| digest.finish(&head) == *want));
                    match same_index {
                        Ok(same) => (stored, same),
                        Err(e) => {
                            let e = Error::Index { context: format!("index of {}", stored.uid), source: e };
                            return Ok(Some(damaged(&e)));
                        }
                    }
                }
            };
            let db_version = self.version(uid)?;
            let mut fields = differing_fields(&db_version, &stored);
            if !same_index {
                fields.push("block index");
            }
            if fields.is_empty() {
                return Ok(None);
            }
            mismatch = Some(fields.join(", "));
        }
        Ok(mismatch.map(|fields| {
            format!(
                "{uid}: its version object {key} in storage '{}' differs from the database in: {fields}; {repair}",
                version.storage
            )
        }))
    }

    /// Records objects found damaged (by a scrub or a restore): the objects are marked
    /// invalid, and so is every version of that storage whose index names one of them
    /// (never deleted: they stay restorable, with zeros for the damaged blocks). The next
    /// backup stores such blocks again.
    pub fn mark_damaged(&self, storage: &str, damaged: &[BlockId]) -> Result<Vec<VersionUid>> {
        if damaged.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.db();
        let sid = db.storage_id(storage)?;
        db.mark_objects_invalid(sid, damaged)?;
        // Listed after the marking: a version committed meanwhile is among them.
        let versions = db.list_versions()?;
        drop(db);
        let damaged: HashSet<BlockId> = damaged.iter().copied().collect();
        // Each index read as a stream, a piece at a time, until it names a damaged id (an
        // index damaged further on is tainted too; one damaged before it is left as it
        // is, and a scrub of it says why).
        let mut tainted = Vec::new();
        for v in versions.iter().filter(|v| v.storage == storage) {
            let Some(mut stored) = self.stored_index_if_any(v.uid)? else { continue };
            let mut names = false;
            let walked = Self::read_stored(&mut stored, |_, e| {
                names = damaged.contains(&e);
                !names
            });
            match walked {
                // Stopped at a damaged id.
                Ok(Ok(None)) => tainted.push(v.uid),
                Ok(_) => {}
                Err(_) if self.removed_since_listed(v.uid) => {}
                Err(e) => return Err(e),
            }
        }
        let db = self.db();
        for &v in &tainted {
            db.set_status(v, Status::Invalid)?;
        }
        Ok(tainted)
    }

    pub fn scrub(&self, uid: VersionUid, opts: &ScrubOptions, progress: &dyn Progress) -> Result<ScrubReport> {
        if !(1..=100).contains(&opts.percent) {
            return Err(Error::Invalid(format!("scrub percentage {} is not between 1 and 100", opts.percent)));
        }
        if opts.source.is_some() && !opts.deep {
            return Err(Error::Invalid("--source compares contents: use it with deep-scrub".into()));
        }
        let version = self.version(uid)?;
        let session = self.session(&format!("scrub {uid}"), false)?;
        session.lock_version(uid, "scrub")?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ std::process::id() as u64;
        // The catalog's index is read as a stream, never held: once to check it end to
        // end (counting the chosen blocks and digesting it for the comparison with the
        // version object), once to hand the objects to the checkers, and after a clean
        // deep scrub once more to mark them valid.
        let (mut chosen_blocks, mut digest) = (0u64, IndexDigest::default());
        // A sample that drew no block of a small version takes one drawn evenly from
        // its data blocks (reservoir sampling), so that a scrub never checks nothing
        // and reports it all good.
        let (mut data_blocks, mut one) = (0u64, None);
        let walked = self.walk_index_or_damage(&version, |i, id| {
            digest.add(i, id);
            chosen_blocks += sampled(seed, i, opts.percent) as u64;
            data_blocks += 1;
            if draw(seed, data_blocks) == 0 {
                one = Some(i);
            }
            true
        })?;
        let forced = (chosen_blocks == 0).then_some(one).flatten();
        chosen_blocks += forced.is_some() as u64;
        let chosen = |i: u64| sampled(seed, i, opts.percent) || forced == Some(i);
        let head = match walked.and_then(|h| h.ok_or(IndexError::Malformed("stopped early".into()))) {
            Ok(head) => head,
            Err(_) => {
                // Without its index nothing of the version can be checked (or restored).
                let mut report = ScrubReport::default();
                report.metadata.push(self.confirm_damage(&version)?.to_string());
                if let Some(problem) = self.check_version_object(&version, None)? {
                    report.metadata.push(problem);
                }
                return Ok(report);
            }
        };
        let mut metadata = Vec::new();
        metadata.extend(self.check_version_object(&version, Some(&digest.finish(&head)))?);
        let storage = self.storage(&version.storage)?;
        let source = match &opts.source {
            Some(url) => {
                let s = open_source(url, false, &self.config)?;
                if s.size() != head.size {
                    return Err(Error::Invalid(format!(
                        "source {url} holds {} bytes, version {uid} {}; compare a source of the same size",
                        s.size(),
                        head.size
                    )));
                }
                Some(s)
            }
            None => None,
        };
        // One check per distinct object (with --source, per block: contents may differ by
        // place): a chosen block whose object an earlier chosen block has (within the
        // bounds of `Repeats`) shares that block's verdict.
        let total = chosen_blocks * head.block_size as u64;
        progress.begin(&format!("{} {uid}", if opts.deep { "deep-scrub" } else { "scrub" }), total);
        let bs = head.block_size as u64;
        let block_len = |i: u64| crate::index::block_len(head.size, head.block_size, i);
        let mut report = ScrubReport { metadata, ..Default::default() };
        let mut unavailable: Option<String> = None;
        let mut walk_error: Option<Error> = None;
        let mut copies: Vec<(u64, u64)> = Vec::new();
        let threads = self.config.readers_for(&version.storage)?;
        let (job_tx, job_rx) = bounded::<(BlockId, u64)>(threads * 2);
        let (res_tx, res_rx) = bounded::<(BlockId, u64, std::result::Result<(), FetchError>)>(threads * 2);
        let source_ref = source.as_deref();
        let block_len = &block_len;
        let version_ref = &version;
        std::thread::scope(|s| {
            for _ in 0..threads {
                let (job_rx, res_tx, storage) = (job_rx.clone(), res_tx.clone(), storage.clone());
                s.spawn(move || {
                    for (id, idx) in job_rx {
                        let r = if !opts.deep {
                            fetch_verified(storage.as_ref(), &id, Read::Fresh, |b| light_check(storage.codec(), b, &id))
                        } else {
                            fetch_block(storage.as_ref(), &id, Read::Fresh).and_then(|data| match source_ref {
                                None => Ok(()),
                                Some(src) => {
                                    let mut want = vec![0u8; block_len(idx) as usize];
                                    src.read_at(idx * bs, &mut want).map_err(|e| {
                                        FetchError::Unavailable(format!(
                                            "cannot read the source at byte {}: {e}",
                                            idx * bs
                                        ))
                                    })?;
                                    if want == data {
                                        Ok(())
                                    } else {
                                        Err(FetchError::Damaged(SOURCE_DIFFERS.to_string()))
                                    }
                                }
                            })
                        };
                        if res_tx.send((id, idx, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(res_tx);
            drop(job_rx);
            let producer = s.spawn(move || {
                let mut repeats = crate::index::Repeats::bounded();
                let find_repeats = source_ref.is_none();
                let walked = self.walk_index(version_ref, |i, id| {
                    !chosen(i) || (find_repeats && repeats.note(i, id)) || job_tx.send((id, i)).is_ok()
                });
                walked.map(|_| repeats.found)
            });
            for (id, i, r) in res_rx {
                if let Err(FetchError::Unavailable(reason)) = &r {
                    unavailable.get_or_insert_with(|| reason.clone());
                    continue;
                }
                progress.advance(block_len(i));
                if let Err(FetchError::Damaged(reason)) = &r {
                    report.bad.push(BadBlock {
                        index: i,
                        offset: i * bs,
                        len: block_len(i),
                        object: id,
                        reason: reason.clone(),
                    });
                }
            }
            match crate::repo::joined(producer.join()) {
                Ok(found) => copies = found,
                Err(e) => walk_error = Some(e),
            }
        });
        if let Some(e) = walk_error {
            return Err(e);
        }
        report.objects = chosen_blocks.saturating_sub(copies.len() as u64);
        // The copies share their first block's object, and its verdict.
        if unavailable.is_none() {
            let bad_at: HashMap<u64, usize> = report.bad.iter().enumerate().map(|(n, b)| (b.index, n)).collect();
            let mut copies_bad = Vec::new();
            for (i, first) in &copies {
                let (i, len) = (*i, block_len(*i));
                progress.advance(len);
                if let Some(&n) = bad_at.get(first) {
                    let b = &report.bad[n];
                    copies_bad.push(BadBlock {
                        index: i,
                        offset: i * bs,
                        len,
                        object: b.object,
                        reason: b.reason.clone(),
                    });
                }
            }
            report.bad.extend(copies_bad);
        }
        progress.end();
        if let Some(reason) = unavailable {
            return Err(Error::Other(format!(
                "scrub of {uid} stopped: {reason}; nothing was marked damaged, run it again when the storage is back"
            )));
        }
        report.bad.sort_by_key(|b| b.index);
        let db = self.db();
        let sid = db.storage_id(&version.storage)?;
        if report.bad.is_empty() {
            if opts.deep && opts.percent == 100 {
                // In batches, from the index read once more: a dense image's ids are not
                // gathered in one list. The catalog's lock is not held while it is read.
                drop(db);
                let mut ids: Vec<BlockId> = Vec::with_capacity(VALID_BATCH);
                let mut failed = None;
                self.walk_index(&version, |_, id| {
                    ids.push(id);
                    if ids.len() == VALID_BATCH {
                        failed = self.db().set_objects_valid(sid, &ids, true).err();
                        ids.clear();
                    }
                    failed.is_none()
                })?;
                if let Some(e) = failed {
                    return Err(e);
                }
                let db = self.db();
                if !ids.is_empty() {
                    db.set_objects_valid(sid, &ids, true)?;
                }
                if version.status == Status::Invalid && report.metadata.is_empty() {
                    db.set_status(uid, Status::Valid)?;
                    report.revalidated = true;
                }
            }
            return Ok(report);
        }
        drop(db);
        // A damaged object taints every version of this storage that references it.
        let damaged: Vec<BlockId> = report
            .bad
            .iter()
            .filter(|b| b.reason != SOURCE_DIFFERS)
            .map(|b| b.object)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.mark_damaged(&version.storage, &damaged)?;
        self.set_status(uid, Status::Invalid)?;
        Ok(report)
    }
}
