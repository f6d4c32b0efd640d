//! Helpers for end-to-end tests: the project's binaries, pools in temporary
//! directories, a running NBD server, and checks that a real tool exists
//! (a missing tool fails the test: scripts/test installs them).

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod appliance_vm;
pub mod corpus;
pub mod guest;
pub mod maria;
pub mod pg;
pub mod s3;
pub mod stamp;
pub mod webhook;

/// Path of one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/PROFILE/deps, tools like cdm-control-bench
    // from target/PROFILE itself.
    let parent = exe.parent().expect("target directory");
    let dir = if parent.ends_with("deps") {
        parent.parent().expect("target directory")
    } else {
        parent
    };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` (scripts/test does)",
        p.display()
    );
    p
}

/// Fails the test if a required tool is missing.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed: scripts/test installs it (Debian packages)"
    );
}

/// How long one external command may run before the test kills it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a command with a watchdog: a hung client fails the test instead of
/// stalling the suite.
pub fn output(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    wait_output(child, &format!("{cmd:?}"))
}

/// Waits for a child started with piped output, with the same watchdog as
/// [`output`]: the timeout only fails a hung process, it is no deadline
/// for a slow one.
pub fn wait_output(child: Child, what: &str) -> std::process::Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(COMMAND_TIMEOUT).is_err() {
            // SAFETY: kill(2) on the child we spawned.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    let _ = tx.send(());
    if watchdog.join().unwrap_or(false) {
        panic!("{what} did not finish within {COMMAND_TIMEOUT:?}; killed");
    }
    out
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = output(cmd);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns stdout+stderr.
pub fn run_fail(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(!out.status.success(), "{cmd:?} should have failed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a shell snippet.
pub fn sh(script: &str) -> String {
    run(Command::new("bash").arg("-ec").arg(script))
}

/// A pool in a temporary directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pool: PathBuf,
}

impl Env {
    pub fn new(size: &str) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("cdm-e2e-")
            .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
        let pool = dir.path().join("pool");
        let env = Env { dir, pool };
        env.cdmfs(&["format", "--size", size]);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the `cdmfs` tool on this pool.
    pub fn cdmfs(&self, args: &[&str]) -> String {
        run(Command::new(bin("cdmfs"))
            .arg("--pool")
            .arg(&self.pool)
            .args(args))
    }

    pub fn cdmfs_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.cdmfs(&a)).expect("cdmfs --json output")
    }

    /// Starts `cdm-nbd` on a unix socket and a TCP port the kernel picks
    /// (port 0), learnt from its ready file: no port is guessed.
    pub fn serve(&self, extra: &[&str]) -> NbdServer {
        let sock = self.path("nbd.sock");
        let ready = self.path("nbd.ready");
        // The last run's file would be taken for this one's.
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.path("nbd.log")).expect("log file");
        let mut child = Command::new(bin("cdm-nbd"))
            .arg("--pool")
            .arg(&self.pool)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cdm-nbd");
        let v = wait_ready(&ready, &mut child, "cdm-nbd", || {
            std::fs::read_to_string(self.path("nbd.log")).unwrap_or_default()
        });
        let port = v["nbd"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .find_map(|a| a.strip_prefix("127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no TCP listener in the ready file: {v}"));
        NbdServer {
            child: Some(child),
            sock,
            port,
        }
    }
}

/// How long a server may take to start before the test gives up: only a
/// hung start hits it.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for the ready file `path` that `snapshotd` / `cdm-nbd
/// --ready-file` write once every listener is bound, and returns its JSON
/// (`{"api": "127.0.0.1:PORT", "nbd": [...]}`). Fails at once if the
/// process exits first, with `log()` in the message.
pub fn wait_ready(
    path: &Path,
    child: &mut Child,
    what: &str,
    log: impl Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        // Written aside and renamed: present means complete.
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what} ready file {}: {e}: {text}", path.display()));
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited with {st} before it was ready; log:\n{}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {START_TIMEOUT:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on and nothing else can
/// take while this lives: a socket bound without listen(2), so
/// connections to it are refused. For "the receiver is gone" cases, where
/// a port that was free a moment ago might be taken by anyone.
pub struct ClosedPort {
    fd: std::os::fd::OwnedFd,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: socket(2); the descriptor is owned by `fd` from here on.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: bind/getsockname on our socket with a valid sockaddr_in.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let mut got: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut glen = len;
        let rc = unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                &mut got as *mut _ as *mut libc::sockaddr,
                &mut glen,
            )
        };
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        ClosedPort {
            fd,
            port: u16::from_be(got.sin_port),
        }
    }

    /// Starts listening on the very same port: the receiver "comes back"
    /// without the port ever having been free for someone else.
    pub fn listen(self) -> TcpListener {
        use std::os::fd::AsRawFd;
        // SAFETY: listen(2) on our bound socket.
        let rc = unsafe { libc::listen(self.fd.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        TcpListener::from(self.fd)
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

pub struct NbdServer {
    child: Option<Child>,
    pub sock: PathBuf,
    pub port: u16,
}

impl NbdServer {
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.sock.display())
    }
    /// SIGTERM: the server commits and exits 0.
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().expect("wait for cdm-nbd");
            assert!(st.success(), "cdm-nbd exited with {st}");
        }
    }
    /// SIGKILL: like a crash of the process (the pool must still be consistent).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn write_file(p: &Path, data: &[u8]) {
    std::fs::File::create(p)
        .and_then(|mut f| f.write_all(data))
        .expect("write file");
}

/// Runs `snapshotd` on `data` with `args` (and a throwaway NBD socket in
/// `scratch`, the API on port 0) for a start that must be refused:
/// asserts it exits with an error and returns what it printed on stderr.
pub fn snapshotd_refused(data: &Path, scratch: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(bin("snapshotd"))
        .arg("--data")
        .arg(data)
        .args(args)
        .args([
            "--nbd",
            &format!("unix:{}", scratch.join("x.sock").display()),
            "--api",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run snapshotd");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "snapshotd started: {err}");
    err
}

/// A running `snapshotd` on a temporary data directory: NBD on a unix
/// socket, the API on a TCP port the kernel picks (port 0, learnt from the
/// ready file). Killed when dropped.
pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub api: String,
    /// The HTTPS API's address (`--api-tls 127.0.0.1:0`).
    pub api_tls: String,
    /// The replication listener's address, when started with
    /// `--replication` (from the ready file).
    pub replication: Option<String>,
    pub config: Option<PathBuf>,
    /// snapshotd arguments besides the data directory, listeners and config.
    args: Vec<String>,
    child: Option<Child>,
}

/// Config for tests: fast scheduler ticks and webhook retries; webhooks may
/// target 127.0.0.1, where the tests' receivers listen.
pub const FAST_CONFIG: &str = "scheduler_tick_ms = 100\nfake_clock = true\n[webhooks]\nbackoff_ms = 100\nmax_backoff_ms = 400\nmax_attempts = 4\ntimeout_ms = 2000\nallow_private = true\n";

/// Config that only lets webhooks target 127.0.0.1.
pub const LOCAL_WEBHOOKS: &str = "[webhooks]\nallow_private = true\n";

impl Appliance {
    /// Starts a new appliance; `config` is the TOML config file's text, if any.
    /// Its 4 GiB pool is sparse: the tests run many appliances at once,
    /// and preallocated pools would take 4 GiB of the host each.
    pub fn start(config: Option<&str>) -> Appliance {
        Appliance::start_with(config, None, &["--pool-size", "4G", "--pool-sparse"])
    }

    /// Starts a new appliance with `args` for snapshotd (no pool size
    /// unless they give one) and its data directory at `data` if given
    /// (else in its temporary directory).
    pub fn start_with(config: Option<&str>, data: Option<&Path>, args: &[&str]) -> Appliance {
        let dir = tempfile::Builder::new()
            .prefix("cdm-appliance-")
            .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let sock = dir.path().join("nbd.sock");
        let config = config.map(|text| {
            let p = dir.path().join("snapshotd.toml");
            write_file(&p, text.as_bytes());
            p
        });
        let mut a = Appliance {
            dir,
            data,
            sock,
            api: String::new(),
            api_tls: String::new(),
            replication: None,
            config,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        a.restart();
        a
    }

    /// Starts (again) on the same data directory and config.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let ready = self.dir.path().join("snapshotd.ready");
        // The last run's file would be taken for this one's.
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotd.log"))
            .expect("log file");
        let mut cmd = Command::new(bin("snapshotd"));
        cmd.arg("--data")
            .arg(&self.data)
            .arg("--nbd")
            .arg(format!("unix:{}", self.sock.display()))
            .args([
                "--api",
                "127.0.0.1:0",
                "--api-tls",
                "127.0.0.1:0",
                "--ready-file",
            ])
            .arg(&ready)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd.spawn().expect("start snapshotd");
        let log = self.dir.path().join("snapshotd.log");
        let v = wait_ready(&ready, &mut child, "snapshotd", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        });
        self.child = Some(child);
        self.api = v["api"]
            .as_str()
            .unwrap_or_else(|| panic!("no API address in the ready file: {v}"))
            .to_string();
        self.api_tls = v["api_tls"]
            .as_str()
            .unwrap_or_else(|| panic!("no HTTPS API address in the ready file: {v}"))
            .to_string();
        self.replication = v["replication"].as_str().map(str::to_string);
    }

    /// The HTTPS API's URL (its certificate is signed by [`Appliance::ca_file`]).
    pub fn https_url(&self) -> String {
        format!("https://{}", self.api_tls)
    }

    /// The appliance's own CA certificate (PEM), made on first start.
    pub fn ca_file(&self) -> PathBuf {
        self.data.join("tls").join("ca.crt")
    }

    /// Runs `cdmctl` against this appliance as admin.
    pub fn cdmctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("cdmctl"))
            .args(["--url", &self.url()])
            .args(args)
            .env_remove("CDM_TOKEN")
            .env("CDM_TOKEN_FILE", self.data.join("admin.token"))
            .output()
            .expect("run cdmctl")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snapshotd.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .expect("DATA/admin.token")
            .trim()
            .to_string()
    }

    /// An NBD client of `export` on the appliance's unix socket.
    pub fn nbd(&self, export: &str) -> nbd_proto::client::Client {
        let ep = format!("unix:{}", self.sock.display());
        nbd_proto::client::Client::connect(
            &ep,
            Some(export),
            &nbd_proto::client::ClientOptions::default(),
        )
        .unwrap_or_else(|e| panic!("NBD connect to {export}: {e}"))
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM; asserts a clean exit 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().expect("wait for snapshotd");
            assert!(
                st.success(),
                "snapshotd exited with {st}; log:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

static LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// For a test whose checks depend on the machine not being busy with the
/// other tests of its binary (they run in parallel): it runs alone among
/// the tests that take [`shared`]. A failed test does not stop the others
/// (the lock's poisoning is ignored).
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

/// For the other tests of a binary that has an [`exclusive`] one.
pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 50 ms until it returns Some, or fails after `secs`
/// (a bound for a hung test, not a deadline: keep it generous).
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw HTTP call to the API: `(status, JSON body or Null)`. `body` is sent
/// as-is with `Content-Type: application/json`.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut req = agent.request(method, &format!("{base}{path}"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, v)
}

/// Sends only a request's head (no body, whatever Content-Length says) and
/// returns the status and body of the answer: for refusals that must come
/// before the body is read, which a client still sending could not see.
pub fn http_head_only(base: &str, head: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    s.write_all(head.as_bytes()).expect("send the request head");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the answer's body is complete or the server closes.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer to a request head: {e} (got {out:?})"),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some((h, b)) = text.split_once("\r\n\r\n") {
            let len = h
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| b.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = h
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let v = serde_json::from_str(b).unwrap_or(serde_json::Value::String(b.to_string()));
    (status, v)
}

/// An API caller with a token.
pub struct Api {
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(a: &Appliance, token: &str) -> Api {
        Api {
            base: a.url(),
            token: token.to_string(),
        }
    }
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let b = body.map(|v| v.to_string());
        http(&self.base, method, path, Some(&self.token), b.as_deref())
    }
    /// A call that must answer `status`; returns the body.
    pub fn expect(
        &self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let (s, v) = self.call(method, path, body);
        assert_eq!(s, status, "{method} {path} answered {s}: {v}");
        if status >= 400 {
            assert!(
                v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                "error shape: {v}"
            );
        }
        v
    }
    pub fn get(&self, path: &str) -> serde_json::Value {
        self.expect(200, "GET", path, None)
    }
}

/// A small ext4 filesystem of `size` bytes, loop-mounted under `work` (for
/// tests of a full disk); unmounted when the guard drops, so declare it
/// before an appliance that uses it. Needs root, and says so.
pub fn small_ext4(work: &Path, size: u64) -> (PathBuf, LoopMount) {
    // SAFETY: a plain query of this process's identity.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test mounts a small ext4 filesystem (mount -o loop): run it as root"
    );
    require("mkfs.ext4");
    let img = work.join("fs.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .expect("image file");
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt));
    (mnt.clone(), LoopMount(mnt))
}

/// A loop-mounted filesystem, unmounted when dropped.
pub struct LoopMount(PathBuf);

impl LoopMount {
    /// Takes charge of a filesystem the caller mounted at `mnt`.
    pub fn new(mnt: PathBuf) -> LoopMount {
        LoopMount(mnt)
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// `cdmfs fsck` of the pool in a data directory must say clean.
pub fn fsck_clean(data: &Path) {
    let out = run(Command::new(bin("cdmfs"))
        .arg("--pool")
        .arg(data.join("pool"))
        .arg("fsck"));
    assert!(out.contains("clean"), "fsck: {out}");
}

/// The agent pointed at one appliance, with its own state directory;
/// detaches whatever is still attached when dropped.
pub struct AgentCli {
    pub state: tempfile::TempDir,
    pub url: String,
    pub token: PathBuf,
    /// The appliance's NBD socket.
    pub sock: PathBuf,
}

impl AgentCli {
    pub fn new(app: &Appliance) -> AgentCli {
        AgentCli {
            state: tempfile::Builder::new()
                .prefix("cdm-agent-")
                .tempdir_in("/var/tmp")
                .unwrap(),
            url: app.url(),
            token: app.data.join("admin.token"),
            sock: app.sock.clone(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("cdm-agent"));
        c.args(["--url", &self.url, "--token-file"])
            .arg(&self.token)
            .arg("--nbd")
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--json")
            .args(args)
            .env_remove("CDM_TOKEN")
            .env_remove("PGPASSWORD");
        c
    }

    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = run(&mut self.cmd(args));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// The error of a command that must fail.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = output(&mut self.cmd(args));
        assert!(!out.status.success(), "{args:?} should have failed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value =
            serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"));
        v["error"].as_str().expect("error message").to_string()
    }
}

impl Drop for AgentCli {
    fn drop(&mut self) {
        if let Ok(out) = self.cmd(&["list"]).output() {
            if let Ok(serde_json::Value::Array(v)) =
                serde_json::from_slice::<serde_json::Value>(&out.stdout)
            {
                for a in v {
                    if let Some(n) = a["name"].as_str() {
                        let _ = self.cmd(&["detach", n]).output();
                    }
                }
            }
        }
    }
}
