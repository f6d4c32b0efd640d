//! Hosts: one-use enrolment tokens, the enrolment that turns one into a
//! host credential, heartbeats (with discovered applications and the jobs
//! the agent runs, and its log archivers' states), the host list, and
//! retirement.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use cdm_api::auth::{Caller, Role};
use cdm_api::control::*;
use cdm_api::types::TokenCreated;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{host_user, lock, Control, EnrolRec, HostRec};
use crate::appliance::st;
use crate::state::{Sync, ENROLMENTS, HOSTS};

/// Enrolment tokens live an hour unless asked otherwise, at most a week.
const ENROL_TTL: u64 = 3600;
const ENROL_TTL_MAX: u64 = 7 * 86_400;

fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn invalid(m: &str) -> ApiError {
    ApiError::new(401, "invalid_token", m)
}

impl Control {
    pub fn create_enrolment(&self, c: &Caller, req: EnrolmentCreate) -> ApiResult<EnrolmentToken> {
        let ttl = req.ttl_seconds.unwrap_or(ENROL_TTL);
        if ttl == 0 || ttl > ENROL_TTL_MAX {
            return Err(ApiError::bad_request(format!(
                "ttl_seconds must be 1 to {ENROL_TTL_MAX}"
            )));
        }
        let mut b = [0u8; 24];
        OsRng.fill_bytes(&mut b);
        let token = format!("cdm_enrol_{}", hex::encode(b));
        let now = self.now();
        let rec = EnrolRec {
            name: req.name.clone(),
            created_by: c.user.clone(),
            created_unix: now,
            expires_unix: now + ttl,
            used: false,
        };
        self.state
            .put(ENROLMENTS, token_key(&token).as_str(), &rec, Sync::Now)
            .map_err(st)?;
        self.events.emit(
            "host.enrolment_created",
            req.name.as_deref().unwrap_or("host"),
            &c.user,
            json!({"name": req.name, "expires_unix": rec.expires_unix}),
        );
        Ok(EnrolmentToken {
            token,
            expires_at: rfc3339(rec.expires_unix),
            expires_unix: rec.expires_unix,
            ca_sha256: None,
        })
    }

    /// Spends an enrolment token: the host's record and, from `mint`, its
    /// credential (a token of user `host:NAME`).
    pub fn enrol(
        &self,
        req: AgentEnrol,
        mint: impl FnOnce(&str) -> ApiResult<TokenCreated>,
    ) -> ApiResult<AgentEnrolled> {
        // The token is checked before any lock: an unauthenticated caller
        // holds nothing another request needs.
        let key = token_key(&req.token);
        let read = || -> ApiResult<EnrolRec> {
            let rec: EnrolRec = self
                .state
                .get(ENROLMENTS, key.as_str())
                .map_err(st)?
                .ok_or_else(|| invalid("invalid enrolment token"))?;
            if rec.used {
                return Err(invalid("this enrolment token was already used"));
            }
            if rec.expires_unix <= self.now() {
                return Err(invalid("this enrolment token has expired"));
            }
            Ok(rec)
        };
        let rec = read()?;
        let now = self.now();
        let name = rec
            .name
            .clone()
            .or(req.name.clone())
            .unwrap_or(req.hostname.clone());
        cdm_common::names::check(&name)
            .map_err(|e| ApiError::bad_request(format!("bad host name {name:?}: it {e}")))?;
        {
            // Enrolments only: a token is spent once, a name taken once.
            let mut enrolling = lock(&self.enrolling);
            let mut rec = read()?;
            let old: Option<HostRec> = self.state.get(HOSTS, name.as_str()).map_err(st)?;
            match old {
                Some(h) if !h.retired => {
                    return Err(ApiError::conflict(format!(
                        "host {name} is enrolled: retire it first (DELETE /v1/hosts/{name})"
                    )))
                }
                // A retired host's applications and volumes go to whoever
                // takes its name: only a token made for that name may.
                Some(_) if rec.name.as_deref() != Some(name.as_str()) => {
                    return Err(ApiError::conflict(format!(
                        "host {name} was retired: enrolling it again needs an enrolment token \
                         made for that name (cdmctl host enrol-token --name {name})"
                    )))
                }
                _ => {}
            }
            if !enrolling.insert(name.clone()) {
                return Err(ApiError::conflict(format!("host {name} is being enrolled")));
            }
            rec.used = true;
            if let Err(e) = self.state.put(ENROLMENTS, key.as_str(), &rec, Sync::Now) {
                enrolling.remove(&name);
                return Err(st(e));
            }
        }
        // Argon2 outside every lock; the name stays reserved meanwhile.
        let done = self.enrol_as(&name, &req, now, mint);
        lock(&self.enrolling).remove(&name);
        done
    }

    fn enrol_as(
        &self,
        name: &str,
        req: &AgentEnrol,
        now: u64,
        mint: impl FnOnce(&str) -> ApiResult<TokenCreated>,
    ) -> ApiResult<AgentEnrolled> {
        let name = name.to_string();
        let tok = mint(&host_user(&name))?;
        let h = HostRec {
            name: name.clone(),
            hostname: req.hostname.clone(),
            version: req.version.clone(),
            os: req.os.clone(),
            token_id: tok.id.clone(),
            enrolled_unix: now,
            last_seen_unix: Some(now),
            ..HostRec::default()
        };
        self.state
            .put(HOSTS, name.as_str(), &h, Sync::Now)
            .map_err(st)?;
        lock(&self.seen).insert(name.clone(), now);
        self.events.emit(
            "host.enrolled",
            &name,
            &host_user(&name),
            json!({"host": name, "hostname": req.hostname, "version": req.version, "os": req.os}),
        );
        Ok(AgentEnrolled {
            host: name,
            credential: tok.token,
            heartbeat_seconds: self.heartbeat_secs(),
        })
    }

    /// The caller behind a verified host credential; 401 once the host is
    /// retired (its credential is deleted then too).
    pub fn host_caller(&self, user: &str, token_id: &str, token_name: &str) -> ApiResult<Caller> {
        let bad = || ApiError::unauthorized("invalid or expired token");
        let name = user.strip_prefix("host:").ok_or_else(bad)?;
        let h: HostRec = self.state.get(HOSTS, name).map_err(st)?.ok_or_else(bad)?;
        if h.retired || h.token_id != token_id {
            return Err(bad());
        }
        self.touch(name);
        Ok(Caller {
            user: user.to_string(),
            role: Role::Host,
            grants: vec![],
            token_id: token_id.to_string(),
            token_name: token_name.to_string(),
        })
    }

    /// The host name of a host caller.
    pub(super) fn caller_host(c: &Caller) -> ApiResult<&str> {
        c.user
            .strip_prefix("host:")
            .filter(|_| c.role == Role::Host)
            .ok_or_else(|| ApiError::forbidden("the agent protocol needs a host credential"))
    }

    pub fn heartbeat(&self, c: &Caller, req: Heartbeat) -> ApiResult<HeartbeatReply> {
        let name = Self::caller_host(c)?.to_string();
        let now = self.now();
        {
            let _one = lock(&self.active);
            let mut h: HostRec = self
                .state
                .get(HOSTS, name.as_str())
                .map_err(st)?
                .ok_or_else(|| ApiError::unauthorized("host not enrolled"))?;
            h.version = req.version.clone();
            h.os = req.os.clone();
            if !req.hostname.is_empty() {
                h.hostname = req.hostname.clone();
            }
            h.capabilities = req.capabilities.clone();
            h.running = req.running.clone();
            h.last_seen_unix = Some(now);
            // Seen-times are cheap to lose (the next heartbeat brings one):
            // no sync of its own.
            self.state
                .put(HOSTS, name.as_str(), &h, crate::state::Sync::Lazy)
                .map_err(st)?;
        }
        self.reconcile(&name, &req.running, req.first)?;
        if !req.applications.is_empty() {
            self.discover(&name, &req.applications)?;
        }
        // After discovery: a newly found application's archiver starts
        // with this answer.
        let archives = self.archive_tasks(&name)?;
        self.archive_reports(&name, &archives, &req.archives)?;
        Ok(HeartbeatReply {
            heartbeat_seconds: self.heartbeat_secs(),
            archives,
        })
    }

    fn public_host(&self, h: HostRec, now: u64) -> Host {
        let seen = lock(&self.seen).get(&h.name).copied();
        let last = match (seen, h.last_seen_unix) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let state = if h.retired {
            "retired"
        } else if self.online(&h.name, now) {
            "online"
        } else {
            "offline"
        };
        Host {
            state: state.into(),
            last_seen: last.map(rfc3339),
            last_seen_unix: last,
            running_jobs: h.running,
            name: h.name,
            hostname: h.hostname,
            version: h.version,
            os: h.os,
            capabilities: h.capabilities,
            enrolled_unix: h.enrolled_unix,
        }
    }

    pub fn hosts(&self) -> ApiResult<Vec<Host>> {
        let now = self.now();
        let v: Vec<HostRec> = self.state.all(HOSTS).map_err(st)?;
        Ok(v.into_iter().map(|h| self.public_host(h, now)).collect())
    }

    pub fn host(&self, name: &str) -> ApiResult<Host> {
        let h: HostRec = self
            .state
            .get(HOSTS, name)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("host {name} not found")))?;
        Ok(self.public_host(h, self.now()))
    }

    /// Marks the host retired (its credential is already deleted), cancels
    /// its queued jobs and fails its running ones.
    pub fn retire(&self, c: &Caller, name: &str) -> ApiResult<()> {
        let mut active = lock(&self.active);
        let mut h: HostRec = self
            .state
            .get(HOSTS, name)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("host {name} not found")))?;
        h.retired = true;
        h.running.clear();
        self.state.put(HOSTS, name, &h, Sync::Now).map_err(st)?;
        lock(&self.seen).remove(name);
        let ids: Vec<u64> = active
            .values()
            .filter(|j| j.host.as_deref() == Some(name))
            .map(|j| j.id)
            .collect();
        for id in ids {
            let to = if active.get(&id).is_some_and(|j| j.state == "queued") {
                "cancelled"
            } else {
                "failed"
            };
            self.end_locked(&mut active, id, to, "host retired", None, &c.user, false)?;
        }
        drop(active);
        self.wake_host(name);
        self.events
            .emit("host.retired", name, &c.user, json!({"host": name}));
        Ok(())
    }
}
