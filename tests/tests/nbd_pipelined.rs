//! The pipelined NBD client (`nbd_proto::Pipelined`, what the agent's
//! attachments use) against three servers: ours (`cdm-nbd`), nbdkit's
//! memory plugin and qemu-nbd over a qcow2. Sixteen threads write stamped
//! data of mixed sizes into their own regions and read it back while the
//! others write, so many requests are in flight on every connection; then
//! a flush, and a separate synchronous connection checks every sector.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cdm_e2e::stamp;
use cdm_e2e::*;
use nbd_proto::codec::TF_CAN_MULTI_CONN;
use nbd_proto::{Client, ClientOptions, Pipelined};
use rand::{Rng, SeedableRng};

const THREADS: u64 = 16;
const REGION: u64 = 4 << 20;
const SECTOR: u64 = stamp::SECTOR as u64;

/// A server process killed when the test ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, sock: &Path, what: &str) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let p = Proc(child);
    wait_for(120, what, || sock.exists().then_some(()));
    p
}

/// One thread's work: `ops` stamped writes (512 B to 256 KiB, sector
/// aligned) at random places of its region, each followed now and then by
/// a read of a random range checked against what the thread wrote there.
/// Returns the generation of every sector of the region (0: never written).
fn worker(c: &Pipelined, tag: u64, t: u64, ops: usize) -> Vec<u64> {
    let base = t * REGION;
    let mut model = vec![0u64; (REGION / SECTOR) as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
    for i in 0..ops {
        let gen = (t << 32) | (i as u64 + 1);
        let sectors = 1u64 << rng.gen_range(0..=9u32);
        let at = rng.gen_range(0..REGION / SECTOR - sectors + 1);
        let off = base + at * SECTOR;
        let data = stamp::random(tag, off, (sectors * SECTOR) as usize, gen);
        c.write(off, &data, i % 17 == 0)
            .unwrap_or_else(|e| panic!("thread {t}: write at {off}: {e}"));
        model[at as usize..(at + sectors) as usize].fill(gen);
        if i % 3 == 0 {
            let n = rng.gen_range(1..=256u64);
            let at = rng.gen_range(0..REGION / SECTOR - n + 1);
            let mut b = vec![0u8; (n * SECTOR) as usize];
            let off = base + at * SECTOR;
            c.read(off, &mut b)
                .unwrap_or_else(|e| panic!("thread {t}: read at {off}: {e}"));
            check(&b, tag, off, &model, base);
        }
    }
    model
}

fn check(buf: &[u8], tag: u64, off: u64, model: &[u64], base: u64) {
    let r = stamp::verify_with(buf, tag, off, stamp::Body::Random, |at| {
        match model[((at - base) / SECTOR) as usize] {
            0 => None,
            g => Some(g),
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The whole exercise against `export` (blank) at `endpoint`; `multi`:
/// whether the server must advertise CAN_MULTI_CONN (`None`: either). Four
/// connections are used when it does, else one.
fn hammer(endpoint: &str, export: &str, multi: Option<bool>) {
    let opts = ClientOptions {
        timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let c = Arc::new(Pipelined::connect(endpoint, Some(export), &opts, 4).expect("connect"));
    let advertised = c.flags & TF_CAN_MULTI_CONN != 0;
    if let Some(m) = multi {
        assert_eq!(advertised, m, "CAN_MULTI_CONN");
    }
    assert_eq!(c.connections(), if advertised { 4 } else { 1 });
    assert!(c.size >= THREADS * REGION, "export of {} bytes", c.size);
    let tag = stamp::tag(endpoint);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || worker(&c, tag, t, 150))
        })
        .collect();
    let models: Vec<Vec<u64>> = threads
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect();
    c.flush().expect("flush");
    drop(c);
    // A fresh connection of the synchronous client sees every write.
    let mut s =
        Client::connect(endpoint, Some(export), &ClientOptions::default()).expect("second client");
    for (t, model) in models.iter().enumerate() {
        let base = t as u64 * REGION;
        let mut b = vec![0u8; REGION as usize];
        s.read(base, &mut b).expect("read back");
        check(&b, tag, base, model, base);
    }
    let _ = s.disconnect();
}

#[test]
fn pipelined_client_against_cdm_nbd() {
    let env = Env::new("1G");
    env.cdmfs(&["volume", "create", "db", "--size", "128M"]);
    env.cdmfs(&["volume", "create", "tcp", "--size", "128M"]);
    let srv = env.serve(&[]);
    hammer(&srv.endpoint(), "db", Some(true));
    // Over TCP too.
    hammer(&format!("127.0.0.1:{}", srv.port), "tcp", Some(true));
    srv.stop();
    env.cdmfs(&["fsck"]);
}

#[test]
fn pipelined_client_against_nbdkit_memory() {
    require("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let _p = spawn(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "128M"]),
        &sock,
        "nbdkit",
    );
    hammer(&format!("unix:{}", sock.display()), "", Some(true));
}

#[test]
fn pipelined_client_against_qemu_nbd() {
    require("qemu-nbd");
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("128M"));
    let sock = dir.path().join("nbd.sock");
    let _p = spawn(
        Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t", "-e", "4", "-k"])
            .arg(&sock)
            .arg(&img),
        &sock,
        "qemu-nbd",
    );
    // Whether qemu-nbd advertises CAN_MULTI_CONN for a writable export
    // depends on its version (and -e): four connections or one, pipelined.
    hammer(&format!("unix:{}", sock.display()), "", None);
}
