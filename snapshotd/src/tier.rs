//! The object-storage tier (issue 21), snapshotd's side: the stored
//! configuration (its secret key sealed by [`crate::secrets`]) and the
//! hooks between the API and the engine — where a point's data is, whether
//! any is in the store, and the bodies of the `tier`, `recall` and
//! `tier-gc` jobs.
//!
//! The engine side (which extents move, the tier map, reads through the
//! store) is not wired yet: until it is, every point is `local`, the store
//! holds nothing, and the jobs fail with [`NOT_AVAILABLE`]. Those four
//! functions are the only places to change when it lands.

use cdm_api::tier::TierConfigPut;
use cdmfs::{Pool, SnapshotInfo};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::jobs::Progress;
use crate::secrets::SecretBox;
use crate::state::{State, Sync, META};

/// The state record's key (in `META`).
const RECORD: &str = "tier_config";
/// What the sealed secret is bound to ([`SecretBox::seal`]).
const PURPOSE: &str = "tier.secret_key";
/// The failure of every tier job until the engine side is wired.
pub const NOT_AVAILABLE: &str = "tier jobs are not available yet";

/// The whole configuration, the secret key in clear: for the code that
/// talks to the store, never for an answer or a log (its `Debug` hides
/// the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierSettings {
    /// Validated ([`TierConfigPut::validated`]): the prefix is filled in.
    pub config: TierConfigPut,
    pub updated_unix: u64,
}

/// As stored: the configuration with an empty `secret_key` and the key
/// sealed beside it.
#[derive(Serialize, Deserialize)]
struct Record {
    config: TierConfigPut,
    sealed_secret_key: String,
    updated_unix: u64,
}

fn secrets(state: &State) -> Result<SecretBox> {
    Ok(SecretBox::load_or_create(&SecretBox::path_for(
        state.path(),
    ))?)
}

impl State {
    /// The tier's configuration with its secret key decrypted, if one is
    /// set.
    pub fn tier_config(&self) -> Result<Option<TierSettings>> {
        let Some(r) = self.get::<_, Record>(META, RECORD)? else {
            return Ok(None);
        };
        let mut config = r.config;
        config.secret_key = secrets(self)?.open(PURPOSE, &r.sealed_secret_key)?;
        Ok(Some(TierSettings {
            config,
            updated_unix: r.updated_unix,
        }))
    }

    /// The view of the configuration (no secret), without opening the
    /// secret: what `GET /v1/tier` answers.
    pub fn tier_view(&self) -> Result<Option<cdm_api::tier::TierConfigView>> {
        Ok(self.get::<_, Record>(META, RECORD)?.map(|r| view_of(&r)))
    }

    /// Stores a validated configuration, its secret key sealed; synced.
    pub fn set_tier_config(&self, s: &TierSettings) -> Result<cdm_api::tier::TierConfigView> {
        let sealed = secrets(self)?.seal(PURPOSE, &s.config.secret_key)?;
        let mut config = s.config.clone();
        config.secret_key = String::new();
        let r = Record {
            config,
            sealed_secret_key: sealed,
            updated_unix: s.updated_unix,
        };
        self.put(META, RECORD, &r, Sync::Now)?;
        Ok(view_of(&r))
    }

    /// Forgets the configuration; false if there was none.
    pub fn delete_tier_config(&self) -> Result<bool> {
        Ok(self.remove(META, RECORD)?)
    }
}

fn view_of(r: &Record) -> cdm_api::tier::TierConfigView {
    let mut v = r.config.view(r.updated_unix);
    // The stored config's secret is blanked: what says one is set is the
    // sealed copy beside it.
    v.secret_key_set = !r.sealed_secret_key.is_empty();
    v
}

// ---- the engine's answers (to be wired by the engine side) ---------------

/// Where a point's data is: `local`, `tiered` or `recalling`
/// (`cdm_api::types::LOCATIONS`). Every point is local until the engine
/// keeps a tier map.
pub fn snapshot_location(_s: &SnapshotInfo) -> &'static str {
    cdm_api::types::LOCATIONS[0]
}

/// Whether any point's data is in the object store (a configuration is
/// not deleted while it is). False until the engine keeps a tier map.
pub fn tier_has_data(_pool: &Pool) -> Result<bool> {
    Ok(false)
}

/// A `tier` job: moves the uniquely owned data of `volume`'s points due by
/// its policy (`tier_after_days`, `tier_keep_last`), or of `snapshot` only,
/// to the store; its JSON result.
pub fn run_tier(
    _pool: &Pool,
    _settings: &TierSettings,
    _policy: &cdm_api::types::SnapshotPolicy,
    _volume: &str,
    _snapshot: Option<u64>,
    _progress: &Progress,
) -> Result<Value> {
    Err(Error::Failed(NOT_AVAILABLE.into()))
}

/// A `recall` job: brings point `snapshot` of `volume` back to the pool.
pub fn run_recall(
    _pool: &Pool,
    _settings: &TierSettings,
    _volume: &str,
    _snapshot: u64,
    _progress: &Progress,
) -> Result<Value> {
    Err(Error::Failed(NOT_AVAILABLE.into()))
}

/// A `tier-gc` job: lists the store and deletes in batches the objects
/// no point refers to.
pub fn run_gc(_pool: &Pool, _settings: &TierSettings, _progress: &Progress) -> Result<Value> {
    Err(Error::Failed(NOT_AVAILABLE.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_stored_sealed_and_read_back_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.redb");
        let state = State::open(&db, None).unwrap();
        assert!(state.tier_config().unwrap().is_none());
        assert!(state.tier_view().unwrap().is_none());
        let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY";
        let config: TierConfigPut = serde_json::from_value(serde_json::json!({
            "endpoint": "http://127.0.0.1:9000", "bucket": "cdm-test",
            "access_key": "AKIAEXAMPLE", "secret_key": secret}))
        .unwrap();
        let s = TierSettings {
            config: config.validated("abcd").unwrap(),
            updated_unix: 42,
        };
        let v = state.set_tier_config(&s).unwrap();
        assert!(v.secret_key_set);
        assert_eq!(v.prefix, "cdm/abcd/");
        assert_eq!(state.tier_view().unwrap().unwrap(), v);
        assert_eq!(state.tier_config().unwrap().unwrap(), s);
        assert!(!format!("{s:?}").contains(secret));
        drop(state);
        // Nothing under the data directory holds the secret in clear.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let b = std::fs::read(e.unwrap().path()).unwrap();
            assert!(!b.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
        let state = State::open(&db, None).unwrap();
        assert_eq!(state.tier_config().unwrap().unwrap(), s);
        // Without its key the secret does not open: an error, not garbage.
        std::fs::remove_file(SecretBox::path_for(&db)).unwrap();
        assert!(state.tier_config().is_err());
        assert!(state.delete_tier_config().unwrap());
        assert!(!state.delete_tier_config().unwrap());
    }
}
