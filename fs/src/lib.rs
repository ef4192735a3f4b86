//! keepfs-fs: the FUSE filesystem face of keepfs.
//!
//! ```text
//! MOUNT/by_version/<uid>/data        the image (copy-on-write writable)
//! MOUNT/by_version/<uid>/{name,snapshot,date,size,block_size,status,protected,labels}
//! MOUNT/by_name/<name>/<uid>         -> ../../by_version/<uid>   (oldest first)
//! MOUNT/by_name/<name>/latest        -> ../../by_version/<newest uid>
//! MOUNT/incoming/<name>              write here: on the last close it becomes a version
//! ```
//!
//! Everything is asked of a [`Backend`]; this crate only maps FUSE requests to it.
//!
//! ## Locks
//! Every lock here is a leaf: the maps (`inodes`, `handles`, `incoming`, `recent`, `cow`,
//! `recent_cow`, `versions`, `data_bytes`) and each draft's [`Slot::state`]. A thread
//! takes one, copies out or changes what it needs, and lets it go before it takes any
//! other, so no two locks are ever held at once and no order between them can deadlock.
//! Map locks are never held across a call to the backend. A draft's state lock
//! serialises that draft's own operations (a write may wait for its blocks to be handed
//! over) but is never held across a commit or a discard: those take the draft out of its
//! slot first, so that every other handle sees it gone, and run with no lock held.
//! Whoever finds a slot whose draft is gone treats the slot as not there.
//!
//! ## Copy-on-write
//! Writing to `by_version/<uid>/data` starts an overlay: a draft over the version. Opens
//! of `data` made while an overlay is open share it (they read its unsaved writes) and,
//! once it is committed, read the version it became. Opens made before the overlay
//! existed read the original throughout. After the last writer's close the overlay is a
//! new version (`by_name/<name>/latest`) and new opens of `data` read the original
//! again, except in the process that wrote it: when that process opens `data` again
//! within a few seconds (fio writes, closes, and reopens the file to verify), it reads
//! the new version, and if it writes, it continues the overlay, and the version that
//! makes replaces the one before. `incoming/` files follow the same rule.

mod backend;

pub use backend::{Backend, DraftHandle, ImageHandle, ReadRef, VersionEntry};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How the filesystem treats writes.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Refuse every write with EROFS.
    pub read_only: bool,
    /// Keep copy-on-write writes only for the life of the mount (never a new version).
    pub discard_writes: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache names and attributes; versions created or removed
    /// by other processes show within this time.
    pub ttl: Duration,
    /// Let the kernel's page cache keep what is read from versions' `data` (fast
    /// re-reads, mmap). Off: reads are direct (no double caching under loop devices
    /// and VMs, which cache for themselves; large reads are served concurrently).
    pub page_cache: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            discard_writes: false,
            threads: 4,
            ttl: Duration::from_secs(1),
            page_cache: false,
        }
    }
}

const XATTR_LABEL: &str = "user.keepfs.label.";
const XATTR_SNAPSHOT: &str = "user.keepfs.snapshot";
/// Largest FUSE read and write requests negotiated with the kernel.
const MAX_IO: u32 = 1 << 20;
/// Zeros for replies that read sparse blocks.
static ZEROS: [u8; MAX_IO as usize] = [0; MAX_IO as usize];
// Incoming files are opened with direct I/O: their bytes go straight to the engine
// instead of also filling the page cache (which cost `cp` more than the copy itself).

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Field {
    Data,
    Name,
    Snapshot,
    Date,
    Size,
    BlockSize,
    Status,
    Protected,
    Labels,
}

const FIELDS: [(&str, Field); 9] = [
    ("data", Field::Data),
    ("name", Field::Name),
    ("snapshot", Field::Snapshot),
    ("date", Field::Date),
    ("size", Field::Size),
    ("block_size", Field::BlockSize),
    ("status", Field::Status),
    ("protected", Field::Protected),
    ("labels", Field::Labels),
];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    Root,
    ByVersion,
    ByName,
    Incoming,
    VersionDir(String),
    VersionFile(String, Field),
    NameDir(String),
    NameLink(String, String),
    Latest(String),
    IncomingFile(String),
}

/// Inode numbers, handed out on first sight and never reused during a mount.
#[derive(Default)]
struct Inodes {
    by_node: HashMap<Node, u64>,
    by_ino: HashMap<u64, Node>,
    next: u64,
}

impl Inodes {
    fn ino(&mut self, node: &Node) -> u64 {
        if let Some(i) = self.by_node.get(node) {
            return *i;
        }
        let ino = match node {
            Node::Root => 1,
            _ => {
                self.next = self.next.max(100) + 1;
                self.next
            }
        };
        self.by_node.insert(node.clone(), ino);
        self.by_ino.insert(ino, node.clone());
        ino
    }
}

/// What a draft holds beside the draft itself, under its slot's lock.
struct Shared {
    draft: Option<Box<dyn DraftHandle>>,
    writers: usize,
    /// Handles open on the file (readers too).
    opens: usize,
    /// Something was written or truncated since the draft started.
    dirty: bool,
    /// Bytes were written (not only a size set): an incoming file becomes a version only
    /// then, since tools such as qemu-img create and size the file, close it, and reopen
    /// it to write.
    written: bool,
    /// A continuation of a just-committed incoming backup (dropped if never written).
    continues: bool,
    /// The errno of a write or truncate that failed: the draft is then never committed
    /// (it would hold what the writer failed to write), only discarded.
    failed: Option<Errno>,
    /// The incoming file's name now (it may have been renamed since it was opened).
    name: String,
    created: Instant,
    /// The version this overlay became when committed: later writes through handles
    /// that shared the overlay continue it, and their reads see it.
    committed_as: Option<String>,
    /// The image read by handles whose overlay is gone.
    image: Option<Arc<dyn ImageHandle>>,
}

/// A draft shared by every handle that writes to the same file.
struct Slot {
    /// The draft's size, for `stat` without waiting for a writer.
    size: AtomicU64,
    state: Mutex<Shared>,
}

impl Slot {
    /// A slot for a new draft with `writers` writers among `opens` open handles.
    fn new(draft: Box<dyn DraftHandle>, name: &str, opens: usize, writers: usize) -> SharedDraft {
        Arc::new(Slot {
            size: AtomicU64::new(draft.size()),
            state: Mutex::new(Shared {
                draft: Some(draft),
                writers,
                opens,
                dirty: false,
                written: false,
                continues: false,
                failed: None,
                name: name.to_string(),
                created: Instant::now(),
                committed_as: None,
                image: None,
            }),
        })
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Runs a change on the live draft and records its outcome: the new size, and a
    /// failure that forbids the draft to become a version.
    fn change(&self, f: impl FnOnce(&mut dyn DraftHandle) -> io::Result<()>) -> Result<(), Errno> {
        let mut s = self.state.lock();
        if let Some(e) = s.failed {
            return Err(e);
        }
        let d = s.draft.as_mut().ok_or(Errno::EIO)?;
        let r = f(d.as_mut());
        self.size.store(d.size(), Ordering::Relaxed);
        match r {
            Ok(()) => {
                s.dirty = true;
                Ok(())
            }
            Err(e) => {
                let e = err(e);
                s.failed = Some(e);
                Err(e)
            }
        }
    }

    /// Takes the draft out if `pick` says so, leaving the slot dead for everyone else.
    fn take_if(&self, pick: impl FnOnce(&mut Shared) -> bool) -> Option<Box<dyn DraftHandle>> {
        let mut s = self.state.lock();
        if s.draft.is_some() && pick(&mut s) { s.draft.take() } else { None }
    }

    /// Counts one more handle on the slot; false when its draft is gone.
    fn attach(&self, writes: bool) -> bool {
        let mut s = self.state.lock();
        if s.draft.is_none() {
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
}

type SharedDraft = Arc<Slot>;

/// Drops a draft nobody will commit, logging a failure (the mount's log is the only
/// place that can show it).
fn discard(d: Box<dyn DraftHandle>) {
    if let Err(e) = d.discard() {
        eprintln!("keepfs: error: discarding an unused draft failed ({e})");
    }
}

/// Removes `slot` from `map` wherever it is listed (an incoming file may have been
/// renamed since the caller found it).
fn unlist(map: &Mutex<HashMap<String, SharedDraft>>, slot: &SharedDraft) {
    map.lock().retain(|_, d| !Arc::ptr_eq(d, slot));
}

/// How long a process that committed a draft by closing its file may reopen the file to
/// go on with it.
const CONTINUE_GRACE: Duration = Duration::from_secs(5);

enum Handle {
    Image(Arc<dyn ImageHandle>),
    /// A handle on a version's data while an overlay exists (reads see the overlay).
    /// `opener` is the process that opened the handle (see `KeepFs::finish_writer`).
    Cow {
        uid: String,
        draft: SharedDraft,
        writes: bool,
        opener: u32,
    },
    Incoming {
        draft: SharedDraft,
        writes: bool,
        opener: u32,
    },
    Static(Vec<u8>),
}

pub struct KeepFs<B: Backend> {
    backend: B,
    opts: MountOptions,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    incoming: Mutex<HashMap<String, SharedDraft>>,
    /// Incoming names committed a moment ago: name -> (version uid, committing process).
    recent: Mutex<HashMap<String, (String, u32, Instant)>>,
    cow: Mutex<HashMap<String, SharedDraft>>,
    /// Overlays committed a moment ago: original uid -> (new uid, committing process).
    recent_cow: Mutex<HashMap<String, (String, u32, Instant)>>,
    /// The versions listed last: when, the list, and a generation that each change bumps.
    versions: Mutex<(Option<Instant>, Arc<Vec<VersionEntry>>, u64)>,
    /// Bytes each version holds in non-sparse blocks (versions never change).
    data_bytes: Mutex<HashMap<String, u64>>,
    owner: (u32, u32),
    started: SystemTime,
}

fn err(e: io::Error) -> Errno {
    Errno::from(e)
}

fn is_write(flags: OpenFlags) -> bool {
    !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
}

impl<B: Backend> KeepFs<B> {
    pub fn new(backend: B, opts: MountOptions) -> KeepFs<B> {
        // SAFETY: getuid/getgid cannot fail.
        let owner = unsafe { (libc::getuid(), libc::getgid()) };
        KeepFs {
            backend,
            opts,
            inodes: Mutex::new(Inodes::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            incoming: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            cow: Mutex::new(HashMap::new()),
            recent_cow: Mutex::new(HashMap::new()),
            versions: Mutex::new((None, Arc::new(Vec::new()), 0)),
            data_bytes: Mutex::new(HashMap::new()),
            owner,
            started: SystemTime::now(),
        }
    }

    fn versions(&self) -> Result<Arc<Vec<VersionEntry>>, Errno> {
        let generation = {
            let v = self.versions.lock();
            if v.0.is_some_and(|t| t.elapsed() < self.opts.ttl) {
                return Ok(v.1.clone());
            }
            v.2
        };
        let list = Arc::new(self.backend.versions().map_err(err)?);
        let mut v = self.versions.lock();
        // A list fetched before a commit was forgotten must not be kept as fresh.
        if v.2 == generation {
            *v = (Some(Instant::now()), list.clone(), generation);
        }
        Ok(list)
    }

    fn forget_versions(&self) {
        let mut v = self.versions.lock();
        v.0 = None;
        v.2 += 1;
    }

    fn version(&self, uid: &str) -> Result<VersionEntry, Errno> {
        self.versions()?.iter().find(|v| v.uid == uid).cloned().ok_or(Errno::ENOENT)
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.lock().by_ino.get(&u64::from(ino)).cloned().ok_or(Errno::ENOENT)
    }

    fn ino(&self, node: &Node) -> u64 {
        self.inodes.lock().ino(node)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, perm: u16, mtime: SystemTime) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            flags: 0,
            blksize: MAX_IO,
        }
    }

    fn field_text(v: &VersionEntry, f: Field) -> Vec<u8> {
        let s = match f {
            Field::Data => return Vec::new(),
            Field::Name => v.name.clone(),
            Field::Snapshot => v.snapshot.clone(),
            Field::Date => v.date_text.clone(),
            Field::Size => v.size.to_string(),
            Field::BlockSize => v.block_size.to_string(),
            Field::Status => v.status.clone(),
            Field::Protected => if v.protected { "true" } else { "false" }.to_string(),
            Field::Labels => {
                let mut out = String::new();
                for (k, val) in &v.labels {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(val);
                    out.push('\n');
                }
                return out.into_bytes();
            }
        };
        format!("{s}\n").into_bytes()
    }

    fn incoming_slot(&self, name: &str) -> Option<SharedDraft> {
        self.incoming.lock().get(name).cloned()
    }

    fn cow_slot(&self, uid: &str) -> Option<SharedDraft> {
        self.cow.lock().get(uid).cloned()
    }

    /// What version `uid` occupies, for `st_blocks` (so that `cp`, `du` and `qemu-img`
    /// see a sparse version as sparse). Asked once per version: versions never change.
    fn data_bytes(&self, uid: &str) -> Result<u64, Errno> {
        if let Some(n) = self.data_bytes.lock().get(uid) {
            return Ok(*n);
        }
        let n = self.backend.data_bytes(uid).map_err(err)?;
        self.data_bytes.lock().insert(uid.to_string(), n);
        Ok(n)
    }

    fn getattr_node(&self, node: &Node) -> Result<FileAttr, Errno> {
        let ino = self.ino(node);
        let dir_perm = if self.opts.read_only { 0o555 } else { 0o755 };
        Ok(match node {
            Node::Root | Node::ByVersion | Node::ByName => self.attr(ino, FileType::Directory, 0, 0o555, self.started),
            Node::Incoming => self.attr(ino, FileType::Directory, 0, dir_perm, self.started),
            Node::VersionDir(uid) => {
                let v = self.version(uid)?;
                self.attr(ino, FileType::Directory, 0, 0o555, v.date)
            }
            Node::VersionFile(uid, Field::Data) => {
                let v = self.version(uid)?;
                let perm = if self.opts.read_only { 0o444 } else { 0o644 };
                match self.cow_slot(uid) {
                    // An overlay's blocks are all counted as data.
                    Some(d) => self.attr(ino, FileType::RegularFile, d.size(), perm, v.date),
                    None => {
                        let mut a = self.attr(ino, FileType::RegularFile, v.size, perm, v.date);
                        a.blocks = self.data_bytes(uid)?.div_ceil(512);
                        a
                    }
                }
            }
            Node::VersionFile(uid, f) => {
                let v = self.version(uid)?;
                self.attr(ino, FileType::RegularFile, Self::field_text(&v, *f).len() as u64, 0o444, v.date)
            }
            Node::NameDir(name) => {
                let vs = self.versions()?;
                let last = vs.iter().rev().find(|v| &v.name == name).ok_or(Errno::ENOENT)?;
                self.attr(ino, FileType::Directory, 0, 0o555, last.date)
            }
            Node::NameLink(name, uid) => {
                let v = self.version(uid)?;
                if &v.name != name {
                    return Err(Errno::ENOENT);
                }
                self.attr(ino, FileType::Symlink, link_target(uid).len() as u64, 0o777, v.date)
            }
            Node::Latest(name) => {
                let vs = self.versions()?;
                let last = vs.iter().rev().find(|v| &v.name == name).ok_or(Errno::ENOENT)?;
                self.attr(ino, FileType::Symlink, link_target(&last.uid).len() as u64, 0o777, last.date)
            }
            Node::IncomingFile(name) => {
                let d = self.incoming_slot(name).ok_or(Errno::ENOENT)?;
                self.attr(ino, FileType::RegularFile, d.size(), 0o644, SystemTime::now())
            }
        })
    }

    /// The version that `pid` committed from `key` within the grace period, if any.
    fn recently_committed(
        map: &Mutex<HashMap<String, (String, u32, Instant)>>,
        key: &str,
        pid: Option<u32>,
    ) -> Option<String> {
        let mut recent = map.lock();
        recent.retain(|_, (_, _, t)| t.elapsed() < CONTINUE_GRACE);
        recent.get(key).filter(|(_, committer, _)| pid == Some(*committer)).map(|(uid, _, _)| uid.clone())
    }

    /// A tool that closes the file it is writing into incoming/ and reopens it (qemu-img
    /// creates the file, writes a sector, closes it, then reopens it to convert) has made
    /// a version by its close. When the same process looks the name up again shortly
    /// after, the backup goes on: a draft over that version, which it replaces when
    /// committed. Anyone else sees the file gone, as after any commit.
    fn continue_recent(&self, name: &str, pid: Option<u32>) -> Result<(), Errno> {
        let uid = Self::recently_committed(&self.recent, name, pid).ok_or(Errno::ENOENT)?;
        let d = self.backend.continue_incoming(&uid).map_err(err)?;
        let slot = Slot::new(d, name, 0, 0);
        slot.state.lock().continues = true;
        let lost = {
            let mut inc = self.incoming.lock();
            if inc.contains_key(name) {
                Some(slot)
            } else {
                inc.insert(name.to_string(), slot);
                self.recent.lock().remove(name);
                None
            }
        };
        // Another thread of the same tool continued it first.
        if let Some(d) = lost.and_then(|s| s.take_if(|_| true)) {
            discard(d);
        }
        self.forget_versions();
        Ok(())
    }

    /// The kernel may still hold the name of a just-committed incoming file (entries are
    /// cached for the TTL), so a reopen can arrive as getattr/open on its old inode.
    fn continue_if_gone(&self, node: &Node, pid: u32) {
        if let Node::IncomingFile(name) = node
            && self.incoming_slot(name).is_none()
        {
            let _ = self.continue_recent(name, Some(pid));
        }
    }

    /// Drops continuations not written to within a few seconds (looked up or opened by
    /// the tool, which then did not write): the versions they continue stand.
    fn prune_continuations(&self) {
        let slots: Vec<SharedDraft> = self.incoming.lock().values().cloned().collect();
        for slot in slots {
            let stale =
                slot.take_if(|s| s.continues && s.writers == 0 && !s.written && s.created.elapsed() > CONTINUE_GRACE);
            if let Some(d) = stale {
                unlist(&self.incoming, &slot);
                discard(d);
            }
        }
    }

    fn child(&self, parent: &Node, name: &str, pid: Option<u32>) -> Result<Node, Errno> {
        let node = match parent {
            Node::Root => match name {
                "by_version" => Node::ByVersion,
                "by_name" => Node::ByName,
                "incoming" => Node::Incoming,
                _ => return Err(Errno::ENOENT),
            },
            Node::ByVersion => {
                self.version(name)?;
                Node::VersionDir(name.to_string())
            }
            Node::VersionDir(uid) => {
                let f = FIELDS.iter().find(|(n, _)| *n == name).ok_or(Errno::ENOENT)?.1;
                Node::VersionFile(uid.clone(), f)
            }
            Node::ByName => {
                if !self.versions()?.iter().any(|v| v.name == name) {
                    return Err(Errno::ENOENT);
                }
                Node::NameDir(name.to_string())
            }
            Node::NameDir(n) => {
                if name == "latest" {
                    Node::Latest(n.clone())
                } else {
                    Node::NameLink(n.clone(), name.to_string())
                }
            }
            Node::Incoming => {
                if self.incoming_slot(name).is_none() {
                    self.continue_recent(name, pid)?;
                }
                Node::IncomingFile(name.to_string())
            }
            _ => return Err(Errno::ENOTDIR),
        };
        self.getattr_node(&node)?;
        Ok(node)
    }

    fn children(&self, node: &Node) -> Result<Vec<(Node, FileType, String)>, Errno> {
        Ok(match node {
            Node::Root => vec![
                (Node::ByVersion, FileType::Directory, "by_version".into()),
                (Node::ByName, FileType::Directory, "by_name".into()),
                (Node::Incoming, FileType::Directory, "incoming".into()),
            ],
            Node::ByVersion => self
                .versions()?
                .iter()
                .map(|v| (Node::VersionDir(v.uid.clone()), FileType::Directory, v.uid.clone()))
                .collect(),
            Node::VersionDir(uid) => {
                self.version(uid)?;
                FIELDS
                    .iter()
                    .map(|(n, f)| (Node::VersionFile(uid.clone(), *f), FileType::RegularFile, n.to_string()))
                    .collect()
            }
            Node::ByName => {
                let mut names: Vec<String> = self.versions()?.iter().map(|v| v.name.clone()).collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| (Node::NameDir(n.clone()), FileType::Directory, n)).collect()
            }
            Node::NameDir(name) => {
                let vs = self.versions()?;
                let mut out: Vec<(Node, FileType, String)> = vs
                    .iter()
                    .filter(|v| &v.name == name)
                    .map(|v| (Node::NameLink(name.clone(), v.uid.clone()), FileType::Symlink, v.uid.clone()))
                    .collect();
                if !out.is_empty() {
                    out.push((Node::Latest(name.clone()), FileType::Symlink, "latest".into()));
                }
                out
            }
            Node::Incoming => {
                self.prune_continuations();
                let mut names: Vec<String> = self.incoming.lock().keys().cloned().collect();
                names.sort();
                names.into_iter().map(|n| (Node::IncomingFile(n.clone()), FileType::RegularFile, n)).collect()
            }
            _ => return Err(Errno::ENOTDIR),
        })
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&u64::from(fh)).cloned().ok_or(Errno::EBADF)
    }

    /// Commits a draft when its last writer goes. The last release always does; a flush
    /// (every close(2), which waits for it) does when it comes from the process that
    /// opened the handle and the draft was written to, so that `cp` returns once the
    /// version exists, or fails with the errno. A flush is not a last close: dd dup2()s
    /// its output and closes the original before writing, and a forked child closes its
    /// inherited copy; neither may cut a draft off. A draft whose write failed is never
    /// committed: the last close discards it and answers the write's errno.
    fn finish_writer(&self, h: &Handle, flush_pid: Option<u32>) -> Result<(), Errno> {
        let at_release = flush_pid.is_none();
        let (slot, opener, cow_of) = match h {
            Handle::Incoming { draft, writes: true, opener } => (draft, *opener, None),
            Handle::Cow { uid, draft, writes: true, opener } if !self.opts.discard_writes => {
                (draft, *opener, Some(uid))
            }
            _ => return Ok(()),
        };
        let closing = at_release || flush_pid == Some(opener);
        let mut failed = None;
        let mut commit = false;
        let mut name = String::new();
        let taken = slot.take_if(|s| {
            if s.writers != 1 {
                return false;
            }
            name = s.name.clone();
            failed = s.failed;
            commit = closing && failed.is_none() && if cow_of.is_some() { s.dirty } else { s.written };
            // A draft nobody wrote (or whose write failed) goes at the last release; one
            // that was written goes at the closing flush.
            commit || (closing && failed.is_some()) || (at_release && cow_of.is_some())
        });
        let Some(d) = taken else { return Ok(()) };
        unlist(if cow_of.is_some() { &self.cow } else { &self.incoming }, slot);
        if !commit {
            d.discard().map_err(err)?;
            return failed.map_or(Ok(()), Err);
        }
        let r = d.commit();
        self.forget_versions();
        let new_uid = r.map_err(err)?;
        {
            let mut s = slot.state.lock();
            s.committed_as = Some(new_uid.clone());
            s.image = None;
        }
        let (map, key) = match cow_of {
            Some(uid) => (&self.recent_cow, uid.clone()),
            None => (&self.recent, name),
        };
        map.lock().insert(key, (new_uid, opener, Instant::now()));
        Ok(())
    }

    /// What a handle whose draft is gone reads: the version the draft became, or for an
    /// overlay nobody committed, the original.
    fn after_draft(&self, h: &Handle) -> Result<Arc<dyn ImageHandle>, Errno> {
        let (slot, original) = match h {
            Handle::Cow { uid, draft, .. } => (draft, Some(uid)),
            Handle::Incoming { draft, .. } => (draft, None),
            _ => return Err(Errno::EBADF),
        };
        let uid = {
            let s = slot.state.lock();
            if let Some(img) = &s.image {
                return Ok(img.clone());
            }
            s.committed_as.clone().or_else(|| original.cloned()).ok_or(Errno::ENOENT)?
        };
        let img = self.backend.open_image(&uid).map_err(err)?;
        slot.state.lock().image = Some(img.clone());
        Ok(img)
    }

    /// Opens a version's `data`: the live overlay if there is one; otherwise for reading
    /// the version (or the one this process made of it a moment ago), and for writing a
    /// new overlay (or the continuation of the one this process just committed).
    fn open_data(&self, uid: String, writes: bool, opener: u32) -> Result<(u64, FopenFlags), Errno> {
        // Overlay bytes must never sit in the page cache of this inode: once the overlay
        // becomes a version, the file is the original again.
        let cow_handle = |slot| {
            (
                self.add_handle(Handle::Cow { uid: uid.clone(), draft: slot, writes, opener }),
                FopenFlags::FOPEN_DIRECT_IO,
            )
        };
        // Each round either attaches, or removes a dead slot, or inserts a new one; only
        // racing openers make it go round more than twice.
        for _ in 0..64 {
            if let Some(slot) = self.cow_slot(&uid) {
                if slot.attach(writes) {
                    return Ok(cow_handle(slot));
                }
                // Committed or discarded a moment ago: on its way out of the map.
                unlist(&self.cow, &slot);
                continue;
            }
            let continued = Self::recently_committed(&self.recent_cow, &uid, Some(opener));
            if !writes {
                let img = self.backend.open_image(continued.as_deref().unwrap_or(&uid)).map_err(err)?;
                let flags = if self.opts.page_cache && continued.is_none() {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::FOPEN_DIRECT_IO
                };
                return Ok((self.add_handle(Handle::Image(img)), flags));
            }
            let d = match &continued {
                Some(v) => self.backend.continue_cow(v),
                None => self.backend.new_cow(&uid),
            }
            .map_err(err)?;
            let slot = Slot::new(d, "", 1, 1);
            if let Some(v) = continued {
                slot.state.lock().committed_as = Some(v);
            }
            let lost = {
                let mut cow = self.cow.lock();
                if cow.contains_key(&uid) {
                    true
                } else {
                    cow.insert(uid.clone(), slot.clone());
                    false
                }
            };
            if !lost {
                return Ok(cow_handle(slot));
            }
            if let Some(d) = slot.take_if(|_| true) {
                discard(d);
            }
        }
        Err(Errno::EBUSY)
    }

    fn valid_new_name(name: &str) -> Result<(), Errno> {
        if name.is_empty() || name.len() > 255 || name.starts_with('.') && name.len() <= 2 {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }
}

fn link_target(uid: &str) -> String {
    format!("../../by_version/{uid}")
}

impl<B: Backend> Filesystem for KeepFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // A large direct read or write is split into requests served concurrently.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_readahead(MAX_IO).or_else(|max| config.set_max_readahead(max));
        self.inodes.lock().ino(&Node::Root);
        Ok(())
    }

    fn destroy(&mut self) {
        // Continuations nobody wrote to: the versions they continue stand.
        let incoming: Vec<SharedDraft> = self.incoming.lock().drain().map(|(_, d)| d).collect();
        for slot in incoming {
            if let Some(d) = slot.take_if(|s| s.continues && !s.written) {
                discard(d);
            }
        }
        // Overlays kept only for the life of the mount go with it.
        let cow: Vec<SharedDraft> = self.cow.lock().drain().map(|(_, d)| d).collect();
        for slot in cow {
            if let Some(d) = slot.take_if(|_| true) {
                discard(d);
            }
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.node(parent).and_then(|p| {
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let node = self.child(&p, name, Some(req.pid()))?;
            self.getattr_node(&node)
        });
        match r {
            Ok(attr) => reply.entry(&self.opts.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| {
            self.continue_if_gone(&n, req.pid());
            self.getattr_node(&n)
        }) {
            Ok(attr) => reply.attr(&self.opts.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.node(ino).and_then(|node| {
            if let Some(size) = size {
                if self.opts.read_only {
                    return Err(Errno::EROFS);
                }
                let slot = match &node {
                    Node::IncomingFile(name) => self.incoming_slot(name),
                    Node::VersionFile(uid, Field::Data) => self.cow_slot(uid),
                    _ => None,
                };
                slot.ok_or(Errno::EPERM)?.change(|d| d.set_size(size))?;
            }
            // Modes, owners and times are fixed; accept and ignore (cp -p, touch).
            self.getattr_node(&node)
        });
        match r {
            Ok(attr) => reply.attr(&self.opts.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.node(ino).and_then(|n| match n {
            Node::NameLink(_, uid) => Ok(link_target(&uid)),
            Node::Latest(name) => {
                let vs = self.versions()?;
                let last = vs.iter().rev().find(|v| v.name == name).ok_or(Errno::ENOENT)?;
                Ok(link_target(&last.uid))
            }
            _ => Err(Errno::EINVAL),
        });
        match r {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(if self.opts.read_only { Errno::EROFS } else { Errno::EPERM });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.node(parent).and_then(|p| {
            if p != Node::Incoming {
                // Removing versions is `keepfs rm`'s job (protection, minimum age, locks).
                return Err(if self.opts.read_only { Errno::EROFS } else { Errno::EPERM });
            }
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let slot = self.incoming_slot(name).ok_or(Errno::ENOENT)?;
            let mut busy = false;
            let taken = slot.take_if(|s| {
                busy = s.opens > 0;
                !busy
            });
            if busy {
                return Err(Errno::EBUSY);
            }
            unlist(&self.incoming, &slot);
            match taken {
                Some(d) => d.discard().map_err(err),
                None => Err(Errno::ENOENT),
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(if self.opts.read_only { Errno::EROFS } else { Errno::EPERM });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        // Only within incoming/ (tools that write a temporary name and rename it).
        let r = (|| {
            let (p, np) = (self.node(parent)?, self.node(newparent)?);
            if p != Node::Incoming || np != Node::Incoming {
                return Err(if self.opts.read_only { Errno::EROFS } else { Errno::EPERM });
            }
            let (from, to) = (name.to_str().ok_or(Errno::ENOENT)?, newname.to_str().ok_or(Errno::EINVAL)?);
            Self::valid_new_name(to)?;
            let slot = {
                let mut inc = self.incoming.lock();
                if inc.contains_key(to) {
                    return Err(Errno::EEXIST);
                }
                let slot = inc.remove(from).ok_or(Errno::ENOENT)?;
                inc.insert(to.to_string(), slot.clone());
                slot
            };
            // The name is taken in the map first, then given to the draft (which records
            // it in the database) with no map lock held.
            let renamed = {
                let mut s = slot.state.lock();
                match s.draft.as_mut() {
                    Some(d) => {
                        let r = d.set_name(to);
                        if r.is_ok() {
                            s.name = to.to_string();
                        }
                        Some(r)
                    }
                    None => None,
                }
            };
            match renamed {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => {
                    let mut inc = self.incoming.lock();
                    if inc.get(to).is_some_and(|d| Arc::ptr_eq(d, &slot)) && !inc.contains_key(from) {
                        inc.remove(to);
                        inc.insert(from.to_string(), slot);
                    }
                    Err(err(e))
                }
                // Committed or discarded meanwhile: it is gone.
                None => {
                    unlist(&self.incoming, &slot);
                    Err(Errno::ENOENT)
                }
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opener = req.pid();
        let writes = is_write(flags);
        let r = self.node(ino).and_then(|node| match node {
            Node::VersionFile(uid, Field::Data) => {
                if writes && self.opts.read_only {
                    return Err(Errno::EROFS);
                }
                self.open_data(uid, writes, opener)
            }
            Node::VersionFile(uid, f) => {
                if writes {
                    return Err(if self.opts.read_only { Errno::EROFS } else { Errno::EACCES });
                }
                let v = self.version(&uid)?;
                Ok((self.add_handle(Handle::Static(Self::field_text(&v, f))), FopenFlags::empty()))
            }
            Node::IncomingFile(name) => {
                if writes && self.opts.read_only {
                    return Err(Errno::EROFS);
                }
                self.continue_if_gone(&Node::IncomingFile(name.clone()), opener);
                let slot = self.incoming_slot(&name).ok_or(Errno::ENOENT)?;
                if !slot.attach(writes) {
                    return Err(Errno::ENOENT);
                }
                Ok((self.add_handle(Handle::Incoming { draft: slot, writes, opener }), FopenFlags::FOPEN_DIRECT_IO))
            }
            _ => Err(Errno::EISDIR),
        });
        match r {
            Ok((fh, flags)) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = (|| {
            if self.opts.read_only {
                return Err(Errno::EROFS);
            }
            if self.node(parent)? != Node::Incoming {
                return Err(Errno::EPERM);
            }
            let name = name.to_str().ok_or(Errno::EINVAL)?;
            Self::valid_new_name(name)?;
            if self.incoming_slot(name).is_some() {
                return Err(Errno::EEXIST);
            }
            // The draft is started with no lock held; a racing create of the same name
            // that lists its draft first wins, and this one is dropped.
            let d = self.backend.new_incoming(name).map_err(err)?;
            let writes = is_write(OpenFlags(flags));
            let slot = Slot::new(d, name, 1, usize::from(writes));
            let lost = {
                let mut inc = self.incoming.lock();
                if inc.contains_key(name) {
                    true
                } else {
                    inc.insert(name.to_string(), slot.clone());
                    false
                }
            };
            if lost {
                if let Some(d) = slot.take_if(|_| true) {
                    discard(d);
                }
                return Err(Errno::EEXIST);
            }
            let node = Node::IncomingFile(name.to_string());
            let attr = self.getattr_node(&node)?;
            let fh = self.add_handle(Handle::Incoming { draft: slot, writes, opener: req.pid() });
            Ok((attr, fh))
        })();
        match r {
            Ok((attr, fh)) => {
                reply.created(&self.opts.ttl, &attr, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel answers the other kinds itself): a version's
    /// image reports its sparse blocks as holes, so `cp`, `qemu-img convert` and a keepfs
    /// backup of a mounted image skip them; a file being written is all data.
    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let r = (|| -> Result<i64, Errno> {
            let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
            let h = self.handle(fh)?;
            let (size, data) = match &*h {
                Handle::Image(img) => (img.size(), img.next_data(offset)),
                Handle::Cow { draft, .. } | Handle::Incoming { draft, .. } => {
                    if draft.state.lock().draft.is_some() {
                        let size = draft.size();
                        (size, (offset < size).then_some(offset..size))
                    } else {
                        let img = self.after_draft(&h)?;
                        (img.size(), img.next_data(offset))
                    }
                }
                Handle::Static(bytes) => {
                    let size = bytes.len() as u64;
                    (size, (offset < size).then_some(offset..size))
                }
            };
            if offset >= size {
                return Err(Errno::ENXIO);
            }
            let found = match (whence, data) {
                (libc::SEEK_DATA, Some(d)) => d.start.max(offset),
                (libc::SEEK_DATA, None) => return Err(Errno::ENXIO),
                (libc::SEEK_HOLE, Some(d)) if d.start <= offset => d.end,
                (libc::SEEK_HOLE, _) => offset,
                _ => return Err(Errno::EINVAL),
            };
            i64::try_from(found).map_err(|_| Errno::EOVERFLOW)
        })();
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Reads of a version's image inside one block are answered from the cached
        // block itself (or static zeros): no allocation and no copy on this side.
        if let Ok(h) = self.handle(fh)
            && let Handle::Image(img) = &*h
        {
            match img.read_ref(offset, size as usize) {
                Ok(Some(ReadRef::Shared(block, range))) => return reply.data(&(*block).as_ref()[range]),
                Ok(Some(ReadRef::Zeros(n))) if n <= ZEROS.len() => return reply.data(&ZEROS[..n]),
                Ok(_) => {}
                Err(e) => return reply.error(err(e)),
            }
        }
        let r = self.handle(fh).and_then(|h| {
            let mut buf = vec![0u8; size as usize];
            let n = match &*h {
                Handle::Image(img) => img.read_at(offset, &mut buf).map_err(err)?,
                Handle::Incoming { draft, .. } | Handle::Cow { draft, .. } => {
                    let mut s = draft.state.lock();
                    match s.draft.as_mut() {
                        Some(d) => d.read_at(offset, &mut buf).map_err(err)?,
                        None => {
                            drop(s);
                            self.after_draft(&h)?.read_at(offset, &mut buf).map_err(err)?
                        }
                    }
                }
                Handle::Static(bytes) => {
                    let start = (offset as usize).min(bytes.len());
                    let n = (bytes.len() - start).min(buf.len());
                    buf[..n].copy_from_slice(&bytes[start..start + n]);
                    n
                }
            };
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.handle(fh).and_then(|h| match &*h {
            Handle::Incoming { draft, writes: true, .. } => {
                draft.change(|d| d.write_at(offset, data))?;
                draft.state.lock().written = true;
                Ok(())
            }
            Handle::Cow { uid, draft, writes: true, .. } => {
                let relist = {
                    let mut s = draft.state.lock();
                    if s.draft.is_none() {
                        // Written again after its overlay became a version: that version
                        // is continued (and replaced), so no write is lost.
                        let d = match &s.committed_as {
                            Some(v) => self.backend.continue_cow(v),
                            None => self.backend.new_cow(uid),
                        };
                        s.draft = Some(d.map_err(err)?);
                        s.image = None;
                        true
                    } else {
                        false
                    }
                };
                if relist {
                    self.cow.lock().entry(uid.clone()).or_insert_with(|| draft.clone());
                }
                draft.change(|d| d.write_at(offset, data))
            }
            _ => Err(Errno::EBADF),
        });
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) waits for this: committing here means `cp` returns once the version
        // exists (or fails if it could not be made).
        match self.handle(fh).and_then(|h| self.finish_writer(&h, Some(req.pid()))) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Data becomes durable when the version is committed on the last close.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.handles.lock().remove(&u64::from(fh));
        if let Some(h) = h {
            // A writer that never flushed (it was killed) still commits what it wrote
            // only when it was the last one; otherwise the draft waits for the others.
            if let Err(e) = self.finish_writer(&h, None) {
                eprintln!("keepfs: error: committing on the last close failed ({e:?})");
            }
            if let Handle::Cow { draft, writes, .. } | Handle::Incoming { draft, writes, .. } = &*h {
                draft.detach(*writes);
            }
        }
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = self.node(ino).and_then(|node| {
            let mut entries = vec![(ino.into(), FileType::Directory, ".".to_string())];
            entries.push((1, FileType::Directory, "..".to_string()));
            for (n, kind, name) in self.children(&node)? {
                entries.push((self.ino(&n), kind, name));
            }
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, MAX_IO, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.node(ino).and_then(|node| {
            let Node::IncomingFile(file) = node else {
                return Err(if self.opts.read_only { Errno::EROFS } else { Errno::ENOTSUP });
            };
            let slot = self.incoming_slot(&file).ok_or(Errno::ENOENT)?;
            let mut s = slot.state.lock();
            let draft = s.draft.as_mut().ok_or(Errno::ENOENT)?;
            let name = name.to_str().ok_or(Errno::ENOTSUP)?;
            let value = std::str::from_utf8(value).map_err(|_| Errno::EINVAL)?;
            if let Some(label) = name.strip_prefix(XATTR_LABEL) {
                draft.set_label(label, value).map_err(err)
            } else if name == XATTR_SNAPSHOT {
                draft.set_snapshot(value).map_err(err)
            } else {
                Err(Errno::ENOTSUP)
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.node(ino).and_then(|node| {
            let Node::IncomingFile(file) = node else { return Err(Errno::ENODATA) };
            let slot = self.incoming_slot(&file).ok_or(Errno::ENOENT)?;
            let s = slot.state.lock();
            let draft = s.draft.as_ref().ok_or(Errno::ENOENT)?;
            let name = name.to_str().ok_or(Errno::ENODATA)?;
            if let Some(label) = name.strip_prefix(XATTR_LABEL) {
                draft.labels().into_iter().find(|(k, _)| k == label).map(|(_, v)| v.into_bytes()).ok_or(Errno::ENODATA)
            } else if name == XATTR_SNAPSHOT {
                Ok(draft.snapshot().into_bytes())
            } else {
                Err(Errno::ENODATA)
            }
        });
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut out = Vec::new();
        if let Ok(Node::IncomingFile(file)) = self.node(ino)
            && let Some(slot) = self.incoming_slot(&file)
            && let Some(draft) = slot.state.lock().draft.as_ref()
        {
            for (k, _) in draft.labels() {
                out.extend_from_slice(format!("{XATTR_LABEL}{k}").as_bytes());
                out.push(0);
            }
            out.extend_from_slice(XATTR_SNAPSHOT.as_bytes());
            out.push(0);
        }
        if size == 0 {
            reply.size(out.len() as u32);
        } else if out.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&out);
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.node(ino).and_then(|node| {
            let Node::IncomingFile(file) = node else { return Err(Errno::ENODATA) };
            let slot = self.incoming_slot(&file).ok_or(Errno::ENOENT)?;
            let mut s = slot.state.lock();
            let draft = s.draft.as_mut().ok_or(Errno::ENOENT)?;
            let label = name.to_str().and_then(|n| n.strip_prefix(XATTR_LABEL)).ok_or(Errno::ENODATA)?;
            if draft.remove_label(label) { Ok(()) } else { Err(Errno::ENODATA) }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Mounts `backend` at `mountpoint`, calls `mounted` once the kernel mount exists, and
/// serves requests until the filesystem is unmounted.
pub fn mount<B: Backend>(backend: B, mountpoint: &Path, opts: MountOptions, mounted: impl FnOnce()) -> io::Result<()> {
    let config = fuse_config(&opts);
    let session = fuser::Session::new(KeepFs::new(backend, opts), mountpoint, &config)?;
    mounted();
    session.run()
}

fn fuse_config(opts: &MountOptions) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("keepfs".into()),
        fuser::MountOption::Subtype("keepfs".into()),
        fuser::MountOption::NoAtime,
    ];
    if opts.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    config
}
