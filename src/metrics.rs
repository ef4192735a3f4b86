//! Prometheus metrics of a repository, computed from its catalog (the metadata database)
//! alone, so that the text written by any command (a backup, a scrub, `enforce`) or
//! served by a mount describes the whole repository, not just what one process did.
//!
//! Owns: what the metrics are (names, labels, meaning: listed in docs/metrics.md), their
//! encoding (the `prometheus-client` crate, OpenMetrics text, which Prometheus, promtool,
//! node-exporter's textfile collector and the Pushgateway read), and the three ways out:
//! a textfile written atomically ([`write_file`]), a push to a Pushgateway ([`push`]) and
//! a `/metrics` responder on a local address ([`serve`], for `keepfs mount` and `keepfs
//! nbd`). Nothing here holds a lock across I/O: each gathering opens its own database
//! connection.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::schedule::{Scheduler, sla};
use crate::version::{Status, Version};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The content type of [`gather`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The metrics of the repository `config` names, read from its database now.
pub fn gather(config: &Config) -> Result<String> {
    let db = crate::catalog::open(&config.catalog_location(), config.modes)?;
    let versions = db.list_versions()?;
    let mut storages = Vec::new();
    for (id, name) in db.storage_names()? {
        let (objects, stored) = db.object_totals(id)?;
        let damaged = db.invalid_objects(id)?.len() as u64;
        storages.push(StorageFacts { name, objects, stored, damaged });
    }
    drop(db);
    render(&versions, &storages, &config.schedulers, Utc::now())
}

/// What the catalog says about one storage.
pub struct StorageFacts {
    pub name: String,
    pub objects: u64,
    pub stored: u64,
    /// Objects a scrub or a restore found damaged.
    pub damaged: u64,
}

/// The metrics text for these versions and storages at `now`.
pub fn render(
    versions: &[Version],
    storages: &[StorageFacts],
    schedulers: &[Scheduler],
    now: DateTime<Utc>,
) -> Result<String> {
    let mut reg = Registry::with_prefix("keepfs");
    let mut gauge = |name: &str, help: &str, unit: Option<Unit>| {
        let g = G::default();
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, g.clone()),
            None => reg.register(name, help, g.clone()),
        }
        g
    };
    let last_time = gauge(
        "last_backup_timestamp",
        "When the last valid backup of a name finished (Unix time)",
        Some(Unit::Seconds),
    );
    let last_duration =
        gauge("last_backup_duration", "How long the last valid backup of a name took", Some(Unit::Seconds));
    let last_size = gauge("last_backup_size", "Image size of the last valid backup of a name", Some(Unit::Bytes));
    let last_read =
        gauge("last_backup_read", "Bytes the last valid backup of a name read from its source", Some(Unit::Bytes));
    let last_written = gauge(
        "last_backup_written",
        "Bytes of new blocks the last valid backup of a name wrote (before compression)",
        Some(Unit::Bytes),
    );
    let last_stored = gauge(
        "last_backup_stored",
        "Bytes the new objects of the last valid backup of a name take in storage",
        Some(Unit::Bytes),
    );
    let last_dedup = gauge(
        "last_backup_deduplicated",
        "Bytes of blocks the last valid backup of a name found already stored",
        Some(Unit::Bytes),
    );
    let last_sparse =
        gauge("last_backup_sparse", "Bytes of all-zero blocks of the last valid backup of a name", Some(Unit::Bytes));
    let count = gauge("versions", "Versions per name and status (incomplete, valid, invalid)", None);
    let stale = gauge(
        "incomplete_versions_older_than_one_day",
        "Incomplete versions begun more than a day ago (a backup that died: `keepfs backup --continue UID` or `keepfs rm UID`)",
        None,
    );
    let breaches = gauge(
        "sla_breaches",
        "Broken promises of a scheduler for a name, as `keepfs sla` lists them (schedulers a name's versions are labelled with)",
        None,
    );
    let damaged = gauge(
        "damaged_objects",
        "Objects of a storage that a scrub or a restore found damaged (versions using them are invalid)",
        None,
    );
    let objects = gauge("storage_objects", "Objects a storage holds", None);
    let stored = gauge("storage_stored", "Bytes the objects of a storage take", Some(Unit::Bytes));

    let mut names: BTreeMap<&str, Vec<&Version>> = BTreeMap::new();
    for v in versions {
        names.entry(v.name.as_str()).or_default().push(v);
    }
    let day = chrono::Duration::days(1);
    for (name, list) in &names {
        let n = labels(&[("name", name)]);
        for status in [Status::Incomplete, Status::Valid, Status::Invalid] {
            let k = list.iter().filter(|v| v.status == status).count();
            count.get_or_create(&labels(&[("name", name), ("status", status.as_str())])).set(k as f64);
        }
        let old = list.iter().filter(|v| v.status == Status::Incomplete && now - v.date > day).count();
        stale.get_or_create(&n).set(old as f64);
        let last = list.iter().filter(|v| v.status == Status::Valid).max_by_key(|v| (v.date, v.uid));
        if let Some(v) = last {
            let s = &v.stats;
            let end = v.date.timestamp_millis() as f64 / 1000.0 + s.duration_ms as f64 / 1000.0;
            last_time.get_or_create(&n).set(end);
            last_duration.get_or_create(&n).set(s.duration_ms as f64 / 1000.0);
            last_size.get_or_create(&n).set(v.size as f64);
            last_read.get_or_create(&n).set(s.bytes_read as f64);
            last_written.get_or_create(&n).set(s.bytes_written as f64);
            last_stored.get_or_create(&n).set(s.bytes_stored as f64);
            last_dedup.get_or_create(&n).set(s.bytes_deduplicated as f64);
            last_sparse.get_or_create(&n).set(s.bytes_sparse as f64);
        }
        // A name's schedulers are those its versions are labelled with: a name backed up
        // only daily is not in breach of the hourly scheduler's promises.
        let used: BTreeSet<&str> = list.iter().flat_map(|v| v.labels.keys()).map(String::as_str).collect();
        let mine: Vec<Scheduler> = schedulers.iter().filter(|s| used.contains(s.name.as_str())).cloned().collect();
        if !mine.is_empty() {
            let found = sla(&mine, versions, Some(name), now);
            for s in &mine {
                let k = found.iter().filter(|b| b.scheduler == s.name).count();
                breaches.get_or_create(&labels(&[("name", name), ("scheduler", &s.name)])).set(k as f64);
            }
        }
    }
    for s in storages {
        let l = labels(&[("storage", &s.name)]);
        damaged.get_or_create(&l).set(s.damaged as f64);
        objects.get_or_create(&l).set(s.objects as f64);
        stored.get_or_create(&l).set(s.stored as f64);
    }
    let mut text = String::new();
    encode(&mut text, &reg).map_err(|e| Error::Other(format!("cannot encode the metrics: {e}")))?;
    Ok(text)
}

/// Writes `text` to `path` for node-exporter's textfile collector, atomically (see
/// [`crate::named_file`]), so that a scrape never sees half a file.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let what = format!("cannot write the metrics file {}", path.display());
    crate::named_file::write_named(path, &what, |w| w.write_all(text.as_bytes()).map_err(|e| Error::io(&what, e)))
        // The command itself succeeded: a file that cannot be written is a failure (exit
        // 1), not bad input.
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Other(m),
            e => e,
        })
}

/// The URL a push goes to: `url` as given when it names a group (`.../metrics/job/...`),
/// else `url` + `/metrics/job/keepfs`.
pub fn push_url(url: &str) -> Result<String> {
    let parsed = url::Url::parse(url).map_err(|e| {
        Error::Invalid(format!("--pushgateway {url}: not a URL ({e}); give the gateway's, e.g. http://127.0.0.1:9091"))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::Invalid(format!("--pushgateway {url}: use an http:// or https:// URL")));
    }
    if parsed.path().contains("/metrics/job/") {
        Ok(url.to_string())
    } else {
        Ok(format!("{}/metrics/job/keepfs", url.trim_end_matches('/')))
    }
}

/// Pushes `text` to a Pushgateway, replacing the group's metrics (HTTP PUT: the text is
/// the whole repository's state), with a 10 s timeout per step.
pub fn push(url: &str, text: &str) -> Result<()> {
    let target = push_url(url)?;
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Other(format!("cannot make an HTTP client: {e}")))?;
    let resp = client
        .put(&target)
        .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        .body(text.to_string())
        .send()
        .map_err(|e| Error::Other(format!("cannot push the metrics to {target}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().unwrap_or_default();
        return Err(Error::Other(format!(
            "the Pushgateway at {target} refused the metrics: {status} {}",
            body.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// Serves `GET /metrics` on `addr` (e.g. `127.0.0.1:9198`) from a thread of its own,
/// each scrape gathered afresh from the database. Binding happens here, so that a busy
/// or bad address is an error before anything else starts.
pub fn serve(addr: &str, config: Config) -> Result<String> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| Error::Invalid(format!("--metrics {addr}: cannot listen there ({e})")))?;
    let shown = server.server_addr().to_ip().map(|a| a.to_string()).unwrap_or_else(|| addr.to_string());
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let reply = match (req.method(), path) {
                    (tiny_http::Method::Get, "/metrics") => match gather(&config) {
                        Ok(text) => tiny_http::Response::from_string(text).with_header(header(CONTENT_TYPE)),
                        Err(e) => tiny_http::Response::from_string(format!("keepfs: cannot gather the metrics: {e}\n"))
                            .with_status_code(500),
                    },
                    (tiny_http::Method::Get, _) => {
                        tiny_http::Response::from_string("not found: the metrics are at /metrics\n")
                            .with_status_code(404)
                    }
                    _ => tiny_http::Response::from_string("only GET\n").with_status_code(405),
                };
                let _ = req.respond(reply);
            }
        })
        .map_err(|e| Error::io("cannot start the metrics thread", e))?;
    Ok(shown)
}

fn header(content_type: &'static str) -> tiny_http::Header {
    #[allow(clippy::expect_used)]
    tiny_http::Header::from_bytes("Content-Type", content_type).expect("a constant, valid header")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Stats, VersionUid};

    fn version(uid: u64, name: &str, status: Status, date: DateTime<Utc>, label: Option<&str>) -> Version {
        Version {
            uid: VersionUid(uid),
            date,
            name: name.into(),
            snapshot: String::new(),
            size: 1 << 20,
            block_size: 4 << 20,
            status,
            protected: false,
            storage: "default".into(),
            labels: label.map(|l| (l.to_string(), String::new())).into_iter().collect(),
            stats: Stats { bytes_read: 1000, duration_ms: 2500, ..Default::default() },
            expire: None,
            host: None,
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// An incomplete version older than a day counts, a younger one does not (a backup
    /// may still be running); a name's schedulers are the labels its versions carry.
    #[test]
    fn stale_incomplete_versions_and_sla_breaches() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z").unwrap().with_timezone(&Utc);
        let h = chrono::Duration::hours;
        let versions = vec![
            version(1, "db", Status::Valid, now - h(50), Some("daily")),
            version(2, "db", Status::Incomplete, now - h(30), None),
            version(3, "db", Status::Incomplete, now - h(2), None),
            version(4, "web", Status::Valid, now - h(1), None),
        ];
        let storages = [StorageFacts { name: "default".into(), objects: 5, stored: 999, damaged: 2 }];
        let text = render(&versions, &storages, &crate::schedule::builtin(), now).unwrap();
        assert_eq!(value(&text, r#"keepfs_incomplete_versions_older_than_one_day{name="db"}"#), Some(1.0));
        assert_eq!(value(&text, r#"keepfs_versions{name="db",status="incomplete"}"#), Some(2.0));
        // Too few (1 of 8) and too old (50 h > 24 h + 6 h).
        assert_eq!(value(&text, r#"keepfs_sla_breaches{name="db",scheduler="daily"}"#), Some(2.0));
        assert!(!text.contains(r#"scheduler="hourly""#), "{text}");
        assert!(!text.contains(r#"keepfs_sla_breaches{name="web""#), "{text}");
        let end = (now - h(50)).timestamp() as f64 + 2.5;
        assert_eq!(value(&text, r#"keepfs_last_backup_timestamp_seconds{name="db"}"#), Some(end));
        assert_eq!(value(&text, r#"keepfs_damaged_objects{storage="default"}"#), Some(2.0));
        assert_eq!(value(&text, r#"keepfs_storage_stored_bytes{storage="default"}"#), Some(999.0));
    }

    #[test]
    fn push_url_names_a_group() {
        assert_eq!(push_url("http://127.0.0.1:9091").unwrap(), "http://127.0.0.1:9091/metrics/job/keepfs");
        assert_eq!(push_url("http://h:9091/").unwrap(), "http://h:9091/metrics/job/keepfs");
        assert_eq!(push_url("http://h/metrics/job/x/instance/y").unwrap(), "http://h/metrics/job/x/instance/y");
        assert!(push_url("127.0.0.1:9091").is_err());
        assert!(push_url("ftp://h/").is_err());
    }
}
