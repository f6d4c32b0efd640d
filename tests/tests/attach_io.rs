//! The host side of an attachment keeps many requests in flight: the
//! agent's FUSE file (`cdm-agent serve-disk`) under a loop device in
//! direct-I/O mode, driven by fio at queue depth 32, against a small NBD
//! server in this test that holds every write's reply until it has 16
//! writes outstanding at once. A stack that sends one request at a time
//! (a buffered loop device, synchronous FUSE direct I/O, a one-request
//! client) never gets there: the server gives up holding after 30 s and
//! the test fails on the count. fio verifies every block it wrote.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cdm_e2e::*;
use nbd_proto::codec::*;

const SIZE: u64 = 64 << 20;
/// Writes outstanding at once before the server answers any.
const TARGET: usize = 16;
/// How long the server holds replies before it gives up (the client's
/// own timeout is 60 s).
const HOLD: Duration = Duration::from_secs(30);

type Reply = (Arc<Mutex<UnixStream>>, u64);

#[derive(Default)]
struct Gate {
    held: Vec<Reply>,
    open: bool,
    gave_up: bool,
    most: usize,
}

struct Server {
    data: Mutex<Vec<u8>>,
    gate: Mutex<Gate>,
    first_write: Mutex<Option<Instant>>,
    wake: Condvar,
}

fn reply(w: &Mutex<UnixStream>, cookie: u64) {
    let _ = w
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .write_all(&simple_reply(0, cookie));
}

impl Server {
    /// A write is stored; its reply waits for the gate.
    fn held(&self, r: Reply) {
        self.first_write
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        let mut g = self.gate.lock().unwrap();
        if g.open {
            drop(g);
            return reply(&r.0, r.1);
        }
        g.held.push(r);
        g.most = g.most.max(g.held.len());
        if g.held.len() >= TARGET {
            g.open = true;
            for (w, c) in g.held.drain(..) {
                reply(&w, c);
            }
        }
        self.wake.notify_all();
    }

    /// Opens the gate after HOLD if the writes never got to TARGET (so
    /// the test ends and reports instead of hanging).
    fn watchdog(self: Arc<Self>) {
        let mut g = self.gate.lock().unwrap();
        loop {
            if g.open {
                return;
            }
            let since = *self.first_write.lock().unwrap();
            if since.is_some_and(|t| t.elapsed() > HOLD) {
                g.open = true;
                g.gave_up = true;
                for (w, c) in g.held.drain(..) {
                    reply(&w, c);
                }
                return;
            }
            g = self
                .wake
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    fn serve(self: Arc<Self>, mut s: UnixStream) {
        if handshake(&mut s).is_err() {
            return;
        }
        let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
        loop {
            let mut h = [0u8; 28];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let Ok(q) = parse_request(&h, false) else {
                return;
            };
            let mut p = vec![0u8; q.payload as usize];
            if s.read_exact(&mut p).is_err() {
                return;
            }
            let (off, len) = (q.offset as usize, q.length as usize);
            match q.typ {
                CMD_READ => {
                    let d = self.data.lock().unwrap()[off..off + len].to_vec();
                    let mut w = w.lock().unwrap();
                    let _ = w.write_all(&simple_reply(0, q.cookie));
                    let _ = w.write_all(&d);
                }
                CMD_WRITE => {
                    self.data.lock().unwrap()[off..off + len].copy_from_slice(&p);
                    self.held((w.clone(), q.cookie));
                }
                CMD_WRITE_ZEROES | CMD_TRIM => {
                    self.data.lock().unwrap()[off..off + len].fill(0);
                    reply(&w, q.cookie);
                }
                CMD_DISC => return,
                _ => reply(&w, q.cookie),
            }
        }
    }
}

/// Fixed newstyle, no structured replies, one export of SIZE bytes with
/// CAN_MULTI_CONN.
fn handshake(s: &mut UnixStream) -> std::io::Result<()> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let o = parse_opt_header(&h).map_err(std::io::Error::other)?;
        let mut d = vec![0u8; o.length as usize];
        s.read_exact(&mut d)?;
        if o.option == OPT_GO {
            let flags = TF_HAS_FLAGS
                | TF_SEND_FLUSH
                | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES
                | TF_CAN_MULTI_CONN;
            s.write_all(&encode_opt_reply(
                OPT_GO,
                REP_INFO,
                &info_export(SIZE, flags),
            ))?;
            return s.write_all(&encode_opt_reply(OPT_GO, REP_ACK, &[]));
        }
        s.write_all(&encode_opt_reply(o.option, REP_ERR_UNSUP, &[]))?;
    }
}

/// Detaches the loop device and unmounts the FUSE file even when the test
/// fails half-way (serve-disk then exits by itself).
struct Cleanup {
    fuse: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let disk = self.fuse.join("disk");
        if let Ok(o) = Command::new("losetup")
            .args(["-j"])
            .arg(&disk)
            .args(["-n", "-O", "NAME"])
            .output()
        {
            for dev in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
        if is_mounted(&self.fuse) {
            let _ = Command::new("umount").arg(&self.fuse).status();
        }
    }
}

fn is_mounted(p: &Path) -> bool {
    let p = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

#[test]
fn attachment_keeps_many_requests_in_flight() {
    require("fio");
    require("losetup");
    let dir = tempfile::Builder::new()
        .prefix("cdm-attach-io-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let srv = Arc::new(Server {
        data: Mutex::new(vec![0u8; SIZE as usize]),
        gate: Mutex::new(Gate::default()),
        first_write: Mutex::new(None),
        wake: Condvar::new(),
    });
    let l = UnixListener::bind(&sock).unwrap();
    {
        let srv = srv.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let srv = srv.clone();
                std::thread::spawn(move || srv.serve(s));
            }
        });
    }
    let watchdog = {
        let srv = srv.clone();
        std::thread::spawn(move || srv.watchdog())
    };
    let fuse = dir.path().join("fuse");
    let status = dir.path().join("status");
    let _cleanup = Cleanup { fuse: fuse.clone() };
    let mut child = Command::new(bin("cdm-agent"))
        .arg("--nbd")
        .arg(format!("unix:{}", sock.display()))
        .args(["serve-disk", "--export", "", "--dir"])
        .arg(&fuse)
        .arg("--status")
        .arg(&status)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for(60, "the FUSE file", || {
        (is_mounted(&fuse) && fuse.join("disk").exists()).then_some(())
    });
    let dev = run(Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(fuse.join("disk")))
    .trim()
    .to_string();
    let dio = std::fs::read_to_string(format!(
        "/sys/block/{}/loop/dio",
        dev.trim_start_matches("/dev/")
    ))
    .unwrap();
    let fio = output(Command::new("fio").args([
        "--name=qd32",
        &format!("--filename={dev}"),
        "--rw=randwrite",
        "--bs=4k",
        "--ioengine=libaio",
        "--iodepth=32",
        "--direct=1",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
    ]));
    // Ends the watchdog (if the writes never came, fio's failure says why).
    srv.gate.lock().unwrap().open = true;
    let _ = run(Command::new("losetup").args(["-d", &dev]));
    let _ = run(Command::new("umount").arg(&fuse));
    let st = child.wait().unwrap();
    watchdog.join().unwrap();
    let g = srv.gate.lock().unwrap();
    assert!(
        fio.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&fio.stdout),
        String::from_utf8_lossy(&fio.stderr)
    );
    assert_eq!(dio.trim(), "1", "the loop device took direct I/O");
    assert!(
        !g.gave_up && g.most >= TARGET,
        "at most {} writes were in flight at once (wanted {TARGET})",
        g.most
    );
    assert!(st.success(), "serve-disk: {st}");
    assert_eq!(std::fs::read_to_string(&status).unwrap(), "ok");
}
