//! What the replication tests share (docs/replication.md): appliances with a
//! name and a replication listener whose port survives restarts, pairing
//! through the API, links and their jobs, points found by their point id,
//! and `qemu-img compare` of two appliances' NBD exports. (A module, not a
//! test target: `mod repl_util;`.)
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use cdm_e2e::*;
use nbd_proto::client::Client;
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;

/// Generous bound for anything a test waits for (a hung test, not a deadline).
pub const WAIT: u64 = 600;

/// Scheduler ticks fast so "after every point" runs start at once; the
/// real clock, since lag and point creation times are compared.
pub const CONFIG: &str = "scheduler_tick_ms = 100\n";

/// One appliance of a replication test. Its data directory lives outside
/// the [`Appliance`], so a restart is a new `Appliance` on the same data
/// with the replication listener's port of the first start (the peers
/// have it on record).
pub struct Node {
    pub a: Appliance,
    pub name: String,
    args: Vec<String>,
    /// The runs before the last restart (their logs).
    old: Vec<Appliance>,
    work: tempfile::TempDir,
}

impl Node {
    /// Starts appliance `name` with a 4 GiB sparse pool.
    pub fn start(name: &str) -> Node {
        Node::start_pool(name, "4G")
    }

    /// Starts appliance `name` with a sparse pool of `size`.
    pub fn start_pool(name: &str, size: &str) -> Node {
        Node::start_keyed(name, size, None)
    }

    /// Starts appliance `name` with a sparse pool of `size` and, if given,
    /// an encryption key (a key file `--key-file`, mode 0600, in its work
    /// directory: [`Node::key_file`]).
    pub fn start_keyed(name: &str, size: &str, key: Option<&[u8]>) -> Node {
        let work = tempfile::Builder::new()
            .prefix("cdm-repl-")
            .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
        let mut args: Vec<String> = Vec::new();
        if let Some(k) = key {
            use std::os::unix::fs::PermissionsExt;
            let path = work.path().join("key");
            std::fs::write(&path, k).expect("key file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod key file");
            args.push("--key-file".into());
            args.push(path.display().to_string());
        }
        args.extend(
            [
                "--pool-size",
                size,
                "--pool-sparse",
                "--name",
                name,
                "--replication",
                "127.0.0.1:0",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let a = Appliance::start_with(
            Some(CONFIG),
            Some(&work.path().join("data")),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut n = Node {
            a,
            name: name.to_string(),
            args: Vec::new(),
            old: Vec::new(),
            work,
        };
        let addr = n.replication_addr();
        let last = args.len() - 1;
        args[last] = addr;
        n.args = args;
        n
    }

    /// Starts again on the same data directory, after [`Node::kill`] or
    /// [`Node::stop`].
    pub fn restart(&mut self) {
        self.a.kill();
        let data = self.work.path().join("data");
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let next = Appliance::start_with(Some(CONFIG), Some(&data), &args);
        self.old.push(std::mem::replace(&mut self.a, next));
    }

    /// Every run's log, oldest first.
    pub fn log(&self) -> String {
        self.old
            .iter()
            .chain(std::iter::once(&self.a))
            .map(|a| a.log())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    /// The ready file's JSON of the running snapshotd.
    pub fn ready(&self) -> Value {
        let p = self.a.dir.path().join("snapshotd.ready");
        let text = std::fs::read_to_string(&p).expect("snapshotd.ready");
        serde_json::from_str(&text).expect("ready JSON")
    }

    /// `HOST:PORT` of the replication listener (ready JSON `replication`).
    pub fn replication_addr(&self) -> String {
        let v = self.ready();
        v["replication"]
            .as_str()
            .unwrap_or_else(|| panic!("no replication listener in the ready file: {v}"))
            .to_string()
    }

    pub fn api(&self) -> Api {
        Api::new(&self.a, &self.a.admin_token())
    }

    /// The appliance's identity: its pool UUID in hex.
    pub fn identity(&self) -> String {
        self.api().get("/v1/pool")["uuid"]
            .as_str()
            .expect("pool uuid")
            .to_string()
    }

    pub fn kill(&mut self) {
        self.a.kill();
    }

    pub fn stop(&mut self) {
        self.a.stop();
    }

    /// The key file [`Node::start_keyed`] wrote.
    pub fn key_file(&self) -> PathBuf {
        self.work.path().join("key")
    }

    /// The pool's backing file.
    pub fn pool_file(&self) -> PathBuf {
        self.a.data.join("pool")
    }

    pub fn tls(&self, file: &str) -> PathBuf {
        self.a.data.join("tls").join(file)
    }

    pub fn create_volume(&self, name: &str, size: u64, block_size: u32) -> Value {
        self.api().expect(
            201,
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size": size, "block_size": block_size, "dedup": true})),
        )
    }

    /// Writes `len` bytes of seeded random data at `off` over NBD, 1 MiB
    /// (or less at the end) a request, then flushes.
    pub fn fill(&self, vol: &str, off: u64, len: u64, seed: u64) {
        let mut c = self.a.nbd(vol);
        write_random(&mut c, off, len, seed);
        c.flush().expect("NBD flush");
        c.disconnect().expect("NBD disconnect");
    }

    /// A snapshot of `vol` with a label and metadata; its id.
    pub fn snapshot(&self, vol: &str, label: &str, metadata: Value) -> u64 {
        let v = self.api().expect(
            201,
            "POST",
            &format!("/v1/volumes/{vol}/snapshots"),
            Some(json!({"label": label, "metadata": metadata})),
        );
        v["id"].as_u64().expect("snapshot id")
    }

    /// The volume's snapshots (none if the volume does not exist).
    pub fn snapshots(&self, vol: &str) -> Vec<Value> {
        let (s, v) = self
            .api()
            .call("GET", &format!("/v1/volumes/{vol}/snapshots"), None);
        match s {
            200 => v.as_array().expect("snapshots").clone(),
            404 => Vec::new(),
            _ => panic!("{}: GET snapshots of {vol}: {s} {v}", self.name),
        }
    }

    /// The snapshot of `vol` that copies point `point` (metadata
    /// `cdm.point`), if listed.
    pub fn point(&self, vol: &str, point: &str) -> Option<Value> {
        self.snapshots(vol)
            .into_iter()
            .find(|s| s["metadata"]["cdm.point"] == point)
    }

    /// Waits until `vol` has a snapshot copying `point`; returns it.
    pub fn wait_point(&self, vol: &str, point: &str) -> Value {
        wait_for(
            WAIT,
            &format!("point {point} of {vol} on {}", self.name),
            || self.point(vol, point),
        )
    }

    /// An export's NBD URI on the appliance's unix socket.
    pub fn uri(&self, export: &str) -> String {
        self.a.unix_uri(export)
    }

    /// Creates a replication link on this (source) appliance.
    pub fn link(&self, body: Value) -> u64 {
        let v = self
            .api()
            .expect(201, "POST", "/v1/replication/links", Some(body));
        v["id"].as_u64().expect("link id")
    }

    pub fn link_get(&self, id: u64) -> Value {
        self.api().get(&format!("/v1/replication/links/{id}"))
    }

    /// The link's transfer records, newest first.
    pub fn transfers(&self, id: u64) -> Vec<Value> {
        self.api()
            .get(&format!("/v1/replication/links/{id}/transfers"))
            .as_array()
            .expect("transfers")
            .clone()
    }

    /// Starts a run of link `id` and returns its job's id; when one runs
    /// already (409 `busy`, e.g. an "after every point" run or one a
    /// restart took up again) that one.
    pub fn run_link(&self, id: u64) -> u64 {
        wait_for(
            WAIT,
            &format!("a run of link {id} on {}", self.name),
            || {
                let api = self.api();
                let (s, v) = api.call("POST", &format!("/v1/replication/links/{id}/run"), None);
                match s {
                    202 => {
                        assert_eq!(v["kind"], "replicate", "{v}");
                        v["id"].as_u64()
                    }
                    409 => {
                        assert_eq!(v["error"]["code"], "busy", "{v}");
                        self.running_job()
                    }
                    _ => panic!("{}: run of link {id}: {s} {v}", self.name),
                }
            },
        )
    }

    /// The newest running `replicate` job, if any.
    pub fn running_job(&self) -> Option<u64> {
        let v = self.api().get("/v1/jobs?kind=replicate&state=running");
        v.as_array()?.iter().filter_map(|j| j["id"].as_u64()).max()
    }

    pub fn job(&self, id: u64) -> Value {
        self.api().get(&format!("/v1/jobs/{id}"))
    }

    /// Waits until job `id` has finished; returns it.
    pub fn wait_job(&self, id: u64) -> Value {
        wait_for(WAIT, &format!("job {id} on {}", self.name), || {
            let j = self.job(id);
            let st = j["state"].as_str().unwrap_or("");
            matches!(st, "succeeded" | "failed" | "cancelled").then_some(j)
        })
    }

    /// Runs link `id` to its end; asserts it succeeded.
    pub fn run_ok(&self, id: u64) -> Value {
        let job = self.run_link(id);
        let j = self.wait_job(job);
        assert_eq!(
            j["state"],
            "succeeded",
            "{}: link {id}: {j}\nlink: {}",
            self.name,
            self.link_get(id)
        );
        j
    }

    /// `cdmctl` as admin; asserts success and returns stdout.
    pub fn cdmctl(&self, args: &[&str]) -> String {
        let out = self.a.cdmctl(args);
        assert!(
            out.status.success(),
            "cdmctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Writes seeded random data, 1 MiB a request.
pub fn write_random(c: &mut Client, off: u64, len: u64, seed: u64) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(MIB);
        let data = random_bytes(n as usize, seed.wrapping_add(done / MIB));
        c.write(off + done, &data, false)
            .unwrap_or_else(|e| panic!("NBD write at {}: {e}", off + done));
        done += n;
    }
}

/// Pairs `src` with `dst` the way an admin does: a one-time token made on
/// `dst`, given to `src` with `dst`'s HTTPS URL. Returns `src`'s peer
/// record of `dst`.
pub fn pair(src: &Node, dst: &Node) -> Value {
    let t = dst.api().expect(
        201,
        "POST",
        "/v1/replication/pairings",
        Some(json!({"ttl_seconds": 600})),
    );
    let token = t["token"].as_str().expect("token").to_string();
    assert!(token.starts_with("cdmpair1."), "{t}");
    let (s, v) = src.api().call(
        "POST",
        "/v1/replication/peers",
        Some(json!({"name": dst.name, "url": dst.a.https_url(), "token": token})),
    );
    assert!(
        s == 200 || s == 201,
        "pairing {} with {}: {s} {v}",
        src.name,
        dst.name
    );
    let peers = src.api().get("/v1/replication/peers");
    let p = peers
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["name"] == dst.name.as_str())
        .unwrap_or_else(|| panic!("{} has no peer {}: {peers}", src.name, dst.name))
        .clone();
    assert_eq!(p["identity"], dst.identity().as_str(), "{p}");
    p
}

/// A point's id: the identity of the appliance that took it and its
/// snapshot id there.
pub fn point_id(identity: &str, snapshot: u64) -> String {
    format!("{identity}:{snapshot}")
}

pub fn snap_id(s: &Value) -> u64 {
    s["id"].as_u64().expect("snapshot id")
}

/// `qemu-img compare` of two NBD exports: panics unless their contents
/// are the same.
pub fn compare(uri_a: &str, uri_b: &str) {
    let out =
        output(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri_a, uri_b]));
    assert!(
        out.status.success(),
        "qemu-img compare {uri_a} {uri_b} ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The same, but the exports must differ (a check that `compare` sees a
/// difference at all).
pub fn differs(uri_a: &str, uri_b: &str) {
    let out =
        output(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri_a, uri_b]));
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare {uri_a} {uri_b} should find a difference: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTPS request to a replication listener with curl: `cert` is a
/// client certificate and key (none: no client certificate), `ca` the CA
/// that signed the listener's certificate. `(status, body)`; status 0
/// when no HTTP answer came (the TLS handshake was refused).
pub fn repl_request(
    addr: &str,
    method: &str,
    path: &str,
    cert: Option<(&PathBuf, &PathBuf)>,
    ca: &PathBuf,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_file = dir.path().join("body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "--max-time", "60", "-o"])
        .arg(&out_file)
        .args(["-w", "%{http_code}", "--cacert"])
        .arg(ca);
    if let Some((crt, key)) = cert {
        cmd.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some(b) = body {
        let f = dir.path().join("req");
        std::fs::write(&f, b).expect("request body");
        cmd.arg("--data-binary").arg(format!("@{}", f.display()));
    }
    cmd.arg(format!("https://{addr}{path}"));
    let out = output(&mut cmd);
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<u16>()
        .unwrap_or(0);
    let body = std::fs::read(&out_file).unwrap_or_default();
    (code, body)
}

/// JSON of a response body (Null if not JSON).
pub fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}
