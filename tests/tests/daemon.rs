//! snapshotd: creates its pool on first start, serves NBD, commits and exits
//! 0 on SIGTERM, keeps data across restarts.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdm_e2e::*;

/// A running snapshotd, killed if the test fails before stopping it.
struct Daemon(Option<std::process::Child>);

impl Daemon {
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
    let c = Command::new(bin("snapshotd"))
        .args(extra)
        .arg("--data")
        .arg(data)
        .arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .arg("--api")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--pool-size", "2G"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start snapshotd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "snapshotd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon(Some(c))
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
    let d = start(&data, &sock);
    let uri = format!("nbd+unix:///stage?socket={}", sock.display());
    run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x3c 0 4M"]));
    // No flush from the client: the daemon's SIGTERM commit makes it durable.
    term(d);
    assert!(cdmfs(&["fsck"]).contains("clean"));
    let d = start(&data, &sock);
    run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x3c 0 4M"]));
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
    let uri = format!("nbd+unix:///v?socket={}", sock.display());
    // No FLUSH from the client (qemu-io would flush on close); only the
    // background commit can make this durable before the SIGKILL.
    let mut c = nbd_proto::Client::connect(
        &format!("unix:{}", sock.display()),
        Some("v"),
        &Default::default(),
    )
    .unwrap();
    c.write(0, &[0x6b; 1 << 20], false).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    d.kill();
    drop(c);
    let d = start(&data, &sock);
    run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x6b 0 1M"]));
    term(d);
}
