//! snapshotd: creates its pool on first start, serves NBD, commits and exits
//! 0 on SIGTERM, keeps data across restarts; cdmctl's exit code for a
//! server error.

use std::process::{Command, Stdio};

use cdm_e2e::stamp;
use cdm_e2e::*;

/// A running snapshotd (and its API address), killed if the test fails
/// before stopping it.
struct Daemon(Option<std::process::Child>, String);

impl Daemon {
    /// The pool's commit generation, from the unauthenticated `/health`.
    fn generation(&self) -> u64 {
        let (st, v) = http(&format!("http://{}", self.1), "GET", "/health", None, None);
        assert_eq!(st, 200, "{v}");
        v["pool_generation"].as_u64().expect("pool_generation")
    }
    fn kill(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(data: &std::path::Path, sock: &std::path::Path) -> Daemon {
    start_with(data, sock, &[])
}

fn start_with(data: &std::path::Path, sock: &std::path::Path, extra: &[&str]) -> Daemon {
    // Port 0: snapshotd reports the address it bound in the ready file,
    // written once every listener is up.
    let ready = sock.with_extension("ready");
    let _ = std::fs::remove_file(&ready);
    let mut c = Command::new(bin("snapshotd"))
        .args(extra)
        .arg("--data")
        .arg(data)
        .arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .args(["--api", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .args(["--pool-size", "2G"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start snapshotd");
    let bound = wait_ready(&ready, &mut c, "snapshotd", String::new);
    let api = bound["api"]
        .as_str()
        .unwrap_or_else(|| panic!("no API address in the ready file: {bound}"))
        .to_string();
    Daemon(Some(c), api)
}

fn term(mut d: Daemon) {
    let mut c = d.0.take().expect("running daemon");
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let st = c.wait().unwrap();
    assert!(st.success(), "snapshotd exited with {st}");
}

#[test]
fn first_start_serve_restart() {
    require("qemu-io");
    require("nbdinfo");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let data = dir.path().join("data");
    let sock = dir.path().join("nbd.sock");
    let d = start(&data, &sock);
    assert!(data.join("pool").exists());
    // The pool is owned by the daemon: offline tools refuse it.
    let err = run_fail(
        Command::new(bin("cdmfs"))
            .arg("--pool")
            .arg(data.join("pool"))
            .args(["volume", "list"]),
    );
    assert!(err.contains("in use"), "{err}");
    term(d);
    let cdmfs = |args: &[&str]| {
        run(Command::new(bin("cdmfs"))
            .arg("--pool")
            .arg(data.join("pool"))
            .args(args))
    };
    cdmfs(&["volume", "create", "stage", "--size", "64M"]);
    // No periodic commit during the test: only SIGTERM's commit can make
    // the write below durable.
    let d = start_with(&data, &sock, &["--commit-interval", "3600"]);
    let uri = format!("nbd+unix:///stage?socket={}", sock.display());
    let ep = format!("unix:{}", sock.display());
    let t = stamp::tag("stage");
    let g0 = d.generation();
    // Written (and acknowledged) with our client, never flushed, and the
    // connection stays open through the SIGTERM: qemu-io would flush on
    // close and make the daemon's own commit untested.
    let open = stamp::write_nbd(
        &ep,
        "stage",
        1 << 20,
        &stamp::random(t, 1 << 20, 4 << 20, 1),
        false,
    );
    assert_eq!(
        d.generation(),
        g0,
        "nothing committed the write before SIGTERM"
    );
    term(d);
    drop(open);
    assert!(cdmfs(&["fsck"]).contains("clean"));
    let d = start(&data, &sock);
    let got = stamp::read_nbd(&ep, "stage", 0, 6 << 20);
    stamp::verify_with(&got, t, 0, stamp::Body::Random, |o| {
        ((1 << 20)..(5 << 20)).contains(&o).then_some(1)
    })
    .unwrap_or_else(|e| panic!("after SIGTERM and restart: {e}"));
    let info = run(Command::new("nbdinfo").arg(&uri));
    assert!(info.contains("67108864"), "{info}");
    term(d);
}

#[test]
fn periodic_commit_survives_sigkill() {
    require("qemu-io");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let data = dir.path().join("data");
    let sock = dir.path().join("nbd.sock");
    term(start(&data, &sock));
    run(Command::new(bin("cdmfs"))
        .arg("--pool")
        .arg(data.join("pool"))
        .args(["volume", "create", "v", "--size", "16M"]));
    let d = start_with(&data, &sock, &["--commit-interval", "1"]);
    let ep = format!("unix:{}", sock.display());
    let t = stamp::tag("v");
    // No FLUSH from the client (qemu-io would flush on close); only the
    // background commit can make this durable before the SIGKILL.
    let mut c = stamp::write_nbd(&ep, "v", 0, &stamp::random(t, 0, 1 << 20, 1), false);
    // Commits run one at a time and only when something is dirty. One that
    // was already under way when the write was acknowledged may miss it;
    // the next one cannot. So: see a commit finish after the write (g1),
    // dirty the pool again, and see one more finish (it started after g1,
    // so after the write).
    let g0 = d.generation();
    let g1 = wait_for(60, "a background commit", || {
        let g = d.generation();
        (g > g0).then_some(g)
    });
    c.write(8 << 20, &stamp::random(t, 8 << 20, 4096, 2), false)
        .unwrap();
    wait_for(60, "a second background commit", || {
        (d.generation() > g1).then_some(())
    });
    d.kill();
    drop(c);
    let d = start(&data, &sock);
    let got = stamp::read_nbd(&ep, "v", 0, 1 << 20);
    stamp::assert_stamped("after SIGKILL", &got, t, 0, 1);
    term(d);
}

/// `cdmctl` exits 8 on a server error (5xx, 501 included), as docs/api.md
/// says. snapshotd answers no request with a 5xx on purpose, so a minimal
/// HTTP server (bound to port 0, its address passed on) plays one.
#[test]
fn cdmctl_exits_8_on_a_server_error() {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let answers: [(&str, &str); 3] = [
        (
            "500 Internal Server Error",
            r#"{"error":{"code":"internal","message":"engine failed"}}"#,
        ),
        (
            "501 Not Implemented",
            r#"{"error":{"code":"unsupported","message":"not built yet"}}"#,
        ),
        ("502 Bad Gateway", "proxy down"),
    ];
    let server = std::thread::spawn(move || {
        for (status, body) in answers {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            // The request head, up to the empty line (no body on a GET).
            while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    for msg in ["engine failed", "not built yet", "proxy down"] {
        let o = Command::new(bin("cdmctl"))
            .args(["--url", &url, "--token", "cdm_00_00", "volume", "list"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(8), "{msg}: {err}");
        assert!(err.contains(msg), "{err}");
    }
    server.join().unwrap();
}
