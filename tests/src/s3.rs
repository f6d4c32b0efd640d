//! A real S3 server on loopback for the object-storage tier's tests:
//! `s3s-fs` (crates.io; scripts/test installs it with `s3_test_server`
//! from scripts/lib.sh), which checks SigV4 signatures, payload hashes
//! and Content-MD5, and keeps each object as a plain file
//! `ROOT/BUCKET/KEY`, so a test can inspect, corrupt or remove objects
//! behind the client's back.
//!
//! External mode: when `CDM_S3_ENDPOINT`, `CDM_S3_BUCKET`,
//! `CDM_S3_ACCESS_KEY` and `CDM_S3_SECRET_KEY` are set (and optionally
//! `CDM_S3_REGION`), [`S3Server::start`] hands out that server instead —
//! scripts/test-s3-garage runs the tier tests against a three-node Garage
//! cluster so. Each handle has its own key prefix ([`S3Server::prefix`]),
//! so tests sharing one bucket never see each other's objects. What needs
//! s3s-fs's process or directory (`kill`, `pause`, `restart`, `root`,
//! `object_path`) fails loudly there; tests reach objects through the S3
//! API instead ([`read_object`], [`flip_object_byte`]).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cdm_tier::{S3Config, S3Store};

use crate::START_TIMEOUT;

pub const ACCESS_KEY: &str = "cdm-test-access";
pub const SECRET_KEY: &str = "cdm-test-secret-0123456789";
pub const BUCKET: &str = "cdm-tier";

/// The installed `s3s-fs`: on PATH or in ~/.cargo/bin; a clear failure
/// otherwise (never a skip).
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file());
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs"));
    on_path
        .or(home.filter(|p| p.is_file()))
        .expect("s3s-fs is not installed: scripts/test installs it (s3_test_server in scripts/lib.sh: cargo install s3s-fs@0.14.1 --features binary --locked)")
}

/// The region s3s-fs accepts (any; the client's default).
const DEFAULT_REGION: &str = "us-east-1";

/// A server named by `CDM_S3_*` rather than started here.
struct External {
    endpoint: String,
    bucket: String,
    region: String,
}

/// Reads `CDM_S3_*`: `None` when `CDM_S3_ENDPOINT` is unset; a clear
/// failure when it is set and the rest is not.
fn external() -> Option<External> {
    let endpoint = std::env::var("CDM_S3_ENDPOINT").ok()?;
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("CDM_S3_ENDPOINT is set ({endpoint}) but {name} is not: an external S3 server needs CDM_S3_BUCKET, CDM_S3_ACCESS_KEY and CDM_S3_SECRET_KEY")
        })
    };
    Some(External {
        bucket: var("CDM_S3_BUCKET"),
        region: std::env::var("CDM_S3_REGION").unwrap_or_else(|_| DEFAULT_REGION.into()),
        endpoint: endpoint.trim_end_matches('/').to_string(),
    })
}

/// A key prefix no other handle in any test process gets.
fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "cdm-test/{}-{}-{nanos}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The port of an `http://HOST:PORT/...` endpoint.
fn endpoint_port(endpoint: &str) -> u16 {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("");
    authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("CDM_S3_ENDPOINT {endpoint:?} has no :PORT"))
}

pub struct S3Server {
    child: Option<Child>,
    root: tempfile::TempDir,
    port: u16,
    pub access_key: String,
    pub secret_key: String,
    external: Option<External>,
    prefix: String,
}

impl S3Server {
    /// Starts s3s-fs on a free loopback port with a fresh root holding one
    /// empty bucket ([`BUCKET`]: s3s-fs serves each directory of its root
    /// as a bucket) — or, with `CDM_S3_*` set, hands out that server.
    pub fn start() -> S3Server {
        let root = tempfile::Builder::new()
            .prefix("cdm-s3-")
            .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
        if let Some(x) = external() {
            return S3Server {
                child: None,
                root,
                port: endpoint_port(&x.endpoint),
                access_key: std::env::var("CDM_S3_ACCESS_KEY").unwrap_or_default(),
                secret_key: std::env::var("CDM_S3_SECRET_KEY").unwrap_or_default(),
                external: Some(x),
                prefix: unique_prefix(),
            };
        }
        Self::start_s3s_fs(root)
    }

    fn start_s3s_fs(root: tempfile::TempDir) -> S3Server {
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket directory");
        let mut s = S3Server {
            child: None,
            root,
            port: 0,
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            external: None,
            prefix: unique_prefix(),
        };
        // s3s-fs takes a port number and cannot report one it picked: a
        // port free a moment ago is used, and if someone took it in
        // between, the server exits and another is tried.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            s.port = port;
            if s.spawn() {
                return s;
            }
        }
        panic!("s3s-fs did not start on 5 ports; log:\n{}", s.log());
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("s3s-fs.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server on `self.port`; false if it exited (port taken).
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut child = Command::new(binary())
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(self.root.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "s3s-fs not answering after {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when `CDM_S3_*` named the server (not s3s-fs started here).
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// Fails the test with the reason when the server is external: what
    /// `what` does needs s3s-fs's process or directory, and passing
    /// without doing it would prove nothing.
    fn require_local(&self, what: &str) {
        if let Some(x) = &self.external {
            panic!(
                "{what} needs the s3s-fs server the harness starts, but CDM_S3_ENDPOINT names an external server ({}); this test cannot run against it (scripts/test-s3-garage leaves it out)",
                x.endpoint
            );
        }
    }

    /// Kills the server (SIGKILL) and waits for it; the data stays.
    pub fn kill(&mut self) {
        self.require_local("killing the S3 server");
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our child: a paused server dies too.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server (SIGSTOP): connections are still accepted by the
    /// kernel but nothing answers, as with a hung server.
    pub fn pause(&self) {
        self.require_local("pausing the S3 server");
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("s3s-fs is running").id() as i32;
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Starts the server again on the same port and root.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        // The port is ours until someone else binds it; retry while the
        // old socket lingers.
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not restart on port {}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        match &self.external {
            Some(x) => x.endpoint.clone(),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        self.external.as_ref().map_or(BUCKET, |x| &x.bucket)
    }

    pub fn region(&self) -> &str {
        self.external.as_ref().map_or(DEFAULT_REGION, |x| &x.region)
    }

    /// This handle's own key prefix (`cdm-test/…/`): tests put their
    /// objects under it so that tests sharing a bucket stay apart.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A client configuration for this server: endpoint, bucket, keys,
    /// region and [`S3Server::prefix`].
    pub fn config(&self) -> S3Config {
        let mut c = S3Config::new(
            &self.endpoint(),
            self.bucket(),
            &self.access_key,
            &self.secret_key,
        );
        c.region = self.region().to_string();
        c.prefix = self.prefix.clone();
        c
    }

    pub fn keys(&self) -> (&str, &str) {
        (&self.access_key, &self.secret_key)
    }

    /// The server's data directory.
    pub fn root(&self) -> &Path {
        self.require_local("the server's data directory");
        self.root.path()
    }

    /// Where s3s-fs keeps the object with the full key `key`.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.require_local("an object's file on the server");
        self.root.path().join(BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole object `key` (relative to the store's prefix), read through
/// the S3 API; a clear failure when it is missing.
pub fn read_object(store: &S3Store, key: &str) -> Vec<u8> {
    let len = store
        .head(key)
        .unwrap_or_else(|e| panic!("HEAD {key}: {e}"))
        .unwrap_or_else(|| panic!("object {key} is not in the store"));
    store
        .get_range(key, 0, len)
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// Damage behind the client's back that works on any server: reads the
/// object, XORs byte `at` with `mask`, and puts it back. Returns the
/// bytes now stored.
pub fn flip_object_byte(store: &S3Store, key: &str, at: usize, mask: u8) -> Vec<u8> {
    let mut b = read_object(store, key);
    assert!(at < b.len(), "{key} has {} bytes, not {}", b.len(), at + 1);
    b[at] ^= mask;
    store
        .put(key, &b)
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    b
}

/// A TCP proxy on loopback in front of a server that flips one bit of
/// the body of the first request of each connection when that request is
/// a PUT: a body damaged on the way, after the client signed it.
pub struct FlipProxy {
    pub port: u16,
}

impl FlipProxy {
    pub fn start(target: u16) -> FlipProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = l.local_addr().expect("proxy address").port();
        // The listener thread lives as long as the test process.
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || flip_connection(c, target));
            }
        });
        FlipProxy { port }
    }
}

fn flip_connection(mut client: TcpStream, target: u16) {
    use std::io::{Read, Write};
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let (Ok(mut from_server), Ok(mut to_client)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Both);
    });
    // Read the first request's head and the first byte of its body.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let body_at = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"PUT ") || buf.len() > p + 4 {
                break p + 4;
            }
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    if buf.starts_with(b"PUT ") {
        buf[body_at] ^= 0x01;
    }
    if server.write_all(&buf).is_ok() {
        let _ = std::io::copy(&mut client, &mut server);
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}
