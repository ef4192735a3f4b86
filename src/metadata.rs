//! Metadata export and import: versions (fields, labels, block index) as a versioned JSON
//! document, for keeping metadata apart from the database (backy2's export/import).

use crate::error::{Error, Result};
use crate::index::BlockIndex;
use crate::repo::Repository;
use crate::version::{Status, Version, VersionUid};
use crate::version_object::{Found, Recovered, read_version_object};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "keepfs-metadata";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Document {
    format: String,
    format_version: u32,
    versions: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    version: Version,
    /// The encoded block index (docs/format.md), hex; it carries its own checksum.
    index: String,
}

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

    /// Imports a document made by [`Repository::export_metadata_to`]. Refuses the whole
    /// document if any uid exists already. A version whose objects are not all in its
    /// storage is imported as invalid. Returns the imported uids.
    pub fn import_metadata(&self, json: &str) -> Result<Vec<VersionUid>> {
        let doc: Document =
            serde_json::from_str(json).map_err(|e| Error::Invalid(format!("not a keepfs metadata document: {e}")))?;
        if doc.format != FORMAT || doc.format_version != FORMAT_VERSION {
            return Err(Error::Invalid(format!(
                "metadata document is '{}' format {}; this keepfs reads '{FORMAT}' format {FORMAT_VERSION}",
                doc.format, doc.format_version
            )));
        }
        let mut checked = Vec::new();
        for e in doc.versions {
            let uid = e.version.uid;
            if self.version(uid).is_ok() {
                return Err(Error::Invalid(format!(
                    "version {uid} exists already; importing it again is refused (nothing was imported)"
                )));
            }
            self.storage(&e.version.storage)?;
            let bytes =
                hex::decode(&e.index).map_err(|_| Error::Invalid(format!("version {uid}: the index is not hex")))?;
            let index = BlockIndex::decode(&bytes)
                .map_err(|err| Error::Invalid(format!("version {uid}: the imported index is damaged: {err}")))?;
            if index.uid != uid.0 || index.size != e.version.size || index.block_size != e.version.block_size {
                return Err(Error::Invalid(format!("version {uid}: the index does not match the version's fields")));
            }
            checked.push((e.version, Recovered::Whole(index)));
        }
        self.insert_recovered(checked)
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
        // Readers (a restore, a scrub, a mount, a backup's base) stream the index a piece
        // at a time: it is replaced only while none holds the version.
        let session = if replaced.is_empty() { None } else { Some(self.session("metadata restore", false)?) };
        for (mut v, index) in replaced {
            if let Some(s) = &session {
                s.lock_exclusive(v.uid, crate::repo::REPLACING)?;
            }
            let (_, missing, damaged) = self.objects_in_storage(&v.storage, &index)?;
            v.status =
                if missing > 0 || damaged > 0 || v.status != Status::Valid { Status::Invalid } else { Status::Valid };
            index.with_bytes(|bytes| self.db().replace_version_record(&v, bytes))?;
            done.push(v.uid);
        }
        done.extend(self.insert_recovered(found)?);
        Ok(done)
    }

    /// The distinct objects `index` names that its storage holds (recorded in the
    /// database as found), and how many are missing and how many known damaged.
    fn objects_in_storage(&self, storage_name: &str, index: &Recovered) -> Result<(usize, usize, usize)> {
        let storage = self.storage(storage_name)?;
        let sid = self.storage_id(storage_name)?;
        let known_bad = self.db().invalid_objects(sid)?;
        let mut present = Vec::new();
        let (mut missing, mut damaged) = (0usize, 0usize);
        let mut seen = std::collections::HashSet::new();
        let mut failed = None;
        index.walk(|_, id| {
            if failed.is_some() || !seen.insert(id) {
                return;
            }
            match storage.exists(&id.storage_key()) {
                Ok(true) => {
                    present.push((id, 0u64));
                    damaged += known_bad.contains(&id) as usize;
                }
                Ok(false) => missing += 1,
                Err(e) => failed = Some(e),
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        self.db().insert_found_objects(sid, &present)?;
        Ok((present.len(), missing, damaged))
    }

    /// Inserts checked versions: objects found in storage are recorded; a version whose
    /// objects are not all there (or known damaged) comes back `invalid`.
    fn insert_recovered(&self, checked: Vec<(Version, Recovered)>) -> Result<Vec<VersionUid>> {
        let mut imported = Vec::new();
        for (mut v, index) in checked {
            let (_, missing, damaged) = self.objects_in_storage(&v.storage, &index)?;
            if missing > 0 || damaged > 0 || v.status == Status::Incomplete {
                v.status = Status::Invalid;
            }
            index.with_bytes(|bytes| self.db().insert_version_record(&v, bytes))?;
            self.refresh_version_object(v.uid)?;
            imported.push(v.uid);
        }
        Ok(imported)
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
