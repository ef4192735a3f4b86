//! zstd compression of object payloads.

use std::io;

/// Compresses `data` at `level`; `None` if zstd fails (the caller then stores plaintext).
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    ::zstd::bulk::compress(data, level).ok()
}

/// Decompresses a payload into `out`, which must be large enough; returns the length.
pub fn decompress_into(payload: &[u8], out: &mut [u8]) -> io::Result<usize> {
    ::zstd::bulk::decompress_to_buffer(payload, out)
}
