//! Which catalog owns a storage. Every catalog has an id (`repository_state` row
//! `catalog_id`, made first-writer-first); a storage records the id of the catalog that
//! writes to it in its `owner` object (plain JSON beside the keyring: an id, where that
//! catalog is and who claimed the storage, no secret). A catalog writes to, or deletes
//! from, only a storage it owns: a second catalog on one storage (a host whose
//! configuration lacks the shared `database`, a `database rebuild` into a new file while
//! the old catalog is in use) would take the first's blocks for orphans and delete them,
//! or reuse its uids and overwrite its version objects (both found by a drill).
//!
//! - A storage without an owner is claimed by the first catalog that writes to it,
//!   unless it holds versions that catalog does not know (another catalog's, or this
//!   one's from before it was lost: `metadata restore` or `database rebuild` first).
//!   The claim is read back, and the owner is read afresh before every commit, every
//!   cleanup's deletes and every removal of a version object by a long-running process,
//!   so of two catalogs claiming at once the one whose claim was overwritten stops first.
//! - Before a command changes the catalog on the way to writing the storage (`rm`
//!   marking a version invalid, a label, an import), the storage is claimed, so that a
//!   refusal changes nothing.
//! - `database rebuild` only reads the storage. A catalog rebuilt where the owner says
//!   it was (the same SQLite file on the same machine, the same PostgreSQL database)
//!   takes the owner's id: it is that catalog, made again. Rebuilt anywhere else, it
//!   can restore but not write until `database rebuild --take-over` makes it the owner
//!   (the old catalog, if it still exists, is then refused in turn).
//!
//! Reading is never refused: restoring from another catalog's storage deletes nothing.

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::{STORAGE_ATTEMPTS, SharedStorage, StorageError, retry};

/// The storage object that names its owner.
pub const OWNER_KEY: &str = "owner";
/// The `repository_state` row holding a catalog's id.
pub(crate) const CATALOG_ID: &str = "catalog_id";
const OWNER_FORMAT: &str = "keepfs-owner";

/// A storage's `owner` object (docs/format.md, "Storage owner"; a sample is
/// tests/data/owner.json).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct Owner {
    /// `keepfs-owner`.
    pub format: String,
    /// The owning catalog's id: 32 hex digits.
    pub catalog: String,
    /// Where that catalog is: `host:/path` of an SQLite file, or a PostgreSQL URL
    /// without its password.
    pub location: String,
    /// The host that claimed the storage, and when (UTC, RFC 3339).
    pub host: String,
    pub claimed: String,
    /// The claiming machine's /etc/machine-id (empty where unknown): with `location`,
    /// what tells a catalog made again in its place from one on a clone of its host.
    #[serde(default)]
    pub machine: String,
}

impl Owner {
    /// Reads an `owner` object of storage `storage`; one keepfs did not write is an error.
    pub fn parse(bytes: &[u8], storage: &str) -> Result<Owner> {
        match serde_json::from_slice::<Owner>(bytes) {
            Ok(o) if o.format == OWNER_FORMAT && o.catalog.len() == 32 && hex::decode(&o.catalog).is_ok() => Ok(o),
            _ => Err(Error::Other(format!(
                "storage '{storage}': its {OWNER_KEY} object is not one keepfs wrote; move it away if the storage is this repository's"
            ))),
        }
    }
}

impl Repository {
    /// A storage to write to: claimed for this catalog, or refused (see the module
    /// comment). Checked once per process and storage; [`Self::check_owner_now`] checks
    /// again.
    pub fn storage_to_write(&self, name: &str) -> Result<SharedStorage> {
        self.claim_storage(name)?;
        self.storage(name)
    }

    /// [`Self::storage_to_write`] without unlocking the storage (for a key command, which
    /// makes or changes the keyring the unlocking reads).
    pub(crate) fn claim_storage(&self, name: &str) -> Result<()> {
        if !self.owner_checked.lock().contains(name) {
            self.check_owner_now(name)?;
            self.owner_checked.lock().insert(name.to_string());
        }
        Ok(())
    }

    /// Makes `database rebuild` take the storages over from the catalog that owns them.
    pub fn take_over_storages(&self) {
        self.take_over.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Claims storage `name` for this catalog, or refuses: read afresh from the storage,
    /// so that a claim another catalog made since is seen (before a commit, a delete).
    pub(crate) fn check_owner_now(&self, name: &str) -> Result<()> {
        if matches!(self.config.storage(name)?.kind, crate::config::StorageKind::Null) {
            return Ok(());
        }
        let raw = self.raw_storage(name)?;
        let here = self.catalog_here();
        // The owner first, then the catalog's id: a claim commits the id before it writes
        // the owner, so an owner read here names an id the catalog already holds. (Read
        // the other way round, a host that read no id just before another host's first
        // claim, then that claim's owner, took its own catalog for another: found by the
        // multi-host drill on S3.)
        let owner = read_owner(&raw)?;
        crate::test_knobs::stop_here("KEEPFS_TEST_STOP_BETWEEN_OWNER_READS");
        let mine = self.db.lock().repository_state(CATALOG_ID)?;
        let take_over = self.take_over.load(std::sync::atomic::Ordering::Relaxed);
        match (mine, owner) {
            (Some(id), Some(owner)) if owner.catalog == id => Ok(()),
            (mine, owner) if take_over => {
                let id = self.catalog_id(mine)?;
                self.claim_as(name, &raw, &id, false)?;
                if let Some(owner) = owner.filter(|o| o.catalog != id) {
                    keepfs_face::log!(
                        "keepfs: storage '{name}' is this catalog's now; the catalog it belonged to ({} on {}) is refused from now on",
                        owner.location,
                        owner.host
                    );
                }
                Ok(())
            }
            (_, Some(owner)) => Err(self.not_ours(name, &owner, &here)),
            (mine, None) => {
                if let Err(refused) = self.refuse_unknown_versions(name, &raw) {
                    // A host of this catalog may have claimed the storage since, and
                    // committed a version whose object is there before its row says
                    // valid: its owner object, written before any version, tells.
                    return match read_owner(&raw)? {
                        Some(owner) if self.db.lock().repository_state(CATALOG_ID)? == Some(owner.catalog.clone()) => {
                            Ok(())
                        }
                        Some(owner) => Err(self.not_ours(name, &owner, &here)),
                        None => Err(refused),
                    };
                }
                let id = self.catalog_id(mine)?;
                // Created only where no owner is yet: of two catalogs claiming at once,
                // one makes it and the other reads it.
                self.claim_as(name, &raw, &id, true)
            }
        }
    }

    /// This catalog's id: `mine` as read, or a new one made first-writer-first.
    fn catalog_id(&self, mine: Option<String>) -> Result<String> {
        match mine {
            Some(id) => Ok(id),
            None => self.db.lock().keep_repository_state(CATALOG_ID, &new_id()),
        }
    }

    /// Writes this catalog (`id`) as the owner (only where none is yet, when `first`)
    /// and reads it back: of two catalogs claiming at once, the owner read back is the
    /// one that stands.
    fn claim_as(&self, name: &str, raw: &SharedStorage, id: &str, first: bool) -> Result<()> {
        let record = self.owner_record(id);
        if first {
            let bytes = encode(&record)?;
            retry(STORAGE_ATTEMPTS, || raw.put_new(OWNER_KEY, &bytes))?;
            retry(STORAGE_ATTEMPTS, || raw.sync())?;
        } else {
            write_owner(raw, &record)?;
        }
        match read_owner(raw)? {
            Some(owner) if owner.catalog == id => Ok(()),
            Some(owner) => Err(self.not_ours(name, &owner, &self.catalog_here())),
            None => Err(Error::Other(format!(
                "storage '{name}': its {OWNER_KEY} object was written and is not there; check the storage"
            ))),
        }
    }

    /// A storage without an owner that holds versions this catalog does not know is not
    /// claimed: they are another catalog's (which has not written since it was upgraded)
    /// or this one's from before a loss.
    fn refuse_unknown_versions(&self, name: &str, raw: &SharedStorage) -> Result<()> {
        // (An incomplete version has no object there: one under its uid is another's.)
        let mut versions = self.db.lock().list_versions()?;
        versions.retain(|v| v.status != crate::version::Status::Incomplete);
        let mut unknown = crate::gc::unknown_in(crate::gc::version_objects(raw.as_ref())?, &versions);
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort();
        let (listed, more) = crate::gc::first_uids(&unknown, ", ");
        Err(Error::Refused(format!(
            "storage '{name}' holds version(s) {listed}{more} that this catalog does not know, and names no catalog as its owner yet: if another catalog writes here, set `database` to it (docs/scale-out.md); if they are this catalog's from before it was lost, `keepfs metadata restore UID…` or `keepfs database rebuild` takes them in; `keepfs database rebuild --take-over` makes this catalog the owner"
        )))
    }

    /// For `database rebuild`, which only reads: a catalog without an id where the owner
    /// says its catalog was (this machine, this file or database) is that catalog made
    /// again and takes its id; one elsewhere is told it can read but not write.
    pub(crate) fn rebuild_owner_check(&self, name: &str) -> Result<()> {
        if matches!(self.config.storage(name)?.kind, crate::config::StorageKind::Null) {
            return Ok(());
        }
        if self.take_over.load(std::sync::atomic::Ordering::Relaxed) {
            return self.check_owner_now(name);
        }
        let raw = self.raw_storage(name)?;
        let Some(owner) = read_owner(&raw)? else { return Ok(()) };
        let mine = self.db.lock().repository_state(CATALOG_ID)?;
        let here = self.catalog_here();
        let same_place = owner.location == here && (owner.machine.is_empty() || owner.machine == machine());
        match mine {
            Some(id) if id == owner.catalog => {}
            None if same_place => {
                self.db.lock().keep_repository_state(CATALOG_ID, &owner.catalog)?;
            }
            _ => keepfs_face::log!(
                "keepfs: note: storage '{name}' belongs to another catalog ({} on {}): this one can restore from it, not write to it; if that catalog is lost for good, `keepfs database rebuild --take-over` makes this one the owner",
                owner.location,
                owner.host
            ),
        }
        Ok(())
    }

    /// After `database migrate` to `to`: the storages this catalog owns say where it is now
    /// (so that a catalog made again at the old place is not taken for it).
    pub(crate) fn move_owner(&self, to: &crate::catalog::Location) -> Result<()> {
        let Some(id) = self.db.lock().repository_state(CATALOG_ID)? else { return Ok(()) };
        for sc in &self.config.storages {
            if matches!(sc.kind, crate::config::StorageKind::Null) {
                continue;
            }
            let raw = self.raw_storage(&sc.name)?;
            if read_owner(&raw)?.is_some_and(|o| o.catalog == id) {
                write_owner(&raw, &Owner { location: location_of(to), ..self.owner_record(&id) })?;
            }
        }
        Ok(())
    }

    /// Where this catalog is, as an owner record names it.
    fn catalog_here(&self) -> String {
        location_of(&self.config.catalog_location())
    }
}

/// How an owner record names a catalog's place.
fn location_of(location: &crate::catalog::Location) -> String {
    {
        match location.clone() {
            // The file however it is reached (symbolic links resolved).
            crate::catalog::Location::Sqlite(p) => {
                let p = std::fs::canonicalize(&p).or_else(|_| std::path::absolute(&p)).unwrap_or(p);
                format!("{}:{}", crate::catalog::hostname(), p.display())
            }
            // The server and database, not the options one host gives (`?sslmode=`).
            l @ crate::catalog::Location::Postgres { .. } => {
                let url = l.display();
                url.split('?').next().unwrap_or(&url).to_string()
            }
        }
    }
}

impl Repository {
    fn owner_record(&self, id: &str) -> Owner {
        Owner {
            format: OWNER_FORMAT.to_string(),
            catalog: id.to_string(),
            location: self.catalog_here(),
            host: crate::catalog::hostname(),
            claimed: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: machine(),
        }
    }

    fn not_ours(&self, name: &str, owner: &Owner, here: &str) -> Error {
        Error::NotOwner(format!(
            "storage '{name}' belongs to another catalog ({}, claimed by host {} on {}), not to this one ({here}): two catalogs on one storage delete each other's blocks; set `database` to that catalog, as every host of the repository does (docs/scale-out.md); if it is lost for good, `keepfs database rebuild --take-over` into an empty catalog makes a new one from the storage",
            owner.location, owner.host, owner.claimed
        ))
    }
}

/// This machine's /etc/machine-id (see [`Owner::machine`]).
fn machine() -> String {
    crate::catalog::machine_id().split(' ').nth(2).unwrap_or("").to_string()
}

fn new_id() -> String {
    hex::encode(crate::transform::aes::random::<16>())
}

/// The id of the catalog that owns the configured storage `s`, read without changing
/// anything (no directory is made): None where it has no owner, or none that can be read.
/// What tells a repository's storage at a new place from another repository's.
pub(crate) fn owner_id_of(s: &crate::config::StorageConfig) -> Option<String> {
    use crate::storage::Storage;
    let bytes = match &s.kind {
        crate::config::StorageKind::File { path } => return owner_id_in(path, &s.name),
        crate::config::StorageKind::S3(c) => {
            crate::storage::s3::S3Storage::open(&s.name, c).ok()?.get_fresh(OWNER_KEY).ok()?
        }
        crate::config::StorageKind::Null => return None,
    };
    Owner::parse(&bytes, &s.name).ok().map(|o| o.catalog)
}

/// [`owner_id_of`] of a place as the catalog records it (`file:/path`); None for a place
/// of another kind (an S3 place is not read: it would need its configuration).
pub(crate) fn owner_id_at(place: &str) -> Option<String> {
    owner_id_in(std::path::Path::new(place.strip_prefix("file:")?), place)
}

/// The catalog id in the owner object of the file storage at `path`, if it holds one.
fn owner_id_in(path: &std::path::Path, name: &str) -> Option<String> {
    let bytes = std::fs::read(path.join(OWNER_KEY)).ok()?;
    Owner::parse(&bytes, name).ok().map(|o| o.catalog)
}

fn read_owner(raw: &SharedStorage) -> Result<Option<Owner>> {
    let bytes = match retry(STORAGE_ATTEMPTS, || raw.get_fresh(OWNER_KEY)) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Owner::parse(&bytes, raw.name()).map(Some)
}

fn encode(owner: &Owner) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(owner).map_err(|e| Error::Other(format!("cannot encode the owner: {e}")))
}

fn write_owner(raw: &SharedStorage, owner: &Owner) -> Result<()> {
    let bytes = encode(owner)?;
    retry(STORAGE_ATTEMPTS, || raw.put(OWNER_KEY, &bytes))?;
    retry(STORAGE_ATTEMPTS, || raw.sync())?;
    Ok(())
}
