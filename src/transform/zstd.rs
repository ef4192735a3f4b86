//! zstd compression of object payloads.

use std::io;

/// Compresses `data` at `level`; `None` if zstd fails (the caller then stores plaintext).
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    ::zstd::bulk::compress(data, level).ok()
}

/// Decompresses a payload whose plaintext is `plain_len` bytes long.
pub fn decompress(payload: &[u8], plain_len: usize) -> io::Result<Vec<u8>> {
    ::zstd::bulk::decompress(payload, plain_len)
}
