//! Recovery drills (`docs/control-plane.md`, "Drills"): a point cloned,
//! started in isolation, checked and torn down, with its measured RTO and
//! RPO kept as a report. The resource types, the routes, what the routes
//! need of the appliance ([`DrillBackend`]), and the comparison of a
//! probe's answer with what it expects (shared with `cdm-agent`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Action, Caller};
use crate::error::{ApiError, ApiResult};
use crate::openapi::BearerAuth;
use crate::routes::{check_name, parse_id, run, ApiJson, ApiQuery, AppState};
use crate::types::{ErrorBody, Job};

/// A drill's time limit when the policy does not say.
pub const DEFAULT_TIMEOUT_SECS: u64 = 600;
/// Longest time limit a drill may be given (a day).
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// Prefix of the clones drills make (`drill-APP-JOB`): the appliance
/// deletes those of drills that do not run any more.
pub const CLONE_PREFIX: &str = "drill-";

/// A user check: SQL for a database, or a file for a file tree.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DrillProbe {
    /// A query whose first column of the first row is compared with `expect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// The database the query runs in (default `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The exact text, or `>= N`, `<= N`, `= N`, `> N`, `< N` for numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// A file that must exist in the point (file trees and VM disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The file's SHA-256 (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Text the file contains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
}

impl DrillProbe {
    /// What is wrong with this probe, if anything.
    pub fn check(&self) -> Result<(), String> {
        match (&self.sql, &self.path) {
            (Some(_), Some(_)) => Err("a probe has either \"sql\" or \"path\"".into()),
            (None, None) => Err("a probe needs \"sql\" (with \"expect\") or \"path\"".into()),
            (Some(q), None) => {
                if q.trim().is_empty() {
                    return Err("a probe's \"sql\" is empty".into());
                }
                if self.expect.is_none() {
                    return Err(format!("probe {q:?} has no \"expect\""));
                }
                if self.sha256.is_some() || self.contains.is_some() {
                    return Err("\"sha256\" and \"contains\" go with \"path\"".into());
                }
                Ok(())
            }
            (None, Some(p)) => {
                if !p.starts_with('/') {
                    return Err(format!("probe path {p:?} is not absolute"));
                }
                if self.expect.is_some() || self.database.is_some() {
                    return Err("\"expect\" and \"database\" go with \"sql\"".into());
                }
                Ok(())
            }
        }
    }
}

/// Which point a scheduled drill takes.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum DrillPoint {
    /// `"latest"`.
    Named(String),
    /// `{"random_within_days": N}`: any point of the last N days.
    Random { random_within_days: u32 },
}

/// `POST /v1/applications/{id}/drills`.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DrillCreate {
    /// The point (a snapshot of the application's volume); default: as the
    /// policy says (`drill_point`), else the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
    /// Replace the policy's probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Vec<DrillProbe>>,
    /// Replace the policy's time limit (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// One check of a drill.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct DrillCheck {
    pub name: String,
    pub passed: bool,
    pub output: String,
    #[serde(default)]
    pub seconds: f64,
}

/// A drill's report.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
pub struct Drill {
    /// The id of the job that ran it.
    pub id: u64,
    pub application: u64,
    /// The volume of the point and the point (snapshot id).
    pub volume: String,
    pub snapshot: u64,
    pub job: u64,
    /// Where it ran: a host, or `appliance`.
    pub host: String,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    /// Every check passed and the targets were met.
    pub passed: bool,
    /// Drill start to the first answered query (databases) or to the
    /// clone being readable (file trees, VM disks).
    pub rto_seconds: Option<f64>,
    /// The point's age at the drill's start.
    pub rpo_seconds: Option<u64>,
    pub rto_target: Option<u64>,
    pub rpo_target: Option<u64>,
    pub checks: Vec<DrillCheck>,
    /// Why the drill did not pass, in one line.
    #[serde(default)]
    pub message: String,
}

/// `GET /v1/drills?application=ID`.
#[derive(Serialize, Deserialize, utoipa::IntoParams, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DrillQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<u64>,
}

/// What the drill routes need from the appliance.
pub trait DrillBackend {
    /// Queues a drill of the application (202 `Job`).
    fn start_drill(&self, caller: &Caller, application: u64, req: DrillCreate) -> ApiResult<Job>;
    /// Newest first.
    fn list_drills(&self, application: Option<u64>) -> ApiResult<Vec<Drill>>;
    fn drill(&self, id: u64) -> ApiResult<Drill>;
    /// Re-reads every extent of one snapshot and checks its checksum.
    fn verify_snapshot(&self, volume: &str, snapshot: u64) -> ApiResult<SnapshotVerify>;
}

/// `POST /v1/volumes/{name}/snapshots/{id}/verify`: a scrub of one point.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct SnapshotVerify {
    pub volume: String,
    pub snapshot: u64,
    /// Mapped bytes read and verified.
    pub bytes_checked: u64,
    /// Each bad spot: offset in the snapshot and the engine's error.
    pub errors: Vec<String>,
    pub seconds: f64,
}

/// The drill routes, relative to `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/applications/{id}/drills", post(start_drill))
        .route("/drills", get(list_drills))
        .route("/drills/{id}", get(drill))
        .route(
            "/volumes/{name}/snapshots/{id}/verify",
            post(verify_snapshot),
        )
}

#[utoipa::path(post, path = "/v1/applications/{id}/drills", params(("id" = u64, Path)), request_body = DrillCreate, responses((status = 202, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn start_drill(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<DrillCreate>,
) -> ApiResult<Response> {
    c.require(Action::Write)?;
    let id = parse_id(&id, "application")?;
    for p in req.probes.iter().flatten() {
        p.check().map_err(ApiError::bad_request)?;
    }
    if let Some(t) = req.timeout_seconds {
        check_timeout(t)?;
    }
    let j = run(&s, move |b| b.start_drill(&c, id, req)).await?;
    Ok((StatusCode::ACCEPTED, Json(j)).into_response())
}

/// A drill's time limit: 1 s to a day.
pub fn check_timeout(t: u64) -> ApiResult<()> {
    if (1..=MAX_TIMEOUT_SECS).contains(&t) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "a drill's time limit is 1 to {MAX_TIMEOUT_SECS} seconds, not {t}"
        )))
    }
}

#[utoipa::path(get, path = "/v1/drills", params(DrillQuery), responses((status = 200, body = [Drill])), security(("bearer" = [])))]
async fn list_drills(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<DrillQuery>,
) -> ApiResult<Json<Vec<Drill>>> {
    Ok(Json(run(&s, move |b| b.list_drills(q.application)).await?))
}

#[utoipa::path(get, path = "/v1/drills/{id}", params(("id" = u64, Path)), responses((status = 200, body = Drill), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn drill(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Drill>> {
    let id = parse_id(&id, "drill")?;
    Ok(Json(run(&s, move |b| b.drill(id)).await?))
}

/// It reads the whole point: an operator's (or admin's) request, or the
/// host's whose drill job holds the point (checked by the appliance).
#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots/{id}/verify", params(("name" = String, Path), ("id" = u64, Path)), responses((status = 200, body = SnapshotVerify), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn verify_snapshot(
    State(s): State<AppState>,
    Extension(c): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<SnapshotVerify>> {
    c.require(Action::Write)?;
    check_name("volume", &name)?;
    let id = parse_id(&id, "snapshot")?;
    Ok(Json(run(&s, move |b| b.verify_snapshot(&name, id)).await?))
}

/// The drills' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(start_drill, list_drills, drill, verify_snapshot),
    components(schemas(DrillProbe, DrillPoint, DrillCreate, DrillCheck, Drill, SnapshotVerify)),
    modifiers(&BearerAuth)
)]
pub struct DrillDoc;

/// Whether a probe's answer `got` is what `expect` says: `>= N`, `<= N`,
/// `> N`, `< N`, `= N` compare numbers; anything else is the exact text
/// (surrounding blanks ignored).
pub fn probe_matches(got: &str, expect: &str) -> bool {
    let e = expect.trim();
    let g = got.trim();
    for op in [">=", "<=", "=", ">", "<"] {
        if let Some(n) = e.strip_prefix(op) {
            let (Ok(want), Ok(have)) = (n.trim().parse::<f64>(), g.parse::<f64>()) else {
                // Not a number: `= text` is still an exact comparison.
                return op == "=" && g == n.trim();
            };
            return match op {
                ">=" => have >= want,
                "<=" => have <= want,
                ">" => have > want,
                "<" => have < want,
                _ => have == want,
            };
        }
    }
    g == e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_compare_numbers_and_text() {
        assert!(probe_matches("100000", ">= 100000"));
        assert!(!probe_matches("99999", ">= 100000"));
        assert!(probe_matches("3", "<= 3"));
        assert!(probe_matches(" 3 ", "= 3.0"));
        assert!(!probe_matches("4", "= 3"));
        assert!(probe_matches("2", "<3"));
        assert!(!probe_matches("abc", ">= 1"));
        assert!(probe_matches("t", "t"));
        assert!(!probe_matches("f", "t"));
        assert!(probe_matches("ok", "= ok"));
    }

    #[test]
    fn probes_are_checked() {
        let sql = |q: &str, e: Option<&str>| DrillProbe {
            sql: Some(q.into()),
            expect: e.map(String::from),
            ..DrillProbe::default()
        };
        assert!(sql("select 1", Some("1")).check().is_ok());
        assert!(sql("select 1", None).check().is_err());
        assert!(sql(" ", Some("1")).check().is_err());
        assert!(DrillProbe::default().check().is_err());
        let file = DrillProbe {
            path: Some("etc/hostname".into()),
            ..DrillProbe::default()
        };
        assert!(file.check().is_err());
        let file = DrillProbe {
            path: Some("/etc/hostname".into()),
            contains: Some("x".into()),
            ..DrillProbe::default()
        };
        assert!(file.check().is_ok());
        assert!(check_timeout(0).is_err() && check_timeout(600).is_ok());
        let p: DrillPoint = serde_json::from_str(r#"{"random_within_days": 7}"#).unwrap();
        assert_eq!(
            p,
            DrillPoint::Random {
                random_within_days: 7
            }
        );
        let p: DrillPoint = serde_json::from_str(r#""latest""#).unwrap();
        assert_eq!(p, DrillPoint::Named("latest".into()));
    }
}
