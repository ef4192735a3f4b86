//! A backup: the version's lifecycle (begin, take over an incomplete one, commit once
//! every block is durable) around the ingest ([`crate::ingest`]). Reader threads feed the
//! source to the ingest ([`feed`]); a differential backup reads only what its hints or
//! the source call changed and takes the rest from its base ([`plan`]).

mod feed;
mod plan;

use crate::error::{Error, Result};
use crate::index::{IndexFile, IndexWriter, block_count};
use crate::ingest::{Ingest, IngestContext, OrderedIndex};
use crate::progress::Progress;
use crate::record::Recorded;
use crate::repo::{Repository, version_key};
use crate::source::file::WINDOW_BYTES;
use crate::source::{Source, Url, open_source};
use crate::storage::{STORAGE_ATTEMPTS, retry};
use crate::version::{Stats, Version, VersionUid, check_label, check_name, check_snapshot};
use feed::{Feed, WindowPlan, Windows, read_window, skip_hole};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What the user asked to back up.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub name: String,
    pub snapshot: String,
    pub labels: BTreeMap<String, String>,
    pub block_size: Option<u32>,
    pub storage: Option<String>,
    pub expire: Option<chrono::DateTime<chrono::Utc>>,
    /// Resume this `incomplete` version instead of starting a new one.
    pub continue_uid: Option<VersionUid>,
    /// `rbd diff --format=json` output: only these regions are read (see [`crate::hints`]).
    pub hints: Option<String>,
    /// The version unhinted blocks are taken from.
    pub base: Option<VersionUid>,
    /// Share of the blocks the hints call unchanged that are checked against the base
    /// before the backup starts (default 1%).
    pub hints_check_percent: Option<u8>,
    /// Ask the source (RBD) which extents changed since this snapshot, instead of hints.
    pub diff_from: Option<String>,
    /// With `diff_from`: whole objects (librbd's fast diff) instead of exact extents.
    pub whole_object: bool,
    /// backy2's automatic tags: `b_daily`, `b_weekly`, `b_monthly` labels for the first
    /// backup of this name in a day, ISO week, month (see [`auto_tags`]).
    pub auto_tags: bool,
}

/// backy2's automatic tags for a new backup of a name at `now`: `b_daily` when no valid
/// version of the name carries it from the same UTC day, `b_weekly` likewise for the
/// same ISO week, `b_monthly` for the same month. So the first backup of each period
/// carries the period's tag, which schedulers (`due`, `sla`) and retention filters
/// (`labels["b_weekly"] == ""`) can use.
pub fn auto_tags(existing: &[crate::version::Version], name: &str, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    use chrono::Datelike;
    let same = |tag: &str, f: &dyn Fn(chrono::DateTime<chrono::Utc>) -> (i32, u32)| {
        existing.iter().any(|v| {
            v.name == name
                && v.status == crate::version::Status::Valid
                && v.labels.contains_key(tag)
                && f(v.date) == f(now)
        })
    };
    let mut tags = Vec::new();
    if !same("b_daily", &|d| (d.year(), d.ordinal())) {
        tags.push("b_daily".to_string());
    }
    if !same("b_weekly", &|d| (d.iso_week().year(), d.iso_week().week())) {
        tags.push("b_weekly".to_string());
    }
    if !same("b_monthly", &|d| (d.year(), d.month())) {
        tags.push("b_monthly".to_string());
    }
    tags
}

impl Repository {
    /// Context for an ingest into `storage` at `block_size`, for `session`.
    pub fn ingest_context(&self, storage: &str, block_size: u32, session: i64) -> Result<IngestContext> {
        Ok(IngestContext {
            db: self.db.clone(),
            storage: self.storage_to_write(storage)?,
            storage_id: self.storage_id(storage)?,
            block_size,
            compression_level: self.config.compression_level,
            workers: self.config.workers,
            writers: self.config.writers_for(storage)?,
            session,
            publish: None,
            after_hash: self.after_hash.clone(),
            ordered: None,
            held_by_caller: 0,
        })
    }

    /// Starts a new `incomplete` version for a writer registered as `session`.
    pub fn begin_version(&self, opts: &BackupOptions, size: u64, session: i64) -> Result<(VersionUid, String, u32)> {
        check_fields(opts)?;
        let storage = opts.storage.clone().unwrap_or_else(|| self.config.default_storage.clone());
        self.storage_to_write(&storage)?;
        crate::test_knobs::stop_here("KEEPFS_TEST_STOP_BEFORE_VERSION_ROW");
        let bs = opts.block_size.unwrap_or(self.config.block_size);
        crate::index::check_block_count(size, bs)?;
        let uid =
            self.db.lock().create_version(&opts.name, &opts.snapshot, size, bs, &storage, &opts.labels, session)?;
        // The storage knows this uid already: the database is older than the storage (a
        // restored copy). Writing would replace that version's metadata object.
        let st = self.storage(&storage)?;
        // A storage that cannot say leaves no version behind either.
        let taken = match retry(STORAGE_ATTEMPTS, || st.exists(&version_key(uid))) {
            Ok(taken) => taken,
            Err(e) => {
                self.db.lock().remove_version(uid)?;
                return Err(e.into());
            }
        };
        if taken {
            self.db.lock().remove_version(uid)?;
            return Err(Error::Refused(format!(
                "storage '{storage}' already holds version {uid}, which this database does not know (an older copy of the database, or another host writing here with a catalog of its own); run `keepfs metadata restore {uid}` (and any later uids) or `keepfs database rebuild` first, or give every host that writes here one shared catalog (database = \"postgresql://…\", docs/scale-out.md)"
            )));
        }
        if let Some(e) = &opts.expire {
            self.db.lock().set_expire(uid, Some(e))?;
        }
        Ok((uid, storage, bs))
    }

    /// Commits a version whose blocks are all durable: writes its metadata object to the
    /// storage, then marks it valid in the database.
    /// `session` is the committing process's: a session another process ended (took for
    /// dead) cannot commit, as a cleanup may have taken the version's objects meanwhile.
    pub fn commit_version(&self, uid: VersionUid, session: i64, index: IndexFile, stats: Stats) -> Result<Version> {
        let mut v = self.version(uid)?;
        let head = index.header();
        if head.uid != uid.0 || head.block_size != v.block_size {
            return Err(Error::Other(format!("the block index written for {uid} is another version's")));
        }
        if head.size != v.size {
            self.db.lock().set_size(uid, head.size)?;
            v.size = head.size;
        }
        v.status = crate::version::Status::Valid;
        v.stats = stats;
        let storage = self.storage(&v.storage)?;
        // Still alive in the catalog's eyes (this fails if another process ended the
        // session), and the storage still this catalog's (another may have claimed it
        // at the same time), before a valid-looking version object goes to the storage.
        self.db.lock().heartbeat(session)?;
        self.check_owner_now(&v.storage)?;
        // A storage made encrypted while this version was written without a keyring (an
        // image with no block to look up reaches here without meeting the mark): its
        // version object is not written in plaintext there.
        if !storage.codec().is_sealed() && self.db.lock().storage_encrypted(&v.storage)? {
            return Err(Error::Other(format!(
                "storage '{}' was made encrypted (`keepfs init --encrypt`) while this backup ran without a keyring; nothing of it was stored unencrypted",
                v.storage
            )));
        }
        // The index is read from its file into the object and into the catalog: a large
        // one is never held whole (see `store_version_object`).
        crate::repo::store_version_object(storage.as_ref(), &v, &index)?;
        retry(STORAGE_ATTEMPTS, || storage.sync())?;
        crate::test_knobs::stop_here("KEEPFS_TEST_STOP_BEFORE_VALID");
        let bytes = crate::catalog::IndexBytes { len: index.len(), bytes: &mut index.reader() };
        self.db.lock().commit_version(uid, session, bytes, &stats)?;
        Ok(v)
    }

    /// A writer of a block index for a version being written, its file in the
    /// repository's spool directory.
    pub fn index_writer(&self, block_size: u32) -> Result<IndexWriter> {
        IndexWriter::new(&self.config.home.join("spool"), self.config.modes, block_size)
    }

    /// Backs up the image at `url` as a new version.
    pub fn backup(&self, url: &Url, opts: &BackupOptions, progress: &dyn Progress) -> Result<Version> {
        check_fields(opts)?;
        let source = open_source(url, self.config.mmap_sources, &self.config)?;
        let size = source.size();
        let session = self.session(&format!("backup {}", opts.name), true)?;
        let mut opts = opts.clone();
        if opts.auto_tags && opts.continue_uid.is_none() {
            for t in auto_tags(&self.list(None)?, &opts.name, chrono::Utc::now()) {
                opts.labels.entry(t).or_default();
            }
        }
        let diff = self.plan_differential(&mut opts, source.as_ref(), url, &session)?;
        let opts = &opts;
        let (uid, storage, bs) = match opts.continue_uid {
            Some(uid) => self.take_over_version(uid, opts, size, session.id, url)?,
            None => self.begin_version(opts, size, session.id)?,
        };
        // Counted from the version's date on: its date plus its duration is when it
        // finished (metrics report that), so the source's opening and the differential
        // plan before the version existed must not be in it.
        let started = Instant::now();
        progress.begin(&format!("backup {uid} ({})", opts.name), size);
        let wanted = diff.as_ref().map(|d| &d.wanted);
        let result = self.run_backup(source.as_ref(), url, &storage, bs, session.id, wanted, progress);
        progress.end();
        match result {
            Ok((written, mut stats)) => {
                // Every block was handed over: blocks missing at the end would otherwise
                // read as zeros.
                let count = block_count(size, bs);
                if written.at() != count {
                    return Err(Error::Other(format!(
                        "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                         resumes it, `keepfs rm {uid}` removes it): {} of its {count} blocks were recorded",
                        written.at()
                    )));
                }
                let mut index = written.finish(uid.0, size).map_err(|e| {
                    Error::Other(format!(
                        "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                         resumes it, `keepfs rm {uid}` removes it): {e}"
                    ))
                })?;
                if let Some(d) = &diff {
                    index = match self.merge_base(index, d, &mut stats) {
                        Ok(merged) => merged,
                        Err(e @ Error::Damaged(_)) => return Err(e), // names its own repair (and exit code)
                        Err(e) => {
                            return Err(Error::Other(format!(
                                "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                                 resumes it, `keepfs rm {uid}` removes it): cannot merge the base's index: {e}"
                            )));
                        }
                    };
                }
                stats.duration_ms = started.elapsed().as_millis() as u64;
                // A commit that fails (the version object cannot be written, the storage
                // is no longer this catalog's) leaves the version incomplete too: say so.
                self.commit_version(uid, session.id, index, stats).map_err(|e| {
                    let said = format!(
                        "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                         resumes it, `keepfs rm {uid}` removes it): {e}"
                    );
                    match e {
                        Error::Refused(_) => Error::Refused(said),
                        Error::NotOwner(_) => Error::NotOwner(said),
                        Error::Damaged(_) => Error::Damaged(said),
                        _ => Error::Other(said),
                    }
                })
            }
            Err(e) => Err(Error::Other(format!(
                "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                 resumes it, `keepfs rm {uid}` removes it): {e}"
            ))),
        }
    }

    /// Makes this session the writer of an incomplete version that a dead process left
    /// (backy2's --continue-version). Its blocks already stored are found by
    /// deduplication and not written again; the source is still read and hashed whole,
    /// since without it nothing proves the stored blocks are this source's.
    fn take_over_version(
        &self,
        uid: VersionUid,
        opts: &BackupOptions,
        size: u64,
        session: i64,
        url: &Url,
    ) -> Result<(VersionUid, String, u32)> {
        let v = self.version(uid)?;
        if v.status != crate::version::Status::Incomplete {
            return Err(Error::Invalid(format!(
                "version {uid} is {}; only an incomplete version can be continued",
                v.status.as_str()
            )));
        }
        if v.name != opts.name {
            return Err(Error::Invalid(format!("version {uid} is a backup of '{}', not '{}'", v.name, opts.name)));
        }
        if v.size != size {
            return Err(Error::Invalid(format!(
                "source {url} holds {size} bytes, incomplete version {uid} was started with {}; the source changed: \
                 start a new backup (and `keepfs rm {uid}`)",
                v.size
            )));
        }
        let sessions = self.db.lock().live_sessions()?;
        let live: Vec<i64> = sessions.iter().map(|s| s.id).collect();
        let taken = self.db.lock().take_incomplete(uid, session, &live)?;
        if !taken {
            let holder = self.db.lock().version_session(uid)?.and_then(|id| sessions.iter().find(|s| s.id == id));
            let who = holder.map(|s| format!(" ({})", crate::repo::running_holder(s))).unwrap_or_default();
            return Err(Error::Refused(format!(
                "version {uid} is being written by another running backup{who}; try again once it has ended"
            )));
        }
        Ok((uid, v.storage, v.block_size))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_backup(
        &self,
        source: &dyn Source,
        url: &Url,
        storage: &str,
        bs: u32,
        session: i64,
        wanted: Option<&crate::hints::Wanted>,
        progress: &dyn Progress,
    ) -> Result<(IndexWriter, Stats)> {
        let size = source.size();
        let readers = self.config.source_readers.max(source.parallel_reads()).max(1) as u64;
        let window_bytes = WINDOW_BYTES.max(bs as u64);
        let mut ctx = self.ingest_context(storage, bs, session)?;
        // The index is written in block order as blocks complete; readers keep within a
        // window each (and one more) of the first block not completed.
        ctx.ordered = Some(OrderedIndex {
            dir: self.config.home.join("spool"),
            modes: self.config.modes,
            ahead: (readers + 1) * window_bytes.div_ceil(bs as u64),
        });
        let ingest = Ingest::start(ctx);
        let frontier = ingest.frontier();
        let ingest = Mutex::new(ingest);
        let read_error: Mutex<Option<Error>> = Mutex::new(None);
        // Readers take whole windows in turn; a window is mapped when the source allows
        // it (workers then hash straight from the page cache) and read block by block
        // into pooled buffers otherwise.
        // Readers claim windows in order; a reader that meets a hole claims every later
        // window the hole covers too (see `skip_hole`).
        let windows = size.div_ceil(window_bytes);
        let next_window = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..readers {
                let (ingest, read_error, next_window) = (&ingest, &read_error, &next_window);
                let feed = Feed { ingest, frontier: frontier.as_deref(), read_error };
                s.spawn(move || {
                    loop {
                        let w = next_window.fetch_add(1, Ordering::AcqRel);
                        if w >= windows || read_error.lock().is_some() {
                            return;
                        }
                        let woff = w * window_bytes;
                        let wlen = (size - woff).min(window_bytes);
                        let hole = Windows { next: next_window, count: windows, bytes: window_bytes, size };
                        let r = match skip_hole(source, url, &feed, &hole, w, bs, wanted, progress) {
                            Ok(WindowPlan::Skipped) => Ok(()),
                            Ok(WindowPlan::Read(data)) => {
                                read_window(source, url, &feed, woff, wlen, data, bs, wanted, progress)
                            }
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            read_error.lock().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        let ingest = ingest.into_inner();
        if let Some(e) = read_error.into_inner() {
            // Prefer the pipeline's own error (a storage failure) over "pipeline stopped".
            return Err(match ingest.finish_incomplete() {
                Err(pe) => pe,
                Ok(_) => e,
            });
        }
        let r = ingest.finish()?;
        match r.recorded {
            Recorded::Index(w) => Ok((w, r.stats)),
            Recorded::Published(_) => Err(Error::Other("the backup's ingest recorded a map, not its index".into())),
        }
    }
}

/// The name, snapshot name and labels a new version gets, checked before anything is
/// written (see [`check_name`]).
fn check_fields(opts: &BackupOptions) -> Result<()> {
    check_name(&opts.name)?;
    check_snapshot(&opts.snapshot)?;
    opts.labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

#[cfg(test)]
mod auto_tag_tests {
    use super::auto_tags;
    use crate::version::{Version, test_version};
    use chrono::{DateTime, Utc};

    fn v(date: &str, tags: &[&str]) -> Version {
        let mut v = test_version(1, "db", DateTime::parse_from_rfc3339(date).unwrap().with_timezone(&Utc));
        v.labels = tags.iter().map(|t| (t.to_string(), String::new())).collect();
        v
    }

    #[test]
    fn first_backup_of_each_period_gets_its_tag() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(auto_tags(&[], "db", at("2026-11-18T10:00:00Z")), ["b_daily", "b_weekly", "b_monthly"]);
        // Wednesday 18 Nov had all three; the same day again: nothing.
        let hist = vec![v("2026-11-18T01:00:00Z", &["b_daily", "b_weekly", "b_monthly"])];
        assert!(auto_tags(&hist, "db", at("2026-11-18T23:00:00Z")).is_empty());
        // Thursday of the same ISO week: daily only. Another name: everything.
        assert_eq!(auto_tags(&hist, "db", at("2026-11-19T08:00:00Z")), ["b_daily"]);
        assert_eq!(auto_tags(&hist, "web", at("2026-11-19T08:00:00Z")).len(), 3);
        // Monday 23 Nov: a new week; 1 Dec: a new month (and week 49).
        assert_eq!(auto_tags(&hist, "db", at("2026-11-23T08:00:00Z")), ["b_daily", "b_weekly"]);
        assert_eq!(auto_tags(&hist, "db", at("2026-12-01T08:00:00Z")), ["b_daily", "b_weekly", "b_monthly"]);
    }
}
