//! Transforms applied to block payloads between the engine and the storage. Compression
//! today; encryption (AES-256-GCM envelopes) gets its own module here.

pub mod zstd;
