//! Writing a stored block index (format 2) as its blocks arrive in block order, into a
//! file: what a backup of any size holds in memory is one run's ids (at most
//! [`RUN_MAX`] of them, 2 MiB), never the image's map. The finished index is an
//! [`IndexFile`]: read back as a stream into the version object and the catalog.
//!
//! The body's runs are those [`super::BlockIndex::encode`] writes (it uses [`Runs`]
//! too), so an index written here and one encoded from a map are the same bytes.

use super::{
    INDEX_FORMAT_VERSION, INDEX_HEADER_LEN, INDEX_MAGIC, INDEX_ZSTD_LEVEL, IndexHeader, MAX_DATA_BLOCKS_PER_VERSION,
    MAX_INDEX_LEN, block_count, too_much_data,
};
use crate::block::{BlockId, ID_LEN};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most ids in one run. A longer stretch of data blocks is written as several runs, the
/// later ones with no sparse blocks before them, so a writer never buffers more than
/// this many ids (every reader of format 2 reads such runs).
pub const RUN_MAX: usize = 65_536;

/// The run encoder: takes blocks in block order and writes the body's runs (sparse
/// count, data count, ids) to `out`, counting the body's bytes.
pub struct Runs<W: Write> {
    out: W,
    /// Blocks handed over so far: the next block's number.
    at: u64,
    /// Sparse blocks before the run being built.
    run_sparse: u64,
    /// Sparse blocks since the last data block, not yet part of a run.
    gap: u64,
    /// The ids of the run being built.
    ids: Vec<u8>,
    /// Body bytes written.
    body: u64,
    /// Data blocks handed over.
    data: u64,
}

impl<W: Write> Runs<W> {
    pub fn new(out: W) -> Runs<W> {
        Runs { out, at: 0, run_sparse: 0, gap: 0, ids: Vec::new(), body: 0, data: 0 }
    }

    /// The next block's number: how many blocks were handed over.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Data blocks handed over.
    pub fn data_blocks(&self) -> u64 {
        self.data
    }

    /// Block `idx` (not before the next block; those between are sparse) holds `id`.
    pub fn push(&mut self, idx: u64, id: BlockId) -> std::io::Result<()> {
        if idx < self.at {
            return Err(std::io::Error::other(format!("block {idx} handed to the index after block {}", self.at)));
        }
        self.gap += idx - self.at;
        self.at = idx + 1;
        if id.is_sparse() {
            self.gap += 1;
            return Ok(());
        }
        if self.gap > 0 && !self.ids.is_empty() {
            self.flush_run()?;
        }
        if self.ids.is_empty() {
            self.run_sparse += self.gap;
            self.gap = 0;
        }
        self.ids.extend_from_slice(&id.0);
        self.data += 1;
        if self.ids.len() == RUN_MAX * ID_LEN {
            self.flush_run()?;
        }
        Ok(())
    }

    /// `count` sparse blocks from the next one on.
    pub fn skip(&mut self, count: u64) {
        self.gap += count;
        self.at += count;
    }

    fn flush_run(&mut self) -> std::io::Result<()> {
        let d = (self.ids.len() / ID_LEN) as u64;
        self.out.write_all(&self.run_sparse.to_le_bytes())?;
        self.out.write_all(&d.to_le_bytes())?;
        self.out.write_all(&self.ids)?;
        self.body += 16 + self.ids.len() as u64;
        self.ids.clear();
        self.run_sparse = 0;
        Ok(())
    }

    /// Ends the body at `count` blocks (those not handed over are sparse); the writer
    /// and the body's length.
    pub fn finish(mut self, count: u64) -> std::io::Result<(W, u64)> {
        if self.at > count {
            return Err(std::io::Error::other(format!("{} blocks handed to an index of {count}", self.at)));
        }
        self.gap += count - self.at;
        if !self.ids.is_empty() {
            self.flush_run()?;
        }
        if self.gap > 0 {
            self.out.write_all(&self.gap.to_le_bytes())?;
            self.out.write_all(&0u64.to_le_bytes())?;
            self.body += 16;
        }
        Ok((self.out, self.body))
    }
}

/// The 80-byte header of a stored index of format 2, checksum zeroed.
pub(super) fn header(uid: u64, size: u64, block_size: u32, count: u64, body_len: u64) -> [u8; INDEX_HEADER_LEN] {
    let mut out = [0u8; INDEX_HEADER_LEN];
    out[0..8].copy_from_slice(&INDEX_MAGIC);
    out[8..10].copy_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&(ID_LEN as u16).to_le_bytes());
    out[12..16].copy_from_slice(&block_size.to_le_bytes());
    out[16..24].copy_from_slice(&uid.to_le_bytes());
    out[24..32].copy_from_slice(&size.to_le_bytes());
    out[32..40].copy_from_slice(&count.to_le_bytes());
    out[72..80].copy_from_slice(&body_len.to_le_bytes());
    out
}

/// The error of a stored index that would be over [`MAX_INDEX_LEN`].
pub(super) fn too_long(uid: u64, len: u64) -> Error {
    Error::Invalid(format!(
        "the block index of version {} would take {len} bytes, more than one version's index may ({MAX_INDEX_LEN}): use a larger block size (-b)",
        crate::version::VersionUid(uid),
    ))
}

/// Writes a stored index into an unnamed file (gone with the process, whatever ends
/// it) as blocks arrive in block order.
pub struct IndexWriter {
    runs: Runs<zstd::stream::write::Encoder<'static, BufWriter<File>>>,
    block_size: u32,
    /// Where the file is (named in errors: a full disk there stops a backup).
    dir: std::path::PathBuf,
}

impl IndexWriter {
    /// A writer whose file lies in `dir` (created with `modes` if need be).
    pub fn new(dir: &Path, modes: crate::perms::Modes, block_size: u32) -> Result<IndexWriter> {
        let mut file = spool_file(dir, modes)?;
        // The header goes in last, when the body's length is known.
        file.write_all(&[0u8; INDEX_HEADER_LEN]).map_err(|e| write_error(dir, e))?;
        let z = zstd::stream::write::Encoder::new(file, INDEX_ZSTD_LEVEL).map_err(|e| write_error(dir, e))?;
        Ok(IndexWriter { runs: Runs::new(z), block_size, dir: dir.to_path_buf() })
    }

    /// The next block's number.
    pub fn at(&self) -> u64 {
        self.runs.at()
    }

    /// Block `idx` (not before [`IndexWriter::at`]) holds `id`; the blocks between are
    /// sparse. Refuses the data block past [`MAX_DATA_BLOCKS_PER_VERSION`].
    pub fn push(&mut self, idx: u64, id: BlockId) -> Result<()> {
        if let Err(e) = self.runs.push(idx, id) {
            return Err(write_error(&self.dir, e));
        }
        if self.runs.data_blocks() > MAX_DATA_BLOCKS_PER_VERSION {
            return Err(too_much_data(self.runs.data_blocks(), self.block_size));
        }
        Ok(())
    }

    /// `count` sparse blocks from [`IndexWriter::at`] on.
    pub fn skip(&mut self, count: u64) {
        self.runs.skip(count);
    }

    /// Ends the index of version `uid`, an image of `size` bytes (blocks past those
    /// handed over are sparse): writes the header and the checksum.
    pub fn finish(self, uid: u64, size: u64) -> Result<IndexFile> {
        let count = block_count(size, self.block_size);
        let data_blocks = self.runs.data_blocks();
        let dir = self.dir;
        let write_error = |e| write_error(&dir, e);
        let (z, body_len) = self.runs.finish(count).map_err(write_error)?;
        let file = z.finish().and_then(|w| w.into_inner().map_err(|e| e.into_error())).map_err(write_error)?;
        let len = file.metadata().map_err(write_error)?.len();
        if len > MAX_INDEX_LEN {
            return Err(too_long(uid, len));
        }
        let head = header(uid, size, self.block_size, count, body_len);
        file.write_all_at(&head, 0).map_err(write_error)?;
        let head = IndexHeader { uid, size, block_size: self.block_size, count };
        let index = IndexFile { file, len, head, data_blocks, dir: dir.clone() };
        let mut sum = Sha256::new();
        let mut r = index.reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(write_error)?;
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
        }
        index.file.write_all_at(&sum.finalize(), 40).map_err(write_error)?;
        Ok(index)
    }
}

/// A failed write of a block index file in the spool directory `dir` (named: a full disk
/// there stops the work).
pub(crate) fn write_error(dir: &Path, e: std::io::Error) -> Error {
    Error::io(format!("cannot write the block index file in {}", dir.display()), e)
}

/// A new unnamed file in the spool directory `dir` (made with `modes` if need be), gone
/// with the process however it ends, written through a buffer of 1 MiB.
pub(crate) fn spool_file(dir: &Path, modes: crate::perms::Modes) -> Result<BufWriter<File>> {
    let io = |e| Error::io(format!("cannot make a block index file in {}", dir.display()), e);
    Ok(BufWriter::with_capacity(1 << 20, modes.unnamed_file(dir).map_err(io)?))
}

/// A finished stored index in an unnamed file: what a version is committed with.
pub struct IndexFile {
    file: File,
    len: u64,
    head: IndexHeader,
    data_blocks: u64,
    /// The spool directory it lies in (where files made from it go too).
    dir: std::path::PathBuf,
}

impl IndexFile {
    /// The stored form of an index held in memory, written to a file in `dir` (what the
    /// tests compare a file written in block order with).
    #[cfg(test)]
    pub fn of_index(dir: &Path, modes: crate::perms::Modes, index: &super::BlockIndex) -> Result<IndexFile> {
        let mut w = IndexWriter::new(dir, modes, index.block_size)?;
        for (idx, id) in index.entries.data() {
            w.push(idx, id)?;
        }
        w.finish(index.uid, index.size)
    }

    /// Bytes of the stored index.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file that holds it (read it with [`IndexFile::reader`] or at offsets).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn header(&self) -> IndexHeader {
        self.head
    }

    /// The spool directory the file lies in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// The stored index from its start.
    pub fn reader(&self) -> IndexFileReader<'_> {
        IndexFileReader { file: &self.file, at: 0, len: self.len }
    }

    /// The whole stored index in memory (tests, small indexes).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len as usize);
        self.reader().read_to_end(&mut out).map_err(|e| Error::io("cannot read the block index file", e))?;
        Ok(out)
    }
}

/// A stored index copied into an unnamed spool file as it is read from elsewhere (the
/// version object a rebuild records a version from): an [`IndexFile`] once the reader
/// has checked it.
pub struct KeptIndex {
    out: BufWriter<File>,
    len: u64,
    failed: Option<std::io::Error>,
    dir: std::path::PathBuf,
}

impl KeptIndex {
    /// A copy whose file lies in `dir` (created with `modes` if need be).
    pub fn new(dir: &Path, modes: crate::perms::Modes) -> Result<KeptIndex> {
        let out = spool_file(dir, modes)?;
        Ok(KeptIndex { out, len: 0, failed: None, dir: dir.to_path_buf() })
    }

    /// `r`, every byte read from it also copied into the file. A failed copy fails the
    /// read (see [`KeptIndex::failed`]).
    pub fn tee<R: Read>(&mut self, r: R) -> Tee<'_, R> {
        Tee { r, kept: self }
    }

    /// Why the copy failed, if it did.
    pub fn failed(self) -> Option<Error> {
        let dir = self.dir;
        self.failed.map(|e| write_error(&dir, e))
    }

    /// The copy, once the index it holds was checked: its header and data blocks.
    pub fn finish(self, head: IndexHeader, data_blocks: u64) -> Result<IndexFile> {
        let dir = self.dir;
        if let Some(e) = self.failed {
            return Err(write_error(&dir, e));
        }
        let file = self.out.into_inner().map_err(|e| write_error(&dir, e.into_error()))?;
        Ok(IndexFile { file, len: self.len, head, data_blocks, dir })
    }
}

/// A reader whose bytes are copied into a [`KeptIndex`] as they pass.
pub struct Tee<'a, R> {
    r: R,
    kept: &'a mut KeptIndex,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.kept.failed.is_some() {
            return Err(std::io::Error::other("the block index could not be kept"));
        }
        let n = self.r.read(buf)?;
        if let Err(e) = self.kept.out.write_all(&buf[..n]) {
            self.kept.failed = Some(e);
            return Err(std::io::Error::other("the block index could not be kept"));
        }
        self.kept.len += n as u64;
        Ok(n)
    }
}

/// Reads an [`IndexFile`] from its start; several may read one file at once.
pub struct IndexFileReader<'a> {
    file: &'a File,
    at: u64,
    len: u64,
}

impl Read for IndexFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.len - self.at).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the block index file was cut short"));
        }
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{BlockIndex, Entries};

    fn id(n: u64) -> BlockId {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&(n + 1).to_le_bytes());
        b[31] = 0x5a;
        BlockId(b)
    }

    fn written(index: &BlockIndex) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        IndexFile::of_index(dir.path(), crate::perms::Modes::PRIVATE, index).unwrap().to_vec().unwrap()
    }

    #[test]
    fn a_file_written_in_block_order_is_the_index_encoded_from_its_map() {
        let cases: Vec<(u64, Vec<u64>)> = vec![
            (0, vec![]),
            (1, vec![]),
            (1, vec![0]),
            (10, vec![0, 1, 2]),
            (10, vec![7, 8, 9]),
            (1000, vec![3, 4, 5, 100, 999]),
            (4096, (0..4096).filter(|i| i % 3 != 0).collect()),
        ];
        for (count, data) in cases {
            let mut entries = Entries::sparse(count);
            for &i in &data {
                entries.set(i, id(i));
            }
            let index = BlockIndex { uid: 7, size: count * 4096 - (count > 0) as u64 * 100, block_size: 4096, entries };
            let bytes = written(&index);
            assert_eq!(bytes, index.encode().unwrap(), "{count} blocks, {} with data", data.len());
            assert_eq!(BlockIndex::decode(&bytes).unwrap(), index);
        }
    }

    #[test]
    fn a_stretch_longer_than_a_run_is_split_and_reads_back_whole() {
        let count = RUN_MAX as u64 * 2 + 300;
        let mut entries = Entries::sparse(count + 5);
        for i in 5..5 + count {
            entries.set(i, id(i));
        }
        let index = BlockIndex { uid: 3, size: (count + 5) * 512, block_size: 512, entries };
        let bytes = written(&index);
        assert_eq!(bytes, index.encode().unwrap());
        assert_eq!(BlockIndex::decode(&bytes).unwrap(), index);
        // Three runs: 5 sparse then RUN_MAX ids; none then RUN_MAX; none then 300.
        let mut runs = Vec::new();
        let body = zstd::decode_all(&bytes[INDEX_HEADER_LEN..]).unwrap();
        let mut at = 0;
        while at < body.len() {
            let s = u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
            let d = u64::from_le_bytes(body[at + 8..at + 16].try_into().unwrap());
            runs.push((s, d));
            at += 16 + d as usize * ID_LEN;
        }
        assert_eq!(runs, vec![(5, RUN_MAX as u64), (0, RUN_MAX as u64), (0, 300)]);
    }

    #[test]
    fn blocks_handed_out_of_order_or_past_the_image_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = IndexWriter::new(dir.path(), crate::perms::Modes::PRIVATE, 4096).unwrap();
        w.push(5, id(5)).unwrap();
        assert!(w.push(5, id(5)).is_err());
        assert!(w.push(2, id(2)).is_err());
        let mut w = IndexWriter::new(dir.path(), crate::perms::Modes::PRIVATE, 4096).unwrap();
        w.push(9, id(9)).unwrap();
        assert!(w.finish(1, 4096 * 5).is_err());
        // Nothing is left in the directory: the files have no names.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn skipped_blocks_are_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = IndexWriter::new(dir.path(), crate::perms::Modes::PRIVATE, 4096).unwrap();
        w.skip(3);
        w.push(3, id(3)).unwrap();
        w.skip(100);
        w.push(104, BlockId::SPARSE).unwrap();
        w.push(105, id(105)).unwrap();
        let f = w.finish(9, 4096 * 200).unwrap();
        let mut entries = Entries::sparse(200);
        entries.set(3, id(3));
        entries.set(105, id(105));
        let index = BlockIndex { uid: 9, size: 4096 * 200, block_size: 4096, entries };
        assert_eq!(f.to_vec().unwrap(), index.encode().unwrap());
        assert_eq!(f.len(), f.to_vec().unwrap().len() as u64);
        assert_eq!(f.data_blocks(), 2);
    }
}
