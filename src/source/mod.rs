//! Where backups read from and restores write to, named by URL: `file:///path` (a regular
//! file or a block device), `null://SIZE` (zeros, for tests and benchmarks) and
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]` (Ceph RBD, with cargo feature `rbd`; see
//! [`crate::rbd`]).

pub mod file;
pub mod null;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod sigbus;

use crate::units::parse_size;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// A parsed source or target URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    File(PathBuf),
    Null(u64),
    Rbd(crate::rbd::Spec),
}

impl Url {
    /// Parses `file:///path`, `null://SIZE`, or a bare path, which names that file (a
    /// relative one against the working directory). `file://` needs an absolute path:
    /// `file://disk.img` would silently name `/disk.img` in other tools.
    pub fn parse(s: &str) -> Result<Url, String> {
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("'{s}' names no file: use file:///absolute/path"));
            }
            // RFC 8089: `file://localhost/p` is the local `/p`.
            if let Some(rest) = path.get(..10).filter(|h| h.eq_ignore_ascii_case("localhost/")).map(|_| &path[9..]) {
                return Ok(Url::File(PathBuf::from(rest)));
            }
            if !path.starts_with('/') {
                return Err(format!(
                    "'{s}' is a relative path in a URL: use {} (or just the path)",
                    Url::File(absolute(path)?)
                ));
            }
            return Ok(Url::File(PathBuf::from(path)));
        }
        if let Some(body) = s.strip_prefix("rbd://").or_else(|| s.strip_prefix("rbd:")) {
            return crate::rbd::Spec::parse(body, s).map(Url::Rbd);
        }
        if let Some(size) = s.strip_prefix("null://") {
            return parse_size(size).map(Url::Null).map_err(|e| format!("'{s}': {e}"));
        }
        if s.contains("://") {
            let scheme = s.split("://").next().unwrap_or("");
            return Err(format!(
                "'{s}': unsupported scheme '{scheme}' (use a path, file:///path, null://SIZE or rbd:POOL/IMAGE[@SNAP])"
            ));
        }
        if s.is_empty() {
            return Err("an empty source or target: give a path, file:///path or null://SIZE".into());
        }
        Ok(Url::File(absolute(s)?))
    }
}

/// `path` made absolute against the working directory.
fn absolute(path: &str) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("cannot resolve '{path}' against the working directory: {e}"))
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Url::File(p) => write!(f, "file://{}", p.display()),
            Url::Null(n) => write!(f, "null://{n}"),
            Url::Rbd(spec) => write!(f, "{spec}"),
        }
    }
}

/// An image to back up: a size and positional reads. Shared by the reader threads.
pub trait Source: Send + Sync {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; `buf` never reaches past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Tells the OS the range has been processed and need not stay cached.
    fn done_with(&self, _offset: u64, _len: u64) {}
    /// The first range at or after `offset` that may hold data (`size()..size()` when the
    /// rest is a hole). A backup records the holes between such ranges as sparse without
    /// reading them. Sources that cannot tell answer `offset..size()`: all may be data.
    fn next_data(&self, offset: u64) -> io::Result<Range<u64>> {
        Ok(offset..self.size())
    }
    /// A read-only mapping of `len` bytes at `offset` (a multiple of
    /// [`file::WINDOW_BYTES`]), where the source can be mapped.
    fn window(&self, _offset: u64, _len: u64) -> Option<io::Result<Arc<file::Window>>> {
        None
    }
    /// The extents `(offset, length)` changed since snapshot `snap` of this source, for
    /// `backup --diff-from`; only sources with snapshots (RBD) can answer.
    fn changed_since(&self, _snap: &str, _whole_object: bool) -> crate::error::Result<Vec<(u64, u64)>> {
        Err(crate::error::Error::Invalid(
            "--diff-from needs an RBD source (rbd:POOL/IMAGE@SNAP); for other sources use --hints".into(),
        ))
    }
    /// How many reads the source serves well at once (network sources more than the
    /// configured `source_readers`); 0 leaves the configuration's number.
    fn parallel_reads(&self) -> usize {
        0
    }
}

/// A restore target that is not a file: an RBD image. Writes may be queued; errors of
/// queued writes come back from a later call.
pub trait BlockTarget: Send + Sync {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the range read as zeros without writing them (`restore --sparse`).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reads back what the target holds (after [`BlockTarget::settle`] for written data).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Waits for every queued write.
    fn settle(&self) -> io::Result<()>;
    /// Makes everything durable and puts the image in place under its final name.
    fn finish(self: Box<Self>) -> crate::error::Result<()>;
}

/// Opens a source for reading; `mmap` allows reading regular files through mappings.
/// A source that is missing, unreadable or not an image (a directory, a character
/// device, a FIFO) is the user's input error (exit 2); other failures are I/O errors.
pub fn open_source(url: &Url, mmap: bool, config: &crate::config::Config) -> crate::error::Result<Box<dyn Source>> {
    use crate::error::Error;
    let opened: io::Result<Box<dyn Source>> = match url {
        Url::File(p) => file::FileSource::open(p, mmap).map(|s| Box::new(s) as Box<dyn Source>),
        Url::Null(n) => Ok(Box::new(null::NullSource::new(*n))),
        Url::Rbd(spec) => return Ok(crate::rbd::open_source(spec, &config.rbd)?),
    };
    opened.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::Invalid(format!("source {url} does not exist")),
        io::ErrorKind::PermissionDenied => Error::Invalid(format!("source {url} is not readable (permission denied)")),
        io::ErrorKind::InvalidInput => Error::Invalid(format!("source {url} {e}")),
        _ => Error::io(format!("cannot open source {url}"), e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(Url::parse("file:///tmp/x").unwrap(), Url::File("/tmp/x".into()));
        assert_eq!(Url::parse("null://200G").unwrap(), Url::Null(200 << 30));
        assert_eq!(Url::parse("/tmp/x").unwrap(), Url::File("/tmp/x".into()), "a bare path is that file");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(Url::parse("disk.img").unwrap(), Url::File(cwd.join("disk.img")));
        let e = Url::parse("file://disk.img").unwrap_err();
        assert!(
            e.contains("relative path") && e.contains(&format!("file://{}", cwd.join("disk.img").display())),
            "{e}"
        );
        assert!(Url::parse("").is_err());
        assert!(Url::parse("s3://pool/img").unwrap_err().contains("unsupported scheme 's3'"));
        let rbd = crate::rbd::Spec::parse("pool/img@s", "").unwrap();
        assert_eq!(Url::parse("rbd://pool/img@s").unwrap(), Url::Rbd(rbd.clone()), "backy2's form");
        assert_eq!(Url::parse("rbd:pool/img@s").unwrap(), Url::Rbd(rbd), "Benji's form");
        assert!(Url::parse("rbd:img").unwrap_err().contains("rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]"));
        assert!(Url::parse("null://abc").is_err());
        assert!(Url::parse("file://").is_err());
        assert_eq!(Url::parse("file://localhost/tmp/x").unwrap(), Url::File("/tmp/x".into()), "RFC 8089");
        assert_eq!(Url::parse("file://LocalHost/tmp/x").unwrap(), Url::File("/tmp/x".into()));
    }
}
