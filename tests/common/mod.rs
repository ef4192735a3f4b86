//! Helpers for tests that drive the real `keepfs` binary against a repository in a
//! temporary directory, the way a user's shell session would.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const KEEPFS: &str = env!("CARGO_BIN_EXE_keepfs");

pub struct Repo {
    pub dir: tempfile::TempDir,
    /// The PostgreSQL catalog of this repository when the tests run against PostgreSQL
    /// (see [`TestDatabase`]); None: the embedded SQLite file.
    pub catalog: Option<TestDatabase>,
}

/// The test-only switch: with `KEEPFS_TEST_POSTGRES=postgresql://user:pw@host:port/`
/// set, every test repository gets a fresh PostgreSQL database of its own as its
/// catalog (created here, dropped when the test ends) instead of the SQLite file.
pub const TEST_POSTGRES: &str = "KEEPFS_TEST_POSTGRES";

/// Whether the tests run against PostgreSQL catalogs.
pub fn postgres_mode() -> bool {
    std::env::var(TEST_POSTGRES).is_ok_and(|v| !v.is_empty())
}

/// For tests that look into the SQLite file itself (damage it, hold its write lock):
/// true, after saying so, when the catalog is PostgreSQL, where they do not apply.
pub fn sqlite_only(what: &str) -> bool {
    if postgres_mode() {
        eprintln!("not run against PostgreSQL: {what} is about the SQLite catalog file");
        return true;
    }
    false
}

/// A PostgreSQL database made for one test repository; dropped with it.
pub struct TestDatabase {
    pub url: String,
    base: String,
    name: String,
}

impl TestDatabase {
    /// A new, empty database on the server `KEEPFS_TEST_POSTGRES` names; None when unset.
    pub fn create() -> Option<TestDatabase> {
        let base = std::env::var(TEST_POSTGRES).ok().filter(|v| !v.is_empty())?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("keepfs_test_{}_{n}_{nanos}", std::process::id());
        let base = base.trim_end_matches('/').to_string();
        let mut admin = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("{TEST_POSTGRES}={base}: cannot connect: {e}"));
        admin.batch_execute(&format!("CREATE DATABASE {name}")).expect("create the test database");
        Some(TestDatabase { url: format!("{base}/{name}"), base, name })
    }
}

impl TestDatabase {
    /// Drops the database and makes it again, empty: a lost catalog.
    pub fn recreate(&self) {
        let mut admin = postgres::Client::connect(&format!("{}/postgres", self.base), postgres::NoTls).unwrap();
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {}", self.name)).unwrap();
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&format!("{}/postgres", self.base), postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// The embedded configuration for a repository under `home`, with its own PostgreSQL
/// catalog when the tests run against PostgreSQL (keep the database while it is used).
pub fn embedded_config(home: PathBuf) -> (keepfs::config::Config, Option<TestDatabase>) {
    let mut c = keepfs::config::Config::embedded(home);
    let db = TestDatabase::create();
    if let Some(db) = &db {
        c.database_url = Some(db.url.clone());
    }
    (c, db)
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The one-line error of a failed command.
    pub fn error_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or("")
    }
}

/// No single command of the tests takes more than seconds; a hang fails its test by
/// name instead of eating the CI run's time.
pub const COMMAND_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs a command to its end like `Command::output`, but kills it and fails the test
/// when it runs longer than `limit`.
pub fn output_within(mut cmd: Command, limit: std::time::Duration, what: &str) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_output_within(child, limit, what)
}

/// Waits for a started child (its output piped) like `Child::wait_with_output`, but
/// kills it and fails the test when it runs longer than `limit`.
pub fn wait_output_within(child: std::process::Child, limit: std::time::Duration, what: &str) -> Output {
    let pid = child.id().to_string();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            let _ = Command::new("kill").args(["-9", &pid]).status();
            return true;
        }
        false
    });
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    let _ = done.send(());
    let fired = watchdog.join().unwrap_or(false);
    assert!(!fired, "{what} did not finish within {limit:?} and was killed (a hang)");
    out
}

impl Repo {
    pub fn new() -> Repo {
        Repo { dir: tempfile::tempdir().expect("temp dir"), catalog: TestDatabase::create() }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("file://{}", self.path(name).display())
    }

    pub fn storage(&self) -> PathBuf {
        self.home().join("storage")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(KEEPFS);
        c.args(args)
            .env("KEEPFS_HOME", self.home())
            .env_remove("KEEPFS_CONFIG")
            .env_remove("KEEPFS_DATABASE")
            .env_remove("KEEPFS_HOST");
        if let Some(db) = &self.catalog {
            c.env("KEEPFS_DATABASE", &db.url);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// Runs a command with these environment variables set, and no key from the
    /// test's own environment.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        c.env_remove("KEEPFS_PASSPHRASE").env_remove("KEEPFS_KEY_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = output_within(c, COMMAND_LIMIT, &format!("keepfs {args:?}"));
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "keepfs {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
        r.stdout
    }

    /// Backs up an image file and returns the new version uid.
    pub fn backup(&self, image: &str, name: &str, extra: &[&str]) -> String {
        let url = self.url(image);
        let mut args = vec!["backup", url.as_str(), name];
        args.extend_from_slice(extra);
        self.ok(&args).trim().to_string()
    }

    /// Restores a version to a new file and returns its sha256.
    pub fn restore_sha(&self, uid: &str, out: &str) -> String {
        let url = self.url(out);
        self.ok(&["restore", uid, &url]);
        let s = sha256_file(&self.path(out));
        std::fs::remove_file(self.path(out)).expect("remove restored file");
        s
    }

    /// The file of the object that holds `block` (content-addressed: blocks/ab/cd/<sha256>).
    pub fn object_file(&self, block: &[u8]) -> PathBuf {
        let id = hex::encode(Sha256::digest(block));
        self.storage().join(format!("blocks/{}/{}/{id}", &id[0..2], &id[2..4]))
    }

    /// Number of block objects in the file storage.
    pub fn block_objects(&self) -> usize {
        count_files(&self.storage().join("blocks"))
    }

    /// A repository in a temporary directory whose catalog is `database` (a URL or a
    /// path), named in a configuration file as a user sets it up (see [`Repo::set_database`]).
    pub fn with_database(database: &str, top: &str, storage: &str) -> Repo {
        let repo = Repo { dir: tempfile::tempdir().unwrap(), catalog: None };
        repo.set_database(database, top, storage);
        repo
    }

    /// Writes `keepfs.toml`: `database` as the catalog, `top` (whole lines) at the top
    /// level, and one file storage under the home with `storage` (whole lines) in it.
    pub fn set_database(&self, database: &str, top: &str, storage: &str) {
        let config = format!(
            "home = \"{home}\"\ndatabase = \"{database}\"\n{top}[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{home}/storage\"\n{storage}",
            home = self.home().display()
        );
        std::fs::write(self.path("keepfs.toml"), config).unwrap();
    }

    /// The configuration file [`Repo::set_database`] writes.
    pub fn config_file(&self) -> String {
        self.path("keepfs.toml").to_str().unwrap().to_string()
    }

    /// Runs keepfs with the configuration file [`Repo::set_database`] writes.
    pub fn run_cfg(&self, args: &[&str]) -> Run {
        let cfg = self.config_file();
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// [`Repo::run_cfg`] that must succeed; its standard output.
    pub fn ok_cfg(&self, args: &[&str]) -> String {
        let r = self.run_cfg(args);
        assert_eq!(r.code, 0, "keepfs {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
        r.stdout
    }

    /// Object rows a cleanup holds (`deleting`), read from the catalog directly.
    pub fn deleting_objects(&self) -> i64 {
        let sql = "SELECT count(*) FROM objects WHERE state = 1";
        match &self.catalog {
            Some(db) => postgres::Client::connect(&db.url, postgres::NoTls)
                .expect("connect to the test database")
                .query_one(sql, &[])
                .expect("count deleting objects")
                .get(0),
            None => rusqlite::Connection::open(self.home().join("keepfs.sqlite"))
                .expect("open the database")
                .query_row(sql, [], |r| r.get(0))
                .expect("count deleting objects"),
        }
    }

    /// Runs one SQL statement on the repository's catalog directly (to make a catalog
    /// look as an older keepfs left it); returns the rows it changed.
    pub fn catalog_sql(&self, sql: &str) -> u64 {
        match &self.catalog {
            Some(db) => postgres::Client::connect(&db.url, postgres::NoTls)
                .expect("connect to the test database")
                .execute(sql, &[])
                .expect("run SQL on the catalog"),
            None => rusqlite::Connection::open(self.home().join("keepfs.sqlite"))
                .expect("open the database")
                .execute(sql, [])
                .expect("run SQL on the catalog") as u64,
        }
    }

    /// The first column of the first row `sql` gives, read from the repository's catalog
    /// directly; the database's error as text when it refuses the query.
    pub fn catalog_query(&self, sql: &str) -> Result<i64, String> {
        match &self.catalog {
            Some(db) => postgres::Client::connect(&db.url, postgres::NoTls)
                .expect("connect to the test database")
                .query_one(sql, &[])
                .map(|r| r.get(0))
                .map_err(|e| e.to_string()),
            None => rusqlite::Connection::open(self.home().join("keepfs.sqlite"))
                .expect("open the database")
                .query_row(sql, [], |r| r.get(0))
                .map_err(|e| e.to_string()),
        }
    }

    /// The catalog's schema version, read from the catalog directly.
    pub fn schema_version(&self) -> i64 {
        let sql = if self.catalog.is_some() { "SELECT version FROM keepfs_schema" } else { "PRAGMA user_version" };
        self.catalog_query(sql).expect("read the schema version")
    }

    pub fn ls_json(&self, filter: Option<&str>) -> serde_json::Value {
        let mut args = vec!["ls", "--format", "json"];
        if let Some(f) = filter {
            args.insert(1, f);
        }
        serde_json::from_str(&self.ok(&args)).expect("ls json")
    }

    /// The uids of the valid versions a filter selects, oldest first.
    pub fn valid_uids(&self, filter: &str) -> Vec<String> {
        self.ls_json(Some(filter))
            .as_array()
            .expect("ls json is a list")
            .iter()
            .filter(|v| v["status"] == "valid")
            .map(|v| v["uid"].as_str().expect("uid").to_string())
            .collect()
    }

    /// The valid copy-on-write versions made of `uid`.
    pub fn cow_versions(&self, uid: &str) -> Vec<String> {
        self.valid_uids(&format!("labels[\"keepfs.cow-of\"] == \"{uid}\""))
    }

    pub fn version(&self, uid: &str) -> serde_json::Value {
        let all = self.ls_json(None);
        all.as_array().unwrap().iter().find(|v| v["uid"] == uid).cloned().expect("version listed")
    }
}

/// What a running backup has done so far, as its repository records it.
#[derive(Debug)]
pub struct BackupState {
    /// The newest version's status, once it exists.
    pub status: Option<String>,
    /// The pid of the process writing the newest version, while it lives.
    pub owner_pid: Option<u32>,
    /// Block objects recorded in the database (present: stored and durable).
    pub recorded: u64,
    /// Block object files in the storage.
    pub stored: usize,
    /// Object rows a cleanup has marked `deleting`.
    pub deleting: u64,
}

/// How long a test waits for a state before it fails.
pub const POLL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits for a state: asks `f` until it answers, every 25 ms, for at most [`POLL_LIMIT`]
/// (then `None`). The one polling loop of the tests ([`mount::wait_until`] uses it).
pub fn poll<T>(f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_for(POLL_LIMIT, f)
}

pub fn poll_for<T>(limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let started = std::time::Instant::now();
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if started.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// Stops a running child (SIGSTOP) and returns once the kernel says it has stopped.
pub fn stop(child: &std::process::Child) -> Frozen {
    let pid = child.id() as i32;
    // SAFETY: kill(2) on the pid of a running child of this test.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "stop the backup");
    let mut status = 0;
    // SAFETY: waitpid for a child of this process; WUNTRACED returns once it stopped.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    assert!(r == pid && libc::WIFSTOPPED(status), "the backup did not stop: {status:#x}");
    Frozen { pid }
}

/// A process stopped with SIGSTOP; it continues (SIGCONT) when this is dropped, also when
/// the test fails, so that no stopped process is left behind.
pub struct Frozen {
    pid: i32,
}

impl Frozen {
    pub fn resume(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not waited for.
        unsafe {
            libc::kill(self.pid, libc::SIGCONT);
        }
    }
}

impl Repo {
    /// Waits until the backup `child` reaches a state where `ready` holds, and stops it
    /// there. The state is read while the test holds the database's write lock, and the
    /// process is stopped before the lock is let go: the backup can neither record
    /// objects nor commit its version meanwhile, so it is stopped in the state `ready`
    /// saw, holding no database lock. Events are ordered by states, never by sleeping.
    pub fn freeze_backup(
        &self,
        child: &std::process::Child,
        what: &str,
        mut ready: impl FnMut(&BackupState) -> bool,
    ) -> Frozen {
        if let Some(catalog) = &self.catalog {
            return self.freeze_backup_pg(&catalog.url, child, what, ready);
        }
        let db = self.home().join("keepfs.sqlite");
        let mut last = None;
        poll(|| {
            if !db.exists() {
                return None;
            }
            let mut conn = rusqlite::Connection::open(&db).expect("open the database");
            conn.busy_timeout(POLL_LIMIT).unwrap();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).expect("write lock");
            let newest = tx
                .query_row(
                    "SELECT v.status, s.pid FROM versions v LEFT JOIN sessions s ON s.id = v.session_id \
                     ORDER BY v.uid DESC LIMIT 1",
                    [],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)),
                )
                .ok();
            let recorded: i64 =
                tx.query_row("SELECT count(*) FROM objects WHERE state = 0", [], |r| r.get(0)).unwrap_or(0);
            let deleting: i64 =
                tx.query_row("SELECT count(*) FROM objects WHERE state=1", [], |r| r.get(0)).unwrap_or(0);
            let state = self.backup_state(newest, recorded, deleting);
            // Stopped while the test holds the write lock, which goes with `tx` after.
            let frozen = ready(&state).then(|| stop(child));
            last = Some(state);
            frozen
        })
        .unwrap_or_else(|| panic!("the backup never reached {what}; last seen {last:?}"))
    }

    /// [`Repo::freeze_backup`] on a PostgreSQL catalog: the catalog's write lock is its
    /// advisory lock, held in a transaction while the state is read and the process stopped.
    pub fn freeze_backup_pg(
        &self,
        url: &str,
        child: &std::process::Child,
        what: &str,
        mut ready: impl FnMut(&BackupState) -> bool,
    ) -> Frozen {
        let mut last = None;
        let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect to the test database");
        poll(|| {
            let mut tx = client.transaction().expect("transaction");
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&keepfs::catalog::postgres::WRITE_LOCK])
                .expect("write lock");
            let has_tables = tx
                .query_one(
                    "SELECT to_regclass('public.versions') IS NOT NULL AND to_regclass('public.objects') IS NOT NULL",
                    &[],
                )
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false);
            if !has_tables {
                return None;
            }
            let newest = tx
                .query_opt(
                    "SELECT v.status, s.pid FROM versions v LEFT JOIN sessions s ON s.id = v.session_id \
                     ORDER BY v.uid DESC LIMIT 1",
                    &[],
                )
                .expect("read the newest version")
                .map(|r| (r.get::<_, String>(0), r.get::<_, Option<i64>>(1)));
            let recorded: i64 =
                tx.query_one("SELECT count(*) FROM objects WHERE state = 0", &[]).map(|r| r.get(0)).unwrap_or(0);
            let deleting: i64 =
                tx.query_one("SELECT count(*) FROM objects WHERE state=1", &[]).map(|r| r.get(0)).unwrap_or(0);
            let state = self.backup_state(newest, recorded, deleting);
            // Unlike SQLite's, a PostgreSQL lock a client waits for is granted by the
            // server even while the client is stopped: a backup stopped while waiting
            // would then hold the write lock. Stop it only when nobody waits.
            let waiting = |tx: &mut postgres::Transaction| -> i64 {
                tx.query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                     WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()",
                    &[],
                )
                .map(|r| r.get(0))
                .unwrap_or(0)
            };
            let frozen = (waiting(&mut tx) == 0 && ready(&state)).then(|| stop(child));
            // A request for the lock sent between the count and the stop is waiting now
            // (seen under load in CI): then let the backup go on (dropping `Frozen`
            // continues it) and look again. Once it is stopped it sends nothing more.
            let frozen = frozen.filter(|_| waiting(&mut tx) == 0);
            last = Some(state);
            frozen
        })
        .unwrap_or_else(|| panic!("the backup never reached {what}; last seen {last:?}"))
    }

    /// What [`Repo::freeze_backup`] sees: the newest version's status and owner's pid, the
    /// objects recorded in the catalog and those stored.
    fn backup_state(&self, newest: Option<(String, Option<i64>)>, recorded: i64, deleting: i64) -> BackupState {
        BackupState {
            deleting: deleting as u64,
            status: newest.as_ref().map(|n| n.0.clone()),
            owner_pid: newest.and_then(|n| n.1).map(|p| p as u32),
            recorded: recorded as u64,
            stored: self.block_objects(),
        }
    }

    /// Loses the catalog, as a dead disk or a dropped database does: the SQLite file
    /// (with its WAL and shared-memory files), or the PostgreSQL database (made again,
    /// empty).
    pub fn lose_catalog(&self) {
        match &self.catalog {
            Some(db) => db.recreate(),
            None => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", self.home().join("keepfs.sqlite").display()));
                }
            }
        }
    }

    /// The configuration of this repository for tests that open it with the engine
    /// (the embedded default, on the test's PostgreSQL catalog when there is one).
    pub fn engine_config(&self) -> keepfs::config::Config {
        let mut c = keepfs::config::Config::embedded(self.home());
        c.database_url = self.catalog.as_ref().map(|d| d.url.clone());
        c
    }
}

pub fn count_files(dir: &Path) -> usize {
    files_under(dir).len()
}

pub fn sha256_file(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            return hex::encode(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MiB.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image of `blocks` blocks of `bs` bytes plus `tail` bytes: zero, compressible and
/// random blocks in turn, with some duplicates.
pub fn mixed_image(seed: u64, blocks: usize, bs: usize, tail: usize) -> Vec<u8> {
    let mut img = Vec::with_capacity(blocks * bs + tail);
    for i in 0..blocks {
        match i % 5 {
            0 => img.extend(std::iter::repeat_n(0u8, bs)),
            1 => img.extend(std::iter::repeat_n(b'a' + (i % 7) as u8, bs)),
            2 if i >= 5 => {
                let start = (i - 5) * bs;
                img.extend_from_within(start..start + bs);
            }
            _ => img.extend(random_bytes(seed * 1000 + i as u64, bs)),
        }
    }
    img.extend(random_bytes(seed * 7777, tail));
    img
}

/// Makes a sparse file of `size` bytes holding each `(offset, bytes)` of `data` and holes
/// elsewhere; returns it open for writing (to truncate it later).
pub fn sparse_file(path: &Path, size: u64, data: &[(u64, &[u8])]) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    for (offset, bytes) in data {
        f.write_all_at(bytes, *offset).unwrap();
    }
    f
}

/// Every regular file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub mod garage;
pub mod mount;
pub mod nbd;
pub mod pg;
pub mod s3fault;

/// Flips one bit of a file in place, the way a failing disk does.
pub fn flip_bit(path: &Path, offset: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open to damage");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read the byte to damage");
    b[0] ^= mask;
    f.write_all_at(&b, offset).expect("write the damaged byte");
}

impl Repo {
    /// The metadata database file of the embedded default repository.
    pub fn db_file(&self) -> PathBuf {
        self.home().join("keepfs.sqlite")
    }

    /// Moves everything from the database's WAL into its main file, so that damage done
    /// to the main file is what SQLite reads (no keepfs command runs meanwhile).
    pub fn checkpoint_db(&self) {
        let conn = rusqlite::Connection::open(self.db_file()).expect("open the database");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)).expect("checkpoint");
    }

    /// Changes version `uid`'s stored index in the catalog, SQLite or PostgreSQL, as damage
    /// or a hand edit would (no keepfs command runs meanwhile).
    pub fn edit_index(&self, uid: &str, edit: impl FnOnce(&mut Vec<u8>)) {
        let n: i64 = uid[1..].parse().expect("a version uid");
        if let Some(db) = &self.catalog {
            let mut c = postgres::Client::connect(&db.url, postgres::NoTls).expect("connect to the test catalog");
            let mut data: Vec<u8> = c.query_one("SELECT data FROM version_index WHERE uid=$1", &[&n]).unwrap().get(0);
            edit(&mut data);
            c.execute("UPDATE version_index SET data=$2 WHERE uid=$1", &[&n, &data]).unwrap();
        } else {
            let conn = rusqlite::Connection::open(self.db_file()).expect("open the database");
            let mut data: Vec<u8> =
                conn.query_row("SELECT data FROM version_index WHERE uid=?1", [n], |r| r.get(0)).unwrap();
            edit(&mut data);
            conn.execute("UPDATE version_index SET data=?2 WHERE uid=?1", rusqlite::params![n, data]).unwrap();
        }
    }
}

/// A child keepfs process the test stops at a test knob; killed if the test fails
/// before it lets it go on.
pub struct Stoppable(Option<std::process::Child>);

impl Stoppable {
    /// Starts `keepfs ARGS` with the knob `knob` set and waits until it has stopped there
    /// (its state in /proc), failing with its output if it ends first.
    pub fn start(repo: &Repo, args: &[&str], knob: &str) -> Stoppable {
        Self::start_with_env(repo, args, knob, &[])
    }

    /// [`Stoppable::start`] with these environment variables set too.
    pub fn start_with_env(repo: &Repo, args: &[&str], knob: &str, env: &[(&str, &str)]) -> Stoppable {
        let child = repo
            .command(args)
            .env(knob, "1")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = Stoppable(Some(child));
        let pid = s.pid();
        mount::wait_until(&format!("keepfs {args:?} to stop at {knob}"), std::time::Duration::from_secs(60), || {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next());
            if matches!(state, Some(Some('Z')) | None) {
                let out = s.0.take().unwrap().wait_with_output().unwrap();
                panic!("keepfs {args:?} ended before {knob}: {}", String::from_utf8_lossy(&out.stderr));
            }
            state == Some(Some('T'))
        });
        s
    }

    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// Lets it go on; its standard output once it has ended with exit code 0.
    pub fn finish(self) -> String {
        let out = self.go_on();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Lets it go on; its output once it has ended.
    pub fn go_on(mut self) -> Output {
        // SAFETY: kill has no memory effects.
        assert_eq!(unsafe { libc::kill(self.pid(), libc::SIGCONT) }, 0);
        wait_output_within(self.0.take().unwrap(), COMMAND_LIMIT, "a stopped keepfs let go on")
    }
}

impl Drop for Stoppable {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
