//! keepfs-nbd: the NBD server face of keepfs. It serves versions as network block devices
//! (exports named by uid, or `NAME@latest`) and only translates the protocol: every read
//! and write goes to the engine's session service ([`Sessions`]), which owns the rules
//! that turn writes into versions, exactly as for the FUSE filesystem. A writable
//! connection's writes go to an overlay of the version; at disconnect the overlay becomes
//! a new version labelled `keepfs.cow-of=<uid>` (two connections writing one export share
//! the overlay, and the version is made when the last of them goes).
//!
//! Per connection: the connection's thread reads requests and hands them to a few
//! workers, so requests are served in parallel and replies may leave out of order; the
//! bytes of requests in flight are bounded ([`MAX_IN_FLIGHT`]), and a client that stops
//! reading its replies is dropped after [`WRITE_TIMEOUT`]. Other connections are never
//! held up by one.
//!
//! ## Locks
//! `Conn::reply` (the socket's writing half) and `Conn::budget` are leaf locks: nothing
//! else is taken while one is held, and only `reply` is held across I/O (one reply's
//! bytes go out together). A TLS session's state (`Tls::session`) is a leaf lock too, held
//! only for in-memory work (decrypting what the socket gave, encrypting a reply), never
//! across socket I/O: the reading thread reads the socket without it, and a reply is
//! encrypted under it and then sent under `reply` alone. Order where both are held:
//! `reply`, then `session`.

pub mod proto;

use keepfs_face::log;

use keepfs_face::{Fh, Opener, ReadRef, Sessions, VersionEntry};
use proto::*;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of requests (write payloads and read lengths) one connection may have in flight.
pub const MAX_IN_FLIGHT: u64 = 64 << 20;
/// A client that does not take a reply within this time is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client must finish the handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests of one connection served at once.
const WORKERS: usize = 4;
/// Connections served at once; more are refused (closed at once).
const MAX_CONNECTIONS: usize = 256;
/// Descriptors in one block status reply.
const MAX_EXTENTS: usize = 4096;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// How the server treats its clients.
#[derive(Clone, Debug, Default)]
pub struct NbdOptions {
    /// Every export is read-only (writes fail with EPERM); clients may use several
    /// connections at once (NBD_FLAG_CAN_MULTI_CONN).
    pub read_only: bool,
    /// TLS is required (the protocol's FORCEDTLS mode): every client must upgrade with
    /// NBD_OPT_STARTTLS before anything else. See [`tls_config`].
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A TLS configuration from a PEM certificate chain and its PEM private key; the error
/// says which file is wrong.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> io::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", what.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("the certificate and key do not go together: {e}"))
    })?;
    Ok(Arc::new(config))
}

/// Where the server listens.
pub struct Listener {
    socket: Socket,
    state: Arc<ServerState>,
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn new(socket: Socket) -> Listener {
        let state = Arc::new(ServerState { stopping: AtomicBool::new(false), conns: Mutex::new(Default::default()) });
        Listener { socket, state }
    }

    fn state(&self) -> Arc<ServerState> {
        self.state.clone()
    }

    pub fn tcp(addr: &str) -> io::Result<Listener> {
        Ok(Listener::new(Socket::Tcp(TcpListener::bind(addr)?)))
    }

    /// Listens on a Unix socket at `path`. A socket left by a server that is gone is
    /// replaced; one a live server answers on is refused (replacing it took that
    /// server's clients and, once this one stopped, left it unreachable), and so is
    /// anything else at that path.
    pub fn unix(path: PathBuf) -> io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                // Only a socket nobody answers on (ECONNREFUSED) is stale: one this user
                // may not connect to (EACCES) may well be live.
                match std::os::unix::net::UnixStream::connect(&path) {
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(&path)?,
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another server is listening on this socket; stop it, or choose another path",
                        ));
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!(
                                "a socket is there that may be in use ({e}); remove it if it is stale, or choose another path"
                            ),
                        ));
                    }
                }
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "something other than a socket is there; choose another path",
                ));
            }
            Err(_) => {}
        }
        Ok(Listener::new(Socket::Unix(UnixListener::bind(&path)?, path)))
    }

    /// What a client connects to: `127.0.0.1:10809` or the socket's path.
    pub fn describe(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into()),
            Socket::Unix(_, p) => p.display().to_string(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match &self.socket {
            Socket::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Socket::Unix(l, _) => Stream::Unix(l.accept()?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix(_, p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session over a socket (after NBD_OPT_STARTTLS). Each clone has its own
    /// handle of the socket and shares the session, so one thread can read requests while
    /// workers send replies, as on a plain socket.
    Tls(Tls),
}

/// How much of a reply is encrypted at once.
const TLS_PIECE: usize = 256 << 10;

/// One side of a TLS session: the shared session state, this side's socket handle, and
/// (for the reading side) ciphertext read from the socket that the session has not yet
/// taken in.
struct Tls {
    session: Arc<Mutex<rustls::ServerConnection>>,
    raw: Box<Stream>,
    pending: Vec<u8>,
    eof: bool,
}

impl Tls {
    /// Runs the TLS handshake on `raw` (nothing else uses the socket yet).
    fn accept(config: Arc<rustls::ServerConfig>, raw: &Stream) -> io::Result<Tls> {
        let mut session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        let mut sock = raw.try_clone()?;
        while session.is_handshaking() {
            let (rd, wr) = session.complete_io(&mut sock)?;
            if rd == 0 && wr == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the client left during the TLS handshake"));
            }
        }
        while session.wants_write() {
            session.write_tls(&mut sock)?;
        }
        Ok(Tls { session: Arc::new(Mutex::new(session)), raw: Box::new(sock), pending: Vec::new(), eof: false })
    }

    fn try_clone(&self) -> io::Result<Tls> {
        Ok(Tls { session: self.session.clone(), raw: Box::new(self.raw.try_clone()?), pending: Vec::new(), eof: false })
    }

    /// Plaintext from the session; the socket is read with no lock held.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut s = lock_tls(&self.session);
                match s.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if !self.pending.is_empty() {
                    let took = s.read_tls(&mut &self.pending[..])?;
                    self.pending.drain(..took);
                    s.process_new_packets().map_err(io::Error::other)?;
                    continue;
                }
                if self.eof {
                    // The socket ended without the client's close_notify.
                    return Ok(0);
                }
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self.raw.read(&mut chunk)?;
            if n == 0 {
                self.eof = true;
                let mut s = lock_tls(&self.session);
                s.read_tls(&mut &[][..])?;
                let _ = s.process_new_packets();
            }
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// Encrypts `buf` under the session's lock, then sends it with the lock released, a
    /// piece at a time, so a 32 MiB reply neither holds the reader up for long nor is
    /// held twice in memory.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(TLS_PIECE + 1024);
        for piece in buf.chunks(TLS_PIECE) {
            out.clear();
            {
                let mut s = lock_tls(&self.session);
                let mut rest = piece;
                while !rest.is_empty() {
                    let n = s.writer().write(rest)?;
                    rest = &rest[n..];
                    let mut drained = 0;
                    while s.wants_write() {
                        drained += s.write_tls(&mut out)?;
                    }
                    if n == 0 && drained == 0 {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "the TLS session takes no more data"));
                    }
                }
            }
            self.raw.write_all(&out)?;
        }
        Ok(())
    }
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.try_clone()?),
        })
    }
    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
            Stream::Tls(tls) => tls.raw.set_write_timeout(t),
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(tls) => tls.raw.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(t) => {
                t.raw.shutdown();
                Ok(())
            }
        };
    }
}

fn lock_tls<T>(t: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(t) => t.write_all(buf).map(|()| buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::Tls(t) => t.raw.flush(),
        }
    }
}

/// Stops a running [`serve`] from another thread (a signal handler's thread).
#[derive(Clone)]
pub struct Stopper {
    state: Arc<ServerState>,
    listener_fd: std::os::fd::RawFd,
}

struct ServerState {
    stopping: AtomicBool,
    /// A clone of each live connection's socket, to end it at a stop.
    conns: Mutex<std::collections::HashMap<Opener, Stream>>,
}

impl Stopper {
    /// Stops accepting and ends every connection; each connection's writes still become
    /// a version (its overlay is committed as at a disconnect) before [`serve`] returns.
    pub fn stop(&self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on the listening socket's descriptor, which stays open
        // until `serve` returns; it makes a blocked accept(2) return.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        for s in self.state.conns.lock().unwrap_or_else(|p| p.into_inner()).values() {
            s.shutdown();
        }
    }
}

impl Listener {
    /// A handle that stops the server serving on this listener.
    pub fn stopper(&self) -> Stopper {
        use std::os::fd::AsRawFd;
        let listener_fd = match &self.socket {
            Socket::Tcp(l) => l.as_raw_fd(),
            Socket::Unix(l, _) => l.as_raw_fd(),
        };
        Stopper { state: self.state.clone(), listener_fd }
    }
}

/// Serves clients until [`Stopper::stop`] (then returns once every connection has
/// ended) or until the listener fails. Each connection has its own thread.
pub fn serve<S: Sessions>(sessions: Arc<S>, listener: Listener, opts: NbdOptions) -> io::Result<()> {
    // Openers of the session service: far from process ids, one per connection.
    let next_opener = AtomicU32::new(0x4000_0000);
    let live = Arc::new(AtomicUsize::new(0));
    let state = listener.state();
    let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let result = loop {
        let stream = match listener.accept() {
            _ if state.stopping.load(Ordering::SeqCst) => break Ok(()),
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ECONNABORTED)) => {
                log!("keepfs: nbd: accepting a connection failed ({e})");
                continue;
            }
            Err(e) => break Err(e),
        };
        threads.retain(|t| !t.is_finished());
        if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            stream.shutdown();
            continue;
        }
        let opener = next_opener.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            state.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(opener, c);
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (sessions, opts, live, state) = (sessions.clone(), opts.clone(), live.clone(), state.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = connection(sessions, stream, &opts, opener)
                && e.kind() != io::ErrorKind::UnexpectedEof
            {
                log!("keepfs: nbd: connection {opener:#x} ended: {e}");
            }
            state.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&opener);
            live.fetch_sub(1, Ordering::SeqCst);
        }));
    };
    for t in threads {
        let _ = t.join();
    }
    result
}

/// What the handshake agreed on.
struct Agreed {
    version: VersionEntry,
    structured: bool,
    allocation: bool,
    /// The export, opened before the client was told yes (see [`handshake`]).
    fh: Fh,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// The export called `name`: a uid, or `NAME@latest`.
fn find_export<S: Sessions>(sessions: &S, name: &str) -> io::Result<Option<VersionEntry>> {
    let versions = sessions.versions()?;
    Ok(match name.strip_suffix("@latest") {
        Some(n) => versions.iter().rev().find(|v| v.name == n).cloned(),
        None => versions.iter().find(|v| v.uid == name).cloned(),
    })
}

/// What a client is told when `what` cannot be looked up now (the catalog failed),
/// instead of a connection closed without a word. The reason stays in the server's log
/// (it names the catalog, which is no client's business); the client gets the errno.
fn unavailable(what: &str, e: &io::Error) -> String {
    let kind =
        e.raw_os_error().map(|n| io::Error::from_raw_os_error(n).to_string()).unwrap_or_else(|| e.kind().to_string());
    format!("{what} cannot be looked up now ({kind}); the server's log says why; try again")
}

fn transmission_flags(opts: &NbdOptions) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if opts.read_only {
        // Reads of a version are the same through every connection.
        f |= FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    f
}

fn description(v: &VersionEntry) -> String {
    format!("{} {}", v.name, v.date_text)
}

/// How option haggling ended.
enum Outcome {
    /// NBD_OPT_ABORT.
    Abort,
    /// Transmission on this export.
    Go(Agreed),
    /// NBD_OPT_STARTTLS was acknowledged: the haggling starts over inside TLS.
    StartTls,
}

/// The fixed-newstyle handshake's greeting; returns whether the client asked for no
/// zeroes after NBD_OPT_EXPORT_NAME.
fn greet(r: &mut impl Read, w: &mut impl Write) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let client = read_u32(r)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("unknown client flags"));
    }
    Ok(client & FLAG_C_NO_ZEROES != 0)
}

/// Option haggling. With TLS configured and not yet started, only NBD_OPT_STARTTLS and
/// NBD_OPT_ABORT are served (NBD_REP_ERR_TLS_REQD for the rest, a closed connection for
/// NBD_OPT_EXPORT_NAME): the protocol's FORCEDTLS mode.
///
/// The export is opened (for writing too, unless read-only: see [`connection`]) before
/// the client is told yes, so that a version that cannot be opened now (its catalog
/// failed) is an error reply with a reason, not a connection closed after the yes; the
/// handle is released again if the yes cannot be sent.
#[allow(clippy::too_many_arguments)]
fn handshake<S: Sessions>(
    sessions: &S,
    r: &mut impl Read,
    w: &mut impl Write,
    opts: &NbdOptions,
    no_zeroes: bool,
    in_tls: bool,
    opener: Opener,
) -> io::Result<Outcome> {
    let (mut structured, mut allocation) = (false, false);
    let tls_required = opts.tls.is_some() && !in_tls;
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        let option = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            if len > 16 * MAX_OPTION {
                return Err(invalid("option too large"));
            }
            io::copy(&mut r.take(len as u64), &mut io::sink())?;
            w.write_all(&option_reply(option, REP_ERR_TOO_BIG, b"option too large"))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        let reply = |w: &mut dyn Write, kind: u32, data: &[u8]| w.write_all(&option_reply(option, kind, data));
        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                return Err(invalid("NBD_OPT_EXPORT_NAME without TLS"));
            }
            reply(w, REP_ERR_TLS_REQD, b"this server requires TLS: use NBD_OPT_STARTTLS")?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // The client cannot be told why: the connection ends (as the protocol says).
                let Some(v) = find_export(sessions, &name)? else { return Err(invalid("no such export")) };
                let fh = sessions.open_version(&v.uid, !opts.read_only, opener)?.fh;
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&v.size.to_be_bytes());
                out.extend_from_slice(&transmission_flags(opts).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                if let Err(e) = w.write_all(&out) {
                    let _ = sessions.release(fh);
                    return Err(e);
                }
                return Ok(Outcome::Go(Agreed { version: v, structured, allocation, fh }));
            }
            OPT_ABORT => {
                reply(w, REP_ACK, &[])?;
                return Ok(Outcome::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(w, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let versions = match sessions.versions() {
                    Ok(v) => v,
                    Err(e) => {
                        reply(w, REP_ERR_UNKNOWN, unavailable("the exports", &e).as_bytes())?;
                        continue;
                    }
                };
                for v in versions.iter() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(v.uid.len() as u32).to_be_bytes());
                    d.extend_from_slice(v.uid.as_bytes());
                    d.extend_from_slice(description(v).as_bytes());
                    reply(w, REP_SERVER, &d)?;
                }
                reply(w, REP_ACK, &[])?;
            }
            OPT_STARTTLS => match (&opts.tls, in_tls) {
                (None, _) => reply(w, REP_ERR_UNSUP, b"TLS is not configured on this server")?,
                (Some(_), true) => reply(w, REP_ERR_INVALID, b"TLS is already on")?,
                (Some(_), false) if !data.is_empty() => reply(w, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?,
                (Some(_), false) => {
                    reply(w, REP_ACK, &[])?;
                    return Ok(Outcome::StartTls);
                }
            },
            OPT_INFO | OPT_GO => {
                let Some(req) = parse_info(&data) else {
                    reply(w, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                    continue;
                };
                let v = match find_export(sessions, &req.name) {
                    Ok(Some(v)) => v,
                    Ok(None) => {
                        let msg = format!("no export '{}': exports are version uids and NAME@latest", req.name);
                        reply(w, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    }
                    Err(e) => {
                        reply(w, REP_ERR_UNKNOWN, unavailable(&format!("export '{}'", req.name), &e).as_bytes())?;
                        continue;
                    }
                };
                let fh = if option == OPT_GO {
                    match sessions.open_version(&v.uid, !opts.read_only, opener) {
                        Ok(o) => Some(o.fh),
                        Err(e) => {
                            reply(w, REP_ERR_UNKNOWN, unavailable(&format!("export '{}'", req.name), &e).as_bytes())?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let mut answer = || -> io::Result<()> {
                    let mut info = Vec::new();
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&v.size.to_be_bytes());
                    info.extend_from_slice(&transmission_flags(opts).to_be_bytes());
                    reply(w, REP_INFO, &info)?;
                    if req.infos.contains(&INFO_NAME) {
                        let mut d = INFO_NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(v.uid.as_bytes());
                        reply(w, REP_INFO, &d)?;
                    }
                    if req.infos.contains(&INFO_DESCRIPTION) {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(description(&v).as_bytes());
                        reply(w, REP_INFO, &d)?;
                    }
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&v.block_size.clamp(4096, MAX_PAYLOAD).to_be_bytes());
                    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    reply(w, REP_INFO, &d)?;
                    reply(w, REP_ACK, &[])
                };
                if let Err(e) = answer() {
                    if let Some(fh) = fh {
                        let _ = sessions.release(fh);
                    }
                    return Err(e);
                }
                if let Some(fh) = fh {
                    return Ok(Outcome::Go(Agreed { version: v, structured, allocation, fh }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(w, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else {
                    structured = true;
                    reply(w, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                let Some(req) = parse_meta(&data) else {
                    reply(w, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if set && !structured {
                    reply(w, REP_ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                match find_export(sessions, &req.name) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        reply(w, REP_ERR_UNKNOWN, format!("no export '{}'", req.name).as_bytes())?;
                        continue;
                    }
                    Err(e) => {
                        reply(w, REP_ERR_UNKNOWN, unavailable(&format!("export '{}'", req.name), &e).as_bytes())?;
                        continue;
                    }
                }
                let selected =
                    if req.queries.is_empty() { !set } else { req.queries.iter().any(|q| selects_base_allocation(q)) };
                if set {
                    allocation = selected;
                }
                if selected {
                    let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(w, REP_META_CONTEXT, &d)?;
                }
                reply(w, REP_ACK, &[])?;
            }
            _ => reply(w, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

struct Conn<S: Sessions> {
    sessions: Arc<S>,
    size: u64,
    read_only: bool,
    structured: bool,
    allocation: bool,
    /// The connection's handle: on a writable export an overlay, opened at the
    /// handshake (see `connection`), through which reads go too.
    fh: Fh,
    reply: Mutex<Stream>,
    /// Bytes of requests in flight.
    budget: Mutex<u64>,
    freed: Condvar,
    dead: AtomicBool,
}

struct Job {
    req: Request,
    payload: Vec<u8>,
    cost: u64,
}

impl<S: Sessions> Conn<S> {
    /// Sends one reply's parts together; a client gone or stuck ends the connection.
    fn send(&self, parts: &[&[u8]]) {
        let mut w = self.reply.lock().unwrap_or_else(|p| p.into_inner());
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let r = parts.iter().try_for_each(|p| w.write_all(p)).and_then(|_| w.flush());
        if r.is_err() {
            self.dead.store(true, Ordering::SeqCst);
            w.shutdown();
        }
    }

    fn reply_error(&self, req: &Request, error: u32, msg: &str) {
        if self.structured {
            let mut p = error.to_be_bytes().to_vec();
            let m = &msg.as_bytes()[..msg.len().min(4096)];
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m);
            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req.cookie, p.len() as u32);
            self.send(&[&h, &p]);
        } else {
            self.send(&[&simple_reply(error, req.cookie)]);
        }
    }

    fn reply_ok(&self, req: &Request) {
        self.send(&[&simple_reply(0, req.cookie)]);
    }

    fn take_budget(&self, cost: u64) {
        let mut used = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + cost > MAX_IN_FLIGHT {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += cost;
    }

    fn give_budget(&self, cost: u64) {
        *self.budget.lock().unwrap_or_else(|p| p.into_inner()) -= cost;
        self.freed.notify_all();
    }

    fn in_bounds(&self, req: &Request) -> bool {
        req.offset.checked_add(req.length as u64).is_some_and(|end| end <= self.size)
    }

    /// Serves a request [`check`] has admitted (a write only on a writable export, block
    /// status only with `base:allocation` negotiated).
    fn serve(&self, job: Job) {
        let req = job.req;
        match req.kind {
            CMD_READ => self.read(&req),
            CMD_WRITE => {
                let r = self.sessions.write(self.fh, req.offset, &job.payload);
                self.answer(&req, r);
            }
            // A trim only says the client no longer needs the bytes: acknowledged as is
            // (zeroing a whole device's worth through the overlay would take minutes).
            CMD_TRIM => self.reply_ok(&req),
            CMD_WRITE_ZEROES => {
                let r = (|| {
                    let (mut pos, end) = (req.offset, req.offset + req.length as u64);
                    while pos < end {
                        let n = (end - pos).min(ZEROS.len() as u64) as usize;
                        self.sessions.write(self.fh, pos, &ZEROS[..n])?;
                        pos += n as u64;
                    }
                    Ok(())
                })();
                self.answer(&req, r);
            }
            // Writes become durable, as a version, when the last writer disconnects;
            // a flush has nothing to do before then (see docs/nbd.md).
            CMD_FLUSH | CMD_CACHE => self.reply_ok(&req),
            CMD_BLOCK_STATUS => self.block_status(&req),
            _ => self.reply_error(&req, EINVAL, "unknown command"),
        }
    }

    fn answer(&self, req: &Request, r: io::Result<()>) {
        match r {
            Ok(()) => self.reply_ok(req),
            Err(e) => self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
        }
    }

    fn read(&self, req: &Request) {
        let fh = self.fh;
        let (start, end) = (req.offset, req.offset + req.length as u64);
        if !self.structured {
            let mut buf = vec![0u8; req.length as usize];
            match self.sessions.read(fh, start, &mut buf) {
                Ok(n) if n == buf.len() => self.send(&[&simple_reply(0, req.cookie), &buf]),
                Ok(_) => self.reply_error(req, EIO, "short read"),
                Err(e) => self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
            }
            return;
        }
        // Structured: holes as OFFSET_HOLE chunks (nothing read, nothing sent), data as
        // OFFSET_DATA chunks, then a final empty chunk.
        let mut pos = start;
        while pos < end {
            let ext = match self.sessions.extent(fh, pos, end) {
                Ok(e) => e,
                Err(e) => return self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
            };
            match ext.data {
                Some(d) if d.start <= pos => {
                    let n = (d.end.min(end) - pos) as usize;
                    let h = |len: usize| chunk_header(0, REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len as u32);
                    // Inside one cached block: sent straight from it, without a copy.
                    match self.sessions.read_ref(fh, pos, n) {
                        Ok(Some(ReadRef::Shared(block, range))) if !range.is_empty() => {
                            let bytes = &(*block).as_ref()[range];
                            self.send(&[&h(bytes.len()), &pos.to_be_bytes(), bytes]);
                            pos += bytes.len() as u64;
                            continue;
                        }
                        Err(e) => return self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
                        _ => {}
                    }
                    let mut buf = vec![0u8; n];
                    match self.sessions.read(fh, pos, &mut buf) {
                        Ok(got) if got == n => {}
                        Ok(_) => return self.reply_error(req, EIO, "short read"),
                        Err(e) => return self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
                    }
                    self.send(&[&h(n), &pos.to_be_bytes(), &buf]);
                    pos += n as u64;
                }
                next => {
                    let hole_end = next.map(|d| d.start).unwrap_or(ext.size).min(end).max(pos + 1).min(end);
                    let n = (hole_end - pos) as u32;
                    let mut p = pos.to_be_bytes().to_vec();
                    p.extend_from_slice(&n.to_be_bytes());
                    let h = chunk_header(0, REPLY_TYPE_OFFSET_HOLE, req.cookie, p.len() as u32);
                    self.send(&[&h, &p]);
                    pos = hole_end;
                }
            }
        }
        self.send(&[&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0)]);
    }

    fn block_status(&self, req: &Request) {
        let fh = self.fh;
        let end = req.offset + req.length as u64;
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && extents.len() < if one { 1 } else { MAX_EXTENTS } {
            let ext = match self.sessions.extent(fh, pos, end) {
                Ok(e) => e,
                Err(e) => return self.reply_error(req, nbd_error(e.raw_os_error()), &e.to_string()),
            };
            let (upto, flags) = match ext.data {
                Some(d) if d.start <= pos => (d.end, 0),
                next => (next.map(|d| d.start).unwrap_or(ext.size), STATE_HOLE | STATE_ZERO),
            };
            // Lengths are 32 bits: a long extent is reported in 2 GiB pieces.
            let upto = upto.min(end).min(pos + (1 << 31)).max(pos + 1);
            let len = (upto - pos) as u32;
            match extents.last_mut() {
                Some((l, f)) if *f == flags && (*l as u64 + len as u64) < (1 << 31) => *l += len,
                _ => extents.push((len, flags)),
            }
            pos = upto;
        }
        let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (len, flags) in extents {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, req.cookie, p.len() as u32);
        self.send(&[&h, &p]);
    }
}

/// Checks a request before it is served; the error to answer if it cannot be.
fn check<S: Sessions>(c: &Conn<S>, req: &Request) -> Option<(u32, &'static str)> {
    let allowed = CMD_FLAG_FUA
        | match req.kind {
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if req.flags & !allowed != 0 {
        return Some((EINVAL, "unsupported command flags"));
    }
    match req.kind {
        CMD_READ | CMD_CACHE | CMD_BLOCK_STATUS if !c.in_bounds(req) => Some((EINVAL, "request past the end")),
        CMD_READ if req.length > MAX_PAYLOAD => Some((EOVERFLOW, "read larger than 32 MiB")),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if c.read_only => Some((EPERM, "the export is read-only")),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !c.in_bounds(req) => Some((ENOSPC, "write past the end")),
        CMD_BLOCK_STATUS if !c.allocation => Some((EINVAL, "no metadata context was negotiated")),
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => {
            None
        }
        _ => Some((EINVAL, "unknown command")),
    }
}

fn connection<S: Sessions>(sessions: Arc<S>, stream: Stream, opts: &NbdOptions, opener: Opener) -> io::Result<()> {
    stream.set_write_timeout(WRITE_TIMEOUT)?;
    // A client that opens a connection and says nothing does not hold a slot for long.
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut r = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let mut w = stream.try_clone()?;
    let no_zeroes = greet(&mut r, &mut w)?;
    let agreed = match handshake(&*sessions, &mut r, &mut w, opts, no_zeroes, false, opener)? {
        Outcome::Abort => return Ok(()),
        Outcome::Go(a) => a,
        Outcome::StartTls => {
            // The client waits for our ACK before it starts TLS: nothing may be buffered.
            if !r.buffer().is_empty() {
                return Err(invalid("data after NBD_OPT_STARTTLS"));
            }
            let config = opts.tls.clone().ok_or_else(|| invalid("TLS is not configured"))?;
            let tls = Stream::Tls(Tls::accept(config, &stream)?);
            r = BufReader::with_capacity(256 << 10, tls.try_clone()?);
            w = tls;
            match handshake(&*sessions, &mut r, &mut w, opts, no_zeroes, true, opener)? {
                Outcome::Go(a) => a,
                _ => return Ok(()),
            }
        }
    };
    // A writable export was opened for writing at once (in the handshake): the
    // connection then shares a live overlay from its first read on, and a write can never
    // start a fresh overlay over the original after it has read another connection's
    // committed writes (an overlay never written is dropped at the disconnect).
    let fh = agreed.fh;
    if let Err(e) = stream.set_read_timeout(None) {
        let _ = sessions.release(fh);
        return Err(e);
    }
    let conn = Arc::new(Conn {
        sessions: sessions.clone(),
        size: agreed.version.size,
        read_only: opts.read_only,
        structured: agreed.structured,
        allocation: agreed.allocation,
        fh,
        reply: Mutex::new(w),
        budget: Mutex::new(0),
        freed: Condvar::new(),
        dead: AtomicBool::new(false),
    });
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(WORKERS * 2);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (conn, rx) = (conn.clone(), rx.clone());
            std::thread::spawn(move || {
                loop {
                    // Only the wait for the next job holds the queue's lock.
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(job) = job else { break };
                    let cost = job.cost;
                    conn.serve(job);
                    conn.give_budget(cost);
                }
            })
        })
        .collect();
    let result = requests(&conn, &mut r, &tx);
    drop(tx);
    for t in workers {
        let _ = t.join();
    }
    // The last writer to go makes the overlay a version (or drops it, by the service's
    // policy); a failure is logged, since the client is gone.
    let done = sessions.flush(fh, opener).and_then(|_| sessions.release(fh));
    if let Err(e) = done {
        log!("keepfs: nbd: the writes of connection {opener:#x} could not become a version: {e}");
    }
    if let Ok(w) = conn.reply.lock() {
        w.shutdown();
    }
    result
}

/// Reads requests until the client disconnects, handing each to the workers.
fn requests<S: Sessions>(
    conn: &Arc<Conn<S>>,
    r: &mut impl Read,
    tx: &std::sync::mpsc::SyncSender<Job>,
) -> io::Result<()> {
    let mut header = [0u8; REQUEST_LEN];
    loop {
        if conn.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the client stopped taking replies"));
        }
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = parse_request(&header).ok_or_else(|| invalid("bad request magic"))?;
        if req.kind == CMD_WRITE && req.length > MAX_PAYLOAD {
            // Its payload cannot be taken in: the stream cannot be followed any more.
            conn.reply_error(&req, EOVERFLOW, "write larger than 32 MiB");
            return Err(invalid("write larger than 32 MiB"));
        }
        let cost = match req.kind {
            CMD_READ | CMD_WRITE => req.length as u64,
            _ => 0,
        };
        conn.take_budget(cost);
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            payload = vec![0u8; req.length as usize];
            r.read_exact(&mut payload)?;
        }
        if req.kind == CMD_DISC {
            conn.give_budget(cost);
            return Ok(());
        }
        if let Some((error, msg)) = check(conn, &req) {
            conn.reply_error(&req, error, msg);
            conn.give_budget(cost);
            continue;
        }
        let job = Job { req, payload, cost };
        if tx.send(job).is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The whole connection (handshake, option haggling, requests) fed arbitrary byte
    //! streams, each built from real protocol pieces mixed with noise: it must end (no
    //! hang, within a deadline) and never panic. The engine is replaced by a 1 MiB image
    //! of zeros held in memory, since only the protocol is under test here.
    use super::*;
    use std::time::SystemTime;

    struct Zeros;

    fn unsupported<T>() -> io::Result<T> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    impl Sessions for Zeros {
        fn versions(&self) -> io::Result<Arc<Vec<VersionEntry>>> {
            Ok(Arc::new(vec![VersionEntry {
                uid: "V0000000001".into(),
                name: "vm".into(),
                snapshot: String::new(),
                date: SystemTime::UNIX_EPOCH,
                date_text: "1970-01-01T00:00:00Z".into(),
                size: 1 << 20,
                block_size: 65536,
                status: "valid".into(),
                protected: false,
                labels: Vec::new(),
            }]))
        }
        fn data_bytes(&self, _: &str) -> io::Result<u64> {
            Ok(0)
        }
        fn open_version(&self, _: &str, _: bool, _: Opener) -> io::Result<keepfs_face::Opened> {
            Ok(keepfs_face::Opened { fh: 1, volatile: false })
        }
        fn overlay_size(&self, _: &str) -> Option<u64> {
            None
        }
        fn resize_overlay(&self, _: &str, _: u64) -> io::Result<()> {
            unsupported()
        }
        fn create_incoming(&self, _: &str, _: bool, _: Opener) -> io::Result<Fh> {
            unsupported()
        }
        fn open_incoming(&self, _: &str, _: bool, _: Opener) -> io::Result<Fh> {
            unsupported()
        }
        fn incoming_exists(&self, _: &str, _: Option<Opener>) -> bool {
            false
        }
        fn incoming_size(&self, _: &str) -> Option<u64> {
            None
        }
        fn incoming_names(&self) -> Vec<String> {
            Vec::new()
        }
        fn resize_incoming(&self, _: &str, _: u64) -> io::Result<()> {
            unsupported()
        }
        fn rename_incoming(&self, _: &str, _: &str) -> io::Result<()> {
            unsupported()
        }
        fn remove_incoming(&self, _: &str) -> io::Result<()> {
            unsupported()
        }
        fn incoming_labels(&self, _: &str) -> io::Result<Vec<(String, String)>> {
            unsupported()
        }
        fn set_incoming_label(&self, _: &str, _: &str, _: &str) -> io::Result<()> {
            unsupported()
        }
        fn remove_incoming_label(&self, _: &str, _: &str) -> io::Result<bool> {
            unsupported()
        }
        fn incoming_snapshot(&self, _: &str) -> io::Result<String> {
            unsupported()
        }
        fn set_incoming_snapshot(&self, _: &str, _: &str) -> io::Result<()> {
            unsupported()
        }
        fn read(&self, _: Fh, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min((1u64 << 20).saturating_sub(offset) as usize);
            buf[..n].fill(0);
            Ok(n)
        }
        fn read_ref(&self, _: Fh, _: u64, _: usize) -> io::Result<Option<ReadRef>> {
            Ok(None)
        }
        fn extent(&self, _: Fh, offset: u64, _: u64) -> io::Result<keepfs_face::Extent> {
            Ok(keepfs_face::Extent { size: 1 << 20, data: (offset < 4096).then_some(offset..4096) })
        }
        fn write(&self, _: Fh, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self, _: Fh, _: Opener) -> io::Result<()> {
            Ok(())
        }
        fn release(&self, _: Fh) -> io::Result<()> {
            Ok(())
        }
        fn shutdown(&self) {}
    }

    use crate::proto::tests::Rng;

    /// A client's bytes: real pieces (flags, options, requests) with random fields, and
    /// now and then plain noise or a cut.
    fn stream(rng: &mut Rng) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
        for _ in 0..rng.below(6) {
            let opt =
                [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT, 99]
                    [rng.below(7) as usize];
            let mut data = Vec::new();
            match opt {
                OPT_INFO | OPT_GO => {
                    let name: &[u8] = if rng.below(2) == 0 { b"V0000000001" } else { b"vm@latest" };
                    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    data.extend_from_slice(name);
                    let infos = rng.below(3) as u16;
                    data.extend_from_slice(&infos.to_be_bytes());
                    for _ in 0..infos {
                        data.extend_from_slice(&(rng.below(5) as u16).to_be_bytes());
                    }
                }
                OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                    data.extend_from_slice(&11u32.to_be_bytes());
                    data.extend_from_slice(b"V0000000001");
                    data.extend_from_slice(&1u32.to_be_bytes());
                    data.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
                    data.extend_from_slice(BASE_ALLOCATION.as_bytes());
                }
                _ => {}
            }
            if rng.below(5) == 0 {
                let at = rng.below(data.len() as u64 + 1) as usize;
                data.truncate(at);
            }
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&opt.to_be_bytes());
            let len = if rng.below(8) == 0 { rng.next() as u32 } else { data.len() as u32 };
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&data);
        }
        if rng.below(4) != 0 {
            // Mostly, then, a well-formed NBD_OPT_GO into transmission.
            let mut go = 11u32.to_be_bytes().to_vec();
            go.extend_from_slice(b"V0000000001");
            go.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&(go.len() as u32).to_be_bytes());
            b.extend_from_slice(&go);
        }
        for _ in 0..rng.below(8) {
            let kind = rng.below(10) as u16;
            let flags = if rng.below(4) == 0 { rng.next() as u16 } else { 0 };
            let offset = if rng.below(4) == 0 { rng.next() } else { rng.below(1 << 20) };
            let len = if rng.below(4) == 0 { rng.next() as u32 } else { rng.below(70_000) as u32 };
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&rng.next().to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            if kind == CMD_WRITE {
                let n = (len as u64).min(rng.below(80_000)) as usize;
                b.extend(std::iter::repeat_n(0xa5, n));
            }
        }
        if rng.below(4) == 0 {
            let noise = rng.below(64) as usize;
            let at = rng.below(b.len() as u64 + 1) as usize;
            b.splice(at..at, (0..noise).map(|_| rng.next() as u8));
        }
        if rng.below(4) == 0 {
            let at = rng.below(b.len() as u64 + 1) as usize;
            b.truncate(at);
        }
        b
    }

    #[test]
    fn arbitrary_client_bytes_end_the_connection_without_a_panic_or_a_hang() {
        let sessions = Arc::new(Zeros);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let opts = NbdOptions::default();
        let mut served = 0;
        for round in 0..1500 {
            let bytes = stream(&mut rng);
            let (ours, theirs) = UnixStream::pair().unwrap();
            let (sessions, opts) = (sessions.clone(), opts.clone());
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let server = std::thread::spawn(move || {
                let _ = connection(sessions, Stream::Unix(theirs), &opts, round);
                let _ = done_tx.send(());
            });
            // The client writes everything, closes its side, and takes every reply.
            let mut writer = ours.try_clone().unwrap();
            let feeder = std::thread::spawn(move || {
                let _ = writer.write_all(&bytes);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let mut sink = Vec::new();
            let mut reader = ours;
            reader.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = reader.read_to_end(&mut sink);
            done_rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("round {round} hung"));
            server.join().unwrap_or_else(|_| panic!("round {round} panicked"));
            feeder.join().unwrap();
            let replied = |magic: u32| sink.windows(4).any(|w| w == magic.to_be_bytes());
            if replied(SIMPLE_REPLY_MAGIC) || replied(STRUCTURED_REPLY_MAGIC) {
                served += 1;
            }
        }
        assert!(served >= 100, "only {served} streams reached the transmission phase");
    }
}
