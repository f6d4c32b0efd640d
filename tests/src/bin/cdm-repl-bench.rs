//! `cdm-repl-bench`: replication's figures (docs/benchmarks.md,
//! `scripts/bench-replication`), with real snapshotd instances on this
//! machine over loopback TCP:
//!
//! - bytes on the wire of an incremental transfer against the unique bytes
//!   changed since the base (goal ≤ 1.05×);
//! - throughput of a full initial transfer of an incompressible volume A→B,
//!   side by side with `btrfs send | btrfs receive` of the same data
//!   between two btrfs filesystems on loop devices, the stream relayed
//!   through a TCP socket on 127.0.0.1, and with `nbdcopy` of the whole
//!   volume from A's NBD export to a volume of B over TCP; run in turns
//!   (cdm, btrfs, nbdcopy, cdm, …) and the ratios taken round by round;
//! - resume overhead after the receiver is killed mid-stream: the bytes
//!   sent in all beyond an uncut transfer (goal ≤ one batch).
//!
//! Usage: `cdm-repl-bench [--size-mib N] [--rounds R] [--change-mib M]
//! [--only full|incremental|resume]` (defaults 1024, 3, 64, all three).
//! Needs root (loop devices, btrfs).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cdm_e2e::{random_bytes, run, Appliance};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 65536;
/// Blocks in one batch (docs/replication.md).
const BATCH_BLOCKS: u64 = 256;

struct Args {
    size_mib: u64,
    rounds: usize,
    change_mib: u64,
    /// `--only full|incremental|resume`: one part of the benchmark.
    only: Option<String>,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

fn args() -> Result<Args> {
    let mut a = Args {
        size_mib: 1024,
        rounds: 3,
        change_mib: 64,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        if k == "--only" {
            ensure!(
                ["full", "incremental", "resume"].contains(&v.as_str()),
                "--only full|incremental|resume"
            );
            a.only = Some(v);
            continue;
        }
        let v: u64 = v.parse().with_context(|| format!("{k}: not a number"))?;
        match k.as_str() {
            "--size-mib" => a.size_mib = v,
            "--rounds" => a.rounds = v as usize,
            "--change-mib" => a.change_mib = v,
            _ => bail!("unknown argument {k}"),
        }
    }
    ensure!(
        a.rounds > 0 && a.size_mib >= 64,
        "--rounds ≥ 1, --size-mib ≥ 64"
    );
    ensure!(
        a.change_mib > 0 && a.change_mib * 4 <= a.size_mib,
        "--change-mib from 1 to a quarter of --size-mib"
    );
    Ok(a)
}

/// An appliance of the benchmark: NBD on TCP too (for nbdcopy), a
/// replication listener, the admin's token. Its data directory lives
/// outside the [`Appliance`]: a restart is a new one on the same data with
/// the replication port of the first start (the peers have it on record).
struct Node {
    app: Appliance,
    name: String,
    token: String,
    args: Vec<String>,
    work: tempfile::TempDir,
}

impl Node {
    fn start(name: &str) -> Result<Node> {
        let work = tempfile::Builder::new()
            .prefix("cdm-repl-bench-")
            .tempdir_in("/var/tmp")?;
        let mut args: Vec<String> = [
            "--pool-size",
            "8G",
            "--pool-sparse",
            "--name",
            name,
            "--nbd",
            "127.0.0.1:0",
            "--replication",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let app = Node::launch(&work, &args);
        let ready = ready(&app)?;
        let last = args.len() - 1;
        args[last] = ready["replication"]
            .as_str()
            .with_context(|| format!("no replication listener: {ready}"))?
            .to_string();
        let token = app.admin_token();
        Ok(Node {
            app,
            name: name.to_string(),
            token,
            args,
            work,
        })
    }

    fn launch(work: &tempfile::TempDir, args: &[String]) -> Appliance {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        Appliance::start_with(
            Some("scheduler_tick_ms = 100\n"),
            Some(&work.path().join("data")),
            &a,
        )
    }

    /// SIGKILL, then a start on the same data.
    fn kill_restart(&mut self) {
        self.app.kill();
        self.app = Node::launch(&self.work, &self.args);
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let req = ureq::request(method, &format!("{}{path}", self.app.url()))
            .set("Authorization", &format!("Bearer {}", self.token))
            .timeout(Duration::from_secs(600));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let (st, r) = match res {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(s, r)) => (s, r),
            Err(e) => bail!("{} {method} {path}: {e}", self.name),
        };
        let text = r.into_string().unwrap_or_default();
        Ok((st, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (st, v) = self.call(method, path, body)?;
        ensure!(
            (200..300).contains(&st),
            "{}: {method} {path}: {st} {v}",
            self.name
        );
        Ok(v)
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` from the ready file's TCP listener.
    fn nbd_tcp(&self, export: &str) -> Result<String> {
        let v = ready(&self.app)?;
        let addr = v["nbd"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .find(|a| a.starts_with("127.0.0.1:"))
            .with_context(|| format!("no TCP NBD listener: {v}"))?;
        Ok(format!("nbd://{addr}/{export}"))
    }

    fn volume(&self, name: &str, size: u64) -> Result<()> {
        self.ok(
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size": size, "block_size": BLOCK, "dedup": true})),
        )?;
        Ok(())
    }

    /// Writes seeded random data: MiB `i` of the span gets seed `seed + i`.
    fn fill(&self, vol: &str, off: u64, len: u64, seed: u64) -> Result<()> {
        let mut c = self.app.nbd(vol);
        for i in 0..len.div_ceil(MIB) {
            let n = (len - i * MIB).min(MIB) as usize;
            c.write(off + i * MIB, &random_bytes(n, seed + i), false)
                .with_context(|| format!("NBD write to {vol}"))?;
        }
        c.flush()?;
        c.disconnect()?;
        Ok(())
    }

    fn snapshot(&self, vol: &str, label: &str) -> Result<u64> {
        let v = self.ok(
            "POST",
            &format!("/v1/volumes/{vol}/snapshots"),
            Some(json!({"label": label})),
        )?;
        v["id"].as_u64().context("snapshot id")
    }

    /// Starts a run of link `id`, or takes the one that runs already (a
    /// link may start one by itself when made); the job's id.
    fn start_run(&self, id: u64) -> Result<u64> {
        loop {
            let (st, v) = self.call("POST", &format!("/v1/replication/links/{id}/run"), None)?;
            match st {
                202 => return v["id"].as_u64().context("job id"),
                409 => {
                    let r = self.ok("GET", "/v1/jobs?kind=replicate&state=running", None)?;
                    if let Some(j) = r
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|j| j["id"].as_u64())
                        .max()
                    {
                        return Ok(j);
                    }
                    // Ended between the two calls: ask again.
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => bail!("run of link {id}: {st} {v}"),
            }
        }
    }

    /// Runs link `id` to its end; the job.
    fn run_link(&self, id: u64) -> Result<Value> {
        let job = self.start_run(id)?;
        self.wait_job(job)
    }

    fn wait_job(&self, job: u64) -> Result<Value> {
        loop {
            let j = self.ok("GET", &format!("/v1/jobs/{job}"), None)?;
            if matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return Ok(j);
            }
            // Polling period: the figure's resolution, 20 ms.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn transfers(&self, link: u64) -> Result<Vec<Value>> {
        let v = self.ok(
            "GET",
            &format!("/v1/replication/links/{link}/transfers"),
            None,
        )?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// The ready file of a running snapshotd.
fn ready(app: &Appliance) -> Result<Value> {
    let p = app.dir.path().join("snapshotd.ready");
    Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
}

/// `src` pairs with `dst` (token on `dst`).
fn pair(src: &Node, dst: &Node) -> Result<()> {
    let t = dst.ok(
        "POST",
        "/v1/replication/pairings",
        Some(json!({"ttl_seconds": 600})),
    )?;
    src.ok(
        "POST",
        "/v1/replication/peers",
        Some(json!({"name": dst.name, "url": dst.app.https_url(), "token": t["token"]})),
    )?;
    Ok(())
}

fn link(src: &Node, vol: &str, peer: &str, extra: Value) -> Result<u64> {
    let mut body = json!({"volume": vol, "peer": peer});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let v = src.ok("POST", "/v1/replication/links", Some(body))?;
    v["id"].as_u64().context("link id")
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// One full transfer of A's `vol` to a new appliance (paired first);
/// seconds from the link's creation to its job's end.
fn cdm_full(a: &Node, vol: &str, round: usize) -> Result<f64> {
    let b = Node::start(&format!("B{round}"))?;
    pair(a, &b)?;
    let t = Instant::now();
    let l = link(a, vol, &b.name, json!({}))?;
    let j = a.run_link(l)?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(j["state"] == "succeeded", "full transfer: {j}");
    a.ok("DELETE", &format!("/v1/replication/links/{l}"), None)?;
    a.ok("DELETE", &format!("/v1/replication/peers/{}", b.name), None)?;
    Ok(secs)
}

/// `nbdcopy` of A's point to a new volume of `b` over TCP, flushed; seconds.
fn nbdcopy(a: &Node, export: &str, b: &Node, size: u64, round: usize) -> Result<f64> {
    let dst = format!("copy{round}");
    b.volume(&dst, size)?;
    let (from, to) = (a.nbd_tcp(export)?, b.nbd_tcp(&dst)?);
    let t = Instant::now();
    run(Command::new("nbdcopy").args(["--flush", &from, &to]));
    let secs = t.elapsed().as_secs_f64();
    b.ok("DELETE", &format!("/v1/volumes/{dst}"), None)?;
    Ok(secs)
}

/// Two btrfs filesystems on loop devices (`mount -o loop`); the source
/// holds the same data as the volume in a read-only snapshot `snap`.
struct Btrfs {
    dirs: Vec<PathBuf>,
    _work: tempfile::TempDir,
}

/// `mkfs.btrfs` checks that no mounted filesystem holds the image and stops
/// at a mount it cannot stat (a FUSE mount whose daemon died, which a
/// crashed test leaves behind): it runs in a private mount namespace where
/// such dead mounts are detached; the image is then mounted as usual.
const MKFS: &str = r#"for m in $(awk '$3 ~ /fuse/ {print $2}' /proc/mounts); do
  stat -t "$m" >/dev/null 2>&1 || umount -l "$m"
done
exec mkfs.btrfs -q -f "$1""#;

impl Btrfs {
    fn new(size: u64, seed: u64) -> Result<Btrfs> {
        let work = tempfile::Builder::new()
            .prefix("cdm-repl-bench-")
            .tempdir_in("/var/tmp")?;
        let mut b = Btrfs {
            dirs: Vec::new(),
            _work: work,
        };
        for i in 0..2 {
            let img = b._work.path().join(format!("fs{i}.img"));
            std::fs::File::create(&img)?.set_len(size * 2 + 512 * MIB)?;
            run(Command::new("unshare")
                .args(["-m", "--propagation", "private", "sh", "-c", MKFS, "mkfs"])
                .arg(&img));
            let mnt = b._work.path().join(format!("m{i}"));
            std::fs::create_dir(&mnt)?;
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
            b.dirs.push(mnt);
        }
        let src = b.dirs[0].join("src");
        run(Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&src));
        let mut f = std::fs::File::create(src.join("data"))?;
        for i in 0..size / MIB {
            f.write_all(&random_bytes(MIB as usize, seed + i))?;
        }
        f.sync_all()?;
        run(Command::new("btrfs")
            .args(["-q", "subvolume", "snapshot", "-r"])
            .arg(&src)
            .arg(b.dirs[0].join("snap")));
        run(Command::new("sync").arg("-f").arg(&b.dirs[0]));
        Ok(b)
    }

    /// `btrfs send` → TCP 127.0.0.1 → `btrfs receive`, then the target
    /// filesystem synced (the replication's batches are flushed too);
    /// seconds and the stream's bytes.
    fn send_receive(&self) -> Result<(f64, u64)> {
        let got = self.dirs[1].join("snap");
        if got.exists() {
            run(Command::new("btrfs")
                .args(["-q", "subvolume", "delete"])
                .arg(&got));
            run(Command::new("sync").arg("-f").arg(&self.dirs[1]));
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let t = Instant::now();
        let mut recv = Command::new("btrfs")
            .args(["-q", "receive"])
            .arg(&self.dirs[1])
            .stdin(Stdio::piped())
            .spawn()?;
        let mut recv_in = recv.stdin.take().context("receive's stdin")?;
        let relay = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let n = std::io::copy(&mut s, &mut recv_in)?;
            Ok(n)
        });
        let mut send = Command::new("btrfs")
            .args(["-q", "send"])
            .arg(self.dirs[0].join("snap"))
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = send.stdout.take().context("send's stdout")?;
        let mut sock = TcpStream::connect(addr)?;
        std::io::copy(&mut out, &mut sock)?;
        drop(sock);
        ensure!(send.wait()?.success(), "btrfs send failed");
        let n = relay
            .join()
            .map_err(|_| anyhow::anyhow!("relay panicked"))??;
        ensure!(recv.wait()?.success(), "btrfs receive failed");
        run(Command::new("sync").arg("-f").arg(&self.dirs[1]));
        Ok((t.elapsed().as_secs_f64(), n))
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        // The loop device goes with the mount (autoclear).
        for d in &self.dirs {
            let _ = Command::new("umount").arg(d).status();
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// Incremental: the volume replicated once, then `change` bytes of new
/// random data in whole blocks spread over it, then the next transfer.
fn incremental(a: &Node, vol: &str, size: u64, change: u64) -> Result<(u64, u64, u64)> {
    let b = Node::start("Binc")?;
    pair(a, &b)?;
    let l = link(a, vol, &b.name, json!({}))?;
    let j = a.run_link(l)?;
    ensure!(j["state"] == "succeeded", "first transfer: {j}");
    // 256 KiB of new data at block boundaries spread evenly, none over
    // another: every byte written is a unique changed byte.
    let piece = 256 * 1024;
    let stride = size / (change / piece) / BLOCK * BLOCK;
    ensure!(stride >= piece, "--change-mib too large for --size-mib");
    let mut c = a.app.nbd(vol);
    let (mut written, mut i) = (0u64, 0u64);
    while written < change {
        let off = i * stride;
        c.write(off, &random_bytes(256 * 1024, 9_000_000 + i), false)?;
        written += 256 * 1024;
        i += 1;
    }
    c.flush()?;
    c.disconnect()?;
    a.snapshot(vol, "changed")?;
    let j = a.run_link(l)?;
    ensure!(j["state"] == "succeeded", "incremental transfer: {j}");
    let t = a.transfers(l)?;
    let r = t.first().context("a transfer record")?;
    ensure!(r["full"] == false, "not incremental: {r}");
    a.ok("DELETE", &format!("/v1/replication/links/{l}"), None)?;
    Ok((written, num(r, "bytes_sent"), num(r, "bytes_logical")))
}

/// Resume overhead: an uncut transfer's bytes, then one cut (the receiver
/// killed after half the batches) and the resumed run: re-sent bytes.
fn resume(a: &Node, vol: &str, size: u64) -> Result<(u64, u64, u64)> {
    let mut b = Node::start("Bres")?;
    pair(a, &b)?;
    let l = link(a, vol, &b.name, json!({"bandwidth_mibps": 64}))?;
    let job = a.start_run(l)?;
    loop {
        let j = a.ok("GET", &format!("/v1/jobs/{job}"), None)?;
        ensure!(j["state"] == "running", "the run ended before the cut: {j}");
        if num(&j, "done") >= size / 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    b.app.kill();
    let j = a.wait_job(job)?;
    ensure!(j["state"] == "failed", "cut run: {j}");
    b.kill_restart();
    let j = a.run_link(l)?;
    ensure!(j["state"] == "succeeded", "resumed run: {j}");
    let t = a.transfers(l)?;
    for r in &t {
        eprintln!(
            "resume: {} full={} base={} from={} sent={} {}",
            r["result"],
            r["full"],
            r["base"],
            r["resumed_from_batch"],
            r["bytes_sent"],
            r["message"]
        );
    }
    let total: u64 = t.iter().map(|r| num(r, "bytes_sent")).sum();
    // The full point's record (the second point is sent after it, whole).
    let resumed = t
        .iter()
        .find_map(|r| r["resumed_from_batch"].as_u64())
        .context("no record of the resumed run has resumed_from_batch")?;
    Ok((total, resumed, t.len() as u64))
}

fn main() -> Result<()> {
    let args = args()?;
    // SAFETY: a plain query of this process's identity.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (loop devices, btrfs)"
    );
    let size = args.size_mib * MIB;
    let seed = 31337;
    eprintln!("setting up: {} MiB of random data on A", args.size_mib);
    let a = Node::start("A")?;
    a.volume("v", size)?;
    a.fill("v", 0, size, seed)?;
    let snap = a.snapshot("v", "full")?;
    println!(
        "## Replication (issue 16): {} MiB of random data, {} KiB blocks, loopback\n",
        args.size_mib,
        BLOCK / 1024
    );
    if args.runs("full") {
        full_rounds(&a, &args, snap, seed)?;
    }
    if args.runs("incremental") {
        let change = args.change_mib * MIB;
        let (written, sent, logical) = incremental(&a, "v", size, change)?;
        println!("### Incremental transfer\n");
        println!("| unique bytes changed | changed blocks' bytes (`bytes_logical`) | bytes on the wire | wire / changed (goal ≤ 1.05) |");
        println!("|---|---|---|---|");
        println!(
            "| {written} | {logical} | {sent} | {:.3} |\n",
            sent as f64 / written as f64
        );
    }
    if args.runs("resume") {
        resume_round(&a, size)?;
    }
    Ok(())
}

/// Full initial transfers side by side with btrfs send/receive and
/// nbdcopy, in turns; prints their table.
fn full_rounds(a: &Node, args: &Args, snap: u64, seed: u64) -> Result<()> {
    let size = args.size_mib * MIB;
    eprintln!("setting up: the same data on btrfs");
    let fs = Btrfs::new(size, seed)?;
    let sink = Node::start("Bcopy")?;
    let (mut cdm, mut btr, mut nbd) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let mut stream = 0;
    for r in 0..args.rounds {
        let c = cdm_full(a, "v", r)?;
        let (b, n) = fs.send_receive()?;
        stream = n;
        let d = nbdcopy(a, &format!("v@{snap}"), &sink, size, r)?;
        eprintln!("round {r}: cdm {c:.2} s, btrfs {b:.2} s, nbdcopy {d:.2} s");
        rows.push(format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            r + 1,
            c,
            b,
            d,
            c / b,
            c / d
        ));
        cdm.push(c);
        btr.push(b);
        nbd.push(d);
    }
    let mibs = |s: f64| args.size_mib as f64 / s;
    println!("### Full initial transfer (wall seconds; ratios round by round)\n");
    println!("| round | cdm A→B | btrfs send \\| receive over TCP | nbdcopy over NBD/TCP | cdm / btrfs | cdm / nbdcopy |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    let ratios =
        |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(a, b)| a / b).collect() };
    println!(
        "| median | {:.2} ({:.0} MiB/s) | {:.2} ({:.0} MiB/s) | {:.2} ({:.0} MiB/s) | {:.2} | {:.2} |\n",
        median(&cdm),
        mibs(median(&cdm)),
        median(&btr),
        mibs(median(&btr)),
        median(&nbd),
        mibs(median(&nbd)),
        median(&ratios(&cdm, &btr)),
        median(&ratios(&cdm, &nbd)),
    );
    println!("btrfs stream: {stream} bytes.\n");
    Ok(())
}

/// The cut transfer and its uncut reference both send every point of the
/// volume (the full one, and the changed one if the incremental part ran)
/// to a new target; prints the re-sent bytes against one batch.
fn resume_round(a: &Node, size: u64) -> Result<()> {
    let (total, from, records) = resume(a, "v", size)?;
    let batch = BATCH_BLOCKS * BLOCK;
    let refs = {
        let b = Node::start("Bref2")?;
        pair(a, &b)?;
        let l = link(a, "v", &b.name, json!({}))?;
        let j = a.run_link(l)?;
        ensure!(j["state"] == "succeeded", "reference transfer: {j}");
        a.transfers(l)?
            .iter()
            .map(|r| num(r, "bytes_sent"))
            .sum::<u64>()
    };
    let extra = total.saturating_sub(refs);
    println!("### Resume after the receiver is killed mid-stream\n");
    println!("| bytes sent uncut | bytes sent with one cut ({records} records) | resumed from batch | re-sent | one batch (goal: re-sent ≤ it) |");
    println!("|---|---|---|---|---|");
    println!("| {refs} | {total} | {from} | {extra} | {batch} |");
    Ok(())
}
