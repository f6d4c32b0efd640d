//! The object-storage tier's configuration (issue 21): the S3-compatible
//! target older points' data moves to (`PUT/GET/DELETE /v1/tier`). The
//! resource types, their validation, the routes and what they need of the
//! appliance ([`TierBackend`]). The secret key goes in and never comes
//! out: answers say only that one is set.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::routes::{run, ApiJson, AppState};
use crate::types::ErrorBody;

/// Region when a request names none (what most S3 servers accept).
pub const DEFAULT_REGION: &str = "us-east-1";
/// Local read cache of tiered data when a request gives no size: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;
/// Smallest read cache: a few packs' worth of ranged reads.
pub const MIN_CACHE_BYTES: u64 = 64 << 20;
/// Pack objects' target size in MiB, and its bounds (issue 21: 16–64 MiB,
/// so a TiB costs tens of thousands of requests, not millions).
pub const DEFAULT_PACK_MIB: u32 = 32;
pub const MIN_PACK_MIB: u32 = 16;
pub const MAX_PACK_MIB: u32 = 64;
/// The error code of every answer about a tier that is not configured.
pub const NOT_CONFIGURED: &str = "not_configured";

/// 404 `not_configured` (`GET /v1/tier`); jobs turn it into a 409.
pub fn not_configured() -> ApiError {
    ApiError::new(
        404,
        NOT_CONFIGURED,
        "no object-storage tier is configured (PUT /v1/tier, or `cdmctl tier set`)",
    )
}

/// `PUT /v1/tier`: the object store older points' data moves to.
#[derive(Serialize, Deserialize, ToSchema, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TierConfigPut {
    /// `http://` or `https://` URL of the S3-compatible service
    /// (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:3900`).
    pub endpoint: String,
    /// Bucket name (S3 rules: 3–63 of `a-z 0-9 . -`, starting and ending
    /// with a letter or digit). It must exist.
    pub bucket: String,
    /// Signing region (default `us-east-1`): 1–64 of `A-Z a-z 0-9 _ -`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key id (shown again by `GET /v1/tier`).
    pub access_key: String,
    /// Secret access key: stored encrypted, never returned.
    pub secret_key: String,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`, for MinIO, Garage,
    /// Ceph without wildcard DNS); default virtual-host style
    /// (`BUCKET.HOST/KEY`).
    #[serde(default)]
    pub path_style: bool,
    /// Key prefix of every object the appliance writes; default
    /// `cdm/POOL-UUID/`, so that appliances can share a bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Local read cache of tiered data in bytes (default 1 GiB, at least
    /// 64 MiB).
    #[serde(default = "default_cache")]
    pub cache_bytes: u64,
    /// Most requests per second to the store (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_sec: Option<u32>,
    /// Most MiB per second to and from the store (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib_per_sec: Option<u32>,
    /// Target size of the pack objects extents are packed into, in MiB
    /// (16–64, default 32).
    #[serde(default = "default_pack")]
    pub pack_mib: u32,
}

// By hand: the secret key must not reach a log through `{:?}`.
impl std::fmt::Debug for TierConfigPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierConfigPut")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .field("cache_bytes", &self.cache_bytes)
            .field("max_requests_per_sec", &self.max_requests_per_sec)
            .field("max_mib_per_sec", &self.max_mib_per_sec)
            .field("pack_mib", &self.pack_mib)
            .finish()
    }
}

fn default_region() -> String {
    DEFAULT_REGION.to_string()
}
fn default_cache() -> u64 {
    DEFAULT_CACHE_BYTES
}
fn default_pack() -> u32 {
    DEFAULT_PACK_MIB
}

/// `GET /v1/tier`: the configuration without its secret.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Eq)]
pub struct TierConfigView {
    /// Always true in an answer (without a configuration `GET /v1/tier`
    /// answers 404 `not_configured`).
    pub configured: bool,
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    /// A secret key is stored (it is never shown).
    pub secret_key_set: bool,
    pub path_style: bool,
    /// The key prefix in use (the default filled in).
    pub prefix: String,
    pub cache_bytes: u64,
    #[serde(default)]
    pub max_requests_per_sec: Option<u32>,
    #[serde(default)]
    pub max_mib_per_sec: Option<u32>,
    pub pack_mib: u32,
    /// When it was last set.
    pub updated_unix: u64,
}

/// The default key prefix for the pool `uuid`: `cdm/UUID/`.
pub fn default_prefix(pool_uuid: &str) -> String {
    format!("cdm/{pool_uuid}/")
}

impl TierConfigPut {
    /// Checks every field (400 with the reason) and returns the request
    /// with its prefix resolved (`pool_uuid` gives the default) and ending
    /// in `/`, and the endpoint without a trailing `/`.
    pub fn validated(mut self, pool_uuid: &str) -> ApiResult<TierConfigPut> {
        self.endpoint = check_endpoint(&self.endpoint)?;
        check_bucket(&self.bucket)?;
        check_region(&self.region)?;
        check_key_text("access_key", &self.access_key, 128, false)?;
        check_key_text("secret_key", &self.secret_key, 256, true)?;
        let prefix = match self.prefix.take() {
            None => default_prefix(pool_uuid),
            Some(p) => check_prefix(&p)?,
        };
        self.prefix = Some(prefix);
        if self.cache_bytes < MIN_CACHE_BYTES {
            return Err(ApiError::bad_request(format!(
                "cache_bytes must be at least {MIN_CACHE_BYTES} (64 MiB), not {}",
                self.cache_bytes
            )));
        }
        if !(MIN_PACK_MIB..=MAX_PACK_MIB).contains(&self.pack_mib) {
            return Err(ApiError::bad_request(format!(
                "pack_mib must be {MIN_PACK_MIB} to {MAX_PACK_MIB}, not {}",
                self.pack_mib
            )));
        }
        for (name, v) in [
            ("max_requests_per_sec", self.max_requests_per_sec),
            ("max_mib_per_sec", self.max_mib_per_sec),
        ] {
            if v == Some(0) {
                return Err(ApiError::bad_request(format!(
                    "{name} must be at least 1 (leave it out for no limit)"
                )));
            }
        }
        Ok(self)
    }

    /// The answer's view of a validated configuration set at `updated_unix`.
    pub fn view(&self, updated_unix: u64) -> TierConfigView {
        TierConfigView {
            configured: true,
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            access_key: self.access_key.clone(),
            secret_key_set: !self.secret_key.is_empty(),
            path_style: self.path_style,
            prefix: self.prefix.clone().unwrap_or_default(),
            cache_bytes: self.cache_bytes,
            max_requests_per_sec: self.max_requests_per_sec,
            max_mib_per_sec: self.max_mib_per_sec,
            pack_mib: self.pack_mib,
            updated_unix,
        }
    }
}

/// An `http(s)://HOST[:PORT][/PATH]` URL without credentials, query or
/// fragment; returned without a trailing `/`.
fn check_endpoint(s: &str) -> ApiResult<String> {
    let bad = |why: &str| ApiError::bad_request(format!("endpoint {s:?} {why}"));
    let u = url::Url::parse(s.trim()).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    // Credentials go in access_key/secret_key, where they are protected;
    // in the URL they would be shown and logged.
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad(
            "must not carry a user or password (use access_key and secret_key)",
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(u.as_str().trim_end_matches('/').to_string())
}

/// S3's bucket naming rules (the strictest common set, so a name works on
/// AWS, Ceph, MinIO and Garage alike).
fn check_bucket(b: &str) -> ApiResult<()> {
    let bad = |why: &str| ApiError::bad_request(format!("bucket {b:?} {why}"));
    if b.is_empty() {
        return Err(bad("is empty"));
    }
    if !(3..=63).contains(&b.len()) {
        return Err(bad("must be 3 to 63 characters"));
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
    {
        return Err(bad("may only hold a-z, 0-9, '.' and '-'"));
    }
    let edge = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge(b.bytes().next()) || !edge(b.bytes().last()) {
        return Err(bad("must start and end with a letter or digit"));
    }
    if b.contains("..") {
        return Err(bad("must not hold \"..\""));
    }
    Ok(())
}

fn check_region(r: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&r.len())
        && r.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "region {r:?} must be 1 to 64 of A-Z a-z 0-9 '_' '-'"
        )))
    }
}

/// A key id or secret: printable ASCII, no spaces (they are signed into
/// headers); a secret's value is never echoed in the message.
fn check_key_text(name: &str, v: &str, max: usize, secret: bool) -> ApiResult<()> {
    if v.is_empty() {
        return Err(ApiError::bad_request(format!("{name} is empty")));
    }
    if v.len() > max {
        return Err(ApiError::bad_request(format!(
            "{name} is longer than {max} characters"
        )));
    }
    if !v.bytes().all(|c| c.is_ascii_graphic()) {
        let shown = if secret {
            String::new()
        } else {
            format!(" {v:?}")
        };
        return Err(ApiError::bad_request(format!(
            "{name}{shown} may only hold printable ASCII without spaces"
        )));
    }
    Ok(())
}

/// An object key prefix: up to 512 bytes of printable ASCII, relative
/// (no leading `/`), no empty, `.` or `..` segment; returned ending in `/`.
fn check_prefix(p: &str) -> ApiResult<String> {
    let bad = |why: &str| ApiError::bad_request(format!("prefix {p:?} {why}"));
    if p.is_empty() {
        return Err(bad(
            "is empty (leave it out for the default cdm/POOL-UUID/)",
        ));
    }
    if p.len() > 512 {
        return Err(bad("is longer than 512 bytes"));
    }
    if !p.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(bad("may only hold printable ASCII without spaces"));
    }
    let body = p.strip_suffix('/').unwrap_or(p);
    if body
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(bad(
            "must be relative, without empty, \".\" or \"..\" segments",
        ));
    }
    Ok(format!("{body}/"))
}

impl crate::types::SnapshotPolicy {
    /// The tiering fields' rules (400 with the reason): each at least 1.
    pub fn check_tiering(&self) -> ApiResult<()> {
        for (name, v) in [
            ("tier_after_days", self.tier_after_days),
            ("tier_keep_last", self.tier_keep_last),
        ] {
            if v == Some(0) {
                return Err(ApiError::bad_request(format!(
                    "{name} must be at least 1 (leave it out not to tier by it)"
                )));
            }
        }
        Ok(())
    }
}

/// A tier job that `POST /v1/jobs` asked for, its fields checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierJob {
    /// Move `volume`'s points due by its policy, or only `snapshot`, now.
    Tier {
        volume: String,
        snapshot: Option<u64>,
    },
    /// Bring `volume`'s point `snapshot` back to the pool.
    Recall { volume: String, snapshot: u64 },
    /// Remove the objects nothing refers to any more.
    Gc,
}

/// The job kinds of the object tier.
pub const JOB_KINDS: [&str; 3] = ["tier", "recall", "tier-gc"];

impl TierJob {
    /// The tier job `req` asks for: `None` if its kind is not one of
    /// [`JOB_KINDS`]; 400 for a missing or unexpected field.
    pub fn from_request(req: &crate::types::JobCreate) -> Option<ApiResult<TierJob>> {
        let needs =
            |what: &str| ApiError::bad_request(format!("a {} job needs \"{what}\"", req.kind));
        let job = match req.kind.as_str() {
            "tier" => req
                .volume
                .clone()
                .ok_or_else(|| needs("volume"))
                .map(|volume| TierJob::Tier {
                    volume,
                    snapshot: req.snapshot,
                }),
            "recall" => match (&req.volume, req.snapshot) {
                (None, _) => Err(needs("volume")),
                (_, None) => Err(needs("snapshot")),
                (Some(v), Some(s)) => Ok(TierJob::Recall {
                    volume: v.clone(),
                    snapshot: s,
                }),
            },
            "tier-gc" => {
                if req.volume.is_some() || req.snapshot.is_some() {
                    Err(ApiError::bad_request(
                        "a tier-gc job covers the whole store: give no \"volume\" or \"snapshot\"",
                    ))
                } else {
                    Ok(TierJob::Gc)
                }
            }
            _ => return None,
        };
        Some(job)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TierJob::Tier { .. } => "tier",
            TierJob::Recall { .. } => "recall",
            TierJob::Gc => "tier-gc",
        }
    }
}

/// What the tier routes need from the appliance.
pub trait TierBackend {
    /// The stored configuration without its secret; 404 `not_configured`.
    fn tier_config(&self) -> ApiResult<TierConfigView>;
    /// Validates (400), stores the configuration with its secret key
    /// encrypted, and answers its view.
    fn set_tier_config(&self, caller: &Caller, req: TierConfigPut) -> ApiResult<TierConfigView>;
    /// Forgets the configuration: 404 `not_configured` without one, 409
    /// while [`TierBackend::tier_has_data`] says points' data is in the
    /// store (it would become unreachable).
    fn delete_tier_config(&self, caller: &Caller) -> ApiResult<()>;
    /// Whether any point's data is in the object store now.
    fn tier_has_data(&self) -> ApiResult<bool>;
}

/// The tier routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/tier",
        get(tier_config)
            .put(set_tier_config)
            .delete(delete_tier_config),
    )
}

/// Admins, operators and auditors (no host credential).
#[utoipa::path(get, path = "/v1/tier", responses((status = 200, body = TierConfigView), (status = 404, description = "`not_configured`", body = ErrorBody)), security(("bearer" = [])))]
async fn tier_config(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<Json<TierConfigView>> {
    c.require(Action::Read)?;
    Ok(Json(run(&s, |b| b.tier_config()).await?))
}

/// Admin only: the credentials reach every tiered point's data.
#[utoipa::path(put, path = "/v1/tier", request_body = TierConfigPut, responses((status = 200, body = TierConfigView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn set_tier_config(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<TierConfigPut>,
) -> ApiResult<Json<TierConfigView>> {
    c.require(Action::Admin)?;
    Ok(Json(run(&s, move |b| b.set_tier_config(&c, req)).await?))
}

/// Admin only; refused (409) while points' data is in the store.
#[utoipa::path(delete, path = "/v1/tier", responses((status = 204), (status = 403, body = ErrorBody), (status = 404, description = "`not_configured`", body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_tier_config(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
) -> ApiResult<StatusCode> {
    c.require(Action::Admin)?;
    run(&s, move |b| b.delete_tier_config(&c)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tier routes' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(tier_config, set_tier_config, delete_tier_config),
    components(schemas(TierConfigPut, TierConfigView)),
    modifiers(&BearerAuth)
)]
pub struct TierDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UUID: &str = "0b7c5d2e-1111-2222-3333-444455556666";

    fn put(extra: serde_json::Value) -> ApiResult<TierConfigPut> {
        let mut v = json!({"endpoint": "http://127.0.0.1:3900", "bucket": "cdm-tier",
            "access_key": "GK31c2f218a2e44f485b94239e", "secret_key": "b892c0665f0ada8a4755dae98baa3b133590e11dae3bcc1f9d769d67f16c3835"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let req: TierConfigPut = serde_json::from_value(v)
            .map_err(|e| ApiError::new(400, "invalid_json", e.to_string()))?;
        req.validated(UUID)
    }

    fn refused(extra: serde_json::Value, needle: &str) {
        let e = put(extra.clone()).expect_err(&format!("{extra} was accepted"));
        assert_eq!(e.status, 400, "{extra}: {e}");
        assert!(e.message.contains(needle), "{extra}: {}", e.message);
    }

    #[test]
    fn defaults_fill_in_and_the_view_has_no_secret() {
        let c = put(json!({})).unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(
            c.prefix.as_deref(),
            Some("cdm/0b7c5d2e-1111-2222-3333-444455556666/")
        );
        assert_eq!(c.cache_bytes, 1 << 30);
        assert_eq!(c.pack_mib, 32);
        assert!(!c.path_style);
        let v = serde_json::to_value(c.view(7)).unwrap();
        let text = v.to_string();
        assert!(!text.contains(&c.secret_key), "{text}");
        assert_eq!(v["secret_key_set"], true);
        assert_eq!(v["access_key"], "GK31c2f218a2e44f485b94239e");
        assert!(!format!("{c:?}").contains(&c.secret_key));
        // Normalised: no trailing slash on the endpoint, one on the prefix.
        let c = put(json!({"endpoint": "https://s3.example.com/", "prefix": "a/b"})).unwrap();
        assert_eq!(c.endpoint, "https://s3.example.com");
        assert_eq!(c.prefix.as_deref(), Some("a/b/"));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        refused(json!({"endpoint": "ftp://h"}), "http:// or https://");
        refused(json!({"endpoint": "s3.example.com"}), "is not a URL");
        refused(json!({"endpoint": "http://u:p@h"}), "user or password");
        refused(json!({"endpoint": "http://h/?x=1"}), "query");
        refused(json!({"bucket": ""}), "is empty");
        refused(json!({"bucket": "ab"}), "3 to 63");
        refused(json!({"bucket": "Bucket"}), "a-z");
        refused(json!({"bucket": "-abc"}), "start and end");
        refused(json!({"bucket": "a..b"}), "\"..\"");
        refused(json!({"region": "eu west"}), "region");
        refused(json!({"region": ""}), "region");
        refused(json!({"access_key": ""}), "access_key is empty");
        refused(json!({"secret_key": "has space"}), "secret_key may only");
        refused(json!({"prefix": "/abs"}), "relative");
        refused(json!({"prefix": "a/../b"}), "relative");
        refused(json!({"prefix": ""}), "is empty");
        refused(json!({"cache_bytes": 1 << 20}), "cache_bytes");
        refused(json!({"pack_mib": 8}), "16 to 64");
        refused(json!({"pack_mib": 65}), "16 to 64");
        refused(json!({"max_requests_per_sec": 0}), "max_requests_per_sec");
        refused(json!({"max_mib_per_sec": 0}), "max_mib_per_sec");
        // A secret is never echoed back, even when refused.
        let e = put(json!({"secret_key": "sec ret"})).unwrap_err();
        assert!(!e.message.contains("sec ret"));
        // Unknown fields are refused by serde (400 invalid_json at the route).
        assert!(put(json!({"secret": "x"})).is_err());
        assert!(put(json!({"pack_mib": 16, "path_style": true, "region": "garage"})).is_ok());
    }

    #[test]
    fn policy_tiering_fields_are_at_least_one() {
        let mut p = crate::types::SnapshotPolicy::default();
        assert!(p.check_tiering().is_ok());
        p.tier_after_days = Some(30);
        p.tier_keep_last = Some(1);
        assert!(p.check_tiering().is_ok());
        p.tier_keep_last = Some(0);
        let e = p.check_tiering().unwrap_err();
        assert!(e.message.contains("tier_keep_last"), "{}", e.message);
        p.tier_keep_last = None;
        p.tier_after_days = Some(0);
        assert!(p
            .check_tiering()
            .unwrap_err()
            .message
            .contains("tier_after_days"));
        // Old records (no tiering fields) still read; the fields round-trip.
        let old: crate::types::SnapshotPolicy =
            serde_json::from_value(json!({"retention": {"keep_last": 3}})).unwrap();
        assert_eq!(old.tier_after_days, None);
        let v = serde_json::to_value(crate::types::SnapshotPolicy {
            tier_after_days: Some(7),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(v["tier_after_days"], 7);
        assert!(v.get("tier_keep_last").is_none());
    }

    #[test]
    fn tier_jobs_need_their_fields() {
        let job = |v: serde_json::Value| {
            let req: crate::types::JobCreate = serde_json::from_value(v).unwrap();
            TierJob::from_request(&req)
        };
        assert!(job(json!({"kind": "scrub"})).is_none());
        assert_eq!(
            job(json!({"kind": "tier", "volume": "db"}))
                .unwrap()
                .unwrap(),
            TierJob::Tier {
                volume: "db".into(),
                snapshot: None
            }
        );
        assert_eq!(
            job(json!({"kind": "tier", "volume": "db", "snapshot": 4}))
                .unwrap()
                .unwrap(),
            TierJob::Tier {
                volume: "db".into(),
                snapshot: Some(4)
            }
        );
        let e = job(json!({"kind": "tier"})).unwrap().unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (400, "a tier job needs \"volume\"")
        );
        let e = job(json!({"kind": "recall", "volume": "db"}))
            .unwrap()
            .unwrap_err();
        assert!(e.message.contains("\"snapshot\""), "{}", e.message);
        let e = job(json!({"kind": "recall", "snapshot": 2}))
            .unwrap()
            .unwrap_err();
        assert!(e.message.contains("\"volume\""), "{}", e.message);
        assert_eq!(
            job(json!({"kind": "recall", "volume": "db", "snapshot": 2}))
                .unwrap()
                .unwrap()
                .kind(),
            "recall"
        );
        assert_eq!(
            job(json!({"kind": "tier-gc"})).unwrap().unwrap(),
            TierJob::Gc
        );
        assert_eq!(
            job(json!({"kind": "tier-gc", "volume": "db"}))
                .unwrap()
                .unwrap_err()
                .status,
            400
        );
    }
}
