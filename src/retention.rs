//! Retention rules in Benji's syntax: `latest3,hours24,days30,weeks4,months12,years3`.
//! Per backup name, a version is kept when any rule keeps it: `latestN` keeps the N
//! newest; each time rule splits the time before now into N periods of its length (hour,
//! day, 7 days, 30 days, 365 days) and keeps the oldest version in each period, so kept
//! versions do not shift from run to run. Protected and incomplete versions are never
//! candidates. The result is a plan; `enforce --dry-run` prints it.

use crate::error::{Error, Result};
use crate::version::{Status, Version, VersionUid};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    Latest(u32),
    /// Number of periods of this many seconds.
    Periods(u32, i64),
}

/// Parses `latest3,hours24,days30,weeks4,months12,years3` (any subset, each at most once).
pub fn parse_rules(s: &str) -> Result<Vec<Rule>> {
    let bad = |m: String| Error::Invalid(format!("retention rules '{s}': {m}"));
    let mut rules = Vec::new();
    let mut seen = HashSet::new();
    for part in s.split(',').map(str::trim) {
        let split = part.find(|c: char| c.is_ascii_digit()).ok_or_else(|| {
            bad(format!(
                "'{part}' has no count (write e.g. days30; categories: latest, hours, days, weeks, months, years)"
            ))
        })?;
        let (cat, num) = part.split_at(split);
        let n: u32 = match num.parse::<u32>() {
            Ok(n) if n > 0 => n,
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
                return Err(bad(format!("'{part}': the count is too large (at most {})", u32::MAX)));
            }
            _ => return Err(bad(format!("'{part}': the count must be a whole number above 0"))),
        };
        if !seen.insert(cat.to_string()) {
            return Err(bad(format!("'{cat}' appears twice")));
        }
        rules.push(match cat {
            "latest" => Rule::Latest(n),
            "hours" => Rule::Periods(n, 3600),
            "days" => Rule::Periods(n, 86_400),
            "weeks" => Rule::Periods(n, 7 * 86_400),
            "months" => Rule::Periods(n, 30 * 86_400),
            "years" => Rule::Periods(n, 365 * 86_400),
            other => {
                return Err(bad(format!("unknown category '{other}' (use latest, hours, days, weeks, months, years)")));
            }
        });
    }
    Ok(rules)
}

/// The versions the rules do not keep, among `versions` (all names), as of `now`.
pub fn plan(rules: &[Rule], versions: &[Version], now: DateTime<Utc>) -> Vec<VersionUid> {
    let mut by_name: BTreeMap<&str, Vec<&Version>> = BTreeMap::new();
    for v in versions.iter().filter(|v| !v.protected && v.status != Status::Incomplete) {
        by_name.entry(&v.name).or_default().push(v);
    }
    let mut remove = Vec::new();
    for (_, mut vs) in by_name {
        vs.sort_by_key(|v| std::cmp::Reverse((v.date, v.uid)));
        let mut keep: HashSet<VersionUid> = HashSet::new();
        for rule in rules {
            match *rule {
                Rule::Latest(n) => keep.extend(vs.iter().take(n as usize).map(|v| v.uid)),
                Rule::Periods(n, secs) => {
                    // Oldest version in each period k (k = 0 is the latest period).
                    let mut oldest: BTreeMap<i64, (DateTime<Utc>, VersionUid)> = BTreeMap::new();
                    for v in &vs {
                        let age = (now - v.date).num_seconds().max(0);
                        let k = age / secs;
                        if k < n as i64 {
                            let e = oldest.entry(k).or_insert((v.date, v.uid));
                            if (v.date, v.uid) < *e {
                                *e = (v.date, v.uid);
                            }
                        }
                    }
                    keep.extend(oldest.values().map(|(_, u)| *u));
                }
            }
        }
        remove.extend(vs.iter().filter(|v| !keep.contains(&v.uid)).map(|v| v.uid));
    }
    remove.sort();
    remove
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(uid: u64, name: &str, hours_ago: i64, now: DateTime<Utc>) -> Version {
        crate::version::test_version(uid, name, now - chrono::Duration::hours(hours_ago))
    }

    #[test]
    fn rules_parse_and_reject() {
        assert_eq!(parse_rules("latest3,days30").unwrap(), vec![Rule::Latest(3), Rule::Periods(30, 86_400)]);
        assert_eq!(parse_rules("latest3,hours24,days30,weeks4,months12,years3").unwrap().len(), 6);
        for bad in ["", "days", "days0", "decades3", "latest2,latest3", "days-1", "days3x"] {
            let e = parse_rules(bad).unwrap_err().to_string();
            assert!(e.starts_with("retention rules") && !e.contains('\n'), "{bad}: {e}");
        }
        let e = parse_rules("hours99999999999").unwrap_err().to_string();
        assert!(e.contains("too large (at most 4294967295)"), "{e}");
    }

    #[test]
    fn latest_and_daily_per_name() {
        let now = Utc::now();
        // Every 6 hours for 5 days, newest first: uid 1 is the newest.
        let mut vs: Vec<Version> = (0..20).map(|i| v(i + 1, "db", i as i64 * 6, now)).collect();
        vs.push(v(100, "web", 1000, now)); // another name, old: kept by latest1
        let remove = plan(&parse_rules("latest2,days3").unwrap(), &vs, now);
        let kept: Vec<u64> = vs.iter().map(|x| x.uid.0).filter(|u| !remove.iter().any(|r| r.0 == *u)).collect();
        // latest2: uids 1, 2. days3: oldest in day 0 (ages 0..23h: uids 1-4 -> 4),
        // day 1 (24..47h: uids 5-8 -> 8), day 2 (48..71h: uids 9-12 -> 12).
        assert_eq!(kept, vec![1, 2, 4, 8, 12, 100]);
    }

    #[test]
    fn protected_and_incomplete_are_never_removed() {
        let now = Utc::now();
        let mut vs: Vec<Version> = (0..5).map(|i| v(i + 1, "db", i as i64 * 48, now)).collect();
        vs[3].protected = true;
        vs[4].status = Status::Incomplete;
        let remove = plan(&parse_rules("latest1").unwrap(), &vs, now);
        assert_eq!(remove, vec![VersionUid(2), VersionUid(3)]);
    }
}
