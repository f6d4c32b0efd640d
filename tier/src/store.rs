//! `S3Store`: the few S3 operations the tier needs, over `rusty-s3`'s
//! SigV4 signer (presigned URLs) and `ureq`, with retries, limits and
//! counters. Synchronous: the engine reads from plain threads.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use md5::Digest as _;
use rusty_s3::actions::{DeleteObjectsResponse, ListObjectsV2, ObjectIdentifier};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use tracing::{debug, warn};

use crate::limit::{backoff, Limits};
use crate::metrics::{Op, TierMetrics};
use crate::{xml, S3Config, TierError};

/// How long a signed URL stays valid: past any wait for the limits and
/// retries of one call (each attempt signs afresh anyway).
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);

/// A transfer slower than this (bytes/s) is taken for a stalled one.
const STALL_RATE: u64 = 256 << 10;

/// S3 takes at most this many keys per DeleteObjects request.
pub const DELETE_BATCH: usize = 1000;

/// The most of an error body read (they are a few hundred bytes).
const ERROR_BODY_MAX: u64 = 64 << 10;

/// Keys (relative or full) with their sizes.
pub type Listing = Vec<(String, u64)>;

/// One attempt's request: signed URL and the headers to send.
struct Prepared {
    method: &'static str,
    url: String,
    headers: Vec<(&'static str, String)>,
}

/// What a DeleteObjects run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeleteReport {
    /// Keys the store reported deleted (or already absent).
    pub deleted: usize,
    /// `(key, code, message)` of each key the store refused to delete.
    pub failed: Vec<(String, String, String)>,
    /// DeleteObjects requests made.
    pub requests: usize,
}

pub struct S3Store {
    cfg: S3Config,
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    limits: Limits,
    metrics: Arc<TierMetrics>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("cfg", &self.cfg).finish()
    }
}

/// The public roots plus the CA certificates in `ca` (a self-signed
/// endpoint's CA is trusted in addition, not instead).
fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TierError> {
    use rustls_pki_types::pem::PemObject;
    let bad = |m: String| TierError::Config(format!("CA file {}: {m}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut added = 0;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// An error answer as a `TierError`: credentials and a missing bucket get
/// variants of their own (a tiering job fails with that reason).
fn status_error(status: u16, resp: ureq::Response, bucket: &str) -> TierError {
    let mut body = String::new();
    let _ = resp
        .into_reader()
        .take(ERROR_BODY_MAX)
        .read_to_string(&mut body);
    let (code, message) = xml::error_fields(&body);
    match code.as_str() {
        // NotSignedUp: what AWS (and s3s) say of an unknown access key.
        "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "AccessDenied"
        | "NotSignedUp"
        | "InvalidToken"
        | "ExpiredToken" => TierError::BadCredentials { code, message },
        "NoSuchBucket" => TierError::NoSuchBucket(bucket.to_string()),
        // A HEAD answer has no body to say why.
        "" if status == 403 => TierError::BadCredentials {
            code: "403 Forbidden".into(),
            message: "(no error body)".into(),
        },
        _ => TierError::Http {
            status,
            code,
            message,
        },
    }
}

fn read_error(e: std::io::Error) -> TierError {
    TierError::Unreachable(format!("reading the answer: {e}"))
}

impl S3Store {
    /// A store with counters of its own.
    pub fn new(cfg: S3Config) -> Result<S3Store, TierError> {
        S3Store::with_metrics(cfg, Arc::new(TierMetrics::default()))
    }

    /// A store that counts into `metrics` (shared with the cache).
    pub fn with_metrics(cfg: S3Config, metrics: Arc<TierMetrics>) -> Result<S3Store, TierError> {
        cfg.validate()?;
        let endpoint = cfg
            .endpoint
            .parse()
            .map_err(|e| TierError::Config(format!("endpoint {:?}: {e}", cfg.endpoint)))?;
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| TierError::Config(format!("endpoint {:?}: {e}", cfg.endpoint)))?;
        let creds = Credentials::new(cfg.access_key.clone(), cfg.secret_key.clone());
        // Timeouts per socket operation, not per request: a 64 MiB pack
        // under a bandwidth limit may take minutes, a stalled one may not.
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(cfg.timeout)
            .timeout_read(cfg.timeout)
            .timeout_write(cfg.timeout);
        if let Some(ca) = &cfg.ca_file {
            agent = agent.tls_config(tls_config(ca)?);
        }
        Ok(S3Store {
            limits: Limits::new(cfg.max_requests_per_sec, cfg.max_bytes_per_sec),
            agent: agent.build(),
            cfg,
            bucket,
            creds,
            metrics,
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<TierMetrics> {
        &self.metrics
    }

    /// The object's key in the bucket: the prefix and `key`.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.cfg.prefix)
    }

    /// The whole-request deadline for moving `bytes`: the timeout plus
    /// the time at [`STALL_RATE`]. Needed besides the per-operation
    /// timeouts because ureq 2 clears them on pooled connections and does
    /// not set them again before reading the next answer's head: a hung
    /// server would hold a reused connection forever.
    fn deadline(&self, bytes: u64) -> Duration {
        self.cfg.timeout + Duration::from_secs_f64(bytes as f64 / STALL_RATE as f64)
    }

    /// Runs one operation with retries: `prepare` signs each attempt,
    /// `read` takes a successful answer apart. A 404 is `absent()` when
    /// given, an error otherwise. `down` is the bytes expected back, for
    /// the bandwidth limit.
    fn execute<T>(
        &self,
        op: Op,
        body: &[u8],
        down: u64,
        prepare: &dyn Fn() -> Prepared,
        absent: Option<fn() -> T>,
        read: &mut dyn FnMut(ureq::Response) -> Result<T, TierError>,
    ) -> Result<T, TierError> {
        let mut attempt = 0;
        loop {
            self.limits.admit(body.len() as u64 + down);
            self.metrics.request(op);
            let p = prepare();
            let mut req = self
                .agent
                .request(p.method, &p.url)
                .timeout(self.deadline(body.len() as u64 + down));
            for (k, v) in &p.headers {
                req = req.set(k, v);
            }
            let res = if p.method == "PUT" || p.method == "POST" {
                req.send_bytes(body)
            } else {
                req.call()
            };
            if let (Err(ureq::Error::Status(404, _)), Some(f)) = (&res, absent) {
                return Ok(f());
            }
            let out = match res {
                Ok(resp) => {
                    TierMetrics::add(&self.metrics.bytes_up, body.len() as u64);
                    read(resp)
                }
                Err(ureq::Error::Status(status, resp)) => {
                    Err(status_error(status, resp, &self.cfg.bucket))
                }
                Err(ureq::Error::Transport(t)) => Err(TierError::Unreachable(transport_error(&t))),
            };
            match out {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < self.cfg.retries => {
                    let pause = backoff(attempt);
                    attempt += 1;
                    TierMetrics::add(&self.metrics.retries, 1);
                    debug!(op = op.name(), attempt, ?pause, "retrying: {e}");
                    std::thread::sleep(pause);
                }
                Err(e) => {
                    TierMetrics::add(&self.metrics.errors, 1);
                    return Err(e);
                }
            }
        }
    }

    /// Probes the target: the bucket exists and the credentials may list
    /// it. Fails with `Unreachable`, `BadCredentials`, `NoSuchBucket` or
    /// `Http`, so a tiering job can say why before anything moves.
    pub fn check(&self) -> Result<(), TierError> {
        self.list_page("", 1, None).map(|_| ())
    }

    /// Uploads `data` as `key` and confirms it landed: the request signs
    /// the payload's SHA-256 (`x-amz-content-sha256`) and carries its
    /// Content-MD5, so the server refuses a body damaged on the way; then
    /// a HEAD must report the full length. Only after this may the
    /// engine's metadata point at the object.
    pub fn put(&self, key: &str, data: &[u8]) -> Result<(), TierError> {
        use base64::Engine as _;
        let full = self.full_key(key);
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data));
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data));
        let prepare = || {
            let mut a = self.bucket.put_object(Some(&self.creds), &full);
            a.headers_mut().insert("content-md5", md5.clone());
            a.headers_mut().insert("x-amz-content-sha256", sha.clone());
            Prepared {
                method: "PUT",
                url: a.sign(SIGN_FOR).into(),
                headers: vec![
                    ("content-md5", md5.clone()),
                    ("x-amz-content-sha256", sha.clone()),
                ],
            }
        };
        self.execute(Op::Put, data, 0, &prepare, None, &mut |_| Ok(()))?;
        match self.head(key)? {
            Some(n) if n == data.len() as u64 => Ok(()),
            got => Err(TierError::NotVerified {
                key: full,
                expected: data.len() as u64,
                got,
            }),
        }
    }

    /// Exactly `len` bytes of `key` from `offset`; anything shorter is an
    /// error. The bytes are not checked against anything: the engine's
    /// extent checksums do that.
    pub fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, TierError> {
        let data = self.get_range_clipped(key, offset, len)?;
        if data.len() as u64 != len {
            return Err(TierError::ShortRead {
                key: self.full_key(key),
                offset,
                expected: len,
                got: data.len() as u64,
            });
        }
        Ok(data)
    }

    /// Up to `len` bytes of `key` from `offset`: fewer only where the
    /// object ends (the cache asks for whole chunks and the last one of a
    /// pack is short). An offset at or past the end is an error (416).
    pub fn get_range_clipped(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, TierError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let full = self.full_key(key);
        let end = offset
            .checked_add(len - 1)
            .ok_or_else(|| TierError::Config(format!("range {offset}+{len} overflows")))?;
        let range = format!("bytes={offset}-{end}");
        let prepare = || Prepared {
            method: "GET",
            url: self
                .bucket
                .get_object(Some(&self.creds), &full)
                .sign(SIGN_FOR)
                .into(),
            headers: vec![("range", range.clone())],
        };
        let mut read = |resp: ureq::Response| {
            let whole = resp.status() == 200;
            let mut r = resp.into_reader();
            // A server that ignores Range sends the whole object.
            if whole {
                std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
                    .map_err(read_error)?;
            }
            let mut buf = Vec::with_capacity(len.min(64 << 20) as usize);
            r.take(len).read_to_end(&mut buf).map_err(read_error)?;
            TierMetrics::add(&self.metrics.bytes_down, buf.len() as u64);
            Ok(buf)
        };
        self.execute(Op::Get, &[], len, &prepare, None, &mut read)
    }

    /// The size of `key`, `None` if there is no such object.
    pub fn head(&self, key: &str) -> Result<Option<u64>, TierError> {
        let full = self.full_key(key);
        let prepare = || Prepared {
            method: "HEAD",
            url: self
                .bucket
                .head_object(Some(&self.creds), &full)
                .sign(SIGN_FOR)
                .into(),
            headers: Vec::new(),
        };
        let mut read = |resp: ureq::Response| {
            resp.header("content-length")
                .and_then(|v| v.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| TierError::Protocol(format!("HEAD {full}: no Content-Length")))
        };
        self.execute(Op::Head, &[], 0, &prepare, Some(|| None), &mut read)
    }

    /// One ListObjectsV2 page of keys under `prefix` (relative to the
    /// configured prefix): the objects (full keys) and the token of the
    /// next page.
    fn list_page(
        &self,
        prefix: &str,
        max_keys: usize,
        token: Option<&str>,
    ) -> Result<(Listing, Option<String>), TierError> {
        let full = self.full_key(prefix);
        let prepare = || {
            let mut a = self.bucket.list_objects_v2(Some(&self.creds));
            a.with_prefix(full.clone());
            a.with_max_keys(max_keys);
            if let Some(t) = token {
                a.with_continuation_token(t.to_string());
            }
            Prepared {
                method: "GET",
                url: a.sign(SIGN_FOR).into(),
                headers: Vec::new(),
            }
        };
        let mut read = |resp: ureq::Response| {
            let mut body = String::new();
            resp.into_reader()
                .read_to_string(&mut body)
                .map_err(read_error)?;
            TierMetrics::add(&self.metrics.bytes_down, body.len() as u64);
            parse_list(&body)
        };
        self.execute(Op::List, &[], 0, &prepare, None, &mut read)
    }

    /// Every object under `prefix` with its size, keys relative to the
    /// configured prefix, in the store's (lexical) order.
    pub fn list(&self, prefix: &str) -> Result<Listing, TierError> {
        self.list_paged(prefix, 1000).map(|(v, _)| v)
    }

    /// [`S3Store::list`] with pages of `page` keys; also returns the
    /// number of requests it took.
    pub fn list_paged(&self, prefix: &str, page: usize) -> Result<(Listing, usize), TierError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let (keys, next) = self.list_page(prefix, page.clamp(1, 1000), token.as_deref())?;
            pages += 1;
            for (k, size) in keys {
                match k.strip_prefix(&self.cfg.prefix) {
                    Some(rel) => out.push((rel.to_string(), size)),
                    None => warn!("listed key {k:?} outside the prefix; skipped"),
                }
            }
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok((out, pages)),
            }
        }
    }

    /// Deletes `keys` (relative) with DeleteObjects, at most 1000 per
    /// request. Keys the store refuses are reported, not fatal; a request
    /// that fails as a whole is.
    pub fn delete_batch(&self, keys: &[String]) -> Result<DeleteReport, TierError> {
        let mut report = DeleteReport::default();
        for chunk in keys.chunks(DELETE_BATCH) {
            let objects: Vec<ObjectIdentifier> = chunk
                .iter()
                .map(|k| ObjectIdentifier::new(self.full_key(k)))
                .collect();
            let action = |quiet| {
                let mut a = self
                    .bucket
                    .delete_objects(Some(&self.creds), objects.iter());
                a.set_quiet(quiet);
                a
            };
            let (body, md5) = action(true).body_with_md5();
            let prepare = || Prepared {
                method: "POST",
                url: action(true).sign(SIGN_FOR).into(),
                headers: vec![("content-md5", md5.clone())],
            };
            let mut read = |resp: ureq::Response| {
                let mut text = String::new();
                resp.into_reader()
                    .read_to_string(&mut text)
                    .map_err(read_error)?;
                parse_delete(&text)
            };
            let answer = self.execute(Op::Delete, body.as_bytes(), 0, &prepare, None, &mut read)?;
            report.requests += 1;
            report.deleted += chunk.len().saturating_sub(answer.errors.len());
            for e in answer.errors {
                let key = e
                    .key
                    .strip_prefix(&self.cfg.prefix)
                    .unwrap_or(&e.key)
                    .to_string();
                report.failed.push((key, e.code, e.message));
            }
        }
        Ok(report)
    }

    /// Deletes one object; an absent one is no error.
    pub fn delete(&self, key: &str) -> Result<(), TierError> {
        let full = self.full_key(key);
        let prepare = || Prepared {
            method: "DELETE",
            url: self
                .bucket
                .delete_object(Some(&self.creds), &full)
                .sign(SIGN_FOR)
                .into(),
            headers: Vec::new(),
        };
        self.execute(Op::Delete, &[], 0, &prepare, Some(|| ()), &mut |_| Ok(()))
    }
}

/// A ListObjectsV2 answer (outside bytes): keys with their sizes, and the
/// continuation token of the next page.
pub fn parse_list(body: &str) -> Result<(Listing, Option<String>), TierError> {
    let page = ListObjectsV2::parse_response(body)
        .map_err(|e| TierError::Protocol(format!("ListObjectsV2 answer: {e}")))?;
    let keys = page
        .contents
        .into_iter()
        .map(|c| (c.key, c.size.unwrap_or(0)))
        .collect();
    Ok((keys, page.next_continuation_token))
}

/// A DeleteObjects answer (outside bytes).
pub fn parse_delete(body: &str) -> Result<DeleteObjectsResponse, TierError> {
    DeleteObjectsResponse::parse(body)
        .map_err(|e| TierError::Protocol(format!("DeleteObjects answer: {e}")))
}

/// A transport failure's message without the request's query string: a
/// presigned URL carries the access key id and a signature valid for
/// minutes, which must not reach logs, job results or read errors.
fn transport_error(t: &ureq::Transport) -> String {
    let url = t.url().map(|u| {
        let mut u = u.clone();
        u.set_query(None);
        format!("{u}: ")
    });
    let msg = t.message().map(|m| format!(": {m}")).unwrap_or_default();
    format!("{}{}{msg}", url.unwrap_or_default(), t.kind())
}
