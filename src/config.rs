//! Configuration: an embedded default (a repository under `$KEEPFS_HOME`, default
//! `/var/lib/keepfs` for root and `~/.local/share/keepfs` for other users) that needs no
//! file, or a TOML file found through `--config`,
//! `$KEEPFS_CONFIG` or `/etc/keepfs/keepfs.toml`. Every key is in docs/configuration.md.

use crate::error::{Error, Result};
use crate::units::{check_block_size, parse_duration, parse_size};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const SYSTEM_CONFIG: &str = "/etc/keepfs/keepfs.toml";
pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;
pub const DEFAULT_STORAGE: &str = "default";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageKind {
    File { path: PathBuf },
    Null,
    S3(Box<crate::storage::s3::S3Config>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageConfig {
    pub name: String,
    pub kind: StorageKind,
    /// The master key of an encrypted storage: a key file, or a file holding the
    /// passphrase (defaults: the top-level keys, then $KEEPFS_KEY_FILE / $KEEPFS_PASSPHRASE).
    pub key_file: Option<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    /// Refuse to use this storage unless it is encrypted (no silent plaintext).
    pub require_encryption: bool,
    /// Bandwidth limits in bytes per second.
    pub read_bandwidth: Option<u64>,
    pub write_bandwidth: Option<u64>,
    /// A local directory that keeps objects read from this storage (see
    /// storage/disk_cache.rs); for remote storages.
    pub read_cache: Option<ReadCacheConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadCacheConfig {
    pub dir: PathBuf,
    /// The most bytes the directory may hold.
    pub max_bytes: u64,
}

/// The size of a read cache when `cache_size` is not set.
pub const DEFAULT_READ_CACHE_BYTES: u64 = 10 << 30;

impl StorageConfig {
    pub fn new(name: &str, kind: StorageKind) -> StorageConfig {
        StorageConfig {
            name: name.into(),
            kind,
            key_file: None,
            passphrase_file: None,
            require_encryption: false,
            read_bandwidth: None,
            write_bandwidth: None,
            read_cache: None,
        }
    }
}

/// The resolved configuration the engine runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The repository's own directory: lock-free spool and scratch space live here.
    pub home: PathBuf,
    /// The SQLite catalog file (unless `database_url` names a PostgreSQL one).
    pub database: PathBuf,
    /// A PostgreSQL catalog (`database = "postgresql://…"`), instead of the SQLite file.
    pub database_url: Option<String>,
    /// A file holding the PostgreSQL catalog's password (`database_password_file`).
    pub database_password_file: Option<PathBuf>,
    /// This host's name on sessions and locks in a shared catalog (`host`; `KEEPFS_HOST`
    /// overrides it; default: the system's host name).
    pub host: Option<String>,
    pub storages: Vec<StorageConfig>,
    pub default_storage: String,
    pub block_size: u32,
    /// zstd level; 0 stores blocks uncompressed.
    pub compression_level: i32,
    /// Threads reading a backup source.
    pub source_readers: usize,
    /// Threads hashing and compressing (backup) or decompressing and verifying (restore).
    pub workers: usize,
    /// Threads writing objects to storage.
    pub storage_writers: usize,
    /// Threads fetching objects from a local storage during a restore or scrub (see
    /// [`Config::readers_for`]).
    pub storage_readers: usize,
    /// `rm` refuses versions younger than this many days without --force.
    pub rm_min_age_days: f64,
    /// Read regular-file sources through memory mappings (no copy) instead of read().
    pub mmap_sources: bool,
    /// Decompressed blocks the FUSE filesystem keeps in memory.
    pub cache_bytes: u64,
    /// Partially written blocks of one incoming or copy-on-write file kept in memory.
    pub spool_memory_bytes: u64,
    /// Partially written blocks of one file kept in memory and in the spool file.
    pub spool_bytes: u64,
    /// What a cleanup may hold in memory; a larger storage is cleaned up in slices.
    pub cleanup_memory_bytes: u64,
    /// Schedulers for `due` and `sla` (the built-in hourly, daily, weekly and monthly
    /// ones, replaced or extended by `[[scheduler]]` entries).
    pub schedulers: Vec<crate::schedule::Scheduler>,
    /// Modes of the files and directories keepfs creates (owner-only by default).
    pub modes: crate::perms::Modes,
    /// How long the objects of an incomplete version are kept for `backup --continue`
    /// after its backup stopped (cleanup spares them until then).
    pub incomplete_grace: chrono::Duration,
    /// Ceph RBD sources and targets (`[rbd]`).
    pub rbd: RbdConfig,
    /// Where the configuration came from, for messages.
    pub origin: String,
}

/// How keepfs reaches a Ceph cluster for `rbd:` sources and targets (`[rbd]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdConfig {
    /// ceph.conf; default `$CEPH_CONF`, then /etc/ceph/ceph.conf.
    pub conf: Option<PathBuf>,
    /// The client's id (`admin` for client.admin, the default).
    pub client_id: Option<String>,
    /// Its keyring; default what ceph.conf says.
    pub keyring: Option<PathBuf>,
    /// Features of images a restore creates.
    pub features: Vec<String>,
    /// Seconds to wait for the monitors (connecting included) and for each OSD operation.
    pub timeout_secs: u64,
    /// Reads (backup) and writes (restore) in flight at once.
    pub in_flight: usize,
}

impl Default for RbdConfig {
    fn default() -> RbdConfig {
        RbdConfig {
            conf: None,
            client_id: None,
            keyring: None,
            features: ["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"]
                .map(String::from)
                .to_vec(),
            timeout_secs: 60,
            in_flight: 8,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRbdConfig {
    conf: Option<PathBuf>,
    client_id: Option<String>,
    keyring: Option<PathBuf>,
    features: Option<toml::Value>,
    timeout: Option<u64>,
    in_flight: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    home: Option<PathBuf>,
    database: Option<String>,
    database_password_file: Option<PathBuf>,
    host: Option<String>,
    default_storage: Option<String>,
    block_size: Option<toml::Value>,
    compression_level: Option<i32>,
    source_readers: Option<usize>,
    workers: Option<usize>,
    storage_writers: Option<usize>,
    storage_readers: Option<usize>,
    rm_min_age_days: Option<f64>,
    mmap_sources: Option<bool>,
    cache_size: Option<toml::Value>,
    spool_memory: Option<toml::Value>,
    spool_size: Option<toml::Value>,
    cleanup_memory: Option<toml::Value>,
    #[serde(default)]
    storage: Vec<FileStorageConfig>,
    #[serde(default)]
    scheduler: Vec<FileSchedulerConfig>,
    key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    require_encryption: Option<bool>,
    file_mode: Option<toml::Value>,
    incomplete_grace: Option<String>,
    rbd: Option<FileRbdConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchedulerConfig {
    name: String,
    interval: String,
    keep: u32,
    sla: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorageConfig {
    name: String,
    kind: String,
    path: Option<PathBuf>,
    key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    encrypt: Option<bool>,
    read_bandwidth: Option<toml::Value>,
    write_bandwidth: Option<toml::Value>,
    read_cache_dir: Option<PathBuf>,
    read_cache_size: Option<toml::Value>,
    // S3
    endpoint: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    access_key: Option<String>,
    secret_key: Option<String>,
    addressing: Option<String>,
    storage_class: Option<String>,
    connect_timeout: Option<String>,
    read_timeout: Option<String>,
    simultaneous_reads: Option<usize>,
    simultaneous_writes: Option<usize>,
    simultaneous_deletes: Option<usize>,
    attempts: Option<u32>,
}

/// A byte count given as an integer or a string with a unit (`"256M"`); `what` says
/// what is expected, for the message.
fn size_value(key: &str, v: &toml::Value, what: &str, bad: &dyn Fn(String) -> Error) -> Result<u64> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        toml::Value::String(s) => parse_size(s).map_err(|e| bad(format!("{key}: {e}"))),
        other => Err(bad(format!("{key} must be {what}, not {other}"))),
    }
}

/// Like [`size_value`], for settings where 0 means nothing sensible (a rate, a cache).
fn positive_size(key: &str, v: &toml::Value, what: &str, bad: &dyn Fn(String) -> Error) -> Result<u64> {
    match size_value(key, v, what, bad)? {
        0 => Err(bad(format!("{key} must be above 0"))),
        n => Ok(n),
    }
}

/// The S3 keys of one `[[storage]]` entry; credentials fall back to the standard AWS
/// environment variables.
fn s3_config(s: &FileStorageConfig, bad: &dyn Fn(String) -> Error) -> Result<crate::storage::s3::S3Config> {
    let need = |v: &Option<String>, key: &str| {
        v.clone().filter(|v| !v.is_empty()).ok_or_else(|| bad(format!("storage '{}' of kind s3 needs `{key}`", s.name)))
    };
    let env = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let access_key =
        s.access_key.clone().or_else(|| env("AWS_ACCESS_KEY_ID")).ok_or_else(|| {
            bad(format!("storage '{}': no access key (set `access_key` or AWS_ACCESS_KEY_ID)", s.name))
        })?;
    let secret_key = s.secret_key.clone().or_else(|| env("AWS_SECRET_ACCESS_KEY")).ok_or_else(|| {
        bad(format!("storage '{}': no secret key (set `secret_key` or AWS_SECRET_ACCESS_KEY)", s.name))
    })?;
    let path_style = match s.addressing.as_deref().unwrap_or("path") {
        "path" => true,
        "virtual" | "virtual-host" => false,
        other => return Err(bad(format!("storage '{}': addressing '{other}' (use path or virtual)", s.name))),
    };
    let secs = |v: &Option<String>, key: &str, default: u64| -> Result<std::time::Duration> {
        match v {
            None => Ok(std::time::Duration::from_secs(default)),
            Some(t) => crate::units::parse_duration(t)
                .map(|d| std::time::Duration::from_secs(d.num_seconds().max(1) as u64))
                .map_err(|e| bad(format!("storage '{}' {key}: {e}", s.name))),
        }
    };
    let mut prefix = s.prefix.clone().unwrap_or_default();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    let count = |v: Option<usize>, default: usize, key: &str| match v {
        Some(0) => Err(bad(format!("storage '{}': {key} must be at least 1", s.name))),
        Some(n) => Ok(n.min(256)),
        None => Ok(default),
    };
    Ok(crate::storage::s3::S3Config {
        endpoint: need(&s.endpoint, "endpoint")?,
        region: s.region.clone().unwrap_or_else(|| "us-east-1".into()),
        bucket: need(&s.bucket, "bucket")?,
        prefix,
        access_key,
        secret_key,
        path_style,
        storage_class: s.storage_class.clone(),
        connect_timeout: secs(&s.connect_timeout, "connect_timeout", 10)?,
        read_timeout: secs(&s.read_timeout, "read_timeout", 120)?,
        simultaneous_reads: count(s.simultaneous_reads, 16, "simultaneous_reads")?,
        simultaneous_writes: count(s.simultaneous_writes, 8, "simultaneous_writes")?,
        simultaneous_deletes: count(s.simultaneous_deletes, 4, "simultaneous_deletes")?,
        attempts: s.attempts.unwrap_or(6).max(1),
    })
}

fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// The system tool's place for the embedded default repository when run as root.
pub const SYSTEM_HOME: &str = "/var/lib/keepfs";

/// `$KEEPFS_HOME`; else, for root, `/var/lib/keepfs` (unless a repository made by an
/// earlier keepfs already sits in root's `~/.local/share/keepfs`: it stays in use); else
/// `~/.local/share/keepfs`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("KEEPFS_HOME").filter(|h| !h.is_empty()) {
        // Relative to the directory it was set in, as a shell means it: made absolute
        // once, so that a mount daemon that changes directory keeps the same home.
        return std::path::absolute(&h).unwrap_or_else(|_| PathBuf::from(h));
    }
    let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    let user_home = base.join(".local/share/keepfs");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && !user_home.exists() {
        return PathBuf::from(SYSTEM_HOME);
    }
    user_home
}

impl Config {
    /// Where the catalog lives: the PostgreSQL database when one is configured, else the
    /// SQLite file.
    pub fn catalog_location(&self) -> crate::catalog::Location {
        match &self.database_url {
            Some(url) => crate::catalog::Location::Postgres {
                url: url.clone(),
                password_file: self.database_password_file.clone(),
            },
            None => crate::catalog::Location::Sqlite(self.database.clone()),
        }
    }

    /// The embedded default: everything under `home`.
    pub fn embedded(home: PathBuf) -> Config {
        Config {
            database: home.join("keepfs.sqlite"),
            database_url: None,
            database_password_file: None,
            host: None,
            storages: vec![StorageConfig::new(DEFAULT_STORAGE, StorageKind::File { path: home.join("storage") })],
            default_storage: DEFAULT_STORAGE.to_string(),
            block_size: DEFAULT_BLOCK_SIZE,
            compression_level: 1,
            source_readers: 1,
            workers: cpus(),
            storage_writers: 2,
            storage_readers: cpus().max(2) * 2,
            rm_min_age_days: 6.0,
            mmap_sources: true,
            cache_bytes: 256 << 20,
            spool_memory_bytes: 32 << 20,
            spool_bytes: 1 << 30,
            cleanup_memory_bytes: 256 << 20,
            schedulers: crate::schedule::builtin(),
            modes: crate::perms::Modes::PRIVATE,
            incomplete_grace: chrono::Duration::days(1),
            rbd: RbdConfig::default(),
            origin: format!("embedded default (home {})", home.display()),
            home,
        }
    }

    /// Finds and loads the configuration: `explicit` (--config), then `$KEEPFS_CONFIG`, then
    /// the system file; with none of them, the embedded default.
    pub fn discover(explicit: Option<&Path>) -> Result<Config> {
        let mut c = Config::discover_file(explicit)?;
        c.apply_database_env()?;
        Ok(c)
    }

    fn discover_file(explicit: Option<&Path>) -> Result<Config> {
        if let Some(p) = explicit {
            return Config::load(p);
        }
        if let Some(p) = std::env::var_os("KEEPFS_CONFIG").filter(|p| !p.is_empty()) {
            return Config::load(Path::new(&p));
        }
        let system = Path::new(SYSTEM_CONFIG);
        if system.exists() {
            return Config::load(system);
        }
        Ok(Config::embedded(default_home()))
    }

    /// `$KEEPFS_DATABASE` (a path or a postgresql:// URL) replaces the configured
    /// `database`: one catalog for one command without editing the configuration.
    fn apply_database_env(&mut self) -> Result<()> {
        let Some(db) = std::env::var("KEEPFS_DATABASE").ok().filter(|d| !d.is_empty()) else {
            return Ok(());
        };
        match crate::catalog::Location::parse_setting("KEEPFS_DATABASE", &db).map_err(Error::Config)? {
            crate::catalog::Location::Postgres { url, .. } => self.database_url = Some(url),
            crate::catalog::Location::Sqlite(path) => {
                self.database = std::path::absolute(&path).unwrap_or(path);
                self.database_url = None;
            }
        }
        self.origin = format!("{} (database from KEEPFS_DATABASE)", self.origin);
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Reads a configuration file's text (`origin` names it in errors). An error names
    /// the line of the setting it is about.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        Config::parse_text(text, origin).map_err(|e| match e {
            Error::Config(msg) if !msg.contains("(line ") => {
                let at = msg.strip_prefix(&format!("{origin}: ")).and_then(|m| line_of_setting(text, m));
                Error::Config(match at {
                    Some(line) => format!("{msg} (line {line})"),
                    None => msg,
                })
            }
            e => e,
        })
    }

    fn parse_text(text: &str, origin: &str) -> Result<Config> {
        let bad = |msg: String| Error::Config(format!("{origin}: {msg}"));
        let f: FileConfig =
            toml::from_str(text).map_err(|e| bad(e.message().to_string() + &location(text, e.span())))?;
        // Every path a file names is absolute: a relative one would mean another place
        // in each directory keepfs is started from (a backup's objects in one, its
        // catalog's records of them in another).
        let absolute = |key: &str, p: &Path| -> Result<()> {
            if p.as_os_str().is_empty() {
                return Err(bad(format!("{key} is empty: give an absolute path, or leave {key} out")));
            }
            if !p.is_absolute() {
                return Err(bad(format!(
                    "{key} must be an absolute path, not '{}' (a relative one would depend on the directory keepfs runs in)",
                    p.display()
                )));
            }
            Ok(())
        };
        let paths = [
            ("home", f.home.as_deref()),
            ("database_password_file", f.database_password_file.as_deref()),
            ("key_file", f.key_file.as_deref()),
            ("passphrase_file", f.passphrase_file.as_deref()),
        ];
        for (key, p) in paths {
            p.map(|p| absolute(key, p)).transpose()?;
        }
        for s in &f.storage {
            let paths = [("path", &s.path), ("key_file", &s.key_file), ("passphrase_file", &s.passphrase_file)];
            for (key, p) in paths {
                p.as_deref().map(|p| absolute(&format!("storage '{}': {key}", s.name), p)).transpose()?;
            }
        }
        if let Some(r) = &f.rbd {
            for (key, p) in [("[rbd] conf", &r.conf), ("[rbd] keyring", &r.keyring)] {
                p.as_deref().map(|p| absolute(key, p)).transpose()?;
            }
        }
        let home = f.home.unwrap_or_else(default_home);
        let mut c = Config::embedded(home.clone());
        c.origin = origin.to_string();
        if let Some(db) = f.database {
            match crate::catalog::Location::parse_setting("database", &db).map_err(bad)? {
                crate::catalog::Location::Postgres { url, .. } => c.database_url = Some(url),
                crate::catalog::Location::Sqlite(path) => {
                    absolute("database", &path)?;
                    c.database = path
                }
            }
        }
        c.database_password_file = f.database_password_file;
        if let Some(h) = f.host {
            if h.trim().is_empty() || h.contains(char::is_whitespace) {
                return Err(bad(format!(
                    "host '{h}': a name without spaces, different for every host sharing a catalog"
                )));
            }
            c.host = Some(h);
        }
        if !f.storage.is_empty() {
            c.storages.clear();
            for s in f.storage {
                if s.name.is_empty() || c.storages.iter().any(|o| o.name == s.name) {
                    return Err(bad(format!("storage name '{}' is empty or used twice", s.name)));
                }
                let kind = match (s.kind.as_str(), s.path.clone()) {
                    ("s3", _) => StorageKind::S3(Box::new(s3_config(&s, &bad)?)),
                    ("file", Some(path)) => StorageKind::File { path },
                    ("file", None) => {
                        return Err(bad(format!("storage '{}' of kind file needs a path", s.name)));
                    }
                    ("null", _) => StorageKind::Null,
                    (other, _) => {
                        return Err(bad(format!(
                            "storage '{}': unknown kind '{other}' (use file, s3 or null)",
                            s.name
                        )));
                    }
                };
                let rate = |v: &Option<toml::Value>, key: &str| {
                    let key = format!("storage '{}': {key}", s.name);
                    v.as_ref()
                        .map(|v| positive_size(&key, v, "a rate like \"50M\" (bytes per second)", &bad))
                        .transpose()
                };
                let read_bandwidth = rate(&s.read_bandwidth, "read_bandwidth")?;
                let write_bandwidth = rate(&s.write_bandwidth, "write_bandwidth")?;
                let read_cache = match (&s.read_cache_dir, &s.read_cache_size) {
                    (None, None) => None,
                    (None, Some(_)) => {
                        return Err(bad(format!("storage '{}': read_cache_size needs a read_cache_dir", s.name)));
                    }
                    (Some(dir), size) => {
                        let max_bytes = match size {
                            None => DEFAULT_READ_CACHE_BYTES,
                            Some(v) => positive_size(
                                &format!("storage '{}': read_cache_size", s.name),
                                v,
                                "a size like \"20G\"",
                                &bad,
                            )?,
                        };
                        if !dir.is_absolute() {
                            return Err(bad(format!(
                                "storage '{}': read_cache_dir must be an absolute path, not '{}'",
                                s.name,
                                dir.display()
                            )));
                        }
                        Some(ReadCacheConfig { dir: dir.clone(), max_bytes })
                    }
                };
                c.storages.push(StorageConfig {
                    name: s.name,
                    kind,
                    key_file: s.key_file,
                    passphrase_file: s.passphrase_file,
                    require_encryption: s.encrypt.unwrap_or(false),
                    read_bandwidth,
                    write_bandwidth,
                    read_cache,
                });
                // A cleanup of one storage takes every file it does not know of for an
                // orphan: two names for one place would delete each other's blocks.
                let new = c.storages.last().filter(|n| !matches!(n.kind, StorageKind::Null));
                if let Some(n) = new {
                    let place = crate::catalog::storage_identity(n);
                    // The same directory however it is reached (`..`, a symlink, a bind
                    // mount), where both exist here.
                    let dir_id = |s: &StorageConfig| match &s.kind {
                        StorageKind::File { path } => {
                            use std::os::unix::fs::MetadataExt;
                            std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
                        }
                        _ => None,
                    };
                    let same = |o: &StorageConfig| {
                        crate::catalog::storage_identity(o) == place || dir_id(o).is_some_and(|d| Some(d) == dir_id(n))
                    };
                    if let Some(o) = c.storages.iter().find(|o| o.name != n.name && same(o)) {
                        return Err(bad(format!(
                            "storages '{}' and '{}' are both at {place}: one place holds one storage (a cleanup of either would delete the other's blocks); keep one of them",
                            o.name, n.name
                        )));
                    }
                }
            }
            c.default_storage = c.storages[0].name.clone();
        }
        if let Some(d) = f.default_storage {
            if !c.storages.iter().any(|s| s.name == d) {
                return Err(bad(format!("default_storage '{d}' is not one of the [[storage]] entries")));
            }
            c.default_storage = d;
        }
        if let Some(bs) = f.block_size {
            let n = match &bs {
                toml::Value::Integer(i) if *i > 0 => *i as u64,
                toml::Value::String(s) => parse_size(s).map_err(|e| bad(format!("block_size: {e}")))?,
                other => {
                    return Err(bad(format!("block_size must be a size like \"4M\", not {other}")));
                }
            };
            c.block_size = check_block_size(n).map_err(|e| bad(format!("block_size: {e}")))?;
        }
        if let Some(l) = f.compression_level {
            if !(0..=19).contains(&l) {
                return Err(bad(format!("compression_level {l} is out of range (0 = off, 1..19 zstd levels)")));
            }
            c.compression_level = l;
        }
        let threads = |name: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(bad(format!("{name} must be at least 1"))),
            Some(n) if n > 256 => Err(bad(format!("{name} {n} is more than 256 threads"))),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        c.source_readers = threads("source_readers", f.source_readers, c.source_readers)?;
        if let Some(r) = f.rbd {
            c.rbd.conf = r.conf;
            c.rbd.client_id = r.client_id;
            c.rbd.keyring = r.keyring;
            match r.features {
                None => {}
                Some(toml::Value::String(s)) => {
                    c.rbd.features = s.split(',').map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect()
                }
                Some(toml::Value::Array(a)) => {
                    c.rbd.features = a
                        .iter()
                        .map(|v| v.as_str().map(String::from))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad("[rbd] features must be names like \"layering\"".to_string()))?
                }
                Some(other) => {
                    return Err(bad(format!(
                        "[rbd] features must be a list like \"layering,exclusive-lock\", not {other}"
                    )));
                }
            }
            if let Some(t) = r.timeout {
                if t == 0 {
                    return Err(bad("[rbd] timeout must be at least 1 second".to_string()));
                }
                c.rbd.timeout_secs = t;
            }
            c.rbd.in_flight = threads("[rbd] in_flight", r.in_flight, c.rbd.in_flight)?;
        }
        c.workers = threads("workers", f.workers, c.workers)?;
        c.storage_writers = threads("storage_writers", f.storage_writers, c.storage_writers)?;
        c.storage_readers = threads("storage_readers", f.storage_readers, c.storage_readers)?;
        if let Some(d) = f.rm_min_age_days {
            if d.is_nan() || d < 0.0 {
                return Err(bad("rm_min_age_days must be 0 or more".to_string()));
            }
            c.rm_min_age_days = d;
        }
        if let Some(v) = &f.file_mode {
            let mode = match v {
                toml::Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                    .map_err(|_| bad(format!("file_mode must be octal like \"0640\", not \"{s}\"")))?,
                toml::Value::Integer(i) if (0..=0o7777).contains(i) => *i as u32,
                other => return Err(bad(format!("file_mode must be octal like \"0640\", not {other}"))),
            };
            c.modes = crate::perms::Modes::from_file_mode(mode).map_err(bad)?;
        }
        if let Some(g) = &f.incomplete_grace {
            c.incomplete_grace = if g.trim() == "0" {
                chrono::Duration::zero()
            } else {
                parse_duration(g).map_err(|e| bad(format!("incomplete_grace: {e}")))?
            };
        }
        if let Some(m) = f.mmap_sources {
            c.mmap_sources = m;
        }
        let size = |key: &str, v: &toml::Value| size_value(key, v, "a size like \"256M\"", &bad);
        if let Some(v) = &f.cache_size {
            c.cache_bytes = size("cache_size", v)?;
        }
        if let Some(v) = &f.spool_memory {
            c.spool_memory_bytes = size("spool_memory", v)?;
        }
        if let Some(v) = &f.spool_size {
            c.spool_bytes = size("spool_size", v)?;
        }
        if let Some(v) = &f.cleanup_memory {
            c.cleanup_memory_bytes = size("cleanup_memory", v)?;
            if c.cleanup_memory_bytes == 0 {
                return Err(bad("cleanup_memory: must be more than 0".into()));
            }
        }
        // Top-level keys apply to every storage that names none of its own.
        for s in &mut c.storages {
            if s.key_file.is_none() && s.passphrase_file.is_none() {
                s.key_file = f.key_file.clone();
                s.passphrase_file = f.passphrase_file.clone();
            }
            s.require_encryption |= f.require_encryption.unwrap_or(false);
            if s.key_file.is_some() && s.passphrase_file.is_some() {
                return Err(bad(format!("storage '{}': give key_file or passphrase_file, not both", s.name)));
            }
        }
        for s in f.scheduler {
            let dur = |key: &str, v: &str| {
                crate::units::parse_duration(v).map_err(|e| bad(format!("scheduler '{}' {key}: {e}", s.name)))
            };
            let interval = dur("interval", &s.interval)?;
            let sla = dur("sla", &s.sla)?;
            if interval <= chrono::Duration::zero() || s.keep == 0 || sla >= interval {
                return Err(bad(format!(
                    "scheduler '{}': interval and keep must be above 0 and sla shorter than the interval",
                    s.name
                )));
            }
            crate::version::check_label_name(&s.name).map_err(|e| bad(format!("scheduler name: {e}")))?;
            c.schedulers.retain(|o| o.name != s.name);
            c.schedulers.push(crate::schedule::Scheduler { name: s.name, interval, keep: s.keep, sla });
        }
        Ok(c)
    }

    pub fn storage(&self, name: &str) -> Result<&StorageConfig> {
        self.storages.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.storages.iter().map(|s| s.name.as_str()).collect();
            Error::Invalid(format!("no storage named '{name}' (configured: {})", names.join(", ")))
        })
    }

    /// Threads that read from storage `name` at once: `storage_readers`, or more for a
    /// remote storage, which needs more requests in flight than a local disk.
    pub fn readers_for(&self, name: &str) -> Result<usize> {
        Ok(match &self.storage(name)?.kind {
            StorageKind::S3(c) => self.storage_readers.max(c.simultaneous_reads),
            _ => self.storage_readers,
        }
        .max(1))
    }

    /// Threads that write to storage `name` at once (see [`Config::readers_for`]).
    pub fn writers_for(&self, name: &str) -> Result<usize> {
        Ok(match &self.storage(name)?.kind {
            StorageKind::S3(c) => self.storage_writers.max(c.simultaneous_writes),
            _ => self.storage_writers,
        }
        .max(1))
    }
}

/// The line of the setting an error message `msg` is about: of the keys set in the file,
/// the one `msg` names first; within a `[[storage]]` or `[[scheduler]]` entry only when
/// `msg` names that entry ('NAME'), within `[rbd]` only when it says `[rbd]`. None when
/// the message names no key of the file (a missing key, say).
fn line_of_setting(text: &str, msg: &str) -> Option<usize> {
    // (line, key, table, name of the table's entry)
    let mut keys: Vec<(usize, String, Option<String>, usize)> = Vec::new();
    let mut names: Vec<Option<String>> = vec![None];
    let mut table: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            table = Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_string());
            names.push(None);
            continue;
        }
        let Some((key, value)) = t.split_once('=') else { continue };
        let key = key.trim().trim_matches('"').to_string();
        if key == "name" {
            let v = value.trim().trim_matches(|c| c == '"' || c == '\'');
            *names.last_mut().unwrap_or(&mut None) = Some(v.to_string());
        }
        keys.push((i + 1, key, table.clone(), names.len() - 1));
    }
    let word_at = |k: &str| -> Option<usize> {
        msg.match_indices(k).map(|(at, _)| at).find(|&at| {
            let before = msg[..at].chars().next_back();
            let after = msg[at + k.len()..].chars().next();
            let boundary = |c: Option<char>| c.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            boundary(before) && boundary(after)
        })
    };
    keys.iter()
        .filter(|(_, _, table, entry)| match table.as_deref() {
            None => true,
            Some("rbd") => msg.contains("[rbd]"),
            Some(_) => names[*entry].as_ref().is_some_and(|n| msg.contains(&format!("'{n}'"))),
        })
        .filter_map(|(line, key, _, _)| word_at(key).map(|at| (at, *line)))
        .min()
        .map(|(_, line)| line)
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_section() {
        let c = Config::parse("home = \"/h\"\n", "t").unwrap();
        assert_eq!(c.rbd, RbdConfig::default());
        assert_eq!(c.rbd.features.join(","), "layering,exclusive-lock,object-map,fast-diff,deep-flatten");
        let c = Config::parse(
            "[rbd]\nconf = \"/c/ceph.conf\"\nclient_id = \"backup\"\nkeyring = \"/k\"\nfeatures = \"layering, exclusive-lock\"\ntimeout = 5\nin_flight = 3\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.rbd.conf.as_deref(), Some(Path::new("/c/ceph.conf")));
        assert_eq!((c.rbd.client_id.as_deref(), c.rbd.timeout_secs, c.rbd.in_flight), (Some("backup"), 5, 3));
        assert_eq!(c.rbd.features, vec!["layering", "exclusive-lock"]);
        let c = Config::parse("[rbd]\nfeatures = [\"layering\"]\n", "t").unwrap();
        assert_eq!(c.rbd.features, vec!["layering"]);
        for bad in ["[rbd]\ntimeout = 0\n", "[rbd]\nin_flight = 0\n", "[rbd]\nfeatures = 3\n", "[rbd]\npool = \"x\"\n"]
        {
            assert!(Config::parse(bad, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn file_mode_and_incomplete_grace() {
        let c = Config::parse("home = \"/h\"\n", "t").unwrap();
        assert_eq!(c.modes, crate::perms::Modes::PRIVATE);
        assert_eq!(c.incomplete_grace, chrono::Duration::days(1));
        let c = Config::parse("file_mode = \"0640\"\nincomplete_grace = \"6h\"\n", "t").unwrap();
        assert_eq!(c.modes, crate::perms::Modes { file: 0o640, dir: 0o750 });
        assert_eq!(c.incomplete_grace, chrono::Duration::hours(6));
        assert_eq!(Config::parse("file_mode = 0o660\nincomplete_grace = \"0\"\n", "t").unwrap().modes.dir, 0o770);
        assert_eq!(
            Config::parse("incomplete_grace = \"0\"\n", "t").unwrap().incomplete_grace,
            chrono::Duration::zero()
        );
        let e = Config::parse("file_mode = \"0755\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("file_mode 0755 is not allowed"), "{e}");
        let e = Config::parse("incomplete_grace = \"soon\"\n", "t").unwrap_err().to_string();
        assert!(e.contains("incomplete_grace"), "{e}");
    }

    #[test]
    fn parses_full_file() {
        let c = Config::parse(
            r#"
home = "/srv/keepfs"
database = "/srv/keepfs/meta.sqlite"
default_storage = "disk2"
block_size = "1M"
compression_level = 3
workers = 3
rm_min_age_days = 1.5
[[storage]]
name = "disk1"
kind = "file"
path = "/mnt/d1"
[[storage]]
name = "disk2"
kind = "null"
"#,
            "test",
        )
        .unwrap();
        assert_eq!(c.block_size, 1 << 20);
        assert_eq!(c.default_storage, "disk2");
        assert_eq!(c.storages.len(), 2);
        assert_eq!(c.workers, 3);
        assert_eq!(c.database, PathBuf::from("/srv/keepfs/meta.sqlite"));
        assert_eq!(c.storage("disk1").unwrap().kind, StorageKind::File { path: "/mnt/d1".into() });
    }

    #[test]
    fn the_example_file_in_contrib_parses() {
        let c = Config::parse(include_str!("../contrib/keepfs.toml"), "contrib/keepfs.toml").unwrap();
        assert_eq!(c.default_storage, "local");
        assert_eq!(c.storages.len(), 2);
        assert_eq!(c.cache_bytes, 256 << 20);
        assert_eq!(c.spool_bytes, 1 << 30);
    }

    #[test]
    fn read_cache_keys() {
        let c = Config::parse("[[storage]]\nname = \"a\"\nkind = \"null\"\nread_cache_dir = \"/var/cache/k\"\n", "t")
            .unwrap();
        assert_eq!(
            c.storages[0].read_cache,
            Some(ReadCacheConfig { dir: "/var/cache/k".into(), max_bytes: DEFAULT_READ_CACHE_BYTES })
        );
        let c = Config::parse(
            "[[storage]]\nname = \"a\"\nkind = \"null\"\nread_cache_dir = \"/c\"\nread_cache_size = \"2G\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.storages[0].read_cache.as_ref().map(|r| r.max_bytes), Some(2 << 30));
    }

    #[test]
    fn rejects_mistakes() {
        for bad in [
            "block_size = \"3M\"",
            "compression_level = 40",
            "workers = 0",
            "colour = 1",
            "[[storage]]\nname = \"a\"\nkind = \"tape\"",
            "[[storage]]\nname = \"a\"\nkind = \"file\"",
            "default_storage = \"nope\"",
            "block_size = ",
            "[[storage]]\nname = \"a\"\nkind = \"null\"\nread_cache_size = \"1G\"",
            "[[storage]]\nname = \"a\"\nkind = \"null\"\nread_cache_dir = \"relative/dir\"",
            "[[storage]]\nname = \"a\"\nkind = \"null\"\nread_cache_dir = \"/c\"\nread_cache_size = true",
        ] {
            let e = Config::parse(bad, "t.toml").unwrap_err().to_string();
            assert!(e.starts_with("configuration: t.toml: "), "{bad}: {e}");
        }
    }

    /// A value the file's syntax allows but keepfs does not is named with its line, as a
    /// syntax error is (docs/configuration.md says so; value checks named none).
    #[test]
    fn a_bad_value_names_its_line() {
        for (text, line) in [
            ("home = \"/h\"\nblock_size = \"3k\"\n", 2),
            ("\ncompression_level = 20\n", 2),
            ("workers = 0\n", 1),
            ("default_storage = \"nope\"\n[[storage]]\nname = \"a\"\nkind = \"null\"\n", 1),
            ("[[storage]]\nname = \"a\"\nkind = \"null\"\n[[storage]]\nname = \"b\"\nkind = \"ftp\"\n", 6),
            ("[[storage]]\nname = \"a\"\nkind = \"null\"\nwrite_bandwidth = \"0\"\n", 4),
            ("[rbd]\ntimeout = 0\n", 2),
            ("incomplete_grace = \"1x\"\n", 1),
        ] {
            let e = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.ends_with(&format!("(line {line})")), "{text:?}: {e}");
        }
        // A missing key: the line of the entry's key the message names (`kind`).
        let e = Config::parse("[[storage]]\nname = \"a\"\nkind = \"file\"\n", "t.toml").unwrap_err().to_string();
        assert!(e.ends_with("needs a path (line 3)"), "{e}");
        // A message naming no key of the file gets no line: none is made up.
        let e = Config::parse("[[storage]]\nname = \"a\"\nkind = \"s3\"\n", "t.toml").unwrap_err().to_string();
        assert!(!e.contains("(line"), "{e}");
    }

    /// A relative path in the file would be another place in every directory keepfs
    /// runs in (a drill backed up from one directory and restored from another: its
    /// blocks were "missing" and the version marked invalid), and an empty one is the
    /// working directory: both are refused, naming the key.
    #[test]
    fn paths_in_the_file_are_absolute() {
        for (text, key) in [
            ("home = \"relative/dir\"", "home must be an absolute path, not 'relative/dir'"),
            ("home = \"\"", "home is empty"),
            ("database = \"meta.sqlite\"", "database must be an absolute path"),
            ("database = \"\"", "database is empty"),
            ("key_file = \"k\"", "key_file must be"),
            ("database_password_file = \"pw\"", "database_password_file must be"),
            ("[[storage]]\nname = \"a\"\nkind = \"file\"\npath = \"relstore\"", "storage 'a': path must be"),
            ("[[storage]]\nname = \"a\"\nkind = \"file\"\npath = \"\"", "storage 'a': path is empty"),
            (
                "[[storage]]\nname = \"a\"\nkind = \"null\"\npassphrase_file = \"./p\"",
                "storage 'a': passphrase_file must be",
            ),
            ("[rbd]\nconf = \"ceph.conf\"", "[rbd] conf must be an absolute path, not 'ceph.conf'"),
            ("[rbd]\nkeyring = \"\"", "[rbd] keyring is empty"),
        ] {
            let e = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(e.starts_with("configuration: t.toml: ") && e.contains(key), "{text}: {e}");
        }
        let c = Config::parse(
            "home = \"/h\"\ndatabase = \"/h/m.sqlite\"\n[[storage]]\nname = \"a\"\nkind = \"file\"\npath = \"/s\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.home, PathBuf::from("/h"));
    }
}
