//! Progress on stderr and in the process title while a long command runs.

use keepfs::progress::Progress;
use keepfs::units::format_size;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::title;

/// Progress on stderr: a bar on a terminal, a line every 10 s otherwise, and the
/// progress in the process title (`ps axfu`: `keepfs [backing up vm1 43% 850 MB/s ETA 2m]`,
/// see `title`) either way.
pub(crate) struct CliProgress {
    bar: Option<indicatif::ProgressBar>,
    /// What the title calls the work ("backing up vm1").
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    /// Start, last progress line (no bar), last title update, and what is in progress.
    started: parking_lot::Mutex<(Instant, Instant, Instant, String)>,
}

impl CliProgress {
    fn new(label: String) -> CliProgress {
        CliProgress {
            bar: None,
            label,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: parking_lot::Mutex::new((Instant::now(), Instant::now(), Instant::now(), String::new())),
        }
    }
}

impl Progress for CliProgress {
    fn begin(&self, what: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        *self.started.lock() = (Instant::now(), Instant::now(), Instant::now(), what.to_string());
        title::set(&title::progress_title(&self.label, 0, total, 0.0));
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(0);
            bar.set_message(what.to_string());
        }
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total = self.total.load(Ordering::Relaxed).max(1);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        // The title at most once a second (and at the end); without a bar, a progress
        // line every 10 seconds.
        let mut s = self.started.lock();
        if s.2.elapsed().as_millis() >= 1000 || done >= total {
            let secs = s.0.elapsed().as_secs_f64().max(0.001);
            title::set(&title::progress_title(&self.label, done, total, secs));
            s.2 = Instant::now();
            if self.bar.is_none() && s.1.elapsed().as_secs() >= 10 {
                note!(
                    "{}: {}% ({} of {}, {:.0} MB/s)",
                    s.3,
                    done * 100 / total,
                    format_size(done),
                    format_size(total),
                    done as f64 / secs / 1e6
                );
                s.1 = Instant::now();
            }
        }
    }
    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("keepfs: warning: {msg}")),
            None => note!("keepfs: warning: {msg}"),
        }
    }
    fn end(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        title::reset();
    }
}

/// The progress of a long operation; `label` names it in the process title.
pub(crate) fn progress(label: impl Into<String>) -> CliProgress {
    let mut p = CliProgress::new(label.into());
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        p.bar = Some(bar);
    }
    p
}
