//! `cdm-vm-recovery-bench`: instant VM recovery's figure (docs/benchmarks.md,
//! `scripts/bench-vm-recovery`). A bootable test guest (tests/src/guest.rs)
//! of each size is backed up to a real appliance; then, A B A B in one run:
//! A = `POST /v1/vms/NAME/recoveries` until the guest's marker is on its
//! serial console (clones made, qemu started over NBD, the guest booted);
//! B = the same qemu command booting the source image straight from its
//! local file (the peer: no appliance in the path). The ratio is A / B.
//!
//! Usage: `cdm-vm-recovery-bench [--sizes-gib 1,8] [--rounds N] [--accel tcg|kvm]`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cdm_e2e::guest::{self, GuestSpec};
use cdm_e2e::{AgentCli, Api, Appliance};
use serde_json::{json, Value};

fn arg(name: &str, default: &str) -> String {
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == name {
            return it.next().unwrap_or_default();
        }
    }
    default.to_string()
}

fn wait<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            bail!("{what}: not after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A: the appliance's instant recovery, request to marker.
fn recover(api: &Api, vm: &str, accel: &str) -> Result<f64> {
    let t = Instant::now();
    let (s, j) = api.call(
        "POST",
        &format!("/v1/vms/{vm}/recoveries"),
        Some(json!({"accel": accel})),
    );
    if s != 202 {
        bail!("recovery refused: {s} {j}");
    }
    let id = j["id"].as_u64().context("job id")?;
    let j = wait(300, "the recovery job", || {
        let (_, j) = api.call("GET", &format!("/v1/jobs/{id}"), None);
        (j["state"] != "running" && j["state"] != "queued").then_some(j)
    })?;
    let rec = j["result"]["recovery"]
        .as_str()
        .context("recovery name")?
        .to_string();
    wait(300, "the marker", || {
        let (_, c) = api.call("GET", &format!("/v1/vm-recoveries/{rec}/console"), None);
        c.as_str()
            .is_some_and(|c| c.contains("CDM-GUEST-MARKER"))
            .then_some(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    let (s, v) = api.call("DELETE", &format!("/v1/vm-recoveries/{rec}"), None);
    if s != 200 {
        bail!("stop: {s} {v}");
    }
    Ok(secs)
}

/// B: the same boot from the local image file.
fn local(img: &std::path::Path, dir: &std::path::Path, accel: &str) -> Result<f64> {
    let log = dir.join("local-serial.log");
    let _ = std::fs::remove_file(&log);
    let t = Instant::now();
    let mut q = Command::new(guest::qemu_system())
        .args([
            "-machine",
            &format!("pc,accel={accel}"),
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=none",
            img.display()
        ))
        .args(["-nic", "none"])
        .spawn()?;
    let r = wait(300, "the local marker", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|c| c.contains("CDM-GUEST-MARKER"))
            .map(|_| ())
    });
    let secs = t.elapsed().as_secs_f64();
    let _ = q.kill();
    let _ = q.wait();
    r.map(|_| secs)
}

fn main() -> Result<()> {
    let sizes: Vec<u64> = arg("--sizes-gib", "1,8")
        .split(',')
        .map(|s| s.trim().parse().context("--sizes-gib"))
        .collect::<Result<_>>()?;
    let rounds: usize = arg("--rounds", "3").parse()?;
    let accel = arg("--accel", "tcg");
    let app = Appliance::start(None);
    let token = std::fs::read_to_string(app.data.join("admin.token"))?;
    let api = Api::new(&app, token.trim());
    let agent = AgentCli::new(&app);
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let inv = dir.path().join("inventory");
    std::fs::create_dir(&inv)?;
    let mut images = Vec::new();
    for g in &sizes {
        let name = format!("bench{g}g");
        let img = guest::build_guest(
            dir.path(),
            &name,
            &GuestSpec {
                size: g << 30,
                marker: &name,
                run_script: None,
                files: &[],
            },
        );
        std::fs::write(
            inv.join(format!("{name}.xml")),
            guest::domain_xml(&name, &[&img], 256, 1),
        )?;
        images.push((*g, name, img));
    }
    let t = Instant::now();
    let v: Value = agent.ok(&[
        "vm",
        "backup",
        "--inventory",
        inv.to_str().context("path")?,
        "--category",
        "os:linux",
    ]);
    eprintln!(
        "backup of {} guests: {:.1} s",
        images.len(),
        t.elapsed().as_secs_f64()
    );
    let _ = v;
    println!("| disk (flat, raw) | instant recovery: request → marker | local file boot → marker | ratio |");
    println!("|---|---|---|---|");
    for (g, name, img) in &images {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(recover(&api, name, &accel)?);
            b.push(local(img, dir.path(), &accel)?);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ma, mb) = (med(&mut a), med(&mut b));
        println!(
            "| {g} GiB | {ma:.2} s (runs {:?}) | {mb:.2} s (runs {:?}) | {:.2}× |",
            a.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
            b.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
            ma / mb
        );
    }
    Ok(())
}
