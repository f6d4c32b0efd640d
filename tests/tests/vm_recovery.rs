//! Instant VM recovery end to end: a bootable guest (tests/src/guest.rs)
//! backed up by category, booted on the appliance from clones of its point
//! over NBD with the private qemu-system, while its source changes.

use std::process::Command;

use cdm_e2e::guest::{self, GuestSpec};
use cdm_e2e::*;

/// The guest kit boots by itself (the base every VM test stands on):
/// SeaBIOS → extlinux → kernel → the initramfs prints the disk's marker.
#[test]
fn the_test_guest_boots_from_its_own_disk() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let img = guest::build_guest(
        dir.path(),
        "g",
        &GuestSpec {
            size: 256 << 20,
            marker: "first",
            run_script: None,
            files: &[],
        },
    );
    let log = dir.path().join("serial.log");
    let mut q = Command::new(guest::qemu_system())
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", img.display()))
        .args(["-nic", "none"])
        .spawn()
        .unwrap();
    let out = std::panic::catch_unwind(|| guest::wait_serial(&log, "CDM-GUEST: ready", 120));
    let _ = q.kill();
    let _ = q.wait();
    let out = out.unwrap();
    assert!(out.contains("CDM-GUEST-MARKER: first"), "{out}");
}
