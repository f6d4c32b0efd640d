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
    let q = guest::start(
        &log,
        &[
            "-drive".into(),
            format!("file={},format=raw,if=virtio", img.display()),
        ],
        &[],
    );
    let out = std::panic::catch_unwind(|| guest::wait_serial(&log, "CDM-GUEST: ready", 120));
    drop(q);
    let out = out.unwrap();
    assert!(out.contains("CDM-GUEST-MARKER: first"), "{out}");
}

fn wait_job(api: &Api, id: u64) -> serde_json::Value {
    wait_for(300, &format!("job {id}"), || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        (j["state"] != "running" && j["state"] != "queued").then_some(j)
    })
}

fn console(api: &Api, rec: &str) -> String {
    let (s, v) = api.call("GET", &format!("/v1/vm-recoveries/{rec}/console"), None);
    assert_eq!(s, 200, "{v}");
    match v {
        serde_json::Value::String(t) => t,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn wait_console(api: &Api, rec: &str, needle: &str) -> String {
    wait_for(240, &format!("{needle:?} on {rec}'s console"), || {
        let c = console(api, rec);
        c.contains(needle).then_some(c)
    })
}

/// Starts a recovery and waits for its job; the recovery's name.
fn recover(api: &Api, vm: &str, body: serde_json::Value) -> String {
    let j = api.expect(202, "POST", &format!("/v1/vms/{vm}/recoveries"), Some(body));
    let j = wait_job(api, j["id"].as_u64().unwrap());
    assert_eq!(j["state"], "succeeded", "{j}");
    j["result"]["recovery"].as_str().unwrap().to_string()
}

fn alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        .unwrap_or(false)
}

/// A VM backed up by category is booted on the appliance from its point
/// (clones over NBD, qemu) while its source image changes: the guest shows
/// the point's data. Its state, console and domain XML are served; it is
/// stopped with its clones deleted, or kept (promoted); bad requests and
/// incomplete points are refused with the reason; a guest that powers off
/// is `stopped` with its console kept.
#[test]
fn instant_recovery_boots_the_point_while_the_source_changes() {
    let _g = shared();
    let mut app = Appliance::start(None);
    let token = std::fs::read_to_string(app.data.join("admin.token")).unwrap();
    let api = Api::new(&app, token.trim());
    let agent = AgentCli::new(&app);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let web = guest::build_guest(
        dir.path(),
        "web1",
        &GuestSpec {
            size: 1 << 30,
            marker: "point-one",
            run_script: None,
            files: &[],
        },
    );
    let off = guest::build_guest(
        dir.path(),
        "off1",
        &GuestSpec {
            size: 256 << 20,
            marker: "short-lived",
            run_script: Some("#!/bin/sh\nsleep 1\necho CDM-GUEST: powering off\npoweroff -f\n"),
            files: &[],
        },
    );
    // A VM whose second disk cannot be read: its point is incomplete.
    let half = dir.path().join("half.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&off)
        .arg(&half));
    let inv = dir.path().join("inventory");
    std::fs::create_dir(&inv).unwrap();
    let missing = dir.path().join("missing.raw");
    for (name, disks) in [
        ("web1", vec![web.as_path()]),
        ("off1", vec![off.as_path()]),
        ("half", vec![half.as_path(), missing.as_path()]),
    ] {
        std::fs::write(
            inv.join(format!("{name}.xml")),
            guest::domain_xml(name, &disks, 256, 1),
        )
        .unwrap();
    }
    let inv_s = inv.to_str().unwrap();
    let out = output(&mut agent.cmd(&[
        "vm",
        "backup",
        "--inventory",
        inv_s,
        "--category",
        "os:linux",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "half's backup must fail: {text}");
    assert!(
        text.contains("1 VM(s) of category os:linux failed"),
        "{text}"
    );
    // The source moves on after the backup.
    guest::set_marker(&web, "after-backup");

    // Refusals, before anything is made.
    let e = api.expect(
        409,
        "POST",
        "/v1/vms/half/recoveries",
        Some(serde_json::json!({"accel": "tcg"})),
    );
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("no complete point") && m.contains("[1]"), "{m}");
    api.expect(
        404,
        "POST",
        "/v1/vms/nosuch/recoveries",
        Some(serde_json::json!({})),
    );
    api.expect(
        400,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"network": "bridge"})),
    );
    api.expect(
        400,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"accel": "xen"})),
    );
    api.expect(
        400,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"memory_mib": 1})),
    );
    api.expect(
        400,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"name": "../x"})),
    );
    api.expect(
        400,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"bogus": 1})),
    );
    api.expect(
        201,
        "POST",
        "/v1/users",
        Some(
            serde_json::json!({"name": "aud", "role": "auditor", "password": "a-long-password-1"}),
        ),
    );
    let t = api.expect(
        201,
        "POST",
        "/v1/users/aud/tokens",
        Some(serde_json::json!({"name": "t"})),
    );
    let auditor = Api::new(&app, t["token"].as_str().unwrap());
    auditor.expect(
        403,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({})),
    );
    assert_eq!(api.get("/v1/vm-recoveries"), serde_json::json!([]));

    // Instant recovery: the point's data, not the source's.
    let t0 = std::time::Instant::now();
    let rec = recover(
        &api,
        "web1",
        serde_json::json!({"accel": "tcg", "network": "none"}),
    );
    let c = wait_console(&api, &rec, "CDM-GUEST: ready");
    eprintln!(
        "web1 answered on its console {:.1} s after the request",
        t0.elapsed().as_secs_f64()
    );
    assert!(c.contains("CDM-GUEST-MARKER: point-one"), "{c}");
    let r = auditor.get(&format!("/v1/vm-recoveries/{rec}"));
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["vm"], "web1");
    assert_eq!(r["memory_mib"], 256);
    assert_eq!(r["accel"], "tcg");
    let pid = r["pid"].as_u64().unwrap();
    assert!(alive(pid), "qemu {pid} is not running");
    let clone = format!("vmrec-{rec}-disk0");
    assert_eq!(r["clones"], serde_json::json!([clone]));
    let x = auditor.get(&format!("/v1/vm-recoveries/{rec}/domain.xml"));
    let x = x.as_str().unwrap();
    assert!(
        x.contains(&format!("<source protocol='nbd' name='{clone}'>")),
        "{x}"
    );
    assert!(x.contains("<memory unit='MiB'>256</memory>"), "{x}");
    // A name in use is refused.
    api.expect(
        409,
        "POST",
        "/v1/vms/web1/recoveries",
        Some(serde_json::json!({"name": rec, "accel": "tcg"})),
    );
    auditor.expect(403, "DELETE", &format!("/v1/vm-recoveries/{rec}"), None);

    // A second copy, on a user-mode network, kept when it stops.
    let kept = recover(
        &api,
        "web1",
        serde_json::json!({"accel": "tcg", "network": "user", "name": "keepme"}),
    );
    assert_eq!(kept, "keepme");
    wait_console(&api, &kept, "CDM-GUEST-MARKER: point-one");
    assert_eq!(api.get("/v1/vm-recoveries").as_array().unwrap().len(), 2);
    let k = api.expect(200, "DELETE", "/v1/vm-recoveries/keepme?keep=true", None);
    assert_eq!(k["clones"], serde_json::json!(["vmrec-keepme-disk0"]));
    let v = api.get("/v1/volumes/vmrec-keepme-disk0");
    assert_ne!(v["kind"], "clone", "a kept clone is promoted: {v}");
    api.expect(404, "GET", "/v1/vm-recoveries/keepme", None);

    // Stop and discard.
    let s = api.expect(200, "DELETE", &format!("/v1/vm-recoveries/{rec}"), None);
    assert_eq!(s["state"], "stopped", "{s}");
    wait_for(20, "qemu to end", || (!alive(pid)).then_some(()));
    api.expect(404, "GET", &format!("/v1/volumes/{clone}"), None);
    assert_eq!(api.get("/v1/vm-recoveries"), serde_json::json!([]));

    // The same from cdmctl.
    let cli = |args: &[&str]| -> String {
        let o = app.cdmctl(args);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "cdmctl {args:?}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        text
    };
    let p: serde_json::Value =
        serde_json::from_str(&cli(&["--json", "vm", "points", "web1"])).unwrap();
    assert_eq!(p[0]["complete"], true, "{p}");
    assert!(cli(&["vm", "points", "half"]).contains("NO (missing [1])"));
    let r: serde_json::Value = serde_json::from_str(&cli(&[
        "--json",
        "vm",
        "recover",
        "web1",
        "--accel",
        "tcg",
        "--name",
        "cli",
        "--memory-mib",
        "192",
        "--wait",
    ]))
    .unwrap();
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["memory_mib"], 192, "{r}");
    assert!(cli(&["vm", "list-recovered"]).contains("cli"));
    wait_for(240, "the marker through cdmctl", || {
        cli(&["vm", "console", "cli"])
            .contains("CDM-GUEST-MARKER: point-one")
            .then_some(())
    });
    assert!(cli(&["vm", "domain-xml", "cli"]).contains("vmrec-cli-disk0"));
    cli(&["vm", "stop", "cli"]);
    assert!(!app.cdmctl(&["vm", "show", "cli"]).status.success());

    // A guest that powers off: stopped, its console kept until removed.
    let o = recover(&api, "off1", serde_json::json!({"accel": "tcg"}));
    let r = wait_for(240, "off1 to power off", || {
        let r = api.get(&format!("/v1/vm-recoveries/{o}"));
        (r["state"] != "running").then_some(r)
    });
    assert_eq!(r["state"], "stopped", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("powered off"), "{r}");
    let c = console(&api, &o);
    assert!(c.contains("CDM-GUEST: powering off"), "{c}");
    api.expect(200, "DELETE", &format!("/v1/vm-recoveries/{o}"), None);
    api.expect(404, "GET", &format!("/v1/volumes/vmrec-{o}-disk0"), None);

    // The appliance is killed under a running recovery: its qemu ends with
    // the daemon, the record says so, and its clones are still removable.
    let r = recover(
        &api,
        "web1",
        serde_json::json!({"accel": "tcg", "name": "across"}),
    );
    let pid = api.get(&format!("/v1/vm-recoveries/{r}"))["pid"]
        .as_u64()
        .unwrap();
    app.kill();
    app.restart();
    wait_for(20, "qemu to end with snapshotd", || {
        (!alive(pid)).then_some(())
    });
    let api = Api::new(&app, token.trim());
    let a = api.get("/v1/vm-recoveries/across");
    assert_eq!(a["state"], "stopped", "{a}");
    assert_eq!(a["reason"], "the appliance restarted", "{a}");
    api.get("/v1/volumes/vmrec-across-disk0");
    api.expect(200, "DELETE", "/v1/vm-recoveries/across", None);
    api.expect(404, "GET", "/v1/volumes/vmrec-across-disk0", None);
}
