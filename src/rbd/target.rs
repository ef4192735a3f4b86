//! RBD images as restore targets. A new image is created under a temporary name
//! (`IMAGE.keepfs-restore.UID`, with the version's size and the configured features)
//! and renamed into place when every block is written and flushed, so an interrupted
//! restore never leaves a half-written image under the final name; `--continue` finds
//! that image again. An existing image is refused without `--force`, then written in
//! place (resized to the version's size). Writes are asynchronous (`rbd_aio_write2`),
//! at most `[rbd] in_flight` at once, so memory stays bounded.

use super::client::{Aio, Cluster, Image, Pool, feature_bits};
use super::{RbdError, RbdErrorKind, Spec};
use crate::config::RbdConfig;
use crate::restore::RestoreOptions;
use crate::source::BlockTarget;
use crate::version::VersionUid;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

/// A restore target; `existing` tells whether it was an image already (whose zero
/// blocks must be written or discarded) rather than a fresh one (which reads as zeros).
pub struct Opened {
    pub target: Box<dyn BlockTarget>,
    pub existing: bool,
}

/// The temporary name a restore of `uid` into `image` writes before renaming it.
pub fn partial_name(image: &str, uid: VersionUid) -> String {
    format!("{image}.keepfs-restore.{uid}")
}

/// The image `spec` names, opened read-only or for writing, or `None` when it does not exist.
fn open_if_any(pool: &Arc<Pool>, spec: &Spec, read_only: bool) -> Result<Option<Image>, RbdError> {
    match Image::open(pool, spec, read_only) {
        Ok(image) => Ok(Some(image)),
        Err(e) if e.kind == RbdErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens (or creates) the image a restore of version `uid` (`size` bytes) writes.
pub fn open_target(
    spec: &Spec,
    uid: VersionUid,
    size: u64,
    opts: &RestoreOptions,
    cfg: &RbdConfig,
) -> Result<Opened, RbdError> {
    if let Some(s) = &spec.snap {
        return Err(RbdError::new(
            RbdErrorKind::Invalid,
            format!(
                "cannot restore into snapshot '{s}' of {}: name the image, rbd:{}",
                spec.image_path(),
                spec.image_path()
            ),
        ));
    }
    let features = feature_bits(&cfg.features)?;
    let cluster = Cluster::connect(cfg)?;
    let pool = cluster.pool(&spec.pool, &spec.namespace)?;
    let partial = Spec { image: partial_name(&spec.image, uid), ..spec.clone() };
    let in_flight = cfg.in_flight.max(1);
    // Each image is opened once: for writing where it will be written, read-only where
    // its existence only decides a refusal (a client with read-only caps still gets it).
    if opts.force || opts.resume {
        if let Some(mut image) = open_if_any(&pool, spec, false)? {
            if image.size != size {
                image.resize(size)?;
            }
            return Ok(Opened { target: Box::new(RbdTarget::new(image, in_flight, None)), existing: true });
        }
    } else if open_if_any(&pool, spec, true)?.is_some() {
        return Err(RbdError::new(
            RbdErrorKind::Exists,
            format!("restore target {spec} exists (RBD image); pass --force to overwrite it"),
        ));
    }
    if opts.resume {
        let Some(image) = open_if_any(&pool, &partial, false)? else {
            return Err(RbdError::new(
                RbdErrorKind::Invalid,
                format!(
                    "there is no interrupted restore of {uid} to {spec} to continue (no image {}); restore without --continue",
                    partial.image_path()
                ),
            ));
        };
        if image.size != size {
            return Err(RbdError::new(
                RbdErrorKind::Invalid,
                format!(
                    "{} holds {} bytes, version {uid} {size}: it is not a restore of {uid}; restore without --continue",
                    partial.image_path(),
                    image.size
                ),
            ));
        }
        let rename = Some((partial.image.clone(), spec.image.clone()));
        return Ok(Opened { target: Box::new(RbdTarget::new(image, in_flight, rename)), existing: false });
    }
    // A partial image of an earlier attempt is started over, like a partial file.
    pool.remove(&partial.image)?;
    pool.create(&partial.image, size, features)?;
    let image = Image::open(&pool, &partial, false)?;
    let rename = Some((partial.image.clone(), spec.image.clone()));
    Ok(Opened { target: Box::new(RbdTarget::new(image, in_flight, rename)), existing: false })
}

pub struct RbdTarget {
    image: Arc<Image>,
    /// Writes and discards in flight, oldest first.
    pending: Mutex<VecDeque<Aio>>,
    in_flight: usize,
    /// (temporary name, final name) in the image's pool.
    rename: Option<(String, String)>,
}

impl RbdTarget {
    fn new(image: Image, in_flight: usize, rename: Option<(String, String)>) -> RbdTarget {
        RbdTarget { image: Arc::new(image), pending: Mutex::new(VecDeque::new()), in_flight, rename }
    }

    /// Queues `op`, then waits for the oldest operations while more than `in_flight`
    /// are pending (outside the lock).
    fn queue(&self, op: Aio) -> io::Result<()> {
        self.pending.lock().push_back(op);
        loop {
            let oldest = {
                let mut p = self.pending.lock();
                if p.len() <= self.in_flight {
                    return Ok(());
                }
                p.pop_front()
            };
            if let Some(op) = oldest {
                wait(op)?;
            }
        }
    }
}

fn wait(op: Aio) -> io::Result<()> {
    let (off, len) = (op.off, op.len);
    op.wait().map_err(|e| io::Error::new(e.kind(), format!("bytes {off}..{}: {e}", off + len)))
}

impl BlockTarget for RbdTarget {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let op = self.image.aio_write(offset, data.to_vec())?;
        self.queue(op)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let op = self.image.aio_discard(offset, len)?;
        self.queue(op)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(offset, buf)
    }

    fn settle(&self) -> io::Result<()> {
        let mut first_error = None;
        loop {
            let Some(op) = self.pending.lock().pop_front() else { break };
            if let Err(e) = wait(op) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn finish(self: Box<Self>) -> crate::error::Result<()> {
        let what = self.image.spec.to_string();
        self.settle().map_err(|e| crate::error::Error::io(format!("cannot write {what}"), e))?;
        self.image.flush().map_err(|e| crate::error::Error::io(format!("cannot flush {what}"), e))?;
        let RbdTarget { image, pending, rename, .. } = *self;
        drop(pending);
        let pool = image.pool().clone();
        // The image is closed before it is renamed.
        drop(image);
        if let Some((from, to)) = rename {
            pool.rename(&from, &to)?;
        }
        Ok(())
    }
}
