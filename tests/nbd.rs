//! `keepfs nbd` with real clients from Debian (nbdinfo, nbdcopy from libnbd-bin; qemu-img
//! and qemu-io from qemu-utils) and, for what no polite client sends, a raw socket:
//! listing and mapping a sparse version, copying it bit for bit, copy-on-write writes
//! that become a new version, two writers sharing one overlay, read-only exports, a Unix
//! socket, and hostile input that must never take the server down.

mod common;
use common::mount::wait_until;
use common::nbd::Server;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sparse_vm(repo: &Repo) -> (String, std::path::PathBuf) {
    const MIB: u64 = 1 << 20;
    let img = repo.path("vm.img");
    sparse_file(&img, 64 * MIB, &[(2 * MIB, &random_bytes(1, 3 * MIB as usize)), (40 * MIB, &random_bytes(2, 4096))]);
    (repo.backup("vm.img", "vm", &["-b", "1M"]), img)
}

#[test]
fn list_map_copy_and_compare_a_sparse_version() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let srv = Server::start(&repo, &[]);
    let list = run(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", srv.addr)]));
    assert!(list.contains(&format!("export=\"{uid}\"")), "{list}");
    assert!(list.contains("description: vm "), "{list}");
    assert!(list.contains("base:allocation"), "{list}");

    // The map: data where the image has data (whole 1 MiB blocks), holes elsewhere.
    let map = run(Command::new("nbdinfo").args(["--map", &srv.url(&uid)]));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    const MIB: u64 = 1 << 20;
    assert_eq!(
        rows,
        vec![
            (0, 2 * MIB, 3),
            (2 * MIB, 3 * MIB, 0),
            (5 * MIB, 35 * MIB, 3),
            (40 * MIB, MIB, 0),
            (41 * MIB, 23 * MIB, 3)
        ],
        "{map}"
    );

    let copy = repo.path("copy.img");
    run(Command::new("nbdcopy").args([&srv.url(&uid), copy.to_str().unwrap()]));
    assert_eq!(sha256_file(&copy), sha256_file(&img));
    run(Command::new("qemu-img").args(["compare", "-f", "raw", img.to_str().unwrap(), &srv.url("vm@latest")]));
    // qemu-img map skips the holes too.
    let qmap = run(Command::new("qemu-img").args(["map", "--output=json", &srv.url(&uid)]));
    assert!(qmap.contains("\"data\": false"), "{qmap}");
}

#[test]
fn writes_become_a_copy_on_write_version_and_the_original_stays() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let before = sha256_file(&img);
    let srv = Server::start(&repo, &[]);
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0xab 1M 64k",
        &srv.url(&uid),
    ]));
    wait_until("the copy-on-write version", LIMIT, || !repo.cow_versions(&uid).is_empty());
    let new = repo.cow_versions(&uid).remove(0);
    // The served version never changes; the new one holds the writes.
    let copy = repo.path("orig.img");
    run(Command::new("nbdcopy").args([&srv.url(&uid), copy.to_str().unwrap()]));
    assert_eq!(sha256_file(&copy), before);
    let mut want = std::fs::read(&img).unwrap();
    want[1 << 20..(1 << 20) + 65536].fill(0xab);
    want[2 << 20..3 << 20].fill(0);
    let out = repo.path("new.img");
    repo.ok(&["restore", &new, &format!("file://{}", out.display())]);
    assert_eq!(std::fs::read(&out).unwrap(), want);
    assert_eq!(repo.run(&["deep-scrub", &new]).code, 0);
    let (status, log) = srv.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("committed vm as {new}")) && !log.contains("error"), "{log}");
}

#[test]
fn read_only_exports_refuse_writes_and_unix_sockets_serve() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let sock = repo.path("nbd.sock");
    let srv = Server::start(&repo, &["--read-only", "--socket", sock.to_str().unwrap()]);
    let url = format!("nbd+unix:///{uid}?socket={}", sock.display());
    let info = run(Command::new("nbdinfo").arg(&url));
    assert!(info.contains("is_read_only: true") && info.contains("can_multi_conn: true"), "{info}");
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"), "{text}");
    // A second server on the same socket is refused: it replaced the socket, took the
    // first one's clients, and on stopping left the first unreachable.
    let second = repo.run(&["nbd", "--socket", sock.to_str().unwrap()]);
    assert_eq!(second.code, 4, "{}", second.stderr);
    assert!(second.error_line().contains("another server is listening on this socket"), "{}", second.stderr);
    let copy = repo.path("c.img");
    run(Command::new("nbdcopy").args([&url, copy.to_str().unwrap()]));
    assert_eq!(sha256_file(&copy), sha256_file(&img), "the first server still answers there");
    assert!(repo.cow_versions(&uid).is_empty());
    assert!(srv.stop().0.success());
    assert!(!sock.exists(), "the socket file goes with the server");
    // Nor does a server take a path that is not a socket.
    std::fs::write(&sock, b"notes").unwrap();
    let r = repo.run(&["nbd", "--socket", sock.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.error_line().contains("something other than a socket is there"), "{}", r.stderr);
    assert_eq!(std::fs::read(&sock).unwrap(), b"notes");
}

/// A minimal client for what polite clients never send.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let mut r = Raw(s);
        let mut hello = [0u8; 18];
        r.0.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        r.0.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        r
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }
    /// The type of the next option reply (its data skipped).
    fn option_reply(&mut self) -> u32 {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut skip = vec![0u8; len as usize];
        self.0.read_exact(&mut skip).unwrap();
        u32::from_be_bytes(h[12..16].try_into().unwrap())
    }
    /// Enters transmission on `export` (NBD_OPT_EXPORT_NAME); returns its size.
    fn export(&mut self, export: &str) -> u64 {
        self.option(1, export.as_bytes());
        let mut b = [0u8; 10];
        self.0.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }
    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r).unwrap();
    }
    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(1, 0, cookie, offset, data.len() as u32, data);
        assert_eq!(self.reply(), (0, cookie));
    }
    fn disconnect(mut self) {
        self.request(2, 0, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.0.read_to_end(&mut rest);
    }
    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn two_writers_share_one_overlay_and_make_one_version() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let srv = Server::start(&repo, &[]);
    let (mut a, mut b) = (Raw::connect(&srv.addr), Raw::connect(&srv.addr));
    a.export(&uid);
    b.export(&uid);
    a.write(1, 0, &[0x11; 4096]);
    b.write(2, 8 << 20, &[0x22; 4096]);
    a.disconnect();
    // B still writes after A has gone: still the same overlay, no version yet.
    b.write(3, 9 << 20, &[0x33; 4096]);
    assert!(repo.cow_versions(&uid).is_empty(), "no version while a writer is connected");
    b.disconnect();
    wait_until("the shared overlay's version", LIMIT, || !repo.cow_versions(&uid).is_empty());
    let v = repo.cow_versions(&uid);
    assert_eq!(v.len(), 1, "{v:?}");
    let mut want = std::fs::read(&img).unwrap();
    want[..4096].fill(0x11);
    want[8 << 20..(8 << 20) + 4096].fill(0x22);
    want[9 << 20..(9 << 20) + 4096].fill(0x33);
    let out = repo.path("shared.img");
    repo.ok(&["restore", &v[0], &format!("file://{}", out.display())]);
    assert_eq!(std::fs::read(&out).unwrap(), want);
}

#[test]
fn hostile_clients_get_errors_or_a_closed_connection_and_others_are_still_served() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let srv = Server::start(&repo, &[]);
    let size = 64u64 << 20;

    // Handshake: an unknown option is NBD_REP_ERR_UNSUP; a huge one ERR_TOO_BIG; an
    // unknown export ERR_UNKNOWN; then a bad option magic closes the connection.
    let mut c = Raw::connect(&srv.addr);
    c.option(99, b"x");
    assert_eq!(c.option_reply(), (1 << 31) + 1);
    c.option(99, &vec![0u8; 100 << 10]);
    assert_eq!(c.option_reply(), (1 << 31) + 9);
    let mut go = 7u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"V999999");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(7, &go);
    assert_eq!(c.option_reply(), (1 << 31) + 6);
    c.option(5, &[]);
    assert_eq!(c.option_reply(), (1 << 31) + 1, "STARTTLS without TLS configured: unsupported");
    c.0.write_all(b"NOTMAGIC\0\0\0\x01\0\0\0\0").unwrap();
    assert!(c.closed());

    // Transmission: past the end, unknown commands and flags, oversized reads.
    let mut c = Raw::connect(&srv.addr);
    assert_eq!(c.export(&uid), size);
    c.request(0, 0, 10, size - 512, 1024, &[]);
    assert_eq!(c.reply(), (22, 10), "read past the end: EINVAL");
    c.request(1, 0, 11, size, 512, &[0u8; 512]);
    assert_eq!(c.reply(), (28, 11), "write past the end: ENOSPC");
    c.request(42, 0, 12, 0, 0, &[]);
    assert_eq!(c.reply(), (22, 12), "unknown command: EINVAL");
    c.request(0, 1 << 7, 13, 0, 512, &[]);
    assert_eq!(c.reply(), (22, 13), "unknown flag: EINVAL");
    c.request(0, 0, 14, 0, 64 << 20, &[]);
    assert_eq!(c.reply(), (75, 14), "a 64 MiB read: EOVERFLOW");
    c.request(7, 0, 15, 0, 4096, &[]);
    assert_eq!(c.reply(), (22, 15), "block status without a meta context: EINVAL");
    // A bad request magic ends the connection.
    c.0.write_all(&[0xff; 28]).unwrap();
    assert!(c.closed());

    // A client that dies in the middle of a write's payload, and one that sends a
    // write larger than any payload.
    let mut c = Raw::connect(&srv.addr);
    c.export(&uid);
    c.request(1, 0, 20, 0, 1 << 20, &[7u8; 1000]);
    drop(c);
    let mut c = Raw::connect(&srv.addr);
    c.export(&uid);
    c.request(1, 0, 21, 0, u32::MAX, &[]);
    assert_eq!(c.reply(), (75, 21));
    assert!(c.closed());

    // A client that sends reads and never takes the replies does not hold up others.
    let mut stuck = Raw::connect(&srv.addr);
    stuck.export(&uid);
    for i in 0..64 {
        stuck.request(0, 0, 100 + i, 0, 16 << 20, &[]);
    }
    let copy = repo.path("meanwhile.img");
    run(Command::new("nbdcopy").args([&srv.url(&uid), copy.to_str().unwrap()]));
    assert_eq!(sha256_file(&copy), sha256_file(&img));
    drop(stuck);

    // The dead writers' overlays made no versions (nothing was written whole).
    wait_until("the server to settle", LIMIT, || repo.cow_versions(&uid).len() <= 1);
    let list = run(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", srv.addr)]));
    assert!(list.contains(&uid), "still serving: {list}");
}

#[test]
fn sigterm_ends_connections_and_keeps_what_they_wrote() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let srv = Server::start(&repo, &[]);
    let mut c = Raw::connect(&srv.addr);
    c.export(&uid);
    c.write(1, 4096, &[0x5a; 4096]);
    let (status, log) = srv.stop();
    assert!(status.success(), "a clean stop: {log}");
    assert!(c.closed(), "the client was disconnected");
    let v = repo.cow_versions(&uid);
    assert_eq!(v.len(), 1, "the connected writer's overlay became a version: {v:?}");
    let mut want = std::fs::read(&img).unwrap();
    want[4096..8192].fill(0x5a);
    let out = repo.path("after-stop.img");
    repo.ok(&["restore", &v[0], &format!("file://{}", out.display())]);
    assert_eq!(std::fs::read(&out).unwrap(), want);
}

/// With a certificate the server requires TLS (the protocol's FORCEDTLS mode): libnbd's
/// tools and qemu connect through NBD_OPT_STARTTLS with a self-signed certificate, a
/// plain client is refused, and writes through TLS become a version as ever.
#[test]
fn tls_with_a_self_signed_certificate() {
    let repo = Repo::new();
    let (uid, img) = sparse_vm(&repo);
    let certs = repo.path("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = (certs.join("ca-cert.pem"), repo.path("key.pem"));
    run(Command::new("openssl").args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]).args([
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    let srv = Server::start(&repo, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let port = srv.addr.rsplit(':').next().unwrap().to_string();
    let url = |export: &str| format!("nbds://localhost:{port}/{export}?tls-certificates={}", certs.display());

    let info = run(Command::new("nbdinfo").arg(url(&uid)));
    assert!(info.contains("with TLS"), "{info}");
    let copy = repo.path("tls-copy.img");
    run(Command::new("nbdcopy").args([&url(&uid), copy.to_str().unwrap()]));
    assert_eq!(sha256_file(&copy), sha256_file(&img));

    let plain = Command::new("nbdinfo").arg(srv.url(&uid)).output().unwrap();
    assert!(!plain.status.success(), "a client without TLS is refused");

    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", certs.display());
    let opts =
        format!("driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={uid},tls-creds=tls0");
    run(Command::new("qemu-io").args(["--object", &creds, "--image-opts", &opts, "-c", "write -P 0x77 0 64k"]));
    wait_until("the version written through TLS", LIMIT, || !repo.cow_versions(&uid).is_empty());
    let out = repo.path("tls-new.img");
    repo.ok(&["restore", &repo.cow_versions(&uid)[0], &format!("file://{}", out.display())]);
    let mut want = std::fs::read(&img).unwrap();
    want[..65536].fill(0x77);
    assert_eq!(std::fs::read(&out).unwrap(), want);

    // A certificate that is not one is a one-line error at the start.
    let bad = repo.run(&["nbd", "--tls-cert", key.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.error_line().contains("TLS certificate"), "{}", bad.stderr);
    let (status, log) = srv.stop();
    assert!(status.success(), "{log}");
}
