//! Drafts (the engine under `incoming/` and copy-on-write) against an in-memory model:
//! random writes, truncates, extensions and reads, with spool limits so small that
//! spilling, reading back and handing blocks over again all happen; the committed
//! version must restore to exactly the model, and a base version must not change.
//! On the test's own PostgreSQL catalog when `KEEPFS_TEST_POSTGRES` is set.

mod common;
use common::*;
use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::cache::BlockCache;
use keepfs::progress::Silent;
use keepfs::restore::RestoreOptions;
use keepfs::session::draft::{Draft, DraftOptions};
use keepfs::source::Url;
use std::sync::Arc;

const BS: u32 = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn restore(repo: &Repository, dir: &std::path::Path, uid: keepfs::version::VersionUid) -> Vec<u8> {
    let out = dir.join(format!("out-{uid}"));
    let r = repo.restore(uid, &Url::File(out.clone()), &RestoreOptions::default(), &Silent).unwrap();
    assert!(r.bad_blocks.is_empty());
    std::fs::read(out).unwrap()
}

fn exercise(seed: u64, base: Option<Vec<u8>>, streaming: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (config, _db) = embedded_config(dir.path().join("home"));
    let repo = Arc::new(Repository::open(config).unwrap());
    let cache = Arc::new(BlockCache::new(1 << 20));
    let mut model = base.clone().unwrap_or_default();
    let base_image = base.as_ref().map(|b| {
        let img = dir.path().join("base");
        std::fs::write(&img, b).unwrap();
        let opts = BackupOptions { name: "vm".into(), block_size: Some(BS), ..Default::default() };
        let v = repo.backup(&Url::File(img), &opts, &Silent).unwrap();
        Arc::new(repo.open_image(v.uid, cache.clone(), None).unwrap())
    });
    let base_uid = base_image.as_ref().map(|b| b.version.uid);
    let opts = DraftOptions {
        backup: BackupOptions { name: "vm".into(), block_size: Some(BS), ..Default::default() },
        base: base_image,
        streaming,
        memory_blocks: 2,
        spool_blocks: 5,
    };
    let mut d = Draft::start(repo.clone(), opts).unwrap();
    let mut rng = Rng(seed);
    for step in 0..400 {
        match rng.below(10) {
            0..=5 => {
                // Mostly sequential runs, sometimes anywhere (including past the end).
                let off = if rng.below(3) == 0 { rng.below(40 * BS as u64) } else { model.len() as u64 };
                let len = 1 + rng.below(3 * BS as u64) as usize;
                let data = random_bytes(seed * 1000 + step, len);
                d.write_at(off, &data).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            6 => {
                let new = rng.below(45 * BS as u64) as usize;
                d.set_size(new as u64).unwrap();
                model.resize(new, 0);
            }
            _ => {
                let off = rng.below(model.len() as u64 + 100);
                let len = rng.below(2 * BS as u64) as usize;
                let mut buf = vec![0xAAu8; len];
                let n = d.read_at(off, &mut buf).unwrap();
                let want = &model[(off as usize).min(model.len())..(off as usize + len).min(model.len())];
                assert_eq!(n, want.len(), "step {step}: read length");
                assert!(buf[..n] == *want, "step {step}: read at {off}+{len} differs from the model");
                // SEEK_DATA/SEEK_HOLE and NBD block status: what is reported as a hole
                // reads as zeros; the whole answer ends at a hole (or the end), one looked
                // for up to a reader's range end is the same stretch, cut short past it.
                let zeros = |r: std::ops::Range<usize>| {
                    model[r.start.min(model.len())..r.end.min(model.len())].iter().all(|&b| b == 0)
                };
                let whole = d.next_data(off, u64::MAX);
                match &whole {
                    None => assert!(zeros(off as usize..model.len()), "step {step}: data after {off} reported as none"),
                    Some(r) => {
                        assert!(r.start >= off && r.start < r.end && r.end <= model.len() as u64, "step {step}: {r:?}");
                        assert!(zeros(off as usize..r.start as usize), "step {step}: data before {r:?} skipped");
                        let after = r.end as usize;
                        assert!(zeros(after..after + BS as usize), "step {step}: {r:?} ends in data");
                    }
                }
                let until = off + len as u64;
                let near = d.next_data(off, until);
                assert_eq!(near.as_ref().map(|r| r.start), whole.as_ref().map(|r| r.start), "step {step}");
                if let (Some(n), Some(w)) = (&near, &whole) {
                    assert!(
                        n.end <= w.end && (n.end == w.end || n.end >= until),
                        "step {step}: {n:?} {w:?} until {until}"
                    );
                }
            }
        }
        assert_eq!(d.size(), model.len() as u64);
    }
    let v = d.commit().unwrap();
    assert_eq!(v.size, model.len() as u64);
    assert_eq!(restore(&repo, dir.path(), v.uid), model, "committed version differs from the model");
    // Its all-zero blocks, written or holes never written, count as sparse, as a
    // backup of the same image counts them.
    let zero: usize = model.chunks(BS as usize).filter(|c| c.iter().all(|&b| b == 0)).map(|c| c.len()).sum();
    assert_eq!(v.stats.bytes_sparse, zero as u64, "sparse bytes of the committed version");
    if let (Some(b), Some(uid)) = (base, base_uid) {
        assert_eq!(restore(&repo, dir.path(), uid), b, "the base version changed");
    }
}

#[test]
fn streaming_draft_without_base_matches_the_model() {
    for seed in 1..6 {
        exercise(seed, None, true);
    }
}

#[test]
fn copy_on_write_draft_matches_the_model_and_leaves_the_base_alone() {
    for seed in 11..16 {
        let mut base = mixed_image(seed, 30, BS as usize, 1000);
        base[5 * BS as usize..6 * BS as usize].fill(0);
        exercise(seed, Some(base), false);
    }
}

#[test]
fn streaming_draft_over_a_base_matches_the_model() {
    exercise(21, Some(mixed_image(21, 20, BS as usize, 7)), true);
}

/// Blocks alike, written one after the other and read back at once (fsx with patterns,
/// `qemu-io write -P`): the second is found as a copy of the first while the first is
/// still being stored, and must read back once that object exists, never as missing.
/// And a draft's spool never shows in the spool directory: a killed process leaves none.
#[test]
fn blocks_alike_read_back_while_the_first_is_stored_and_the_spool_has_no_name() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (config, _db) = embedded_config(home.clone());
    let repo = Arc::new(Repository::open(config).unwrap());
    const ALIKE_BS: u32 = 64 << 10;
    let spool_names = || std::fs::read_dir(home.join("spool")).map(|d| d.count()).unwrap_or(0);
    for streaming in [true, false] {
        let opts = DraftOptions {
            backup: BackupOptions { name: "alike".into(), block_size: Some(ALIKE_BS), ..Default::default() },
            base: None,
            streaming,
            memory_blocks: 2,
            spool_blocks: 5,
        };
        let mut d = Draft::start(repo.clone(), opts).unwrap();
        let mut model = Vec::new();
        for round in 0..8u64 {
            // Sixteen copies in one write (handed over together), then each read back, the
            // last first: the copies complete before the first is stored.
            let block = random_bytes(900 + round, ALIKE_BS as usize);
            let start = model.len() as u64;
            d.write_at(start, &block.repeat(16)).unwrap();
            model.extend_from_slice(&block.repeat(16));
            for k in (0..16).rev() {
                let off = start + k * ALIKE_BS as u64;
                let mut back = vec![0u8; ALIKE_BS as usize];
                assert_eq!(d.read_at(off, &mut back).unwrap(), ALIKE_BS as usize);
                assert!(back == block, "block at {off} read back wrong (streaming {streaming})");
            }
            // A partial write into a block handed over as a copy: read, then rewritten.
            let off = model.len() as u64 - ALIKE_BS as u64 + 10;
            d.write_at(off, b"partial").unwrap();
            model[off as usize..off as usize + 7].copy_from_slice(b"partial");
        }
        assert_eq!(spool_names(), 0, "the spool file has a name in the spool directory");
        let v = d.commit().unwrap();
        assert_eq!(restore(&repo, dir.path(), v.uid), model);
    }
}

/// A draft whose memory holds more blocks than the ingest's own share of buffers (small
/// blocks, or a large `spool_memory`): partial writes into 600 blocks, each held in
/// memory, then a copy-on-write of them all. The draft used to wait forever for a
/// buffer the blocks it held would never give back (a `dd` through the mount hung,
/// unkillable, at the 256th 64 KiB block).
#[test]
fn a_draft_holding_more_blocks_than_the_pipelines_buffers_never_waits_forever() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _db) = embedded_config(dir.path().join("home"));
    let repo = Arc::new(Repository::open(config).unwrap());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let worker = {
        let repo = repo.clone();
        std::thread::spawn(move || {
            let opts = DraftOptions {
                backup: BackupOptions { name: "many".into(), block_size: Some(BS), ..Default::default() },
                base: None,
                streaming: false,
                // As a 32 MiB spool_memory at 4 KiB blocks: 8,192 blocks in memory,
                // against 256 buffers of the pipeline's own.
                memory_blocks: 8192,
                spool_blocks: 16384,
            };
            let mut d = Draft::start(repo, opts).unwrap();
            let mut model = vec![0u8; 600 * BS as usize];
            for i in 0..600u64 {
                let data = random_bytes(7000 + i, 100);
                d.write_at(i * BS as u64 + 17, &data).unwrap();
                model[(i * BS as u64 + 17) as usize..(i * BS as u64 + 117) as usize].copy_from_slice(&data);
            }
            // The image ends where the last write did.
            model.truncate(599 * BS as usize + 117);
            let v = d.commit().unwrap();
            let _ = done_tx.send(());
            (v.uid, model)
        })
    };
    // Waits for the state "committed"; a draft that never gets there is the bug.
    done_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the draft hung waiting for a buffer (no commit within 120 s)");
    let (uid, model) = worker.join().unwrap();
    let restored = restore(&repo, dir.path(), uid);
    assert_eq!(restored.len(), model.len());
    assert!(restored == model, "the committed version differs from what was written");
}
