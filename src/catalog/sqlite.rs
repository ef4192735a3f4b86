//! The embedded catalog: one SQLite file (the default). Versions, labels, block indexes,
//! the objects each storage holds, and the sessions and version locks that let several
//! keepfs processes on this host share a repository. Only what must be queried is here;
//! a version's block map is one index blob, never a row per block. Schema changes are
//! numbered migrations; the schema version is SQLite's `user_version`.

use super::{
    Catalog, IncompleteVersion, IndexBytes, Lookup, OBJECT_DELETING, OBJECT_PRESENT, OBJECT_WRITING, ObjectRecord,
    ObjectRow, REBUILD_UNFINISHED, Session, StorageRecord, date_text, now_ms,
};
use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::transform::aes::KeyId;
use crate::version::{Stats, Status, Version, VersionUid};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// Schema migrations; entry N brings the schema from version N to N+1.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE storages (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    proc_start INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    writes INTEGER NOT NULL
);
CREATE TABLE versions (
    uid INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    date TEXT NOT NULL,
    size INTEGER NOT NULL,
    block_size INTEGER NOT NULL,
    status TEXT NOT NULL,
    protected INTEGER NOT NULL DEFAULT 0,
    storage_id INTEGER NOT NULL REFERENCES storages(id),
    session_id INTEGER,
    expire TEXT,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_written INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    bytes_deduplicated INTEGER NOT NULL DEFAULT 0,
    bytes_sparse INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX versions_by_name ON versions(name);
CREATE TABLE labels (
    uid INTEGER NOT NULL REFERENCES versions(uid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (uid, name)
) WITHOUT ROWID;
CREATE TABLE version_index (
    uid INTEGER PRIMARY KEY REFERENCES versions(uid) ON DELETE CASCADE,
    data BLOB NOT NULL
);
CREATE TABLE objects (
    storage_id INTEGER NOT NULL,
    id BLOB NOT NULL,
    stored_size INTEGER NOT NULL,
    plain_size INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    valid INTEGER NOT NULL DEFAULT 1,
    touched_ms INTEGER NOT NULL,
    PRIMARY KEY (storage_id, id)
) WITHOUT ROWID;
CREATE TABLE version_locks (
    uid INTEGER NOT NULL,
    session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    purpose TEXT NOT NULL,
    PRIMARY KEY (uid, session_id)
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE storages ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE objects ADD COLUMN key_id INTEGER;
"#,
    // The last sign of life of an incomplete version's backup (its creation, its
    // heartbeats): cleanup spares its objects for `incomplete_grace` after it.
    r#"
ALTER TABLE versions ADD COLUMN active_ms INTEGER;
"#,
    // Work on the repository that must be finished before it is used as usual (a
    // rebuild that did not end cleanly).
    r#"
CREATE TABLE repository_state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"#,
    // The cleanup session that marked an object `deleting` (cleanup without a database
    // transaction held across storage deletes), and the host a version was made on.
    r#"
ALTER TABLE objects ADD COLUMN deleter INTEGER;
ALTER TABLE versions ADD COLUMN host TEXT;
"#,
    // The machine (boot and pid namespace) a session's pid belongs to: sessions of
    // another machine under the same host name are judged by their heartbeats.
    r#"
ALTER TABLE sessions ADD COLUMN machine TEXT NOT NULL DEFAULT '';
"#,
];

/// `repository_state` row: the highest session id ever given (see `register_session`).
const SESSION_SEQ: &str = "session_seq";

/// A session's columns as [`session_row`] reads them.
const SESSION_COLUMNS: &str = "id, pid, host, proc_start, started_ms, heartbeat_ms, purpose, writes, machine";

/// The value of the `repository_state` row `name`.
fn state_row(c: &Connection, name: &str) -> Result<Option<String>> {
    Ok(c.query_row("SELECT value FROM repository_state WHERE name=?1", [name], |r| r.get(0)).optional()?)
}

/// The live session a `repository_state` row (a lease, `moving`) names, if any.
fn live_holder(c: &Connection, name: &str) -> Result<Option<Session>> {
    let Some(id) = state_row(c, name)?.and_then(|v| v.parse::<i64>().ok()) else { return Ok(None) };
    let held =
        c.query_row(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id=?1"), [id], session_row).optional()?;
    Ok(held.filter(|s| super::session_alive(s, now_ms())))
}

fn session_row(r: &rusqlite::Row) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get(0)?,
        process: super::ProcessId {
            pid: r.get(1)?,
            host: r.get(2)?,
            start: r.get::<_, i64>(3)? as u64,
            machine: r.get(8)?,
        },
        started_ms: r.get(4)?,
        heartbeat_ms: r.get(5)?,
        purpose: r.get(6)?,
        writes: r.get(7)?,
    })
}

/// A version's 16 columns as `insert_version_record` and `replace_version_record` write
/// them: uid, name, snapshot, date, size, block_size, status, protected, storage_id,
/// expire, then the six statistics.
fn version_row(v: &Version, storage_id: i64) -> [rusqlite::types::Value; 16] {
    use rusqlite::types::Value;
    let int = |n: u64| Value::Integer(n as i64);
    [
        int(v.uid.0),
        Value::Text(v.name.clone()),
        Value::Text(v.snapshot.clone()),
        Value::Text(date_text(&v.date)),
        int(v.size),
        int(v.block_size as u64),
        Value::Text(v.status.as_str().to_string()),
        Value::Integer(i64::from(v.protected)),
        Value::Integer(storage_id),
        v.expire.as_ref().map_or(Value::Null, |d| Value::Text(date_text(d))),
        int(v.stats.bytes_read),
        int(v.stats.bytes_written),
        int(v.stats.bytes_stored),
        int(v.stats.bytes_deduplicated),
        int(v.stats.bytes_sparse),
        int(v.stats.duration_ms),
    ]
}

fn blob_id(r: &rusqlite::Row, i: usize) -> rusqlite::Result<Option<BlockId>> {
    Ok(BlockId::from_slice(r.get_ref(i)?.as_blob().map_err(rusqlite::Error::from)?))
}

/// Records objects as present, valid and just touched, inside the caller's transaction:
/// only rows a backup's lookup made (`writing`) or found (`present`). `key` is the master
/// key that sealed the objects (None: plain, or not known). Returns the ids that have no
/// such row (marked or removed by a cleanup meanwhile).
fn record_objects(
    tx: &rusqlite::Transaction,
    storage_id: i64,
    objects: &[(BlockId, u64, u64)],
    key: Option<KeyId>,
) -> Result<Vec<BlockId>> {
    let now = now_ms();
    let mut st = tx.prepare_cached(
        "UPDATE objects SET state=?7, valid=1, touched_ms=?5, stored_size=?3, plain_size=?4, key_id=COALESCE(?6, key_id) \
         WHERE storage_id=?1 AND id=?2 AND state IN (?7, ?8)",
    )?;
    let key = key.map(|k| k.as_i64());
    let mut refused = Vec::new();
    for (id, stored, plain) in objects {
        let n = st.execute(params![
            storage_id,
            &id.0[..],
            *stored as i64,
            *plain as i64,
            now,
            key,
            OBJECT_PRESENT,
            OBJECT_WRITING
        ])?;
        if n == 0 {
            refused.push(*id);
        }
    }
    Ok(refused)
}

/// How long a statement waits for another process's lock before "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Puts a database in WAL mode. Switching needs an exclusive lock, and SQLite reports a
/// busy database at once here instead of asking the busy handler, so processes that
/// open a new repository together (a backup and an `ls` watching it) would fail with
/// "database is locked". Retried for as long as any other statement would wait.
fn switch_to_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return Ok(other?),
        }
    }
}

pub struct SqliteCatalog {
    conn: Connection,
}

/// Checks the database file at `path` with SQLite's `quick_check` (every page read, the
/// structure of every table and index checked). `None`: intact, or no file there;
/// `Some(reason)`: damaged.
pub fn check_file(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| Error::Other(format!("cannot open the metadata database {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let rows: rusqlite::Result<Vec<String>> =
        conn.prepare("PRAGMA quick_check(1)").and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
    match rows {
        Ok(rows) if rows.iter().all(|r| r == "ok") => Ok(None),
        Ok(rows) => Ok(Some(rows.join("; "))),
        Err(e) if crate::error::database_damaged(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Moves a damaged database file (and its WAL and shared-memory files) aside, to
/// `<name>.damaged-<UTC time>`, so that a rebuild can make a new one. An intact file is
/// left where it is. Returns where the damaged one went and what is wrong with it.
pub fn set_aside_if_damaged(path: &Path) -> Result<Option<(std::path::PathBuf, String)>> {
    let Some(reason) = check_file(path)? else {
        return Ok(None);
    };
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "keepfs.sqlite".into());
    let aside = path.with_file_name(format!("{name}.damaged-{stamp}"));
    if aside.exists() {
        return Err(Error::Refused(format!("{} exists already; try again in a second", aside.display())));
    }
    let with_suffix = |p: &Path, suffix: &str| std::path::PathBuf::from(format!("{}{suffix}", p.display()));
    // The WAL first: the main file must never sit next to a WAL that is not its own.
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        match std::fs::rename(&from, with_suffix(&aside, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(format!("cannot move the damaged database file {} aside", from.display()), e));
            }
        }
    }
    Ok(Some((aside, reason)))
}

impl SqliteCatalog {
    /// Opens (creating when missing) the database at `path`, owner-only when new.
    pub fn open(path: &Path) -> Result<SqliteCatalog> {
        SqliteCatalog::open_with_modes(path, crate::perms::Modes::PRIVATE)
    }

    /// Opens the database; a new one (and its directory) is created with `modes`. SQLite
    /// gives the `-wal` and `-shm` files the mode of the database file.
    pub fn open_with_modes(path: &Path, modes: crate::perms::Modes) -> Result<SqliteCatalog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            modes.create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        // Created here (SQLite would make it 0644 less the umask); an existing file is
        // opened as it is.
        modes
            .options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("cannot open the metadata database {}", path.display()), e))?;
        SqliteCatalog::open_file(path).map_err(|e| out_of_space(e, path))
    }

    fn open_file(path: &Path) -> Result<SqliteCatalog> {
        let conn = Connection::open(path)
            .map_err(|e| Error::Other(format!("cannot open the metadata database {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // A new database gives freed pages back to the filesystem on request (see
        // `reclaim_space`). Only a new one: on an existing file the pragma may write.
        let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
        if pages == 0 {
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        }
        // WAL lets readers (ls, a mount) run while a backup writes; FULL makes every
        // commit durable, so "valid" in the database is never lost after it is printed.
        switch_to_wal(&conn)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut db = SqliteCatalog { conn };
        db.migrate()?;
        Ok(db)
    }

    /// An empty catalog in memory: what a command that only reads sees of a repository
    /// that does not exist yet, so that reading creates nothing on disk.
    pub fn empty_in_memory() -> Result<SqliteCatalog> {
        let conn = Connection::open_in_memory()
            .map_err(|e| Error::Other(format!("cannot open an empty metadata database in memory: {e}")))?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut db = SqliteCatalog { conn };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: usize = tx.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
        if current > MIGRATIONS.len() {
            return Err(Error::Other(format!(
                "the metadata database has schema version {current}, newer than this keepfs knows ({}); upgrade keepfs",
                MIGRATIONS.len()
            )));
        }
        if current == MIGRATIONS.len() {
            // Nothing to write: a command that only reads leaves the file as it was.
            return Ok(());
        }
        for (step, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.execute_batch(sql).map_err(|e| match e {
                // The database refused the step's SQL: the message alone (the error's own
                // text quotes the SQL, lines of it).
                rusqlite::Error::SqlInputError { msg, .. } => {
                    super::migration_failed("the metadata database", current, step, msg)
                }
                rusqlite::Error::SqliteFailure(f, msg)
                    if matches!(f.code, rusqlite::ErrorCode::Unknown | rusqlite::ErrorCode::ConstraintViolation) =>
                {
                    super::migration_failed(
                        "the metadata database",
                        current,
                        step,
                        msg.unwrap_or_else(|| f.to_string()),
                    )
                }
                // A damaged file, a full disk, a failed write: told as such (exit 3 and the
                // rebuild hint for damage; the caller names a full file system).
                e => Error::Database(e),
            })?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
        tx.commit()?;
        Ok(())
    }
}

impl Catalog for SqliteCatalog {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    /// Whether this database was made by a `database rebuild` that has not finished cleanly.
    fn rebuild_unfinished(&self) -> Result<bool> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM repository_state WHERE name=?1", [REBUILD_UNFINISHED], |r| {
            r.get::<_, i64>(0)
        })? > 0)
    }

    fn set_rebuild_unfinished(&self, unfinished: bool) -> Result<()> {
        if unfinished {
            self.conn.execute(
                "INSERT OR REPLACE INTO repository_state(name, value) VALUES (?1, ?2)",
                params![REBUILD_UNFINISHED, date_text(&Utc::now())],
            )?;
        } else {
            self.conn.execute("DELETE FROM repository_state WHERE name=?1", [REBUILD_UNFINISHED])?;
        }
        Ok(())
    }

    fn repository_state(&self, name: &str) -> Result<Option<String>> {
        Ok(self.conn.query_row("SELECT value FROM repository_state WHERE name=?1", [name], |r| r.get(0)).optional()?)
    }

    fn set_repository_state(&self, name: &str, value: &str) -> Result<()> {
        self.conn
            .execute("INSERT OR REPLACE INTO repository_state(name, value) VALUES (?1, ?2)", params![name, value])?;
        Ok(())
    }

    fn repository_states(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut st = self.conn.prepare("SELECT name, value FROM repository_state WHERE substr(name, 1, ?2) = ?1")?;
        let rows = st.query_map(params![prefix, prefix.len() as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    fn keep_repository_state(&self, name: &str, value: &str) -> Result<String> {
        self.conn
            .execute("INSERT OR IGNORE INTO repository_state(name, value) VALUES (?1, ?2)", params![name, value])?;
        Ok(self.conn.query_row("SELECT value FROM repository_state WHERE name=?1", [name], |r| r.get(0))?)
    }

    fn claim(&mut self, name: &str, session: i64) -> Result<Option<i64>> {
        self.write(|tx| {
            if let Some(held) = live_holder(tx, name)?.filter(|s| s.id != session) {
                return Ok(Some(held.id));
            }
            tx.execute(
                "INSERT OR REPLACE INTO repository_state(name, value) VALUES (?1, ?2)",
                params![name, session.to_string()],
            )?;
            Ok(None)
        })
    }

    fn begin_move(&mut self, session: i64) -> Result<Vec<Session>> {
        self.write(|tx| {
            let now = now_ms();
            let mut st = tx.prepare(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id <> ?1"))?;
            let others: Vec<Session> = st
                .query_map([session], session_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .into_iter()
                .filter(|s| super::session_alive(s, now))
                .collect();
            drop(st);
            if others.is_empty() {
                tx.execute(
                    "INSERT OR REPLACE INTO repository_state(name, value) VALUES (?1, ?2)",
                    params![super::MOVING, session.to_string()],
                )?;
            }
            Ok(others)
        })
    }

    fn release(&self, name: &str, session: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM repository_state WHERE name=?1 AND value=?2", params![name, session.to_string()])?;
        Ok(())
    }

    fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    // ---- storages -------------------------------------------------------------------

    /// The numeric id of a storage name, created on first use.
    fn storage_id(&self, name: &str) -> Result<i64> {
        self.conn.execute("INSERT OR IGNORE INTO storages(name) VALUES (?1)", [name])?;
        Ok(self.conn.query_row("SELECT id FROM storages WHERE name = ?1", [name], |r| r.get(0))?)
    }

    /// Whether a storage was initialised for encryption (then it must never be written
    /// in plaintext, whatever its keyring object looks like).
    fn storage_encrypted(&self, name: &str) -> Result<bool> {
        let id = self.storage_id(name)?;
        Ok(self.conn.query_row("SELECT encrypted FROM storages WHERE id = ?1", [id], |r| r.get(0))?)
    }

    fn set_storage_encrypted(&self, name: &str) -> Result<()> {
        let id = self.storage_id(name)?;
        self.conn.execute("UPDATE storages SET encrypted = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    fn mark_encrypted_if_unused(&mut self, name: &str) -> Result<bool> {
        let id = self.storage_id(name)?;
        self.write(|tx| {
            let used: i64 = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM versions WHERE storage_id = ?1) + (SELECT COUNT(*) FROM objects WHERE storage_id = ?1)",
                [id],
                |r| r.get(0),
            )?;
            if used > 0 {
                return Ok(false);
            }
            tx.execute("UPDATE storages SET encrypted = 1 WHERE id = ?1", [id])?;
            Ok(true)
        })
    }

    /// Objects per master key (None: not recorded, e.g. after a database rebuild).
    fn objects_per_key(&self, storage_id: i64) -> Result<Vec<(Option<KeyId>, u64)>> {
        let mut st = self
            .conn
            .prepare("SELECT key_id, COUNT(*) FROM objects WHERE storage_id=?1 AND state=0 GROUP BY key_id")?;
        let rows = st.query_map([storage_id], |r| {
            Ok((r.get::<_, Option<i64>>(0)?.map(KeyId::from_i64), r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Objects not recorded as sealed by `key`.
    fn objects_not_under(
        &self,
        storage_id: i64,
        key: KeyId,
        after: Option<&BlockId>,
        limit: usize,
    ) -> Result<Vec<BlockId>> {
        let mut st = self.conn.prepare(
            "SELECT id FROM objects WHERE storage_id=?1 AND state=0 AND (key_id IS NULL OR key_id != ?2) AND id > ?3 \
             ORDER BY id LIMIT ?4",
        )?;
        let after: &[u8] = after.map(|a| &a.0[..]).unwrap_or(&[]);
        let rows = st.query_map(params![storage_id, key.as_i64(), after, limit as i64], |r| r.get::<_, Vec<u8>>(0))?;
        // An id that is not one would stop the caller's paging short: said, not skipped.
        let mut out = Vec::new();
        for r in rows {
            let raw = r?;
            out.push(BlockId::from_slice(&raw).ok_or_else(|| super::bad_object_id(raw.len()))?);
        }
        Ok(out)
    }

    fn count_objects_not_under(&self, storage_id: i64, key: KeyId) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM objects WHERE storage_id=?1 AND state=0 AND (key_id IS NULL OR key_id != ?2)",
            params![storage_id, key.as_i64()],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    fn set_object_keys(&self, storage_id: i64, ids: &[BlockId], key: KeyId) -> Result<()> {
        self.update_each("UPDATE objects SET key_id=?3 WHERE storage_id=?1 AND id=?2", storage_id, ids, &key.as_i64())
    }

    // ---- sessions -------------------------------------------------------------------

    /// Session ids are never reused: SQLite would give a new row the largest id plus one,
    /// so a session that ended as the newest would hand its id to the next one, which
    /// would then pass for it (the cleanup that marked rows `deleting`, the writer of an
    /// incomplete version). The highest id ever given is kept in `repository_state`.
    fn register_session(&self, purpose: &str, writes: bool) -> Result<i64> {
        let p = super::ProcessId::current();
        let now = now_ms();
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        super::may_register(purpose, state_row(&tx, super::MOVED_TO)?, live_holder(&tx, super::MOVING)?)?;
        let id: i64 = tx.query_row(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM sessions), 0), \
             COALESCE((SELECT CAST(value AS INTEGER) FROM repository_state WHERE name = ?1), 0)) + 1",
            [SESSION_SEQ],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO sessions(id, pid, host, proc_start, started_ms, heartbeat_ms, purpose, writes, machine) \
             VALUES (?1,?2,?3,?4,?5,?5,?6,?7,?8)",
            params![id, p.pid, p.host, p.start as i64, now, purpose, writes, p.machine],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO repository_state(name, value) VALUES (?1, ?2)",
            params![SESSION_SEQ, id.to_string()],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Refreshes a session's heartbeat, and the last sign of life of the incomplete
    /// version it writes, if any.
    fn heartbeat(&self, session: i64) -> Result<()> {
        let now = now_ms();
        if self.conn.execute("UPDATE sessions SET heartbeat_ms = ?1 WHERE id = ?2", params![now, session])? == 0 {
            return Err(super::session_ended(session));
        }
        self.conn.execute(
            "UPDATE versions SET active_ms = ?1 WHERE session_id = ?2 AND status = 'incomplete'",
            params![now, session],
        )?;
        Ok(())
    }

    fn end_session(&self, session: i64) -> Result<()> {
        self.conn.execute("DELETE FROM sessions WHERE id = ?1", [session])?;
        Ok(())
    }

    /// Sessions whose process still runs. Sessions of dead processes are removed here
    /// (with their version locks), so a crash never leaves a repository locked.
    fn live_sessions(&self) -> Result<Vec<Session>> {
        let all: Vec<Session> = {
            let mut st = self.conn.prepare(&format!("SELECT {SESSION_COLUMNS} FROM sessions"))?;
            st.query_map([], session_row)?.collect::<rusqlite::Result<_>>()?
        };
        let (live, dead) = super::partition_live(all, now_ms());
        for s in dead {
            self.conn.execute("DELETE FROM sessions WHERE id = ?1", [s.id])?;
        }
        Ok(live)
    }

    /// Locks a version against removal for as long as `session` lives.
    fn lock_version(&self, uid: VersionUid, session: i64, purpose: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO version_locks(uid, session_id, purpose) VALUES (?1, ?2, ?3)",
            params![uid.0 as i64, session, purpose],
        )?;
        Ok(())
    }

    /// Live holders of locks on `uid`: (purpose, pid, host).
    fn version_lock_holders(&self, uid: VersionUid) -> Result<Vec<(String, u32, String)>> {
        let live: HashMap<i64, Session> = self.live_sessions()?.into_iter().map(|s| (s.id, s)).collect();
        let mut st = self.conn.prepare("SELECT session_id, purpose FROM version_locks WHERE uid = ?1")?;
        let rows: Vec<(i64, String)> =
            st.query_map([uid.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(sid, purpose)| live.get(&sid).map(|s| (purpose, s.process.pid, s.process.host.clone())))
            .collect())
    }

    // ---- versions -------------------------------------------------------------------

    /// Creates an `incomplete` version owned by `session` and returns its uid.
    #[allow(clippy::too_many_arguments)]
    fn create_version(
        &mut self,
        name: &str,
        snapshot: &str,
        size: u64,
        block_size: u32,
        storage: &str,
        labels: &BTreeMap<String, String>,
        session: i64,
    ) -> Result<VersionUid> {
        let storage_id = self.storage_id(storage)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO versions(name, snapshot, date, size, block_size, status, storage_id, session_id, active_ms, host) VALUES (?1,?2,?3,?4,?5,'incomplete',?6,?7,?8,?9)",
            params![name, snapshot, date_text(&Utc::now()), size as i64, block_size, storage_id, session, now_ms(), super::hostname()],
        )?;
        let uid = tx.last_insert_rowid();
        for (k, v) in labels {
            tx.execute("INSERT INTO labels(uid, name, value) VALUES (?1,?2,?3)", params![uid, k, v])?;
        }
        tx.commit()?;
        Ok(VersionUid(uid as u64))
    }

    /// Stores the index and statistics of a version and marks it valid, in one transaction.
    fn commit_version(&mut self, uid: VersionUid, session: i64, index: IndexBytes<'_>, stats: &Stats) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // A backup taken for dead (its session ended by another process, or the version
        // taken over by a `--continue`) may have lost objects to a cleanup meanwhile: it
        // must not become valid.
        let owned: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM versions v JOIN sessions s ON s.id = v.session_id WHERE v.uid=?1 AND s.id=?2)",
            params![uid.0 as i64, session],
            |r| r.get(0),
        )?;
        if !owned {
            return Err(super::session_ended(session));
        }
        write_index(&tx, uid, index)?;
        tx.execute(
            "UPDATE versions SET status='valid', session_id=NULL, bytes_read=?2, bytes_written=?3, bytes_stored=?4, bytes_deduplicated=?5, bytes_sparse=?6, duration_ms=?7 WHERE uid=?1",
            params![
                uid.0 as i64,
                stats.bytes_read as i64,
                stats.bytes_written as i64,
                stats.bytes_stored as i64,
                stats.bytes_deduplicated as i64,
                stats.bytes_sparse as i64,
                stats.duration_ms as i64
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Inserts a version as recorded elsewhere (a storage's version object), keeping its
    /// uid; the uid sequence moves past it, so new uids stay increasing.
    fn insert_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        self.write(|tx| {
            insert_version_row(tx, v, storage_id)?;
            write_index(tx, v.uid, index)
        })
    }

    /// Replaces the fields, labels and index of a version the database holds with those
    /// recorded elsewhere (its version object: `metadata restore --force`), in one
    /// transaction.
    fn replace_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE versions SET name=?2, snapshot=?3, date=?4, size=?5, block_size=?6, status=?7, protected=?8, \
             storage_id=?9, expire=?10, bytes_read=?11, bytes_written=?12, bytes_stored=?13, bytes_deduplicated=?14, \
             bytes_sparse=?15, duration_ms=?16 WHERE uid=?1",
            rusqlite::params_from_iter(version_row(v, storage_id)),
        )?;
        if n == 0 {
            return Err(Error::VersionNotFound(v.uid.to_string()));
        }
        tx.execute("UPDATE versions SET host=?2 WHERE uid=?1", params![v.uid.0 as i64, v.host])?;
        tx.execute("DELETE FROM labels WHERE uid=?1", [v.uid.0 as i64])?;
        for (k, val) in &v.labels {
            tx.execute("INSERT INTO labels(uid, name, value) VALUES (?1,?2,?3)", params![v.uid.0 as i64, k, val])?;
        }
        write_index(&tx, v.uid, index)?;
        tx.commit()?;
        Ok(())
    }

    fn set_status(&self, uid: VersionUid, status: Status) -> Result<()> {
        self.conn.execute("UPDATE versions SET status=?2 WHERE uid=?1", params![uid.0 as i64, status.as_str()])?;
        Ok(())
    }

    fn set_expire(&self, uid: VersionUid, expire: Option<&DateTime<Utc>>) -> Result<()> {
        let n = self
            .conn
            .execute("UPDATE versions SET expire=?2 WHERE uid=?1", params![uid.0 as i64, expire.map(date_text)])?;
        if n == 0 {
            return Err(Error::VersionNotFound(uid.to_string()));
        }
        Ok(())
    }

    /// Sets and removes labels of a version in one transaction.
    fn change_labels(&mut self, uid: VersionUid, set: &[(String, String)], remove: &[String]) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool =
            tx.query_row("SELECT COUNT(*) FROM versions WHERE uid=?1", [uid.0 as i64], |r| r.get::<_, i64>(0))? > 0;
        if !exists {
            return Err(Error::VersionNotFound(uid.to_string()));
        }
        for (k, v) in set {
            tx.execute(
                "INSERT OR REPLACE INTO labels(uid, name, value) VALUES (?1,?2,?3)",
                params![uid.0 as i64, k, v],
            )?;
        }
        for k in remove {
            tx.execute("DELETE FROM labels WHERE uid=?1 AND name=?2", params![uid.0 as i64, k])?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_protected(&self, uid: VersionUid, protected: bool) -> Result<()> {
        let n = self.conn.execute("UPDATE versions SET protected=?2 WHERE uid=?1", params![uid.0 as i64, protected])?;
        if n == 0 {
            return Err(Error::VersionNotFound(uid.to_string()));
        }
        Ok(())
    }

    fn list_versions(&self) -> Result<Vec<Version>> {
        versions_where(&self.conn, "", &[])
    }

    fn version(&self, uid: VersionUid) -> Result<Version> {
        versions_where(&self.conn, "WHERE v.uid = ?1", &[&(uid.0 as i64)])?
            .pop()
            .ok_or_else(|| Error::VersionNotFound(uid.to_string()))
    }

    /// The session that is writing an incomplete version, if any.
    fn version_session(&self, uid: VersionUid) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row("SELECT session_id FROM versions WHERE uid=?1", [uid.0 as i64], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// The incomplete versions of a storage, for cleanup: uid, start date (ms), last sign
    /// of life of its backup (ms; the start when never recorded) and writing session.
    fn incomplete_versions(&self, storage_id: i64) -> Result<Vec<IncompleteVersion>> {
        let mut st = self.conn.prepare(
            "SELECT uid, date, active_ms, session_id FROM versions WHERE storage_id=?1 AND status='incomplete' ORDER BY uid",
        )?;
        let rows = st.query_map([storage_id], |r| {
            let date: String = r.get(1)?;
            let started_ms = DateTime::parse_from_rfc3339(&date).map(|d| d.timestamp_millis()).unwrap_or(0);
            Ok(IncompleteVersion {
                uid: VersionUid(r.get::<_, i64>(0)? as u64),
                started_ms,
                active_ms: r.get::<_, Option<i64>>(2)?.unwrap_or(started_ms),
                session: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn load_index(&self, uid: VersionUid) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn
            .query_row("SELECT data FROM version_index WHERE uid=?1", [uid.0 as i64], |r| r.get(0))
            .optional()?)
    }

    fn index_len(&self, uid: VersionUid) -> Result<Option<u64>> {
        // length() of a blob reads its size from the record, not its pages.
        Ok(self
            .conn
            .query_row("SELECT length(data) FROM version_index WHERE uid=?1", [uid.0 as i64], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|n| n as u64))
    }

    fn index_piece(&self, uid: VersionUid, offset: u64, len: usize, into: &mut Vec<u8>) -> Result<bool> {
        into.clear();
        // Incremental blob I/O: only the pages of this piece are read (uid is the rowid).
        let blob = match self.conn.blob_open(rusqlite::MAIN_DB, c"version_index", c"data", uid.0 as i64, true) {
            Ok(b) => b,
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such rowid") => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let start = (offset as usize).min(blob.len());
        into.resize(len.min(blob.len() - start), 0);
        blob.read_at_exact(into, start)?;
        Ok(true)
    }

    fn remove_version(&mut self, uid: VersionUid) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM version_locks WHERE uid=?1", [uid.0 as i64])?;
        tx.execute("DELETE FROM versions WHERE uid=?1", [uid.0 as i64])?;
        tx.commit()?;
        Ok(())
    }

    // ---- objects --------------------------------------------------------------------

    fn lookup_for_write(&mut self, storage_id: i64, ids: &[BlockId], dead_deleters: &[i64]) -> Result<Lookup> {
        let mut out = Lookup::default();
        let now = now_ms();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        out.storage_encrypted = tx
            .query_row("SELECT encrypted FROM storages WHERE id = ?1", [storage_id], |r| r.get(0))
            .optional()?
            .unwrap_or(false);
        {
            let mut get =
                tx.prepare_cached("SELECT state, valid, deleter FROM objects WHERE storage_id=?1 AND id=?2")?;
            let mut touch = tx.prepare_cached("UPDATE objects SET touched_ms=?3 WHERE storage_id=?1 AND id=?2")?;
            let mut to_write = tx.prepare_cached(
                "UPDATE objects SET state=?3, deleter=NULL, touched_ms=?4 WHERE storage_id=?1 AND id=?2",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms) VALUES (?1,?2,0,0,?3,1,?4)",
            )?;
            for id in ids {
                let row: Option<(i64, bool, Option<i64>)> = get
                    .query_row(params![storage_id, &id.0[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                match row {
                    None => {
                        insert.execute(params![storage_id, &id.0[..], OBJECT_WRITING, now])?;
                    }
                    Some((OBJECT_PRESENT, true, _)) => {
                        touch.execute(params![storage_id, &id.0[..], now])?;
                        out.present.insert(*id);
                    }
                    // A present object a scrub found damaged counts as absent: the backup
                    // stores it again, which replaces the damaged file and marks it valid.
                    Some((OBJECT_PRESENT, false, _)) => {
                        touch.execute(params![storage_id, &id.0[..], now])?;
                    }
                    Some((OBJECT_DELETING, _, Some(d))) if !dead_deleters.contains(&d) => out.blocked.push((*id, d)),
                    Some(_) => {
                        to_write.execute(params![storage_id, &id.0[..], OBJECT_WRITING, now])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Records durably stored objects (id, stored size, plaintext size) as present.
    fn insert_objects(
        &mut self,
        storage_id: i64,
        objects: &[(BlockId, u64, u64)],
        key: Option<KeyId>,
    ) -> Result<Vec<BlockId>> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let refused = record_objects(&tx, storage_id, objects, key)?;
        tx.commit()?;
        Ok(refused)
    }

    /// Records objects found in a storage (by a rebuild or a metadata restore) as present
    /// and just touched, keeping what the database knows of those it has rows for: an
    /// object a scrub found damaged stays invalid.
    fn insert_found_objects(&mut self, storage_id: i64, objects: &[(BlockId, u64)]) -> Result<()> {
        let now = now_ms();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms) VALUES (?1,?2,?3,0,0,1,?4) \
                 ON CONFLICT(storage_id, id) DO UPDATE SET state=0, touched_ms=?4 WHERE state <> 1",
            )?;
            for (id, stored) in objects {
                st.execute(params![storage_id, &id.0[..], *stored as i64, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The objects of a storage a scrub or restore found damaged.
    fn invalid_objects(&self, storage_id: i64) -> Result<HashSet<BlockId>> {
        let mut st = self.conn.prepare("SELECT id FROM objects WHERE storage_id=?1 AND valid=0")?;
        let mut rows = st.query([storage_id])?;
        let mut out = HashSet::new();
        while let Some(r) = rows.next()? {
            if let Some(id) = BlockId::from_slice(r.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    fn set_objects_valid(&self, storage_id: i64, ids: &[BlockId], valid: bool) -> Result<()> {
        self.update_each("UPDATE objects SET valid=?3 WHERE storage_id=?1 AND id=?2", storage_id, ids, &valid)
    }

    /// Visits every object row of a storage.
    fn for_each_object(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRow)) -> Result<()> {
        let mut st = self.conn.prepare("SELECT id, stored_size, state, touched_ms FROM objects WHERE storage_id=?1")?;
        let mut rows = st.query([storage_id])?;
        while let Some(r) = rows.next()? {
            let Some(id) = BlockId::from_slice(r.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?) else {
                continue;
            };
            f(ObjectRow { id, stored_size: r.get::<_, i64>(1)? as u64, state: r.get(2)?, touched_ms: r.get(3)? });
        }
        Ok(())
    }

    /// (count, stored bytes) of the objects a storage holds.
    fn object_totals(&self, storage_id: i64) -> Result<(u64, u64)> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(stored_size),0) FROM objects WHERE storage_id=?1 AND state=0",
            [storage_id],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    fn storage_names(&self) -> Result<Vec<(i64, String)>> {
        let mut st = self.conn.prepare("SELECT id, name FROM storages ORDER BY id")?;
        Ok(st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?)
    }

    fn set_size(&mut self, uid: VersionUid, size: u64) -> Result<()> {
        self.write(|tx| {
            tx.execute("UPDATE versions SET size=?2 WHERE uid=?1", params![uid.0 as i64, size as i64])?;
            Ok(())
        })
    }

    fn set_snapshot_and_labels(
        &mut self,
        uid: VersionUid,
        snapshot: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute("UPDATE versions SET snapshot=?2 WHERE uid=?1", params![uid.0 as i64, snapshot])?;
            tx.execute("DELETE FROM labels WHERE uid=?1", [uid.0 as i64])?;
            for (k, v) in labels {
                tx.execute("INSERT INTO labels(uid, name, value) VALUES (?1,?2,?3)", params![uid.0 as i64, k, v])?;
            }
            Ok(())
        })
    }

    fn rename_version(&mut self, uid: VersionUid, name: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("UPDATE versions SET name=?2 WHERE uid=?1", params![uid.0 as i64, name])?;
            Ok(())
        })
    }

    fn take_incomplete(&mut self, uid: VersionUid, session: i64, live: &[i64]) -> Result<bool> {
        self.write(|tx| {
            let owner: Option<i64> =
                tx.query_row("SELECT session_id FROM versions WHERE uid=?1", [uid.0 as i64], |r| r.get(0))?;
            if owner.is_some_and(|o| o != session && live.contains(&o)) {
                return Ok(false);
            }
            tx.execute(
                "UPDATE versions SET session_id=?2, active_ms=?3 WHERE uid=?1",
                params![uid.0 as i64, session, now_ms()],
            )?;
            Ok(true)
        })
    }

    fn mark_for_deletion(
        &mut self,
        storage_id: i64,
        ids: &[BlockId],
        orphans: &[(BlockId, u64)],
        cutoff_ms: i64,
        cleaner: i64,
    ) -> Result<Vec<(BlockId, u64)>> {
        self.write(|tx| {
            // The cleaner is alive (its heartbeat refreshed) or it may not mark anything.
            if tx.execute("UPDATE sessions SET heartbeat_ms=?1 WHERE id=?2", params![now_ms(), cleaner])? == 0 {
                return Err(super::session_ended(cleaner));
            }
            // A row another cleanup marked is taken over only once that cleanup's session
            // is gone (only one cleanup holds the lease; this keeps it so if ever not).
            let mut mark = tx.prepare_cached(
                "UPDATE objects SET state=?1, deleter=?4 WHERE storage_id=?2 AND id=?3 \
                 AND (CASE WHEN state=?1 THEN deleter IS NULL OR deleter=?4 \
                      OR NOT EXISTS (SELECT 1 FROM sessions WHERE id=objects.deleter) \
                      ELSE touched_ms < ?5 END) RETURNING stored_size",
            )?;
            let mut adopt = tx.prepare_cached(
                "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms, deleter) \
                 VALUES (?1,?2,?3,0,?4,1,0,?5) ON CONFLICT(storage_id, id) DO NOTHING",
            )?;
            let mut held = Vec::new();
            for id in ids {
                let size: Option<i64> = mark
                    .query_row(params![OBJECT_DELETING, storage_id, &id.0[..], cleaner, cutoff_ms], |r| r.get(0))
                    .optional()?;
                if let Some(size) = size {
                    held.push((*id, size as u64));
                }
            }
            for (id, size) in orphans {
                if adopt.execute(params![storage_id, &id.0[..], *size as i64, OBJECT_DELETING, cleaner])? == 1 {
                    held.push((*id, *size));
                }
            }
            Ok(held)
        })
    }

    fn forget_deleted(&mut self, storage_id: i64, ids: &[BlockId], cleaner: i64) -> Result<u64> {
        self.write(|tx| {
            let mut del =
                tx.prepare_cached("DELETE FROM objects WHERE storage_id=?1 AND id=?2 AND state=?3 AND deleter=?4")?;
            let mut n = 0;
            for id in ids {
                n += del.execute(params![storage_id, &id.0[..], OBJECT_DELETING, cleaner])? as u64;
            }
            Ok(n)
        })
    }

    fn storage_records(&self) -> Result<Vec<StorageRecord>> {
        let mut st = self.conn.prepare("SELECT id, name, encrypted FROM storages ORDER BY id")?;
        Ok(st
            .query_map([], |r| Ok(StorageRecord { id: r.get(0)?, name: r.get(1)?, encrypted: r.get(2)? }))?
            .collect::<rusqlite::Result<_>>()?)
    }

    fn for_each_object_record(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRecord) -> Result<()>) -> Result<()> {
        let mut st = self.conn.prepare(
            "SELECT id, stored_size, plain_size, state, valid, touched_ms, key_id FROM objects WHERE storage_id=?1 ORDER BY id",
        )?;
        let mut rows = st.query([storage_id])?;
        while let Some(r) = rows.next()? {
            let Some(id) = blob_id(r, 0)? else {
                continue;
            };
            f(ObjectRecord {
                id,
                stored_size: r.get::<_, i64>(1)? as u64,
                plain_size: r.get::<_, i64>(2)? as u64,
                state: r.get(3)?,
                valid: r.get(4)?,
                touched_ms: r.get(5)?,
                key: r.get::<_, Option<i64>>(6)?.map(KeyId::from_i64),
            })?;
        }
        Ok(())
    }

    fn is_empty(&self) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM storages) + (SELECT COUNT(*) FROM versions) + (SELECT COUNT(*) FROM objects)",
            [],
            |r| r.get::<_, i64>(0),
        )? == 0)
    }

    fn import_storages(&mut self, storages: &[StorageRecord]) -> Result<()> {
        self.write(|tx| {
            for s in storages {
                tx.execute(
                    "INSERT INTO storages(id, name, encrypted) VALUES (?1,?2,?3)",
                    params![s.id, s.name, s.encrypted],
                )?;
            }
            Ok(())
        })
    }

    fn import_objects(&mut self, storage_id: i64, objects: &[ObjectRecord]) -> Result<()> {
        self.write(|tx| {
            let mut st = tx.prepare_cached(
                "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms, key_id) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            )?;
            for o in objects {
                st.execute(params![
                    storage_id,
                    &o.id.0[..],
                    o.stored_size as i64,
                    o.plain_size as i64,
                    o.state,
                    o.valid,
                    o.touched_ms,
                    o.key.map(|k| k.as_i64())
                ])?;
            }
            Ok(())
        })
    }

    fn import_version(&mut self, v: &Version, index: Option<IndexBytes<'_>>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        self.write(|tx| {
            insert_version_row(tx, v, storage_id)?;
            match index {
                Some(index) => write_index(tx, v.uid, index),
                None => Ok(()),
            }
        })
    }

    fn reclaim_space(&mut self) -> Result<u64> {
        self.reclaim_free_pages()
    }

    fn now_ms(&self) -> Result<i64> {
        Ok(now_ms())
    }
}

impl SqliteCatalog {
    /// Runs `sql` (`?1` storage, `?2` object id, `?3` value) for each of `ids`, in one
    /// transaction.
    fn update_each(&self, sql: &str, storage_id: i64, ids: &[BlockId], value: &dyn rusqlite::ToSql) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut st = tx.prepare_cached(sql)?;
            for id in ids {
                st.execute(params![storage_id, &id.0[..], value])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `f` inside an immediate (write-locked) transaction: nothing else writes to the
    /// database meanwhile.
    fn write<T>(&mut self, f: impl FnOnce(&rusqlite::Transaction) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

/// Inserts a version's row and labels as recorded elsewhere (its uid kept).
fn insert_version_row(tx: &rusqlite::Transaction, v: &Version, storage_id: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO versions(uid, name, snapshot, date, size, block_size, status, protected, storage_id, expire, \
         bytes_read, bytes_written, bytes_stored, bytes_deduplicated, bytes_sparse, duration_ms) \
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
        rusqlite::params_from_iter(version_row(v, storage_id)),
    )
    .map_err(|e| match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if [rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE]
                .contains(&f.extended_code) =>
        {
            super::version_exists(v.uid)
        }
        _ => e.into(),
    })?;
    tx.execute("UPDATE versions SET host=?2 WHERE uid=?1", params![v.uid.0 as i64, v.host])?;
    for (k, val) in &v.labels {
        tx.execute("INSERT INTO labels(uid, name, value) VALUES (?1,?2,?3)", params![v.uid.0 as i64, k, val])?;
    }
    Ok(())
}

/// Writes a version's index, a piece at a time, into a value of its length (incremental
/// blob I/O), in the caller's transaction.
fn write_index(tx: &rusqlite::Transaction, uid: VersionUid, index: IndexBytes<'_>) -> Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO version_index(uid, data) VALUES (?1, zeroblob(?2))",
        params![uid.0 as i64, index.len as i64],
    )?;
    let mut blob = tx.blob_open(rusqlite::MAIN_DB, c"version_index", c"data", uid.0 as i64, false)?;
    super::copy_index(index, |piece, at| Ok(blob.write_all_at(piece, at as usize)?))
}

fn versions_where(conn: &Connection, clause: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<Version>> {
    let sql = format!(
        "SELECT v.uid, v.date, v.name, v.snapshot, v.size, v.block_size, v.status, v.protected, s.name, \
         v.bytes_read, v.bytes_written, v.bytes_stored, v.bytes_deduplicated, v.bytes_sparse, v.duration_ms, v.expire, v.host \
         FROM versions v JOIN storages s ON s.id = v.storage_id {clause} ORDER BY v.uid"
    );
    let mut st = conn.prepare(&sql)?;
    let mut versions: Vec<Version> = st
        .query_map(args, |r| {
            let date: String = r.get(1)?;
            let status: String = r.get(6)?;
            Ok(Version {
                uid: VersionUid(r.get::<_, i64>(0)? as u64),
                date: DateTime::parse_from_rfc3339(&date).map(|d| d.with_timezone(&Utc)).unwrap_or_default(),
                name: r.get(2)?,
                snapshot: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
                block_size: r.get(5)?,
                status: Status::parse(&status).unwrap_or(Status::Invalid),
                protected: r.get(7)?,
                storage: r.get(8)?,
                labels: BTreeMap::new(),
                stats: Stats {
                    bytes_read: r.get::<_, i64>(9)? as u64,
                    bytes_written: r.get::<_, i64>(10)? as u64,
                    bytes_stored: r.get::<_, i64>(11)? as u64,
                    bytes_deduplicated: r.get::<_, i64>(12)? as u64,
                    bytes_sparse: r.get::<_, i64>(13)? as u64,
                    duration_ms: r.get::<_, i64>(14)? as u64,
                },
                expire: r
                    .get::<_, Option<String>>(15)?
                    .and_then(|d| DateTime::parse_from_rfc3339(&d).ok())
                    .map(|d| d.with_timezone(&Utc)),
                host: r.get(16)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    if versions.is_empty() {
        return Ok(versions);
    }
    let pos: HashMap<u64, usize> = versions.iter().enumerate().map(|(i, v)| (v.uid.0, i)).collect();
    let mut st = conn.prepare("SELECT uid, name, value FROM labels")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let uid = r.get::<_, i64>(0)? as u64;
        if let Some(&i) = pos.get(&uid) {
            versions[i].labels.insert(r.get(1)?, r.get(2)?);
        }
    }
    Ok(versions)
}

// ---- Catalog space (issue 13, "Images of 200 TB"): kept apart from the SQL above so
// that it moves as one piece. Removed versions leave free pages in the file; these give
// them back to the filesystem.

/// `PRAGMA auto_vacuum` value of a database that can give free pages back on request.
const AUTO_VACUUM_INCREMENTAL: i64 = 2;

impl SqliteCatalog {
    /// Gives the database file's free pages back to the filesystem and returns how many
    /// bytes the file shrank. A database made before keepfs did this (`auto_vacuum`
    /// off) is converted once, by a full `VACUUM` (it rewrites the file, needing that
    /// much free space for a moment); later calls only move the free pages out
    /// (`incremental_vacuum`). Then the WAL is checkpointed so the file itself shrinks
    /// (as far as readers allow: a reader keeps the pages it reads until it ends).
    fn reclaim_free_pages(&self) -> Result<u64> {
        let pages = |c: &Connection| -> Result<i64> {
            let n: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
            let size: i64 = c.pragma_query_value(None, "page_size", |r| r.get(0))?;
            Ok(n * size)
        };
        let before = pages(&self.conn)?;
        let mode: i64 = self.conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
        if mode != AUTO_VACUUM_INCREMENTAL {
            self.conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
            self.conn.execute_batch("VACUUM")?;
        } else {
            // Each step of the statement frees one page: run it to its end.
            let mut st = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
        }
        let _: i64 = self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        let after = pages(&self.conn)?;
        Ok(before.saturating_sub(after) as u64)
    }
}

/// A database that fails to open with an I/O error on a file system with no space left
/// says so: SQLite reports a write that found no space while it sets up its shared
/// memory file as "disk I/O error", which reads as a failing disk (found by a drill).
fn out_of_space(e: Error, path: &Path) -> Error {
    let io_failure = matches!(
        &e,
        Error::Database(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull)
    );
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if io_failure && space_left(dir).is_some_and(|left| left < 1 << 20) {
        return Error::io(
            format!(
                "the metadata database {} cannot be written (its file system is full: free space there)",
                path.display()
            ),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
    }
    e
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn space_left(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup and an `ls` started together on a new repository both create the
    /// database: neither may fail with "database is locked".
    #[test]
    fn processes_opening_a_new_database_together_all_succeed() {
        for round in 0..30 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keepfs.sqlite");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteCatalog::open(&path).map(|db| db.schema_version().unwrap())
                    })
                })
                .collect();
            for o in openers {
                let opened = o.join().unwrap();
                assert_eq!(opened.as_ref().ok(), Some(&(MIGRATIONS.len() as i64)), "round {round}: {opened:?}");
            }
        }
    }
}
