//! `keepfs bench`: how fast this host does what a backup does, next to a reference
//! figure, as Proxmox Backup's `proxmox-backup-client benchmark` reports it: SHA-256
//! (block ids), zstd level 1 compression and decompression, AES-256-GCM (encrypted
//! storages), and each configured storage's write and read throughput (objects of the
//! configured block size, written under `bench/` and deleted afterwards).
//!
//! The reference figures of the CPU tests are Proxmox Backup's own ("2020 top", an AMD
//! Ryzen 7 2700X), so that the percentages read the same as theirs. Storages have no
//! reference: their figures are compared with this host's SHA-256 speed instead (a
//! storage slower than hashing is what limits a backup).

use crate::error::{Error, Result};
use crate::repo::Repository;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Stable name for scripts: sha256, zstd_compress, zstd_decompress, aes256_gcm,
    /// storage_write, storage_read.
    pub test: String,
    /// What was measured, for people.
    pub description: String,
    /// The storage measured (storage rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// Bytes per second measured (of uncompressed input for zstd).
    pub bytes_per_second: f64,
    /// The reference figure in bytes per second, if there is one.
    pub reference_bytes_per_second: Option<f64>,
    /// Where the reference comes from.
    pub reference: String,
    /// bytes_per_second as a percentage of the reference.
    pub percent_of_reference: Option<f64>,
    /// Bytes processed and how long it took.
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// How long each CPU test runs.
    pub duration: Duration,
    /// Bytes written to (and read from) each storage.
    pub storage_bytes: u64,
    /// Only these storages (all configured ones when empty).
    pub storages: Vec<String>,
    /// Skip the storages (CPU tests only).
    pub cpu_only: bool,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            duration: Duration::from_secs(1),
            storage_bytes: 64 << 20,
            storages: Vec::new(),
            cpu_only: false,
        }
    }
}

/// Proxmox Backup's reference ("BENCHMARK_RESULT_2020_TOP", AMD Ryzen 7 2700X), MB/s.
const PROXMOX_REFERENCE: &str = "Proxmox Backup 2020 top (AMD Ryzen 7 2700X)";
const REF_SHA256: f64 = 2022e6;
const REF_ZSTD_COMPRESS: f64 = 752e6;
const REF_ZSTD_DECOMPRESS: f64 = 1198e6;
const REF_AES256_GCM: f64 = 3645e6;

/// The test data: 4 MiB (the default block size), half pseudo-random and half text-like,
/// so that zstd has work of both kinds, as in a disk image.
fn sample_block() -> Vec<u8> {
    let len = 4 << 20;
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < len / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let words = b"keepfs block backup of a disk image with some repeated words ";
    let mut i = 0u64;
    while data.len() < len {
        data.extend_from_slice(words);
        data.extend_from_slice(i.to_string().as_bytes());
        i += 1;
    }
    data.truncate(len);
    data
}

/// Runs `f` (which processes `bytes` bytes) until `duration` has passed; bytes and seconds.
fn measure(duration: Duration, bytes: usize, mut f: impl FnMut() -> Result<()>) -> Result<(u64, f64)> {
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        f()?;
        done += bytes as u64;
        if start.elapsed() >= duration {
            break;
        }
    }
    Ok((done, start.elapsed().as_secs_f64().max(1e-9)))
}

fn row(test: &str, description: &str, storage: Option<String>, reference: Option<f64>, done: (u64, f64)) -> BenchRow {
    let (bytes, seconds) = done;
    let rate = bytes as f64 / seconds;
    BenchRow {
        test: test.into(),
        description: description.into(),
        storage,
        bytes_per_second: rate,
        reference_bytes_per_second: reference,
        reference: if reference.is_some() { PROXMOX_REFERENCE.into() } else { String::new() },
        percent_of_reference: reference.map(|r| rate / r * 100.0),
        bytes,
        seconds,
    }
}

/// The CPU tests.
pub fn cpu(duration: Duration) -> Result<Vec<BenchRow>> {
    let data = sample_block();
    let mut rows = Vec::new();

    let done = measure(duration, data.len(), || {
        std::hint::black_box(Sha256::digest(&data));
        Ok(())
    })?;
    rows.push(row("sha256", "SHA-256 checksums (block ids)", None, Some(REF_SHA256), done));

    let zerr = |e: std::io::Error| Error::Other(format!("zstd: {e}"));
    let compressed = zstd::bulk::compress(&data, 1).map_err(zerr)?;
    let mut compressor = zstd::bulk::Compressor::new(1).map_err(zerr)?;
    let done = measure(duration, data.len(), || {
        std::hint::black_box(compressor.compress(&data).map_err(zerr)?);
        Ok(())
    })?;
    rows.push(row("zstd_compress", "zstd level 1 compression", None, Some(REF_ZSTD_COMPRESS), done));

    let mut decompressor = zstd::bulk::Decompressor::new().map_err(zerr)?;
    let done = measure(duration, data.len(), || {
        std::hint::black_box(decompressor.decompress(&compressed, data.len()).map_err(zerr)?);
        Ok(())
    })?;
    rows.push(row("zstd_decompress", "zstd level 1 decompression", None, Some(REF_ZSTD_DECOMPRESS), done));

    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| Error::Other("AES-256-GCM: cannot make a key".into()))?,
    );
    let mut buf = data.clone();
    let mut counter = 0u64;
    let done = measure(duration, data.len(), || {
        counter += 1;
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&counter.to_le_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
            .map_err(|_| Error::Other("AES-256-GCM sealing failed".into()))?;
        let _ = std::hint::black_box(tag);
        Ok(())
    })?;
    rows.push(row("aes256_gcm", "AES-256-GCM encryption", None, Some(REF_AES256_GCM), done));
    Ok(rows)
}

/// Runs every test: the CPU ones, then each storage's write and read.
pub fn run(repo: &Repository, opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    let mut rows = cpu(opts.duration)?;
    if opts.cpu_only {
        return Ok(rows);
    }
    let sha = rows.first().map(|r| r.bytes_per_second);
    let names: Vec<String> = if opts.storages.is_empty() {
        repo.config.storages.iter().map(|s| s.name.clone()).collect()
    } else {
        for n in &opts.storages {
            repo.config.storage(n)?;
        }
        opts.storages.clone()
    };
    for name in names {
        let (w, r) = storage(repo, &name, opts.storage_bytes)?;
        for (test, what, done) in [("storage_write", "write", w), ("storage_read", "read", r)] {
            let mut rw =
                row(test, &format!("storage '{name}' {what} (objects of one block)"), Some(name.clone()), sha, done);
            rw.reference = "this host's SHA-256 speed".into();
            rows.push(rw);
        }
    }
    Ok(rows)
}

/// Writes `total` bytes of incompressible objects of the configured block size to a
/// storage, reads them back, and deletes them. (bytes, seconds) of each.
fn storage(repo: &Repository, name: &str, total: u64) -> Result<((u64, f64), (u64, f64))> {
    let st = repo.storage(name)?;
    let bs = repo.config.block_size as usize;
    let count = total.div_ceil(bs as u64).max(1) as usize;
    let run = format!("bench/{}-{}", std::process::id(), chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0));
    let mut data = vec![0u8; bs];
    let keys: Vec<String> = (0..count).map(|i| format!("{run}/{i}")).collect();
    let cleanup = |keys: &[String]| {
        let _ = st.delete_many(keys, None);
    };
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let start = Instant::now();
    for key in &keys {
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        if let Err(e) = st.put(key, &data) {
            cleanup(&keys);
            return Err(e.into());
        }
    }
    if let Err(e) = st.sync() {
        cleanup(&keys);
        return Err(e.into());
    }
    let write = ((count * bs) as u64, start.elapsed().as_secs_f64().max(1e-9));
    let start = Instant::now();
    let mut read_bytes = 0u64;
    for key in &keys {
        match st.get_fresh(key) {
            Ok(b) => read_bytes += b.len() as u64,
            // A null storage keeps nothing: there is no read speed to measure.
            Err(crate::storage::StorageError::NotFound { .. }) => {}
            Err(e) => {
                cleanup(&keys);
                return Err(e.into());
            }
        }
    }
    let read = (read_bytes, start.elapsed().as_secs_f64().max(1e-9));
    st.delete_many(&keys, None)?;
    Ok((write, read))
}
