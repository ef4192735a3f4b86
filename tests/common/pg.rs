//! A real PostgreSQL server for the tests of the PostgreSQL catalog: Debian's server
//! binaries (`/usr/lib/postgresql/*/bin`), a data directory in a temporary directory,
//! a free port on 127.0.0.1, password (scram-sha-256) authentication for user `keepfs`.
//! Stopped and removed when dropped. As root the server runs as the `postgres` user.
//! [`PgServer::start_tls`] starts one that accepts TCP connections only over TLS, with a
//! certificate from a CA the test makes with `openssl` in the server's directory.

use std::path::PathBuf;
use std::process::Command;

pub const USER: &str = "keepfs";
pub const PASSWORD: &str = "keepfs-test";

pub struct PgServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// TLS on (`ssl=on`, server.crt/server.key in `dir`).
    ssl: bool,
}

fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|b| b.join("pg_ctl").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().expect("no PostgreSQL server in /usr/lib/postgresql (apt-get install postgresql)")
}

/// Runs `openssl ARGS` in `dir`, failing the test with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl PgServer {
    fn as_server(&self, tool: &str) -> Command {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        };
        c.current_dir(self.dir.path());
        c
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.as_server(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Starts a new server and makes the `keepfs` role (allowed to create databases).
    pub fn start() -> PgServer {
        Self::start_with(false, "host all all 127.0.0.1/32 scram-sha-256")
    }

    /// As [`PgServer::start`], with TLS: a CA (`ca.pem` in `dir`) signs the server's
    /// certificate for 127.0.0.1 and localhost; the server listens on 127.0.0.1 and
    /// 127.0.0.2 (a host its certificate does not name) and its pg_hba.conf has only
    /// `hostssl` lines, so a connection without TLS is rejected.
    pub fn start_tls() -> PgServer {
        Self::start_with(true, "hostssl all all 127.0.0.0/8 scram-sha-256")
    }

    /// As [`PgServer::start_tls`], with `hba` as pg_hba.conf's TCP line instead of the
    /// `hostssl` one (e.g. `hostnossl …`: TLS offered, but refused for this client).
    pub fn start_tls_with_hba(hba: &str) -> PgServer {
        Self::start_with(true, hba)
    }

    /// A CA of its own (`NAME.pem`, `NAME.key` in `dir`), unrelated to any other.
    pub fn make_ca(&self, name: &str) -> PathBuf {
        let d = self.dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=keepfs test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
        d.join(format!("{name}.pem"))
    }

    /// A key (`NAME.key`, readable by its owner only) and a certificate (`NAME.crt`) for
    /// subject `/CN=cn`, signed by the CA `ca` (made by [`PgServer::make_ca`]) with the
    /// X.509 extensions `ext`.
    fn issue(&self, name: &str, cn: &str, ca: &str, ext: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let (key, csr, crt, extfile) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        std::fs::write(d.join(&extfile), ext).unwrap();
        let subj = format!("/CN={cn}");
        let req = ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", &subj];
        openssl(d, &[&req[..], &["-keyout", &key, "-out", &csr]].concat());
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &crt,
            ],
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
        (d.join(crt), d.join(key))
    }

    /// A client certificate for user `cn`, signed by the CA `ca` (made by
    /// [`PgServer::make_ca`], or `ca`, the server's): (`NAME.crt`, `NAME.key`), the key
    /// readable by its owner only, as libpq wants.
    pub fn make_client_cert(&self, name: &str, cn: &str, ca: &str) -> (PathBuf, PathBuf) {
        self.issue(name, cn, ca, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    }

    fn make_server_cert(&self) {
        let d = self.dir.path();
        self.make_ca("ca");
        self.issue(
            "server",
            "127.0.0.1",
            "ca",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        // The server refuses a key others can read (issue makes it 0600), or one it does
        // not own.
        if is_root() {
            let ok = Command::new("chown").arg("postgres").arg(d.join("server.key")).status().unwrap().success();
            assert!(ok, "chown postgres server.key");
        }
    }

    fn start_with(ssl: bool, hba: &str) -> PgServer {
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            let ok = Command::new("chown").arg("postgres").arg(dir.path()).status().unwrap().success();
            assert!(ok, "chown postgres {}", dir.path().display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let s = PgServer { dir, port, bin: server_bin(), ssl };
        s.run("initdb", &["-D", &s.data(), "-U", "postgres", "-A", "trust"]);
        if ssl {
            s.make_server_cert();
        }
        let hba = format!("local all all trust\n{hba}\n");
        std::fs::write(s.dir.path().join("data/pg_hba.conf"), hba).unwrap();
        s.pg_ctl_start();
        s.psql(&format!("CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'"));
        s
    }

    fn pg_ctl_start(&self) {
        let d = self.dir.path().display();
        let opts = if self.ssl {
            format!(
                "-p {} -k {d} -c listen_addresses=127.0.0.1,127.0.0.2 -c fsync=off -c max_connections=100 \
                 -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key \
                 -c ssl_ca_file={d}/ca.pem",
                self.port
            )
        } else {
            format!("-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100", self.port)
        };
        let log = self.dir.path().join("log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "120", "-o", &opts, "start"]);
    }

    /// Runs SQL as the superuser over the local socket.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let sock = self.dir.path().display().to_string();
        let out = self
            .as_server("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                &sock,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A new, empty database owned by `keepfs`; returns its name.
    pub fn create_db(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE {name} OWNER {USER}"));
        name.to_string()
    }

    /// The URL of database `db` for user `keepfs` with `password`.
    pub fn url_with(&self, db: &str, password: &str) -> String {
        format!("postgresql://{USER}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn url(&self, db: &str) -> String {
        self.url_with(db, PASSWORD)
    }

    /// Stops the server (fast: sessions are disconnected) and starts it again.
    pub fn restart(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
        self.pg_ctl_start();
    }
}

/// The server's processes, stopped (SIGSTOP) until this is dropped (SIGCONT).
pub struct Stopped(Vec<i32>);

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in self.0.iter().rev() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

impl PgServer {
    /// Stops every process of the server with SIGSTOP, the postmaster first (so that it
    /// starts no new one), as a hung host would: its kernel still accepts connections
    /// and acknowledges what clients send, but nothing answers. Resumed when the guard
    /// is dropped (also when the test fails).
    pub fn stop_processes(&self) -> Stopped {
        let pidfile = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).unwrap();
        let postmaster: i32 = pidfile.lines().next().unwrap().trim().parse().unwrap();
        let mut pids = vec![postmaster];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            // pid (comm) state ppid ...: comm may hold spaces, so read after its ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        let stopped = Stopped(pids);
        for &pid in &stopped.0 {
            // SAFETY: kill has no memory effects.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        }
        stopped
    }
}

/// keepfs's write lock on a catalog (its advisory lock), held by the test in an open
/// transaction of its own connection until [`WriteLockHeld::release`] (or the drop).
pub struct WriteLockHeld(postgres::Client);

impl WriteLockHeld {
    pub fn take(url: &str) -> WriteLockHeld {
        let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
        c.batch_execute("BEGIN").unwrap();
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&keepfs::catalog::postgres::WRITE_LOCK]).unwrap();
        WriteLockHeld(c)
    }

    pub fn release(mut self) {
        self.0.batch_execute("ROLLBACK").unwrap();
    }
}

impl PgServer {
    /// Waits until one keepfs connection waits for a lock (`what` names it for the
    /// failure message).
    pub fn wait_for_a_lock_waiter(&self, what: &str) {
        let waiting =
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keepfs' AND wait_event_type = 'Lock'";
        super::mount::wait_until(what, std::time::Duration::from_secs(60), || self.psql(waiting) == "1");
    }

    /// Holds the catalog's write lock on `url` and starts `keepfs label UID k=v` through
    /// `repo`'s configuration file with a patience of 1 s; returns once the label waits
    /// for the lock.
    pub fn label_behind_the_write_lock(
        &self,
        repo: &super::Repo,
        url: &str,
        uid: &str,
    ) -> (WriteLockHeld, std::process::Child) {
        let held = WriteLockHeld::take(url);
        let cfg = repo.config_file();
        let child = repo
            .command(&["--config", &cfg, "label", uid, "k=v"])
            .env("KEEPFS_TEST_CATALOG_PATIENCE_MS", "1000")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_for_a_lock_waiter("the label to wait for the lock");
        (held, child)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.as_server("pg_ctl").args(["-D", &self.data(), "-m", "immediate", "-w", "stop"]).output();
    }
}
