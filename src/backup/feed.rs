//! Reader threads' side of a backup: windows of the source claimed in order, holes
//! recorded as sparse runs without reading, wanted blocks mapped or read into pooled
//! buffers and handed to the ingest within reach of its frontier.

use crate::error::{Error, Result};
use crate::ingest::Ingest;
use crate::progress::Progress;
use crate::record::Frontier;
use crate::source::{Source, Url};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a reader thread feeds: the ingest, the frontier it keeps within reach of, and
/// the first reader error (which stops every reader).
pub(super) struct Feed<'a> {
    pub(super) ingest: &'a Mutex<Ingest>,
    pub(super) frontier: Option<&'a Frontier>,
    pub(super) read_error: &'a Mutex<Option<Error>>,
}

impl Feed<'_> {
    /// Waits until block `idx` is within reach of the frontier.
    fn wait_for(&self, idx: u64) {
        if let Some(f) = self.frontier {
            f.wait_for(idx, || self.read_error.lock().is_some());
        }
    }

    fn stopped(&self) -> bool {
        self.read_error.lock().is_some()
    }
}

/// The windows of a source that readers claim in order.
pub(super) struct Windows<'a> {
    pub(super) next: &'a AtomicU64,
    pub(super) count: u64,
    pub(super) bytes: u64,
    pub(super) size: u64,
}

/// When window `w` lies wholly in a hole of the source (all of null://), records it and
/// every later window the hole covers wholly, claimed from the other readers at once, as
/// one run of sparse blocks: one SEEK_DATA and one message for a hole of any length, so
/// a 200 TB image of holes is not walked window by window. `false`: window `w` may hold
/// data (or only some of its blocks are wanted), and is read as usual.
#[allow(clippy::too_many_arguments)]
pub(super) fn skip_hole(
    source: &dyn Source,
    url: &Url,
    feed: &Feed,
    windows: &Windows,
    w: u64,
    bs: u32,
    wanted: Option<&crate::hints::Wanted>,
    progress: &dyn Progress,
) -> Result<WindowPlan> {
    if wanted.is_some() {
        return Ok(WindowPlan::Read(None));
    }
    let woff = w * windows.bytes;
    let data = source.next_data(woff).map_err(|e| Error::io(format!("cannot read {url} at byte {woff}"), e))?;
    if data.start < (woff + windows.bytes).min(windows.size) {
        return Ok(WindowPlan::Read(Some(data)));
    }
    // Later windows that end at or before the data (or the image's end) are hole too.
    let last = if data.start >= windows.size { windows.count } else { data.start / windows.bytes };
    let end = if last > w + 1 && windows.next.compare_exchange(w + 1, last, Ordering::AcqRel, Ordering::Acquire).is_ok()
    {
        last
    } else {
        w + 1
    };
    let to = (end * windows.bytes).min(windows.size);
    let bs = bs as u64;
    feed.wait_for(woff / bs);
    feed.ingest.lock().submit_zero_run(woff / bs, (to - woff).div_ceil(bs), to - woff)?;
    progress.advance(to - woff);
    Ok(WindowPlan::Skipped)
}

/// What [`skip_hole`] made of a window: recorded as a hole, or to be read, with the
/// next range that may hold data when it already asked the source.
pub(super) enum WindowPlan {
    Skipped,
    Read(Option<std::ops::Range<u64>>),
}

/// Feeds the blocks of one window of the source into the ingest. `data`: the next
/// range from `woff` that may hold data, if known already.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_window(
    source: &dyn Source,
    url: &Url,
    feed: &Feed,
    woff: u64,
    wlen: u64,
    data: Option<std::ops::Range<u64>>,
    bs: u32,
    wanted: Option<&crate::hints::Wanted>,
    progress: &dyn Progress,
) -> Result<()> {
    let ingest = feed.ingest;
    let bs = bs as u64;
    let first = woff / bs;
    let blocks = wlen.div_ceil(bs);
    let want = |idx: u64| wanted.is_none_or(|w| w.contains(idx));
    if wanted.is_some_and(|w| !w.any_in(first..first + blocks)) {
        feed.wait_for(first);
        ingest.lock().submit_not_read(first, blocks)?;
        progress.advance(wlen);
        return Ok(());
    }
    // Holes (of a sparse file; all of null://) are recorded as sparse without reading:
    // `data` is the next range that may hold data, advanced as the blocks pass its end
    // (with no data left it is `size..size`, which no block passes).
    let next_data =
        |off: u64| source.next_data(off).map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e));
    let mut data = match data {
        Some(d) => d,
        None => next_data(woff)?,
    };
    if data.start >= woff + wlen && wanted.is_none_or(|w| w.all_in(first..first + blocks)) {
        feed.wait_for(first);
        ingest.lock().submit_zero_run(first, blocks, wlen)?;
        progress.advance(wlen);
        return Ok(());
    }
    let window = if data.start >= woff + wlen {
        None
    } else {
        source.window(woff, wlen).transpose().map_err(|e| Error::io(format!("cannot map {url} at byte {woff}"), e))?
    };
    for i in 0..blocks {
        if feed.stopped() {
            return Ok(());
        }
        let off = woff + i * bs;
        let len = (woff + wlen - off).min(bs);
        let idx = first + i;
        feed.wait_for(idx);
        if !want(idx) {
            ingest.lock().submit_not_read(idx, 1)?;
            progress.advance(len);
            continue;
        }
        if data.end <= off {
            data = next_data(off)?;
        }
        if data.start >= off + len {
            ingest.lock().submit_zero(idx, len)?;
        } else if let Some(win) = &window {
            let token = ingest.lock().take_buffer()?;
            ingest.lock().submit_mapped(idx, token, win.clone(), (off - woff) as usize, len as usize)?;
        } else {
            let mut buf = ingest.lock().take_buffer()?;
            buf.resize(len as usize, 0);
            source.read_at(off, &mut buf).map_err(|e| Error::io(format!("cannot read {url} at byte {off}"), e))?;
            source.done_with(off, len);
            ingest.lock().submit(idx, buf)?;
        }
        progress.advance(len);
    }
    Ok(())
}
