//! Regular files and block devices as backup sources. Sizes come from seeking to the end
//! (which works for block devices). Regular files can be read through read-only mappings
//! in windows, so that workers copy each block once straight from the page cache (no
//! read(2) per block); a truncated mapped file is caught by [`super::sigbus`]; every
//! processed range is dropped from the page cache (posix_fadvise DONTNEED) so that a
//! backup does not evict the host's working set. The holes of a sparse regular file are
//! found with `lseek(SEEK_DATA/SEEK_HOLE)` and never read.

use super::Source;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes mapped at a time (a multiple of every block size).
pub const WINDOW_BYTES: u64 = 32 << 20;

pub struct FileSource {
    file: Arc<File>,
    size: u64,
    /// Cleared when the file refuses mappings (FUSE files opened for direct I/O,
    /// some network filesystems): it is then read with pread.
    mappable: AtomicBool,
    /// Regular file: holes can be asked for (a block device answers "all data" anyway).
    regular: bool,
}

/// A read-only mapping of part of a source, shared by the blocks inside it. Dropping the
/// last reference unmaps it and drops its range from the page cache.
pub struct Window {
    map: Option<memmap2::Mmap>,
    file: Arc<File>,
    offset: u64,
    /// The mapping as the SIGBUS handler knows it.
    guarded: Option<super::sigbus::Registration>,
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
            if let Some(r) = self.guarded.take() {
                super::sigbus::unregister(r);
            }
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
    ///
    /// Only regular files and block devices are images: anything else is refused with an
    /// `InvalidInput` error saying what it is. A character device (`/dev/zero`) would
    /// seek to 0 and make a valid empty version; a FIFO without a writer would block
    /// `open` forever, so the file is opened non-blocking and checked before any read.
    pub fn open(path: &Path, mmap: bool) -> io::Result<FileSource> {
        use std::os::unix::fs::OpenOptionsExt;
        // A first look gives a clear answer for a directory or a socket (which cannot
        // be opened at all); the check on the opened file below is the one that counts.
        check_kind(&std::fs::metadata(path)?)?;
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
        let meta = file.metadata()?;
        check_kind(&meta)?;
        check_file_system(&file)?;
        // Back to blocking reads (O_NONBLOCK only guarded the open).
        // SAFETY: fcntl on a valid descriptor.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let size = file.seek(SeekFrom::End(0))?;
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
        Ok(FileSource {
            file: Arc::new(file),
            size,
            mappable: AtomicBool::new(mmap && meta.is_file()),
            regular: meta.is_file(),
        })
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE; None where the file has no data after
    /// `offset` (ENXIO), an error where the filesystem cannot tell.
    fn seek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid descriptor. Readers share it, but nothing here uses
        // the file position: reads are positional (pread) or through mappings.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) }
    }

    fn shrank(&self) -> io::Error {
        let now = self.file.metadata().map(|m| m.len().to_string()).unwrap_or_else(|_| "fewer".into());
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the source shrank while being read (it is now {now} bytes, it was {})", self.size),
        )
    }
}

/// Refuses a kernel pseudo-file (procfs, sysfs, debugfs, …): its size says nothing of
/// what it holds (/proc/version is "0 bytes" and cannot seek to its end; a sysfs file
/// is "4096" and ends sooner, which failed a backup halfway with "the source shrank").
fn check_file_system(file: &std::fs::File) -> io::Result<()> {
    const PSEUDO: &[(libc::__fsword_t, &str)] = &[
        (libc::PROC_SUPER_MAGIC, "procfs"),
        (libc::SYSFS_MAGIC, "sysfs"),
        (libc::DEBUGFS_MAGIC, "debugfs"),
        (libc::TRACEFS_MAGIC, "tracefs"),
        (libc::SECURITYFS_MAGIC, "securityfs"),
        (libc::CGROUP_SUPER_MAGIC, "cgroupfs"),
        (libc::CGROUP2_SUPER_MAGIC, "cgroup2"),
        (0x6265_6570, "configfs"),
        (0xde5e_81e4, "efivarfs"),
        (0x6165_676c, "pstore"),
        (libc::BPF_FS_MAGIC, "bpffs"),
    ];
    // SAFETY: fstatfs on a valid descriptor into a zeroed statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Ok(()); // unknown: read it as any other file
    }
    match PSEUDO.iter().find(|(magic, _)| st.f_type == *magic) {
        Some((_, fs)) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "is a file of the kernel's {fs}, whose size is not its content, not an image; copy it to a regular file first"
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses what is neither a regular file nor a block device, saying what it is.
fn check_kind(meta: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() || t.is_block_device() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not an image: back up a regular file or a block device"),
    ))
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { self.shrank() } else { e })
    }

    fn next_data(&self, offset: u64) -> io::Result<Range<u64>> {
        let everything = offset..self.size;
        if !self.regular {
            return Ok(everything);
        }
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(start)) => start.min(self.size),
            // No data after `offset`: a hole to the end, unless the file is now shorter
            // than it was (then the bytes are gone, not zeros).
            Ok(None) => {
                if self.file.metadata()?.len() < self.size {
                    return Err(self.shrank());
                }
                return Ok(self.size..self.size);
            }
            // A filesystem without SEEK_DATA: read everything, as before.
            Err(_) => return Ok(everything),
        };
        let end = match self.seek(start, libc::SEEK_HOLE) {
            Ok(Some(end)) => end.clamp(start, self.size),
            _ => self.size,
        };
        Ok(start..end)
    }

    fn done_with(&self, offset: u64, len: u64) {
        // SAFETY: plain advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED);
        }
    }

    fn window(&self, offset: u64, len: u64) -> Option<io::Result<Arc<Window>>> {
        if !self.mappable.load(Ordering::Relaxed) || len == 0 {
            return None;
        }
        // SAFETY: the mapping is read-only and private to this process. If the file is
        // truncated while mapped, access raises SIGBUS, which the handler registered here
        // turns into a one-line error (the version stays incomplete); see sigbus.rs.
        let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len as usize).populate().map(&*self.file) };
        match map {
            Ok(m) => {
                let guarded = Some(super::sigbus::register(m.as_ptr(), m.len()));
                Some(Ok(Arc::new(Window { map: Some(m), file: self.file.clone(), offset, guarded })))
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::EACCES | libc::EINVAL)) => {
                self.mappable.store(false, Ordering::Relaxed);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_reported_and_a_shrunk_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"data", 4 << 20).unwrap();
        f.sync_all().unwrap();
        let src = FileSource::open(&path, true).unwrap();
        let first = src.next_data(0).unwrap();
        // Filesystems report holes in whole blocks (4 KiB here): the data's block.
        assert!(first.start > (3 << 20) && first.start <= 4 << 20 && first.end >= (4 << 20) + 4, "{first:?}");
        assert_eq!(src.next_data(first.end).unwrap(), (8 << 20)..(8 << 20), "a hole to the end");
        // After the file shrank, "no data past here" is not a hole: the bytes are gone.
        f.set_len(1 << 20).unwrap();
        let e = src.next_data(2 << 20).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
    }
}
