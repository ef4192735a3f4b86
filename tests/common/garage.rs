//! A throwaway one-node Garage S3 server on 127.0.0.1 for the S3 tests: free ports, its
//! own directory, one key and one bucket. `garage` must be on PATH or in ~/.cargo/bin
//! (`bash .ci/run` installs it; `contrib/garage/start-garage.sh` does the same by hand).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Garage {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    pub key_id: String,
    pub secret: String,
    pub bucket: String,
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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

    fn spawn(&mut self) {
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
        self.child = Some(child);
        let t = Instant::now();
        loop {
            let ok = Command::new(garage_binary())
                .arg("-c")
                .arg(self.dir.path().join("garage.toml"))
                .arg("status")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "garage did not start; see its server.log");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a server with a key and the bucket `keepfs-test`.
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let (port, rpc, admin) = (free_port(), free_port(), free_port());
        let secret: String =
            super::random_bytes(rpc as u64 * 7 + port as u64, 32).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            dir.path().join("garage.toml"),
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\nroot_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut g = Garage {
            dir,
            child: None,
            port,
            key_id: String::new(),
            secret: String::new(),
            bucket: "keepfs-test".into(),
        };
        g.spawn();
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A keepfs configuration whose default storage is this server's bucket under `prefix`.
    pub fn keepfs_config(&self, home: &Path, prefix: &str, extra: &str) -> String {
        format!(
            "home = \"{}\"\n[[storage]]\nname = \"s3\"\nkind = \"s3\"\nendpoint = \"{}\"\nregion = \"garage\"\n\
             bucket = \"{}\"\nprefix = \"{prefix}\"\naccess_key = \"{}\"\nsecret_key = \"{}\"\nattempts = 3\n{extra}",
            home.display(),
            self.endpoint(),
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
        }
    }

    /// Restarts the server if an earlier test left it stopped.
    pub fn ensure_running(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Starts the server again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
