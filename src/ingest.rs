//! The block pipeline: turns blocks into deduplicated, stored objects. Whoever feeds it
//! (a backup's reader threads, a draft's writes) fills recycled buffers; worker threads
//! detect zero blocks and hash; a coordinator looks the ids up in the catalog in batches
//! (dedup) and sends only new blocks back to the workers to be compressed; writer threads
//! store them. Memory is bounded by the buffer pool, not by the image size. A backup
//! ([`crate::backup`]) records what completes into its index in block order; a draft
//! ([`crate::session::draft`]) publishes each block's id as it completes.

use crate::block::{BlockId, ObjectKind, is_zero};
use crate::catalog::SharedCatalog;
use crate::error::{Error, Result};
use crate::index::IndexWriter;
use crate::record::{Frontier, Ordered, Published, Record, Recorded};
use crate::source::file::Window;
use crate::storage::{STORAGE_ATTEMPTS, SharedStorage, retry};
use crate::transform::Codec;
use crate::version::Stats;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, unbounded};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
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
    /// Buffers the caller keeps out of the pipeline at once (a draft's blocks held in
    /// memory): the pool holds that many beyond the pipeline's own share, so that what
    /// the caller holds never starves what it submits (a draft holding every buffer
    /// waited for one forever).
    pub held_by_caller: usize,
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
        let pool_count = (POOL_BYTES / bs).clamp(ctx.workers * 2 + 4, 256) + ctx.held_by_caller;
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
                // The message ends with the cause already: said once.
                let source = std::io::Error::from_raw_os_error(errno);
                let msg = msg.strip_suffix(&format!(": {source}")).unwrap_or(&msg);
                Error::Io { context: format!("{context}: {msg}"), source }
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
    pub(crate) fn submit_mapped(
        &mut self,
        idx: u64,
        token: Vec<u8>,
        window: Arc<Window>,
        start: usize,
        len: usize,
    ) -> Result<()> {
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
            if found.storage_encrypted && !self.ctx.storage.codec().is_sealed() {
                return Err(Error::Other(
                    "the storage was made encrypted (`keepfs init --encrypt`) while this backup ran, after it had opened the storage without a keyring; it stored nothing unencrypted there"
                        .into(),
                ));
            }
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
