//! Users, API tokens and sessions: who may call the API, and how a token
//! becomes a caller.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use cdm_api::auth::{Caller, Role};
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use std::time::Instant;

use super::throttle::{Key, Lockout};
use super::{lock, st, Appliance};
use crate::state::{Sync, TOKENS, USERS};

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

pub(super) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

pub(super) fn hash_secret(secret: &str) -> ApiResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("cannot hash a secret: {e}")))
}

pub(super) fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

pub(super) fn check_password(p: &str) -> ApiResult<()> {
    if p.len() < 8 || p.len() > 1024 {
        return Err(ApiError::bad_request("password must be 8 to 1024 bytes"));
    }
    Ok(())
}

pub(super) fn check_grants(g: &[String]) -> ApiResult<()> {
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

    pub(crate) fn make_token(
        &self,
        user: &str,
        name: &str,
        ttl: Option<u64>,
    ) -> ApiResult<TokenCreated> {
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

    pub(super) fn forget_verified(&self, token_ids: &[String]) {
        lock(&self.verified).retain(|_, id| !token_ids.contains(id));
    }

    pub(super) fn user_rec(&self, name: &str) -> ApiResult<UserRec> {
        self.state
            .get(USERS, name)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("user {name} not found")))
    }

    pub(super) fn public_user(u: &UserRec) -> User {
        User {
            name: u.name.clone(),
            role: u.role.clone(),
            grants: u.grants.clone(),
            has_password: u.password.is_some(),
            created_unix: u.created_unix,
        }
    }

    pub(super) fn admin_count(&self) -> ApiResult<usize> {
        let v: Vec<UserRec> = self.state.all(USERS).map_err(st)?;
        Ok(v.iter().filter(|u| u.role == "admin").count())
    }

    pub(super) fn session_authenticate(&self, token: &str) -> ApiResult<Caller> {
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
        if rec.user.starts_with("host:") {
            return self.control.host_caller(&rec.user, &rec.id, &rec.name);
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

    /// Checks the throttle first: a locked-out name or address is refused
    /// even with the right password, and costs no Argon2 work.
    pub(super) fn session_login(
        &self,
        req: Login,
        client: Option<std::net::IpAddr>,
    ) -> ApiResult<TokenCreated> {
        let mut keys = vec![Key::User(req.name.clone())];
        keys.extend(client.map(Key::Addr));
        if let Err(wait) = self.login_throttle.check(&keys, Instant::now()) {
            let secs = wait.as_secs_f64().ceil() as u64;
            return Err(ApiError::too_many_requests(
                format!("too many failed logins; try again in {secs} s"),
                secs,
            ));
        }
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
            for l in self.login_throttle.failed(&keys, Instant::now()) {
                self.alert_lockout(&l);
            }
            return Err(fail());
        }
        self.login_throttle.succeeded(&req.name);
        let t = self.make_token(&req.name, "session", Some(SESSION_SECS))?;
        self.events
            .emit("user.login", &req.name, &req.name, json!({"token": t.id}));
        Ok(t)
    }

    /// One `alert.raised` per lockout (refused attempts during it add none).
    fn alert_lockout(&self, l: &Lockout) {
        let (subject, what) = match &l.key {
            Key::User(n) => (n.clone(), format!("user {n:?}")),
            Key::Addr(a) => (a.to_string(), format!("address {a}")),
        };
        tracing::warn!(%subject, failures = l.failures, secs = l.delay.as_secs(), "login locked out");
        self.events.emit(
            "alert.raised",
            &subject,
            "snapshotd",
            json!({
                "message": format!(
                    "{} failed logins for {what}: further logins refused for {} s",
                    l.failures,
                    l.delay.as_secs()
                ),
                "reason": "login_lockout",
                "failures": l.failures,
                "lockout_secs": l.delay.as_secs(),
            }),
        );
    }

    pub(super) fn session_logout(&self, c: &Caller) -> ApiResult<()> {
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

    pub(super) fn user_create(&self, c: &Caller, req: UserCreate) -> ApiResult<User> {
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

    pub(super) fn user_list(&self) -> ApiResult<Vec<User>> {
        let v: Vec<UserRec> = self.state.all(USERS).map_err(st)?;
        Ok(v.iter().map(Self::public_user).collect())
    }

    pub(super) fn user_get(&self, name: &str) -> ApiResult<User> {
        Ok(Self::public_user(&self.user_rec(name)?))
    }

    pub(super) fn user_update(&self, c: &Caller, name: &str, req: UserUpdate) -> ApiResult<User> {
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

    pub(super) fn user_delete(&self, c: &Caller, name: &str) -> ApiResult<()> {
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

    pub(super) fn token_create(
        &self,
        c: &Caller,
        user: &str,
        req: TokenCreate,
    ) -> ApiResult<TokenCreated> {
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

    pub(super) fn token_list(&self, user: &str) -> ApiResult<Vec<Token>> {
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

    pub(super) fn token_delete(&self, c: &Caller, user: &str, id: &str) -> ApiResult<()> {
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
}
