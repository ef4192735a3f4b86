//! A storage in a local directory. Objects are written to `tmp/` under a unique name,
//! fsynced, renamed into place; the directories that received new names are fsynced in
//! one batch by `sync()`, before any version references the objects.
//!
//! Syncs are serialised by `sync_lock`, held across draining the dirty set and fsyncing
//! what was drained: a `sync()` that finds the set emptied by another one still running
//! waits for that one's fsyncs, so it never reports as durable a directory entry that is
//! not yet on disk. `sync_lock` is taken by nothing but `sync()` (puts only take
//! `dirty_dirs`, briefly), so holding it across the fsyncs makes no other path wait.

use super::{ListEntry, Storage, StorageError, StorageResult};
use crate::perms::Modes;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// A test hook run before a directory fsync.
#[cfg(test)]
type FsyncHook = std::sync::Arc<dyn Fn(&Path) + Send + Sync>;

pub struct FileStorage {
    name: String,
    root: PathBuf,
    tmp: PathBuf,
    /// Directories that got new entries since the last `sync()`.
    dirty_dirs: Mutex<HashSet<PathBuf>>,
    /// Serialises `sync()` calls (see the module comment).
    sync_lock: Mutex<()>,
    counter: AtomicU64,
    /// Modes of new objects and directories (owner-only unless configured).
    modes: Modes,
    /// Test hook run before each directory fsync (to make one slow on demand).
    #[cfg(test)]
    before_dir_fsync: Mutex<Option<FsyncHook>>,
}

impl FileStorage {
    /// Opens (creating when missing) a file storage rooted at `root`; what it creates is
    /// owner-only.
    pub fn open(name: &str, root: &Path) -> StorageResult<FileStorage> {
        FileStorage::open_with_modes(name, root, Modes::PRIVATE)
    }

    /// Opens a file storage whose new directories and objects get `modes`.
    pub fn open_with_modes(name: &str, root: &Path, modes: Modes) -> StorageResult<FileStorage> {
        let tmp = root.join("tmp");
        modes.create_dir_all(&tmp).map_err(|e| StorageError::Io {
            storage: name.to_string(),
            op: "create directory",
            key: tmp.display().to_string(),
            source: e,
        })?;
        Ok(FileStorage {
            name: name.to_string(),
            root: root.to_path_buf(),
            tmp,
            dirty_dirs: Mutex::new(HashSet::new()),
            sync_lock: Mutex::new(()),
            counter: AtomicU64::new(0),
            modes,
            #[cfg(test)]
            before_dir_fsync: Mutex::new(None),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> StorageResult<PathBuf> {
        let bad = key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            || key.starts_with("tmp/");
        if bad {
            return Err(self.err("use key", key, io::Error::new(io::ErrorKind::InvalidInput, "invalid key")));
        }
        Ok(self.root.join(key))
    }

    fn err(&self, op: &'static str, key: &str, source: io::Error) -> StorageError {
        StorageError::Io { storage: self.name.clone(), op, key: key.to_string(), source }
    }

    fn write_temp(&self, key: &str, data: &[u8]) -> StorageResult<PathBuf> {
        self.write_temp_with(key, |f| f.write_all(data))
    }

    /// A temporary file that `fill` wrote, synced: the object before its rename.
    fn write_temp_with(&self, key: &str, fill: impl FnOnce(&mut File) -> io::Result<()>) -> StorageResult<PathBuf> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{}.{}.{}", std::process::id(), n, key.replace('/', "_")));
        let mut f = self
            .modes
            .options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| self.err("create temporary file for", key, e))?;
        let r = fill(&mut f).and_then(|_| f.sync_data());
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(self.err("write", key, e));
        }
        // The object is on disk: its pages are clean, and a backup's objects are not
        // worth a place in the page cache (measured: filling fresh page-cache pages was
        // the largest cost of writing objects while `cp` fed incoming/).
        // SAFETY: advisory syscall on a valid descriptor.
        unsafe {
            libc::posix_fadvise(std::os::unix::io::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        Ok(tmp)
    }

    /// Renames a synced temporary file to the object's key (creating its directories).
    fn rename_into_place(&self, key: &str, tmp: PathBuf) -> StorageResult<()> {
        let path = self.path_of(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let renamed = fs::rename(&tmp, &path).or_else(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                self.modes.create_dir_all(&dir)?;
                // New directories must reach the disk too: remember every new level.
                let mut dirty = self.dirty_dirs.lock();
                let mut d = dir.as_path();
                while let Some(parent) = d.parent() {
                    dirty.insert(parent.to_path_buf());
                    if parent == self.root {
                        break;
                    }
                    d = parent;
                }
                drop(dirty);
                fs::rename(&tmp, &path)
            } else {
                Err(e)
            }
        });
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(self.err("rename into place", key, e));
        }
        self.dirty_dirs.lock().insert(dir);
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Storage for FileStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn codec(&self) -> &crate::transform::Codec {
        crate::transform::Codec::plain()
    }

    /// A new header over the same payload: the object is copied inside the filesystem
    /// (`copy_file_range`, a reflink where the filesystem has them), the header written
    /// over the copy, and the copy fsynced and renamed into place. Never a partial
    /// in-place write: a crash leaves the old object or the new one.
    /// Copies the file inside the filesystem (a reflink where the filesystem has them),
    /// writes the new prefix over the copy and renames it into place. The prefix was
    /// computed from `object`, the caller's read: if the copy does not start as `object`
    /// does (a cleanup and a backup replaced the object since, the same content under
    /// another data key), `object` itself is written with the new prefix instead, never
    /// the new bytes under a header computed from the old. A missing file stays missing.
    fn replace_prefix(&self, key: &str, object: &[u8], prefix: &[u8]) -> StorageResult<()> {
        let path = self.path_of(key)?;
        if object.len() < prefix.len() {
            return Err(self.err(
                "rewrite header of",
                key,
                io::Error::new(io::ErrorKind::InvalidData, "object shorter than its new header"),
            ));
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{}.{}.{}", std::process::id(), n, key.replace('/', "_")));
        let r = (|| -> io::Result<()> {
            fs::copy(&path, &tmp)?;
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().read(true).write(true).open(&tmp)?;
            let mut head = vec![0u8; prefix.len()];
            let same = f.metadata()?.len() == object.len() as u64
                && f.read_exact_at(&mut head, 0).is_ok()
                && head == object[..prefix.len()];
            if !same {
                f.set_len(0)?;
                f.write_all_at(&object[prefix.len()..], prefix.len() as u64)?;
            }
            f.write_all_at(prefix, 0)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(if e.kind() == io::ErrorKind::NotFound {
                StorageError::NotFound { storage: self.name.clone(), key: key.to_string() }
            } else {
                self.err("rewrite header of", key, e)
            });
        }
        self.dirty_dirs.lock().insert(path.parent().unwrap_or(&self.root).to_path_buf());
        Ok(())
    }

    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        self.path_of(key)?;
        let tmp = self.write_temp(key, data)?;
        self.rename_into_place(key, tmp)
    }

    /// Linked into place (link(2) never replaces a name), so of two writers one wins.
    fn put_new(&self, key: &str, data: &[u8]) -> StorageResult<bool> {
        let path = self.path_of(key)?;
        let tmp = self.write_temp(key, data)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let linked = match fs::hard_link(&tmp, &path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.modes.create_dir_all(&dir).and_then(|_| fs::hard_link(&tmp, &path))
            }
            r => r,
        };
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                self.dirty_dirs.lock().insert(dir);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.err("create", key, e)),
        }
    }

    fn put_large(&self, key: &str, object: &super::LargeObject<'_>) -> StorageResult<()> {
        self.path_of(key)?;
        let tmp = self.write_temp_with(key, |f| {
            let mut r = object.reader()?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            std::io::copy(&mut r, &mut w)?;
            w.flush()
        })?;
        self.rename_into_place(key, tmp)
    }

    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let path = self.path_of(key)?;
        let f = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StorageError::NotFound { storage: self.name.clone(), key: key.to_string() }
            } else {
                self.err("read", key, e)
            }
        })?;
        let size = f.metadata().map_err(|e| self.err("read", key, e))?.len();
        let n = size.saturating_sub(offset).min(len) as usize;
        let mut out = vec![0u8; n];
        f.read_exact_at(&mut out, offset).map_err(|e| self.err("read", key, e))?;
        Ok(out)
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        let path = self.path_of(key)?;
        fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StorageError::NotFound { storage: self.name.clone(), key: key.to_string() }
            } else {
                self.err("read", key, e)
            }
        })
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        let path = self.path_of(key)?;
        match fs::metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn list_each(&self, prefix: &str, each: &mut dyn FnMut(ListEntry) -> ControlFlow<()>) -> StorageResult<()> {
        // Walk only the top-level directory the prefix names, then filter by prefix.
        let top = prefix.split('/').next().unwrap_or("");
        let start = if top.is_empty() { self.root.clone() } else { self.root.join(top) };
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err("list", &dir.display().to_string(), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| self.err("list", &dir.display().to_string(), e))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(|e| self.err("stat", &path.display().to_string(), e))?;
                if path == self.tmp {
                    continue;
                }
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if key.starts_with(prefix)
                    && each(ListEntry {
                        key,
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    })
                    .is_break()
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> StorageResult<()> {
        // Held until the drained directories are on disk: a concurrent sync whose puts'
        // directories this one drained waits here for them (module comment).
        let _serial = self.sync_lock.lock();
        let dirs: Vec<PathBuf> = self.dirty_dirs.lock().drain().collect();
        for d in &dirs {
            #[cfg(test)]
            if let Some(hook) = self.before_dir_fsync.lock().clone() {
                hook(d);
            }
            if let Err(e) = fsync_dir(d) {
                // Put them back: the next sync must try again.
                self.dirty_dirs.lock().extend(dirs.iter().cloned());
                return Err(self.err("fsync directory", &d.display().to_string(), e));
            }
        }
        Ok(())
    }

    fn purge_temporary(&self, older_than: SystemTime) -> StorageResult<u64> {
        let mut n = 0;
        let rd = fs::read_dir(&self.tmp).map_err(|e| self.err("list", "tmp", e))?;
        for entry in rd.flatten() {
            let old = entry.metadata().and_then(|m| m.modified()).map(|m| m < older_than).unwrap_or(false);
            if old && fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::open("t", dir.path()).unwrap();
        s.put("blocks/aa/bb/x1", b"one").unwrap();
        s.put("blocks/aa/cc/x2", b"two").unwrap();
        s.put("versions/V0000000001", b"v").unwrap();
        s.sync().unwrap();
        assert_eq!(s.get("blocks/aa/bb/x1").unwrap(), b"one");
        assert!(s.exists("blocks/aa/cc/x2").unwrap());
        let keys: Vec<String> = s.list("blocks/").unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, vec!["blocks/aa/bb/x1", "blocks/aa/cc/x2"]);
        s.delete("blocks/aa/bb/x1").unwrap();
        s.delete("blocks/aa/bb/x1").unwrap();
        assert!(matches!(s.get("blocks/aa/bb/x1"), Err(StorageError::NotFound { .. })));
        assert!(s.put("../escape", b"x").is_err());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary files left");
    }

    /// A name made only where none is: of many writers racing for it, exactly one makes
    /// it and the others leave it as it was (the owner of a storage is claimed so).
    #[test]
    fn put_new_makes_a_name_once_among_racing_writers() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(FileStorage::open("t", dir.path()).unwrap());
        let made: Vec<bool> = (0..8u8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.put_new("owner", &[i; 64]).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(made.iter().filter(|m| **m).count(), 1, "{made:?}");
        let winner = made.iter().position(|m| *m).unwrap() as u8;
        assert_eq!(s.get("owner").unwrap(), vec![winner; 64]);
        assert!(s.put_new("sub/dir/new", b"x").unwrap(), "its directories are made");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary files left");
    }

    /// Key rotation read an object, and a cleanup and a backup replaced it (same content,
    /// another data key) before the new header was written: the header must go with the
    /// copy it was computed from, never onto the bytes now in the file.
    #[test]
    fn a_new_header_goes_with_the_copy_it_was_computed_from() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::open("t", dir.path()).unwrap();
        let key = "blocks/aa/bb/obj";
        s.put(key, b"HEAD-1|payload sealed by data key 1").unwrap();
        let read = s.get_fresh(key).unwrap();
        s.put(key, b"HEAD-2|payload sealed by data key 2").unwrap();
        s.replace_prefix(key, &read, b"HEAD-R").unwrap();
        s.sync().unwrap();
        assert_eq!(s.get_fresh(key).unwrap(), b"HEAD-R|payload sealed by data key 1");
        // Unchanged since read: the header goes onto the filesystem's copy.
        let read = s.get_fresh(key).unwrap();
        s.replace_prefix(key, &read, b"HEAD-S").unwrap();
        assert_eq!(s.get_fresh(key).unwrap(), b"HEAD-S|payload sealed by data key 1");

        s.delete(key).unwrap();
        assert!(matches!(s.replace_prefix(key, &read, b"HEAD-R"), Err(StorageError::NotFound { .. })));
        assert!(!s.exists(key).unwrap(), "a deleted object is not brought back");
        assert!(s.replace_prefix("blocks/aa/bb/x", b"abc", b"abcd").is_err(), "a header longer than the object");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary files left");
    }

    /// Two writers put objects into one directory; the first to call `sync()` drains the
    /// directory and is stuck in its fsync. The second writer's `sync()` must not return
    /// (and let it record its object as durable) before that fsync is done.
    #[test]
    fn a_sync_waits_for_a_running_sync_that_took_its_directories() {
        use std::sync::{Arc, mpsc};
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(FileStorage::open("t", dir.path()).unwrap());
        s.put("blocks/aa/bb/first", b"1").unwrap();
        s.put("blocks/aa/bb/second", b"2").unwrap();
        let log = Arc::new(Mutex::new(Vec::<&'static str>::new()));
        let (entered_tx, entered) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(Some(release_rx));
        let hook_log = log.clone();
        let entered_tx = Mutex::new(entered_tx);
        *s.before_dir_fsync.lock() = Some(Arc::new(move |_d: &Path| {
            // Only the first fsync is slow: it waits until the test releases it.
            if let Some(rx) = release_rx.lock().take() {
                let _ = entered_tx.lock().send(());
                let _ = rx.recv();
                hook_log.lock().push("first sync's fsync released");
            }
        }));
        let first = {
            let s = s.clone();
            std::thread::spawn(move || s.sync())
        };
        entered.recv().unwrap();
        // The first sync has drained the directory and sits in its fsync.
        let (done_tx, done) = mpsc::channel();
        let second = {
            let (s, log) = (s.clone(), log.clone());
            std::thread::spawn(move || {
                let r = s.sync();
                log.lock().push("second sync returned");
                let _ = done_tx.send(());
                r
            })
        };
        // Give the second sync the chance to return early (it did, at once, before the
        // fix); a correct one stays blocked however long this waits.
        let returned_early = done.recv_timeout(std::time::Duration::from_millis(500)).is_ok();
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        assert!(!returned_early, "the second sync returned while the first was still fsyncing");
        assert_eq!(*log.lock(), vec!["first sync's fsync released", "second sync returned"]);
    }
}
