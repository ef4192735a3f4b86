//! Hints: which regions of an image may have changed, in the JSON that
//! `rbd diff --format=json` prints: `[{"offset": .., "length": .., "exists": "true"}]`.
//! Extents are widened to whole blocks. With a base version only hinted blocks are read
//! and the others are taken from the base; without one, hints mark the used regions of
//! an initial backup and unhinted blocks are sparse.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;

#[derive(Deserialize)]
struct Extent {
    offset: u64,
    length: u64,
    /// "true"/"false" in rbd's output; either way the region is read (a discarded region
    /// reads as zeros and becomes sparse).
    #[serde(default)]
    #[allow(dead_code)]
    exists: serde_json::Value,
}

/// Parses hints for an image of `size` bytes in blocks of `block_size`: which blocks to read.
pub fn parse_hints(json: &str, size: u64, block_size: u32) -> Result<Wanted> {
    let extents: Vec<Extent> = serde_json::from_str(json).map_err(|e| {
        Error::Invalid(format!("hints are not rbd diff JSON ([{{\"offset\":..,\"length\":..,\"exists\":..}}]): {e}"))
    })?;
    wanted_blocks(extents.iter().map(|e| (e.offset, e.length)), size, block_size)
}

/// The blocks that changed extents `(offset, length)` touch (from hints, or from librbd
/// for `--diff-from`).
pub fn wanted_blocks(extents: impl IntoIterator<Item = (u64, u64)>, size: u64, block_size: u32) -> Result<Wanted> {
    let bs = block_size as u64;
    let mut wanted = Wanted::none(size.div_ceil(bs));
    for (offset, length) in extents {
        let end = offset.checked_add(length).ok_or_else(|| Error::Invalid("hints: an extent overflows".into()))?;
        if end > size {
            return Err(Error::Invalid(format!(
                "hints: extent at {offset} of {length} bytes ends past the image ({size} bytes); were they made for another image?"
            )));
        }
        if length == 0 {
            continue;
        }
        wanted.insert(offset / bs..end.div_ceil(bs));
    }
    Ok(wanted)
}

/// The blocks a differential backup reads, as ranges: its memory follows the number of
/// changed regions, not the image's size (a flag per block was 4 GiB for 2^32 blocks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    len: u64,
    /// Disjoint ranges, none touching another: start -> end.
    ranges: BTreeMap<u64, u64>,
}

impl Wanted {
    /// No block of `len` wanted.
    pub fn none(len: u64) -> Wanted {
        Wanted { len, ranges: BTreeMap::new() }
    }

    /// Blocks in the image.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, idx: u64) -> bool {
        self.ranges.range(..=idx).next_back().is_some_and(|(_, &end)| idx < end)
    }

    /// Wants blocks `r` too (clipped to the image).
    pub fn insert(&mut self, r: Range<u64>) {
        let (mut start, mut end) = (r.start, r.end.min(self.len));
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let touched: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in touched {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// Whether any block of `r` is wanted.
    pub fn any_in(&self, r: Range<u64>) -> bool {
        r.start < r.end && (self.contains(r.start) || self.ranges.range(r.start..r.end).next().is_some())
    }

    /// Whether every block of `r` is wanted.
    pub fn all_in(&self, r: Range<u64>) -> bool {
        r.start >= r.end || self.ranges.range(..=r.start).next_back().is_some_and(|(_, &end)| r.end <= end)
    }

    /// The ranges of blocks not wanted, in order.
    pub fn gaps(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut at = 0;
        self.ranges.iter().map(|(&s, &e)| (s, e)).chain(std::iter::once((self.len, self.len))).filter_map(
            move |(s, e)| {
                let gap = at..s;
                at = e;
                (gap.start < gap.end).then_some(gap)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_widen_to_blocks() {
        let w = parse_hints(
            r#"[{"offset":4095,"length":2,"exists":"true"},{"offset":40960,"length":4096,"exists":"false"}]"#,
            50000,
            4096,
        )
        .unwrap();
        let set: Vec<u64> = (0..w.len()).filter(|&i| w.contains(i)).collect();
        assert_eq!(set, vec![0, 1, 10]);
        assert_eq!(w.len(), 13);
        assert_eq!(w.gaps().collect::<Vec<_>>(), vec![2..10, 11..13]);
    }

    #[test]
    fn wanted_ranges_merge_and_answer_as_a_flag_per_block_would() {
        let mut flags = [false; 100];
        let mut w = Wanted::none(100);
        let mut x = 12345u64;
        for _ in 0..300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = (x >> 33) % 100;
            let len = (x >> 20) % 7;
            w.insert(start..start + len);
            for f in flags.iter_mut().skip(start as usize).take(len as usize) {
                *f = true;
            }
            for i in 0..100u64 {
                assert_eq!(w.contains(i), flags[i as usize], "block {i}");
            }
            for a in (0..100u64).step_by(7) {
                for b in a..(a + 12).min(100) {
                    let r = a as usize..b as usize;
                    assert_eq!(w.any_in(a..b), flags[r.clone()].iter().any(|&f| f), "{a}..{b}");
                    assert_eq!(w.all_in(a..b), flags[r].iter().all(|&f| f), "{a}..{b}");
                }
            }
            let gaps: Vec<u64> = w.gaps().flatten().collect();
            let want: Vec<u64> = (0..100u64).filter(|&i| !flags[i as usize]).collect();
            assert_eq!(gaps, want);
            let pairs: Vec<(u64, u64)> = w.ranges.iter().map(|(&s, &e)| (s, e)).collect();
            assert!(pairs.windows(2).all(|p| p[0].1 < p[1].0), "disjoint and apart: {pairs:?}");
        }
    }

    #[test]
    fn bad_hints_are_errors() {
        assert!(parse_hints("{", 100, 4096).unwrap_err().to_string().contains("not rbd diff JSON"));
        assert!(
            parse_hints(r#"[{"offset":90,"length":20}]"#, 100, 4096)
                .unwrap_err()
                .to_string()
                .contains("past the image")
        );
        assert!(parse_hints(r#"[{"offset":"x","length":20}]"#, 100, 4096).is_err());
    }
}
