//! VM restore end to end: a VM of three disks (raw with ext4 and files,
//! raw sparse, qcow2) backed up by `cdm-agent vm backup`, its sources
//! changed, then restored by `cdm-agent vm restore` to raw and qcow2 files
//! (compared with the backup-time copies by `qemu-img compare`, sparse,
//! `qemu-img check` clean), one disk alone, onto a loop device full of
//! garbage; the refusals; the API route and `cdmctl vm restore`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
// Past 512 MiB: a qcow2 of it needs two L2 tables.
const SPARSE_SIZE: u64 = 640 * MIB;
const ODD_SIZE: u64 = 64 * MIB + 12345;

/// A loop device over a file, detached when dropped (also when the test
/// fails).
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(file));
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    output(Command::new("qemu-img").args(args))
}

/// `qemu-img compare` must find the images identical.
fn same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let o = qemu_img(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn differ(a: &Path, fa: &str, b: &Path, fb: &str) {
    let o = qemu_img(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{} should differ from {}",
        a.display(),
        b.display()
    );
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The VM's disks and their backup-time copies.
struct Vm {
    dir: tempfile::TempDir,
    disks: [PathBuf; 3],
    kept: [PathBuf; 3],
    inventory: PathBuf,
}

const FORMATS: [&str; 3] = ["raw", "raw", "qcow2"];

impl Vm {
    fn make() -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("cdm-vmrestore-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        // Disk 0: ext4 with files, made from a directory; not a whole
        // number of the stage volume's blocks (restored to its own size).
        let tree = p("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(
            tree.join("etc/os-release"),
            "ID=debian\nVERSION_ID=\"12\"\n",
        )
        .unwrap();
        std::fs::write(tree.join("data.bin"), random_bytes(3 * MIB as usize, 7)).unwrap();
        let d0 = p("app1-root.img");
        std::fs::File::create(&d0)
            .unwrap()
            .set_len(ODD_SIZE)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&d0));
        // Disk 1: sparse, data at a few offsets.
        let d1 = p("app1-data.img");
        let f = std::fs::File::create(&d1).unwrap();
        f.set_len(SPARSE_SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        for (i, off) in [0, 100 * MIB + 4096, 600 * MIB, SPARSE_SIZE - MIB]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&random_bytes(MIB as usize, 100 + i as u64), off)
                .unwrap();
        }
        drop(f);
        // Disk 2: qcow2 with data written by qemu-io.
        let d2 = p("app1-logs.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&d2)
            .arg("64M"));
        run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 1M 2M",
                "-c",
                "write -P 0x11 40M 64k",
            ])
            .arg(&d2));
        let inventory = p("inventory.toml");
        std::fs::write(
            &inventory,
            format!(
                "[[vm]]\nname = \"app1\"\ndisks = [\"{}\", \"{}\", \"{}\"]\n",
                d0.display(),
                d1.display(),
                d2.display()
            ),
        )
        .unwrap();
        let kept = [p("kept0.raw"), p("kept1.raw"), p("kept2.qcow2")];
        let disks = [d0, d1, d2];
        Vm {
            dir,
            disks,
            kept,
            inventory,
        }
    }

    /// Copies the disks as they are now (sparse).
    fn keep(&self) {
        for (d, k) in self.disks.iter().zip(&self.kept) {
            run(Command::new("cp").arg("--sparse=always").arg(d).arg(k));
        }
    }

    /// Changes every disk after the backup.
    fn change(&self) {
        use std::os::unix::fs::FileExt;
        for d in &self.disks[..2] {
            let f = std::fs::OpenOptions::new().write(true).open(d).unwrap();
            f.write_all_at(&random_bytes(MIB as usize, 999), 20 * MIB)
                .unwrap();
        }
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x77 10M 1M"])
            .arg(&self.disks[2]));
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn restore_json_disk(v: &Value, disk: u64) -> &Value {
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap_or_else(|| panic!("no disk {disk} in {v}"))
}

#[test]
fn vm_restore_to_files_devices_and_through_the_api() {
    for t in [
        "qemu-img",
        "qemu-nbd",
        "qemu-io",
        "mkfs.ext4",
        "losetup",
        "findmnt",
    ] {
        require(t);
    }
    let app = Appliance::start(None);
    let agent = AgentCli::new(&app);
    let vm = Vm::make();
    let inv = vm.inventory.to_str().unwrap();
    let b = agent.ok(&[
        "vm",
        "backup",
        "--inventory",
        inv,
        "--category",
        "keyword:app1",
    ]);
    assert_eq!(b["vms"][0]["ok"], true, "{b}");
    vm.keep();
    vm.change();

    // To raw files: every disk, equal to its backup-time copy (not to the
    // changed source), the sparse one sparse.
    let raw = vm.out("raw");
    let r = agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        raw.to_str().unwrap(),
    ]);
    assert_eq!(r["disks"].as_array().unwrap().len(), 3, "{r}");
    for (i, (kept, fmt)) in vm.kept.iter().zip(FORMATS).enumerate() {
        let f = raw.join(format!("app1-disk{i}.raw"));
        same(&f, "raw", kept, fmt);
    }
    differ(&raw.join("app1-disk1.raw"), "raw", &vm.disks[1], "raw");
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&raw.join("app1-disk0.raw")), ODD_SIZE);
    let sparse = raw.join("app1-disk1.raw");
    assert_eq!(std::fs::metadata(&sparse).unwrap().len(), SPARSE_SIZE);
    assert!(
        allocated(&sparse) <= 8 * MIB,
        "the sparse disk takes {} bytes",
        allocated(&sparse)
    );
    let d1 = restore_json_disk(&r, 1);
    // Only what the backup stored was read: 4 MiB of data (the stage
    // volume's blocks round it up a little), not 256 MiB.
    let read = d1["bytes_read"].as_u64().unwrap();
    assert!((4 * MIB..=6 * MIB).contains(&read), "{d1}");
    // Zero runs are not written: the data, rounded to 64 KiB.
    let written = d1["bytes_written"].as_u64().unwrap();
    assert!((4 * MIB..=4 * MIB + 256 * 1024).contains(&written), "{d1}");
    assert!(r["mb_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(&raw)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");

    // To qcow2: clean, equal, sparse.
    let q = vm.out("qcow2");
    agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        q.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    for (i, (kept, fmt)) in vm.kept.iter().zip(FORMATS).enumerate() {
        let f = q.join(format!("app1-disk{i}.qcow2"));
        let c = qemu_img(&["check", "-f", "qcow2", f.to_str().unwrap()]);
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
        same(&f, "qcow2", kept, fmt);
    }
    assert!(allocated(&q.join("app1-disk1.qcow2")) <= 8 * MIB);

    // Existing files are kept unless --force.
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        raw.to_str().unwrap(),
    ]);
    assert!(e.contains("exists") && e.contains("--force"), "{e}");
    agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        raw.to_str().unwrap(),
        "--force",
    ]);
    same(&raw.join("app1-disk0.raw"), "raw", &vm.kept[0], "raw");

    // One disk alone, chosen by a snapshot id of the point.
    let api = Api::new(&app, &app.admin_token());
    let pts = api.get("/v1/vms/app1/points");
    let snap = pts[0]["disks"][1]["snapshot"].as_u64().unwrap().to_string();
    let one = vm.out("one");
    agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        one.to_str().unwrap(),
        "--disk",
        "1",
        "--snapshot",
        &snap,
    ]);
    let names: Vec<_> = std::fs::read_dir(&one).unwrap().collect();
    assert_eq!(names.len(), 1);
    same(&one.join("app1-disk1.raw"), "raw", &vm.kept[1], "raw");
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        one.to_str().unwrap(),
        "--disk",
        "7",
    ]);
    assert!(e.contains("no disk 7"), "{e}");

    device_restores(&agent, &vm);
    incomplete_point(&agent, &vm, &api);
    api_and_cdmctl(&app, &api, &vm);
    fsck_clean_after(app);
}

/// Onto loop devices: one full of garbage (holes must come back as zeros),
/// one too small; several disks need --disk.
fn device_restores(agent: &AgentCli, vm: &Vm) {
    let img = vm.out("dev.img");
    let garbage = random_bytes(MIB as usize, 4242);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&img).unwrap();
        for _ in 0..SPARSE_SIZE / MIB {
            f.write_all(&garbage).unwrap();
        }
    }
    let dev = Loop::new(&img);
    let e = agent.fail(&["vm", "restore", "--vm", "app1", "--to-device", &dev.0]);
    assert!(e.contains("--disk"), "{e}");
    let r = agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to-device",
        &dev.0,
        "--disk",
        "1",
    ]);
    let d = restore_json_disk(&r, 1);
    assert!(d["bytes_zeroed"].as_u64().unwrap() >= 200 * MIB, "{d}");
    same(Path::new(&dev.0), "raw", &vm.kept[1], "raw");

    let small = vm.out("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let sdev = Loop::new(&small);
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to-device",
        &sdev.0,
        "--disk",
        "1",
    ]);
    assert!(e.contains("less than disk 1"), "{e}");
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to-device",
        img.to_str().unwrap(),
        "--disk",
        "1",
    ]);
    assert!(e.contains("not a block device"), "{e}");
    // A mounted device is refused, whatever its size.
    let work = vm.out("mounted");
    std::fs::create_dir_all(&work).unwrap();
    let (mnt, _guard) = small_ext4(&work, 32 * MIB);
    let src = run(Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(&mnt));
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to-device",
        src.trim(),
        "--disk",
        "1",
    ]);
    assert!(e.contains("is mounted on"), "{e}");
}

/// A backup whose second disk fails makes an incomplete point: restoring
/// it is refused with the missing disks named; the newest complete point
/// is still the default.
fn incomplete_point(agent: &AgentCli, vm: &Vm, api: &Api) {
    let hidden = vm.out("hidden.img");
    std::fs::rename(&vm.disks[1], &hidden).unwrap();
    let o = output(&mut agent.cmd(&[
        "vm",
        "backup",
        "--inventory",
        vm.inventory.to_str().unwrap(),
        "--category",
        "keyword:app1",
    ]));
    assert!(!o.status.success());
    std::fs::rename(&hidden, &vm.disks[1]).unwrap();
    let pts = api.get("/v1/vms/app1/points");
    let last = pts.as_array().unwrap().last().unwrap();
    assert_eq!(last["complete"], false, "{pts}");
    let id = last["point"].as_str().unwrap();
    let to = vm.out("incomplete");
    let e = agent.fail(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        to.to_str().unwrap(),
        "--point",
        id,
    ]);
    assert!(e.contains("incomplete") && e.contains("[1, 2]"), "{e}");
    assert!(!to.join("app1-disk0.raw").exists());
    let r = agent.ok(&[
        "vm",
        "restore",
        "--vm",
        "app1",
        "--to",
        to.to_str().unwrap(),
        "--disk",
        "0",
    ]);
    assert_eq!(r["point"], pts[0]["point"], "{r}");
}

fn job_done(api: &Api, id: u64) -> Value {
    wait_for(300, "vm-restore job", || {
        let j = api.get(&format!("/v1/jobs/{id}"));
        (!matches!(j["state"].as_str(), Some("queued" | "running"))).then_some(j)
    })
}

fn api_and_cdmctl(app: &Appliance, api: &Api, vm: &Vm) {
    let to = vm.out("api");
    let j = api.expect(
        202,
        "POST",
        "/v1/vms/app1/restores",
        Some(json!({"to": to, "format": "qcow2", "disk": 2})),
    );
    assert_eq!(j["kind"], "vm-restore");
    let j = job_done(api, j["id"].as_u64().unwrap());
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["result"]["disks"][0]["disk"], 2, "{j}");
    same(&to.join("app1-disk2.qcow2"), "qcow2", &vm.kept[2], "qcow2");
    // A job that fails says why (the file exists now).
    let j = api.expect(
        202,
        "POST",
        "/v1/vms/app1/restores",
        Some(json!({"to": to, "format": "qcow2", "disk": 2})),
    );
    let j = job_done(api, j["id"].as_u64().unwrap());
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["message"].as_str().unwrap().contains("exists"), "{j}");

    // Refused before anything is queued.
    let pts = api.get("/v1/vms/app1/points");
    let bad = pts.as_array().unwrap().last().unwrap()["point"].clone();
    for (status, body) in [
        (400, json!({"to": "relative/dir"})),
        (400, json!({"to": "/tmp/x", "format": "vmdk"})),
        (400, json!({"to": "/tmp/x", "colour": "red"})),
        (400, json!({"to": "/tmp/../etc"})),
        (400, json!({"to": "/tmp/x", "disk": 9})),
        (404, json!({"to": "/tmp/x", "point": "no-such-point"})),
        (409, json!({"to": "/tmp/x", "point": bad})),
    ] {
        let (s, v) = api.call("POST", "/v1/vms/app1/restores", Some(body.clone()));
        assert_eq!(s, status, "{body}: {v}");
    }
    let (s, v) = api.call(
        "POST",
        "/v1/vms/app1/restores",
        Some(json!({"to": "/tmp/x", "point": bad})),
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("incomplete"),
        "{s} {v}"
    );
    assert_eq!(
        api.call(
            "POST",
            "/v1/vms/nosuch/restores",
            Some(json!({"to": "/tmp/x"}))
        )
        .0,
        404
    );
    api.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "aud", "role": "auditor", "password": "auditor-pass"})),
    );
    let t = api.expect(
        201,
        "POST",
        "/v1/users/aud/tokens",
        Some(json!({"name": "t"})),
    );
    let aud = Api::new(app, t["token"].as_str().unwrap());
    // An operator may not either: the appliance would write files as root
    // where the request says.
    api.expect(
        201,
        "POST",
        "/v1/users",
        Some(json!({"name": "op", "role": "operator", "password": "operator-pass"})),
    );
    let t = api.expect(
        201,
        "POST",
        "/v1/users/op/tokens",
        Some(json!({"name": "t"})),
    );
    let op = Api::new(app, t["token"].as_str().unwrap());
    op.expect(
        403,
        "POST",
        "/v1/vms/app1/restores",
        Some(json!({"to": "/tmp/x"})),
    );
    assert_eq!(
        aud.call(
            "POST",
            "/v1/vms/app1/restores",
            Some(json!({"to": "/tmp/x"}))
        )
        .0,
        403
    );
    aud.get("/v1/vms/app1/points");
    let doc = api.get("/v1/openapi.json");
    assert!(doc["paths"]["/v1/vms/{name}/restores"]["post"].is_object());

    // cdmctl: the points table, and a restore waited for.
    let o = app.cdmctl(&["vm", "points", "app1"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("NO (missing [1, 2])"),
        "{text}"
    );
    let o = app.cdmctl(&["--json", "vm", "points", "app1"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), pts.as_array().unwrap().len());
    let to = vm.out("ctl");
    let o = app.cdmctl(&[
        "vm",
        "restore",
        "app1",
        "--to",
        to.to_str().unwrap(),
        "--disk",
        "0",
        "--wait",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same(&to.join("app1-disk0.raw"), "raw", &vm.kept[0], "raw");
    let o = app.cdmctl(&[
        "vm",
        "restore",
        "app1",
        "--to",
        to.to_str().unwrap(),
        "--point",
        bad.as_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fsck_clean_after(mut app: Appliance) {
    app.stop();
    fsck_clean(&app.data);
}
