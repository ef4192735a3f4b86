//! Where an ingest records the id of each block it completes. A draft (FUSE, NBD) writes
//! blocks in any order and again, so it keeps a map ([`Entries`]); a backup hands each
//! block over once, in roughly increasing order, so its blocks go straight into the
//! version's index file ([`IndexWriter`]) as the *frontier* (the first block not
//! completed yet) passes them. Blocks completed past the frontier wait in a small
//! ordered map; the readers stay within [`Frontier::ahead`] blocks of it, which is what
//! bounds that map: a backup's memory no longer grows with the image.
//!
//! Locks: [`Frontier`]'s mutex only (readers wait on it; the coordinator moves it).

use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::index::{Entries, IndexWriter, MAX_DATA_BLOCKS_PER_VERSION, too_much_data};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
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

/// Where an ingest records each block's id.
pub enum Record {
    Map(Entries),
    Ordered(Box<Ordered>),
}

/// What an ingest recorded, once it finished.
pub enum Recorded {
    /// Every block by index (sparse where none was submitted).
    Map(Entries),
    /// The backup's index, written up to its last block handed over.
    Index(IndexWriter),
}

impl Record {
    /// Block `idx` holds `id` (sparse or not).
    pub fn set(&mut self, idx: u64, id: BlockId, block_size: u32) -> Result<()> {
        match self {
            Record::Map(e) => {
                e.set(idx, id);
                // Refused as soon as it is known, not after the rest of the image was read.
                if e.data_count() > MAX_DATA_BLOCKS_PER_VERSION {
                    return Err(too_much_data(e.data_count(), block_size));
                }
                Ok(())
            }
            Record::Ordered(o) => o.put(idx, Waiting::Id(id)),
        }
    }

    /// Blocks `first..first + count` are sparse (a hole, or blocks not read).
    pub fn sparse(&mut self, first: u64, count: u64, block_size: u32) -> Result<()> {
        match self {
            Record::Map(_) => match (first + count).checked_sub(1) {
                Some(last) => self.set(last, BlockId::SPARSE, block_size),
                None => Ok(()),
            },
            Record::Ordered(o) if count > 0 => o.put(first, Waiting::Sparse(count)),
            Record::Ordered(_) => Ok(()),
        }
    }

    /// What was recorded. `complete`: every block was handed over, so one still
    /// waiting means one before it never came, an error (never written as a hole); an
    /// ingest cut short by a failed reader has such gaps, and its caller discards this.
    pub fn finish(self, complete: bool) -> Result<Recorded> {
        Ok(match self {
            Record::Map(e) => Recorded::Map(e),
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
