//! Writing a file the user named (`metadata export FILE`, `--metrics-file FILE`): a new
//! or regular file is written beside its place and renamed there once complete and
//! durable, so that a failed write leaves no file that looks whole; a pipe, socket or
//! character device (`/dev/stdout`, a FIFO a reader waits on, `/dev/full`) is written
//! into, as a shell's `>` would, never replaced by a file; a directory or a block device
//! is refused. A symbolic link is followed (its target is what is written, the link
//! stays) when it is this user's or root's, as the kernel's `protected_symlinks` has it:
//! one another user made (in a shared metrics directory, say) is refused, so that root
//! is never led to write where that user chose.

use crate::error::{Error, Result};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Writes what `fill` writes to `path` (see the module comment). `what` starts every
/// error ("cannot write meta.json"). A new file is made as a plain file is (0666 less the
/// umask), not private as temporary files are: it holds names and sizes, no data.
pub fn write_named(path: &Path, what: &str, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let path = followed(path, what)?;
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => {
            return Err(Error::Invalid(format!("{what}: {} is a directory; name a file", path.display())));
        }
        Ok(m) if m.file_type().is_block_device() => {
            return Err(Error::Invalid(format!(
                "{what}: {} is a block device; name a file (nothing was written to the device)",
                path.display()
            )));
        }
        Ok(m) if !m.is_file() => {
            let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(what, e))?;
            let mut w = std::io::BufWriter::new(f);
            fill(&mut w)?;
            return w.flush().map_err(|e| Error::io(what, e));
        }
        _ => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.file_name().is_none() {
        return Err(Error::Invalid(format!("{what}: name a file")));
    }
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("{what}: directory {} does not exist", dir.display())));
    }
    use std::os::unix::fs::PermissionsExt;
    // (The error names what went wrong, not the temporary file's name.)
    let tmp = tempfile::Builder::new()
        .prefix(".keepfs-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(&dir)
        .map_err(|e| Error::io(what, std::io::Error::from(e.kind())))?;
    let mut w = std::io::BufWriter::new(tmp);
    fill(&mut w)?;
    let tmp = w.into_inner().map_err(|e| Error::io(what, e.into_error()))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(what, e))?;
    tmp.persist(&path).map_err(|e| Error::io(what, e.error))?;
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(what, e))
}

/// `path`, or what it links to (through every link; a dangling one's target, which is
/// then made). A link owned by another user than this one and root is refused.
fn followed(path: &Path, what: &str) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let Ok(meta) = std::fs::symlink_metadata(&p) else { break };
        if !meta.file_type().is_symlink() {
            break;
        }
        if meta.uid() != me && meta.uid() != 0 {
            return Err(Error::Refused(format!(
                "{what}: {} is a symbolic link of another user (uid {}); keepfs does not follow it",
                p.display(),
                meta.uid()
            )));
        }
        let target = std::fs::read_link(&p).map_err(|e| Error::io(what, e))?;
        p = match p.parent() {
            Some(d) if target.is_relative() => d.join(target),
            _ => target,
        };
    }
    Ok(p)
}
