//! Regular files and block devices as backup sources. Sizes come from seeking to the end
//! (which works for block devices); processed ranges are dropped from the page cache with
//! posix_fadvise(DONTNEED) so that a backup does not evict the host's working set.

use super::Source;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory, not an image",
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(FileSource { file, size })
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
                    format!("source shrank while being read (short read at byte {offset})"),
                )
            } else {
                e
            }
        })
    }

    fn done_with(&self, offset: u64, len: u64) {
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}
