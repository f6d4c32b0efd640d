//! snapshotd: creates its pool on first start, serves NBD, commits and exits
//! 0 on SIGTERM, keeps data across restarts.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdm_e2e::*;

fn start(data: &std::path::Path, sock: &std::path::Path) -> std::process::Child {
    let c = Command::new(bin("snapshotd"))
        .arg("--data")
        .arg(data)
        .arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .args(["--pool-size", "2G"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start snapshotd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "snapshotd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    c
}

fn term(mut c: std::process::Child) {
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
