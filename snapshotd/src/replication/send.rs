//! The source side of a transfer: every point of a volume newer than the
//! newest one the target has, oldest first, each as the blocks that differ
//! from the previous one (the engine's tree diff), fingerprints first and
//! only the blocks the target lacks as compressed bytes
//! (`docs/replication.md`, "Transfer protocol"). A raw transfer sends an
//! encrypted volume's blocks as stored (sealed under this appliance's
//! key): the target keeps them so and needs no key ("Raw sends").

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cdmfs::{Pool, SealRec, SnapshotInfo, Target, VolumeInfo};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::ReplError;
use super::http::PeerHttp;
use super::receive::{PREV_HEADER, TOKEN_HEADER};
use super::replicas;
use super::resume::{Bound, ResumeKey};
use super::sessions::{self, PointMeta};
use super::throttle::Throttle;
use super::wire::{self, Fingerprints, Kind};
use crate::state::State;

/// zstd level of the data on the wire: fast, since a link's CPU is the
/// appliance's; most of the gain of higher levels is in stored data.
const WIRE_LEVEL: i32 = 1;

pub struct SendRequest<'a> {
    pub pool: &'a Pool,
    pub state: &'a State,
    /// This appliance's identity (pool UUID in hex).
    pub identity: &'a str,
    pub volume: &'a str,
    pub peer_name: &'a str,
    pub http: &'a PeerHttp,
    /// Retention on the target (sent with every point).
    pub keep_last: Option<u64>,
    pub keep_days: Option<u64>,
    /// The link's `raw` setting (a sealed volume is sent raw anyway).
    pub raw: bool,
    pub throttle: &'a Throttle,
    pub cancel: &'a AtomicBool,
    /// Bytes of the point being sent: done, total.
    pub progress: &'a dyn Fn(u64, u64),
    pub log: &'a dyn Fn(&str),
}

/// One point sent (or not): the contract's `Transfer` without the `id`
/// the control side gives it when it stores it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub id: u64,
    pub volume: String,
    /// The source snapshot.
    pub snapshot: u64,
    pub point: String,
    /// The point's creation time (the target's lag follows it).
    pub created_ns: u64,
    pub base: Option<String>,
    pub full: bool,
    /// Why a full transfer was needed although the target had points of
    /// this volume (`replication.full_resend`).
    pub full_resend: Option<String>,
    pub started_unix: u64,
    pub seconds: f64,
    /// On the wire: fingerprints, compressed data, requests' JSON.
    pub bytes_sent: u64,
    /// Bytes of the blocks that changed.
    pub bytes_logical: u64,
    pub blocks_total: u64,
    /// Data blocks the target had already (from any volume).
    pub blocks_known: u64,
    pub resumed_from_batch: Option<u64>,
    /// Sent as stored ciphertext.
    #[serde(default)]
    pub raw: bool,
    /// The target's snapshot, once committed.
    pub target_snapshot: Option<u64>,
    /// "ok" | "failed" | "cancelled".
    pub result: String,
    pub message: String,
}

#[derive(Deserialize)]
struct RemoteSession {
    id: String,
    base: Option<String>,
    point: String,
    acked: u64,
    token: String,
    /// The id of the seal the session's data is under (raw), if any.
    #[serde(default)]
    seal: Option<String>,
}

#[derive(Deserialize)]
struct ReplicaOf {
    peer: String,
    identity: String,
}

#[derive(Deserialize)]
struct RemotePoint {
    point: String,
}

#[derive(Deserialize)]
struct RemoteVolume {
    identity: String,
    exists: bool,
    replica_of: Option<ReplicaOf>,
    points: Vec<RemotePoint>,
    session: Option<RemoteSession>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Path segments are volume names (checked names: letters, digits, `-_.`)
/// and hex ids; escaped anyway.
fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The engine's smallest sealed block: a sealed volume's size is a
/// multiple of it.
const SEALED_GRAIN: u64 = 512;

/// Refuses a raw send of a volume that has no ciphertext to send (one
/// neither encrypted nor sealed), or whose size no sealed volume can have.
pub fn check_raw(info: &VolumeInfo) -> Result<(), ReplError> {
    if info.seal.is_none() && !info.size.is_multiple_of(SEALED_GRAIN) {
        return Err(ReplError::new(
            "invalid",
            format!(
                "volume {} is {} bytes, not a multiple of {}: a raw link sends sealed blocks, \
                 which need that (grow the volume to a multiple of {}, or create the link \
                 without raw)",
                info.name, info.size, SEALED_GRAIN, SEALED_GRAIN
            ),
        ));
    }
    if info.policy.encryption.is_none() && info.seal.is_none() {
        return Err(ReplError::new(
            "invalid",
            format!(
                "volume {} is not encrypted: a raw link sends the stored ciphertext and it \
                 has none (create the link without raw)",
                info.name
            ),
        ));
    }
    Ok(())
}

/// Sends every point of `req.volume` the target lacks. On failure the
/// error carries the records of the points sent before and a failed (or
/// cancelled) record for the one that stopped.
pub fn run(req: SendRequest<'_>) -> Result<Vec<TransferRecord>, ReplError> {
    let key = ResumeKey::load_or_create(&ResumeKey::path_for(req.state.path()))?;
    let info = req.pool.volume(req.volume)?;
    if req.raw {
        check_raw(&info)?;
    }
    // This appliance may not even hold the key of a sealed volume (a raw
    // replica cascaded on, or promoted): it sends what it stores.
    let sealed = info.seal.is_some();
    let raw = req.raw || sealed;
    let forced = (sealed && !req.raw).then(|| {
        format!(
            "sent raw: {} is sealed here (a raw replica, stored without its key), so it is \
             always sent as stored",
            req.volume
        )
    });
    let points = replicas::points(req.pool, req.volume, req.identity)?;
    if points.is_empty() {
        return Ok(Vec::new());
    }
    let remote: RemoteVolume = req
        .http
        .get_json(&format!("/repl/v1/volumes/{}", seg(req.volume)))?;
    if remote.exists {
        match &remote.replica_of {
            Some(r) if r.identity == req.identity => {}
            Some(r) => {
                return Err(ReplError::new(
                    "not_a_replica",
                    format!(
                        "{} on {} is a replica of {}, not of this appliance",
                        req.volume, req.peer_name, r.peer
                    ),
                ))
            }
            None => {
                return Err(ReplError::new(
                    "not_a_replica",
                    format!(
                        "{} on {} is an ordinary volume (promoted?), not a replica",
                        req.volume, req.peer_name
                    ),
                ))
            }
        }
    }
    let theirs: HashSet<&str> = remote.points.iter().map(|p| p.point.as_str()).collect();
    let base_at = points
        .iter()
        .rposition(|(_, p)| theirs.contains(p.as_str()));
    let mut full_resend = None;
    if base_at.is_none() && remote.exists {
        let resuming_first = remote
            .session
            .as_ref()
            .is_some_and(|s| s.base.is_none() && s.point == points[0].1);
        if !remote.points.is_empty() {
            full_resend = Some(format!(
                "{} has none of the points of {} this appliance still holds \
                 (its newest is {}): everything is sent again",
                req.peer_name,
                req.volume,
                remote.points.last().map_or("", |p| p.point.as_str())
            ));
        } else if !resuming_first {
            full_resend = Some(format!(
                "the replica of {} on {} holds no point: everything is sent again",
                req.volume, req.peer_name
            ));
        }
    }
    if let Some(why) = &full_resend {
        (req.log)(&format!("full resend: {why}"));
    }
    let start = base_at.map_or(0, |i| i + 1);
    let mut base: Option<(u64, String)> = base_at.map(|i| (points[i].0.id, points[i].1.clone()));
    let mut session = remote.session;
    let mut done = Vec::new();
    for (snap, pid) in &points[start..] {
        let mut rec = TransferRecord {
            volume: req.volume.to_string(),
            snapshot: snap.id,
            point: pid.clone(),
            created_ns: snap.created_ns,
            base: base.as_ref().map(|b| b.1.clone()),
            full: base.is_none(),
            full_resend: full_resend.take(),
            started_unix: now_unix(),
            raw,
            message: forced.clone().unwrap_or_default(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let attempt = |base: Option<&(u64, String)>, session, rec: &mut TransferRecord| {
            seal_of(req.pool, raw, snap).and_then(|seal| {
                let cx = PointCx {
                    req: &req,
                    key: &key,
                    target: &remote.identity,
                    base,
                    snap,
                    pid,
                    seal_id: seal.as_ref().map(SealRec::id),
                    seal: seal.as_ref(),
                };
                send_point(&cx, session, rec)
            })
        };
        let mut r = attempt(base.as_ref(), session.take(), &mut rec);
        if let Err(e) = &r {
            if e.is("full_required") && base.is_some() {
                // The target cannot apply this point on its base (a
                // sealed replica whose short last block the source grew
                // past): as when it lost the base, the point goes in full
                // and the next ones build on it.
                let why = format!("{} on {}: {}", req.volume, req.peer_name, e.message);
                (req.log)(&format!("full resend: {why}"));
                rec.base = None;
                rec.full = true;
                rec.full_resend = Some(why);
                r = attempt(None, None, &mut rec);
            }
        }
        rec.seconds = t0.elapsed().as_secs_f64();
        match r {
            Ok(()) => {
                rec.result = "ok".into();
                (req.log)(&format!(
                    "point {pid} sent: {} of {} changed bytes on the wire, {} of {} blocks known",
                    rec.bytes_sent, rec.bytes_logical, rec.blocks_known, rec.blocks_total
                ));
                done.push(rec);
            }
            Err(mut e) => {
                rec.result = if e.is("cancelled") {
                    "cancelled"
                } else {
                    "failed"
                }
                .into();
                rec.message = if rec.message.is_empty() {
                    e.message.clone()
                } else {
                    format!("{}; {}", rec.message, e.message)
                };
                done.push(rec);
                e.records = done;
                return Err(e);
            }
        }
        base = Some((snap.id, pid.clone()));
    }
    Ok(done)
}

/// The seal a raw transfer of `snap` sends its data under (None: plain).
fn seal_of(pool: &Pool, raw: bool, snap: &SnapshotInfo) -> Result<Option<SealRec>, ReplError> {
    if !raw {
        return Ok(None);
    }
    pool.seal_for_send(Target::Snapshot(snap.id))
        .map(Some)
        .map_err(|e| match e {
            cdmfs::Error::KeyRequired => ReplError::new(
                "key_required",
                format!(
                    "{} is encrypted and this appliance has no key: it cannot say which key \
                     its ciphertext is under",
                    snap.volume
                ),
            ),
            e => e.into(),
        })
}

/// What one point's transfer needs.
struct PointCx<'a> {
    req: &'a SendRequest<'a>,
    key: &'a ResumeKey,
    target: &'a str,
    base: Option<&'a (u64, String)>,
    snap: &'a SnapshotInfo,
    pid: &'a str,
    /// Raw: the seal the data is under, and its id.
    seal: Option<&'a SealRec>,
    seal_id: Option<String>,
}

impl PointCx<'_> {
    fn bound<'b>(&'b self, session: &'b str) -> Bound<'b> {
        Bound {
            target: self.target,
            volume: self.req.volume,
            base: self.base.map(|b| b.1.as_str()),
            point: self.pid,
            session,
            seal: self.seal_id.as_deref(),
        }
    }
}

/// The block offsets of the ranges that changed, in order.
fn blocks_of(ranges: &[(u64, u64)], bs: u64, size: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let mut o = off - off % bs;
        let end = (off + len).min(size);
        while o < end {
            out.push(o);
            o += bs;
        }
    }
    out.dedup();
    out
}

/// Resumes the target's session for this point if it is ours and current,
/// else discards it; returns the session id and the first batch to send.
fn resume_or_open(
    cx: &PointCx<'_>,
    remote: Option<RemoteSession>,
    rec: &mut TransferRecord,
) -> Result<(String, u64), ReplError> {
    let http = cx.req.http;
    if let Some(s) = remote {
        let current = s.base.as_deref() == cx.base.map(|b| b.1.as_str())
            && s.point == cx.pid
            && s.seal == cx.seal_id;
        let why = if !current {
            format!(
                "a stale session on the target (point {} from base {}, {}) was discarded",
                s.point,
                s.base.as_deref().unwrap_or("none"),
                s.seal
                    .as_deref()
                    .map_or("not raw".to_string(), |x| format!("raw under seal {x}"))
            )
        } else if !cx.key.verify(&s.token, &cx.bound(&s.id), s.acked) {
            format!(
                "the target's resume token for batch {} did not verify (forged or from \
                 another sender): the point starts over",
                s.acked
            )
        } else {
            (cx.req.log)(&format!(
                "resuming point {} after batch {} (session {})",
                cx.pid, s.acked, s.id
            ));
            rec.resumed_from_batch = Some(s.acked + 1);
            return Ok((s.id, s.acked + 1));
        };
        (cx.req.log)(&why);
        // Appended: a note already there (why the point went raw) stays.
        rec.message = if rec.message.is_empty() {
            why
        } else {
            format!("{}; {why}", rec.message)
        };
        match http.delete(&format!("/repl/v1/sessions/{}", seg(&s.id))) {
            Ok(()) => {}
            Err(e) if e.status == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let id = sessions::new_id();
    let snap = cx.snap;
    let mut body = json!({
        "id": id,
        "volume": cx.req.volume,
        "size": snap.size,
        "block_size": snap.block_size,
        "policy": snap.policy,
        "base": cx.base.map(|b| &b.1),
        "point": PointMeta {
            point: cx.pid.to_string(),
            label: snap.label.clone(),
            metadata: snap.metadata.clone(),
            created_ns: snap.created_ns,
        },
        "keep_last": cx.req.keep_last.map(|k| k.min(u32::MAX as u64)),
        "keep_days": cx.req.keep_days.map(|k| k.min(u32::MAX as u64)),
        "token": cx.key.token(&cx.bound(&id), 0),
    });
    body = with_seal(body, cx.seal);
    rec.bytes_sent += body.to_string().len() as u64;
    let _: serde_json::Value = http.post_json("/repl/v1/sessions", &body, cx.req.throttle)?;
    Ok((id, 1))
}

/// The session-open body with `"seal"` for a raw transfer only: a
/// receiver from before raw sends refuses unknown fields, and a plain link
/// to it must keep working.
fn with_seal(mut body: serde_json::Value, seal: Option<&SealRec>) -> serde_json::Value {
    if let (Some(seal), Some(o)) = (seal, body.as_object_mut()) {
        o.insert("seal".into(), json!(seal));
    }
    body
}

fn send_point(
    cx: &PointCx<'_>,
    remote: Option<RemoteSession>,
    rec: &mut TransferRecord,
) -> Result<(), ReplError> {
    let req = cx.req;
    let snap = cx.snap;
    let bs = snap.block_size as u64;
    let ranges = req.pool.diff(cx.base.map(|b| b.0), snap.id)?;
    let blocks = blocks_of(&ranges, bs, snap.size);
    rec.blocks_total = blocks.len() as u64;
    let len_of = |o: u64| (snap.size - o).min(bs);
    rec.bytes_logical = blocks.iter().map(|o| len_of(*o)).sum();
    let (sid, first) = resume_or_open(cx, remote, rec)?;
    let bound = cx.bound(&sid);
    let per = wire::blocks_per_batch(snap.block_size);
    let total = rec.bytes_logical;
    let mut done_bytes = 0u64;
    let mut buf = Vec::new();
    for (i, batch) in blocks.chunks(per).enumerate() {
        let seq = i as u64 + 1;
        let batch_bytes: u64 = batch.iter().map(|o| len_of(*o)).sum();
        if seq < first {
            done_bytes += batch_bytes;
            continue;
        }
        if req.cancel.load(Ordering::SeqCst) {
            return Err(ReplError::new(
                "cancelled",
                format!("cancelled before batch {seq}"),
            ));
        }
        // Read the batch, contiguous blocks at once.
        buf.clear();
        buf.resize(batch_bytes as usize, 0);
        let mut at = 0usize;
        let mut j = 0;
        while j < batch.len() {
            let mut k = j + 1;
            while k < batch.len() && batch[k] == batch[k - 1] + bs {
                k += 1;
            }
            let n: u64 = batch[j..k].iter().map(|o| len_of(*o)).sum();
            let t = Target::Snapshot(snap.id);
            let piece = &mut buf[at..at + n as usize];
            // Raw: the bytes as stored, which are what is fingerprinted
            // and sent (the target checks them as it checks plain ones).
            match cx.seal {
                Some(seal) => req.pool.read_sealed(t, batch[j], piece, seal)?,
                None => req.pool.read(t, batch[j], piece)?,
            }
            at += n as usize;
            j = k;
        }
        let mut entries = Vec::with_capacity(batch.len());
        let mut at = 0usize;
        for &o in batch {
            let n = len_of(o) as usize;
            entries.push(wire::entry_of(o, &buf[at..at + n]));
            at += n;
        }
        let prev = cx.key.token(&bound, seq - 1);
        let f = Fingerprints {
            block_size: snap.block_size,
            entries,
        };
        let fps = f.encode();
        let path = format!("/repl/v1/sessions/{}/batches/{seq}", seg(&sid));
        let answer = req.http.send(
            "POST",
            &format!("{path}/fingerprints"),
            &[(PREV_HEADER, &prev)],
            &fps,
            req.throttle,
        )?;
        rec.bytes_sent += fps.len() as u64;
        let lacking = wire::decode_lacking(&answer, batch.len())
            .map_err(|e| ReplError::new("protocol", format!("the target's bitmap: {e}")))?;
        let mut send: Vec<&[u8]> = Vec::new();
        let mut at = 0usize;
        for (e, lacks) in f.entries.iter().zip(&lacking) {
            let n = e.len as usize;
            match (e.kind, lacks) {
                (Kind::Data(_), true) => send.push(&buf[at..at + n]),
                (Kind::Data(_), false) => rec.blocks_known += 1,
                (Kind::Zero, true) => {
                    return Err(ReplError::new(
                        "protocol",
                        "the target asked for the bytes of a zero block",
                    ))
                }
                (Kind::Zero, false) => {}
            }
            at += n;
        }
        let data = wire::encode_data(&send, WIRE_LEVEL)
            .map_err(|e| ReplError::new("internal", format!("compressing: {e}")))?;
        let token = cx.key.token(&bound, seq);
        req.http
            .send(
                "PUT",
                &path,
                &[(PREV_HEADER, &prev), (TOKEN_HEADER, &token)],
                &data,
                req.throttle,
            )
            .map_err(|e| {
                if e.is("bad_checksum") {
                    ReplError {
                        message: format!("corrupt batch: {}", e.message),
                        ..e
                    }
                } else {
                    e
                }
            })?;
        rec.bytes_sent += data.len() as u64;
        done_bytes += batch_bytes;
        (req.progress)(done_bytes, total);
    }
    let last = (blocks.len().div_ceil(per)) as u64;
    let prev = cx.key.token(&bound, last);
    let answer = req.http.send(
        "POST",
        &format!("/repl/v1/sessions/{}/commit", seg(&sid)),
        &[(PREV_HEADER, &prev)],
        b"",
        req.throttle,
    )?;
    let v: serde_json::Value = serde_json::from_slice(&answer)
        .map_err(|e| ReplError::new("protocol", format!("the commit's answer: {e}")))?;
    rec.target_snapshot = v["snapshot"].as_u64();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver from before raw sends refuses unknown fields: a plain
    /// open body must not name a seal, a raw one must.
    #[test]
    fn only_a_raw_open_body_names_a_seal() {
        let body = || json!({"id": "ab", "token": "00"});
        let plain = with_seal(body(), None);
        assert!(plain.get("seal").is_none(), "{plain}");
        let dir = tempfile::tempdir().unwrap();
        let pool = super::super::testutil::pool_keyed(
            dir.path(),
            Some(cdmfs::KeySource::Key(vec![1; 32])),
        );
        let policy = cdmfs::DataPolicy {
            dedup: false,
            compression: 0,
            encryption: Some(cdmfs::Cipher::Aes256Xts),
        };
        let v = pool.create_volume_with("v", 1 << 20, 4096, policy).unwrap();
        let seal = pool.seal_for_send(Target::Volume(v.id)).unwrap();
        let raw = with_seal(body(), Some(&seal));
        assert_eq!(raw["seal"], json!(seal), "{raw}");
    }
}
