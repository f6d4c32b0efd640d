//! The appliance image, built and booted (issue 18's CI smoke; the update,
//! rollback and power-cut scenarios are `scripts/test-image`): one build
//! from this tree's binaries, one first boot in a UEFI VM to a healthy
//! appliance, checked from outside as an admin would — the console banner
//! and the first boot's admin token, the HTTPS API and the web console,
//! NBD over TLS, the pool grown to the disk, the slots' status.

use std::path::Path;

use cdm_api::types::{SnapshotCreate, VolumeCreate};
use cdm_e2e::appliance_vm::{build, keygen, slot_of, token_from_console, Vm};
use cdm_e2e::random_bytes;
use nbd_proto::client::ClientOptions;
use nbd_proto::ClientTls;
use serde_json::{json, Value};

/// The first boot's console: the banner and the token, shown once.
fn first_boot(vm: &mut Vm, version: &str) -> String {
    let log = vm.wait_console("first boot: admin token ", 1, 900);
    assert!(
        log.contains(&format!("cdm appliance {version} (slot a)")),
        "banner with the version and slot"
    );
    assert!(
        log.contains("web console and API: https://10.0.2.15:8443/"),
        "banner with the URL"
    );
    assert!(log.contains("NBD: 10.0.2.15:10809"), "banner with NBD");
    vm.token = token_from_console(&log);
    assert!(
        vm.token.as_deref().is_some_and(|t| t.len() > 20),
        "a token on the console"
    );
    log
}

#[test]
fn the_image_boots_to_a_healthy_appliance_serving_api_console_and_nbd() {
    let _g = cdm_e2e::exclusive();
    let work = tempfile::Builder::new()
        .prefix("cdm-image-")
        .tempdir_in(cdm_e2e::appliance_vm::repo().join("target"))
        .expect("work dir");
    let key = keygen(&work.path().join("keys"), "release");
    let img = build(&work.path().join("out"), &key, "1.0.0-smoke", None, false);
    // The root image holds what the appliance runs, and nothing of the build.
    assert!(img.out.join("rootfs.squashfs").exists());
    let packages = std::fs::read_to_string(img.out.join("packages.txt")).expect("packages.txt");
    assert!(
        packages.lines().any(|l| l.starts_with("systemd ")),
        "{packages}"
    );
    // Its units as systemd's checker sees them in the image's own root.
    let root = img.out.join("work/root");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args([
            "snapshotd.service",
            "systemd-repart.service",
            "cdm-health.service",
            "cdm-banner.service",
            "cdm-update.path",
            "cdm-update.service",
        ])
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert!(passwd.contains("cdm:x:900:900:"), "the cdm user: {passwd}");

    // Written to a disk 2 GiB larger than the image: first boot grows the
    // data partition, and the pool takes 90% of it.
    let mut vm = Vm::create(&work.path().join("vm"), &img.disk, 2 << 30);
    vm.start();
    let log = first_boot(&mut vm, &img.version);
    assert!(
        log.contains("Repartition Root Disk") && log.contains("Grow File System on /var/lib/cdm"),
        "systemd-repart and growfs ran at boot"
    );
    vm.fetch_ca();
    let c = vm.client();
    let h = c.health().expect("health");
    assert_eq!(h["status"], "ok", "{h}");
    let pool = c.pool().expect("pool");
    let pool_v = serde_json::to_value(&pool).expect("pool json");
    let total = pool_v["total_bytes"].as_u64().expect("total_bytes");
    assert!(
        total > (9 << 29) && total < (6 << 30),
        "the pool takes 90% of the grown 6 GiB data partition: {pool_v}"
    );

    // The slots as `cdmctl appliance status` shows them.
    let st = vm.cdmctl(&["appliance", "status"]);
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st: Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert_eq!(st["booted_slot"], "a", "{st}");
    assert_eq!(st["version"], img.version.as_str(), "{st}");
    let slot = |s: &str| slot_of(&st, s);
    assert_eq!(slot("a")["state"], "good", "{st}");
    assert_eq!(slot("a")["booted"], true, "{st}");
    assert_eq!(slot("b")["state"], "empty", "{st}");

    // The web console is served over HTTPS with the pinned CA.
    let (code, _) = c.request("GET", "/", None).unwrap_or((0, Value::Null));
    assert_eq!(code, 200, "the web console's page");

    // NBD over TLS from outside: a volume written, snapshotted, read back.
    let req: VolumeCreate =
        serde_json::from_value(json!({"name": "smoke", "size": 64 << 20})).expect("req");
    c.create_volume(&req).expect("volume");
    let opts = ClientOptions {
        tls: Some(ClientTls::from_ca_file(&vm.ca).expect("ca")),
        ..Default::default()
    };
    let addr = format!("127.0.0.1:{}", vm.nbd_port);
    let data = random_bytes(1 << 20, 18);
    let mut n = nbd_proto::Client::connect(&addr, Some("smoke"), &opts).expect("nbd");
    n.write(4 << 20, &data, true).expect("nbd write");
    n.flush().expect("flush");
    drop(n);
    let snap = c
        .create_snapshot("smoke", &SnapshotCreate::default())
        .expect("snapshot");
    let mut n = nbd_proto::Client::connect(&addr, Some("smoke"), &opts).expect("nbd");
    let mut back = vec![0u8; data.len()];
    n.read(4 << 20, &mut back).expect("nbd read");
    assert!(back == data, "NBD reads back what was written");
    assert!(snap.id > 0);
    drop(n);
    write_marker(work.path());
}

/// Leaves the built image's size in the log for docs/testing.md.
fn write_marker(dir: &Path) {
    let img = dir.join("out/rootfs.squashfs");
    if let Ok(m) = std::fs::metadata(img) {
        eprintln!("rootfs.squashfs: {} MiB", m.len() >> 20);
    }
}
