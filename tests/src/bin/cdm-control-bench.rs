//! `cdm-control-bench`: the control plane's figures (docs/benchmarks.md,
//! `scripts/bench-control`). A real snapshotd on a fake clock; N simulated
//! hosts, each a thread that enrols with its own token, reports M
//! discovered applications in its heartbeats and speaks the agent protocol
//! (long-poll pull, finish) exactly as `cdm-agent serve` does, but finishes
//! every job at once — so what is measured is the appliance: its scheduler,
//! queue, dispatch and state store.
//!
//! Figures: the time to register the applications and assign the policy;
//! after one policy interval passes on the fake clock, how long until every
//! backup job was handed out (the scheduling latency, p50/p99/max) and how
//! many jobs per second were dispatched and finished; a heartbeat's latency
//! and the CPU time snapshotd spends per heartbeat.
//!
//! Usage: `cdm-control-bench [--hosts N] [--apps-per-host M] [--max-jobs J]`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cdm_e2e::{Appliance, FAST_CONFIG};
use serde_json::{json, Value};

struct Args {
    hosts: usize,
    apps: usize,
    max_jobs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        hosts: 100,
        apps: 10,
        max_jobs: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v: usize = it
            .next()
            .with_context(|| format!("{k} needs a value"))?
            .parse()
            .with_context(|| format!("{k}: not a number"))?;
        match k.as_str() {
            "--hosts" => a.hosts = v,
            "--apps-per-host" => a.apps = v,
            "--max-jobs" => a.max_jobs = v,
            _ => bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

/// One HTTP call; the status and the JSON body (Null if none).
fn call(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let req = ureq::request(method, &format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(120));
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let (st, r) = match res {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(s, r)) => (s, r),
        Err(e) => bail!("{method} {path}: {e}"),
    };
    let text = r.into_string().unwrap_or_default();
    Ok((st, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn ok(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let (st, v) = call(base, token, method, path, body)?;
    if !(200..300).contains(&st) {
        bail!("{method} {path}: {st} {v}");
    }
    Ok(v)
}

struct Host {
    name: String,
    credential: String,
    apps: Vec<Value>,
}

impl Host {
    fn heartbeat(&self, base: &str, first: bool) -> Result<()> {
        ok(
            base,
            &self.credential,
            "POST",
            "/v1/agent/heartbeat",
            Some(json!({
                "version": "bench", "os": "bench", "hostname": self.name,
                "capabilities": ["files"], "running": [], "first": first,
                "applications": self.apps,
            })),
        )?;
        Ok(())
    }
}

fn enrol(base: &str, admin: &str, i: usize, apps: usize) -> Result<Host> {
    let name = format!("sim-{i:03}");
    let t = ok(
        base,
        admin,
        "POST",
        "/v1/hosts/enrolments",
        Some(json!({"name": name})),
    )?;
    let token = t["token"].as_str().context("enrolment token")?;
    let e = ok(
        base,
        "",
        "POST",
        "/v1/agent/enrol",
        Some(json!({"token": token, "hostname": name, "version": "bench", "os": "bench"})),
    )?;
    let apps = (0..apps)
        .map(|j| json!({"kind": "files", "name": format!("tree-{j}"), "config": {"path": format!("/srv/{j}")}, "size_bytes": 1u64 << 30}))
        .collect();
    Ok(Host {
        name,
        credential: e["credential"].as_str().context("credential")?.to_string(),
        apps,
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}

fn main() -> Result<()> {
    let a = args()?;
    let app = Appliance::start_with(
        Some(FAST_CONFIG),
        None,
        &[
            "--pool-size",
            "4G",
            "--pool-sparse",
            "--max-jobs",
            &a.max_jobs.to_string(),
            "--max-jobs-per-host",
            "2",
        ],
    );
    let base = app.url();
    let admin = app.admin_token();

    let t = Instant::now();
    let hosts: Vec<Host> = (0..a.hosts)
        .map(|i| enrol(&base, &admin, i, a.apps))
        .collect::<Result<_>>()?;
    let enrol_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for h in &hosts {
        h.heartbeat(&base, true)?;
    }
    let first_hb_s = t.elapsed().as_secs_f64();
    let list = ok(&base, &admin, "GET", "/v1/applications", None)?;
    let ids: Vec<u64> = list
        .as_array()
        .context("applications")?
        .iter()
        .filter_map(|x| x["id"].as_u64())
        .collect();
    if ids.len() != a.hosts * a.apps {
        bail!(
            "{} applications registered, {} expected",
            ids.len(),
            a.hosts * a.apps
        );
    }
    ok(
        &base,
        &admin,
        "POST",
        "/v1/protection-policies",
        Some(json!({"name": "bench", "interval_seconds": 3600, "rpo_seconds": 7200})),
    )?;
    let t = Instant::now();
    for id in &ids {
        ok(
            &base,
            &admin,
            "PUT",
            &format!("/v1/applications/{id}/policy"),
            Some(json!({"policy": "bench"})),
        )?;
    }
    let assign_s = t.elapsed().as_secs_f64();
    // Whatever assignment queued at once is drained before the measure.
    let settle = |what: &str| -> Result<()> {
        let t = Instant::now();
        loop {
            let q = ok(&base, &admin, "GET", "/v1/jobs?state=queued", None)?;
            let r = ok(&base, &admin, "GET", "/v1/jobs?state=running", None)?;
            let n = q.as_array().map_or(0, Vec::len) + r.as_array().map_or(0, Vec::len);
            if n == 0 {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("{what}: {n} jobs still queued or running");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // The simulated agents: heartbeat every second, pull, finish at once.
    let stop = Arc::new(AtomicBool::new(false));
    let dispatched: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let finished = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    let hosts = Arc::new(hosts);
    for i in 0..hosts.len() {
        let (hosts, base, stop, dispatched, finished) = (
            hosts.clone(),
            base.clone(),
            stop.clone(),
            dispatched.clone(),
            finished.clone(),
        );
        threads.push(std::thread::spawn(move || -> Result<()> {
            let h = &hosts[i];
            let mut beat = Instant::now() - Duration::from_secs(2);
            while !stop.load(Ordering::Relaxed) {
                if beat.elapsed() >= Duration::from_secs(1) {
                    h.heartbeat(&base, false)?;
                    beat = Instant::now();
                }
                let jobs = ok(&base, &h.credential, "GET", "/v1/agent/jobs?wait=1", None)?;
                for j in jobs.as_array().cloned().unwrap_or_default() {
                    dispatched.lock().unwrap().push(Instant::now());
                    let id = j["id"].as_u64().context("job id")?;
                    ok(
                        &base,
                        &h.credential,
                        "POST",
                        &format!("/v1/agent/jobs/{id}/finish"),
                        Some(json!({"state": "succeeded", "result": {"bench": true}})),
                    )?;
                    finished.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    settle("after assignment")?;
    dispatched.lock().unwrap().clear();
    finished.store(0, Ordering::Relaxed);

    let want = ids.len();
    let t0 = Instant::now();
    ok(
        &base,
        &admin,
        "POST",
        "/v1/clock",
        Some(json!({"advance_secs": 3600})),
    )?;
    while finished.load(Ordering::Relaxed) < want {
        if t0.elapsed() > Duration::from_secs(900) {
            bail!(
                "only {} of {want} jobs finished",
                finished.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_s = t0.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = dispatched
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.duration_since(t0).as_secs_f64())
        .collect();

    // Heartbeat cost, with the agents pulling as usual.
    let pid = app.pid();
    let n_hb = 2000;
    let cpu0 = cpu_secs(pid);
    let t = Instant::now();
    let mut hb = Vec::with_capacity(n_hb);
    for k in 0..n_hb {
        let s = Instant::now();
        hosts[k % hosts.len()].heartbeat(&base, false)?;
        hb.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let hb_wall = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a host thread panicked"))??;
    }

    println!("| figure | value |\n|---|---|");
    println!(
        "| simulated hosts × applications | {} × {} = {want} |",
        a.hosts, a.apps
    );
    println!(
        "| appliance job limit (`--max-jobs`, per host 2) | {} |",
        a.max_jobs
    );
    println!("| enrol {} hosts (one by one) | {enrol_s:.2} s |", a.hosts);
    println!("| first heartbeats registering {want} applications | {first_hb_s:.2} s |");
    println!(
        "| assign the policy to {want} applications (one PUT each) | {assign_s:.2} s ({:.0}/s) |",
        want as f64 / assign_s
    );
    println!("| {want} scheduled backups: all dispatched and finished | {all_s:.2} s |");
    println!(
        "| jobs dispatched and finished per second | {:.0} |",
        want as f64 / all_s
    );
    println!("| scheduling latency (clock moved → job handed out) p50 / p99 / max | {:.2} / {:.2} / {:.2} s |", pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
    println!(
        "| heartbeat ({} applications each) p50 / p99 | {:.2} / {:.2} ms |",
        a.apps,
        pct(&mut hb, 0.5),
        pct(&mut hb, 0.99)
    );
    println!(
        "| snapshotd CPU per heartbeat (while {} hosts poll) | {:.2} ms |",
        a.hosts,
        cpu * 1e3 / n_hb as f64
    );
    println!(
        "| heartbeats per second, one client | {:.0} |",
        n_hb as f64 / hb_wall
    );
    Ok(())
}
