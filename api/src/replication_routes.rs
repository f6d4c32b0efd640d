//! Routes of replication (`docs/replication.md`): pairing tokens, the
//! appliance-to-appliance pairing call, peers, links, transfers, and the
//! promotion and demotion of replica volumes and the keys of sealed
//! ones. Mounted under `/v1` by
//! [`crate::routes::router`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use crate::auth::{Action, Caller};
use crate::error::ApiResult;
use crate::openapi::BearerAuth;
use crate::replication::*;
use crate::routes::{check_name, created, parse_id, run, ApiJson, AppState, ClientAddr};
use crate::types::{ErrorBody, Job, Volume};

type S = State<AppState>;
type C = Extension<Caller>;

/// The path of the pairing call, which carries its own credential (the
/// token in its body) instead of a bearer token.
pub const PAIR_PATH: &str = "/v1/replication/pair";

/// Replication's routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/replication/pairings", post(create_pairing))
        .route("/replication/pair", post(pair))
        .route("/replication/peers", get(list_peers).post(create_peer))
        .route(
            "/replication/peers/{name}",
            axum::routing::delete(delete_peer),
        )
        .route("/replication/links", get(list_links).post(create_link))
        .route("/replication/links/{id}", get(link).delete(delete_link))
        .route("/replication/links/{id}/pause", post(pause_link))
        .route("/replication/links/{id}/resume", post(resume_link))
        .route("/replication/links/{id}/run", post(run_link))
        .route("/replication/links/{id}/transfers", get(transfers))
        .route("/volumes/{name}/promote", post(promote_volume))
        .route("/volumes/{name}/demote", post(demote_volume))
        .route(
            "/volumes/{name}/key",
            post(load_volume_key).delete(unload_volume_key),
        )
}

#[utoipa::path(post, path = "/v1/replication/pairings", request_body = PairingCreate, responses((status = 201, body = PairingToken), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn create_pairing(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<PairingCreate>,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    Ok(created(run(&s, move |b| b.create_pairing(&c, req)).await?))
}

#[utoipa::path(post, path = "/v1/replication/pair", request_body = PairRequest, responses((status = 200, body = PairReply), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pair(
    State(s): S,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<PairRequest>,
) -> ApiResult<Json<PairReply>> {
    check_name("appliance", &req.name)?;
    Ok(Json(run(&s, move |b| b.pair(req, client)).await?))
}

#[utoipa::path(post, path = "/v1/replication/peers", request_body = PeerCreate, responses((status = 201, body = Peer), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)), security(("bearer" = [])))]
async fn create_peer(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<PeerCreate>,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    check_name("peer", &req.name)?;
    Ok(created(run(&s, move |b| b.create_peer(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/replication/peers", responses((status = 200, body = [Peer])), security(("bearer" = [])))]
async fn list_peers(State(s): S) -> ApiResult<Json<Vec<Peer>>> {
    Ok(Json(run(&s, |b| b.list_peers()).await?))
}

#[utoipa::path(delete, path = "/v1/replication/peers/{name}", params(("name" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_peer(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Admin)?;
    check_name("peer", &name)?;
    run(&s, move |b| b.delete_peer(&c, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/replication/links", request_body = LinkCreate, responses((status = 201, body = Link), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn create_link(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<LinkCreate>,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    check_name("peer", &req.peer)?;
    if let Some(v) = &req.volume {
        check_name("volume", v)?;
    }
    if let Some(p) = &req.policy {
        check_name("policy", p)?;
    }
    Ok(created(run(&s, move |b| b.create_link(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/replication/links", responses((status = 200, body = [Link])), security(("bearer" = [])))]
async fn list_links(State(s): S) -> ApiResult<Json<Vec<Link>>> {
    Ok(Json(run(&s, |b| b.list_links()).await?))
}

#[utoipa::path(get, path = "/v1/replication/links/{id}", params(("id" = u64, Path)), responses((status = 200, body = Link), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn link(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Link>> {
    let id = parse_id(&id, "link")?;
    Ok(Json(run(&s, move |b| b.link(id)).await?))
}

#[utoipa::path(delete, path = "/v1/replication/links/{id}", params(("id" = u64, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_link(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Admin)?;
    let id = parse_id(&id, "link")?;
    run(&s, move |b| b.delete_link(&c, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/replication/links/{id}/pause", params(("id" = u64, Path)), responses((status = 200, body = Link), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn pause_link(State(s): S, Extension(c): C, Path(id): Path<String>) -> ApiResult<Json<Link>> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "link")?;
    Ok(Json(
        run(&s, move |b| b.set_link_enabled(&c, id, false)).await?,
    ))
}

#[utoipa::path(post, path = "/v1/replication/links/{id}/resume", params(("id" = u64, Path)), responses((status = 200, body = Link), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn resume_link(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
) -> ApiResult<Json<Link>> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "link")?;
    Ok(Json(
        run(&s, move |b| b.set_link_enabled(&c, id, true)).await?,
    ))
}

#[utoipa::path(post, path = "/v1/replication/links/{id}/run", params(("id" = u64, Path)), responses((status = 202, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn run_link(State(s): S, Extension(c): C, Path(id): Path<String>) -> ApiResult<Response> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "link")?;
    let j = run(&s, move |b| b.run_link(&c, id)).await?;
    Ok((StatusCode::ACCEPTED, Json(j)).into_response())
}

#[utoipa::path(get, path = "/v1/replication/links/{id}/transfers", params(("id" = u64, Path)), responses((status = 200, body = [Transfer]), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn transfers(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Vec<Transfer>>> {
    let id = parse_id(&id, "link")?;
    Ok(Json(run(&s, move |b| b.transfers(id)).await?))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/promote", params(("name" = String, Path)), responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn promote_volume(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Admin)?;
    check_name("volume", &name)?;
    Ok(Json(run(&s, move |b| b.promote_volume(&c, &name)).await?))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/demote", params(("name" = String, Path)), request_body = VolumeDemote, responses((status = 200, body = Volume), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn demote_volume(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VolumeDemote>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Admin)?;
    check_name("volume", &name)?;
    check_name("peer", &req.peer)?;
    Ok(Json(
        run(&s, move |b| b.demote_volume(&c, &name, req)).await?,
    ))
}

/// Exactly one of a key file and a passphrase, not empty.
fn check_key(k: &VolumeKey) -> ApiResult<()> {
    match (&k.key_file_hex, &k.passphrase) {
        (Some(h), None) if !h.trim().is_empty() => Ok(()),
        (None, Some(p)) if !p.is_empty() => Ok(()),
        _ => Err(crate::error::ApiError::bad_request(
            "give exactly one of \"key_file_hex\" and \"passphrase\"",
        )),
    }
}

#[utoipa::path(post, path = "/v1/volumes/{name}/key", params(("name" = String, Path)), request_body = VolumeKey, responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn load_volume_key(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<VolumeKey>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    check_key(&req)?;
    Ok(Json(
        run(&s, move |b| b.load_volume_key(&c, &name, req)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/key", params(("name" = String, Path)), responses((status = 200, body = Volume), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn unload_volume_key(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    Ok(Json(
        run(&s, move |b| b.unload_volume_key(&c, &name)).await?,
    ))
}

/// Replication's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        create_pairing, pair, create_peer, list_peers, delete_peer, create_link, list_links,
        link, delete_link, pause_link, resume_link, run_link, transfers, promote_volume,
        demote_volume, load_volume_key, unload_volume_key
    ),
    modifiers(&BearerAuth)
)]
pub struct ReplicationDoc;
