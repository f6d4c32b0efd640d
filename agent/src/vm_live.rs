//! Backups of running VMs through their qemu's QMP, as libvirt's pull-mode
//! backup API does it (image fleecing): at one instant for all the VM's
//! disks (a QMP `transaction`), each disk node gets a `blockdev-backup
//! sync=none` job into a temporary qcow2 overlay backed by the disk: qemu
//! copies an old block there before the guest overwrites it, so reading
//! the overlay gives the disk as it was at that instant while the VM runs
//! on. The overlay is exported over NBD on a unix socket and copied with
//! the ordinary block path (`ops::backup_block`).
//!
//! Incrementals: each disk carries a persistent dirty bitmap
//! `cdm-<hash of the stage volume>-<time>` in its qcow2 file. At the
//! freeze point the transaction disables the current one(s) and adds a
//! new one, and merges the old into a temporary bitmap with the stable
//! name `cdm-<hash>` on the overlay, which is what the export offers
//! (`qemu:dirty-bitmap:cdm-<hash>`): the writes since the last good point.
//! After the point is snapshotted the old bitmaps are removed; after a
//! failure the new one is merged back into an old one, re-enabled, in one
//! transaction, so no dirty bit is lost. If that clean-up never runs (the
//! agent killed), the next run merges every `cdm-<hash>-*` bitmap it
//! finds: their union still covers every write since the last good point.
//! A disk without such a bitmap (first run, the bitmap lost) has its
//! fingerprints distrusted, so the copy compares every block.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Context as _, ErrorKind, Result};
use crate::qmp::Monitor;
use cdm_inspect::category::Classified;
use cdm_inspect::inventory::{Vm, VmDisk};

/// How long a QMP command may take (a transaction drains the disks).
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to freeze or thaw its filesystems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Dirty bitmap granularity: the fingerprints' block size.
const GRANULARITY: u64 = 65536;

/// Where a live backup finds the VM's monitors.
#[derive(Clone, Debug, Default)]
pub struct LiveOptions {
    /// `--qmp-dir`: `DIR/NAME.qmp` (and `DIR/NAME.qga` with `--freeze`).
    pub qmp_dir: Option<PathBuf>,
    /// `--freeze`: freeze the guest's filesystems around the point.
    pub freeze: bool,
}

impl LiveOptions {
    /// The VM's QMP socket: the inventory's, else `DIR/NAME.qmp` when it
    /// exists. None: the VM is backed up from its image files.
    pub fn qmp_socket(&self, vm: &Vm) -> Option<PathBuf> {
        if let Some(q) = &vm.qmp {
            return Some(PathBuf::from(q));
        }
        let p = self.qmp_dir.as_ref()?.join(format!("{}.qmp", vm.name));
        p.exists().then_some(p)
    }

    /// The guest agent's socket, when a freeze is asked for.
    fn guest_agent(&self, vm: &Vm) -> Option<PathBuf> {
        if let Some(g) = &vm.guest_agent {
            return Some(PathBuf::from(g));
        }
        if !self.freeze {
            return None;
        }
        Some(match &self.qmp_dir {
            Some(d) => d.join(format!("{}.qga", vm.name)),
            None => PathBuf::from(format!("/var/run/cdm-qga/{}.qga", vm.name)),
        })
    }
}

/// One disk of the live backup: its node, the fleecing overlay, bitmaps.
struct LiveDisk {
    /// The stage volume it is copied into.
    volume: String,
    node: String,
    fleece: String,
    job: String,
    export: String,
    tmp: PathBuf,
    /// The stable exported bitmap (`cdm-<hash>`), also the old ones' prefix.
    stable: String,
    /// `cdm-<hash>-*` bitmaps found on the node (their union: the writes
    /// since the last good point).
    old: Vec<String>,
    new: String,
    added: bool,
    started: bool,
    exported: bool,
}

/// The stable bitmap name of a stage volume.
fn stable_bitmap(volume: &str) -> String {
    format!("cdm-{}", &blake3::hash(volume.as_bytes()).to_hex()[..12])
}

/// The format node of qemu that has `d`'s file open, and its bitmaps.
fn find_node(nodes: &Value, d: &VmDisk) -> Result<(String, Vec<Value>)> {
    let want = std::fs::canonicalize(&d.source).unwrap_or_else(|_| PathBuf::from(&d.source));
    let mut seen = Vec::new();
    for n in nodes.as_array().into_iter().flatten() {
        let (name, drv, file) = (
            n["node-name"].as_str().unwrap_or(""),
            n["drv"].as_str().unwrap_or(""),
            n["file"].as_str().unwrap_or(""),
        );
        if drv == d.format && !name.is_empty() {
            seen.push(format!("{name} ({file})"));
            let f = std::fs::canonicalize(file).unwrap_or_else(|_| PathBuf::from(file));
            if f == want {
                let bitmaps = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
                return Ok((name.to_string(), bitmaps));
            }
        }
    }
    crate::fail!(
        Host,
        "no {} block node of the running qemu has disk {} open (its {} nodes: {})",
        d.format,
        d.source,
        d.format,
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    )
}

/// A short unique id (qemu's node names are at most 31 bytes).
fn unique() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let x = (t ^ ((std::process::id() as u64) << 24)) & 0xff_ffff_ffff;
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff;
    format!("{x:010x}{n:02x}")
}

/// Finds each disk's node and its bitmaps; a bitmap qemu marks
/// inconsistent (the VM crashed with it open) cannot be trusted: it is
/// removed and that disk's fingerprints are distrusted.
fn plan_disks(
    ctx: &crate::Ctx,
    q: &mut Monitor,
    c: &Classified,
    volumes: &[String],
) -> Result<Vec<LiveDisk>> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let dir = ctx.state_dir.join("fleece");
    std::fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    for (i, d) in c.vm.disks.iter().enumerate() {
        if d.format != "qcow2" && d.format != "raw" {
            crate::fail!(
                Host,
                "disk {i} ({}): format {} is not supported",
                d.source,
                d.format
            );
        }
        let (node, bitmaps) =
            find_node(&nodes, d).context_with(ErrorKind::Host, || format!("disk {i}"))?;
        let stable = stable_bitmap(&volumes[i]);
        let mut old = Vec::new();
        let mut dropped = false;
        for b in &bitmaps {
            let name = b["name"].as_str().unwrap_or("");
            if !name.starts_with(&format!("{stable}-")) {
                continue;
            }
            if b["inconsistent"] == true {
                tracing::warn!(bitmap = name, "removing an inconsistent dirty bitmap");
                q.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": name}),
                )?;
                dropped = true;
                continue;
            }
            if b["busy"] == true {
                crate::fail!(
                    Host,
                    "disk {i}: dirty bitmap {name} is in use by another job or export"
                );
            }
            old.push(name.to_string());
        }
        // Writes recorded only in a dropped bitmap are in no surviving
        // one: the next backup must compare every block, not just theirs.
        if must_compare_all(&old, dropped) {
            crate::ops::invalidate_block_fingerprints(ctx, &volumes[i])?;
        }
        let u = unique();
        out.push(LiveDisk {
            fleece: format!("cdm-fleece-{u}"),
            job: format!("cdm-backup-{u}"),
            export: format!("cdm-{u}"),
            tmp: dir.join(format!("{u}.qcow2")),
            new: format!("{stable}-{u}"),
            volume: volumes[i].clone(),
            node,
            stable,
            old,
            added: false,
            started: false,
            exported: false,
        });
    }
    Ok(out)
}

/// Whether block fingerprints are to be distrusted: no bitmap says what
/// changed since the last point, or one that did was dropped.
fn must_compare_all(kept: &[String], dropped: bool) -> bool {
    kept.is_empty() || dropped
}

/// The overlay (a new qcow2 file, its backing the disk node) and the
/// exported bitmap on it.
fn add_fleece(q: &mut Monitor, ld: &mut LiveDisk, d: &VmDisk) -> Result<()> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let size = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node-name"] == json!(ld.node))
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| crate::err!(Host, "{}: qemu did not say its size", d.source))?;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&ld.tmp)
        .arg(size.to_string())
        .output()
        .context_with(ErrorKind::Host, || "qemu-img create (qemu-utils)")?;
    if !out.status.success() {
        crate::fail!(
            Host,
            "qemu-img create {}: {}",
            ld.tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    q.execute(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": ld.fleece,
            "file": {"driver": "file", "filename": ld.tmp},
            "backing": ld.node,
        }),
    )?;
    ld.added = true;
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": ld.fleece, "name": ld.stable, "granularity": GRANULARITY,
               "persistent": false, "disabled": true}),
    )?;
    Ok(())
}

/// The transaction's actions for one disk (see the module's comment).
fn actions(ld: &LiveDisk) -> Vec<Value> {
    let mut a = Vec::new();
    for o in &ld.old {
        a.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": ld.node, "name": o}}));
        a.push(json!({"type": "block-dirty-bitmap-merge", "data": {
            "node": ld.fleece, "target": ld.stable, "bitmaps": [{"node": ld.node, "name": o}]}}));
    }
    a.push(json!({"type": "block-dirty-bitmap-add", "data": {
        "node": ld.node, "name": ld.new, "persistent": true, "granularity": GRANULARITY}}));
    a.push(json!({"type": "blockdev-backup", "data": {
        "job-id": ld.job, "device": ld.node, "target": ld.fleece, "sync": "none",
        "auto-finalize": true, "auto-dismiss": true}}));
    a
}

/// What a freeze attempt leaves to undo.
enum Freeze {
    /// The freeze command never went out (no agent answered guest-sync).
    NotSent,
    /// It went out: `Some` is the connection it succeeded on; `None` when
    /// it failed or timed out, so the guest may be frozen all the same.
    Sent(Option<Monitor>),
}

/// Freezes the guest's filesystems through the agent at `sock`, or says
/// why not (a warning: the point is then crash-consistent).
fn freeze(sock: &Path, timeout: Duration) -> (Freeze, String) {
    let mut g = match Monitor::guest_agent(sock, timeout) {
        Ok(g) => g,
        Err(e) => {
            return (
                Freeze::NotSent,
                format!(
                    "skipped: the guest agent did not answer ({e:#}); the point is crash-consistent"
                ),
            )
        }
    };
    match g.execute("guest-fsfreeze-freeze", json!({})) {
        Ok(n) => (Freeze::Sent(Some(g)), format!("frozen ({n} filesystems)")),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "guest-fsfreeze-freeze failed; a thaw follows");
            (
                Freeze::Sent(None),
                format!("failed ({e:#}); the point is crash-consistent"),
            )
        }
    }
}

/// Thaws after any freeze that was sent: on the freeze's connection, and
/// on a new one when that fails or is gone (a freeze that timed out may
/// still have frozen the guest, and a guest left frozen hangs). Best
/// effort: the note says what failed.
fn thaw(sock: &Path, f: Freeze, timeout: Duration) -> Option<String> {
    let g = match f {
        Freeze::NotSent => return None,
        Freeze::Sent(g) => g,
    };
    if let Some(mut g) = g {
        match g.execute("guest-fsfreeze-thaw", json!({})) {
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "thaw failed; retrying on a new connection")
            }
        }
        // The agent's socket takes one client at a time.
        drop(g);
    }
    let r = Monitor::guest_agent(sock, timeout)
        .and_then(|mut g| g.execute("guest-fsfreeze-thaw", json!({})));
    match r {
        Ok(_) => None,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the guest may still be frozen");
            Some(format!("thaw failed: {e:#}"))
        }
    }
}

/// Backs up a running VM's disks through its QMP socket `qmp`: the same
/// stage volumes, snapshots and metadata as the offline path (`meta(i)`
/// is disk `i`'s snapshot metadata).
pub fn backup(
    ctx: &crate::Ctx,
    c: &Classified,
    qmp: &Path,
    opts: &LiveOptions,
    volumes: &[String],
    meta: &dyn Fn(usize) -> Value,
) -> Result<Vec<Value>> {
    let mut q = Monitor::qmp(qmp, QMP_TIMEOUT).map_err(|e| {
        crate::err!(
            Host,
            "VM {} is to be backed up live but {e:#}: its disk images are locked by the running qemu, so they cannot be read another way",
            c.vm.name
        )
    })?;
    let mut disks = plan_disks(ctx, &mut q, c, volumes)?;
    let sock = ctx
        .state_dir
        .join("fleece")
        .join(format!("{}.sock", unique()));
    let mut nbd_started = false;
    let mut done = vec![false; disks.len()];
    let r = run(
        ctx,
        c,
        &mut q,
        opts,
        &mut disks,
        &sock,
        &mut nbd_started,
        &mut done,
        meta,
    );
    teardown(&mut q, &mut disks, nbd_started, &done);
    let _ = std::fs::remove_file(&sock);
    let mut r = r?;
    for v in &mut r {
        v["live"]["qmp"] = json!(qmp.display().to_string());
    }
    Ok(r)
}

#[allow(clippy::too_many_arguments)] // the session's state, shared with its teardown
fn run(
    ctx: &crate::Ctx,
    c: &Classified,
    q: &mut Monitor,
    opts: &LiveOptions,
    disks: &mut [LiveDisk],
    sock: &Path,
    nbd_started: &mut bool,
    done: &mut [bool],
    meta: &dyn Fn(usize) -> Value,
) -> Result<Vec<Value>> {
    for (ld, d) in disks.iter_mut().zip(&c.vm.disks) {
        add_fleece(q, ld, d).context_with(ErrorKind::Host, || format!("fleecing {}", d.source))?;
    }
    let acts: Vec<Value> = disks.iter().flat_map(actions).collect();
    let ga = opts.guest_agent(&c.vm);
    let (frozen, freeze_note) = match &ga {
        Some(s) => {
            let (f, note) = freeze(s, FREEZE_TIMEOUT);
            (f, Some(note))
        }
        None => (Freeze::NotSent, None),
    };
    let t = Instant::now();
    let tr = q.execute("transaction", json!({"actions": acts}));
    // Thawed whatever the transaction did: a guest left frozen hangs.
    let thaw_note = ga.and_then(|s| thaw(&s, frozen, FREEZE_TIMEOUT));
    tr.context_with(ErrorKind::Host, || {
        "the point-in-time transaction (nothing changed)"
    })?;
    let frozen_ms = t.elapsed().as_secs_f64() * 1e3;
    for ld in disks.iter_mut() {
        ld.started = true;
    }
    q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    )
    .context_with(ErrorKind::Host, || {
        "NBD export of the point (is another backup of this VM running?)"
    })?;
    *nbd_started = true;
    let mut out = Vec::new();
    for (i, ld) in disks.iter_mut().enumerate() {
        // Without an old bitmap the exported one is empty, but the disk's
        // fingerprints were distrusted (`plan_disks`): the copy compares
        // or copies everything, never takes it for "nothing changed", and
        // records the name for the next run.
        let export = json!({"type": "nbd", "id": ld.export, "node-name": ld.fleece,
                            "name": ld.export, "writable": false, "bitmaps": [ld.stable]});
        q.execute("block-export-add", export)?;
        ld.exported = true;
        let uri = format!("nbd+unix:///{}?socket={}", ld.export, sock.display());
        let mut r = crate::ops::backup_block(
            ctx,
            &ld.volume,
            &uri,
            Some(&ld.stable),
            GRANULARITY as u32,
            Some(format!("vm {} disk {i}", c.vm.name)),
            Some(meta(i)),
        )
        .context_with(ErrorKind::Host, || {
            format!("disk {i} ({})", c.vm.disks[i].source)
        })?;
        done[i] = true;
        r["live"] = json!({
            "node": ld.node,
            "bitmap": ld.new,
            "merged": ld.old,
            "freeze": freeze_note,
            "thaw": thaw_note,
            "transaction_ms": frozen_ms,
        });
        q.execute("block-export-del", json!({"id": ld.export, "mode": "hard"}))?;
        ld.exported = false;
        out.push(r);
    }
    Ok(out)
}

/// Undoes everything the session added, whatever failed: export, NBD
/// server, jobs, overlays and their files; then rotates each disk's
/// bitmaps (old ones removed if its point was taken, else the new one
/// merged back into an old one, re-enabled, atomically).
fn teardown(q: &mut Monitor, disks: &mut [LiveDisk], nbd_started: bool, done: &[bool]) {
    let note = |what: &str, r: Result<Value>| {
        if let Err(e) = r {
            tracing::warn!(what, error = %format!("{e:#}"), "live backup clean-up");
        }
    };
    for ld in disks.iter().filter(|l| l.exported) {
        note(
            "export",
            q.execute("block-export-del", json!({"id": ld.export, "mode": "hard"})),
        );
    }
    if nbd_started {
        note("nbd server", q.execute("nbd-server-stop", json!({})));
    }
    for ld in disks.iter().filter(|l| l.started) {
        note(
            "job",
            q.execute("block-job-cancel", json!({"device": ld.job, "force": true})),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for ld in disks.iter().filter(|l| l.added) {
        // The job and the export let go of the overlay asynchronously.
        loop {
            match q.execute("blockdev-del", json!({"node-name": ld.fleece})) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    note("overlay", Err(e));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    for (i, ld) in disks.iter().enumerate() {
        let _ = std::fs::remove_file(&ld.tmp);
        if !ld.started {
            continue;
        }
        let acts: Vec<Value> = if done.get(i) == Some(&true) {
            ld.old
                .iter()
                .map(|o| json!({"type": "block-dirty-bitmap-remove", "data": {"node": ld.node, "name": o}}))
                .collect()
        } else if let Some(o) = ld.old.first() {
            vec![
                json!({"type": "block-dirty-bitmap-merge", "data": {"node": ld.node, "target": o, "bitmaps": [ld.new]}}),
                json!({"type": "block-dirty-bitmap-enable", "data": {"node": ld.node, "name": o}}),
                json!({"type": "block-dirty-bitmap-remove", "data": {"node": ld.node, "name": ld.new}}),
            ]
        } else {
            // No point before this one: the next run copies everything.
            vec![
                json!({"type": "block-dirty-bitmap-remove", "data": {"node": ld.node, "name": ld.new}}),
            ]
        };
        if !acts.is_empty() {
            note(
                "bitmaps",
                q.execute("transaction", json!({"actions": acts})),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_found_by_file_and_format() {
        let nodes = json!([
            {"node-name": "#block123", "drv": "file", "file": "/img/a.qcow2"},
            {"node-name": "disk0", "drv": "qcow2", "file": "/img/a.qcow2",
             "dirty-bitmaps": [{"name": "cdm-x-1", "recording": true}]},
        ]);
        let d = |s: &str| VmDisk {
            source: s.into(),
            format: "qcow2".into(),
            target: None,
            bus: None,
        };
        let (n, b) = find_node(&nodes, &d("/img/a.qcow2")).unwrap();
        assert_eq!((n.as_str(), b.len()), ("disk0", 1));
        let e = find_node(&nodes, &d("/img/b.qcow2")).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("/img/b.qcow2") && e.contains("disk0 (/img/a.qcow2)"),
            "{e}"
        );
        assert_ne!(stable_bitmap("vm-a-disk0"), stable_bitmap("vm-a-disk1"));
    }

    #[test]
    fn the_transaction_rotates_bitmaps_then_starts_the_job() {
        let ld = LiveDisk {
            volume: "v".into(),
            node: "d".into(),
            fleece: "f".into(),
            job: "j".into(),
            export: "e".into(),
            tmp: "/nonexistent".into(),
            stable: "cdm-s".into(),
            old: vec!["cdm-s-1".into()],
            new: "cdm-s-2".into(),
            added: false,
            started: true,
            exported: false,
        };
        let a = actions(&ld);
        let kinds: Vec<&str> = a.iter().map(|x| x["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "block-dirty-bitmap-disable",
                "block-dirty-bitmap-merge",
                "block-dirty-bitmap-add",
                "blockdev-backup"
            ]
        );
        assert_eq!(a[2]["data"]["persistent"], true);
    }

    /// A guest agent on a unix socket that answers guest-sync and thaw but
    /// never the freeze; it records every command it reads.
    fn silent_freeze_agent(p: &Path) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
        use std::io::{BufRead, BufReader, Write};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l = std::os::unix::net::UnixListener::bind(p).unwrap();
        let rec = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).split(b'\n') {
                    let Ok(line) = line else { break };
                    // The client's 0xff parser reset precedes its first line.
                    let at = line.iter().position(|&c| c == b'{').unwrap_or(0);
                    let v: Value = serde_json::from_slice(&line[at..]).unwrap();
                    let cmd = v["execute"].as_str().unwrap_or("").to_string();
                    rec.lock().unwrap().push(cmd.clone());
                    let reply = match cmd.as_str() {
                        "guest-sync" => json!({"return": v["arguments"]["id"]}),
                        "guest-fsfreeze-thaw" => json!({"return": 2}),
                        _ => continue,
                    };
                    writeln!(w, "{reply}").unwrap();
                }
            }
        });
        seen
    }

    /// Review M5: a freeze that times out may still freeze the guest, so a
    /// thaw goes out on a new connection.
    #[test]
    fn a_freeze_without_an_answer_is_thawed_on_a_new_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let seen = silent_freeze_agent(&sock);
        let t = Duration::from_millis(300);
        let (f, note) = freeze(&sock, t);
        assert!(matches!(f, Freeze::Sent(None)), "{note}");
        assert!(note.contains("crash-consistent"), "{note}");
        assert_eq!(thaw(&sock, f, t), None);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "guest-sync",
                "guest-fsfreeze-freeze",
                "guest-sync",
                "guest-fsfreeze-thaw"
            ]
        );
    }

    #[test]
    fn no_agent_means_no_freeze_and_no_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let (f, note) = freeze(&sock, Duration::from_millis(100));
        assert!(matches!(f, Freeze::NotSent), "{note}");
        assert_eq!(thaw(&sock, f, Duration::from_millis(100)), None);
    }

    /// Review L7: an inconsistent bitmap dropped beside a consistent one
    /// leaves writes no surviving bitmap knows; the fingerprints must go.
    #[test]
    fn dropping_any_bitmap_distrusts_the_fingerprints() {
        use std::io::{BufRead, BufReader, Write};
        let dir = tempfile::tempdir().unwrap();
        let volume = "vm-a-disk0";
        let stable = stable_bitmap(volume);
        let nodes = json!([{"node-name": "disk0", "drv": "qcow2", "file": "/img/a.qcow2",
            "dirty-bitmaps": [
                {"name": format!("{stable}-1"), "inconsistent": true},
                {"name": format!("{stable}-2"), "recording": true}]}]);
        let sock = dir.path().join("qmp.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = seen.clone();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}}}}}"#).unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap_or("").to_string();
                let ret = if cmd == "query-named-block-nodes" {
                    nodes.clone()
                } else {
                    json!({})
                };
                rec.lock().unwrap().push(cmd);
                writeln!(w, "{}", json!({"return": ret})).unwrap();
            }
        });
        let ctx = crate::Ctx {
            api: cdm_api::client::Client::new("http://127.0.0.1:1", None),
            nbd: String::new(),
            state_dir: dir.path().to_path_buf(),
            bandwidth: Default::default(),
            json: true,
            progress: false,
            ca_file: None,
            nbd_tls: None,
        };
        let paths = crate::block::Paths::new(dir.path(), volume);
        std::fs::create_dir_all(paths.fp.parent().unwrap()).unwrap();
        std::fs::write(&paths.fp, b"fingerprints").unwrap();
        let vm: Vm = serde_json::from_value(json!({"name": "a",
            "disks": [{"source": "/img/a.qcow2", "format": "qcow2"}]}))
        .unwrap();
        let c = Classified {
            vm,
            inspections: Vec::new(),
        };
        let mut q = Monitor::qmp(&sock, Duration::from_secs(5)).unwrap();
        let disks = plan_disks(&ctx, &mut q, &c, &[volume.to_string()]).unwrap();
        assert_eq!(disks[0].old, [format!("{stable}-2")]);
        assert!(seen
            .lock()
            .unwrap()
            .contains(&"block-dirty-bitmap-remove".to_string()));
        assert!(paths.marker.exists(), "fingerprints still trusted");
    }
}
