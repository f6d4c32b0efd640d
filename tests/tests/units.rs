//! The systemd units in `systemd/` as shipped: systemd's own checker finds
//! nothing to say about them (unknown keys, missing binaries, bad
//! dependencies) in a root holding this tree's binaries where the units
//! name them, the sysusers file makes the `cdm` user they run as, and no
//! two units fight over one pool or one port. (The image's units are
//! checked the same way on the image's root by tests/image_boot.rs,
//! and run for real in its VM.)

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::{bin, require};

fn repo() -> PathBuf {
    cdm_e2e::appliance_vm::repo()
}

/// A root with systemd's units and ours under usr/lib/systemd/system and the binaries
/// they start under usr/bin (copies: the checker resolves paths inside
/// the root).
fn unit_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).expect("units dir");
    std::fs::create_dir_all(root.join("usr/bin")).expect("bin dir");
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    // systemd's own units (the targets ours hang on), from this machine.
    cdm_e2e::run(
        Command::new("cp")
            .args(["-a", "/lib/systemd/system/."])
            .arg(&units),
    );
    for b in ["snapshotd", "cdm-agent", "cdm-nbd"] {
        std::fs::copy(bin(b), root.join("usr/bin").join(b)).expect("binary");
    }
    for e in std::fs::read_dir(repo().join("systemd")).expect("systemd/") {
        let p = e.expect("entry").path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".service") || name.ends_with(".socket") {
            std::fs::copy(&p, units.join(&name)).expect("unit");
        }
    }
    root
}

/// `systemd-analyze verify` in `root`; every line it prints is a finding.
fn verify(root: &Path, units: &[&str]) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .expect("systemd-analyze");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    text
}

#[test]
fn shipped_units_verify_clean_with_the_recovery_drop_in_too() {
    require("systemd-analyze");
    let dir = tempfile::Builder::new()
        .prefix("cdm-units-")
        .tempdir_in(repo().join("target"))
        .expect("dir");
    let root = unit_root(dir.path());
    let all = [
        "snapshotd.service",
        "cdm-agent.service",
        "cdm-nbd.socket",
        "cdm-nbd.service",
    ];
    let found = verify(&root, &all);
    assert!(found.trim().is_empty(), "findings:\n{found}");
    // The recovery drop-in as documented, over the hardened unit.
    let d = root.join("etc/systemd/system/snapshotd.service.d");
    std::fs::create_dir_all(&d).expect("drop-in dir");
    std::fs::copy(
        repo().join("systemd/snapshotd-recovery.conf"),
        d.join("recovery.conf"),
    )
    .expect("drop-in");
    let found = verify(&root, &["snapshotd.service"]);
    assert!(found.trim().is_empty(), "findings:\n{found}");
    // The checker is not silent by default: a unit it must refuse.
    std::fs::write(
        root.join("usr/lib/systemd/system/broken.service"),
        "[Service]\nNoSuchKey=1\nExecStart=/usr/bin/none\n",
    )
    .expect("broken unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("broken.service")
        .output()
        .expect("systemd-analyze");
    assert!(!out.status.success(), "a missing binary passed the checker");
}

#[test]
fn the_recovery_drop_in_keeps_the_hosts_mount_namespace() {
    // Mounts made by snapshotd (instant mounts, the FUSE view) must be
    // visible from the host: none of the options that give a service its
    // own mount namespace may survive the drop-in.
    let base = std::fs::read_to_string(repo().join("systemd/snapshotd.service")).expect("unit");
    let drop_in =
        std::fs::read_to_string(repo().join("systemd/snapshotd-recovery.conf")).expect("drop-in");
    let set = |text: &str, key: &str| -> Option<String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .next_back()
    };
    let namespacing = [
        ("PrivateUsers", "no"),
        ("PrivateTmp", "no"),
        ("PrivateDevices", "no"),
        ("PrivateMounts", "no"),
        ("ProtectSystem", "no"),
        ("ProtectHome", "no"),
        ("ProtectKernelTunables", "no"),
        ("ProtectKernelModules", "no"),
        ("ProtectKernelLogs", "no"),
        ("ProtectControlGroups", "no"),
        ("ProtectHostname", "no"),
        ("ProtectClock", "no"),
        ("ProtectProc", "default"),
        ("ProcSubset", "all"),
    ];
    for (key, off) in namespacing {
        let effective = set(&drop_in, key).or_else(|| set(&base, key));
        assert!(
            effective
                .as_deref()
                .is_none_or(|v| v == off || v == "false"),
            "{key}={effective:?} would give the recovery service a private mount namespace"
        );
    }
    for key in [
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "TemporaryFileSystem",
    ] {
        assert!(
            set(&drop_in, key).is_none() && set(&base, key).is_none(),
            "{key} makes a mount namespace"
        );
    }
}

#[test]
fn sysusers_makes_the_cdm_user_and_no_two_units_share_a_pool_or_port() {
    require("systemd-sysusers");
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(repo().join("systemd/cdm.sysusers"))
        .output()
        .expect("systemd-sysusers");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert!(
        passwd.lines().any(|l| l.starts_with("cdm:x:900:900:")),
        "{passwd}"
    );
    // Where each server keeps its pool: never the same file.
    let unit = |n: &str| std::fs::read_to_string(repo().join("systemd").join(n)).expect(n);
    let snapd = unit("snapshotd.service");
    let nbd = unit("cdm-nbd.service");
    assert!(
        snapd.contains("--data /var/lib/cdm "),
        "snapshotd's pool is /var/lib/cdm/pool"
    );
    assert!(nbd.contains("--pool /var/lib/cdm-nbd/pool"), "{nbd}");
    for n in ["cdm-nbd.service", "cdm-nbd.socket"] {
        assert!(
            unit(n)
                .lines()
                .any(|l| l.trim() == "Conflicts=snapshotd.service"),
            "{n} must conflict with snapshotd (port 10809)"
        );
    }
}
