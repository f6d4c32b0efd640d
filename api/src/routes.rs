//! The axum router: authentication, roles, the audit log, size limits, and
//! one handler per route, each a thin call into the [`Backend`] on a
//! blocking thread.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::auth::{Action, Caller};
use crate::backend::Backend;
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::types::*;

/// Largest request body accepted (413 above).
pub const MAX_BODY: usize = 1 << 20;
/// Largest body of an agent's progress or finish: a job's outcome must not
/// be refused for the size of the log it carries (the appliance keeps the
/// log's head and tail). The agent sends far less (batches of lines).
pub const AGENT_MAX_BODY: usize = 128 << 20;

/// Whether `path` is an agent's progress or finish (`AGENT_MAX_BODY`).
pub(crate) fn agent_report_path(path: &str) -> bool {
    let p: Vec<&str> = path.split('/').collect();
    matches!(
        p.as_slice(),
        ["", "v1", "agent", "jobs", _, "progress" | "finish"]
    )
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
}

/// Runs a backend call on a blocking thread.
pub(crate) async fn run<T, F>(s: &AppState, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&dyn Backend) -> ApiResult<T> + Send + 'static,
{
    let b = s.backend.clone();
    tokio::task::spawn_blocking(move || f(&*b))
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
}

/// JSON body whose rejections are API errors (400 `invalid_json`, 413, 415).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(json_rejection(e)),
        }
    }
}

fn json_rejection(e: JsonRejection) -> ApiError {
    let status = e.status().as_u16();
    match status {
        413 => ApiError::new(
            413,
            "payload_too_large",
            format!("request body above {MAX_BODY} bytes"),
        ),
        415 => ApiError::new(
            415,
            "bad_request",
            "expected Content-Type: application/json",
        ),
        _ => ApiError::new(400, "invalid_json", e.body_text()),
    }
}

/// The client's address, when the server was started with connect info
/// (`into_make_service_with_connect_info`); `None` otherwise, so a router
/// served without it still answers.
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let c = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        Ok(ClientAddr(c.map(|c| c.0.ip())))
    }
}

/// Query string whose rejections are 400s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))
    }
}

pub(crate) fn parse_id(s: &str, what: &str) -> ApiResult<u64> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("{what} id {s:?} is not a number")))
}

/// Checks a resource name from a path or body before anything looks it up
/// ([`cdm_common::names`]: no `/`, `..`, `@`).
pub fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    cdm_common::names::check(name).map_err(|e| {
        ApiError::bad_request(format!(
            "bad {kind} name {name:?}: it {e}; use {}",
            cdm_common::names::RULE
        ))
    })
}

async fn auth_layer(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == "/health" || path == "/v1/login" || path == "/v1/ca" {
        return next.run(req).await;
    }
    // The console's files are public; the data behind them is not.
    if crate::web::is_console(&path) {
        return next.run(req).await;
    }
    // An enrolment or a pairing is authenticated by its one-use token, in
    // the body.
    if path == "/v1/agent/enrol" || path == crate::replication_routes::PAIR_PATH {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string());
    let Some(token) = token else {
        return ApiError::unauthorized("missing Authorization: Bearer TOKEN").into_response();
    };
    let caller = match run(&s, move |b| b.authenticate(&token)).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let method = req.method().clone();
    let reads = method == Method::GET || method == Method::HEAD;
    if !reads {
        // A change whose audit record could not be stored is not made.
        if let Err(e) = run(&s, |b| b.audit_ready()).await {
            return e.into_response();
        }
    }
    // A host's credential reaches only what its agent needs.
    if caller.role == crate::auth::Role::Host && !crate::auth::host_may(method.as_str(), &path) {
        return ApiError::forbidden(format!(
            "{} is a host credential: it may not {method} {path}",
            caller.user
        ))
        .into_response();
    }
    // ... and only the host's own data.
    if caller.role == crate::auth::Role::Host {
        let (c2, m, p) = (caller.clone(), method.to_string(), path.clone());
        if let Err(e) = run(&s, move |b| b.host_access(&c2, &m, &p)).await {
            return e.into_response();
        }
    }
    req.extensions_mut().insert(caller.clone());
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Heartbeats, pulls and progress of agents are no changes worth an
    // audit record each (the jobs and hosts record what they do).
    if reads || path.starts_with("/v1/agent/") {
        tracing::debug!(%method, %path, status, user = %caller.user, ms, "request");
    } else {
        tracing::info!(%method, %path, status, user = %caller.user, ms, "request");
        let m = method.to_string();
        let _ = run(&s, move |b| {
            b.record_audit(&caller, &m, &path, status);
            Ok(())
        })
        .await;
    }
    resp
}

/// The whole API.
pub fn router(backend: Arc<dyn Backend>) -> Router {
    let state = AppState { backend };
    let v1 = Router::new()
        .route("/login", post(login))
        .route("/ca", get(ca))
        .route("/logout", post(logout))
        .route("/openapi.json", get(openapi))
        .route("/pool", get(pool))
        .route("/pool/policy", axum::routing::put(set_pool_policy))
        .route("/pool/grow", post(grow_pool))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route(
            "/volumes/{name}",
            get(volume).patch(grow_volume).delete(delete_volume),
        )
        .route("/volumes/{name}/revert", post(revert_volume))
        .route("/volumes/{name}/policy", get(policy).put(set_policy))
        .route(
            "/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/volumes/{name}/snapshots/{id}",
            get(snapshot).delete(delete_snapshot),
        )
        .route("/volumes/{name}/snapshots/{id}/clones", post(create_clone))
        .route("/clones", get(list_clones))
        .route("/clones/{name}", axum::routing::delete(delete_clone))
        .route("/clones/{name}/promote", post(promote_clone))
        .route("/exports", get(exports))
        .route("/mounts", get(list_mounts).post(create_mount))
        .route("/mounts/{name}", axum::routing::delete(delete_mount))
        .route("/vms", get(list_vms).put(put_vms))
        .route("/vms/tree", get(vm_tree))
        .route("/volumes/{name}/snapshots/{id}/partitions", get(partitions))
        .route("/volumes/{name}/snapshots/{id}/files", get(list_files))
        .route("/volumes/{name}/snapshots/{id}/files/stat", get(stat_file))
        .route(
            "/volumes/{name}/snapshots/{id}/files/content",
            get(file_content),
        )
        .route("/volumes/{name}/snapshots/{id}/files/tar", get(file_tar))
        .route("/jobs", get(list_jobs).post(start_job))
        .route("/jobs/{id}", get(job))
        .route("/events", get(events))
        .route("/audit", get(audit))
        .route("/webhooks", get(list_webhooks).post(create_webhook))
        .route("/webhooks/{id}", get(webhook).delete(delete_webhook))
        .route("/webhooks/{id}/deliveries", get(deliveries))
        .route("/users", get(list_users).post(create_user))
        .route(
            "/users/{name}",
            get(user).patch(update_user).delete(delete_user),
        )
        .route("/users/{name}/tokens", get(list_tokens).post(create_token))
        .route(
            "/users/{name}/tokens/{id}",
            axum::routing::delete(delete_token),
        )
        .route("/clock", get(clock).post(advance_clock))
        .merge(crate::control_routes::routes())
        .merge(crate::replication_routes::routes())
        .merge(crate::drills::routes())
        .merge(crate::vm_recovery::routes())
        .merge(crate::appliance::routes())
        .merge(crate::tier::routes());
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(crate::web::fallback)
        .layer(middleware::from_fn_with_state(state.clone(), auth_layer))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(refuse_declared_oversize))
        .with_state(state)
}

/// The router of the plain-HTTP listener: [`router`], but a peer off this
/// machine's loopback gets 403 `https_required` unless `allow_remote`
/// (tokens must not cross a network in clear).
pub fn plain_router(backend: Arc<dyn Backend>, allow_remote: bool) -> Router {
    let r = router(backend);
    if allow_remote {
        r
    } else {
        r.layer(middleware::from_fn(https_required))
    }
}

/// Whether `ip` is this machine's loopback (an IPv4-mapped one too).
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

async fn https_required(ClientAddr(addr): ClientAddr, req: Request, next: Next) -> Response {
    match addr {
        Some(ip) if !is_loopback(ip) => ApiError::new(
            403,
            "https_required",
            format!(
                "plain HTTP is served to this machine's loopback only ({ip} is not): use the \
                 appliance's https:// address (its CA: GET /v1/ca)"
            ),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// A body whose declared length is over the limit is refused before any of it
/// is read. Without this the server would read up to the limit and then close
/// the connection under a client still sending, which sees a broken pipe
/// instead of the 413. (A chunked body is still cut by `DefaultBodyLimit`.)
async fn refuse_declared_oversize(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The bundle upload streams to a file and counts its own bytes.
    let limit = if path == crate::appliance::UPLOAD_PATH {
        crate::appliance::MAX_BUNDLE
    } else if agent_report_path(path) {
        AGENT_MAX_BODY as u64
    } else {
        MAX_BODY as u64
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => ApiError::new(
            413,
            "payload_too_large",
            format!("request body of {n} bytes is above the {limit}-byte limit"),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

type Caller_ = Extension<Caller>;
type S = State<AppState>;

pub(crate) fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health(State(s): S) -> Response {
    let extra = run(&s, |b| b.health()).await;
    let mut v = serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")});
    match extra {
        Ok(Value::Object(m)) => {
            if let Some(o) = v.as_object_mut() {
                o.extend(m)
            }
        }
        Ok(_) => {}
        Err(e) => return e.into_response(),
    }
    Json(v).into_response()
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")), security(("bearer" = [])))]
async fn metrics(State(s): S) -> ApiResult<Response> {
    let text = run(&s, |b| b.metrics()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The CA certificate (PEM) of the appliance's TLS certificate; no token:
/// a client fetches it to pin it (comparing its fingerprint out of band).
#[utoipa::path(get, path = "/v1/ca", responses((status = 200, description = "The appliance's CA certificate (PEM)", content_type = "application/x-pem-file", body = String), (status = 503, body = ErrorBody)))]
async fn ca(State(s): S) -> ApiResult<Response> {
    let pem = run(&s, |b| b.ca_pem()).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

#[utoipa::path(post, path = "/v1/login", request_body = Login, responses((status = 201, body = TokenCreated), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn login(
    State(s): S,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<Login>,
) -> ApiResult<Response> {
    Ok(created(run(&s, move |b| b.login(req, client)).await?))
}

#[utoipa::path(post, path = "/v1/logout", responses((status = 204)), security(("bearer" = [])))]
async fn logout(State(s): S, Extension(c): Caller_) -> ApiResult<StatusCode> {
    run(&s, move |b| b.logout(&c)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/pool", responses((status = 200, body = PoolInfo)), security(("bearer" = [])))]
async fn pool(State(s): S) -> ApiResult<Json<PoolInfo>> {
    Ok(Json(run(&s, |b| b.pool()).await?))
}

#[utoipa::path(put, path = "/v1/pool/policy", request_body = PoolPolicy, responses((status = 200, body = PoolInfo), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn set_pool_policy(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(p): ApiJson<PoolPolicy>,
) -> ApiResult<Json<PoolInfo>> {
    c.require(Action::Admin)?;
    Ok(Json(run(&s, move |b| b.set_pool_policy(&c, p)).await?))
}

#[utoipa::path(post, path = "/v1/pool/grow", request_body = PoolGrow,
    responses((status = 200, body = PoolInfo), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 507, body = ErrorBody)),
    security(("bearer" = [])))]
async fn grow_pool(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<PoolGrow>,
) -> ApiResult<Json<PoolInfo>> {
    c.require(Action::Admin)?;
    Ok(Json(run(&s, move |b| b.grow_pool(&c, req.size)).await?))
}

#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = [Volume])), security(("bearer" = [])))]
async fn list_volumes(State(s): S) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json(run(&s, |b| b.list_volumes()).await?))
}

#[utoipa::path(post, path = "/v1/volumes", request_body = VolumeCreate,
    responses((status = 201, body = Volume), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_volume(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<VolumeCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_name("volume", &req.name)?;
    Ok(created(run(&s, move |b| b.create_volume(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", params(("name" = String, Path)), responses((status = 200, body = Volume), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn volume(State(s): S, Path(name): Path<String>) -> ApiResult<Json<Volume>> {
    check_name("volume", &name)?;
    Ok(Json(run(&s, move |b| b.volume(&name)).await?))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/revert", params(("name" = String, Path)), request_body = VolumeRevert, responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn revert_volume(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VolumeRevert>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    Ok(Json(
        run(&s, move |b| b.revert_volume(&c, &name, req.snapshot)).await?,
    ))
}

#[utoipa::path(patch, path = "/v1/volumes/{name}", params(("name" = String, Path)), request_body = VolumeUpdate, responses((status = 200, body = Volume)), security(("bearer" = [])))]
async fn grow_volume(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VolumeUpdate>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    Ok(Json(
        run(&s, move |b| b.grow_volume(&c, &name, req.size)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", params(("name" = String, Path), DeleteQuery), responses((status = 204), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_volume(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    c.require(Action::Delete)?;
    check_name("volume", &name)?;
    run(&s, move |b| b.delete_volume(&c, &name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/volumes/{name}/policy", operation_id = "volume_policy", params(("name" = String, Path)), responses((status = 200, body = SnapshotPolicy)), security(("bearer" = [])))]
async fn policy(State(s): S, Path(name): Path<String>) -> ApiResult<Json<SnapshotPolicy>> {
    check_name("volume", &name)?;
    Ok(Json(run(&s, move |b| b.policy(&name)).await?))
}

#[utoipa::path(put, path = "/v1/volumes/{name}/policy", params(("name" = String, Path)), request_body = SnapshotPolicy, responses((status = 200, body = SnapshotPolicy)), security(("bearer" = [])))]
async fn set_policy(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(p): ApiJson<SnapshotPolicy>,
) -> ApiResult<Json<SnapshotPolicy>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    Ok(Json(run(&s, move |b| b.set_policy(&c, &name, p)).await?))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots", params(("name" = String, Path), PageQuery), responses((status = 200, body = [Snapshot], headers(("x-total-count" = u64, description = "snapshots of the volume, whatever the page")))), security(("bearer" = [])))]
async fn list_snapshots(
    State(s): S,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Response> {
    check_name("volume", &name)?;
    let mut all = run(&s, move |b| b.list_snapshots(&name)).await?;
    let total = all.len();
    if q.newest_first {
        all.reverse();
    }
    let page: Vec<Snapshot> = all
        .into_iter()
        .skip(q.offset.unwrap_or(0))
        .take(q.limit.unwrap_or(usize::MAX))
        .collect();
    Ok(([("x-total-count", total.to_string())], Json(page)).into_response())
}

#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots", params(("name" = String, Path)), request_body = SnapshotCreate, responses((status = 201, body = Snapshot)), security(("bearer" = [])))]
async fn create_snapshot(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SnapshotCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    Ok(created(
        run(&s, move |b| b.create_snapshot(&c, &name, req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}", params(("name" = String, Path), ("id" = u64, Path)), responses((status = 200, body = Snapshot)), security(("bearer" = [])))]
async fn snapshot(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Snapshot>> {
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(Json(run(&s, move |b| b.snapshot(&name, id)).await?))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/snapshots/{id}", params(("name" = String, Path), ("id" = u64, Path), DeleteQuery), responses((status = 204), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_snapshot(
    State(s): S,
    Extension(c): Caller_,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    // A host may delete its point-in-time restores' read snapshots of a
    // log volume (the backend's host check allowed this one), never with
    // force: a snapshot with clones or readers stays.
    if c.role == crate::auth::Role::Host {
        if q.force {
            return Err(ApiError::forbidden(
                "a host deletes a snapshot without force",
            ));
        }
    } else {
        c.require(Action::Delete)?;
    }
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    run(&s, move |b| b.delete_snapshot(&c, &name, id, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots/{id}/clones", params(("name" = String, Path), ("id" = u64, Path)), request_body = CloneCreate, responses((status = 201, body = Volume)), security(("bearer" = [])))]
async fn create_clone(
    State(s): S,
    Extension(c): Caller_,
    Path((name, id)): Path<(String, String)>,
    ApiJson(req): ApiJson<CloneCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    check_name("clone", &req.name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(created(
        run(&s, move |b| b.create_clone(&c, &name, id, &req.name)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/clones", responses((status = 200, body = [Volume])), security(("bearer" = [])))]
async fn list_clones(State(s): S) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json(run(&s, |b| b.list_clones()).await?))
}

#[utoipa::path(post, path = "/v1/clones/{name}/promote", params(("name" = String, Path)), responses((status = 200, body = Volume)), security(("bearer" = [])))]
async fn promote_clone(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Write)?;
    check_name("clone", &name)?;
    Ok(Json(run(&s, move |b| b.promote_clone(&c, &name)).await?))
}

#[utoipa::path(delete, path = "/v1/clones/{name}", params(("name" = String, Path), DeleteQuery), responses((status = 204)), security(("bearer" = [])))]
async fn delete_clone(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> ApiResult<StatusCode> {
    // A host may delete the clones it made (the backend checks which).
    if c.role != crate::auth::Role::Host {
        c.require(Action::Delete)?;
    }
    check_name("clone", &name)?;
    run(&s, move |b| b.delete_clone(&c, &name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/exports", responses((status = 200, body = [Export])), security(("bearer" = [])))]
async fn exports(State(s): S) -> ApiResult<Json<Vec<Export>>> {
    Ok(Json(run(&s, |b| b.list_exports()).await?))
}

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = [VmRecord])), security(("bearer" = [])))]
async fn list_vms(State(s): S) -> ApiResult<Json<Vec<VmRecord>>> {
    Ok(Json(run(&s, |b| b.list_vms()).await?))
}

#[utoipa::path(put, path = "/v1/vms", request_body = VmInventory, responses((status = 200, body = [VmRecord]), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
async fn put_vms(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<VmInventory>,
) -> ApiResult<Json<Vec<VmRecord>>> {
    c.require(Action::Write)?;
    let mut seen = std::collections::HashSet::new();
    for v in &req.vms {
        if v.name.trim().is_empty() || v.name.len() > 256 {
            return Err(ApiError::bad_request(
                "a VM name is empty or longer than 256 bytes",
            ));
        }
        if !seen.insert(v.name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "VM {} is listed twice",
                v.name
            )));
        }
    }
    Ok(Json(run(&s, move |b| b.put_vms(&c, req.vms)).await?))
}

#[utoipa::path(get, path = "/v1/vms/tree", params(VmTreeQuery), responses((status = 200, body = VmTree), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
async fn vm_tree(State(s): S, ApiQuery(q): ApiQuery<VmTreeQuery>) -> ApiResult<Json<VmTree>> {
    let by = crate::vms::By::parse(&q.by)?;
    let vms = run(&s, |b| b.list_vms()).await?;
    Ok(Json(VmTree {
        by: q.by,
        groups: crate::vms::tree(&vms, &by),
    }))
}

#[utoipa::path(get, path = "/v1/mounts", responses((status = 200, body = [Mount])), security(("bearer" = [])))]
async fn list_mounts(State(s): S) -> ApiResult<Json<Vec<Mount>>> {
    Ok(Json(run(&s, |b| b.list_mounts()).await?))
}

#[utoipa::path(post, path = "/v1/mounts", request_body = MountCreate, responses((status = 201, body = Mount), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_mount(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<MountCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    if let Some(n) = &req.clone {
        check_name("clone", n)?;
    }
    let m = run(&s, move |b| b.create_mount(&c, req)).await?;
    Ok((StatusCode::CREATED, Json(m)).into_response())
}

/// `DELETE /v1/mounts/{name}?delete_clone=true`.
#[derive(serde::Deserialize, utoipa::IntoParams, Default)]
#[serde(deny_unknown_fields)]
pub struct UnmountQuery {
    #[serde(default)]
    pub delete_clone: bool,
}

#[utoipa::path(delete, path = "/v1/mounts/{name}", params(("name" = String, Path), UnmountQuery), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_mount(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<UnmountQuery>,
) -> ApiResult<StatusCode> {
    c.require(if q.delete_clone {
        Action::Delete
    } else {
        Action::Write
    })?;
    check_name("mount", &name)?;
    run(&s, move |b| b.delete_mount(&c, &name, q.delete_clone)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}/partitions", params(("name" = String, Path), ("id" = u64, Path)), responses((status = 200, body = [PartitionInfo])), security(("bearer" = [])))]
async fn partitions(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<Vec<PartitionInfo>>> {
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(Json(run(&s, move |b| b.partitions(&name, id)).await?))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}/files", params(("name" = String, Path), ("id" = u64, Path), FilesQuery), responses((status = 200, body = [FileEntry]), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)), security(("bearer" = [])))]
async fn list_files(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<Json<Vec<FileEntry>>> {
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(Json(run(&s, move |b| b.list_files(&name, id, q)).await?))
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}/files/stat", params(("name" = String, Path), ("id" = u64, Path), FilesQuery), responses((status = 200, body = FileEntry)), security(("bearer" = [])))]
async fn stat_file(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<Json<FileEntry>> {
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(Json(run(&s, move |b| b.stat_file(&name, id, q)).await?))
}

async fn stream(
    s: &AppState,
    name: String,
    id: String,
    q: FilesQuery,
    tar: bool,
) -> ApiResult<Response> {
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    let d = run(s, move |b| b.download(&name, id, q, tar)).await?;
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(
        d.chunks,
        |mut rx| async move {
            rx.recv()
                .await
                .map(|c| (c.map_err(std::io::Error::other), rx))
        },
    ));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    let ctype = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    if let Some(n) = d.size {
        h.insert(header::CONTENT_LENGTH, n.into());
    }
    let safe: String = d
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = header::HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}/files/content", params(("name" = String, Path), ("id" = u64, Path), FilesQuery), responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream")), security(("bearer" = [])))]
async fn file_content(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<Response> {
    stream(&s, name, id, q, false).await
}

#[utoipa::path(get, path = "/v1/volumes/{name}/snapshots/{id}/files/tar", params(("name" = String, Path), ("id" = u64, Path), FilesQuery), responses((status = 200, description = "a tar of the tree", content_type = "application/x-tar")), security(("bearer" = [])))]
async fn file_tar(
    State(s): S,
    Path((name, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<FilesQuery>,
) -> ApiResult<Response> {
    stream(&s, name, id, q, true).await
}

#[utoipa::path(get, path = "/v1/jobs", params(crate::control::JobQuery), responses((status = 200, body = [Job])), security(("bearer" = [])))]
async fn list_jobs(
    State(s): S,
    ApiQuery(q): ApiQuery<crate::control::JobQuery>,
) -> ApiResult<Json<Vec<Job>>> {
    Ok(Json(run(&s, move |b| b.list_jobs(q)).await?))
}

#[utoipa::path(post, path = "/v1/jobs", request_body = JobCreate, responses((status = 202, body = Job), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "`not_configured` (tier jobs without `PUT /v1/tier`), or a conflict", body = ErrorBody)), security(("bearer" = [])))]
async fn start_job(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<JobCreate>,
) -> ApiResult<Response> {
    // vm-backup reads files of the appliance named in the request (the
    // inventory and the disks it lists) with the daemon's rights: admins
    // only.
    c.require(match req.kind.as_str() {
        "delete-volume" => Action::Delete,
        "vm-backup" => Action::Admin,
        _ => Action::Write,
    })?;
    if let Some(v) = &req.volume {
        check_name("volume", v)?;
    }
    let j = run(&s, move |b| b.start_job(&c, req)).await?;
    Ok((StatusCode::ACCEPTED, Json(j)).into_response())
}

#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = u64, Path)), responses((status = 200, body = Job)), security(("bearer" = [])))]
async fn job(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let id = parse_id(&id, "job")?;
    Ok(Json(run(&s, move |b| b.job(id)).await?))
}

#[utoipa::path(get, path = "/v1/events", params(EventQuery), responses((status = 200, body = [Event])), security(("bearer" = [])))]
async fn events(State(s): S, ApiQuery(q): ApiQuery<EventQuery>) -> ApiResult<Json<Vec<Event>>> {
    Ok(Json(run(&s, move |b| b.events(q)).await?))
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = [AuditEntry])), security(("bearer" = [])))]
async fn audit(
    State(s): S,
    Extension(c): Caller_,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    c.require(Action::ReadAudit)?;
    Ok(Json(run(&s, move |b| b.audit(q)).await?))
}

#[utoipa::path(get, path = "/v1/webhooks", responses((status = 200, body = [Webhook])), security(("bearer" = [])))]
async fn list_webhooks(State(s): S) -> ApiResult<Json<Vec<Webhook>>> {
    Ok(Json(run(&s, |b| b.list_webhooks()).await?))
}

#[utoipa::path(post, path = "/v1/webhooks", request_body = WebhookCreate, responses((status = 201, body = Webhook)), security(("bearer" = [])))]
async fn create_webhook(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<WebhookCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    Ok(created(run(&s, move |b| b.create_webhook(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/webhooks/{id}", params(("id" = u64, Path)), responses((status = 200, body = Webhook)), security(("bearer" = [])))]
async fn webhook(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Webhook>> {
    let id = parse_id(&id, "webhook")?;
    Ok(Json(run(&s, move |b| b.webhook(id)).await?))
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", params(("id" = u64, Path)), responses((status = 204)), security(("bearer" = [])))]
async fn delete_webhook(
    State(s): S,
    Extension(c): Caller_,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "webhook")?;
    run(&s, move |b| b.delete_webhook(&c, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", params(("id" = u64, Path)), responses((status = 200, body = [Delivery])), security(("bearer" = [])))]
async fn deliveries(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Vec<Delivery>>> {
    let id = parse_id(&id, "webhook")?;
    Ok(Json(run(&s, move |b| b.deliveries(id)).await?))
}

#[utoipa::path(get, path = "/v1/users", responses((status = 200, body = [User])), security(("bearer" = [])))]
async fn list_users(State(s): S, Extension(c): Caller_) -> ApiResult<Json<Vec<User>>> {
    c.require(Action::Admin)?;
    Ok(Json(run(&s, |b| b.list_users()).await?))
}

#[utoipa::path(post, path = "/v1/users", request_body = UserCreate, responses((status = 201, body = User)), security(("bearer" = [])))]
async fn create_user(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<UserCreate>,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    check_name("user", &req.name)?;
    Ok(created(run(&s, move |b| b.create_user(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/users/{name}", params(("name" = String, Path)), responses((status = 200, body = User)), security(("bearer" = [])))]
async fn user(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
) -> ApiResult<Json<User>> {
    check_name("user", &name)?;
    c.require_self_or_admin(&name)?;
    Ok(Json(run(&s, move |b| b.user(&name)).await?))
}

#[utoipa::path(patch, path = "/v1/users/{name}", params(("name" = String, Path)), request_body = UserUpdate, responses((status = 200, body = User)), security(("bearer" = [])))]
async fn update_user(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UserUpdate>,
) -> ApiResult<Json<User>> {
    c.require(Action::Admin)?;
    check_name("user", &name)?;
    Ok(Json(run(&s, move |b| b.update_user(&c, &name, req)).await?))
}

#[utoipa::path(delete, path = "/v1/users/{name}", params(("name" = String, Path)), responses((status = 204)), security(("bearer" = [])))]
async fn delete_user(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Admin)?;
    check_name("user", &name)?;
    run(&s, move |b| b.delete_user(&c, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/users/{name}/tokens", params(("name" = String, Path)), responses((status = 200, body = [Token])), security(("bearer" = [])))]
async fn list_tokens(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Token>>> {
    check_name("user", &name)?;
    c.require_self_or_admin(&name)?;
    Ok(Json(run(&s, move |b| b.list_tokens(&name)).await?))
}

#[utoipa::path(post, path = "/v1/users/{name}/tokens", params(("name" = String, Path)), request_body = TokenCreate, responses((status = 201, body = TokenCreated)), security(("bearer" = [])))]
async fn create_token(
    State(s): S,
    Extension(c): Caller_,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<TokenCreate>,
) -> ApiResult<Response> {
    check_name("user", &name)?;
    c.require_self_or_admin(&name)?;
    check_name("token", &req.name)?;
    Ok(created(
        run(&s, move |b| b.create_token(&c, &name, req)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/users/{name}/tokens/{id}", params(("name" = String, Path), ("id" = String, Path)), responses((status = 204)), security(("bearer" = [])))]
async fn delete_token(
    State(s): S,
    Extension(c): Caller_,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    check_name("user", &name)?;
    c.require_self_or_admin(&name)?;
    run(&s, move |b| b.delete_token(&c, &name, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/clock", responses((status = 200, body = Clock)), security(("bearer" = [])))]
async fn clock(State(s): S) -> ApiResult<Json<Clock>> {
    Ok(Json(run(&s, |b| b.clock()).await?))
}

#[utoipa::path(post, path = "/v1/clock", request_body = ClockAdvance, responses((status = 200, body = Clock)), security(("bearer" = [])))]
async fn advance_clock(
    State(s): S,
    Extension(c): Caller_,
    ApiJson(req): ApiJson<ClockAdvance>,
) -> ApiResult<Json<Clock>> {
    c.require(Action::Admin)?;
    Ok(Json(
        run(&s, move |b| b.advance_clock(&c, req.advance_secs)).await?,
    ))
}

/// Paths documented in the OpenAPI document (kept here, next to the handlers).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "cdm appliance API", description = "Volumes (stage disks and clones), snapshots, exports, policies, jobs, events, webhooks, users and tokens."),
    paths(
        health, metrics, ca, login, logout, pool, set_pool_policy, grow_pool, list_volumes, create_volume,
        volume, grow_volume, revert_volume, delete_volume, policy, set_policy, list_snapshots,
        create_snapshot, snapshot, delete_snapshot, create_clone, list_clones,
        promote_clone, delete_clone, exports, list_mounts, create_mount, delete_mount,
        list_vms, put_vms, vm_tree,
        partitions, list_files, stat_file, file_content, file_tar, list_jobs, start_job, job,
        events, audit,
        list_webhooks, create_webhook, webhook, delete_webhook, deliveries, list_users,
        create_user, user, update_user, delete_user, list_tokens, create_token,
        delete_token, clock, advance_clock
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;
