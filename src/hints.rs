//! Hints: which regions of an image may have changed, in the JSON that
//! `rbd diff --format=json` prints: `[{"offset": .., "length": .., "exists": "true"}]`.
//! Extents are widened to whole blocks. With a base version only hinted blocks are read
//! and the others are taken from the base; without one, hints mark the used regions of
//! an initial backup and unhinted blocks are sparse.

use crate::error::{Error, Result};
use serde::Deserialize;

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
pub fn parse_hints(json: &str, size: u64, block_size: u32) -> Result<Vec<bool>> {
    let extents: Vec<Extent> = serde_json::from_str(json).map_err(|e| {
        Error::Invalid(format!("hints are not rbd diff JSON ([{{\"offset\":..,\"length\":..,\"exists\":..}}]): {e}"))
    })?;
    wanted_blocks(extents.iter().map(|e| (e.offset, e.length)), size, block_size)
}

/// The blocks that changed extents `(offset, length)` touch (from hints, or from librbd
/// for `--diff-from`).
pub fn wanted_blocks(extents: impl IntoIterator<Item = (u64, u64)>, size: u64, block_size: u32) -> Result<Vec<bool>> {
    let bs = block_size as u64;
    let mut wanted = vec![false; size.div_ceil(bs) as usize];
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
        for idx in offset / bs..end.div_ceil(bs) {
            wanted[idx as usize] = true;
        }
    }
    Ok(wanted)
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
        let set: Vec<usize> = w.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i).collect();
        assert_eq!(set, vec![0, 1, 10]);
        assert_eq!(w.len(), 13);
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
