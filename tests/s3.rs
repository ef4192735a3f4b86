//! The S3 storage against a real S3 server (Garage, started on 127.0.0.1 by the test):
//! backup, restore, dedup, cleanup, an encrypted repository, the server dying in the
//! middle of a backup and of a restore, wrong credentials and a missing bucket. What
//! keepfs wrote is checked with an independent client (s3cmd).

mod common;
use common::garage::Garage;
use common::mount::wait_until;
use common::s3fault::{Fault, FaultProxy};
use common::*;
use std::fs;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// One server for the whole file; each test uses its own key prefix.
fn server() -> std::sync::MutexGuard<'static, Garage> {
    static G: OnceLock<Mutex<Garage>> = OnceLock::new();
    let mut g = G.get_or_init(|| Mutex::new(Garage::start())).lock().unwrap_or_else(|e| e.into_inner());
    g.ensure_running();
    g
}

struct S3Repo {
    repo: Repo,
    config: String,
}

impl S3Repo {
    fn new(g: &Garage, prefix: &str, extra: &str) -> S3Repo {
        let repo = Repo::new();
        let config = repo.path("keepfs.toml");
        fs::write(&config, g.keepfs_config(&repo.home(), prefix, extra)).unwrap();
        S3Repo { repo, config: config.to_str().unwrap().to_string() }
    }
    fn run(&self, args: &[&str]) -> Run {
        let mut a = vec!["--config", self.config.as_str()];
        a.extend_from_slice(args);
        self.repo.run(&a)
    }
    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "keepfs {args:?}: {}", r.stderr);
        r.stdout
    }
    /// Runs a command that must succeed with the master key from `key`.
    fn ok_with_key(&self, key: &std::path::Path, args: &[&str]) -> String {
        let mut a = vec!["--config", self.config.as_str()];
        a.extend_from_slice(args);
        let r = self.repo.run_env(&a, &[("KEEPFS_KEY_FILE", key.to_str().unwrap())]);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        r.stdout
    }
    fn ls(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ls", "--format", "json"])).unwrap()
    }
    fn version(&self, uid: &str) -> serde_json::Value {
        self.ls().as_array().unwrap().iter().find(|v| v["uid"] == uid).cloned().unwrap()
    }
}

#[test]
fn backup_restore_dedup_and_cleanup_on_s3() {
    let g = server();
    let r = S3Repo::new(&g, "plain", "");
    let img = mixed_image(91, 30, 64 * 1024, 777);
    fs::write(r.repo.path("a"), &img).unwrap();
    let url = r.repo.url("a");
    let v1 = r.ok(&["backup", &url, "vm", "-b", "64k"]).trim().to_string();
    r.ok(&["restore", &v1, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    r.ok(&["deep-scrub", &v1]);

    // The independent client sees the documented layout under the prefix.
    let keys = g.keys("plain");
    let blocks: Vec<&String> = keys.iter().filter(|k| k.starts_with("plain/blocks/")).collect();
    let distinct: std::collections::HashSet<&[u8]> =
        img.chunks(64 * 1024).filter(|c| c.iter().any(|&b| b != 0)).collect();
    assert_eq!(blocks.len(), distinct.len(), "{keys:?}");
    for k in &blocks {
        let parts: Vec<&str> = k.split('/').collect();
        assert_eq!(parts.len(), 5, "{k}");
        assert!(parts[4].len() == 64 && parts[4].starts_with(parts[2]) && parts[4][2..].starts_with(parts[3]), "{k}");
    }
    assert!(keys.contains(&format!("plain/versions/{v1}")), "{keys:?}");

    // A second backup of the same image stores nothing new.
    let v2 = r.ok(&["backup", &url, "vm", "-b", "64k"]).trim().to_string();
    assert_eq!(r.version(&v2)["stats"]["bytes_written"], 0);

    // A changed image, then removal of the older versions: cleanup deletes exactly the
    // objects only they referenced (DeleteObjects), and the survivor restores.
    let mut changed = img.clone();
    for b in changed[..64 * 1024 * 5].iter_mut() {
        *b = b.wrapping_add(1);
    }
    fs::write(r.repo.path("b"), &changed).unwrap();
    let v3 = r.ok(&["backup", &r.repo.url("b"), "vm", "-b", "64k"]).trim().to_string();
    r.ok(&["rm", "--force", &v1, &v2]);
    let kept: std::collections::HashSet<&[u8]> =
        changed.chunks(64 * 1024).filter(|c| c.iter().any(|&b| b != 0)).collect();
    let gone = distinct.difference(&kept).count();
    assert!(gone > 0);
    let out = r.ok(&["cleanup"]);
    assert!(out.contains(&format!("deleted {gone} object(s)")), "{out}");
    let after = g.keys("plain");
    assert_eq!(after.iter().filter(|k| k.starts_with("plain/blocks/")).count(), kept.len());
    assert!(!after.contains(&format!("plain/versions/{v1}")));
    let _ = fs::remove_file(r.repo.path("o"));
    r.ok(&["restore", &v3, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("b")));

    // The storage alone is enough: a lost database comes back from the bucket.
    r.repo.lose_catalog();
    r.ok(&["database", "rebuild"]);
    assert_eq!(r.ls().as_array().unwrap().len(), 1);
}

#[test]
fn an_encrypted_repository_on_s3() {
    let g = server();
    let r = S3Repo::new(&g, "sealed", "");
    let key = r.repo.path("k");
    r.ok(&["key", "new", key.to_str().unwrap()]);
    let env_run = |args: &[&str]| r.ok_with_key(&key, args);
    env_run(&["init", "--encrypt"]);
    let img = mixed_image(92, 12, 64 * 1024, 0);
    fs::write(r.repo.path("a"), &img).unwrap();
    let v = env_run(&["backup", &r.repo.url("a"), "enc", "-b", "64k"]).trim().to_string();
    env_run(&["restore", &v, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    env_run(&["deep-scrub", &v]);
    let keys = g.keys("sealed");
    assert!(keys.contains(&"sealed/keyring".to_string()), "{keys:?}");
    // Object names are keyed: none is the SHA-256 of a block.
    let sha_names: Vec<String> =
        img.chunks(64 * 1024).map(|c| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c))).collect();
    assert!(keys.iter().all(|k| !sha_names.iter().any(|s| k.ends_with(s))));
    // Rotation on S3: rekey rewrites whole objects (no partial writes there), in batches.
    let new_key = r.repo.path("k2");
    env_run(&["key", "new", new_key.to_str().unwrap()]);
    env_run(&["key", "rotate", "--new-key-file", new_key.to_str().unwrap()]);
    let with_new = |args: &[&str]| r.ok_with_key(&new_key, args);
    with_new(&["key", "rekey"]);
    let keys: serde_json::Value = serde_json::from_str(&with_new(&["key", "list", "--format", "json"])).unwrap();
    let old = keys[0]["id"].as_str().unwrap().to_string();
    assert_eq!(keys[0]["objects"], 0, "{keys}");
    with_new(&["key", "remove", &old]);
    let _ = fs::remove_file(r.repo.path("o"));
    with_new(&["restore", &v, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    with_new(&["deep-scrub", &v]);

    // Without the key: a one-line error naming the key it needs.
    let e = r.run(&["restore", &v, &r.repo.url("x")]);
    assert_eq!(e.code, 2, "{}", e.stderr);
    assert!(e.error_line().contains("is encrypted and no key was given"), "{}", e.stderr);
}

#[test]
fn the_server_dying_mid_backup_and_mid_restore() {
    let mut g = server();
    if let Some(e) = &g.external {
        eprintln!("not run against {e}: this test kills and restarts the tests' own Garage");
        return;
    }
    let r = S3Repo::new(&g, "crash", "");
    let img = random_bytes(93, 48 << 20);
    fs::write(r.repo.path("a"), &img).unwrap();
    let url = r.repo.url("a");
    let mut a = vec!["--config", r.config.as_str()];
    a.extend_from_slice(&["backup", &url, "big", "-b", "256k"]);
    let child =
        r.repo.command(&a).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_until("the backup to store some objects", Duration::from_secs(60), || g.keys("crash").len() >= 8);
    g.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("keepfs: error:") && line.contains("left incomplete"), "{stderr}");
    assert!(line.contains("cannot connect") || line.contains("did not answer"), "{stderr}");
    let uid = r.ls()[0]["uid"].as_str().unwrap().to_string();
    assert_eq!(r.version(&uid)["status"], "incomplete");

    // Back up: --continue finishes the same version.
    g.restart();
    let out = r.ok(&["backup", "--continue", &uid, &url, "big"]);
    assert_eq!(out.trim(), uid);
    let v = r.version(&uid);
    assert_eq!(v["status"], "valid");
    assert!(v["stats"]["bytes_deduplicated"].as_u64().unwrap() > 0, "{v}");

    // A restore while the server is down is a one-line error that marks nothing damaged
    // (the engine tests stop a restore half-way and continue it).
    g.kill();
    let e = r.run(&["restore", &uid, &r.repo.url("o")]);
    assert_eq!(e.code, 1, "{}", e.stderr);
    assert!(e.error_line().contains("cannot connect") && e.stderr.lines().count() == 1, "{}", e.stderr);
    assert!(!e.stderr.contains("X-Amz-Signature"), "no signed URLs in messages: {}", e.stderr);
    assert_eq!(r.version(&uid)["status"], "valid");
    g.restart();
    r.ok(&["restore", &uid, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
}

/// A large version object is sent as a stream from the index's file (one PUT whose
/// body is read as it goes); the threshold is lowered to nothing for the test.
#[test]
fn a_large_version_object_is_streamed_to_the_server() {
    let g = server();
    let r = S3Repo::new(&g, "streamed", "");
    let img = mixed_image(93, 40, 64 * 1024, 5);
    fs::write(r.repo.path("a"), &img).unwrap();
    let run = r.repo.run_env(
        &["--config", &r.config, "backup", &r.repo.url("a"), "vm", "-b", "64k"],
        &[("KEEPFS_TEST_STREAMED_INDEX", "0")],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = run.stdout.trim().to_string();
    // Checked as a stream of ranged GETs too (the last one asks for a byte past the end).
    let scrub = r.repo.run_env(&["--config", &r.config, "deep-scrub", &v], &[("KEEPFS_TEST_STREAMED_INDEX", "0")]);
    assert_eq!(scrub.code, 0, "{}", scrub.stderr);
    assert!(scrub.stderr.contains("all good"), "{}", scrub.stderr);
    r.repo.lose_catalog();
    r.ok(&["database", "rebuild"]);
    r.ok(&["restore", &v, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
}

#[test]
fn wrong_credentials_and_a_missing_bucket_are_one_line_errors() {
    let g = server();
    fs::write(std::env::temp_dir().join("keepfs-s3-unused"), b"").ok();
    let base = Repo::new();
    let good = g.keepfs_config(&base.home(), "errs", "");
    let not_s3 = answers_404_to_everything();
    let not_s3_said = format!("is http://127.0.0.1:{not_s3} an S3 service");
    // The configuration's mistakes are exit 2, as a wrong database password is; a
    // server that cannot be reached is a failure (exit 1), as an unreachable database is.
    for (config, needle, code) in [
        // A web server or a proxy at the endpoint: a 404 to a write is not "missing".
        (good.replace(&format!(":{}", g.port), &format!(":{not_s3}")), not_s3_said.as_str(), 2),
        (good.replace(&g.secret, &"0".repeat(64)), "access denied by", 2),
        (
            good.replace(&format!("bucket = \"{}\"", g.bucket), "bucket = \"no-such-bucket\""),
            "bucket 'no-such-bucket' does not exist",
            2,
        ),
        (good.replace(&format!(":{}", g.port), ":1"), "cannot connect", 1),
    ] {
        // A repository each: a shared test catalog would belong to the first one.
        let repo = Repo::new();
        let config = config.replace(&base.home().display().to_string(), &repo.home().display().to_string());
        fs::write(repo.path("a"), mixed_image(94, 3, 64 * 1024, 0)).unwrap();
        fs::write(repo.path("k.toml"), config).unwrap();
        let r = repo.run(&["--config", repo.path("k.toml").to_str().unwrap(), "backup", &repo.url("a"), "x"]);
        assert_eq!(r.code, code, "{}", r.stderr);
        assert!(r.error_line().starts_with("keepfs: error:") && r.error_line().contains(needle), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        let ls = repo.run(&["--config", repo.path("k.toml").to_str().unwrap(), "ls", "--format", "json"]);
        assert_eq!(ls.stdout.trim(), "[]", "a refused backup leaves no version behind: {}", ls.stderr);
    }
}

#[test]
fn several_storages_at_once_each_version_in_one() {
    let g = server();
    let repo = Repo::new();
    let cfg = repo.path("keepfs.toml");
    let s3 = g.keepfs_config(&repo.home(), "multi", "");
    // A local file storage first (the default), the bucket second.
    let local =
        format!("[[storage]]\nname = \"local\"\nkind = \"file\"\npath = \"{}\"\n", repo.path("local").display());
    fs::write(&cfg, s3.replacen("[[storage]]", &format!("{local}[[storage]]"), 1)).unwrap();
    let c = cfg.to_str().unwrap();
    let img = mixed_image(95, 10, 64 * 1024, 0);
    fs::write(repo.path("a"), &img).unwrap();
    let u = repo.url("a");
    let on_local = repo.ok(&["--config", c, "backup", &u, "vm", "-b", "64k"]).trim().to_string();
    let on_s3 = repo.ok(&["--config", c, "backup", &u, "vm", "-b", "64k", "-S", "s3"]).trim().to_string();
    let ls: serde_json::Value = serde_json::from_str(&repo.ok(&["--config", c, "ls", "--format", "json"])).unwrap();
    assert_eq!(ls[0]["storage"], "local");
    assert_eq!(ls[1]["storage"], "s3");
    // Dedup is per storage: the second backup stored everything again, in the bucket.
    assert_eq!(ls[1]["stats"]["bytes_written"], ls[0]["stats"]["bytes_written"]);
    let list: serde_json::Value =
        serde_json::from_str(&repo.ok(&["--config", c, "storage", "list", "--format", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["default"], true);
    assert_eq!(list[1]["kind"], "s3");
    assert_eq!(list[1]["versions"], 1);
    let stats: serde_json::Value =
        serde_json::from_str(&repo.ok(&["--config", c, "storage", "stats", "s3", "--format", "json"])).unwrap();
    let in_bucket = g.keys("multi").iter().filter(|k| k.starts_with("multi/blocks/")).count();
    assert_eq!(stats["objects"].as_u64().unwrap() as usize, in_bucket);
    assert!(repo.ok(&["--config", c, "storage", "stats", "local"]).contains("images/stored"));
    for (uid, out) in [(&on_local, "o1"), (&on_s3, "o2")] {
        repo.ok(&["--config", c, "restore", uid, &repo.url(out)]);
        assert_eq!(sha256_file(&repo.path(out)), sha256_file(&repo.path("a")));
    }
    let r = repo.run(&["--config", c, "backup", &u, "vm", "-S", "tape"]);
    assert_eq!(r.code, 2);
    assert!(r.error_line().contains("no storage named 'tape'"), "{}", r.stderr);
}

/// More than 1000 objects: listings page through (ListObjectsV2 continuation), as a
/// database rebuild and a cleanup of all of them show.
#[test]
fn listings_page_through_more_than_a_thousand_objects() {
    let g = server();
    let r = S3Repo::new(&g, "many", "");
    fs::write(r.repo.path("a"), random_bytes(96, 1300 * 4096)).unwrap();
    let v = r.ok(&["backup", &r.repo.url("a"), "many", "-b", "4k"]).trim().to_string();
    r.repo.lose_catalog();
    let out = r.run(&["database", "rebuild"]);
    assert!(out.stderr.contains("1 version(s), 1300 object(s)"), "{}", out.stderr);
    r.ok(&["restore", &v, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    r.ok(&["rm", "--force", &v]);
    let out = r.ok(&["cleanup"]);
    assert!(out.contains("deleted 1300 object(s)"), "{out}");
    // What is left names the catalog that owns the storage, and nothing else.
    let left = g.keys("many");
    assert!(left.len() == 1 && left[0].ends_with("owner"), "{left:?}");
}

/// The filesystem over an S3 storage: a version read through the mount, and `cp` into
/// incoming/ as a backup into the bucket.
#[test]
fn the_filesystem_over_s3() {
    use common::mount::Mount;
    let g = server();
    let r = S3Repo::new(&g, "fuse", "");
    let img = mixed_image(97, 12, 64 * 1024, 5);
    fs::write(r.repo.path("a"), &img).unwrap();
    let v = r.ok(&["backup", &r.repo.url("a"), "vm", "-b", "64k"]).trim().to_string();
    let mut m = Mount::new(&r.repo, &["--config", &r.config]);
    assert_eq!(sha256_file(&m.p(&format!("by_version/{v}/data"))), sha256_file(&r.repo.path("a")));
    fs::write(r.repo.path("b"), mixed_image(98, 6, 64 * 1024, 0)).unwrap();
    let st = std::process::Command::new("cp").arg(r.repo.path("b")).arg(m.p("incoming/vm2")).status().unwrap();
    assert!(st.success());
    m.unmount();
    let vm2 = r.ls().as_array().unwrap().iter().find(|x| x["name"] == "vm2").cloned().unwrap();
    assert_eq!(vm2["status"], "valid");
    assert_eq!(vm2["storage"], "s3");
    r.ok(&["restore", vm2["uid"].as_str().unwrap(), &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("b")));
    assert!(g.keys("fuse").contains(&format!("fuse/versions/{}", vm2["uid"].as_str().unwrap())));
}

/// A keepfs configuration that reaches the server through the fault proxy.
fn through(g: &Garage, proxy: &FaultProxy, r: &Repo, prefix: &str, extra: &str) -> String {
    g.keepfs_config(&r.home(), prefix, extra).replace(&g.endpoint(), &proxy.endpoint())
}

impl S3Repo {
    /// A repository whose storage is reached through the fault proxy.
    fn through(g: &Garage, proxy: &FaultProxy, prefix: &str, extra: &str) -> S3Repo {
        let repo = Repo::new();
        let config = repo.path("keepfs.toml");
        fs::write(&config, through(g, proxy, &repo, prefix, extra)).unwrap();
        S3Repo { repo, config: config.to_str().unwrap().to_string() }
    }
}

#[test]
fn transient_server_errors_are_retried_and_a_lasting_one_is_a_clear_error() {
    let g = server();
    let proxy = FaultProxy::start(g.port);
    let r = S3Repo::through(&g, &proxy, "faults", "read_timeout = \"2s\"\n");
    let img = random_bytes(95, 24 * 64 * 1024);
    fs::write(r.repo.path("a"), &img).unwrap();
    let url = r.repo.url("a");

    // Each PUT fault below is followed by a good attempt of the same request.
    for fault in [
        Fault::Status(503, "SlowDown"),
        Fault::Status(429, "TooManyRequests"),
        Fault::Status(500, "InternalError"),
        Fault::CorruptBody,
        Fault::Reset,
        Fault::Stall(Duration::from_secs(4)),
    ] {
        proxy.then("PUT", fault);
    }
    let uid = r.ok(&["backup", &url, "flaky", "-b", "64k"]).trim().to_string();
    assert_eq!(proxy.pending(), 0, "every planned fault was met");
    assert_eq!(r.version(&uid)["status"], "valid");
    // The damaged body reached the server, which refused it (Content-MD5); the retry
    // stored the right bytes, as a deep-scrub and a restore read them back.
    assert!(proxy.applied().iter().any(|(m, _, f)| m == "PUT" && *f == Fault::CorruptBody));
    for fault in [Fault::Status(503, "SlowDown"), Fault::Status(500, "InternalError"), Fault::Reset] {
        proxy.then("GET", fault);
    }
    r.ok(&["deep-scrub", &uid]);
    r.ok(&["restore", &uid, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    assert_eq!(proxy.pending(), 0);

    // A lasting SlowDown: the backup gives up after its 3 attempts with one line naming
    // the server's answer, and leaves its version incomplete ...
    fs::write(r.repo.path("b"), random_bytes(96, 16 * 64 * 1024)).unwrap();
    let url_b = r.repo.url("b");
    proxy.always("PUT", Fault::Status(503, "SlowDown"));
    let before = proxy.applied().len();
    let e = r.run(&["backup", &url_b, "flaky", "-b", "64k"]);
    assert_eq!(e.code, 1, "{}", e.stderr);
    assert_eq!(e.stderr.lines().count(), 1, "{}", e.stderr);
    let line = e.error_line();
    assert!(line.starts_with("keepfs: error:") && line.contains("after 3 attempts"), "{line}");
    assert!(line.contains("HTTP 503 SlowDown") && line.contains("left incomplete"), "{line}");
    assert!(proxy.applied().len() - before >= 3, "each request was tried 3 times");
    let incomplete = r.ls().as_array().unwrap().iter().find(|v| v["status"] == "incomplete").cloned().unwrap();
    let uid_b = incomplete["uid"].as_str().unwrap().to_string();
    // ... which --continue finishes once the server copes again.
    proxy.heal();
    assert_eq!(r.ok(&["backup", "--continue", &uid_b, &url_b, "flaky"]).trim(), uid_b);
    assert_eq!(r.version(&uid_b)["status"], "valid");
    r.ok(&["restore", &uid_b, &r.repo.url("ob")]);
    assert_eq!(sha256_file(&r.repo.path("ob")), sha256_file(&r.repo.path("b")));
}

/// A cleanup whose deletes the server never answers stops once its batch's time after
/// the mark runs out (shortened here to 20 s; 5 minutes in use), with one line, instead
/// of waiting out each attempt's read timeout (60 s here, 6 attempts): no delete of a
/// cleanup outlasts the time after which other hosts could take it for dead and store
/// its objects again. The objects stay, and the next cleanup deletes them. While the
/// delete hangs, no catalog transaction is held: another process writes to the catalog.
#[test]
fn a_cleanup_whose_deletes_hang_stops_when_its_time_runs_out() {
    let g = server();
    let proxy = FaultProxy::start(g.port);
    let r = S3Repo::through(&g, &proxy, "hangdelete", "read_timeout = \"60s\"\n");
    fs::write(r.repo.path("a"), random_bytes(97, 6 * 64 * 1024)).unwrap();
    let uid = r.ok(&["backup", &r.repo.url("a"), "gone", "-b", "64k"]).trim().to_string();
    fs::write(r.repo.path("b"), random_bytes(98, 2 * 64 * 1024)).unwrap();
    let kept = r.ok(&["backup", &r.repo.url("b"), "kept", "-b", "64k"]).trim().to_string();
    r.ok(&["rm", "--force", &uid]);
    let blocks = |g: &Garage| g.keys("hangdelete").iter().filter(|k| k.contains("blocks/")).count();
    assert_eq!(blocks(&g), 6 + 2);
    // Deletes (S3's multi-object delete is a POST) are held and never answered.
    proxy.always("POST", Fault::Stall(Duration::from_secs(120)));
    let mut cleanup = r
        .repo
        .command(&["--config", r.config.as_str(), "cleanup"])
        .env("KEEPFS_TEST_DELETE_WINDOW_MS", "20000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::mount::wait_until("the cleanup's delete to be held", Duration::from_secs(60), || {
        proxy.applied().iter().any(|(m, _, _)| m == "POST")
    });
    // The catalog is free while the storage hangs: a label (a write transaction) of
    // another process goes through at once, the cleanup still waiting.
    r.ok(&["label", &kept, "seen=during-the-delete"]);
    assert_eq!(r.version(&kept)["labels"]["seen"], "during-the-delete");
    assert!(cleanup.try_wait().unwrap().is_none(), "the cleanup was still waiting for its delete");
    let out = wait_output_within(cleanup, COMMAND_LIMIT, "the cleanup");
    let e = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(e.code, 1, "{}", e.stderr);
    assert_eq!(e.stderr.lines().count(), 1, "{}", e.stderr);
    let line = e.error_line();
    assert!(line.starts_with("keepfs: error: cleanup of storage 's3' stopped: "), "{line}");
    assert!(line.contains("when its time ran out") && line.contains("left for the next cleanup"), "{line}");
    assert!(proxy.applied().iter().any(|(m, _, _)| m == "POST"), "a delete was sent and held");
    assert_eq!(blocks(&g), 6 + 2, "nothing was deleted");
    proxy.heal();
    assert!(r.ok(&["cleanup"]).contains("deleted 6 object(s)"));
    assert_eq!(blocks(&g), 2);
    r.ok(&["restore", &kept, &r.repo.url("ob")]);
    assert_eq!(sha256_file(&r.repo.path("ob")), sha256_file(&r.repo.path("b")));
}

#[test]
fn a_local_read_cache_serves_repeated_restores_and_never_hides_the_storage() {
    let g = server();
    let proxy = FaultProxy::start(g.port);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path();
    let extra = format!("read_cache_dir = \"{}\"\nencrypt = true\n", cache.display());
    let r = S3Repo::through(&g, &proxy, "cached", &extra);
    let key = r.repo.path("master.key");
    r.repo.ok(&["key", "new", key.to_str().unwrap()]);
    // Distinct blocks: each object is fetched by one restore thread, so counts are exact.
    let img = random_bytes(97, 20 * 64 * 1024);
    fs::write(r.repo.path("a"), &img).unwrap();
    let want = sha256_file(&r.repo.path("a"));
    r.ok_with_key(&key, &["init", "--encrypt"]);
    let uid = r.ok_with_key(&key, &["backup", &r.repo.url("a"), "vm", "-b", "64k"]).trim().to_string();
    let stored = g.keys("cached").iter().filter(|k| k.contains("/blocks/")).count();
    assert!(stored > 10, "{stored}");
    assert!(files_under(cache).is_empty(), "a backup does not fill the read cache");

    // The first restore fetches every block and keeps a sealed copy of each.
    let during_backup = proxy.forwarded("GET", "/blocks/");
    r.ok_with_key(&key, &["restore", &uid, &r.repo.url("o1")]);
    assert_eq!(sha256_file(&r.repo.path("o1")), want);
    let first = proxy.forwarded("GET", "/blocks/");
    assert_eq!(first - during_backup, stored);
    let distinct: std::collections::BTreeSet<String> =
        proxy.forwarded_paths("GET", "/blocks/").iter().map(|p| p.split('?').next().unwrap().to_string()).collect();
    assert_eq!(distinct.len(), stored);
    let copies: Vec<_> = files_under(&cache.join("s3/blocks"));
    assert_eq!(copies.len(), stored);
    let plain_block = &img[64 * 1024..2 * 64 * 1024];
    for c in &copies {
        let bytes = fs::read(c).unwrap();
        assert!(!bytes.windows(64).any(|w| plain_block.windows(64).next() == Some(w)), "copies stay sealed");
    }

    // The second restore reads no block from the server.
    r.ok_with_key(&key, &["restore", &uid, &r.repo.url("o2")]);
    assert_eq!(sha256_file(&r.repo.path("o2")), want);
    assert_eq!(proxy.forwarded("GET", "/blocks/"), first);

    // A damaged copy and a copy of another object (valid trailer, wrong content) are
    // fetched again from the server; the version stays valid.
    let mut bad = fs::read(&copies[0]).unwrap();
    bad[40] ^= 0x01;
    fs::write(&copies[0], &bad).unwrap();
    fs::copy(&copies[2], &copies[1]).unwrap();
    r.ok_with_key(&key, &["restore", &uid, &r.repo.url("o3")]);
    assert_eq!(sha256_file(&r.repo.path("o3")), want);
    assert_eq!(proxy.forwarded("GET", "/blocks/"), first + 2);
    assert_eq!(r.version(&uid)["status"], "valid");

    // A deep-scrub verifies the storage, not the copies.
    r.ok_with_key(&key, &["deep-scrub", &uid]);
    assert_eq!(proxy.forwarded("GET", "/blocks/"), first + 2 + stored);

    // Key rotation rewrites every header: the copies are dropped with it. A copy left
    // by a process that did not see the rotation (sealed for the removed key) is
    // fetched again, not called damage.
    let stale = fs::read(&copies[3]).unwrap();
    let key2 = r.repo.path("master2.key");
    r.repo.ok(&["key", "new", key2.to_str().unwrap()]);
    r.ok_with_key(&key, &["key", "rotate", "--new-key-file", key2.to_str().unwrap()]);
    r.ok_with_key(&key2, &["key", "rekey"]);
    let keys: serde_json::Value =
        serde_json::from_str(&r.ok_with_key(&key2, &["key", "list", "--format", "json"])).unwrap();
    let old = keys[0]["id"].as_str().unwrap().to_string();
    r.ok_with_key(&key2, &["key", "remove", &old]);
    assert_eq!(files_under(&cache.join("s3/blocks")).len(), 0, "the rekey dropped every copy");
    let before = proxy.forwarded("GET", "/blocks/");
    r.ok_with_key(&key2, &["restore", &uid, &r.repo.url("o4")]);
    let after = proxy.forwarded("GET", "/blocks/");
    assert_eq!(after, before + stored);
    fs::write(&copies[3], &stale).unwrap();
    r.ok_with_key(&key2, &["restore", "--force", &uid, &r.repo.url("o4")]);
    assert_eq!(sha256_file(&r.repo.path("o4")), want);
    assert_eq!(proxy.forwarded("GET", "/blocks/"), after + 1);
    assert_eq!(r.version(&uid)["status"], "valid");

    // A small bound keeps the directory under it.
    let small = format!("read_cache_dir = \"{}\"\nread_cache_size = \"300k\"\nencrypt = true\n", cache.display());
    fs::write(&r.config, through(&g, &proxy, &r.repo, "cached", &small)).unwrap();
    r.ok_with_key(&key2, &["restore", "--force", &uid, &r.repo.url("o4")]);
    assert_eq!(sha256_file(&r.repo.path("o4")), want);
    let copies = files_under(&cache.join("s3/blocks"));
    let (files, bytes) = (copies.len(), copies.iter().map(|f| f.metadata().unwrap().len()).sum::<u64>());
    assert!(bytes <= 300 * 1024 && files > 0, "{bytes} bytes in {files} files");
}

#[test]
fn a_restore_fetches_each_distinct_object_once() {
    let g = server();
    let proxy = FaultProxy::start(g.port);
    let r = S3Repo::through(&g, &proxy, "repeats", "");
    let bs = 64 * 1024;
    let (a, b, c) = (random_bytes(201, bs), random_bytes(202, bs), random_bytes(203, bs));
    let zero = vec![0u8; bs];
    let img: Vec<u8> = [&a, &b, &a, &zero, &c, &a, &b, &a[..1000]].iter().flat_map(|p| p.iter().copied()).collect();
    fs::write(r.repo.path("a"), &img).unwrap();
    let uid = r.ok(&["backup", &r.repo.url("a"), "rep", "-b", "64k"]).trim().to_string();
    let before = proxy.forwarded("GET", "/blocks/");
    r.ok(&["restore", &uid, &r.repo.url("o")]);
    assert_eq!(sha256_file(&r.repo.path("o")), sha256_file(&r.repo.path("a")));
    // a, b, c and the short tail: four objects for seven stored blocks.
    assert_eq!(proxy.forwarded("GET", "/blocks/") - before, 4);
}

/// An HTTP server on 127.0.0.1 that answers every request "404 Not Found" with no body,
/// as a web server or a proxy at a mistyped endpoint does; its port.
fn answers_404_to_everything() -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    // One request: its head, then as much body as it announces.
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err()
                        || stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\nserver: not-s3\r\ncontent-length: 0\r\n\r\n")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Two hosts of one shared catalog that name the S3 endpoint differently (`127.0.0.1`
/// and `localhost`): both back up and restore, and neither rewrites the place the
/// catalog recorded (they used to take turns, each printing a note). Only PostgreSQL
/// catalogs record the repository's place (CI's second pass).
#[test]
fn hosts_that_name_one_endpoint_differently_share_the_repository_without_notes() {
    if !postgres_mode() {
        eprintln!("not run against SQLite: only a shared (PostgreSQL) catalog records the repository's place");
        return;
    }
    let g = server();
    let r = S3Repo::new(&g, "aliases", "");
    let text = fs::read_to_string(&r.config).unwrap();
    assert!(text.contains("127.0.0.1"), "{text}");
    let other = r.repo.path("other.toml");
    fs::write(&other, text.replace("127.0.0.1", "localhost")).unwrap();
    let other = other.to_str().unwrap();
    fs::write(r.repo.path("a"), random_bytes(99, 3 * 64 * 1024)).unwrap();
    let mut uids = Vec::new();
    for (round, config) in [r.config.as_str(), other, r.config.as_str(), other].into_iter().enumerate() {
        let out = r.repo.run(&["--config", config, "backup", &r.repo.url("a"), "vm", "-b", "64k"]);
        assert_eq!(out.code, 0, "round {round}: {}", out.stderr);
        assert!(!out.stderr.contains("note:"), "round {round}: {}", out.stderr);
        uids.push(out.stdout.trim().to_string());
    }
    for uid in &uids {
        r.ok(&["restore", uid, &r.repo.url("out")]);
        assert_eq!(sha256_file(&r.repo.path("out")), sha256_file(&r.repo.path("a")));
        fs::remove_file(r.repo.path("out")).unwrap();
    }
}
