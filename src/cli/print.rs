//! How the `keepfs` command shows results besides plain tables (part of the binary): the
//! benchmark's table, the live sessions, and the machine-readable forms.

use super::args::Format;
use keepfs::bench::BenchRow;
use keepfs::config::Config;
use keepfs::error::{Error, Result};
use keepfs::units::format_size;
use keepfs::version::Version;

/// `keepfs bench`: a table of measured figure, reference figure and percentage, or the
/// rows as one JSON object (`{"results": [...]}`).
/// A value as the pretty JSON every `--format json` prints.
pub fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Other(format!("cannot write JSON: {e}")))
}

pub fn print_bench(rows: &[BenchRow], format: Format) -> Result<()> {
    match format {
        Format::Json => {
            let v = serde_json::json!({ "results": rows });
            out!("{}", to_json(&v)?)
        }
        Format::Table => {
            let mb = |b: f64| format!("{:.2} MB/s", b / 1e6);
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.description.clone(),
                        mb(r.bytes_per_second),
                        r.reference_bytes_per_second.map(mb).unwrap_or_else(|| "-".into()),
                        r.percent_of_reference.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_rows(&["test", "this host", "reference", "of reference"], rows)?;
            note!(
                "reference: Proxmox Backup's 2020 top figures (AMD Ryzen 7 2700X); a storage is compared with this host's SHA-256 speed"
            );
            Ok(())
        }
    }
}

use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);
static MACHINE: AtomicBool = AtomicBool::new(false);
static SKIP_HEADER: AtomicBool = AtomicBool::new(false);

/// Whether the command line asked for `--format json` (on any level of subcommand).
pub fn wants_json(m: &clap::ArgMatches) -> bool {
    let mut m = Some(m);
    while let Some(cur) = m {
        if let Ok(Some(Format::Json)) = cur.try_get_one::<Format>("format") {
            return true;
        }
        m = cur.subcommand().map(|(_, sub)| sub);
    }
    false
}

pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Whether results (and errors) are one JSON object on standard output.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// backy2's `-m` (cells separated by '|', sizes in bytes) and `-s` (no header line).
pub fn set_table_style(machine: bool, skip_header: bool) {
    MACHINE.store(machine, Ordering::Relaxed);
    SKIP_HEADER.store(skip_header, Ordering::Relaxed);
}

pub fn machine() -> bool {
    MACHINE.load(Ordering::Relaxed)
}

pub fn skip_header() -> bool {
    SKIP_HEADER.load(Ordering::Relaxed)
}

/// A size in a table: "1.5 MiB" for people, the number of bytes with `-m`.
pub fn size_cell(bytes: u64) -> String {
    if machine() { bytes.to_string() } else { keepfs::units::format_size(bytes) }
}

/// A table as `-m` prints it: one line per row, cells joined by '|' (a '|' or '\' inside
/// a cell is escaped with '\'), the header first unless `-s`.
pub fn print_machine(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let esc = |c: &str| c.replace('\\', "\\\\").replace('|', "\\|");
    if !skip_header() {
        out!("{}", header.iter().map(|h| esc(h)).collect::<Vec<_>>().join("|"))?;
    }
    for r in rows {
        out!("{}", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join("|"))?;
    }
    Ok(())
}

/// Damaged blocks of a restore or scrub, for JSON.
pub fn bad_blocks_json(bad: &[keepfs::restore::BadBlock]) -> serde_json::Value {
    bad.iter()
        .map(|b| {
            serde_json::json!({
                "index": b.index, "offset": b.offset, "length": b.len,
                "object": b.object.to_string(), "reason": b.reason,
            })
        })
        .collect()
}

/// A version as `rm` and `enforce` report it in JSON.
pub fn version_brief(v: &keepfs::version::Version) -> serde_json::Value {
    serde_json::json!({ "uid": v.uid.to_string(), "name": v.name, "date": v.date, "size": v.size })
}

/// An error as `--format json` reports it: `{"error": "...", "exit_code": N}` on standard
/// output (the one-line error goes to standard error as always). Not when standard output
/// itself failed; a failure to write it changes nothing (the exit code tells).
pub fn error_json(e: &Error) {
    if super::output::is_stdout_error(e) {
        return;
    }
    let v = serde_json::json!({ "error": e.to_string(), "exit_code": e.exit_code() });
    let _ = super::output::stdout_line(format_args!("{v}"));
}

/// A command line clap refused, in one line (`keepfs: error: …`, as every other error):
/// clap's message with its argument list and tips folded in, and the usage. Its own
/// rendering is several lines and a blank one (found by a drill).
pub fn usage_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut said: Vec<String> = Vec::new();
    let mut usage = None;
    for para in text.split("\n\n") {
        let para = para.trim();
        if let Some(u) = para.strip_prefix("Usage: ") {
            usage = Some(u.split_whitespace().collect::<Vec<_>>().join(" "));
        } else if !para.is_empty() && !para.starts_with("For more information") {
            said.push(para.trim_start_matches("error: ").split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let mut line = said.join("; ");
    if let Some(u) = usage {
        line.push_str(&format!(" (usage: {u}; --help tells more)"));
    }
    line
}

/// A command line clap refused, as JSON on standard output when the arguments ask for
/// `--format json` (the line still goes to standard error, exit 2).
pub fn usage_error_json(e: &clap::Error) {
    let args: Vec<String> = std::env::args().collect();
    let asked =
        args.windows(2).any(|w| w[0] == "--format" && w[1] == "json") || args.iter().any(|a| a == "--format=json");
    if !asked || !e.use_stderr() {
        return;
    }
    let v = serde_json::json!({ "error": usage_error_line(e), "exit_code": e.exit_code() });
    let _ = super::output::stdout_line(format_args!("{v}"));
}

/// One live session as `keepfs database sessions` shows it.
#[derive(serde::Serialize)]
struct SessionRow {
    id: i64,
    host: String,
    pid: u32,
    purpose: String,
    writes: bool,
    /// UTC, RFC 3339, on the catalog's clock.
    started: String,
    heartbeat: String,
}

/// `keepfs database sessions`: every live session, oldest first.
pub fn print_sessions(sessions: &[keepfs::catalog::Session], format: Format) -> Result<()> {
    let date = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| ms.to_string())
    };
    let mut rows: Vec<SessionRow> = sessions
        .iter()
        .map(|s| SessionRow {
            id: s.id,
            host: s.process.host.clone(),
            pid: s.process.pid,
            purpose: s.purpose.clone(),
            writes: s.writes,
            started: date(s.started_ms),
            heartbeat: date(s.heartbeat_ms),
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    match format {
        Format::Json => out!("{}", to_json(&rows)?),
        Format::Table => print_rows(
            &["id", "host", "pid", "purpose", "writes", "started (UTC)", "heartbeat (UTC)"],
            rows.into_iter()
                .map(|r| {
                    let t = |d: String| d.trim_end_matches('Z').replace('T', " ");
                    vec![
                        r.id.to_string(),
                        r.host,
                        r.pid.to_string(),
                        r.purpose,
                        if r.writes { "yes" } else { "no" }.to_string(),
                        t(r.started),
                        t(r.heartbeat),
                    ]
                })
                .collect(),
        ),
    }
}

pub(crate) fn labels_text(v: &Version) -> String {
    v.labels
        .iter()
        .map(|(k, val)| if val.is_empty() { k.clone() } else { format!("{k}={val}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// How tables show a date and time (UTC).
pub(crate) fn when(d: &chrono::DateTime<chrono::Utc>) -> String {
    d.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A plain table: a header line, then one line per row, columns padded to their widest cell.
pub(crate) fn print_rows(header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    if machine() {
        return print_machine(header, &rows);
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", parts.join("  ").trim_end())
    };
    if !skip_header() {
        line(header.to_vec())?;
    }
    for r in &rows {
        line(r.iter().map(|s| s.as_str()).collect())?;
    }
    Ok(())
}

pub(crate) fn print_table(versions: &[Version]) -> Result<()> {
    let header = [
        "uid",
        "date (UTC)",
        "name",
        "snapshot",
        "size",
        "block_size",
        "status",
        "protected",
        "storage",
        "expire (UTC)",
        "labels",
    ];
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.uid.to_string(),
                when(&v.date),
                v.name.clone(),
                v.snapshot.clone(),
                v.size.to_string(),
                v.block_size.to_string(),
                v.status.as_str().to_string(),
                if v.protected { "yes" } else { "no" }.to_string(),
                v.storage.clone(),
                v.expire.as_ref().map(when).unwrap_or_default(),
                labels_text(v),
            ]
        })
        .collect();
    print_rows(&header, rows)
}

/// What `config check` prints: every resolved path and storage, and where each key would
/// come from, but no secret (no key, passphrase or S3 secret, and no access key).
pub(crate) fn print_config(c: &Config) -> Result<()> {
    use keepfs::config::StorageKind;
    out!("configuration: {}", c.origin)?;
    out!("home: {}", c.home.display())?;
    out!("database: {}", c.catalog_location().display())?;
    if let Some(url) = &c.database_url {
        let from = if keepfs::catalog::postgres::url_has_password(url) {
            "in the URL".to_string()
        } else if let Some(f) = &c.database_password_file {
            format!("database_password_file {}", f.display())
        } else {
            "PGPASSFILE or ~/.pgpass, if either has a line for it".to_string()
        };
        out!("database password: {from}")?;
    }
    if let Some(h) = &c.host {
        keepfs::catalog::set_host(h);
    }
    let (host, from) = keepfs::catalog::host_and_origin();
    out!("host: {host} ({from})")?;
    out!("default storage: {}", c.default_storage)?;
    out!(
        "block size: {}; compression level {}; workers {}; storage writers {}; storage readers {}; source readers {}",
        format_size(c.block_size as u64),
        c.compression_level,
        c.workers,
        c.storage_writers,
        c.storage_readers,
        c.source_readers
    )?;
    out!(
        "file mode: {:04o} (directories {:04o}); incomplete grace: {}s",
        c.modes.file,
        c.modes.dir,
        c.incomplete_grace.num_seconds()
    )?;
    let env_key = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(|_| format!("${var}"));
    for s in &c.storages {
        let kind = match &s.kind {
            StorageKind::File { path } => format!("file {}", path.display()),
            StorageKind::Null => "null (discards everything)".into(),
            StorageKind::S3(s3) => format!(
                "s3 {} region {} bucket {} prefix '{}' ({} addressing; credentials {})",
                s3.endpoint,
                s3.region,
                s3.bucket,
                s3.prefix,
                if s3.path_style { "path" } else { "virtual-host" },
                if s3.access_key.is_empty() { "missing" } else { "set" }
            ),
        };
        let key = match (&s.key_file, &s.passphrase_file) {
            (Some(f), _) => format!("key file {}", f.display()),
            (None, Some(f)) => format!("passphrase file {}", f.display()),
            _ => env_key("KEEPFS_KEY_FILE")
                .or_else(|| env_key("KEEPFS_PASSPHRASE"))
                .unwrap_or_else(|| "none (fine for an unencrypted storage)".into()),
        };
        let cache = s
            .read_cache
            .as_ref()
            .map(|r| format!("; read cache {} up to {}", r.dir.display(), format_size(r.max_bytes)));
        out!(
            "storage {}: {kind}; key: {key}; encryption required: {}{}",
            s.name,
            if s.require_encryption { "yes" } else { "no" },
            cache.unwrap_or_default()
        )?;
    }
    let names: Vec<&str> = c.schedulers.iter().map(|s| s.name.as_str()).collect();
    out!("schedulers: {}", names.join(", "))?;
    Ok(())
}
