//! Prometheus metrics as an operator uses them: a node-exporter textfile written after a
//! backup and a scrub, `/metrics` served by `keepfs mount` and `keepfs nbd` and scraped
//! with curl, and a push to a real Pushgateway (Debian's prometheus-pushgateway, started
//! here on 127.0.0.1:59091-59099), every text checked by `promtool check metrics`.

mod common;
use common::mount::{Mount, wait_until};
use common::*;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// `promtool check metrics` on `text`: must exit 0 (lint problems are failures too).
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the text:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `series` (name and labels exactly as written) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

fn curl(url: &str) -> (bool, String) {
    let out = Command::new("curl").args(["-sS", "-f", "--max-time", "10", url]).output().expect("curl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn backup_and_scrub_write_a_textfile_that_promtool_accepts() {
    let repo = Repo::new();
    let image = mixed_image(7, 6, 64 * 1024, 1000);
    std::fs::write(repo.path("vm1.img"), &image).unwrap();
    let dir = repo.path("textfile");
    std::fs::create_dir(&dir).unwrap();
    let prom = dir.join("keepfs.prom");
    let prom_s = prom.to_str().unwrap();

    let url = repo.url("vm1.img");
    let uid =
        repo.ok(&["backup", "-b", "64k", "-l", "daily", &url, "vm1", "--metrics-file", prom_s]).trim().to_string();
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_accepts(&text);
    // Only the file itself: the temporary file it was written to was renamed.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert_eq!(sample(&text, r#"keepfs_versions{name="vm1",status="valid"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"keepfs_versions{name="vm1",status="incomplete"}"#), Some(0.0));
    assert_eq!(sample(&text, r#"keepfs_last_backup_size_bytes{name="vm1"}"#), Some(image.len() as f64));
    let v = repo.version(&uid);
    let read = v["stats"]["bytes_read"].as_f64().unwrap();
    assert!(read > 0.0);
    assert_eq!(sample(&text, r#"keepfs_last_backup_read_bytes{name="vm1"}"#), Some(read));
    assert_eq!(sample(&text, r#"keepfs_last_backup_written_bytes{name="vm1"}"#), v["stats"]["bytes_written"].as_f64());
    let when = sample(&text, r#"keepfs_last_backup_timestamp_seconds{name="vm1"}"#).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(when <= now && when > now - 3600.0, "last backup at {when}, now {now}");
    assert!(sample(&text, r#"keepfs_last_backup_duration_seconds{name="vm1"}"#).is_some());
    // One daily backup where the daily scheduler keeps 8: `keepfs sla` reports it.
    assert_eq!(sample(&text, r#"keepfs_sla_breaches{name="vm1",scheduler="daily"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"keepfs_damaged_objects{storage="default"}"#), Some(0.0));

    // A second backup of the same image: everything deduplicated.
    repo.ok(&["backup", "-b", "64k", &url, "vm1", "--metrics-file", prom_s]);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert_eq!(sample(&text, r#"keepfs_versions{name="vm1",status="valid"}"#), Some(2.0));
    assert_eq!(sample(&text, r#"keepfs_last_backup_written_bytes{name="vm1"}"#), Some(0.0));
    let dedup = sample(&text, r#"keepfs_last_backup_deduplicated_bytes{name="vm1"}"#).unwrap();
    let sparse = sample(&text, r#"keepfs_last_backup_sparse_bytes{name="vm1"}"#).unwrap();
    assert!(dedup > 0.0 && dedup + sparse == read, "deduplicated {dedup} + sparse {sparse} != read {read}");

    // A damaged object: the deep scrub exits 3, and the metrics show the damage.
    flip_bit(&repo.object_file(&image[3 * 64 * 1024..4 * 64 * 1024]), 100, 0x01);
    let r = repo.run(&["deep-scrub", &uid, "--metrics-file", prom_s]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let text = std::fs::read_to_string(&prom).unwrap();
    promtool_accepts(&text);
    assert_eq!(sample(&text, r#"keepfs_damaged_objects{storage="default"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"keepfs_versions{name="vm1",status="invalid"}"#), Some(2.0));
    assert_eq!(sample(&text, r#"keepfs_versions{name="vm1",status="valid"}"#), Some(0.0));
}

#[test]
fn metrics_options_fail_with_one_line() {
    let repo = Repo::new();
    repo.ok(&["backup", "null://1M", "z"]);
    let r = repo.run(&["ls", "--pushgateway", "127.0.0.1:9091"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.error_line().contains("--pushgateway 127.0.0.1:9091: not a URL"), "{}", r.stderr);
    // Nothing listens on port 1: the backup is made, the push fails, the exit code says so.
    let r = repo.run(&["backup", "null://1M", "z", "--pushgateway", "http://127.0.0.1:1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.error_line()
            .starts_with("keepfs: error: metrics: cannot push the metrics to http://127.0.0.1:1/metrics/job/keepfs"),
        "{}",
        r.stderr
    );
    assert_eq!(repo.valid_uids("name == \"z\"").len(), 2);
    // A command refused as bad input changed nothing: its one error line, no metrics.
    let prom = repo.path("k.prom");
    let r = repo.run(&["backup", "null://1M", "bad/name", "--metrics-file", prom.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(!prom.exists());
    let r = repo.run(&["ls", "--metrics-file", repo.path("no/such/dir/k.prom").to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.error_line().contains("cannot write the metrics file"), "{}", r.stderr);
}

#[test]
fn mount_serves_metrics_to_curl() {
    let repo = Repo::new();
    std::fs::write(repo.path("a.img"), random_bytes(3, 300_000)).unwrap();
    repo.backup("a.img", "a", &[]);
    let mut m = Mount::new(&repo, &["--metrics", "127.0.0.1:0"]);
    let addr = m
        .log_text()
        .lines()
        .find_map(|l| l.strip_prefix("keepfs: metrics at http://")?.strip_suffix("/metrics").map(String::from))
        .unwrap_or_else(|| panic!("no metrics address in the log: {}", m.log_text()));
    let (ok, text) = curl(&format!("http://{addr}/metrics"));
    assert!(ok, "{text}");
    promtool_accepts(&text);
    assert_eq!(sample(&text, r#"keepfs_versions{name="a",status="valid"}"#), Some(1.0));
    // Each scrape reads the catalog afresh: a backup made meanwhile shows.
    repo.backup("a.img", "b", &[]);
    let (_, text) = curl(&format!("http://{addr}/metrics"));
    assert_eq!(sample(&text, r#"keepfs_versions{name="b",status="valid"}"#), Some(1.0));
    let (ok, _) = curl(&format!("http://{addr}/other"));
    assert!(!ok, "only /metrics is served");
    m.unmount();
}

#[test]
fn nbd_serves_metrics_to_curl() {
    let repo = Repo::new();
    repo.ok(&["backup", "null://4M", "z"]);
    let mut child = repo
        .command(&["nbd", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    for _ in 0..2 {
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        if let Some(a) = line.trim().strip_prefix("keepfs: metrics at http://") {
            addr = a.strip_suffix("/metrics").map(String::from);
        }
    }
    let addr = addr.expect("the server names its metrics address");
    let (ok, text) = curl(&format!("http://{addr}/metrics"));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(ok, "{text}");
    promtool_accepts(&text);
    assert_eq!(sample(&text, r#"keepfs_versions{name="z",status="valid"}"#), Some(1.0));
    assert!(status.success(), "{status}");
}

/// A real Pushgateway on the first free port of 127.0.0.1:59091-59099, with its own
/// persistence file; killed (and waited for) on drop.
struct Gateway {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start() -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        for port in 59091..=59099 {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            let url = format!("http://127.0.0.1:{port}");
            let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
            let mut child = Command::new("prometheus-pushgateway")
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg(format!("--persistence.file={}", dir.path().join("persist").display()))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("prometheus-pushgateway (Debian package) must be installed");
            let mut exited = false;
            wait_until("the Pushgateway to be ready", LIMIT, || {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                exited || curl(&format!("{url}/-/ready")).0
            });
            if !exited {
                return Gateway { child, url, _dir: dir };
            }
            // Someone took the port between the check and the start: try the next.
        }
        panic!("no free port for the Pushgateway in 127.0.0.1:59091-59099");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn backup_pushes_to_a_real_pushgateway() {
    let gw = Gateway::start();
    let repo = Repo::new();
    repo.ok(&["backup", "null://8M", "pushed", "--pushgateway", &gw.url]);
    let (ok, text) = curl(&format!("{}/metrics", gw.url));
    assert!(ok);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("keepfs_versions{") && l.contains(r#"name="pushed""#) && l.contains(r#"status="valid""#)
        })
        .unwrap_or_else(|| panic!("the gateway does not have keepfs_versions:\n{text}"));
    assert!(line.contains(r#"job="keepfs""#), "{line}");
    assert!(line.ends_with(" 1"), "{line}");
    // A second push replaces the group: the count follows the catalog.
    repo.ok(&["backup", "null://8M", "pushed", "--pushgateway", &gw.url]);
    let (_, text) = curl(&format!("{}/metrics", gw.url));
    assert!(
        text.lines().any(|l| l.starts_with("keepfs_versions{")
            && l.contains(r#"name="pushed""#)
            && l.contains(r#"status="valid""#)
            && l.ends_with(" 2")),
        "{text}"
    );
    promtool_accepts(&text);
}

/// A differential backup that checks its hints reads the base before its version exists;
/// the time it reports as finished must still not lie in the future (it did: the
/// duration counted that check, and was added to the version's later date).
#[test]
fn a_checked_differential_backup_finishes_before_it_is_scraped() {
    const BS: usize = 64 * 1024;
    let repo = Repo::new();
    let a = mixed_image(71, 1024, BS, 0);
    std::fs::write(repo.path("a"), &a).unwrap();
    let base = repo.backup("a", "vm1", &["-b", "64k"]);
    let mut b = a;
    b[5 * BS] ^= 0xff;
    std::fs::write(repo.path("b"), &b).unwrap();
    let hints = repo.path("diff.json");
    std::fs::write(&hints, format!(r#"[{{"offset":{},"length":1,"exists":"true"}}]"#, 5 * BS)).unwrap();
    let prom = repo.path("keepfs.prom");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    repo.ok(&[
        "backup",
        &repo.url("b"),
        "vm1",
        "--base",
        &base,
        "--hints",
        hints.to_str().unwrap(),
        "--hints-check",
        "100",
        "--metrics-file",
        prom.to_str().unwrap(),
    ]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let text = std::fs::read_to_string(&prom).unwrap();
    let when = sample(&text, r#"keepfs_last_backup_timestamp_seconds{name="vm1"}"#).unwrap();
    assert!(when <= now, "the backup finished at {when}, after it returned at {now}");
    let took = sample(&text, r#"keepfs_last_backup_duration_seconds{name="vm1"}"#).unwrap();
    // A version's date is kept in whole seconds.
    assert!(when - took >= before.floor() - 0.001, "it started at {}, before it was called at {before}", when - took);
}
