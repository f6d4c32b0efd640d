//! The receiver's transfer sessions (`REPL_SESSIONS`, volume → [`Session`]):
//! one per replica volume, kept in the state database so a receiver that
//! is killed resumes where it acknowledged. A finished session stays as a
//! record of its snapshot (`done`), which makes a repeated commit
//! idempotent, until the next transfer into the volume replaces it.

use serde::{Deserialize, Serialize};

use super::error::ReplError;
use super::wire::{Entry, Kind};
use crate::state::{State, Sync, REPL_SESSIONS};

/// The point a session makes, as the source describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointMeta {
    pub point: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    pub created_ns: u64,
}

/// A lacking block the target waits for (its fingerprint in hex).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lacking {
    pub offset: u64,
    pub len: u32,
    pub fp: String,
}

/// The batch whose fingerprints were answered and whose data is awaited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub seq: u64,
    pub blocks: Vec<Lacking>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub volume: String,
    /// Identity of the sender (the only caller that may continue it).
    pub sender: String,
    pub base: Option<String>,
    pub point: PointMeta,
    pub size: u64,
    pub block_size: u32,
    pub keep_last: Option<u32>,
    pub keep_days: Option<u32>,
    /// The last batch applied and flushed (0: none).
    pub acked: u64,
    /// The sender's token for `acked`. (A fingerprint answer awaiting its
    /// data is not recorded here: `receive::Answered`.)
    pub token: String,
    /// The snapshot a commit made; the session is over.
    pub done: Option<u64>,
    pub started_unix: u64,
    /// A raw transfer: the seal its data is under.
    #[serde(default)]
    pub seal: Option<cdmfs::SealRec>,
    /// A raw transfer into a volume that is not sealed (a promoted raw
    /// replica sent back to the appliance that holds the key): its data
    /// is unsealed with the seal's keys as it is written.
    #[serde(default)]
    pub unseal: bool,
}

impl Pending {
    pub fn of(seq: u64, lacking: &[Entry]) -> Pending {
        Pending {
            seq,
            blocks: lacking
                .iter()
                .map(|e| Lacking {
                    offset: e.offset,
                    len: e.len,
                    fp: match &e.kind {
                        Kind::Data(fp) => hex::encode(fp),
                        Kind::Zero => String::new(),
                    },
                })
                .collect(),
        }
    }

    /// The awaited blocks as wire entries (a damaged record is an error).
    pub fn entries(&self) -> Result<Vec<Entry>, ReplError> {
        self.blocks
            .iter()
            .map(|b| {
                let mut fp = [0u8; 32];
                hex::decode_to_slice(&b.fp, &mut fp).map_err(|e| {
                    ReplError::new("state", format!("session record: fingerprint: {e}"))
                })?;
                Ok(Entry {
                    offset: b.offset,
                    len: b.len,
                    kind: Kind::Data(fp),
                })
            })
            .collect()
    }
}

pub fn get(state: &State, volume: &str) -> Result<Option<Session>, ReplError> {
    Ok(state.get(REPL_SESSIONS, volume)?)
}

/// The session with this id, if the target holds it.
pub fn by_id(state: &State, id: &str) -> Result<Option<Session>, ReplError> {
    let all: Vec<Session> = state.all(REPL_SESSIONS)?;
    Ok(all.into_iter().find(|s| s.id == id))
}

/// Stores a session durably: an acknowledgement must survive a crash.
pub fn put(state: &State, s: &Session) -> Result<(), ReplError> {
    state.put(REPL_SESSIONS, s.volume.as_str(), s, Sync::Now)?;
    Ok(())
}

pub fn remove(state: &State, volume: &str) -> Result<bool, ReplError> {
    Ok(state.remove(REPL_SESSIONS, volume)?)
}

/// A new session id: 128 random bits in hex.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        let e = super::super::wire::entry_of(65536, &[5u8; 4096]);
        let s = Session {
            id: new_id(),
            volume: "v".into(),
            sender: "aa".into(),
            base: None,
            point: PointMeta {
                point: "aa:3".into(),
                label: "l".into(),
                metadata: serde_json::json!({"k": 1}),
                created_ns: 5,
            },
            size: 1 << 20,
            block_size: 65536,
            keep_last: Some(2),
            keep_days: None,
            acked: 4,
            token: "t".into(),
            done: None,
            started_unix: 1,
            seal: None,
            unseal: false,
        };
        {
            let st = State::open(&p, None).unwrap();
            put(&st, &s).unwrap();
        }
        let st = State::open(&p, None).unwrap();
        assert_eq!(get(&st, "v").unwrap(), Some(s.clone()));
        assert_eq!(by_id(&st, &s.id).unwrap(), Some(s.clone()));
        assert_eq!(by_id(&st, "nope").unwrap(), None);
        assert_eq!(Pending::of(5, &[e]).entries().unwrap(), vec![e]);
        assert!(remove(&st, "v").unwrap());
        assert_eq!(get(&st, "v").unwrap(), None);
    }
}
