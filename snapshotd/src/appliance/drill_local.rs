//! Drills the appliance runs itself, for file trees, block devices and VM
//! disks (`docs/control-plane.md`, "Drills"): a clone of the point (O(1)),
//! seen through the FUSE view (`snapshotd --mount DIR`); each filesystem
//! found checked read-only (`e2fsck -fn`, `xfs_repair -n`) on a read-only
//! loop device over its byte range; the operating system inspected; the
//! file probes read; the point's extents scrubbed; the clone deleted.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdm_api::auth::{Caller, Role};
use cdm_api::drills::*;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use cdm_disk::host;
use cdmfs::Target;
use sha2::{Digest, Sha256};

use super::{st, Appliance};
use crate::control::drills::{add_targets, clone_name, verdict, DrillPlan};

fn admin() -> Caller {
    Caller {
        user: "appliance".into(),
        role: Role::Admin,
        grants: Vec::new(),
        token_id: String::new(),
        token_name: String::new(),
    }
}

fn check(checks: &mut Vec<DrillCheck>, name: &str, passed: bool, output: String, t: Instant) {
    let mut output = output;
    if output.len() > 4096 {
        let mut cut = 4096;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        output.truncate(cut);
    }
    checks.push(DrillCheck {
        name: name.into(),
        passed,
        output,
        seconds: t.elapsed().as_secs_f64(),
    });
}

/// Runs `cmd` until it ends or `deadline`; (exit success, its output).
fn run_until(cmd: &mut Command, deadline: Instant) -> (bool, String) {
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run {cmd:?}: {e}")),
    };
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return (false, "stopped at the drill's time limit".into());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return (false, format!("cannot wait for {cmd:?}: {e}")),
        }
    }
    match child.wait_with_output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}(exit {})",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                o.status
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

impl Appliance {
    /// Queues a drill the appliance runs (a local job of kind `drill`).
    pub(super) fn start_local_drill(
        &self,
        c: &Caller,
        id: u64,
        req: DrillCreate,
    ) -> ApiResult<Job> {
        let (app, plan) = self.control.plan_drill(id, &req)?;
        let Some(fuse) = self.mounts.as_ref().map(|m| m.fuse.clone()) else {
            return Err(ApiError::conflict(format!(
                "application {id} is of kind {}: the appliance drills it through its FUSE view, \
                 and this snapshotd runs without --mount DIR",
                app.kind
            )));
        };
        let me = self.self_arc()?;
        let app_id = app.id;
        // What a restarted appliance needs to report the drill and delete
        // its clone (drill-APP-JOB) if it stopped while the drill ran.
        let params = serde_json::json!({"volume": plan.volume, "snapshot": plan.snapshot,
            "rpo_seconds": plan.started_unix.saturating_sub(plan.created),
            "rto_target": plan.rto_target, "rpo_target": plan.rpo_target,
            "started_unix": plan.started_unix});
        self.jobs
            .start_for("drill", &c.user, Some(app_id), Some(params), move |p| {
                let d = me.local_drill(p.id(), app_id, &plan, &fuse);
                me.control.record_drill(&d);
                serde_json::to_value(&d).map_err(|e| crate::error::Error::Failed(e.to_string()))
            })
            .map_err(st)
    }

    fn local_drill(&self, job: u64, app: u64, plan: &DrillPlan, fuse: &Path) -> Drill {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(plan.timeout);
        let name = clone_name(app, job);
        let mut checks = Vec::new();
        let mut rto = None;
        match self.clone_create(&admin(), &plan.volume, plan.snapshot, &name) {
            Err(e) => check(
                &mut checks,
                "start",
                false,
                format!("cannot clone the point: {}", e.message),
                t0,
            ),
            Ok(_) => {
                let disk = fuse.join("volumes").join(&name).join("disk");
                let ready = std::fs::metadata(&disk).is_ok();
                rto = ready.then(|| t0.elapsed().as_secs_f64());
                check(
                    &mut checks,
                    "start",
                    ready,
                    if ready {
                        format!("the clone is readable at {}", disk.display())
                    } else {
                        format!("the clone does not show at {}", disk.display())
                    },
                    t0,
                );
                if ready {
                    self.local_checks(&name, &disk, plan, deadline, &mut checks);
                }
                if let Err(e) = self.clone_delete(&admin(), &name, true) {
                    check(&mut checks, "cleanup", false, e.message, Instant::now());
                }
            }
        }
        let t = Instant::now();
        let (ok, out) = match self.verify_point(&plan.volume, plan.snapshot) {
            Ok(v) if v.errors.is_empty() => (
                true,
                format!("{} bytes read back, every checksum good", v.bytes_checked),
            ),
            Ok(v) => (
                false,
                format!("{} bad spots:\n{}", v.errors.len(), v.errors.join("\n")),
            ),
            Err(e) => (false, e.message),
        };
        check(&mut checks, "scrub", ok, out, t);
        if Instant::now() > deadline {
            check(
                &mut checks,
                "time_limit",
                false,
                format!("the drill took longer than {} s", plan.timeout),
                t0,
            );
        }
        let rpo = plan.started_unix.saturating_sub(plan.created);
        add_targets(
            &mut checks,
            rto,
            Some(rpo),
            plan.rto_target,
            plan.rpo_target,
        );
        let passed = !checks.is_empty() && checks.iter().all(|c| c.passed);
        Drill {
            id: job,
            application: app,
            volume: plan.volume.clone(),
            snapshot: plan.snapshot,
            job,
            host: "appliance".into(),
            started_unix: plan.started_unix,
            finished_unix: Some(self.clock.now()),
            passed,
            rto_seconds: rto,
            rpo_seconds: Some(rpo),
            rto_target: plan.rto_target,
            rpo_target: plan.rpo_target,
            message: verdict(&checks),
            checks,
        }
    }

    /// fsck of each filesystem, OS inspection, file probes.
    fn local_checks(
        &self,
        name: &str,
        disk: &Path,
        plan: &DrillPlan,
        deadline: Instant,
        checks: &mut Vec<DrillCheck>,
    ) {
        let vid = match self.pool.volume_id(name) {
            Ok(v) => v,
            Err(e) => return check(checks, "fsck", false, e.to_string(), Instant::now()),
        };
        let t = Target::Volume(vid);
        let parts = match crate::recovery::partition_table(&self.pool, t) {
            Ok(p) => p,
            Err(e) => return check(checks, "fsck", false, e.message, Instant::now()),
        };
        let ranges: Vec<(String, Option<(u64, u64)>)> = if parts.is_empty() {
            vec![("disk".into(), None)]
        } else {
            parts
                .iter()
                .map(|p| (format!("partition {}", p.number), Some((p.start, p.size))))
                .collect()
        };
        let mut found = 0;
        for (what, range) in ranges {
            let t0 = Instant::now();
            let dev = match host::loop_attach(disk, true, range) {
                Ok(d) => d,
                Err(e) => {
                    check(checks, &format!("fsck: {what}"), false, e.to_string(), t0);
                    continue;
                }
            };
            let fstype = host::fs_type(&dev);
            let r = match fstype.as_deref() {
                Some(f @ ("ext2" | "ext3" | "ext4")) => Some((
                    f.to_string(),
                    run_until(Command::new("e2fsck").args(["-f", "-n", &dev]), deadline),
                )),
                Some("xfs") => Some((
                    "xfs".into(),
                    run_until(Command::new("xfs_repair").args(["-n", &dev]), deadline),
                )),
                _ => None,
            };
            host::loop_detach_if_ours(&dev, disk.parent().unwrap_or(disk));
            if let Some((fs, (ok, out))) = r {
                found += 1;
                check(checks, &format!("fsck: {what} ({fs})"), ok, out, t0);
            }
        }
        if found == 0 {
            check(
                checks,
                "fsck",
                false,
                "no ext4 or XFS filesystem found".into(),
                Instant::now(),
            );
        }
        self.inspect_check(t, checks);
        for p in &plan.probes {
            let t0 = Instant::now();
            match &p.path {
                Some(path) => {
                    let (ok, out) = self.file_probe(t, path, p);
                    check(checks, &format!("file: {path}"), ok, out, t0);
                }
                // Refused when the drill is asked for; never skipped.
                None => check(
                    checks,
                    "probe",
                    false,
                    format!("a file tree's drill cannot run {p:?}: it needs \"path\""),
                    t0,
                ),
            }
        }
    }

    fn inspect_check(&self, t: Target, checks: &mut Vec<DrillCheck>) {
        let t0 = Instant::now();
        let size = match self.pool.geometry(t) {
            Ok((s, _)) => s,
            Err(e) => return check(checks, "inspect", false, e.to_string(), t0),
        };
        let ins = cdm_inspect::inspect(Box::new(ClonedDisk {
            pool: self.pool.clone(),
            t,
            size,
        }));
        let ok = ins.partition_table != "invalid";
        let os = ins
            .os
            .as_ref()
            .map(|o| format!("{} {} {}", o.family, o.distro, o.version))
            .unwrap_or_else(|| "no operating system found (a data disk)".into());
        check(
            checks,
            "inspect",
            ok,
            format!(
                "partition table {}; {os}; {} partitions{}",
                ins.partition_table,
                ins.partitions.len(),
                ins.reason.map(|r| format!("; {r}")).unwrap_or_default()
            ),
            t0,
        );
    }

    /// A file of the clone: it exists, and has the SHA-256 or holds the text.
    fn file_probe(&self, t: Target, path: &str, p: &DrillProbe) -> (bool, String) {
        let fs = match cdm_recovery::browse::open(&self.pool, t, None) {
            Ok(f) => f,
            Err(e) => return (false, format!("cannot read the filesystem: {e}")),
        };
        let mut h = Sha256::new();
        let mut text = Vec::new();
        struct Both<'a>(&'a mut Sha256, &'a mut Vec<u8>, bool);
        impl Write for Both<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.update(b);
                if self.2 && self.1.len() < 64 << 20 {
                    self.1.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = Both(&mut h, &mut text, p.contains.is_some());
        let n = match cdm_disk::browse::copy_file(&*fs, path, &mut |_| {}, &mut w) {
            Ok(n) => n,
            Err(e) => return (false, format!("{path}: {e}")),
        };
        let sum = hex::encode(h.finalize());
        let mut ok = true;
        let mut out = format!("{path}: {n} bytes, sha256 {sum}");
        if let Some(want) = &p.sha256 {
            ok &= want.eq_ignore_ascii_case(&sum);
            out.push_str(&format!(", expected {want}"));
        }
        if let Some(c) = &p.contains {
            let has = String::from_utf8_lossy(&text).contains(c.as_str());
            ok &= has;
            out.push_str(&format!(
                ", {} {c:?}",
                if has { "contains" } else { "does not contain" }
            ));
        }
        (ok, out)
    }
}

/// The clone as a disk for the inspector (read in process).
struct ClonedDisk {
    pool: Arc<cdmfs::Pool>,
    t: Target,
    size: u64,
}

impl cdm_inspect::Disk for ClonedDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.pool.read(self.t, off, buf).map_err(|e| e.to_string())
    }
}
