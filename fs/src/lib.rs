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
//! Everything is asked of the engine's session service ([`Sessions`]), which owns the
//! rules that turn writes into versions (shared drafts, commit on the last close,
//! continuations for tools that close and reopen, copy-on-write; see `keepfs::session`
//! and docs/fuse.md). This crate only maps FUSE requests and inodes to it.
//!
//! ## Locks
//! `inodes`, `statics` and `cache` are leaf locks: taken, used and let go before anything
//! else is taken or called. The session service takes its own locks the same way.

pub use keepfs_face::{Opened, ReadRef, Sessions, VersionEntry};

use keepfs_face::log;

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
use std::time::{Duration, SystemTime};

/// How the filesystem treats writes.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Refuse every write with EROFS.
    pub read_only: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// How long the kernel may cache names and attributes; versions created or removed
    /// by other processes show within this time.
    pub ttl: Duration,
    /// Let the kernel's page cache keep what is read from versions' `data` (fast
    /// re-reads, mmap), writers' handles included where no reader of the original could
    /// see their pages (`CachePolicy`). Off: reads are direct (no double caching under loop
    /// devices and VMs, which cache for themselves; large reads are served concurrently).
    pub page_cache: bool,
    /// Let other users than the mount's owner in (FUSE `allow_other`); the kernel then
    /// checks the owner and modes below (`default_permissions`).
    pub allow_other: bool,
    /// Owner, group and mode of the files (directories get search permission where
    /// they are readable); `None`: the mount process's owner, 0644 / 0755.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u16>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            uid: None,
            gid: None,
            mode: None,
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

    /// A node renamed: its inode follows it (the kernel keeps using that inode for the
    /// file, and its open descriptors), and the inode of a file it replaced is gone.
    fn rename(&mut self, from: &Node, to: &Node) {
        if let Some(replaced) = self.by_node.remove(to) {
            self.by_ino.remove(&replaced);
        }
        if let Some(ino) = self.by_node.remove(from) {
            self.by_node.insert(to.clone(), ino);
            self.by_ino.insert(ino, to.clone());
        }
    }
}

/// Handles of metadata files have this bit set; all others are the session service's.
const STATIC_FH: u64 = 1 << 63;

/// With `--page-cache`, which open of a version's `data` may use the kernel's page cache.
///
/// The page cache belongs to the inode, which every handle of the file shares, while an
/// overlay's bytes are only its handles' view (writers, and every handle opened while an
/// overlay is open, which the session service attaches to it). Two rules keep every
/// handle's view right:
/// - **Never mix cached and direct handles of one overlay.** On Linux 6.1 a direct write
///   neither invalidates nor writes back another handle's cached pages. So the first
///   handle of an overlay decides for all its handles: cached when no handle of the
///   original is open (the original's readers would otherwise read the overlay's pages),
///   direct otherwise. While a cached overlay is open, a handle of the original (another
///   process than a continuation's owner) reads directly.
/// - **Once a version has had an overlay, its pages are stale** for the original (a
///   cached overlay filled them; a private mapping of a direct overlay handle reads
///   through them too), so every later cached open of the original goes without
///   FOPEN_KEEP_CACHE, which makes the kernel drop the inode's pages before that handle's
///   first read. Versions that never had an overlay keep their pages (FOPEN_KEEP_CACHE).
///
/// A release may reach the daemon after the next open; until it does, the handle counts as
/// open, which only makes the next decision more cautious.
#[derive(Default)]
struct CachePolicy {
    by_uid: HashMap<String, CacheUse>,
    /// Open handles of `data`: their version and whether they are overlay handles.
    by_fh: HashMap<u64, (String, bool)>,
}

#[derive(Default)]
struct CacheUse {
    /// Open handles of the original.
    plain: usize,
    /// Open overlay handles, and whether they use the page cache.
    overlay: usize,
    overlay_cached: bool,
    stale: bool,
}

impl CachePolicy {
    fn open(&mut self, uid: &str, fh: u64, overlay: bool) -> FopenFlags {
        let u = self.by_uid.entry(uid.to_string()).or_default();
        let flags = if overlay {
            if u.overlay == 0 {
                u.overlay_cached = u.plain == 0;
            }
            u.overlay += 1;
            u.stale = true;
            if u.overlay_cached { FopenFlags::empty() } else { FopenFlags::FOPEN_DIRECT_IO }
        } else {
            u.plain += 1;
            if u.overlay > 0 && u.overlay_cached {
                FopenFlags::FOPEN_DIRECT_IO
            } else if u.stale {
                FopenFlags::empty()
            } else {
                FopenFlags::FOPEN_KEEP_CACHE
            }
        };
        self.by_fh.insert(fh, (uid.to_string(), overlay));
        flags
    }

    fn release(&mut self, fh: u64) {
        let Some((uid, overlay)) = self.by_fh.remove(&fh) else { return };
        if let Some(u) = self.by_uid.get_mut(&uid) {
            if overlay {
                u.overlay = u.overlay.saturating_sub(1);
            } else {
                u.plain = u.plain.saturating_sub(1);
            }
            if u.plain == 0 && u.overlay == 0 && !u.stale {
                self.by_uid.remove(&uid);
            }
        }
    }
}

pub struct KeepFs<S: Sessions> {
    sessions: Arc<S>,
    opts: MountOptions,
    inodes: Mutex<Inodes>,
    /// Open metadata files (`name`, `size`, …): their bytes, fixed at open.
    statics: Mutex<HashMap<u64, Vec<u8>>>,
    next_static: AtomicU64,
    /// With `--page-cache`: which handles of each version's `data` use the page cache.
    cache: Mutex<CachePolicy>,
    owner: (u32, u32),
    started: SystemTime,
}

fn err(e: io::Error) -> Errno {
    Errno::from(e)
}

fn is_write(flags: OpenFlags) -> bool {
    !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
}

impl<S: Sessions> KeepFs<S> {
    pub fn new(sessions: Arc<S>, opts: MountOptions) -> KeepFs<S> {
        // SAFETY: getuid/getgid cannot fail.
        let me = unsafe { (libc::getuid(), libc::getgid()) };
        let owner = (opts.uid.unwrap_or(me.0), opts.gid.unwrap_or(me.1));
        KeepFs {
            sessions,
            opts,
            inodes: Mutex::new(Inodes::default()),
            statics: Mutex::new(HashMap::new()),
            next_static: AtomicU64::new(1),
            cache: Mutex::new(CachePolicy::default()),
            owner,
            started: SystemTime::now(),
        }
    }

    fn versions(&self) -> Result<Arc<Vec<VersionEntry>>, Errno> {
        self.sessions.versions().map_err(err)
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

    /// Modes: (writable file, read-only file, writable directory, read-only directory),
    /// from `--mode` (directories searchable where readable) or 0644 / 0755; a read-only
    /// mount has no write bits.
    fn modes(&self) -> (u16, u16, u16, u16) {
        let file = self.opts.mode.unwrap_or(0o644) & 0o666;
        let dir = file | ((file & 0o444) >> 2);
        let ro = |m: u16| m & !0o222;
        if self.opts.read_only { (ro(file), ro(file), ro(dir), ro(dir)) } else { (file, ro(file), dir, ro(dir)) }
    }

    fn getattr_node(&self, node: &Node) -> Result<FileAttr, Errno> {
        let ino = self.ino(node);
        let (file_perm, ro_file, dir_perm, ro_dir) = self.modes();
        Ok(match node {
            Node::Root | Node::ByVersion | Node::ByName => self.attr(ino, FileType::Directory, 0, ro_dir, self.started),
            Node::Incoming => self.attr(ino, FileType::Directory, 0, dir_perm, self.started),
            Node::VersionDir(uid) => {
                let v = self.version(uid)?;
                self.attr(ino, FileType::Directory, 0, ro_dir, v.date)
            }
            Node::VersionFile(uid, Field::Data) => {
                let v = self.version(uid)?;
                let perm = file_perm;
                match self.sessions.overlay_size(uid) {
                    // An overlay's blocks are all counted as data.
                    Some(size) => self.attr(ino, FileType::RegularFile, size, perm, v.date),
                    None => {
                        // st_blocks from the stored blocks, so that `cp`, `du` and
                        // `qemu-img` see a sparse version as sparse.
                        let mut a = self.attr(ino, FileType::RegularFile, v.size, perm, v.date);
                        a.blocks = self.sessions.data_bytes(uid).map_err(err)?.div_ceil(512);
                        a
                    }
                }
            }
            Node::VersionFile(uid, f) => {
                let v = self.version(uid)?;
                self.attr(ino, FileType::RegularFile, Self::field_text(&v, *f).len() as u64, ro_file, v.date)
            }
            Node::NameDir(name) => {
                let vs = self.versions()?;
                let last = vs.iter().rev().find(|v| &v.name == name).ok_or(Errno::ENOENT)?;
                self.attr(ino, FileType::Directory, 0, ro_dir, last.date)
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
                let size = self.sessions.incoming_size(name).ok_or(Errno::ENOENT)?;
                self.attr(ino, FileType::RegularFile, size, file_perm, SystemTime::now())
            }
        })
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
                // A tool that reopens what it just committed continues it (qemu-img).
                if !self.sessions.incoming_exists(name, pid) {
                    return Err(Errno::ENOENT);
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
            Node::Incoming => self
                .sessions
                .incoming_names()
                .into_iter()
                .map(|n| (Node::IncomingFile(n.clone()), FileType::RegularFile, n))
                .collect(),
            _ => return Err(Errno::ENOTDIR),
        })
    }

    fn add_static(&self, bytes: Vec<u8>) -> u64 {
        let fh = STATIC_FH | self.next_static.fetch_add(1, Ordering::Relaxed);
        self.statics.lock().insert(fh, bytes);
        fh
    }

    fn refuse_write(&self) -> Errno {
        if self.opts.read_only { Errno::EROFS } else { Errno::EPERM }
    }
}

fn link_target(uid: &str) -> String {
    format!("../../by_version/{uid}")
}

impl<S: Sessions> Filesystem for KeepFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // A large direct read or write is split into requests served concurrently.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_readahead(MAX_IO).or_else(|max| config.set_max_readahead(max));
        self.inodes.lock().ino(&Node::Root);
        Ok(())
    }

    fn destroy(&mut self) {
        self.sessions.shutdown();
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
            // The kernel may still hold the name of a just-committed incoming file
            // (entries are cached for the TTL): a reopen can arrive on its old inode.
            if let Node::IncomingFile(name) = &n {
                self.sessions.incoming_exists(name, Some(req.pid()));
            }
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
                match &node {
                    Node::IncomingFile(name) => self.sessions.resize_incoming(name, size).map_err(err)?,
                    Node::VersionFile(uid, Field::Data) => self.sessions.resize_overlay(uid, size).map_err(err)?,
                    _ => return Err(self.refuse_write()),
                }
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
        reply.error(self.refuse_write());
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.node(parent).and_then(|p| {
            if p != Node::Incoming {
                // Removing versions is `keepfs rm`'s job (protection, minimum age, locks).
                return Err(self.refuse_write());
            }
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            self.sessions.remove_incoming(name).map_err(err)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write());
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
                return Err(self.refuse_write());
            }
            // The session service checks the new name (the engine's one rule for names).
            let (from, to) = (name.to_str().ok_or(Errno::ENOENT)?, newname.to_str().ok_or(Errno::EINVAL)?);
            self.sessions.rename_incoming(from, to).map_err(err)?;
            // An open descriptor of the file stays the file's under its new name (fstat,
            // ftruncate on it answered ENOENT, and a truncate was lost; found by a drill).
            self.inodes.lock().rename(&Node::IncomingFile(from.to_string()), &Node::IncomingFile(to.to_string()));
            Ok(())
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
                let o = self.sessions.open_version(&uid, writes, opener).map_err(err)?;
                // An overlay's bytes must never be seen from the page cache by a handle
                // of the original: see `CachePolicy`.
                let flags = if self.opts.page_cache {
                    self.cache.lock().open(&uid, o.fh, writes || o.volatile)
                } else {
                    FopenFlags::FOPEN_DIRECT_IO
                };
                Ok((o.fh, flags))
            }
            Node::VersionFile(uid, f) => {
                if writes {
                    return Err(if self.opts.read_only { Errno::EROFS } else { Errno::EACCES });
                }
                let v = self.version(&uid)?;
                Ok((self.add_static(Self::field_text(&v, f)), FopenFlags::empty()))
            }
            // Incoming files use direct I/O: their bytes go straight to the engine
            // instead of also filling the page cache (which cost `cp` more than the copy).
            Node::IncomingFile(name) => {
                Ok((self.sessions.open_incoming(&name, writes, opener).map_err(err)?, FopenFlags::FOPEN_DIRECT_IO))
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
            if self.node(parent)? != Node::Incoming {
                return Err(self.refuse_write());
            }
            let name = name.to_str().ok_or(Errno::EINVAL)?;
            let fh = self.sessions.create_incoming(name, is_write(OpenFlags(flags)), req.pid()).map_err(err)?;
            match self.getattr_node(&Node::IncomingFile(name.to_string())) {
                Ok(attr) => Ok((attr, fh)),
                Err(e) => {
                    // Renamed away meanwhile: the kernel gets no handle, so let it go.
                    let _ = self.sessions.release(fh);
                    Err(e)
                }
            }
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
    /// backup of a mounted image skip them; so are the blocks of a file being
    /// written that nothing was written to.
    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let r = (|| -> Result<i64, Errno> {
            let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
            let fh = u64::from(fh);
            let (size, data) = if fh & STATIC_FH != 0 {
                let size = self.statics.lock().get(&fh).ok_or(Errno::EBADF)?.len() as u64;
                (size, (offset < size).then_some(offset..size))
            } else {
                // SEEK_HOLE finds the real end of the data, however far; SEEK_DATA needs
                // only where it starts.
                let until = if whence == libc::SEEK_HOLE { u64::MAX } else { offset.saturating_add(1) };
                let e = self.sessions.extent(fh, offset, until).map_err(err)?;
                (e.size, e.data)
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
        let fh = u64::from(fh);
        if fh & STATIC_FH != 0 {
            return match self.statics.lock().get(&fh) {
                Some(bytes) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = start.saturating_add(size as usize).min(bytes.len());
                    reply.data(&bytes[start..end])
                }
                None => reply.error(Errno::EBADF),
            };
        }
        // Reads of a version's image inside one block are answered from the cached
        // block itself (or static zeros): no allocation and no copy on this side.
        match self.sessions.read_ref(fh, offset, size as usize) {
            Ok(Some(ReadRef::Shared(block, range))) => return reply.data(&(*block).as_ref()[range]),
            Ok(Some(ReadRef::Zeros(n))) if n <= ZEROS.len() => return reply.data(&ZEROS[..n]),
            Ok(_) => {}
            Err(e) => return reply.error(err(e)),
        }
        let mut buf = vec![0u8; size as usize];
        match self.sessions.read(fh, offset, &mut buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(err(e)),
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
        let fh = u64::from(fh);
        if fh & STATIC_FH != 0 {
            return reply.error(Errno::EBADF);
        }
        match self.sessions.write(fh, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) waits for this: committing here means `cp` returns once the version
        // exists (or fails if it could not be made).
        let fh = u64::from(fh);
        if fh & STATIC_FH != 0 {
            return reply.ok();
        }
        match self.sessions.flush(fh, req.pid()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
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
        let fh = u64::from(fh);
        if fh & STATIC_FH != 0 {
            self.statics.lock().remove(&fh);
            reply.ok();
            return;
        }
        self.cache.lock().release(fh);
        if let Err(e) = self.sessions.release(fh) {
            // Nobody waits for a release: the log is the only place to say it.
            log!("keepfs: error: the last close failed ({e})");
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
            let name = name.to_str().ok_or(Errno::ENOTSUP)?;
            let value = std::str::from_utf8(value).map_err(|_| Errno::EINVAL)?;
            if let Some(label) = name.strip_prefix(XATTR_LABEL) {
                self.sessions.set_incoming_label(&file, label, value).map_err(err)
            } else if name == XATTR_SNAPSHOT {
                self.sessions.set_incoming_snapshot(&file, value).map_err(err)
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
            let name = name.to_str().ok_or(Errno::ENODATA)?;
            if let Some(label) = name.strip_prefix(XATTR_LABEL) {
                let labels = self.sessions.incoming_labels(&file).map_err(err)?;
                labels.into_iter().find(|(k, _)| k == label).map(|(_, v)| v.into_bytes()).ok_or(Errno::ENODATA)
            } else if name == XATTR_SNAPSHOT {
                Ok(self.sessions.incoming_snapshot(&file).map_err(err)?.into_bytes())
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
            && let Ok(labels) = self.sessions.incoming_labels(&file)
        {
            for (k, _) in labels {
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
            let label = name.to_str().and_then(|n| n.strip_prefix(XATTR_LABEL)).ok_or(Errno::ENODATA)?;
            if self.sessions.remove_incoming_label(&file, label).map_err(err)? { Ok(()) } else { Err(Errno::ENODATA) }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Mounts the session service at `mountpoint`, calls `mounted` once the kernel mount
/// exists, and serves requests until the filesystem is unmounted.
pub fn mount<S: Sessions>(
    sessions: Arc<S>,
    mountpoint: &Path,
    opts: MountOptions,
    mounted: impl FnOnce(),
) -> io::Result<()> {
    let config = fuse_config(&opts);
    let session = fuser::Session::new(KeepFs::new(sessions, opts), mountpoint, &config)?;
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
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
        config.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    config
}
