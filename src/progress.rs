//! How long operations report progress. The engine calls these hooks; the CLI draws a
//! progress bar on a terminal, log lines otherwise, and sets the process title.

pub trait Progress: Send + Sync {
    /// An operation starts; `total` bytes will be processed.
    fn begin(&self, what: &str, total: u64);
    /// `bytes` more have been processed.
    fn advance(&self, bytes: u64);
    /// A warning that must reach the user (a damaged block, a retried request).
    fn warn(&self, msg: &str);
    fn end(&self);
}

/// Reports nothing (library use, tests).
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn warn(&self, _: &str) {}
    fn end(&self) {}
}
