//! A blocking client of the API, used by `cdmctl` (and usable by scripts and
//! the host agent). One method per route; errors keep the API's status, code
//! and message.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::control::*;
use crate::types::*;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the API: {0}")]
    Transport(String),
    /// The answer was not what the route returns.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ClientError {
    /// Exit code for `cdmctl`: 3 auth, 4 not found, 5 conflict, 6 bad
    /// request, 7 unreachable, 8 server error, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api { status, .. } => match status {
                401 | 403 => 3,
                404 => 4,
                409 => 5,
                400 | 413 | 415 | 422 => 6,
                500..=599 => 8,
                _ => 1,
            },
            ClientError::Transport(_) => 7,
            ClientError::Decode(_) => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Percent-encodes one path segment (everything but `A-Za-z0-9._-~`).
/// Where a token is looked for when none is given: the embedded default
/// appliance's data directory, then the packaged one.
pub const DEFAULT_TOKEN_FILES: [&str; 2] = ["./cdm-data/admin.token", "/var/lib/cdm/admin.token"];

/// The first default token file that can be read, trimmed.
pub fn default_token() -> Option<String> {
    DEFAULT_TOKEN_FILES
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_string())
}

pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The API at `base_url` with an optional bearer token.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// The pinned CA's file, for the message of a failed verification.
    ca: Option<String>,
}

/// A rustls client configuration that trusts only the CA certificate(s)
/// in the PEM file `ca` (no system roots: the appliance's certificate
/// comes from its own CA).
pub fn pinned_tls_config(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let bad = |m: String| ClientError::Transport(format!("CA file {}: {m}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

fn e(s: &str) -> String {
    encode_segment(s)
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Client {
        Client::with_timeout(base_url, token, Duration::from_secs(30))
    }

    pub fn with_timeout(base_url: &str, token: Option<String>, timeout: Duration) -> Client {
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            agent: ureq::AgentBuilder::new().timeout(timeout).build(),
            ca: None,
        }
    }

    /// The client every cdm tool builds: `url` (http:// or https://), a
    /// token, and with `ca` the appliance's CA pinned for https (only it
    /// is trusted). Fails only on an unreadable or empty CA file.
    pub fn connect(
        url: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Client> {
        Client::with_ca(url, token, Duration::from_secs(30), ca)
    }

    /// [`Client::connect`] with a timeout of its own.
    pub fn with_ca(
        url: &str,
        token: Option<String>,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Client> {
        let Some(ca) = ca else {
            return Ok(Client::with_timeout(url, token, timeout));
        };
        let cfg = pinned_tls_config(ca)?;
        Ok(Client {
            base: url.trim_end_matches('/').to_string(),
            token,
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .tls_config(cfg)
                .build(),
            ca: Some(ca.display().to_string()),
        })
    }

    /// The same client with another timeout (a call that reads a whole
    /// point takes longer than an ordinary request). A pinned CA that can
    /// no longer be read keeps this client's timeout.
    pub fn longer_timeout(&self, timeout: Duration) -> Client {
        let ca = self.ca.as_deref().map(std::path::Path::new);
        Client::with_ca(&self.base, self.token.clone(), timeout, ca).unwrap_or_else(|_| Client {
            base: self.base.clone(),
            token: self.token.clone(),
            agent: self.agent.clone(),
            ca: self.ca.clone(),
        })
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A transport error, said so that a certificate problem has its fix.
    fn transport_error(&self, t: &ureq::Transport) -> ClientError {
        let text = t.to_string();
        let ca = self.ca.as_deref();
        let hint = if text.contains("UnknownIssuer") || text.contains("BadSignature") {
            match ca {
                Some(ca) => format!(
                    "; the appliance's certificate is not signed by the CA in {ca} (wrong \
                     --ca-file, or another appliance)"
                ),
                None => "; the appliance's certificate is signed by its own CA: pin it with \
                         --ca-file (DATA/tls/ca.crt on the appliance, or GET /v1/ca)"
                    .to_string(),
            }
        } else if text.contains("NotValidForName") {
            "; the appliance's certificate does not carry this host name or address \
             (snapshotd --tls-san adds one)"
                .to_string()
        } else {
            String::new()
        };
        ClientError::Transport(format!("{text}{hint}"))
    }

    /// A raw call: `(status, body as JSON, or a JSON string for non-JSON, or null)`.
    /// Only transport failures are errors.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(self.transport_error(&t)),
        };
        let status = resp.status();
        let text = resp
            .into_string()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, v))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<T> {
        let (status, v) = self.request(method, path, body.as_ref())?;
        Self::answer(status, v)
    }

    /// An answer's body as `T`, or the API's error for a non-2xx status.
    fn answer<T: DeserializeOwned>(status: u16, v: Value) -> Result<T> {
        if !(200..300).contains(&status) {
            let (code, message) = match (&v["error"]["code"], &v["error"]["message"]) {
                (Value::String(c), Value::String(m)) => (c.clone(), m.clone()),
                _ => (
                    "http".to_string(),
                    match &v {
                        Value::String(s) => s.clone(),
                        Value::Null => format!("HTTP {status}"),
                        other => other.to_string(),
                    },
                ),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
            });
        }
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn json<B: Serialize>(b: &B) -> Result<Option<Value>> {
        serde_json::to_value(b)
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn done(&self, method: &str, path: &str) -> Result<()> {
        let _: Value = self.call(method, path, None)?;
        Ok(())
    }

    pub fn health(&self) -> Result<Value> {
        self.call("GET", "/health", None)
    }
    pub fn metrics(&self) -> Result<String> {
        match self.call::<Value>("GET", "/metrics", None)? {
            Value::String(s) => Ok(s),
            v => Ok(v.to_string()),
        }
    }
    pub fn openapi(&self) -> Result<Value> {
        self.call("GET", "/v1/openapi.json", None)
    }
    pub fn login(&self, req: &Login) -> Result<TokenCreated> {
        self.call("POST", "/v1/login", Self::json(req)?)
    }
    pub fn logout(&self) -> Result<()> {
        self.done("POST", "/v1/logout")
    }

    pub fn pool(&self) -> Result<PoolInfo> {
        self.call("GET", "/v1/pool", None)
    }
    pub fn set_pool_policy(&self, p: &PoolPolicy) -> Result<PoolInfo> {
        self.call("PUT", "/v1/pool/policy", Self::json(p)?)
    }
    /// Grows the pool to `size` bytes.
    pub fn grow_pool(&self, size: u64) -> Result<PoolInfo> {
        self.call("POST", "/v1/pool/grow", Self::json(&PoolGrow { size })?)
    }

    pub fn create_volume(&self, req: &VolumeCreate) -> Result<Volume> {
        self.call("POST", "/v1/volumes", Self::json(req)?)
    }
    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        self.call("GET", "/v1/volumes", None)
    }
    pub fn volume(&self, name: &str) -> Result<Volume> {
        self.call("GET", &format!("/v1/volumes/{}", e(name)), None)
    }
    pub fn grow_volume(&self, name: &str, size: u64) -> Result<Volume> {
        let b = Self::json(&VolumeUpdate { size })?;
        self.call("PATCH", &format!("/v1/volumes/{}", e(name)), b)
    }
    pub fn revert_volume(&self, name: &str, snapshot: u64) -> Result<Volume> {
        let b = Self::json(&VolumeRevert { snapshot })?;
        self.call("POST", &format!("/v1/volumes/{}/revert", e(name)), b)
    }
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        self.done("DELETE", &format!("/v1/volumes/{}?force={force}", e(name)))
    }
    pub fn policy(&self, name: &str) -> Result<SnapshotPolicy> {
        self.call("GET", &format!("/v1/volumes/{}/policy", e(name)), None)
    }
    pub fn set_policy(&self, name: &str, p: &SnapshotPolicy) -> Result<SnapshotPolicy> {
        self.call(
            "PUT",
            &format!("/v1/volumes/{}/policy", e(name)),
            Self::json(p)?,
        )
    }

    pub fn create_snapshot(&self, volume: &str, req: &SnapshotCreate) -> Result<Snapshot> {
        let b = Self::json(req)?;
        self.call("POST", &format!("/v1/volumes/{}/snapshots", e(volume)), b)
    }
    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<Snapshot>> {
        self.call("GET", &format!("/v1/volumes/{}/snapshots", e(volume)), None)
    }
    pub fn snapshot(&self, volume: &str, id: u64) -> Result<Snapshot> {
        self.call(
            "GET",
            &format!("/v1/volumes/{}/snapshots/{id}", e(volume)),
            None,
        )
    }
    pub fn delete_snapshot(&self, volume: &str, id: u64, force: bool) -> Result<()> {
        self.done(
            "DELETE",
            &format!("/v1/volumes/{}/snapshots/{id}?force={force}", e(volume)),
        )
    }

    pub fn create_clone(&self, volume: &str, snapshot: u64, name: &str) -> Result<Volume> {
        let b = Self::json(&CloneCreate {
            name: name.to_string(),
        })?;
        self.call(
            "POST",
            &format!("/v1/volumes/{}/snapshots/{snapshot}/clones", e(volume)),
            b,
        )
    }
    pub fn list_clones(&self) -> Result<Vec<Volume>> {
        self.call("GET", "/v1/clones", None)
    }
    pub fn promote_clone(&self, name: &str) -> Result<Volume> {
        self.call("POST", &format!("/v1/clones/{}/promote", e(name)), None)
    }
    pub fn delete_clone(&self, name: &str, force: bool) -> Result<()> {
        self.done("DELETE", &format!("/v1/clones/{}?force={force}", e(name)))
    }

    pub fn exports(&self) -> Result<Vec<Export>> {
        self.call("GET", "/v1/exports", None)
    }

    pub fn create_mount(&self, req: &MountCreate) -> Result<Mount> {
        self.call("POST", "/v1/mounts", Self::json(req)?)
    }
    pub fn put_vms(&self, vms: &[VmRecord]) -> Result<Vec<VmRecord>> {
        self.call("PUT", "/v1/vms", Some(serde_json::json!({ "vms": vms })))
    }
    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        self.call("GET", "/v1/vms", None)
    }
    pub fn vm_tree(&self, by: &str) -> Result<VmTree> {
        self.call(
            "GET",
            &format!("/v1/vms/tree?by={}", encode_segment(by)),
            None,
        )
    }
    /// A VM's points (its disks' snapshots of one backup run each).
    pub fn vm_points(&self, vm: &str) -> Result<Vec<crate::vm_recovery::VmPoint>> {
        self.call(
            "GET",
            &format!("/v1/vms/{}/points", encode_segment(vm)),
            None,
        )
    }
    /// Boots a VM's point on the appliance (a job).
    pub fn start_vm_recovery(
        &self,
        vm: &str,
        req: &crate::vm_recovery::VmRecoveryCreate,
    ) -> Result<Job> {
        self.call(
            "POST",
            &format!("/v1/vms/{}/recoveries", encode_segment(vm)),
            Self::json(req)?,
        )
    }
    pub fn vm_recoveries(&self) -> Result<Vec<crate::vm_recovery::VmRecovery>> {
        self.call("GET", "/v1/vm-recoveries", None)
    }
    pub fn vm_recovery(&self, name: &str) -> Result<crate::vm_recovery::VmRecovery> {
        self.call(
            "GET",
            &format!("/v1/vm-recoveries/{}", encode_segment(name)),
            None,
        )
    }
    /// Stops a recovered VM; its clones are deleted, or kept with `keep`.
    pub fn stop_vm_recovery(
        &self,
        name: &str,
        keep: bool,
    ) -> Result<crate::vm_recovery::VmRecovery> {
        self.call(
            "DELETE",
            &format!("/v1/vm-recoveries/{}?keep={keep}", encode_segment(name)),
            None,
        )
    }
    /// The text of a path that answers text (a console log, a domain XML).
    fn text(&self, path: &str) -> Result<String> {
        match self.call::<Value>("GET", path, None)? {
            Value::String(s) => Ok(s),
            Value::Null => Ok(String::new()),
            v => Ok(v.to_string()),
        }
    }
    /// The last `bytes` of a recovered VM's serial console.
    pub fn vm_console(&self, name: &str, bytes: u64) -> Result<String> {
        self.text(&format!(
            "/v1/vm-recoveries/{}/console?bytes={bytes}",
            encode_segment(name)
        ))
    }
    pub fn vm_domain_xml(&self, name: &str) -> Result<String> {
        self.text(&format!(
            "/v1/vm-recoveries/{}/domain.xml",
            encode_segment(name)
        ))
    }
    /// Starts a restore of a VM's point to image files on the appliance.
    pub fn vm_restore(&self, vm: &str, req: &crate::vm_recovery::VmRestoreCreate) -> Result<Job> {
        self.call(
            "POST",
            &format!("/v1/vms/{}/restores", encode_segment(vm)),
            Self::json(req)?,
        )
    }
    pub fn mounts(&self) -> Result<Vec<Mount>> {
        self.call("GET", "/v1/mounts", None)
    }
    pub fn delete_mount(&self, name: &str, delete_clone: bool) -> Result<()> {
        self.done(
            "DELETE",
            &format!("/v1/mounts/{}?delete_clone={delete_clone}", e(name)),
        )
    }

    fn files_path(volume: &str, id: u64, what: &str, q: &FilesQuery) -> String {
        let mut p = format!(
            "/v1/volumes/{}/snapshots/{id}/{what}?path={}",
            e(volume),
            e(&q.path)
        );
        if let Some(n) = q.partition {
            p += &format!("&partition={n}");
        }
        if let Some(n) = q.offset {
            p += &format!("&offset={n}");
        }
        if let Some(n) = q.limit {
            p += &format!("&limit={n}");
        }
        p
    }
    pub fn partitions(&self, volume: &str, id: u64) -> Result<Vec<PartitionInfo>> {
        self.call(
            "GET",
            &format!("/v1/volumes/{}/snapshots/{id}/partitions", e(volume)),
            None,
        )
    }
    pub fn files(&self, volume: &str, id: u64, q: &FilesQuery) -> Result<Vec<FileEntry>> {
        self.call("GET", &Self::files_path(volume, id, "files", q), None)
    }
    pub fn stat_file(&self, volume: &str, id: u64, q: &FilesQuery) -> Result<FileEntry> {
        self.call("GET", &Self::files_path(volume, id, "files/stat", q), None)
    }
    /// Streams a file (or with `tar` a tar of a tree) from a snapshot into
    /// `out`; returns the bytes written. A transfer cut by the server is an
    /// error.
    pub fn download(
        &self,
        volume: &str,
        id: u64,
        q: &FilesQuery,
        tar: bool,
        out: &mut dyn std::io::Write,
    ) -> Result<u64> {
        let what = if tar { "files/tar" } else { "files/content" };
        let url = format!("{}{}", self.base, Self::files_path(volume, id, what, q));
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => {
                let expect: Option<u64> = r.header("Content-Length").and_then(|v| v.parse().ok());
                let n = std::io::copy(&mut r.into_reader(), out)
                    .map_err(|e| ClientError::Transport(format!("transfer cut: {e}")))?;
                if expect.is_some_and(|x| x != n) {
                    return Err(ClientError::Transport(format!(
                        "transfer cut after {n} of {} bytes",
                        expect.unwrap_or(0)
                    )));
                }
                Ok(n)
            }
            Err(ureq::Error::Status(status, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                Err(ClientError::Api {
                    status,
                    code: v["error"]["code"].as_str().unwrap_or("http").to_string(),
                    message: v["error"]["message"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("HTTP {status}")),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(self.transport_error(&t)),
        }
    }

    /// The appliance image's slots and update state (`--appliance`).
    pub fn appliance(&self) -> Result<crate::appliance::ApplianceStatus> {
        self.call("GET", "/v1/appliance", None)
    }

    /// Uploads an update bundle, streamed from `file` (never read whole);
    /// the appliance verifies it before answering, so the call may take
    /// as long as the upload and a hash of it.
    pub fn upload_update(
        &self,
        file: &std::path::Path,
    ) -> Result<crate::appliance::UpdateAccepted> {
        let bad = |e: std::io::Error| ClientError::Transport(format!("{}: {e}", file.display()));
        let f = std::fs::File::open(file).map_err(bad)?;
        let len = f.metadata().map_err(bad)?.len();
        let long = self.longer_timeout(Duration::from_secs(3600));
        let mut req = long
            .agent
            .post(&format!("{}{}", self.base, crate::appliance::UPLOAD_PATH))
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &len.to_string());
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.send(std::io::BufReader::with_capacity(1 << 20, f)) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(self.transport_error(&t)),
        };
        let status = resp.status();
        let v = resp.into_json().unwrap_or(Value::Null);
        Self::answer(status, v)
    }

    /// The object tier's configuration (never its secret key).
    pub fn tier(&self) -> Result<crate::tier::TierConfigView> {
        self.call("GET", "/v1/tier", None)
    }
    pub fn set_tier(
        &self,
        req: &crate::tier::TierConfigPut,
    ) -> Result<crate::tier::TierConfigView> {
        self.call("PUT", "/v1/tier", Self::json(req)?)
    }
    pub fn delete_tier(&self) -> Result<()> {
        self.done("DELETE", "/v1/tier")
    }

    pub fn start_job(&self, req: &JobCreate) -> Result<Job> {
        self.call("POST", "/v1/jobs", Self::json(req)?)
    }
    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.call("GET", "/v1/jobs", None)
    }
    pub fn job(&self, id: u64) -> Result<Job> {
        self.call("GET", &format!("/v1/jobs/{id}"), None)
    }

    pub fn events(&self, q: &EventQuery) -> Result<Vec<Event>> {
        let mut p = Vec::new();
        if let Some(a) = q.after {
            p.push(format!("after={a}"));
        }
        if let Some(t) = &q.kind {
            p.push(format!("type={}", e(t)));
        }
        if let Some(l) = q.limit {
            p.push(format!("limit={l}"));
        }
        self.call("GET", &format!("/v1/events?{}", p.join("&")), None)
    }
    pub fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let mut p = Vec::new();
        if let Some(a) = q.after {
            p.push(format!("after={a}"));
        }
        if let Some(u) = &q.user {
            p.push(format!("user={}", e(u)));
        }
        if let Some(l) = q.limit {
            p.push(format!("limit={l}"));
        }
        self.call("GET", &format!("/v1/audit?{}", p.join("&")), None)
    }

    pub fn create_webhook(&self, req: &WebhookCreate) -> Result<Webhook> {
        self.call("POST", "/v1/webhooks", Self::json(req)?)
    }
    pub fn webhooks(&self) -> Result<Vec<Webhook>> {
        self.call("GET", "/v1/webhooks", None)
    }
    pub fn webhook(&self, id: u64) -> Result<Webhook> {
        self.call("GET", &format!("/v1/webhooks/{id}"), None)
    }
    pub fn delete_webhook(&self, id: u64) -> Result<()> {
        self.done("DELETE", &format!("/v1/webhooks/{id}"))
    }
    pub fn deliveries(&self, id: u64) -> Result<Vec<Delivery>> {
        self.call("GET", &format!("/v1/webhooks/{id}/deliveries"), None)
    }

    pub fn create_user(&self, req: &UserCreate) -> Result<User> {
        self.call("POST", "/v1/users", Self::json(req)?)
    }
    pub fn users(&self) -> Result<Vec<User>> {
        self.call("GET", "/v1/users", None)
    }
    pub fn user(&self, name: &str) -> Result<User> {
        self.call("GET", &format!("/v1/users/{}", e(name)), None)
    }
    pub fn update_user(&self, name: &str, req: &UserUpdate) -> Result<User> {
        self.call("PATCH", &format!("/v1/users/{}", e(name)), Self::json(req)?)
    }
    pub fn delete_user(&self, name: &str) -> Result<()> {
        self.done("DELETE", &format!("/v1/users/{}", e(name)))
    }
    pub fn create_token(&self, user: &str, req: &TokenCreate) -> Result<TokenCreated> {
        self.call(
            "POST",
            &format!("/v1/users/{}/tokens", e(user)),
            Self::json(req)?,
        )
    }
    pub fn tokens(&self, user: &str) -> Result<Vec<Token>> {
        self.call("GET", &format!("/v1/users/{}/tokens", e(user)), None)
    }
    pub fn delete_token(&self, user: &str, id: &str) -> Result<()> {
        self.done("DELETE", &format!("/v1/users/{}/tokens/{}", e(user), e(id)))
    }

    pub fn clock(&self) -> Result<Clock> {
        self.call("GET", "/v1/clock", None)
    }
    pub fn advance_clock(&self, secs: u64) -> Result<Clock> {
        let b = Self::json(&ClockAdvance { advance_secs: secs })?;
        self.call("POST", "/v1/clock", b)
    }
}

/// The control plane (`docs/control-plane.md`): hosts, the agent protocol,
/// applications, protection policies, points, restores, job logs.
impl Client {
    pub fn create_enrolment(&self, req: &EnrolmentCreate) -> Result<EnrolmentToken> {
        self.call("POST", "/v1/hosts/enrolments", Self::json(req)?)
    }
    pub fn hosts(&self) -> Result<Vec<Host>> {
        self.call("GET", "/v1/hosts", None)
    }
    pub fn host(&self, name: &str) -> Result<Host> {
        self.call("GET", &format!("/v1/hosts/{}", e(name)), None)
    }
    pub fn retire_host(&self, name: &str) -> Result<()> {
        self.done("DELETE", &format!("/v1/hosts/{}", e(name)))
    }

    /// Needs no token: the enrolment token is in the body.
    pub fn agent_enrol(&self, req: &AgentEnrol) -> Result<AgentEnrolled> {
        self.call("POST", "/v1/agent/enrol", Self::json(req)?)
    }
    pub fn agent_heartbeat(&self, req: &Heartbeat) -> Result<HeartbeatReply> {
        self.call("POST", "/v1/agent/heartbeat", Self::json(req)?)
    }
    /// Waits up to `wait` seconds (≤ 30) for jobs: build the client with a
    /// longer timeout than that.
    pub fn agent_jobs(&self, wait: u64) -> Result<Vec<AgentJob>> {
        self.call("GET", &format!("/v1/agent/jobs?wait={wait}"), None)
    }
    pub fn agent_progress(&self, id: u64, req: &AgentProgress) -> Result<ProgressReply> {
        self.call(
            "POST",
            &format!("/v1/agent/jobs/{id}/progress"),
            Self::json(req)?,
        )
    }
    pub fn agent_finish(&self, id: u64, req: &AgentFinish) -> Result<Job> {
        self.call(
            "POST",
            &format!("/v1/agent/jobs/{id}/finish"),
            Self::json(req)?,
        )
    }

    /// Queues a recovery drill of an application.
    pub fn start_drill(&self, app: u64, req: &crate::drills::DrillCreate) -> Result<Job> {
        self.call(
            "POST",
            &format!("/v1/applications/{app}/drills"),
            Self::json(req)?,
        )
    }
    pub fn drills(&self, application: Option<u64>) -> Result<Vec<crate::drills::Drill>> {
        let q = application
            .map(|a| format!("?application={a}"))
            .unwrap_or_default();
        self.call("GET", &format!("/v1/drills{q}"), None)
    }
    pub fn drill(&self, id: u64) -> Result<crate::drills::Drill> {
        self.call("GET", &format!("/v1/drills/{id}"), None)
    }
    /// Re-reads a snapshot's extents on the appliance, checksums verified.
    pub fn verify_snapshot(&self, volume: &str, id: u64) -> Result<crate::drills::SnapshotVerify> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/snapshots/{id}/verify", e(volume)),
            None,
        )
    }

    pub fn applications(&self, host: Option<&str>) -> Result<Vec<Application>> {
        let q = host.map(|h| format!("?host={}", e(h))).unwrap_or_default();
        self.call("GET", &format!("/v1/applications{q}"), None)
    }
    pub fn create_application(&self, req: &ApplicationCreate) -> Result<Application> {
        self.call("POST", "/v1/applications", Self::json(req)?)
    }
    pub fn application(&self, id: u64) -> Result<Application> {
        self.call("GET", &format!("/v1/applications/{id}"), None)
    }
    pub fn delete_application(&self, id: u64) -> Result<()> {
        self.done("DELETE", &format!("/v1/applications/{id}"))
    }
    pub fn assign_policy(&self, id: u64, policy: Option<&str>) -> Result<Application> {
        let b = Self::json(&PolicyAssign {
            policy: policy.map(str::to_string),
        })?;
        self.call("PUT", &format!("/v1/applications/{id}/policy"), b)
    }
    pub fn start_backup(&self, id: u64) -> Result<Job> {
        self.call("POST", &format!("/v1/applications/{id}/backups"), None)
    }
    pub fn points(&self, id: u64) -> Result<Vec<Point>> {
        self.call("GET", &format!("/v1/applications/{id}/points"), None)
    }
    pub fn start_restore(&self, id: u64, req: &RestoreCreate) -> Result<Job> {
        self.call(
            "POST",
            &format!("/v1/applications/{id}/restores"),
            Self::json(req)?,
        )
    }

    pub fn create_protection_policy(&self, p: &ProtectionPolicy) -> Result<ProtectionPolicy> {
        self.call("POST", "/v1/protection-policies", Self::json(p)?)
    }
    pub fn protection_policies(&self) -> Result<Vec<ProtectionPolicy>> {
        self.call("GET", "/v1/protection-policies", None)
    }
    pub fn protection_policy(&self, name: &str) -> Result<ProtectionPolicy> {
        self.call("GET", &format!("/v1/protection-policies/{}", e(name)), None)
    }
    pub fn update_protection_policy(&self, p: &ProtectionPolicy) -> Result<ProtectionPolicy> {
        self.call(
            "PUT",
            &format!("/v1/protection-policies/{}", e(&p.name)),
            Self::json(p)?,
        )
    }
    pub fn delete_protection_policy(&self, name: &str) -> Result<()> {
        self.done("DELETE", &format!("/v1/protection-policies/{}", e(name)))
    }

    /// `GET /v1/jobs` with filters.
    pub fn jobs_where(&self, q: &JobQuery) -> Result<Vec<Job>> {
        let mut p = Vec::new();
        if let Some(a) = q.application {
            p.push(format!("application={a}"));
        }
        for (k, v) in [("host", &q.host), ("kind", &q.kind), ("state", &q.state)] {
            if let Some(v) = v {
                p.push(format!("{k}={}", e(v)));
            }
        }
        self.call("GET", &format!("/v1/jobs?{}", p.join("&")), None)
    }
    pub fn job_log(&self, id: u64) -> Result<JobLog> {
        self.call("GET", &format!("/v1/jobs/{id}/log"), None)
    }
    pub fn cancel_job(&self, id: u64) -> Result<Job> {
        self.call("POST", &format!("/v1/jobs/{id}/cancel"), None)
    }
}

/// Replication (`docs/replication.md`).
impl Client {
    pub fn create_pairing(
        &self,
        req: &crate::replication::PairingCreate,
    ) -> Result<crate::replication::PairingToken> {
        self.call("POST", "/v1/replication/pairings", Self::json(req)?)
    }
    pub fn create_peer(
        &self,
        req: &crate::replication::PeerCreate,
    ) -> Result<crate::replication::Peer> {
        self.call("POST", "/v1/replication/peers", Self::json(req)?)
    }
    pub fn peers(&self) -> Result<Vec<crate::replication::Peer>> {
        self.call("GET", "/v1/replication/peers", None)
    }
    pub fn delete_peer(&self, name: &str) -> Result<()> {
        self.done("DELETE", &format!("/v1/replication/peers/{}", e(name)))
    }
    pub fn create_link(
        &self,
        req: &crate::replication::LinkCreate,
    ) -> Result<crate::replication::Link> {
        self.call("POST", "/v1/replication/links", Self::json(req)?)
    }
    pub fn links(&self) -> Result<Vec<crate::replication::Link>> {
        self.call("GET", "/v1/replication/links", None)
    }
    pub fn link(&self, id: u64) -> Result<crate::replication::Link> {
        self.call("GET", &format!("/v1/replication/links/{id}"), None)
    }
    pub fn pause_link(&self, id: u64) -> Result<crate::replication::Link> {
        self.call("POST", &format!("/v1/replication/links/{id}/pause"), None)
    }
    pub fn resume_link(&self, id: u64) -> Result<crate::replication::Link> {
        self.call("POST", &format!("/v1/replication/links/{id}/resume"), None)
    }
    pub fn delete_link(&self, id: u64) -> Result<()> {
        self.done("DELETE", &format!("/v1/replication/links/{id}"))
    }
    pub fn run_link(&self, id: u64) -> Result<Job> {
        self.call("POST", &format!("/v1/replication/links/{id}/run"), None)
    }
    pub fn transfers(&self, id: u64) -> Result<Vec<crate::replication::Transfer>> {
        self.call(
            "GET",
            &format!("/v1/replication/links/{id}/transfers"),
            None,
        )
    }
    pub fn promote_volume(&self, name: &str) -> Result<Volume> {
        self.call("POST", &format!("/v1/volumes/{}/promote", e(name)), None)
    }
    pub fn demote_volume(&self, name: &str, peer: &str) -> Result<Volume> {
        let body = serde_json::json!({ "peer": peer });
        self.call(
            "POST",
            &format!("/v1/volumes/{}/demote", e(name)),
            Some(body),
        )
    }
    pub fn load_volume_key(
        &self,
        name: &str,
        key: &crate::replication::VolumeKey,
    ) -> Result<Volume> {
        self.call(
            "POST",
            &format!("/v1/volumes/{}/key", e(name)),
            Self::json(key)?,
        )
    }
    pub fn unload_volume_key(&self, name: &str) -> Result<Volume> {
        self.call("DELETE", &format!("/v1/volumes/{}/key", e(name)), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("db-1.x_y~"), "db-1.x_y~");
        assert_eq!(encode_segment("../etc"), "..%2Fetc");
        assert_eq!(encode_segment("a b@c"), "a%20b%40c");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn exit_codes() {
        let api = |status| ClientError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        };
        assert_eq!(api(401).exit_code(), 3);
        assert_eq!(api(403).exit_code(), 3);
        assert_eq!(api(404).exit_code(), 4);
        assert_eq!(api(409).exit_code(), 5);
        assert_eq!(api(400).exit_code(), 6);
        assert_eq!(api(413).exit_code(), 6);
        assert_eq!(api(500).exit_code(), 8);
        assert_eq!(api(507).exit_code(), 8);
        assert_eq!(ClientError::Transport("x".into()).exit_code(), 7);
    }

    #[test]
    fn unreachable_server_is_a_transport_error() {
        let c = Client::with_timeout("http://127.0.0.1:1", None, Duration::from_secs(2));
        let err = c.list_volumes().unwrap_err();
        assert_eq!(err.exit_code(), 7, "{err}");
    }
}
