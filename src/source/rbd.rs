//! Ceph RBD images (or snapshots) as backup sources, read through librbd. The allocation
//! map (a diff against nothing, per object) is asked once at open, so that an initial
//! backup never reads unallocated regions; `--diff-from SNAP` asks librbd for the extents
//! changed since a snapshot ([`Source::changed_since`]). Reads may run from several
//! threads at once on the one image handle ([`Source::parallel_reads`]).

use super::Source;
use crate::config::RbdConfig;
use crate::rbd::client::{Cluster, Image};
use crate::rbd::{RbdError, Spec};
use std::io;
use std::ops::Range;

pub struct RbdSource {
    image: Image,
    /// Allocated regions, sorted and merged.
    allocated: Vec<Range<u64>>,
    readers: usize,
}

/// Opens `spec` read-only (its snapshot, when it names one) and reads its allocation map.
pub fn open_source(spec: &Spec, cfg: &RbdConfig) -> Result<Box<dyn Source>, RbdError> {
    let cluster = Cluster::connect(cfg)?;
    let pool = cluster.pool(&spec.pool, &spec.namespace)?;
    let image = Image::open(&pool, spec, true)?;
    let mut allocated: Vec<Range<u64>> = Vec::new();
    for (off, len, exists) in image.diff(None, true)? {
        if !exists || len == 0 {
            continue;
        }
        let end = (off + len).min(image.size);
        match allocated.last_mut() {
            Some(last) if last.end >= off => last.end = last.end.max(end),
            _ => allocated.push(off..end),
        }
    }
    Ok(Box::new(RbdSource { image, allocated, readers: cfg.in_flight.max(1) }))
}

impl Source for RbdSource {
    fn size(&self) -> u64 {
        self.image.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(offset, buf)
    }

    fn next_data(&self, offset: u64) -> io::Result<Range<u64>> {
        let i = self.allocated.partition_point(|r| r.end <= offset);
        Ok(match self.allocated.get(i) {
            Some(r) => r.start.max(offset)..r.end,
            None => self.size()..self.size(),
        })
    }

    fn changed_since(&self, snap: &str, whole_object: bool) -> crate::error::Result<Vec<(u64, u64)>> {
        Ok(self.image.diff(Some(snap), whole_object)?.into_iter().map(|(o, l, _)| (o, l)).collect())
    }

    fn parallel_reads(&self) -> usize {
        self.readers
    }
}
