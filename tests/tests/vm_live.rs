//! Backups of a running VM through QMP (agent/src/vm_live.rs): the test
//! guest (tests/src/guest.rs) runs on a qcow2 disk under the private
//! qemu-system (TCG) and keeps writing files with their checksums while it
//! is backed up full, then incrementally from its persistent dirty bitmap;
//! each point's ext4 checks clean and holds what was written before it; a
//! failed incremental loses no dirty bit; a dead QMP socket is a clear
//! error.

use std::path::Path;
use std::process::Command;

use cdm_e2e::guest::{self, GuestSpec};
use cdm_e2e::*;
use serde_json::Value;

/// Appends a file of random bytes and its checksum, syncs, and says so on
/// the serial console, forever.
const WRITER: &str = r#"#!/bin/busybox sh
mkdir -p /mnt/data
cd /mnt/data
i=0
while true; do
  i=$((i+1))
  dd if=/dev/urandom of=f$i bs=64k count=2 2>/dev/null
  md5sum f$i >> sums
  sync
  echo "CDM-WRITE $i"
  sleep 0.3
done
"#;

/// The qemu of the test, killed even when the test fails.
/// The last `CDM-WRITE n` on the serial console.
fn writes(log: &Path) -> u64 {
    let s = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("CDM-WRITE "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_writes(log: &Path, n: u64) -> u64 {
    wait_for(120, "the guest's writes", || {
        let w = writes(log);
        (w >= n).then_some(w)
    })
}

/// Copies a point to a raw file, replays its journal (a mount of the
/// copy), checks every checksummed file and that files 1..=`at_least`
/// are there, then `e2fsck -fn` the partition: it must be clean.
fn check_point(app: &Appliance, work: &Path, export: &str, at_least: u64) {
    let raw = work.join(format!("{}.raw", export.replace(['@', '/'], "_")));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &app.unix_uri(export)])
        .arg(&raw));
    let dev = run(Command::new("losetup")
        .args(["-f", "--show", "-o", "1048576"])
        .arg(&raw))
    .trim()
    .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _d = Detach(dev.clone());
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount").arg(&dev).arg(&mnt));
    let sums = std::fs::read_to_string(mnt.join("data/sums")).unwrap_or_default();
    let check = Command::new("md5sum")
        .args(["-c", "sums"])
        .current_dir(mnt.join("data"))
        .output();
    let present: Vec<bool> = (1..=at_least)
        .map(|i| mnt.join(format!("data/f{i}")).exists())
        .collect();
    run(Command::new("umount").arg(&mnt));
    let check = check.unwrap();
    assert!(
        check.status.success(),
        "{export}: checksums differ:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(
        sums.lines().count() as u64 >= at_least && present.iter().all(|p| *p),
        "{export}: files written before the point are missing ({} checksums, want {at_least})",
        sums.lines().count()
    );
    let fsck = output(Command::new("e2fsck").args(["-fn", &dev]));
    assert!(
        fsck.status.success(),
        "{export}: e2fsck -fn: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let _ = std::fs::remove_file(&raw);
}

/// The dirty bitmaps qemu has on `node`, asked over QMP by the test.
fn bitmaps(qmp: &Path, node: &str) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(qmp).expect("QMP socket");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    writeln!(w, r#"{{"execute": "qmp_capabilities"}}"#).unwrap();
    writeln!(
        w,
        r#"{{"execute": "query-named-block-nodes", "arguments": {{"flat": true}}, "id": 2}}"#
    )
    .unwrap();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            let n = v["return"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node-name"] == node);
            return n.expect("the disk node")["dirty-bitmaps"]
                .as_array()
                .cloned()
                .unwrap_or_default();
        }
    }
}

fn disk0(b: &Value) -> &Value {
    &b["vms"][0]["disks"][0]
}

#[test]
fn a_running_vm_is_backed_up_live_full_then_incremental() {
    let _g = shared();
    for t in ["qemu-img", "qemu-nbd", "e2fsck", "losetup", "md5sum"] {
        require(t);
    }
    let dir = tempfile::Builder::new()
        .prefix("cdm-vm-live-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work = dir.path();
    let raw = guest::build_guest(
        work,
        "live1",
        &GuestSpec {
            size: 256 << 20,
            marker: "live",
            run_script: Some(WRITER),
            files: &[],
        },
    );
    let disk = work.join("live1.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk));
    let _ = std::fs::remove_file(&raw);
    let qmp = work.join("live1.qmp");
    let log = work.join("serial.log");
    // The disk's format node is found by its file (query-named-block-nodes):
    // named here, but qemu's own `#blockNNN` names work the same.
    let _vm = guest::start(
        &log,
        &[
            "-blockdev".into(),
            format!(
                "driver=file,filename={},node-name=live1-file",
                disk.display()
            ),
            "-blockdev".into(),
            "driver=qcow2,file=live1-file,node-name=live1-disk".into(),
            "-device".into(),
            "virtio-blk-pci,drive=live1-disk".into(),
        ],
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ],
    );
    guest::wait_serial(&log, "CDM-GUEST: ready", 180);
    wait_writes(&log, 3);

    let app = Appliance::start(None);
    let agent = AgentCli::new(&app);
    let inv = work.join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"live1\"\ndisks = [{{ source = \"{}\", format = \"qcow2\" }}]\nqmp = \"{}\"\n",
            disk.display(),
            qmp.display()
        ),
    )
    .unwrap();
    let inv_s = inv.to_str().unwrap();
    let backup = |extra: &[&str]| {
        let mut a = vec![
            "vm",
            "backup",
            "--inventory",
            inv_s,
            "--category",
            "keyword:live1",
        ];
        a.extend_from_slice(extra);
        agent.ok(&a)
    };

    // Full: the whole allocated disk, a persistent bitmap made.
    let n1 = writes(&log);
    let b1 = backup(&[]);
    let d1 = disk0(&b1);
    assert_eq!(d1["block"]["mode"], "full", "{b1}");
    assert!(
        d1["live"]["bitmap"].as_str().unwrap().starts_with("cdm-"),
        "{b1}"
    );
    let full = d1["bytes_written"].as_u64().unwrap();
    assert!(full > 8 << 20, "{b1}");

    // Incremental: only what the bitmap marks.
    wait_writes(&log, writes(&log) + 3);
    let n2 = writes(&log);
    let b2 = backup(&[]);
    let d2 = disk0(&b2);
    assert_eq!(d2["block"]["mode"], "dirty-bitmap", "{b2}");
    let inc = d2["bytes_written"].as_u64().unwrap();
    assert!(
        inc > 0 && inc * 8 < full,
        "incremental {inc} vs full {full}: {b2}"
    );
    assert!(
        d2["block"]["bytes_read"].as_u64().unwrap() * 8 < full,
        "an incremental reads only dirty extents: {b2}"
    );
    assert_eq!(d2["live"]["merged"][0], d1["live"]["bitmap"], "{b2}");
    eprintln!(
        "vm_live figures: full wrote {full} B in {:.2} s; incremental read {} B, wrote {inc} B in {:.2} s; transaction {:.1} ms",
        d1["seconds"].as_f64().unwrap_or_default(),
        d2["block"]["bytes_read"],
        d2["seconds"].as_f64().unwrap_or_default(),
        d2["live"]["transaction_ms"].as_f64().unwrap_or_default()
    );

    // A failed incremental (the appliance's NBD silent for 3 s, then
    // gone, after the point was taken: the guest writes meanwhile) keeps
    // its dirty bits: the next one has those writes.
    wait_writes(&log, writes(&log) + 3);
    let silent = work.join("no-nbd.sock");
    let l = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    std::thread::spawn(move || {
        if let Ok((c, _)) = l.accept() {
            std::thread::sleep(std::time::Duration::from_secs(3));
            drop(c);
        }
    });
    let t = std::time::Instant::now();
    let out = output(
        Command::new(bin("cdm-agent"))
            .args(["--url", &agent.url, "--token-file"])
            .arg(&agent.token)
            .arg("--nbd")
            .arg(format!("unix:{}", silent.display()))
            .arg("--state-dir")
            .arg(agent.state.path())
            .args(["--json", "vm", "backup", "--inventory", inv_s])
            .args(["--category", "keyword:live1"]),
    );
    assert!(!out.status.success(), "the backup with no NBD should fail");
    let held = t.elapsed();
    wait_writes(&log, writes(&log) + 3);
    let n3 = writes(&log);
    assert!(
        held >= std::time::Duration::from_secs(2),
        "the failed run held its point only {held:?}: the guest had no time to write"
    );
    // --freeze with no guest agent: a warning, the point still taken.
    let b3 = backup(&["--freeze", "--qmp-dir", work.to_str().unwrap()]);
    let d3 = disk0(&b3);
    assert_eq!(d3["block"]["mode"], "dirty-bitmap", "{b3}");
    assert!(
        d3["live"]["freeze"]
            .as_str()
            .unwrap()
            .starts_with("skipped"),
        "{b3}"
    );
    assert!(d3["bytes_written"].as_u64().unwrap() * 4 < full, "{b3}");
    // After the failure and the good run: one persistent recording bitmap,
    // the one this run made; no overlay, export or temporary file left.
    let bm = bitmaps(&qmp, "live1-disk");
    assert_eq!(bm.len(), 1, "{bm:?}");
    assert_eq!(bm[0]["name"], d3["live"]["bitmap"], "{bm:?}");
    assert_eq!(
        (&bm[0]["persistent"], &bm[0]["recording"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    let left: Vec<_> = std::fs::read_dir(agent.state.path().join("fleece"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    for (b, n) in [(&b1, n1), (&b2, n2), (&b3, n3)] {
        check_point(&app, work, disk0(b)["export"].as_str().unwrap(), n);
    }

    // A QMP socket nobody answers on: a clear error, nothing copied.
    let dead = work.join("dead.toml");
    std::fs::write(
        &dead,
        format!(
            "[[vm]]\nname = \"dead1\"\ndisks = [{{ source = \"{}\", format = \"qcow2\" }}]\nqmp = \"{}\"\n",
            disk.display(),
            work.join("dead1.qmp").display()
        ),
    )
    .unwrap();
    let e = agent.fail(&[
        "vm",
        "backup",
        "--inventory",
        dead.to_str().unwrap(),
        "--category",
        "keyword:dead1",
    ]);
    assert!(
        e.contains("dead1.qmp is not reachable") && e.contains("locked by the running qemu"),
        "{e}"
    );
}
