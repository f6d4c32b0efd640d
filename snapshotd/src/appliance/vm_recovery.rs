//! Instant VM recovery: a VM's point cloned (one writable clone per disk,
//! O(1)) and booted on the appliance with qemu over NBD, isolated from
//! the network by default; its state, its serial console and a libvirt
//! domain XML through the API; stopped with its clones deleted, or kept
//! (promoted to volumes of their own). The command line is made by
//! [`crate::vm_qemu`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdm_api::auth::Caller;
use cdm_api::types::Job;
use cdm_api::vm_recovery::{
    choose, VmPoint, VmRecovery, VmRecoveryBackend, VmRecoveryCreate, CLONE_PREFIX,
};
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::{st, Appliance};
use crate::state::{Sync, VM_RECOVERIES};
use crate::vm_qemu::{self, NbdAt, RunDisk, RunNic, RunSpec};

/// A running qemu of a recovery.
pub struct VmRun {
    pid: u32,
    /// Set by a stop request: the exit that follows is a stop, not a failure.
    stopping: bool,
}

/// The recoveries' qemu processes, by recovery name.
#[derive(Default)]
pub struct VmRuns(std::sync::Mutex<HashMap<String, VmRun>>);

/// How long a stopped qemu gets to end before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long qemu must stay up for the recovery to count as started.
const SETTLE: Duration = Duration::from_millis(700);

fn clone_name(rec: &str, disk: usize) -> String {
    format!("{CLONE_PREFIX}{rec}-disk{disk}")
}

/// What a recovery is started with: where its disks are served, the qemu
/// and the UEFI firmware it runs.
struct Launch {
    nbd: NbdAt,
    qemu: PathBuf,
    ovmf: Option<(PathBuf, PathBuf)>,
}

/// Most a serial log may hold: a guest printing without end would fill
/// the filesystem the pool lives on.
const SERIAL_CAP: u64 = 16 << 20;

/// Watches a running recovery's serial log (qemu appends to it) and cuts
/// it, saying so, when it passes [`SERIAL_CAP`]; ends with the run.
fn keep_console_bounded(me: std::sync::Arc<Appliance>, name: String, serial: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name(format!("vm-console-{name}"))
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            if !me
                .vm_runs
                .0
                .lock()
                .map(|r| r.contains_key(&name))
                .unwrap_or(false)
            {
                return;
            }
            if std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0) > SERIAL_CAP {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&serial) {
                    let _ = f.set_len(0);
                }
                let _ = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&serial)
                    .and_then(|mut f| {
                        use std::io::Write;
                        writeln!(
                            f,
                            "[cdm: the console passed {} MiB and was cut here]",
                            SERIAL_CAP >> 20
                        )
                    });
                tracing::warn!(recovery = %name, "a recovered VM's console log was cut");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the console log of a recovered VM is not bounded");
    }
}

/// The tail of a file (at most `n` bytes).
fn tail(p: &std::path::Path, n: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut b = Vec::new();
    f.take(n).read_to_end(&mut b)?;
    Ok(b)
}

impl Appliance {
    fn vm_dir(&self, rec: &str) -> ApiResult<PathBuf> {
        self.vm_recovery_dir
            .get()
            .map(|d| d.join(rec))
            .ok_or_else(|| ApiError::new(503, "unavailable", "the appliance is starting"))
    }

    fn rec_get(&self, name: &str) -> ApiResult<VmRecovery> {
        self.state
            .get(VM_RECOVERIES, name)
            .map_err(st)?
            .ok_or_else(|| ApiError::not_found(format!("VM recovery {name} not found")))
    }

    fn rec_put(&self, r: &VmRecovery) -> ApiResult<()> {
        self.state
            .put(VM_RECOVERIES, r.name.as_str(), r, Sync::Now)
            .map_err(st)
    }

    /// A free recovery name for `vm`: `VM-N`, cleaned to a volume name.
    fn rec_name(&self, vm: &str) -> ApiResult<String> {
        let clean: String = vm
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        let clean = clean.trim_start_matches(['.', '-']);
        let clean = if clean.is_empty() { "vm" } else { clean };
        for n in 1..10_000 {
            let name = format!("{clean}-{n}");
            if self
                .state
                .get::<&str, VmRecovery>(VM_RECOVERIES, name.as_str())
                .map_err(st)?
                .is_none()
                && self.pool.volume(&clone_name(&name, 0)).is_err()
            {
                return Ok(name);
            }
        }
        Err(ApiError::conflict(format!(
            "no free recovery name for VM {vm}"
        )))
    }

    /// Checks and records a recovery (`starting`), then starts its job.
    fn vm_recover(&self, c: &Caller, vm: &str, req: VmRecoveryCreate) -> ApiResult<Job> {
        let points = self.vm_points_of(vm)?;
        let want = req.point.clone().or(req.snapshot.map(|s| s.to_string()));
        let p = choose(&points, want.as_deref())
            .map_err(ApiError::conflict)?
            .clone();
        let qemu = vm_qemu::find_qemu().map_err(|e| ApiError::new(503, "unavailable", e))?;
        let accel = vm_qemu::resolve_accel(req.accel.as_deref().unwrap_or("auto"))
            .map_err(ApiError::conflict)?;
        let nbd = NbdAt::from_listeners(&self.nbd_addrs)
            .ok_or_else(|| ApiError::new(503, "unavailable", "no NBD listener qemu can reach"))?;
        let shape = &p.shape;
        let firmware = shape["firmware"].as_str().unwrap_or("bios").to_string();
        let ovmf = if firmware == "efi" {
            Some(vm_qemu::find_ovmf(&qemu).ok_or_else(|| {
                ApiError::new(
                    503,
                    "unavailable",
                    "the VM boots with UEFI and no OVMF firmware is installed (Debian: ovmf)",
                )
            })?)
        } else {
            None
        };
        let runs = self
            .vm_runs
            .0
            .lock()
            .map_err(|_| ApiError::internal("lock poisoned"))?;
        let name = match req.name.clone() {
            Some(n) => {
                if self
                    .state
                    .get::<&str, VmRecovery>(VM_RECOVERIES, n.as_str())
                    .map_err(st)?
                    .is_some()
                {
                    return Err(ApiError::conflict(format!("VM recovery {n} exists")));
                }
                n
            }
            None => self.rec_name(vm)?,
        };
        let clones: Vec<String> = p.disks.iter().map(|d| clone_name(&name, d.disk)).collect();
        for cl in &clones {
            cdm_common::names::check(cl).map_err(|e| {
                ApiError::bad_request(format!(
                    "recovery name {name:?} is too long for its clones' names ({cl:?}: it {e})"
                ))
            })?;
            if self.pool.volume(cl).is_ok() {
                return Err(ApiError::conflict(format!(
                    "volume {cl} exists: name the recovery otherwise"
                )));
            }
        }
        let now = self.clock.now();
        let rec = VmRecovery {
            name: name.clone(),
            vm: vm.to_string(),
            point: p.point.clone(),
            snapshots: p.disks.iter().map(|d| d.snapshot).collect(),
            clones,
            state: "starting".into(),
            reason: None,
            accel,
            network: req.network.clone().unwrap_or_else(|| "none".into()),
            memory_mib: req
                .memory_mib
                .or(shape["memory_mib"].as_u64())
                .unwrap_or(1024)
                .clamp(16, cdm_api::vm_recovery::MAX_MEMORY_MIB),
            vcpus: req
                .vcpus
                .or(shape["vcpus"].as_u64().map(|v| v as u32))
                .unwrap_or(1)
                .clamp(1, cdm_api::vm_recovery::MAX_VCPUS),
            firmware,
            pid: None,
            started: cdm_api::control::rfc3339(now),
            started_unix: now,
            stopped_unix: None,
            by: c.user.clone(),
        };
        self.rec_put(&rec)?;
        drop(runs);
        let me = self.self_arc()?;
        let caller = c.clone();
        let job = self.jobs.start("vm-recovery", &c.user, move |prog| {
            let t = Instant::now();
            let mut made = Vec::new();
            let how = Launch { nbd, qemu, ovmf };
            match me.vm_boot(&caller, rec.clone(), &p, how, &mut made) {
                Ok(r) => {
                    prog.set(1, 1);
                    Ok(json!({"recovery": r.name, "vm": r.vm, "point": r.point, "state": r.state, "clones": r.clones, "accel": r.accel, "seconds": t.elapsed().as_secs_f64()}))
                }
                Err(e) => {
                    // Nothing half-made stays: the clones this job made
                    // go (only those: a name taken meanwhile is not ours),
                    // the record says why.
                    me.vm_clean_clones(&caller, &made, false);
                    let mut r = rec;
                    r.state = "failed".into();
                    r.reason = Some(e.message.clone());
                    r.clones.clear();
                    r.stopped_unix = Some(me.clock.now());
                    let _ = me.rec_put(&r);
                    me.events.emit("vm.recovery.failed", &r.name, &caller.user, json!({"vm": r.vm, "reason": e.message}));
                    Err(crate::error::Error::Api(e))
                }
            }
        });
        job.map_err(st)
    }

    /// The job: clones, the recovery's directory, qemu started and watched.
    fn vm_boot(
        &self,
        c: &Caller,
        mut rec: VmRecovery,
        p: &VmPoint,
        how: Launch,
        made: &mut Vec<String>,
    ) -> ApiResult<VmRecovery> {
        let Launch { nbd, qemu, ovmf } = how;
        for (d, cl) in p.disks.iter().zip(&rec.clones) {
            self.clone_create(c, &d.volume, d.snapshot, cl)?;
            made.push(cl.clone());
        }
        let dir = self.vm_dir(&rec.name)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
        let ovmf = match ovmf {
            Some((code, vars)) => {
                let mine = dir.join("OVMF_VARS.fd");
                std::fs::copy(&vars, &mine)
                    .map_err(|e| ApiError::internal(format!("{}: {e}", vars.display())))?;
                Some((code, mine))
            }
            None => None,
        };
        let shape = &p.shape;
        let nics: Vec<RunNic> = shape["nics"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| RunNic {
                        model: n["model"].as_str().map(str::to_string),
                        mac: n["mac"].as_str().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let spec = RunSpec {
            name: rec.name.clone(),
            disks: p
                .disks
                .iter()
                .zip(&rec.clones)
                .map(|(d, cl)| RunDisk {
                    export: cl.clone(),
                    bus: d.bus.clone(),
                })
                .collect(),
            nbd,
            memory_mib: rec.memory_mib,
            vcpus: rec.vcpus,
            accel: rec.accel.clone(),
            network: rec.network.clone(),
            nics,
            firmware: rec.firmware.clone(),
            machine: shape["machine"].as_str().map(str::to_string),
            dir: dir.clone(),
            ovmf,
        };
        std::fs::write(dir.join("domain.xml"), vm_qemu::domain_xml(&spec))
            .map_err(|e| ApiError::internal(format!("domain.xml: {e}")))?;
        let pid = self.vm_spawn(&rec.name, &qemu, &spec)?;
        rec.pid = Some(pid);
        rec.state = "running".into();
        // The watcher may have seen qemu end already: its record wins
        // (compared and written under the runs' lock it takes to write).
        {
            let _runs = self
                .vm_runs
                .0
                .lock()
                .map_err(|_| ApiError::internal("lock poisoned"))?;
            let cur = self.rec_get(&rec.name)?;
            if cur.state == "starting" {
                self.rec_put(&rec)?;
            } else {
                rec = cur;
            }
        }
        self.events.emit(
            "vm.recovery.started",
            &rec.name,
            &c.user,
            json!({"vm": rec.vm, "point": rec.point, "accel": rec.accel}),
        );
        Ok(rec)
    }

    /// Starts qemu from a thread that lives as long as it does (its death
    /// signal follows that thread) and records its end; fails with qemu's
    /// own words when it does not stay up.
    fn vm_spawn(&self, name: &str, qemu: &std::path::Path, spec: &RunSpec) -> ApiResult<u32> {
        let args = vm_qemu::args(spec);
        let log = spec.dir.join("qemu.log");
        let serial = vm_qemu::serial_log(&spec.dir);
        let me = self.self_arc()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (rec_name, qemu) = (name.to_string(), qemu.to_path_buf());
        std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || {
                let name = rec_name;
                let err = match std::fs::File::create(&log) {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{}: {e}", log.display())));
                        return;
                    }
                };
                let mut cmd = Command::new(&qemu);
                cmd.args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(err);
                // SAFETY: only async-signal-safe calls between fork and exec.
                unsafe {
                    use std::os::unix::process::CommandExt;
                    cmd.pre_exec(|| {
                        cdm_common::signals::clear_mask();
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                        Ok(())
                    });
                }
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{}: {e}", qemu.display())));
                        return;
                    }
                };
                if let Ok(mut runs) = me.vm_runs.0.lock() {
                    runs.insert(
                        name.clone(),
                        VmRun {
                            pid: child.id(),
                            stopping: false,
                        },
                    );
                }
                let _ = tx.send(Ok(child.id()));
                keep_console_bounded(me.clone(), name.clone(), serial.clone());
                let status = child.wait();
                me.vm_ended(&name, status, &log);
            })
            .map_err(|e| ApiError::internal(format!("thread: {e}")))?;
        let pid = rx
            .recv()
            .map_err(|_| ApiError::internal("the VM's thread ended"))?
            .map_err(|e| ApiError::new(503, "unavailable", format!("qemu could not start: {e}")))?;
        std::thread::sleep(SETTLE);
        let r = self.rec_get(name)?;
        if r.state == "failed" || r.state == "stopped" {
            return Err(ApiError::conflict(format!(
                "qemu ended at once: {}",
                r.reason.unwrap_or_default()
            )));
        }
        Ok(pid)
    }

    /// qemu ended: the record says how (its log's tail when it failed).
    fn vm_ended(
        &self,
        name: &str,
        status: std::io::Result<std::process::ExitStatus>,
        log: &std::path::Path,
    ) {
        // Under the runs' lock, and the run removed only once the record
        // says how it ended: a stop waiting for the run to go then finds
        // the final record, and nothing writes it back after a removal.
        let Ok(mut runs) = self.vm_runs.0.lock() else {
            return;
        };
        let stopping = runs.get(name).is_some_and(|r| r.stopping);
        let words = tail(log, 2048)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .unwrap_or_default();
        let (state, reason) = match status {
            _ if stopping => ("stopped", "stopped on request".to_string()),
            Ok(s) if s.success() => ("stopped", "the guest powered off or reset".to_string()),
            Ok(s) => ("failed", format!("qemu ended ({s}): {words}")),
            Err(e) => ("failed", format!("qemu could not be waited for: {e}")),
        };
        let vm = match self.rec_get(name) {
            Ok(mut r) => {
                r.state = state.into();
                r.reason = Some(reason.clone());
                r.pid = None;
                r.stopped_unix = Some(self.clock.now());
                let _ = self.rec_put(&r);
                r.vm
            }
            Err(_) => String::new(),
        };
        runs.remove(name);
        drop(runs);
        self.events.emit(
            if state == "failed" {
                "vm.recovery.failed"
            } else {
                "vm.recovery.stopped"
            },
            name,
            "snapshotd",
            json!({"vm": vm, "reason": reason}),
        );
    }

    /// Deletes (or, with `keep`, promotes) a recovery's clones; what fails
    /// is logged and left for the operator.
    fn vm_clean_clones(&self, c: &Caller, clones: &[String], keep: bool) -> Vec<String> {
        let mut failed = Vec::new();
        for cl in clones {
            if self.pool.volume(cl).is_err() {
                continue;
            }
            let r = if keep {
                self.clone_promote(c, cl).map(|_| ())
            } else {
                self.clone_delete(c, cl, true)
            };
            if let Err(e) = r {
                tracing::warn!(clone = %cl, error = %e.message, "a recovered VM's clone was left");
                failed.push(format!("{cl}: {}", e.message));
            }
        }
        failed
    }

    fn vm_stop(&self, c: &Caller, name: &str, keep: bool) -> ApiResult<VmRecovery> {
        let r = self.rec_get(name)?;
        if r.state == "starting" {
            return Err(ApiError::conflict(format!(
                "VM recovery {name} is starting: stop it when its job ended"
            )));
        }
        // Signals go to a run still registered, under the lock its watcher
        // takes to unregister it once qemu is reaped: never to a pid that
        // may have been reused.
        let signal = |sig: i32, stopping: bool| -> ApiResult<bool> {
            let mut runs = self
                .vm_runs
                .0
                .lock()
                .map_err(|_| ApiError::internal("lock poisoned"))?;
            Ok(match runs.get_mut(name) {
                Some(run) => {
                    run.stopping |= stopping;
                    // SAFETY: kill(2) on our own child, not yet reaped.
                    unsafe { libc::kill(run.pid as i32, sig) };
                    true
                }
                None => false,
            })
        };
        // qemu quits on SIGTERM; the watcher records it.
        if signal(libc::SIGTERM, true)? {
            let t = Instant::now();
            let mut killed = false;
            while self
                .vm_runs
                .0
                .lock()
                .map(|r| r.contains_key(name))
                .unwrap_or(false)
            {
                if t.elapsed() > STOP_GRACE && !killed {
                    killed = true;
                    signal(libc::SIGKILL, true)?;
                }
                if t.elapsed() > STOP_GRACE * 2 {
                    return Err(ApiError::internal(format!(
                        "qemu of VM recovery {name} does not end"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The run is gone and its record final; under the lock, no start
        // takes this name until the record is removed.
        let _runs = self
            .vm_runs
            .0
            .lock()
            .map_err(|_| ApiError::internal("lock poisoned"))?;
        let mut r = self.rec_get(name)?;
        let failed = self.vm_clean_clones(c, &r.clones, keep);
        if !failed.is_empty() {
            return Err(ApiError::conflict(format!(
                "VM {name} is stopped; some clones could not be {}: {}",
                if keep { "promoted" } else { "deleted" },
                failed.join("; ")
            )));
        }
        if r.state == "running" {
            r.state = "stopped".into();
        }
        self.state.remove(VM_RECOVERIES, name).map_err(st)?;
        if let Ok(d) = self.vm_dir(name) {
            let _ = std::fs::remove_dir_all(d);
        }
        self.events.emit(
            "vm.recovery.removed",
            name,
            &c.user,
            json!({"vm": r.vm, "kept": keep, "clones": r.clones}),
        );
        Ok(r)
    }

    /// At start: recoveries whose qemu ended with the previous daemon are
    /// stopped (their clones stay until they are deleted or kept).
    pub fn vm_recoveries_after_restart(&self) -> ApiResult<()> {
        let all: Vec<VmRecovery> = self.state.all(VM_RECOVERIES).map_err(st)?;
        for mut r in all {
            if r.state == "running" || r.state == "starting" {
                r.state = "stopped".into();
                r.reason = Some("the appliance restarted".into());
                r.pid = None;
                r.stopped_unix = Some(self.clock.now());
                self.rec_put(&r)?;
            }
        }
        Ok(())
    }
}

impl VmRecoveryBackend for Appliance {
    fn vm_points(&self, vm: &str) -> ApiResult<Vec<VmPoint>> {
        self.vm_points_of(vm)
    }
    fn vm_restore(
        &self,
        c: &Caller,
        vm: &str,
        req: cdm_api::vm_recovery::VmRestoreCreate,
    ) -> ApiResult<Job> {
        self.vm_restore_start(c, vm, req)
    }
    fn start_vm_recovery(&self, c: &Caller, vm: &str, req: VmRecoveryCreate) -> ApiResult<Job> {
        self.vm_recover(c, vm, req)
    }
    fn list_vm_recoveries(&self) -> ApiResult<Vec<VmRecovery>> {
        self.state.all(VM_RECOVERIES).map_err(st)
    }
    fn vm_recovery(&self, name: &str) -> ApiResult<VmRecovery> {
        self.rec_get(name)
    }
    fn vm_console(&self, name: &str, bytes: u64) -> ApiResult<Vec<u8>> {
        self.rec_get(name)?;
        match tail(&vm_qemu::serial_log(&self.vm_dir(name)?), bytes) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ApiError::internal(format!("serial log: {e}"))),
        }
    }
    fn vm_domain_xml(&self, name: &str) -> ApiResult<String> {
        self.rec_get(name)?;
        std::fs::read_to_string(self.vm_dir(name)?.join("domain.xml"))
            .map_err(|e| ApiError::not_found(format!("VM recovery {name} has no domain XML: {e}")))
    }
    fn stop_vm_recovery(&self, c: &Caller, name: &str, keep: bool) -> ApiResult<VmRecovery> {
        self.vm_stop(c, name, keep)
    }
}
