//! Safe wrappers over librados/librbd: a connection ([`Cluster`], with timeouts so that
//! an unreachable cluster is an error, never a hang), a pool's I/O context ([`Pool`]),
//! an open image ([`Image`]: size, reads, diffs, snapshots, asynchronous writes). Every
//! failure becomes an [`RbdError`] or an `io::Error` carrying librbd's errno.

use super::ffi::*;
use super::{RbdError, RbdErrorKind, Spec};
use crate::config::RbdConfig;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::ptr;
use std::sync::Arc;

fn errstr(r: c_int) -> String {
    io::Error::from_raw_os_error(-r).to_string()
}

fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::new(RbdErrorKind::Invalid, format!("{what} '{s}' holds a NUL byte")))
}

fn failed(msg: String) -> RbdError {
    RbdError::new(RbdErrorKind::Failed, msg)
}

/// A connection to a Ceph cluster.
pub struct Cluster {
    h: rados_t,
    /// `client.ID of /etc/ceph/ceph.conf`, for messages.
    pub desc: String,
}

// SAFETY: librados handles are thread-safe (the C API is used from many threads).
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: a handle from rados_create, shut down once.
        unsafe { rados_shutdown(self.h) }
    }
}

impl Cluster {
    /// Connects as the configured client, with `cfg.timeout` for the monitors (connect
    /// included) and the OSDs.
    pub fn connect(cfg: &RbdConfig) -> Result<Arc<Cluster>, RbdError> {
        let id = cfg.client_id.as_deref().unwrap_or("admin");
        let id = id.strip_prefix("client.").unwrap_or(id);
        let conf_desc = match &cfg.conf {
            Some(p) => p.display().to_string(),
            None => std::env::var("CEPH_CONF").unwrap_or_else(|_| "/etc/ceph/ceph.conf".into()),
        };
        let id_c = cstring("client id", id)?;
        let mut h: rados_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; id is a valid C string.
        let r = unsafe { rados_create(&mut h, id_c.as_ptr()) };
        if r < 0 {
            return Err(failed(format!("cannot create a Ceph client: {}", errstr(r))));
        }
        let cluster = Cluster { h, desc: format!("client.{id} of {conf_desc}") };
        let conf_c = cfg.conf.as_ref().map(|p| cstring("ceph.conf path", &p.to_string_lossy())).transpose()?;
        // SAFETY: valid handle; NULL means $CEPH_CONF or the default search path.
        let r = unsafe { rados_conf_read_file(h, conf_c.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        if r < 0 {
            return Err(RbdError::new(
                RbdErrorKind::Config,
                format!(
                    "cannot read the Ceph configuration {conf_desc}: {} (set CEPH_CONF or `conf` in [rbd] of the keepfs configuration)",
                    errstr(r)
                ),
            ));
        }
        let timeout = cfg.timeout_secs.max(1).to_string();
        let mut settings = vec![
            ("client_mount_timeout", timeout.clone()),
            ("rados_mon_op_timeout", timeout.clone()),
            ("rados_osd_op_timeout", timeout.clone()),
        ];
        if let Some(k) = &cfg.keyring {
            settings.push(("keyring", k.to_string_lossy().into_owned()));
        }
        for (k, v) in settings {
            let (kc, vc) = (cstring("option", k)?, cstring(k, &v)?);
            // SAFETY: valid handle and C strings.
            let r = unsafe { rados_conf_set(h, kc.as_ptr(), vc.as_ptr()) };
            if r < 0 {
                return Err(RbdError::new(RbdErrorKind::Config, format!("Ceph option {k} = {v}: {}", errstr(r))));
            }
        }
        // SAFETY: valid, configured handle; returns within client_mount_timeout.
        let r = unsafe { rados_connect(h) };
        if r < 0 {
            let desc = &cluster.desc;
            return Err(match -r {
                libc::ETIMEDOUT => failed(format!(
                    "cannot reach the Ceph cluster ({desc}) within {timeout} s: are its monitors up and reachable? (`timeout` in [rbd])"
                )),
                libc::EACCES | libc::EPERM => RbdError::new(
                    RbdErrorKind::Config,
                    format!(
                        "the Ceph cluster refused {desc} ({}): check `client_id` and `keyring` in [rbd] of the keepfs configuration",
                        errstr(r)
                    ),
                ),
                libc::ENOENT => RbdError::new(
                    RbdErrorKind::Config,
                    format!(
                        "cannot connect as {desc}: {} (no keyring for this client? set `keyring` in [rbd])",
                        errstr(r)
                    ),
                ),
                _ => failed(format!("cannot connect to the Ceph cluster ({desc}): {}", errstr(r))),
            });
        }
        Ok(Arc::new(cluster))
    }

    /// Opens `pool` (and `namespace`, "" for the default one).
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: &str) -> Result<Arc<Pool>, RbdError> {
        let pool_c = cstring("pool", pool)?;
        let ns_c = cstring("namespace", namespace)?;
        let mut io: rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, out-pointer to a local.
        let r = unsafe { rados_ioctx_create(self.h, pool_c.as_ptr(), &mut io) };
        if r < 0 {
            return Err(if r == -libc::ENOENT {
                RbdError::new(
                    RbdErrorKind::NotFound,
                    format!("Ceph pool '{pool}' does not exist (`ceph osd pool ls` lists the pools)"),
                )
            } else {
                failed(format!("cannot open Ceph pool '{pool}': {}", errstr(r)))
            });
        }
        // SAFETY: valid I/O context and C string.
        unsafe { rados_ioctx_set_namespace(io, ns_c.as_ptr()) };
        let label = if namespace.is_empty() { pool.to_string() } else { format!("{pool}/{namespace}") };
        Ok(Arc::new(Pool { io, label, _cluster: self.clone() }))
    }
}

/// A pool (and namespace) of a connected cluster.
pub struct Pool {
    io: rados_ioctx_t,
    /// `POOL[/NAMESPACE]`.
    pub label: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: an I/O context may be used from several threads (librados is thread-safe).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed once, before the cluster (held).
        unsafe { rados_ioctx_destroy(self.io) }
    }
}

impl Pool {
    /// The names of the pool's images, sorted.
    pub fn images(&self) -> Result<Vec<String>, RbdError> {
        let mut size = 4096usize;
        loop {
            let mut buf = vec![0u8; size];
            // SAFETY: buf holds `size` bytes; librbd writes at most that and says how many it needs.
            let r = unsafe { rbd_list(self.io, buf.as_mut_ptr() as *mut c_char, &mut size) };
            if r == -libc::ERANGE {
                continue;
            }
            if r < 0 {
                return Err(failed(format!("cannot list the images of pool {}: {}", self.label, errstr(r))));
            }
            buf.truncate(size.min(buf.len()));
            let mut names: Vec<String> = buf
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            names.sort();
            return Ok(names);
        }
    }

    /// Creates an image of `size` bytes with `features` (librbd's bits).
    pub fn create(&self, name: &str, size: u64, features: u64) -> Result<(), RbdError> {
        let c = cstring("image", name)?;
        let mut order: c_int = 0;
        // SAFETY: valid context, C string, out-pointer to a local.
        let r = unsafe { rbd_create2(self.io, c.as_ptr(), size, features, &mut order) };
        match r {
            0 => Ok(()),
            r if r == -libc::EEXIST => {
                Err(RbdError::new(RbdErrorKind::Exists, format!("RBD image {}/{name} exists", self.label)))
            }
            r => Err(failed(format!("cannot create RBD image {}/{name}: {}", self.label, errstr(r)))),
        }
    }

    pub fn remove(&self, name: &str) -> Result<(), RbdError> {
        let c = cstring("image", name)?;
        // SAFETY: valid context and C string.
        let r = unsafe { rbd_remove(self.io, c.as_ptr()) };
        if r < 0 && r != -libc::ENOENT {
            return Err(failed(format!("cannot remove RBD image {}/{name}: {}", self.label, errstr(r))));
        }
        Ok(())
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<(), RbdError> {
        let (f, t) = (cstring("image", from)?, cstring("image", to)?);
        // SAFETY: valid context and C strings.
        let r = unsafe { rbd_rename(self.io, f.as_ptr(), t.as_ptr()) };
        if r < 0 {
            return Err(failed(format!("cannot rename RBD image {}/{from} to {to}: {}", self.label, errstr(r))));
        }
        Ok(())
    }
}

/// A snapshot of an image.
#[derive(Clone, Debug)]
pub struct SnapInfo {
    /// Increases with every snapshot created: the newest has the highest.
    pub id: u64,
    pub size: u64,
    pub name: String,
}

/// An open image, or a snapshot of one (read-only).
pub struct Image {
    img: rbd_image_t,
    pub spec: Spec,
    pub size: u64,
    pool: Arc<Pool>,
}

// SAFETY: librbd image handles may be used from several threads at once.
unsafe impl Send for Image {}
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed once; all asynchronous I/O was waited for
        // (an [`Aio`] holds its image).
        unsafe { rbd_close(self.img) };
    }
}

extern "C" fn collect_extent(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the Vec that Image::diff passes, alive for the call.
    let v = unsafe { &mut *(arg as *mut Vec<(u64, u64, bool)>) };
    v.push((off, len as u64, exists != 0));
    0
}

impl Image {
    /// Opens `spec` (its snapshot when it names one) in `pool`; read-only opens take no lock.
    pub fn open(pool: &Arc<Pool>, spec: &Spec, read_only: bool) -> Result<Image, RbdError> {
        let name = cstring("image", &spec.image)?;
        let snap = spec.snap.as_deref().map(|s| cstring("snapshot", s)).transpose()?;
        let mut img: rbd_image_t = ptr::null_mut();
        let snap_p = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        // SAFETY: valid context, C strings, out-pointer to a local.
        let r = unsafe {
            if read_only {
                rbd_open_read_only(pool.io, name.as_ptr(), &mut img, snap_p)
            } else {
                rbd_open(pool.io, name.as_ptr(), &mut img, snap_p)
            }
        };
        if r == -libc::ENOENT {
            let msg = match &spec.snap {
                Some(s) if Image::open(pool, &spec.head(), true).is_ok() => format!(
                    "snapshot '{s}' of RBD image {} does not exist (`rbd snap ls {}` lists them)",
                    spec.image_path(),
                    spec.image_path()
                ),
                _ => {
                    format!("RBD image {} does not exist (`rbd ls {}` lists the images)", spec.image_path(), pool.label)
                }
            };
            return Err(RbdError::new(RbdErrorKind::NotFound, msg));
        }
        if r < 0 {
            return Err(failed(format!("cannot open {spec}: {}", errstr(r))));
        }
        let mut image = Image { img, spec: spec.clone(), size: 0, pool: pool.clone() };
        let mut size = 0u64;
        // SAFETY: open image, out-pointer to a local.
        let r = unsafe { rbd_get_size(image.img, &mut size) };
        if r < 0 {
            return Err(failed(format!("cannot get the size of {spec}: {}", errstr(r))));
        }
        image.size = size;
        Ok(image)
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Fills `buf` from `off` (inside the image).
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is writable for its length.
            let n = unsafe { rbd_read2(self.img, off + done as u64, rest.len(), rest.as_mut_ptr() as *mut c_char, 0) };
            if n < 0 {
                return Err(io::Error::from_raw_os_error(-n as i32));
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the image"));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// The extents `(offset, length, exists)` that changed since snapshot `from` (with
    /// `None`: every allocated extent). `whole_object` widens them to whole objects
    /// (fast with the fast-diff feature).
    pub fn diff(&self, from: Option<&str>, whole_object: bool) -> Result<Vec<(u64, u64, bool)>, RbdError> {
        let from_c = from.map(|s| cstring("snapshot", s)).transpose()?;
        let mut extents: Vec<(u64, u64, bool)> = Vec::new();
        // SAFETY: open image; the callback only pushes into `extents`, which outlives the call.
        let r = unsafe {
            rbd_diff_iterate2(
                self.img,
                from_c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
                0,
                self.size,
                1,
                whole_object as u8,
                collect_extent,
                &mut extents as *mut _ as *mut c_void,
            )
        };
        if r == -libc::ENOENT
            && let Some(f) = from
        {
            return Err(RbdError::new(
                RbdErrorKind::NotFound,
                format!(
                    "snapshot '{f}' of RBD image {} does not exist (`rbd snap ls {}` lists them)",
                    self.spec.image_path(),
                    self.spec.image_path()
                ),
            ));
        }
        if r < 0 {
            return Err(failed(format!(
                "cannot ask librbd what changed in {} since {}: {}",
                self.spec,
                from.unwrap_or("its creation"),
                errstr(r)
            )));
        }
        extents.sort_unstable();
        Ok(extents)
    }

    /// The image's snapshots, oldest first.
    pub fn snaps(&self) -> Result<Vec<SnapInfo>, RbdError> {
        let mut max: c_int = 16;
        loop {
            let mut infos: Vec<rbd_snap_info_t> =
                (0..max).map(|_| rbd_snap_info_t { id: 0, size: 0, name: ptr::null() }).collect();
            // SAFETY: `infos` holds `max` entries; librbd fills them or asks for more.
            let r = unsafe { rbd_snap_list(self.img, infos.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            if r < 0 {
                return Err(failed(format!("cannot list the snapshots of {}: {}", self.spec.image_path(), errstr(r))));
            }
            let mut out: Vec<SnapInfo> = infos[..r as usize]
                .iter()
                .map(|i| SnapInfo {
                    id: i.id,
                    size: i.size,
                    // SAFETY: names filled by librbd, valid until rbd_snap_list_end.
                    name: unsafe { CStr::from_ptr(i.name) }.to_string_lossy().into_owned(),
                })
                .collect();
            // SAFETY: frees the names librbd allocated in `infos`.
            unsafe { rbd_snap_list_end(infos.as_mut_ptr()) };
            out.sort_by_key(|s| s.id);
            return Ok(out);
        }
    }

    pub fn snap_create(&self, name: &str) -> Result<(), RbdError> {
        let c = cstring("snapshot", name)?;
        // SAFETY: open image, C string.
        let r = unsafe { rbd_snap_create(self.img, c.as_ptr()) };
        if r < 0 {
            return Err(failed(format!("cannot create snapshot {}@{name}: {}", self.spec.image_path(), errstr(r))));
        }
        Ok(())
    }

    /// Removes an unprotected snapshot; a protected one is refused (kept).
    pub fn snap_remove(&self, name: &str) -> Result<(), RbdError> {
        let c = cstring("snapshot", name)?;
        let mut protected: c_int = 0;
        // SAFETY: open image, C string, out-pointer to a local.
        let r = unsafe { rbd_snap_is_protected(self.img, c.as_ptr(), &mut protected) };
        if r == 0 && protected != 0 {
            return Err(RbdError::new(
                RbdErrorKind::Exists,
                format!("snapshot {}@{name} is protected; it is kept", self.spec.image_path()),
            ));
        }
        // SAFETY: as above.
        let r = unsafe { rbd_snap_remove(self.img, c.as_ptr()) };
        if r < 0 {
            return Err(failed(format!("cannot remove snapshot {}@{name}: {}", self.spec.image_path(), errstr(r))));
        }
        Ok(())
    }

    pub fn resize(&mut self, size: u64) -> Result<(), RbdError> {
        // SAFETY: open image.
        let r = unsafe { rbd_resize(self.img, size) };
        if r < 0 {
            return Err(failed(format!("cannot resize {} to {size} bytes: {}", self.spec, errstr(r))));
        }
        self.size = size;
        Ok(())
    }

    /// Starts writing `buf` at `off`; the returned [`Aio`] owns the buffer until done.
    pub fn aio_write(self: &Arc<Self>, off: u64, buf: Vec<u8>) -> io::Result<Aio> {
        let c = Aio::completion()?;
        // SAFETY: `buf` lives in the returned Aio until the write completed.
        let r = unsafe { rbd_aio_write2(self.img, off, buf.len(), buf.as_ptr() as *const c_char, c, 0) };
        let len = buf.len() as u64;
        Aio::started(c, r, Some(buf), off, len, self)
    }

    /// Starts discarding `len` bytes at `off` (they read as zeros afterwards).
    pub fn aio_discard(self: &Arc<Self>, off: u64, len: u64) -> io::Result<Aio> {
        let c = Aio::completion()?;
        // SAFETY: open image and a fresh completion.
        let r = unsafe { rbd_aio_discard(self.img, off, len, c) };
        Aio::started(c, r, None, off, len, self)
    }

    /// Makes the written data durable.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: open image.
        let r = unsafe { rbd_flush(self.img) };
        if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(()) }
    }
}

/// One asynchronous write or discard in flight on an image.
pub struct Aio {
    c: rbd_completion_t,
    _buf: Option<Vec<u8>>,
    pub off: u64,
    pub len: u64,
    waited: bool,
    _image: Arc<Image>,
}

// SAFETY: a completion may be waited for from any thread.
unsafe impl Send for Aio {}

impl Aio {
    fn completion() -> io::Result<rbd_completion_t> {
        let mut c: rbd_completion_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; no callback.
        let r = unsafe { rbd_aio_create_completion(ptr::null_mut(), None, &mut c) };
        if r < 0 { Err(io::Error::from_raw_os_error(-r)) } else { Ok(c) }
    }

    fn started(
        c: rbd_completion_t,
        r: c_int,
        buf: Option<Vec<u8>>,
        off: u64,
        len: u64,
        image: &Arc<Image>,
    ) -> io::Result<Aio> {
        if r < 0 {
            // SAFETY: never submitted, so nobody else holds it.
            unsafe { rbd_aio_release(c) };
            return Err(io::Error::from_raw_os_error(-r));
        }
        Ok(Aio { c, _buf: buf, off, len, waited: false, _image: image.clone() })
    }

    /// Waits until the operation is done and returns its result.
    pub fn wait(mut self) -> io::Result<()> {
        self.waited = true;
        // SAFETY: a submitted completion, released exactly once here.
        let r = unsafe {
            rbd_aio_wait_for_complete(self.c);
            let r = rbd_aio_get_return_value(self.c);
            rbd_aio_release(self.c);
            r
        };
        if r < 0 { Err(io::Error::from_raw_os_error(-r as i32)) } else { Ok(()) }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        if !self.waited {
            // The buffer must outlive the write: wait before it is freed.
            // SAFETY: as in wait().
            unsafe {
                rbd_aio_wait_for_complete(self.c);
                rbd_aio_release(self.c);
            }
        }
    }
}

/// librbd's feature bits for feature names (`layering,exclusive-lock,...`).
pub fn feature_bits(names: &[String]) -> Result<u64, RbdError> {
    let mut bits = 0;
    for n in names {
        bits |= match n.trim() {
            "layering" => 1,
            "striping" => 2,
            "exclusive-lock" => 4,
            "object-map" => 8,
            "fast-diff" => 16,
            "deep-flatten" => 32,
            "journaling" => 64,
            "data-pool" => 128,
            other => {
                return Err(RbdError::new(
                    RbdErrorKind::Config,
                    format!(
                        "unknown RBD image feature '{other}' in [rbd] features (known: layering, striping, exclusive-lock, object-map, fast-diff, deep-flatten, journaling, data-pool)"
                    ),
                ));
            }
        };
    }
    Ok(bits)
}
