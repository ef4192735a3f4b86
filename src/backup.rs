//! Backing up: the block pipeline. Reader threads fill recycled buffers from the source;
//! worker threads detect zero blocks and hash; a coordinator looks the ids up in the
//! database in batches (dedup) and sends only new blocks back to the workers to be
//! compressed; writer threads store them. Memory is bounded by the buffer pool, not by
//! the image size. [`Ingest`] is the part that turns blocks into stored objects; the CLI's
//! `backup` and the FUSE `incoming/` directory both feed it.

use crate::block::{BlockId, ObjectKind, is_zero};
use crate::catalog::SharedCatalog;
use crate::error::{Error, Result};
use crate::index::{BlockIndex, IndexFile, IndexWriter, block_count};
use crate::progress::Progress;
use crate::record::{Frontier, Ordered, Published, Record, Recorded};
use crate::repo::{Repository, version_key};
use crate::source::file::{WINDOW_BYTES, Window};
use crate::source::{Source, Url, open_source};
use crate::storage::{SharedStorage, retry};
use crate::transform::Codec;
use crate::version::{Stats, Version, VersionUid, check_label, check_name, check_snapshot};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, unbounded};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Lookups are gathered into batches of up to this many ids (one transaction each).
const LOOKUP_BATCH: usize = 64;
/// How long a lookup waits for others to share its transaction when no block is ready:
/// a round trip to a catalog across a network costs more than a block takes to hash.
const LOOKUP_LINGER: Duration = Duration::from_millis(20);
/// Lookups are sent at once when their blocks hold this share of the buffer pool, so
/// that the reader never waits for a buffer that a waiting lookup holds.
const LOOKUP_POOL_SHARE: usize = 4;
/// New objects are recorded in the database in batches of up to this many.
const INSERT_BATCH: usize = 128;
/// Memory for block buffers in flight.
const POOL_BYTES: usize = 64 << 20;
pub(crate) const STORAGE_ATTEMPTS: u32 = 4;
/// Most blocks called unchanged that a differential backup reads to check its hints
/// against the base (the sample is thinned evenly past this): a bound on its list (40
/// bytes a block) for images of billions of blocks.
const MAX_HINT_SAMPLES: u64 = 1 << 20;
/// How long a backup waits for a live cleanup to finish deleting blocks the backup needs
/// (normally one delete request); a cleanup gives up on a batch well before this.
const BLOCKED_BY_CLEANUP_LIMIT: Duration = Duration::from_millis(crate::catalog::REMOTE_SESSION_TTL_MS as u64);

/// One block on its way through the pipeline. Its bytes are in a pooled buffer, or, until
/// a worker inspects it, in a mapped window of the source; the buffer is then a token
/// from the pool (what bounds the number of blocks in flight either way) that a non-zero
/// block's bytes are copied into before they are hashed (see [`Block::own_and_id`]).
struct Block {
    buf: Vec<u8>,
    mapped: Option<(Arc<Window>, usize, usize)>,
}

impl Block {
    fn data(&self) -> &[u8] {
        match &self.mapped {
            Some((w, start, len)) => w.slice(*start, *len),
            None => &self.buf,
        }
    }

    /// The block's id, from bytes that are the block's own: a mapped block is copied into
    /// its buffer (hashed while it is copied) and lets go of the mapping. A mapped source
    /// can change under the mapping (a live disk, a file being written); the bytes that
    /// are hashed must be the bytes that are compressed and stored, so a block is read
    /// once and everything after reads the copy.
    fn own_and_id(&mut self, codec: &Codec) -> BlockId {
        match self.mapped.take() {
            Some((w, start, len)) => {
                self.buf.clear();
                codec.copy_and_id(w.slice(start, len), &mut self.buf)
            }
            None => codec.id_of(&self.buf),
        }
    }
}

/// Test instrumentation, not an API: called by a worker with a block's index right after
/// the block's id was computed, before it is looked up, compressed or stored.
#[doc(hidden)]
pub type HashedHook = Arc<dyn Fn(u64) + Send + Sync>;

enum Job {
    /// Zero check and hash.
    Inspect { idx: u64, block: Block },
    /// Compress and hand to a writer.
    Encode { idx: u64, id: BlockId, block: Block },
}

struct Put {
    idx: u64,
    id: BlockId,
    plain_len: u64,
    bytes: Vec<u8>,
}

enum Done {
    Zero {
        idx: u64,
        len: u64,
        /// Whether the bytes were read and found zero, or known zero without reading
        /// (a hole of the source).
        read: bool,
    },
    Hashed {
        idx: u64,
        id: BlockId,
        block: Block,
    },
    Stored {
        idx: u64,
        id: BlockId,
        plain_len: u64,
        stored_len: u64,
    },
    Failed(Error),
    /// Blocks `first..first + count` are not read (a differential backup takes them
    /// from its base): sparse in what the ingest records.
    NotRead {
        first: u64,
        count: u64,
    },
    /// Blocks `first..first + count`, `bytes` long in all, are a hole of the source.
    ZeroRun {
        first: u64,
        count: u64,
        bytes: u64,
    },
    /// No more blocks will be submitted; `count` were.
    Finish {
        count: u64,
        /// Whether every block was submitted (a reader that failed leaves gaps, and
        /// what was recorded is not an index then).
        complete: bool,
    },
}

/// Everything an ingest needs, cloneable into its threads.
pub struct IngestContext {
    pub db: SharedCatalog,
    pub storage: SharedStorage,
    pub storage_id: i64,
    pub block_size: u32,
    pub compression_level: i32,
    pub workers: usize,
    pub writers: usize,
    pub session: i64,
    /// Where to publish each block's id as it completes (a draft's, see
    /// [`Ingest::wait_completed`]); none for a backup, which records into `ordered`.
    pub publish: Option<Arc<Published>>,
    #[doc(hidden)]
    pub after_hash: Option<HashedHook>,
    /// Record the blocks in block order into an index file (a backup, which submits
    /// every block once), instead of a map (a draft).
    pub ordered: Option<OrderedIndex>,
}

/// Where and how a backup's ingest writes its index in block order.
pub struct OrderedIndex {
    /// Directory of the index file (unnamed), and its modes if it is made.
    pub dir: std::path::PathBuf,
    pub modes: crate::perms::Modes,
    /// How far past the frontier readers may submit (see [`Frontier`]): at least a
    /// window of blocks for every reader, so that the reader holding the frontier
    /// never waits.
    pub ahead: u64,
}

/// What an ingest produced: the id of every block (a map, or the backup's index file
/// written in block order) and the statistics.
pub struct IngestResult {
    pub recorded: Recorded,
    pub stats: Stats,
}

/// Turns blocks into deduplicated, stored objects. Submit blocks in any order; `finish`
/// waits until every new object is durable and recorded.
pub struct Ingest {
    job_tx: Option<Sender<Job>>,
    done_tx: Sender<Done>,
    pool_rx: Receiver<Vec<u8>>,
    pool_tx: Sender<Vec<u8>>,
    published: Option<Arc<Published>>,
    frontier: Option<Arc<Frontier>>,
    coordinator: Option<JoinHandle<Result<IngestResult>>>,
    threads: Vec<JoinHandle<()>>,
    /// Why the pipeline stopped, once it has: the message and its errno.
    failed: Arc<Mutex<Option<(String, i32)>>>,
    submitted: u64,
    block_size: u32,
}

impl Ingest {
    pub fn start(ctx: IngestContext) -> Ingest {
        let bs = ctx.block_size as usize;
        let block_size = ctx.block_size;
        let pool_count = (POOL_BYTES / bs).clamp(ctx.workers * 2 + 4, 256);
        let (pool_tx, pool_rx) = bounded::<Vec<u8>>(pool_count);
        for _ in 0..pool_count {
            let _ = pool_tx.send(Vec::with_capacity(bs));
        }
        let (job_tx, job_rx) = unbounded::<Job>();
        let (done_tx, done_rx) = unbounded::<Done>();
        let (put_tx, put_rx) = bounded::<Put>(ctx.writers * 2);
        let mut threads = Vec::new();
        for _ in 0..ctx.workers.max(1) {
            let (job_rx, done_tx, pool_tx, put_tx) = (job_rx.clone(), done_tx.clone(), pool_tx.clone(), put_tx.clone());
            let (level, storage, hook) = (ctx.compression_level, ctx.storage.clone(), ctx.after_hash.clone());
            threads.push(std::thread::spawn(move || worker(job_rx, done_tx, pool_tx, put_tx, level, storage, hook)));
        }
        drop(put_tx);
        for _ in 0..ctx.writers.max(1) {
            let (put_rx, done_tx, storage) = (put_rx.clone(), done_tx.clone(), ctx.storage.clone());
            threads.push(std::thread::spawn(move || writer(put_rx, done_tx, storage)));
        }
        let failed = Arc::new(Mutex::new(None));
        let published = ctx.publish.clone();
        let frontier = ctx.ordered.as_ref().map(|o| Arc::new(Frontier::new(o.ahead)));
        let coord = {
            let (job_tx, pool_tx, failed, frontier) =
                (job_tx.clone(), pool_tx.clone(), failed.clone(), frontier.clone());
            std::thread::spawn(move || {
                let r = coordinate(ctx, done_rx, job_tx, pool_tx, frontier.clone());
                if let Err(e) = &r {
                    *failed.lock() = Some((e.to_string(), e.errno()));
                }
                if let Some(f) = frontier {
                    f.end();
                }
                r
            })
        };
        Ingest {
            job_tx: Some(job_tx),
            done_tx,
            pool_tx,
            published,
            frontier,
            pool_rx,
            coordinator: Some(coord),
            threads,
            failed,
            submitted: 0,
            block_size,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// A buffer for one block, with capacity for a block and stale contents (resize it to
    /// the block's length and overwrite it). Waits while every buffer is in flight: this
    /// is what bounds memory.
    pub fn take_buffer(&self) -> Result<Vec<u8>> {
        loop {
            if let Some(e) = self.stopped() {
                return Err(e);
            }
            match self.pool_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(b) => return Ok(b),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(_) => return Err(Error::Other("the backup pipeline stopped".into())),
            }
        }
    }

    /// The error that stopped the pipeline, if it has stopped: its message, and a full
    /// disk or quota kept as such (the filesystem answers ENOSPC, not EIO).
    fn stopped(&self) -> Option<Error> {
        let (msg, errno) = self.failed.lock().clone()?;
        let context = "the backup stopped".to_string();
        Some(match errno {
            libc::ENOSPC | libc::EDQUOT => {
                Error::Io { context: format!("{context}: {msg}"), source: std::io::Error::from_raw_os_error(errno) }
            }
            _ => Error::Other(format!("{context}: {msg}")),
        })
    }

    /// Submits block `idx` (at most one block long; only the last block may be short).
    pub fn submit(&mut self, idx: u64, buf: Vec<u8>) -> Result<()> {
        self.submitted += 1;
        if let Some(p) = &self.published {
            p.expect(idx);
        }
        let tx = self.job_tx.as_ref().ok_or_else(|| Error::Other("ingest already finished".into()))?;
        tx.send(Job::Inspect { idx, block: Block { buf, mapped: None } })
            .map_err(|_| Error::Other("the backup pipeline stopped".into()))
    }

    /// Submits block `idx` whose bytes are `len` bytes at `start` of a mapped window;
    /// `token` is a buffer from [`Ingest::take_buffer`], held until the block is done.
    fn submit_mapped(&mut self, idx: u64, token: Vec<u8>, window: Arc<Window>, start: usize, len: usize) -> Result<()> {
        self.submitted += 1;
        if let Some(p) = &self.published {
            p.expect(idx);
        }
        let tx = self.job_tx.as_ref().ok_or_else(|| Error::Other("ingest already finished".into()))?;
        tx.send(Job::Inspect { idx, block: Block { buf: token, mapped: Some((window, start, len)) } })
            .map_err(|_| Error::Other("the backup pipeline stopped".into()))
    }

    /// Runs of blocks are a backup's (a source's holes); a draft, which publishes what it
    /// hands over, hands over single blocks, each of which its readers wait for.
    fn refuse_runs_when_publishing(&self) -> Result<()> {
        match self.published {
            Some(_) => Err(Error::Other("a draft hands over single blocks, not runs".into())),
            None => Ok(()),
        }
    }

    /// Records block `idx` as all zeros without reading or hashing it (a hole).
    pub fn submit_zero(&mut self, idx: u64, len: u64) -> Result<()> {
        self.submitted += 1;
        if let Some(p) = &self.published {
            p.expect(idx);
        }
        self.done_tx
            .send(Done::Zero { idx, len, read: false })
            .map_err(|_| Error::Other("the backup pipeline stopped".into()))
    }

    /// Records blocks `first..first + count` (`bytes` long in all) as all zeros without
    /// reading them: a hole of the source, one message however long.
    pub fn submit_zero_run(&mut self, first: u64, count: u64, bytes: u64) -> Result<()> {
        self.refuse_runs_when_publishing()?;
        self.submitted += count;
        self.done_tx
            .send(Done::ZeroRun { first, count, bytes })
            .map_err(|_| Error::Other("the backup pipeline stopped".into()))
    }

    /// Records blocks `first..first + count` as not read: sparse in what the ingest
    /// records (a differential backup fills them from its base afterwards).
    pub fn submit_not_read(&mut self, first: u64, count: u64) -> Result<()> {
        self.refuse_runs_when_publishing()?;
        self.submitted += count;
        self.done_tx
            .send(Done::NotRead { first, count })
            .map_err(|_| Error::Other("the backup pipeline stopped".into()))
    }

    /// How far an ordered ingest (a backup's) has written its index: readers wait on it
    /// before they submit blocks too far ahead (see [`Frontier`]).
    pub fn frontier(&self) -> Option<Arc<Frontier>> {
        self.frontier.clone()
    }

    /// Returns a buffer from [`Ingest::take_buffer`] that will not be submitted.
    pub fn give_back(&self, buf: Vec<u8>) {
        let _ = self.pool_tx.send(buf);
    }

    /// Waits until block `idx` (submitted earlier) is stored or found stored and returns
    /// its id. Needs an ingest started with `publish`.
    pub fn wait_completed(&self, idx: u64) -> Result<BlockId> {
        let p = self.published.as_ref().ok_or_else(|| Error::Other("ingest does not publish completions".into()))?;
        p.wait(idx, || self.stopped())
    }

    /// Waits for every submitted block to be stored and recorded.
    pub fn finish(self) -> Result<IngestResult> {
        self.finish_with(true)
    }

    /// Waits for the blocks submitted before a reader failed to be stored and recorded
    /// (so that `backup --continue` finds them), without the checks of a whole image:
    /// the result is not a version's index.
    pub fn finish_incomplete(self) -> Result<IngestResult> {
        self.finish_with(false)
    }

    fn finish_with(mut self, complete: bool) -> Result<IngestResult> {
        let _ = self.done_tx.send(Done::Finish { count: self.submitted, complete });
        self.job_tx = None;
        let r = match self.coordinator.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            _ => Err(Error::Other("the backup coordinator thread panicked".into())),
        };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        r
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // An abandoned ingest: stop the coordinator so that every thread ends.
        if self.coordinator.is_some() {
            let _ = self.done_tx.send(Done::Failed(Error::Other("backup abandoned".into())));
            self.job_tx = None;
            if let Some(h) = self.coordinator.take() {
                let _ = h.join();
            }
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

fn worker(
    jobs: Receiver<Job>,
    done: Sender<Done>,
    pool: Sender<Vec<u8>>,
    puts: Sender<Put>,
    level: i32,
    storage: SharedStorage,
    after_hash: Option<HashedHook>,
) {
    let codec = storage.codec();
    for job in jobs {
        match job {
            Job::Inspect { idx, mut block } => {
                let data = block.data();
                if is_zero(data) {
                    let len = data.len() as u64;
                    let _ = pool.send(block.buf);
                    let _ = done.send(Done::Zero { idx, len, read: true });
                } else {
                    // Zero or not was decided on what was read then (a block that turns
                    // non-zero later is simply the older state); the id and the stored
                    // object both come from one copy.
                    let id = block.own_and_id(codec);
                    if let Some(hook) = &after_hash {
                        hook(idx);
                    }
                    let _ = done.send(Done::Hashed { idx, id, block });
                }
            }
            Job::Encode { idx, id, block } => {
                let data = block.data();
                let bytes = match codec.encode(ObjectKind::Block, &id.0, data, level) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = pool.send(block.buf);
                        let _ = done.send(Done::Failed(Error::Object { context: format!("block {id}"), source: e }));
                        continue;
                    }
                };
                let put = Put { idx, id, plain_len: data.len() as u64, bytes };
                let _ = pool.send(block.buf);
                if puts.send(put).is_err() {
                    return;
                }
            }
        }
    }
}

fn writer(puts: Receiver<Put>, done: Sender<Done>, storage: SharedStorage) {
    for p in puts {
        let key = p.id.storage_key();
        let msg = match retry(STORAGE_ATTEMPTS, || storage.put(&key, &p.bytes)) {
            Ok(()) => Done::Stored { idx: p.idx, id: p.id, plain_len: p.plain_len, stored_len: p.bytes.len() as u64 },
            Err(e) => Done::Failed(e.into()),
        };
        let _ = done.send(msg);
    }
}

struct Coordinator {
    ctx: IngestContext,
    job_tx: Sender<Job>,
    pool_tx: Sender<Vec<u8>>,
    record: Record,
    stats: Stats,
    /// Ids this ingest is storing and has not recorded yet: later copies only reference
    /// them (once recorded, the catalog's lookup finds them).
    seen: HashSet<BlockId>,
    /// Ids being encoded and stored (not stored yet), each with the blocks found to be
    /// copies of it meanwhile whose completion waits for it when publishing: a reader
    /// of such a copy must find its object.
    storing: HashMap<BlockId, Vec<u64>>,
    pending_lookup: Vec<(u64, BlockId, Block)>,
    /// When the oldest pending lookup arrived.
    pending_since: Option<Instant>,
    pending_insert: Vec<(BlockId, u64, u64)>,
    /// Whether the ingest was finished with every block submitted.
    complete: bool,
    completed: u64,
    in_store: u64,
    last_heartbeat: Instant,
}

impl Coordinator {
    fn set(&mut self, idx: u64, id: BlockId) -> Result<()> {
        self.record.set(idx, id, self.ctx.block_size)
    }

    /// How much longer the pending lookups may wait for others, if at all. Not when a
    /// writer may be waiting for a block (a draft under FUSE or NBD reads back or
    /// rewrites what it handed over): that one block would wait out the linger.
    fn linger_left(&self) -> Option<Duration> {
        if self.ctx.publish.is_some() {
            return None;
        }
        let since = self.pending_since?;
        let held = self.pending_lookup.len() * self.ctx.block_size as usize;
        if held * LOOKUP_POOL_SHARE >= POOL_BYTES {
            return None;
        }
        Some(LOOKUP_LINGER.saturating_sub(since.elapsed())).filter(|d| !d.is_zero())
    }

    fn flush_lookups(&mut self) -> Result<()> {
        self.pending_since = None;
        if self.pending_lookup.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending_lookup);
        let mut ids: Vec<BlockId> = batch.iter().filter(|(_, id, _)| !self.seen.contains(id)).map(|b| b.1).collect();
        ids.sort_unstable();
        ids.dedup();
        let present = if ids.is_empty() { HashSet::new() } else { self.look_up(&ids)? };
        for (idx, id, block) in batch {
            let len = block.data().len() as u64;
            if self.seen.contains(&id) || present.contains(&id) {
                self.stats.bytes_deduplicated += len;
                match self.storing.get_mut(&id) {
                    Some(copies) if self.ctx.publish.is_some() => copies.push(idx),
                    _ => self.set(idx, id)?,
                }
                self.completed += 1;
                let _ = self.pool_tx.send(block.buf);
            } else {
                self.seen.insert(id);
                self.storing.insert(id, Vec::new());
                self.in_store += 1;
                self.job_tx
                    .send(Job::Encode { idx, id, block })
                    .map_err(|_| Error::Other("backup workers stopped".into()))?;
            }
        }
        Ok(())
    }

    /// Looks `ids` up for writing (docs/format.md, "Cleanup"): returns those stored, which
    /// are now touched; the others are now rows in state `writing`, for this backup to
    /// store. An id a live cleanup is deleting is waited for: once that cleanup has
    /// deleted it (or died), it is looked up again and stored anew.
    fn look_up(&mut self, ids: &[BlockId]) -> Result<HashSet<BlockId>> {
        let mut present = HashSet::new();
        let mut todo = ids.to_vec();
        let mut dead: Vec<i64> = Vec::new();
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut said = false;
        loop {
            let found = self.ctx.db.lock().lookup_for_write(self.ctx.storage_id, &todo, &dead)?;
            present.extend(found.present);
            if found.blocked.is_empty() {
                return Ok(present);
            }
            todo = found.blocked.iter().map(|b| b.0).collect();
            let live: HashSet<i64> = self.ctx.db.lock().live_sessions()?.into_iter().map(|s| s.id).collect();
            let newly_dead: Vec<i64> = found.blocked.iter().map(|b| b.1).filter(|d| !live.contains(d)).collect();
            if !newly_dead.is_empty() {
                // The cleanup that marked them is gone: they are this backup's to write.
                dead.extend(newly_dead);
                continue;
            }
            if !said {
                said = true;
                keepfs_face::log!(
                    "keepfs: waiting for a cleanup (session {}) to finish deleting {} block(s) this backup needs; they are stored again then",
                    found.blocked[0].1,
                    todo.len()
                );
            }
            if started.elapsed() > BLOCKED_BY_CLEANUP_LIMIT {
                return Err(Error::Other(format!(
                    "{} block(s) of this backup are being deleted by a cleanup (session {}) that has not finished with them in {} s; run the backup again when it is done",
                    todo.len(),
                    found.blocked[0].1,
                    BLOCKED_BY_CLEANUP_LIMIT.as_secs()
                )));
            }
            // A cleanup holds a batch for one delete request and two short transactions.
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    fn flush_inserts(&mut self) -> Result<()> {
        if self.pending_insert.is_empty() {
            return Ok(());
        }
        // Durable first, recorded second: no row ever names an object that may be lost.
        retry(STORAGE_ATTEMPTS, || self.ctx.storage.sync())?;
        let batch = std::mem::take(&mut self.pending_insert);
        let refused =
            self.ctx.db.lock().insert_objects(self.ctx.storage_id, &batch, self.ctx.storage.codec().current_key())?;
        // Recorded rows are found by the lookup from now on: `seen` keeps only what is in
        // flight, so it stays small however many blocks the image has.
        for (id, _, _) in &batch {
            self.seen.remove(id);
        }
        if let Some(id) = refused.first() {
            // Only when this process was silent so long that another host took it for
            // dead and a cleanup marked what it was writing.
            return Err(Error::Other(format!(
                "block {id} and {} more were marked for deletion by a cleanup while this backup stored them (this process was taken for dead: no heartbeat for {} s); run the backup again (`--continue` keeps what is stored)",
                refused.len() - 1,
                crate::catalog::REMOTE_SESSION_TTL_MS / 1000
            )));
        }
        Ok(())
    }

    fn stored(&mut self, idx: u64, id: BlockId, plain_len: u64, stored_len: u64) -> Result<()> {
        self.stats.bytes_written += plain_len;
        self.stats.bytes_stored += stored_len;
        self.set(idx, id)?;
        for copy in self.storing.remove(&id).unwrap_or_default() {
            self.set(copy, id)?;
        }
        self.completed += 1;
        self.in_store -= 1;
        self.pending_insert.push((id, stored_len, plain_len));
        if self.pending_insert.len() >= INSERT_BATCH {
            self.flush_inserts()?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: Done, finish: &mut Option<u64>) -> Result<()> {
        match msg {
            Done::Zero { idx, len, read } => {
                self.stats.bytes_sparse += len;
                if read {
                    self.stats.bytes_read += len;
                }
                self.set(idx, BlockId::SPARSE)?;
                self.completed += 1;
            }
            Done::ZeroRun { first, count, bytes } => {
                // A hole of the source: one message, however many blocks.
                self.stats.bytes_sparse += bytes;
                self.record.sparse(first, count, self.ctx.block_size)?;
                self.completed += count;
            }
            Done::Hashed { idx, id, block } => {
                self.stats.bytes_read += block.data().len() as u64;
                self.pending_since.get_or_insert_with(Instant::now);
                self.pending_lookup.push((idx, id, block));
                if self.pending_lookup.len() >= LOOKUP_BATCH {
                    self.flush_lookups()?;
                }
            }
            Done::NotRead { first, count } => {
                self.record.sparse(first, count, self.ctx.block_size)?;
                self.completed += count;
            }
            Done::Stored { idx, id, plain_len, stored_len } => self.stored(idx, id, plain_len, stored_len)?,
            Done::Failed(e) => return Err(e),
            Done::Finish { count, complete } => {
                *finish = Some(count);
                self.complete = complete;
            }
        }
        if self.last_heartbeat.elapsed() > Duration::from_secs(30) {
            self.ctx.db.lock().heartbeat(self.ctx.session)?;
            self.last_heartbeat = Instant::now();
        }
        Ok(())
    }
}

fn coordinate(
    ctx: IngestContext,
    done: Receiver<Done>,
    job_tx: Sender<Job>,
    pool_tx: Sender<Vec<u8>>,
    frontier: Option<Arc<Frontier>>,
) -> Result<IngestResult> {
    let record = match (&ctx.ordered, frontier, &ctx.publish) {
        (Some(o), Some(f), _) => {
            Record::Ordered(Box::new(Ordered::new(IndexWriter::new(&o.dir, o.modes, ctx.block_size)?, f)))
        }
        (_, _, Some(p)) => Record::Published(p.clone()),
        _ => return Err(Error::Other("an ingest needs an index to write or ids to publish".into())),
    };
    let mut c = Coordinator {
        ctx,
        job_tx,
        pool_tx,
        record,
        stats: Stats::default(),
        seen: HashSet::new(),
        storing: HashMap::new(),
        pending_lookup: Vec::new(),
        pending_since: None,
        pending_insert: Vec::new(),
        complete: true,
        completed: 0,
        in_store: 0,
        last_heartbeat: Instant::now(),
    };
    let run = |c: &mut Coordinator| -> Result<()> {
        let mut finish: Option<u64> = None;
        loop {
            if finish.is_some_and(|n| c.completed >= n) {
                return Ok(());
            }
            let msg = match done.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    // Nothing waiting. Lookups linger a moment for company (one catalog
                    // transaction for several blocks), unless they hold a good share of
                    // the buffers; then, or after the linger, they are resolved.
                    if let Some(left) = c.linger_left() {
                        match done.recv_timeout(left) {
                            Ok(m) => {
                                c.handle(m, &mut finish)?;
                                continue;
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => {
                                return Err(Error::Other("backup pipeline ended early".into()));
                            }
                        }
                    }
                    c.flush_lookups()?;
                    if finish.is_some_and(|n| c.completed >= n) {
                        return Ok(());
                    }
                    match done.recv() {
                        Ok(m) => m,
                        Err(_) => return Err(Error::Other("backup pipeline ended early".into())),
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    return Err(Error::Other("backup pipeline ended early".into()));
                }
            };
            c.handle(msg, &mut finish)?;
        }
    };
    if let Err(e) = run(&mut c) {
        // Objects already stored stay recorded (after the storage confirms them durable),
        // so that `backup --continue` does not send them again.
        let _ = c.flush_inserts();
        return Err(e);
    }
    debug_assert_eq!(c.in_store, 0);
    c.flush_inserts()?;
    Ok(IngestResult { recorded: c.record.finish(c.complete)?, stats: c.stats })
}

/// What the user asked to back up.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub name: String,
    pub snapshot: String,
    pub labels: BTreeMap<String, String>,
    pub block_size: Option<u32>,
    pub storage: Option<String>,
    pub expire: Option<chrono::DateTime<chrono::Utc>>,
    /// Resume this `incomplete` version instead of starting a new one.
    pub continue_uid: Option<VersionUid>,
    /// `rbd diff --format=json` output: only these regions are read (see [`crate::hints`]).
    pub hints: Option<String>,
    /// The version unhinted blocks are taken from.
    pub base: Option<VersionUid>,
    /// Share of the blocks the hints call unchanged that are checked against the base
    /// before the backup starts (default 1%).
    pub hints_check_percent: Option<u8>,
    /// Ask the source (RBD) which extents changed since this snapshot, instead of hints.
    pub diff_from: Option<String>,
    /// With `diff_from`: whole objects (librbd's fast diff) instead of exact extents.
    pub whole_object: bool,
    /// backy2's automatic tags: `b_daily`, `b_weekly`, `b_monthly` labels for the first
    /// backup of this name in a day, ISO week, month (see [`auto_tags`]).
    pub auto_tags: bool,
}

/// backy2's automatic tags for a new backup of a name at `now`: `b_daily` when no valid
/// version of the name carries it from the same UTC day, `b_weekly` likewise for the
/// same ISO week, `b_monthly` for the same month. So the first backup of each period
/// carries the period's tag, which schedulers (`due`, `sla`) and retention filters
/// (`labels["b_weekly"] == ""`) can use.
pub fn auto_tags(existing: &[crate::version::Version], name: &str, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    use chrono::Datelike;
    let same = |tag: &str, f: &dyn Fn(chrono::DateTime<chrono::Utc>) -> (i32, u32)| {
        existing.iter().any(|v| {
            v.name == name
                && v.status == crate::version::Status::Valid
                && v.labels.contains_key(tag)
                && f(v.date) == f(now)
        })
    };
    let mut tags = Vec::new();
    if !same("b_daily", &|d| (d.year(), d.ordinal())) {
        tags.push("b_daily".to_string());
    }
    if !same("b_weekly", &|d| (d.iso_week().year(), d.iso_week().week())) {
        tags.push("b_weekly".to_string());
    }
    if !same("b_monthly", &|d| (d.year(), d.month())) {
        tags.push("b_monthly".to_string());
    }
    tags
}

/// What a differential backup reads and where the rest comes from.
struct Differential {
    /// Blocks to read from the source.
    wanted: crate::hints::Wanted,
    /// The base version, whose index gives the blocks not read (read from the catalog
    /// as a stream when they are merged, never held).
    base: Option<Version>,
}

impl Repository {
    /// Context for an ingest into `storage` at `block_size`, for `session`.
    pub fn ingest_context(&self, storage: &str, block_size: u32, session: i64) -> Result<IngestContext> {
        Ok(IngestContext {
            db: self.db.clone(),
            storage: self.storage(storage)?,
            storage_id: self.storage_id(storage)?,
            block_size,
            compression_level: self.config.compression_level,
            workers: self.config.workers,
            writers: self.config.writers_for(storage)?,
            session,
            publish: None,
            after_hash: self.after_hash.clone(),
            ordered: None,
        })
    }

    /// Starts a new `incomplete` version for a writer registered as `session`.
    pub fn begin_version(&self, opts: &BackupOptions, size: u64, session: i64) -> Result<(VersionUid, String, u32)> {
        check_fields(opts)?;
        let storage = opts.storage.clone().unwrap_or_else(|| self.config.default_storage.clone());
        self.storage(&storage)?;
        let bs = opts.block_size.unwrap_or(self.config.block_size);
        crate::index::check_block_count(size, bs)?;
        let uid =
            self.db.lock().create_version(&opts.name, &opts.snapshot, size, bs, &storage, &opts.labels, session)?;
        // The storage knows this uid already: the database is older than the storage (a
        // restored copy). Writing would replace that version's metadata object.
        let st = self.storage(&storage)?;
        if retry(STORAGE_ATTEMPTS, || st.exists(&version_key(uid)))? {
            self.db.lock().remove_version(uid)?;
            return Err(Error::Refused(format!(
                "storage '{storage}' already holds version {uid}, which this database does not know (an older copy of the database, or another host writing here with a catalog of its own); run `keepfs metadata restore {uid}` (and any later uids) or `keepfs database rebuild` first, or give every host that writes here one shared catalog (database = \"postgresql://…\", docs/scale-out.md)"
            )));
        }
        if let Some(e) = &opts.expire {
            self.db.lock().set_expire(uid, Some(e))?;
        }
        Ok((uid, storage, bs))
    }

    /// Commits a version whose blocks are all durable: writes its metadata object to the
    /// storage, then marks it valid in the database.
    /// `session` is the committing process's: a session another process ended (took for
    /// dead) cannot commit, as a cleanup may have taken the version's objects meanwhile.
    pub fn commit_version(&self, uid: VersionUid, session: i64, index: IndexFile, stats: Stats) -> Result<Version> {
        let mut v = self.version(uid)?;
        let head = index.header();
        if head.uid != uid.0 || head.block_size != v.block_size {
            return Err(Error::Other(format!("the block index written for {uid} is another version's")));
        }
        if head.size != v.size {
            self.db.lock().set_size(uid, head.size)?;
            v.size = head.size;
        }
        v.status = crate::version::Status::Valid;
        v.stats = stats;
        let storage = self.storage(&v.storage)?;
        // Still alive in the catalog's eyes (this fails if another process ended the
        // session), before a valid-looking version object goes to the storage.
        self.db.lock().heartbeat(session)?;
        // The index is read from its file into the object and into the catalog: a large
        // one is never held whole (see `store_version_object`).
        crate::repo::store_version_object(storage.as_ref(), &v, &index)?;
        retry(STORAGE_ATTEMPTS, || storage.sync())?;
        let bytes = crate::catalog::IndexBytes { len: index.len(), bytes: &mut index.reader() };
        self.db.lock().commit_version(uid, session, bytes, &stats)?;
        Ok(v)
    }

    /// A writer of a block index for a version being written, its file in the
    /// repository's spool directory.
    pub fn index_writer(&self, block_size: u32) -> Result<IndexWriter> {
        IndexWriter::new(&self.config.home.join("spool"), self.config.modes, block_size)
    }

    /// Backs up the image at `url` as a new version.
    pub fn backup(&self, url: &Url, opts: &BackupOptions, progress: &dyn Progress) -> Result<Version> {
        check_fields(opts)?;
        let source = open_source(url, self.config.mmap_sources, &self.config)?;
        let size = source.size();
        let session = self.session(&format!("backup {}", opts.name), true)?;
        let mut opts = opts.clone();
        if opts.auto_tags && opts.continue_uid.is_none() {
            for t in auto_tags(&self.list(None)?, &opts.name, chrono::Utc::now()) {
                opts.labels.entry(t).or_default();
            }
        }
        let diff = self.plan_differential(&mut opts, source.as_ref(), url, &session)?;
        let opts = &opts;
        let (uid, storage, bs) = match opts.continue_uid {
            Some(uid) => self.take_over_version(uid, opts, size, session.id, url)?,
            None => self.begin_version(opts, size, session.id)?,
        };
        // Counted from the version's date on: its date plus its duration is when it
        // finished (metrics report that), so the source's opening and the differential
        // plan before the version existed must not be in it.
        let started = Instant::now();
        progress.begin(&format!("backup {uid} ({})", opts.name), size);
        let wanted = diff.as_ref().map(|d| &d.wanted);
        let result = self.run_backup(source.as_ref(), url, &storage, bs, session.id, wanted, progress);
        progress.end();
        match result {
            Ok((written, mut stats)) => {
                // Every block was handed over: blocks missing at the end would otherwise
                // read as zeros.
                let count = block_count(size, bs);
                if written.at() != count {
                    return Err(Error::Other(format!(
                        "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                         resumes it, `keepfs rm {uid}` removes it): {} of its {count} blocks were recorded",
                        written.at()
                    )));
                }
                let mut index = written.finish(uid.0, size).map_err(|e| {
                    Error::Other(format!(
                        "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                         resumes it, `keepfs rm {uid}` removes it): {e}"
                    ))
                })?;
                if let Some(d) = &diff {
                    index = match self.merge_base(index, d, &mut stats) {
                        Ok(merged) => merged,
                        Err(e @ Error::Damaged(_)) => return Err(e), // names its own repair (and exit code)
                        Err(e) => {
                            return Err(Error::Other(format!(
                                "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                                 resumes it, `keepfs rm {uid}` removes it): cannot merge the base's index: {e}"
                            )));
                        }
                    };
                }
                stats.duration_ms = started.elapsed().as_millis() as u64;
                self.commit_version(uid, session.id, index, stats)
            }
            Err(e) => Err(Error::Other(format!(
                "backup of {url} failed, version {uid} is left incomplete (`keepfs backup --continue {uid} ...` \
                 resumes it, `keepfs rm {uid}` removes it): {e}"
            ))),
        }
    }

    /// Makes this session the writer of an incomplete version that a dead process left
    /// (backy2's --continue-version). Its blocks already stored are found by
    /// deduplication and not written again; the source is still read and hashed whole,
    /// since without it nothing proves the stored blocks are this source's.
    fn take_over_version(
        &self,
        uid: VersionUid,
        opts: &BackupOptions,
        size: u64,
        session: i64,
        url: &Url,
    ) -> Result<(VersionUid, String, u32)> {
        let v = self.version(uid)?;
        if v.status != crate::version::Status::Incomplete {
            return Err(Error::Invalid(format!(
                "version {uid} is {}; only an incomplete version can be continued",
                v.status.as_str()
            )));
        }
        if v.name != opts.name {
            return Err(Error::Invalid(format!("version {uid} is a backup of '{}', not '{}'", v.name, opts.name)));
        }
        if v.size != size {
            return Err(Error::Invalid(format!(
                "source {url} holds {size} bytes, incomplete version {uid} was started with {}; the source changed: \
                 start a new backup (and `keepfs rm {uid}`)",
                v.size
            )));
        }
        let live: Vec<i64> = self.db.lock().live_sessions()?.into_iter().map(|s| s.id).collect();
        let taken = self.db.lock().take_incomplete(uid, session, &live)?;
        if !taken {
            return Err(Error::Refused(format!("version {uid} is being written by another running backup")));
        }
        Ok((uid, v.storage, v.block_size))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_backup(
        &self,
        source: &dyn Source,
        url: &Url,
        storage: &str,
        bs: u32,
        session: i64,
        wanted: Option<&crate::hints::Wanted>,
        progress: &dyn Progress,
    ) -> Result<(IndexWriter, Stats)> {
        let size = source.size();
        let readers = self.config.source_readers.max(source.parallel_reads()).max(1) as u64;
        let window_bytes = WINDOW_BYTES.max(bs as u64);
        let mut ctx = self.ingest_context(storage, bs, session)?;
        // The index is written in block order as blocks complete; readers keep within a
        // window each (and one more) of the first block not completed.
        ctx.ordered = Some(OrderedIndex {
            dir: self.config.home.join("spool"),
            modes: self.config.modes,
            ahead: (readers + 1) * window_bytes.div_ceil(bs as u64),
        });
        let ingest = Ingest::start(ctx);
        let frontier = ingest.frontier();
        let ingest = Mutex::new(ingest);
        let read_error: Mutex<Option<Error>> = Mutex::new(None);
        // Readers take whole windows in turn; a window is mapped when the source allows
        // it (workers then hash straight from the page cache) and read block by block
        // into pooled buffers otherwise.
        // Readers claim windows in order; a reader that meets a hole claims every later
        // window the hole covers too (see `skip_hole`).
        let windows = size.div_ceil(window_bytes);
        let next_window = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..readers {
                let (ingest, read_error, next_window) = (&ingest, &read_error, &next_window);
                let feed = Feed { ingest, frontier: frontier.as_deref(), read_error };
                s.spawn(move || {
                    loop {
                        let w = next_window.fetch_add(1, Ordering::AcqRel);
                        if w >= windows || read_error.lock().is_some() {
                            return;
                        }
                        let woff = w * window_bytes;
                        let wlen = (size - woff).min(window_bytes);
                        let hole = Windows { next: next_window, count: windows, bytes: window_bytes, size };
                        let r = match skip_hole(source, url, &feed, &hole, w, bs, wanted, progress) {
                            Ok(WindowPlan::Skipped) => Ok(()),
                            Ok(WindowPlan::Read(data)) => {
                                read_window(source, url, &feed, woff, wlen, data, bs, wanted, progress)
                            }
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            read_error.lock().get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        let ingest = ingest.into_inner();
        if let Some(e) = read_error.into_inner() {
            // Prefer the pipeline's own error (a storage failure) over "pipeline stopped".
            return Err(match ingest.finish_incomplete() {
                Err(pe) => pe,
                Ok(_) => e,
            });
        }
        let r = ingest.finish()?;
        match r.recorded {
            Recorded::Index(w) => Ok((w, r.stats)),
            Recorded::Published(_) => Err(Error::Other("the backup's ingest recorded a map, not its index".into())),
        }
    }
}

/// What a reader thread feeds: the ingest, the frontier it keeps within reach of, and
/// the first reader error (which stops every reader).
struct Feed<'a> {
    ingest: &'a Mutex<Ingest>,
    frontier: Option<&'a Frontier>,
    read_error: &'a Mutex<Option<Error>>,
}

impl Feed<'_> {
    /// Waits until block `idx` is within reach of the frontier.
    fn wait_for(&self, idx: u64) {
        if let Some(f) = self.frontier {
            f.wait_for(idx, || self.read_error.lock().is_some());
        }
    }

    fn stopped(&self) -> bool {
        self.read_error.lock().is_some()
    }
}

/// The windows of a source that readers claim in order.
struct Windows<'a> {
    next: &'a AtomicU64,
    count: u64,
    bytes: u64,
    size: u64,
}

/// When window `w` lies wholly in a hole of the source (all of null://), records it and
/// every later window the hole covers wholly, claimed from the other readers at once, as
/// one run of sparse blocks: one SEEK_DATA and one message for a hole of any length, so
/// a 200 TB image of holes is not walked window by window. `false`: window `w` may hold
/// data (or only some of its blocks are wanted), and is read as usual.
#[allow(clippy::too_many_arguments)]
fn skip_hole(
    source: &dyn Source,
    url: &Url,
    feed: &Feed,
    windows: &Windows,
    w: u64,
    bs: u32,
    wanted: Option<&crate::hints::Wanted>,
    progress: &dyn Progress,
) -> Result<WindowPlan> {
    if wanted.is_some() {
        return Ok(WindowPlan::Read(None));
    }
    let woff = w * windows.bytes;
    let data = source.next_data(woff).map_err(|e| Error::io(format!("cannot read {url} at byte {woff}"), e))?;
    if data.start < (woff + windows.bytes).min(windows.size) {
        return Ok(WindowPlan::Read(Some(data)));
    }
    // Later windows that end at or before the data (or the image's end) are hole too.
    let last = if data.start >= windows.size { windows.count } else { data.start / windows.bytes };
    let end = if last > w + 1 && windows.next.compare_exchange(w + 1, last, Ordering::AcqRel, Ordering::Acquire).is_ok()
    {
        last
    } else {
        w + 1
    };
    let to = (end * windows.bytes).min(windows.size);
    let bs = bs as u64;
    feed.wait_for(woff / bs);
    feed.ingest.lock().submit_zero_run(woff / bs, (to - woff).div_ceil(bs), to - woff)?;
    progress.advance(to - woff);
    Ok(WindowPlan::Skipped)
}

/// What [`skip_hole`] made of a window: recorded as a hole, or to be read, with the
/// next range that may hold data when it already asked the source.
enum WindowPlan {
    Skipped,
    Read(Option<std::ops::Range<u64>>),
}

/// Feeds the blocks of one window of the source into the ingest. `data`: the next
/// range from `woff` that may hold data, if known already.
#[allow(clippy::too_many_arguments)]
fn read_window(
    source: &dyn Source,
    url: &Url,
    feed: &Feed,
    woff: u64,
    wlen: u64,
    data: Option<std::ops::Range<u64>>,
    bs: u32,
    wanted: Option<&crate::hints::Wanted>,
    progress: &dyn Progress,
) -> Result<()> {
    let ingest = feed.ingest;
    let bs = bs as u64;
    let first = woff / bs;
    let blocks = wlen.div_ceil(bs);
    let want = |idx: u64| wanted.is_none_or(|w| w.contains(idx));
    if wanted.is_some_and(|w| !w.any_in(first..first + blocks)) {
        feed.wait_for(first);
        ingest.lock().submit_not_read(first, blocks)?;
        progress.advance(wlen);
        return Ok(());
    }
    // Holes (of a sparse file; all of null://) are recorded as sparse without reading:
    // `data` is the next range that may hold data, advanced as the blocks pass its end
    // (with no data left it is `size..size`, which no block passes).
    let next_data =
        |off: u64| source.next_data(off).map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e));
    let mut data = match data {
        Some(d) => d,
        None => next_data(woff)?,
    };
    if data.start >= woff + wlen && wanted.is_none_or(|w| w.all_in(first..first + blocks)) {
        feed.wait_for(first);
        ingest.lock().submit_zero_run(first, blocks, wlen)?;
        progress.advance(wlen);
        return Ok(());
    }
    let window = if data.start >= woff + wlen {
        None
    } else {
        source.window(woff, wlen).transpose().map_err(|e| Error::io(format!("cannot map {url} at byte {woff}"), e))?
    };
    for i in 0..blocks {
        if feed.stopped() {
            return Ok(());
        }
        let off = woff + i * bs;
        let len = (woff + wlen - off).min(bs);
        let idx = first + i;
        feed.wait_for(idx);
        if !want(idx) {
            ingest.lock().submit_not_read(idx, 1)?;
            progress.advance(len);
            continue;
        }
        if data.end <= off {
            data = next_data(off)?;
        }
        if data.start >= off + len {
            ingest.lock().submit_zero(idx, len)?;
        } else if let Some(win) = &window {
            let token = ingest.lock().take_buffer()?;
            ingest.lock().submit_mapped(idx, token, win.clone(), (off - woff) as usize, len as usize)?;
        } else {
            let mut buf = ingest.lock().take_buffer()?;
            buf.resize(len as usize, 0);
            source.read_at(off, &mut buf).map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e))?;
            source.done_with(off, len);
            ingest.lock().submit(idx, buf)?;
        }
        progress.advance(len);
    }
    Ok(())
}

impl Repository {
    /// Fills the blocks a differential backup did not read: from the base where it has
    /// them, sparse past its end (rbd diff reports growth as changed regions). The blocks
    /// read (`read`, where those not read are sparse) and the base's index are walked
    /// side by side as streams (`read` on a thread of its own) into the version's index.
    fn merge_base(&self, read: IndexFile, d: &Differential, stats: &mut Stats) -> Result<IndexFile> {
        let head = read.header();
        let (n, size, bs) = (head.count, head.size, head.block_size);
        let len = |idx: u64| crate::index::block_len(size, bs, idx);
        let mut out = self.index_writer(bs)?;
        let mut from_base = 0u64;
        let mut failed: Option<Error> = None;
        let read = &read;
        let (read_walk, walked) = crate::repo::walk_beside(
            |hand| BlockIndex::visit_reader(read.reader(), hand),
            |mut from_read| {
                let mut put = |i: u64, id: BlockId, out: &mut IndexWriter| match out.push(i, id) {
                    Ok(()) => true,
                    Err(e) => {
                        failed.get_or_insert(e);
                        false
                    }
                };
                let walked = match &d.base {
                    // Walked to the end even when the image shrank: the base's checksum,
                    // known only there, must hold before its ids go into this version.
                    Some(base) => self
                        .walk_index(base, |idx, id| {
                            if idx >= n || d.wanted.contains(idx) {
                                return true;
                            }
                            while let Some((i, x)) = from_read.next_if(|&(i, _)| i < idx) {
                                if !put(i, x, &mut out) {
                                    return false;
                                }
                            }
                            from_base += len(idx);
                            put(idx, id, &mut out)
                        })
                        .map(|_| ()),
                    None => Ok(()),
                };
                // The rest of the blocks read (drained even after a failure: the walker
                // ends then).
                let mut going = walked.is_ok();
                for (i, x) in from_read {
                    going = going && put(i, x, &mut out);
                }
                walked
            },
        );
        let read_walk = match read_walk {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(Error::Other("the blocks read were not all handed over".into())),
            Ok(Err(e)) => Err(Error::Other(format!("the index of the blocks read does not read back: {e}"))),
            Err(_) => Err(Error::Other("the thread reading the blocks read panicked".into())),
        };
        walked.and(read_walk)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let bytes = |r: std::ops::Range<u64>| (r.end * bs as u64).min(size) - r.start * bs as u64;
        let not_read: u64 = d.wanted.gaps().map(bytes).sum();
        stats.bytes_deduplicated += from_base;
        stats.bytes_sparse += not_read - from_base;
        out.finish(head.uid, size)
    }
}

impl Repository {
    /// Checks a base version and hints and decides which blocks to read. Errors here come
    /// before any version is created.
    fn plan_differential(
        &self,
        opts: &mut BackupOptions,
        source: &dyn Source,
        url: &Url,
        session: &crate::repo::SessionGuard,
    ) -> Result<Option<Differential>> {
        let size = source.size();
        let base = match opts.base {
            None => None,
            Some(buid) => {
                let b = self.version(buid)?;
                // An invalid base is fine: the blocks that made it invalid are read again
                // below, whatever the hints say. An incomplete one has no index to trust.
                if b.status == crate::version::Status::Incomplete {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is incomplete; a base must be a finished backup (choose another)"
                    )));
                }
                if b.name != opts.name {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is a backup of '{}', not '{}'; a base must have the same name",
                        b.name, opts.name
                    )));
                }
                match opts.block_size {
                    Some(bs) if bs != b.block_size => {
                        return Err(Error::Invalid(format!(
                            "base version {buid} has blocks of {} bytes, this backup {bs}; use the base's block size",
                            b.block_size
                        )));
                    }
                    _ => opts.block_size = Some(b.block_size),
                }
                let storage = opts.storage.clone().unwrap_or_else(|| self.config.default_storage.clone());
                if storage != b.storage && opts.storage.is_some() {
                    return Err(Error::Invalid(format!(
                        "base version {buid} is in storage '{}', this backup goes to '{storage}'; a base must be in the same storage",
                        b.storage
                    )));
                }
                opts.storage = Some(b.storage.clone());
                session.lock_version(buid, "base")?;
                // Checked end to end before anything is planned from it.
                self.walk_index(&b, |_, _| true)?;
                Some(b)
            }
        };
        let bs = opts.block_size.unwrap_or(self.config.block_size);
        let mut wanted = match (opts.hints.as_deref(), opts.diff_from.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(Error::Invalid("give --hints or --diff-from, not both".into()));
            }
            (None, Some(snap)) => {
                let Some(b) = &base else {
                    return Err(Error::Invalid(format!(
                        "--diff-from {snap} needs --base UID (the version of snapshot {snap})"
                    )));
                };
                if size < b.size {
                    return Err(Error::Invalid(format!(
                        "{url} holds {size} bytes, base {} {}: the image shrank since the base; back up without --base/--diff-from (an initial backup)",
                        b.uid, b.size
                    )));
                }
                crate::hints::wanted_blocks(source.changed_since(snap, opts.whole_object)?, size, bs)?
            }
            (Some(json), None) => crate::hints::parse_hints(json, size, bs)?,
            (None, None) => {
                if base.is_some() {
                    return Err(Error::Invalid(
                        "--base needs --hints or --diff-from (a backup without them reads everything anyway)".into(),
                    ));
                }
                return Ok(None);
            }
        };
        let Some(base) = base else {
            return Ok(Some(Differential { wanted, base: None }));
        };
        let n = wanted.len();
        let base_len = block_count(base.size, base.block_size);
        let block_len = |idx: u64, size: u64| crate::index::block_len(size, bs, idx);
        // Blocks whose length changed (the base's last, the new last) are read whole.
        for idx in [base_len.saturating_sub(1), n.saturating_sub(1)] {
            if idx < n && idx < base_len && block_len(idx, base.size) != block_len(idx, size) {
                wanted.insert(idx..idx + 1);
            }
        }
        let base_storage_name = base.storage.clone();
        // Blocks whose stored object a scrub found damaged are always read again.
        let base_storage_id = self.storage_id(&base_storage_name)?;
        let damaged = self.db().invalid_objects(base_storage_id)?;
        if !damaged.is_empty() {
            self.walk_index(&base, |idx, id| {
                if idx < n && damaged.contains(&id) {
                    wanted.insert(idx..idx + 1);
                }
                true
            })?;
        }
        // Trust, but verify: a sample of the blocks the hints call unchanged must match.
        let percent = opts.hints_check_percent.unwrap_or(1).min(100);
        // Found without a list of every unchanged block (that would be 8 bytes a block).
        let unchanged = || wanted.gaps().flat_map(|r| r.start..r.end.min(base_len)).map(|i| i as usize);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        let unchanged_count = unchanged().count() as u64;
        // At most MAX_HINT_SAMPLES (every k-th of the drawn sample): 40 bytes each held.
        let stride = (unchanged_count * percent as u64 / 100).div_ceil(MAX_HINT_SAMPLES).max(1) as usize;
        let mut sample: Vec<usize> = unchanged()
            .filter(|&i| crate::scrub::sampled(seed, i as u64, percent))
            .step_by(stride)
            .take(MAX_HINT_SAMPLES as usize)
            .collect();
        if sample.is_empty() && percent > 0 && unchanged_count > 0 {
            sample.extend(unchanged().nth((seed % unchanged_count) as usize));
        }
        // The base's ids of the sampled blocks (in block order; sparse where it has none),
        // from its index read as a stream.
        let mut base_ids = vec![BlockId::SPARSE; sample.len()];
        let mut at = 0;
        self.walk_index(&base, |idx, id| {
            while at < sample.len() && (sample[at] as u64) < idx {
                at += 1;
            }
            if at < sample.len() && sample[at] as u64 == idx {
                base_ids[at] = id;
            }
            at < sample.len()
        })?;
        let base_storage = self.storage(&base_storage_name)?;
        let mut buf = vec![0u8; bs as usize];
        for (idx, base_id) in sample.into_iter().zip(base_ids) {
            let off = idx as u64 * bs as u64;
            let len = (size - off).min(bs as u64) as usize;
            source
                .read_at(off, &mut buf[..len])
                .map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e))?;
            let id = if crate::block::is_zero(&buf[..len]) {
                BlockId::SPARSE
            } else {
                base_storage.codec().id_of(&buf[..len])
            };
            if id != base_id {
                if let Some(snap) = &opts.diff_from {
                    return Err(Error::Invalid(format!(
                        "the diff from snapshot {snap} is wrong: block {idx} (bytes {off}..{}) of {url} differs from base {} although librbd calls it unchanged; is {} really the version of snapshot {snap}? Back up without --base/--diff-from",
                        off + len as u64,
                        base.uid,
                        base.uid
                    )));
                }
                return Err(Error::Invalid(format!(
                    "the hints are wrong: block {idx} (bytes {off}..{}) of {url} differs from base {} although the hints call it unchanged; back up without --base/--hints or with fresh hints",
                    off + len as u64,
                    base.uid
                )));
            }
        }
        Ok(Some(Differential { wanted, base: Some(base) }))
    }
}

/// The name, snapshot name and labels a new version gets, checked before anything is
/// written (see [`check_name`]).
fn check_fields(opts: &BackupOptions) -> Result<()> {
    check_name(&opts.name)?;
    check_snapshot(&opts.snapshot)?;
    opts.labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

#[cfg(test)]
mod auto_tag_tests {
    use super::auto_tags;
    use crate::version::{Version, test_version};
    use chrono::{DateTime, Utc};

    fn v(date: &str, tags: &[&str]) -> Version {
        let mut v = test_version(1, "db", DateTime::parse_from_rfc3339(date).unwrap().with_timezone(&Utc));
        v.labels = tags.iter().map(|t| (t.to_string(), String::new())).collect();
        v
    }

    #[test]
    fn first_backup_of_each_period_gets_its_tag() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert_eq!(auto_tags(&[], "db", at("2026-11-18T10:00:00Z")), ["b_daily", "b_weekly", "b_monthly"]);
        // Wednesday 18 Nov had all three; the same day again: nothing.
        let hist = vec![v("2026-11-18T01:00:00Z", &["b_daily", "b_weekly", "b_monthly"])];
        assert!(auto_tags(&hist, "db", at("2026-11-18T23:00:00Z")).is_empty());
        // Thursday of the same ISO week: daily only. Another name: everything.
        assert_eq!(auto_tags(&hist, "db", at("2026-11-19T08:00:00Z")), ["b_daily"]);
        assert_eq!(auto_tags(&hist, "web", at("2026-11-19T08:00:00Z")).len(), 3);
        // Monday 23 Nov: a new week; 1 Dec: a new month (and week 49).
        assert_eq!(auto_tags(&hist, "db", at("2026-11-23T08:00:00Z")), ["b_daily", "b_weekly"]);
        assert_eq!(auto_tags(&hist, "db", at("2026-12-01T08:00:00Z")), ["b_daily", "b_weekly", "b_monthly"]);
    }
}
