//! The target side of a transfer: the `/repl/v1` routes the replication
//! listener serves (`docs/replication.md`, "Transfer protocol").
//!
//! Every route needs the [`PeerId`] the listener found for the client
//! certificate (403 `unpaired` without one), and writes only into volumes
//! that are replicas of that caller (409 `not_a_replica`). A transfer is
//! applied to the replica's live tree after it is reset to the base point;
//! only a commit makes a point, so a cut stream never shows as one. Each
//! batch is checked and flushed before it is acknowledged, and the session
//! (in the state database) records the acknowledgement: a receiver killed
//! at any moment resumes from its last acknowledged batch.
//!
//! A raw session (one with a seal) brings ciphertext: it goes into a
//! sealed replica as is (no key needed), or, sent back to the appliance
//! that holds the key, is unsealed as it is written into its volume.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State as AxState};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cdm_api::ApiError;
use cdmfs::Pool;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ReplError;
use super::http::PeerId;
use super::replicas::{self, ORIGIN_KEY, POINT_KEY};
use super::sessions::{self, Pending, PointMeta, Session};
use super::wire::{self, Fingerprints, Kind};
use crate::events::Events;
use crate::state::State;

/// The header holding the sender's token for the batch a request
/// continues from (the session's `acked`).
pub const PREV_HEADER: &str = "x-cdm-repl-prev";
/// The header holding the sender's token for the batch a `PUT` applies.
pub const TOKEN_HEADER: &str = "x-cdm-repl-token";

/// The largest body: a batch's data, compressed (zstd's worst case is a
/// little over the plain size), or its fingerprint list.
const MAX_BODY: usize = wire::MAX_BATCH_BYTES + (1 << 20);

/// Called after a point is committed: (volume, snapshot id).
pub type OnPoint = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// The points this appliance's own links hold (cascades onward); None if
/// they cannot be read.
pub type HeldFn = Arc<dyn Fn() -> Option<super::holds::Holds> + Send + Sync>;

pub struct ReceiverCtx {
    pub pool: Arc<Pool>,
    pub state: Arc<State>,
    /// This appliance's identity (pool UUID in hex).
    pub identity: String,
    /// Called after a point is committed (volume, snapshot id): events and
    /// the cascade of "after every point" links.
    pub on_point: OnPoint,
    pub events: Arc<Events>,
    /// The points a cascade link from here holds: replica retention keeps them.
    pub held: HeldFn,
    /// Fingerprint answers awaiting their data, by volume: in memory only.
    pub answered: Mutex<HashMap<String, Answered>>,
    /// The zstd level of new volumes here (0: off); sealed replicas are
    /// always compressed ([`SEALED_LEVEL`] when it is off).
    pub compression: u8,
}

/// A batch whose fingerprints were answered and whose data is awaited.
///
/// Kept in memory, not in the session record: the zeros and known blocks
/// the answer mapped become durable with the flush of the batch's data
/// request (one commit per batch), so an answer must not outlive a crash
/// that lost them (review finding 3). After a restart the data request
/// finds no answer (409 `out_of_order`) and the sender, resuming from the
/// last acknowledged batch, sends the fingerprints again.
pub struct Answered {
    session: String,
    pending: Pending,
}

/// The zstd level of a sealed replica when this appliance compresses
/// nothing by default: its blocks are stored padded, and compression
/// keeps the padding off the disk.
pub const SEALED_LEVEL: u8 = 3;

/// Sessions change one request at a time: a sender retrying while its
/// earlier request still runs must not apply a batch twice.
static APPLY: Mutex<()> = Mutex::new(());

/// Excludes the receiver's requests while held: promote, demote and a
/// volume delete take it, so no request that found a replica applies a
/// batch or commits a point into a volume that stopped being one.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    cdm_common::lock::lock(&APPLY)
}

pub fn router(ctx: Arc<ReceiverCtx>) -> Router {
    Router::new()
        .route("/repl/v1/volumes/{volume}", get(volume_state))
        .route("/repl/v1/sessions", post(open))
        .route("/repl/v1/sessions/{id}", axum::routing::delete(discard))
        .route(
            "/repl/v1/sessions/{id}/batches/{seq}/fingerprints",
            post(fingerprints),
        )
        .route("/repl/v1/sessions/{id}/batches/{seq}", put(data))
        .route("/repl/v1/sessions/{id}/commit", post(commit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

/// The caller, as the replication listener identified it.
pub struct Caller(pub PeerId);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<PeerId>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| {
                ApiError::new(
                    403,
                    "unpaired",
                    "the caller is not a paired appliance (no matching client certificate)",
                )
            })
    }
}

/// Our errors as answers, with the contract's codes.
fn api(e: ReplError) -> ApiError {
    let (status, code): (u16, &'static str) = match e.code.as_str() {
        "no_space" => (507, "no_space"),
        "not_found" => (404, "not_found"),
        "key_required" => (409, "key_required"),
        "invalid" => (400, "invalid"),
        "conflict" => (409, "conflict"),
        "state" => (503, "unavailable"),
        _ => (500, "internal"),
    };
    ApiError::new(status, code, e.message)
}

fn engine(e: cdmfs::Error) -> ApiError {
    api(e.into())
}

fn repl(e: ReplError) -> ApiError {
    api(e)
}

/// Runs engine and database work off the async threads, one at a time.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let _g = cdm_common::lock::lock(&APPLY);
        f()
    })
    .await
    .map_err(|e| ApiError::internal(format!("replication task failed: {e}")))?
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The replica `volume` if `caller` feeds it; 409 `not_a_replica` for an
/// ordinary volume (or one promoted since) or another peer's replica.
fn own_replica(ctx: &ReceiverCtx, volume: &str, caller: &PeerId) -> Result<(), ApiError> {
    match replicas::get(&ctx.state, volume).map_err(repl)? {
        Some(r) if r.fed_by(caller) => Ok(()),
        Some(r) => Err(ApiError::new(
            409,
            "not_a_replica",
            format!(
                "volume {volume} is a replica of {}, not of {}",
                r.peer, caller.name
            ),
        )),
        None => Err(ApiError::new(
            409,
            "not_a_replica",
            format!("volume {volume} is not a replica (an ordinary or promoted volume)"),
        )),
    }
}

async fn volume_state(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Path(volume): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let exists = match ctx.pool.volume(&volume) {
            Ok(_) => true,
            Err(cdmfs::Error::NotFound(_)) => false,
            Err(e) => return Err(engine(e)),
        };
        // A volume that is not the caller's replica is none of its
        // business: not its points, not who feeds it, not its session.
        if exists {
            own_replica(&ctx, &volume, &caller)?;
        }
        let replica = replicas::get(&ctx.state, &volume).map_err(repl)?;
        let points: Vec<Value> = if exists {
            replicas::points(&ctx.pool, &volume, &ctx.identity)
                .map_err(repl)?
                .into_iter()
                .map(|(s, p)| json!({"point": p, "snapshot": s.id, "created_ns": s.created_ns}))
                .collect()
        } else {
            Vec::new()
        };
        // Only the caller's own unfinished session: it alone can resume it.
        let session = sessions::get(&ctx.state, &volume)
            .map_err(repl)?
            .filter(|s| s.done.is_none() && s.sender == caller.identity)
            .map(|s| {
                json!({"id": s.id, "base": s.base, "point": s.point.point,
                       "acked": s.acked, "token": s.token,
                       "seal": s.seal.as_ref().map(cdmfs::SealRec::id)})
            });
        Ok(Json(json!({
            "identity": ctx.identity,
            "exists": exists,
            "replica_of": replica.map(|r| json!({"peer": r.peer, "identity": r.identity})),
            "points": points,
            "session": session,
        })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenReq {
    /// The sender's id for the session (it binds the resume tokens).
    id: String,
    volume: String,
    size: u64,
    block_size: u32,
    #[serde(default)]
    policy: cdmfs::DataPolicy,
    base: Option<String>,
    point: PointMeta,
    keep_last: Option<u32>,
    keep_days: Option<u32>,
    token: String,
    /// A raw transfer: the seal its data is under.
    #[serde(default)]
    seal: Option<cdmfs::SealRec>,
}

fn check_token(t: &str) -> Result<(), ApiError> {
    if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("a token is 1-128 hex digits"));
    }
    Ok(())
}

/// The snapshot of `volume` whose point id is `point`.
fn find_point(ctx: &ReceiverCtx, volume: &str, point: &str) -> Result<Option<u64>, ApiError> {
    Ok(replicas::points(&ctx.pool, volume, &ctx.identity)
        .map_err(repl)?
        .into_iter()
        .find(|(_, p)| p == point)
        .map(|(s, _)| s.id))
}

async fn open(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Json(req): Json<OpenReq>,
) -> Result<Json<Value>, ApiError> {
    cdmfs::validate_name(&req.volume).map_err(engine)?;
    wire::check_block_size(req.block_size).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_token(&req.token)?;
    if req.id.len() != 32 || !req.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request("a session id is 32 hex digits"));
    }
    if req.size == 0 || req.size > 1 << 60 {
        return Err(ApiError::bad_request("volume size out of range"));
    }
    if let Some(seal) = &req.seal {
        // A peer's record: its costs and geometry are checked before
        // anything here acts on it.
        seal.check().map_err(|e| match e {
            cdmfs::Error::Invalid(m) => ApiError::bad_request(format!("the transfer's {m}")),
            e => engine(e),
        })?;
        if seal.block_size != req.block_size {
            return Err(ApiError::bad_request(format!(
                "the transfer's seal is of blocks of {} bytes, the transfer's {}",
                seal.block_size, req.block_size
            )));
        }
    }
    blocking(move || open_blocking(&ctx, &caller, req)).await
}

/// Tells the target's operators that a peer's transfer was refused.
fn refused(ctx: &ReceiverCtx, volume: &str, caller: &PeerId, e: &ApiError) {
    ctx.events.emit(
        "replication.refused",
        volume,
        &caller.name,
        json!({"peer": caller.name, "identity": caller.identity,
               "code": e.code, "reason": e.message}),
    );
}

fn open_blocking(
    ctx: &ReceiverCtx,
    caller: &PeerId,
    req: OpenReq,
) -> Result<Json<Value>, ApiError> {
    let pool = &ctx.pool;
    let v = &req.volume;
    let mut unseal = false;
    let exists = match pool.volume(v) {
        Ok(info) => {
            if let Err(e) = own_replica(ctx, v, caller) {
                refused(ctx, v, caller, &e);
                return Err(e);
            }
            if info.block_size != req.block_size {
                return Err(ApiError::conflict(format!(
                    "replica {v} has blocks of {} bytes, the source {}",
                    info.block_size, req.block_size
                )));
            }
            unseal = seal_mode(ctx, &info, req.seal.as_ref()).inspect_err(|e| {
                refused(ctx, v, caller, e);
            })?;
            true
        }
        Err(cdmfs::Error::NotFound(_)) => false,
        Err(e) => return Err(engine(e)),
    };
    if exists && find_point(ctx, v, &req.point.point)?.is_some() {
        return Err(ApiError::new(
            409,
            "point_exists",
            format!("point {} is already on {v}", req.point.point),
        ));
    }
    let base = match (&req.base, exists) {
        (None, _) => None,
        (Some(b), true) => Some(find_point(ctx, v, b)?.ok_or_else(|| base_missing(v, b))?),
        (Some(b), false) => return Err(base_missing(v, b)),
    };
    if let Some(b) = base {
        full_required(ctx, caller, v, b, &req)?;
    }
    // The older unfinished session goes first: from here on the live tree
    // is this transfer's.
    sessions::remove(&ctx.state, v).map_err(repl)?;
    cdm_common::lock::lock(&ctx.answered).remove(v);
    if exists {
        pool.revert_volume(v, base).map_err(engine)?;
    } else if let Some(seal) = &req.seal {
        if own_key(pool, seal)? {
            // Never a new sealed replica under our own key: this
            // appliance reads those, so a peer could have any of our
            // volumes' ciphertext it holds read back here.
            let e = ApiError::new(
                409,
                "seal_mismatch",
                format!(
                    "this raw transfer is sealed with the target's own key: such data comes \
                     back only into the volume it was sent from, and {v} is not here; send \
                     it to the volume it came from, or create a link that is not raw"
                ),
            );
            refused(ctx, v, caller, &e);
            return Err(e);
        }
        // A raw replica stores the source's ciphertext as ordinary bytes:
        // no cipher of its own and no key; it dedups (sealed blocks are
        // matched by the fingerprints of their sealed bytes) and always
        // compresses.
        let level = if ctx.compression > 0 {
            ctx.compression
        } else {
            SEALED_LEVEL
        };
        let policy = cdmfs::DataPolicy {
            dedup: true,
            compression: level,
            encryption: None,
        };
        pool.create_volume_sealed(v, req.size, req.block_size, policy, seal.clone())
            .map_err(engine)?;
        replicas::mark(&ctx.state, v, caller).map_err(repl)?;
    } else {
        // A replica keeps the source's block size, compression and cipher
        // (with this appliance's key) and always dedups: that is what lets
        // it skip the blocks it already has.
        let policy = cdmfs::DataPolicy {
            dedup: true,
            ..req.policy
        };
        pool.create_volume_with(v, req.size, req.block_size, policy)
            .map_err(|e| match e {
                cdmfs::Error::KeyRequired => ApiError::new(
                    409,
                    "key_required",
                    format!(
                        "volume {v} is encrypted and this appliance has no key (a raw link \
                         sends it without needing one)"
                    ),
                ),
                e => engine(e),
            })?;
        replicas::mark(&ctx.state, v, caller).map_err(repl)?;
    }
    let info = pool.volume(v).map_err(engine)?;
    if exists && base.is_none() && req.size != info.size {
        // A full transfer starts from an empty live tree: it takes the
        // source's size, smaller too (a full resend of a recreated or
        // shrunk source volume).
        pool.resize_empty_volume(v, req.size).map_err(engine)?;
    } else if req.size > info.size {
        pool.grow_volume(v, req.size).map_err(engine)?;
    } else if req.size < info.size {
        return Err(ApiError::bad_request(format!(
            "the point is {} bytes, smaller than its base ({})",
            req.size, info.size
        )));
    }
    pool.flush().map_err(engine)?;
    let s = Session {
        id: req.id,
        volume: req.volume,
        sender: caller.identity.clone(),
        base: req.base,
        point: req.point,
        size: req.size,
        block_size: req.block_size,
        keep_last: req.keep_last,
        keep_days: req.keep_days,
        acked: 0,
        token: req.token,
        done: None,
        started_unix: now_unix(),
        seal: req.seal,
        unseal,
    };
    sessions::put(&ctx.state, &s).map_err(repl)?;
    tracing::info!(volume = %s.volume, point = %s.point.point, base = ?s.base,
        peer = %caller.name, raw = s.seal.is_some(), unseal = s.unseal,
        "replication session opened");
    Ok(Json(json!({"id": s.id, "acked": 0})))
}

/// Whether the raw data of a session goes into the existing replica
/// `info` unsealed (true) or as it comes (false); 409 when the two do not
/// go together. A volume never mixes sealed and plain blocks, nor two
/// seals.
///
/// Unsealing has one case only: data sealed with this appliance's own key
/// comes back into the very volume it was sent from (the fail-back after
/// a failover), which is not sealed and sends with that same seal. Any
/// other use of our own key is refused, or a peer holding our ciphertext
/// of one volume could have it decrypted into another it can read.
fn seal_mode(
    ctx: &ReceiverCtx,
    info: &cdmfs::VolumeInfo,
    seal: Option<&cdmfs::SealRec>,
) -> Result<bool, ApiError> {
    let v = &info.name;
    let mismatch = |m: String| ApiError::new(409, "seal_mismatch", m);
    let what_works = format!(
        "delete the target's copy of {v} to let the next run send it in full, or replicate \
         under another name"
    );
    match (&info.seal, seal) {
        (None, None) => Ok(false),
        (_, Some(s)) if own_key(&ctx.pool, s)? => {
            let same = info.seal.is_none()
                && ctx
                    .pool
                    .seal_for_send(cdmfs::Target::Volume(info.id))
                    .is_ok_and(|own| own.id() == s.id());
            if same {
                return Ok(true);
            }
            Err(mismatch(format!(
                "this raw transfer is sealed with the target's own key but not from the \
                 target's volume {v}: such data comes back only into the volume it was sent \
                 from; {what_works}"
            )))
        }
        (Some(have), Some(s)) if have.id() == s.id() => Ok(false),
        (Some(_), Some(_)) => Err(mismatch(format!(
            "the target's copy of {v} is sealed with another key; {what_works}"
        ))),
        (Some(_), None) => Err(mismatch(format!(
            "the target's copy of {v} is sealed (a raw replica) and this transfer is not raw; \
             {what_works}"
        ))),
        (None, Some(_)) => Err(ApiError::new(
            409,
            "key_required",
            format!(
                "the target's copy of {v} is not sealed and this raw transfer is under another \
                 appliance's key: the target stores such data only in a sealed replica, and \
                 never decrypts it; {what_works}, or create a link that is not raw"
            ),
        )),
    }
}

/// Whether `s` is under this appliance's own key (its check value is our
/// key record's).
fn own_key(pool: &Pool, s: &cdmfs::SealRec) -> Result<bool, ApiError> {
    pool.seal_is_own(s).map_err(engine)
}

/// 409 `full_required` when the point cannot build on base snapshot
/// `base` of sealed replica `v`: its last block is short and sealed at its
/// length, and the source grew past it (re-sealing it needs the key).
/// The sender then sends the point in full.
fn full_required(
    ctx: &ReceiverCtx,
    caller: &PeerId,
    v: &str,
    base: u64,
    req: &OpenReq,
) -> Result<(), ApiError> {
    let b = ctx.pool.snapshot(base).map_err(engine)?;
    if b.seal.is_none() || b.size == req.size || b.size.is_multiple_of(req.block_size as u64) {
        return Ok(());
    }
    let e = ApiError::new(
        409,
        "full_required",
        format!(
            "the source of {v} grew from {} to {} bytes and the replica's last block is \
             short and sealed (this appliance cannot re-seal it without the key): the point \
             must be sent in full",
            b.size, req.size
        ),
    );
    tracing::info!(volume = %v, peer = %caller.name, "{}", e.message);
    Err(e)
}

fn base_missing(v: &str, b: &str) -> ApiError {
    ApiError::new(
        409,
        "base_missing",
        format!("base point {b} is not on {v}: a full transfer is needed"),
    )
}

/// The session `id`, continued by `caller` from the token it names.
fn session_for(
    ctx: &ReceiverCtx,
    caller: &PeerId,
    id: &str,
    headers: &HeaderMap,
) -> Result<Session, ApiError> {
    let s = sessions::by_id(&ctx.state, id)
        .map_err(repl)?
        .ok_or_else(|| ApiError::new(404, "no_session", format!("no session {id}")))?;
    own_replica(ctx, &s.volume, caller)?;
    let prev = headers
        .get(PREV_HEADER)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if s.sender != caller.identity || prev != s.token {
        return Err(ApiError::new(
            409,
            "resume_refused",
            format!(
                "session {id} does not continue from the token given (it is at batch {})",
                s.acked
            ),
        ));
    }
    Ok(s)
}

fn check_seq(s: &Session, seq: u64) -> Result<(), ApiError> {
    if seq == 0 || seq > s.acked + 1 {
        return Err(ApiError::new(
            409,
            "out_of_order",
            format!("batch {seq} after batch {} was acknowledged", s.acked),
        ));
    }
    Ok(())
}

async fn fingerprints(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Path((id, seq)): Path<(String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Vec<u8>, ApiError> {
    let f = Fingerprints::decode(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    blocking(move || {
        let s = session_for(&ctx, &caller, &id, &headers)?;
        check_seq(&s, seq)?;
        if s.done.is_some() || seq <= s.acked {
            // Applied already: nothing is lacking.
            return Ok(wire::encode_lacking(&vec![false; f.entries.len()]));
        }
        if f.block_size != s.block_size {
            return Err(ApiError::bad_request(
                "block size differs from the session's",
            ));
        }
        for e in &f.entries {
            let whole = (s.size - e.offset.min(s.size)).min(s.block_size as u64);
            if e.offset >= s.size || e.len as u64 != whole {
                return Err(ApiError::bad_request(format!(
                    "block at {} of {} bytes does not fit a volume of {} bytes",
                    e.offset, e.len, s.size
                )));
            }
        }
        let vol = ctx.pool.volume_id(&s.volume).map_err(engine)?;
        let mut lacking = Vec::with_capacity(f.entries.len());
        let mut want = Vec::new();
        for e in &f.entries {
            let lacks = match &e.kind {
                Kind::Zero => {
                    ctx.pool
                        .write_zeroes(vol, e.offset, e.len as u64)
                        .map_err(engine)?;
                    false
                }
                // Sealed bytes being unsealed: this pool's dedup index
                // holds the fingerprints of plain blocks, never of these.
                Kind::Data(_) if s.unseal => true,
                // The engine maps a block it already holds (any volume)
                // without its bytes crossing; a short last block is sent.
                Kind::Data(fp) => {
                    e.len != s.block_size
                        || !ctx.pool.write_known(vol, e.offset, fp).map_err(engine)?
                }
            };
            if lacks {
                want.push(*e);
            }
            lacking.push(lacks);
        }
        // Not flushed here: the data request's flush makes these writes
        // durable with the batch's data, before it is acknowledged.
        cdm_common::lock::lock(&ctx.answered).insert(
            s.volume.clone(),
            Answered {
                session: s.id.clone(),
                pending: Pending::of(seq, &want),
            },
        );
        Ok(wire::encode_lacking(&lacking))
    })
    .await
}

async fn data(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Path((id, seq)): Path<(String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let token = headers
        .get(TOKEN_HEADER)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    check_token(&token)?;
    blocking(move || {
        let mut s = session_for(&ctx, &caller, &id, &headers)?;
        check_seq(&s, seq)?;
        if s.done.is_some() || seq <= s.acked {
            return Ok(Json(json!({"acked": s.acked})));
        }
        let answer = cdm_common::lock::lock(&ctx.answered)
            .get(&s.volume)
            .filter(|a| a.session == s.id && a.pending.seq == seq)
            .map(|a| a.pending.entries());
        let pending = match answer {
            Some(p) => p.map_err(repl)?,
            _ => {
                return Err(ApiError::new(
                    409,
                    "out_of_order",
                    format!("batch {seq}: its fingerprints come first"),
                ))
            }
        };
        let plain = wire::decode_data(&body, &pending).map_err(|e| match e {
            wire::WireError::BadChecksum { .. } => {
                tracing::warn!(volume = %s.volume, peer = %caller.name, batch = seq,
                    error = %e, "replication batch refused: bad checksum");
                let e = ApiError::new(422, "bad_checksum", format!("corrupt batch {seq}: {e}"));
                refused(&ctx, &s.volume, &caller, &e);
                e
            }
            e => ApiError::bad_request(format!("batch {seq}: {e}")),
        })?;
        let vol = ctx.pool.volume_id(&s.volume).map_err(engine)?;
        let mut at = 0usize;
        for e in &pending {
            let n = e.len as usize;
            let bytes = &plain[at..at + n];
            match &s.seal {
                Some(seal) if s.unseal => ctx
                    .pool
                    .write_unsealing(vol, e.offset, bytes, seal)
                    .map_err(|e| unseal_err(&s.volume, e))?,
                Some(seal) => ctx
                    .pool
                    .write_sealed(vol, e.offset, bytes, seal)
                    .map_err(engine)?,
                None => ctx.pool.write(vol, e.offset, bytes).map_err(engine)?,
            }
            at += n;
        }
        // Durable before it is acknowledged: this batch's data and the
        // zeros and known blocks its fingerprint answer mapped.
        ctx.pool.flush().map_err(engine)?;
        s.acked = seq;
        s.token = token;
        sessions::put(&ctx.state, &s).map_err(repl)?;
        cdm_common::lock::lock(&ctx.answered).remove(&s.volume);
        Ok(Json(json!({"acked": seq})))
    })
    .await
}

/// An unsealing write that failed: a key unloaded since the session
/// opened is said plainly.
fn unseal_err(volume: &str, e: cdmfs::Error) -> ApiError {
    match e {
        cdmfs::Error::KeyRequired
        | cdmfs::Error::SealKeyRequired(_)
        | cdmfs::Error::WrongKey(_) => ApiError::new(
            409,
            "key_required",
            format!(
                "this appliance cannot unseal the raw data sent for {volume}: load the key \
                 it was sealed with"
            ),
        ),
        e => engine(e),
    }
}

/// The point's metadata as a replica keeps it: the source's, plus its id
/// and, if the source did not say, where it was taken.
fn replica_metadata(p: &PointMeta, caller: &PeerId) -> Value {
    let mut m = match &p.metadata {
        Value::Object(o) => o.clone(),
        Value::Null => serde_json::Map::new(),
        other => {
            let mut o = serde_json::Map::new();
            o.insert("source".into(), other.clone());
            o
        }
    };
    m.insert(POINT_KEY.into(), p.point.clone().into());
    if !m.get(ORIGIN_KEY).is_some_and(Value::is_string) {
        m.insert(ORIGIN_KEY.into(), caller.name.clone().into());
    }
    Value::Object(m)
}

async fn commit(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let ctx2 = ctx.clone();
    let (volume, snap, fresh) = blocking(move || {
        let mut s = session_for(&ctx, &caller, &id, &headers)?;
        if let Some(done) = s.done {
            return Ok((s.volume, done, false));
        }
        let answered = cdm_common::lock::lock(&ctx.answered)
            .get(&s.volume)
            .is_some_and(|a| a.session == s.id);
        if answered {
            return Err(ApiError::new(
                409,
                "incomplete",
                format!("batch {} has fingerprints but no data yet", s.acked + 1),
            ));
        }
        let info = ctx
            .pool
            .create_snapshot_at(
                &s.volume,
                &s.point.label,
                replica_metadata(&s.point, &caller),
                s.point.created_ns,
            )
            .map_err(engine)?;
        expire(&ctx, &s, info.id)?;
        ctx.pool.flush().map_err(engine)?;
        s.done = Some(info.id);
        sessions::put(&ctx.state, &s).map_err(repl)?;
        tracing::info!(volume = %s.volume, point = %s.point.point, snapshot = info.id,
            peer = %caller.name, "replicated point committed");
        Ok((s.volume, info.id, true))
    })
    .await?;
    if fresh {
        let ctx = ctx2.clone();
        let v = volume.clone();
        // Events and cascades may take the pool or database: not here.
        let _ = tokio::task::spawn_blocking(move || (ctx.on_point)(&v, snap)).await;
    }
    Ok(Json(json!({"snapshot": snap, "volume": volume})))
}

/// Applies the retention the sender sent to the replica's points; the
/// newest (just made) point is always kept, and so are points with clones.
fn expire(ctx: &ReceiverCtx, s: &Session, newest: u64) -> Result<(), ApiError> {
    if s.keep_last.is_none() && s.keep_days.is_none() {
        return Ok(());
    }
    let snaps = ctx.pool.list_snapshots(Some(&s.volume)).map_err(engine)?;
    let origins: std::collections::HashSet<u64> = ctx
        .pool
        .list_volumes_brief()
        .map_err(engine)?
        .into_iter()
        .filter_map(|v| v.origin)
        .collect();
    let view: Vec<crate::scheduler::Snap> = snaps
        .iter()
        .map(|x| crate::scheduler::Snap {
            id: x.id,
            created_unix: x.created_ns / 1_000_000_000,
            has_clones: origins.contains(&x.id),
        })
        .collect();
    let r = cdm_api::types::Retention {
        keep_last: s.keep_last,
        keep_days: s.keep_days,
        min_keep: 1,
    };
    let doomed: Vec<u64> = crate::scheduler::expired(&view, &r, now_unix())
        .into_iter()
        .filter(|id| *id != newest)
        .collect();
    if doomed.is_empty() {
        return Ok(());
    }
    // A point a link from here holds is the base of its next transfer
    // (A→B→C): kept, as on a source.
    let Some(holds) = (ctx.held)() else {
        tracing::error!(volume = %s.volume, "cannot read the replication holds; no point expires now");
        return Ok(());
    };
    for id in doomed {
        if holds.is_held(id) {
            tracing::info!(volume = %s.volume, snapshot = id,
                "kept point {id}: it is the replication base of {}", holds.describe(id));
            continue;
        }
        match ctx.pool.delete_snapshot(id) {
            Ok(()) | Err(cdmfs::Error::NotFound(_)) => {}
            Err(e) => return Err(engine(e)),
        }
    }
    Ok(())
}

/// Drops an unfinished session; the replica's live tree goes back to its
/// newest point, so nothing of the transfer stays visible.
async fn discard(
    AxState(ctx): AxState<Arc<ReceiverCtx>>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let s = sessions::by_id(&ctx.state, &id)
            .map_err(repl)?
            .ok_or_else(|| ApiError::new(404, "no_session", format!("no session {id}")))?;
        own_replica(&ctx, &s.volume, &caller)?;
        if s.done.is_none() {
            reset_live(&ctx.pool, &ctx.state, &s.volume).map_err(repl)?;
        }
        Ok(Json(json!({"deleted": id})))
    })
    .await
}

/// Ends any unfinished transfer into `volume`: the session goes and the
/// live tree becomes the newest point (empty if there is none).
pub fn reset_live(pool: &Pool, state: &State, volume: &str) -> Result<(), ReplError> {
    sessions::remove(state, volume)?;
    let newest = replicas::points(pool, volume, "")?
        .last()
        .map(|(s, _)| s.id);
    pool.revert_volume(volume, newest)?;
    pool.flush()?;
    Ok(())
}
