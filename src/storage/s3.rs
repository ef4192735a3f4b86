//! S3-compatible object storage (AWS S3, Ceph RADOS Gateway, Garage, MinIO, Backblaze B2's
//! S3 endpoint) over blocking HTTP (reqwest), with requests signed by rusty-s3 (AWS
//! Signature V4). Every PUT carries a signed `Content-MD5`, so the server refuses a body
//! damaged on the wire; a PUT is durable once the server answers 200. Transient failures
//! (connection errors, timeouts, 5xx, 429/SlowDown) are retried with exponential backoff
//! and jitter; after the budget the error says what the server last answered.
//! Simultaneous reads, writes and deletes are bounded per storage.

use super::{ListEntry, Storage, StorageError, StorageResult};
use crate::transform::Codec;
use base64::Engine;
use md5::Digest;
use parking_lot::{Condvar, Mutex};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::io;
use std::ops::ControlFlow;
use std::time::{Duration, SystemTime};

/// How long a signed request stays valid (covers slow uploads and retries).
const SIGNATURE_TTL: Duration = Duration::from_secs(3600);
/// Most keys per DeleteObjects request (the S3 limit).
const DELETE_BATCH: usize = 1000;

/// The `[[storage]]` keys of an S3 storage (docs/configuration.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key (`backups/host1/`), so that one bucket can hold several
    /// repositories.
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    pub path_style: bool,
    pub storage_class: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub simultaneous_reads: usize,
    pub simultaneous_writes: usize,
    pub simultaneous_deletes: usize,
    /// Attempts per request before giving up (transient failures only).
    pub attempts: u32,
}

/// A counting semaphore: at most `n` holders at a time.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots { free: Mutex::new(n.max(1)), cv: Condvar::new() }
    }
    fn take(&self) -> SlotGuard<'_> {
        let mut f = self.free.lock();
        while *f == 0 {
            self.cv.wait(&mut f);
        }
        *f -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.cv.notify_one();
    }
}

pub struct S3Storage {
    name: String,
    config: S3Config,
    bucket: Bucket,
    credentials: Credentials,
    client: reqwest::blocking::Client,
    reads: Slots,
    writes: Slots,
    deletes: Slots,
}

/// What one request attempt came to.
enum Outcome {
    Done(reqwest::blocking::Response),
    /// Worth another attempt (the text says what happened).
    Retry(String),
    /// Final: the error to report.
    Fail(StorageError),
}

/// The `<Code>` of an S3 error document.
fn error_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + 6;
    let end = body[start..].find("</Code>")? + start;
    Some(body[start..end].to_string())
}

impl S3Storage {
    pub fn open(name: &str, config: &S3Config) -> StorageResult<S3Storage> {
        let bad = |msg: String| StorageError::Io {
            storage: name.to_string(),
            op: "configure",
            key: String::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, msg),
        };
        let endpoint: url::Url =
            config.endpoint.parse().map_err(|e| bad(format!("endpoint '{}' is not a URL: {e}", config.endpoint)))?;
        let style = if config.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(endpoint, style, config.bucket.clone(), config.region.clone())
            .map_err(|e| bad(format!("bucket '{}' at '{}': {e}", config.bucket, config.endpoint)))?;
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.read_timeout)
            .pool_max_idle_per_host(
                config.simultaneous_reads + config.simultaneous_writes + config.simultaneous_deletes,
            )
            .build()
            .map_err(|e| bad(format!("cannot set up HTTP: {e}")))?;
        Ok(S3Storage {
            name: name.to_string(),
            credentials: Credentials::new(config.access_key.clone(), config.secret_key.clone()),
            bucket,
            client,
            reads: Slots::new(config.simultaneous_reads),
            writes: Slots::new(config.simultaneous_writes),
            deletes: Slots::new(config.simultaneous_deletes),
            config: config.clone(),
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.config.prefix)
    }

    fn fail(&self, op: &'static str, key: &str, kind: io::ErrorKind, msg: String) -> StorageError {
        StorageError::Io { storage: self.name.clone(), op, key: key.to_string(), source: io::Error::new(kind, msg) }
    }

    /// Sends a request built by `build` (a fresh signature each attempt), retrying
    /// transient failures with exponential backoff and jitter.
    fn send(
        &self,
        op: &'static str,
        key: &str,
        build: impl Fn() -> reqwest::blocking::RequestBuilder,
        accept_404: bool,
    ) -> StorageResult<reqwest::blocking::Response> {
        self.send_by(op, key, build, accept_404, None)
    }

    /// [`Self::send`], starting no attempt after `by` and giving each one only the time
    /// left until it.
    fn send_by(
        &self,
        op: &'static str,
        key: &str,
        build: impl Fn() -> reqwest::blocking::RequestBuilder,
        accept_404: bool,
        by: Option<super::Deadline>,
    ) -> StorageResult<reqwest::blocking::Response> {
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 1..=self.config.attempts.max(1) {
            let left = match by {
                Some(d) => Some(d.left().ok_or_else(|| super::Deadline::passed(&self.name, op, key, &last))?),
                None => None,
            };
            let build = || match left {
                Some(left) => build().timeout(left.min(self.config.read_timeout)),
                None => build(),
            };
            match self.attempt(op, key, &build, accept_404) {
                Outcome::Done(r) => return Ok(r),
                Outcome::Fail(e) => return Err(e),
                Outcome::Retry(why) => last = why,
            }
            if attempt < self.config.attempts {
                // Jitter: sleep between half and all of the current backoff step, so that many
                // writers that failed together do not come back together.
                let jitter = u64::from_le_bytes(crate::transform::aes::random::<8>()) % 1000;
                std::thread::sleep(delay.mul_f64(0.5 + jitter as f64 / 2000.0));
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        Err(self.fail(
            op,
            key,
            io::ErrorKind::Other,
            format!(
                "the server at {} did not answer usably after {} attempts: {last}",
                self.config.endpoint, self.config.attempts
            ),
        ))
    }

    /// PUTs `key` with the body `body` makes for each attempt, whose MD5 is `md5`.
    fn put_body(&self, key: &str, md5: String, body: impl Fn() -> reqwest::blocking::Body) -> StorageResult<()> {
        self.put_with("put", key, md5, Vec::new(), body).map(|_| ())
    }

    /// A PUT with `extra` headers; its answer.
    fn put_with(
        &self,
        op: &'static str,
        key: &str,
        md5: String,
        extra: Vec<(&'static str, String)>,
        body: impl Fn() -> reqwest::blocking::Body,
    ) -> StorageResult<reqwest::blocking::Response> {
        let full = self.full_key(key);
        // Signed (in the action) and sent (on the request) alike.
        let mut headers = vec![("content-md5", md5)];
        headers.extend(extra);
        if let Some(class) = &self.config.storage_class {
            headers.push(("x-amz-storage-class", class.clone()));
        }
        self.send(
            op,
            key,
            || {
                let mut action = self.bucket.put_object(Some(&self.credentials), &full);
                for (name, value) in &headers {
                    action.headers_mut().insert(*name, value.clone());
                }
                let mut req = self.client.put(action.sign(SIGNATURE_TTL));
                for (name, value) in &headers {
                    req = req.header(*name, value);
                }
                req.body(body())
            },
            false,
        )
    }

    fn attempt(
        &self,
        op: &'static str,
        key: &str,
        build: &impl Fn() -> reqwest::blocking::RequestBuilder,
        accept_404: bool,
    ) -> Outcome {
        let resp = match build().send() {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return Outcome::Retry(format!("{what} ({})", e.without_url()));
            }
        };
        let status = resp.status();
        // A ranged read past the object's end is an empty answer, not a failure.
        if status.is_success()
            || (accept_404 && status.as_u16() == 404)
            || (op == "get range" && status.as_u16() == 416)
            || (op == "put new" && status.as_u16() == 412)
        {
            return Outcome::Done(resp);
        }
        let body = resp.text().unwrap_or_default();
        let code = error_code(&body).unwrap_or_default();
        let s = status.as_u16();
        if s == 429 || s >= 500 || code == "SlowDown" {
            return Outcome::Retry(format!("HTTP {s} {code}"));
        }
        let misconfigured = |message: String| {
            Outcome::Fail(StorageError::Misconfigured { storage: self.name.clone(), op, key: key.into(), message })
        };
        let msg = match (s, code.as_str()) {
            (404, "NoSuchBucket") => {
                return misconfigured(format!(
                    "bucket '{}' does not exist at {}; create it or fix `bucket` in the configuration",
                    self.config.bucket, self.config.endpoint
                ));
            }
            // Only a read can find an object missing: a 404 to a write or a listing (a web
            // server, a proxy or another service at the endpoint) is not one, and taking it
            // for "missing" told a user to `init --encrypt` a storage that was not there.
            (404, _) if op.starts_with("get") => {
                return Outcome::Fail(StorageError::NotFound { storage: self.name.clone(), key: key.into() });
            }
            (404, code) => {
                return misconfigured(format!(
                    "the server answered HTTP 404 {} to a {op}: is {} an S3 service, and `bucket` '{}' right?",
                    if code.is_empty() { "(not an S3 error)" } else { code },
                    self.config.endpoint,
                    self.config.bucket
                ));
            }
            // A clock problem, not the configuration's: said as what it is (exit 1).
            (403, "RequestTimeTooSkewed") => format!(
                "the server refused the request because this host's clock is off (HTTP {s} {code}); set the clock (NTP)"
            ),
            (403, _) | (400, "AuthorizationHeaderMalformed") | (401, _) => {
                return misconfigured(format!(
                    "access denied by {} (HTTP {s} {code}); check access_key / secret_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the region",
                    self.config.endpoint
                ));
            }
            (400, "BadDigest") | (400, "InvalidDigest") => {
                return Outcome::Retry(format!("the server received a damaged body (HTTP {s} {code})"));
            }
            _ => format!("the server answered HTTP {s} {code}"),
        };
        Outcome::Fail(self.fail(op, key, io::ErrorKind::PermissionDenied, msg))
    }

    fn timestamp(last_modified: &str) -> SystemTime {
        chrono::DateTime::parse_from_rfc3339(last_modified)
            .map(|d| SystemTime::UNIX_EPOCH + Duration::from_millis(d.timestamp_millis().max(0) as u64))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

impl Storage for S3Storage {
    fn name(&self) -> &str {
        &self.name
    }

    /// A conditional PUT (`If-None-Match: *`): 412 when the key exists. A server that
    /// ignores the condition writes anyway, as a plain put would (the caller reads back).
    fn put_new(&self, key: &str, data: &[u8]) -> StorageResult<bool> {
        let _slot = self.writes.take();
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data));
        let body = bytes::Bytes::copy_from_slice(data);
        let resp = self.put_with("put new", key, md5, vec![("if-none-match", "*".to_string())], || {
            reqwest::blocking::Body::from(body.clone())
        })?;
        Ok(resp.status().as_u16() != 412)
    }

    fn put(&self, key: &str, data: &[u8]) -> StorageResult<()> {
        let _slot = self.writes.take();
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data));
        let body = bytes::Bytes::copy_from_slice(data);
        self.put_body(key, md5, || reqwest::blocking::Body::from(body.clone()))
    }

    /// One PUT whose body is read from the pieces as it is sent (a version object with
    /// a large index: up to about 1 GB, under S3's 5 GB for one PUT), after a first
    /// pass over them for its Content-MD5.
    fn put_large(&self, key: &str, object: &super::LargeObject<'_>) -> StorageResult<()> {
        let _slot = self.writes.take();
        let read_err = |e: io::Error| self.fail("read the pieces of", key, e.kind(), e.to_string());
        let mut md5 = md5::Md5::new();
        let mut r = object.reader().map_err(read_err)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = io::Read::read(&mut r, &mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            md5.update(&buf[..n]);
        }
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5.finalize());
        let len = object.len();
        // A reader that cannot be opened again sends an empty body, which the server
        // refuses for its Content-MD5.
        self.put_body(key, md5, || match object.reader() {
            Ok(r) => reqwest::blocking::Body::sized(r, len),
            Err(_) => reqwest::blocking::Body::from(Vec::new()),
        })
    }

    fn get_fresh(&self, key: &str) -> StorageResult<Vec<u8>> {
        self.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> StorageResult<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let _slot = self.reads.take();
        let full = self.full_key(key);
        let range = format!("bytes={offset}-{}", offset.saturating_add(len - 1));
        let resp = self.send(
            "get range",
            key,
            || {
                self.client
                    .get(self.bucket.get_object(Some(&self.credentials), &full).sign(SIGNATURE_TTL))
                    .header("range", &range)
            },
            false,
        )?;
        // 416: the range starts past the object's end (see `attempt`).
        if resp.status().as_u16() == 416 {
            return Ok(Vec::new());
        }
        let whole = resp.status().as_u16() == 200;
        let expected = resp.content_length();
        let bytes = resp.bytes().map_err(|e| {
            self.fail("get range", key, io::ErrorKind::ConnectionAborted, format!("transfer broke off: {e}"))
        })?;
        if let Some(n) = expected
            && n != bytes.len() as u64
        {
            let msg = format!("got {} of {n} bytes", bytes.len());
            return Err(self.fail("get range", key, io::ErrorKind::ConnectionAborted, msg));
        }
        // A server that ignores Range answers 200 with the whole object.
        let bytes = if whole {
            let start = offset.min(bytes.len() as u64) as usize;
            bytes.slice(start..(offset.saturating_add(len).min(bytes.len() as u64) as usize))
        } else {
            bytes
        };
        Ok(bytes.to_vec())
    }
    fn get(&self, key: &str) -> StorageResult<Vec<u8>> {
        let _slot = self.reads.take();
        let full = self.full_key(key);
        let resp = self.send(
            "get",
            key,
            || self.client.get(self.bucket.get_object(Some(&self.credentials), &full).sign(SIGNATURE_TTL)),
            false,
        )?;
        let expected = resp.content_length();
        let bytes = resp
            .bytes()
            .map_err(|e| self.fail("get", key, io::ErrorKind::ConnectionAborted, format!("transfer broke off: {e}")))?;
        if let Some(n) = expected
            && n != bytes.len() as u64
        {
            return Err(self.fail(
                "get",
                key,
                io::ErrorKind::ConnectionAborted,
                format!("got {} of {n} bytes", bytes.len()),
            ));
        }
        Ok(bytes.to_vec())
    }

    fn exists(&self, key: &str) -> StorageResult<bool> {
        let _slot = self.reads.take();
        let full = self.full_key(key);
        let resp = self.send(
            "check",
            key,
            || self.client.head(self.bucket.head_object(Some(&self.credentials), &full).sign(SIGNATURE_TTL)),
            true,
        )?;
        Ok(resp.status().as_u16() != 404)
    }

    fn delete(&self, key: &str) -> StorageResult<()> {
        let _slot = self.deletes.take();
        let full = self.full_key(key);
        self.send(
            "delete",
            key,
            || self.client.delete(self.bucket.delete_object(Some(&self.credentials), &full).sign(SIGNATURE_TTL)),
            true,
        )?;
        Ok(())
    }

    fn delete_many(&self, keys: &[String], by: Option<super::Deadline>) -> StorageResult<()> {
        for chunk in keys.chunks(DELETE_BATCH) {
            let _slot = self.deletes.take();
            let objects: Vec<rusty_s3::actions::ObjectIdentifier> =
                chunk.iter().map(|k| rusty_s3::actions::ObjectIdentifier::new(self.full_key(k))).collect();
            let mut action = self.bucket.delete_objects(Some(&self.credentials), objects.iter());
            action.set_quiet(true);
            let url = action.sign(SIGNATURE_TTL);
            let (body, md5) = action.body_with_md5();
            let first = chunk.first().map(|s| s.as_str()).unwrap_or("");
            let resp = self.send_by(
                "delete",
                first,
                || self.client.post(url.clone()).header("content-md5", &md5).body(body.clone()),
                false,
                by,
            )?;
            // An answer cut off (the deadline, a dropped connection) says nothing of which
            // keys went: an error, not "no failures".
            let text = resp.text().map_err(|e| {
                self.fail("delete", first, io::ErrorKind::Other, format!("cannot read the server's answer: {e}"))
            })?;
            // Quiet mode lists only failures; a missing key is not one.
            if let Some(code) = error_code(&text).filter(|c| c != "NoSuchKey") {
                return Err(self.fail(
                    "delete",
                    first,
                    io::ErrorKind::Other,
                    format!("the server refused to delete some of {} objects ({code})", chunk.len()),
                ));
            }
        }
        Ok(())
    }

    fn list_each(&self, prefix: &str, each: &mut dyn FnMut(ListEntry) -> ControlFlow<()>) -> StorageResult<()> {
        let _slot = self.reads.take();
        let full = self.full_key(prefix);
        let mut token: Option<String> = None;
        loop {
            let resp = self.send(
                "list",
                prefix,
                || {
                    let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
                    action.with_prefix(full.as_str());
                    action.with_max_keys(1000);
                    if let Some(t) = &token {
                        action.with_continuation_token(t.as_str());
                    }
                    self.client.get(action.sign(SIGNATURE_TTL))
                },
                false,
            )?;
            let text = resp.text().map_err(|e| {
                self.fail("list", prefix, io::ErrorKind::ConnectionAborted, format!("transfer broke off: {e}"))
            })?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                self.fail("list", prefix, io::ErrorKind::InvalidData, format!("unreadable listing: {e}"))
            })?;
            for c in page.contents {
                let key = c.key.strip_prefix(&self.config.prefix).unwrap_or(&c.key).to_string();
                if each(ListEntry { key, size: c.size, modified: Self::timestamp(&c.last_modified) }).is_break() {
                    return Ok(());
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(())
    }

    /// A PUT that returned 200 is durable on the server: nothing to flush.
    fn sync(&self) -> StorageResult<()> {
        Ok(())
    }

    fn codec(&self) -> &Codec {
        Codec::plain()
    }
}
