//! A repository: the metadata database and the storages, opened from a configuration.
//! This is the engine's front door; the CLI and the FUSE filesystem only talk to it.

use crate::block::BlockId;
use crate::catalog::{Session, SharedCatalog};
use crate::config::{Config, StorageKind};
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::index::{BlockIndex, IndexError, IndexHeader};
use crate::storage::{SharedStorage, file::FileStorage, null::NullStorage};
use crate::version::{Status, Version, VersionUid};
use chrono::Utc;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Repository {
    pub config: Config,
    pub(crate) db: SharedCatalog,
    storages: Mutex<HashMap<String, StorageSlot>>,
    /// Held while a storage is unlocked, so that threads asking at once (the mount's)
    /// unlock it once (one prompt, one key derivation).
    unlocking: Mutex<()>,
    /// Storages this process found its catalog to own (see `owner`).
    pub(crate) owner_checked: Mutex<std::collections::HashSet<String>>,
    /// `database rebuild --take-over`: storages owned by another catalog become this one's.
    pub(crate) take_over: std::sync::atomic::AtomicBool,
    /// Sessions of this process whose end the catalog did not take (see [`Unended`]).
    unended: Unended,
    /// Test instrumentation: see [`crate::ingest::HashedHook`].
    #[doc(hidden)]
    pub after_hash: Option<crate::ingest::HashedHook>,
}

/// A configured storage: as opened, and once its keyring (if any) is unlocked, with its
/// codec. Unlocking waits for the first use, so that `ls` never asks for a key.
struct StorageSlot {
    raw: SharedStorage,
    ready: Option<SharedStorage>,
}

/// What to say about a version whose block index in the database is damaged.
pub(crate) fn damaged_index_message(uid: VersionUid, e: &IndexError) -> String {
    format!(
        "the block index of {uid} in the metadata database is damaged ({e}); {uid} is marked invalid: `keepfs metadata restore --force {uid}` replaces its metadata with the copy in its storage"
    )
}

use crate::version_object::{Found, Keep, read_version_object};
pub use crate::version_object::{
    decode_version_object, decode_version_object_parts, encode_version_object, seal_version_object,
    store_version_object, version_key,
};

impl Repository {
    /// Opens the repository a configuration describes, creating what is missing.
    pub fn open(config: Config) -> Result<Repository> {
        Self::open_checked(config, true)
    }

    /// [`Self::open`] of a catalog `database migrate` moved elsewhere too, for copying it
    /// again (nothing else may use it).
    pub fn open_moved(config: Config) -> Result<Repository> {
        Self::open_checked(config, false)
    }

    /// Whether the repository's catalog exists: a shared one always does (or fails to
    /// answer); the embedded one once its file is there.
    pub fn exists(config: &Config) -> bool {
        match config.catalog_location() {
            // Only "not found" is absent: one that cannot be looked at (a home this user
            // may not enter) is opened, and fails saying why.
            crate::catalog::Location::Sqlite(path) => !matches!(path.try_exists(), Ok(false)),
            crate::catalog::Location::Postgres { .. } => true,
        }
    }

    /// A repository that does not exist yet, as a command that only reads sees it: an
    /// empty catalog in memory and no storage opened, so that nothing is created on disk
    /// (`ls` in a mistyped `KEEPFS_HOME` used to leave a new, empty repository there).
    /// Only for commands that read the catalog: a storage asked for is not configured.
    pub fn absent(config: Config) -> Result<Repository> {
        Ok(Repository {
            config,
            db: Arc::new(Mutex::new(Box::new(crate::catalog::sqlite::SqliteCatalog::empty_in_memory()?))),
            storages: Mutex::new(HashMap::new()),
            unlocking: Mutex::new(()),
            owner_checked: Mutex::new(Default::default()),
            take_over: Default::default(),
            unended: Default::default(),
            after_hash: None,
        })
    }

    fn open_checked(config: Config, refuse_moved: bool) -> Result<Repository> {
        if std::fs::metadata(&config.home).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::Invalid(format!(
                "the keepfs home {} is not a directory; set KEEPFS_HOME (or `home` in the configuration) to a directory",
                config.home.display()
            )));
        }
        config
            .modes
            .create_dir_all(&config.home)
            .map_err(|e| Error::io(format!("cannot create the keepfs home {}", config.home.display()), e))?;
        if let Some(h) = &config.host {
            crate::catalog::set_host(h);
        }
        let db = crate::catalog::open(&config.catalog_location(), config.modes)?;
        if refuse_moved && let Some(moved) = db.repository_state(crate::catalog::MOVED_TO)? {
            return Err(Error::Refused(format!(
                "the catalog {} was migrated to {moved} and is no longer kept up to date: set `database` in the configuration (or KEEPFS_DATABASE) to the new one (docs/scale-out.md); if the new one was lost, `keepfs database migrate --to …` copies this one again",
                config.catalog_location().display()
            )));
        }
        if db.engine() != "sqlite" {
            let id = db.repository_state(crate::owner::CATALOG_ID)?;
            let ours = |s: &crate::config::StorageConfig| id.is_some() && crate::owner::owner_id_of(s) == id;
            let ours_at = |place: &str| id.is_some() && crate::owner::owner_id_at(place) == id;
            crate::catalog::check_owner(db.as_ref(), &config, &ours, &ours_at)?;
        }
        crate::catalog::check_storage_places(db.as_ref(), &config)?;
        let mut storages: HashMap<String, StorageSlot> = HashMap::new();
        for s in &config.storages {
            let mut st: SharedStorage = match &s.kind {
                StorageKind::File { path } => Arc::new(FileStorage::open_with_modes(&s.name, path, config.modes)?),
                StorageKind::Null => Arc::new(NullStorage::new(&s.name)),
                StorageKind::S3(c) => Arc::new(crate::storage::s3::S3Storage::open(&s.name, c)?),
            };
            if s.read_bandwidth.is_some() || s.write_bandwidth.is_some() {
                st = Arc::new(crate::storage::throttle::ThrottledStorage::new(st, s.read_bandwidth, s.write_bandwidth));
            }
            // Above the throttle (a hit costs no bandwidth), below the codec (copies stay sealed).
            if let Some(rc) = &s.read_cache {
                st = Arc::new(
                    crate::storage::disk_cache::DiskCache::new(st, rc.dir.join(&s.name), rc.max_bytes)
                        .with_modes(config.modes),
                );
            }
            storages.insert(s.name.clone(), StorageSlot { raw: st, ready: None });
        }
        Ok(Repository {
            config,
            db: Arc::new(Mutex::new(db)),
            storages: Mutex::new(storages),
            unlocking: Mutex::new(()),
            owner_checked: Mutex::new(Default::default()),
            take_over: Default::default(),
            unended: Default::default(),
            after_hash: None,
        })
    }

    /// Replaces a storage by a decorated one (fault injection in tests, caching, a
    /// throttle). The decorator sits below the codec: it sees sealed objects.
    pub fn wrap_storage(&mut self, name: &str, f: impl FnOnce(SharedStorage) -> SharedStorage) -> Result<()> {
        let raw = self.raw_storage(name)?;
        self.storages.lock().insert(name.to_string(), StorageSlot { raw: f(raw), ready: None });
        Ok(())
    }

    /// Must be called without `storages` locked (it locks it to list the names).
    fn unknown_storage(&self, name: &str) -> Error {
        let mut names: Vec<String> = self.storages.lock().keys().cloned().collect();
        names.sort();
        Error::Invalid(format!(
            "no storage named '{name}' is configured (configured: {}); check the configuration",
            names.join(", ")
        ))
    }

    /// A storage as opened, before any keyring is applied (for the keyring itself).
    pub(crate) fn raw_storage(&self, name: &str) -> Result<SharedStorage> {
        let raw = self.storages.lock().get(name).map(|s| s.raw.clone());
        raw.ok_or_else(|| self.unknown_storage(name))
    }

    /// A storage to delete from. Names, listings and deletes pass through the seal
    /// untouched, so `rm`, `enforce` and `cleanup` need no key on an encrypted storage: a
    /// retention job need not hold the key that reads the backups.
    pub(crate) fn storage_to_delete_from(&self, name: &str) -> Result<SharedStorage> {
        // Only the owning catalog deletes (see `owner`).
        self.claim_storage(name)?;
        self.raw_storage(name)
    }

    /// Forgets an unlocked storage, so that the next use reads its keyring again.
    pub(crate) fn reset_storage(&self, name: &str) {
        if let Some(s) = self.storages.lock().get_mut(name) {
            s.ready = None;
        }
    }

    /// A storage ready for use: an encrypted one unlocked with its key (see keys.rs).
    pub fn storage(&self, name: &str) -> Result<SharedStorage> {
        let ready_now = |repo: &Repository| -> Result<Option<SharedStorage>> {
            // The guard must be gone before unknown_storage locks the map again.
            let slot = repo.storages.lock().get(name).map(|s| s.ready.clone());
            slot.ok_or_else(|| repo.unknown_storage(name))
        };
        if let Some(r) = ready_now(self)? {
            return Ok(r);
        }
        let _one_at_a_time = self.unlocking.lock();
        if let Some(r) = ready_now(self)? {
            return Ok(r);
        }
        let ready = self.unlock_storage(name)?;
        if let Some(s) = self.storages.lock().get_mut(name) {
            s.ready = Some(ready.clone());
        }
        Ok(ready)
    }

    pub fn storage_id(&self, name: &str) -> Result<i64> {
        self.db.lock().storage_id(name)
    }

    /// All versions, oldest first, that match `filter`.
    pub fn list(&self, filter: Option<&Filter>) -> Result<Vec<Version>> {
        let all = self.db.lock().list_versions()?;
        Ok(all.into_iter().filter(|v| filter.is_none_or(|f| f.matches(v))).collect())
    }

    pub fn version(&self, uid: VersionUid) -> Result<Version> {
        self.db.lock().version(uid)
    }

    /// The block index of a committed version, decoded from the catalog's copy read as a
    /// stream (the stored bytes are never held beside the map). An index the database
    /// holds damaged marks the version invalid and is a [`Error::Damaged`] naming the
    /// repair, once a second reading found the same (see [`Repository::confirm_damage`]).
    pub fn index(&self, uid: VersionUid) -> Result<BlockIndex> {
        let v = self.version(uid)?;
        let mut entries = crate::index::Entries::default();
        let walked = self.walk_index(&v, |idx, id| {
            entries.set(idx, id);
            true
        })?;
        // The walk is never stopped, so it went to the end.
        let head = walked.ok_or_else(|| self.index_damaged(uid, &IndexError::Malformed("stopped early".into())))?;
        entries.resize(head.count);
        Ok(BlockIndex { uid: head.uid, size: head.size, block_size: head.block_size, entries })
    }

    /// The block index of a committed version for random access (the mount's): its ids
    /// in a mapped spool file, not in memory (see [`crate::index::MappedIndex`]). Errors
    /// as [`Repository::index`].
    pub fn mapped_index(&self, uid: VersionUid) -> Result<crate::index::MappedIndex> {
        let v = self.version(uid)?;
        let mut b = crate::index::MappedBuilder::new(&self.config.home.join("spool"), self.config.modes)?;
        let walked = self.walk_index_into(&v, |idx, id| b.push(idx, id))?;
        // Stopped only by a failed push, which is an error above.
        let head = walked.ok_or_else(|| self.index_damaged(uid, &IndexError::Malformed("stopped early".into())))?;
        b.finish(head)
    }

    /// Why version `v` has no index in the catalog.
    fn no_index(&self, v: &Version) -> Error {
        // Removed by `rm` since it was read: it does not exist (no unfinished backup to
        // remove, as the drill in tests/multihost.rs was told).
        if let Err(e) = self.version(v.uid) {
            return e;
        }
        Error::Invalid(format!(
            "version {} is {} and has no block index (its backup did not finish); remove it with `keepfs rm {}`",
            v.uid,
            v.status.as_str(),
            v.uid
        ))
    }

    /// A valid checksum over another version's index (a row swapped by hand) is damage too.
    fn is_of(v: &Version, uid: u64, size: u64, block_size: u32) -> std::result::Result<(), IndexError> {
        if uid != v.uid.0 || size != v.size || block_size != v.block_size {
            return Err(IndexError::Foreign);
        }
        Ok(())
    }

    /// A committed version's stored index, to be read a piece at a time (see
    /// [`StoredIndex`]); refused as [`Repository::index`] refuses a version without one.
    pub(crate) fn stored_index(&self, v: &Version) -> Result<StoredIndex<'_>> {
        self.stored_index_if_any(v.uid)?.ok_or_else(|| self.no_index(v))
    }

    /// [`Repository::stored_index`], or `None` for a version without one (incomplete, or
    /// removed since it was listed).
    pub(crate) fn stored_index_if_any(&self, uid: VersionUid) -> Result<Option<StoredIndex<'_>>> {
        let Some(len) = self.db.lock().index_len(uid)? else { return Ok(None) };
        let db = &self.db;
        let read = move |at, want, into: &mut Vec<u8>| db.lock().index_piece(uid, at, want, into);
        Ok(Some(crate::catalog::IndexPieces::new(Box::new(read), len)))
    }

    /// Walks version `v`'s stored index as it is read from the catalog, in constant
    /// memory (see [`BlockIndex::visit_reader`]): `each` gets every data block in block
    /// order and returns false to stop (then `None`). A damaged index (or another
    /// version's) marks the version invalid and is the error [`Repository::index`]
    /// gives, once [`Repository::confirm_damage`] has seen it twice; a failing catalog
    /// is its own error.
    pub(crate) fn walk_index(
        &self,
        v: &Version,
        each: impl FnMut(u64, BlockId) -> bool,
    ) -> Result<Option<IndexHeader>> {
        match self.walk_index_or_damage(v, each)? {
            Ok(head) => Ok(head),
            Err(_) => Err(self.confirm_damage(v)?),
        }
    }

    /// [`Repository::walk_index`] handing each data block to `push`, which may fail: its
    /// first error stops the walk and is the result.
    pub(crate) fn walk_index_into(
        &self,
        v: &Version,
        mut push: impl FnMut(u64, BlockId) -> Result<()>,
    ) -> Result<Option<IndexHeader>> {
        let mut failed = None;
        let walked = self.walk_index(v, |idx, id| match push(idx, id) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(walked),
        }
    }

    /// Bytes of version `v`'s image that non-sparse blocks hold (see
    /// [`BlockIndex::data_bytes`]), its index walked as a stream: never held.
    pub fn data_bytes(&self, v: &Version) -> Result<u64> {
        let mut n = 0u64;
        self.walk_index(v, |idx, _| {
            n += crate::index::block_len(v.size, v.block_size, idx);
            true
        })?;
        Ok(n)
    }

    /// Whether an index found damaged while it was read in pieces is damaged, or was
    /// replaced meanwhile (`metadata restore --force`; its pieces are read by separate
    /// queries): it is read once more, end to end. Damage found again marks the version
    /// invalid and is returned as the error to give (`Ok`); an index that now reads
    /// whole is the error "changed while it was read" (nothing is marked).
    pub(crate) fn confirm_damage(&self, v: &Version) -> Result<Error> {
        match self.walk_index_or_damage(v, |_, _| true)? {
            Ok(_) => Err(Error::Other(format!(
                "the block index of version {} changed while it was read (replaced by `metadata restore`?): run the command again",
                v.uid
            ))),
            Err(again) => Ok(self.index_damaged(v.uid, &again)),
        }
    }

    /// [`Repository::walk_index`], with what is wrong with the catalog's copy of the
    /// index as the inner error (nothing is marked).
    pub(crate) fn walk_index_or_damage(
        &self,
        v: &Version,
        each: impl FnMut(u64, BlockId) -> bool,
    ) -> Result<std::result::Result<Option<IndexHeader>, IndexError>> {
        self.walk_stored(v, self.stored_index(v)?, each)
    }

    /// [`Repository::walk_index_or_damage`] of an index already opened.
    pub(crate) fn walk_stored(
        &self,
        v: &Version,
        mut stored: StoredIndex<'_>,
        each: impl FnMut(u64, BlockId) -> bool,
    ) -> Result<std::result::Result<Option<IndexHeader>, IndexError>> {
        let walked = Self::read_stored(&mut stored, each)?;
        Ok(walked.and_then(|head| head.map(|h| Self::is_of(v, h.uid, h.size, h.block_size).map(|_| h)).transpose()))
    }

    /// Walks an index already opened, checking it but not that it is a given version's
    /// (cleanup's mark phase, whose list of versions may be older than a draft's commit,
    /// which sets the size). The outer error is the catalog's.
    pub(crate) fn read_stored(
        stored: &mut StoredIndex<'_>,
        each: impl FnMut(u64, BlockId) -> bool,
    ) -> Result<std::result::Result<Option<IndexHeader>, IndexError>> {
        let walked = BlockIndex::visit_reader(&mut *stored, each);
        if let Some(e) = stored.failed.take() {
            return Err(e);
        }
        Ok(walked)
    }

    /// Walks the indexes of versions `a` and `b` together, each read from the catalog as a
    /// stream (one piece of each at a time; `a` on a thread of its own): `each` gets,
    /// in block order, every block that holds data in either, with its id in `a` and in
    /// `b` (sparse where one has none). Errors as [`Repository::walk_index`].
    pub(crate) fn walk_two(&self, a: &Version, b: &Version, mut each: impl FnMut(u64, BlockId, BlockId)) -> Result<()> {
        let (walked_a, walked_b) = walk_beside(
            |hand| self.walk_index(a, hand),
            |mut from_a| {
                let walked = self.walk_index(b, |j, id| {
                    while let Some((i, before)) = from_a.next_if(|&(i, _)| i < j) {
                        each(i, before, BlockId::SPARSE);
                    }
                    let before = from_a.next_if(|&(i, _)| i == j).map_or(BlockId::SPARSE, |(_, x)| x);
                    each(j, before, id);
                    true
                });
                // The rest of `a` (all of it, should `b` have failed: its walker ends then).
                for (i, before) in from_a {
                    each(i, before, BlockId::SPARSE);
                }
                walked
            },
        );
        joined(walked_a).and(walked_b).map(|_| ())
    }

    /// The ranges of version `new` whose bytes differ from version `old`'s (see
    /// [`crate::diff::Differ`]), from their indexes read as streams: what it holds is the
    /// changes, not the indexes.
    pub fn diff(&self, old: VersionUid, new: VersionUid) -> Result<Vec<crate::diff::Change>> {
        let (a, b) = (self.version(old)?, self.version(new)?);
        let mut d = crate::diff::Differ::new((a.size, a.block_size), (b.size, b.block_size))?;
        self.walk_two(&a, &b, |i, before, id| d.block(i, before, id))?;
        Ok(d.finish())
    }

    /// Whether version `uid` was removed (an `rm` on any host) since it was listed: what
    /// lets a reader of every version (cleanup, mark_damaged) pass over one whose index
    /// went away under it. Only a missing version counts, never another error.
    pub(crate) fn removed_since_listed(&self, uid: VersionUid) -> bool {
        matches!(self.version(uid), Err(Error::VersionNotFound(_)))
    }

    /// Records that the database's index of `uid` is damaged (the version becomes
    /// invalid: it cannot be restored until the index is repaired) and says how to repair
    /// it. Marking is best effort: the error is what the caller must see.
    pub(crate) fn index_damaged(&self, uid: VersionUid, e: &IndexError) -> Error {
        let _ = self.db.lock().set_status(uid, Status::Invalid);
        Error::Damaged(damaged_index_message(uid, e))
    }

    /// Replaces the snapshot name and labels of a version still being written.
    pub fn update_draft_fields(
        &self,
        uid: VersionUid,
        snapshot: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        self.db.lock().set_snapshot_and_labels(uid, snapshot, labels)
    }

    /// Renames a version that is still being written (an incoming file renamed).
    pub fn rename_version(&self, uid: VersionUid, name: &str) -> Result<()> {
        crate::version::check_name(name)?;
        self.db.lock().rename_version(uid, name)
    }

    /// Removes a version that a continuation of the same backup replaced: its metadata
    /// object, then its rows (its blocks stay until `cleanup`). A version someone still
    /// reads (its locks name live sessions: another handle, another process) is kept:
    /// returns false, and `keepfs rm` removes it later.
    pub fn remove_superseded(&self, uid: VersionUid) -> Result<bool> {
        let v = self.version(uid)?;
        // The removal lock, as `rm` takes it: a reader (or a rekey rewriting the object)
        // that comes after it sees the version going and keeps off.
        let session = self.session(&format!("remove superseded {uid}"), false)?;
        if session.lock_for_removal(uid).is_err() {
            return Ok(false);
        }
        // Read afresh: a mount runs for long, and the storage may have been taken over.
        self.check_owner_now(&v.storage)?;
        self.storage_to_write(&v.storage)?.delete(&version_key(uid))?;
        self.db.lock().remove_version(uid)?;
        Ok(true)
    }

    /// Removes an `incomplete` version that its writer abandons (a discarded draft).
    pub fn remove_incomplete(&self, uid: VersionUid) -> Result<()> {
        let v = self.version(uid)?;
        if v.status != Status::Incomplete {
            return Err(Error::Refused(format!(
                "version {uid} is {}; only incomplete versions are discarded",
                v.status.as_str()
            )));
        }
        self.db.lock().remove_version(uid)
    }

    /// Writes a committed version's metadata object again (after its labels or expiry
    /// changed), so that the storage's copy stays what the database says.
    pub(crate) fn refresh_version_object(&self, uid: VersionUid) -> Result<()> {
        let v = self.version(uid)?;
        if v.status == Status::Incomplete {
            return Ok(());
        }
        // The catalog's index, checked as it is read, into a file the object is built
        // from: a large index is never held.
        let mut written = self.index_writer(v.block_size)?;
        self.walk_index_into(&v, |idx, id| written.push(idx, id))?;
        let index = written.finish(uid.0, v.size)?;
        let storage = self.storage_to_write(&v.storage)?;
        store_version_object(storage.as_ref(), &v, &index)?;
        crate::storage::retry(4, || storage.sync())?;
        Ok(())
    }

    /// Sets labels (`k=v`, `k=` or `k` for an empty value) and removes them (`k-`;
    /// removing a missing label is not an error).
    pub fn change_labels(&self, uid: VersionUid, changes: &[String]) -> Result<()> {
        let mut set = Vec::new();
        let mut remove = Vec::new();
        for c in changes {
            if let Some(k) = c.strip_suffix('-').filter(|k| !k.contains('=')) {
                crate::version::check_label_name(k)?;
                remove.push(k.to_string());
            } else {
                set.push(crate::version::parse_label(c)?);
            }
        }
        let _session = self.session("label", true)?;
        // Before the catalog changes: a storage this catalog may not write refuses it all.
        self.claim_storage(&self.version(uid)?.storage)?;
        self.db.lock().change_labels(uid, &set, &remove)?;
        self.refresh_version_object(uid)
    }

    /// Sets (or with `None` clears) a version's expiry date.
    pub fn set_expire(&self, uid: VersionUid, expire: Option<chrono::DateTime<Utc>>) -> Result<()> {
        let _session = self.session("expire", true)?;
        self.claim_storage(&self.version(uid)?.storage)?;
        self.db.lock().set_expire(uid, expire.as_ref())?;
        self.refresh_version_object(uid)
    }

    /// Each of these changes holds a session while it writes the catalog and the version
    /// object (sealed with this process's key): `database migrate` waits for it and
    /// refuses it while copying, and `key remove` waits for it.
    pub fn set_protected(&self, uid: VersionUid, protected: bool) -> Result<()> {
        let _session = self.session(if protected { "protect" } else { "unprotect" }, true)?;
        self.claim_storage(&self.version(uid)?.storage)?;
        self.db.lock().set_protected(uid, protected)?;
        self.refresh_version_object(uid)
    }

    /// Where a large version object's index read from a storage is kept: the spool.
    pub(crate) fn keep(&self) -> Keep {
        Keep { dir: self.config.home.join("spool"), modes: self.config.modes }
    }

    /// Recreates the metadata database from what the storages hold: every version object
    /// (fields, labels, index) and every block object. Refuses a database that holds
    /// versions, unless it was made by a rebuild that did not finish (interrupted, or
    /// damaged version objects skipped): a rebuild can be run again, and adds what is
    /// not there yet. A damaged version object is skipped and named in the report;
    /// everything else is rebuilt. Incomplete versions were never written to a storage
    /// and do not come back; a version marked invalid by a scrub comes back as it was
    /// last written (a scrub finds the damage again).
    pub fn rebuild_database(&self) -> Result<RebuildReport> {
        let existing = self.db.lock().list_versions()?.len();
        let take_over = self.take_over.load(std::sync::atomic::Ordering::Relaxed);
        // (Taking over, a catalog rebuilt before is completed, and becomes the owner.)
        if existing > 0 && !take_over && !self.db.lock().rebuild_unfinished()? {
            return Err(Error::Refused(format!(
                "the metadata database {} holds {existing} version(s); rebuild recreates a lost database: move this one away first",
                self.config.catalog_location().display()
            )));
        }
        // Only read: a catalog made again in its place takes its id; with --take-over
        // every storage becomes this catalog's before anything is recorded (see `owner`).
        for sc in &self.config.storages {
            self.rebuild_owner_check(&sc.name)?;
        }
        self.db.lock().set_rebuild_unfinished(true)?;
        let stopped = |e: Error| {
            Error::Other(format!(
                "database rebuild stopped: {e}; run `keepfs database rebuild` again to go on (what was rebuilt is kept)"
            ))
        };
        let mut report = RebuildReport::default();
        for sc in &self.config.storages {
            // No cleanup of this storage meanwhile: the objects found are recorded after
            // the versions, and until then would look like orphans to it.
            let _no_cleanup = self.claim_cleanup_for(&sc.name, "database rebuild")?;
            let storage = self.storage(&sc.name).map_err(stopped)?;
            for entry in storage.list("versions/").map_err(|e| stopped(e.into()))? {
                let damaged =
                    |reason: String| DamagedVersionObject { storage: sc.name.clone(), key: entry.key.clone(), reason };
                // Not named like a version (as cleanup, which ignores such files too).
                let Some(uid) = entry.key.strip_prefix("versions/").and_then(|u| VersionUid::parse(u).ok()) else {
                    continue;
                };
                if self.version(uid).is_ok() {
                    report.already += 1;
                    continue;
                }
                let keep = self.keep();
                let (mut v, index) = match read_version_object(storage.as_ref(), &entry.key, keep, Some(entry.size)) {
                    Ok(Found::Read(v, index)) => (*v, index),
                    Ok(Found::Damaged(e)) => {
                        report.damaged.push(damaged(e));
                        continue;
                    }
                    // Removed since the listing (`rm` in another process).
                    Ok(Found::Missing) => continue,
                    Err(e) => return Err(stopped(e)),
                };
                if v.uid != uid || index.uid() != uid.0 {
                    report.damaged.push(damaged(format!("it holds the metadata of {}", v.uid)));
                    continue;
                }
                v.storage = sc.name.clone();
                index.with_bytes(|bytes| self.db.lock().insert_version_record(&v, bytes)).map_err(stopped)?;
                report.versions += 1;
            }
            let sid = self.storage_id(&sc.name).map_err(stopped)?;
            // Recorded as the listing goes, a batch at a time: the names of millions of
            // objects are never gathered. A batch the catalog refuses stops the listing
            // there (no more storage requests) and the rebuild with its error.
            let mut batch = Vec::new();
            let mut failed = None;
            storage
                .list_each("blocks/", &mut |entry| {
                    if let Some(id) = crate::block::BlockId::from_storage_key(&entry.key) {
                        batch.push((id, entry.size));
                    }
                    if batch.len() >= 1000 {
                        report.objects += batch.len() as u64;
                        failed = self.db.lock().insert_found_objects(sid, &std::mem::take(&mut batch)).err();
                        if failed.is_some() {
                            return std::ops::ControlFlow::Break(());
                        }
                    }
                    std::ops::ControlFlow::Continue(())
                })
                .map_err(|e| stopped(e.into()))?;
            if let Some(e) = failed {
                return Err(stopped(e));
            }
            report.objects += batch.len() as u64;
            self.db.lock().insert_found_objects(sid, &batch).map_err(stopped)?;
        }
        if report.damaged.is_empty() {
            self.db.lock().set_rebuild_unfinished(false)?;
        }
        Ok(report)
    }

    pub fn set_status(&self, uid: VersionUid, status: Status) -> Result<()> {
        self.db.lock().set_status(uid, status)
    }

    /// Decides what `rm` would do; refuses protected, too young or busy versions.
    pub fn plan_remove(&self, uids: &[VersionUid], force: bool) -> Result<Vec<Version>> {
        let mut plan = Vec::new();
        let min_age = chrono::Duration::milliseconds((self.config.rm_min_age_days * 86_400_000.0) as i64);
        for &uid in uids {
            let v = self.version(uid)?;
            let db = self.db.lock();
            if let Some(holder) = db.version_lock_holders(uid)?.first() {
                return Err(Error::Refused(format!(
                    "version {uid} is in use ({} by pid {} on {}); try again when it is done",
                    holder.0, holder.1, holder.2
                )));
            }
            if v.status == Status::Incomplete
                && let Some(sid) = db.version_session(uid)?
                && let Some(backup) = db.live_sessions()?.into_iter().find(|s| s.id == sid)
            {
                // Who, and since when silent: a killed backup of another host holds its
                // version until its heartbeat is old enough (a drill was told only to wait).
                return Err(Error::Refused(format!(
                    "version {uid} is being backed up right now ({}); wait for it to finish",
                    running_holder(&backup)
                )));
            }
            drop(db);
            if v.protected && !force {
                return Err(Error::Refused(format!(
                    "version {uid} is protected; run `keepfs unprotect {uid}` first (or pass --force)"
                )));
            }
            let age = Utc::now() - v.date;
            if age < min_age && v.status != Status::Incomplete && !force {
                return Err(Error::Refused(format!(
                    "version {uid} is younger than {} days (rm_min_age_days); pass --force to remove it anyway",
                    self.config.rm_min_age_days
                )));
            }
            plan.push(v);
        }
        Ok(plan)
    }

    /// Removes the versions of a plan: first their metadata object in storage, then their
    /// rows. Their blocks stay until `cleanup`. Each version is locked for removal first
    /// and refused if a reader locked it since the plan was made (see
    /// [`SessionGuard::lock_version`]).
    pub fn apply_remove(&self, plan: &[Version]) -> Result<()> {
        self.apply_remove_with(plan, |_| {})
    }

    /// [`Self::apply_remove`], calling `removing` with each version as its removal
    /// begins (after every check that could refuse the whole plan).
    pub fn apply_remove_with(&self, plan: &[Version], mut removing: impl FnMut(&Version)) -> Result<()> {
        let session = self.session("rm", false)?;
        // Every storage claimed before the first version is marked: a refusal changes nothing.
        for v in plan {
            self.claim_storage(&v.storage)?;
        }
        for v in plan {
            session.lock_for_removal(v.uid)?;
            removing(v);
            // Invalid first: an rm cut off before its rows go (a lost database connection,
            // a kill) leaves an invalid version that `rm` removes, never a valid-looking
            // one whose version object is gone.
            self.db.lock().set_status(v.uid, crate::version::Status::Invalid)?;
            self.storage_to_delete_from(&v.storage)?.delete(&version_key(v.uid))?;
            self.db.lock().remove_version(v.uid)?;
        }
        Ok(())
    }

    /// Registers this process as working on the repository (see docs/format.md, "Sessions").
    pub fn session(&self, purpose: &str, writes: bool) -> Result<SessionGuard> {
        let id = self.db.lock().register_session(purpose, writes)?;
        self.unended.retry(&self.db);
        // Processes of other hosts judge this session by its heartbeat: keep it fresh for
        // as long as the session lives, whatever the process is busy with.
        let stop = Some(heartbeat_thread(self.db.clone(), id, self.unended.clone()));
        Ok(SessionGuard { db: self.db.clone(), id, stop_heartbeat: stop, unended: self.unended.clone() })
    }

    /// The sessions working on the repository now, from any process or host.
    pub fn live_sessions(&self) -> Result<Vec<crate::catalog::Session>> {
        self.db.lock().live_sessions()
    }

    pub(crate) fn db(&self) -> parking_lot::MutexGuard<'_, Box<dyn crate::catalog::Catalog>> {
        self.db.lock()
    }

    /// What `keepfs storage list` / `storage stats` show of each configured storage
    /// (from the database: no request to the storage).
    pub fn storage_infos(&self) -> Result<Vec<StorageInfo>> {
        let versions = self.list(None)?;
        let mut out = Vec::new();
        for sc in &self.config.storages {
            let (objects, bytes) = self.storage_totals(&sc.name)?;
            let (kind, location) = match &sc.kind {
                StorageKind::File { path } => ("file", path.display().to_string()),
                StorageKind::Null => ("null", "(discards everything)".to_string()),
                StorageKind::S3(c) => ("s3", format!("{}/{}/{}", c.endpoint.trim_end_matches('/'), c.bucket, c.prefix)),
            };
            let mine: Vec<&Version> = versions.iter().filter(|v| v.storage == sc.name).collect();
            out.push(StorageInfo {
                name: sc.name.clone(),
                kind: kind.into(),
                location,
                default: sc.name == self.config.default_storage,
                encrypted: self.db().storage_encrypted(&sc.name)?,
                versions: mine.len() as u64,
                objects,
                stored_bytes: bytes,
                image_bytes: mine.iter().map(|v| v.size).sum(),
            });
        }
        Ok(out)
    }

    /// (objects, stored bytes) of a storage.
    pub fn storage_totals(&self, name: &str) -> Result<(u64, u64)> {
        let db = self.db.lock();
        let id = db.storage_id(name)?;
        db.object_totals(id)
    }
}

/// What `database rebuild` did.
#[derive(Clone, Debug, Default)]
pub struct RebuildReport {
    /// Versions added to the database.
    pub versions: u64,
    /// Versions the database held already (from an earlier, unfinished rebuild).
    pub already: u64,
    /// Block objects found.
    pub objects: u64,
    /// Version objects that could not be read back; their versions are not in the database.
    pub damaged: Vec<DamagedVersionObject>,
}

#[derive(Clone, Debug)]
pub struct DamagedVersionObject {
    pub storage: String,
    pub key: String,
    pub reason: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct StorageInfo {
    pub name: String,
    pub kind: String,
    pub location: String,
    pub default: bool,
    /// As far as the database knows (set once its keyring was seen).
    pub encrypted: bool,
    pub versions: u64,
    /// Objects recorded in the database and the bytes they take in the storage.
    pub objects: u64,
    pub stored_bytes: u64,
    /// Sum of the sizes of the versions stored there (before dedup and compression).
    pub image_bytes: u64,
}

/// A named lease in the catalog (`cleanup/<storage>`, `keyring/<storage>`), held by a
/// session of its own: at most one live holder at a time, from any process or host. Let
/// go when dropped; the lease of a holder that died is taken over by the next claim.
pub struct Lease {
    pub(crate) session: SessionGuard,
    name: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.session.release(&self.name);
    }
}

/// Who holds a lease, for a refusal: "pid N on HOST" (or "a session that just ended").
pub(crate) fn holder_name(held: Option<&Session>) -> String {
    held.map(|s| format!("pid {} on {}", s.process.pid, s.process.host))
        .unwrap_or_else(|| "a session that just ended".to_string())
}

/// A running session as people need it to judge whether it is: its process, and its
/// last heartbeat (the catalog's clock). One this process cannot see (another host's,
/// or this machine's before it restarted) counts as running until its heartbeat is
/// older than `catalog::REMOTE_SESSION_TTL_MS`: say so, since it may be dead already.
pub(crate) fn running_holder(s: &Session) -> String {
    let beat = chrono::DateTime::from_timestamp_millis(s.heartbeat_ms)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| s.heartbeat_ms.to_string());
    let seen = if s.process.is_here() {
        String::new()
    } else {
        format!(
            "; a process this host cannot see (of another host, container or boot) counts as running until {} min after its last heartbeat",
            crate::catalog::REMOTE_SESSION_TTL_MS / 60_000
        )
    };
    format!("{}, last heartbeat {beat}{seen}", holder_name(Some(s)))
}

impl Repository {
    /// Claims the lease `name` for `purpose` (what this session is, as others see it).
    /// `Err` holds the live session that holds it (`None` if it ended meanwhile). Test
    /// builds stall for `KEEPFS_TEST_CLAIM_STALL_MS` between registering the session and
    /// claiming, so that another claim can come in between.
    pub(crate) fn lease(&self, name: &str, purpose: &str) -> Result<std::result::Result<Lease, Option<Session>>> {
        let session = self.session(purpose, false)?;
        crate::test_knobs::stall("KEEPFS_TEST_CLAIM_STALL_MS");
        let Some(holder) = self.db().claim(name, session.id)? else {
            return Ok(Ok(Lease { session, name: name.to_string() }));
        };
        Ok(Err(self.db().live_sessions()?.into_iter().find(|s| s.id == holder)))
    }
}

/// A registered session; ends (and releases its version locks) when dropped.
pub struct SessionGuard {
    db: SharedCatalog,
    pub id: i64,
    /// Dropped first when the guard goes, which ends the heartbeat thread.
    stop_heartbeat: Option<std::sync::mpsc::Sender<()>>,
    unended: Unended,
}

/// The sessions of this process whose end the catalog did not take (it was down or did
/// not answer): ended again when the catalog answers (the next session this process
/// begins, the next heartbeat of one it has). Without this, a mount whose draft's
/// commit met a stopped server kept that session "running" until it was unmounted, and
/// cleanups kept the draft's objects for it (found by a drill). Its lock is never held
/// with the catalog's.
#[derive(Clone, Default)]
struct Unended(Arc<Mutex<Vec<i64>>>);

impl Unended {
    /// Ends `id`, or keeps it to be ended later.
    fn end(&self, db: &SharedCatalog, id: i64) {
        let ended = db.lock().end_session(id);
        if ended.is_err() {
            self.0.lock().push(id);
        }
    }

    /// Ends the sessions kept, keeping those the catalog still does not take.
    fn retry(&self, db: &SharedCatalog) {
        let kept = std::mem::take(&mut *self.0.lock());
        for id in kept {
            self.end(db, id);
        }
    }
}

/// How often a session on a shared catalog beats (other hosts take it for dead after
/// `catalog::REMOTE_SESSION_TTL_MS` without one).
const HEARTBEAT_EVERY: std::time::Duration =
    std::time::Duration::from_millis(crate::catalog::HEARTBEAT_EVERY_MS as u64);

/// Starts a thread that heartbeats `session` until the returned sender is dropped, or
/// until the session turns out to have been ended by another process.
fn heartbeat_thread(db: SharedCatalog, session: i64, unended: Unended) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new().name("keepfs-heartbeat".into()).spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HEARTBEAT_EVERY) {
            let beat = db.lock().heartbeat(session);
            if beat.is_ok() {
                unended.retry(&db);
            }
            // The session ended meanwhile by its own hand (its guard went while this beat
            // waited for the catalog): nothing to say.
            if beat.is_err() && matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Disconnected)) {
                return;
            }
            if let Err(e) = beat {
                keepfs_face::log!("keepfs: warning: {e}");
                if matches!(e, crate::error::Error::Other(_)) {
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        keepfs_face::log!("keepfs: warning: cannot start the session heartbeat: {e}");
    }
    tx
}

/// The purpose of the version lock `rm` takes while it removes a version.
const REMOVING: &str = "rm";
/// The purpose of the version lock `metadata restore --force` takes while it replaces a
/// version's metadata and index (a reader streams the index a piece at a time).
pub(crate) const REPLACING: &str = "metadata restore";
/// Locks that keep readers off.
const EXCLUSIVE: [&str; 2] = [REMOVING, REPLACING];

impl SessionGuard {
    /// Locks a version for reading it (restore, scrub, mount, a backup's base), so that
    /// `rm` refuses it. The lock is written first and then checked against a removal under
    /// way, as [`SessionGuard::lock_for_removal`] writes its lock first and then checks for
    /// readers: whichever checks second sees the other's lock, so no version is read while
    /// it is removed. (Checked before only, a deep scrub that began while `rm` removed its
    /// version reported the version object missing, exit 3; a restore could read an index
    /// whose blocks a cleanup then took: found by tests/multihost.rs.)
    pub fn lock_version(&self, uid: VersionUid, purpose: &str) -> Result<()> {
        self.db.lock().lock_version(uid, self.id, purpose)?;
        let holders = self.db.lock().version_lock_holders(uid)?;
        if let Some((purpose, pid, host)) = holders.iter().find(|h| EXCLUSIVE.contains(&h.0.as_str())) {
            let what = if purpose == REMOVING { "removed" } else { "given its metadata anew" };
            return Err(Error::Refused(format!("version {uid} is being {what} ({purpose} by pid {pid} on {host})")));
        }
        // Removed before the lock was written: it does not exist.
        self.db.lock().version(uid).map(|_| ())
    }

    /// Locks a version for its removal: refused while a reader holds it (the other half
    /// of [`SessionGuard::lock_version`]).
    fn lock_for_removal(&self, uid: VersionUid) -> Result<()> {
        self.lock_exclusive(uid, REMOVING)
    }

    /// Locks a version for a change no reader may see half done (`purpose` is one of
    /// [`EXCLUSIVE`]): refused while a reader holds it.
    pub(crate) fn lock_exclusive(&self, uid: VersionUid, purpose: &str) -> Result<()> {
        self.db.lock().lock_version(uid, self.id, purpose)?;
        let holders = self.db.lock().version_lock_holders(uid)?;
        if let Some((purpose, pid, host)) = holders.iter().find(|h| !EXCLUSIVE.contains(&h.0.as_str())) {
            return Err(Error::Refused(format!(
                "version {uid} is in use ({purpose} by pid {pid} on {host}); try again when it is done"
            )));
        }
        Ok(())
    }

    /// Lets go of the catalog lease `name` if this session holds it.
    pub fn release(&self, name: &str) -> Result<()> {
        self.db.lock().release(name, self.id)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // The heartbeat thread first, so it never beats for a session that has ended.
        drop(self.stop_heartbeat.take());
        self.unended.end(&self.db, self.id);
    }
}

/// The data blocks of one index walk, handed over in batches from the thread the walk
/// runs on (see [`walk_beside`]).
pub(crate) type Beside = std::iter::Peekable<std::iter::Flatten<crossbeam_channel::IntoIter<Vec<(u64, BlockId)>>>>;

/// Runs `walk` (an index walk that hands each data block over, in block order, to the
/// function it is given) on a thread of its own while `here` consumes what it hands over:
/// what walks two indexes side by side as streams (a diff, a delta restore, a
/// differential backup's merge with its base). `here` should drain what it is given: the
/// walk stops when it is dropped. The blocks of a walk that failed may be cut short; its
/// error is in its result.
pub(crate) fn walk_beside<E: Send, R>(
    walk: impl FnOnce(&mut dyn FnMut(u64, BlockId) -> bool) -> std::result::Result<Option<IndexHeader>, E> + Send,
    here: impl FnOnce(Beside) -> R,
) -> (std::thread::Result<std::result::Result<Option<IndexHeader>, E>>, R) {
    const BATCH: usize = 4096;
    std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<(u64, BlockId)>>(2);
        let walker = s.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let walked = walk(&mut |i, id| {
                batch.push((i, id));
                batch.len() < BATCH || tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).is_ok()
            });
            if matches!(walked, Ok(Some(_))) && !batch.is_empty() {
                let _ = tx.send(batch);
            }
            walked
        });
        let out = here(rx.into_iter().flatten().peekable());
        (walker.join(), out)
    })
}

/// The result of a thread that walked an index (restore's and scrub's producers,
/// `walk_beside`'s walker); one that panicked is an error, not a panic here.
pub(crate) fn joined<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| Err(Error::Other("an index reader stopped".into())))
}

/// A version's stored index, read out of the catalog a piece at a time, the catalog's
/// lock taken for each piece and never held between them (see
/// [`crate::catalog::IndexPieces`]).
pub(crate) type StoredIndex<'a> = crate::catalog::IndexPieces<Box<dyn crate::catalog::ReadPiece + 'a>>;
