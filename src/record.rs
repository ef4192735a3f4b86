//! Where an ingest records the id of each block it completes. A draft (FUSE, NBD) writes
//! blocks in any order and again, so its ids go to a sparse file, one slot a block
//! ([`Published`]), where the draft waits for a block it handed over and its commit
//! reads them back in block order; a backup hands each block over once, in roughly
//! increasing order, so its blocks go straight into the version's index file
//! ([`IndexWriter`]) as the *frontier* (the first block not completed yet) passes them.
//! Blocks completed past the frontier wait in a small ordered map; the readers stay
//! within [`Frontier::ahead`] blocks of it, which is what bounds that map. Neither
//! holds anything in memory for a block once it is completed: memory does not grow
//! with the image or with what was written.
//!
//! Locks: [`Frontier`]'s mutex, and [`Published`]'s (the blocks in flight); never both,
//! and neither across file I/O.

use crate::block::{BlockId, ID_LEN};
use crate::error::{Error, Result};
use crate::index::{IndexWriter, MAX_DATA_BLOCKS_PER_VERSION, too_much_data};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How far a backup's index is written, for the readers to keep within reach of.
pub struct Frontier {
    at: AtomicU64,
    lock: Mutex<()>,
    moved: Condvar,
    ended: AtomicBool,
    /// How many blocks past the frontier a reader may submit.
    pub ahead: u64,
}

impl Frontier {
    pub fn new(ahead: u64) -> Frontier {
        Frontier {
            at: AtomicU64::new(0),
            lock: Mutex::new(()),
            moved: Condvar::new(),
            ended: AtomicBool::new(false),
            ahead,
        }
    }

    /// Waits until block `idx` may be submitted: fewer than `ahead` blocks past the
    /// frontier. Returns early once the ingest has ended (its error is the caller's to
    /// find when it submits) or `stop` says so (another reader failed).
    pub fn wait_for(&self, idx: u64, stop: impl Fn() -> bool) {
        if idx < self.at.load(Ordering::Acquire).saturating_add(self.ahead) {
            return;
        }
        let mut guard = self.lock.lock();
        while idx >= self.at.load(Ordering::Acquire).saturating_add(self.ahead)
            && !self.ended.load(Ordering::Acquire)
            && !stop()
        {
            self.moved.wait_for(&mut guard, Duration::from_millis(100));
        }
    }

    fn advance(&self, at: u64) {
        self.at.store(at, Ordering::Release);
        let _g = self.lock.lock();
        self.moved.notify_all();
    }

    /// The ingest ended (finished or failed): nobody waits any more.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _g = self.lock.lock();
        self.moved.notify_all();
    }
}

/// A completed block (or run of sparse blocks) waiting for the frontier.
enum Waiting {
    Id(BlockId),
    Sparse(u64),
}

/// A backup's blocks on their way into its index file, in block order.
pub struct Ordered {
    writer: IndexWriter,
    waiting: BTreeMap<u64, Waiting>,
    frontier: std::sync::Arc<Frontier>,
}

impl Ordered {
    pub fn new(writer: IndexWriter, frontier: std::sync::Arc<Frontier>) -> Ordered {
        Ordered { writer, waiting: BTreeMap::new(), frontier }
    }

    fn put(&mut self, idx: u64, w: Waiting) -> Result<()> {
        if idx != self.writer.at() {
            if idx < self.writer.at() || self.waiting.insert(idx, w).is_some() {
                return Err(Error::Other(format!("block {idx} of the backup was recorded twice")));
            }
            return Ok(());
        }
        self.write(idx, w)?;
        while let Some(e) = self.waiting.first_entry() {
            if *e.key() != self.writer.at() {
                break;
            }
            let (idx, w) = e.remove_entry();
            self.write(idx, w)?;
        }
        self.frontier.advance(self.writer.at());
        Ok(())
    }

    fn write(&mut self, idx: u64, w: Waiting) -> Result<()> {
        match w {
            Waiting::Id(id) => self.writer.push(idx, id),
            Waiting::Sparse(n) => {
                self.writer.skip(n);
                Ok(())
            }
        }
    }

    /// The index writer, once every block handed over is written: a block still
    /// waiting means one before it never came (a bug, reported rather than written as
    /// sparse).
    fn into_writer(self) -> Result<IndexWriter> {
        if let Some((&idx, _)) = self.waiting.first_key_value() {
            return Err(Error::Other(format!(
                "block {} of the backup was never recorded (block {idx} and later were)",
                self.writer.at()
            )));
        }
        Ok(self.writer)
    }
}

/// A draft's blocks as its ingest completes them: the id of block `idx` at byte
/// `idx * 32` of an unnamed sparse file in the spool directory (gone with the process,
/// whatever ends it; a hole reads as a sparse block), and in memory only the blocks
/// handed over and not completed yet. It costs 32 bytes of spool disk a block written
/// and no memory: a `dd` of 200 TB into `incoming/` holds no map of what it wrote.
pub struct Published {
    file: File,
    dir: PathBuf,
    /// Blocks handed over whose id is not in the file yet.
    in_flight: Mutex<HashSet<u64>>,
    changed: Condvar,
    /// Data (non-sparse) blocks in the file.
    data: AtomicU64,
}

impl Published {
    /// An empty record in `dir` (created with `modes` if need be).
    pub fn new(dir: &Path, modes: crate::perms::Modes) -> Result<Published> {
        let io = |e| Error::io(format!("cannot make a block id file in {}", dir.display()), e);
        let file = modes.unnamed_file(dir).map_err(io)?;
        Ok(Published {
            file,
            dir: dir.to_path_buf(),
            in_flight: Mutex::new(HashSet::new()),
            changed: Condvar::new(),
            data: AtomicU64::new(0),
        })
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        Error::io(format!("cannot keep block ids in {}", self.dir.display()), e)
    }

    /// Block `idx` is handed over: readers of it wait until its id is recorded. A block
    /// is never handed over again before its id is (the draft waits for it): two in
    /// flight could complete out of order.
    pub fn expect(&self, idx: u64) {
        let new = self.in_flight.lock().insert(idx);
        debug_assert!(new, "block {idx} handed over while in flight");
    }

    /// Fills `buf` with the ids from block `first` on; past the file's end they are
    /// zeros (sparse), as in a hole.
    fn read_ids(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], first * ID_LEN as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
        buf[got..].fill(0);
        Ok(())
    }

    /// The id recorded for `idx` (sparse where none was).
    pub fn get(&self, idx: u64) -> Result<BlockId> {
        let mut id = [0u8; ID_LEN];
        self.read_ids(idx, &mut id)?;
        Ok(BlockId(id))
    }

    fn write(&self, idx: u64, id: BlockId, block_size: u32) -> Result<()> {
        let old = self.get(idx)?;
        if old.is_sparse() && id.is_sparse() {
            return Ok(()); // a hole stays a hole: zeros written take no spool disk
        }
        self.file.write_all_at(&id.0, idx * ID_LEN as u64).map_err(|e| self.io_error(e))?;
        match (old.is_sparse(), id.is_sparse()) {
            (true, false) => {
                let n = self.data.fetch_add(1, Ordering::Relaxed) + 1;
                // Refused as soon as it is known, not at the commit.
                if n > MAX_DATA_BLOCKS_PER_VERSION {
                    return Err(too_much_data(n, block_size));
                }
            }
            (false, true) => {
                self.data.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Ok(())
    }

    /// Records `id` for block `idx` and wakes its readers. A block that could not be
    /// recorded stays in flight: its readers wait until the ingest's failure reaches
    /// them, never reading what the file held before.
    fn put(&self, idx: u64, id: BlockId, block_size: u32) -> Result<()> {
        self.write(idx, id, block_size)?;
        self.in_flight.lock().remove(&idx);
        self.changed.notify_all();
        Ok(())
    }

    /// Forgets block `idx`'s id (cut off by a truncate): it reads as sparse again.
    pub fn clear(&self, idx: u64, block_size: u32) -> Result<()> {
        self.write(idx, BlockId::SPARSE, block_size)
    }

    /// Waits until block `idx`, if handed over, is recorded, and returns its id.
    /// `stopped` says whether the ingest has failed (then nothing more is recorded).
    pub fn wait(&self, idx: u64, stopped: impl Fn() -> Option<Error>) -> Result<BlockId> {
        {
            let mut in_flight = self.in_flight.lock();
            while in_flight.contains(&idx) {
                if let Some(e) = stopped() {
                    return Err(e);
                }
                self.changed.wait_for(&mut in_flight, Duration::from_millis(200));
            }
        }
        self.get(idx)
    }

    /// A reader of the ids in increasing block order, a window of them at a time (a
    /// commit's walk over what was written: one read per 2048 blocks, not one each).
    pub fn reader(&self) -> PublishedReader<'_> {
        PublishedReader { p: self, first: u64::MAX, ids: Vec::new() }
    }
}

/// See [`Published::reader`].
pub struct PublishedReader<'a> {
    p: &'a Published,
    first: u64,
    ids: Vec<u8>,
}

impl PublishedReader<'_> {
    const WINDOW: u64 = 2048;

    pub fn get(&mut self, idx: u64) -> Result<BlockId> {
        let at = idx.wrapping_sub(self.first);
        if self.first == u64::MAX || at >= Self::WINDOW {
            self.first = idx;
            self.ids.resize((Self::WINDOW as usize) * ID_LEN, 0);
            self.p.read_ids(idx, &mut self.ids)?;
        }
        let at = (idx - self.first) as usize * ID_LEN;
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&self.ids[at..at + ID_LEN]);
        Ok(BlockId(id))
    }
}

/// Where an ingest records each block's id.
pub enum Record {
    Published(std::sync::Arc<Published>),
    Ordered(Box<Ordered>),
}

/// What an ingest recorded, once it finished.
pub enum Recorded {
    /// Every block by index (sparse where none was submitted).
    Published(std::sync::Arc<Published>),
    /// The backup's index, written up to its last block handed over.
    Index(IndexWriter),
}

impl Record {
    /// Block `idx` holds `id` (sparse or not).
    pub fn set(&mut self, idx: u64, id: BlockId, block_size: u32) -> Result<()> {
        match self {
            Record::Published(p) => p.put(idx, id, block_size),
            Record::Ordered(o) => o.put(idx, Waiting::Id(id)),
        }
    }

    /// Blocks `first..first + count` are sparse (a hole, or blocks not read).
    pub fn sparse(&mut self, first: u64, count: u64, block_size: u32) -> Result<()> {
        match self {
            Record::Published(_) => {
                for idx in first..first.saturating_add(count) {
                    self.set(idx, BlockId::SPARSE, block_size)?;
                }
                Ok(())
            }
            Record::Ordered(o) if count > 0 => o.put(first, Waiting::Sparse(count)),
            Record::Ordered(_) => Ok(()),
        }
    }

    /// What was recorded. `complete`: every block was handed over, so one still
    /// waiting means one before it never came, an error (never written as a hole); an
    /// ingest cut short by a failed reader has such gaps, and its caller discards this.
    pub fn finish(self, complete: bool) -> Result<Recorded> {
        Ok(match self {
            Record::Published(p) => Recorded::Published(p),
            Record::Ordered(o) if complete => Recorded::Index(o.into_writer()?),
            Record::Ordered(o) => Recorded::Index(o.writer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{BlockIndex, IndexWriter};
    use std::sync::Arc;

    fn id(n: u64) -> BlockId {
        let mut b = [7u8; 32];
        b[..8].copy_from_slice(&n.to_le_bytes());
        BlockId(b)
    }

    /// A draft's ids: out of order and again, read back one by one and in order, holes
    /// sparse, a cleared block forgotten, and its data blocks counted as they are now.
    #[test]
    fn published_ids_read_back_as_last_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let p = Published::new(dir.path(), crate::perms::Modes::default()).unwrap();
        let mut record = Record::Published(Arc::new(Published::new(dir.path(), Default::default()).unwrap()));
        let Record::Published(q) = &record else { unreachable!() };
        let q = q.clone();
        for (n, idx) in [5000u64, 3, 4, 3, 70_000].into_iter().enumerate() {
            q.expect(idx);
            record.set(idx, id(n as u64), 4096).unwrap();
        }
        record.set(9, BlockId::SPARSE, 4096).unwrap();
        assert_eq!(q.get(4).unwrap(), id(2));
        assert_eq!(q.get(3).unwrap(), id(3), "the second id of block 3 replaced the first");
        assert_eq!(q.get(6).unwrap(), BlockId::SPARSE, "a hole");
        assert_eq!(q.get(1 << 40).unwrap(), BlockId::SPARSE, "past the end");
        assert_eq!(q.data.load(Ordering::Relaxed), 4);
        q.clear(5000, 4096).unwrap();
        assert_eq!(q.data.load(Ordering::Relaxed), 3);
        let mut r = q.reader();
        let got: Vec<BlockId> = [3u64, 4, 5000, 69_999, 70_000].iter().map(|&i| r.get(i).unwrap()).collect();
        let want = [id(3), id(2), BlockId::SPARSE, BlockId::SPARSE, id(4)];
        assert_eq!(got, want);
        // Zeros over a hole write nothing: an all-zero image takes no spool disk.
        p.expect(5);
        p.put(5, BlockId::SPARSE, 4096).unwrap();
        assert_eq!(p.file.metadata().unwrap().len(), 0);
        // A block in flight is waited for; a failed ingest ends the wait with its error.
        p.expect(8);
        let e = p.wait(8, || Some(Error::Other("stopped".into()))).unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
        assert_eq!(p.wait(9, || None).unwrap(), BlockId::SPARSE, "never handed over: no wait");
    }

    #[test]
    fn blocks_completed_out_of_order_are_written_in_order_and_move_the_frontier() {
        let dir = tempfile::tempdir().unwrap();
        let frontier = Arc::new(Frontier::new(8));
        let mut r = Record::Ordered(Box::new(Ordered::new(
            IndexWriter::new(dir.path(), crate::perms::Modes::PRIVATE, 4096).unwrap(),
            frontier.clone(),
        )));
        r.set(2, id(2), 4096).unwrap();
        r.sparse(3, 10, 4096).unwrap();
        assert_eq!(frontier.at.load(Ordering::Acquire), 0);
        r.set(1, BlockId::SPARSE, 4096).unwrap();
        r.set(0, id(0), 4096).unwrap();
        assert_eq!(frontier.at.load(Ordering::Acquire), 13);
        r.set(14, id(14), 4096).unwrap();
        assert!(r.set(14, id(14), 4096).is_err(), "twice");
        r.set(13, id(13), 4096).unwrap();
        let Recorded::Index(w) = r.finish(true).unwrap() else { panic!("a map") };
        let f = w.finish(5, 4096 * 20).unwrap();
        let index = BlockIndex::decode(&f.to_vec().unwrap()).unwrap();
        let data: Vec<(u64, BlockId)> = index.entries.data().collect();
        assert_eq!(data, vec![(0, id(0)), (2, id(2)), (13, id(13)), (14, id(14))]);
    }

    #[test]
    fn a_block_that_never_came_is_an_error_not_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let frontier = Arc::new(Frontier::new(8));
        let mut r = Record::Ordered(Box::new(Ordered::new(
            IndexWriter::new(dir.path(), crate::perms::Modes::PRIVATE, 4096).unwrap(),
            frontier,
        )));
        r.set(0, id(0), 4096).unwrap();
        r.set(2, id(2), 4096).unwrap();
        let e = r.finish(true).err().unwrap().to_string();
        assert!(e.contains("block 1 of the backup was never recorded"), "{e}");
    }

    #[test]
    fn a_reader_too_far_ahead_waits_for_the_frontier() {
        let frontier = Arc::new(Frontier::new(4));
        frontier.wait_for(3, || false); // within reach: returns at once
        let f = frontier.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            f.wait_for(10, || false);
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "waits while 10 is out of reach");
        frontier.advance(7);
        rx.recv_timeout(Duration::from_secs(10)).expect("goes on once the frontier is close enough");
        waiter.join().unwrap();
        // An ended ingest releases everyone.
        frontier.end();
        frontier.wait_for(1000, || false);
    }
}
