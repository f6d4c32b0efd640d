//! The appliance behind the API: the [`Backend`] over the pool, the NBD
//! server, the state store, events, jobs and the scheduler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use cdm_api::auth::{Caller, Role};
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use cdmfs::{Pool, SnapshotInfo, VolumeInfo};
use nbd_server::Server;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::Clock as Time;
use crate::events::{Events, HookRec};
use crate::jobs::Jobs;
use crate::scheduler::{next_run, PolicyRec, Scheduler};
use crate::state::{State, StateError, Sync, AUDIT, META, POLICIES, TOKENS, USERS, WEBHOOKS};

/// Session tokens from `POST /v1/login` live this long.
const SESSION_SECS: u64 = 12 * 3600;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct UserRec {
    pub name: String,
    pub role: String,
    pub grants: Vec<String>,
    /// Argon2id PHC string.
    pub password: Option<String>,
    pub created_unix: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TokenRec {
    pub id: String,
    pub name: String,
    pub user: String,
    /// Argon2id PHC string of the whole token.
    pub hash: String,
    pub created_unix: u64,
    pub expires_unix: Option<u64>,
}

impl TokenRec {
    fn public(&self) -> Token {
        Token {
            id: self.id.clone(),
            name: self.name.clone(),
            user: self.user.clone(),
            created_unix: self.created_unix,
            expires_unix: self.expires_unix,
        }
    }
}

/// What a job needs to run `cdm-agent` against this appliance.
#[derive(Clone, Debug)]
pub struct AgentSetup {
    pub api_url: String,
    pub state_dir: std::path::PathBuf,
}

pub struct Appliance {
    /// Set once at start (main): how jobs reach this appliance.
    pub agent: std::sync::OnceLock<AgentSetup>,
    pub pool: Arc<Pool>,
    pub nbd: Arc<Server>,
    pub state: Arc<State>,
    pub events: Arc<Events>,
    pub clock: Arc<Time>,
    pub jobs: Arc<Jobs>,
    pub scheduler: Arc<Scheduler>,
    /// NBD listen addresses (`HOST:PORT` or `unix:PATH`), for export URIs.
    pub nbd_addrs: Vec<String>,
    /// SHA-256 of tokens already verified with Argon2id → token id: Argon2
    /// runs once per token per process, not on every request.
    verified: Mutex<HashMap<[u8; 32], String>>,
    /// Itself, for jobs that outlive a request.
    me: std::sync::Weak<Appliance>,
    /// Unique bytes per volume id and when they were computed: listings
    /// reuse them for [`UNIQUE_TTL`] instead of walking every tree under the
    /// pool lock on each request.
    unique: Mutex<HashMap<u64, (std::time::Instant, u64)>>,
    /// Policy of new volumes where a request does not say.
    defaults: cdmfs::DataPolicy,
    /// Instant mounts, when snapshotd runs with `--mount DIR`.
    pub mounts: Option<crate::recovery::Mounts>,
    /// The last space report and the pool's change count it describes (it
    /// walks every tree, so it is made again only after the pool changed).
    reduction: Mutex<Option<(u64, cdmfs::ReductionReport)>>,
}

/// How long a listing may show a volume's unique bytes before recomputing.
const UNIQUE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn st(e: StateError) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Maps engine errors onto API statuses.
pub fn engine(e: cdmfs::Error) -> ApiError {
    use cdmfs::Error as E;
    match e {
        E::NotFound(_) => ApiError::not_found(e.to_string()),
        E::Exists(_) | E::Busy(_) | E::ReadOnly(_) => ApiError::conflict(e.to_string()),
        E::Invalid(_) | E::OutOfRange { .. } => ApiError::bad_request(e.to_string()),
        E::NoSpace => ApiError::new(507, "no_space", e.to_string()),
        E::KeyRequired | E::WrongKey(_) => ApiError::conflict(e.to_string()),
        E::Failed => ApiError::unavailable(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn hash_secret(secret: &str) -> ApiResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("cannot hash a secret: {e}")))
}

fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn check_password(p: &str) -> ApiResult<()> {
    if p.len() < 8 || p.len() > 1024 {
        return Err(ApiError::bad_request("password must be 8 to 1024 bytes"));
    }
    Ok(())
}

fn check_grants(g: &[String]) -> ApiResult<()> {
    for x in g {
        if !GRANTS.contains(&x.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown grant {x:?}: known grants are {GRANTS:?}"
            )));
        }
    }
    Ok(())
}

impl Appliance {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: Arc<Pool>,
        nbd: Arc<Server>,
        state: Arc<State>,
        events: Arc<Events>,
        clock: Arc<Time>,
        jobs: Arc<Jobs>,
        scheduler: Arc<Scheduler>,
        nbd_addrs: Vec<String>,
        defaults: cdmfs::DataPolicy,
        mounts: Option<crate::recovery::Mounts>,
    ) -> Arc<Appliance> {
        Arc::new_cyclic(|me| Appliance {
            agent: std::sync::OnceLock::new(),
            me: me.clone(),
            pool,
            nbd,
            state,
            events,
            clock,
            jobs,
            scheduler,
            nbd_addrs,
            verified: Mutex::new(HashMap::new()),
            unique: Mutex::new(HashMap::new()),
            defaults,
            mounts,
            reduction: Mutex::new(None),
        })
    }

    /// On first start: user `admin` and a token for it. Returns the token
    /// secret when one was made.
    pub fn bootstrap_admin(&self) -> ApiResult<Option<String>> {
        let users: Vec<UserRec> = self.state.all(USERS).map_err(st)?;
        if !users.is_empty() {
            return Ok(None);
        }
        let u = UserRec {
            name: "admin".into(),
            role: "admin".into(),
            grants: vec![],
            password: None,
            created_unix: self.clock.now(),
        };
        self.state.put(USERS, "admin", &u, Sync::Now).map_err(st)?;
        let t = self.make_token("admin", "initial", None)?;
        self.events.emit(
            "user.created",
            "admin",
            "snapshotd",
            json!({"role": "admin"}),
        );
        Ok(Some(t.token))
    }

    fn make_token(&self, user: &str, name: &str, ttl: Option<u64>) -> ApiResult<TokenCreated> {
        let id = random_hex(6);
        let token = format!("cdm_{id}_{}", random_hex(32));
        let now = self.clock.now();
        let rec = TokenRec {
            id: id.clone(),
            name: name.to_string(),
            user: user.to_string(),
            hash: hash_secret(&token)?,
            created_unix: now,
            expires_unix: ttl.map(|t| now.saturating_add(t)),
        };
        if !self.state.put_new(TOKENS, &id, &rec).map_err(st)? {
            return Err(ApiError::internal("token id collision; try again"));
        }
        Ok(TokenCreated {
            id,
            name: rec.name,
            user: rec.user,
            created_unix: rec.created_unix,
            expires_unix: rec.expires_unix,
            token,
        })
    }

    fn forget_verified(&self, token_ids: &[String]) {
        lock(&self.verified).retain(|_, id| !token_ids.contains(id));
    }

    fn user_rec(&self, name: &str) -> ApiResult<UserRec> {
        self.state
            .get(USERS, name)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("user {name} not found")))
    }

    fn public_user(u: &UserRec) -> User {
        User {
            name: u.name.clone(),
            role: u.role.clone(),
            grants: u.grants.clone(),
            has_password: u.password.is_some(),
            created_unix: u.created_unix,
        }
    }

    fn clients_of(&self, export: &str) -> Vec<ExportClient> {
        self.nbd
            .clients()
            .into_iter()
            .filter(|c| c.export == export)
            .map(|c| ExportClient {
                id: c.id,
                peer: c.peer,
                since_unix: c.since_unix,
            })
            .collect()
    }

    /// Volume name of each snapshot id, from the catalog (no tree walks).
    fn snapshot_volumes(&self) -> ApiResult<HashMap<u64, String>> {
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let names: HashMap<u64, String> = vols.into_iter().map(|v| (v.id, v.name)).collect();
        Ok(snaps
            .into_iter()
            .filter_map(|s| names.get(&s.volume_id).map(|n| (s.id, n.clone())))
            .collect())
    }

    fn to_volume(&self, v: VolumeInfo) -> Volume {
        let map = self.snapshot_volumes().unwrap_or_default();
        self.to_volume_with(v, &map)
    }

    fn to_volume_with(&self, v: VolumeInfo, snap_vol: &HashMap<u64, String>) -> Volume {
        let origin = v.origin.map(|sid| Origin {
            volume: snap_vol.get(&sid).cloned(),
            snapshot: sid,
        });
        let clients = self.clients_of(&v.name).len();
        Volume {
            export: v.name.clone(),
            name: v.name,
            id: v.id,
            kind: if origin.is_some() { "clone" } else { "stage" }.into(),
            size: v.size,
            block_size: v.block_size,
            created_unix: v.created_ns / 1_000_000_000,
            origin,
            allocated_bytes: v.allocated_bytes,
            unique_bytes: v.unique_bytes,
            snapshots: v.snapshots,
            dedup: v.policy.dedup,
            compression: v.policy.compression,
            encryption: v.policy.encryption.map_or("none", |c| c.name()).into(),
            clients,
        }
    }

    fn to_snapshot(&self, s: SnapshotInfo) -> ApiResult<Snapshot> {
        let (vols, _) = self.pool.catalog().map_err(engine)?;
        Ok(Self::to_snapshot_with(s, &vols))
    }

    fn to_snapshot_with(s: SnapshotInfo, vols: &[cdmfs::Brief]) -> Snapshot {
        let clones = vols
            .iter()
            .filter(|v| v.origin == Some(s.id))
            .map(|v| v.name.clone())
            .collect();
        Snapshot {
            export: format!("{}@{}", s.volume, s.id),
            id: s.id,
            volume: s.volume,
            label: s.label,
            created_unix: s.created_ns / 1_000_000_000,
            metadata: s.metadata,
            size: s.size,
            block_size: s.block_size,
            allocated_bytes: s.allocated_bytes,
            unique_bytes: s.unique_bytes,
            clones,
        }
    }

    fn snapshot_of(&self, volume: &str, id: u64) -> ApiResult<SnapshotInfo> {
        let s = self.pool.snapshot(id).map_err(engine)?;
        if s.volume != volume {
            return Err(ApiError::not_found(format!(
                "snapshot {id} of volume {volume} not found"
            )));
        }
        Ok(s)
    }

    fn commit(&self) -> ApiResult<()> {
        self.pool.flush().map_err(engine)
    }

    /// Volume deletion shared by the API route, clones and jobs.
    pub fn remove_volume(&self, who: &str, name: &str, force: bool, kind: &str) -> ApiResult<()> {
        let v = self.pool.volume(name).map_err(engine)?;
        let mounted = self.mounts_of(name, None);
        if !mounted.is_empty() {
            return Err(ApiError::conflict(format!(
                "{kind} {name} (or a snapshot of it) is mounted ({}); unmount it first",
                mounted.join(", ")
            )));
        }
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let mine: Vec<u64> = snaps
            .iter()
            .filter(|s| s.volume_id == v.id)
            .map(|s| s.id)
            .collect();
        let prefix = format!("{name}@");
        let busy: Vec<String> = self
            .nbd
            .clients()
            .into_iter()
            .filter(|c| c.export == name || c.export.starts_with(&prefix))
            .map(|c| format!("{} on {}", c.peer, c.export))
            .collect();
        let clones: Vec<String> = vols
            .iter()
            .filter(|c| c.origin.is_some_and(|o| mine.contains(&o)))
            .map(|c| c.name.clone())
            .collect();
        if !force {
            if !busy.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} is exported to {} client(s) ({}); disconnect them or force",
                    busy.len(),
                    busy.join(", ")
                )));
            }
            if !clones.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} has clones of its snapshots ({}); delete or promote them, or force",
                    clones.join(", ")
                )));
            }
            if !mine.is_empty() {
                return Err(ApiError::conflict(format!(
                    "{kind} {name} has {} snapshot(s); delete them or force",
                    mine.len()
                )));
            }
        }
        self.pool.delete_volume(name, true).map_err(engine)?;
        self.commit()?;
        let _ = self.state.remove(POLICIES, name);
        self.events.emit(
            &format!("{kind}.deleted"),
            name,
            who,
            json!({"snapshots_deleted": mine.len(), "forced": force}),
        );
        Ok(())
    }

    /// The policy of a new volume: the request's fields over the pool defaults.
    fn policy_for(&self, req: &VolumeCreate) -> ApiResult<cdmfs::DataPolicy> {
        let mut p = self.defaults;
        if let Some(d) = req.dedup {
            p.dedup = d;
        }
        if let Some(c) = req.compression {
            if c > cdmfs::pipeline::MAX_LEVEL {
                return Err(ApiError::bad_request(
                    "compression level must be 0 (off) to 29",
                ));
            }
            p.compression = c;
        }
        match req.encryption.as_deref() {
            None => {}
            Some("none") => p.encryption = None,
            Some(e) => {
                p.encryption = Some(cdmfs::Cipher::parse(e).map_err(|_| {
                    ApiError::bad_request(format!(
                        "unknown encryption {e:?}: use one of {ENCRYPTIONS:?}"
                    ))
                })?)
            }
        }
        if p.encryption.is_some() && !self.pool.key_state().map_err(engine)?.1 {
            return Err(ApiError::conflict(
                "encryption needs a key: start snapshotd with --key-file or --passphrase-file",
            ));
        }
        Ok(p)
    }

    /// The space report, made again only when the pool has changed.
    fn reduction_report(&self) -> ApiResult<cdmfs::ReductionReport> {
        let mut cached = lock(&self.reduction);
        let generation = self.pool.changes().map_err(engine)?;
        if let Some((g, r)) = cached.as_ref() {
            if *g == generation {
                return Ok(r.clone());
            }
        }
        let r = self.pool.reduction().map_err(engine)?;
        *cached = Some((generation, r.clone()));
        Ok(r)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend for Appliance {
    fn authenticate(&self, token: &str) -> ApiResult<Caller> {
        let bad = || ApiError::unauthorized("invalid or expired token");
        let id = token
            .strip_prefix("cdm_")
            .and_then(|r| r.split_once('_'))
            .map(|(id, _)| id)
            .ok_or_else(bad)?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let rec: TokenRec = self.state.get(TOKENS, id).map_err(st)?.ok_or_else(bad)?;
        if rec.expires_unix.is_some_and(|e| e <= self.clock.now()) {
            return Err(bad());
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = lock(&self.verified)
            .get(&digest)
            .is_some_and(|i| *i == rec.id);
        if !cached {
            if !verify_secret(token, &rec.hash) {
                return Err(bad());
            }
            let mut v = lock(&self.verified);
            if v.len() > 10_000 {
                v.clear();
            }
            v.insert(digest, rec.id.clone());
        }
        let user = self
            .state
            .get::<_, UserRec>(USERS, &rec.user)
            .map_err(st)?
            .ok_or_else(bad)?;
        Ok(Caller {
            role: Role::parse(&user.role).map_err(|_| bad())?,
            user: user.name,
            grants: user.grants,
            token_id: rec.id,
            token_name: rec.name,
        })
    }

    fn login(&self, req: Login) -> ApiResult<TokenCreated> {
        let fail = || ApiError::unauthorized("wrong user name or password");
        let u: Option<UserRec> = self.state.get(USERS, &req.name).map_err(st)?;
        let ok = match u.as_ref().and_then(|u| u.password.as_ref()) {
            Some(h) => verify_secret(&req.password, h),
            None => {
                // Same work for unknown users, so timing does not tell them apart.
                let _ = hash_secret(&req.password);
                false
            }
        };
        if !ok {
            self.events
                .emit("user.login_failed", &req.name, &req.name, json!({}));
            return Err(fail());
        }
        let t = self.make_token(&req.name, "session", Some(SESSION_SECS))?;
        self.events
            .emit("user.login", &req.name, &req.name, json!({"token": t.id}));
        Ok(t)
    }

    fn logout(&self, c: &Caller) -> ApiResult<()> {
        self.state.remove(TOKENS, &c.token_id).map_err(st)?;
        self.forget_verified(std::slice::from_ref(&c.token_id));
        self.events.emit(
            "user.logout",
            &c.user,
            &c.user,
            json!({"token": c.token_id}),
        );
        Ok(())
    }

    fn pool(&self) -> ApiResult<PoolInfo> {
        let sp = self.pool.space().map_err(engine)?;
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let policy = self
            .state
            .get::<_, PoolPolicy>(META, "pool_policy")
            .map_err(st)?
            .unwrap_or_default();
        Ok(PoolInfo {
            uuid: hex::encode(self.pool.uuid().map_err(engine)?),
            total_bytes: sp.total_bytes,
            used_bytes: sp.used_bytes,
            free_bytes: sp.free_bytes,
            generation: sp.generation,
            volumes: vols.len(),
            snapshots: snaps.len(),
            policy,
            encryption_key: match self.pool.key_state().map_err(engine)? {
                (false, false) => "none",
                (_, true) => "unlocked",
                (true, false) => "locked",
            }
            .into(),
            reduction: {
                let r = self.reduction_report()?;
                let conv = |b: &cdmfs::Reduction| ReductionFigures {
                    logical_bytes: b.logical_bytes,
                    after_dedup_bytes: b.after_dedup_bytes,
                    after_compression_bytes: b.after_compression_bytes,
                    ratio: (b.ratio() * 100.0).round() / 100.0,
                };
                PoolReduction {
                    pool: conv(&r.pool),
                    data_allocated_bytes: r.data_allocated_bytes,
                    volumes: r
                        .volumes
                        .iter()
                        .map(|v| VolumeReductionFigures {
                            name: v.name.clone(),
                            figures: conv(&v.bytes),
                        })
                        .collect(),
                }
            },
        })
    }

    fn set_pool_policy(&self, c: &Caller, p: PoolPolicy) -> ApiResult<PoolInfo> {
        if p.quota_bytes == Some(0) {
            return Err(ApiError::bad_request(
                "quota_bytes must be above 0 (or absent for none)",
            ));
        }
        self.state
            .put(META, "pool_policy", &p, Sync::Now)
            .map_err(st)?;
        self.events
            .emit("pool.updated", "pool", &c.user, json!({"policy": p}));
        self.pool()
    }

    fn create_volume(&self, c: &Caller, req: VolumeCreate) -> ApiResult<Volume> {
        let policy = self.policy_for(&req)?;
        let bs = req.block_size.unwrap_or(cdmfs::DEFAULT_BLOCK_SIZE);
        let v = self
            .pool
            .create_volume_with(&req.name, req.size, bs, policy)
            .map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "volume.created",
            &v.name,
            &c.user,
            json!({"size": v.size, "block_size": v.block_size, "policy": v.policy}),
        );
        Ok(self.to_volume(v))
    }

    fn list_volumes(&self) -> ApiResult<Vec<Volume>> {
        let v = self.pool.list_volumes_brief().map_err(engine)?;
        let map = self.snapshot_volumes()?;
        let now = std::time::Instant::now();
        let mut out = Vec::with_capacity(v.len());
        for mut v in v {
            let cached = lock(&self.unique)
                .get(&v.id)
                .filter(|(t, _)| now.duration_since(*t) < UNIQUE_TTL)
                .map(|(_, u)| *u);
            v.unique_bytes = match cached {
                Some(u) => u,
                None => match self.pool.volume(&v.name) {
                    Ok(full) => {
                        lock(&self.unique).insert(v.id, (now, full.unique_bytes));
                        full.unique_bytes
                    }
                    Err(cdmfs::Error::NotFound(_)) => continue, // deleted meanwhile
                    Err(e) => return Err(engine(e)),
                },
            };
            out.push(self.to_volume_with(v, &map));
        }
        Ok(out)
    }

    fn volume(&self, name: &str) -> ApiResult<Volume> {
        let v = self.pool.volume(name).map_err(engine)?;
        lock(&self.unique).insert(v.id, (std::time::Instant::now(), v.unique_bytes));
        Ok(self.to_volume(v))
    }

    fn grow_volume(&self, c: &Caller, name: &str, size: u64) -> ApiResult<Volume> {
        let v = self.pool.grow_volume(name, size).map_err(engine)?;
        self.commit()?;
        self.events
            .emit("volume.updated", name, &c.user, json!({"size": size}));
        Ok(self.to_volume(v))
    }

    fn delete_volume(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        let v = self.pool.volume(name).map_err(engine)?;
        let kind = if v.origin.is_some() {
            "clone"
        } else {
            "volume"
        };
        self.remove_volume(&c.user, name, force, kind)
    }

    fn policy(&self, volume: &str) -> ApiResult<Policy> {
        self.pool.volume_id(volume).map_err(engine)?;
        Ok(self
            .state
            .get::<_, (String, PolicyRec)>(POLICIES, volume)
            .map_err(st)?
            .map(|(_, r)| r.policy)
            .unwrap_or_default())
    }

    fn set_policy(&self, c: &Caller, volume: &str, p: Policy) -> ApiResult<Policy> {
        self.pool.volume_id(volume).map_err(engine)?;
        if p.retention.keep_last == Some(0) {
            return Err(ApiError::bad_request("keep_last must be at least 1"));
        }
        if p.retention.keep_days == Some(0) {
            return Err(ApiError::bad_request("keep_days must be at least 1"));
        }
        let next = next_run(&p, self.clock.now()).map_err(ApiError::bad_request)?;
        let rec = PolicyRec {
            policy: p.clone(),
            next_run_unix: next,
        };
        self.state
            .put(POLICIES, volume, &(volume.to_string(), rec), Sync::Now)
            .map_err(st)?;
        self.events.emit(
            "policy.updated",
            volume,
            &c.user,
            json!({"policy": p, "next_run_unix": next}),
        );
        Ok(p)
    }

    fn create_snapshot(
        &self,
        c: &Caller,
        volume: &str,
        req: SnapshotCreate,
    ) -> ApiResult<Snapshot> {
        let meta = req.metadata.unwrap_or_else(|| json!({}));
        if !meta.is_object() {
            return Err(ApiError::bad_request("metadata must be a JSON object"));
        }
        let label = req.label.unwrap_or_default();
        if label.len() > 256 || label.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "label must be at most 256 bytes without control characters",
            ));
        }
        let s = self
            .pool
            .create_snapshot_at(volume, &label, meta, self.clock.now_ns())
            .map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "snapshot.created",
            &format!("{volume}@{}", s.id),
            &c.user,
            json!({"volume": volume, "id": s.id, "label": label}),
        );
        self.to_snapshot(s)
    }

    fn list_snapshots(&self, volume: &str) -> ApiResult<Vec<Snapshot>> {
        let v = self.pool.list_snapshots(Some(volume)).map_err(engine)?;
        let (vols, _) = self.pool.catalog().map_err(engine)?;
        Ok(v.into_iter()
            .map(|s| Self::to_snapshot_with(s, &vols))
            .collect())
    }

    fn snapshot(&self, volume: &str, id: u64) -> ApiResult<Snapshot> {
        self.to_snapshot(self.snapshot_of(volume, id)?)
    }

    fn delete_snapshot(&self, c: &Caller, volume: &str, id: u64, force: bool) -> ApiResult<()> {
        let s = self.to_snapshot(self.snapshot_of(volume, id)?)?;
        let mounted = self.mounts_of(volume, Some(id));
        if !mounted.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} is mounted ({}); unmount it first",
                s.export,
                mounted.join(", ")
            )));
        }
        let clients = self.clients_of(&s.export);
        if !force && !clients.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} is exported to {} client(s); disconnect them or force",
                s.export,
                clients.len()
            )));
        }
        if !force && !s.clones.is_empty() {
            return Err(ApiError::conflict(format!(
                "snapshot {} has clones ({}); delete or promote them, or force",
                s.export,
                s.clones.join(", ")
            )));
        }
        self.pool.delete_snapshot(id).map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "snapshot.deleted",
            &s.export,
            &c.user,
            json!({"volume": volume, "id": id, "forced": force}),
        );
        Ok(())
    }

    fn create_clone(
        &self,
        c: &Caller,
        volume: &str,
        snapshot: u64,
        name: &str,
    ) -> ApiResult<Volume> {
        self.snapshot_of(volume, snapshot)?;
        let v = self.pool.clone_snapshot(snapshot, name).map_err(engine)?;
        self.commit()?;
        self.events.emit(
            "clone.created",
            name,
            &c.user,
            json!({"origin": format!("{volume}@{snapshot}")}),
        );
        Ok(self.to_volume(v))
    }

    fn list_clones(&self) -> ApiResult<Vec<Volume>> {
        Ok(self
            .list_volumes()?
            .into_iter()
            .filter(|v| v.kind == "clone")
            .collect())
    }

    fn promote_clone(&self, c: &Caller, name: &str) -> ApiResult<Volume> {
        let v = self.pool.promote_clone(name).map_err(|e| match e {
            cdmfs::Error::Invalid(m) => ApiError::conflict(m),
            e => engine(e),
        })?;
        self.commit()?;
        self.events.emit("clone.promoted", name, &c.user, json!({}));
        Ok(self.to_volume(v))
    }

    fn delete_clone(&self, c: &Caller, name: &str, force: bool) -> ApiResult<()> {
        let v = self.pool.volume(name).map_err(engine)?;
        if v.origin.is_none() {
            return Err(ApiError::conflict(format!(
                "volume {name} is not a clone; delete it with DELETE /v1/volumes/{name}"
            )));
        }
        self.remove_volume(&c.user, name, force, "clone")
    }

    fn create_mount(&self, c: &Caller, req: MountCreate) -> ApiResult<Mount> {
        self.mount_create(c, req)
    }
    fn put_vms(&self, c: &Caller, vms: Vec<VmRecord>) -> ApiResult<Vec<VmRecord>> {
        let items: Vec<(String, VmRecord)> =
            vms.iter().map(|v| (v.name.clone(), v.clone())).collect();
        self.state
            .replace_all(crate::state::VMS, &items)
            .map_err(st)?;
        self.events
            .emit("vms.updated", "vms", &c.user, json!({"vms": vms.len()}));
        self.list_vms()
    }
    fn list_vms(&self) -> ApiResult<Vec<VmRecord>> {
        self.state.all(crate::state::VMS).map_err(st)
    }
    fn list_mounts(&self) -> ApiResult<Vec<Mount>> {
        self.mount_list()
    }
    fn delete_mount(&self, c: &Caller, name: &str, delete_clone: bool) -> ApiResult<()> {
        self.mount_delete(c, name, delete_clone)
    }
    fn partitions(&self, volume: &str, snapshot: u64) -> ApiResult<Vec<PartitionInfo>> {
        self.files_partitions(volume, snapshot)
    }
    fn list_files(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<Vec<FileEntry>> {
        self.files_list(volume, snapshot, q)
    }
    fn stat_file(&self, volume: &str, snapshot: u64, q: FilesQuery) -> ApiResult<FileEntry> {
        self.files_stat(volume, snapshot, q)
    }
    fn download(
        &self,
        volume: &str,
        snapshot: u64,
        q: FilesQuery,
        tar: bool,
    ) -> ApiResult<Download> {
        self.files_download(volume, snapshot, q, tar)
    }

    fn list_exports(&self) -> ApiResult<Vec<Export>> {
        let uris = |name: &str| -> Vec<String> {
            self.nbd_addrs
                .iter()
                .map(|a| match a.strip_prefix("unix:") {
                    Some(p) => format!("nbd+unix:///{name}?socket={p}"),
                    None => format!("nbd://{a}/{name}"),
                })
                .collect()
        };
        let mut out = Vec::new();
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let mut vols = vols;
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        for v in &vols {
            out.push(Export {
                uris: uris(&v.name),
                clients: self.clients_of(&v.name),
                kind: if v.origin.is_some() { "clone" } else { "stage" }.into(),
                read_only: false,
                size: v.size,
                name: v.name.clone(),
            });
        }
        let names: HashMap<u64, &str> = vols.iter().map(|v| (v.id, v.name.as_str())).collect();
        for s in snaps {
            let Some(vn) = names.get(&s.volume_id) else {
                continue;
            };
            let name = format!("{vn}@{}", s.id);
            out.push(Export {
                uris: uris(&name),
                clients: self.clients_of(&name),
                kind: "snapshot".into(),
                read_only: true,
                size: s.size,
                name,
            });
        }
        Ok(out)
    }

    fn start_job(&self, c: &Caller, req: JobCreate) -> ApiResult<Job> {
        match req.kind.as_str() {
            "scrub" => {
                let pool = self.pool.clone();
                let events = self.events.clone();
                let who = c.user.clone();
                self.jobs
                    .start("scrub", &c.user, move |p| {
                        let rep = pool
                            .scrub_with(&|d, t| p.set(d, t))
                            .map_err(|e| format!("scrub failed: {e}"))?;
                        let errors: Vec<Value> = rep
                            .errors
                            .iter()
                            .take(1000)
                            .map(|e| json!({"target": e.target, "offset": e.offset, "pool_block": e.pool_block, "what": e.what}))
                            .collect();
                        if !rep.errors.is_empty() {
                            events.emit(
                                "alert.raised",
                                "pool",
                                &who,
                                json!({"message": format!("scrub found {} checksum error(s)", rep.errors.len()), "errors": errors}),
                            );
                        }
                        Ok(json!({
                            "nodes_checked": rep.nodes_checked,
                            "extents_checked": rep.extents_checked,
                            "bytes_checked": rep.bytes_checked,
                            "errors": errors,
                            "error_count": rep.errors.len(),
                        }))
                    })
                    .map_err(st)
            }
            "retention" => {
                let sched = self.scheduler.clone();
                let who = c.user.clone();
                self.jobs
                    .start("retention", &c.user, move |p| {
                        let gone = sched.apply_retention(&who)?;
                        p.set(1, 1);
                        Ok(json!({"expired": gone}))
                    })
                    .map_err(st)
            }
            "delete-volume" => {
                let Some(v) = req.volume.clone() else {
                    return Err(ApiError::bad_request("delete-volume needs \"volume\""));
                };
                let kind = if self.pool.volume(&v).map_err(engine)?.origin.is_some() {
                    "clone"
                } else {
                    "volume"
                };
                let me = self.self_arc()?;
                let who = c.user.clone();
                let force = req.force;
                self.jobs
                    .start("delete-volume", &c.user, move |p| {
                        me.remove_volume(&who, &v, force, kind)
                            .map_err(|e| e.message)?;
                        p.set(1, 1);
                        Ok(json!({"deleted": v}))
                    })
                    .map_err(st)
            }
            "vm-backup" => {
                let (Some(inventory), Some(category)) =
                    (req.inventory.clone(), req.category.clone())
                else {
                    return Err(ApiError::bad_request(
                        "vm-backup needs \"inventory\" (a path on the appliance) and \"category\"",
                    ));
                };
                cdm_api::vms::selects(&VmRecord::default(), &category)
                    .map_err(ApiError::bad_request)?;
                let setup = self.agent.get().cloned().ok_or_else(|| {
                    ApiError::new(503, "unavailable", "the appliance is starting")
                })?;
                let nbd = self
                    .nbd_addrs
                    .first()
                    .cloned()
                    .ok_or_else(|| ApiError::new(503, "unavailable", "no NBD listener"))?;
                // The job acts as its caller, with a token that lives as long
                // as the job (revoked when it ends, expiring in a day anyway).
                let tok = self.make_token(&c.user, "vm-backup job", Some(86_400))?;
                let me = self.self_arc()?;
                let parallel = req.parallel.unwrap_or(2).clamp(1, 16);
                self.jobs
                    .start("vm-backup", &c.user, move |p| {
                        let r = run_agent_backup(
                            &setup, &nbd, &tok.token, &inventory, &category, parallel,
                        );
                        let _ = me.state.remove(TOKENS, tok.id.as_str());
                        me.forget_verified(std::slice::from_ref(&tok.id));
                        p.set(1, 1);
                        r
                    })
                    .map_err(st)
            }
            k => Err(ApiError::bad_request(format!(
                "unknown job kind {k:?}: use scrub, retention, delete-volume or vm-backup"
            ))),
        }
    }

    fn list_jobs(&self) -> ApiResult<Vec<Job>> {
        self.jobs.list().map_err(st)
    }

    fn job(&self, id: u64) -> ApiResult<Job> {
        self.jobs
            .get(id)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
    }

    fn events(&self, q: EventQuery) -> ApiResult<Vec<Event>> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let kind = q.kind.clone();
        self.state
            .scan::<Event>(
                crate::state::EVENTS,
                q.after.unwrap_or(0),
                limit,
                q.after.is_none(),
                |e| {
                    kind.as_deref()
                        .is_none_or(|k| crate::events::matches(k, &e.kind))
                },
            )
            .map_err(st)
    }

    fn audit(&self, q: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let user = q.user.clone();
        self.state
            .scan::<AuditEntry>(AUDIT, q.after.unwrap_or(0), limit, q.after.is_none(), |e| {
                user.as_deref().is_none_or(|u| e.user == u)
            })
            .map_err(st)
    }

    fn record_audit(&self, c: &Caller, method: &str, path: &str, status: u16) {
        let now = self.clock.now();
        if let Err(e) = self.state.append(AUDIT, Sync::Lazy, |id| AuditEntry {
            id,
            time_unix: now,
            user: c.user.clone(),
            token: c.token_name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            status,
        }) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    fn create_webhook(&self, c: &Caller, req: WebhookCreate) -> ApiResult<Webhook> {
        let url = req.url.trim().to_string();
        let parsed_ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() <= 2048
            && !url.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            && url
                .split("://")
                .nth(1)
                .is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
        if !parsed_ok {
            return Err(ApiError::bad_request(format!(
                "webhook url {url:?} must be an http:// or https:// URL with a host"
            )));
        }
        if req.events.is_empty() {
            return Err(ApiError::bad_request(
                "events must name at least one type (or \"*\")",
            ));
        }
        for e in &req.events {
            let ok = e == "*"
                || (e.len() <= 64
                    && e.split_once('.').is_some_and(|(m, a)| {
                        !m.is_empty()
                            && !a.is_empty()
                            && m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                            && (a == "*" || a.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    }));
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "bad event type {e:?}: use MODULE.ACTION, MODULE.* or *"
                )));
            }
        }
        let secret = match req.secret {
            Some(s) if s.len() >= 16 && s.len() <= 256 => s,
            Some(_) => return Err(ApiError::bad_request("secret must be 16 to 256 bytes")),
            None => random_hex(32),
        };
        let now = self.clock.now();
        let events = req.events.clone();
        let rec = self
            .state
            .append(WEBHOOKS, Sync::Now, |id| HookRec {
                id,
                url: url.clone(),
                events,
                secret: secret.clone(),
                created_unix: now,
            })
            .map_err(st)?;
        self.events.add_hook(rec.clone());
        self.events.emit(
            "webhook.created",
            &format!("webhook {}", rec.id),
            &c.user,
            json!({"url": url, "events": req.events}),
        );
        let mut w = rec.public();
        w.secret = Some(secret);
        Ok(w)
    }

    fn list_webhooks(&self) -> ApiResult<Vec<Webhook>> {
        Ok(self
            .state
            .scan::<HookRec>(WEBHOOKS, 0, usize::MAX, false, |_| true)
            .map_err(st)?
            .iter()
            .map(HookRec::public)
            .collect())
    }

    fn webhook(&self, id: u64) -> ApiResult<Webhook> {
        self.state
            .get::<_, HookRec>(WEBHOOKS, id)
            .map_err(st)?
            .map(|h| h.public())
            .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))
    }

    fn delete_webhook(&self, c: &Caller, id: u64) -> ApiResult<()> {
        if !self.state.remove(WEBHOOKS, id).map_err(st)? {
            return Err(ApiError::not_found(format!("webhook {id} not found")));
        }
        self.events.remove_hook(id);
        self.events.emit(
            "webhook.deleted",
            &format!("webhook {id}"),
            &c.user,
            json!({}),
        );
        Ok(())
    }

    fn deliveries(&self, id: u64) -> ApiResult<Vec<Delivery>> {
        self.webhook(id)?;
        self.events.deliveries(id).map_err(st)
    }

    fn create_user(&self, c: &Caller, req: UserCreate) -> ApiResult<User> {
        Role::parse(&req.role)?;
        check_grants(&req.grants)?;
        let password = match &req.password {
            Some(p) => {
                check_password(p)?;
                Some(hash_secret(p)?)
            }
            None => None,
        };
        let u = UserRec {
            name: req.name.clone(),
            role: req.role.clone(),
            grants: req.grants.clone(),
            password,
            created_unix: self.clock.now(),
        };
        if !self.state.put_new(USERS, &u.name, &u).map_err(st)? {
            return Err(ApiError::conflict(format!(
                "user {} already exists",
                u.name
            )));
        }
        self.events.emit(
            "user.created",
            &u.name,
            &c.user,
            json!({"role": u.role, "grants": u.grants}),
        );
        Ok(Self::public_user(&u))
    }

    fn list_users(&self) -> ApiResult<Vec<User>> {
        let v: Vec<UserRec> = self.state.all(USERS).map_err(st)?;
        Ok(v.iter().map(Self::public_user).collect())
    }

    fn user(&self, name: &str) -> ApiResult<User> {
        Ok(Self::public_user(&self.user_rec(name)?))
    }

    fn update_user(&self, c: &Caller, name: &str, req: UserUpdate) -> ApiResult<User> {
        let mut u = self.user_rec(name)?;
        if let Some(r) = &req.role {
            Role::parse(r)?;
            if u.role == "admin" && r != "admin" && self.admin_count()? <= 1 {
                return Err(ApiError::conflict("cannot demote the last admin"));
            }
            u.role = r.clone();
        }
        if let Some(g) = &req.grants {
            check_grants(g)?;
            u.grants = g.clone();
        }
        if let Some(p) = &req.password {
            check_password(p)?;
            u.password = Some(hash_secret(p)?);
        }
        self.state.put(USERS, name, &u, Sync::Now).map_err(st)?;
        self.events.emit(
            "user.updated",
            name,
            &c.user,
            json!({"role": u.role, "grants": u.grants, "password_changed": req.password.is_some()}),
        );
        Ok(Self::public_user(&u))
    }

    fn delete_user(&self, c: &Caller, name: &str) -> ApiResult<()> {
        let u = self.user_rec(name)?;
        if u.role == "admin" && self.admin_count()? <= 1 {
            return Err(ApiError::conflict("cannot delete the last admin"));
        }
        self.state.remove(USERS, name).map_err(st)?;
        let gone: Vec<TokenRec> = self
            .state
            .remove_where(TOKENS, |t: &TokenRec| t.user == name)
            .map_err(st)?;
        self.forget_verified(&gone.iter().map(|t| t.id.clone()).collect::<Vec<_>>());
        self.events.emit(
            "user.deleted",
            name,
            &c.user,
            json!({"tokens_revoked": gone.len()}),
        );
        Ok(())
    }

    fn create_token(&self, c: &Caller, user: &str, req: TokenCreate) -> ApiResult<TokenCreated> {
        self.user_rec(user)?;
        if req.expires_in_secs == Some(0) {
            return Err(ApiError::bad_request("expires_in_secs must be above 0"));
        }
        let t = self.make_token(user, &req.name, req.expires_in_secs)?;
        self.events.emit(
            "token.created",
            user,
            &c.user,
            json!({"id": t.id, "name": t.name, "expires_unix": t.expires_unix}),
        );
        Ok(t)
    }

    fn list_tokens(&self, user: &str) -> ApiResult<Vec<Token>> {
        self.user_rec(user)?;
        let v: Vec<TokenRec> = self.state.all(TOKENS).map_err(st)?;
        let mut v: Vec<Token> = v
            .iter()
            .filter(|t| t.user == user)
            .map(TokenRec::public)
            .collect();
        v.sort_by_key(|t| t.created_unix);
        Ok(v)
    }

    fn delete_token(&self, c: &Caller, user: &str, id: &str) -> ApiResult<()> {
        let t: Option<TokenRec> = self.state.get(TOKENS, id).map_err(st)?;
        match t {
            Some(t) if t.user == user => {
                self.state.remove(TOKENS, id).map_err(st)?;
                self.forget_verified(std::slice::from_ref(&t.id));
                self.events.emit(
                    "token.deleted",
                    user,
                    &c.user,
                    json!({"id": id, "name": t.name}),
                );
                Ok(())
            }
            _ => Err(ApiError::not_found(format!(
                "token {id} of user {user} not found"
            ))),
        }
    }

    fn clock(&self) -> ApiResult<Clock> {
        Ok(Clock {
            now_unix: self.clock.now(),
            fake: self.clock.is_fake(),
        })
    }

    fn advance_clock(&self, c: &Caller, secs: u64) -> ApiResult<Clock> {
        if secs > 100 * 365 * 86_400 {
            return Err(ApiError::bad_request("advance at most 100 years"));
        }
        if !self.clock.advance(secs) {
            return Err(ApiError::not_found(
                "the clock is real; start snapshotd with --fake-clock to move it",
            ));
        }
        tracing::warn!(secs, by = %c.user, "fake clock advanced");
        self.clock()
    }

    fn metrics(&self) -> ApiResult<String> {
        crate::metrics::render(self).map_err(engine)
    }

    fn health(&self) -> ApiResult<Value> {
        let sp = self.pool.space().map_err(engine)?;
        Ok(json!({"pool_generation": sp.generation, "nbd_clients": self.nbd.clients().len()}))
    }
}

impl Appliance {
    fn admin_count(&self) -> ApiResult<usize> {
        let v: Vec<UserRec> = self.state.all(USERS).map_err(st)?;
        Ok(v.iter().filter(|u| u.role == "admin").count())
    }

    fn self_arc(&self) -> ApiResult<Arc<Appliance>> {
        self.me
            .upgrade()
            .ok_or_else(|| ApiError::unavailable("appliance is shutting down"))
    }
}

/// Runs `cdm-agent vm backup` (next to this binary, else on PATH) against
/// this appliance; its JSON result, or its error.
fn run_agent_backup(
    setup: &AgentSetup,
    nbd: &str,
    token: &str,
    inventory: &str,
    category: &str,
    parallel: usize,
) -> Result<Value, String> {
    let exe = std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("cdm-agent"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| std::path::PathBuf::from("cdm-agent"));
    let mut cmd = std::process::Command::new(&exe);
    // This daemon blocks SIGTERM and SIGINT in every thread (it waits for
    // them with sigwait), and a blocked mask survives exec: give the agent,
    // and the qemu-nbd it stops with SIGTERM, a clean one.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let out = cmd
        .args([
            "--json",
            "--url",
            &setup.api_url,
            "--nbd",
            nbd,
            "--state-dir",
        ])
        .arg(&setup.state_dir)
        .args([
            "vm",
            "backup",
            "--inventory",
            inventory,
            "--category",
            category,
            "--parallel",
        ])
        .arg(parallel.to_string())
        .env("CDM_TOKEN", token)
        .env_remove("CDM_TOKEN_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!(
            "cdm-agent ({}) answered no JSON: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if out.status.success() {
        Ok(v)
    } else {
        Err(v["error"]
            .as_str()
            .unwrap_or("cdm-agent failed")
            .to_string())
    }
}
