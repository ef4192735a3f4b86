//! Versions: one backup of one image, with its fields, labels and statistics.

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A version uid: `V` followed by 10 digits, increasing, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct VersionUid(pub u64);

impl VersionUid {
    /// Parses the one written form of a uid, `V` and 10 digits (as `keepfs ls` shows it).
    /// Short forms (`1`, `v1`, `V1`) are refused, naming the uid they may have meant, so
    /// that a uid in a script or a path means the same everywhere.
    pub fn parse(s: &str) -> Result<VersionUid> {
        let canonical = |d: &str| d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit());
        match s.strip_prefix('V').filter(|d| canonical(d)).and_then(|d| d.parse::<u64>().ok()) {
            Some(n) if n > 0 => Ok(VersionUid(n)),
            _ => {
                let digits = s.strip_prefix(['V', 'v']).unwrap_or(s);
                let meant = Some(digits)
                    .filter(|d| !d.is_empty() && d.len() <= 10 && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u64>().ok())
                    .filter(|n| *n > 0)
                    .map(|n| format!("; did you mean {}?", VersionUid(n)))
                    .unwrap_or_default();
                Err(Error::Invalid(format!(
                    "'{}' is not a version uid: write it as V and 10 digits, like V0000000001{meant}",
                    shown(s)
                )))
            }
        }
    }
}

impl fmt::Display for VersionUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "V{:010}", self.0)
    }
}

impl From<VersionUid> for String {
    fn from(u: VersionUid) -> String {
        u.to_string()
    }
}

impl TryFrom<String> for VersionUid {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        VersionUid::parse(&s).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being written, or its writer died; never restorable as complete.
    Incomplete,
    Valid,
    /// Some block is known to be damaged; still restorable, with zeros for that block.
    Invalid,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Incomplete => "incomplete",
            Status::Valid => "valid",
            Status::Invalid => "invalid",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "incomplete" => Some(Status::Incomplete),
            "valid" => Some(Status::Valid),
            "invalid" => Some(Status::Invalid),
            _ => None,
        }
    }
}

/// What a backup did, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes of new blocks (plaintext) that were written to storage.
    pub bytes_written: u64,
    /// Bytes the stored objects of new blocks take (after compression).
    pub bytes_stored: u64,
    /// Bytes of blocks that were already stored.
    pub bytes_deduplicated: u64,
    /// Bytes of all-zero blocks.
    pub bytes_sparse: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub uid: VersionUid,
    pub date: DateTime<Utc>,
    pub name: String,
    pub snapshot: String,
    pub size: u64,
    pub block_size: u32,
    pub status: Status,
    pub protected: bool,
    pub storage: String,
    pub labels: BTreeMap<String, String>,
    pub stats: Stats,
    /// When the version may go (backy2's expiry; `ls --expired` lists those past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire: Option<DateTime<Utc>>,
    /// The host the version was made on (`host` in the configuration, `KEEPFS_HOST`, or
    /// the host name); none for versions made before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Checks a backup name. A name is one path component of the mount (`by_name/<name>`)
/// and one cell of `keepfs ls`: 1 to 255 bytes, no `/`, no control characters (a newline
/// would break the table), and not `.` or `..` (they name directories, not versions).
/// The CLI, the engine and the mount all check names here.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| c.is_control())
        || name.contains('/')
        || name == "."
        || name == ".."
    {
        return Err(Error::Invalid(format!(
            "'{}' is not a usable backup name: use 1 to 255 bytes of printable characters, without '/', other than '.' and '..'",
            shown(name)
        )));
    }
    Ok(())
}

/// User input quoted in a message: control characters escaped (a name holding a newline
/// stays one line), everything else as typed (`name == "db"` is not `name == \"db\"`).
fn shown(s: &str) -> String {
    // Bidirectional and invisible formatting characters too: they would reorder or hide
    // what the terminal shows.
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    s.chars().map(|c| if hidden(c) { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Checks a snapshot name: it may be empty; no control characters, at most 255 bytes.
pub fn check_snapshot(snapshot: &str) -> Result<()> {
    if snapshot.len() > 255 || snapshot.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!(
            "'{}' is not a usable snapshot name: use at most 255 bytes of printable characters",
            shown(snapshot)
        )));
    }
    Ok(())
}

/// Checks a label: its name (see [`check_label_name`]) and a value without control
/// characters.
pub fn check_label(name: &str, value: &str) -> Result<()> {
    check_label_name(name)?;
    if value.chars().any(|c| c.is_control()) {
        return Err(Error::Invalid(format!("label '{name}': the value contains control characters")));
    }
    Ok(())
}

/// Checks a label name: letters, digits and `_ . - /`, 1 to 255 bytes.
pub fn check_label_name(name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c));
    if !ok {
        return Err(Error::Invalid(format!("'{}' is not a label name: use letters, digits and _ . - /", shown(name))));
    }
    Ok(())
}

/// Parses `k=v` (or a bare `k`, meaning an empty value) into a label.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    check_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// A valid, unprotected version without labels, for the tests of what is computed from
/// lists of versions (retention, schedulers, automatic tags).
#[cfg(test)]
pub(crate) fn test_version(uid: u64, name: &str, date: DateTime<Utc>) -> Version {
    Version {
        uid: VersionUid(uid),
        date,
        name: name.into(),
        snapshot: String::new(),
        size: 1,
        block_size: 4096,
        status: Status::Valid,
        protected: false,
        storage: "default".into(),
        labels: BTreeMap::new(),
        stats: Stats::default(),
        expire: None,
        host: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids() {
        assert_eq!(VersionUid(42).to_string(), "V0000000042");
        assert_eq!(VersionUid::parse("V0000000042").unwrap(), VersionUid(42));
        // Only the canonical form: a short one names the uid it may mean.
        for short in ["42", "v0000000042", "V42"] {
            let e = VersionUid::parse(short).unwrap_err().to_string();
            assert!(e.contains("did you mean V0000000042?"), "{short}: {e}");
        }
        assert!(VersionUid::parse("V0000000000").is_err());
        assert!(VersionUid::parse("V").is_err());
        assert!(VersionUid::parse("V0").is_err());
        assert!(VersionUid::parse("Vabc").is_err());
        assert!(VersionUid::parse("V00000000001").is_err());
        // What was typed is shown as typed (a filter given to `rm`), control characters
        // escaped so the message stays one line.
        let e = VersionUid::parse(r#"name == "vm-a""#).unwrap_err().to_string();
        assert!(e.starts_with(r#"'name == "vm-a"' is not a version uid"#), "{e}");
        let e = VersionUid::parse("V1\nrm").unwrap_err().to_string();
        assert!(e.contains(r"'V1\nrm'") && !e.contains('\n'), "{e}");
        let e = VersionUid::parse("V1\u{202e}mr").unwrap_err().to_string();
        assert!(e.contains(r"'V1\u{202e}mr'"), "{e}");
    }

    #[test]
    fn labels_and_names() {
        assert_eq!(parse_label("env=prod").unwrap(), ("env".into(), "prod".into()));
        assert_eq!(parse_label("tier").unwrap(), ("tier".into(), "".into()));
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("sp ace=x").is_err());
        assert!(check_name("db").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        for bad in [".", "..", "a\nb", "tab\there", "\u{7f}", &"x".repeat(256)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("not a usable backup name") && !e.contains('\n'), "{bad:?}: {e}");
        }
        assert!(check_name("...").is_ok() && check_name(".hidden").is_ok() && check_name(&"é".repeat(127)).is_ok());
        assert!(check_snapshot("").is_ok() && check_snapshot("snap-2026").is_ok());
        assert!(check_snapshot("a\nb").is_err() && check_snapshot(&"s".repeat(256)).is_err());
        assert!(check_label("env", "a\rb").is_err() && check_label("env", "prod").is_ok());
    }
}
