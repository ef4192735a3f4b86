//! Cleanup: deleting objects that no version references. Safe while backups on any number
//! of hosts run, by construction (docs/format.md, "Cleanup"): collect every id that a
//! committed index names; delete only other objects last touched before the cutoff, which
//! is the start of the oldest live writing session (or now). A backup touches every object
//! it deduplicates against in the same transaction in which it finds it, so nothing it
//! relies on is older than its own start. Each batch is marked `deleting` (by this
//! cleanup's session) in one short transaction, deleted from the storage with no
//! transaction open, and forgotten in another: a crash at any point leaves rows that a
//! backup or the next cleanup finishes, never a row that names a deleted file.
//!
//! The objects of an `incomplete` version are referenced by no index, yet `backup
//! --continue` reuses them: while its backup runs, and for `incomplete_grace` after its
//! last sign of life (the version's `active_ms`), the cutoff moves back to the version's
//! start, so nothing written or touched since then is swept.
//!
//! Memory: the marks, the catalog's ids and the plan take some 64 bytes per object of
//! the storage. A storage with more objects than `cleanup_memory` holds that way is
//! cleaned up in slices of the id space ([`Slice`]), each planned and carried out on its
//! own: every slice walks every index again and keeps only the ids that fall in it. So
//! memory stays within the budget whatever the storage holds, at the price of one more
//! pass over the indexes and the listing per slice. A slice is a cleanup of its own
//! (its own cutoff, its own checks), so slicing changes nothing of the protocol.

use crate::block::BlockId;
use crate::catalog::{OBJECT_DELETING, OBJECT_WRITING};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::slice::{Slice, slices_for};
use crate::storage::{Deadline, retry};
use crate::version::VersionUid;
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Estimated bytes a cleanup holds per object row of the storage: a mark and a known id
/// (an 8-byte short id in a hash set each, about 16 bytes with the set's slack) and a
/// planned deletion (a 32-byte id and its size, in a growing vector).
const BYTES_PER_OBJECT: u64 = 64;

/// What a cleanup of one storage (or of one slice of it) would delete.
#[derive(Clone, Debug)]
pub struct CleanupPlan {
    pub storage: String,
    /// The part of the id space this plan covers.
    pub slice: Slice,
    pub cutoff_ms: i64,
    /// Objects with a row that no version references: (id, stored bytes).
    pub objects: Vec<(BlockId, u64)>,
    /// `writing` rows of backups that stopped before storing (or recording) the object:
    /// their file, if any, goes with the row. Not counted as objects.
    pub unfinished: Vec<BlockId>,
    /// The files of those placeholders the storage holds (an upload that got that far):
    /// short id -> stored bytes.
    pub unfinished_files: std::collections::HashMap<u64, u64>,
    /// Object files the database does not know (left by interrupted backups).
    pub orphans: Vec<(String, u64)>,
    /// Unreferenced objects, placeholders of backups and files no row names, kept
    /// because a running backup may still use them.
    pub kept_recent: u64,
    pub referenced: u64,
    /// Incomplete versions whose objects are spared for `backup --continue`.
    pub spared: Vec<SparedVersion>,
    /// Unreferenced objects and orphaned files kept for those versions only (they would
    /// go without them): count and stored bytes.
    pub kept_for_continue: u64,
    pub kept_for_continue_bytes: u64,
    /// Object files no row names that are younger than `incomplete_grace`: a backup of
    /// another host writing here with a catalog of its own may be storing them (its
    /// versions are not in this catalog until it commits). Count and bytes.
    pub kept_unrecorded: u64,
    pub kept_unrecorded_bytes: u64,
    /// `incomplete_grace`, for saying so.
    pub grace: chrono::Duration,
}

/// An incomplete version whose objects a cleanup spares.
#[derive(Clone, Debug)]
pub struct SparedVersion {
    pub uid: VersionUid,
    /// Its backup still runs: who runs it (see `repo::running_holder`).
    pub running: Option<String>,
    /// The last sign of life of its backup (ms since the epoch).
    pub active_ms: i64,
    /// Until when its objects are spared (ms), unless it is running.
    pub until_ms: i64,
}

impl CleanupPlan {
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.1).sum::<u64>()
            + self.orphans.iter().map(|o| o.1).sum::<u64>()
            + self.unfinished_files.values().sum::<u64>()
    }

    /// The files no row names that are kept for now, for people (none: nothing to say).
    pub fn unrecorded_line(&self, part: &str) -> Option<String> {
        (self.kept_unrecorded > 0).then(|| {
            format!(
                "{part}: keeping {} file(s), {}, that no version or backup of this catalog names, until they are older than incomplete_grace ({}): another host writing here with a catalog of its own may be storing them",
                self.kept_unrecorded,
                crate::units::format_size(self.kept_unrecorded_bytes),
                crate::units::format_duration(self.grace)
            )
        })
    }

    /// What the plan spares for `backup --continue`, and until when, for people.
    pub fn spared_lines(&self) -> Vec<String> {
        if self.spared.is_empty() {
            return Vec::new();
        }
        let when = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| ms.to_string())
        };
        // Backups that have stored nothing yet spare nothing: say only what they are.
        let mut lines = vec![if self.kept_for_continue == 0 {
            format!("storage {}: backups that may still store objects here:", self.storage)
        } else {
            format!(
                "storage {}: sparing {} unreferenced object(s) and file(s), {}, that `keepfs backup --continue` may still use:",
                self.storage,
                self.kept_for_continue,
                crate::units::format_size(self.kept_for_continue_bytes)
            )
        }];
        for v in &self.spared {
            lines.push(if let Some(who) = &v.running {
                format!("  {}: its backup is running ({who})", v.uid)
            } else {
                format!(
                    "  {}: its backup stopped at {}; spared until {} (incomplete_grace), or `keepfs rm {}` now",
                    v.uid,
                    when(v.active_ms),
                    when(v.until_ms),
                    v.uid
                )
            });
        }
        lines
    }
}

#[derive(Clone, Debug, Default)]
pub struct CleanupReport {
    pub objects_deleted: u64,
    pub orphans_deleted: u64,
    /// Files of stopped backups' placeholders (their rows go uncounted: see
    /// [`CleanupPlan::unfinished`]).
    pub unfinished_files_deleted: u64,
    pub bytes_freed: u64,
    pub temporaries_deleted: u64,
}

const SWEEP_BATCH: usize = 256;

/// File times come from the kernel's coarse clock, which lags the clock sessions and the
/// cutoff are read from by up to a tick: a backup that starts just after a cleanup took
/// its cutoff can write a file stamped slightly before it. Files are judged against the
/// cutoff less this slack. (Found by the test that runs cleanups during a backup.)
const FILE_TIME_SLACK: Duration = Duration::from_secs(2);

fn file_cutoff(cutoff_ms: i64) -> SystemTime {
    let t = UNIX_EPOCH + Duration::from_millis(cutoff_ms.max(0) as u64);
    t.checked_sub(FILE_TIME_SLACK).unwrap_or(UNIX_EPOCH)
}

/// How long after marking a batch a cleanup may go on deleting it: half the time after
/// which other hosts take a silent session for dead (see [`Deadline`]). Test builds
/// take `KEEPFS_TEST_DELETE_WINDOW_MS` instead.
fn delete_window() -> Duration {
    crate::test_knobs::millis("KEEPFS_TEST_DELETE_WINDOW_MS")
        .unwrap_or(Duration::from_millis(crate::catalog::REMOTE_SESSION_TTL_MS as u64 / 2))
}

/// Test builds only: `KEEPFS_TEST_CLEANUP_STALL_MS` stalls a cleanup after each mark, the
/// state of a cleanup that stopped between marking and deleting (a fault no real part
/// shows on demand: tests/crash.rs stops the process there, without racing it).
fn stall_after_mark() {
    crate::test_knobs::stall("KEEPFS_TEST_CLEANUP_STALL_MS");
}

/// The one cleanup of a storage that may run at a time (see [`Repository::claim_cleanup`]);
/// let go when dropped.
pub struct CleanupClaim {
    lease: crate::repo::Lease,
    storage: String,
}

impl Repository {
    /// Makes this process the one that cleans up `storage` (a lease in the catalog held by
    /// a session of its own), for as long as the claim lives. A second cleanup of the same
    /// storage, from any process or host, is refused while a live one holds it; the claim
    /// of a process that died is taken over.
    pub fn claim_cleanup(&self, storage: &str) -> Result<CleanupClaim> {
        self.claim_cleanup_for(storage, "cleanup")
    }

    /// [`Self::claim_cleanup`] by something that keeps cleanups off the storage while it
    /// works (`purpose`: "database rebuild", "metadata import"), named so to the refused.
    pub fn claim_cleanup_for(&self, storage: &str, purpose: &str) -> Result<CleanupClaim> {
        match self.lease(&format!("cleanup/{storage}"), purpose)? {
            Ok(lease) => Ok(CleanupClaim { lease, storage: storage.to_string() }),
            Err(held) => {
                let who = crate::repo::holder_name(held.as_ref());
                Err(Error::Refused(match held.map(|s| s.purpose).filter(|p| p != "cleanup") {
                    Some(what) => format!(
                        "storage '{storage}' is held by a {what} ({who}), which keeps cleanups off it while it works: wait for it to finish"
                    ),
                    None => format!(
                        "a cleanup of storage '{storage}' is running ({who}); only one runs at a time: wait for it to finish"
                    ),
                }))
            }
        }
    }

    /// The cutoff below which unreferenced objects may go: the start of the oldest live
    /// writing session, or now.
    fn cleanup_cutoff(&self) -> Result<i64> {
        let now = self.db().now_ms()?;
        let live = self.db().live_sessions()?;
        Ok(live.iter().filter(|s| s.writes).map(|s| s.started_ms).min().unwrap_or(now).min(now))
    }

    /// How many slices a cleanup of `storage` is cut into so that it stays within
    /// `cleanup_memory` (1 for all but very large storages).
    pub fn cleanup_slices(&self, storage: &str) -> Result<u32> {
        self.slices_within_budget(storage, BYTES_PER_OBJECT)
    }

    /// How many slices a pass over `storage` that holds `per_object` bytes for each of
    /// its objects is cut into to stay within `cleanup_memory` (cleanup, storage-usage).
    pub(crate) fn slices_within_budget(&self, storage: &str, per_object: u64) -> Result<u32> {
        let db = self.db();
        let (rows, _) = db.object_totals(db.storage_id(storage)?)?;
        Ok(slices_for(rows, per_object, self.config.cleanup_memory_bytes))
    }

    /// A plan for the whole storage in one go, whatever its size.
    pub fn plan_cleanup(&self, storage: &str) -> Result<CleanupPlan> {
        self.plan_cleanup_slice(storage, Slice::WHOLE)
    }

    /// A plan for the objects of `storage` in `slice`.
    pub fn plan_cleanup_slice(&self, storage: &str, slice: Slice) -> Result<CleanupPlan> {
        let st = self.storage_to_delete_from(storage)?;
        // A version object the database does not know means the database is older than
        // the storage (a restored copy): its blocks would look unreferenced. Refuse.
        let in_storage = version_objects(st.as_ref())?;
        let running_cutoff = self.cleanup_cutoff()?;
        let (cutoff_ms, spared) = self.spare_incomplete(storage, running_cutoff)?;
        let db = self.db();
        let versions = db.list_versions()?;
        let unknown: Vec<String> = unknown_in(in_storage, &versions).iter().map(|u| u.to_string()).collect();
        if !unknown.is_empty() {
            // One line however many: the first few, and how many more.
            let (listed, more) = first_uids(&unknown, ", ");
            let (typed, _) = first_uids(&unknown, " ");
            return Err(Error::Refused(format!(
                "storage '{storage}' holds version(s) {listed}{more} that the database does not know (an older copy of the database, or another host writing here with a catalog of its own); cleanup would delete their blocks: run `keepfs metadata restore {typed}`{} to take them in, or give every host that writes here one shared catalog (database = \"postgresql://…\", docs/scale-out.md)",
                if more.is_empty() { "" } else { " (and with the others' uids)" }
            )));
        }
        let storage_id = db.storage_id(storage)?;
        let storage_ids: std::collections::HashMap<String, i64> =
            db.storage_names()?.into_iter().map(|(id, n)| (n, id)).collect();
        let in_this: HashSet<u64> =
            versions.iter().filter(|v| storage_ids.get(&v.storage) == Some(&storage_id)).map(|v| v.uid.0).collect();
        // Ids are kept by their first 8 bytes (`BlockId::short`; docs/format.md, "Cleanup"),
        // so a repository of many millions of blocks is marked in a small set: an object
        // whose short id a referenced one shares is kept, never the other way round.
        let mut marked: HashSet<u64> = HashSet::new();
        // Each index is read from the catalog as a stream, a piece at a time, with the
        // catalog's lock taken per piece: no map of an index is built, and no index is
        // held. A version without an index (incomplete, or removed since it was listed)
        // references nothing the cutoff does not already keep. Its pieces are read by
        // separate queries, so an index that fails its checks is read once more before it
        // is called damaged (it may have been replaced meanwhile: then the second reading
        // marks the new one), and one removed meanwhile (an `rm` on any host) needs no
        // marks. A damaged index refuses the whole cleanup (what it marked before the
        // damage is moot): it hides which blocks it references.
        drop(db);
        for v in versions.iter().filter(|v| in_this.contains(&v.uid.0)) {
            let mut damage = None;
            for _ in 0..2 {
                let Some(mut stored) = self.stored_index_if_any(v.uid)? else {
                    damage = None;
                    break;
                };
                let walked = Self::read_stored(&mut stored, |_, id| {
                    if slice.holds_id(&id) {
                        marked.insert(id.short());
                    }
                    true
                });
                match walked {
                    Ok(Ok(_)) => {
                        damage = None;
                        break;
                    }
                    Ok(Err(e)) => damage = Some(e),
                    Err(_) if self.removed_since_listed(v.uid) => {
                        damage = None;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(e) = damage {
                let err = self.index_damaged(v.uid, &e);
                return Err(Error::Damaged(format!("cleanup of storage '{storage}' refused: {err}")));
            }
        }
        let db = self.db();
        let mut plan = CleanupPlan {
            storage: storage.to_string(),
            slice,
            cutoff_ms,
            objects: Vec::new(),
            unfinished: Vec::new(),
            unfinished_files: std::collections::HashMap::new(),
            orphans: Vec::new(),
            kept_recent: 0,
            referenced: marked.len() as u64,
            spared,
            kept_for_continue: 0,
            kept_for_continue_bytes: 0,
            kept_unrecorded: 0,
            kept_unrecorded_bytes: 0,
            grace: self.config.incomplete_grace,
        };
        let mut known: HashSet<u64> = HashSet::new();
        // Placeholders of running or spared backups: short id -> kept for `--continue`
        // (else for a running backup).
        let mut placeholders: std::collections::HashMap<u64, bool> = std::collections::HashMap::new();
        let mut unfinished: HashSet<u64> = HashSet::new();
        db.for_each_object(storage_id, &mut |row| {
            if !slice.holds_id(&row.id) {
                return;
            }
            let short = row.id.short();
            known.insert(short);
            if marked.contains(&short) {
                return;
            }
            if row.state == OBJECT_WRITING {
                // A backup's placeholder: its backup runs (or may be continued), or it died.
                // One kept has a file only if its upload got that far: counted below, where
                // the listing finds it.
                if row.touched_ms < cutoff_ms {
                    plan.unfinished.push(row.id);
                    unfinished.insert(short);
                } else {
                    placeholders.insert(short, row.touched_ms < running_cutoff);
                }
                return;
            }
            if row.state == OBJECT_DELETING || row.touched_ms < cutoff_ms {
                plan.objects.push((row.id, row.stored_size));
            } else if row.touched_ms < running_cutoff {
                plan.kept_for_continue += 1;
                plan.kept_for_continue_bytes += row.stored_size;
            } else {
                plan.kept_recent += 1;
            }
        })?;
        drop(db);
        let cutoff_time = file_cutoff(cutoff_ms);
        let running_time = file_cutoff(running_cutoff);
        // A file no row names goes only once it is older than `incomplete_grace` too: this
        // catalog cannot see the backups of another host that writes here with a catalog
        // of its own (a misconfiguration `backup` warns about), nor protect their blocks
        // any other way before their versions exist.
        let grace = std::time::Duration::from_millis(self.config.incomplete_grace.num_milliseconds().max(0) as u64);
        let unrecorded_time = SystemTime::now().checked_sub(grace).unwrap_or(UNIX_EPOCH);
        st.list_each("blocks/", &mut |e| {
            let short = BlockId::from_storage_key(&e.key).filter(|id| slice.holds_id(id)).map(|id| id.short());
            match short.and_then(|s| placeholders.get(&s)) {
                Some(true) => {
                    plan.kept_for_continue += 1;
                    plan.kept_for_continue_bytes += e.size;
                }
                Some(false) => plan.kept_recent += 1,
                None => {}
            }
            if let Some(short) = short.filter(|s| unfinished.contains(s)) {
                plan.unfinished_files.insert(short, e.size);
            }
            if let Some(short) = short
                && !known.contains(&short)
                && !marked.contains(&short)
            {
                if e.modified < cutoff_time && e.modified >= unrecorded_time {
                    plan.kept_unrecorded += 1;
                    plan.kept_unrecorded_bytes += e.size;
                } else if e.modified < cutoff_time {
                    plan.orphans.push((e.key, e.size));
                } else if e.modified < running_time {
                    plan.kept_for_continue += 1;
                    plan.kept_for_continue_bytes += e.size;
                } else {
                    plan.kept_recent += 1;
                }
            }
            std::ops::ControlFlow::Continue(())
        })?;
        plan.orphans.sort();
        Ok(plan)
    }

    /// The incomplete versions of `storage` whose objects are spared (running, or
    /// stopped less than `incomplete_grace` ago), and the cutoff that spares them: the
    /// earliest start among them, or `cutoff` when there are none. A backup records and
    /// touches every object it writes or reuses after its version's start, so nothing it
    /// (or a `--continue` of it) relies on is older than that.
    fn spare_incomplete(&self, storage: &str, cutoff: i64) -> Result<(i64, Vec<SparedVersion>)> {
        let now = self.db().now_ms()?;
        let grace = self.config.incomplete_grace.num_milliseconds().max(0);
        let db = self.db();
        let live = db.live_sessions()?;
        let sid = db.storage_id(storage)?;
        let mut spared = Vec::new();
        let mut from = cutoff;
        for v in db.incomplete_versions(sid)? {
            let running = v.session.and_then(|id| live.iter().find(|s| s.id == id)).map(crate::repo::running_holder);
            let until_ms = v.active_ms.saturating_add(grace);
            if running.is_some() || now < until_ms {
                from = from.min(v.started_ms);
                spared.push(SparedVersion { uid: v.uid, running, active_ms: v.active_ms, until_ms });
            }
        }
        Ok((from, spared))
    }

    /// Carries out a plan. Every deletion is checked again against the catalog at the
    /// moment it is decided, so a plan that has aged only ever deletes less. Per batch:
    /// mark (one short transaction), delete the files (no transaction open), forget the
    /// rows (one short transaction); see docs/format.md, "Cleanup".
    pub fn apply_cleanup(&self, plan: &CleanupPlan) -> Result<CleanupReport> {
        let claim = self.claim_cleanup(&plan.storage)?;
        self.apply_cleanup_claimed(plan, &claim)
    }

    /// [`Self::apply_cleanup`] under a claim taken before the plan was made (so that a
    /// second cleanup is refused before it reads every index, not after).
    pub fn apply_cleanup_claimed(&self, plan: &CleanupPlan, claim: &CleanupClaim) -> Result<CleanupReport> {
        if claim.storage != plan.storage {
            return Err(Error::Other(format!(
                "a cleanup plan of storage '{}' cannot be carried out under the claim of '{}'",
                plan.storage, claim.storage
            )));
        }
        let storage = self.storage_to_delete_from(&plan.storage)?;
        // Still this catalog's, read afresh: another that claimed it meanwhile keeps it.
        self.check_owner_now(&plan.storage)?;
        let me = claim.lease.session.id;
        let mut report = CleanupReport::default();
        let sid = self.storage_id(&plan.storage)?;
        let cutoff = plan.cutoff_ms;
        let orphans: Vec<(BlockId, u64)> = plan
            .orphans
            .iter()
            .filter_map(|(key, size)| BlockId::from_storage_key(key).map(|id| (id, *size)))
            .collect();
        let orphan_ids: HashSet<BlockId> = orphans.iter().map(|o| o.0).collect();
        let unfinished: HashSet<BlockId> = plan.unfinished.iter().copied().collect();
        // Batches are taken from the plan as they go (no second list of every candidate).
        let mut rows = plan.objects.iter().map(|o| o.0).chain(plan.unfinished.iter().copied());
        let mut files = orphans.chunks(SWEEP_BATCH);
        loop {
            let ids: Vec<BlockId> = rows.by_ref().take(SWEEP_BATCH).collect();
            let found: &[(BlockId, u64)] = files.next().unwrap_or_default();
            if ids.is_empty() && found.is_empty() {
                break;
            }
            // 1. Mark (the transaction also heartbeats this cleanup's session and fails if
            //    another process ended it): only what is still unreferenced-and-untouched
            //    becomes this cleanup's to delete; a backup that meets a mark waits.
            let held = self.db().mark_for_deletion(sid, &ids, found, cutoff, me)?;
            if held.is_empty() {
                continue;
            }
            // The batch's deletes are over by this time after its mark (the mark heartbeat),
            // whatever the storage does: other hosts could take this cleanup for dead at
            // twice that.
            let by = Deadline::after(delete_window());
            stall_after_mark();
            // 2. Delete the files, no transaction open. Each attempt is preceded by a
            //    heartbeat that fails if another process took this cleanup for dead (and
            //    so may be writing these objects again); after one, other hosts wait
            //    `REMOTE_SESSION_TTL_MS` before they could. No request is started after
            //    the batch's deadline, nor waited for past it.
            let keys: Vec<String> = held.iter().map(|h| h.0.storage_key()).collect();
            let mut alive = Ok(());
            retry(4, || {
                alive = self.db().heartbeat(me);
                if alive.is_err() {
                    return Ok(());
                }
                storage.delete_many(&keys, Some(by))
            })
            .map_err(|e| {
                Error::Other(format!(
                    "cleanup of storage '{}' stopped: {e}; {} marked object(s) are left for the next cleanup (a batch may take {} s after its mark)",
                    plan.storage,
                    keys.len(),
                    delete_window().as_secs()
                ))
            })?;
            alive?;
            // 3. Forget the rows: the objects are gone; a backup waiting for them writes
            //    them anew.
            let ids: Vec<BlockId> = held.iter().map(|h| h.0).collect();
            self.db().forget_deleted(sid, &ids, me)?;
            for (id, size) in &held {
                if orphan_ids.contains(id) {
                    report.orphans_deleted += 1;
                } else if unfinished.contains(id) {
                    // Its row knew no size; the listing gave its file's, if it had one.
                    if let Some(size) = plan.unfinished_files.get(&id.short()) {
                        report.unfinished_files_deleted += 1;
                        report.bytes_freed += size;
                    }
                    continue;
                } else {
                    report.objects_deleted += 1;
                }
                report.bytes_freed += size;
            }
        }
        let cutoff_time = file_cutoff(cutoff);
        // (Unlike files no row names, a temporary file of another catalog's upload that
        // goes makes that upload fail loudly, and its backup be continued: it loses
        // nothing, so temporaries of killed runs are purged at once.)
        report.temporaries_deleted = storage.purge_temporary(cutoff_time.min(SystemTime::now()))?;
        Ok(report)
    }
}

/// The uids of the version objects a storage holds.
pub(crate) fn version_objects(st: &dyn crate::storage::Storage) -> Result<Vec<VersionUid>> {
    Ok(st
        .list("versions/")?
        .iter()
        .filter_map(|e| e.key.strip_prefix("versions/").and_then(|u| VersionUid::parse(u).ok()))
        .collect())
}

/// Up to eight uids, then how many more: a list of them that stays one line.
pub(crate) fn first_uids(uids: &[impl std::fmt::Display], separator: &str) -> (String, String) {
    const SHOWN: usize = 8;
    let first: Vec<String> = uids.iter().take(SHOWN).map(|u| u.to_string()).collect();
    let more = match uids.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    (first.join(separator), more)
}

/// The version objects of `in_storage` that are not among the catalog's `versions`.
pub(crate) fn unknown_in(in_storage: Vec<VersionUid>, versions: &[crate::version::Version]) -> Vec<VersionUid> {
    let known: HashSet<VersionUid> = versions.iter().map(|v| v.uid).collect();
    in_storage.into_iter().filter(|u| !known.contains(u)).collect()
}

impl Repository {
    /// Version objects in `storage` that this catalog does not know: another catalog
    /// (another host with a database of its own) writes to the storage, or this catalog
    /// is an older copy. A backup warns about them; cleanup refuses while there are any.
    pub fn unknown_versions(&self, storage: &str) -> Result<Vec<VersionUid>> {
        let in_storage = version_objects(self.storage_to_delete_from(storage)?.as_ref())?;
        Ok(unknown_in(in_storage, &self.db().list_versions()?))
    }

    /// After a cleanup: gives the database pages of removed versions and objects back to
    /// the filesystem; returns how many bytes the database file shrank.
    pub fn reclaim_catalog_space(&self) -> Result<u64> {
        self.db().reclaim_space()
    }
}
