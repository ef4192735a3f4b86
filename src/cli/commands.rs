//! What each command does: `run` takes the parsed command line, opens the repository
//! (or not: see `absent`), calls the engine and prints through `print` and `output`.

use keepfs::Repository;
use keepfs::backup::BackupOptions;
use keepfs::config::Config;
use keepfs::error::{Error, Result, exit};
use keepfs::filter::Filter;
use keepfs::restore::RestoreOptions;
use keepfs::scrub::ScrubOptions;
use keepfs::session::{Overlays, SessionService};
use keepfs::source::Url;
use keepfs::units::{check_block_size, format_size, parse_size};
use keepfs::version::{Version, VersionUid, parse_label};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use super::absent::*;
use super::args::*;
use super::mount::*;
use super::print::*;
use super::progress::*;
use super::{output, print, title};

/// The committed (not incomplete) versions a filter selects; all without one.
pub(crate) fn committed_uids(repo: &Repository, filter: Option<&str>) -> Result<Vec<VersionUid>> {
    let filter = filter.map(Filter::parse).transpose()?;
    Ok(repo
        .list(filter.as_ref())?
        .into_iter()
        .filter(|v| v.status != keepfs::version::Status::Incomplete)
        .map(|v| v.uid)
        .collect())
}

/// Scrubs every committed version a filter selects.
pub(crate) fn batch_scrub(repo: &Repository, filter: Option<&str>, percent: u8, deep: bool) -> Result<i32> {
    let uids = committed_uids(repo, filter)?;
    scrub_versions(repo, &uids, &ScrubOptions { deep, percent, source: None })
}

/// One line per damaged block: where it is in the image and which object holds it.
pub(crate) fn report_damaged(prefix: &str, b: &keepfs::restore::BadBlock) {
    note!(
        "keepfs: damaged: {prefix}block {} (bytes {}..{}) object {}: {}",
        b.index,
        b.offset,
        b.offset + b.len,
        b.object,
        b.reason
    );
}

/// Scrubs versions one after the other; exit 3 when any damage was found.
pub(crate) fn scrub_versions(repo: &Repository, uids: &[VersionUid], opts: &ScrubOptions) -> Result<i32> {
    let mut damaged = 0usize;
    let mut results = Vec::new();
    for &uid in uids {
        let p = progress(format!("{} {uid}", if opts.deep { "deep-scrubbing" } else { "scrubbing" }));
        let r = repo.scrub(uid, opts, &p)?;
        for b in &r.bad {
            report_damaged(&format!("{uid} "), b);
        }
        for m in &r.metadata {
            note!("keepfs: damaged: {m}");
        }
        results.push(serde_json::json!({
            "uid": uid.to_string(), "deep": opts.deep, "percent": opts.percent, "objects": r.objects,
            "ok": !r.damaged(), "revalidated": r.revalidated,
            "damaged_blocks": print::bad_blocks_json(&r.bad), "metadata_damage": r.metadata,
        }));
        let what = if opts.deep { "deep-scrubbed" } else { "scrubbed" };
        if !r.damaged() {
            let again = if r.revalidated { "; it is valid again" } else { "" };
            note!("{what} {uid}: {} object(s) ({}% of blocks), all good{again}", r.objects, opts.percent);
        } else if r.bad.is_empty() {
            note!("keepfs: error: {what} {uid}: its metadata is damaged (see above)");
            damaged += 1;
        } else {
            note!(
                "keepfs: error: {what} {uid}: {} damaged block(s); {uid} and every version sharing them are marked invalid",
                r.bad.len()
            );
            damaged += 1;
        }
    }
    if print::json() {
        report!("{}", to_json(&serde_json::json!({ "versions": results, "damaged_versions": damaged }))?);
    }
    Ok(if damaged > 0 { exit::DATA_DAMAGED } else { exit::OK })
}

/// An expiry date, from year 0 to 9999: what the catalog stores as text and reads back.
pub(crate) fn parse_expire(s: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    use chrono::Datelike;
    let d = keepfs::filter::parse_date(s).map_err(|e| Error::Invalid(format!("expiry date: {e}")))?;
    if !(0..=9999).contains(&d.year()) {
        return Err(Error::Invalid(format!(
            "expiry date '{s}' is outside the years 0 to 9999 that keepfs keeps; to keep a version for good, protect it (`keepfs protect UID`)"
        )));
    }
    Ok(d)
}

/// Parses uids given on the command line, each once in the order first given (`rm V1
/// V1` removes one version and says so once; an export names it once).
pub(crate) fn parse_uids(uids: &[String]) -> Result<Vec<VersionUid>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for u in uids {
        let uid = VersionUid::parse(u)?;
        if seen.insert(uid) {
            out.push(uid);
        }
    }
    Ok(out)
}

/// Parses uids and checks that every one exists before a command changes any of them
/// (`protect A B` with B unknown must not protect A and then fail).
pub(crate) fn existing_uids(repo: &Repository, uids: &[String]) -> Result<Vec<VersionUid>> {
    let uids = parse_uids(uids)?;
    for &uid in &uids {
        repo.version(uid)?;
    }
    Ok(uids)
}

pub(crate) fn run(cli: Cli) -> Result<i32> {
    // A key file is made without a repository.
    if let Command::Key { action: KeyAction::New { file } } = &cli.command {
        let id = keepfs::keys::write_new_key_file(file)?;
        note!("wrote key {id} to {}; keep a copy somewhere safe", file.display());
        return Ok(exit::OK);
    }
    // Completions and man pages come from the command definitions alone.
    match &cli.command {
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cli_command(), "keepfs", &mut script);
            out!("{}", String::from_utf8_lossy(&script).trim_end())?;
            return Ok(exit::OK);
        }
        Command::Man { dir } => {
            let n = write_man_pages(dir)?;
            note!("wrote {n} man pages to {}", dir.display());
            return Ok(exit::OK);
        }
        _ => {}
    }
    let config = Config::discover(cli.config.as_deref())?;
    if let Command::Config { action: ConfigAction::Check } = &cli.command {
        print_config(&config)?;
        return Ok(exit::OK);
    }
    // Before the repository opens it: a damaged database may fail to open at all.
    if let Command::Database { action: DatabaseAction::Rebuild { replace_damaged: true, .. } } = &cli.command
        && config.database_url.is_none()
        && let Some((aside, reason)) = keepfs::catalog::set_aside_if_damaged(&config.database)?
    {
        note!(
            "keepfs: the metadata database {} is damaged ({reason}); moved it to {}",
            config.database.display(),
            aside.display()
        );
    }
    // A catalog migrate moved elsewhere refuses to be used, except to be copied again
    // (the new one lost): migrate is how to get it back. Where no repository exists,
    // a command that does not make one creates nothing (`where_absent`).
    let repo = match &cli.command {
        _ if !Repository::exists(&config) => match where_absent(&cli.command, &config) {
            Absent::Create => Repository::open(config)?,
            Absent::Read => {
                note!(
                    "keepfs: {}; `keepfs config check` shows the configuration used, and if its storage holds backups whose catalog was lost, `keepfs database rebuild` makes it again",
                    no_repository(&config)
                );
                Repository::absent(config)?
            }
            Absent::NamesVersions => {
                // Said with the error ("version … does not exist"), in one line.
                let _ = NO_REPOSITORY.set(config.home.display().to_string());
                Repository::absent(config)?
            }
            Absent::Refuse(why) => return Err(Error::Invalid(why)),
            Absent::NothingToDo => {
                // A storage named with -S must still be one of the configuration's.
                if let Command::Cleanup { storage: Some(name), .. } = &cli.command
                    && !config.storages.iter().any(|s| &s.name == name)
                {
                    return Err(Error::Invalid(format!(
                        "no storage named '{name}' is configured (configured: {}); check the configuration",
                        config.storages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
                if let Command::Cleanup { dry_run, .. } = &cli.command
                    && print::json()
                {
                    report!(
                        "{}",
                        print::to_json(&serde_json::json!({
                            "dry_run": dry_run, "storages": [], "database_bytes_returned": 0,
                        }))?
                    );
                }
                note!(
                    "keepfs: {}: nothing to do; `keepfs config check` shows the configuration used, and if its storage holds backups whose catalog was lost, `keepfs database rebuild` makes it again",
                    no_repository(&config)
                );
                return Ok(exit::OK);
            }
        },
        Command::Database { action: DatabaseAction::Migrate { .. } } => Repository::open_moved(config)?,
        _ => Repository::open(config)?,
    };
    match cli.command {
        Command::Backup {
            source,
            name,
            snapshot,
            labels,
            block_size,
            storage,
            expire,
            continue_uid,
            hints,
            base,
            hints_check,
            diff_from,
            whole_object,
            auto_tags,
            ..
        } => {
            let hints = hints
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .map_err(|e| Error::Invalid(format!("cannot read hints file {}: {e}", f.display())))
                })
                .transpose()?;
            let base = base.as_deref().map(VersionUid::parse).transpose()?;
            let continue_uid = continue_uid.as_deref().map(VersionUid::parse).transpose()?;
            let expire = expire.as_deref().map(parse_expire).transpose()?;
            let url = Url::parse(&source).map_err(Error::Invalid)?;
            let snapshot = match (&url, snapshot) {
                (_, Some(s)) => s,
                (Url::Rbd(spec), None) => spec.snap.clone().unwrap_or_default(),
                (_, None) => String::new(),
            };
            let block_size = match block_size {
                Some(b) => Some(check_block_size(parse_size(&b).map_err(Error::Invalid)?).map_err(Error::Invalid)?),
                None => None,
            };
            let mut label_map = BTreeMap::new();
            for l in &labels {
                let (k, v) = parse_label(l)?;
                label_map.insert(k, v);
            }
            let opts = BackupOptions {
                name,
                snapshot,
                labels: label_map,
                block_size,
                storage,
                expire,
                continue_uid,
                hints,
                base,
                hints_check_percent: Some(hints_check),
                diff_from,
                whole_object,
                auto_tags,
            };
            let p = progress(format!("backing up {}", opts.name));
            let v = repo.backup(&url, &opts, &p)?;
            let s = &v.stats;
            let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
            note!(
                "backed up {} as {}: {} in {secs:.2}s ({:.0} MB/s), {} read, {} new ({} stored), {} deduplicated, {} sparse",
                url,
                v.uid,
                format_size(v.size),
                v.size as f64 / secs / 1e6,
                format_size(s.bytes_read),
                format_size(s.bytes_written),
                format_size(s.bytes_stored),
                format_size(s.bytes_deduplicated),
                format_size(s.bytes_sparse)
            );
            // Another catalog writing to this storage (a host with a database of its own)
            // shows as version objects this catalog does not know: say so now, not only
            // when a cleanup refuses. A failure to look is not the backup's failure.
            match repo.unknown_versions(&v.storage) {
                Ok(unknown) if !unknown.is_empty() => {
                    let shown: Vec<String> = unknown.iter().take(5).map(|u| u.to_string()).collect();
                    note!(
                        "keepfs: warning: storage '{}' holds {} version(s) this catalog does not know ({}{}): another host with a catalog of its own writes here? Share one catalog (database = \"postgresql://…\", docs/scale-out.md) or take them in with `keepfs metadata restore`; cleanup refuses until then",
                        v.storage,
                        unknown.len(),
                        shown.join(", "),
                        if unknown.len() > shown.len() { ", …" } else { "" }
                    );
                }
                Ok(_) => {}
                Err(e) => note!("keepfs: warning: could not list the storage's versions: {e}"),
            }
            if print::json() {
                report!("{}", to_json(&v)?);
            } else {
                report!("{}", v.uid);
            }
            Ok(exit::OK)
        }
        Command::Restore { uid, target, force, sparse, resume, in_place, delta_from, delta_check, .. } => {
            let uid = VersionUid::parse(&uid)?;
            if target == "-" {
                return Err(Error::Invalid(
                    "restore target '-': keepfs writes blocks at their offsets and cannot write to standard output; name a file or block device, or read the version through `keepfs mount` (by_version/UID/data)".into(),
                ));
            }
            let url = Url::parse(&target).map_err(Error::Invalid)?;
            let p = progress(format!("restoring {uid}"));
            if let Some(from) = delta_from {
                let from = VersionUid::parse(&from)?;
                let opts = keepfs::delta::DeltaOptions { check_percent: delta_check };
                let started = Instant::now();
                let r = repo.restore_delta(from, uid, &url, &opts, &p)?;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                for b in &r.bad_blocks {
                    report_damaged("", b);
                }
                note!(
                    "updated {url} from {from} to {uid}: wrote {} of {} block(s), {} in {secs:.2}s; {} unchanged block(s) checked{}",
                    r.blocks_written,
                    r.blocks,
                    format_size(r.bytes_written),
                    r.blocks_checked,
                    if r.resized { format!("; resized to {}", format_size(r.bytes)) } else { String::new() }
                );
                if print::json() {
                    let mut j = serde_json::to_value(&r).map_err(|e| Error::Other(e.to_string()))?;
                    j["uid"] = uid.to_string().into();
                    j["from"] = from.to_string().into();
                    j["target"] = url.to_string().into();
                    j["seconds"] = secs.into();
                    j["damaged_blocks"] = print::bad_blocks_json(&r.bad_blocks);
                    report!("{}", to_json(&j)?);
                }
                if !r.bad_blocks.is_empty() {
                    note!(
                        "keepfs: error: {} damaged block(s) written as zeros; {uid} is now marked invalid",
                        r.bad_blocks.len()
                    );
                    return Ok(exit::DATA_DAMAGED);
                }
                return Ok(exit::OK);
            }
            let started = Instant::now();
            let report = repo.restore(uid, &url, &RestoreOptions { force, sparse, resume, in_place }, &p)?;
            let secs = started.elapsed().as_secs_f64().max(0.001);
            if print::json() {
                report!(
                    "{}",
                    to_json(&serde_json::json!({
                        "uid": uid.to_string(), "target": url.to_string(), "bytes": report.bytes, "seconds": secs,
                        "blocks_kept": report.blocks_kept, "damaged_blocks": print::bad_blocks_json(&report.bad_blocks),
                    }))?
                );
            }
            if report.bad_blocks.is_empty() {
                let kept =
                    if resume { format!(", {} block(s) already there", report.blocks_kept) } else { String::new() };
                note!(
                    "restored {uid} to {url}: {} in {secs:.2}s ({:.0} MB/s){kept}",
                    format_size(report.bytes),
                    report.bytes as f64 / secs / 1e6
                );
                Ok(exit::OK)
            } else {
                for b in &report.bad_blocks {
                    report_damaged("", b);
                }
                note!(
                    "keepfs: error: restored {uid} to {url} with {} damaged block(s) written as zeros; {uid} is now marked invalid",
                    report.bad_blocks.len()
                );
                Ok(exit::DATA_DAMAGED)
            }
        }
        Command::RbdBackup { image, all, prefix, keep_snapshots, storage } => rbd_backup(
            &repo,
            image.as_deref(),
            all.as_deref(),
            keepfs::rbd::RoutineOptions { prefix, keep_snapshots, storage, labels: BTreeMap::new() },
        ),
        Command::Ls { filter, format, expired } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let mut versions = repo.list(filter.as_ref())?;
            if expired {
                let now = chrono::Utc::now();
                versions.retain(|v| v.expire.is_some_and(|e| e < now));
            }
            match format {
                Format::Table => print_table(&versions)?,
                Format::Json => out!("{}", to_json(&versions)?)?,
            }
            Ok(exit::OK)
        }
        Command::Rm { uids, force, dry_run, .. } => {
            let uids = existing_uids(&repo, &uids)?;
            let plan = repo.plan_remove(&uids, force)?;
            if print::json() {
                if !dry_run {
                    repo.apply_remove(&plan)?;
                }
                let versions: Vec<serde_json::Value> = plan.iter().map(print::version_brief).collect();
                report!("{}", to_json(&serde_json::json!({ "dry_run": dry_run, "removed": versions }))?);
                return Ok(exit::OK);
            }
            let line = |v: &Version| format!("{} {} ({}, {})", v.uid, v.name, when(&v.date), format_size(v.size));
            if dry_run {
                // A dry run's list is its result.
                for v in &plan {
                    out!("would remove {}", line(v))?;
                }
                return Ok(exit::OK);
            }
            // Said as each removal begins, once nothing can refuse the whole plan (a
            // storage this catalog does not own); a removal goes on whatever becomes of
            // its lines.
            repo.apply_remove_with(&plan, |v| report!("removing {}", line(v)))?;
            note!("removed {} version(s); run `keepfs cleanup` to free their blocks", plan.len());
            Ok(exit::OK)
        }
        Command::Scrub { uid, percent, .. } => {
            scrub_versions(&repo, &[VersionUid::parse(&uid)?], &ScrubOptions { deep: false, percent, source: None })
        }
        Command::DeepScrub { uid, percent, source, .. } => {
            let source = source.as_deref().map(|s| Url::parse(s).map_err(Error::Invalid)).transpose()?;
            scrub_versions(&repo, &[VersionUid::parse(&uid)?], &ScrubOptions { deep: true, percent, source })
        }
        Command::BatchScrub { filter, percent, .. } => batch_scrub(&repo, filter.as_deref(), percent, false),
        Command::BatchDeepScrub { filter, percent, .. } => batch_scrub(&repo, filter.as_deref(), percent, true),
        Command::Enforce { rules, filter, dry_run, .. } => {
            let rules = keepfs::retention::parse_rules(&rules)?;
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let versions = repo.list(filter.as_ref())?;
            let doomed = keepfs::retention::plan(&rules, &versions, chrono::Utc::now());
            // One loop for both outputs: a line per version as it goes, or one JSON object.
            let json = print::json();
            let (mut removed, mut kept) = (Vec::new(), Vec::new());
            for uid in doomed {
                let Some(v) = versions.iter().find(|v| v.uid == uid) else { continue };
                let line = |verb: &str| format!("{verb} {uid} {} ({})", v.name, when(&v.date));
                // The rules decide about age; locks (a restore, a mount) still win, and a
                // dry run checks them too: it says what the real run would do.
                let planned = repo.plan_remove(&[uid], true);
                let done = match planned {
                    Ok(plan) if !dry_run => repo.apply_remove(&plan),
                    other => other.map(|_| ()),
                };
                match done {
                    Ok(()) if json => removed.push(print::version_brief(v)),
                    Ok(()) if dry_run => out!("{}", line("would remove"))?,
                    Ok(()) => report!("{}", line("removed")),
                    Err(e) => {
                        note!("keepfs: warning: {} {uid}: {e}", if dry_run { "would keep" } else { "kept" });
                        kept.push(serde_json::json!({ "uid": uid.to_string(), "reason": e.to_string() }));
                    }
                }
            }
            if json {
                report!("{}", to_json(&serde_json::json!({ "dry_run": dry_run, "removed": removed, "kept": kept }))?);
            }
            Ok(if kept.is_empty() { exit::OK } else { exit::REFUSED })
        }
        Command::Init { encrypt, storage } => {
            let name = storage.unwrap_or_else(|| repo.config.default_storage.clone());
            let sc = repo.config.storage(&name)?.clone();
            if !encrypt {
                // Made ready for this catalog's backups: claimed for it (see keepfs::owner).
                repo.storage_to_write(&name)?;
                note!("storage '{name}' is ready ({})", repo.config.origin);
                return Ok(exit::OK);
            }
            let source = match keepfs::keys::key_source(&sc, "")? {
                Some(s) => s,
                None => keepfs::keys::new_key_source(None, None)?,
            };
            let id = repo.init_encryption(&name, &source)?;
            note!(
                "storage '{name}' is encrypted with key {id} ({}); keep that key safe: without it nothing can be restored",
                source.describe()
            );
            Ok(exit::OK)
        }
        Command::Storage { action } => {
            let infos = repo.storage_infos()?;
            match action {
                StorageAction::List { format: Format::Json } => out!("{}", to_json(&infos)?)?,
                StorageAction::List { format: Format::Table } => print_rows(
                    &["name", "kind", "default", "encrypted", "versions", "location"],
                    infos
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                i.kind.clone(),
                                yes_no(i.default),
                                yes_no(i.encrypted),
                                i.versions.to_string(),
                                i.location.clone(),
                            ]
                        })
                        .collect(),
                )?,
                StorageAction::Stats { name, format } => {
                    repo.config.storage(&name)?;
                    let Some(i) = infos.into_iter().find(|i| i.name == name) else {
                        return Err(Error::Invalid(format!("no storage named '{name}'")));
                    };
                    match format {
                        Format::Json => out!("{}", to_json(&i)?)?,
                        Format::Table => {
                            let ratio = if i.stored_bytes > 0 {
                                format!("{:.2}", i.image_bytes as f64 / i.stored_bytes as f64)
                            } else {
                                "-".into()
                            };
                            print_rows(
                                &["storage", "versions", "objects", "stored", "images", "images/stored"],
                                vec![vec![
                                    i.name.clone(),
                                    i.versions.to_string(),
                                    i.objects.to_string(),
                                    print::size_cell(i.stored_bytes),
                                    print::size_cell(i.image_bytes),
                                    ratio,
                                ]],
                            )?
                        }
                    }
                }
            }
            Ok(exit::OK)
        }
        Command::Key { action } => {
            let storage_name = |s: Option<String>| s.unwrap_or_else(|| repo.config.default_storage.clone());
            match action {
                KeyAction::New { .. } => unreachable!("handled before the repository is opened"),
                KeyAction::List { storage, format } => {
                    let (keys, unrecorded) = repo.list_keys(&storage_name(storage))?;
                    if unrecorded > 0 {
                        note!(
                            "keepfs: {unrecorded} object(s) have no key recorded (a rebuilt database); `keepfs key rekey` records them"
                        );
                    }
                    match format {
                        Format::Json => out!("{}", to_json(&keys)?)?,
                        Format::Table => print_rows(
                            &["id", "created (UTC)", "kind", "current", "objects"],
                            keys.iter()
                                .map(|k| {
                                    vec![
                                        k.id.clone(),
                                        when(&k.created),
                                        k.kind.clone(),
                                        yes_no(k.current),
                                        k.objects.to_string(),
                                    ]
                                })
                                .collect(),
                        )?,
                    }
                }
                KeyAction::Rotate { storage, new_key_file, new_passphrase_file } => {
                    let name = storage_name(storage);
                    let new = keepfs::keys::new_key_source(new_key_file.as_deref(), new_passphrase_file.as_deref())?;
                    let id = repo.rotate_key(&name, &new)?;
                    note!(
                        "storage '{name}': key {id} is current; run `keepfs key rekey` to move existing objects to it"
                    );
                }
                KeyAction::Rekey { storage } => {
                    let name = storage_name(storage);
                    let (done, already, gone) = repo.rekey(&name)?;
                    note!("storage '{name}': rewrapped {done} object(s); {already} had the current key already");
                    if gone > 0 {
                        note!(
                            "storage '{name}': {gone} listed object(s) were gone or being removed when their turn came (by a cleanup or `rm`), or are missing (`keepfs deep-scrub` finds those); `key remove` refuses while any of them still needs an older key: run `keepfs key rekey` again then"
                        );
                    }
                }
                KeyAction::Remove { id, storage } => {
                    let name = storage_name(storage);
                    let kid = keepfs::transform::aes::KeyId::from_hex(id.trim()).ok_or_else(|| {
                        Error::Invalid(format!("'{id}' is not a key id (16 hex digits, see `keepfs key list`)"))
                    })?;
                    repo.remove_key(&name, kid)?;
                    note!("storage '{name}': key {kid} removed");
                }
            }
            Ok(exit::OK)
        }
        Command::Due { name, schedulers, format } => {
            let chosen = keepfs::schedule::select(&repo.config.schedulers, &schedulers)?;
            let rows = keepfs::schedule::due(&chosen, &repo.list(None)?, name.as_deref(), chrono::Utc::now());
            match format {
                Format::Json => out!("{}", to_json(&rows)?)?,
                Format::Table => print_rows(
                    &["name", "schedulers", "expire_date (UTC)", "due_since (UTC)"],
                    rows.iter()
                        .map(|r| vec![r.name.clone(), r.schedulers.join(","), when(&r.expire_date), when(&r.due_since)])
                        .collect(),
                )?,
            }
            Ok(exit::OK)
        }
        Command::Sla { name, schedulers, format } => {
            let chosen = keepfs::schedule::select(&repo.config.schedulers, &schedulers)?;
            let rows = keepfs::schedule::sla(&chosen, &repo.list(None)?, name.as_deref(), chrono::Utc::now());
            match format {
                Format::Json => out!("{}", to_json(&rows)?)?,
                Format::Table => print_rows(
                    &["name", "breach"],
                    rows.iter().map(|r| vec![r.name.clone(), r.breach.clone()]).collect(),
                )?,
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Export { mut args } } => {
            // `metadata export V1 V2 out.json`: the last word is the file.
            let file = PathBuf::from(args.pop().unwrap_or_default());
            let uids = args;
            let uids = parse_uids(&uids)?;
            if file.as_os_str() == "-" {
                let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                repo.export_metadata_to(&uids, &mut w, output::STDOUT)?;
            } else {
                let what = format!("cannot write {}", file.display());
                keepfs::named_file::write_named(&file, &what, |w| repo.export_metadata_to(&uids, w, &what))?;
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Import { file } } => {
            // Each version's index waits in an unnamed spool file until the whole
            // document was checked: one descriptor a version.
            more_open_files();
            // Read as a stream: a document of a 200 TB dense version is never held.
            let doc: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin().lock()))
            } else {
                // A file that is not there, or not a file, is bad input (exit 2).
                let f = std::fs::File::open(&file)
                    .and_then(|f| match f.metadata()?.is_dir() {
                        true => Err(std::io::Error::from_raw_os_error(libc::EISDIR)),
                        false => Ok(f),
                    })
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory => {
                            Error::Invalid(format!("cannot read {}: {e}; name a metadata export file", file.display()))
                        }
                        _ => Error::io(format!("cannot read {}", file.display()), e),
                    })?;
                Box::new(std::io::BufReader::new(f))
            };
            for uid in repo.import_metadata(doc)? {
                report!("{uid}");
            }
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Backup { filter } } => {
            let n = repo.backup_metadata(&committed_uids(&repo, filter.as_deref())?)?;
            note!("wrote the metadata of {n} version(s) to their storages");
            Ok(exit::OK)
        }
        Command::Metadata { action: MetadataAction::Restore { uids, force } } => {
            more_open_files();
            for uid in repo.restore_metadata(&parse_uids(&uids)?, force)? {
                report!("{uid}");
            }
            Ok(exit::OK)
        }
        Command::Database { action: DatabaseAction::Rebuild { take_over, .. } } => {
            if take_over {
                repo.take_over_storages();
            }
            let r = repo.rebuild_database()?;
            let already = if r.already > 0 { format!(" ({} there already)", r.already) } else { String::new() };
            note!(
                "rebuilt {}: {} version(s){already}, {} object(s)",
                repo.config.catalog_location().display(),
                r.versions,
                r.objects
            );
            if r.damaged.is_empty() {
                return Ok(exit::OK);
            }
            for d in &r.damaged {
                note!("keepfs: damaged: storage '{}' object {}: {}", d.storage, d.key, d.reason);
            }
            let names: Vec<&str> = r.damaged.iter().map(|d| d.key.trim_start_matches("versions/")).collect();
            let filter = names.iter().map(|u| format!("uid == \"{u}\"")).collect::<Vec<_>>().join(" or ");
            note!(
                "keepfs: error: skipped {} damaged version object(s) ({}); everything else is rebuilt. To recover them, run `keepfs metadata backup '{filter}'` with a database that still holds them (an older copy, named in a --config), then `keepfs database rebuild` again",
                r.damaged.len(),
                names.join(", ")
            );
            Ok(exit::DATA_DAMAGED)
        }
        Command::Database { action: DatabaseAction::Migrate { to } } => {
            let (to, r) = repo.migrate_catalog(&to)?;
            note!(
                "copied the catalog into {}: {} version(s), {} index(es), {} object(s) of {} storage(s); checked. Set `database` in the configuration to it: the old catalog now refuses to be used",
                to.display(),
                r.versions,
                r.indexes,
                r.objects,
                r.storages
            );
            Ok(exit::OK)
        }
        Command::Database { action: DatabaseAction::Sessions { format } } => {
            let sessions = repo.live_sessions()?;
            print::print_sessions(&sessions, format)?;
            Ok(exit::OK)
        }
        Command::Label { uid, changes } => {
            repo.change_labels(VersionUid::parse(&uid)?, &changes)?;
            Ok(exit::OK)
        }
        Command::Expire { uid, date } => {
            let date = if date.trim().is_empty() { None } else { Some(parse_expire(&date)?) };
            repo.set_expire(VersionUid::parse(&uid)?, date)?;
            Ok(exit::OK)
        }
        Command::Protect { uids } => {
            for uid in existing_uids(&repo, &uids)? {
                repo.set_protected(uid, true)?;
            }
            Ok(exit::OK)
        }
        Command::Unprotect { uids } => {
            for uid in existing_uids(&repo, &uids)? {
                repo.set_protected(uid, false)?;
            }
            Ok(exit::OK)
        }
        Command::Mount {
            mountpoint,
            read_only,
            discard_writes,
            daemon,
            threads,
            page_cache,
            allow_other,
            uid,
            gid,
            mode,
            metrics,
        } => {
            if daemon {
                return mount_daemon(&mountpoint, &repo.config.home.join("mount.log"), repo.config.modes);
            }
            prepare_mountpoint(&mountpoint)?;
            few_malloc_arenas();
            let config_block_size = repo.config.block_size;
            // Before any thread exists, so that every thread has the signals blocked.
            unmount_on_signal(&mountpoint);
            serve_metrics(metrics.as_deref(), &repo.config)?;
            let opts = keepfs_fs::MountOptions {
                read_only,
                threads,
                page_cache,
                allow_other,
                uid,
                gid,
                mode,
                ..Default::default()
            };
            // --discard-writes keeps overlays for the life of the mount (a VM may reopen).
            let sessions = session_service(repo, read_only, discard_writes, Overlays::KeepUntilShutdown, opts.ttl)?;
            let shown = mountpoint.display().to_string();
            let read_ahead_kb = (config_block_size / 1024).max(1024);
            let at = mountpoint.clone();
            keepfs_fs::mount(sessions, &mountpoint, opts, move || {
                raise_read_ahead(&at, read_ahead_kb);
                note!("keepfs: mounted at {shown}; unmount with `fusermount3 -u {shown}`")
            })
            .map_err(|e| Error::io(format!("cannot mount at {}", mountpoint.display()), e))?;
            Ok(exit::OK)
        }
        Command::Completion { .. } | Command::Man { .. } | Command::Config { .. } => Ok(exit::OK),
        Command::StorageUsage { filter, format } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let usage = keepfs::usage::storage_usage(&repo, &repo.list(filter.as_ref())?)?;
            match format {
                Format::Json => out!("{}", to_json(&usage)?)?,
                Format::Table => {
                    let header = ["uid", "name", "storage", "size", "sparse", "shared", "exclusive", "stored", "frees"];
                    let mut rows: Vec<Vec<String>> = usage
                        .iter()
                        .map(|u| {
                            vec![
                                u.uid.clone(),
                                u.name.clone(),
                                u.storage.clone(),
                                print::size_cell(u.size),
                                print::size_cell(u.sparse),
                                print::size_cell(u.shared),
                                print::size_cell(u.exclusive),
                                print::size_cell(u.stored),
                                print::size_cell(u.exclusive_stored),
                            ]
                        })
                        .collect();
                    let sum = |f: fn(&keepfs::usage::Usage) -> u64| print::size_cell(usage.iter().map(f).sum());
                    rows.push(vec![
                        "total".into(),
                        String::new(),
                        String::new(),
                        sum(|u| u.size),
                        sum(|u| u.sparse),
                        sum(|u| u.shared),
                        sum(|u| u.exclusive),
                        String::new(),
                        sum(|u| u.exclusive_stored),
                    ]);
                    print_rows(&header, rows)?;
                }
            }
            Ok(exit::OK)
        }
        Command::Stats { filter, format } => {
            let filter = filter.as_deref().map(Filter::parse).transpose()?;
            let versions = repo.list(filter.as_ref())?;
            // Image bytes per second: what the backup covered, holes included. None for a
            // version without a finished backup's figures (incomplete, or taken in by
            // `metadata import`): its size over no time is no rate.
            let rate = |v: &Version| {
                (v.stats.duration_ms > 0 && v.status != keepfs::version::Status::Incomplete)
                    .then(|| (v.size as f64 / (v.stats.duration_ms as f64 / 1000.0)) as u64)
            };
            match format {
                Format::Json => {
                    let rows: Vec<serde_json::Value> = versions
                        .iter()
                        .map(|v| {
                            serde_json::json!({
                                "uid": v.uid.to_string(), "name": v.name, "date": v.date, "size": v.size,
                                "status": v.status.as_str(), "stats": v.stats, "bytes_per_second": rate(v),
                            })
                        })
                        .collect();
                    out!("{}", to_json(&rows)?)?;
                }
                Format::Table => {
                    let header = [
                        "uid",
                        "name",
                        "date (UTC)",
                        "size",
                        "read",
                        "written",
                        "stored",
                        "deduplicated",
                        "sparse",
                        "seconds",
                        "MB/s",
                    ];
                    let rows = versions
                        .iter()
                        .map(|v| {
                            let s = &v.stats;
                            vec![
                                v.uid.to_string(),
                                v.name.clone(),
                                when(&v.date),
                                print::size_cell(v.size),
                                print::size_cell(s.bytes_read),
                                print::size_cell(s.bytes_written),
                                print::size_cell(s.bytes_stored),
                                print::size_cell(s.bytes_deduplicated),
                                print::size_cell(s.bytes_sparse),
                                format!("{:.1}", s.duration_ms as f64 / 1000.0),
                                rate(v).map_or_else(|| "-".to_string(), |r| format!("{:.0}", r as f64 / 1e6)),
                            ]
                        })
                        .collect();
                    print_rows(&header, rows)?;
                }
            }
            Ok(exit::OK)
        }
        Command::Diff { old, new, format } => {
            let (old, new) = (VersionUid::parse(&old)?, VersionUid::parse(&new)?);
            let changes = repo.diff(old, new)?;
            match format {
                Format::Json => out!("{}", serde_json::to_string(&changes).map_err(|e| Error::Other(e.to_string()))?)?,
                Format::Table => {
                    let rows = changes
                        .iter()
                        .map(|c| {
                            vec![
                                c.offset.to_string(),
                                c.length.to_string(),
                                if c.exists { "data" } else { "zero" }.to_string(),
                            ]
                        })
                        .collect();
                    print_rows(&["offset", "length", "now"], rows)?;
                    let total: u64 = changes.iter().map(|c| c.length).sum();
                    note!("{} range(s), {} changed from {old} to {new}", changes.len(), format_size(total));
                }
            }
            Ok(exit::OK)
        }
        Command::Nbd { listen, socket, read_only, discard_writes, tls_cert, tls_key, metrics } => {
            few_malloc_arenas();
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(
                    keepfs_nbd::tls_config(cert, key)
                        .map_err(|e| Error::Invalid(format!("cannot use the TLS certificate and key: {e}")))?,
                ),
                _ => None,
            };
            let listener = match &socket {
                Some(path) => keepfs_nbd::Listener::unix(path.clone())
                    .map_err(|e| listen_error(&path.display().to_string(), e))?,
                None => keepfs_nbd::Listener::tcp(&listen).map_err(|e| listen_error(&listen, e))?,
            };
            // Before any thread exists (the session service starts readers), so that
            // every thread has the signals blocked.
            stop_on_signal(listener.stopper());
            // --discard-writes drops a connection's writes when it disconnects.
            let ttl = keepfs::session::SessionOptions::default().list_ttl;
            let config_for_metrics = repo.config.clone();
            let sessions = session_service(repo, read_only, discard_writes, Overlays::DropAtLastClose, ttl)?;
            note!("keepfs: serving NBD on {} (exports: version uids and NAME@latest)", listener.describe());
            serve_metrics(metrics.as_deref(), &config_for_metrics)?;
            keepfs_nbd::serve(sessions, listener, keepfs_nbd::NbdOptions { read_only, tls })
                .map_err(|e| Error::io("the NBD server stopped", e))?;
            Ok(exit::OK)
        }
        Command::Bench { storages, size, seconds, cpu_only, format } => {
            if !(seconds > 0.0 && seconds <= 600.0) {
                return Err(Error::Invalid(format!("--seconds {seconds}: give a duration from 0 to 600 seconds")));
            }
            let opts = keepfs::bench::BenchOptions {
                duration: std::time::Duration::from_secs_f64(seconds),
                storage_bytes: parse_size(&size).map_err(Error::Invalid)?,
                storages,
                cpu_only,
            };
            title::set("keepfs [benchmarking]");
            let rows = keepfs::bench::run(&repo, &opts);
            title::reset();
            print::print_bench(&rows?, format)?;
            Ok(exit::OK)
        }
        Command::Cleanup { dry_run, storage, .. } => {
            let names: Vec<String> = match storage {
                Some(s) => vec![s],
                None => repo.config.storages.iter().map(|s| s.name.clone()).collect(),
            };
            // One loop for both outputs: lines for people as it goes (what a dry run
            // would do is a result, on stdout; what a cleanup did is a report), or one
            // JSON object at the end.
            let json = print::json();
            let say = |line: String| -> Result<()> {
                match (json, dry_run) {
                    (true, _) => {}
                    (false, true) => out!("{line}")?,
                    (false, false) => report!("{line}"),
                }
                Ok(())
            };
            let mut storages = Vec::new();
            for name in names {
                title::set(&format!("keepfs [cleaning up storage {name}]"));
                // A storage too large for `cleanup_memory` is planned and cleaned up a
                // slice of its ids at a time; the report adds the slices up.
                let slices = repo.cleanup_slices(&name)?;
                if slices > 1 {
                    say(format!(
                        "storage {name}: cleaning up in {slices} slices to stay within cleanup_memory ({}); each slice reads every index again",
                        format_size(repo.config.cleanup_memory_bytes)
                    ))?;
                }
                // Claimed before the plan: a second cleanup is refused before it reads
                // every index and lists the storage, and before it says what it would do.
                let claim = if dry_run { None } else { Some(repo.claim_cleanup(&name)?) };
                let mut j = serde_json::json!({"storage": name, "slices": slices});
                let sum = |j: &mut serde_json::Value, key: &str, n: u64| {
                    let had = j[key].as_u64().unwrap_or(0);
                    j[key] = (had + n).into();
                };
                for slice in keepfs::slice::Slice::all(slices) {
                    let plan = repo.plan_cleanup_slice(&name, slice)?;
                    let part = if slices > 1 {
                        format!("storage {name} (slice {}/{slices})", slice.index + 1)
                    } else {
                        format!("storage {name}")
                    };
                    if slice.index == 0 {
                        for line in plan.spared_lines() {
                            say(line)?;
                        }
                    }
                    if let Some(line) = plan.unrecorded_line(&part) {
                        say(line)?;
                    }
                    if !plan.unfinished.is_empty() {
                        say(format!(
                            "{part}: {} block(s) of stopped backups were never recorded; their files (if any) go too",
                            plan.unfinished.len()
                        ))?;
                    }
                    let verb = if dry_run { "would delete" } else { "deleting" };
                    let what = files_named(
                        plan.objects.len() as u64,
                        "unreferenced object(s)",
                        plan.orphans.len() as u64,
                        plan.unfinished_files.len() as u64,
                        0,
                    );
                    say(format!(
                        "{part}: {verb} {what}, {}; {} referenced, {} kept (newer than the oldest running backup)",
                        format_size(plan.bytes()),
                        plan.referenced,
                        plan.kept_recent
                    ))?;
                    sum(&mut j, "objects", plan.objects.len() as u64);
                    sum(&mut j, "orphans", plan.orphans.len() as u64);
                    sum(&mut j, "bytes", plan.bytes());
                    sum(&mut j, "referenced", plan.referenced);
                    sum(&mut j, "kept_recent", plan.kept_recent);
                    sum(&mut j, "unfinished", plan.unfinished.len() as u64);
                    sum(&mut j, "unfinished_files", plan.unfinished_files.len() as u64);
                    sum(&mut j, "kept_unrecorded", plan.kept_unrecorded);
                    sum(&mut j, "kept_for_continue", plan.kept_for_continue);
                    if slice.index == 0 {
                        j["spared"] = plan.spared_lines().into();
                    }
                    if dry_run {
                        for (id, size) in &plan.objects {
                            say(format!("  object {id} ({size} bytes)"))?;
                        }
                        for (key, size) in &plan.orphans {
                            say(format!("  orphan {key} ({size} bytes)"))?;
                        }
                        for id in &plan.unfinished {
                            if let Some(size) = plan.unfinished_files.get(&id.short()) {
                                say(format!("  file of a stopped backup {id} ({size} bytes)"))?;
                            }
                        }
                    } else if let Some(claim) = &claim {
                        let r = repo.apply_cleanup_claimed(&plan, claim)?;
                        let deleted = files_named(
                            r.objects_deleted,
                            "object(s)",
                            r.orphans_deleted,
                            r.unfinished_files_deleted,
                            r.temporaries_deleted,
                        );
                        say(format!("{part}: deleted {deleted}, freed {}", format_size(r.bytes_freed)))?;
                        sum(&mut j, "unfinished_files_deleted", r.unfinished_files_deleted);
                        sum(&mut j, "temporaries_deleted", r.temporaries_deleted);
                        sum(&mut j, "objects_deleted", r.objects_deleted);
                        sum(&mut j, "orphans_deleted", r.orphans_deleted);
                        sum(&mut j, "bytes_freed", r.bytes_freed);
                    }
                }
                storages.push(j);
            }
            // The catalog's pages of removed versions go back to the filesystem too.
            let mut database_bytes_returned = 0;
            if !dry_run {
                match repo.reclaim_catalog_space() {
                    Ok(n) => database_bytes_returned = n,
                    Err(e) => note!("keepfs: warning: could not shrink the database file: {e}"),
                }
                if database_bytes_returned > 0 {
                    say(format!("database: returned {} to the filesystem", format_size(database_bytes_returned)))?;
                }
            }
            title::reset();
            if json {
                report!(
                    "{}",
                    to_json(&serde_json::json!({
                        "dry_run": dry_run, "storages": storages, "database_bytes_returned": database_bytes_returned,
                    }))?
                );
            }
            Ok(exit::OK)
        }
    }
}

/// A server's address it cannot listen on: one held by another (a live server, a file
/// that is not a socket) is refused (exit 4), anything else an I/O error.
/// An address that is not one, or not this host's, is bad input (exit 2).
pub(crate) fn listen_error(at: &str, e: std::io::Error) -> Error {
    use std::net::ToSocketAddrs;
    match e.kind() {
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AlreadyExists => {
            Error::Refused(format!("cannot listen on {at}: {e}"))
        }
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::AddrNotAvailable => {
            Error::Invalid(format!("cannot listen on {at}: {e}; give HOST:PORT of this host (e.g. 127.0.0.1:10809)"))
        }
        // A name that does not resolve.
        _ if !at.starts_with('/') && at.to_socket_addrs().is_err() => {
            Error::Invalid(format!("cannot listen on {at}: {e}; give HOST:PORT of this host (e.g. 127.0.0.1:10809)"))
        }
        _ => Error::io(format!("cannot listen on {at}"), e),
    }
}

/// What a cleanup deletes, as one phrase: "3 object(s), 0 orphaned file(s) and 2 file(s)
/// of stopped backups". Every kind of file whose bytes are counted is named, so that the
/// counts add up to what the storage loses (a drill saw "deleted 0 object(s) and 0
/// orphaned file(s), freed 8.0 MiB": the files of stopped backups went unnamed).
fn files_named(objects: u64, objects_word: &str, orphans: u64, unfinished: u64, temporaries: u64) -> String {
    let mut parts = vec![format!("{objects} {objects_word}"), format!("{orphans} orphaned file(s)")];
    if unfinished > 0 {
        parts.push(format!("{unfinished} file(s) of stopped backups"));
    }
    if temporaries > 0 {
        parts.push(format!("{temporaries} temporary file(s) of stopped writes"));
    }
    let last = parts.pop().unwrap_or_default();
    format!("{} and {last}", parts.join(", "))
}

pub(crate) fn session_service(
    repo: Repository,
    read_only: bool,
    discard: bool,
    discarded: Overlays,
    list_ttl: std::time::Duration,
) -> Result<std::sync::Arc<SessionService>> {
    let overlays = if discard { discarded } else { Overlays::Commit };
    let opts = keepfs::session::SessionOptions { read_only, overlays, list_ttl };
    Ok(std::sync::Arc::new(SessionService::new(std::sync::Arc::new(repo), opts)?))
}

/// Renders `keepfs.1` and `keepfs-<command>.1` (and nested ones) into `dir`.
pub(crate) fn write_man_pages(dir: &std::path::Path) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    fn render(cmd: clap::Command, name: String, dir: &std::path::Path, n: &mut usize) -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.clone()))
            .render(&mut page)
            .map_err(|e| Error::io(format!("cannot render {}", path.display()), e))?;
        std::fs::write(&path, page).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            render(sub.clone(), format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    let mut n = 0;
    let mut cmd = cli_command();
    cmd.build();
    render(cmd, "keepfs".into(), dir, &mut n)?;
    Ok(n)
}

/// `--pushgateway` / `--metrics-file`: after any command (whatever its outcome), the
/// repository's metrics, gathered from its catalog (keepfs::metrics).
pub(crate) fn emit_metrics((push, file, config): (Option<String>, Option<PathBuf>, Option<PathBuf>)) -> Result<()> {
    if push.is_none() && file.is_none() {
        return Ok(());
    }
    let text = keepfs::metrics::gather(&Config::discover(config.as_deref())?)?;
    if let Some(path) = &file {
        keepfs::metrics::write_file(path, &text)?;
    }
    if let Some(url) = &push {
        keepfs::metrics::push(url, &text)?;
    }
    Ok(())
}

/// `mount --metrics ADDR`, `nbd --metrics ADDR`: /metrics on a thread of its own.
pub(crate) fn serve_metrics(addr: Option<&str>, config: &Config) -> Result<()> {
    if let Some(addr) = addr {
        let at = keepfs::metrics::serve(addr, config.clone())?;
        note!("keepfs: metrics at http://{at}/metrics");
    }
    Ok(())
}

/// `keepfs rbd-backup`: one image, or every image of a pool with a summary (exit 1 when
/// any failed).
pub(crate) fn rbd_backup(
    repo: &Repository,
    image: Option<&str>,
    all: Option<&str>,
    opts: keepfs::rbd::RoutineOptions,
) -> keepfs::Result<i32> {
    let one = |spec: &keepfs::rbd::Spec| -> keepfs::Result<()> {
        let p = progress(format!("backing up {}", spec.image_path()));
        let o = keepfs::rbd::backup_image(repo, spec, &opts, &p)?;
        for w in &o.warnings {
            note!("keepfs: warning: {w}");
        }
        let how = match &o.from {
            Some((snap, uid)) => format!("differential from {snap} ({uid})"),
            None => "initial".to_string(),
        };
        let removed = if o.removed_snapshots.is_empty() {
            String::new()
        } else {
            format!("; removed snapshot(s) {}", o.removed_snapshots.join(", "))
        };
        note!("backed up {}@{} as {}: {how}{removed}", spec.image_path(), o.snapshot, o.version.uid);
        report!("{}", o.version.uid);
        Ok(())
    };
    let Some(pool) = all else {
        let spec = keepfs::rbd::parse_image(image.unwrap_or_default())?;
        one(&spec)?;
        return Ok(exit::OK);
    };
    let images = keepfs::rbd::images_of(pool, repo)?;
    let mut failed = Vec::new();
    for spec in &images {
        if let Err(e) = one(spec) {
            note!("keepfs: error: {}: {e}", spec.image_path());
            failed.push(spec.image_path());
        }
    }
    note!(
        "rbd-backup --all {pool}: {} image(s), {} backed up, {} failed{}",
        images.len(),
        images.len() - failed.len(),
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(": {}", failed.join(", ")) }
    );
    Ok(if failed.is_empty() { exit::OK } else { exit::FAILURE })
}

#[cfg(test)]
mod tests {
    use super::files_named;

    #[test]
    fn a_cleanup_names_every_kind_of_file_it_counts() {
        assert_eq!(files_named(3, "object(s)", 0, 0, 0), "3 object(s) and 0 orphaned file(s)");
        assert_eq!(
            files_named(0, "object(s)", 0, 2, 0),
            "0 object(s), 0 orphaned file(s) and 2 file(s) of stopped backups"
        );
        assert_eq!(
            files_named(1, "unreferenced object(s)", 2, 3, 4),
            "1 unreferenced object(s), 2 orphaned file(s), 3 file(s) of stopped backups and 4 temporary file(s) of stopped writes"
        );
    }
}
