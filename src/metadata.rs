//! Metadata export and import: versions (fields, labels, block index) as a versioned JSON
//! document, for keeping metadata apart from the database (backy2's export/import).

use crate::error::{Error, Result};
use crate::index::BlockIndex;
use crate::repo::Repository;
use crate::version::{Status, Version, VersionUid};
use crate::version_object::{Found, Recovered, read_version_object};
use serde::Serialize;

pub const FORMAT: &str = "keepfs-metadata";

/// How many recent ids an import or restore remembers to ask the storage once about a
/// repeated block.
const RECENT_IDS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(65_536).unwrap();

/// Objects found in the storage recorded in the catalog per transaction.
const FOUND_BATCH: usize = 16_384;
pub const FORMAT_VERSION: u32 = 1;

impl Repository {
    /// Writes the metadata of `uids` as a JSON document to `out` (a failed write is an
    /// I/O error with the context `what`). Each index is copied from the catalog as a
    /// stream (hex, checked as it passes), never held: the document of a dense version
    /// costs no memory. A damaged index stops it half way, an error (and the document
    /// not valid JSON): write it where it is kept only once complete.
    pub fn export_metadata_to(&self, uids: &[VersionUid], out: &mut dyn std::io::Write, what: &str) -> Result<()> {
        let io = |e| Error::io(what, e);
        let versions = uids.iter().map(|&uid| self.version(uid)).collect::<Result<Vec<_>>>()?;
        for v in &versions {
            self.stored_index(v)?; // one without an index is refused before anything is written
        }
        write!(
            out,
            "{{\n  \"format\": {},\n  \"format_version\": {},\n  \"versions\": [",
            to_json(FORMAT)?,
            FORMAT_VERSION
        )
        .map_err(io)?;
        for (n, v) in versions.iter().enumerate() {
            // As it is now (the walk below checks the index against these fields).
            let v = &self.version(v.uid)?;
            // The version's fields, then its index where the object closes.
            let fields = to_json(v)?;
            let open = fields.strip_suffix('}').unwrap_or(&fields);
            let comma = if open.ends_with('{') { "" } else { "," };
            let sep = if n == 0 { "\n    " } else { ",\n    " };
            write!(out, "{sep}{open}{comma}\"index\":\"").map_err(io)?;
            let mut stored = self.stored_index(v)?;
            let mut hex = HexOut { out: &mut *out, failed: None };
            let walked = {
                let mut tee = Hexed { inner: &mut stored, hex: &mut hex };
                let walked = BlockIndex::visit_reader(&mut tee, |_, _| true);
                // Whatever the walk left unread goes out too: the stored bytes, whole.
                let rest = std::io::copy(&mut tee, &mut std::io::sink());
                walked.and_then(|w| rest.map(|_| w).map_err(|e| crate::index::IndexError::Malformed(e.to_string())))
            };
            if let Some(e) = stored.failed.take() {
                return Err(e);
            }
            if let Some(e) = hex.failed.take() {
                return Err(io(e));
            }
            match walked {
                Ok(Some(head)) if head.uid == v.uid.0 && head.size == v.size && head.block_size == v.block_size => {}
                _ => return Err(self.confirm_damage(v)?),
            }
            out.write_all(b"\"}").map_err(io)?;
        }
        out.write_all(b"\n  ]\n}\n").map_err(io)?;
        out.flush().map_err(io)
    }

    /// Imports a document made by [`Repository::export_metadata_to`], read as a stream:
    /// each version's index is decoded from its hex as it passes, checked, and kept in
    /// a spool file, so a document of any size costs a version's fields in memory.
    /// Refuses the whole document if any uid exists already (nothing is recorded before
    /// every version was read and checked). A version whose objects are not all in its
    /// storage is imported as invalid. Returns the imported uids.
    pub fn import_metadata(&self, doc: impl std::io::Read) -> Result<Vec<VersionUid>> {
        use struson::reader::{JsonReader, JsonStreamReader};
        let mut json = JsonStreamReader::new(doc);
        let (mut format, mut format_version, mut checked) = (None, None, Vec::new());
        json.begin_object().map_err(doc_err)?;
        while json.has_next().map_err(doc_err)? {
            match json.next_name_owned().map_err(doc_err)?.as_str() {
                "format" => format = Some(json.next_string().map_err(doc_err)?),
                "format_version" => {
                    format_version = json.next_number::<u32>().map_err(doc_err)?.ok();
                }
                "versions" => {
                    // Known first in what `export` writes: a foreign format is refused
                    // before its versions are read.
                    if format.is_some() && format_version.is_some() {
                        check_format(&format, format_version)?;
                    }
                    json.begin_array().map_err(doc_err)?;
                    let mut seen = std::collections::HashSet::new();
                    while json.has_next().map_err(doc_err)? {
                        let entry = self.import_entry(&mut json)?;
                        if !seen.insert(entry.0.uid) {
                            return Err(Error::Invalid(format!(
                                "the document holds version {} twice; nothing was imported",
                                entry.0.uid
                            )));
                        }
                        checked.push(entry);
                    }
                    json.end_array().map_err(doc_err)?;
                }
                _ => json.skip_value().map_err(doc_err)?,
            }
        }
        json.end_object().map_err(doc_err)?;
        json.consume_trailing_whitespace().map_err(doc_err)?;
        check_format(&format, format_version)?;
        let _no_cleanup = self.no_cleanup_of("metadata import", checked.iter().map(|(v, _)| v.storage.as_str()))?;
        self.insert_recovered(checked)
    }

    /// One version of a document being imported: its fields, and its index kept in a
    /// spool file once checked.
    fn import_entry(&self, json: &mut impl struson::reader::JsonReader) -> Result<(Version, Recovered)> {
        let mut fields = serde_json::Map::new();
        let mut index = None;
        json.begin_object().map_err(doc_err)?;
        while json.has_next().map_err(doc_err)? {
            let name = json.next_name_owned().map_err(doc_err)?;
            if name != "index" {
                let value = json.deserialize_next::<serde_json::Value>().map_err(|e| match e {
                    struson::serde::DeserializerError::ReaderError(e) => doc_err(e),
                    other => not_a_document(other),
                })?;
                fields.insert(name, value);
                continue;
            }
            let uid = fields.get("uid").and_then(|u| u.as_str()).unwrap_or("(no uid yet)").to_string();
            let keep = self.keep();
            let mut kept = crate::index::KeptIndex::new(&keep.dir, keep.modes)?;
            let mut data_blocks = 0u64;
            let (walked, failed) = {
                let mut hex = HexIn { inner: json.next_string_reader().map_err(doc_err)?, odd: None, failed: None };
                let walked = BlockIndex::visit_reader(kept.tee(&mut hex), |_, _| {
                    data_blocks += 1;
                    true
                });
                (walked, hex.failed)
            };
            let head = match walked {
                Ok(Some(head)) => head,
                Ok(None) => return Err(Error::Invalid(format!("version {uid}: the imported index stopped early"))),
                Err(e) => {
                    // What stopped the walk: the document (not JSON, a read that
                    // failed, not hex), the spool, or the index itself.
                    return Err(match (failed, kept.failed()) {
                        (Some(HexFailed::NotHex), _) => Error::Invalid(format!("version {uid}: the index is not hex")),
                        (Some(HexFailed::Read(e)), _) if e.kind() == std::io::ErrorKind::Other => {
                            not_a_document(e.into_inner().map(|e| e.to_string()).unwrap_or_default())
                        }
                        (Some(HexFailed::Read(e)), _) => Error::io("cannot read the metadata document", e),
                        (None, Some(local)) => local,
                        (None, None) => Error::Invalid(format!("version {uid}: the imported index is damaged: {e}")),
                    });
                }
            };
            index = Some(kept.finish(head, data_blocks)?);
        }
        json.end_object().map_err(doc_err)?;
        let version: Version =
            serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| not_a_document(e.to_string()))?;
        let uid = version.uid;
        let index = index.ok_or_else(|| Error::Invalid(format!("version {uid}: the document holds no index")))?;
        if self.version(uid).is_ok() {
            return Err(Error::Invalid(format!(
                "version {uid} exists already; importing it again is refused (nothing was imported)"
            )));
        }
        self.storage(&version.storage)?;
        let head = index.header();
        if head.uid != uid.0 || head.size != version.size || head.block_size != version.block_size {
            return Err(Error::Invalid(format!("version {uid}: the index does not match the version's fields")));
        }
        Ok((version, Recovered::Kept(index)))
    }

    /// Writes the metadata objects of committed versions to their storage again
    /// (`keepfs metadata backup`): after a storage was replaced or an object lost.
    pub fn backup_metadata(&self, uids: &[VersionUid]) -> Result<usize> {
        for &uid in uids {
            let v = self.version(uid)?;
            if v.status == Status::Incomplete {
                return Err(Error::Invalid(format!("version {uid} is incomplete; it has no metadata to back up")));
            }
            self.refresh_version_object(uid)?;
        }
        Ok(uids.len())
    }

    /// Brings versions back into the database from their metadata objects in storage
    /// (`keepfs metadata restore`), e.g. after an `rm` that should not have happened or
    /// from a database backup that is older than the storage. Each uid is looked for in
    /// every configured storage. One that exists in the database is refused unless
    /// `replace` (`--force`): then its fields, labels and block index are replaced by its
    /// storage's copy (the repair of a damaged index), and it is `valid` if every object
    /// it names is in the storage and none is known damaged, else `invalid`.
    pub fn restore_metadata(&self, uids: &[VersionUid], replace: bool) -> Result<Vec<VersionUid>> {
        let mut found = Vec::new();
        let mut replaced = Vec::new();
        for &uid in uids {
            let existing = match self.version(uid) {
                Ok(v) => Some(v),
                Err(Error::VersionNotFound(_)) => None,
                Err(e) => return Err(e),
            };
            if let Some(v) = &existing {
                if !replace {
                    return Err(Error::Invalid(format!(
                        "version {uid} is in the database already; nothing was restored (`keepfs metadata restore --force {uid}` replaces its metadata with the copy in its storage)"
                    )));
                }
                if v.status == Status::Incomplete {
                    return Err(Error::Refused(format!(
                        "version {uid} is incomplete (being written, or its backup died); it has no metadata in storage to restore"
                    )));
                }
            }
            // A version the database holds is looked for in its own storage only.
            let storages: Vec<String> = match &existing {
                Some(v) => vec![v.storage.clone()],
                None => self.config.storages.iter().map(|s| s.name.clone()).collect(),
            };
            let mut hit = None;
            for name in &storages {
                let storage = self.storage(name)?;
                let key = crate::repo::version_key(uid);
                match read_version_object(storage.as_ref(), &key, self.keep(), None)? {
                    Found::Read(v, index) => {
                        let mut v = *v;
                        if v.uid != uid || index.uid() != uid.0 {
                            return Err(Error::Damaged(format!(
                                "the object versions/{uid} in storage '{name}' holds the metadata of {}; nothing was restored",
                                v.uid
                            )));
                        }
                        v.storage = name.clone();
                        hit = Some((v, index));
                        break;
                    }
                    Found::Damaged(e) => {
                        return Err(Error::Damaged(format!(
                            "the metadata of {uid} in storage '{name}' is damaged: {e}; nothing was restored"
                        )));
                    }
                    Found::Missing => continue,
                }
            }
            let hit = hit.ok_or_else(|| {
                Error::Invalid(format!(
                    "no storage holds metadata of version {uid} (looked in: {}); nothing was restored",
                    storages.join(", ")
                ))
            })?;
            match existing {
                Some(_) => replaced.push(hit),
                None => found.push(hit),
            }
        }
        let mut done = Vec::new();
        let storages = replaced.iter().chain(found.iter()).map(|(v, _)| v.storage.as_str());
        let _no_cleanup = self.no_cleanup_of("metadata restore", storages)?;
        // Readers (a restore, a scrub, a mount, a backup's base) stream the index a piece
        // at a time: it is replaced only while none holds the version.
        let session = if replaced.is_empty() { None } else { Some(self.session("metadata restore", false)?) };
        for (mut v, index) in replaced {
            if let Some(s) = &session {
                s.lock_exclusive(v.uid, crate::repo::REPLACING)?;
            }
            let (missing, damaged) = self.objects_in_storage(&v.storage, &index)?;
            v.status = if missing || damaged || v.status != Status::Valid { Status::Invalid } else { Status::Valid };
            index.with_bytes(|bytes| self.db().replace_version_record(&v, bytes))?;
            done.push(v.uid);
        }
        done.extend(self.insert_recovered(found)?);
        Ok(done)
    }

    /// Holds off any cleanup of these storages while versions are taken in: between
    /// finding their objects in the storage and recording the versions that reference
    /// them, a cleanup would see them unreferenced and could delete them. Refused while
    /// one runs.
    /// Taken for every storage at once, before the first version is recorded: refused
    /// part way, an import would leave some versions in and refuse to run again.
    fn no_cleanup_of<'a>(
        &self,
        purpose: &str,
        storages: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<crate::gc::CleanupClaim>> {
        let names: std::collections::BTreeSet<&str> = storages.collect();
        names
            .into_iter()
            .map(|name| {
                self.claim_cleanup_for(name, purpose).map_err(|e| match e {
                    Error::Refused(m) => Error::Refused(format!(
                        "{m}; versions are taken in only while no cleanup runs (it could delete the blocks they name); nothing was taken in"
                    )),
                    e => e,
                })
            })
            .collect()
    }

    /// Records the objects `index` names that its storage holds as found (in batches as
    /// the walk goes), and says whether any is missing and whether any is known damaged.
    /// A block repeated within the last [`RECENT_IDS`] ids is asked about once; an older
    /// repeat is asked again: memory stays bounded whatever the index's size.
    fn objects_in_storage(&self, storage_name: &str, index: &Recovered) -> Result<(bool, bool)> {
        let storage = self.storage(storage_name)?;
        let sid = self.storage_id(storage_name)?;
        let known_bad = self.db().invalid_objects(sid)?;
        let mut present = Vec::new();
        let (mut missing, mut damaged) = (false, false);
        let mut recent = lru::LruCache::new(RECENT_IDS);
        let mut failed: Option<Error> = None;
        index.walk(|_, id| {
            if failed.is_some() || recent.put(id, ()).is_some() {
                return;
            }
            match storage.exists(&id.storage_key()) {
                Ok(true) => {
                    present.push((id, 0u64));
                    damaged |= known_bad.contains(&id);
                    if present.len() >= FOUND_BATCH {
                        failed = self.db().insert_found_objects(sid, &std::mem::take(&mut present)).err();
                    }
                }
                Ok(false) => missing = true,
                Err(e) => failed = Some(e.into()),
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.db().insert_found_objects(sid, &present)?;
        Ok((missing, damaged))
    }

    /// Inserts checked versions: objects found in storage are recorded; a version whose
    /// objects are not all there (or known damaged) comes back `invalid`.
    fn insert_recovered(&self, checked: Vec<(Version, Recovered)>) -> Result<Vec<VersionUid>> {
        // Before anything goes in: a storage this catalog may not write refuses it all.
        for (v, _) in &checked {
            self.claim_storage(&v.storage)?;
        }
        let mut imported = Vec::new();
        for (mut v, index) in checked {
            let uid = v.uid;
            let mut one = || -> Result<()> {
                let (missing, damaged) = self.objects_in_storage(&v.storage, &index)?;
                if missing || damaged || v.status == Status::Incomplete {
                    v.status = Status::Invalid;
                }
                // Checked before the document was read to its end; another process may
                // have put the version in since.
                if self.version(uid).is_ok() {
                    return Err(Error::Refused(format!("version {uid} was put in by another process meanwhile")));
                }
                index.with_bytes(|bytes| self.db().insert_version_record(&v, bytes))
            };
            if let Err(e) = one() {
                // Each version goes in whole or not at all; say which ones did.
                return Err(match imported.is_empty() {
                    true => e,
                    false => Error::Other(format!(
                        "{e}; imported before it: {}; not imported: {uid} and what follows it",
                        imported.iter().map(|u: &VersionUid| u.to_string()).collect::<Vec<_>>().join(", ")
                    )),
                });
            }
            imported.push(uid);
            // In the catalog now; its object in the storage is written anew from there.
            if let Err(e) = self.refresh_version_object(uid) {
                return Err(Error::Other(format!(
                    "{e}; in the catalog now: {} (run `keepfs metadata backup` to write the metadata object of {uid} again); not imported: what follows it",
                    imported.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(imported)
    }
}

/// Refuses a document of another format (or of none).
fn check_format(format: &Option<String>, version: Option<u32>) -> Result<()> {
    if format.as_deref() != Some(FORMAT) || version != Some(FORMAT_VERSION) {
        return Err(Error::Invalid(format!(
            "metadata document is '{}' format {}; this keepfs reads '{FORMAT}' format {FORMAT_VERSION}",
            format.as_deref().unwrap_or_default(),
            version.map(|v| v.to_string()).unwrap_or_else(|| "(none)".into())
        )));
    }
    Ok(())
}

/// What reading a document found: a read that failed, or a document that is not one.
fn doc_err(e: struson::reader::ReaderError) -> Error {
    match e {
        struson::reader::ReaderError::IoError { error, .. } => Error::io("cannot read the metadata document", error),
        other => not_a_document(other),
    }
}

/// A document that is not one (bad JSON, or not the shape of an export).
fn not_a_document(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("not a keepfs metadata document: {e}"))
}

/// Why a string of hex digits could not be read.
enum HexFailed {
    /// The string holds something else (or an odd number of digits).
    NotHex,
    /// Reading it failed: the JSON around it (struson's reader reports a syntax error as
    /// an error of kind `Other`) or the document's own reader.
    Read(std::io::Error),
}

/// The bytes a string of hex digits stands for, decoded as it is read. Why it stopped,
/// if it failed, is kept in `failed` (the caller's reader only learns that it did).
struct HexIn<R> {
    inner: R,
    /// A digit read whose pair is still to come.
    odd: Option<u8>,
    failed: Option<HexFailed>,
}

impl<R: std::io::Read> HexIn<R> {
    fn fail(&mut self, why: HexFailed) -> std::io::Error {
        self.failed = Some(why);
        std::io::Error::new(std::io::ErrorKind::InvalidData, "the index could not be read")
    }
}

impl<R: std::io::Read> std::io::Read for HexIn<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        if buf.is_empty() || self.failed.is_some() {
            return if self.failed.is_some() {
                Err(std::io::Error::other("the index could not be read"))
            } else {
                Ok(0)
            };
        }
        let mut hex = [0u8; 8192];
        loop {
            let want = (buf.len() * 2).min(hex.len()) - self.odd.is_some() as usize;
            let n = match self.inner.read(&mut hex[..want]) {
                Ok(n) => n,
                Err(e) => return Err(self.fail(HexFailed::Read(e))),
            };
            if n == 0 {
                return match self.odd {
                    Some(_) => Err(self.fail(HexFailed::NotHex)),
                    None => Ok(0),
                };
            }
            let mut out = 0;
            for &c in &hex[..n] {
                let Some(d) = digit(c) else { return Err(self.fail(HexFailed::NotHex)) };
                match self.odd.take() {
                    Some(high) => {
                        buf[out] = high << 4 | d;
                        out += 1;
                    }
                    None => self.odd = Some(d),
                }
            }
            if out > 0 {
                return Ok(out);
            }
        }
    }
}

/// `x` as compact JSON.
fn to_json<T: Serialize + ?Sized>(x: &T) -> Result<String> {
    serde_json::to_string(x).map_err(|e| Error::Other(format!("cannot write metadata JSON: {e}")))
}

/// Writes bytes as lowercase hex; the first failed write is kept, and nothing more is
/// written after it.
struct HexOut<'a> {
    out: &'a mut dyn std::io::Write,
    failed: Option<std::io::Error>,
}

impl HexOut<'_> {
    fn write(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            let mut buf = [0u8; 8192];
            for piece in bytes.chunks(buf.len() / 2) {
                let hex = &mut buf[..piece.len() * 2];
                // A buffer of exactly twice the length always fits.
                if let Err(e) = hex::encode_to_slice(piece, hex) {
                    self.failed = Some(std::io::Error::other(e));
                    return;
                }
                if let Err(e) = self.out.write_all(hex) {
                    self.failed = Some(e);
                    return;
                }
            }
        }
    }
}

/// A reader whose bytes also go out as hex as they pass.
struct Hexed<'a, 'b, R> {
    inner: &'a mut R,
    hex: &'a mut HexOut<'b>,
}

impl<R: std::io::Read> std::io::Read for Hexed<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hex.write(&buf[..n]);
        if self.hex.failed.is_some() {
            return Err(std::io::Error::other("the document could not be written"));
        }
        Ok(n)
    }
}
