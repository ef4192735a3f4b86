//! Regular files and block devices as backup sources. Sizes come from seeking to the end
//! (which works for block devices). Regular files can be read through read-only mappings
//! in windows, so that workers hash straight from the page cache without a copy; every
//! processed range is dropped from the page cache (posix_fadvise DONTNEED) so that a
//! backup does not evict the host's working set.

use super::Source;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Bytes mapped at a time (a multiple of every block size).
pub const WINDOW_BYTES: u64 = 32 << 20;

pub struct FileSource {
    file: Arc<File>,
    size: u64,
    mappable: bool,
}

/// A read-only mapping of part of a source, shared by the blocks inside it. Dropping the
/// last reference unmaps it and drops its range from the page cache.
pub struct Window {
    map: Option<memmap2::Mmap>,
    file: Arc<File>,
    offset: u64,
}

impl Window {
    pub fn slice(&self, start: usize, len: usize) -> &[u8] {
        match &self.map {
            Some(m) => &m[start..start + len],
            None => &[],
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(m) = self.map.take() {
            let len = m.len();
            drop(m);
            // SAFETY: advisory syscall on a valid descriptor.
            unsafe {
                libc::posix_fadvise(self.file.as_raw_fd(), self.offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

impl FileSource {
    /// Opens a source. `mmap` allows reading a regular file through mappings.
    pub fn open(path: &Path, mmap: bool) -> io::Result<FileSource> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "is a directory, not an image"));
        }
        let size = file.seek(SeekFrom::End(0))?;
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(FileSource { file: Arc::new(file), size, mappable: mmap && meta.is_file() })
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the source shrank while being read (short read at byte {offset})"),
                )
            } else {
                e
            }
        })
    }

    fn done_with(&self, offset: u64, len: u64) {
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
        }
    }

    fn window(&self, offset: u64, len: u64) -> Option<io::Result<Arc<Window>>> {
        if !self.mappable || len == 0 {
            return None;
        }
        // SAFETY: the mapping is read-only and private to this process. If the file is
        // truncated while mapped, access raises SIGBUS, which the keepfs command turns
        // into a one-line error (the version stays incomplete); see main.rs.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len as usize).populate().map(&*self.file) };
        Some(map.map(|m| Arc::new(Window { map: Some(m), file: self.file.clone(), offset })))
    }
}
