//! TLS everywhere, end to end with the real binaries: snapshotd's own CA and
//! certificate, the API over HTTPS with a pinned CA (a wrong CA refused with
//! a clear error), plain HTTP and plaintext NBD refused to a peer off the
//! loopback (a second address on `lo` stands in for a remote host: a
//! connection to it comes from it) while loopback stays plain, NBD STARTTLS
//! with our clients, libnbd and qemu, and `cdm-agent --ca-file` backing up
//! over HTTPS and NBD+TLS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cdm_api::client::{Client, ClientError};
use cdm_e2e::*;
use nbd_proto::client::ClientOptions;
use nbd_proto::{ClientTls, Pipelined};
use serde_json::{json, Value};

/// An extra address on `lo`, removed when dropped (also when the test
/// fails). Connections to it come from it: to the appliance, a peer that
/// is not loopback.
struct LoAddr(&'static str);

impl LoAddr {
    fn add(ip: &'static str) -> LoAddr {
        require("ip");
        // Left by a run that was killed: take it away first.
        let _ = output(Command::new("ip").args(["addr", "del", &format!("{ip}/32"), "dev", "lo"]));
        run(Command::new("ip").args(["addr", "add", &format!("{ip}/32"), "dev", "lo"]));
        LoAddr(ip)
    }
}

impl Drop for LoAddr {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.0), "dev", "lo"])
            .output();
    }
}

/// snapshotd listening on every address (so both on the loopback and on
/// the test's "remote" address): plain API, HTTPS API, NBD over TCP and a
/// unix socket. Killed when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    api: u16,
    api_tls: u16,
    nbd: u16,
    ca: PathBuf,
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("cdm-tls-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let ready = dir.path().join("ready");
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let mut child = Command::new(bin("snapshotd"))
            .arg("--data")
            .arg(dir.path().join("data"))
            .args(["--pool-size", "2G", "--pool-sparse"])
            .args([
                "--api",
                "0.0.0.0:0",
                "--api-tls",
                "0.0.0.0:0",
                "--nbd",
                "0.0.0.0:0",
            ])
            .arg("--nbd")
            .arg(format!("unix:{}", dir.path().join("nbd.sock").display()))
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start snapshotd");
        let logp = dir.path().join("log");
        let v = wait_ready(&ready, &mut child, "snapshotd", || {
            std::fs::read_to_string(&logp).unwrap_or_default()
        });
        let nbd = v["nbd"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .find(|s| !s.starts_with("unix:"))
            })
            .unwrap_or_else(|| panic!("no NBD TCP listener: {v}"));
        let ca = PathBuf::from(v["ca"].as_str().unwrap_or_else(|| panic!("no CA: {v}")));
        Daemon {
            api: port(v["api"].as_str().unwrap()),
            api_tls: port(
                v["api_tls"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no api_tls: {v}")),
            ),
            nbd: port(nbd),
            ca,
            child: Some(child),
            dir,
        }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .unwrap()
            .trim()
            .to_string()
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("data").join("admin.token")
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn https(&self, host: &str) -> String {
        format!("https://{host}:{}", self.api_tls)
    }

    /// An admin client over HTTPS with the appliance's CA pinned.
    fn client(&self, host: &str) -> Client {
        Client::connect(&self.https(host), Some(self.token()), Some(&self.ca)).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn create_volume(&self, name: &str, size: u64) {
        let (st, v) = self
            .client("127.0.0.1")
            .request(
                "POST",
                "/v1/volumes",
                Some(&json!({"name": name, "size": size})),
            )
            .unwrap();
        assert_eq!(st, 201, "{v}; log:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA of another appliance (and a directory holding it the way gnutls
/// clients want it: DIR/ca-cert.pem).
fn other_ca(dir: &Path) -> PathBuf {
    require("openssl");
    sh(&format!(
        "cd {} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
         -subj /CN=another-ca -keyout other.key -out other-ca.pem 2>/dev/null",
        dir.display()
    ));
    dir.join("other-ca.pem")
}

/// DIR/ca-cert.pem holding `ca`, for libnbd and qemu.
fn gnutls_dir(ca: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(ca, dir.join("ca-cert.pem")).unwrap();
    dir.to_path_buf()
}

#[test]
fn https_api_with_pinned_ca_and_plain_http_for_loopback_only() {
    let _lo = LoAddr::add("10.231.0.1");
    let d = Daemon::start();
    // The CA and keys the first start made, keys private.
    use std::os::unix::fs::PermissionsExt;
    let tls = d.dir.path().join("data/tls");
    for k in ["ca.key", "server.key"] {
        let mode = std::fs::metadata(tls.join(k)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{k}");
    }
    // HTTPS with the CA pinned, by loopback and by the other address (both
    // are names in the certificate).
    for host in ["127.0.0.1", "localhost", "10.231.0.1"] {
        let c = d.client(host);
        assert_eq!(c.health().unwrap()["status"], "ok", "{host}");
        assert!(c.list_volumes().unwrap().is_empty(), "{host}");
    }
    // GET /v1/ca needs no token and is the CA file.
    let anon = Client::connect(&d.https("127.0.0.1"), None, Some(&d.ca)).unwrap();
    let (st, pem) = anon.request("GET", "/v1/ca", None).unwrap();
    assert_eq!(st, 200, "{pem}");
    assert_eq!(
        pem.as_str().unwrap(),
        std::fs::read_to_string(&d.ca).unwrap()
    );
    // Another appliance's CA: refused, and the error says why.
    let other = other_ca(d.dir.path());
    let c = Client::connect(&d.https("127.0.0.1"), Some(d.token()), Some(&other)).unwrap();
    match c.list_volumes() {
        Err(ClientError::Transport(m)) => {
            assert!(m.contains("not signed by the CA in"), "{m}");
            assert!(m.contains("other-ca.pem"), "{m}");
        }
        other => panic!("a wrong CA was accepted: {other:?}"),
    }
    // No CA pinned: the system roots do not know it either.
    let c = Client::new(&d.https("127.0.0.1"), Some(d.token()));
    match c.list_volumes() {
        Err(ClientError::Transport(m)) => assert!(m.contains("--ca-file"), "{m}"),
        other => panic!("an unknown CA was accepted: {other:?}"),
    }
    // Plain HTTP: from the loopback it is served, from another address it
    // is refused before any token is looked at.
    let plain = |host: &str| Client::new(&format!("http://{host}:{}", d.api), Some(d.token()));
    let (st, v) = plain("127.0.0.1")
        .request("GET", "/v1/volumes", None)
        .unwrap();
    assert_eq!(st, 200, "{v}");
    for path in ["/v1/volumes", "/health", "/v1/ca"] {
        let (st, v) = plain("10.231.0.1").request("GET", path, None).unwrap();
        assert_eq!(st, 403, "{path}: {v}");
        assert_eq!(v["error"]["code"], "https_required", "{path}: {v}");
    }
    // cdmctl pins the CA too, and says what is wrong with a wrong one.
    let ctl = |ca: &Path| {
        let mut c = Command::new(bin("cdmctl"));
        c.args(["--url", &d.https("10.231.0.1"), "--json", "--ca-file"])
            .arg(ca)
            .args(["volume", "list"])
            .env_remove("CDM_TOKEN")
            .env("CDM_TOKEN_FILE", d.token_file());
        c
    };
    assert_eq!(run(&mut ctl(&d.ca)).trim(), "[]");
    let out = output(&mut ctl(&other));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not signed by the CA in"), "{err}");
}

#[test]
fn nbd_requires_starttls_from_remote_peers_only() {
    require("nbdinfo");
    require("qemu-img");
    let _lo = LoAddr::add("10.231.0.2");
    let d = Daemon::start();
    d.create_volume("sec", 16 << 20);
    let remote = format!("10.231.0.2:{}", d.nbd);
    let local = format!("127.0.0.1:{}", d.nbd);
    let tls = ClientTls::from_ca_file(&d.ca).unwrap();
    let with_tls = ClientOptions {
        tls: Some(tls.clone()),
        ..Default::default()
    };
    // Plaintext from the remote address: ERR_TLS_REQD.
    match nbd_proto::Client::connect(&remote, Some("sec"), &ClientOptions::default()) {
        Err(nbd_proto::ClientError::Refused { code, msg, .. }) => {
            assert_eq!(code, nbd_proto::codec::REP_ERR_TLS_REQD, "{msg}");
        }
        other => panic!("plaintext from a remote peer: {:?}", other.map(|c| c.size)),
    }
    // STARTTLS from the remote address: data both ways.
    let data = random_bytes(4 << 20, 7);
    let mut c = nbd_proto::Client::connect(&remote, Some("sec"), &with_tls).unwrap();
    c.write(0, &data, false).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(0, &mut back).unwrap();
    assert!(back == data);
    drop(c);
    // The pipelined client over several TLS connections.
    let p = Pipelined::connect(&remote, Some("sec"), &with_tls, 3).unwrap();
    assert!(p.connections() > 1);
    let mut back = vec![0u8; data.len()];
    p.read(0, &mut back).unwrap();
    assert!(back == data);
    p.write(8 << 20, &data, true).unwrap();
    p.disconnect();
    // Loopback and the unix socket may stay plain (and TLS works there too).
    let mut c = nbd_proto::Client::connect(&local, Some("sec"), &ClientOptions::default()).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(8 << 20, &mut back).unwrap();
    assert!(back == data);
    let unix = format!("unix:{}", d.sock().display());
    nbd_proto::Client::connect(&unix, Some("sec"), &ClientOptions::default()).unwrap();
    nbd_proto::Client::connect(&local, Some("sec"), &with_tls).unwrap();
    // Another appliance's CA: the handshake fails and says why.
    let other = other_ca(d.dir.path());
    let bad = ClientOptions {
        tls: Some(ClientTls::from_ca_file(&other).unwrap()),
        ..Default::default()
    };
    match nbd_proto::Client::connect(&remote, Some("sec"), &bad) {
        Err(nbd_proto::ClientError::Tls(m)) => {
            assert!(m.contains("not signed by the CA in"), "{m}")
        }
        other => panic!("a wrong CA was accepted: {:?}", other.map(|c| c.size)),
    }
    // Real clients: libnbd refused in plaintext, served over TLS.
    let err = run_fail(Command::new("nbdinfo").arg(format!("nbd://{remote}/sec")));
    assert!(
        err.contains("TLS") || err.contains("tls") || err.contains("not supported"),
        "{err}"
    );
    let pki = gnutls_dir(&d.ca, &d.dir.path().join("pki"));
    let uri = format!("nbds://{remote}/sec?tls-certificates={}", pki.display());
    let info = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["TLS"].as_bool(), Some(true), "{info}");
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(16 << 20));
    let bad_pki = gnutls_dir(&other, &d.dir.path().join("bad-pki"));
    run_fail(Command::new("nbdinfo").arg(format!(
        "nbds://{remote}/sec?tls-certificates={}",
        bad_pki.display()
    )));
    // qemu's TLS client reads what we wrote.
    let mut want = vec![0u8; 16 << 20];
    want[..data.len()].copy_from_slice(&data);
    want[8 << 20..(8 << 20) + data.len()].copy_from_slice(&data);
    write_file(&d.dir.path().join("want.raw"), &want);
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.display()
    );
    let opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=10.231.0.2,file.server.port={},file.export=sec,file.tls-creds=tls0",
        d.nbd
    );
    let want = format!(
        "driver=raw,file.driver=file,file.filename={}",
        d.dir.path().join("want.raw").display()
    );
    // The whole volume, as written above.
    run(Command::new("qemu-img")
        .args(["compare", "--object", &obj, "--image-opts", &opts, &want])
        .env("LC_ALL", "C"));
    drop(d);
}

#[test]
fn agent_backs_up_over_https_and_nbd_tls_with_its_pinned_ca() {
    let _lo = LoAddr::add("10.231.0.3");
    let d = Daemon::start();
    let src = tempfile::Builder::new()
        .prefix("cdm-src-")
        .tempdir_in("/var/tmp")
        .unwrap();
    sh(&format!(
        "cd {0} && mkdir -p a/b && head -c 2000000 /dev/urandom > a/big && echo hi > a/b/small",
        src.path().display()
    ));
    let state = tempfile::Builder::new()
        .prefix("cdm-agent-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let agent = |ca: &Path, args: &[&str]| {
        let mut c = Command::new(bin("cdm-agent"));
        c.args([
            "--url",
            &d.https("10.231.0.3"),
            "--nbd",
            &format!("10.231.0.3:{}", d.nbd),
        ])
        .arg("--ca-file")
        .arg(ca)
        .arg("--token-file")
        .arg(d.token_file())
        .arg("--state-dir")
        .arg(state.path())
        .arg("--json")
        .args(args)
        .env_remove("CDM_TOKEN")
        .env_remove("CDM_CA_FILE");
        c
    };
    let backup = [
        "backup",
        "files",
        "--volume",
        "fs",
        "--size",
        "256M",
        src.path().to_str().unwrap(),
    ];
    let out = run(&mut agent(&d.ca, &backup));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        d.client("127.0.0.1").list_snapshots("fs").unwrap().len(),
        1,
        "{v}"
    );
    // The stage disk's NBD connections came from the remote address, so
    // they were TLS (plaintext from there is refused, see above).
    let events = d
        .client("127.0.0.1")
        .request("GET", "/v1/events?type=export.connected", None)
        .unwrap()
        .1;
    assert!(
        events.to_string().contains("10.231.0.3:"),
        "no NBD connection from 10.231.0.3: {events}"
    );
    // Restored from the point, over the same TLS.
    let dst = state.path().join("restored");
    let export = v["export"]
        .as_str()
        .unwrap_or_else(|| panic!("no export: {v}"));
    run(&mut agent(
        &d.ca,
        &[
            "restore",
            "regular",
            export,
            "--target",
            dst.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        std::fs::read(dst.join("files/a/big")).unwrap(),
        std::fs::read(src.path().join("a/big")).unwrap()
    );
    // Another appliance's CA: the agent stops at once with a clear error.
    let other = other_ca(d.dir.path());
    let out = output(&mut agent(&other, &backup));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not signed by the CA in"), "{text}");
    // No CA at all: the appliance's own CA is unknown to it, and it says
    // what to give.
    let out = output(
        Command::new(bin("cdm-agent"))
            .args(["--url", &d.https("10.231.0.3"), "--token-file"])
            .arg(d.token_file())
            .arg("--state-dir")
            .arg(state.path())
            .arg("--json")
            .args(backup)
            .env_remove("CDM_CA_FILE"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("--ca-file"), "{text}");
    assert_eq!(d.client("127.0.0.1").list_snapshots("fs").unwrap().len(), 1);
}

#[test]
fn plain_remote_serves_plain_http_and_nbd_to_every_peer() {
    let _lo = LoAddr::add("10.231.0.4");
    let d = Daemon::start_with(&["--plain-remote", "--tls-san", "cdm.test"]);
    d.create_volume("open", 8 << 20);
    let plain = Client::new(&format!("http://10.231.0.4:{}", d.api), Some(d.token()));
    let (st, v) = plain.request("GET", "/v1/volumes", None).unwrap();
    assert_eq!(st, 200, "{v}");
    let remote = format!("10.231.0.4:{}", d.nbd);
    let c = nbd_proto::Client::connect(&remote, Some("open"), &ClientOptions::default()).unwrap();
    assert_eq!(c.size, 8 << 20);
    // TLS is still offered, and the extra name is in the certificate.
    let tls = ClientOptions {
        tls: Some(ClientTls::from_ca_file(&d.ca).unwrap()),
        ..Default::default()
    };
    nbd_proto::Client::connect(&remote, Some("open"), &tls).unwrap();
    require("openssl");
    let text = run(Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(d.dir.path().join("data/tls/server.crt")));
    assert!(text.contains("DNS:cdm.test"), "{text}");
    assert!(text.contains("IP Address:10.231.0.4"), "{text}");
}
