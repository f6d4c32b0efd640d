//! Routes of the control plane (`docs/control-plane.md`): hosts and
//! enrolment, the agent protocol, applications, protection policies,
//! points, restores, job logs and cancel. Mounted under `/v1` by
//! [`crate::routes::router`].

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};

use crate::auth::{Action, Caller, Role};
use crate::control::*;
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::routes::{check_name, created, parse_id, run, ApiJson, ApiQuery, AppState};
use crate::types::{ErrorBody, Job};

type S = State<AppState>;
type C = Extension<Caller>;

/// The control plane's routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/hosts/enrolments", post(create_enrolment))
        .route("/hosts", get(list_hosts))
        .route("/hosts/{name}", get(host).delete(retire_host))
        .route("/agent/enrol", post(agent_enrol))
        .route("/agent/heartbeat", post(agent_heartbeat))
        .route("/agent/jobs", get(agent_jobs))
        .route("/agent/jobs/{id}/progress", post(agent_progress))
        .route("/agent/jobs/{id}/finish", post(agent_finish))
        .route(
            "/applications",
            get(list_applications).post(create_application),
        )
        .route(
            "/applications/{id}",
            get(application).delete(delete_application),
        )
        .route("/applications/{id}/policy", put(assign_policy))
        .route("/applications/{id}/backups", post(start_backup))
        .route("/applications/{id}/points", get(points))
        .route("/applications/{id}/restores", post(start_restore))
        .route(
            "/protection-policies",
            get(list_policies).post(create_policy),
        )
        .route(
            "/protection-policies/{name}",
            get(policy).put(update_policy).delete(delete_policy),
        )
        .route("/jobs/{id}/log", get(job_log))
        .route("/jobs/{id}/cancel", post(cancel_job))
}

/// The agent protocol is for host credentials only.
fn require_host(c: &Caller) -> ApiResult<()> {
    if c.role == Role::Host {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "user {} is no host: the agent protocol needs a host credential",
            c.user
        )))
    }
}

fn accepted(j: Job) -> Response {
    (StatusCode::ACCEPTED, Json(j)).into_response()
}

#[utoipa::path(post, path = "/v1/hosts/enrolments", request_body = EnrolmentCreate, responses((status = 201, body = EnrolmentToken), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn create_enrolment(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<EnrolmentCreate>,
) -> ApiResult<Response> {
    c.require(Action::Admin)?;
    if let Some(n) = &req.name {
        check_name("host", n)?;
    }
    Ok(created(
        run(&s, move |b| b.create_enrolment(&c, req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = [Host])), security(("bearer" = [])))]
async fn list_hosts(State(s): S) -> ApiResult<Json<Vec<Host>>> {
    Ok(Json(run(&s, |b| b.list_hosts()).await?))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", params(("name" = String, Path)), responses((status = 200, body = Host), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn host(State(s): S, Path(name): Path<String>) -> ApiResult<Json<Host>> {
    check_name("host", &name)?;
    Ok(Json(run(&s, move |b| b.host(&name)).await?))
}

#[utoipa::path(delete, path = "/v1/hosts/{name}", params(("name" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn retire_host(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Admin)?;
    check_name("host", &name)?;
    run(&s, move |b| b.retire_host(&c, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/agent/enrol", request_body = AgentEnrol, responses((status = 201, body = AgentEnrolled), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn agent_enrol(State(s): S, ApiJson(req): ApiJson<AgentEnrol>) -> ApiResult<Response> {
    if let Some(n) = &req.name {
        check_name("host", n)?;
    }
    Ok(created(run(&s, move |b| b.agent_enrol(req)).await?))
}

#[utoipa::path(post, path = "/v1/agent/heartbeat", request_body = Heartbeat, responses((status = 200, body = HeartbeatReply), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn agent_heartbeat(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<Heartbeat>,
) -> ApiResult<Json<HeartbeatReply>> {
    require_host(&c)?;
    Ok(Json(run(&s, move |b| b.agent_heartbeat(&c, req)).await?))
}

#[utoipa::path(get, path = "/v1/agent/jobs", params(AgentPull), responses((status = 200, body = [AgentJob])), security(("bearer" = [])))]
async fn agent_jobs(
    State(s): S,
    Extension(c): C,
    ApiQuery(q): ApiQuery<AgentPull>,
) -> ApiResult<Json<Vec<AgentJob>>> {
    require_host(&c)?;
    let wait = q.wait.unwrap_or(0).min(30);
    Ok(Json(run(&s, move |b| b.agent_jobs(&c, wait)).await?))
}

#[utoipa::path(post, path = "/v1/agent/jobs/{id}/progress", params(("id" = u64, Path)), request_body = AgentProgress, responses((status = 200, body = ProgressReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn agent_progress(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AgentProgress>,
) -> ApiResult<Json<ProgressReply>> {
    require_host(&c)?;
    let id = parse_id(&id, "job")?;
    Ok(Json(run(&s, move |b| b.agent_progress(&c, id, req)).await?))
}

#[utoipa::path(post, path = "/v1/agent/jobs/{id}/finish", params(("id" = u64, Path)), request_body = AgentFinish, responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn agent_finish(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AgentFinish>,
) -> ApiResult<Json<Job>> {
    require_host(&c)?;
    let id = parse_id(&id, "job")?;
    Ok(Json(run(&s, move |b| b.agent_finish(&c, id, req)).await?))
}

#[utoipa::path(get, path = "/v1/applications", params(AppQuery), responses((status = 200, body = [Application])), security(("bearer" = [])))]
async fn list_applications(
    State(s): S,
    ApiQuery(q): ApiQuery<AppQuery>,
) -> ApiResult<Json<Vec<Application>>> {
    Ok(Json(run(&s, move |b| b.list_applications(q.host)).await?))
}

#[utoipa::path(post, path = "/v1/applications", request_body = ApplicationCreate, responses((status = 201, body = Application), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_application(
    State(s): S,
    Extension(c): C,
    ApiJson(req): ApiJson<ApplicationCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_name("host", &req.host)?;
    if let Some(v) = &req.volume {
        check_name("volume", v)?;
    }
    Ok(created(
        run(&s, move |b| b.create_application(&c, req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/applications/{id}", params(("id" = u64, Path)), responses((status = 200, body = Application), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn application(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Application>> {
    let id = parse_id(&id, "application")?;
    Ok(Json(run(&s, move |b| b.application(id)).await?))
}

#[utoipa::path(delete, path = "/v1/applications/{id}", params(("id" = u64, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_application(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Delete)?;
    let id = parse_id(&id, "application")?;
    run(&s, move |b| b.delete_application(&c, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/v1/applications/{id}/policy", params(("id" = u64, Path)), request_body = PolicyAssign, responses((status = 200, body = Application), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn assign_policy(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PolicyAssign>,
) -> ApiResult<Json<Application>> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "application")?;
    Ok(Json(run(&s, move |b| b.assign_policy(&c, id, req)).await?))
}

#[utoipa::path(post, path = "/v1/applications/{id}/backups", params(("id" = u64, Path)), responses((status = 202, body = Job), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn start_backup(State(s): S, Extension(c): C, Path(id): Path<String>) -> ApiResult<Response> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "application")?;
    Ok(accepted(run(&s, move |b| b.start_backup(&c, id)).await?))
}

#[utoipa::path(get, path = "/v1/applications/{id}/points", params(("id" = u64, Path)), responses((status = 200, body = [Point])), security(("bearer" = [])))]
async fn points(State(s): S, Path(id): Path<String>) -> ApiResult<Json<Vec<Point>>> {
    let id = parse_id(&id, "application")?;
    Ok(Json(run(&s, move |b| b.points(id)).await?))
}

#[utoipa::path(post, path = "/v1/applications/{id}/restores", params(("id" = u64, Path)), request_body = RestoreCreate, responses((status = 202, body = Job), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn start_restore(
    State(s): S,
    Extension(c): C,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "application")?;
    if let Some(h) = &req.host {
        check_name("host", h)?;
    }
    // The agent names the clone (and its attachment) after it.
    if let Some(n) = &req.name {
        check_name("clone", n)?;
    }
    Ok(accepted(
        run(&s, move |b| b.start_restore(&c, id, req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/protection-policies", responses((status = 200, body = [ProtectionPolicy])), security(("bearer" = [])))]
async fn list_policies(State(s): S) -> ApiResult<Json<Vec<ProtectionPolicy>>> {
    Ok(Json(run(&s, |b| b.list_protection_policies()).await?))
}

#[utoipa::path(post, path = "/v1/protection-policies", request_body = ProtectionPolicy, responses((status = 201, body = ProtectionPolicy), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_policy(
    State(s): S,
    Extension(c): C,
    ApiJson(p): ApiJson<ProtectionPolicy>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    check_name("policy", &p.name)?;
    Ok(created(
        run(&s, move |b| b.create_protection_policy(&c, p)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/protection-policies/{name}", params(("name" = String, Path)), responses((status = 200, body = ProtectionPolicy), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn policy(State(s): S, Path(name): Path<String>) -> ApiResult<Json<ProtectionPolicy>> {
    check_name("policy", &name)?;
    Ok(Json(run(&s, move |b| b.protection_policy(&name)).await?))
}

#[utoipa::path(put, path = "/v1/protection-policies/{name}", params(("name" = String, Path)), request_body = ProtectionPolicy, responses((status = 200, body = ProtectionPolicy), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn update_policy(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
    ApiJson(p): ApiJson<ProtectionPolicy>,
) -> ApiResult<Json<ProtectionPolicy>> {
    c.require(Action::Write)?;
    check_name("policy", &name)?;
    Ok(Json(
        run(&s, move |b| b.update_protection_policy(&c, &name, p)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/protection-policies/{name}", params(("name" = String, Path)), responses((status = 204), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn delete_policy(
    State(s): S,
    Extension(c): C,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    c.require(Action::Delete)?;
    check_name("policy", &name)?;
    run(&s, move |b| b.delete_protection_policy(&c, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/jobs/{id}/log", params(("id" = u64, Path)), responses((status = 200, body = JobLog), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn job_log(State(s): S, Path(id): Path<String>) -> ApiResult<Json<JobLog>> {
    let id = parse_id(&id, "job")?;
    Ok(Json(run(&s, move |b| b.job_log(id)).await?))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = u64, Path)), responses((status = 200, body = Job), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn cancel_job(State(s): S, Extension(c): C, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "job")?;
    Ok(Json(run(&s, move |b| b.cancel_job(&c, id)).await?))
}

/// The control plane's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        create_enrolment, list_hosts, host, retire_host, agent_enrol, agent_heartbeat,
        agent_jobs, agent_progress, agent_finish, list_applications, create_application,
        application, delete_application, assign_policy, start_backup, points, start_restore,
        list_policies, create_policy, policy, update_policy, delete_policy, job_log, cancel_job
    ),
    modifiers(&BearerAuth)
)]
pub struct ControlDoc;
