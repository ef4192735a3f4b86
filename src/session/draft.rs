//! Drafts: writable images that become versions when committed. `cp`/`dd` into the FUSE
//! `incoming/` directory writes a draft without a base; writes to a version's `data`
//! write a draft over that version (copy-on-write: the version itself never changes).
//!
//! Blocks flow through the same [`Ingest`] as `keepfs backup`. A block that has been
//! written to its end while streaming is handed over at once, so a copy never needs a
//! spool as large as the image; other touched blocks wait in a spool: in memory up to a
//! few blocks (buffers from the ingest's pool, which bounds memory), then in a sparse
//! spool file under the repository, itself bounded (past the bound the oldest blocks are
//! handed over; a later write to such a block reads it back).
//!
//! Nothing is held in memory for a block once it is handed over: which blocks were
//! touched are bitmaps ([`Slots`]), their ids a sparse file ([`Published`]). Writing a
//! 200 TB image costs the spool and 32 bytes of spool disk a block, not a map of it.

use crate::backup::BackupOptions;
use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::index::{BlockSet, block_count};
use crate::ingest::Ingest;
use crate::record::Published;
use crate::repo::{Repository, SessionGuard};
use crate::session::image::Image;
use crate::version::{Version, VersionUid};
use lru::LruCache;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What a block of a draft holds, where it differs from its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// In the spool (memory or spool file).
    Spooled,
    /// Handed to the ingest; its id comes from the ingest.
    Submitted,
    /// All zeros, whatever the base holds (cut off by a truncate).
    Zero,
}

/// The slot of every block a draft touched. Spooled blocks (bounded by the spool) are
/// listed one by one; the rest are two bitmaps: a quarter of a byte a block where
/// blocks are written together, some 64 bytes for each 256 blocks where they are
/// scattered.
#[derive(Default)]
struct Slots {
    /// Spooled or submitted blocks.
    data: BlockSet,
    /// Blocks cut off by a truncate.
    zero: BlockSet,
    /// The spooled ones among `data`.
    spooled: BTreeSet<u64>,
}

impl Slots {
    fn get(&self, idx: u64) -> Option<Slot> {
        if self.spooled.contains(&idx) {
            Some(Slot::Spooled)
        } else if self.data.contains(idx) {
            Some(Slot::Submitted)
        } else if self.zero.contains(idx) {
            Some(Slot::Zero)
        } else {
            None
        }
    }

    fn set(&mut self, idx: u64, slot: Slot) {
        match slot {
            Slot::Spooled => {
                self.spooled.insert(idx);
                self.data.insert(idx);
                self.zero.remove(idx);
            }
            Slot::Submitted => {
                self.spooled.remove(&idx);
                self.data.insert(idx);
                self.zero.remove(idx);
            }
            Slot::Zero => {
                self.spooled.remove(&idx);
                self.data.remove(idx);
                self.zero.insert(idx);
            }
        }
    }

    fn contains(&self, idx: u64) -> bool {
        self.data.contains(idx) || self.zero.contains(idx)
    }

    /// The first touched block at or after `from`, and its slot.
    fn next_at(&self, from: u64) -> Option<(u64, Slot)> {
        let i = match (self.data.next_at(from), self.zero.next_at(from)) {
            (Some(d), Some(z)) => d.min(z),
            (d, z) => d.or(z)?,
        };
        Some((i, self.get(i)?))
    }
}

pub struct DraftOptions {
    pub backup: BackupOptions,
    /// The version this draft starts from (copy-on-write), or none (an empty image).
    pub base: Option<Arc<Image>>,
    /// Hand a block over as soon as a write reaches its end (sequential writers).
    pub streaming: bool,
    /// Blocks kept in memory before spilling to the spool file.
    pub memory_blocks: usize,
    /// Blocks kept in the spool (memory and file) before the oldest are handed over.
    pub spool_blocks: usize,
}

struct Spool {
    mem: LruCache<u64, Vec<u8>>,
    memory_blocks: usize,
    /// Where the (unnamed) spool file is made.
    dir: PathBuf,
    file: Option<File>,
    on_disk: HashSet<u64>,
    /// Blocks whose buffer holds stale bytes outside the ranges written so far (kept
    /// here). They are zeroed only before anyone can see them ([`Spool::settle`]), so a
    /// block written from start to end is never zero-filled first.
    stale: HashMap<u64, Vec<(usize, usize)>>,
    bs: usize,
    /// Modes of the spool directory and file (owner-only unless configured).
    modes: crate::perms::Modes,
}

impl Spool {
    /// The spool file, made on first use: unnamed, so that it goes with the process
    /// however that ends (a `kill -9` left named ones behind for ever).
    fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            let dir = &self.dir;
            let f = self
                .modes
                .unnamed_file(dir)
                .map_err(|e| Error::io(format!("cannot make a spool file in {}", dir.display()), e))?;
            self.file = Some(f);
        }
        self.file.as_ref().ok_or_else(|| Error::Other("spool file vanished".into()))
    }

    fn punch(&mut self, idx: u64) {
        if self.on_disk.remove(&idx)
            && let Some(f) = &self.file
        {
            // SAFETY: fallocate on a valid descriptor; failure only leaves disk space used.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (idx * self.bs as u64) as i64,
                    self.bs as i64,
                );
            }
        }
    }

    fn contains(&self, idx: u64) -> bool {
        self.mem.contains(&idx) || self.on_disk.contains(&idx)
    }

    fn blocks(&self) -> usize {
        self.mem.len() + self.on_disk.len()
    }

    /// Zeroes what was never written of a stale block (it is in memory).
    fn settle(&mut self, idx: u64) {
        if let Some(written) = self.stale.remove(&idx)
            && let Some(buf) = self.mem.peek_mut(&idx)
        {
            let mut at = 0;
            for (start, end) in written {
                buf[at..start].fill(0);
                at = end;
            }
            buf[at..].fill(0);
        }
    }

    /// Records that `start..end` of block `idx` was written.
    fn note_write(&mut self, idx: u64, start: usize, end: usize) {
        if let Some(w) = self.stale.get_mut(&idx) {
            add_range(w, start, end);
            if w.len() == 1 && w[0] == (0, self.bs) {
                self.stale.remove(&idx);
            }
        }
    }

    /// Whether every byte of the block is defined (written, copied or zeroed).
    fn is_complete(&self, idx: u64) -> bool {
        !self.stale.contains_key(&idx)
    }

    /// Makes room in memory for one more block by spilling the least recently used.
    fn spill_one(&mut self, ingest: &Ingest) -> Result<()> {
        if self.mem.len() < self.memory_blocks {
            return Ok(());
        }
        if let Some(lru) = self.mem.peek_lru().map(|(k, _)| *k) {
            self.settle(lru);
        }
        if let Some((idx, buf)) = self.mem.pop_lru() {
            let at = idx * self.bs as u64;
            self.file()?.write_all_at(&buf, at).map_err(|e| Error::io("cannot write to the spool", e))?;
            self.on_disk.insert(idx);
            ingest.give_back(buf);
        }
        Ok(())
    }

    /// A new buffer of exactly one block for `idx`: a copy of `content`, or (without
    /// content) a block of zeros, made lazily.
    fn insert(&mut self, idx: u64, ingest: &Ingest, content: Option<&[u8]>) -> Result<()> {
        self.spill_one(ingest)?;
        let mut buf = ingest.take_buffer()?;
        buf.resize(self.bs, 0);
        match content {
            Some(c) => {
                buf.copy_from_slice(c);
                self.stale.remove(&idx);
            }
            None => {
                self.stale.insert(idx, Vec::new());
            }
        }
        self.punch(idx);
        self.mem.put(idx, buf);
        Ok(())
    }

    /// The block's buffer in memory (read back from the spool file if spilled).
    fn get_mut(&mut self, idx: u64, ingest: &Ingest) -> Result<&mut Vec<u8>> {
        if !self.mem.contains(&idx) {
            self.spill_one(ingest)?;
            let mut buf = ingest.take_buffer()?;
            buf.resize(self.bs, 0);
            let at = idx * self.bs as u64;
            self.file()?.read_exact_at(&mut buf, at).map_err(|e| Error::io("cannot read the spool", e))?;
            self.punch(idx);
            self.mem.put(idx, buf);
        }
        self.mem.get_mut(&idx).ok_or_else(|| Error::Other("spool block vanished".into()))
    }

    fn read(&mut self, idx: u64, within: usize, out: &mut [u8]) -> Result<()> {
        self.settle(idx);
        if let Some(b) = self.mem.get(&idx) {
            out.copy_from_slice(&b[within..within + out.len()]);
            return Ok(());
        }
        let at = idx * self.bs as u64 + within as u64;
        self.file()?.read_exact_at(out, at).map_err(|e| Error::io("cannot read the spool", e))
    }

    /// Takes a block out of the spool, as a buffer of one block.
    fn take(&mut self, idx: u64, ingest: &Ingest) -> Result<Vec<u8>> {
        self.get_mut(idx, ingest)?;
        self.settle(idx);
        self.mem.pop(&idx).ok_or_else(|| Error::Other("spool block vanished".into()))
    }

    fn discard(&mut self, idx: u64, ingest: &Ingest) {
        self.stale.remove(&idx);
        if let Some(b) = self.mem.pop(&idx) {
            ingest.give_back(b);
        }
        self.punch(idx);
    }
}

/// A writable image on its way to becoming a version.
pub struct Draft {
    repo: Arc<Repository>,
    pub uid: VersionUid,
    name: String,
    snapshot: String,
    labels: BTreeMap<String, String>,
    base: Option<Arc<Image>>,
    /// Blocks at or after this index no longer come from the base (a truncate cut them).
    base_cut: u64,
    /// The storage the draft's blocks go to (the base's, when there is one).
    storage: crate::storage::SharedStorage,
    bs: u64,
    size: u64,
    /// The blocks this draft touched (ranges of them are asked for: SEEK_DATA, a
    /// truncate, the commit).
    slots: Slots,
    /// The ids of the blocks handed to the ingest.
    published: Arc<Published>,
    spool: Spool,
    ingest: Option<Ingest>,
    streaming: bool,
    spool_blocks: usize,
    started: Instant,
    _session: SessionGuard,
}

fn too_large(size: u64) -> Error {
    Error::Io {
        context: format!("an image of {size} bytes is larger than a version may be"),
        source: std::io::Error::from_raw_os_error(libc::EFBIG),
    }
}

fn add_range(r: &mut Vec<(usize, usize)>, start: usize, end: usize) {
    r.push((start, end));
    r.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(r.len());
    for &(s, e) in r.iter() {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *r = merged;
}

impl Draft {
    /// Starts a draft: an `incomplete` version exists from now on, so a draft that is
    /// never committed (a killed mount) leaves nothing that looks valid.
    pub fn start(repo: Arc<Repository>, opts: DraftOptions) -> Result<Draft> {
        let session = repo.session(&format!("draft {}", opts.backup.name), true)?;
        let mut backup = opts.backup;
        if let Some(b) = &opts.base {
            backup.block_size = Some(b.block_size());
            backup.storage = Some(b.version.storage.clone());
        }
        let size = opts.base.as_ref().map(|b| b.size()).unwrap_or(0);
        let (uid, storage, bs) = repo.begin_version(&backup, size, session.id)?;
        let mut ctx = repo.ingest_context(&storage, bs, session.id)?;
        let storage = ctx.storage.clone();
        let published = Arc::new(Published::new(&repo.config.home.join("spool"), repo.config.modes)?);
        ctx.publish = Some(published.clone());
        // The spool's blocks in memory are buffers of the ingest's pool, held until they
        // spill or are submitted.
        ctx.held_by_caller = opts.memory_blocks.max(1);
        let ingest = Ingest::start(ctx);
        let spool = Spool {
            mem: LruCache::unbounded(),
            memory_blocks: opts.memory_blocks.max(1),
            dir: repo.config.home.join("spool"),
            file: None,
            on_disk: HashSet::new(),
            stale: HashMap::new(),
            bs: bs as usize,
            modes: repo.config.modes,
        };
        Ok(Draft {
            uid,
            name: backup.name,
            snapshot: backup.snapshot,
            labels: backup.labels,
            base_cut: u64::MAX,
            base: opts.base,
            storage,
            bs: bs as u64,
            size,
            slots: Slots::default(),
            published,
            spool,
            ingest: Some(ingest),
            streaming: opts.streaming,
            spool_blocks: opts.spool_blocks.max(2),
            started: Instant::now(),
            repo,
            _session: session,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_string();
    }
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    pub fn set_label(&mut self, k: &str, v: &str) -> Result<()> {
        crate::version::check_label(k, v)?;
        self.labels.insert(k.to_string(), v.to_string());
        Ok(())
    }
    pub fn remove_label(&mut self, k: &str) -> bool {
        self.labels.remove(k).is_some()
    }
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }
    pub fn set_snapshot(&mut self, s: &str) {
        self.snapshot = s.to_string();
    }

    fn ingest(&self) -> Result<&Ingest> {
        self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))
    }

    /// The base's id for block `idx`, if the block still comes from the base.
    /// The first range at or after `offset` that may hold data (written blocks, and the
    /// base's stored blocks where nothing was written or cut), `None` when the rest is a
    /// hole: SEEK_DATA/SEEK_HOLE and NBD block status of a file being written. Its end
    /// is looked for up to byte `until` (see [`crate::index::MappedIndex::next_data`]).
    /// Holes are skipped by the base's bitmaps and the touched blocks' order, never
    /// block by block: a 200 TB file being written answers at once.
    pub fn next_data(&self, offset: u64, until: u64) -> Option<std::ops::Range<u64>> {
        if offset >= self.size {
            return None;
        }
        let blocks = self.size.div_ceil(self.bs);
        let from = offset / self.bs;
        // The first touched block that holds data, and the first block of the base that
        // holds data and nothing touched: the earlier of the two.
        let touched = self.slots.data.next_at(from).filter(|&i| i < blocks);
        let base = self.base.as_ref().and_then(|b| {
            let end = self.base_cut.min(blocks).min(b.index().len()).min(touched.unwrap_or(u64::MAX));
            let mut at = from;
            loop {
                let (i, _) = b.index().data_in(at..end).next()?;
                if !self.slots.zero.contains(i) {
                    return Some(i);
                }
                at = i + 1;
            }
        });
        let first = match (touched, base) {
            (Some(t), Some(b)) => t.min(b),
            (t, b) => t.or(b)?,
        };
        // Its end: between touched blocks, the base's run of data (its bitmaps, no id
        // read); a touched block goes on with it unless it was cut (Zero).
        let last = until.div_ceil(self.bs).clamp(first + 1, blocks);
        let mut end = first + 1;
        while end < last {
            let next = self.slots.next_at(end).filter(|(i, _)| *i < last);
            let gap_end = next.map_or(last, |(i, _)| i);
            let run_end = self.base_run_end(end, gap_end);
            if run_end < gap_end {
                end = run_end;
                break;
            }
            match next {
                Some((i, slot)) if slot != Slot::Zero => end = i + 1,
                _ => {
                    end = gap_end;
                    break;
                }
            }
        }
        Some((first * self.bs).max(offset)..(end * self.bs).min(self.size))
    }

    /// The first block of `from..to` that the base does not hold as data (or that a
    /// truncate cut off), `to` when it holds them all: the end of its run of data from
    /// `from`, found from its bitmaps without reading an id.
    fn base_run_end(&self, from: u64, to: u64) -> u64 {
        let Some(base) = &self.base else { return from };
        let held = self.base_cut.min(base.index().len()).min(to);
        let mut at = from;
        for (i, _) in base.index().blocks_in(from..held.max(from)) {
            if i != at {
                break;
            }
            at += 1;
        }
        at.min(to)
    }

    /// Refuses a size past what a version may hold (EFBIG), before anything is allocated
    /// for it: `truncate -s 1E` must not take the mount down.
    fn check_size(&self, size: u64) -> Result<()> {
        if crate::index::check_block_count(size, self.bs as u32).is_err() {
            return Err(too_large(size));
        }
        Ok(())
    }

    /// The base image, when the bytes at `offset..offset + len` (inside one block) are
    /// still the base's: nothing written or cut there. A reader then takes them from the
    /// base's cached block without a copy and without waiting for the draft.
    pub fn untouched_base(&self, offset: u64, len: usize) -> Option<Arc<Image>> {
        let base = self.base.as_ref()?;
        let idx = offset / self.bs;
        let end = offset.checked_add(len as u64)?;
        let inside_block = (offset % self.bs) + len as u64 <= self.bs;
        let untouched = !self.slots.contains(idx) && idx < self.base_cut;
        (inside_block && untouched && end <= self.size && end <= base.size()).then(|| base.clone())
    }

    fn base_id(&self, idx: u64) -> BlockId {
        match &self.base {
            Some(b) if idx < self.base_cut => b.index().get(idx),
            _ => BlockId::SPARSE,
        }
    }

    /// Reads the current content of a block that is not spooled into `out` (one block).
    fn load_block(&self, idx: u64, slot: Option<Slot>, out: &mut [u8]) -> Result<()> {
        out.fill(0);
        let id = match slot {
            Some(Slot::Submitted) => self.ingest()?.wait_completed(idx)?,
            Some(Slot::Zero) => BlockId::SPARSE,
            // Spooled, yet not in the spool: reading its spool file failed earlier.
            Some(Slot::Spooled) => {
                return Err(Error::Other(format!(
                    "block {idx} of this file was lost from its spool by an earlier error; write the file again"
                )));
            }
            None => self.base_id(idx),
        };
        if !id.is_sparse() {
            // Through the base's cache where there is one (its blocks are shared).
            let data = match &self.base {
                Some(b) => b.cache().get(&self.storage, &id),
                None => crate::cache::fetch_block(self.storage.as_ref(), &id, crate::cache::Read::Cached).map(Arc::new),
            }
            .map_err(|e| match e {
                crate::cache::FetchError::Damaged(m) => Error::Damaged(format!("block {idx}: {m}")),
                crate::cache::FetchError::Unavailable(m) => Error::Other(format!("block {idx}: {m}")),
            })?;
            let n = data.len().min(out.len());
            out[..n].copy_from_slice(&data[..n]);
        }
        Ok(())
    }

    /// Brings block `idx` into the spool; `whole` says the caller overwrites all of it.
    fn prepare(&mut self, idx: u64, whole: bool) -> Result<()> {
        let slot = self.slots.get(idx);
        if slot == Some(Slot::Spooled) {
            return Ok(());
        }
        if slot == Some(Slot::Submitted) {
            // Never two submissions of one block in flight: the later must win.
            self.ingest()?.wait_completed(idx)?;
        }
        let needs_content =
            !whole && (slot == Some(Slot::Submitted) || (slot.is_none() && !self.base_id(idx).is_sparse()));
        let mut content = None;
        if needs_content {
            let mut b = vec![0u8; self.bs as usize];
            self.load_block(idx, slot, &mut b)?;
            content = Some(b);
        }
        let ingest = self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))?;
        self.spool.insert(idx, ingest, content.as_deref())?;
        self.slots.set(idx, Slot::Spooled);
        Ok(())
    }

    /// Hands a spooled block to the ingest (the last block only up to the image end).
    fn submit(&mut self, idx: u64) -> Result<()> {
        let ingest = self.ingest.as_mut().ok_or_else(|| Error::Other("draft already committed".into()))?;
        let mut buf = self.spool.take(idx, ingest)?;
        let len = (self.size.saturating_sub(idx * self.bs)).min(self.bs) as usize;
        buf.truncate(len);
        // Handed over from here on, even if the pipeline has stopped: a reader of the
        // block then gets the pipeline's error, not the base's bytes.
        self.slots.set(idx, Slot::Submitted);
        ingest.submit(idx, buf)
    }

    /// Keeps the spool within its bound by handing over the oldest blocks.
    fn bound_spool(&mut self) -> Result<()> {
        while self.spool.blocks() > self.spool_blocks {
            let oldest =
                self.spool.on_disk.iter().next().copied().or_else(|| self.spool.mem.peek_lru().map(|(k, _)| *k));
            match oldest {
                Some(idx) => self.submit(idx)?,
                None => break,
            }
        }
        Ok(())
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let bs = self.bs as usize;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| too_large(u64::MAX))?;
        if end > self.size {
            self.check_size(end)?;
            self.size = end;
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let idx = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (bs - within).min(data.len() - done);
            self.prepare(idx, within == 0 && n == bs)?;
            let ingest = self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))?;
            let buf = self.spool.get_mut(idx, ingest)?;
            buf[within..within + n].copy_from_slice(&data[done..done + n]);
            self.spool.note_write(idx, within, within + n);
            if self.streaming && within + n == bs && self.spool.is_complete(idx) {
                self.submit(idx)?;
            }
            done += n;
        }
        self.bound_spool()
    }

    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let len = out.len().min((self.size - offset) as usize);
        let bs = self.bs as usize;
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = pos / self.bs;
            let within = (pos % self.bs) as usize;
            let n = (bs - within).min(len - done);
            let slot = self.slots.get(idx);
            if slot == Some(Slot::Spooled) && self.spool.contains(idx) {
                self.spool.read(idx, within, &mut out[done..done + n])?;
            } else {
                let mut block = vec![0u8; bs];
                self.load_block(idx, slot, &mut block)?;
                out[done..done + n].copy_from_slice(&block[within..within + n]);
            }
            done += n;
        }
        Ok(len)
    }

    /// Truncates or extends the image; cut-off bytes read as zeros if it grows again.
    pub fn set_size(&mut self, new: u64) -> Result<()> {
        self.check_size(new)?;
        if new < self.size {
            let first_gone = new.div_ceil(self.bs);
            // Only blocks the draft holds need work (the base's are cut by `base_cut`):
            // a truncate costs what was written, not the size cut off.
            // Those already cut stay so; a submitted block's id is forgotten once
            // recorded, so that what the draft holds counts only what it keeps.
            let mut at = first_gone;
            while let Some(idx) = self.slots.data.next_at(at) {
                at = idx + 1;
                if self.slots.get(idx) == Some(Slot::Spooled) {
                    let ingest = self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))?;
                    self.spool.discard(idx, ingest);
                } else {
                    self.ingest()?.wait_completed(idx)?;
                    self.published.clear(idx, self.bs as u32)?;
                }
                self.slots.set(idx, Slot::Zero);
            }
            self.base_cut = self.base_cut.min(first_gone);
            let tail = (new % self.bs) as usize;
            if tail != 0 {
                let idx = new / self.bs;
                self.prepare(idx, false)?;
                let ingest = self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))?;
                self.spool.get_mut(idx, ingest)?;
                self.spool.settle(idx);
                let buf = self.spool.get_mut(idx, ingest)?;
                buf[tail..].fill(0);
            }
        }
        self.size = new;
        Ok(())
    }

    /// Turns the draft into a valid version: hands over what is still spooled, waits
    /// until every block is durable and commits the index.
    pub fn commit(mut self) -> Result<Version> {
        let n = block_count(self.size, self.bs as u32);
        let spooled: Vec<u64> = self.slots.spooled.iter().copied().collect();
        for idx in spooled {
            if idx < n {
                self.submit(idx)?;
            } else {
                let ingest = self.ingest.as_ref().ok_or_else(|| Error::Other("draft already committed".into()))?;
                self.spool.discard(idx, ingest);
                self.slots.set(idx, Slot::Zero);
            }
        }
        // A base block that was the base's short last block, or that is now longer or
        // shorter than in the base, must be stored again at its new length.
        if let Some(base) = self.base.clone() {
            let base_blocks = base.index().len();
            for idx in [base_blocks.saturating_sub(1), n.saturating_sub(1)] {
                if idx < n && idx < base_blocks && !self.slots.contains(idx) && !self.base_id(idx).is_sparse() {
                    let new_len = (self.size - idx * self.bs).min(self.bs);
                    if base.index().block_len(idx) != new_len {
                        self.prepare(idx, false)?;
                        self.submit(idx)?;
                    }
                }
            }
        }
        let ingest = self.ingest.take().ok_or_else(|| Error::Other("draft already committed".into()))?;
        let result = ingest.finish()?;
        let crate::record::Recorded::Published(_) = &result.recorded else {
            return Err(Error::Other("a draft's ingest published no ids".into()));
        };
        // The index goes into its file in block order, as a backup's does: the base's
        // data blocks (read from its mapped index, holes skipped) merged with the blocks
        // this draft touched. No map of the whole image is built: a few blocks written
        // to a mounted 200 TB version cost what they wrote, not the version's size.
        let mut index = self.repo.index_writer(self.bs as u32)?;
        let mut at = 0;
        let mut written = std::iter::from_fn(|| {
            let (i, slot) = self.slots.next_at(at).filter(|(i, _)| *i < n)?;
            at = i + 1;
            Some((i, slot))
        })
        .peekable();
        let mut ids = self.published.reader();
        // Bytes of the version's data blocks: the rest is sparse, as a backup counts it.
        let (size, bs) = (self.size, self.bs);
        let data_bytes = std::cell::Cell::new(0u64);
        let count = |idx: u64, id: &BlockId| {
            if !id.is_sparse() {
                data_bytes.set(data_bytes.get() + (size - idx * bs).min(bs));
            }
        };
        let mut push_written = |(idx, slot): (u64, Slot), index: &mut crate::index::IndexWriter| match slot {
            Slot::Submitted => {
                let id = ids.get(idx)?;
                count(idx, &id);
                index.push(idx, id)
            }
            _ => Ok(()),
        };
        if let Some(base) = &self.base {
            let end = self.base_cut.min(n).min(base.index().len());
            for (idx, id) in base.index().data_in(0..end) {
                while let Some(w) = written.next_if(|w| w.0 < idx) {
                    push_written(w, &mut index)?;
                }
                if let Some(w) = written.next_if(|w| w.0 == idx) {
                    push_written(w, &mut index)?;
                } else {
                    count(idx, &id);
                    index.push(idx, id)?;
                }
            }
        }
        for w in written {
            push_written(w, &mut index)?;
        }
        let index = index.finish(self.uid.0, self.size)?;
        let mut stats = result.stats;
        stats.duration_ms = self.started.elapsed().as_millis() as u64;
        stats.bytes_read = self.size;
        // Holes never written are sparse too; blocks kept from the base are deduplicated.
        stats.bytes_sparse = self.size - data_bytes.get().min(self.size);
        stats.bytes_deduplicated = data_bytes.get().saturating_sub(stats.bytes_written);
        self.repo.update_draft_fields(self.uid, &self.snapshot, &self.labels)?;
        drop(result);
        self.repo.commit_version(self.uid, self._session.id, index, stats)
    }
}
