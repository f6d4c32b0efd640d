//! The object-storage tier (issue 21), snapshotd's side: the stored
//! configuration (its secret key sealed by [`crate::secrets`]) and the
//! hooks between the API and the engine — where a point's data is, whether
//! any is in the store, and the bodies of the `tier`, `recall` and
//! `tier-gc` jobs.
//!
//! The work itself is the `cdm-tier` crate's jobs over the engine's tier
//! API; here: the store in use ([`Runtime`]), which points are due, and
//! the jobs' bodies.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use cdm_api::tier::TierConfigPut;
use cdm_tier::{
    engine_reader, gc_and_repack, recall_point, tier_points, CacheConfig, Control, PackCache,
    PackSizes, S3Config, S3Store, TierMetrics, TierReader,
};
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

// ---- the store in use ------------------------------------------------------

/// The store, read cache and counters built from the configuration: one
/// per process (snapshotd serves one pool). Tier jobs run one at a time:
/// a pack uploaded and not yet committed is safe from a GC only so.
pub struct Runtime {
    active: Mutex<Option<Active>>,
    /// Kept across reconfigurations, for `/metrics`.
    pub metrics: Arc<TierMetrics>,
    jobs: Mutex<()>,
    recalling: Mutex<BTreeSet<u64>>,
    /// Points a tier run found nothing to move for (all their data shared
    /// with what stays, or recalled): the sweep does not start jobs for
    /// them again (until a restart).
    settled: Mutex<BTreeSet<u64>>,
    cache_dir: OnceLock<PathBuf>,
}

struct Active {
    /// What it was built from (two changes within a second differ too).
    settings: TierSettings,
    store: Arc<S3Store>,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The process's tier runtime.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| Runtime {
        active: Mutex::new(None),
        metrics: Arc::new(TierMetrics::default()),
        jobs: Mutex::new(()),
        recalling: Mutex::new(BTreeSet::new()),
        settled: Mutex::new(BTreeSet::new()),
        cache_dir: OnceLock::new(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The store client's configuration from the API's.
fn s3_config(c: &TierConfigPut) -> S3Config {
    let mut s = S3Config::new(&c.endpoint, &c.bucket, &c.access_key, &c.secret_key);
    s.region = c.region.clone();
    s.path_style = c.path_style;
    s.prefix = c.prefix.clone().unwrap_or_default();
    s.max_requests_per_sec = c.max_requests_per_sec;
    s.max_bytes_per_sec = c.max_mib_per_sec.map(|m| m as u64 * MIB);
    s
}

const MIB: u64 = 1 << 20;

impl Runtime {
    /// At start: where the read cache lives, and the store of a stored
    /// configuration attached to the pool (nothing is contacted yet).
    pub fn start(&self, state: &State, pool: &Pool, data: &Path) -> Result<()> {
        let _ = self.cache_dir.set(data.join("tier-cache"));
        if let Some(s) = state.tier_config()? {
            self.activate(pool, &s)?;
        }
        Ok(())
    }

    /// The store for `s`, built (with a fresh cache in front of it, and
    /// attached to the pool for reads of tiered data) unless it is the
    /// one in use.
    pub fn activate(&self, pool: &Pool, s: &TierSettings) -> Result<Arc<S3Store>> {
        let mut a = lock(&self.active);
        if let Some(cur) = a.as_ref().filter(|c| c.settings == *s) {
            return Ok(cur.store.clone());
        }
        let fail = |e: String| Error::Failed(format!("object store: {e}"));
        let store = Arc::new(
            S3Store::with_metrics(s3_config(&s.config), self.metrics.clone())
                .map_err(|e| fail(e.to_string()))?,
        );
        let dir = self
            .cache_dir
            .get()
            .cloned()
            .unwrap_or_else(|| std::env::temp_dir().join("cdm-tier-cache"));
        // Cached chunks of another configuration's packs would be wrong.
        let _ = std::fs::remove_dir_all(&dir);
        let cache = PackCache::open(
            CacheConfig::new(&dir, s.config.cache_bytes),
            self.metrics.clone(),
        )
        .map_err(|e| fail(format!("read cache {}: {e}", dir.display())))?;
        let reader = Arc::new(TierReader::new(store.clone(), cache));
        pool.set_tier(Some(engine_reader(reader)));
        *a = Some(Active {
            settings: s.clone(),
            store: store.clone(),
        });
        Ok(store)
    }

    /// Whether a tier run found nothing to move for point `id`.
    pub fn settled(&self, id: u64) -> bool {
        lock(&self.settled).contains(&id)
    }

    /// Whether a tier job is running.
    pub fn busy(&self) -> bool {
        self.jobs.try_lock().is_err()
    }

    /// Detaches the store (its configuration was deleted).
    pub fn deactivate(&self, pool: &Pool) {
        pool.set_tier(None);
        *lock(&self.active) = None;
    }
}

/// Where a point's data is: `local`, `tiered` or `recalling`
/// (`cdm_api::types::LOCATIONS`).
pub fn snapshot_location(s: &SnapshotInfo) -> &'static str {
    location_of(s.id, s.tiered)
}

/// [`snapshot_location`] from a point's id and tiered flag.
pub fn location_of(id: u64, tiered: bool) -> &'static str {
    if lock(&runtime().recalling).contains(&id) {
        "recalling"
    } else if tiered {
        "tiered"
    } else {
        "local"
    }
}

/// Whether any point's data is in the object store (a configuration is
/// not deleted while it is).
pub fn tier_has_data(pool: &Pool) -> Result<bool> {
    Ok(!pool.tier_packs()?.is_empty())
}

/// The points of `volume` its policy makes due: beyond the newest
/// `tier_keep_last`, or older than `tier_after_days` (at `now`, Unix
/// seconds).
pub fn due_points(
    pool: &Pool,
    volume: &str,
    policy: &cdm_api::types::SnapshotPolicy,
    now: u64,
) -> Result<Vec<SnapshotInfo>> {
    let mut snaps = pool.list_snapshots(Some(volume))?;
    snaps.sort_by_key(|s| (s.created_ns, s.id));
    let n = snaps.len();
    Ok(snaps
        .into_iter()
        .enumerate()
        .filter(|(i, s)| {
            let beyond = policy
                .tier_keep_last
                .is_some_and(|k| (*i as u64) + (k as u64) < n as u64);
            let old = policy
                .tier_after_days
                .is_some_and(|d| s.created_ns / 1_000_000_000 + d as u64 * 86_400 <= now);
            beyond || old
        })
        .map(|(_, s)| s)
        .collect())
}

fn sizes(s: &TierSettings) -> PackSizes {
    let pack = s.config.pack_mib as u64 * MIB;
    PackSizes {
        pack_bytes: pack,
        commit_bytes: (8 * pack).max(256 * MIB),
    }
}

fn failed(e: cdm_tier::JobError) -> Error {
    Error::Failed(e.to_string())
}

fn json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Failed(e.to_string()))
}

/// A `tier` job: moves the uniquely owned data of `volume`'s points due by
/// its policy (`tier_after_days`, `tier_keep_last`) at `now`, or of
/// `snapshot` only, to the store; its JSON result.
pub fn run_tier(
    pool: &Pool,
    settings: &TierSettings,
    policy: &cdm_api::types::SnapshotPolicy,
    volume: &str,
    snapshot: Option<u64>,
    now: u64,
    progress: &Progress,
) -> Result<Value> {
    let rt = runtime();
    let _one = lock(&rt.jobs);
    let store = rt.activate(pool, settings)?;
    let points: Vec<u64> = match snapshot {
        Some(s) => vec![s],
        None => due_points(pool, volume, policy, now)?
            .iter()
            .map(|s| s.id)
            .collect(),
    };
    let cancel = AtomicBool::new(false);
    let report = |d: u64, t: u64| progress.set(d, t);
    let ctl = Control {
        cancel: &cancel,
        progress: &report,
    };
    let rep = tier_points(pool, &store, &points, sizes(settings), &ctl).map_err(failed)?;
    if rep.objects == 0 {
        lock(&rt.settled).extend(points.iter().copied());
    }
    tracing::info!(volume, points = ?rep.points, objects = rep.objects, bytes = rep.bytes,
        packs = rep.packs, "tiered");
    json(&rep)
}

/// A `recall` job: brings point `snapshot` of `volume` back to the pool.
pub fn run_recall(
    pool: &Pool,
    settings: &TierSettings,
    volume: &str,
    snapshot: u64,
    progress: &Progress,
) -> Result<Value> {
    let rt = runtime();
    let _one = lock(&rt.jobs);
    let store = rt.activate(pool, settings)?;
    lock(&rt.recalling).insert(snapshot);
    let cancel = AtomicBool::new(false);
    let report = |d: u64, t: u64| progress.set(d, t);
    let ctl = Control {
        cancel: &cancel,
        progress: &report,
    };
    let r = recall_point(pool, &store, snapshot, &ctl);
    lock(&rt.recalling).remove(&snapshot);
    let rep = r.map_err(failed)?;
    tracing::info!(
        volume,
        snapshot,
        objects = rep.objects,
        bytes = rep.bytes,
        "recalled"
    );
    json(&rep)
}

/// A `tier-gc` job: repacks packs whose live share fell below half, then
/// lists the store and deletes in batches the packs no point refers to.
pub fn run_gc(pool: &Pool, settings: &TierSettings, progress: &Progress) -> Result<Value> {
    let rt = runtime();
    let _one = lock(&rt.jobs);
    let store = rt.activate(pool, settings)?;
    let cancel = AtomicBool::new(false);
    let report = |d: u64, t: u64| progress.set(d, t);
    let ctl = Control {
        cancel: &cancel,
        progress: &report,
    };
    let rep = gc_and_repack(pool, &store, 0.5, sizes(settings), &ctl).map_err(failed)?;
    tracing::info!(
        repacked = rep.repacked_packs,
        deleted = rep.gc.deleted,
        "tier GC"
    );
    json(&rep)
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
