//! Sizes and durations as people write them: `4M`, `200G`, `1T` (binary multiples, as
//! backy2's `null://200G`; an optional trailing `B`/`iB` is accepted), `90s`, `6h`, `2w`.

/// Parses a byte size with an optional k, M, G, T, P suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size: expected a number with an optional k, M, G, T or P suffix, e.g. 4M"));
    }
    let unit = unit.trim();
    let unit = unit.strip_suffix("iB").or_else(|| unit.strip_suffix('B')).unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" | "K" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        other => {
            return Err(format!("'{s}' is not a size: unknown unit '{other}' (use k, M, G, T or P)"));
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size: the number is too large"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{s}' is too large (more than 16 EiB)"))
}

/// Parses a duration like `90s`, `10m`, `6h`, `1d` or `2w`.
pub fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("'{s}' is not a duration (write e.g. 90s, 10m, 6h, 1d, 2w)"))?;
    let secs = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m, h, d or w)")),
    };
    n.checked_mul(secs).map(chrono::Duration::seconds).ok_or_else(|| format!("'{s}' is too long"))
}

/// Formats a duration as [`parse_duration`] reads it, in the largest unit that holds it
/// whole: `90s`, `10m`, `36h`, `1d`, `2w` (a fraction of a second is dropped).
pub fn format_duration(d: chrono::Duration) -> String {
    let secs = d.num_seconds();
    let units = [(7 * 86_400, "w"), (86_400, "d"), (3600, "h"), (60, "m")];
    match units.iter().find(|(n, _)| secs != 0 && secs % n == 0) {
        Some((n, unit)) => format!("{}{unit}", secs / n),
        None => format!("{secs}s"),
    }
}

/// Formats a byte count for people: `1.5 GiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Checks a block size: a power of two from 4 KiB to 32 MiB.
pub fn check_block_size(bs: u64) -> Result<u32, String> {
    if !(4096..=crate::block::MAX_BLOCK_LEN).contains(&bs) || !bs.is_power_of_two() {
        return Err(format!(
            "block size {bs} is not allowed: use a power of two from 4k to 32M (e.g. 4M, the default)"
        ));
    }
    Ok(bs as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_as_they_are_written() {
        for (text, secs) in
            [("90s", 90), ("10m", 600), ("36h", 36 * 3600), ("1d", 86_400), ("2w", 14 * 86_400), ("0s", 0)]
        {
            assert_eq!(format_duration(chrono::Duration::seconds(secs)), text);
            assert_eq!(parse_duration(text).unwrap(), chrono::Duration::seconds(secs));
        }
        assert_eq!(format_duration(chrono::Duration::milliseconds(1500)), "1s");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), chrono::Duration::seconds(90));
        assert_eq!(parse_duration("10m").unwrap(), chrono::Duration::minutes(10));
        assert_eq!(parse_duration("2w").unwrap(), chrono::Duration::days(14));
        assert!(parse_duration("1y").unwrap_err().contains("unknown unit 'y'"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("200G").unwrap(), 200 << 30);
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("4MB").unwrap(), 4 << 20);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("3P").unwrap(), 3 << 50);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(check_block_size(4 << 20).unwrap(), 4 << 20);
        assert!(check_block_size(3 << 20).is_err());
        assert!(check_block_size(64 << 20).is_err());
        assert!(check_block_size(2048).is_err());
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
    }
}
