//! `keepfs rbd-backup`: the nightly routine of the reference documents' scripts as one
//! command. For an image: find the newest snapshot with the prefix, create a new one,
//! back it up differentially (`--diff-from` the old snapshot, `--base` its version) when
//! keepfs has a valid version of that snapshot (same backup name, same snapshot name),
//! otherwise as an initial backup, then remove older prefixed snapshots, keeping the
//! newest `keep_snapshots`; snapshots without the prefix are never touched. When the
//! backup fails, the new snapshot is removed again and the old one kept, so the next run
//! can still go differentially.

use super::client::{Cluster, Image};
use super::{RbdError, RbdErrorKind, Spec};
use crate::backup::BackupOptions;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::Url;
use crate::version::{Status, Version, VersionUid};

pub use super::RoutineOptions;

/// What one run did for one image.
#[derive(Debug)]
pub struct Outcome {
    pub version: Version,
    pub snapshot: String,
    /// The snapshot and version it went differentially from (None: initial backup).
    pub from: Option<(String, VersionUid)>,
    pub removed_snapshots: Vec<String>,
    pub warnings: Vec<String>,
}

/// The name of the snapshot a run at `now` creates, unique among `existing`.
fn new_snapshot_name(prefix: &str, existing: &[String], now: chrono::DateTime<chrono::Utc>) -> String {
    let base = format!("{prefix}{}", now.format("%Y-%m-%dT%H:%M:%SZ"));
    let mut name = base.clone();
    let mut n = 1;
    while existing.contains(&name) {
        n += 1;
        name = format!("{base}.{n}");
    }
    name
}

/// Runs the routine for `image` (`POOL[/NAMESPACE]/IMAGE`); the backup's name is the
/// image's name.
pub fn backup_image(
    repo: &Repository,
    image: &Spec,
    opts: &RoutineOptions,
    progress: &dyn Progress,
) -> Result<Outcome> {
    if opts.prefix.is_empty() {
        return Err(Error::Invalid("--prefix must not be empty: rbd-backup removes the snapshots it names".into()));
    }
    let head = image.head();
    let cluster = Cluster::connect(&repo.config.rbd)?;
    let pool = cluster.pool(&head.pool, &head.namespace)?;
    let img = Image::open(&pool, &head, false)?;
    let snaps = img.snaps()?;
    let names: Vec<String> = snaps.iter().map(|s| s.name.clone()).collect();
    let last = snaps.iter().filter(|s| s.name.starts_with(&opts.prefix)).max_by_key(|s| s.id).cloned();
    let name = head.image.clone();
    let mut warnings = Vec::new();
    // The version of the newest prefixed snapshot, if keepfs has a valid one.
    let from = match &last {
        None => None,
        Some(snap) => {
            let found = repo
                .list(None)?
                .into_iter()
                .filter(|v| v.name == name && v.snapshot == snap.name && v.status == Status::Valid)
                .max_by_key(|v| v.uid);
            match found {
                Some(v) if v.size > img.size => {
                    warnings.push(format!(
                        "{} shrank from {} to {} bytes since {}: initial backup",
                        head.image_path(),
                        v.size,
                        img.size,
                        v.uid
                    ));
                    None
                }
                Some(v) => Some((snap.name.clone(), v.uid)),
                None => {
                    warnings.push(format!(
                        "keepfs has no valid version of {}@{}: initial backup",
                        head.image_path(),
                        snap.name
                    ));
                    None
                }
            }
        }
    };
    let new = new_snapshot_name(&opts.prefix, &names, chrono::Utc::now());
    img.snap_create(&new)?;
    let url = Url::Rbd(Spec { snap: Some(new.clone()), ..head.clone() });
    let backup = BackupOptions {
        name: name.clone(),
        snapshot: new.clone(),
        labels: opts.labels.clone(),
        storage: opts.storage.clone(),
        base: from.as_ref().map(|f| f.1),
        diff_from: from.as_ref().map(|f| f.0.clone()),
        ..Default::default()
    };
    let version = match repo.backup(&url, &backup, progress) {
        Ok(v) => v,
        Err(e) => {
            // Keep the old snapshot (the next run's base), drop the new one.
            if let Err(re) = img.snap_remove(&new) {
                warnings.push(re.to_string());
            }
            return Err(e);
        }
    };
    let mut removed = Vec::new();
    let mut prefixed: Vec<_> = img.snaps()?.into_iter().filter(|s| s.name.starts_with(&opts.prefix)).collect();
    prefixed.sort_by_key(|s| std::cmp::Reverse(s.id));
    for s in prefixed.iter().skip(opts.keep_snapshots.max(1)) {
        if s.name == new {
            continue;
        }
        match img.snap_remove(&s.name) {
            Ok(()) => removed.push(s.name.clone()),
            Err(e) => warnings.push(e.to_string()),
        }
    }
    Ok(Outcome { version, snapshot: new, from, removed_snapshots: removed, warnings })
}

/// The images of `POOL[/NAMESPACE]`, for `--all`.
pub fn images_of(pool_spec: &str, repo: &Repository) -> Result<Vec<Spec>> {
    let (pool, ns) = match pool_spec.split('/').collect::<Vec<_>>()[..] {
        [p] if !p.is_empty() => (p, ""),
        [p, n] if !p.is_empty() && !n.is_empty() => (p, n),
        _ => {
            return Err(Error::Invalid(format!("--all '{pool_spec}': give a pool, POOL or POOL/NAMESPACE")));
        }
    };
    let cluster = Cluster::connect(&repo.config.rbd)?;
    let p = cluster.pool(pool, ns)?;
    Ok(p.images()?
        .into_iter()
        .filter(|i| !i.contains(".keepfs-restore."))
        .map(|image| Spec { pool: pool.into(), namespace: ns.into(), image, snap: None })
        .collect())
}

/// Parses the image operand, `POOL[/NAMESPACE]/IMAGE` (an `rbd:` prefix is accepted).
pub fn parse_image(s: &str) -> Result<Spec> {
    let body = s.strip_prefix("rbd://").or_else(|| s.strip_prefix("rbd:")).unwrap_or(s);
    let spec = Spec::parse(body, s).map_err(Error::Invalid)?;
    if spec.snap.is_some() {
        return Err(Error::from(RbdError::new(
            RbdErrorKind::Invalid,
            format!("rbd-backup '{s}' names a snapshot: give POOL[/NAMESPACE]/IMAGE; it makes its own snapshots"),
        )));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_names_are_unique() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T02:00:00Z").unwrap().to_utc();
        let a = super::new_snapshot_name("b-", &[], now);
        assert_eq!(a, "b-2026-12-01T02:00:00Z");
        assert_eq!(super::new_snapshot_name("b-", std::slice::from_ref(&a), now), "b-2026-12-01T02:00:00Z.2");
    }
}
