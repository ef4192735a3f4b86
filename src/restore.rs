//! Restoring a version to a file, a block device or an RBD image (through
//! [`crate::source::BlockTarget`]). Objects are fetched and verified by a
//! pool of threads and written at their offsets; a block that stays unreadable or fails
//! its checksum does not abort the restore: it is written as zeros, reported, and the
//! version is marked invalid.

use crate::block::BlockId;
use crate::cache::FetchError;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::Url;
use crate::version::{Status, VersionUid};
use crossbeam_channel::bounded;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Overwrite an existing file or device.
    pub force: bool,
    /// Do not write zero blocks (holes in files; a device is assumed zeroed).
    pub sparse: bool,
    /// Finish an interrupted restore: blocks the target already holds (read back and
    /// checked against the index) are not fetched or written again.
    pub resume: bool,
    /// Write into an existing regular file itself (`--force --in-place`), keeping its
    /// inode (other hard links see the image; owner and ACLs stay): its old content is
    /// gone from the start, not only once the restore has succeeded.
    pub in_place: bool,
}

/// A block that could not be restored.
#[derive(Clone, Debug)]
pub struct BadBlock {
    pub index: u64,
    pub offset: u64,
    pub len: u64,
    pub object: BlockId,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    pub bytes: u64,
    /// Blocks a continued restore found already written and correct.
    pub blocks_kept: u64,
    pub bad_blocks: Vec<BadBlock>,
}

/// Alignment of buffers, offsets and lengths for direct I/O.
const ALIGN: usize = 4096;

/// A recycled output buffer with a 4 KiB-aligned window (for O_DIRECT writes). Moving it
/// does not move its heap allocation, so the window stays aligned.
struct OutBuf {
    raw: Vec<u8>,
    start: usize,
}

impl OutBuf {
    fn new(len: usize) -> OutBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        OutBuf { raw, start }
    }
    fn window(&mut self) -> &mut [u8] {
        let end = self.raw.len() - ALIGN + self.start;
        &mut self.raw[self.start..end]
    }
    fn bytes(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len]
    }
}

/// Where a restore writes: a buffered descriptor, and where the target supports it a
/// direct one used for aligned whole blocks (the restored image does not pass through
/// and evict the page cache, and costs far less CPU).
struct Target {
    io: TargetIo,
    /// (temporary name, final name) for a regular file, renamed into place at the end.
    rename: Option<(PathBuf, PathBuf)>,
    /// Written in place over what it held (a device, an existing image): zero blocks
    /// must be written, or discarded.
    is_device: bool,
    /// Whether what was written can be read back (a regular file, a block device opened
    /// for reading; not /dev/null).
    readable: bool,
    /// Zero blocks are discarded instead of skipped (`--sparse` into an existing image).
    discard_zeros: bool,
    /// The mark of a restore in place, removed once it has succeeded.
    marker: Option<PathBuf>,
}

enum TargetIo {
    File { buffered: File, direct: Option<File> },
    Image(Box<dyn crate::source::BlockTarget>),
}

/// The name of the file a restore of `uid` to `path` writes before renaming it into
/// place. It is the same for every attempt, so that `--continue` finds what an
/// interrupted restore left.
pub fn partial_path(path: &Path, uid: VersionUid) -> PathBuf {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.keepfs-restore.{uid}"))
}

/// Takes an exclusive lock on a file being restored, so that two restores never write
/// the same file; the kernel drops it when the process dies.
pub(crate) fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Refused(format!(
            "another keepfs restore is writing {} right now; wait for it to finish",
            path.display()
        )));
    }
    Ok(())
}

impl Target {
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        let (buffered, direct) = match &self.io {
            TargetIo::File { buffered, direct } => (buffered, direct),
            TargetIo::Image(t) => return t.write_at(data, off),
        };
        if let Some(d) = direct
            && (data.as_ptr() as usize).is_multiple_of(ALIGN)
            && off.is_multiple_of(ALIGN as u64)
        {
            let full = data.len() / ALIGN * ALIGN;
            if full > 0 {
                match d.write_all_at(&data[..full], off) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return buffered.write_all_at(data, off),
                    Err(e) => return Err(e),
                }
            }
            return buffered.write_all_at(&data[full..], off + full as u64);
        }
        buffered.write_all_at(data, off)
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        match &self.io {
            TargetIo::Image(t) => t.discard(off, len),
            TargetIo::File { .. } => Ok(()),
        }
    }

    fn read_back(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match &self.io {
            TargetIo::File { buffered, .. } => buffered.read_exact_at(buf, off),
            TargetIo::Image(t) => t.read_at(buf, off),
        }
    }

    /// Waits for queued writes (before reading back what they wrote).
    fn settle(&self) -> io::Result<()> {
        match &self.io {
            TargetIo::File { .. } => Ok(()),
            TargetIo::Image(t) => t.settle(),
        }
    }

    /// Makes what was written durable, keeping it where it is (for --continue).
    fn sync(&self) -> io::Result<()> {
        match &self.io {
            TargetIo::File { buffered, .. } => buffered.sync_all(),
            TargetIo::Image(t) => t.settle(),
        }
    }
}

fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// The file a restore to `path` writes: `path` itself, or the file a symlink there
/// names (followed to the end), so that the link stays a link and its file gets the
/// image. A link to nothing is refused, as `cp` refuses to write through one: restoring
/// over the link would replace it without `--force`, and creating its target is a guess.
fn follow_link(path: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        // A link to a device (/dev/vg0/lv to /dev/dm-3) is opened through the link, and
        // named as the user named it.
        Ok(m) if m.file_type().is_symlink() && std::fs::metadata(path).is_ok_and(|t| !t.is_file()) => {
            Ok(path.to_path_buf())
        }
        // Root follows a link only if its owner could have written where it points
        // itself: a user's link in a user's directory must not send a restore over a
        // file of root's (the protected_symlinks rule).
        Ok(m) if m.file_type().is_symlink() && !may_follow(&m, path) => Err(Error::Refused(format!(
            "restore target {} is a symlink owned by uid {} to a file it does not own; keepfs does not follow it: restore to the file itself",
            path.display(),
            std::os::unix::fs::MetadataExt::uid(&m)
        ))),
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| {
            let to = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            if e.kind() == io::ErrorKind::NotFound {
                Error::Refused(format!(
                    "restore target {} is a symlink to {to}, which does not exist; restore to a path that exists or to a new file, or remove the link",
                    path.display()
                ))
            } else {
                Error::io(format!("cannot follow the symlink {} (to {to})", path.display()), e)
            }
        }),
        _ => Ok(path.to_path_buf()),
    }
}

/// Whether a symlink (`link`, at `path`) may be followed: it is this process's own, or
/// root's, or its owner owns what it names.
fn may_follow(link: &std::fs::Metadata, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: a getter without failure modes.
    let euid = unsafe { libc::geteuid() };
    link.uid() == euid || link.uid() == 0 || std::fs::metadata(path).is_ok_and(|t| t.uid() == link.uid())
}

/// A new target file is made with the repository's file mode (0600 unless configured),
/// not the umask's: a restored disk is as private as its backup. A file restored over
/// (`--force`) keeps its mode, owner and extended attributes (ACLs among them): the image is written beside it and renamed over
/// it at the end, so an interrupted restore leaves the old file whole. Where a rename
/// would lose what the file is (other hard links to it; an owner this process cannot
/// give the new file) the restore is refused, naming `--in-place`, which writes into the
/// file itself (and marks it so, for `--continue`).
fn open_target(
    path: &Path,
    uid: VersionUid,
    size: u64,
    opts: &RestoreOptions,
    modes: crate::perms::Modes,
    progress: &dyn Progress,
) -> Result<Target> {
    let path = &follow_link(path)?;
    let ctx = |what: &str| format!("cannot {what} restore target {}", path.display());
    let partial = partial_path(path, uid);
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::Invalid(format!("restore target {} is a directory", path.display()))),
        Ok(m) if m.file_type().is_fifo() || m.file_type().is_socket() => Err(Error::Invalid(format!(
            "restore target {} is a pipe or socket; keepfs writes blocks at their offsets: restore to a file or a block device",
            path.display()
        ))),
        Ok(m) if !m.is_file() => {
            // A device (or FIFO, /dev/null) is written in place; --continue implies that
            // writing into it is wanted.
            if !opts.force && !opts.resume {
                let t = m.file_type();
                let what = if t.is_block_device() {
                    "block device"
                } else if t.is_char_device() {
                    "character device"
                } else {
                    "file"
                };
                return Err(Error::Refused(format!(
                    "restore target {} exists ({what}); pass --force to overwrite it",
                    path.display()
                )));
            }
            let (file, opened_rw) = match OpenOptions::new().read(true).write(true).open(path) {
                Ok(f) => (f, true),
                Err(_) => (OpenOptions::new().write(true).open(path).map_err(|e| Error::io(ctx("open"), e))?, false),
            };
            let is_device = m.file_type().is_block_device();
            if is_device {
                let dev_size = device_size(&file).map_err(|e| Error::io(ctx("size"), e))?;
                if dev_size < size {
                    return Err(Error::Invalid(format!(
                        "restore target {} holds {dev_size} bytes, the version needs {size}",
                        path.display()
                    )));
                }
            }
            let direct = if is_device { open_direct(path) } else { None };
            Ok(Target {
                io: TargetIo::File { buffered: file, direct },
                rename: None,
                is_device: true,
                readable: opened_rw && is_device,
                discard_zeros: false,
                marker: None,
            })
        }
        Ok(_) if !opts.force && !opts.resume => Err(Error::Refused(format!(
            "restore target {} exists (file); pass --force to overwrite it",
            path.display()
        ))),
        existing => {
            let existing = existing.ok();
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "cannot restore to {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                )));
            }
            if opts.resume {
                let file = match OpenOptions::new().read(true).write(true).open(&partial) {
                    Ok(f) => f,
                    // A restore that wrote in place is continued in place: every block the
                    // file holds is read back and checked before it is kept.
                    Err(e) if e.kind() == io::ErrorKind::NotFound && in_place_marked(path, uid, existing.as_ref()) => {
                        return in_place(path, uid, size, false, &ctx, progress);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(Error::Invalid(format!(
                            "there is no interrupted restore of {uid} to {} to continue (no {}); restore without --continue",
                            path.display(),
                            partial.display()
                        )));
                    }
                    Err(e) => return Err(Error::io(ctx("open the partial"), e)),
                };
                lock_exclusive(&file, path)?;
                let have = file.metadata().map_err(|e| Error::io(ctx("stat the partial"), e))?.len();
                if have != size {
                    return Err(Error::Invalid(format!(
                        "{} holds {have} bytes, version {uid} {size}: it is not a restore of {uid}; restore without --continue",
                        partial.display()
                    )));
                }
                let direct = open_direct(&partial);
                return Ok(Target {
                    io: TargetIo::File { buffered: file, direct },
                    rename: Some((partial, path.to_path_buf())),
                    is_device: false,
                    readable: true,
                    discard_zeros: false,
                    marker: None,
                });
            }
            use std::os::unix::fs::MetadataExt;
            if existing.is_some() && opts.in_place {
                progress
                    .warn(&format!("restoring into {} in place: its old content is gone from now on", path.display()));
                return in_place(path, uid, size, true, &ctx, progress);
            }
            if let Some(m) = existing.as_ref().filter(|m| m.nlink() > 1) {
                return Err(Error::Refused(format!(
                    "restore target {} has {} hard links: a restore writes a new file and renames it over this name, leaving the other names on the old image; pass --in-place to write into the file itself (its old content is gone from the start), or restore to a new file",
                    path.display(),
                    m.nlink()
                )));
            }
            let created = std::fs::symlink_metadata(&partial).is_err();
            let file = modes
                .options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&partial)
                .map_err(|e| match &existing {
                    // The target is there: it is the file beside it that cannot be made.
                    Some(_) if e.kind() == io::ErrorKind::PermissionDenied => {
                        Error::io(
                            format!(
                                "cannot create {} beside restore target {} (a restore over a file writes a new one and renames it over the old; make {} writable, or pass --in-place to write into the file itself)",
                                partial.display(),
                                path.display(),
                                dir.display()
                            ),
                            e,
                        )
                    }
                    _ => Error::io(ctx("create"), e),
                })?;
            lock_exclusive(&file, path)?;
            let give_up = |e: Error| {
                if created {
                    let _ = std::fs::remove_file(&partial);
                }
                e
            };
            // A file restored over keeps its mode and owner.
            if let Some(m) = &existing {
                file.set_permissions(m.permissions()).map_err(|e| give_up(Error::io(ctx("set the mode of"), e)))?;
                let mine = file.metadata().map_err(|e| give_up(Error::io(ctx("stat"), e)))?;
                if (mine.uid(), mine.gid()) != (m.uid(), m.gid())
                    && let Err(e) = std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()))
                {
                    return Err(give_up(Error::Refused(format!(
                        "cannot give a new file the owner of restore target {} (uid {}, gid {}: {e}); pass --in-place to write into the file itself (its old content is gone from the start), or restore as its owner or as root",
                        path.display(),
                        m.uid(),
                        m.gid()
                    ))));
                }
            }
            // Sized before anything is written: a file system that cannot hold the image
            // (too large a file) fails here, and nothing is left behind.
            file.set_len(0).and_then(|_| file.set_len(size)).map_err(|e| give_up(Error::io(ctx("size"), e)))?;
            let direct = open_direct(&partial);
            Ok(Target {
                io: TargetIo::File { buffered: file, direct },
                rename: Some((partial, path.to_path_buf())),
                is_device: false,
                readable: true,
                discard_zeros: false,
                marker: None,
            })
        }
    }
}

/// Gives a restored file the extended attributes of the file it replaces (ACLs, file
/// capabilities, security labels, user attributes), as `cp --preserve=xattr` does. Set
/// once the data is written: writing into a file drops its capabilities. One that cannot
/// be set (a `trusted.` attribute without root, a file system without them) is warned
/// about, and the restore goes on: the image is what was asked for.
fn keep_xattrs(old: &Path, new: &Path, progress: &dyn Progress) {
    let names = match xattr::list(old) {
        Ok(names) => names,
        // ENOTSUP (EOPNOTSUPP): a file system without them, nothing to keep.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return,
        Err(e) => {
            progress.warn(&format!("cannot list the extended attributes of {} to keep them: {e}", old.display()));
            return;
        }
    };
    for name in names {
        let kept = xattr::get(old, &name).and_then(|v| v.map_or(Ok(()), |v| xattr::set(new, &name, &v)));
        if let Err(e) = kept {
            progress.warn(&format!(
                "extended attribute {} of {} is not kept on the restored file: {e}",
                name.to_string_lossy(),
                old.display()
            ));
        }
    }
}

/// The file that marks `path` as being restored in place with `uid`: it holds the
/// target's device and inode, so that `--continue` writes in place only into the very
/// file an in-place restore started on. Gone once the restore succeeds.
fn in_place_marker(path: &Path, uid: VersionUid) -> PathBuf {
    let mut p = partial_path(path, uid).into_os_string();
    p.push(".in-place");
    PathBuf::from(p)
}

fn identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("{}:{}\n", m.dev(), m.ino())
}

/// Whether `path` (whose metadata is `existing`) is marked as restored in place with `uid`.
fn in_place_marked(path: &Path, uid: VersionUid, existing: Option<&std::fs::Metadata>) -> bool {
    existing.is_some_and(|m| std::fs::read_to_string(in_place_marker(path, uid)).is_ok_and(|t| t == identity(m)))
}

/// Opens the regular file `path` to restore `uid` into it in place. `fresh`: marked (see
/// [`in_place_marker`]), sized first (a file system that cannot hold the image fails
/// before anything is lost), then emptied, so it reads as zeros and zero blocks need no
/// writing. Otherwise a continued restore: every block is checked, zeros written.
fn in_place(
    path: &Path,
    uid: VersionUid,
    size: u64,
    fresh: bool,
    ctx: &dyn Fn(&str) -> String,
    progress: &dyn Progress,
) -> Result<Target> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(ctx("open"), e))?;
    lock_exclusive(&file, path)?;
    let mut marker = Some(in_place_marker(path, uid));
    if fresh {
        let m = file.metadata().map_err(|e| Error::io(ctx("stat"), e))?;
        // Marked before the file is touched. A directory that takes no marker (the file
        // is writable, its directory not) still gets the restore, which then cannot be
        // continued: said now, not after the old content is gone.
        if let Some(mk) = &marker
            && let Err(e) = std::fs::write(mk, identity(&m))
        {
            progress.warn(&format!(
                "cannot mark {} as being restored in place ({}: {e}); if this restore is interrupted, run it again whole (--continue will not find it)",
                path.display(),
                mk.display()
            ));
            marker = None;
        }
        // A file system that cannot hold the image fails here, while the file still
        // holds what it held: then there is nothing to continue, and the mark goes.
        let sized = if m.len() < size { file.set_len(size) } else { Ok(()) };
        if let Err(e) = sized {
            if let Some(mk) = &marker {
                let _ = std::fs::remove_file(mk);
            }
            return Err(Error::io(ctx("size"), e));
        }
        file.set_len(0).and_then(|_| file.set_len(size)).map_err(|e| Error::io(ctx("size"), e))?;
    }
    let direct = open_direct(path);
    Ok(Target {
        io: TargetIo::File { buffered: file, direct },
        rename: None,
        // Continued: what the file holds where the image has zeros is not known.
        is_device: !fresh,
        readable: true,
        discard_zeros: false,
        marker,
    })
}

pub(crate) fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// Fetches and verifies one block into `out`.
pub(crate) fn fetch_block_into(
    storage: &dyn crate::storage::Storage,
    id: &BlockId,
    out: &mut [u8],
) -> std::result::Result<usize, FetchError> {
    crate::cache::fetch_verified(storage, id, crate::cache::Read::Cached, |bytes| {
        storage.codec().decode_block_into(bytes, id, out)
    })
}

/// Reports a block whose object is damaged; the restore writes zeros in its place.
pub(crate) fn bad_block(
    progress: &dyn Progress,
    idx: u64,
    off: u64,
    len: usize,
    id: BlockId,
    reason: &str,
) -> BadBlock {
    progress.warn(&format!("block {idx} (bytes {off}..{}) object {id}: {reason}; writing zeros", off + len as u64));
    BadBlock { index: idx, offset: off, len: len as u64, object: id, reason: reason.to_string() }
}

/// What reaches a restore's writer: a fetched (or kept, or failed) block, or a run of
/// zero blocks.
enum Done {
    Block(u64, BlockId, OutBuf, Outcome),
    Zeros(std::ops::Range<u64>),
}

/// What became of one block.
enum Outcome {
    /// Fetched and verified: this many bytes are in the buffer.
    Fetched(usize),
    /// A continued restore found it already written and correct.
    Kept,
    Failed(FetchError),
}

impl Repository {
    /// Restores version `uid` to `url`.
    pub fn restore(
        &self,
        uid: VersionUid,
        url: &Url,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> Result<RestoreReport> {
        if let Url::Null(_) = url {
            return Err(Error::Invalid(format!("cannot restore to {url}: use file:///path or rbd:POOL/IMAGE")));
        }
        let path = match url {
            Url::File(p) => p.display().to_string(),
            other => other.to_string(),
        };
        let version = self.version(uid)?;
        // The stored index is checked end to end first, as it is read from the catalog (in
        // constant memory): nothing is written from an index found damaged half way. The
        // restore then reads it a second time, block by block, instead of holding it.
        self.walk_index(&version, |_, _| true)?;
        let session = self.session(&format!("restore {uid}"), false)?;
        session.lock_version(uid, "restore")?;
        // Warned once the version is ours to read (an `rm` marks it invalid first).
        if version.status == Status::Invalid {
            progress.warn(&format!("version {uid} is marked invalid: damaged blocks will be restored as zeros"));
        }
        let storage = self.storage(&version.storage)?;
        let target = match url {
            Url::Rbd(spec) => {
                let (t, existing) = crate::rbd::open_target(spec, uid, version.size, opts, &self.config.rbd)?;
                Target {
                    io: TargetIo::Image(t),
                    rename: None,
                    is_device: existing,
                    readable: true,
                    discard_zeros: existing && opts.sparse,
                    marker: None,
                }
            }
            Url::File(p) => open_target(p, uid, version.size, opts, self.config.modes, progress)?,
            Url::Null(_) => unreachable!("refused above"),
        };
        let again = match &target.rename {
            Some((temp, _)) => format!(
                "run `keepfs restore --continue {uid} {url}` to finish it (what it wrote is in {}: remove that file to give up)",
                temp.display()
            ),
            None => format!("run `keepfs restore --continue {uid} {url}` to finish it"),
        };
        // A device must get real zeros; a fresh file already reads as zeros. An existing
        // RBD image restored with --sparse gets discards.
        let write_zeros = !opts.sparse && target.is_device;
        let (bs, size) = (version.block_size as usize, version.size);
        let count = crate::index::block_count(size, version.block_size);
        let block_len = |idx: u64| crate::index::block_len(size, version.block_size, idx) as usize;
        progress.begin(&format!("restore {uid} ({})", version.name), version.size);

        let fetchers = self.config.readers_for(&version.storage)?;
        // A block that repeats an earlier block of the same image is fetched once: its
        // later occurrences are copied from where the first was written, at the end
        // (one request per distinct object, which matters on S3). Not when the target
        // cannot be read back (/dev/null): those are fetched like any other.
        let track_repeats = target.readable;

        let (pool_tx, pool_rx) = bounded::<OutBuf>(fetchers * 2 + 2);
        for _ in 0..fetchers * 2 + 2 {
            let _ = pool_tx.send(OutBuf::new(bs));
        }
        let (job_tx, job_rx) = bounded::<(u64, BlockId)>(fetchers * 2);
        let (res_tx, res_rx) = bounded::<Done>(fetchers * 2);
        let mut report = RestoreReport::default();
        let mut zeros = OutBuf::new(bs);
        zeros.window().fill(0);
        let mut write_error: Option<Error> = None;
        let mut unavailable: Option<String> = None;
        let stop = AtomicBool::new(false);
        let note_write = |r: io::Result<()>, off: u64, write_error: &mut Option<Error>| {
            if let Err(e) = r
                && write_error.is_none()
            {
                *write_error = Some(Error::io(format!("cannot write to {} at byte {off}", path), e));
            }
        };

        let mut repeats: Vec<(u64, u64)> = Vec::new();
        let mut index_error: Option<Error> = None;
        std::thread::scope(|s| {
            let target_ref = &target;
            let stop = &stop;
            let block_len = &block_len;
            for _ in 0..fetchers {
                let (job_rx, res_tx, pool_rx, storage) =
                    (job_rx.clone(), res_tx.clone(), pool_rx.clone(), storage.clone());
                s.spawn(move || {
                    for (idx, id) in job_rx {
                        let Ok(mut buf) = pool_rx.recv() else { return };
                        if stop.load(Ordering::Relaxed) {
                            let _ = res_tx.send(Done::Block(
                                idx,
                                id,
                                buf,
                                Outcome::Failed(FetchError::Unavailable("stopped".into())),
                            ));
                            continue;
                        }
                        let len = block_len(idx);
                        let kept = opts.resume
                            && target_ref.read_back(&mut buf.window()[..len], idx * bs as u64).is_ok()
                            && storage.codec().id_of(buf.bytes(len)) == id;
                        let r = if kept {
                            Outcome::Kept
                        } else {
                            match fetch_block_into(storage.as_ref(), &id, buf.window()) {
                                Ok(n) => Outcome::Fetched(n),
                                Err(e) => Outcome::Failed(e),
                            }
                        };
                        if res_tx.send(Done::Block(idx, id, buf, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(job_rx);
            // The index, read a second time as a stream: data blocks go to the fetchers,
            // runs of zero blocks and repeats are noted (within bounds: see `Repeats`; a
            // repeat past them is fetched like any other block).
            let version = &version;
            let producer = s.spawn(move || -> Result<Vec<(u64, u64)>> {
                let mut repeats = crate::index::Repeats::bounded();
                let mut next = 0u64; // the first block not handed over yet
                let hand_zeros = |run: std::ops::Range<u64>| run.is_empty() || res_tx.send(Done::Zeros(run)).is_ok();
                let walked = self.walk_index(version, |idx, id| {
                    if stop.load(Ordering::Relaxed) || !hand_zeros(next..idx) {
                        return false;
                    }
                    next = idx + 1;
                    if track_repeats && repeats.note(idx, id) {
                        return true;
                    }
                    job_tx.send((idx, id)).is_ok()
                });
                if walked.as_ref().is_ok_and(|head| head.is_some()) {
                    hand_zeros(next..count);
                }
                if walked.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                walked.map(|_| repeats.found)
            });
            for done in res_rx {
                match done {
                    Done::Block(idx, id, buf, r) => {
                        let off = idx * bs as u64;
                        let len = block_len(idx);
                        let r = match r {
                            Outcome::Fetched(n) if n != len => Outcome::Failed(FetchError::Damaged(format!(
                                "object holds {n} bytes, the block needs {len}"
                            ))),
                            other => other,
                        };
                        let data = match &r {
                            Outcome::Kept => {
                                report.blocks_kept += 1;
                                None
                            }
                            Outcome::Fetched(_) => Some(buf.bytes(len)),
                            Outcome::Failed(FetchError::Unavailable(reason)) => {
                                // The storage is gone, not the data: stop, mark nothing, keep what
                                // is written for --continue.
                                stop.store(true, Ordering::Relaxed);
                                if unavailable.is_none() {
                                    unavailable =
                                        Some(format!("block {idx} (bytes {off}..{}): {reason}", off + len as u64));
                                }
                                None
                            }
                            Outcome::Failed(FetchError::Damaged(reason)) => {
                                report.bad_blocks.push(bad_block(progress, idx, off, len, id, reason));
                                Some(zeros.bytes(len))
                            }
                        };
                        if let Some(data) = data
                            && write_error.is_none()
                        {
                            note_write(target.write_at(data, off), off, &mut write_error);
                        }
                        let _ = pool_tx.send(buf);
                        progress.advance(len as u64);
                        report.bytes += len as u64;
                    }
                    // Zero blocks need no storage: write, discard (an RBD image with
                    // --sparse) or skip them, a run at a time (a device gets real zeros;
                    // a new file is all holes already).
                    Done::Zeros(run) => {
                        let start = run.start * bs as u64;
                        let bytes = (run.end * bs as u64).min(size) - start;
                        if write_zeros {
                            for idx in run {
                                if write_error.is_none() {
                                    let off = idx * bs as u64;
                                    note_write(
                                        target.write_at(zeros.bytes(block_len(idx)), off),
                                        off,
                                        &mut write_error,
                                    );
                                }
                            }
                        } else if target.discard_zeros && write_error.is_none() {
                            note_write(target.discard(start, bytes), start, &mut write_error);
                        }
                        progress.advance(bytes);
                        report.bytes += bytes;
                    }
                }
            }
            match crate::repo::joined(producer.join()) {
                Ok(r) => repeats = r,
                Err(e) => index_error = Some(e),
            }
        });
        if let Some(e) = index_error {
            let _ = target.sync();
            return Err(match e {
                // Damage names its own repair (and its exit code).
                Error::Damaged(_) => e,
                e => Error::Other(format!("{e}; the restore is incomplete: {again}")),
            });
        }
        // The repeats, copied from their first occurrence (zeros where that was damaged).
        if write_error.is_none()
            && unavailable.is_none()
            && !repeats.is_empty()
            && let Err(e) = target.settle()
        {
            write_error = Some(Error::io(format!("cannot write to {path}"), e));
        }
        if write_error.is_none() && unavailable.is_none() {
            let damaged: std::collections::HashMap<u64, (String, BlockId)> =
                report.bad_blocks.iter().map(|b| (b.index, (b.reason.clone(), b.object))).collect();
            let mut buf = OutBuf::new(bs);
            // In block order: the index was walked in it.
            for (idx, first) in repeats {
                let (off, len) = (idx * bs as u64, block_len(idx));
                let data = if let Some((reason, id)) = damaged.get(&first) {
                    report.bad_blocks.push(bad_block(progress, idx, off, len, *id, reason));
                    zeros.bytes(len)
                } else {
                    let r = target.read_back(&mut buf.window()[..len], first * bs as u64);
                    if let Err(e) = r {
                        write_error =
                            Some(Error::io(format!("cannot read back {} at byte {}", path, first * bs as u64), e));
                        break;
                    }
                    buf.bytes(len)
                };
                note_write(target.write_at(data, off), off, &mut write_error);
                if write_error.is_some() {
                    break;
                }
                progress.advance(len as u64);
                report.bytes += len as u64;
            }
        }
        progress.end();
        if let Some(e) = write_error {
            // What was written stays (it is verified block by block by --continue).
            let _ = target.sync();
            return Err(Error::Other(format!("{e}; the restore is incomplete: {again}")));
        }
        if let Some(reason) = unavailable {
            let _ = target.sync();
            return Err(Error::Other(format!(
                "restore of {uid} stopped: storage '{}' is not available ({reason}); nothing was marked damaged: {again} when it is back",
                version.storage
            )));
        }
        let Target { io, rename, is_device, marker, .. } = target;
        // Before the flush, so that they are as durable as the data.
        if let Some((temp, path)) = &rename
            && path.exists()
        {
            keep_xattrs(path, temp, progress);
        }
        match io {
            TargetIo::Image(t) => t.finish()?,
            TargetIo::File { buffered, .. } => match buffered.sync_all() {
                // A character device (/dev/null) has nothing to make durable.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && is_device => {}
                r => r.map_err(|e| Error::io(format!("cannot flush {}", path), e))?,
            },
        }
        if let Some((temp, path)) = &rename {
            std::fs::rename(temp, path).map_err(|e| {
                Error::io(
                    format!(
                        "cannot move the restored image {} over {} (it stays, complete: once the target can be replaced, `keepfs restore --continue` finishes)",
                        temp.display(),
                        path.display()
                    ),
                    e,
                )
            })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        // Restored in place and made durable: nothing is left to continue.
        if let Some(m) = &marker {
            let _ = std::fs::remove_file(m);
        }
        if !report.bad_blocks.is_empty() {
            report.bad_blocks.sort_by_key(|b| b.index);
            // The same rule as a scrub's: every version sharing a damaged object is invalid.
            let ids: Vec<BlockId> = report.bad_blocks.iter().map(|b| b.object).collect();
            self.mark_damaged(&version.storage, &ids)?;
            self.set_status(uid, Status::Invalid)?;
        }
        Ok(report)
    }
}
