//! `keepfs database migrate`: copies a whole catalog into another, empty one (SQLite to
//! PostgreSQL or back) through the [`Catalog`] interface, then checks the copy: the
//! same versions with the same fields and labels, byte-identical indexes, the same
//! object rows. Sessions and version locks are not copied; a catalog with running
//! sessions is refused.

use super::{Catalog, IndexBytes, IndexPieces, ObjectRecord};
use crate::error::{Error, Result};
use crate::version::VersionUid;

/// Object rows per insert transaction.
const OBJECT_BATCH: usize = 10_000;

/// What a copy moved (and checked).
#[derive(Clone, Debug, Default)]
pub struct CopyReport {
    pub storages: u64,
    pub versions: u64,
    pub indexes: u64,
    pub objects: u64,
}

/// Refuses a copy while other sessions use the repository (`running`, as
/// [`Catalog::begin_move`] found them): their writes after the copy would land in the
/// catalog left behind.
fn refuse_running(running: &[super::Session]) -> Result<()> {
    if let Some(s) = running.first() {
        return Err(Error::Refused(format!(
            "{} session(s) are using the repository (e.g. {} by pid {} on {}; `keepfs database sessions` lists them); stop them, then migrate",
            running.len(),
            s.purpose,
            s.process.pid,
            s.process.host
        )));
    }
    Ok(())
}

fn refuse_nonempty(to: &dyn Catalog) -> Result<()> {
    if !to.is_empty()? {
        return Err(Error::Refused(
            "the target catalog is not empty; migrate into a new database (or a new SQLite file)".into(),
        ));
    }
    Ok(())
}

/// Copies `from` into the empty catalog `to` and checks the result. The caller has
/// refused a running repository and a target that is not empty (see `migrate_catalog`),
/// before the target was made.
fn copy(from: &dyn Catalog, to: &mut dyn Catalog) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    let storages = from.storage_records()?;
    to.import_storages(&storages)?;
    report.storages = storages.len() as u64;
    for s in &storages {
        let mut batch: Vec<ObjectRecord> = Vec::with_capacity(OBJECT_BATCH);
        let mut failed = None;
        from.for_each_object_record(s.id, &mut |o| {
            batch.push(o);
            if batch.len() >= OBJECT_BATCH {
                if let Err(e) = to.import_objects(s.id, &batch) {
                    failed = Some(e);
                    return Err(Error::Other("copy stopped".into()));
                }
                report.objects += batch.len() as u64;
                batch.clear();
            }
            Ok(())
        })
        .map_err(|e| failed.take().unwrap_or(e))?;
        to.import_objects(s.id, &batch)?;
        report.objects += batch.len() as u64;
    }
    for v in from.list_versions()? {
        // Each index streamed from one catalog into the other, a piece at a time.
        match pieces(from, v.uid)? {
            Some(mut index) => {
                let len = index.len();
                let imported = to.import_version(&v, Some(IndexBytes { len, bytes: &mut index }));
                if let Some(e) = index.failed.take() {
                    return Err(e); // the source catalog's error, not the short read it caused
                }
                imported?;
                report.indexes += 1;
            }
            None => to.import_version(&v, None)?,
        }
        report.versions += 1;
    }
    verify(from, to)?;
    Ok(report)
}

/// Checks that `to` holds what `from` holds: versions (all fields, labels), indexes
/// byte for byte, object rows.
pub fn verify(from: &dyn Catalog, to: &dyn Catalog) -> Result<()> {
    let differ = |what: String| Err(Error::Other(format!("the copied catalog differs from the original: {what}")));
    let (a, b) = (from.list_versions()?, to.list_versions()?);
    if a.len() != b.len() {
        return differ(format!("{} versions, not {}", b.len(), a.len()));
    }
    for (x, y) in a.iter().zip(&b) {
        let (jx, jy) = (serde_json::to_string(x).unwrap_or_default(), serde_json::to_string(y).unwrap_or_default());
        if jx != jy {
            return differ(format!("version {}", x.uid));
        }
        if !same_index(from, to, x.uid)? {
            return differ(format!("the index of version {}", x.uid));
        }
    }
    let (sa, sb) = (from.storage_records()?, to.storage_records()?);
    if sa != sb {
        return differ("the storages".into());
    }
    for s in &sa {
        let mut rows = Vec::new();
        from.for_each_object_record(s.id, &mut |o| {
            rows.push(o);
            Ok(())
        })?;
        let mut i = 0usize;
        let mut mismatch = false;
        to.for_each_object_record(s.id, &mut |o| {
            if rows.get(i) != Some(&o) {
                mismatch = true;
            }
            i += 1;
            Ok(())
        })?;
        if mismatch || i != rows.len() {
            return differ(format!("the objects of storage '{}'", s.name));
        }
    }
    Ok(())
}

/// Version `uid`'s index in `cat`, read a piece at a time, if it has one.
fn pieces(cat: &dyn Catalog, uid: VersionUid) -> Result<Option<IndexPieces<impl super::ReadPiece + '_>>> {
    let Some(len) = cat.index_len(uid)? else { return Ok(None) };
    Ok(Some(IndexPieces::new(move |at, want, into: &mut Vec<u8>| cat.index_piece(uid, at, want, into), len)))
}

/// Whether both catalogs hold the same index (or none) for `uid`, compared a piece at a
/// time.
fn same_index(a: &dyn Catalog, b: &dyn Catalog, uid: VersionUid) -> Result<bool> {
    use std::io::Read;
    let (Some(mut x), Some(mut y)) = (pieces(a, uid)?, pieces(b, uid)?) else {
        return Ok(a.index_len(uid)?.is_none() && b.index_len(uid)?.is_none());
    };
    if x.len() != y.len() {
        return Ok(false);
    }
    let (mut bx, mut by) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = x.len();
    while left > 0 {
        let n = left.min(bx.len() as u64) as usize;
        let read = x.read_exact(&mut bx[..n]).and_then(|_| y.read_exact(&mut by[..n]));
        if let Some(e) = x.failed.take().or(y.failed.take()) {
            return Err(e);
        }
        if read.is_err() || bx[..n] != by[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

impl crate::Repository {
    /// `keepfs database migrate --to TARGET`: copies this repository's catalog into the
    /// new, empty catalog `target` (a postgresql:// URL or an SQLite file path) and
    /// checks the copy. The configuration is not changed: point `database` at the
    /// target afterwards.
    pub fn migrate_catalog(&self, target: &str) -> Result<(super::Location, CopyReport)> {
        let location = match super::Location::parse_setting("--to", target).map_err(Error::Invalid)? {
            // Its password: from the URL, else the configuration's database_password_file
            // (set for the new catalog before `database` names it), else PGPASSFILE.
            // (Only when this catalog is SQLite: a PostgreSQL one's file is its own.)
            super::Location::Postgres { url, .. } => super::Location::Postgres {
                url,
                password_file: self
                    .config
                    .database_password_file
                    .clone()
                    .filter(|_| self.config.database_url.is_none()),
            },
            super::Location::Sqlite(path) => {
                // Absolute, so that what is printed can go into `database` as it is.
                let path = std::path::absolute(&path).map_err(|e| Error::io(format!("--to {target}"), e))?;
                // Into a directory that is there: a mistyped one is not made.
                if let Some(dir) = path.parent().filter(|d| !d.is_dir()) {
                    return Err(Error::Invalid(format!("--to {target}: directory {} does not exist", dir.display())));
                }
                // A new file, or an empty regular one: never a device, nor anything holding data.
                match std::fs::symlink_metadata(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Ok(m) if m.is_file() && m.len() == 0 => {}
                    _ => {
                        return Err(Error::Refused(format!(
                            "--to {target}: the file exists; migrate into a new SQLite file"
                        )));
                    }
                }
                super::Location::Sqlite(path)
            }
        };
        // What a failed copy into a new SQLite file may remove: only what it made.
        let made: Vec<std::ffi::OsString> = match &location {
            super::Location::Sqlite(path) => ["", "-wal", "-shm"]
                .iter()
                .map(|suffix| {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    p
                })
                .filter(|p| std::fs::symlink_metadata(p).is_err())
                .collect(),
            super::Location::Postgres { .. } => Vec::new(),
        };
        if location == self.config.catalog_location() {
            return Err(Error::Invalid(format!("--to {}: that is this repository's own catalog", location.display())));
        }
        // Before the target is made: a refused migration leaves no new file behind. From
        // the check on, no other session can start on this catalog until the migration
        // ends (or dies): one begun during the copy would write into the catalog left.
        let session = self.session(super::MIGRATE_PURPOSE, false)?;
        refuse_running(&self.db().begin_move(session.id)?)?;
        let moving = MovingRow { repo: self, session: &session };
        crate::test_knobs::stall("KEEPFS_TEST_MIGRATE_STALL_MS");
        // A failure while the target is made (a full disk) or copied into leaves nothing
        // of ours there, so that nothing half-copied looks valid, and says where it was.
        let mut copied = false;
        let mut into = || -> Result<(Box<dyn Catalog>, CopyReport)> {
            let mut to = super::open(&location, self.config.modes)?;
            refuse_nonempty(to.as_ref())?;
            copied = true;
            // Read through a connection of its own, so that the session's heartbeats go on
            // (through the repository's) however long the copy takes.
            let from = super::open(&self.config.catalog_location(), self.config.modes)?;
            let report = copy(from.as_ref(), to.as_mut())?;
            super::copy_storage_places(from.as_ref(), to.as_ref(), &self.config)?;
            // The same catalog, elsewhere: it keeps its id, so the storages it owns stay its.
            if let Some(id) = from.repository_state(crate::owner::CATALOG_ID)? {
                to.keep_repository_state(crate::owner::CATALOG_ID, &id)?;
            }
            if to.engine() != "sqlite" {
                // A new catalog: its place is recorded, never taken from a storage's owner.
                super::check_owner(to.as_ref(), &self.config, &|_| false, &|_| false)?;
            }
            Ok((to, report))
        };
        let (_to, report) = match into() {
            Ok(done) => done,
            Err(e) => {
                let left = match &location {
                    // New files of ours: removed.
                    super::Location::Sqlite(path) => {
                        for p in &made {
                            let _ = std::fs::remove_file(p);
                        }
                        // An empty file given as the target is left empty, as it was.
                        if !made.contains(&path.clone().into_os_string()) {
                            let _ = std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(0));
                        }
                        "nothing was left there".to_string()
                    }
                    super::Location::Postgres { .. } if copied => "the target database may hold part of the copy: drop and create it again (dropdb, createdb) before migrating again".to_string(),
                    super::Location::Postgres { .. } => "nothing was copied".to_string(),
                };
                let said = format!("migrating into {}: {e}; {left}", location.display());
                return Err(match e {
                    Error::Invalid(_) => Error::Invalid(said),
                    Error::Refused(_) => Error::Refused(said),
                    Error::NotOwner(_) => Error::NotOwner(said),
                    Error::Config(_) => Error::Config(said),
                    Error::Key(_) => Error::Key(said),
                    _ => Error::Other(said),
                });
            }
        };
        // From now on the new catalog is the repository's: this one refuses to be used,
        // so that no host left on it backs up or cleans up beside the new one.
        let when = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
        self.db().set_repository_state(super::MOVED_TO, &format!("{} on {when}", location.display()))?;
        // The storages say where their catalog is now (a catalog made again at the old
        // place is then not taken for this one).
        if let Err(e) = self.move_owner(&location) {
            keepfs_face::log!("keepfs: warning: the storages still name the old catalog as their owner's place ({e})");
        }
        drop(moving);
        Ok((location, report))
    }
}

/// The `moving` row of a migration under way: let go when the migration ends, whether it
/// succeeded (the `moved_to` row then refuses new sessions) or failed (the catalog is
/// the repository's again).
struct MovingRow<'a> {
    repo: &'a crate::repo::Repository,
    session: &'a crate::repo::SessionGuard,
}

impl Drop for MovingRow<'_> {
    fn drop(&mut self) {
        let _ = self.repo.db().release(super::MOVING, self.session.id);
    }
}
