//! One connection to the PostgreSQL catalog's server, and how long its statements may
//! wait: opening it (TLS as `tls` decides, `sslmode=prefer`'s retry without TLS, a
//! limit on the whole handshake), running statements, transactions, a streamed query
//! and a COPY on it, and giving up on a server that stopped answering.
//!
//! A server that is down or unreachable shows itself: the connection is refused or
//! reset, or TCP gives up (`tcp_user_timeout`). A server whose processes are stopped
//! (SIGSTOP, a hung host whose kernel still runs) does not: its kernel acknowledges
//! every packet, and a statement would wait for ever. So no wait is blind here: a
//! statement with no answer after [`PATIENCE`] makes this connection ask whether the
//! server answers at all, by opening a second connection (which needs the server's
//! own processes). If it does (a long statement, a lock being waited for), the
//! statement goes on waiting; if it does not within the connect timeout, the statement
//! is given up, its connection dropped (the server rolls its transaction back when it
//! wakes), and the caller gets one line saying so. The next call connects again.
//!
//! A server that did not answer (a statement given up, a connection attempt or an idle
//! connection's check with no reply) is not asked again for the connect limit: calls
//! meanwhile fail at once with the same line. Without that, each of the calls queued
//! behind the first (a mount's requests, a cleanup's last steps, a session's end) paid
//! the whole wait again, one after another (a drill saw a mount's fifth request fail
//! after 30 s, and a cleanup after 66 s).
//!
//! The client is `tokio-postgres` on a runtime of this connection's own, driven by the
//! calling thread: the synchronous `postgres` client has no way to give up a statement
//! (nor to reach its socket from another thread).

use super::tls;
use crate::error::{Error, Result};
use futures_util::{SinkExt, StreamExt};
use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, NoTls, Row};

/// How long a statement waits for an answer before the server is asked whether it
/// answers at all (see the module comment).
const PATIENCE: Duration = Duration::from_secs(30);

fn patience() -> Duration {
    crate::test_knobs::millis("KEEPFS_TEST_CATALOG_PATIENCE_MS").unwrap_or(PATIENCE)
}

/// How long a connection attempt may take when the URL does not say (`connect_timeout`).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the catalog is and how to reach it: what a connection (and a check of the
/// server) is opened with.
pub(super) struct Target {
    pub config: Config,
    pub tls: tls::Tls,
    /// What to call the database in messages (the URL without its password).
    pub name: String,
    /// Where the password came from (or why there is none), for a refused login.
    pub password_from: String,
    /// Until when the server is taken for silent, and the line that said so (see the
    /// module comment).
    pub silent: std::sync::Mutex<Option<(Instant, String)>>,
}

impl Target {
    /// How long opening a connection may take in all: `connect_timeout` covers opening
    /// the socket only, so the handshake gets it again (plus a little).
    fn connect_limit(&self) -> Duration {
        self.config.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT) + Duration::from_secs(2)
    }

    /// The configuration without TLS (`sslmode=prefer`'s retry).
    fn plain_config(&self) -> Config {
        let mut plain = self.config.clone();
        plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
        plain
    }

    /// The line of a recent silence of the server, if it is still to be believed.
    fn silence(&self) -> Option<String> {
        let mut silent = self.silent.lock().unwrap_or_else(|p| p.into_inner());
        match &*silent {
            Some((until, line)) if Instant::now() < *until => Some(line.clone()),
            Some(_) => {
                *silent = None;
                None
            }
            None => None,
        }
    }

    /// Takes the server for silent for the connect limit, saying `line` meanwhile.
    fn fell_silent(&self, line: &str) {
        let until = Instant::now() + self.connect_limit();
        *self.silent.lock().unwrap_or_else(|p| p.into_inner()) = Some((until, line.to_string()));
    }

    /// Whether the server answers a new connection within the connect limit (a refusal
    /// it sends, too many clients say, is an answer), made as the connection being
    /// waited for was (`plain`: without TLS). The check's connection is closed at once.
    fn answers(&self, rt: &Runtime, plain: bool) -> bool {
        if self.silence().is_some() {
            return false;
        }
        let answer = if plain {
            attempt(rt, &self.plain_config(), None, self.connect_limit())
        } else {
            attempt(rt, &self.config, self.tls.connector(), self.connect_limit())
        };
        match answer {
            Some(Ok((client, io, _))) => {
                drop(client);
                end_task(rt, io);
                true
            }
            Some(Err(e)) => e.as_db_error().is_some(),
            None => false,
        }
    }
}

/// A statement that failed: the server's (or the client's) error, or one of ours (the
/// statement given up, the connection lost before).
pub(super) enum Failure {
    Client(tokio_postgres::Error),
    Given(Error),
}

impl Failure {
    /// The SQLSTATE of a server's error.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Failure::Client(e) => e.code(),
            Failure::Given(_) => None,
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Client(e) => e.into(),
            Failure::Given(e) => e,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::Catalog(describe(&e))
    }
}

/// A PostgreSQL error as one line: the server's message and code, or the client's
/// with its causes.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        // lock_not_available: the write lock (or a row) was held longer than lock_timeout.
        let hint = if *db.code() == SqlState::LOCK_NOT_AVAILABLE {
            "; another keepfs process (or a session of another client) held the catalog's lock longer than \
             lock_timeout: `keepfs database sessions` lists keepfs's, pg_stat_activity all; a stopped or hung \
             one holds it until it ends"
        } else {
            ""
        };
        return format!("{} ({}){hint}", db.message(), db.code().code());
    }
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg = format!("{msg}: {s}");
        }
        cause = c.source();
    }
    msg.replace('\n', " ")
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A connection's runtime, shut down without waiting when it goes: its tasks (the
/// socket's) are dropped at once, and a name lookup stuck in the resolver (tokio's
/// blocking pool) does not hold the caller past the connect limit.
struct Rt(Option<Runtime>);

impl Rt {
    fn new() -> Result<Rt> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the catalog connection's runtime", e))?;
        Ok(Rt(Some(rt)))
    }
}

impl std::ops::Deref for Rt {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        // Taken only by `drop`.
        self.0.as_ref().expect("a connection's runtime until it is dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(super) struct Conn {
    client: tokio_postgres::Client,
    /// The task that reads and writes the socket; aborted and driven to its end (the
    /// socket closed) when the connection is closed.
    io: std::cell::RefCell<Option<tokio::task::JoinHandle<()>>>,
    /// Why the connection ended, as the task that ran it saw it (a reset, a FATAL the
    /// server sent between statements): what the caller is told instead of "closed".
    ended: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Set when the connection was closed here (a statement given up, a failed check).
    given_up: Cell<bool>,
    /// Inside a transaction this connection began and has not yet sent COMMIT or
    /// ROLLBACK for: a statement given up there is surely not committed.
    in_tx: Cell<bool>,
    /// Connected without TLS, after `sslmode=prefer`'s retry: the check of the server
    /// ([`Target::answers`]) connects that way too.
    plain: bool,
    target: std::sync::Arc<Target>,
    /// Last: dropped after the client and the task's handle.
    rt: Rt,
}

impl Conn {
    /// Connects to `target`; under `sslmode=prefer` a connection that TLS did not get
    /// through (a failed handshake, a server whose pg_hba.conf takes this client only
    /// without TLS) is tried once more without TLS, as libpq does.
    pub fn open(target: std::sync::Arc<Target>) -> Result<Conn> {
        if let Some(line) = target.silence() {
            return Err(Error::Catalog(line));
        }
        let rt = Rt::new()?;
        let (name, tls, limit) = (&target.name, &target.tls, target.connect_limit());
        let no_answer = || {
            let line = format!(
                "cannot connect to {name}: no answer within {} s (is the server running, neither stopped nor hung, and are the host and port right?)",
                limit.as_secs()
            );
            target.fell_silent(&line);
            Error::Catalog(line)
        };
        let made = |(client, io, ended): Opened, plain: bool, rt: Rt, target: std::sync::Arc<Target>| Conn {
            client,
            io: std::cell::RefCell::new(Some(io)),
            ended,
            given_up: Cell::new(false),
            in_tx: Cell::new(false),
            plain,
            target,
            rt,
        };
        let connector = tls.connector();
        let started = connector.as_ref().map(|c| c.started.clone());
        let e = match attempt(&rt, &target.config, connector, limit).ok_or_else(no_answer)? {
            Ok(opened) => return Ok(made(opened, false, rt, target.clone())),
            Err(e) => e,
        };
        let what = describe(&e);
        let over_tls = started.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if tls.mode != tls::SslMode::Prefer || !over_tls {
            return Err(connect_error(&e, &what, &target));
        }
        match attempt(&rt, &target.plain_config(), None, limit).ok_or_else(no_answer)? {
            Ok(opened) => Ok(made(opened, true, rt, target.clone())),
            // The server wants TLS from this client: what went wrong with TLS is the story.
            Err(e2) if describe(&e2).contains("no encryption") => Err(connect_error(&e, &what, &target)),
            Err(e2) => Err(connect_error(&e2, &describe(&e2), &target)),
        }
    }

    /// Whether the connection is gone (closed by the server, or given up).
    pub fn is_closed(&self) -> bool {
        self.given_up.get() || self.client.is_closed()
    }

    /// Whether an empty statement gets its answer within the connect limit (no second
    /// chance: a connection that idled may just have been closed by a restarted server,
    /// or its path lost while the server is fine). A connection that fails the check is
    /// closed for good; whether the server answers at all is for the next connection
    /// attempt to find out.
    pub fn is_valid(&self) -> bool {
        let valid = matches!(within(&self.rt, self.target.connect_limit(), self.client.simple_query("")), Some(Ok(_)));
        if !valid {
            self.close();
        }
        valid
    }

    /// Closes the connection for good: its task is cancelled and driven to its end, so
    /// that its socket is closed now (the server rolls back what it was in as soon as it
    /// reads on), not when the runtime next runs.
    fn close(&self) {
        self.given_up.set(true);
        self.in_tx.set(false);
        if let Some(io) = self.io.borrow_mut().take() {
            end_task(&self.rt, io);
        }
    }

    /// Waits for `work` on this connection, asking the server whether it answers at all
    /// after each [`PATIENCE`] without an answer (see the module comment).
    fn wait<T>(&self, work: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>) -> Result<T, Failure> {
        if self.given_up.get() {
            return Err(Failure::Given(Error::Catalog(format!(
                "the connection to {} was given up (the server stopped answering); the next command connects again",
                self.target.name
            ))));
        }
        let mut work = std::pin::pin!(work);
        let began = Instant::now();
        loop {
            match within(&self.rt, patience(), work.as_mut()) {
                Some(Ok(t)) => return Ok(t),
                Some(Err(e)) if e.is_closed() => {
                    let why = self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    return Err(match why {
                        Some(why) => Failure::Given(Error::Catalog(format!(
                            "the connection to {} ended: {why}; the next call connects again",
                            self.target.name
                        ))),
                        None => Failure::Client(e),
                    });
                }
                Some(Err(e)) => return Err(Failure::Client(e)),
                None if self.target.answers(&self.rt, self.plain) => continue,
                None => {
                    // Mid-transaction, the server rolls back when it reads on and finds
                    // the connection closed; a COMMIT or a lone statement it had received
                    // before it stopped may still take effect when it wakes.
                    let outcome = if self.in_tx.get() {
                        "nothing of it is committed"
                    } else {
                        "if the server had received it, it may still take effect when the server wakes"
                    };
                    self.close();
                    let line = format!(
                        "the database {} stopped answering: no reply for {} s, and a new connection got none within \
                         {} s either; the statement was given up ({outcome}; is the server stopped, or its host hung?)",
                        self.target.name,
                        began.elapsed().as_secs(),
                        self.target.connect_limit().as_secs()
                    );
                    self.target.fell_silent(&line);
                    return Err(Failure::Given(Error::Catalog(line)));
                }
            }
        }
    }

    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, Failure> {
        self.wait(self.client.execute(sql, params))
    }

    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, Failure> {
        self.wait(self.client.query(sql, params))
    }

    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, Failure> {
        self.wait(self.client.query_one(sql, params))
    }

    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, Failure> {
        self.wait(self.client.query_opt(sql, params))
    }

    pub fn batch_execute(&self, sql: &str) -> Result<(), Failure> {
        self.wait(self.client.batch_execute(sql))
    }

    /// Runs `sql` and hands `f` its rows one at a time as they arrive (a table of any
    /// size in bounded memory).
    pub fn for_each_row(&self, sql: &str, params: Params<'_>, f: &mut dyn FnMut(Row) -> Result<()>) -> Result<()> {
        let rows = self.wait(self.client.query_raw(sql, params.iter().copied()))?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = self.wait(async { rows.next().await.transpose() })? {
            f(row)?;
        }
        Ok(())
    }

    /// Runs the `COPY … FROM STDIN` statement `sql`; `fill` hands its data to the
    /// writer it is given, a piece at a time.
    pub fn copy_in(
        &self,
        sql: &str,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<u64> {
        let sink = self.wait(self.client.copy_in::<_, bytes::Bytes>(sql))?;
        let mut sink = std::pin::pin!(sink);
        fill(&mut |piece| Ok(self.wait(sink.as_mut().send(bytes::Bytes::copy_from_slice(piece)))?))?;
        Ok(self.wait(sink.as_mut().finish())?)
    }

    /// Begins a transaction; it is rolled back unless [`Tx::commit`] is called.
    pub fn transaction(&mut self) -> Result<Tx<'_>, Failure> {
        self.batch_execute("BEGIN")?;
        self.in_tx.set(true);
        Ok(Tx { conn: self, open: true })
    }
}

/// A transaction on a [`Conn`]: its statements are the connection's; dropped without a
/// commit it is rolled back (or, when that fails, its connection is closed, which rolls
/// it back on the server).
pub(super) struct Tx<'a> {
    conn: &'a mut Conn,
    open: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<(), Failure> {
        self.open = false;
        self.conn.in_tx.set(false);
        self.conn.batch_execute("COMMIT")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // A ROLLBACK given up would count as a lone statement: it is one of the
        // transaction's, which the server rolls back anyway.
        if !self.conn.is_closed() && self.conn.batch_execute("ROLLBACK").is_err() {
            self.conn.close();
        }
        self.conn.in_tx.set(false);
    }
}

/// An open connection: its client, the task that runs its socket, and where that task
/// leaves the reason the connection ended.
type Opened = (tokio_postgres::Client, tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::Mutex<Option<String>>>);

/// One connection attempt within `limit` (None: no answer in time); the connection's
/// socket is then read and written by a task on `rt`.
fn attempt(
    rt: &Runtime,
    config: &Config,
    connector: Option<tls::Watched>,
    limit: Duration,
) -> Option<std::result::Result<Opened, tokio_postgres::Error>> {
    let ended = std::sync::Arc::new(std::sync::Mutex::new(None));
    let note = ended.clone();
    let run = move |r: std::result::Result<(), tokio_postgres::Error>| {
        if let Err(e) = r {
            *note.lock().unwrap_or_else(|p| p.into_inner()) = Some(describe(&e));
        }
    };
    let connecting = async {
        Ok(match connector {
            Some(c) => {
                let (client, connection) = config.connect(c).await?;
                (client, tokio::spawn(async move { run(connection.await) }), ended)
            }
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                (client, tokio::spawn(async move { run(connection.await) }), ended)
            }
        })
    };
    within(rt, limit, connecting)
}

/// Cancels a connection's task and drives it to its end, so that its socket is closed
/// now, not when the runtime next runs.
fn end_task(rt: &Runtime, io: tokio::task::JoinHandle<()>) {
    io.abort();
    let _ = rt.block_on(io);
}

/// What `work` comes to, if it comes within `limit` (the timer made inside `rt`, as
/// tokio's timers must be).
fn within<F: Future>(rt: &Runtime, limit: Duration, work: F) -> Option<F::Output> {
    rt.block_on(async { tokio::time::timeout(limit, work).await.ok() })
}

/// A failed connection as one line that says what to do; `what` is `describe(e)`.
fn connect_error(e: &tokio_postgres::Error, what: &str, target: &Target) -> Error {
    let (name, tls, password_from) = (&target.name, &target.tls, &target.password_from);
    match e.as_db_error().map(|d| d.code().code()) {
        // pg_hba.conf has no line for a connection without TLS (`hostssl` only).
        Some("28000") if what.contains("no encryption") => Error::Config(format!(
            "database {name}: {what}; the server takes this connection only over TLS: use sslmode=require, or \
             verify-full with sslrootcert=FILE"
        )),
        // ... or none for one over TLS (`hostnossl` only).
        Some("28000") if what.contains("SSL encryption") => Error::Config(format!(
            "database {name}: {what}; the server takes this connection only without TLS: use sslmode=prefer or \
             disable, or add a hostssl line to its pg_hba.conf"
        )),
        // `cert` authentication: no certificate, or one for another user.
        Some("28000") if what.contains("client certificate") || what.contains("certificate authentication") => {
            Error::Config(format!(
                "database {name}: {what}; the server authenticates this user by a client certificate: name one \
                 whose common name is the user name with sslcert=FILE&sslkey=FILE in the URL"
            ))
        }
        // invalid_password, invalid_authorization_specification
        Some("28P01" | "28000") => {
            Error::Config(format!("database {name}: {what}; check the password ({password_from})"))
        }
        // invalid_catalog_name: the database does not exist
        Some("3D000") => Error::Config(format!("database {name}: {what}; create it first (createdb)")),
        _ if what.contains("password missing") => Error::Config(format!(
            "database {name}: the server asks for a password and none is configured ({password_from}); put it in \
             the URL, database_password_file or PGPASSFILE"
        )),
        // A TLS failure (no TLS at the server, an untrusted or misnamed certificate) is
        // the configuration's to fix, as a wrong password is.
        _ => match tls.explain(e, what) {
            Some(why) => Error::Config(format!("database {name}: {why}")),
            // Something that is not a PostgreSQL server answered (or hung up) at once.
            None if e.as_db_error().is_none()
                && ["bytes remaining on stream", "unexpected message", "connection reset", "end of file", "closed"]
                    .iter()
                    .any(|m| what.to_lowercase().contains(m)) =>
            {
                Error::Catalog(format!(
                    "cannot connect to {name}: {what} (is a PostgreSQL server listening at that host and port?)"
                ))
            }
            None if what.to_lowercase().contains("refused") => Error::Catalog(format!(
                "cannot connect to {name}: {what} (is the server running, and listening on that host and port?)"
            )),
            None => Error::Catalog(format!("cannot connect to {name}: {what}")),
        },
    }
}
