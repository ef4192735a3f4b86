//! Which catalog owns a storage. Every catalog has an id (`repository_state` row
//! `catalog_id`, made first-writer-first); a storage records the id of the catalog that
//! writes to it in its `owner` object (plain JSON beside the keyring: an id, where that
//! catalog is and who claimed the storage, no secret). A catalog writes to, or deletes
//! from, only a storage it owns: a second catalog on one storage (a host whose
//! configuration lacks the shared `database`, a `database rebuild` into a new file while
//! the old catalog is in use) would take the first's blocks for orphans and delete them,
//! or reuse its uids and overwrite its version objects (both found by a drill).
//!
//! - A storage without an owner is claimed by the first catalog that writes to it. The
//!   claim is read back, and the owner is checked again before every commit and every
//!   cleanup's deletes, so of two catalogs claiming at once the one whose claim was
//!   overwritten stops before its first version or delete.
//! - A catalog without an id at the place the owner names (the same SQLite file on the
//!   same host, the same PostgreSQL database) is that catalog made again (`database
//!   rebuild` after it was lost): it takes the owner's id.
//! - Anywhere else it is refused, and so is a catalog with another id, unless `database
//!   rebuild --take-over` makes it the storage's new owner (the old catalog, if it still
//!   exists, is then refused in turn).
//!
//! Reading is never refused: restoring from another catalog's storage deletes nothing.

use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::{SharedStorage, StorageError};

/// The storage object that names its owner.
pub const OWNER_KEY: &str = "owner";
/// The `repository_state` row holding a catalog's id.
pub(crate) const CATALOG_ID: &str = "catalog_id";
const OWNER_FORMAT: &str = "keepfs-owner";

/// A storage's `owner` object (docs/format.md, "Storage owner"; a sample is
/// tests/data/owner.json).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
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
        let mine = self.db.lock().repository_state(CATALOG_ID)?;
        let take_over = self.take_over.load(std::sync::atomic::Ordering::Relaxed);
        match (mine, read_owner(&raw)?) {
            (Some(id), Some(owner)) if owner.catalog == id => {
                // The same catalog, moved (`database migrate`): the owner says where.
                if owner.location != here {
                    write_owner(&raw, &self.owner_record(&id))?;
                }
                Ok(())
            }
            // This catalog made again where it was (lost, then rebuilt): it takes the id.
            (None, Some(owner)) if owner.location == here && !take_over => {
                let id = self.db.lock().keep_repository_state(CATALOG_ID, &owner.catalog)?;
                write_owner(&raw, &self.owner_record(&id))?;
                Ok(())
            }
            (mine, Some(owner)) if take_over => {
                let id = match mine {
                    Some(id) => id,
                    None => self.db.lock().keep_repository_state(CATALOG_ID, &new_id())?,
                };
                write_owner(&raw, &self.owner_record(&id))?;
                keepfs_face::log!(
                    "keepfs: storage '{name}' is this catalog's now; the catalog it belonged to ({} on {}) is refused from now on",
                    owner.location,
                    owner.host
                );
                Ok(())
            }
            (_, Some(owner)) => Err(self.not_ours(name, &owner, &here)),
            (mine, None) => {
                let id = match mine {
                    Some(id) => id,
                    None => self.db.lock().keep_repository_state(CATALOG_ID, &new_id())?,
                };
                write_owner(&raw, &self.owner_record(&id))?;
                // Of two catalogs claiming at once, the owner read back is the one that
                // stands.
                match read_owner(&raw)? {
                    Some(owner) if owner.catalog == id => Ok(()),
                    Some(owner) => Err(self.not_ours(name, &owner, &here)),
                    None => Err(Error::Other(format!(
                        "storage '{name}': its {OWNER_KEY} object was written and is not there; check the storage"
                    ))),
                }
            }
        }
    }

    /// Where this catalog is, as an owner record names it.
    fn catalog_here(&self) -> String {
        match self.config.catalog_location() {
            crate::catalog::Location::Sqlite(p) => {
                let p = std::path::absolute(&p).unwrap_or(p);
                format!("{}:{}", crate::catalog::hostname(), p.display())
            }
            l @ crate::catalog::Location::Postgres { .. } => l.display(),
        }
    }

    fn owner_record(&self, id: &str) -> Owner {
        Owner {
            format: OWNER_FORMAT.to_string(),
            catalog: id.to_string(),
            location: self.catalog_here(),
            host: crate::catalog::hostname(),
            claimed: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    fn not_ours(&self, name: &str, owner: &Owner, here: &str) -> Error {
        Error::Refused(format!(
            "storage '{name}' belongs to another catalog ({}, claimed by host {} on {}), not to this one ({here}): two catalogs on one storage delete each other's blocks; set `database` to that catalog, as every host of the repository does (docs/scale-out.md); if it is lost for good, `keepfs database rebuild --take-over` into an empty catalog makes a new one from the storage",
            owner.location, owner.host, owner.claimed
        ))
    }
}

fn new_id() -> String {
    hex::encode(crate::transform::aes::random::<16>())
}

fn read_owner(raw: &SharedStorage) -> Result<Option<Owner>> {
    let bytes = match crate::storage::retry(crate::storage::STORAGE_ATTEMPTS, || raw.get_fresh(OWNER_KEY)) {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Owner::parse(&bytes, raw.name()).map(Some)
}

fn write_owner(raw: &SharedStorage, owner: &Owner) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(owner).map_err(|e| Error::Other(format!("cannot encode the owner: {e}")))?;
    crate::storage::retry(crate::storage::STORAGE_ATTEMPTS, || raw.put(OWNER_KEY, &bytes))?;
    crate::storage::retry(crate::storage::STORAGE_ATTEMPTS, || raw.sync())?;
    Ok(())
}
