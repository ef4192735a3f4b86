//! The write-session service: the one place where reads and writes through a face (the
//! FUSE filesystem, the NBD server) become versions. It implements
//! [`keepfs_face::Sessions`]; a face only translates its protocol into these calls.
//!
//! Rules, for every face alike:
//! - **Incoming backups.** A name being written is one draft shared by every handle on
//!   it. It becomes a version when its last writer closes, once bytes were written (a
//!   file only created or sized stays, for tools that size first and write later). The
//!   close of the handle's opener commits at once, so `cp` returns once the version
//!   exists, or fails with the errno.
//! - **Overlays (copy-on-write).** Writing to a version starts an overlay: a draft over
//!   the version, shared by every handle opened while it lives. It becomes a new version
//!   (same name, the original's labels, `keepfs.cow-of=<uid>`) when its last writer
//!   closes; one opened for writing and never written is dropped. By
//!   [`SessionOptions::overlays`] it may instead live as long as the face, or be dropped
//!   when its last writer goes. Handles that shared an overlay read
//!   the version it became, and writing again continues that version.
//! - **Continuations.** An opener that reopens what it committed a moment ago (qemu-img
//!   into `incoming/`, fio's write-then-verify on a version) continues it: reads see
//!   the new version, writes go to a draft over it, and the version that makes replaces
//!   the one before. A continuation nobody writes is dropped and the version stands.
//! - **Failures.** A draft whose write failed is never committed: the closing call
//!   answers that errno and the draft is discarded. A commit that fails removes its
//!   incomplete version. Errors carry errno values from [`Error::errno`] (ENOSPC for a
//!   full disk), with the full message on stderr.
//!
//! ## Locks
//! Every lock here is a leaf: the maps (`handles`, `incoming`, `recent`, `overlays`,
//! `recent_overlays`, `versions`, `data_bytes`) and each draft's [`Slot::state`]. A
//! thread takes one, copies out or changes what it needs, and lets it go before it
//! takes any other: no two locks are ever held at once, so no order between them can
//! deadlock. Map locks are never held across storage or database I/O. A slot's state
//! lock serialises that draft's own operations (a write may wait for its blocks to be
//! handed over) but is never held across a commit or a discard: those take the draft
//! out of its slot first, so that every other handle sees it gone, and run with no lock
//! held. Whoever finds a slot whose draft is gone treats the slot as not there.
//!
//! Beside it: [`draft`], a writable image that becomes a version when committed, and
//! [`image`], the random-access read path with its read-ahead.

pub mod draft;
pub mod image;

use crate::backup::BackupOptions;
use crate::cache::BlockCache;
use crate::error::Error;
use crate::repo::Repository;
use crate::session::draft::{Draft, DraftOptions};
use crate::session::image::{Image, Prefetcher};
use crate::version::{Status, VersionUid, check_label, check_name, check_snapshot};
use keepfs_face::{Extent, Fh, Opened, Opener, ReadRef, Sessions, VersionEntry};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Label that marks a version made by writing to another version.
pub const COW_LABEL: &str = "keepfs.cow-of";

/// How long an opener that committed a draft by closing it may reopen it to go on.
const CONTINUE_GRACE: Duration = Duration::from_secs(5);

/// Turns an engine error into the `io::Error` a face answers (errno from
/// [`Error::errno`]), after logging the full message on stderr: the process that gets
/// the errno cannot see it.
pub fn to_io(e: Error) -> io::Error {
    keepfs_face::log!("keepfs: error: {e}");
    io::Error::from_raw_os_error(e.errno())
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// What becomes of an overlay when its last writer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlays {
    /// It becomes a new version.
    Commit,
    /// It stays, never a version, until the face shuts down (`mount --discard-writes`:
    /// a throw-away VM boot can close and reopen its disk).
    KeepUntilShutdown,
    /// It is dropped (`nbd --discard-writes`: at the last writer's disconnect).
    DropAtLastClose,
}

/// How the service treats writes.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Refuse every write with EROFS.
    pub read_only: bool,
    pub overlays: Overlays,
    /// How long a listing of the versions is reused.
    pub list_ttl: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { read_only: false, overlays: Overlays::Commit, list_ttl: Duration::from_secs(1) }
    }
}

/// A draft and the version it continues (and replaces when committed).
struct WriteDraft {
    draft: Draft,
    replaces: Option<VersionUid>,
}

impl WriteDraft {
    /// Makes the draft a version; a failed commit leaves no incomplete version behind.
    fn commit(self, repo: &Repository) -> io::Result<String> {
        let uid = self.draft.uid;
        let name = self.draft.name().to_string();
        let v = match self.draft.commit() {
            Ok(v) => v,
            Err(e) => {
                // Said with the name the writer knows (the version's is not its yet).
                keepfs_face::log!("keepfs: error: {name} was not committed as {uid}: {e}");
                let e = errno(e.errno());
                // Nothing can continue a draft whose writer is gone: leave no incomplete
                // version behind looking like a backup (its stored blocks go at `cleanup`).
                match repo.remove_incomplete(uid) {
                    Ok(()) => keepfs_face::log!("keepfs: the incomplete version {uid} was removed"),
                    Err(r) => keepfs_face::log!(
                        "keepfs: error: the incomplete version {uid} could not be removed ({r}); remove it with `keepfs rm {uid}`"
                    ),
                }
                return Err(e);
            }
        };
        keepfs_face::log!("keepfs: committed {} as {} ({} bytes)", v.name, v.uid, v.size);
        if let Some(old) = self.replaces {
            // The draft (and its read lock on `old`) is gone: drop the superseded version,
            // unless someone still reads it. The new version exists either way, so a
            // failure here is logged, not answered.
            match repo.remove_superseded(old) {
                Ok(true) => keepfs_face::log!("keepfs: {} replaces {old}, which it continued", v.uid),
                Ok(false) => keepfs_face::log!(
                    "keepfs: {} continues {old}, which is kept while it is read; remove it later with `keepfs rm {old}`",
                    v.uid
                ),
                Err(e) => keepfs_face::log!(
                    "keepfs: error: {} continues {old}, which could not be removed ({e}); remove it with `keepfs rm {old}`",
                    v.uid
                ),
            }
        }
        Ok(v.uid.to_string())
    }

    fn discard(self, repo: &Repository) -> io::Result<()> {
        let uid = self.draft.uid;
        drop(self.draft);
        repo.remove_incomplete(uid).map_err(to_io)
    }
}

/// What a draft holds beside the draft itself, under its slot's lock.
struct Shared {
    draft: Option<WriteDraft>,
    writers: usize,
    /// Handles open on the draft (readers too).
    opens: usize,
    /// Something was written or truncated since the draft started.
    dirty: bool,
    /// Bytes were written (not only a size set): an incoming backup becomes a version
    /// only then, since tools such as qemu-img create and size the file, close it, and
    /// reopen it to write.
    written: bool,
    /// A continuation of a just-committed incoming backup (dropped if never written),
    /// and the opener it belongs to: nobody else may attach to it.
    continues: bool,
    continuer: Option<Opener>,
    /// The draft is being committed: a write through a handle that shared it waits for
    /// the version it becomes, so that it continues that one.
    committing: bool,
    /// The errno of a write or truncate that failed: the draft is then never committed
    /// (it would hold what the writer failed to write), only discarded.
    failed: Option<i32>,
    /// The incoming backup's name now (it may have been renamed since it was opened).
    name: String,
    created: Instant,
    /// The version this draft became when committed: later writes through handles that
    /// shared it continue it, and their reads see it.
    committed_as: Option<String>,
    /// The image read by handles whose draft is gone.
    image: Option<Arc<Image>>,
}

impl Shared {
    /// An unwritten continuation is its tool's only: to everyone else the name is free,
    /// as after any commit.
    fn visible_to(&self, opener: Option<Opener>) -> bool {
        !self.continues || self.written || self.continuer == opener
    }
}

/// A draft shared by every handle that writes to the same image.
struct Slot {
    /// The draft's size, for `stat` without waiting for a writer.
    size: AtomicU64,
    state: Mutex<Shared>,
    /// Signalled when a commit of the draft ends (see [`Shared::committing`]).
    committed: parking_lot::Condvar,
}

type SlotRef = Arc<Slot>;

impl Slot {
    /// A slot for a new draft with `writers` writers among `opens` open handles.
    fn new(draft: WriteDraft, name: &str, opens: usize, writers: usize) -> SlotRef {
        Arc::new(Slot {
            size: AtomicU64::new(draft.draft.size()),
            state: Mutex::new(Shared {
                draft: Some(draft),
                writers,
                opens,
                dirty: false,
                written: false,
                continues: false,
                continuer: None,
                committing: false,
                failed: None,
                name: name.to_string(),
                created: Instant::now(),
                committed_as: None,
                image: None,
            }),
            committed: parking_lot::Condvar::new(),
        })
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn is_live(&self) -> bool {
        self.state.lock().draft.is_some()
    }

    /// Runs a change on the live draft and records its outcome: the new size, and a
    /// failure that forbids the draft to become a version. On success the draft is dirty,
    /// and `written` (an incoming file's write, not a resize) marks it written too, under
    /// the same lock.
    fn change(&self, written: bool, f: impl FnOnce(&mut Draft) -> crate::error::Result<()>) -> io::Result<()> {
        let mut s = self.state.lock();
        if let Some(e) = s.failed {
            return Err(errno(e));
        }
        let d = &mut s.draft.as_mut().ok_or_else(|| errno(libc::EIO))?.draft;
        let r = f(d);
        self.size.store(d.size(), Ordering::Relaxed);
        match r {
            Ok(()) => {
                s.dirty = true;
                s.written |= written;
                Ok(())
            }
            Err(e) => {
                let e = to_io(e);
                // A size refused up front changed nothing; anything else may have left
                // the draft short of what its writer wrote.
                if e.raw_os_error() != Some(libc::EFBIG) {
                    s.failed = e.raw_os_error();
                }
                Err(e)
            }
        }
    }

    /// Takes the draft out if `pick` says so, leaving the slot dead for everyone else.
    fn take_if(&self, pick: impl FnOnce(&mut Shared) -> bool) -> Option<WriteDraft> {
        let mut s = self.state.lock();
        if s.draft.is_some() && pick(&mut s) { s.draft.take() } else { None }
    }

    /// Counts one more handle of `opener` on the slot; false when its draft is gone, or
    /// it is another opener's unwritten continuation.
    fn attach(&self, writes: bool, opener: Opener) -> bool {
        let mut s = self.state.lock();
        if s.draft.is_none() || !s.visible_to(Some(opener)) {
            return false;
        }
        s.opens += 1;
        if writes {
            s.writers += 1;
        }
        true
    }

    fn detach(&self, writes: bool) {
        let mut s = self.state.lock();
        s.opens = s.opens.saturating_sub(1);
        if writes {
            s.writers = s.writers.saturating_sub(1);
        }
    }

    /// Runs `f` on the live draft (ENOENT when it is gone).
    fn with_draft<T>(&self, f: impl FnOnce(&mut Shared, &mut Draft) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.state.lock();
        let mut d = s.draft.take().ok_or_else(|| errno(libc::ENOENT))?;
        let r = f(&mut s, &mut d.draft);
        s.draft = Some(d);
        r
    }
}

/// Removes `slot` from `map` wherever it is listed (an incoming backup may have been
/// renamed since the caller found it).
fn unlist(map: &Mutex<HashMap<String, SlotRef>>, slot: &SlotRef) {
    map.lock().retain(|_, d| !Arc::ptr_eq(d, slot));
}

/// Puts `slot` under `key` unless another slot is there already (then returns false).
fn list_if_free(map: &Mutex<HashMap<String, SlotRef>>, key: &str, slot: &SlotRef) -> bool {
    let mut m = map.lock();
    if m.contains_key(key) {
        return false;
    }
    m.insert(key.to_string(), slot.clone());
    true
}

type Recent = Mutex<HashMap<String, (String, Opener, Instant)>>;

enum Handle {
    Image(Arc<Image>),
    /// A handle on a version while an overlay of it lives.
    Overlay {
        uid: String,
        slot: SlotRef,
        writes: bool,
        opener: Opener,
    },
    Incoming {
        slot: SlotRef,
        writes: bool,
        opener: Opener,
    },
}

pub struct SessionService {
    repo: Arc<Repository>,
    cache: Arc<BlockCache>,
    prefetch: Arc<Prefetcher>,
    opts: SessionOptions,
    handles: Mutex<HashMap<Fh, Arc<Handle>>>,
    next_fh: AtomicU64,
    incoming: Mutex<HashMap<String, SlotRef>>,
    /// Incoming names committed a moment ago: name -> (version uid, committer).
    recent: Recent,
    /// Live overlays by the uid of the version they overlay.
    overlays: Mutex<HashMap<String, SlotRef>>,
    /// Overlays committed a moment ago: original uid -> (new uid, committer).
    recent_overlays: Recent,
    /// The versions listed last: when, the list, and a generation each commit bumps.
    versions: Mutex<(Option<Instant>, Arc<Vec<VersionEntry>>, u64)>,
    /// Bytes each version holds in non-sparse blocks (versions never change).
    data_bytes: Mutex<HashMap<String, u64>>,
    /// This service's own session, for as long as it serves: a mount or NBD server with
    /// nothing open is still using the repository (`database migrate` and `key remove`
    /// are refused while it lives).
    _serving: crate::repo::SessionGuard,
}

impl SessionService {
    /// Starts serving `repo`. Fails when the server's session cannot be registered (a
    /// catalog being migrated, or one that cannot be written): a server the catalog does
    /// not know of would be invisible to `key remove` and `database migrate`, which must
    /// wait for it.
    pub fn new(repo: Arc<Repository>, opts: SessionOptions) -> crate::error::Result<SessionService> {
        let serving = repo.session("serve", false)?;
        let cache = Arc::new(BlockCache::new(repo.config.cache_bytes as usize));
        let prefetch = Arc::new(Prefetcher::start(cache.clone(), repo.config.storage_readers));
        Ok(SessionService {
            _serving: serving,
            repo,
            cache,
            prefetch,
            opts,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            incoming: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            overlays: Mutex::new(HashMap::new()),
            recent_overlays: Mutex::new(HashMap::new()),
            versions: Mutex::new((None, Arc::new(Vec::new()), 0)),
            data_bytes: Mutex::new(HashMap::new()),
        })
    }

    fn image(&self, uid: &str) -> io::Result<Arc<Image>> {
        let uid = VersionUid::parse(uid).map_err(|_| to_io(Error::VersionNotFound(uid.to_string())))?;
        Ok(Arc::new(self.repo.open_image(uid, self.cache.clone(), Some(self.prefetch.clone())).map_err(to_io)?))
    }

    fn draft(&self, backup: BackupOptions, base: Option<Arc<Image>>, streaming: bool) -> io::Result<WriteDraft> {
        let bs = base.as_ref().map(|b| b.block_size()).unwrap_or(self.repo.config.block_size) as u64;
        let opts = DraftOptions {
            backup,
            base,
            streaming,
            memory_blocks: ((self.repo.config.spool_memory_bytes / bs) as usize).max(2),
            spool_blocks: ((self.repo.config.spool_bytes / bs) as usize).max(4),
        };
        Ok(WriteDraft { draft: Draft::start(self.repo.clone(), opts).map_err(to_io)?, replaces: None })
    }

    /// A draft over version `uid` with its name, snapshot name and labels; when
    /// `continues`, it replaces `uid` when committed, else it is labelled a copy-on-write
    /// of `uid`.
    fn draft_over(&self, uid: &str, streaming: bool, continues: bool) -> io::Result<WriteDraft> {
        let base = self.image(uid)?;
        let mut labels: BTreeMap<String, String> = base.version.labels.clone();
        if !continues {
            labels.insert(COW_LABEL.to_string(), base.version.uid.to_string());
        }
        let backup = BackupOptions {
            name: base.version.name.clone(),
            snapshot: base.version.snapshot.clone(),
            labels,
            ..Default::default()
        };
        let old = base.version.uid;
        let mut d = self.draft(backup, Some(base), streaming)?;
        if continues {
            d.replaces = Some(old);
        }
        Ok(d)
    }

    /// An overlay of version `uid`: the continuation of `continued` (the version an
    /// earlier overlay of `uid` became) where there is one, else a new copy-on-write.
    fn overlay_draft(&self, uid: &str, continued: Option<&str>) -> io::Result<WriteDraft> {
        match continued {
            Some(v) => self.draft_over(v, false, true),
            None => self.draft_over(uid, false, false),
        }
    }

    fn discard(&self, d: WriteDraft) {
        if let Err(e) = d.discard(&self.repo) {
            keepfs_face::log!("keepfs: error: discarding an unused draft failed ({e})");
        }
    }

    fn add_handle(&self, h: Handle) -> Fh {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: Fh) -> io::Result<Arc<Handle>> {
        self.handles.lock().get(&fh).cloned().ok_or_else(|| errno(libc::EBADF))
    }

    fn forget_versions(&self) {
        let mut v = self.versions.lock();
        v.0 = None;
        v.2 += 1;
    }

    fn incoming_slot(&self, name: &str) -> Option<SlotRef> {
        self.incoming.lock().get(name).cloned()
    }

    fn overlay_slot(&self, uid: &str) -> Option<SlotRef> {
        self.overlays.lock().get(uid).cloned()
    }

    /// The version that `opener` committed from `key` within the grace period, if any.
    fn recently_committed(map: &Recent, key: &str, opener: Option<Opener>) -> Option<String> {
        let mut recent = map.lock();
        recent.retain(|_, (_, _, t)| t.elapsed() < CONTINUE_GRACE);
        recent.get(key).filter(|(_, committer, _)| opener == Some(*committer)).map(|(uid, _, _)| uid.clone())
    }

    /// Continues the incoming backup `opener` committed as `name` a moment ago.
    fn continue_recent(&self, name: &str, opener: Option<Opener>) -> io::Result<()> {
        let uid = Self::recently_committed(&self.recent, name, opener).ok_or_else(|| errno(libc::ENOENT))?;
        let slot = Slot::new(self.draft_over(&uid, true, true)?, name, 0, 0);
        {
            let mut s = slot.state.lock();
            s.continues = true;
            s.continuer = opener;
        }
        if list_if_free(&self.incoming, name, &slot) {
            self.recent.lock().remove(name);
        } else if let Some(d) = slot.take_if(|_| true) {
            // Another thread of the same tool continued it first.
            self.discard(d);
        }
        self.forget_versions();
        Ok(())
    }

    /// Drops continuations not written to within a few seconds (looked up or opened by
    /// the tool, which then did not write): the versions they continue stand.
    fn prune_continuations(&self) {
        let slots: Vec<SlotRef> = self.incoming.lock().values().cloned().collect();
        for slot in slots {
            let stale =
                slot.take_if(|s| s.continues && s.writers == 0 && !s.written && s.created.elapsed() > CONTINUE_GRACE);
            if let Some(d) = stale {
                unlist(&self.incoming, &slot);
                self.discard(d);
            }
        }
    }

    /// What a handle whose draft is gone reads: the version the draft became, or for an
    /// overlay nobody committed, the original.
    fn after_draft(&self, slot: &SlotRef, original: Option<&String>) -> io::Result<Arc<Image>> {
        let uid = {
            let s = slot.state.lock();
            if let Some(img) = &s.image {
                return Ok(img.clone());
            }
            s.committed_as.clone().or_else(|| original.cloned()).ok_or_else(|| errno(libc::ENOENT))?
        };
        let img = self.image(&uid)?;
        slot.state.lock().image = Some(img.clone());
        Ok(img)
    }

    /// Commits a draft when its last writer goes (see the module's rules). `flusher` is
    /// the opener of a close, `None` at the handle's last release, which also counts the
    /// handle out (a writer's; readers and kept overlays are counted out by `release`).
    fn finish_writer(&self, h: &Handle, flusher: Option<Opener>) -> io::Result<()> {
        let at_release = flusher.is_none();
        let (slot, opener, overlay_of) = match h {
            Handle::Incoming { slot, writes: true, opener } => (slot, *opener, None),
            Handle::Overlay { uid, slot, writes: true, opener }
                if self.opts.overlays != Overlays::KeepUntilShutdown =>
            {
                (slot, *opener, Some(uid))
            }
            _ => return Ok(()),
        };
        let closing = at_release || flusher == Some(opener);
        let (mut failed, mut commit, mut name) = (None, false, String::new());
        let taken = {
            let mut s = slot.state.lock();
            // At a release this handle goes in the same step as the decision, so that two
            // last releases at once cannot both see the other as still writing.
            if at_release {
                s.opens = s.opens.saturating_sub(1);
                s.writers = s.writers.saturating_sub(1);
            }
            let last = if at_release { s.writers == 0 } else { s.writers == 1 };
            if s.draft.is_none() || !last {
                None
            } else {
                name = s.name.clone();
                failed = s.failed;
                let keep = overlay_of.is_none() || self.opts.overlays == Overlays::Commit;
                commit = keep && closing && failed.is_none() && if overlay_of.is_some() { s.dirty } else { s.written };
                // A written draft goes at the closing flush; one whose write failed, or an
                // overlay never written, at the last close.
                let go = commit || (closing && failed.is_some()) || (at_release && overlay_of.is_some());
                s.committing = go && commit;
                if go { s.draft.take() } else { None }
            }
        };
        let Some(d) = taken else { return Ok(()) };
        unlist(if overlay_of.is_some() { &self.overlays } else { &self.incoming }, slot);
        if !commit {
            d.discard(&self.repo)?;
            return failed.map_or(Ok(()), |e| Err(errno(e)));
        }
        let r = d.commit(&self.repo);
        self.forget_versions();
        {
            let mut s = slot.state.lock();
            s.committing = false;
            if let Ok(new_uid) = &r {
                s.committed_as = Some(new_uid.clone());
            }
            s.image = None;
        }
        slot.committed.notify_all();
        let new_uid = r?;
        let (map, key) = match overlay_of {
            Some(uid) => (&self.recent_overlays, uid.clone()),
            None => (&self.recent, name),
        };
        map.lock().insert(key, (new_uid, opener, Instant::now()));
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.opts.read_only { Err(errno(libc::EROFS)) } else { Ok(()) }
    }

    /// Whether this catalog may write to the storage of version `uid`: one another catalog
    /// owns is read-only (said once in the log, naming the owner).
    fn may_write(&self, uid: &str) -> io::Result<bool> {
        let parsed = VersionUid::parse(uid).map_err(|_| to_io(Error::VersionNotFound(uid.to_string())))?;
        let storage = self.repo.version(parsed).map_err(to_io)?.storage;
        match self.repo.claim_storage(&storage) {
            Ok(()) => Ok(true),
            Err(e @ Error::NotOwner(_)) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| keepfs_face::log!("keepfs: {e}; its versions are read-only here"));
                Ok(false)
            }
            Err(e) => Err(to_io(e)),
        }
    }

    fn incoming_draft<T>(&self, name: &str, f: impl FnOnce(&mut Shared, &mut Draft) -> io::Result<T>) -> io::Result<T> {
        self.incoming_slot(name).ok_or_else(|| errno(libc::ENOENT))?.with_draft(f)
    }
}

impl Sessions for SessionService {
    fn versions(&self) -> io::Result<Arc<Vec<VersionEntry>>> {
        let generation = {
            let v = self.versions.lock();
            if v.0.is_some_and(|t| t.elapsed() < self.opts.list_ttl) {
                return Ok(v.1.clone());
            }
            v.2
        };
        let list: Vec<VersionEntry> = self
            .repo
            .list(None)
            .map_err(to_io)?
            .into_iter()
            .filter(|v| v.status != Status::Incomplete)
            .map(|v| VersionEntry {
                uid: v.uid.to_string(),
                name: v.name,
                snapshot: v.snapshot,
                date: v.date.into(),
                date_text: v.date.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                size: v.size,
                block_size: v.block_size,
                status: v.status.as_str().to_string(),
                protected: v.protected,
                labels: v.labels.into_iter().collect(),
            })
            .collect();
        let list = Arc::new(list);
        let mut v = self.versions.lock();
        // A list fetched before a commit was forgotten must not be kept as fresh.
        if v.2 == generation {
            *v = (Some(Instant::now()), list.clone(), generation);
        }
        Ok(list)
    }

    fn data_bytes(&self, uid: &str) -> io::Result<u64> {
        if let Some(n) = self.data_bytes.lock().get(uid) {
            return Ok(*n);
        }
        let v = VersionUid::parse(uid).map_err(|_| to_io(Error::VersionNotFound(uid.to_string())))?;
        let n = self.repo.version(v).and_then(|v| self.repo.data_bytes(&v)).map_err(to_io)?;
        self.data_bytes.lock().insert(uid.to_string(), n);
        Ok(n)
    }

    fn open_version(&self, uid: &str, writes: bool, opener: Opener) -> io::Result<Opened> {
        if writes {
            self.check_writable()?;
        }
        let overlay = |slot| Opened {
            fh: self.add_handle(Handle::Overlay { uid: uid.to_string(), slot, writes, opener }),
            volatile: true,
        };
        // Each round attaches, or removes a dead slot, or lists a new one; only racing
        // openers make it go round more than twice.
        for _ in 0..64 {
            if let Some(slot) = self.overlay_slot(uid) {
                if slot.attach(writes, opener) {
                    return Ok(overlay(slot));
                }
                // Committed or discarded a moment ago: on its way out of the map.
                unlist(&self.overlays, &slot);
                continue;
            }
            let continued = Self::recently_committed(&self.recent_overlays, uid, Some(opener));
            // A storage another catalog owns is read-only to this one: opened for reading
            // (an NBD client or qemu opens read-write and may only read), its writes EROFS.
            let writes = writes && self.may_write(continued.as_deref().unwrap_or(uid))?;
            if !writes {
                let img = self.image(continued.as_deref().unwrap_or(uid))?;
                let volatile = continued.is_some();
                return Ok(Opened { fh: self.add_handle(Handle::Image(img)), volatile });
            }
            let slot = Slot::new(self.overlay_draft(uid, continued.as_deref())?, "", 1, 1);
            slot.state.lock().committed_as = continued;
            if list_if_free(&self.overlays, uid, &slot) {
                return Ok(overlay(slot));
            }
            if let Some(d) = slot.take_if(|_| true) {
                self.discard(d);
            }
        }
        Err(errno(libc::EBUSY))
    }

    fn overlay_size(&self, uid: &str) -> Option<u64> {
        self.overlay_slot(uid).map(|s| s.size())
    }

    fn resize_overlay(&self, uid: &str, size: u64) -> io::Result<()> {
        self.check_writable()?;
        match self.overlay_slot(uid) {
            Some(slot) => slot.change(false, |d| d.set_size(size)),
            // No overlay because the storage is another catalog's (`open(O_TRUNC)`,
            // `truncate`): read-only here, as its writes are.
            None if !self.may_write(uid)? => Err(errno(libc::EROFS)),
            None => Err(errno(libc::EPERM)),
        }
    }

    fn create_incoming(&self, name: &str, writes: bool, opener: Opener) -> io::Result<Fh> {
        self.check_writable()?;
        check_name(name).map_err(to_io)?;
        if let Some(slot) = self.incoming_slot(name) {
            // Another tool's unwritten continuation holds the name only for that tool.
            match slot.take_if(|s| !s.visible_to(Some(opener)) && s.opens == 0) {
                Some(d) => {
                    unlist(&self.incoming, &slot);
                    self.discard(d);
                }
                None => return Err(errno(libc::EEXIST)),
            }
        }
        // The draft starts with no lock held; a racing create of the same name that
        // lists its draft first wins, and this one is dropped.
        let backup = BackupOptions { name: name.to_string(), ..Default::default() };
        let slot = Slot::new(self.draft(backup, None, true)?, name, 1, usize::from(writes));
        if !list_if_free(&self.incoming, name, &slot) {
            if let Some(d) = slot.take_if(|_| true) {
                self.discard(d);
            }
            return Err(errno(libc::EEXIST));
        }
        Ok(self.add_handle(Handle::Incoming { slot, writes, opener }))
    }

    fn open_incoming(&self, name: &str, writes: bool, opener: Opener) -> io::Result<Fh> {
        if writes {
            self.check_writable()?;
        }
        if !self.incoming_exists(name, Some(opener)) {
            return Err(errno(libc::ENOENT));
        }
        let slot = self.incoming_slot(name).ok_or_else(|| errno(libc::ENOENT))?;
        if !slot.attach(writes, opener) {
            return Err(errno(libc::ENOENT));
        }
        Ok(self.add_handle(Handle::Incoming { slot, writes, opener }))
    }

    fn incoming_exists(&self, name: &str, opener: Option<Opener>) -> bool {
        self.prune_continuations();
        match self.incoming_slot(name) {
            Some(slot) => slot.state.lock().visible_to(opener),
            None => self.continue_recent(name, opener).is_ok(),
        }
    }

    fn incoming_size(&self, name: &str) -> Option<u64> {
        self.incoming_slot(name).map(|s| s.size())
    }

    fn incoming_names(&self) -> Vec<String> {
        self.prune_continuations();
        let mut names: Vec<String> = self.incoming.lock().keys().cloned().collect();
        names.sort();
        names
    }

    fn resize_incoming(&self, name: &str, size: u64) -> io::Result<()> {
        self.check_writable()?;
        self.incoming_slot(name).ok_or_else(|| errno(libc::ENOENT))?.change(false, |d| d.set_size(size))
    }

    fn rename_incoming(&self, from: &str, to: &str) -> io::Result<()> {
        self.check_writable()?;
        check_name(to).map_err(to_io)?;
        let slot = {
            let mut inc = self.incoming.lock();
            if inc.contains_key(to) {
                return Err(errno(libc::EEXIST));
            }
            let slot = inc.remove(from).ok_or_else(|| errno(libc::ENOENT))?;
            inc.insert(to.to_string(), slot.clone());
            slot
        };
        // The name is taken in the map first, then given to the draft (which records it
        // in the database) with no map lock held.
        let renamed = slot.with_draft(|s, d| {
            d.set_name(to);
            self.repo.rename_version(d.uid, to).map_err(to_io)?;
            s.name = to.to_string();
            Ok(())
        });
        match renamed {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !slot.is_live() => {
                // Committed or discarded meanwhile: it is gone.
                unlist(&self.incoming, &slot);
                Err(e)
            }
            Err(e) => {
                let mut inc = self.incoming.lock();
                if inc.get(to).is_some_and(|d| Arc::ptr_eq(d, &slot)) && !inc.contains_key(from) {
                    inc.remove(to);
                    inc.insert(from.to_string(), slot.clone());
                }
                drop(inc);
                let _ = slot.with_draft(|_, d| {
                    d.set_name(from);
                    Ok(())
                });
                Err(e)
            }
        }
    }

    fn remove_incoming(&self, name: &str) -> io::Result<()> {
        self.check_writable()?;
        let slot = self.incoming_slot(name).ok_or_else(|| errno(libc::ENOENT))?;
        let mut busy = false;
        let taken = slot.take_if(|s| {
            busy = s.opens > 0;
            !busy
        });
        if busy {
            return Err(errno(libc::EBUSY));
        }
        unlist(&self.incoming, &slot);
        taken.ok_or_else(|| errno(libc::ENOENT))?.discard(&self.repo)
    }

    fn incoming_labels(&self, name: &str) -> io::Result<Vec<(String, String)>> {
        self.incoming_draft(name, |_, d| Ok(d.labels().iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }

    fn set_incoming_label(&self, name: &str, label: &str, value: &str) -> io::Result<()> {
        check_label(label, value).map_err(to_io)?;
        self.incoming_draft(name, |_, d| d.set_label(label, value).map_err(to_io))
    }

    fn remove_incoming_label(&self, name: &str, label: &str) -> io::Result<bool> {
        self.incoming_draft(name, |_, d| Ok(d.remove_label(label)))
    }

    fn incoming_snapshot(&self, name: &str) -> io::Result<String> {
        self.incoming_draft(name, |_, d| Ok(d.snapshot().to_string()))
    }

    fn set_incoming_snapshot(&self, name: &str, snapshot: &str) -> io::Result<()> {
        check_snapshot(snapshot).map_err(to_io)?;
        self.incoming_draft(name, |_, d| {
            d.set_snapshot(snapshot);
            Ok(())
        })
    }

    fn read(&self, fh: Fh, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let h = self.handle(fh)?;
        let (slot, original) = match &*h {
            Handle::Image(img) => return img.read_at(offset, buf).map_err(to_io),
            Handle::Overlay { uid, slot, .. } => (slot, Some(uid)),
            Handle::Incoming { slot, .. } => (slot, None),
        };
        {
            let mut s = slot.state.lock();
            if let Some(d) = s.draft.as_mut() {
                return d.draft.read_at(offset, buf).map_err(to_io);
            }
        }
        self.after_draft(slot, original)?.read_at(offset, buf).map_err(to_io)
    }

    fn read_ref(&self, fh: Fh, offset: u64, len: usize) -> io::Result<Option<ReadRef>> {
        let h = self.handle(fh)?;
        let img = match &*h {
            Handle::Image(img) => img.clone(),
            // Through an overlay: where it holds nothing for the range, straight from the
            // base version's cached block (found under the slot's lock, read without it).
            Handle::Overlay { slot, .. } | Handle::Incoming { slot, .. } => {
                let base = slot.state.lock().draft.as_ref().and_then(|d| d.draft.untouched_base(offset, len));
                match base {
                    Some(img) => img,
                    None => return Ok(None),
                }
            }
        };
        Ok(img.read_ref(offset, len).map_err(to_io)?.map(|(block, range)| match block {
            Some(b) => ReadRef::Shared(b, range),
            None => ReadRef::Zeros(range.len()),
        }))
    }

    fn extent(&self, fh: Fh, offset: u64, until: u64) -> io::Result<Extent> {
        let h = self.handle(fh)?;
        let (slot, original) = match &*h {
            Handle::Image(img) => return Ok(Extent { size: img.size(), data: img.index().next_data(offset, until) }),
            Handle::Overlay { uid, slot, .. } => (slot, Some(uid)),
            Handle::Incoming { slot, .. } => (slot, None),
        };
        if let Some(d) = &slot.state.lock().draft {
            return Ok(Extent { size: d.draft.size(), data: d.draft.next_data(offset, until) });
        }
        let img = self.after_draft(slot, original)?;
        Ok(Extent { size: img.size(), data: img.index().next_data(offset, until) })
    }

    fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> io::Result<()> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::Incoming { slot, writes: true, .. } => {
                slot.change(true, |d| d.write_at(offset, data))?;
                Ok(())
            }
            Handle::Overlay { uid, slot, writes: true, .. } => {
                let relist = {
                    let mut s = slot.state.lock();
                    // A commit of this overlay is under way (a close through another
                    // descriptor): continue the version it makes, not the original.
                    while s.committing {
                        slot.committed.wait(&mut s);
                    }
                    if s.draft.is_none() {
                        // Written again after its overlay became a version: that version
                        // is continued (and replaced), so no write is lost.
                        s.draft = Some(self.overlay_draft(uid, s.committed_as.as_deref())?);
                        s.image = None;
                        true
                    } else {
                        false
                    }
                };
                if relist {
                    self.overlays.lock().entry(uid.clone()).or_insert_with(|| slot.clone());
                }
                slot.change(false, |d| d.write_at(offset, data))
            }
            // Opened for writing on a storage this catalog may only read (see open_version).
            Handle::Image(_) => Err(errno(libc::EROFS)),
            _ => Err(errno(libc::EBADF)),
        }
    }

    fn flush(&self, fh: Fh, opener: Opener) -> io::Result<()> {
        self.finish_writer(&*self.handle(fh)?, Some(opener))
    }

    fn release(&self, fh: Fh) -> io::Result<()> {
        let Some(h) = self.handles.lock().remove(&fh) else { return Err(errno(libc::EBADF)) };
        match &*h {
            Handle::Image(_) => Ok(()),
            Handle::Overlay { slot, writes, .. } | Handle::Incoming { slot, writes, .. } => {
                let kept = matches!(&*h, Handle::Overlay { .. }) && self.opts.overlays == Overlays::KeepUntilShutdown;
                if !*writes || kept {
                    slot.detach(*writes);
                    return Ok(());
                }
                // A writer that never flushed (it was killed) still commits what it wrote,
                // when it was the last one; otherwise the draft waits for the others.
                self.finish_writer(&h, None)
            }
        }
    }

    fn shutdown(&self) {
        // Continuations nobody wrote to: the versions they continue stand.
        let incoming: Vec<SlotRef> = self.incoming.lock().drain().map(|(_, d)| d).collect();
        for slot in incoming {
            if let Some(d) = slot.take_if(|s| s.continues && !s.written) {
                self.discard(d);
            }
        }
        // Overlays kept only for the life of the face go with it.
        let overlays: Vec<SlotRef> = self.overlays.lock().drain().map(|(_, d)| d).collect();
        for slot in overlays {
            if let Some(d) = slot.take_if(|_| true) {
                self.discard(d);
            }
        }
    }
}
