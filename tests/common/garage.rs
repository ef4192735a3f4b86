//! The S3 server of the S3 tests. By default a throwaway one-node Garage on 127.0.0.1:
//! free ports, its own directory, one key and one bucket. `garage` must be on PATH or in
//! ~/.cargo/bin (`bash .ci/run` installs it; `contrib/garage/start-garage.sh` does the
//! same by hand).
//!
//! With `KEEPFS_TEST_S3_ENDPOINT` (and `KEEPFS_TEST_S3_ACCESS_KEY`,
//! `KEEPFS_TEST_S3_SECRET_KEY`, optionally `KEEPFS_TEST_S3_REGION`, default `us-east-1`)
//! the same tests run against that server instead (CI runs them against Ceph's RADOS
//! Gateway too); each run makes its own bucket with s3cmd. Such a server cannot be
//! killed by the tests: the one test that needs that says so and stops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub struct Garage {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    pub key_id: String,
    pub secret: String,
    pub bucket: String,
    pub region: String,
    /// Set when the server is not the tests' own Garage (see the module comment).
    pub external: Option<String>,
}

/// Server processes and directories to remove when the test process exits. The S3 tests
/// share one server through a static, and statics are never dropped: without this every
/// run of the group would leave a Garage running and its data in the temp directory.
static LEFT_AT_EXIT: Mutex<(Vec<i32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

extern "C" fn clean_up_at_exit() {
    // try_lock: a thread still inside a test at exit must not hang the process.
    if let Ok(left) = LEFT_AT_EXIT.try_lock() {
        for &pid in &left.0 {
            // SAFETY: plain system calls on a child process this test process started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        for dir in &left.1 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn remember_at_exit(f: impl FnOnce(&mut (Vec<i32>, Vec<PathBuf>))) {
    static REGISTER: Once = Once::new();
    // SAFETY: registers a plain function without captured state.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
    f(&mut LEFT_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
}

fn garage_binary() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let in_cargo = Path::new(&home).join(".cargo/bin/garage");
    if in_cargo.exists() {
        return in_cargo;
    }
    let on_path =
        std::env::var("PATH").unwrap_or_default().split(':').map(|d| Path::new(d).join("garage")).find(|p| p.exists());
    on_path.unwrap_or_else(|| {
        panic!("the S3 tests need a real S3 server: install Garage with `cargo install --locked garage` (bash .ci/run does)")
    })
}

/// A port free right now. Garage cannot be told to bind port 0 and report it, so its
/// ports are picked here and released before it binds them; another process may take
/// one meanwhile, and then the server exits at once and is started again on new ports
/// (see [`Garage::start_garage`]).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Attempts at starting the tests' Garage on newly picked ports.
const START_ATTEMPTS: usize = 5;

impl Garage {
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(garage_binary())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(args)
            .output()
            .expect("run garage");
        assert!(out.status.success(), "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the server and waits until it answers; false when it exited instead (a
    /// port it was given is taken).
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(garage_binary())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .arg("server")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start garage");
        let pid = child.id() as i32;
        remember_at_exit(|left| left.0.push(pid));
        self.child = Some(child);
        let t = Instant::now();
        loop {
            // A port taken meanwhile: the server exits, or logs it and lingers.
            let in_use = std::fs::read_to_string(self.dir.path().join("server.log"))
                .is_ok_and(|l| l.to_lowercase().contains("address already in use"));
            if in_use {
                self.kill();
                return false;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                remember_at_exit(|left| left.0.retain(|&p| p != pid));
                return false;
            }
            let ok = Command::new(garage_binary())
                .arg("-c")
                .arg(self.dir.path().join("garage.toml"))
                .arg("status")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "garage did not start; see its server.log");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server of this test run: the external one named by the environment, or a
    /// Garage started here.
    pub fn start() -> Garage {
        match std::env::var("KEEPFS_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.is_empty() => Garage::external(endpoint),
            _ => Garage::start_garage(),
        }
    }

    fn external(endpoint: String) -> Garage {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} must be set with KEEPFS_TEST_S3_ENDPOINT"));
        let port = endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("KEEPFS_TEST_S3_ENDPOINT must be http://127.0.0.1:PORT");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        remember_at_exit(|left| left.1.push(path));
        let g = Garage {
            dir,
            child: None,
            port,
            key_id: var("KEEPFS_TEST_S3_ACCESS_KEY"),
            secret: var("KEEPFS_TEST_S3_SECRET_KEY"),
            bucket: format!("keepfs-test-{}-{}", std::process::id(), nanos % 1_000_000_000),
            region: std::env::var("KEEPFS_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
            external: Some(endpoint),
        };
        let out = g.s3cmd(&["mb", &format!("s3://{}", g.bucket)]);
        assert!(out.status.success(), "s3cmd mb: {}", String::from_utf8_lossy(&out.stderr));
        g
    }

    /// `s3cmd ls -r` of `prefix`: the keys below it (relative to the bucket), as an
    /// independent client sees them.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.s3cmd(&["ls", "-r", &format!("s3://{}/{prefix}/", self.bucket)]);
        assert!(out.status.success(), "s3cmd: {}", String::from_utf8_lossy(&out.stderr));
        let bucket_url = format!("s3://{}/", self.bucket);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .filter_map(|u| u.strip_prefix(&bucket_url).map(str::to_string))
            .collect()
    }

    /// Runs s3cmd against this server with its key.
    pub fn s3cmd(&self, args: &[&str]) -> std::process::Output {
        let cfg = self.dir.path().join("s3cfg");
        std::fs::write(
            &cfg,
            format!(
                "[default]\naccess_key = {}\nsecret_key = {}\nhost_base = 127.0.0.1:{p}\nhost_bucket = 127.0.0.1:{p}\n\
                 use_https = False\nbucket_location = {}\nsignature_v2 = False\n",
                self.key_id,
                self.secret,
                self.region,
                p = self.port
            ),
        )
        .unwrap();
        Command::new("s3cmd")
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .output()
            .expect("s3cmd (apt-get install s3cmd; bash .ci/run does)")
    }

    /// Starts a Garage with a key and the bucket `keepfs-test`.
    fn start_garage() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        remember_at_exit(|left| left.1.push(path));
        let mut g = Garage {
            dir,
            child: None,
            port: 0,
            key_id: String::new(),
            secret: String::new(),
            bucket: "keepfs-test".into(),
            region: "garage".into(),
            external: None,
        };
        let started = (0..START_ATTEMPTS).any(|_| {
            g.configure();
            g.spawn()
        });
        assert!(started, "garage exited at start {START_ATTEMPTS} times; see its server.log");
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "2G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        let key = g.cli(&["key", "create", "keepfs-test"]);
        let field = |name: &str| {
            key.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).unwrap().to_string()
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.cli(&["bucket", "create", "keepfs-test"]);
        g.cli(&["bucket", "allow", "--read", "--write", "--owner", "keepfs-test", "--key", "keepfs-test"]);
        g
    }

    /// Writes a configuration on newly picked ports.
    fn configure(&mut self) {
        let (port, rpc, admin) = (free_port(), free_port(), free_port());
        let secret: String =
            super::random_bytes(rpc as u64 * 7 + port as u64, 32).iter().map(|b| format!("{b:02x}")).collect();
        let d = self.dir.path();
        std::fs::write(
            d.join("garage.toml"),
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\nroot_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = d.display()
            ),
        )
        .unwrap();
        self.port = port;
    }

    pub fn endpoint(&self) -> String {
        self.external.clone().unwrap_or_else(|| format!("http://127.0.0.1:{}", self.port))
    }

    /// A keepfs configuration whose default storage is this server's bucket under `prefix`.
    pub fn keepfs_config(&self, home: &Path, prefix: &str, extra: &str) -> String {
        format!(
            "home = \"{}\"\n[[storage]]\nname = \"s3\"\nkind = \"s3\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             bucket = \"{}\"\nprefix = \"{prefix}\"\naccess_key = \"{}\"\nsecret_key = \"{}\"\nattempts = 3\n{extra}",
            home.display(),
            self.endpoint(),
            self.region,
            self.bucket,
            self.key_id,
            self.secret
        )
    }

    /// Kills the server (-9), as a crash or a pulled cable would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let pid = c.id() as i32;
            remember_at_exit(|left| left.0.retain(|&p| p != pid));
        }
    }

    /// Restarts the server if an earlier test left it stopped.
    pub fn ensure_running(&mut self) {
        if self.child.is_none() && self.external.is_none() {
            assert!(self.spawn(), "garage did not start again; see its server.log");
        }
    }

    /// Starts the server again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "garage did not start again; see its server.log");
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
