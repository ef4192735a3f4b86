//! Ceph RBD images as backup sources and restore targets, and the nightly snapshot
//! routine (`keepfs rbd-backup`). This module owns the image spec
//! (`rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]`, backy2's `rbd://POOL/IMAGE@SNAP`), the RBD
//! layer's error type, and, with cargo feature `rbd`, the librbd client: the FFI
//! ([`ffi`]), connections and images ([`client`]), the backup source
//! ([`crate::source::rbd`]), the restore target ([`target`]) and the routine
//! ([`routine`]). Without the feature every entry point answers one clear error, so the
//! default build needs no Ceph libraries.

#[cfg(feature = "rbd")]
pub mod client;
#[cfg(feature = "rbd")]
pub mod ffi;
#[cfg(feature = "rbd")]
pub mod routine;
#[cfg(feature = "rbd")]
pub mod target;

use std::fmt;

/// An RBD image (or one of its snapshots) in a pool and namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub pool: String,
    /// "" is the pool's default namespace.
    pub namespace: String,
    pub image: String,
    pub snap: Option<String>,
}

impl Spec {
    /// Parses what follows `rbd:` (Benji) or `rbd://` (backy2): `POOL[/NAMESPACE]/IMAGE[@SNAP]`.
    pub fn parse(body: &str, whole: &str) -> Result<Spec, String> {
        let form = "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]";
        let (path, snap) = match body.split_once('@') {
            Some((p, "")) => {
                return Err(format!("'{whole}' names an empty snapshot after '@' (use {form}, e.g. rbd:{p}@snap1)"));
            }
            Some((p, s)) => (p, Some(s.to_string())),
            None => (body, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || !(2..=3).contains(&parts.len()) {
            return Err(format!("'{whole}' is not an RBD image: use {form}"));
        }
        if [path, snap.as_deref().unwrap_or("")].iter().any(|p| p.chars().any(char::is_control)) {
            return Err(format!("'{whole}' holds control characters"));
        }
        let (pool, namespace, image) = match parts[..] {
            [pool, image] => (pool, "", image),
            [pool, ns, image] => (pool, ns, image),
            _ => unreachable!("length checked above"),
        };
        Ok(Spec { pool: pool.into(), namespace: namespace.into(), image: image.into(), snap })
    }

    /// `POOL[/NAMESPACE]/IMAGE`, as the rbd CLI names it.
    pub fn image_path(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.pool, self.image)
        } else {
            format!("{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }

    /// The same image without a snapshot.
    pub fn head(&self) -> Spec {
        Spec { snap: None, ..self.clone() }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}", self.image_path())?;
        if let Some(s) = &self.snap {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// What went wrong talking to Ceph; [`crate::error::Error::exit_code`] maps the kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RbdErrorKind {
    /// A pool, namespace, image or snapshot that does not exist (exit 2).
    NotFound,
    /// The cluster refused our credentials, or the configuration is unusable (exit 2).
    Config,
    /// A request that cannot work as given (exit 2).
    Invalid,
    /// An image that exists where keepfs would create one (exit 4).
    Exists,
    /// This keepfs was built without the `rbd` feature (exit 2).
    Unsupported,
    /// The cluster could not be reached in time, or an operation failed (exit 1).
    Failed,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RbdError {
    pub kind: RbdErrorKind,
    pub message: String,
}

impl RbdError {
    pub fn new(kind: RbdErrorKind, message: impl Into<String>) -> RbdError {
        RbdError { kind, message: message.into() }
    }
    pub fn unsupported() -> RbdError {
        RbdError::new(
            RbdErrorKind::Unsupported,
            "this keepfs was built without Ceph RBD support: build it with `cargo build --release --features rbd` \
             (needs librbd-dev and librados-dev)",
        )
    }
}

/// Opens an RBD image (a snapshot when the spec names one) as a backup source.
#[cfg(not(feature = "rbd"))]
pub fn open_source(_spec: &Spec, _cfg: &crate::config::RbdConfig) -> Result<Box<dyn crate::source::Source>, RbdError> {
    Err(RbdError::unsupported())
}

#[cfg(feature = "rbd")]
pub use crate::source::rbd::open_source;
#[cfg(feature = "rbd")]
pub use routine::{backup_image, images_of, parse_image};

/// Options of `keepfs rbd-backup` (see [`routine`] with feature `rbd`).
#[derive(Clone, Debug)]
pub struct RoutineOptions {
    /// Snapshots this routine owns start with it (default `b-`).
    pub prefix: String,
    /// Prefixed snapshots kept after a successful backup (at least 1: the new one).
    pub keep_snapshots: usize,
    /// Storage to write to (default: default_storage; a differential backup goes where its base is).
    pub storage: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

#[cfg(not(feature = "rbd"))]
mod routine_stub {
    use super::{RbdError, RoutineOptions, Spec};
    use crate::error::{Error, Result};

    /// What a run did; never made without feature `rbd`.
    pub struct Outcome {
        pub version: crate::version::Version,
        pub snapshot: String,
        pub from: Option<(String, crate::version::VersionUid)>,
        pub removed_snapshots: Vec<String>,
        pub warnings: Vec<String>,
    }
    pub fn backup_image(
        _: &crate::Repository,
        _: &Spec,
        _: &RoutineOptions,
        _: &dyn crate::progress::Progress,
    ) -> Result<Outcome> {
        Err(RbdError::unsupported().into())
    }
    pub fn images_of(_: &str, _: &crate::Repository) -> Result<Vec<Spec>> {
        Err(RbdError::unsupported().into())
    }
    pub fn parse_image(_: &str) -> Result<Spec> {
        Err(Error::from(RbdError::unsupported()))
    }
}
#[cfg(not(feature = "rbd"))]
pub use routine_stub::{backup_image, images_of, parse_image};

/// Opens (or creates) the RBD image a restore of version `uid` of `size` bytes writes;
/// with it, whether it existed already (and so may hold data where the version has zeros).
pub fn open_target(
    spec: &Spec,
    uid: crate::version::VersionUid,
    size: u64,
    opts: &crate::restore::RestoreOptions,
    cfg: &crate::config::RbdConfig,
) -> Result<(Box<dyn crate::source::BlockTarget>, bool), RbdError> {
    #[cfg(feature = "rbd")]
    {
        target::open_target(spec, uid, size, opts, cfg).map(|o| (o.target, o.existing))
    }
    #[cfg(not(feature = "rbd"))]
    {
        let _ = (spec, uid, size, opts, cfg);
        Err(RbdError::unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = Spec::parse("pool/vm1@b-1", "rbd:pool/vm1@b-1").unwrap();
        assert_eq!((s.pool.as_str(), s.namespace.as_str(), s.image.as_str()), ("pool", "", "vm1"));
        assert_eq!(s.snap.as_deref(), Some("b-1"));
        assert_eq!(s.to_string(), "rbd:pool/vm1@b-1");
        let s = Spec::parse("pool/ns/vm1", "x").unwrap();
        assert_eq!((s.namespace.as_str(), s.snap.as_ref()), ("ns", None));
        assert_eq!(s.image_path(), "pool/ns/vm1");
        for bad in ["pool", "pool/", "/img", "a/b/c/d", "pool/img@", "pool//img"] {
            assert!(Spec::parse(bad, bad).is_err(), "{bad}");
        }
    }
}
