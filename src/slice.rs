//! Slices of the id space: how the commands that hold something per distinct block of a
//! storage (cleanup's marks, storage-usage's counts) stay within a memory budget
//! (`cleanup_memory`) whatever the storage holds. Each slice is a pass of its own that
//! keeps only the ids that fall in it; ids are hashes, so slices are even, and a result
//! summed over the slices is the result of one pass.

use crate::block::BlockId;

/// The most slices a pass is cut into, however small its budget.
pub const MAX_SLICES: u64 = 4096;

/// Part `index` of `of` equal parts of the id space: the ids whose short id (the first 8
/// bytes, little-endian), as a fraction of 2^64, falls in the part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub index: u32,
    pub of: u32,
}

impl Slice {
    /// The whole id space: one pass.
    pub const WHOLE: Slice = Slice { index: 0, of: 1 };

    /// The slices of a pass cut into `of` parts.
    pub fn all(of: u32) -> impl Iterator<Item = Slice> {
        let of = of.max(1);
        (0..of).map(move |index| Slice { index, of })
    }

    pub fn holds(&self, short: u64) -> bool {
        ((short as u128 * self.of as u128) >> 64) as u32 == self.index
    }

    pub fn holds_id(&self, id: &BlockId) -> bool {
        self.of == 1 || self.holds(id.short())
    }
}

/// The slices `rows` objects at `per_object` bytes each are cut into within `budget`.
pub fn slices_for(rows: u64, per_object: u64, budget: u64) -> u32 {
    rows.saturating_mul(per_object).div_ceil(budget.max(1)).clamp(1, MAX_SLICES) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slices_share_out_every_id_once() {
        for of in [1u32, 2, 3, 7, 64, 4096] {
            let mut seen = vec![0u64; of as usize];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let edges = [0, 1, u64::MAX / 2, u64::MAX / 2 + 1, u64::MAX - 1, u64::MAX];
            let shorts = (0..20_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                })
                .chain(edges);
            for short in shorts {
                let holders: Vec<Slice> = Slice::all(of).filter(|s| s.holds(short)).collect();
                assert_eq!(holders.len(), 1, "{short:#x} in {of} slices: {holders:?}");
                seen[holders[0].index as usize] += 1;
            }
            // Hashes spread evenly: no slice empty, none more than twice its share (where
            // a share is large enough to tell).
            let share = 20_006 / of as u64;
            assert!(share < 100 || seen.iter().all(|&n| n > share / 2 && n < 2 * share), "{of} slices: {seen:?}");
        }
        assert!(Slice::WHOLE.holds(u64::MAX) && Slice::WHOLE.holds(0));
    }

    #[test]
    fn a_pass_is_sliced_only_past_its_budget() {
        let mib = 1 << 20;
        assert_eq!(slices_for(0, 64, 256 * mib), 1);
        assert_eq!(slices_for(4 * mib, 64, 256 * mib), 1, "4 Mi objects fit 256 MiB");
        assert_eq!(slices_for(4 * mib + 1, 64, 256 * mib), 2);
        assert_eq!(slices_for(48 * mib, 64, 256 * mib), 12, "a 200 TB storage of 4 MiB blocks");
        assert_eq!(slices_for(u64::MAX, 64, 1), MAX_SLICES as u32);
        assert_eq!(slices_for(10, 64, 0), 640);
    }
}
