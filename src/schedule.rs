//! Schedulers and the questions backy2's `due` and `sla` answer about them.
//!
//! A scheduler has a name, an `interval` (how often a backup is wanted), `keep` (how many
//! of its backups should exist) and an `sla` (how late a backup may be). A version
//! belongs to a scheduler when it carries a label of the scheduler's name (`keepfs backup
//! -l daily ...`). keepfs itself schedules nothing: `due` tells a cron job which backups
//! to take now (and which expiry date to give them), `sla` tells monitoring which
//! promises are broken.

use crate::error::{Error, Result};
use crate::version::{Status, Version};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduler {
    pub name: String,
    pub interval: Duration,
    pub keep: u32,
    pub sla: Duration,
}

/// The schedulers every configuration has unless it redefines them.
pub fn builtin() -> Vec<Scheduler> {
    let s = |name: &str, interval: i64, keep: u32, sla: i64| Scheduler {
        name: name.into(),
        interval: Duration::seconds(interval),
        keep,
        sla: Duration::seconds(sla),
    };
    vec![
        s("hourly", 3600, 25, 600),
        s("daily", 86_400, 8, 6 * 3600),
        s("weekly", 7 * 86_400, 5, 12 * 3600),
        s("monthly", 30 * 86_400, 3, 3 * 86_400),
    ]
}

/// Picks schedulers by name from `all` (`daily,weekly`).
pub fn select(all: &[Scheduler], names: &str) -> Result<Vec<Scheduler>> {
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            all.iter().find(|s| s.name == n).cloned().ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
                Error::Invalid(format!("unknown scheduler '{n}' (configured: {})", known.join(", ")))
            })
        })
        .collect()
}

/// A backup that is due: which schedulers want it, the expiry date to give it, and
/// since when it is due.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Due {
    pub name: String,
    pub schedulers: Vec<String>,
    pub expire_date: DateTime<Utc>,
    pub due_since: DateTime<Utc>,
}

/// A broken promise of one scheduler for one backup name.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Breach {
    pub name: String,
    pub scheduler: String,
    pub breach: String,
}

/// Valid versions per name, oldest first; `only` restricts to one name (which may have
/// no versions yet).
fn by_name<'a>(versions: &'a [Version], only: Option<&str>) -> BTreeMap<String, Vec<&'a Version>> {
    let mut out: BTreeMap<String, Vec<&Version>> = BTreeMap::new();
    if let Some(n) = only {
        out.insert(n.to_string(), Vec::new());
    }
    for v in versions.iter().filter(|v| v.status == Status::Valid && only.is_none_or(|n| v.name == n)) {
        out.entry(v.name.clone()).or_default().push(v);
    }
    for list in out.values_mut() {
        list.sort_by_key(|v| (v.date, v.uid));
    }
    out
}

/// The backups due at `now`: per name, the schedulers whose last backup is older than
/// `interval - sla` (or that have none), oldest due first. A backup's due date is its
/// date + interval - sla; a name with no backup for a scheduler is due since 1970.
pub fn due(schedulers: &[Scheduler], versions: &[Version], only: Option<&str>, now: DateTime<Utc>) -> Vec<Due> {
    let mut rows = Vec::new();
    for (name, list) in by_name(versions, only) {
        let mut row: Option<Due> = None;
        for s in schedulers {
            let last = list.iter().rev().find(|v| v.labels.contains_key(&s.name));
            let since = match last {
                Some(v) => v.date + s.interval - s.sla,
                None => DateTime::UNIX_EPOCH,
            };
            if since > now {
                continue;
            }
            let expire = now + s.interval * s.keep as i32;
            let r = row.get_or_insert_with(|| Due {
                name: name.clone(),
                schedulers: Vec::new(),
                expire_date: expire,
                due_since: since,
            });
            r.schedulers.push(s.name.clone());
            r.expire_date = r.expire_date.max(expire);
            r.due_since = r.due_since.min(since);
        }
        rows.extend(row);
    }
    rows.sort_by(|a, b| (a.due_since, &a.name).cmp(&(b.due_since, &b.name)));
    rows
}

fn human(d: Duration) -> String {
    let s = d.num_seconds();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// What breaks the schedulers' promises at `now`: too few or too many unexpired backups,
/// a latest backup older than interval + sla, or more than interval + sla between two of
/// the backups that should be kept.
pub fn sla(schedulers: &[Scheduler], versions: &[Version], only: Option<&str>, now: DateTime<Utc>) -> Vec<Breach> {
    let mut out = Vec::new();
    for (name, list) in by_name(versions, only) {
        for s in schedulers {
            let mine: Vec<&Version> = list
                .iter()
                .copied()
                .filter(|v| v.labels.contains_key(&s.name) && v.expire.is_none_or(|e| e > now))
                .collect();
            let mut breach = |text: String| {
                out.push(Breach {
                    name: name.clone(),
                    scheduler: s.name.clone(),
                    breach: format!("{}: {text}", s.name),
                })
            };
            let n = mine.len();
            if n < s.keep as usize {
                breach(format!("Too few backups. Found {n}, should be {}.", s.keep));
            } else if n > s.keep as usize {
                breach(format!("Too many backups. Found {n}, should be {}.", s.keep));
            }
            let limit = s.interval + s.sla;
            if let Some(last) = mine.last()
                && now - last.date > limit
            {
                breach(format!(
                    "Latest backup is too old. It is from {}, should be at most {} old.",
                    last.date.format("%Y-%m-%d %H:%M:%S"),
                    human(limit)
                ));
            }
            let window = &mine[n.saturating_sub(s.keep as usize)..];
            for pair in window.windows(2) {
                let gap = pair[1].date - pair[0].date;
                if gap > limit {
                    breach(format!(
                        "Too much time between backups {} and {}: {}, should be at most {}.",
                        pair[0].uid,
                        pair[1].uid,
                        human(Duration::seconds(gap.num_seconds())),
                        human(limit)
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(uid: u64, name: &str, hours_ago: i64, label: &str, now: DateTime<Utc>) -> Version {
        let mut v = crate::version::test_version(uid, name, now - Duration::hours(hours_ago));
        v.labels.insert(label.to_string(), String::new());
        v
    }

    fn daily(keep: u32) -> Scheduler {
        Scheduler { name: "daily".into(), interval: Duration::days(1), keep, sla: Duration::hours(6) }
    }

    #[test]
    fn due_dates_follow_the_last_backup() {
        let now = Utc::now();
        // db: last daily 20 h ago -> due since 2 h ago (20h ago + 24h - 6h = 2 h ago).
        // web: last daily 10 h ago -> due in 8 h: not listed. new: never -> since 1970.
        let vs = vec![v(1, "db", 44, "daily", now), v(2, "db", 20, "daily", now), v(3, "web", 10, "daily", now)];
        let rows = due(&[daily(8)], &vs, None, now);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "db");
        assert_eq!(rows[0].due_since, now - Duration::hours(2));
        assert_eq!(rows[0].expire_date, now + Duration::days(8));
        let rows = due(&[daily(8)], &vs, Some("new"), now);
        assert_eq!(rows[0].due_since, DateTime::UNIX_EPOCH);
        // A version without the scheduler's label does not count.
        let vs = vec![v(4, "db", 1, "weekly", now)];
        assert_eq!(due(&[daily(8)], &vs, None, now)[0].due_since, DateTime::UNIX_EPOCH);
    }

    #[test]
    fn sla_breaches() {
        let now = Utc::now();
        let vs = vec![v(1, "db", 100, "daily", now), v(2, "db", 48, "daily", now), v(3, "db", 40, "daily", now)];
        let b: Vec<String> = sla(&[daily(3)], &vs, None, now).into_iter().map(|b| b.breach).collect();
        assert_eq!(
            b,
            vec![
                format!(
                    "daily: Latest backup is too old. It is from {}, should be at most 30h old.",
                    (now - Duration::hours(40)).format("%Y-%m-%d %H:%M:%S")
                ),
                "daily: Too much time between backups V0000000001 and V0000000002: 52h, should be at most 30h."
                    .to_string(),
            ]
        );
        let b = sla(&[daily(5)], &vs, None, now);
        assert_eq!(b[0].breach, "daily: Too few backups. Found 3, should be 5.");
        let fine = vec![v(1, "db", 30, "daily", now), v(2, "db", 6, "daily", now)];
        assert!(sla(&[daily(2)], &fine, None, now).is_empty());
        assert_eq!(sla(&[daily(1)], &fine, None, now)[0].breach, "daily: Too many backups. Found 2, should be 1.");
    }
}
