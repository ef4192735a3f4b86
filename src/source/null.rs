//! `null://SIZE`: an image of zeros, for throughput and memory tests (backy2's null source).

use super::Source;
use std::io;
use std::ops::Range;

pub struct NullSource {
    size: u64,
}

impl NullSource {
    pub fn new(size: u64) -> NullSource {
        NullSource { size }
    }
}

impl Source for NullSource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn next_data(&self, _offset: u64) -> io::Result<Range<u64>> {
        Ok(self.size..self.size)
    }
}
