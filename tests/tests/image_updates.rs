//! The appliance's A/B updates in a VM, end to end (issue 18's full
//! scenario set; `scripts/test-image` runs it, about 20 minutes: every
//! boot is software-emulated). One appliance lives through, in order:
//!
//! 1. first boot of version 1 in slot A; a volume with data and a snapshot;
//! 2. refused bundles (another key, a flipped byte, truncated): nothing
//!    changes, no reboot;
//! 3. a power cut (qemu killed) while version 2 is being written into
//!    slot B: slot A boots again and serves the same pool;
//! 4. the good update to version 2: slot B boots, passes its health check,
//!    is marked good; every volume and snapshot is still there;
//! 5. an update whose snapshotd cannot start (health check fails): slot A
//!    is tried three times, then slot B (version 2) boots again;
//! 6. an update whose kernel cannot boot (initrd garbage: a panic): the
//!    same, within three tries.
//!
//! Built with `--features image-long` so the suite's `cargo test` leaves it
//! to its own command (CI runs the short boot smoke, image_boot.rs).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cdm_api::types::{SnapshotCreate, VolumeCreate};
use cdm_e2e::appliance_vm::{build, keygen, slot_of, tail, token_from_console, Image, Vm};
use cdm_e2e::{bin, random_bytes, run};
use nbd_proto::client::ClientOptions;
use nbd_proto::ClientTls;
use serde_json::{json, Value};

const BOOT_SECS: u64 = 900;

fn status(vm: &Vm) -> Value {
    let (code, v) = vm
        .client()
        .request("GET", "/v1/appliance", None)
        .expect("GET /v1/appliance");
    assert_eq!(code, 200, "{v}");
    v
}

/// Waits for the API to answer after a boot (the banner of boot `n`).
fn wait_up(vm: &mut Vm, boots: usize) {
    vm.wait_console("web console and API: https://", boots, BOOT_SECS);
    cdm_e2e::wait_for(120, "the API after boot", || {
        vm.client().health().ok().filter(|h| h["status"] == "ok")
    });
}

fn nbd(vm: &Vm, export: &str) -> nbd_proto::Client {
    let opts = ClientOptions {
        tls: Some(ClientTls::from_ca_file(&vm.ca).expect("ca")),
        ..Default::default()
    };
    nbd_proto::Client::connect(&format!("127.0.0.1:{}", vm.nbd_port), Some(export), &opts)
        .expect("nbd")
}

/// The pool still holds what step 1 wrote: the volume's data and its snapshot.
fn same_pool(vm: &Vm, data: &[u8], snaps: usize) {
    let mut n = nbd(vm, "keep");
    let mut back = vec![0u8; data.len()];
    n.read(8 << 20, &mut back).expect("read");
    assert!(back == data, "the volume's data survived");
    let s = vm.client().list_snapshots("keep").expect("snapshots");
    assert_eq!(s.len(), snaps, "snapshots survived");
}

/// Uploads a bundle with cdmctl (no wait); its output.
fn upload(vm: &Vm, bundle: &Path) -> std::process::Output {
    vm.cdmctl(&["appliance", "update", &bundle.display().to_string()])
}

/// Boots counted on the console whose kernel command line names `slot`.
fn boots_of(log: &str, slot: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("Kernel command line:") && l.contains(&format!("cdm.slot={slot}")))
        .count()
}

/// Waits until slot A, tried after `a_before` boots of it, has given way
/// to slot B again (the last boot on the console is B's); the tries of A.
fn wait_rollback(vm: &Vm, a_before: usize) -> usize {
    let t = Instant::now();
    loop {
        let log = vm.console();
        let tries = boots_of(&log, "a") - a_before;
        let b_last = log
            .rsplit("Kernel command line:")
            .next()
            .is_some_and(|last| last.contains("cdm.slot=b"));
        if tries >= 1 && b_last {
            return tries;
        }
        assert!(
            t.elapsed() < Duration::from_secs(4 * BOOT_SECS),
            "no rollback to slot B after {tries} tries of A; the console:\n{}",
            tail(&log, 8000)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A bundle of V2's root with another initrd: a kernel that cannot boot.
fn unbootable(v2: &Image, key: &Path, dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let junk = dir.join("initrd.img");
    std::fs::write(&junk, random_bytes(4 << 20, 6)).expect("junk initrd");
    let out = dir.join("cdm-appliance-4.0.0-noboot.cdmb");
    run(Command::new(bin("cdm-update"))
        .args(["bundle", "--version", "4.0.0-noboot", "--key"])
        .arg(key)
        .arg("--rootfs")
        .arg(v2.out.join("rootfs.squashfs"))
        .arg("--kernel")
        .arg(v2.out.join("vmlinuz"))
        .arg("--initrd")
        .arg(&junk)
        .arg("--out")
        .arg(&out));
    out
}

#[test]
fn updates_switch_slots_keep_the_pool_and_roll_back_failures() {
    let work = tempfile::Builder::new()
        .prefix("cdm-image-update-")
        .tempdir_in(cdm_e2e::appliance_vm::repo().join("target"))
        .expect("work dir");
    let w = work.path();
    let key = keygen(&w.join("keys"), "release");
    let other = keygen(&w.join("other-keys"), "other");
    let v1 = build(&w.join("v1"), &key, "1.0.0", None, false);
    let v2 = build(&w.join("v2"), &key, "2.0.0", None, true);
    // Version 3's snapshotd exits at once: the pool never opens.
    let broken = w.join("broken-root");
    std::fs::create_dir_all(broken.join("usr/bin")).expect("dir");
    std::fs::write(
        broken.join("usr/bin/snapshotd"),
        "#!/bin/sh\necho 'snapshotd 3.0.0: cannot open the pool' >&2\nexit 1\n",
    )
    .expect("broken snapshotd");
    run(Command::new("chmod")
        .arg("755")
        .arg(broken.join("usr/bin/snapshotd")));
    let v3 = build(&w.join("v3"), &key, "3.0.0-broken", Some(&broken), true);
    let v2_other = build(&w.join("v2-other"), &other, "2.0.0", None, true);

    // 1. First boot, some data.
    // 4 GiB more than the image: the pool takes 90% of the data partition,
    // and the 10% left must hold an uploaded bundle (~250 MiB) plus the
    // 256 MiB the upload route keeps free.
    let mut vm = Vm::create(&w.join("vm"), &v1.disk, 4 << 30);
    vm.start();
    let log = vm.wait_console("first boot: admin token ", 1, BOOT_SECS);
    vm.token = token_from_console(&log);
    vm.fetch_ca();
    wait_up(&mut vm, 1);
    let c = vm.client();
    let req: VolumeCreate =
        serde_json::from_value(json!({"name": "keep", "size": 64 << 20})).expect("req");
    c.create_volume(&req).expect("volume");
    let data = random_bytes(2 << 20, 18);
    let mut n = nbd(&vm, "keep");
    n.write(8 << 20, &data, true).expect("write");
    n.flush().expect("flush");
    drop(n);
    c.create_snapshot("keep", &SnapshotCreate::default())
        .expect("snapshot");
    let st = status(&vm);
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(slot_of(&st, "b")["state"], "empty", "{st}");

    // 2. Refusals: nothing is written, nothing reboots.
    let tampered = w.join("tampered.cdmb");
    let mut bytes = std::fs::read(&v2.bundle).expect("bundle");
    let at = bytes.len() - (1 << 20);
    bytes[at] ^= 0x40;
    std::fs::write(&tampered, &bytes).expect("tampered");
    let truncated = w.join("truncated.cdmb");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("truncated");
    for (bundle, why) in [
        (&v2_other.bundle, "key"),
        (&tampered, "hash"),
        (&truncated, "trunc"),
    ] {
        let out = upload(&vm, bundle);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{} was accepted", bundle.display());
        assert!(
            err.contains(why),
            "the refusal of {} says why: {err}",
            bundle.display()
        );
    }
    std::thread::sleep(Duration::from_secs(5));
    let st = status(&vm);
    assert_eq!(slot_of(&st, "b")["state"], "empty", "{st}");
    assert_eq!(
        boots_of(&vm.console(), "a") + boots_of(&vm.console(), "b"),
        1
    );

    // 3. Power cut while slot B is being written.
    let out = upload(&vm, &v2.bundle);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Instant::now();
    loop {
        let (_, st) = vm
            .client()
            .request("GET", "/v1/appliance", None)
            .unwrap_or((0, Value::Null));
        if st["update"]["state"] == "writing" {
            break;
        }
        assert!(
            st["update"]["state"] != "installed" && t.elapsed() < Duration::from_secs(300),
            "never saw the install writing: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.kill();
    vm.start();
    // Slot A boots and serves the same pool (the interrupted install is
    // not resumed: its bundle was consumed when it started).
    wait_up(&mut vm, 2);
    let st = status(&vm);
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(st["version"], "1.0.0", "{st}");
    assert_ne!(slot_of(&st, "b")["state"], "good", "{st}");
    same_pool(&vm, &data, 1);

    // 4. The good update: slot B boots, is checked, marked good.
    let out = vm.cdmctl(&[
        "appliance",
        "update",
        &v2.bundle.display().to_string(),
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "update --wait: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&vm.console(), 4000)
    );
    wait_up(&mut vm, 3);
    let st = status(&vm);
    assert_eq!(st["booted_slot"], "b", "{st}");
    assert_eq!(st["version"], "2.0.0", "{st}");
    assert_eq!(slot_of(&st, "b")["state"], "good", "{st}");
    assert_eq!(slot_of(&st, "a")["state"], "good", "{st}");
    same_pool(&vm, &data, 1);

    // 5. A version whose snapshotd cannot start: three tries, then back.
    let a_before = boots_of(&vm.console(), "a");
    let out = upload(&vm, &v3.bundle);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tries = wait_rollback(&vm, a_before);
    assert_eq!(tries, 3, "slot A tried {tries} times before the rollback");
    wait_up(&mut vm, 4);
    let st = status(&vm);
    assert_eq!(st["booted_slot"], "b", "{st}");
    assert_eq!(st["version"], "2.0.0", "{st}");
    assert_eq!(slot_of(&st, "a")["state"], "bad", "{st}");
    same_pool(&vm, &data, 1);

    // 6. A version that cannot boot at all: the same, within three tries.
    let noboot = unbootable(&v2, &key, &w.join("noboot"));
    let a_before = boots_of(&vm.console(), "a");
    let out = upload(&vm, &noboot);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tries = wait_rollback(&vm, a_before);
    assert!(tries <= 3, "slot A tried {tries} times");
    wait_up(&mut vm, 5);
    let st = status(&vm);
    assert_eq!(st["booted_slot"], "b", "{st}");
    assert_eq!(slot_of(&st, "a")["state"], "bad", "{st}");
    same_pool(&vm, &data, 1);
    eprintln!(
        "boots: slot a {}, slot b {}",
        boots_of(&vm.console(), "a"),
        boots_of(&vm.console(), "b")
    );
}
