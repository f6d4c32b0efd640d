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
    /// Unix seconds when it became a replica.
    pub since: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

/// Records `volume` as a replica fed by `peer` (`identity`).
pub fn mark(state: &State, volume: &str, peer: &str, identity: &str) -> Result<Replica, ReplError> {
    let r = Replica {
        peer: peer.to_string(),
        identity: identity.to_string(),
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

/// True while a transfer into `volume` is applied but not committed: the
/// live tree then holds part of a point.
fn transfer_open(state: &State, volume: &str) -> Result<bool, ReplError> {
    let s: Option<serde_json::Value> = state.get(REPL_SESSIONS, volume)?;
    Ok(s.is_some_and(|s| s["done"].is_null()))
}

/// Makes the replica `volume` an ordinary writable volume whose contents
/// are its newest point. A sender still replicating into it gets 409
/// `not_a_replica` from then on.
pub fn promote(state: &State, pool: &Pool, volume: &str) -> Result<(), ReplError> {
    pool.volume(volume)?;
    if get(state, volume)?.is_none() {
        return Err(ReplError::new(
            "not_a_replica",
            format!("volume {volume} is not a replica"),
        ));
    }
    if transfer_open(state, volume)? {
        return Err(ReplError::new(
            "busy",
            format!("a transfer into {volume} is not finished; try again when it is"),
        ));
    }
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
    pool.volume(volume)?;
    if let Some(r) = get(state, volume)? {
        return Err(ReplError::new(
            "conflict",
            format!("volume {volume} is already a replica of {}", r.peer),
        ));
    }
    mark(state, volume, &peer.name, &peer.identity)
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
        };
        let r = demote(&state, &pool, "v", &b).unwrap();
        assert_eq!(get(&state, "v").unwrap(), Some(r.clone()));
        assert_eq!(list(&state).unwrap(), vec![("v".to_string(), r)]);
        assert!(demote(&state, &pool, "v", &b).unwrap_err().is("conflict"));
        assert!(demote(&state, &pool, "nope", &b)
            .unwrap_err()
            .is("not_found"));
        // An unfinished transfer holds the promote off.
        state
            .put(
                REPL_SESSIONS,
                "v",
                &serde_json::json!({"done": null}),
                Sync::Now,
            )
            .unwrap();
        assert!(promote(&state, &pool, "v").unwrap_err().is("busy"));
        state
            .put(
                REPL_SESSIONS,
                "v",
                &serde_json::json!({"done": 7}),
                Sync::Now,
            )
            .unwrap();
        promote(&state, &pool, "v").unwrap();
        assert_eq!(get(&state, "v").unwrap(), None);
        assert!(promote(&state, &pool, "v").unwrap_err().is("not_a_replica"));
    }
}
