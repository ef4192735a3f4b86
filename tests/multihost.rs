//! The multi-host drill of issue 13: many hosts back up into one repository with one
//! shared PostgreSQL catalog while another host removes old versions and cleans up, a
//! third restores and deep-scrubs, and faults strike at random moments. It proves that
//! garbage collection never deletes a block a version (or a running backup) needs.
//!
//! One driver, [`drill`], run once on the file storage and once on Garage S3, with a
//! PostgreSQL server the test starts itself (and restarts once mid-run):
//! - 4 writer loops (`KEEPFS_HOST=host1..host4`, one image each of 64 KiB blocks): mutate
//!   the image (its own blocks, and blocks from a pool every host draws from, so that
//!   hosts deduplicate against each other and cleanup meets blocks that another host's
//!   running backup reuses), record its sha256 (in the version's label `sha256` too, so a
//!   version committed by a process killed before it printed its uid is still checked),
//!   back it up, record uid -> sha256. After a failure host1 and host2 finish their
//!   incomplete version with `backup --continue`, host3 and host4 `rm` it;
//! - a cleaner loop (host5): `rm --force` of a random half of each host's older versions
//!   (the newest of each host stays), then `cleanup`, with a `cleanup_memory` far below
//!   what the storage needs, so that every cleanup goes a slice of the ids at a time;
//! - a checker loop (host6): restore a random valid version and compare its sha256 with
//!   the recorded one, `deep-scrub` another;
//! - the test itself: kills (-9) host1's running backup and the running cleanup, each
//!   [`KILLS`] times at random moments, and restarts PostgreSQL once while backups run.
//!   The random moments come from a seeded RNG whose seed is printed; set
//!   `KEEPFS_DRILL_SEED` to replay one.
//!
//! Errors during the run are allowed only of expected kinds (a process the test killed,
//! a lost connection around the restart, a version in use refused to `rm`, a version
//! removed before the checker got to it); anything else (a panic, a missing or damaged
//! block, exit code 3, an error that is not one line) fails the test with the command's
//! stderr. Afterwards (loops stopped, incomplete versions continued or removed, each host
//! has had a command that drops its dead sessions, one final cleanup): every version `ls`
//! shows is valid, restores byte-identical and deep-scrubs clean, every uid a backup
//! printed and the cleaner did not remove is among them, and the storage holds exactly
//! the block objects the valid versions' indexes (read from the storage) name: a missing
//! one is a block cleanup deleted under a version, an extra one garbage it left.
//!
//! The loops run until a deadline (a bound, not synchronisation); the kills and the
//! restart wait for a state (the victim runs the command to hit) before they strike.
//!
//! Found by this drill (the seeds are in the commit messages):
//! - a restore or deep scrub that began while `rm` removed its version read a
//!   half-removed version: a false "version object missing" (exit 3), or "has no block
//!   index (its backup did not finish)". Fixed (src/repo.rs: both sides write their
//!   version lock, then check the other's).
//! - an `rm` cut off by a lost catalog connection between deleting a version's object
//!   and its rows left a version `ls` showed valid without its object. Fixed (`rm` marks
//!   the version `invalid` first). A version object found missing is accepted only for a
//!   version of an `rm` the restart cut off, and only if that version is not `valid`;
//!   the cleaner runs such an `rm` again at once, as a retention job would.

mod common;
use common::garage::Garage;
use common::pg::PgServer;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the writers, the cleaner and the checker run (per storage).
const DRILL: Duration = Duration::from_secs(40);
const WRITERS: usize = 4;
/// Writers 0..CONTINUERS finish a failed backup with `--continue`; the others `rm` it.
const CONTINUERS: usize = 2;
/// The writer whose backups are killed (host1).
const VICTIM: usize = 0;
/// Kills of the victim's backup, and of the running cleanup.
const KILLS: usize = 3;
const CLEANER: usize = WRITERS;
const CHECKER: usize = WRITERS + 1;
const BS: usize = 64 * 1024;
/// Image layout, in blocks: the host's own, then blocks from the shared pool, then zeros.
const OWN_BLOCKS: usize = 64;
const SHARED_BLOCKS: usize = 24;
const ZERO_BLOCKS: usize = 8;
const POOL: usize = 32;

/// The two drills share the machine's 2 cores badly: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn host(i: usize) -> String {
    format!("host{}", i + 1)
}

fn vm(i: usize) -> String {
    format!("vm-{}", host(i))
}

/// The storage the drill runs on.
enum Store {
    File(PathBuf),
    S3(Garage),
}

const S3_PREFIX: &str = "multihost";

impl Store {
    /// A host's configuration: its own home, the shared catalog, the shared storage.
    fn config(&self, home: &Path, database: &str) -> String {
        match self {
            Store::File(path) => format!(
                "home = \"{}\"\ndatabase = \"{database}\"\n[[storage]]\nname = \"default\"\nkind = \"file\"\npath = \"{}\"\n",
                home.display(),
                path.display()
            ),
            Store::S3(g) => format!("database = \"{database}\"\n{}", g.keepfs_config(home, S3_PREFIX, "")),
        }
    }

    /// The keys under `blocks/` the storage holds, as an independent reader sees them
    /// (the directory tree, or s3cmd).
    fn block_keys(&self) -> BTreeSet<String> {
        match self {
            Store::File(path) => files_under(&path.join("blocks"))
                .iter()
                .map(|p| p.strip_prefix(path).unwrap().display().to_string())
                .collect(),
            Store::S3(g) => g
                .keys(&format!("{S3_PREFIX}/blocks"))
                .iter()
                .filter_map(|k| k.strip_prefix(&format!("{S3_PREFIX}/")).map(str::to_string))
                .collect(),
        }
    }

    /// Every version object (the storage's own record of a version and its index), by uid.
    fn version_objects(&self, scratch: &Path) -> BTreeMap<String, Vec<u8>> {
        let dir = match self {
            Store::File(path) => path.join("versions"),
            Store::S3(g) => {
                let to = scratch.join("version-objects");
                std::fs::create_dir_all(&to).unwrap();
                let from = format!("s3://{}/{S3_PREFIX}/versions/", g.bucket);
                let out = g.s3cmd(&["get", "--recursive", "--force", &from, &format!("{}/", to.display())]);
                assert!(out.status.success(), "s3cmd get {from}: {}", String::from_utf8_lossy(&out.stderr));
                to
            }
        };
        files_under(&dir)
            .iter()
            .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(p).unwrap()))
            .collect()
    }
}

/// The command a loop is running, for the test to kill.
struct Running {
    pid: u32,
    what: String,
    killed: bool,
}

/// What the loops share with the test.
struct Shared {
    dir: PathBuf,
    start: Instant,
    stop: AtomicBool,
    /// Odd while PostgreSQL restarts; +2 per restart.
    restarts: AtomicU64,
    /// The command each loop runs now (writers, cleaner, checker). A command's pid stays
    /// here until it has exited and before it is reaped, so a kill never hits a reused pid.
    running: Vec<Mutex<Option<Running>>>,
    /// uid -> sha256 of the image, from the backups' output.
    recorded: Mutex<BTreeMap<String, String>>,
    /// uids the cleaner removed.
    removed: Mutex<BTreeSet<String>>,
    /// Versions an `rm` cut off by the PostgreSQL restart may have left half-removed (its
    /// version object deleted, its rows not yet): see [`cleaner`].
    cut_off_rm: Mutex<BTreeSet<String>>,
    /// Deep scrubs that found only a version object missing, with the version's status
    /// then (none: gone), judged once the run is over (against `cut_off_rm`).
    object_missing: Mutex<Vec<(String, String, Option<String>)>>,
    /// Errors of unexpected kinds: the test fails with them.
    problems: Mutex<Vec<String>>,
    /// Expected errors met, for the summary.
    expected: Mutex<Vec<String>>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
    next_log: AtomicU64,
    pool: Vec<Vec<u8>>,
}

impl Shared {
    fn over(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.start.elapsed() >= DRILL
    }

    fn config(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.toml"))
    }

    fn count(&self, what: &'static str, n: u64) {
        *self.counts.lock().unwrap().entry(what).or_default() += n;
    }

    fn problem(&self, p: String) {
        eprintln!("drill: PROBLEM: {p}");
        self.problems.lock().unwrap().push(p);
    }
}

/// How a command ended.
struct Outcome {
    args: Vec<String>,
    host: String,
    code: Option<i32>,
    /// Killed by the test (SIGKILL delivered while it ran).
    killed: bool,
    hung: bool,
    /// It ran while PostgreSQL restarted.
    met_restart: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("keepfs: error:")).collect()
    }

    fn describe(&self) -> String {
        format!(
            "keepfs {:?} on {} ended with {:?}{}{}:\n--- stdout\n{}--- stderr\n{}",
            self.args,
            self.host,
            self.code,
            if self.killed { " (killed by the test)" } else { "" },
            if self.met_restart { " (during the PostgreSQL restart)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
}

/// An error line PostgreSQL's restart explains: the connection went, or the server was
/// not there (yet) or shutting down.
fn connection_lost(line: &str) -> bool {
    let l = line.to_lowercase();
    [
        "connection",
        "cannot connect",
        "communicating with the server",
        "database system is",
        "server closed",
        "terminating",
        "shutting down",
        "starting up",
    ]
    .iter()
    .any(|w| l.contains(w))
}

/// What no run may ever print, whatever else happened.
fn never_allowed(o: &Outcome) -> Option<&'static str> {
    if o.hung {
        return Some("a hang");
    }
    if o.stderr.contains("panicked") || o.code == Some(101) {
        return Some("a panic");
    }
    if o.code == Some(3) {
        return Some("damage found (exit 3)");
    }
    let l = o.stderr.to_lowercase();
    if l.contains("missing") || l.contains("damaged") || l.contains("not found in storage") {
        return Some("a missing or damaged object");
    }
    None
}

/// Judges a command that did not succeed: Ok(kind) when it failed in an expected way,
/// Err(reason) otherwise. `gone` says whether the version it worked on was removed meanwhile.
fn judge(o: &Outcome, gone: bool) -> Result<&'static str, String> {
    if let Some(why) = never_allowed(o) {
        return Err(why.into());
    }
    if o.killed {
        return Ok("killed by the test");
    }
    if o.code.is_none() {
        return Err("ended by a signal the test did not send".into());
    }
    let lines = o.error_lines();
    if lines.len() != 1 {
        return Err(format!("{} error lines instead of one", lines.len()));
    }
    let line = lines[0];
    if o.code == Some(4) && line.contains("is in use") {
        return Ok("refused: version in use");
    }
    if o.code == Some(4) && line.contains("is being removed") {
        return Ok("refused: version being removed");
    }
    if o.code == Some(4) && line.contains("a cleanup of storage") {
        return Ok("refused: another cleanup runs");
    }
    if o.met_restart && o.code == Some(1) && connection_lost(line) {
        return Ok("connection lost in the PostgreSQL restart");
    }
    // Picked from `ls` just before `rm` took it. (Before the lock fix, a version removed
    // between its read and its index's read was called "valid and has no block index
    // (its backup did not finish)": seeds 1796051766339271870, 1796052594268066446.)
    if gone && line.contains("does not exist") {
        return Ok("the version was removed meanwhile");
    }
    Err("an unexpected error".into())
}

/// Runs one keepfs command as `host` for loop `slot`, killable by the test while it runs.
fn run(sh: &Shared, slot: usize, host: &str, args: &[&str]) -> Outcome {
    let n = sh.next_log.fetch_add(1, Ordering::SeqCst);
    let out_path = sh.dir.join(format!("logs/{n}.out"));
    let err_path = sh.dir.join(format!("logs/{n}.err"));
    let restarts_before = sh.restarts.load(Ordering::SeqCst);
    let mut child = Command::new(KEEPFS)
        .arg("--config")
        .arg(sh.config(host))
        .args(args)
        .env("KEEPFS_HOST", host)
        .env_remove("KEEPFS_DATABASE")
        .env_remove("KEEPFS_CONFIG")
        .env_remove("KEEPFS_HOME")
        .env_remove("KEEPFS_PASSPHRASE")
        .env_remove("KEEPFS_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("start keepfs {args:?}: {e}"));
    let pid = child.id();
    *sh.running[slot].lock().unwrap() = Some(Running { pid, what: args[0].to_string(), killed: false });
    // Wait for the state "exited", without reaping (WNOWAIT): the pid stays this child's
    // until it is taken out of `running` below.
    let exited = poll_for(COMMAND_LIMIT, || {
        // SAFETY: siginfo_t is plain data; waitid on our own child.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT | libc::WNOHANG)
        };
        // SAFETY: filled in by waitid.
        (r == 0 && unsafe { info.si_pid() } != 0).then_some(())
    });
    let hung = exited.is_none();
    if hung {
        let _ = child.kill();
    }
    let killed_by_test = sh.running[slot].lock().unwrap().take().is_some_and(|r| r.killed);
    let status = child.wait().unwrap();
    let met_restart = restarts_before % 2 == 1 || sh.restarts.load(Ordering::SeqCst) != restarts_before;
    let o = Outcome {
        args: args.iter().map(|a| a.to_string()).collect(),
        host: host.to_string(),
        code: status.code(),
        killed: killed_by_test && status.signal() == Some(libc::SIGKILL),
        hung,
        met_restart,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    if o.killed {
        sh.count(if slot == CLEANER { "cleaner kills landed" } else { "writer kills landed" }, 1);
    }
    o
}

/// Checks a command that failed: an expected kind is counted, anything else is a problem.
/// Returns whether it was expected.
fn expect_failure(sh: &Shared, o: &Outcome, gone: bool) -> bool {
    match judge(o, gone) {
        Ok(kind) => {
            sh.expected.lock().unwrap().push(format!(
                "{kind}: {:?} on {}: {}",
                o.args,
                o.host,
                o.error_lines().join(" | ")
            ));
            true
        }
        Err(why) => {
            sh.problem(format!("{why}: {}", o.describe()));
            false
        }
    }
}

/// `ls --format json [filter]`, None when it failed in an expected way.
fn ls(sh: &Shared, slot: usize, host: &str, filter: Option<&str>) -> Option<Vec<serde_json::Value>> {
    let mut args = vec!["ls"];
    args.extend(filter);
    args.extend(["--format", "json"]);
    let o = run(sh, slot, host, &args);
    if !o.ok() {
        expect_failure(sh, &o, false);
        return None;
    }
    match serde_json::from_str::<serde_json::Value>(&o.stdout) {
        Ok(serde_json::Value::Array(v)) => Some(v),
        _ => {
            sh.problem(format!("ls printed no JSON list: {}", o.describe()));
            None
        }
    }
}

fn uid_of(v: &serde_json::Value) -> String {
    v["uid"].as_str().unwrap_or_default().to_string()
}

fn label_sha(v: &serde_json::Value) -> Option<String> {
    v["labels"]["sha256"].as_str().map(str::to_string)
}

/// The first image of writer `w`: its own random blocks, pool blocks, zeros.
fn first_image(sh: &Shared, w: usize, seed: u64) -> Vec<u8> {
    let mut img = random_bytes(seed.wrapping_add(1000 + w as u64), OWN_BLOCKS * BS);
    for j in 0..SHARED_BLOCKS {
        img.extend_from_slice(&sh.pool[(j + w * 5) % POOL]);
    }
    img.resize((OWN_BLOCKS + SHARED_BLOCKS + ZERO_BLOCKS) * BS, 0);
    img
}

/// The next image: a few of its own blocks new, a few shared blocks drawn again from the
/// pool, sometimes a zero block filled or a block zeroed.
fn mutate(sh: &Shared, img: &mut [u8], rng: &mut fastrand::Rng) {
    let put = |img: &mut [u8], block: usize, data: &[u8]| img[block * BS..(block + 1) * BS].copy_from_slice(data);
    for _ in 0..rng.usize(1..=4) {
        put(img, rng.usize(0..OWN_BLOCKS), &random_bytes(rng.u64(..), BS));
    }
    for _ in 0..rng.usize(1..=3) {
        put(img, OWN_BLOCKS + rng.usize(0..SHARED_BLOCKS), &sh.pool[rng.usize(0..POOL)]);
    }
    if rng.bool() {
        let b = OWN_BLOCKS + SHARED_BLOCKS + rng.usize(0..ZERO_BLOCKS);
        let zero = rng.bool();
        put(img, b, &if zero { vec![0u8; BS] } else { sh.pool[rng.usize(0..POOL)].clone() });
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Writer `w`: back up a changing image until the deadline; after a failure, finish or
/// remove the incomplete version it left before the image changes again.
fn writer(sh: &Shared, w: usize, seed: u64) {
    let (h, name) = (host(w), vm(w));
    let mut rng = fastrand::Rng::with_seed(seed ^ (0x5151 * (w as u64 + 1)));
    let path = sh.dir.join(format!("img-{h}"));
    let url = format!("file://{}", path.display());
    let mut img = first_image(sh, w, seed);
    let mut sha = sha256(&img);
    std::fs::write(&path, &img).unwrap();
    let mut pending = false;
    let mut first = true;
    let filter = format!("name == \"{name}\" and status == \"incomplete\"");
    while !sh.over() {
        if pending {
            let Some(incomplete) = ls(sh, w, &h, Some(&filter)) else { continue };
            if incomplete.is_empty() {
                pending = false; // it failed before its version existed
                continue;
            }
            if incomplete.len() > 1 {
                sh.problem(format!("{name} has {} incomplete versions: {incomplete:?}", incomplete.len()));
            }
            let uid = uid_of(&incomplete[0]);
            if label_sha(&incomplete[0]).as_deref() != Some(sha.as_str()) {
                sh.problem(format!("{uid} of {name} was started for another image: {:?}", incomplete[0]));
            }
            let o = if w < CONTINUERS {
                run(sh, w, &h, &["backup", "--continue", &uid, &url, &name])
            } else {
                run(sh, w, &h, &["rm", &uid])
            };
            if o.ok() {
                pending = false;
                if w < CONTINUERS {
                    if o.stdout.trim() != uid {
                        sh.problem(format!("--continue printed another uid than {uid}: {}", o.describe()));
                    }
                    sh.recorded.lock().unwrap().insert(uid, sha.clone());
                    sh.count("continued", 1);
                } else {
                    sh.count("incomplete removed", 1);
                }
            } else {
                expect_failure(sh, &o, false);
            }
            continue;
        }
        if !first {
            mutate(sh, &mut img, &mut rng);
            sha = sha256(&img);
            std::fs::write(&path, &img).unwrap();
        }
        first = false;
        let label = format!("sha256={sha}");
        let o = run(sh, w, &h, &["backup", &url, &name, "-b", "64k", "-l", &label]);
        if o.ok() {
            sh.recorded.lock().unwrap().insert(o.stdout.trim().to_string(), sha.clone());
            sh.count("backups", 1);
        } else {
            if o.met_restart && !o.killed && o.error_lines().len() == 1 {
                sh.count("backups failed by the restart", 1);
            }
            expect_failure(sh, &o, false);
            pending = true;
        }
    }
}

/// The cleaner (host5): `rm` a random half of each host's older versions, then `cleanup`.
fn cleaner(sh: &Shared, seed: u64) {
    let h = "host5";
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xC1EA);
    while !sh.over() {
        let Some(all) = ls(sh, CLEANER, h, None) else { continue };
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in all.iter().filter(|v| v["status"] == "valid") {
            by_name.entry(v["name"].as_str().unwrap_or_default().to_string()).or_default().push(uid_of(v));
        }
        // Per host, one `rm` of three in four of its older versions (the newest stays),
        // so that the versions left stay few while the writers go on. (Per host: a
        // version the checker holds makes the whole `rm` refuse.)
        for uids in by_name.values_mut() {
            uids.sort();
            uids.pop();
            let doomed: Vec<String> = uids.drain(..).filter(|_| rng.u8(0..4) > 0).collect();
            if doomed.is_empty() {
                continue;
            }
            let mut args = vec!["rm", "--force"];
            args.extend(doomed.iter().map(String::as_str));
            let o = run(sh, CLEANER, h, &args);
            if o.ok() {
                sh.count("removed", doomed.len() as u64);
                sh.removed.lock().unwrap().extend(doomed);
            } else if expect_failure(sh, &o, false) {
                // Refused as a whole, or stopped part way (the restart, or a version locked
                // by a reader since the plan): what is gone was removed. (Only the cleaner
                // removes valid versions, so asking until the catalog answers is exact.)
                let all = poll(|| ls(sh, CLEANER, h, None)).expect("the catalog answers again");
                let left: BTreeSet<String> = all.iter().map(uid_of).collect();
                let (gone, kept): (Vec<String>, Vec<String>) = doomed.into_iter().partition(|u| !left.contains(u));
                sh.removed.lock().unwrap().extend(gone);
                // `rm` marks a version invalid, deletes its object, then its rows. Cut off
                // by the restart in between, it leaves an invalid version without its
                // version object until `rm` runs again, as a retention job would: so does
                // the cleaner, at once.
                if o.met_restart && !kept.is_empty() {
                    sh.cut_off_rm.lock().unwrap().extend(kept.iter().cloned());
                    let done = poll(|| {
                        // Of those, the ones still there (an rm refused part way removed some).
                        let listed: BTreeSet<String> = ls(sh, CLEANER, h, None)?.iter().map(uid_of).collect();
                        let mut again = vec!["rm", "--force"];
                        again.extend(kept.iter().filter(|u| listed.contains(*u)).map(String::as_str));
                        if again.len() == 2 {
                            return Some(());
                        }
                        let o = run(sh, CLEANER, h, &again);
                        (o.ok() || !expect_failure(sh, &o, false)).then_some(())
                    });
                    if done.is_some() {
                        sh.removed.lock().unwrap().extend(kept);
                    }
                }
            }
        }
        let o = run(sh, CLEANER, h, &["cleanup"]);
        if o.ok() {
            sh.count("cleanups", 1);
            if format!("{}{}", o.stdout, o.stderr).contains(" slices to stay within cleanup_memory") {
                sh.count("cleanups in slices", 1);
            }
            sh.count("objects deleted during the run", deleted(&o));
        } else {
            expect_failure(sh, &o, false);
        }
    }
}

/// The objects a cleanup reports deleted ("storage X: deleted N object(s) and M orphaned file(s)").
fn deleted(o: &Outcome) -> u64 {
    let text = format!("{}{}", o.stdout, o.stderr);
    text.lines()
        .filter_map(|l| l.split(": deleted ").nth(1))
        .map(|rest| {
            let n: Vec<u64> = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            n.iter().take(2).sum::<u64>()
        })
        .sum()
}

/// Whether version `uid` is gone from the catalog (removed), as host6 sees it once the
/// catalog answers (it may be restarting: asked again until it does).
fn gone(sh: &Shared, uid: &str) -> bool {
    poll(|| ls(sh, CHECKER, "host6", None)).is_some_and(|all| !all.iter().any(|v| uid_of(v) == uid))
}

/// The checker (host6): restore a random valid version and compare, deep-scrub another.
fn checker(sh: &Shared, seed: u64) {
    let h = "host6";
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xC4EC);
    let mut n = 0;
    while !sh.over() {
        let Some(all) = ls(sh, CHECKER, h, None) else { continue };
        let valid: Vec<&serde_json::Value> = all.iter().filter(|v| v["status"] == "valid").collect();
        if valid.is_empty() {
            continue;
        }
        let v = valid[rng.usize(0..valid.len())];
        let uid = uid_of(v);
        n += 1;
        let target = sh.dir.join(format!("restored-{n}"));
        let o = run(sh, CHECKER, h, &["restore", &uid, &format!("file://{}", target.display())]);
        if o.ok() {
            let got = sha256_file(&target);
            let want = label_sha(v);
            if want.as_deref() != Some(got.as_str()) {
                sh.problem(format!("{uid} ({}) restored with sha256 {got}, recorded {want:?}", v["name"]));
            }
            sh.count("restores compared", 1);
        } else {
            let removed = gone(sh, &uid);
            expect_failure(sh, &o, removed);
        }
        let _ = std::fs::remove_file(&target);
        let v = valid[rng.usize(0..valid.len())];
        let uid = uid_of(v);
        let o = run(sh, CHECKER, h, &["deep-scrub", &uid]);
        let damage: Vec<&str> = o.stderr.lines().filter(|l| l.starts_with("keepfs: damaged:")).collect();
        if o.ok() {
            sh.count("deep scrubs", 1);
        } else if o.code == Some(3)
            && damage.len() == 1
            && damage[0].contains(&format!("its version object versions/{uid} is missing"))
        {
            // What the catalog says of it now: a cut-off rm marked it invalid first.
            let status = poll(|| ls(sh, CHECKER, h, None)).and_then(|all| {
                all.iter().find(|x| uid_of(x) == uid).map(|x| x["status"].as_str().unwrap_or_default().to_string())
            });
            sh.object_missing.lock().unwrap().push((uid, o.describe(), status));
        } else {
            let removed = gone(sh, &uid);
            expect_failure(sh, &o, removed);
        }
    }
}

/// The loops' threads; stopped, their commands killed and the threads joined when
/// dropped, also when the test fails.
struct Loops {
    sh: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loops {
    fn join(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.sh.problem("a loop of the drill panicked (see its message above)".into());
            }
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        for slot in &self.sh.running {
            if let Some(r) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                // SAFETY: kill(2) of a child a loop started and has not reaped.
                unsafe { libc::kill(r.pid as i32, libc::SIGKILL) };
            }
        }
        self.join();
    }
}

/// The last moment of the run a kill may strike: a killed backup may leave object files
/// without a catalog row, which cleanup takes only when they are older than its cutoff
/// less 2 s (docs/format.md, "Cleanup"); the loops then run on for seconds, so the final
/// cleanup finds every such file old enough.
const LAST_KILL: f64 = 0.85;

/// Kills the command loop `slot` runs once it runs `what` (waits for that state, until
/// [`LAST_KILL`]); false when that moment passed first.
fn kill_when_running(sh: &Shared, slot: usize, what: &str) -> bool {
    poll_for(POLL_LIMIT, || {
        if sh.over() || sh.start.elapsed() >= DRILL.mul_f64(LAST_KILL) {
            return Some(false);
        }
        let mut running = sh.running[slot].lock().unwrap();
        let r = running.as_mut().filter(|r| r.what == what)?;
        // SAFETY: kill(2) of a child that is not reaped while `running` holds its pid.
        unsafe { libc::kill(r.pid as i32, libc::SIGKILL) };
        r.killed = true;
        Some(true)
    })
    .unwrap_or(false)
}

fn seed() -> u64 {
    match std::env::var("KEEPFS_DRILL_SEED") {
        Ok(s) if !s.is_empty() => s.parse().expect("KEEPFS_DRILL_SEED must be a number"),
        _ => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

enum Event {
    KillWriter,
    KillCleaner,
    RestartPostgres,
}

fn drill(kind: &str, make_store: impl FnOnce(&Path) -> Store) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let seed = seed();
    eprintln!("multihost drill on {kind}: seed {seed} (replay with KEEPFS_DRILL_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let pg = PgServer::start();
    let database = pg.url(&pg.create_db("multihost"));
    let store = make_store(dir.path());
    for i in 0..6 {
        let home = dir.path().join(format!("home-{}", host(i)));
        // The cleaner gets a budget far below what its storage needs, so each of its
        // cleanups goes in slices, each slice a cleanup of its own among the writers.
        let budget = if i == CLEANER { "cleanup_memory = \"6K\"\n" } else { "" };
        std::fs::write(
            dir.path().join(format!("{}.toml", host(i))),
            format!("{budget}{}", store.config(&home, &database)),
        )
        .unwrap();
    }
    let pool = (0..POOL).map(|i| random_bytes(seed.wrapping_add(77 + i as u64), BS)).collect();
    let sh = Arc::new(Shared {
        dir: dir.path().to_path_buf(),
        start: Instant::now(),
        stop: AtomicBool::new(false),
        restarts: AtomicU64::new(0),
        running: (0..WRITERS + 2).map(|_| Mutex::new(None)).collect(),
        recorded: Mutex::new(BTreeMap::new()),
        removed: Mutex::new(BTreeSet::new()),
        cut_off_rm: Mutex::new(BTreeSet::new()),
        object_missing: Mutex::new(Vec::new()),
        problems: Mutex::new(Vec::new()),
        expected: Mutex::new(Vec::new()),
        counts: Mutex::new(BTreeMap::new()),
        next_log: AtomicU64::new(0),
        pool,
    });
    let mut loops = Loops { sh: sh.clone(), threads: Vec::new() };
    for w in 0..WRITERS {
        let sh = sh.clone();
        loops.threads.push(std::thread::spawn(move || writer(&sh, w, seed)));
    }
    let s = sh.clone();
    loops.threads.push(std::thread::spawn(move || cleaner(&s, seed)));
    let s = sh.clone();
    loops.threads.push(std::thread::spawn(move || checker(&s, seed)));

    // The faults, at random moments of the run.
    let mut events: Vec<(Duration, Event)> = Vec::new();
    let at = |rng: &mut fastrand::Rng, from: f64, to: f64| DRILL.mul_f64(from + (to - from) * rng.f64());
    for _ in 0..KILLS {
        events.push((at(&mut rng, 0.05, 0.8), Event::KillWriter));
        events.push((at(&mut rng, 0.05, 0.8), Event::KillCleaner));
    }
    events.push((at(&mut rng, 0.3, 0.6), Event::RestartPostgres));
    events.sort_by_key(|e| e.0);
    for (when, event) in events {
        // The moment itself is the random choice; what it hits is waited for as a state.
        if let Some(wait) = when.checked_sub(sh.start.elapsed()) {
            std::thread::sleep(wait);
        }
        match event {
            Event::KillWriter => {
                kill_when_running(&sh, VICTIM, "backup");
            }
            Event::KillCleaner => {
                kill_when_running(&sh, CLEANER, "cleanup");
            }
            Event::RestartPostgres => {
                // While backups run: wait for that state.
                poll(|| {
                    (0..WRITERS)
                        .any(|w| sh.running[w].lock().unwrap().as_ref().is_some_and(|r| r.what == "backup"))
                        .then_some(())
                });
                sh.restarts.fetch_add(1, Ordering::SeqCst);
                pg.restart();
                sh.restarts.fetch_add(1, Ordering::SeqCst);
                eprintln!("drill: PostgreSQL restarted at {:?}", sh.start.elapsed());
            }
        }
    }
    loops.join();
    drop(loops);

    let final_run = |host: &str, args: &[&str]| -> Outcome {
        let o = run(&sh, CHECKER, host, args);
        assert!(o.ok(), "after the drill (seed {seed}): {}", o.describe());
        o
    };
    let list = |host: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(&final_run(host, &["ls", "--format", "json"]).stdout).expect("ls json")
    };
    // A version object found missing is a half-removed version, and only an `rm` the
    // restart cut off may leave one (see `cut_off_rm`).
    let cut_off = sh.cut_off_rm.lock().unwrap().clone();
    for (uid, what, status) in sh.object_missing.lock().unwrap().iter() {
        if status.as_deref() == Some("valid") {
            sh.problem(format!("a version listed valid has no version object (status {status:?}): {what}"));
        } else if cut_off.contains(uid) {
            sh.count("deep scrubs of a version an rm cut off by the restart left half-removed", 1);
        } else {
            sh.problem(format!("a version object missing, not left by an rm the restart cut off: {what}"));
        }
    }
    let counts = sh.counts.lock().unwrap().clone();
    eprintln!("drill on {kind} (seed {seed}): {counts:?}");
    for e in sh.expected.lock().unwrap().iter() {
        eprintln!("drill: expected: {e}");
    }

    // Incomplete versions left: the continuing hosts finish theirs, the others remove them.
    for v in list("host6").iter().filter(|v| v["status"] == "incomplete") {
        let uid = uid_of(v);
        let w = (0..WRITERS).find(|&w| v["name"] == vm(w).as_str()).expect("a writer's version");
        let path = sh.dir.join(format!("img-{}", host(w)));
        if w < CONTINUERS {
            let o = final_run(&host(w), &["backup", "--continue", &uid, &format!("file://{}", path.display()), &vm(w)]);
            assert_eq!(o.stdout.trim(), uid);
            assert_eq!(label_sha(v), Some(sha256_file(&path)), "{uid} continues the image it started");
            sh.recorded.lock().unwrap().insert(uid, sha256_file(&path));
        } else {
            final_run(&host(w), &["rm", &uid]);
        }
    }
    // Every host runs a command that drops its own dead sessions (those of the processes
    // the test killed and of those that lost their connection), as a host does after a
    // crash; then one cleanup with nothing running deletes everything unreferenced.
    for i in 0..6 {
        final_run(&host(i), &["cleanup", "--dry-run"]);
    }
    final_run("host5", &["cleanup"]);
    let plan = final_run("host5", &["cleanup", "--dry-run"]).stdout;
    assert!(plan.contains("would delete 0 unreferenced object(s) and 0 orphaned file(s)"), "{plan}");

    let versions = list("host6");
    let recorded = sh.recorded.lock().unwrap().clone();
    let removed = sh.removed.lock().unwrap().clone();
    let listed: BTreeSet<String> = versions.iter().map(uid_of).collect();
    for (uid, _) in recorded.iter().filter(|(u, _)| !removed.contains(*u)) {
        assert!(listed.contains(uid), "version {uid} was backed up and never removed, but is gone (seed {seed})");
    }
    let mut expected_keys = BTreeSet::new();
    for v in &versions {
        let uid = uid_of(v);
        assert_eq!(v["status"], "valid", "{v}");
        let want = label_sha(v).expect("every version carries its image's sha256");
        if let Some(r) = recorded.get(&uid) {
            assert_eq!(r, &want, "{uid}: the recorded sha256 and the label agree");
        }
        let target = sh.dir.join("final-restore");
        final_run("host6", &["restore", &uid, &format!("file://{}", target.display())]);
        assert_eq!(sha256_file(&target), want, "{uid} ({}) restores byte-identical (seed {seed})", v["name"]);
        std::fs::remove_file(&target).unwrap();
        final_run("host6", &["deep-scrub", &uid]);
    }
    let objects = store.version_objects(&sh.dir);
    assert_eq!(objects.keys().cloned().collect::<BTreeSet<_>>(), listed, "the storage's versions are those listed");
    // Which hosts' versions name each block: blocks shared across hosts are what a
    // cleanup must keep for one host after it removed another's versions.
    let mut hosts_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (uid, object) in &objects {
        let (version, index) = keepfs::repo::decode_version_object(keepfs::transform::Codec::plain(), object)
            .unwrap_or_else(|e| panic!("version object {uid}: {e}"));
        for (_, id) in index.entries.data() {
            hosts_of.entry(id.storage_key()).or_default().insert(version.name.clone());
        }
    }
    let cross_host = hosts_of.values().filter(|h| h.len() > 1).count();
    assert!(cross_host > 0, "no block is shared between hosts: cross-host deduplication was not exercised");
    expected_keys.extend(hosts_of.into_keys());
    let stored = store.block_keys();
    let missing: Vec<&String> = expected_keys.difference(&stored).collect();
    let extra: Vec<&String> = stored.difference(&expected_keys).collect();
    assert!(missing.is_empty(), "blocks deleted under valid versions (seed {seed}): {missing:?}");
    assert!(extra.is_empty(), "objects no version references survived the final cleanup (seed {seed}): {extra:?}");

    let problems = sh.problems.lock().unwrap().clone();
    assert!(
        problems.is_empty(),
        "the drill on {kind} (seed {seed}) met {} problem(s) during the run:\n{}",
        problems.len(),
        problems.join("\n\n")
    );

    // The drill did what it is for (true on any correct run, whatever the timing).
    let hosts: BTreeSet<String> = versions.iter().map(|v| v["name"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(hosts.len(), WRITERS, "every host has a version left: {hosts:?}");
    assert!(counts.get("backups").copied().unwrap_or(0) >= WRITERS as u64, "{counts:?}");
    assert!(counts.get("cleanups").copied().unwrap_or(0) >= 1, "{counts:?}");
    assert!(counts.get("cleanups in slices").copied().unwrap_or(0) >= 1, "{counts:?}");
    // Its faults happened: a kill that found nothing running is given up silently, and
    // a run whose kills all missed would prove nothing about them.
    assert!(counts.get("writer kills landed").copied().unwrap_or(0) >= 1, "{counts:?}");
    assert!(counts.get("cleaner kills landed").copied().unwrap_or(0) >= 1, "{counts:?}");
    assert_eq!(sh.restarts.load(Ordering::SeqCst), 2, "PostgreSQL was restarted once, while backups ran");
    eprintln!(
        "drill on {kind} (seed {seed}): {} versions checked, {} block objects ({cross_host} shared between hosts), {} versions recorded, {} removed; {:?} in all",
        versions.len(),
        stored.len(),
        recorded.len(),
        removed.len(),
        sh.start.elapsed()
    );
}

#[test]
fn many_hosts_back_up_while_one_cleans_up_on_the_file_storage() {
    drill("the file storage", |dir| Store::File(dir.join("storage")));
}

#[test]
fn many_hosts_back_up_while_one_cleans_up_on_s3() {
    drill("Garage S3", |_| Store::S3(Garage::start()));
}
