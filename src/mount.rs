//! The engine behind the FUSE filesystem: implements `keepfs_fs::Backend` over a
//! [`Repository`], and the one place where engine errors become errno values for it.

use crate::backup::BackupOptions;
use crate::cache::BlockCache;
use crate::draft::{Draft, DraftOptions};
use crate::error::Error;
use crate::image::{Image, Prefetcher};
use crate::repo::Repository;
use crate::version::{Status, VersionUid, check_label, check_name, check_snapshot};
use keepfs_fs::{Backend, DraftHandle, ImageHandle, ReadRef, VersionEntry};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

/// Label that marks a version made by writing to another version's `data`.
pub const COW_LABEL: &str = "keepfs.cow-of";

/// Turns an engine error into the errno the filesystem answers, after logging the full
/// message on the mount's stderr (the process that gets the errno cannot see it).
pub fn to_io(e: Error) -> io::Error {
    let errno = match &e {
        Error::VersionNotFound(_) => libc::ENOENT,
        Error::Invalid(_) | Error::Config(_) => libc::EINVAL,
        Error::Refused(_) => libc::EBUSY,
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
        _ => libc::EIO,
    };
    log(format_args!("keepfs: error: {e}"));
    io::Error::from_raw_os_error(errno)
}

/// A line on the mount's stderr (its log). `eprintln!` would panic a worker thread when
/// the log cannot be written (a full disk); a lost log line must not fail a request.
fn log(args: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(io::stderr().lock(), "{args}");
}

pub struct EngineBackend {
    repo: Arc<Repository>,
    cache: Arc<BlockCache>,
    prefetch: Arc<Prefetcher>,
}

impl EngineBackend {
    pub fn new(repo: Arc<Repository>) -> EngineBackend {
        let cache = Arc::new(BlockCache::new(repo.config.cache_bytes as usize));
        let prefetch = Arc::new(Prefetcher::start(cache.clone(), repo.config.storage_readers));
        EngineBackend { repo, cache, prefetch }
    }

    fn image(&self, uid: &str) -> Result<Image, Error> {
        let uid = VersionUid::parse(uid).map_err(|_| Error::VersionNotFound(uid.to_string()))?;
        self.repo.open_image(uid, self.cache.clone(), Some(self.prefetch.clone()))
    }

    fn draft(&self, opts: DraftOptions, replaces: Option<VersionUid>) -> io::Result<Box<dyn DraftHandle>> {
        let d = Draft::start(self.repo.clone(), opts).map_err(to_io)?;
        Ok(Box::new(DraftAdapter { draft: Some(d), repo: self.repo.clone(), replaces }))
    }

    fn draft_options(&self, backup: BackupOptions, base: Option<Arc<Image>>, streaming: bool) -> DraftOptions {
        let bs = base.as_ref().map(|b| b.block_size()).unwrap_or(self.repo.config.block_size) as u64;
        DraftOptions {
            backup,
            base,
            streaming,
            memory_blocks: ((self.repo.config.spool_memory_bytes / bs) as usize).max(2),
            spool_blocks: ((self.repo.config.spool_bytes / bs) as usize).max(4),
        }
    }
}

struct ImageAdapter(Image);

impl ImageHandle for ImageAdapter {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(offset, buf).map_err(to_io)
    }
    fn read_ref(&self, offset: u64, len: usize) -> io::Result<Option<ReadRef>> {
        Ok(self.0.read_ref(offset, len).map_err(to_io)?.map(|(block, range)| match block {
            Some(b) => ReadRef::Shared(b, range),
            None => ReadRef::Zeros(range.len()),
        }))
    }
    fn next_data(&self, offset: u64) -> Option<std::ops::Range<u64>> {
        self.0.index().next_data(offset)
    }
}

struct DraftAdapter {
    draft: Option<Draft>,
    repo: Arc<Repository>,
    /// The version this draft continues and replaces when committed.
    replaces: Option<VersionUid>,
}

impl DraftAdapter {
    fn d(&mut self) -> io::Result<&mut Draft> {
        self.draft.as_mut().ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }
}

impl DraftHandle for DraftAdapter {
    fn size(&self) -> u64 {
        self.draft.as_ref().map(|d| d.size()).unwrap_or(0)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.d()?.read_at(offset, buf).map_err(to_io)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.d()?.write_at(offset, data).map_err(to_io)
    }
    fn set_size(&mut self, size: u64) -> io::Result<()> {
        self.d()?.set_size(size).map_err(to_io)
    }
    fn set_name(&mut self, name: &str) -> io::Result<()> {
        check_name(name).map_err(to_io)?;
        let d = self.d()?;
        let uid = d.uid;
        d.set_name(name);
        self.repo.rename_version(uid, name).map_err(to_io)
    }
    fn labels(&self) -> Vec<(String, String)> {
        self.draft
            .as_ref()
            .map(|d| d.labels().iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
    fn set_label(&mut self, name: &str, value: &str) -> io::Result<()> {
        check_label(name, value).map_err(to_io)?;
        self.d()?.set_label(name, value).map_err(to_io)
    }
    fn remove_label(&mut self, name: &str) -> bool {
        self.draft.as_mut().is_some_and(|d| d.remove_label(name))
    }
    fn snapshot(&self) -> String {
        self.draft.as_ref().map(|d| d.snapshot().to_string()).unwrap_or_default()
    }
    fn set_snapshot(&mut self, snapshot: &str) -> io::Result<()> {
        check_snapshot(snapshot).map_err(to_io)?;
        self.d()?.set_snapshot(snapshot);
        Ok(())
    }
    fn commit(mut self: Box<Self>) -> io::Result<String> {
        let d = self.draft.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let v = d.commit().map_err(to_io)?;
        log(format_args!("keepfs: committed {} as {} ({} bytes)", v.name, v.uid, v.size));
        if let Some(old) = self.replaces {
            // The draft (and its read lock on `old`) is gone: drop the superseded version.
            self.repo.remove_superseded(old).map_err(to_io)?;
            log(format_args!("keepfs: {} replaces {old}, which it continued", v.uid));
        }
        Ok(v.uid.to_string())
    }
    fn discard(mut self: Box<Self>) -> io::Result<()> {
        if let Some(d) = self.draft.take() {
            let uid = d.uid;
            drop(d);
            self.repo.remove_incomplete(uid).map_err(to_io)?;
        }
        Ok(())
    }
}

impl Backend for EngineBackend {
    fn versions(&self) -> io::Result<Vec<VersionEntry>> {
        let list = self.repo.list(None).map_err(to_io)?;
        Ok(list
            .into_iter()
            .filter(|v| v.status != Status::Incomplete)
            .map(|v| VersionEntry {
                uid: v.uid.to_string(),
                name: v.name,
                snapshot: v.snapshot,
                date: v.date.into(),
                date_text: v.date.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                size: v.size,
                block_size: v.block_size,
                status: v.status.as_str().to_string(),
                protected: v.protected,
                labels: v.labels.into_iter().collect(),
            })
            .collect())
    }

    fn open_image(&self, uid: &str) -> io::Result<Arc<dyn ImageHandle>> {
        Ok(Arc::new(ImageAdapter(self.image(uid).map_err(to_io)?)))
    }

    fn new_incoming(&self, name: &str) -> io::Result<Box<dyn DraftHandle>> {
        // EINVAL before a draft exists (the engine would refuse the name at its start too).
        check_name(name).map_err(to_io)?;
        let backup = BackupOptions { name: name.to_string(), ..Default::default() };
        self.draft(self.draft_options(backup, None, true), None)
    }

    fn continue_incoming(&self, uid: &str) -> io::Result<Box<dyn DraftHandle>> {
        let base = Arc::new(self.image(uid).map_err(to_io)?);
        let old = base.version.uid;
        let backup = BackupOptions {
            name: base.version.name.clone(),
            snapshot: base.version.snapshot.clone(),
            labels: base.version.labels.clone(),
            ..Default::default()
        };
        let opts = self.draft_options(backup, Some(base), true);
        self.draft(opts, Some(old))
    }

    fn new_cow(&self, uid: &str) -> io::Result<Box<dyn DraftHandle>> {
        let base = Arc::new(self.image(uid).map_err(to_io)?);
        let mut labels: BTreeMap<String, String> = base.version.labels.clone();
        labels.insert(COW_LABEL.to_string(), base.version.uid.to_string());
        let backup = BackupOptions {
            name: base.version.name.clone(),
            snapshot: base.version.snapshot.clone(),
            labels,
            ..Default::default()
        };
        let opts = self.draft_options(backup, Some(base), false);
        self.draft(opts, None)
    }
}
