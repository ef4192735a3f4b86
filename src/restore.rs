//! Restoring a version to a file or block device. Objects are fetched and verified by a
//! pool of threads and written at their offsets; a block that stays unreadable or fails
//! its checksum does not abort the restore: it is written as zeros, reported, and the
//! version is marked invalid.

use crate::block::{BlockId, decode_block};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::Url;
use crate::storage::retry;
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

const FETCH_ATTEMPTS: u32 = 4;

enum Target {
    /// A new or replaced regular file: written under a temporary name, renamed at the end.
    File {
        file: File,
        temp: PathBuf,
        path: PathBuf,
    },
    /// A device (or other special file) written in place.
    Device { file: File },
}

impl Target {
    fn file(&self) -> &File {
        match self {
            Target::File { file, .. } | Target::Device { file } => file,
        }
    }
}

fn open_target(path: &Path, size: u64, force: bool) -> Result<Target> {
    let ctx = |what: &str| format!("cannot {what} restore target {}", path.display());
    match std::fs::metadata(path) {
        Ok(m) if !force => {
            let what = if m.file_type().is_block_device() {
                "block device"
            } else {
                "file"
            };
            Err(Error::Refused(format!(
                "restore target {} exists ({what}); pass --force to overwrite it",
                path.display()
            )))
        }
        Ok(m) if m.is_dir() => Err(Error::Invalid(format!(
            "restore target {} is a directory",
            path.display()
        ))),
        Ok(m) if !m.is_file() => {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io(ctx("open"), e))?;
            if m.file_type().is_block_device() {
                let dev_size = device_size(&file).map_err(|e| Error::io(ctx("size"), e))?;
                if dev_size < size {
                    return Err(Error::Invalid(format!(
                        "restore target {} holds {dev_size} bytes, the version needs {size}",
                        path.display()
                    )));
                }
            }
            Ok(Target::Device { file })
        }
        Ok(_) | Err(_) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "cannot restore to {}: directory {} does not exist",
                    path.display(),
                    dir.display()
                )));
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = dir.join(format!(".{name}.keepfs-restore.{}", std::process::id()));
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(|e| Error::io(ctx("create"), e))?;
            file.set_len(size).map_err(|e| Error::io(ctx("size"), e))?;
            Ok(Target::File {
                file,
                temp,
                path: path.to_path_buf(),
            })
        }
    }
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f.try_clone()?;
    f.seek(SeekFrom::End(0))
}

/// Fetches and verifies one block. Bytes that fail to decode are fetched again (a
/// truncated transfer is transient; a damaged object fails every time).
pub(crate) fn fetch_block(
    storage: &dyn crate::storage::Storage,
    id: &BlockId,
) -> std::result::Result<Vec<u8>, String> {
    let mut last = String::new();
    for _ in 0..2 {
        let bytes =
            retry(FETCH_ATTEMPTS, || storage.get(&id.storage_key())).map_err(|e| e.to_string())?;
        match decode_block(&bytes, id) {
            Ok(b) => return Ok(b),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
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
            Url::Null(_) => {
                return Err(Error::Invalid(format!(
                    "cannot restore to {url}: use file:///path"
                )));
            }
        };
        let version = self.version(uid)?;
        let index = self.index(uid)?;
        if version.status == Status::Invalid {
            progress.warn(&format!(
                "version {uid} is marked invalid: damaged blocks will be restored as zeros"
            ));
        }
        let session = self.session(&format!("restore {uid}"), false)?;
        session.lock_version(uid, "restore")?;
        let storage = self.storage(&version.storage)?;
        let target = open_target(&path, version.size, opts.force)?;
        // A device or an existing file must get real zeros; a fresh file already reads as zeros.
        let write_zeros = !opts.sparse && matches!(target, Target::Device { .. });
        let bs = index.block_size as u64;
        progress.begin(&format!("restore {uid} ({})", version.name), version.size);

        let fetchers = self.config.storage_readers.max(1);
        let (job_tx, job_rx) = bounded::<(u64, BlockId)>(fetchers * 2);
        let (res_tx, res_rx) =
            bounded::<(u64, BlockId, std::result::Result<Vec<u8>, String>)>(fetchers * 2);
        let mut report = RestoreReport::default();
        let zeros = vec![0u8; bs as usize];
        let out = target.file();
        let mut write_error: Option<Error> = None;

        std::thread::scope(|s| {
            for _ in 0..fetchers {
                let (job_rx, res_tx, storage) = (job_rx.clone(), res_tx.clone(), storage.clone());
                s.spawn(move || {
                    for (idx, id) in job_rx {
                        let r = fetch_block(storage.as_ref(), &id);
                        if res_tx.send((idx, id, r)).is_err() {
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
                    let len = index.block_len(idx) as u64;
                    if write_zeros && write_error.is_none() {
                        let off = idx as u64 * bs;
                        if let Err(e) = out.write_all_at(&zeros[..len as usize], off) {
                            write_error = Some(Error::io(
                                format!("cannot write to {} at byte {off}", path.display()),
                                e,
                            ));
                        }
                    }
                    progress.advance(len);
                    report.bytes += len;
                }
            }
            for (idx, id, r) in res_rx {
                let off = idx * bs;
                let len = index.block_len(idx as usize) as u64;
                let data = match r {
                    Ok(d) => d,
                    Err(reason) => {
                        progress.warn(&format!(
                            "block {idx} (bytes {off}..{}) object {id}: {reason}; writing zeros",
                            off + len
                        ));
                        report.bad_blocks.push(BadBlock {
                            index: idx,
                            offset: off,
                            len,
                            object: id,
                            reason,
                        });
                        zeros[..len as usize].to_vec()
                    }
                };
                if write_error.is_none()
                    && let Err(e) = out.write_all_at(&data, off)
                {
                    write_error = Some(Error::io(
                        format!("cannot write to {} at byte {off}", path.display()),
                        e,
                    ));
                }
                progress.advance(len);
                report.bytes += len;
            }
        });
        progress.end();
        if let Some(e) = write_error {
            if let Target::File { temp, .. } = &target {
                let _ = std::fs::remove_file(temp);
            }
            return Err(e);
        }
        out.sync_all()
            .map_err(|e| Error::io(format!("cannot flush {}", path.display()), e))?;
        if let Target::File { temp, path, .. } = &target {
            std::fs::rename(temp, path).map_err(|e| {
                Error::io(
                    format!("cannot move the restored image to {}", path.display()),
                    e,
                )
            })?;
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
