//! Restoring a version to a file or block device. Objects are fetched and verified by a
//! pool of threads and written at their offsets; a block that stays unreadable or fails
//! its checksum does not abort the restore: it is written as zeros, reported, and the
//! version is marked invalid.

use crate::block::{BlockId, decode_block_into};
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

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Overwrite an existing file or device.
    pub force: bool,
    /// Do not write zero blocks (holes in files; a device is assumed zeroed).
    pub sparse: bool,
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
    buffered: File,
    direct: Option<File>,
    /// (temporary name, final name) for a regular file, renamed into place at the end.
    rename: Option<(PathBuf, PathBuf)>,
    is_device: bool,
}

impl Target {
    fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        if let Some(d) = &self.direct
            && data.as_ptr() as usize % ALIGN == 0
            && off % ALIGN as u64 == 0
        {
            let full = data.len() / ALIGN * ALIGN;
            if full > 0 {
                match d.write_all_at(&data[..full], off) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return self.buffered.write_all_at(data, off),
                    Err(e) => return Err(e),
                }
            }
            return self.buffered.write_all_at(&data[full..], off + full as u64);
        }
        self.buffered.write_all_at(data, off)
    }
}

fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

fn open_target(path: &Path, size: u64, force: bool) -> Result<Target> {
    let ctx = |what: &str| format!("cannot {what} restore target {}", path.display());
    match std::fs::metadata(path) {
        Ok(m) if !force => {
            let what = if m.file_type().is_block_device() { "block device" } else { "file" };
            Err(Error::Refused(format!(
                "restore target {} exists ({what}); pass --force to overwrite it",
                path.display()
            )))
        }
        Ok(m) if m.is_dir() => Err(Error::Invalid(format!("restore target {} is a directory", path.display()))),
        Ok(m) if !m.is_file() => {
            let file = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(ctx("open"), e))?;
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
            Ok(Target { buffered: file, direct, rename: None, is_device: true })
        }
        Ok(_) | Err(_) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "cannot restore to {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                )));
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let temp = dir.join(format!(".{name}.keepfs-restore.{}", std::process::id()));
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(|e| Error::io(ctx("create"), e))?;
            file.set_len(size).map_err(|e| Error::io(ctx("size"), e))?;
            let direct = open_direct(&temp);
            Ok(Target { buffered: file, direct, rename: Some((temp, path.to_path_buf())), is_device: false })
        }
    }
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// Fetches and verifies one block into `out`.
fn fetch_block_into(
    storage: &dyn crate::storage::Storage,
    id: &BlockId,
    out: &mut [u8],
) -> std::result::Result<usize, String> {
    crate::cache::fetch_verified(storage, id, |bytes| decode_block_into(bytes, id, out))
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
        let path = match url {
            Url::File(p) => p.clone(),
            Url::Null(_) => return Err(Error::Invalid(format!("cannot restore to {url}: use file:///path"))),
        };
        let version = self.version(uid)?;
        let index = self.index(uid)?;
        if version.status == Status::Invalid {
            progress.warn(&format!("version {uid} is marked invalid: damaged blocks will be restored as zeros"));
        }
        let session = self.session(&format!("restore {uid}"), false)?;
        session.lock_version(uid, "restore")?;
        let storage = self.storage(&version.storage)?;
        let target = open_target(&path, version.size, opts.force)?;
        // A device must get real zeros; a fresh file already reads as zeros.
        let write_zeros = !opts.sparse && target.is_device;
        let bs = index.block_size as usize;
        progress.begin(&format!("restore {uid} ({})", version.name), version.size);

        let fetchers = self.config.storage_readers.max(1);
        let (pool_tx, pool_rx) = bounded::<OutBuf>(fetchers * 2 + 2);
        for _ in 0..fetchers * 2 + 2 {
            let _ = pool_tx.send(OutBuf::new(bs));
        }
        let (job_tx, job_rx) = bounded::<(u64, BlockId)>(fetchers * 2);
        type Fetched = (u64, BlockId, OutBuf, std::result::Result<usize, String>);
        let (res_tx, res_rx) = bounded::<Fetched>(fetchers * 2);
        let mut report = RestoreReport::default();
        let mut zeros = OutBuf::new(bs);
        zeros.window().fill(0);
        let mut write_error: Option<Error> = None;
        let note_write = |r: io::Result<()>, off: u64, write_error: &mut Option<Error>| {
            if let Err(e) = r
                && write_error.is_none()
            {
                *write_error = Some(Error::io(format!("cannot write to {} at byte {off}", path.display()), e));
            }
        };

        std::thread::scope(|s| {
            for _ in 0..fetchers {
                let (job_rx, res_tx, pool_rx, storage) =
                    (job_rx.clone(), res_tx.clone(), pool_rx.clone(), storage.clone());
                s.spawn(move || {
                    for (idx, id) in job_rx {
                        let Ok(mut buf) = pool_rx.recv() else { return };
                        let r = fetch_block_into(storage.as_ref(), &id, buf.window());
                        if res_tx.send((idx, id, buf, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(res_tx);
            drop(job_rx);
            let entries = &index.entries;
            s.spawn(move || {
                for (idx, id) in entries.iter().enumerate() {
                    if !id.is_sparse() && job_tx.send((idx as u64, *id)).is_err() {
                        return;
                    }
                }
            });
            // Zero blocks need no storage: write (or skip) them here first.
            for (idx, id) in index.entries.iter().enumerate() {
                if id.is_sparse() {
                    let len = index.block_len(idx);
                    if write_zeros && write_error.is_none() {
                        let off = (idx * bs) as u64;
                        note_write(target.write_at(zeros.bytes(len), off), off, &mut write_error);
                    }
                    progress.advance(len as u64);
                    report.bytes += len as u64;
                }
            }
            for (idx, id, buf, r) in res_rx {
                let off = idx * bs as u64;
                let len = index.block_len(idx as usize);
                let r = match r {
                    Ok(n) if n != len => Err(format!("object holds {n} bytes, the block needs {len}")),
                    other => other,
                };
                let data = match &r {
                    Ok(_) => buf.bytes(len),
                    Err(reason) => {
                        progress.warn(&format!(
                            "block {idx} (bytes {off}..{}) object {id}: {reason}; writing zeros",
                            off + len as u64
                        ));
                        report.bad_blocks.push(BadBlock {
                            index: idx,
                            offset: off,
                            len: len as u64,
                            object: id,
                            reason: reason.clone(),
                        });
                        zeros.bytes(len)
                    }
                };
                if write_error.is_none() {
                    note_write(target.write_at(data, off), off, &mut write_error);
                }
                let _ = pool_tx.send(buf);
                progress.advance(len as u64);
                report.bytes += len as u64;
            }
        });
        progress.end();
        if let Some(e) = write_error {
            if let Some((temp, _)) = &target.rename {
                let _ = std::fs::remove_file(temp);
            }
            return Err(e);
        }
        match target.buffered.sync_all() {
            // A character device (/dev/null) has nothing to make durable.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && target.is_device => {}
            r => r.map_err(|e| Error::io(format!("cannot flush {}", path.display()), e))?,
        }
        if let Some((temp, path)) = &target.rename {
            std::fs::rename(temp, path)
                .map_err(|e| Error::io(format!("cannot move the restored image to {}", path.display()), e))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(dir).and_then(|d| d.sync_all());
            }
        }
        if !report.bad_blocks.is_empty() {
            report.bad_blocks.sort_by_key(|b| b.index);
            let db = self.db();
            let sid = db.storage_id(&version.storage)?;
            let ids: Vec<BlockId> = report.bad_blocks.iter().map(|b| b.object).collect();
            db.mark_objects_invalid(sid, &ids)?;
            db.set_status(uid, Status::Invalid)?;
        }
        Ok(report)
    }
}
