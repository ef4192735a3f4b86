//! The shared catalog: a PostgreSQL database (`database = "postgresql://user@host/db"`),
//! which every host of a cluster can use at once. Same tables, same numbered migrations
//! as the SQLite catalog (the schema version lives in `keepfs_schema`), in plain SQL
//! that PostgreSQL-protocol databases understand. Writes that SQLite serialises with
//! its database-wide write lock (object lookups and touches, tombstones, sweeps) take a
//! transaction-scoped advisory lock here, so the cleanup protocol of docs/format.md
//! holds unchanged. Connections and statements time out instead of hanging, also on a
//! server that stopped answering (see `conn`); a lost connection is opened again on the
//! next call (the transaction it was in is rolled back by the server, so nothing is
//! half-committed).

use super::{
    Catalog, IncompleteVersion, IndexBytes, Lookup, OBJECT_DELETING, OBJECT_PRESENT, OBJECT_WRITING, ObjectRecord,
    ObjectRow, REBUILD_UNFINISHED, Session, StorageRecord, date_text, parse_date,
};
use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::transform::aes::KeyId;
use crate::version::{Stats, Status, Version, VersionUid};
use chrono::{DateTime, Utc};
use conn::{CONNECT_TIMEOUT, Conn, Target, Tx as Transaction};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

mod conn;
mod tls;

/// Schema migrations; entry N brings the schema from version N to N+1. The same
/// numbering as the SQLite catalog's (`sqlite::MIGRATIONS`).
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE storages (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE sessions (
    id BIGSERIAL PRIMARY KEY,
    pid BIGINT NOT NULL,
    host TEXT NOT NULL,
    proc_start BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    purpose TEXT NOT NULL,
    writes BOOLEAN NOT NULL
);
CREATE TABLE versions (
    uid BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    date TEXT NOT NULL,
    size BIGINT NOT NULL,
    block_size BIGINT NOT NULL,
    status TEXT NOT NULL,
    protected BOOLEAN NOT NULL DEFAULT FALSE,
    storage_id BIGINT NOT NULL REFERENCES storages(id),
    session_id BIGINT,
    expire TEXT,
    bytes_read BIGINT NOT NULL DEFAULT 0,
    bytes_written BIGINT NOT NULL DEFAULT 0,
    bytes_stored BIGINT NOT NULL DEFAULT 0,
    bytes_deduplicated BIGINT NOT NULL DEFAULT 0,
    bytes_sparse BIGINT NOT NULL DEFAULT 0,
    duration_ms BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX versions_by_name ON versions(name);
CREATE TABLE labels (
    uid BIGINT NOT NULL REFERENCES versions(uid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (uid, name)
);
CREATE TABLE version_index (
    uid BIGINT PRIMARY KEY REFERENCES versions(uid) ON DELETE CASCADE,
    data BYTEA NOT NULL
);
CREATE TABLE objects (
    storage_id BIGINT NOT NULL,
    id BYTEA NOT NULL,
    stored_size BIGINT NOT NULL,
    plain_size BIGINT NOT NULL,
    state BIGINT NOT NULL DEFAULT 0,
    valid BOOLEAN NOT NULL DEFAULT TRUE,
    touched_ms BIGINT NOT NULL,
    PRIMARY KEY (storage_id, id)
);
CREATE TABLE version_locks (
    uid BIGINT NOT NULL,
    session_id BIGINT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    purpose TEXT NOT NULL,
    PRIMARY KEY (uid, session_id)
);
"#,
    r#"
ALTER TABLE storages ADD COLUMN encrypted BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE objects ADD COLUMN key_id BIGINT;
"#,
    r#"
ALTER TABLE versions ADD COLUMN active_ms BIGINT;
"#,
    r#"
CREATE TABLE repository_state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
    r#"
ALTER TABLE objects ADD COLUMN deleter BIGINT;
ALTER TABLE versions ADD COLUMN host TEXT;
"#,
    r#"
ALTER TABLE sessions ADD COLUMN machine TEXT NOT NULL DEFAULT '';
"#,
];

/// A session's columns as [`session_row`] reads them.
const SESSION_COLUMNS: &str = "id, pid, host, proc_start, started_ms, heartbeat_ms, purpose, writes, machine";

/// The value of the `repository_state` row `name`.
fn state_row(tx: &mut Transaction, name: &str) -> Result<Option<String>> {
    Ok(tx.query_opt("SELECT value FROM repository_state WHERE name=$1", &[&name])?.map(|r| r.get(0)))
}

/// The live session a `repository_state` row (a lease, `moving`) names, if any, judged
/// by the catalog's clock.
fn live_holder(tx: &mut Transaction, name: &str) -> Result<Option<Session>> {
    let Some(id) = state_row(tx, name)?.and_then(|v| v.parse::<i64>().ok()) else { return Ok(None) };
    let held = tx.query_opt(&format!("SELECT {SESSION_COLUMNS}, {CLOCK_MS} FROM sessions WHERE id=$1"), &[&id])?;
    Ok(held
        .map(|r| (session_row(&r), r.get::<_, i64>(9)))
        .filter(|(s, now)| super::session_alive(s, *now))
        .map(|(s, _)| s))
}

fn session_row(r: &Row) -> Session {
    Session {
        id: r.get(0),
        process: super::ProcessId {
            pid: r.get::<_, i64>(1) as u32,
            host: r.get(2),
            start: r.get::<_, i64>(3) as u64,
            machine: r.get(8),
        },
        started_ms: r.get(4),
        heartbeat_ms: r.get(5),
        purpose: r.get(6),
        writes: r.get(7),
    }
}

/// The advisory lock that stands for SQLite's write lock (see the module comment).
pub const WRITE_LOCK: i64 = 0x6b65_6570_6673; // "keepfs"

/// How long a statement waits for a lock another session holds (SQLite's busy timeout).
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the user name and password of `rest` (a URL after its `://`) end: the last
/// `@` before the query; or, when there is none, and `rest` starts `USER:` followed by
/// something that is not a port (so the first `?` or `/` is in a password, not the
/// query or path), the last `@` of all.
fn userinfo_end(rest: &str) -> Option<usize> {
    let q = rest.find('?').unwrap_or(rest.len());
    if let Some(at) = rest[..q].rfind('@') {
        return Some(at);
    }
    password_start(rest).and_then(|_| rest.rfind('@'))
}

/// Where a password begins in `rest` (after `USER:`), if what follows the first `:` is
/// not a port (digits up to the path, query or end) nor part of an IPv6 address.
fn password_start(rest: &str) -> Option<usize> {
    if rest.starts_with('[') {
        return None;
    }
    let colon = rest.find(':')?;
    if rest[..colon].contains(['/', '?', '#', '@']) {
        return None;
    }
    let after = &rest[colon + 1..];
    let run = &after[..after.find(['/', '?', '#', '@']).unwrap_or(after.len())];
    let port = !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()) && !after[run.len()..].starts_with('@');
    (!port).then_some(colon + 1)
}

/// Whether a URL holds a password (in its user information or a `password=` parameter).
pub fn url_has_password(url: &str) -> bool {
    redact(url) != url
}

/// The URL without its password, for messages. Everything between the user name and
/// the end of the user information is masked, so a URL that does not parse (a password
/// with a `/`, `#`, `?` or `@` not percent-encoded, a typo in the port) never shows its
/// password either; so is a `password=` parameter.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    // With a password, everything up to the last '@' of all is masked: an '@' in the
    // query then hides the host too, but an unencoded '@' in the password shows nothing.
    let password = password_start(rest);
    let end = match password {
        Some(_) => rest.rfind('@'),
        None => userinfo_end(rest),
    };
    let masked = match (end, password) {
        (Some(at), _) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{user}:***{}", &rest[at..]),
            None => rest.to_string(),
        },
        // `USER:` and then no '@' at all: what follows may be a password all the same.
        (None, Some(p)) if !rest.contains('@') => format!("{}***", &rest[..p]),
        _ => rest.to_string(),
    };
    let masked = match masked.split_once('?') {
        Some((base, query)) => {
            let parts: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if tls::percent_decode(k).eq_ignore_ascii_case("password") => {
                        format!("{k}=***")
                    }
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", parts.join("&"))
        }
        None => masked,
    };
    format!("{scheme}://{masked}")
}

/// A password in the URL that holds a character a URL gives another meaning: the URL
/// would be read with another host (or none), so it is refused before connecting.
fn check_userinfo(url: &str, name: &str) -> Result<()> {
    let Some((_, rest)) = url.split_once("://") else { return Ok(()) };
    let Some(at) = userinfo_end(rest) else { return Ok(()) };
    if rest[..at].contains(['/', '#', '?', '@']) {
        return Err(Error::Config(format!(
            "database {name}: the user name or password holds '/', '#', '?' or '@', which end it early in a URL; percent-encode them (%2F, %23, %3F, %40) or put the password in a file named by database_password_file"
        )));
    }
    Ok(())
}

/// A PostgreSQL error as one line: the server's message (and what to do), or the
/// client's (a refused or timed-out connection).
/// Writes one row of `version_index` with a binary COPY, the index read as it is sent.
fn copy_index_in(tx: &mut Transaction<'_>, uid: i64, index: IndexBytes<'_>) -> Result<()> {
    copy_index_into(tx, "version_index", uid, index)
}

/// Sends a version's index into this connection's temporary `staged_index`, before the
/// write lock is taken: other hosts' writers do not wait while a large index crosses the
/// network. [`place_staged_index`] then moves it into `version_index` under the lock, on
/// the server, in one statement. The table empties itself at the end of the transaction
/// (committed or not).
fn stage_index(tx: &mut Transaction<'_>, uid: i64, index: IndexBytes<'_>) -> Result<()> {
    // Made once per connection (asked first: IF NOT EXISTS would send a notice each time).
    // Named with its schema: a table of that name elsewhere on the search path is not it.
    if tx.query_one("SELECT to_regclass('pg_temp.staged_index') IS NULL", &[])?.get::<_, bool>(0) {
        tx.batch_execute(
            "CREATE TEMPORARY TABLE staged_index (uid BIGINT NOT NULL, data BYTEA NOT NULL) ON COMMIT DELETE ROWS",
        )?;
    }
    copy_index_into(tx, "pg_temp.staged_index", uid, index)
}

/// See [`stage_index`]; under the write lock.
fn place_staged_index(tx: &mut Transaction<'_>, uid: i64) -> Result<()> {
    let n = tx.execute(
        "INSERT INTO version_index (uid, data) SELECT uid, data FROM pg_temp.staged_index WHERE uid=$1",
        &[&uid],
    )?;
    if n != 1 {
        return Err(Error::Other(format!("the staged block index of version {} is missing", VersionUid(uid as u64))));
    }
    Ok(())
}

fn copy_index_into(tx: &mut Transaction<'_>, table: &str, uid: i64, index: IndexBytes<'_>) -> Result<()> {
    let len = i32::try_from(index.len).map_err(|_| {
        Error::Invalid(format!("a block index of {} bytes is more than a catalog value may hold", index.len))
    })?;
    tx.copy_in(&format!("COPY {table} (uid, data) FROM STDIN (FORMAT binary)"), |send| {
        // Signature, flags, header extension length; one row of two fields; the trailer.
        let mut head = Vec::with_capacity(40);
        head.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        head.extend_from_slice(&0i32.to_be_bytes());
        head.extend_from_slice(&0i32.to_be_bytes());
        head.extend_from_slice(&2i16.to_be_bytes());
        head.extend_from_slice(&8i32.to_be_bytes());
        head.extend_from_slice(&uid.to_be_bytes());
        head.extend_from_slice(&len.to_be_bytes());
        send(&head)?;
        super::copy_index(index, |piece, _| send(piece))?;
        send(&(-1i16).to_be_bytes())
    })?;
    Ok(())
}

/// The password file libpq would read: the one `PGPASSFILE` names, else `~/.pgpass`.
fn pgpass_file() -> Option<std::path::PathBuf> {
    std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))
}

/// The password a pgpass `file` holds for this connection.
fn pgpass_password(file: &Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // Fields are separated by ':'; '\:' and '\\' are a literal colon and backslash.
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        fields.last_mut()?.push(n);
                    }
                }
                ':' if fields.len() < 5 => fields.push(String::new()),
                c => fields.last_mut()?.push(c),
            }
        }
        if fields.len() != 5 {
            continue;
        }
        let matches = |f: &str, v: &str| f == "*" || f == v;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
        {
            return fields.pop();
        }
    }
    None
}

/// The database server's clock in ms since the epoch (`clock_timestamp()`: the time of
/// the statement, not of the transaction's start).
const CLOCK_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
const CLOCK_SELECT: &str = "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint";

pub struct PostgresCatalog {
    /// Where the database is, how to log in, TLS, and its name for messages.
    target: Arc<Target>,
    client: RefCell<Conn>,
    /// When the connection was last handed out (see [`IDLE_CHECK`]).
    last_used: std::cell::Cell<std::time::Instant>,
}

/// A connection idle for this long is checked (an empty query) before it is used again:
/// a server restarted meanwhile closed it, and a long-running mount or NBD server would
/// otherwise fail its next request (a read the user asked for) with "connection closed"
/// before connecting again. What the check costs is one round trip after a pause.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl PostgresCatalog {
    /// Connects to the database `url` names (creating its tables when missing, migrating
    /// them when older). The password comes from the URL, else `password_file`, else
    /// `PGPASSFILE` / `~/.pgpass`.
    pub fn open(url: &str, password_file: Option<&Path>) -> Result<PostgresCatalog> {
        let name = redact(url);
        check_userinfo(url, &name)?;
        let (url, tls) = tls::from_url(url, &name)?;
        // The client's own parse error does not name the parameter.
        if let Some((_, query)) = url.split_once('?') {
            for (k, v) in query.split('&').filter_map(|p| p.split_once('=')) {
                if k == "connect_timeout" && v.parse::<u64>().is_err() {
                    return Err(Error::Config(format!(
                        "database {name}: connect_timeout={v} is not a whole number of seconds"
                    )));
                }
            }
        }
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::Config(format!(
                "database {name}: not a PostgreSQL URL ({e}); write it as postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAM=VALUE&...]"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30)).tcp_user_timeout(Duration::from_secs(120));
        // A lock held by a process that hangs mid-transaction (stopped, stuck) makes the
        // others give up after this long, as SQLite's busy timeout does, instead of waiting
        // for ever.
        let options = config.get_options().map(str::to_string).unwrap_or_default();
        if !options.contains("lock_timeout") {
            config.options(format!("{options} -c lock_timeout={}", LOCK_TIMEOUT.as_millis()).trim());
        }
        if config.get_application_name().is_none() {
            config.application_name("keepfs");
        }
        let password_from = if config.get_password().is_some() {
            "it came from the URL".to_string()
        } else if let Some(file) = password_file {
            let pw = std::fs::read_to_string(file).map_err(|e| {
                Error::Config(format!("database_password_file {}: cannot read it: {e}", file.display()))
            })?;
            config.password(pw.trim_end_matches(['\n', '\r']));
            format!("it came from database_password_file {}", file.display())
        } else {
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => "localhost".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let user =
                config.get_user().map(str::to_string).unwrap_or_else(|| std::env::var("USER").unwrap_or_default());
            let db = config.get_dbname().map(str::to_string).unwrap_or_else(|| user.clone());
            match pgpass_file().filter(|f| f.is_file()) {
                Some(file) => {
                    use std::os::unix::fs::PermissionsExt;
                    if std::fs::metadata(&file).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
                        keepfs_face::log!(
                            "keepfs: warning: password file {} is readable by others (libpq ignores such a file); chmod 0600 it",
                            file.display()
                        );
                    }
                    if let Err(e) = std::fs::File::open(&file) {
                        return Err(Error::Config(format!(
                            "database {name}: cannot read the password file {}: {e}",
                            file.display()
                        )));
                    }
                    match pgpass_password(&file, &host, port, &db, &user) {
                        Some(pw) => {
                            config.password(pw);
                            format!("it came from {}", file.display())
                        }
                        None => format!(
                            "{} has no line for {host}:{port}:{db}:{user}; its host must be written as in the URL",
                            file.display()
                        ),
                    }
                }
                None => "there is none in the URL, no database_password_file, and no PGPASSFILE or ~/.pgpass".into(),
            }
        };
        config.ssl_mode(tls.client_mode());
        let target = Arc::new(Target { config, tls, name, password_from, silent: Default::default() });
        let client = Conn::open(target.clone())?;
        let mut cat = PostgresCatalog {
            target,
            client: RefCell::new(client),
            last_used: std::cell::Cell::new(std::time::Instant::now()),
        };
        cat.migrate()?;
        Ok(cat)
    }

    fn migrate(&mut self) -> Result<()> {
        let name = self.target.name.clone();
        let client = self.client.get_mut();
        let tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS keepfs_schema (version BIGINT NOT NULL)")?;
        let current: i64 = match tx.query_opt("SELECT version FROM keepfs_schema", &[])? {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO keepfs_schema(version) VALUES (0)", &[])?;
                0
            }
        };
        let current = current.max(0) as usize;
        if current > MIGRATIONS.len() {
            return Err(Error::Other(format!(
                "the catalog {name} has schema version {current}, newer than this keepfs knows ({}); upgrade keepfs",
                MIGRATIONS.len()
            )));
        }
        if current == MIGRATIONS.len() {
            return Ok(());
        }
        for (step, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            tx.batch_execute(sql).map_err(|f| match f {
                // The server refused the step's SQL (a syntax or access rule, an integrity
                // constraint, a data exception, a feature it lacks); anything else (the
                // server shutting down or full, a lock timeout, the statement given up) is
                // told as such.
                conn::Failure::Client(e)
                    if e.code().is_some_and(|c| matches!(c.code().get(..2), Some("42" | "23" | "22" | "0A"))) =>
                {
                    super::migration_failed(&format!("the catalog {name}"), current, step, conn::describe(&e))
                }
                f => Error::from(f),
            })?;
        }
        tx.execute("UPDATE keepfs_schema SET version = $1", &[&(MIGRATIONS.len() as i64)])?;
        tx.commit()?;
        Ok(())
    }

    /// The client, connected again when the server closed the last connection (a
    /// restart): the statement that failed is not retried, the next call just works.
    fn client(&self) -> Result<std::cell::RefMut<'_, Conn>> {
        let mut c = self
            .client
            .try_borrow_mut()
            .map_err(|_| Error::Other("internal: catalog used while it is being iterated".into()))?;
        let idle = self.last_used.replace(std::time::Instant::now()).elapsed() >= IDLE_CHECK;
        if c.is_closed() || (idle && !c.is_valid()) {
            *c = Conn::open(self.target.clone())?;
        }
        Ok(c)
    }

    /// Runs `f` in a transaction that holds the write lock (see the module comment).
    fn write<T>(&self, f: impl FnOnce(&mut Transaction) -> Result<T>) -> Result<T> {
        let mut client = self.client()?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        let out = f(&mut tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// [`Self::write`] of a version's row whose index is sent first, before the lock
    /// ([`stage_index`]); `f` makes the row ready for it, then the index is placed.
    fn write_with_index(
        &self,
        uid: i64,
        index: IndexBytes<'_>,
        f: impl FnOnce(&mut Transaction) -> Result<()>,
    ) -> Result<()> {
        let mut client = self.client()?;
        let mut tx = client.transaction()?;
        stage_index(&mut tx, uid, index)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        f(&mut tx)?;
        place_staged_index(&mut tx, uid)?;
        tx.commit()?;
        Ok(())
    }

    /// The catalog's clock (ms since the epoch): every host stamps sessions, heartbeats,
    /// touches and version starts with it, so no host's clock is compared with another's.
    fn clock_ms(&self) -> Result<i64> {
        Ok(self.client()?.query_one(CLOCK_SELECT, &[])?.get(0))
    }

    fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        Ok(self.client()?.execute(sql, params)?)
    }

    fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        Ok(self.client()?.query(sql, params)?)
    }

    fn versions_where(&self, clause: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Version>> {
        let sql = format!(
            "SELECT v.uid, v.date, v.name, v.snapshot, v.size, v.block_size, v.status, v.protected, s.name, \
             v.bytes_read, v.bytes_written, v.bytes_stored, v.bytes_deduplicated, v.bytes_sparse, v.duration_ms, v.expire, v.host \
             FROM versions v JOIN storages s ON s.id = v.storage_id {clause} ORDER BY v.uid"
        );
        let rows = self.query(&sql, params)?;
        let mut versions: Vec<Version> = rows
            .iter()
            .map(|r| {
                let date: String = r.get(1);
                let status: String = r.get(6);
                Version {
                    uid: VersionUid(r.get::<_, i64>(0) as u64),
                    date: parse_date(&date).unwrap_or_default(),
                    name: r.get(2),
                    snapshot: r.get(3),
                    size: r.get::<_, i64>(4) as u64,
                    block_size: r.get::<_, i64>(5) as u32,
                    status: Status::parse(&status).unwrap_or(Status::Invalid),
                    protected: r.get(7),
                    storage: r.get(8),
                    labels: BTreeMap::new(),
                    stats: Stats {
                        bytes_read: r.get::<_, i64>(9) as u64,
                        bytes_written: r.get::<_, i64>(10) as u64,
                        bytes_stored: r.get::<_, i64>(11) as u64,
                        bytes_deduplicated: r.get::<_, i64>(12) as u64,
                        bytes_sparse: r.get::<_, i64>(13) as u64,
                        duration_ms: r.get::<_, i64>(14) as u64,
                    },
                    expire: r.get::<_, Option<String>>(15).and_then(|d| parse_date(&d)),
                    host: r.get(16),
                }
            })
            .collect();
        if versions.is_empty() {
            return Ok(versions);
        }
        let pos: HashMap<u64, usize> = versions.iter().enumerate().map(|(i, v)| (v.uid.0, i)).collect();
        let labels = if versions.len() == 1 {
            self.query("SELECT uid, name, value FROM labels WHERE uid = $1", &[&(versions[0].uid.0 as i64)])?
        } else {
            self.query("SELECT uid, name, value FROM labels", &[])?
        };
        for r in labels {
            if let Some(&i) = pos.get(&(r.get::<_, i64>(0) as u64)) {
                versions[i].labels.insert(r.get(1), r.get(2));
            }
        }
        Ok(versions)
    }
}

/// The first row of an answer that always has one (an aggregate, RETURNING).
fn first(rows: Vec<Row>) -> Result<Row> {
    rows.into_iter().next().ok_or_else(|| Error::Catalog("the server answered no row where one was due".into()))
}

fn id_of(r: &Row, i: usize) -> Option<BlockId> {
    BlockId::from_slice(r.get::<_, &[u8]>(i))
}

fn ids_param(ids: &[BlockId]) -> Vec<&[u8]> {
    ids.iter().map(|id| &id.0[..]).collect()
}

/// Records objects as present, valid and just touched, inside the caller's transaction:
/// only rows a backup's lookup made (`writing`) or found (`present`); one statement for
/// the whole batch (arrays), touched at the catalog's clock. An id named twice counts
/// once, with its last sizes. Returns the ids that have no such row (marked or removed by
/// a cleanup meanwhile).
fn record_objects(
    tx: &mut Transaction,
    storage_id: i64,
    objects: &[(BlockId, u64, u64)],
    key: Option<KeyId>,
) -> Result<Vec<BlockId>> {
    let mut at: HashMap<&[u8], usize> = HashMap::with_capacity(objects.len());
    let (mut ids, mut stored, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for (id, s, p) in objects {
        match at.get(&id.0[..]) {
            Some(&k) => (stored[k], plain[k]) = (*s as i64, *p as i64),
            None => {
                at.insert(&id.0[..], ids.len());
                ids.push(&id.0[..]);
                stored.push(*s as i64);
                plain.push(*p as i64);
            }
        }
    }
    let key = key.map(|k| k.as_i64());
    let recorded: HashSet<BlockId> = tx
        .query(
            &format!(
                "UPDATE objects o SET state=$6, valid=TRUE, touched_ms={CLOCK_MS}, stored_size=u.stored, \
                 plain_size=u.plain, key_id=COALESCE($5, o.key_id) \
                 FROM UNNEST($2::bytea[], $3::int8[], $4::int8[]) AS u(id, stored, plain) \
                 WHERE o.storage_id=$1 AND o.id=u.id AND o.state IN ($6, $7) RETURNING o.id"
            ),
            &[&storage_id, &ids, &stored, &plain, &key, &OBJECT_PRESENT, &OBJECT_WRITING],
        )?
        .iter()
        .filter_map(|r| id_of(r, 0))
        .collect();
    Ok(objects.iter().map(|o| o.0).filter(|id| !recorded.contains(id)).collect())
}

/// The 16 columns of a version row, in the order `insert_version` and
/// `replace_version_record` name them ($1..$16).
struct VersionRow {
    uid: i64,
    name: String,
    snapshot: String,
    date: String,
    size: i64,
    block_size: i64,
    status: &'static str,
    protected: bool,
    storage_id: i64,
    expire: Option<String>,
    stats: [i64; 6],
}

impl VersionRow {
    fn new(v: &Version, storage_id: i64) -> VersionRow {
        let s = &v.stats;
        VersionRow {
            uid: v.uid.0 as i64,
            name: v.name.clone(),
            snapshot: v.snapshot.clone(),
            date: date_text(&v.date),
            size: v.size as i64,
            block_size: v.block_size as i64,
            status: v.status.as_str(),
            protected: v.protected,
            storage_id,
            expire: v.expire.as_ref().map(date_text),
            stats: [s.bytes_read, s.bytes_written, s.bytes_stored, s.bytes_deduplicated, s.bytes_sparse, s.duration_ms]
                .map(|n| n as i64),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 16] {
        let st = &self.stats;
        [
            &self.uid,
            &self.name,
            &self.snapshot,
            &self.date,
            &self.size,
            &self.block_size,
            &self.status,
            &self.protected,
            &self.storage_id,
            &self.expire,
            &st[0],
            &st[1],
            &st[2],
            &st[3],
            &st[4],
            &st[5],
        ]
    }
}

/// Inserts a version row (keeping its uid) and its labels; moves the uid sequence past
/// it.
fn insert_version(tx: &mut Transaction, v: &Version, storage_id: i64) -> Result<()> {
    let row = VersionRow::new(v, storage_id);
    let uid = row.uid;
    tx.execute(
        "INSERT INTO versions(uid, name, snapshot, date, size, block_size, status, protected, storage_id, expire, \
         bytes_read, bytes_written, bytes_stored, bytes_deduplicated, bytes_sparse, duration_ms) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
        &row.params(),
    )
    .map_err(|e| match e.code() {
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => super::version_exists(v.uid),
        _ => e.into(),
    })?;
    tx.execute("UPDATE versions SET host=$2 WHERE uid=$1", &[&uid, &v.host])?;
    for (k, val) in &v.labels {
        tx.execute("INSERT INTO labels(uid, name, value) VALUES ($1,$2,$3)", &[&uid, k, val])?;
    }
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('versions', 'uid'), GREATEST((SELECT MAX(uid) FROM versions), 1))",
        &[],
    )?;
    Ok(())
}

impl Catalog for PostgresCatalog {
    fn engine(&self) -> &'static str {
        "postgresql"
    }

    fn schema_version(&self) -> Result<i64> {
        Ok(self.query("SELECT version FROM keepfs_schema", &[])?.first().map(|r| r.get(0)).unwrap_or(0))
    }

    fn rebuild_unfinished(&self) -> Result<bool> {
        Ok(!self.query("SELECT 1 FROM repository_state WHERE name=$1", &[&REBUILD_UNFINISHED])?.is_empty())
    }

    fn set_rebuild_unfinished(&self, unfinished: bool) -> Result<()> {
        if unfinished {
            self.execute(
                "INSERT INTO repository_state(name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = $2",
                &[&REBUILD_UNFINISHED, &date_text(&Utc::now())],
            )?;
        } else {
            self.execute("DELETE FROM repository_state WHERE name=$1", &[&REBUILD_UNFINISHED])?;
        }
        Ok(())
    }

    fn repository_state(&self, name: &str) -> Result<Option<String>> {
        Ok(self.query("SELECT value FROM repository_state WHERE name=$1", &[&name])?.first().map(|r| r.get(0)))
    }

    fn set_repository_state(&self, name: &str, value: &str) -> Result<()> {
        self.execute(
            "INSERT INTO repository_state(name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = $2",
            &[&name, &value],
        )?;
        Ok(())
    }

    fn repository_states(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let n = prefix.chars().count() as i32;
        Ok(self
            .query("SELECT name, value FROM repository_state WHERE left(name, $2) = $1", &[&prefix, &n])?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    fn keep_repository_state(&self, name: &str, value: &str) -> Result<String> {
        self.execute(
            "INSERT INTO repository_state(name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &value],
        )?;
        self.repository_state(name)?
            .ok_or_else(|| Error::Catalog(format!("repository_state row {name} vanished after it was set")))
    }

    fn claim(&mut self, name: &str, session: i64) -> Result<Option<i64>> {
        self.write(|tx| {
            if let Some(held) = live_holder(tx, name)?.filter(|s| s.id != session) {
                return Ok(Some(held.id));
            }
            tx.execute(
                "INSERT INTO repository_state(name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = $2",
                &[&name, &session.to_string()],
            )?;
            Ok(None)
        })
    }

    fn begin_move(&mut self, session: i64) -> Result<Vec<Session>> {
        self.write(|tx| {
            let others: Vec<Session> = tx
                .query(&format!("SELECT {SESSION_COLUMNS}, {CLOCK_MS} FROM sessions WHERE id <> $1"), &[&session])?
                .iter()
                .map(|r| (session_row(r), r.get::<_, i64>(9)))
                .filter(|(s, now)| super::session_alive(s, *now))
                .map(|(s, _)| s)
                .collect();
            if others.is_empty() {
                tx.execute(
                    "INSERT INTO repository_state(name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = $2",
                    &[&super::MOVING, &session.to_string()],
                )?;
            }
            Ok(others)
        })
    }

    fn release(&self, name: &str, session: i64) -> Result<()> {
        self.execute("DELETE FROM repository_state WHERE name=$1 AND value=$2", &[&name, &session.to_string()])?;
        Ok(())
    }

    fn storage_id(&self, name: &str) -> Result<i64> {
        // Looked up first: the insert would take a sequence number (and a write) each time.
        if let Some(r) = self.query("SELECT id FROM storages WHERE name = $1", &[&name])?.first() {
            return Ok(r.get(0));
        }
        self.execute("INSERT INTO storages(name) VALUES ($1) ON CONFLICT (name) DO NOTHING", &[&name])?;
        Ok(first(self.query("SELECT id FROM storages WHERE name = $1", &[&name])?)?.get(0))
    }

    fn storage_encrypted(&self, name: &str) -> Result<bool> {
        let id = self.storage_id(name)?;
        Ok(first(self.query("SELECT encrypted FROM storages WHERE id = $1", &[&id])?)?.get(0))
    }

    fn set_storage_encrypted(&self, name: &str) -> Result<()> {
        let id = self.storage_id(name)?;
        self.execute("UPDATE storages SET encrypted = TRUE WHERE id = $1", &[&id])?;
        Ok(())
    }

    fn mark_encrypted_if_unused(&mut self, name: &str) -> Result<bool> {
        let id = self.storage_id(name)?;
        self.write(|tx| {
            let used: i64 = first(tx.query(
                "SELECT (SELECT COUNT(*) FROM versions WHERE storage_id = $1) + (SELECT COUNT(*) FROM objects WHERE storage_id = $1)",
                &[&id],
            )?)?
            .get(0);
            if used > 0 {
                return Ok(false);
            }
            tx.execute("UPDATE storages SET encrypted = TRUE WHERE id = $1", &[&id])?;
            Ok(true)
        })
    }

    fn storage_names(&self) -> Result<Vec<(i64, String)>> {
        Ok(self.query("SELECT id, name FROM storages ORDER BY id", &[])?.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn register_session(&self, purpose: &str, writes: bool) -> Result<i64> {
        let p = super::ProcessId::current();
        // Under the write lock, as `begin_move` is: a session starts either before a
        // migration's check (which then sees it) or after its `moving` row (and is refused).
        self.write(|tx| {
            let moved = state_row(tx, super::MOVED_TO)?;
            super::may_register(purpose, moved, live_holder(tx, super::MOVING)?)?;
            Ok(tx
                .query_one(
                    &format!(
                        "INSERT INTO sessions(pid, host, proc_start, started_ms, heartbeat_ms, purpose, writes, machine) \
                         VALUES ($1,$2,$3,{CLOCK_MS},{CLOCK_MS},$4,$5,$6) RETURNING id"
                    ),
                    &[&(p.pid as i64), &p.host, &(p.start as i64), &purpose, &writes, &p.machine],
                )?
                .get(0))
        })
    }

    fn heartbeat(&self, session: i64) -> Result<()> {
        if self.execute(&format!("UPDATE sessions SET heartbeat_ms = {CLOCK_MS} WHERE id = $1"), &[&session])? == 0 {
            return Err(super::session_ended(session));
        }
        self.execute(
            &format!("UPDATE versions SET active_ms = {CLOCK_MS} WHERE session_id = $1 AND status = 'incomplete'"),
            &[&session],
        )?;
        Ok(())
    }

    fn end_session(&self, session: i64) -> Result<()> {
        self.execute("DELETE FROM sessions WHERE id = $1", &[&session])?;
        Ok(())
    }

    fn live_sessions(&self) -> Result<Vec<Session>> {
        let all: Vec<Session> =
            self.query(&format!("SELECT {SESSION_COLUMNS} FROM sessions"), &[])?.iter().map(session_row).collect();
        let (live, dead) = super::partition_live(all, self.clock_ms()?);
        if !dead.is_empty() {
            let ids: Vec<i64> = dead.iter().map(|s| s.id).collect();
            self.execute("DELETE FROM sessions WHERE id = ANY($1)", &[&ids])?;
        }
        Ok(live)
    }

    fn lock_version(&self, uid: VersionUid, session: i64, purpose: &str) -> Result<()> {
        self.execute(
            "INSERT INTO version_locks(uid, session_id, purpose) VALUES ($1, $2, $3) \
             ON CONFLICT (uid, session_id) DO UPDATE SET purpose = $3",
            &[&(uid.0 as i64), &session, &purpose],
        )?;
        Ok(())
    }

    fn version_lock_holders(&self, uid: VersionUid) -> Result<Vec<(String, u32, String)>> {
        let live: HashMap<i64, Session> = self.live_sessions()?.into_iter().map(|s| (s.id, s)).collect();
        let rows = self.query("SELECT session_id, purpose FROM version_locks WHERE uid = $1", &[&(uid.0 as i64)])?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let sid: i64 = r.get(0);
                live.get(&sid).map(|s| (r.get::<_, String>(1), s.process.pid, s.process.host.clone()))
            })
            .collect())
    }

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
        let mut client = self.client()?;
        let tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        // The version's date is the catalog's time too: cleanup spares an incomplete
        // version's objects from its start, which must not depend on a host's clock.
        let now: i64 = tx.query_one(CLOCK_SELECT, &[])?.get(0);
        let date = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(Utc::now);
        let uid: i64 = tx
            .query_one(
                "INSERT INTO versions(name, snapshot, date, size, block_size, status, storage_id, session_id, active_ms, host) \
                 VALUES ($1,$2,$3,$4,$5,'incomplete',$6,$7,$8,$9) RETURNING uid",
                &[
                    &name,
                    &snapshot,
                    &date_text(&date),
                    &(size as i64),
                    &(block_size as i64),
                    &storage_id,
                    &session,
                    &now,
                    &super::hostname(),
                ],
            )?
            .get(0);
        for (k, v) in labels {
            tx.execute("INSERT INTO labels(uid, name, value) VALUES ($1,$2,$3)", &[&uid, k, v])?;
        }
        tx.commit()?;
        Ok(VersionUid(uid as u64))
    }

    fn commit_version(&mut self, uid: VersionUid, session: i64, index: IndexBytes<'_>, stats: &Stats) -> Result<()> {
        let uid = uid.0 as i64;
        let mut client = self.client()?;
        let mut tx = client.transaction()?;
        // The index goes in first, streamed (binary COPY: the value's length, then its
        // bytes as they are read), before the write lock: other hosts' writers do not
        // wait for a large index to cross the network. Nothing is visible before the
        // commit below.
        const OWNED: &str =
            "SELECT EXISTS(SELECT 1 FROM versions v JOIN sessions s ON s.id = v.session_id WHERE v.uid=$1 AND s.id=$2)";
        let uploaded = tx
            .execute("DELETE FROM version_index WHERE uid=$1", &[&uid])
            .map_err(Error::from)
            .and_then(|_| copy_index_in(&mut tx, uid, index));
        if let Err(e) = uploaded {
            // Before the lock, the version may have been taken over or removed (its row
            // gone: a foreign key violation; its index committed by a `--continue`: a
            // duplicate; an `rm` waiting for this row: a deadlock the server broke).
            // Said as what it is when the version is no longer this session's.
            drop(tx);
            let owned = client.query_one(OWNED, &[&uid, &session]).map(|r| r.get::<_, bool>(0));
            return Err(if matches!(owned, Ok(false)) { super::session_ended(session) } else { e });
        }
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        // A backup taken for dead (its session ended by another host, or the version
        // taken over by a `--continue`) may have lost objects to a cleanup meanwhile: it
        // must not become valid.
        let owned: bool = tx.query_one(OWNED, &[&uid, &session])?.get(0);
        if !owned {
            return Err(super::session_ended(session));
        }
        tx.execute(
            "UPDATE versions SET status='valid', session_id=NULL, bytes_read=$2, bytes_written=$3, bytes_stored=$4, \
             bytes_deduplicated=$5, bytes_sparse=$6, duration_ms=$7 WHERE uid=$1",
            &[
                &uid,
                &(stats.bytes_read as i64),
                &(stats.bytes_written as i64),
                &(stats.bytes_stored as i64),
                &(stats.bytes_deduplicated as i64),
                &(stats.bytes_sparse as i64),
                &(stats.duration_ms as i64),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn insert_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        self.write_with_index(v.uid.0 as i64, index, |tx| insert_version(tx, v, storage_id))
    }

    fn replace_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        self.write_with_index(v.uid.0 as i64, index, |tx| {
            let row = VersionRow::new(v, storage_id);
            let uid = row.uid;
            let n = tx.execute(
                "UPDATE versions SET name=$2, snapshot=$3, date=$4, size=$5, block_size=$6, status=$7, protected=$8, \
                 storage_id=$9, expire=$10, bytes_read=$11, bytes_written=$12, bytes_stored=$13, bytes_deduplicated=$14, \
                 bytes_sparse=$15, duration_ms=$16 WHERE uid=$1",
                &row.params(),
            )?;
            if n == 0 {
                return Err(Error::VersionNotFound(v.uid.to_string()));
            }
            tx.execute("UPDATE versions SET host=$2 WHERE uid=$1", &[&uid, &v.host])?;
            tx.execute("DELETE FROM labels WHERE uid=$1", &[&uid])?;
            for (k, val) in &v.labels {
                tx.execute("INSERT INTO labels(uid, name, value) VALUES ($1,$2,$3)", &[&uid, k, val])?;
            }
            // Replaced in this transaction: readers see the old index or the new one.
            tx.execute("DELETE FROM version_index WHERE uid=$1", &[&uid])?;
            Ok(())
        })
    }

    fn set_status(&self, uid: VersionUid, status: Status) -> Result<()> {
        self.execute("UPDATE versions SET status=$2 WHERE uid=$1", &[&(uid.0 as i64), &status.as_str()])?;
        Ok(())
    }

    fn set_expire(&self, uid: VersionUid, expire: Option<&DateTime<Utc>>) -> Result<()> {
        let n =
            self.execute("UPDATE versions SET expire=$2 WHERE uid=$1", &[&(uid.0 as i64), &expire.map(date_text)])?;
        if n == 0 {
            return Err(Error::VersionNotFound(uid.to_string()));
        }
        Ok(())
    }

    fn set_protected(&self, uid: VersionUid, protected: bool) -> Result<()> {
        let n = self.execute("UPDATE versions SET protected=$2 WHERE uid=$1", &[&(uid.0 as i64), &protected])?;
        if n == 0 {
            return Err(Error::VersionNotFound(uid.to_string()));
        }
        Ok(())
    }

    fn set_size(&mut self, uid: VersionUid, size: u64) -> Result<()> {
        self.execute("UPDATE versions SET size=$2 WHERE uid=$1", &[&(uid.0 as i64), &(size as i64)])?;
        Ok(())
    }

    fn change_labels(&mut self, uid: VersionUid, set: &[(String, String)], remove: &[String]) -> Result<()> {
        let uid_i = uid.0 as i64;
        self.write(|tx| {
            if tx.query_opt("SELECT 1 FROM versions WHERE uid=$1", &[&uid_i])?.is_none() {
                return Err(Error::VersionNotFound(uid.to_string()));
            }
            for (k, v) in set {
                tx.execute(
                    "INSERT INTO labels(uid, name, value) VALUES ($1,$2,$3) ON CONFLICT (uid, name) DO UPDATE SET value = $3",
                    &[&uid_i, k, v],
                )?;
            }
            for k in remove {
                tx.execute("DELETE FROM labels WHERE uid=$1 AND name=$2", &[&uid_i, k])?;
            }
            Ok(())
        })
    }

    fn set_snapshot_and_labels(
        &mut self,
        uid: VersionUid,
        snapshot: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let uid = uid.0 as i64;
        self.write(|tx| {
            tx.execute("UPDATE versions SET snapshot=$2 WHERE uid=$1", &[&uid, &snapshot])?;
            tx.execute("DELETE FROM labels WHERE uid=$1", &[&uid])?;
            for (k, v) in labels {
                tx.execute("INSERT INTO labels(uid, name, value) VALUES ($1,$2,$3)", &[&uid, k, v])?;
            }
            Ok(())
        })
    }

    fn rename_version(&mut self, uid: VersionUid, name: &str) -> Result<()> {
        self.execute("UPDATE versions SET name=$2 WHERE uid=$1", &[&(uid.0 as i64), &name])?;
        Ok(())
    }

    fn take_incomplete(&mut self, uid: VersionUid, session: i64, live: &[i64]) -> Result<bool> {
        let uid = uid.0 as i64;
        self.write(|tx| {
            let owner: Option<i64> = tx
                .query_opt("SELECT session_id FROM versions WHERE uid=$1 FOR UPDATE", &[&uid])?
                .and_then(|r| r.get(0));
            if owner.is_some_and(|o| o != session && live.contains(&o)) {
                return Ok(false);
            }
            tx.execute(
                &format!("UPDATE versions SET session_id=$2, active_ms={CLOCK_MS} WHERE uid=$1"),
                &[&uid, &session],
            )?;
            Ok(true)
        })
    }

    fn list_versions(&self) -> Result<Vec<Version>> {
        self.versions_where("", &[])
    }

    fn version(&self, uid: VersionUid) -> Result<Version> {
        self.versions_where("WHERE v.uid = $1", &[&(uid.0 as i64)])?
            .pop()
            .ok_or_else(|| Error::VersionNotFound(uid.to_string()))
    }

    fn version_session(&self, uid: VersionUid) -> Result<Option<i64>> {
        Ok(self
            .query("SELECT session_id FROM versions WHERE uid=$1", &[&(uid.0 as i64)])?
            .first()
            .and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    fn incomplete_versions(&self, storage_id: i64) -> Result<Vec<IncompleteVersion>> {
        let rows = self.query(
            "SELECT uid, date, active_ms, session_id FROM versions WHERE storage_id=$1 AND status='incomplete' ORDER BY uid",
            &[&storage_id],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                let date: String = r.get(1);
                let started_ms = parse_date(&date).map(|d| d.timestamp_millis()).unwrap_or(0);
                IncompleteVersion {
                    uid: VersionUid(r.get::<_, i64>(0) as u64),
                    started_ms,
                    active_ms: r.get::<_, Option<i64>>(2).unwrap_or(started_ms),
                    session: r.get(3),
                }
            })
            .collect())
    }

    fn load_index(&self, uid: VersionUid) -> Result<Option<Vec<u8>>> {
        Ok(self.query("SELECT data FROM version_index WHERE uid=$1", &[&(uid.0 as i64)])?.first().map(|r| r.get(0)))
    }

    fn index_len(&self, uid: VersionUid) -> Result<Option<u64>> {
        // octet_length of a stored value reads its size, not the value.
        let rows = self.query("SELECT octet_length(data) FROM version_index WHERE uid=$1", &[&(uid.0 as i64)])?;
        Ok(rows.first().map(|r| r.get::<_, i32>(0) as u64))
    }

    fn index_piece(&self, uid: VersionUid, offset: u64, len: usize, into: &mut Vec<u8>) -> Result<bool> {
        into.clear();
        // A stored index is as long as MAX_INDEX_LEN at most, well within an int4. An
        // index does not compress (its ids are hashes), so it is stored out of line
        // uncompressed and substring() reads only the pieces it needs.
        let (from, count) = (offset.saturating_add(1).min(i32::MAX as u64) as i32, len.min(i32::MAX as usize) as i32);
        let rows = self.query(
            "SELECT substring(data FROM $2 FOR $3) FROM version_index WHERE uid=$1",
            &[&(uid.0 as i64), &from, &count],
        )?;
        match rows.first() {
            Some(r) => {
                into.extend_from_slice(r.get::<_, &[u8]>(0));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn remove_version(&mut self, uid: VersionUid) -> Result<()> {
        let uid = uid.0 as i64;
        let mut client = self.client()?;
        let tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        tx.execute("DELETE FROM version_locks WHERE uid=$1", &[&uid])?;
        tx.execute("DELETE FROM versions WHERE uid=$1", &[&uid])?;
        tx.commit()?;
        Ok(())
    }

    fn lookup_for_write(&mut self, storage_id: i64, ids: &[BlockId], dead_deleters: &[i64]) -> Result<Lookup> {
        let param = ids_param(ids);
        self.write(|tx| {
            let mut out = Lookup::default();
            let (mut touch, mut revive) = (Vec::new(), Vec::new());
            let mut seen = HashSet::new();
            // The storage's row joined in: its encryption mark comes with the objects, in
            // the same round trip (one row of NULLs when none of the ids has a row).
            for r in tx.query(
                "SELECT s.encrypted, o.id, o.state, o.valid, o.deleter FROM storages s \
                 LEFT JOIN objects o ON o.storage_id = s.id AND o.id = ANY($2) WHERE s.id = $1",
                &[&storage_id, &param],
            )? {
                out.storage_encrypted = r.get::<_, bool>(0);
                let Some(id) = r.get::<_, Option<&[u8]>>(1).and_then(BlockId::from_slice) else {
                    continue;
                };
                seen.insert(id);
                let (state, valid, deleter) = (r.get::<_, i64>(2), r.get::<_, bool>(3), r.get::<_, Option<i64>>(4));
                match (state, deleter) {
                    (OBJECT_PRESENT, _) => {
                        touch.push(id);
                        // A present object a scrub found damaged counts as absent: the
                        // backup stores it again, which replaces the file and marks it valid.
                        if valid {
                            out.present.insert(id);
                        }
                    }
                    (OBJECT_DELETING, Some(d)) if !dead_deleters.contains(&d) => out.blocked.push((id, d)),
                    _ => revive.push(id),
                }
            }
            let new: Vec<&[u8]> = ids.iter().filter(|id| !seen.contains(id)).map(|id| &id.0[..]).collect();
            if !touch.is_empty() {
                tx.execute(
                    &format!("UPDATE objects SET touched_ms={CLOCK_MS} WHERE storage_id=$1 AND id = ANY($2)"),
                    &[&storage_id, &ids_param(&touch)],
                )?;
            }
            if !revive.is_empty() {
                tx.execute(
                    &format!(
                        "UPDATE objects SET state=$3, deleter=NULL, touched_ms={CLOCK_MS} WHERE storage_id=$1 AND id = ANY($2)"
                    ),
                    &[&storage_id, &ids_param(&revive), &OBJECT_WRITING],
                )?;
            }
            if !new.is_empty() {
                tx.execute(
                    &format!(
                        "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms) \
                         SELECT DISTINCT $1::int8, u.id, 0::int8, 0::int8, $3::int8, TRUE, {CLOCK_MS} FROM UNNEST($2::bytea[]) AS u(id) \
                         ON CONFLICT(storage_id, id) DO NOTHING"
                    ),
                    &[&storage_id, &new, &OBJECT_WRITING],
                )?;
            }
            Ok(out)
        })
    }

    fn insert_objects(
        &mut self,
        storage_id: i64,
        objects: &[(BlockId, u64, u64)],
        key: Option<KeyId>,
    ) -> Result<Vec<BlockId>> {
        self.write(|tx| record_objects(tx, storage_id, objects, key))
    }

    fn insert_found_objects(&mut self, storage_id: i64, objects: &[(BlockId, u64)]) -> Result<()> {
        let mut at: HashMap<&[u8], usize> = HashMap::with_capacity(objects.len());
        let (mut ids, mut sizes) = (Vec::new(), Vec::new());
        for (id, stored) in objects {
            match at.get(&id.0[..]) {
                Some(&k) => sizes[k] = *stored as i64,
                None => {
                    at.insert(&id.0[..], ids.len());
                    ids.push(&id.0[..]);
                    sizes.push(*stored as i64);
                }
            }
        }
        self.write(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms) \
                     SELECT $1, u.id, u.stored, 0, 0, TRUE, {CLOCK_MS} \
                     FROM UNNEST($2::bytea[], $3::int8[]) AS u(id, stored) \
                     ON CONFLICT(storage_id, id) DO UPDATE SET state=0, touched_ms=EXCLUDED.touched_ms WHERE objects.state <> 1"
                ),
                &[&storage_id, &ids, &sizes],
            )?;
            Ok(())
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
        let param = ids_param(ids);
        let orphan_blocks: Vec<BlockId> = orphans.iter().map(|o| o.0).collect();
        let orphan_ids = ids_param(&orphan_blocks);
        let orphan_sizes: Vec<i64> = orphans.iter().map(|o| o.1 as i64).collect();
        self.write(|tx| {
            // The cleaner is alive (its heartbeat refreshed) or it may not mark anything.
            if tx.execute(&format!("UPDATE sessions SET heartbeat_ms={CLOCK_MS} WHERE id=$1"), &[&cleaner])? == 0 {
                return Err(super::session_ended(cleaner));
            }
            let mut held = Vec::new();
            // A row another cleanup marked is taken over only once that cleanup's session
            // is gone (only one cleanup holds the lease; this keeps it so if ever not).
            let rows = tx.query(
                "UPDATE objects SET state=$1, deleter=$4 WHERE storage_id=$2 AND id = ANY($3) \
                 AND (CASE WHEN state=$1 THEN deleter IS NULL OR deleter=$4 \
                      OR NOT EXISTS (SELECT 1 FROM sessions WHERE id=objects.deleter) \
                      ELSE touched_ms < $5 END) RETURNING id, stored_size",
                &[&OBJECT_DELETING, &storage_id, &param, &cleaner, &cutoff_ms],
            )?;
            held.extend(rows.iter().filter_map(|r| Some((id_of(r, 0)?, r.get::<_, i64>(1) as u64))));
            if !orphans.is_empty() {
                let rows = tx.query(
                    "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms, deleter) \
                     SELECT $1, u.id, u.size, 0, $4, TRUE, 0, $5 FROM UNNEST($2::bytea[], $3::int8[]) AS u(id, size) \
                     ON CONFLICT(storage_id, id) DO NOTHING RETURNING id, stored_size",
                    &[&storage_id, &orphan_ids, &orphan_sizes, &OBJECT_DELETING, &cleaner],
                )?;
                held.extend(rows.iter().filter_map(|r| Some((id_of(r, 0)?, r.get::<_, i64>(1) as u64))));
            }
            Ok(held)
        })
    }

    fn forget_deleted(&mut self, storage_id: i64, ids: &[BlockId], cleaner: i64) -> Result<u64> {
        let param = ids_param(ids);
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM objects WHERE storage_id=$1 AND id = ANY($2) AND state=$3 AND deleter=$4",
                &[&storage_id, &param, &OBJECT_DELETING, &cleaner],
            )?)
        })
    }

    fn invalid_objects(&self, storage_id: i64) -> Result<HashSet<BlockId>> {
        Ok(self
            .query("SELECT id FROM objects WHERE storage_id=$1 AND valid=FALSE", &[&storage_id])?
            .iter()
            .filter_map(|r| id_of(r, 0))
            .collect())
    }

    fn set_objects_valid(&self, storage_id: i64, ids: &[BlockId], valid: bool) -> Result<()> {
        let param = ids_param(ids);
        self.execute(
            "UPDATE objects SET valid=$3 WHERE storage_id=$1 AND id = ANY($2)",
            &[&storage_id, &param, &valid],
        )?;
        Ok(())
    }

    fn for_each_object(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRow)) -> Result<()> {
        let client = self.client()?;
        client.for_each_row(
            "SELECT id, stored_size, state, touched_ms FROM objects WHERE storage_id=$1",
            &[&storage_id],
            &mut |r| {
                if let Some(id) = id_of(&r, 0) {
                    f(ObjectRow { id, stored_size: r.get::<_, i64>(1) as u64, state: r.get(2), touched_ms: r.get(3) });
                }
                Ok(())
            },
        )
    }

    fn object_totals(&self, storage_id: i64) -> Result<(u64, u64)> {
        let r = first(self.query(
            "SELECT COUNT(*), COALESCE(SUM(stored_size),0)::BIGINT FROM objects WHERE storage_id=$1 AND state=0",
            &[&storage_id],
        )?)?;
        Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
    }

    fn objects_per_key(&self, storage_id: i64) -> Result<Vec<(Option<KeyId>, u64)>> {
        Ok(self
            .query(
                "SELECT key_id, COUNT(*) FROM objects WHERE storage_id=$1 AND state=0 GROUP BY key_id",
                &[&storage_id],
            )?
            .iter()
            .map(|r| (r.get::<_, Option<i64>>(0).map(KeyId::from_i64), r.get::<_, i64>(1) as u64))
            .collect())
    }

    fn objects_not_under(
        &self,
        storage_id: i64,
        key: KeyId,
        after: Option<&BlockId>,
        limit: usize,
    ) -> Result<Vec<BlockId>> {
        let after: &[u8] = after.map(|a| &a.0[..]).unwrap_or(&[]);
        self.query(
            "SELECT id FROM objects WHERE storage_id=$1 AND state=0 AND (key_id IS NULL OR key_id != $2) AND id > $3 \
                 ORDER BY id LIMIT $4",
            &[&storage_id, &key.as_i64(), &after, &(limit as i64)],
        )?
        .iter()
        // An id that is not one would stop the caller's paging short: said, not skipped.
        .map(|r| id_of(r, 0).ok_or_else(|| super::bad_object_id(r.get::<_, &[u8]>(0).len())))
        .collect::<Result<Vec<_>>>()
    }

    fn count_objects_not_under(&self, storage_id: i64, key: KeyId) -> Result<u64> {
        let n: i64 = self
            .query(
                "SELECT COUNT(*) FROM objects WHERE storage_id=$1 AND state=0 AND (key_id IS NULL OR key_id != $2)",
                &[&storage_id, &key.as_i64()],
            )?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        Ok(n as u64)
    }

    fn set_object_keys(&self, storage_id: i64, ids: &[BlockId], key: KeyId) -> Result<()> {
        let param = ids_param(ids);
        self.execute(
            "UPDATE objects SET key_id=$3 WHERE storage_id=$1 AND id = ANY($2)",
            &[&storage_id, &param, &key.as_i64()],
        )?;
        Ok(())
    }

    fn storage_records(&self) -> Result<Vec<StorageRecord>> {
        Ok(self
            .query("SELECT id, name, encrypted FROM storages ORDER BY id", &[])?
            .iter()
            .map(|r| StorageRecord { id: r.get(0), name: r.get(1), encrypted: r.get(2) })
            .collect())
    }

    fn for_each_object_record(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRecord) -> Result<()>) -> Result<()> {
        let client = self.client()?;
        client.for_each_row(
            "SELECT id, stored_size, plain_size, state, valid, touched_ms, key_id FROM objects WHERE storage_id=$1 ORDER BY id",
            &[&storage_id],
            &mut |r| {
                let Some(id) = id_of(&r, 0) else { return Ok(()) };
                f(ObjectRecord {
                    id,
                    stored_size: r.get::<_, i64>(1) as u64,
                    plain_size: r.get::<_, i64>(2) as u64,
                    state: r.get(3),
                    valid: r.get(4),
                    touched_ms: r.get(5),
                    key: r.get::<_, Option<i64>>(6).map(KeyId::from_i64),
                })
            },
        )
    }

    fn is_empty(&self) -> Result<bool> {
        let r = first(self.query(
            "SELECT (SELECT COUNT(*) FROM storages) + (SELECT COUNT(*) FROM versions) + (SELECT COUNT(*) FROM objects)",
            &[],
        )?)?;
        Ok(r.get::<_, i64>(0) == 0)
    }

    fn import_storages(&mut self, storages: &[StorageRecord]) -> Result<()> {
        self.write(|tx| {
            for s in storages {
                tx.execute(
                    "INSERT INTO storages(id, name, encrypted) VALUES ($1,$2,$3)",
                    &[&s.id, &s.name, &s.encrypted],
                )?;
            }
            tx.execute(
                "SELECT setval(pg_get_serial_sequence('storages', 'id'), GREATEST((SELECT MAX(id) FROM storages), 1))",
                &[],
            )?;
            Ok(())
        })
    }

    fn import_objects(&mut self, storage_id: i64, objects: &[ObjectRecord]) -> Result<()> {
        // One statement per batch (arrays), not a round trip per object.
        let ids: Vec<&[u8]> = objects.iter().map(|o| &o.id.0[..]).collect();
        let stored: Vec<i64> = objects.iter().map(|o| o.stored_size as i64).collect();
        let plain: Vec<i64> = objects.iter().map(|o| o.plain_size as i64).collect();
        let state: Vec<i64> = objects.iter().map(|o| o.state).collect();
        let valid: Vec<bool> = objects.iter().map(|o| o.valid).collect();
        let touched: Vec<i64> = objects.iter().map(|o| o.touched_ms).collect();
        let key: Vec<Option<i64>> = objects.iter().map(|o| o.key.map(|k| k.as_i64())).collect();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO objects(storage_id, id, stored_size, plain_size, state, valid, touched_ms, key_id) \
                 SELECT $1, u.* FROM UNNEST($2::bytea[], $3::int8[], $4::int8[], $5::int8[], $6::bool[], $7::int8[], $8::int8[]) \
                 AS u(id, stored, plain, state, valid, touched, key)",
                &[&storage_id, &ids, &stored, &plain, &state, &valid, &touched, &key],
            )?;
            Ok(())
        })
    }

    fn import_version(&mut self, v: &Version, index: Option<IndexBytes<'_>>) -> Result<()> {
        let storage_id = self.storage_id(&v.storage)?;
        match index {
            Some(index) => self.write_with_index(v.uid.0 as i64, index, |tx| insert_version(tx, v, storage_id)),
            None => self.write(|tx| insert_version(tx, v, storage_id)),
        }
    }

    /// PostgreSQL's autovacuum makes the space of deleted rows reusable by itself; giving
    /// it back to the filesystem (VACUUM FULL) would lock the tables every host uses.
    fn reclaim_space(&mut self) -> Result<u64> {
        Ok(0)
    }

    fn now_ms(&self) -> Result<i64> {
        self.clock_ms()
    }
}

#[cfg(test)]
mod url_tests {
    use super::{check_userinfo, redact};

    #[test]
    fn no_form_of_url_shows_its_password() {
        for (url, shown) in [
            ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
            ("postgresql://u:secret@h:5x/db", "postgresql://u:***@h:5x/db"),
            ("postgresql://u:p@ss/w#rd@h/db", "postgresql://u:***@h/db"),
            ("postgresql://u:p?ss@h/db", "postgresql://u:***@h/db"),
            ("postgresql://h/db?user=u&password=secret", "postgresql://h/db?user=u&password=***"),
            ("postgresql://h:5432/db?password=sec@ret", "postgresql://h:5432/db?password=***"),
            // An '@' in the query: the host is masked too, never any of the password.
            ("postgresql://u:secret@h/db?sslrootcert=/home/a@corp/ca.pem", "postgresql://u:***@corp/ca.pem"),
            (
                "postgresql://u@h/db?sslrootcert=/home/a@corp/ca.pem",
                "postgresql://u@h/db?sslrootcert=/home/a@corp/ca.pem",
            ),
            ("postgresql://h/db?user=me@srv", "postgresql://h/db?user=me@srv"),
            ("postgresql://u@[::1]:5432/db", "postgresql://u@[::1]:5432/db"),
            ("postgresql://keepfs:Pa/ss?Word@h:1/x", "postgresql://keepfs:***@h:1/x"),
            ("postgresql://keepfs:a/b?c@d@h:1/db", "postgresql://keepfs:***@h:1/db"),
            ("postgresql://keepfs:Passw0rd", "postgresql://keepfs:***"),
            ("postgresql://keepfs:P/ss@w0rd?@h:1/db", "postgresql://keepfs:***@h:1/db"),
            ("postgresql://u@h/db?pass%77ord=Qwerty12", "postgresql://u@h/db?pass%77ord=***"),
            ("postgresql://h:5432/db?user=me@srv", "postgresql://h:5432/db?user=me@srv"),
            ("postgresql://h:5432", "postgresql://h:5432"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn only_a_password_a_url_misreads_is_refused() {
        for ok in [
            "postgresql://u:secret@h/db",
            "postgresql://u:p%40ss%2Fw%23rd@h/db",
            "postgresql://u:pw@h/db?sslrootcert=/home/a@corp/ca.pem",
            "postgresql://h/db?user=me@srv",
            "postgresql://h:5432/db?user=me@srv&options=-c%20lock_timeout%3D2000",
            "postgresql://u@[::1]:5432/db?host=/var/run/postgresql",
        ] {
            assert!(check_userinfo(ok, "x").is_ok(), "{ok}");
        }
        for bad in [
            "postgresql://u:p@ss/w#rd@h/db",
            "postgresql://u:p?ss@h/db",
            "postgresql://u:a/b@h/db",
            "postgresql://keepfs:Pa/ss?Word@h:1/x",
            "postgresql://keepfs:a/b?c@d@h:1/db",
        ] {
            assert!(check_userinfo(bad, "x").is_err(), "{bad}");
        }
    }
}
