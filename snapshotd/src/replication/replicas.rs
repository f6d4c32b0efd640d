//! Replica volumes: which volumes are fed by which peer (`REPLICAS`,
//! volume name → [`Replica`]). A replica is read-only to everyone but the
//! receiver; promote makes it an ordinary volume again, demote makes an
//! ordinary volume a replica (the way back after a failover).

use cdmfs::Pool;
use serde::{Deserialize, Serialize};

use super::error::ReplError;
use super::http::PeerId;
use crate::state::{State, Sync, REPLICAS, REPL_SESSIONS};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// The peer's name as this appliance knows it.
    pub peer: String,
    /// The identity (pool UUID, hex) of the appliance that feeds it: the
    /// receiver accepts transfers into it from that caller only.
    pub identity: String,
    /// Hex SHA-256 of that peer's client certificate pinned at pairing:
    /// the replica belongs to the peer holding it, not to whoever claims
    /// the identity. Empty in records made before it was kept (then name
    /// and identity decide).
    #[serde(default)]
    pub cert_sha256: String,
    /// Unix seconds when it became a replica.
    pub since: u64,
}

impl Replica {
    /// Whether `caller` is the peer that feeds this replica: same name,
    /// identity and pinned certificate.
    pub fn fed_by(&self, caller: &PeerId) -> bool {
        self.peer == caller.name
            && self.identity == caller.identity
            && (self.cert_sha256.is_empty() || self.cert_sha256 == caller.cert_sha256)
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Metadata key of a replica's snapshot: the id of the point it copies.
pub const POINT_KEY: &str = "cdm.point";
/// Metadata key: the name of the appliance the point was taken on.
pub const ORIGIN_KEY: &str = "cdm.origin";

/// A point's id: the one it was received under, else `IDENTITY:ID` of
/// this appliance's own snapshot.
pub fn point_id(identity: &str, s: &cdmfs::SnapshotInfo) -> String {
    match s.metadata.get(POINT_KEY).and_then(|v| v.as_str()) {
        Some(p) => p.to_string(),
        None => format!("{identity}:{}", s.id),
    }
}

/// The points of `volume`, oldest first (by creation time, then id), with
/// their ids.
pub fn points(
    pool: &Pool,
    volume: &str,
    identity: &str,
) -> Result<Vec<(cdmfs::SnapshotInfo, String)>, ReplError> {
    let mut snaps = pool.list_snapshots(Some(volume))?;
    snaps.sort_by_key(|s| (s.created_ns, s.id));
    Ok(snaps
        .into_iter()
        .map(|s| {
            let p = point_id(identity, &s);
            (s, p)
        })
        .collect())
}

/// The replica record of `volume`, if it is one.
pub fn get(state: &State, volume: &str) -> Result<Option<Replica>, ReplError> {
    Ok(state.get(REPLICAS, volume)?)
}

/// Every replica volume, by name.
pub fn list(state: &State) -> Result<Vec<(String, Replica)>, ReplError> {
    #[derive(Deserialize)]
    struct Named {
        volume: String,
        #[serde(flatten)]
        r: Replica,
    }
    let all: Vec<Named> = state.all(REPLICAS)?;
    Ok(all.into_iter().map(|n| (n.volume, n.r)).collect())
}

/// Records `volume` as a replica fed by `peer` (its name, identity and
/// pinned client certificate).
pub fn mark(state: &State, volume: &str, peer: &PeerId) -> Result<Replica, ReplError> {
    let r = Replica {
        peer: peer.name.clone(),
        identity: peer.identity.clone(),
        cert_sha256: peer.cert_sha256.clone(),
        since: now_unix(),
    };
    // The name rides along so `list` can tell records apart.
    let mut v = serde_json::to_value(&r).map_err(|e| ReplError::new("internal", e.to_string()))?;
    v["volume"] = volume.into();
    state.put(REPLICAS, volume, &v, Sync::Now)?;
    Ok(r)
}

/// Forgets that `volume` is a replica (and any unfinished transfer into
/// it); true if it was one. For a deleted volume, and for promote.
pub fn unmark(state: &State, volume: &str) -> Result<bool, ReplError> {
    state.remove(REPL_SESSIONS, volume)?;
    Ok(state.remove(REPLICAS, volume)?)
}

/// Makes the replica `volume` an ordinary writable volume whose contents
/// are its newest point: a transfer cut half-way (its sender may be the
/// appliance that failed) is dropped and the live tree reset to that
/// point. A sender still replicating into it gets 409 `not_a_replica`
/// from then on.
pub fn promote(state: &State, pool: &Pool, volume: &str) -> Result<(), ReplError> {
    // No receiver request runs meanwhile (each checks its replica under
    // this lock): a commit cannot label a promoted volume's snapshot.
    let _receiver = super::receive::exclusive();
    pool.volume(volume)?;
    if get(state, volume)?.is_none() {
        return Err(ReplError::new(
            "not_a_replica",
            format!("volume {volume} is not a replica"),
        ));
    }
    super::receive::reset_live(pool, state, volume)?;
    unmark(state, volume)?;
    Ok(())
}

/// Makes the ordinary volume `volume` a replica fed by `peer`: the next
/// transfer from that peer starts from the newest point both have.
pub fn demote(
    state: &State,
    pool: &Pool,
    volume: &str,
    peer: &PeerId,
) -> Result<Replica, ReplError> {
    let _receiver = super::receive::exclusive();
    pool.volume(volume)?;
    if let Some(r) = get(state, volume)? {
        return Err(ReplError::new(
            "conflict",
            format!("volume {volume} is already a replica of {}", r.peer),
        ));
    }
    mark(state, volume, peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_promote_demote() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&dir.path().join("s.redb"), None).unwrap();
        let pool = crate::replication::testutil::pool(dir.path());
        pool.create_volume("v", 1 << 20, 65536).unwrap();
        assert_eq!(get(&state, "v").unwrap(), None);
        let b = PeerId {
            name: "b".into(),
            identity: "bb".into(),
            cert_sha256: "cc".into(),
        };
        let r = demote(&state, &pool, "v", &b).unwrap();
        assert_eq!(get(&state, "v").unwrap(), Some(r.clone()));
        assert_eq!(list(&state).unwrap(), vec![("v".to_string(), r)]);
        assert!(demote(&state, &pool, "v", &b).unwrap_err().is("conflict"));
        assert!(demote(&state, &pool, "nope", &b)
            .unwrap_err()
            .is("not_found"));
        // An unfinished transfer is dropped and the live tree goes back
        // to the newest point.
        let vid = pool.volume_id("v").unwrap();
        pool.write(vid, 0, &[1u8; 65536]).unwrap();
        pool.create_snapshot("v", "p", serde_json::json!({}))
            .unwrap();
        pool.write(vid, 0, &[2u8; 65536]).unwrap();
        state
            .put(
                REPL_SESSIONS,
                "v",
                &serde_json::json!({"done": null}),
                Sync::Now,
            )
            .unwrap();
        promote(&state, &pool, "v").unwrap();
        let mut buf = vec![0u8; 65536];
        pool.read(cdmfs::Target::Volume(vid), 0, &mut buf).unwrap();
        assert!(buf == vec![1u8; 65536], "the live tree is the newest point");
        assert!(state
            .get::<_, serde_json::Value>(REPL_SESSIONS, "v")
            .unwrap()
            .is_none());
        assert_eq!(get(&state, "v").unwrap(), None);
        assert!(promote(&state, &pool, "v").unwrap_err().is("not_a_replica"));
    }
}
