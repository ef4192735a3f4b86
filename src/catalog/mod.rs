//! The catalog: everything the engine records about a repository besides the objects
//! in its storages — versions, labels, block indexes (opaque bytes), the objects each
//! storage holds and their states, the sessions and version locks that let several
//! keepfs processes share a repository, and the repository's own state. This module
//! tree owns every SQL statement of keepfs; the engine talks to it only through the
//! [`Catalog`] trait. Two implementations: [`sqlite`] (the embedded default, one file)
//! and [`postgres`] (a PostgreSQL database, selected by a `postgresql://` URL as the
//! configuration's `database`). Schema changes are numbered migrations, the same
//! numbering for both, each applied in a transaction.

pub mod copy;
pub mod postgres;
pub mod sqlite;

use crate::block::BlockId;
use crate::error::{Error, Result};
use crate::transform::aes::KeyId;
use crate::version::{Stats, Status, Version, VersionUid};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

pub use sqlite::{SqliteCatalog, check_file, set_aside_if_damaged};

/// The catalog as the engine shares it between threads.
pub type SharedCatalog = Arc<parking_lot::Mutex<Box<dyn Catalog>>>;

/// Object states (docs/format.md, "Cleanup"): `present` (stored and durable), `deleting`
/// (marked by the cleanup session named in the row's `deleter`, whose file may be gone
/// at any moment), `writing` (a backup is about to store it: the row exists before the
/// file, so a cleanup never takes a file being written for an orphan).
pub const OBJECT_PRESENT: i64 = 0;
pub const OBJECT_DELETING: i64 = 1;
pub const OBJECT_WRITING: i64 = 2;

/// What a backup may do with each id of a batch it looked up ([`Catalog::lookup_for_write`]).
#[derive(Debug, Default)]
pub struct Lookup {
    /// Stored, valid and now touched: reference them. Every other id not `blocked` is
    /// now a row in state `writing` (or a damaged `present` one): the caller stores it.
    pub present: HashSet<BlockId>,
    /// Whether the catalog marks the storage encrypted, read in the same transaction: a
    /// writer that opened it without a keyring must store nothing (`keepfs init
    /// --encrypt` ran meanwhile; see [`Catalog::mark_encrypted_if_unused`]).
    pub storage_encrypted: bool,
    /// Being deleted by a cleanup that is alive (the deleter's session id): wait until
    /// it is done with them, then look them up again.
    pub blocked: Vec<(BlockId, i64)>,
}

/// Sessions on other hosts count as alive while their heartbeat is younger than this.
pub(crate) const REMOTE_SESSION_TTL_MS: i64 = 10 * 60 * 1000;

/// How often a session beats (the heartbeat thread of `repo.rs`).
pub(crate) const HEARTBEAT_EVERY_MS: i64 = 60 * 1000;

/// The schema version this keepfs writes: the number of migrations, the same for both
/// engines (each numbers its steps alike: step N, `MIGRATIONS[N - 1]`, brings a catalog
/// from version N - 1 to N).
pub const SCHEMA_VERSION: usize = 6;
const _: () = assert!(sqlite::MIGRATIONS.len() == SCHEMA_VERSION && postgres::MIGRATIONS.len() == SCHEMA_VERSION);

/// The error of a migration step the database refused (`index` into `MIGRATIONS`): the
/// upgrade's transaction is rolled back, so the catalog stays at `from`, as the keepfs
/// that made it left it (or, from 0, empty).
pub(crate) fn migration_failed(
    what: &str,
    from: usize,
    index: usize,
    e: impl std::fmt::Display,
) -> crate::error::Error {
    let e = e.to_string().replace('\n', " ");
    let step = index + 1;
    crate::error::Error::Catalog(if from == 0 {
        format!("cannot make the tables of {what}: step {step} failed: {e}; nothing was made")
    } else {
        format!(
            "cannot upgrade {what} from schema version {from} to {SCHEMA_VERSION}: step {step} failed: {e}; nothing of the upgrade was applied (it is still at version {from}, which the keepfs that made it can use)"
        )
    })
}

/// A catalog row whose object id is not 32 bytes: damage to the catalog.
pub(crate) fn bad_object_id(len: usize) -> crate::error::Error {
    crate::error::Error::Damaged(format!(
        "the catalog holds an object id of {len} bytes (ids are 32): run `keepfs database rebuild` on a copy"
    ))
}

/// The error of putting in a version whose uid the catalog holds already (another
/// process put it in meanwhile: two imports of one document, say).
pub(crate) fn version_exists(uid: crate::version::VersionUid) -> crate::error::Error {
    crate::error::Error::Refused(format!(
        "version {uid} is in the catalog already (put in by another process meanwhile); nothing of it was recorded again"
    ))
}

/// The error of a process whose session is no longer registered: another process (on
/// another host) took it for dead, so a cleanup may have deleted what it was relying on.
pub(crate) fn session_ended(session: i64) -> crate::error::Error {
    crate::error::Error::Other(format!(
        "this process's session {session} was ended by another keepfs process that took it for dead (no heartbeat for {} s); what it was doing must be done again (a backup: `keepfs backup --continue UID`)",
        REMOTE_SESSION_TTL_MS / 1000
    ))
}

/// `repository_state` row present while a `database rebuild` has not finished cleanly
/// (interrupted, or damaged version objects skipped): another rebuild may then add to
/// the versions this catalog holds.
pub(crate) const REBUILD_UNFINISHED: &str = "rebuild_unfinished";

/// `repository_state` row of a catalog that `database migrate` copied elsewhere: where
/// to, and when. Such a catalog is no longer kept up to date, and is refused (a host
/// left on it would back up and clean up beside the new one).
pub(crate) const MOVED_TO: &str = "moved_to";

/// `repository_state` row of a catalog `database migrate` is copying: the migrating
/// session's id. While that session lives no other session may start (a backup begun
/// during the copy would write into the catalog being left), and the migration began
/// only once no other session lived. A row left by a migration that died is ignored.
pub(crate) const MOVING: &str = "moving";

/// The purpose of `database migrate`'s own session: the one session a moved or moving
/// catalog still registers.
pub const MIGRATE_PURPOSE: &str = "database migrate";

/// Whether a session for `purpose` may start, given the catalog's `moved_to` row and the
/// session named by its `moving` row (if it lives): refused on a catalog moved elsewhere
/// or being moved, but for `database migrate` itself.
pub(crate) fn may_register(purpose: &str, moved: Option<String>, migrating: Option<Session>) -> Result<()> {
    if purpose == MIGRATE_PURPOSE {
        return Ok(());
    }
    if let Some(m) = migrating {
        return Err(Error::Refused(format!(
            "`database migrate` (pid {} on {}) is moving this catalog to another one; once it is done, use the new one (set `database` or KEEPFS_DATABASE, docs/scale-out.md)",
            m.process.pid, m.process.host
        )));
    }
    if let Some(to) = moved {
        return Err(Error::Refused(format!(
            "this catalog was migrated to {to} and is no longer kept up to date: set `database` in the configuration (or KEEPFS_DATABASE) to the new one (docs/scale-out.md)"
        )));
    }
    Ok(())
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(crate) fn date_text(d: &DateTime<Utc>) -> String {
    d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(crate) fn parse_date(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|d| d.with_timezone(&Utc))
}

/// Where the catalog lives, as the configuration names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (`postgresql://user@host:port/db`), with a file holding its
    /// password when one is configured.
    Postgres { url: String, password_file: Option<std::path::PathBuf> },
}

impl Location {
    /// What to call it in messages: the path, or the URL without its password.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres { url, .. } => postgres::redact(url),
        }
    }

    /// Whether a configured `database` value names a PostgreSQL database.
    pub fn is_postgres_url(s: &str) -> bool {
        let lower = s.to_ascii_lowercase();
        lower.starts_with("postgresql://") || lower.starts_with("postgres://")
    }

    /// What a `database` setting (or `KEEPFS_DATABASE`, `--to`) names: a PostgreSQL URL
    /// (its scheme in lower case, as the client wants it) or an SQLite path. Refused, in
    /// words that never show a password: another scheme, and what looks like a
    /// PostgreSQL URL but is not one (`postgresql:/…`), which would otherwise become an
    /// SQLite file named after the URL, password and all.
    pub fn parse_setting(what: &str, s: &str) -> std::result::Result<Location, String> {
        // Without `://` the user and password cannot be told apart: only what follows
        // the last '@' is shown.
        let shown = match (s.contains("://"), s.rfind('@')) {
            (true, _) => postgres::redact(s),
            (false, Some(at)) => format!("…{}", &s[at..]),
            (false, None) => s.to_string(),
        };
        if Self::is_postgres_url(s) {
            let (scheme, rest) = s.split_once("://").unwrap_or((s, ""));
            return Ok(Location::Postgres {
                url: format!("{}://{rest}", scheme.to_ascii_lowercase()),
                password_file: None,
            });
        }
        if s.contains("://") {
            return Err(format!("{what} '{shown}': use a path (SQLite) or a postgresql://user@host:port/name URL"));
        }
        if s.to_ascii_lowercase().starts_with("postgres") && (s.contains(':') || s.contains('@')) {
            return Err(format!(
                "{what} '{shown}' looks like a PostgreSQL URL but is not one: write postgresql://USER@HOST:PORT/DATABASE"
            ));
        }
        Ok(Location::Sqlite(std::path::PathBuf::from(s)))
    }
}

/// Opens (creating when missing, migrating when older) the catalog at `location`.
pub fn open(location: &Location, modes: crate::perms::Modes) -> Result<Box<dyn Catalog>> {
    Ok(match location {
        Location::Sqlite(path) => Box::new(SqliteCatalog::open_with_modes(path, modes)?),
        Location::Postgres { url, password_file } => {
            Box::new(postgres::PostgresCatalog::open(url, password_file.as_deref())?)
        }
    })
}

/// `repository_state` row naming the repository a shared catalog belongs to: the
/// location of its default storage when the catalog was made.
pub(crate) const REPOSITORY: &str = "repository";

/// Where a configured storage is, as a catalog records its owner.
pub fn storage_identity(s: &crate::config::StorageConfig) -> String {
    use crate::config::StorageKind;
    match &s.kind {
        StorageKind::File { path } => format!("file:{}", normal_path(path).display()),
        StorageKind::Null => format!("null:{}", s.name),
        StorageKind::S3(c) => format!("s3:{}/{}/{}", c.endpoint.trim_end_matches('/'), c.bucket, c.prefix),
    }
}

/// A path as written, without `.` components, repeated or trailing slashes (`/a/./b/`
/// is `/a/b`). Nothing is resolved: `..` and symlinks stay, so one directory reached
/// by another spelling through them still counts as another place.
fn normal_path(p: &std::path::Path) -> std::path::PathBuf {
    p.components().collect()
}

/// A place as recorded by an older keepfs (its file paths not normalised), as now.
fn normal_place(recorded: &str) -> String {
    match recorded.strip_prefix("file:") {
        Some(p) => format!("file:{}", normal_path(std::path::Path::new(p)).display()),
        None => recorded.to_string(),
    }
}

/// `repository_state` rows `storage_at:<place>` name the storage a place holds, as the
/// first host to use it named it.
const STORAGE_AT: &str = "storage_at:";

/// Refuses a configured storage at a place the catalog knows under another storage
/// name (a second name for one shared directory, say): each name's cleanup would take
/// the other's blocks for orphans and delete them. Records the places not yet known,
/// first writer first (two hosts recording one place at once cannot both win).
///
/// A place not recorded yet (new, or of a catalog an older keepfs made) under a name
/// the catalog has never used, while it already holds blocks, is refused too: most
/// likely it is one of the catalog's storages under a second name, and recording it
/// would lock out the hosts that name it right.
pub fn check_storage_places(db: &dyn Catalog, config: &crate::config::Config) -> Result<()> {
    let mut known: Option<Vec<String>> = None;
    for s in config.storages.iter().filter(|s| !matches!(s.kind, crate::config::StorageKind::Null)) {
        let place = storage_identity(s);
        let row = format!("{STORAGE_AT}{place}");
        let holder = match db.repository_state(&row)? {
            Some(name) => name,
            None => {
                // This name's blocks are recorded elsewhere: a backup here would take them
                // for stored (it deduplicates against the catalog) and store nothing.
                let elsewhere: Vec<String> = db
                    .repository_states(STORAGE_AT)?
                    .into_iter()
                    .filter(|(_, name)| name == &s.name)
                    .map(|(p, _)| p.trim_start_matches(STORAGE_AT).to_string())
                    .collect();
                if !elsewhere.is_empty() {
                    let (objects, _) = db.object_totals(db.storage_id(&s.name)?)?;
                    let was = elsewhere.join(", ");
                    if objects > 0 && matches!(s.kind, crate::config::StorageKind::File { .. }) && !holds_blocks(s) {
                        return Err(crate::Error::Refused(format!(
                            "storage '{}' is at {place}, which holds no blocks, but this catalog's storage '{}' keeps {objects} object(s) at {was}: a backup here would reference blocks that are not here; if the path is mistyped or the share not mounted, fix that",
                            s.name, s.name
                        )));
                    }
                    if objects > 0 && !matches!(s.kind, crate::config::StorageKind::File { .. }) {
                        keepfs_face::log!(
                            "keepfs: warning: storage '{}' is at {place}; this catalog knew it at {was}. If that is not the same place (the same bucket and prefix), stop: backups here would reference the {objects} object(s) stored there",
                            s.name
                        );
                    }
                }
                let known = match &mut known {
                    Some(k) => k,
                    None => known.insert(db.storage_names()?.into_iter().map(|(_, n)| n).collect()),
                };
                if !known.is_empty() && !known.contains(&s.name) && holds_blocks(s) {
                    return Err(crate::Error::Refused(format!(
                        "storage '{}' is at {place}, which holds blocks already, but this catalog has no storage of that name (it has {}): if that is one of them, use its name here; if the blocks are left from another repository, give this storage a place of its own",
                        s.name,
                        known.join(", ")
                    )));
                }
                // A catalog that cannot be written (a read-only copy) is still read.
                db.keep_repository_state(&row, &s.name).unwrap_or_else(|_| s.name.clone())
            }
        };
        if holder != s.name {
            return Err(crate::Error::Refused(format!(
                "storage '{}' is at {place}, which this catalog knows as storage '{holder}': one place holds one storage (a cleanup of either would delete the other's blocks); name it '{holder}' in this configuration",
                s.name
            )));
        }
    }
    Ok(())
}

/// Whether a file storage's place holds blocks (other kinds are not looked at: that
/// would cost a request on every command).
fn holds_blocks(s: &crate::config::StorageConfig) -> bool {
    match &s.kind {
        crate::config::StorageKind::File { path } => {
            std::fs::read_dir(path.join("blocks")).is_ok_and(|mut d| d.next().is_some())
        }
        _ => false,
    }
}

/// Copies the places `from` records for the configured storages into `to` (a catalog
/// migration: the new catalog keeps knowing which name each place has).
pub(crate) fn copy_storage_places(from: &dyn Catalog, to: &dyn Catalog, config: &crate::config::Config) -> Result<()> {
    for s in &config.storages {
        let row = format!("{STORAGE_AT}{}", storage_identity(s));
        if let Some(name) = from.repository_state(&row)? {
            to.keep_repository_state(&row, &name)?;
        }
    }
    Ok(())
}

/// Refuses a shared catalog that belongs to another repository (none of the configured
/// storages is the one it was made for); a new catalog is claimed for this one.
///
/// A repository whose storage is configured at another place than the one recorded (it
/// moved, or this host mounts the share elsewhere) is not another one: `ours` tells a
/// configured storage whose `owner` object names this catalog (asked only when the
/// recorded place is not configured: it costs a read of the storage). The recorded
/// place is replaced by that storage's, with a note, only when `ours_at` finds that the
/// recorded place no longer holds this catalog's storage (it moved): hosts that mount
/// one share at different paths do not take turns rewriting it. A recorded S3 place is
/// kept as it is (reading it would need its configuration): hosts that name one
/// endpoint differently (`localhost`, `127.0.0.1`) took turns rewriting it, each with a
/// note (found by a drill).
pub fn check_owner(
    db: &dyn Catalog,
    config: &crate::config::Config,
    ours: &dyn Fn(&crate::config::StorageConfig) -> bool,
    ours_at: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let mine: Vec<String> = config.storages.iter().map(storage_identity).collect();
    match db.repository_state(REPOSITORY)? {
        Some(owner) if mine.contains(&normal_place(&owner)) => Ok(()),
        Some(owner) if config.storages.iter().any(ours) => {
            if owner.starts_with("file:")
                && !ours_at(&owner)
                && let Some(s) = config.storages.iter().find(|s| ours(s))
            {
                let place = storage_identity(s);
                db.set_repository_state(REPOSITORY, &place)?;
                keepfs_face::log!(
                    "keepfs: note: the catalog {} recorded its repository's storage at {owner}, which no longer holds it; storage '{}' at {place} is owned by this catalog, so that is the repository's place from now on",
                    config.catalog_location().display(),
                    s.name
                );
            }
            Ok(())
        }
        Some(owner) => Err(crate::Error::Refused(format!(
            "the catalog {} belongs to another repository (storage {owner}), not to this configuration's ({}); \
             to share that repository, configure its storage ([[storage]] at {owner}) as every other host does; \
             otherwise give this repository a database of its own",
            config.catalog_location().display(),
            mine.join(", ")
        ))),
        None => {
            let default = config
                .storages
                .iter()
                .find(|s| s.name == config.default_storage)
                .or(config.storages.first())
                .map(storage_identity)
                .unwrap_or_default();
            // First writer first: of two hosts claiming a new catalog at once, one wins.
            let owner = db.keep_repository_state(REPOSITORY, &default)?;
            if owner == default { Ok(()) } else { check_owner(db, config, ours, ours_at) }
        }
    }
}

/// A process's identity: pid, host name, kernel start time (so that a reused pid is not
/// taken for the process that died) and the machine it runs on (see [`machine_id`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub host: String,
    pub start: u64,
    /// The boot and pid namespace the pid belongs to; empty when unknown (then the
    /// session is judged by its heartbeat, as another host's).
    pub machine: String,
}

impl ProcessId {
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        let start = match proc_start_time(pid) {
            Seen::Started(t) => t,
            _ => 0,
        };
        ProcessId { pid, host: hostname(), start, machine: machine_id().to_string() }
    }

    /// Whether this process (of this machine) still runs: `None` when that cannot be
    /// told (its /proc entry is hidden from us, as with `hidepid`), so that only its
    /// heartbeat can.
    pub fn alive_here(&self) -> Option<bool> {
        match proc_start_time(self.pid) {
            Seen::Started(_) if self.start == 0 => None,
            Seen::Started(t) => Some(t == self.start),
            Seen::Gone => Some(false),
            Seen::Hidden => None,
        }
    }

    /// Whether this process is of this machine, so that its pid can be looked up here.
    pub fn is_here(&self) -> bool {
        let (boot, ns, _) = machine_parts(&self.machine);
        let (my_boot, my_ns, _) = machine_parts(machine_id());
        self.host == hostname() && !boot.is_empty() && (boot, ns) == (my_boot, my_ns)
    }

    /// Whether this process ran on this machine before it last started (same host name
    /// and machine id, another boot), so that it ended with that boot.
    fn before_this_boot(&self, mine: &str) -> bool {
        let (boot, _, id) = machine_parts(&self.machine);
        let (my_boot, _, my_id) = machine_parts(mine);
        self.host == hostname() && !id.is_empty() && id == my_id && !boot.is_empty() && boot != my_boot
    }
}

/// The parts of a [`ProcessId::machine`]: boot id, pid namespace and machine id (empty
/// where missing: sessions recorded by an older keepfs have no machine id).
fn machine_parts(m: &str) -> (&str, &str, &str) {
    let mut it = m.split(' ');
    (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""))
}

/// How long this machine has been up (CLOCK_BOOTTIME, sleep included), in ms; `None`
/// when the clock cannot be read.
fn uptime_ms() -> Option<i64> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the plain struct given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    (r == 0).then(|| t.tv_sec * 1000 + t.tv_nsec / 1_000_000)
}

/// This machine's identity for sessions: the kernel's boot id and this process's pid
/// namespace, then the machine id (`/etc/machine-id`, when there is one). A pid means
/// something only within the first two: two machines (cloned VMs, say) given one host
/// name, two containers with separate pid namespaces, or this machine before it
/// restarted are told apart by them, and their sessions are judged by their heartbeats
/// instead of by a pid that is not theirs. The machine id tells this machine before it
/// restarted (see [`session_alive`]). Empty when the boot id cannot be read.
pub(crate) fn machine_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let boot = boot.trim();
        if boot.is_empty() {
            return String::new();
        }
        let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        // Without its pid namespace, a pid cannot be told apart from another container's;
        // and a /proc of another pid namespace (`unshare --pid` without `--mount-proc`)
        // shows other processes under our pids.
        let own_proc =
            std::fs::read_link("/proc/self").is_ok_and(|p| p.as_os_str() == std::process::id().to_string().as_str());
        if ns.is_empty() || !own_proc {
            return String::new();
        }
        let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let id = id.trim();
        if id.is_empty() || id.contains(char::is_whitespace) {
            return format!("{boot} {ns}");
        }
        format!("{boot} {ns} {id}")
    })
}

static CONFIGURED_HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets this process's host name from the configuration (`host`); the first one set
/// stays (one process, one host).
pub fn set_host(name: &str) {
    let _ = CONFIGURED_HOST.set(name.to_string());
}

/// [`hostname`] and where it comes from, for `keepfs config check`.
pub fn host_and_origin() -> (String, &'static str) {
    let from = if std::env::var("KEEPFS_HOST").is_ok_and(|h| !h.trim().is_empty()) {
        "KEEPFS_HOST"
    } else if CONFIGURED_HOST.get().is_some() {
        "`host` in the configuration"
    } else {
        "the system's host name"
    };
    (hostname(), from)
}

/// This host's identity on sessions and locks: `KEEPFS_HOST` (or the configuration's
/// `host`, which sets it), else the system's host name. Hosts sharing a catalog must have
/// different ones: a session of this host is judged by its process, others' by their
/// heartbeats.
pub(crate) fn hostname() -> String {
    if let Ok(h) = std::env::var("KEEPFS_HOST")
        && !h.trim().is_empty()
    {
        return h.trim().to_string();
    }
    if let Some(h) = CONFIGURED_HOST.get() {
        return h.clone();
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// What /proc says of a pid.
enum Seen {
    /// It runs, started at this kernel time (field 22 of its stat).
    Started(u64),
    /// No such process.
    Gone,
    /// It runs, but its details are hidden from this process (`hidepid`, another user).
    Hidden,
}

fn proc_start_time(pid: u32) -> Seen {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        // Hidden entries read as missing too: only kill(pid, 0) tells (EPERM: it runs).
        Err(_) => {
            // SAFETY: signal 0 only checks that the process exists and may be signalled.
            let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
            let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            return if exists { Seen::Hidden } else { Seen::Gone };
        }
    };
    // Field 3 (state) and 22 (starttime); the command name (field 2) may contain spaces,
    // so count from ')'. A zombie has ended: it only waits for its parent to reap it.
    let fields: Vec<&str> = stat.rfind(')').and_then(|i| stat.get(i + 2..)).unwrap_or("").split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return Seen::Gone;
    }
    match fields.get(19).and_then(|t| t.parse().ok()) {
        Some(t) => Seen::Started(t),
        None => Seen::Hidden,
    }
}

/// Whether a session is alive: one of this machine while its process runs (or, when
/// its process cannot be seen, while its heartbeat is recent), any other while its
/// heartbeat is recent (`now` and the heartbeats are the catalog's clock).
///
/// One of this machine before it restarted ended with that boot: it is dead once it has
/// not beaten since this boot began, nor for three heartbeat periods (a backup continued
/// after a crash and reboot waited ten minutes for it). Both checks are durations, on
/// the catalog's clock and this machine's, so no two clocks are compared. A clone of
/// this machine that kept its machine id and host name (misconfigured: they share pids)
/// beats every minute, and so still passes for alive.
pub(crate) fn session_alive(s: &Session, now: i64) -> bool {
    alive_given_uptime(s, now, uptime_ms(), machine_id())
}

/// Heartbeats a session of this machine from before it restarted must have missed to be
/// taken for dead: three (a beat waits for the catalog as well as for its minute).
const MISSED_BEATS: i64 = 3;

/// [`session_alive`] with this machine's uptime (ms) and identity given.
fn alive_given_uptime(s: &Session, now: i64, uptime: Option<i64>, mine: &str) -> bool {
    let age = now - s.heartbeat_ms;
    let fresh = age < REMOTE_SESSION_TTL_MS;
    if s.process.before_this_boot(mine) && age > MISSED_BEATS * HEARTBEAT_EVERY_MS && uptime.is_some_and(|up| age > up)
    {
        return false;
    }
    if !s.process.is_here() {
        if fresh && s.process.host == hostname() && !s.process.machine.is_empty() {
            warn_host_shared(&s.process.host);
        }
        return fresh;
    }
    // A process of this machine is alive as long as it runs, however old its heartbeat
    // (a catalog down for more than 10 minutes stops every beat): taking it for dead
    // removed a running mount's read locks, and a cleanup deleted the blocks its reader
    // was reading (found by a drill). A session whose end failed while the catalog was
    // down is ended again by its process (`repo::Unended`), so it does not outlive its
    // guard.
    s.process.alive_here().unwrap_or(fresh)
}

/// Says once per process that sessions under this host name come from another machine.
fn warn_host_shared(host: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        keepfs_face::log!(
            "keepfs: warning: a running session of host '{host}' is of another machine or container (or from before this machine restarted); it is judged by its heartbeat. If another machine uses this host name, give each its own `host` (KEEPFS_HOST; docs/scale-out.md)"
        )
    });
}

/// Splits sessions into live and dead ones (see [`session_alive`]).
pub(crate) fn partition_live(all: Vec<Session>, now: i64) -> (Vec<Session>, Vec<Session>) {
    all.into_iter().partition(|s| session_alive(s, now))
}

/// A registered session (a process working on the repository).
#[derive(Clone, Debug)]
pub struct Session {
    pub id: i64,
    pub process: ProcessId,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub purpose: String,
    pub writes: bool,
}

/// An incomplete version as cleanup sees it (see [`Catalog::incomplete_versions`]).
#[derive(Clone, Debug)]
pub struct IncompleteVersion {
    pub uid: VersionUid,
    pub started_ms: i64,
    pub active_ms: i64,
    pub session: Option<i64>,
}

/// What a cleanup needs to know of one object row.
pub struct ObjectRow {
    pub id: BlockId,
    pub stored_size: u64,
    pub state: i64,
    pub touched_ms: i64,
}

/// One object row as a catalog copy (`database migrate`) moves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRecord {
    pub id: BlockId,
    pub stored_size: u64,
    pub plain_size: u64,
    pub state: i64,
    pub valid: bool,
    pub touched_ms: i64,
    pub key: Option<KeyId>,
}

/// One storage row as a catalog copy moves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRecord {
    pub id: i64,
    pub name: String,
    pub encrypted: bool,
}

/// A stored index handed to the catalog as a stream: exactly `len` bytes from `bytes`.
pub struct IndexBytes<'a> {
    pub len: u64,
    pub bytes: &'a mut dyn std::io::Read,
}

impl<'a> IndexBytes<'a> {
    /// An index held in memory (`at` is the reader over it, advanced as it is read).
    pub fn of(at: &'a mut &[u8]) -> IndexBytes<'a> {
        IndexBytes { len: at.len() as u64, bytes: at }
    }
}

/// Bytes of a stored index read from the catalog at a time: what a reader that streams
/// an index (restore) holds of it. Test builds take `KEEPFS_TEST_INDEX_PIECE`, so that
/// a small image's index is read in many pieces.
fn index_piece_len() -> usize {
    crate::test_knobs::number("KEEPFS_TEST_INDEX_PIECE").filter(|&n| n > 0).map_or(4 << 20, |n| n as usize)
}

/// What reads a piece of a stored index for [`IndexPieces`]: offset, length, buffer.
pub(crate) trait ReadPiece: FnMut(u64, usize, &mut Vec<u8>) -> Result<bool> {}
impl<F: FnMut(u64, usize, &mut Vec<u8>) -> Result<bool>> ReadPiece for F {}

/// A version's stored index, read out of a catalog a piece at a time by `read` (offset,
/// length, buffer: see [`Catalog::index_piece`]): a reader holds one piece, not the
/// index. A catalog error is kept in `failed` (the index is not damaged because the
/// database went away) and ends the reading.
pub(crate) struct IndexPieces<F> {
    read: F,
    len: u64,
    at: u64,
    piece: Vec<u8>,
    pos: usize,
    pub failed: Option<crate::error::Error>,
}

impl<F: ReadPiece> IndexPieces<F> {
    /// The index of `len` bytes that `read` reads.
    pub fn new(read: F, len: u64) -> IndexPieces<F> {
        IndexPieces { read, len, at: 0, piece: Vec::new(), pos: 0, failed: None }
    }

    /// Its length in bytes (as the catalog said when it was opened).
    pub fn len(&self) -> u64 {
        self.len
    }
}

impl<F: ReadPiece> std::io::Read for IndexPieces<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Err(std::io::Error::other("the catalog failed"));
        }
        if self.pos == self.piece.len() {
            if self.at >= self.len {
                return Ok(0);
            }
            let want = index_piece_len().min((self.len - self.at) as usize);
            self.pos = 0;
            match (self.read)(self.at, want, &mut self.piece) {
                Ok(true) if !self.piece.is_empty() => {}
                // Removed, or replaced by a shorter index, since it was opened: what was
                // read is cut short, and fails the index's own checks (then a second
                // reading tells a change from damage: `Repository::confirm_damage`).
                Ok(_) => return Ok(0),
                Err(e) => {
                    let said = e.to_string();
                    self.failed = Some(e);
                    return Err(std::io::Error::other(said));
                }
            };
            self.at += self.piece.len() as u64;
        }
        let n = buf.len().min(self.piece.len() - self.pos);
        buf[..n].copy_from_slice(&self.piece[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Bytes per write of a streamed index into the catalog.
const INDEX_WRITE_PIECE: usize = 1 << 20;

/// Copies exactly `index.len` bytes of `index` to `write`, a piece at a time; `write`
/// is given each piece and its offset.
fn copy_index(index: IndexBytes<'_>, mut write: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    let mut buf = vec![0u8; INDEX_WRITE_PIECE.min(index.len as usize)];
    let mut at = 0u64;
    while at < index.len {
        let n = (index.len - at).min(buf.len() as u64) as usize;
        index
            .bytes
            .read_exact(&mut buf[..n])
            .map_err(|e| crate::error::Error::io("cannot read the block index to record it", e))?;
        write(&buf[..n], at)?;
        if at == 0 {
            stall_sending_index();
        }
        at += n as u64;
    }
    Ok(())
}

/// Test builds only: `KEEPFS_TEST_INDEX_SEND_STALL_MS` stalls an index being recorded
/// after its first piece is sent: a slow network, which no real part shows on demand
/// (tests/catalog.rs has other hosts write meanwhile, then kills the sender there).
fn stall_sending_index() {
    crate::test_knobs::stall("KEEPFS_TEST_INDEX_SEND_STALL_MS");
}

/// Everything the engine records, behind one interface. Methods that take `&self` may
/// still write (each is its own short transaction); methods that take `&mut self` group
/// several statements in one transaction. Indexes are opaque bytes here (their encoding
/// is [`crate::index`]'s business).
pub trait Catalog: Send {
    /// Which engine this is, for messages ("sqlite", "postgresql").
    fn engine(&self) -> &'static str;

    // ---- repository state -----------------------------------------------------------

    /// The schema version (the number of migrations applied).
    fn schema_version(&self) -> Result<i64>;
    /// Whether this catalog was made by a `database rebuild` that has not finished cleanly.
    fn rebuild_unfinished(&self) -> Result<bool>;
    fn set_rebuild_unfinished(&self, unfinished: bool) -> Result<()>;
    /// A named value of the repository's state (`repository_state`), if set.
    fn repository_state(&self, name: &str) -> Result<Option<String>>;
    /// Starts moving the catalog for `database migrate`'s session `session`: in one
    /// transaction, the other live sessions, or (when there are none) the `moving` row
    /// set to `session`, after which no other session can start (see [`MOVING`]).
    fn begin_move(&mut self, session: i64) -> Result<Vec<Session>>;
    fn set_repository_state(&self, name: &str, value: &str) -> Result<()>;
    /// Sets the row `name` to `value` unless it is set, in one statement (of two hosts
    /// setting it at once, the first wins); returns the value it holds then.
    fn keep_repository_state(&self, name: &str, value: &str) -> Result<String>;
    /// The `repository_state` rows whose names start with `prefix`: (name, value).
    fn repository_states(&self, prefix: &str) -> Result<Vec<(String, String)>>;
    /// Takes the lease `name` (a `repository_state` row naming the session that holds
    /// it) for `session`, unless another session that is alive holds it: then returns
    /// that session. The holder is judged in the transaction that takes the lease, so
    /// two claims never both succeed; a lease of a session that died is taken over.
    fn claim(&mut self, name: &str, session: i64) -> Result<Option<i64>>;
    /// Lets go of the lease `name` if `session` holds it.
    fn release(&self, name: &str, session: i64) -> Result<()>;

    // ---- storages -------------------------------------------------------------------

    /// The numeric id of a storage name, created on first use.
    fn storage_id(&self, name: &str) -> Result<i64>;
    /// Whether a storage was initialised for encryption (then it must never be written
    /// in plaintext, whatever its keyring object looks like).
    fn storage_encrypted(&self, name: &str) -> Result<bool>;
    fn set_storage_encrypted(&self, name: &str) -> Result<()>;
    /// `keepfs init --encrypt`: marks storage `name` encrypted, in one write transaction
    /// with the check that no version and no object row of it exists (false: something
    /// does, nothing was marked). A backup records its objects under the same lock and
    /// reads the mark there ([`Lookup::storage_encrypted`]), so none stores plaintext on
    /// a storage marked encrypted while it ran.
    fn mark_encrypted_if_unused(&mut self, name: &str) -> Result<bool>;
    fn storage_names(&self) -> Result<Vec<(i64, String)>>;

    // ---- sessions and locks ---------------------------------------------------------

    fn register_session(&self, purpose: &str, writes: bool) -> Result<i64>;
    /// Refreshes a session's heartbeat, and the last sign of life of the incomplete
    /// version it writes, if any.
    fn heartbeat(&self, session: i64) -> Result<()>;
    fn end_session(&self, session: i64) -> Result<()>;
    /// Sessions whose process still runs. Sessions of dead processes are removed here
    /// (with their version locks), so a crash never leaves a repository locked.
    fn live_sessions(&self) -> Result<Vec<Session>>;
    /// Locks a version against removal for as long as `session` lives.
    fn lock_version(&self, uid: VersionUid, session: i64, purpose: &str) -> Result<()>;
    /// Live holders of locks on `uid`: (purpose, pid, host).
    fn version_lock_holders(&self, uid: VersionUid) -> Result<Vec<(String, u32, String)>>;

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
    ) -> Result<VersionUid>;
    /// Stores the index and statistics of a version and marks it valid, in one transaction.
    /// Makes an incomplete version valid with its index, in one transaction that first
    /// checks that `session` (the committing process's) still owns the version and is
    /// still registered: a session another process ended (took for dead) cannot commit.
    /// The index is read from `index` as it is stored (never held whole: a dense
    /// image's index may be close to 1 GB).
    fn commit_version(&mut self, uid: VersionUid, session: i64, index: IndexBytes<'_>, stats: &Stats) -> Result<()>;
    /// Inserts a version as recorded elsewhere (a storage's version object), keeping its
    /// uid; the uid sequence moves past it, so new uids stay increasing.
    /// The index is read as it is written (a rebuild hands over a large one from a file).
    fn insert_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()>;
    /// Replaces the fields, labels and index of a version the catalog holds with those
    /// recorded elsewhere, in one transaction.
    fn replace_version_record(&mut self, v: &Version, index: IndexBytes<'_>) -> Result<()>;
    fn set_status(&self, uid: VersionUid, status: Status) -> Result<()>;
    fn set_expire(&self, uid: VersionUid, expire: Option<&DateTime<Utc>>) -> Result<()>;
    fn set_protected(&self, uid: VersionUid, protected: bool) -> Result<()>;
    /// Sets a version's size (a backup whose source turned out shorter or longer).
    fn set_size(&mut self, uid: VersionUid, size: u64) -> Result<()>;
    /// Sets and removes labels of a version in one transaction.
    fn change_labels(&mut self, uid: VersionUid, set: &[(String, String)], remove: &[String]) -> Result<()>;
    /// Replaces the snapshot name and all labels of a version, in one transaction.
    fn set_snapshot_and_labels(
        &mut self,
        uid: VersionUid,
        snapshot: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()>;
    fn rename_version(&mut self, uid: VersionUid, name: &str) -> Result<()>;
    /// Makes `session` the writer of an incomplete version unless another of the `live`
    /// sessions writes it; false when one does.
    fn take_incomplete(&mut self, uid: VersionUid, session: i64, live: &[i64]) -> Result<bool>;
    fn list_versions(&self) -> Result<Vec<Version>>;
    fn version(&self, uid: VersionUid) -> Result<Version>;
    /// The session that is writing an incomplete version, if any.
    fn version_session(&self, uid: VersionUid) -> Result<Option<i64>>;
    /// The incomplete versions of a storage, for cleanup.
    fn incomplete_versions(&self, storage_id: i64) -> Result<Vec<IncompleteVersion>>;
    fn load_index(&self, uid: VersionUid) -> Result<Option<Vec<u8>>>;
    /// The length in bytes of a version's stored index, if it has one (read without
    /// reading the index).
    fn index_len(&self, uid: VersionUid) -> Result<Option<u64>>;
    /// Up to `len` bytes of a version's stored index from byte `offset` on (fewer at its
    /// end, none past it), in place of what `into` held; false when the version has no
    /// index. A large index is read this way a piece at a time, one short query each,
    /// into one buffer (see `repo::StoredIndex`): a new buffer for each piece left the
    /// allocator holding freed pieces (measured: a delta restore's peak RSS grew with the
    /// index, 31 MiB with one buffer against 48 MiB at 524,288 data blocks).
    fn index_piece(&self, uid: VersionUid, offset: u64, len: usize, into: &mut Vec<u8>) -> Result<bool>;
    fn remove_version(&mut self, uid: VersionUid) -> Result<()>;

    // ---- objects --------------------------------------------------------------------

    /// A backup's lookup of a batch of ids, in one transaction (docs/format.md,
    /// "Cleanup"): present and valid rows are touched and reported present; present rows
    /// a scrub found damaged are touched (the caller stores them again); ids without a row
    /// get one in state `writing`; `writing` rows and `deleting` rows whose deleter is
    /// among `dead_deleters` (sessions the caller found dead) become `writing`, touched.
    /// `deleting` rows of any other deleter are reported blocked.
    fn lookup_for_write(&mut self, storage_id: i64, ids: &[BlockId], dead_deleters: &[i64]) -> Result<Lookup>;
    /// Records durably stored objects (id, stored size, plaintext size) as present: only
    /// rows in state `writing` or `present` (made by this backup's lookup) are updated. A
    /// row a cleanup marked or removed meanwhile (only possible when this process was
    /// taken for dead) is not recorded, nor made again: returns the ids that were not.
    fn insert_objects(
        &mut self,
        storage_id: i64,
        objects: &[(BlockId, u64, u64)],
        key: Option<KeyId>,
    ) -> Result<Vec<BlockId>>;
    /// Records objects found in a storage (by a rebuild or a metadata restore) as present
    /// and just touched, keeping what the catalog knows of those it has rows for: an
    /// object a scrub found damaged stays invalid.
    fn insert_found_objects(&mut self, storage_id: i64, objects: &[(BlockId, u64)]) -> Result<()>;
    /// Cleanup, step 1 (one short transaction): marks for deletion by the cleanup
    /// session `cleaner` the rows of `ids` that are `deleting` already or untouched since
    /// `cutoff_ms`, and gives each of `orphans` (files without a row: id, stored size) a
    /// `deleting` row unless it has a row by now. Returns the (id, stored size) of every
    /// object this cleaner now holds: only those may it delete.
    fn mark_for_deletion(
        &mut self,
        storage_id: i64,
        ids: &[BlockId],
        orphans: &[(BlockId, u64)],
        cutoff_ms: i64,
        cleaner: i64,
    ) -> Result<Vec<(BlockId, u64)>>;
    /// Cleanup, step 3 (after the files are deleted): removes the rows of `ids` that are
    /// still `deleting` by `cleaner`. Returns how many.
    fn forget_deleted(&mut self, storage_id: i64, ids: &[BlockId], cleaner: i64) -> Result<u64>;
    /// The objects of a storage a scrub or restore found damaged.
    fn invalid_objects(&self, storage_id: i64) -> Result<HashSet<BlockId>>;
    fn mark_objects_invalid(&self, storage_id: i64, ids: &[BlockId]) -> Result<()> {
        self.set_objects_valid(storage_id, ids, false)
    }
    fn set_objects_valid(&self, storage_id: i64, ids: &[BlockId], valid: bool) -> Result<()>;
    /// Visits every object row of a storage.
    fn for_each_object(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRow)) -> Result<()>;
    /// (count, stored bytes) of the objects a storage holds.
    fn object_totals(&self, storage_id: i64) -> Result<(u64, u64)>;
    /// Objects per master key (None: not recorded, e.g. after a database rebuild).
    fn objects_per_key(&self, storage_id: i64) -> Result<Vec<(Option<KeyId>, u64)>>;
    /// Up to `limit` objects not recorded as sealed by `key`, in id order, after `after`
    /// (a page: a key rotation walks millions of objects without holding their ids).
    fn objects_not_under(
        &self,
        storage_id: i64,
        key: KeyId,
        after: Option<&BlockId>,
        limit: usize,
    ) -> Result<Vec<BlockId>>;
    /// How many objects are not recorded as sealed by `key`.
    fn count_objects_not_under(&self, storage_id: i64, key: KeyId) -> Result<u64>;
    fn set_object_keys(&self, storage_id: i64, ids: &[BlockId], key: KeyId) -> Result<()>;

    // ---- copying a whole catalog (`database migrate`) -------------------------------

    /// The storage rows, in id order.
    fn storage_records(&self) -> Result<Vec<StorageRecord>>;
    /// Visits every object row of a storage, with all its fields.
    fn for_each_object_record(&self, storage_id: i64, f: &mut dyn FnMut(ObjectRecord) -> Result<()>) -> Result<()>;
    /// Whether the catalog holds nothing yet (no storage, version or object rows).
    fn is_empty(&self) -> Result<bool>;
    /// Adds storage rows (keeping their ids), in one transaction; for an empty catalog.
    fn import_storages(&mut self, storages: &[StorageRecord]) -> Result<()>;
    /// Adds object rows as they are, in one transaction; for an empty catalog.
    fn import_objects(&mut self, storage_id: i64, objects: &[ObjectRecord]) -> Result<()>;
    /// Adds a version as it is (status, statistics, labels; `index` when it has one).
    fn import_version(&mut self, v: &Version, index: Option<IndexBytes<'_>>) -> Result<()>;
    /// Gives the catalog's free space (pages of removed versions and objects) back to the
    /// filesystem after a cleanup; returns how many bytes the catalog shrank (0 where
    /// the engine reclaims space by itself).
    fn reclaim_space(&mut self) -> Result<u64>;
    /// The catalog's clock (ms since the epoch), which sessions, heartbeats, touches and
    /// cleanup cutoffs are measured with: the database server's for a shared catalog
    /// (hosts' clocks are never compared), this host's for SQLite.
    fn now_ms(&self) -> Result<i64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(machine: String, heartbeat_age_ms: i64, now: i64) -> Session {
        Session {
            id: 1,
            process: ProcessId { pid: 1, host: hostname(), start: 7, machine },
            started_ms: now - heartbeat_age_ms,
            heartbeat_ms: now - heartbeat_age_ms,
            purpose: "backup".into(),
            writes: true,
        }
    }

    /// A backup of this machine killed by a crash, continued after the reboot: its
    /// session, recorded in the earlier boot, is dead without waiting 10 minutes for its
    /// heartbeat to age. A clone of this machine (same machine id and host name, another
    /// boot id) that beat since this boot stays alive, as does one of another machine id.
    #[test]
    fn a_session_from_before_this_machine_restarted_is_dead_once_silent_since_the_boot() {
        // This machine, as another one would be (no /etc/machine-id needed).
        let mine = "11111111-1111-1111-1111-111111111111 pid:[4026531836] 0123456789abcdef0123456789abcdef";
        let now = now_ms();
        let minute = 60_000;
        let earlier_boot = "00000000-0000-0000-0000-000000000000 pid:[4026531836] 0123456789abcdef0123456789abcdef";
        let alive = |machine: &str, silent_for: i64, up: i64| {
            alive_given_uptime(&session(machine.to_string(), silent_for, now), now, Some(up), mine)
        };
        // Up for 3 minutes, silent for 4: it ended with the earlier boot. (It used to
        // count as alive until 10 minutes had passed.)
        assert!(!alive(earlier_boot, 4 * minute, 3 * minute));
        // Silent for less than three heartbeats: alive, however short this boot.
        assert!(alive(earlier_boot, 2 * minute + minute / 2, minute));
        // It beat since this boot began: a clone of this machine, alive.
        assert!(alive(earlier_boot, 4 * minute, 30 * minute));
        // Another machine id, or none (an older keepfs): judged by the heartbeat alone.
        let other = "00000000-0000-0000-0000-000000000000 pid:[4026531836] fedcba9876543210fedcba9876543210";
        assert!(alive(other, 4 * minute, 3 * minute));
        assert!(alive("00000000-0000-0000-0000-000000000000 pid:[4026531836]", 4 * minute, 3 * minute));
        assert!(!alive(other, REMOTE_SESSION_TTL_MS + minute, 3 * minute));
        // And the real uptime is read.
        assert!(uptime_ms().is_some_and(|up| up > 0));
    }

    /// A session of a process of this machine that still runs (this test's) is alive
    /// however old its heartbeat: a catalog that was down for more than the remote wait
    /// stopped every beat, and taking the session for dead lost a running mount's read
    /// locks to a cleanup (found by a drill; an earlier change had made it dead, for
    /// sessions whose end failed, which their process now ends again itself).
    #[test]
    fn a_running_process_of_this_machine_is_alive_however_old_its_heartbeat() {
        let me = ProcessId::current();
        let now = now_ms();
        let with_age = |age: i64| Session {
            id: 1,
            process: me.clone(),
            started_ms: now - age,
            heartbeat_ms: now - age,
            purpose: "read V0000000001".into(),
            writes: false,
        };
        assert!(me.is_here() && me.alive_here() == Some(true));
        assert!(session_alive(&with_age(60_000), now));
        assert!(session_alive(&with_age(REMOTE_SESSION_TTL_MS + 1), now));
        // A process that no longer runs is dead at once.
        let mut gone = with_age(1_000);
        gone.process.pid = u32::MAX - 1;
        assert!(!session_alive(&gone, now));
    }
}
