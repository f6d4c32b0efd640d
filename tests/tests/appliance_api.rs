//! snapshotd's appliance mode end to end (issue 18): keys and bundles made
//! by the real `cdm-update`, uploads through `POST /v1/appliance/updates`
//! (verified by `cdm-update verify`, spooled to DATA/updates/pending.cdmb;
//! tampered, foreign-key and truncated bundles refused with the tool's
//! reason and nothing left behind; 409 while one is pending, 403 for a
//! non-admin, 413 above 4 GiB, 404 without --appliance), the audit and
//! events; `GET /v1/appliance` before and after `cdm-update status
//! --write`, and the chain short of a reboot: `cdm-update install --spool`
//! into the other slot, seen as `trying` with the new version through the
//! API and `cdmctl appliance`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cdm_e2e::*;
use serde_json::{json, Value};

/// Keys, bundles and their payloads in one temporary directory.
struct Kit {
    dir: tempfile::TempDir,
    /// The trusted keys' directory (`--update-keys`): `good.pub` only.
    keys: PathBuf,
}

impl Kit {
    fn new() -> Kit {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).expect("keys dir");
        let k = Kit { dir, keys };
        // Trusted, and one the appliance does not know.
        k.keygen("good", &k.keys.join("good.pub"));
        k.keygen("other", &k.path("other.pub"));
        k
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn keygen(&self, name: &str, public: &Path) {
        run(Command::new(bin("cdm-update"))
            .arg("keygen")
            .arg("--secret")
            .arg(self.path(&format!("{name}.sec")))
            .arg("--public")
            .arg(public));
    }

    /// A bundle of small payloads (rootfs `rootfs_len` bytes), signed by
    /// key `key`; its path.
    fn bundle(&self, key: &str, version: &str, rootfs_len: usize) -> PathBuf {
        self.bundle_with(key, version, rootfs_len, &[])
    }

    /// [`Kit::bundle`] with more `cdm-update bundle` options.
    fn bundle_with(&self, key: &str, version: &str, rootfs_len: usize, extra: &[&str]) -> PathBuf {
        let seed = version.bytes().map(u64::from).sum::<u64>();
        let rootfs = self.path(&format!("rootfs-{version}"));
        write_file(&rootfs, &random_bytes(rootfs_len, seed));
        write_file(
            &self.path("kernel"),
            &random_bytes(64 << 10, seed.wrapping_add(1)),
        );
        write_file(
            &self.path("initrd"),
            &random_bytes(32 << 10, seed.wrapping_add(2)),
        );
        let out = self.path(&format!("{key}-{version}{}.cdmb", extra.join("")));
        run(Command::new(bin("cdm-update"))
            .arg("bundle")
            .arg("--key")
            .arg(self.path(&format!("{key}.sec")))
            .args(["--version", version, "--rootfs"])
            .arg(&rootfs)
            .arg("--kernel")
            .arg(self.path("kernel"))
            .arg("--initrd")
            .arg(self.path("initrd"))
            .args(extra)
            .arg("--out")
            .arg(&out));
        out
    }
}

/// snapshotd in appliance mode over the kit's keys, its status file at
/// `status` (not written yet).
fn appliance(kit: &Kit, status: &Path) -> Appliance {
    let tool = bin("cdm-update");
    Appliance::start_with(
        None,
        None,
        &[
            "--pool-size",
            "1G",
            "--pool-sparse",
            "--appliance",
            "--update-tool",
            tool.to_str().expect("utf-8 path"),
            "--update-keys",
            kit.keys.to_str().expect("utf-8 path"),
            "--appliance-status",
            status.to_str().expect("utf-8 path"),
        ],
    )
}

/// `POST /v1/appliance/updates` with `body` as the bundle.
fn upload(a: &Appliance, token: &str, body: &[u8]) -> (u16, Value) {
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
        .post(&format!("{}/v1/appliance/updates", a.url()))
        .set("Authorization", &format!("Bearer {token}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(body);
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("upload: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(Value::Null))
}

/// The names in DATA/updates (none if it does not exist).
fn spool(a: &Appliance) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(a.data.join("updates"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A refused upload: 400, the tool's reason (which must contain `why`),
/// and nothing left in the spool.
fn refused(a: &Appliance, body: &[u8], why: &str) {
    let (s, v) = upload(a, &a.admin_token(), body);
    assert_eq!(s, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("bundle refused: ") && msg.to_lowercase().contains(why),
        "reason {msg:?} does not say {why:?}"
    );
    assert!(spool(a).is_empty(), "left behind: {:?}", spool(a));
}

#[test]
fn uploads_are_verified_spooled_or_refused_with_the_reason() {
    let kit = Kit::new();
    let status = kit.path("status.json");
    let a = appliance(&kit, &status);
    let admin = Api::new(&a, &a.admin_token());
    let good = std::fs::read(kit.bundle("good", "0.2.0", 256 << 10)).expect("bundle");

    // Refusals, each with cdm-update's reason and no file left.
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40;
    refused(&a, &tampered, "hash");
    let mut sig = good.clone();
    let m = u32::from_le_bytes(sig[8..12].try_into().expect("4 bytes")) as usize;
    sig[12 + m + 5] ^= 1;
    refused(&a, &sig, "signature");
    let foreign = std::fs::read(kit.bundle("other", "0.2.0", 256 << 10)).expect("bundle");
    refused(&a, &foreign, "key");
    refused(&a, &good[..good.len() - 1000], "truncated");
    refused(&a, b"not a bundle at all", "magic");
    let arm = kit.bundle_with("good", "0.2.0", 4096, &["--arch", "aarch64"]);
    refused(
        &a,
        &std::fs::read(arm).expect("bundle"),
        "bundle is for aarch64",
    );

    // A client that goes away mid-body: 400 "cut" in the audit and the
    // events, nothing left in the spool.
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&a.api).expect("connect to the API");
        write!(
            c,
            "POST /v1/appliance/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            a.admin_token(),
            good.len()
        )
        .expect("send the head");
        c.write_all(&good[..good.len() / 2])
            .expect("send half the body");
        c.flush().expect("flush");
    }
    let cut = wait_for(30, "the cut upload's event", || {
        let ev = admin.get("/v1/events?type=appliance.update_refused&limit=100");
        ev.as_array()?
            .iter()
            .find(|e| {
                e["data"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("cut after"))
            })
            .cloned()
    });
    assert_eq!(cut["actor"], "admin", "{cut}");
    assert!(spool(&a).is_empty(), "left behind: {:?}", spool(&a));

    // A good one is spooled whole, and waits.
    let (s, v) = upload(&a, &a.admin_token(), &good);
    assert_eq!(s, 202, "{v}");
    assert_eq!(v, json!({"version": "0.2.0", "state": "pending"}));
    assert_eq!(spool(&a), vec!["pending.cdmb".to_string()]);
    let pending = a.data.join("updates/pending.cdmb");
    assert!(std::fs::read(&pending).expect("pending") == good);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.data.join("updates"))
        .expect("spool dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "DATA/updates mode {mode:o}");

    // A second while it is pending: 409, the pending one untouched; the
    // same through cdmctl (exit 5, conflict).
    let other = kit.bundle("good", "0.3.0", 128 << 10);
    let (s, v) = upload(
        &a,
        &a.admin_token(),
        &std::fs::read(&other).expect("bundle"),
    );
    assert_eq!(s, 409, "{v}");
    assert!(std::fs::read(&pending).expect("pending") == good);
    let o = a.cdmctl(&["appliance", "update", other.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pending already"),
        "{o:?}"
    );
    assert_eq!(spool(&a), vec!["pending.cdmb".to_string()]);

    // Not for operators (403 before any byte is stored); auditors may read
    // the status (503 here: no status file yet).
    for (name, role) in [("op", "operator"), ("aud", "auditor")] {
        admin.expect(
            201,
            "POST",
            "/v1/users",
            Some(json!({"name": name, "role": role})),
        );
    }
    let tok = |u: &str| {
        admin.expect(
            201,
            "POST",
            &format!("/v1/users/{u}/tokens"),
            Some(json!({"name": "t"})),
        )["token"]
            .as_str()
            .expect("token")
            .to_string()
    };
    let (op, aud) = (tok("op"), tok("aud"));
    // (A short body: the refusal comes before it is read.)
    let (s, v) = upload(&a, &op, &good[..1024]);
    assert_eq!(s, 403, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("admin only"));
    let (s, v) = http(&a.url(), "GET", "/v1/appliance", Some(&aud), None);
    assert_eq!(s, 503, "{v}");

    // Over 4 GiB: refused from the declared length, before the body.
    let (s, v) = http_head_only(
        &a.url(),
        &format!(
            "POST /v1/appliance/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            a.admin_token(),
            (4u64 << 30) + 1
        ),
    );
    assert_eq!(s, 413, "{v}");
    assert_eq!(spool(&a), vec!["pending.cdmb".to_string()]);

    // Every upload and its outcome in the audit log; events for both.
    let audit = admin.get("/v1/audit?limit=1000");
    let statuses: Vec<u64> = audit
        .as_array()
        .expect("audit list")
        .iter()
        .filter(|e| e["path"] == "/v1/appliance/updates")
        .filter_map(|e| e["status"].as_u64())
        .collect();
    // (The 413 above came before the caller was known: no record.)
    for want in [400, 202, 409, 403] {
        assert!(statuses.contains(&want), "no {want} in {statuses:?}");
    }
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 7);
    let ev = admin.get("/v1/events?type=appliance.*&limit=100");
    let kinds: Vec<&str> = ev
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "appliance.update_refused")
            .count(),
        7,
        "{ev}"
    );
    assert!(kinds.contains(&"appliance.update_pending"), "{ev}");
}

#[test]
fn without_appliance_mode_the_routes_are_404() {
    let a = Appliance::start_with(None, None, &["--pool-size", "1G", "--pool-sparse"]);
    let admin = Api::new(&a, &a.admin_token());
    let v = admin.expect(404, "GET", "/v1/appliance", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not an appliance (snapshotd runs without --appliance)"),
        "{v}"
    );
    let (s, v) = upload(&a, &a.admin_token(), b"CDMBNDL\x01whatever");
    assert_eq!(s, 404, "{v}");
    assert!(!a.data.join("updates").exists());
    let o = a.cdmctl(&["appliance", "status"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");

    // The configuration file's `appliance = true` turns it on (503 here:
    // its status file does not exist).
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "appliance = true\nappliance_status = \"{}\"\n",
        dir.path().join("status.json").display()
    );
    let a = Appliance::start_with(Some(&cfg), None, &["--pool-size", "1G", "--pool-sparse"]);
    let v = Api::new(&a, &a.admin_token()).expect(503, "GET", "/v1/appliance", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&dir.path().join("status.json").display().to_string()),
        "{v}"
    );
}

/// snapshotd's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}

#[test]
fn a_large_bundle_streams_through_bounded_memory() {
    const ROOTFS: usize = 256 << 20;
    let kit = Kit::new();
    let a = appliance(&kit, &kit.path("status.json"));
    let file = kit.bundle("good", "0.4.0", ROOTFS);
    // Warm up the routes (and the verify path) with a small refused one.
    refused(&a, b"CDMBNDL\x01", "truncated");
    let before = peak_rss(a.pid());
    let t = std::time::Instant::now();
    let o = a.cdmctl(&[
        "--json",
        "appliance",
        "update",
        file.to_str().expect("utf-8"),
    ]);
    let secs = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("JSON answer");
    assert_eq!(v, json!({"version": "0.4.0", "state": "pending"}));
    let grew = peak_rss(a.pid()).saturating_sub(before);
    let len = std::fs::metadata(&file).expect("bundle").len();
    println!(
        "upload+verify of a {} MiB bundle: {secs:.2} s ({:.0} MiB/s), snapshotd peak RSS +{} MiB",
        len >> 20,
        len as f64 / secs / (1 << 20) as f64,
        grew >> 20
    );
    // Streamed: far below the bundle's size (the body is never whole in memory).
    assert!(grew < 48 << 20, "snapshotd's peak RSS grew by {grew} bytes");
    assert_eq!(
        std::fs::metadata(a.data.join("updates/pending.cdmb"))
            .expect("pending")
            .len(),
        len
    );
}

/// An appliance's boot side in plain files: an ESP whose `slots.json`
/// points at two "devices" (1 MiB files), slot a installed and blessed with
/// 0.1.0, a kernel command line and a version file saying it booted it.
struct Site {
    esp: PathBuf,
    cmdline: PathBuf,
    version: PathBuf,
    status: PathBuf,
}

impl Site {
    fn new(kit: &Kit) -> Site {
        let esp = kit.path("esp");
        let s = Site {
            esp: esp.clone(),
            cmdline: kit.path("cmdline"),
            version: kit.path("version"),
            status: kit.path("status.json"),
        };
        for slot in ["a", "b"] {
            let dev = kit.path(&format!("slot-{slot}.img"));
            std::fs::File::create(&dev)
                .and_then(|f| f.set_len(1 << 20))
                .expect("slot device");
        }
        std::fs::create_dir_all(esp.join("cdm/a")).expect("ESP/cdm/a");
        std::fs::create_dir_all(esp.join("loader/entries")).expect("ESP entries");
        let slots = json!({"slots": {
            "a": {"partuuid": "0a0a0a0a-0000-4000-8000-00000000000a", "device": kit.path("slot-a.img")},
            "b": {"partuuid": "0b0b0b0b-0000-4000-8000-00000000000b", "device": kit.path("slot-b.img")}},
            "cmdline": "console=ttyS0,115200 panic=10"});
        write_file(&esp.join("cdm/slots.json"), slots.to_string().as_bytes());
        // Slot a as the image build leaves it: 0.1.0, blessed, generation 1
        // (its manifest is what `cdm-update verify` prints of its bundle).
        let first = kit.bundle("good", "0.1.0", 64 << 10);
        let manifest = run(Command::new(bin("cdm-update"))
            .arg("verify")
            .arg("--keys")
            .arg(&kit.keys)
            .arg(&first));
        write_file(&esp.join("cdm/a/manifest.json"), manifest.as_bytes());
        write_file(
            &esp.join("loader/entries/cdm-a.conf"),
            b"title cdm appliance 0.1.0 (slot a)\nsort-key cdm\nversion 1\nlinux /cdm/a/vmlinuz\n\
              initrd /cdm/a/initrd.img\noptions root=PARTUUID=0a0a0a0a-0000-4000-8000-00000000000a \
              rootfstype=squashfs ro cdm.slot=a console=ttyS0,115200 panic=10\n",
        );
        s.boot("a", "0.1.0");
        s
    }

    /// What a boot of `slot` running `version` shows the tool.
    fn boot(&self, slot: &str, version: &str) {
        write_file(
            &self.cmdline,
            format!("BOOT_IMAGE=/cdm/{slot}/vmlinuz ro cdm.slot={slot} console=ttyS0\n").as_bytes(),
        );
        write_file(&self.version, format!("{version}\n").as_bytes());
    }

    /// `cdm-update SUB ARGS --esp … --cmdline … --version-file …
    /// --status-file …`.
    fn tool(&self, sub: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
        output(
            Command::new(bin("cdm-update"))
                .arg(sub)
                .args(args)
                .arg("--esp")
                .arg(&self.esp)
                .arg("--cmdline")
                .arg(&self.cmdline)
                .arg("--version-file")
                .arg(&self.version)
                .arg("--status-file")
                .arg(&self.status),
        )
    }
}

fn ok(o: std::process::Output) -> std::process::Output {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `cdmctl appliance update FILE --wait` in the background; killed if the
/// test fails before it ends.
struct Waiter(Option<std::process::Child>);

impl Waiter {
    fn start(a: &Appliance, file: &Path) -> Waiter {
        let c = Command::new(bin("cdmctl"))
            .args([
                "--url",
                &a.url(),
                "appliance",
                "update",
                "--wait",
                "--timeout",
                "120",
            ])
            .arg(file)
            .env_remove("CDM_TOKEN")
            .env("CDM_TOKEN_FILE", a.data.join("admin.token"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run cdmctl");
        Waiter(Some(c))
    }

    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("cdmctl").is_none())
    }

    fn finish(mut self) -> std::process::Output {
        let c = self.0.take().expect("started");
        wait_output(c, "cdmctl appliance update --wait")
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn status_and_the_install_chain_short_of_a_reboot() {
    let kit = Kit::new();
    let site = Site::new(&kit);
    let a = appliance(&kit, &site.status);
    let admin = Api::new(&a, &a.admin_token());

    // Before the status file: 503 with the reason (cdmctl: exit 8).
    let v = admin.expect(503, "GET", "/v1/appliance", None);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status --write"),
        "{v}"
    );
    assert_eq!(a.cdmctl(&["appliance", "status"]).status.code(), Some(8));

    // After `cdm-update status --write`: the typed status.
    ok(site.tool("status", &["--write".as_ref()]));
    let s: cdm_api::appliance::ApplianceStatus =
        serde_json::from_value(admin.get("/v1/appliance")).expect("typed status");
    assert_eq!(s.version, "0.1.0");
    assert_eq!(s.booted_slot.as_deref(), Some("a"));
    let a0 = &s.slots[0];
    assert_eq!((a0.slot.as_str(), a0.booted), ("a", true));
    assert_eq!(a0.state, cdm_api::appliance::SlotState::Good);
    assert_eq!(a0.version.as_deref(), Some("0.1.0"));
    assert_eq!(s.slots[1].state, cdm_api::appliance::SlotState::Empty);
    assert!(s.update.is_none());

    // `cdmctl appliance update --wait`: uploads, then waits through the
    // install and the "reboot".
    let good = kit.bundle("good", "0.2.0", 256 << 10);
    let mut waiter = Waiter::start(&a, &good);
    let pending = a.data.join("updates/pending.cdmb");
    wait_for(60, "the pending bundle", || pending.exists().then_some(()));
    ok(site.tool(
        "install",
        &[
            "--keys".as_ref(),
            kit.keys.as_os_str(),
            "--spool".as_ref(),
            pending.as_os_str(),
        ],
    ));
    assert!(!pending.exists(), "the installer leaves the spool file");
    let slot_b = std::fs::read(kit.path("slot-b.img")).expect("slot b");
    let rootfs = std::fs::read(kit.path("rootfs-0.2.0")).expect("rootfs");
    assert!(
        slot_b[..rootfs.len()] == rootfs[..],
        "slot b holds the new rootfs"
    );
    let s: cdm_api::appliance::ApplianceStatus =
        serde_json::from_value(admin.get("/v1/appliance")).expect("typed status");
    let b = &s.slots[1];
    assert_eq!(b.state, cdm_api::appliance::SlotState::Trying, "{s:?}");
    assert_eq!(b.version.as_deref(), Some("0.2.0"));
    assert_eq!(b.tries_left, Some(3));
    assert_eq!(b.generation, Some(2));
    assert!(!b.booted);
    let u = s.update.clone().expect("update progress");
    assert_eq!(u.state, cdm_api::appliance::UpdateState::Installed);
    assert_eq!(u.version.as_deref(), Some("0.2.0"));
    let o = ok(a.cdmctl(&["appliance", "status"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("booted slot: a")
            && text.contains("trying")
            && text.contains("0.2.0 installed"),
        "{text}"
    );
    let o = ok(a.cdmctl(&["--json", "appliance", "status"]));
    let j: cdm_api::appliance::ApplianceStatus =
        serde_json::from_slice(&o.stdout).expect("cdmctl --json");
    assert_eq!(j, s);
    // Installed but not booted: the waiter goes on.
    std::thread::sleep(Duration::from_secs(3));
    assert!(waiter.running(), "cdmctl stopped waiting early");

    // The "reboot": systemd-boot counts the try, the new slot boots, the
    // health check blesses it; the waiter ends with success.
    let entries = site.esp.join("loader/entries");
    std::fs::rename(entries.join("cdm-b+3.conf"), entries.join("cdm-b+2-1.conf"))
        .expect("count the boot try");
    site.boot("b", "0.2.0");
    ok(site.tool(
        "health",
        &[
            "--url".as_ref(),
            format!("{}/health", a.url()).as_ref(),
            "--timeout".as_ref(),
            "30".as_ref(),
        ],
    ));
    assert!(entries.join("cdm-b.conf").exists(), "slot b blessed");
    let o = waiter.finish();
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("runs 0.2.0 from slot b"),
        "{o:?}"
    );

    // A bundle whose rootfs does not fit the other slot's device: the
    // install fails, and the waiter says so (exit 1, the installer's reason).
    let big = kit.bundle("good", "0.3.0", 2 << 20);
    let waiter = Waiter::start(&a, &big);
    wait_for(60, "the pending bundle", || pending.exists().then_some(()));
    let o = site.tool(
        "install",
        &[
            "--keys".as_ref(),
            kit.keys.as_os_str(),
            "--spool".as_ref(),
            pending.as_os_str(),
        ],
    );
    assert!(
        !o.status.success(),
        "installed a rootfs larger than the device"
    );
    assert!(!pending.exists(), "the installer leaves the spool file");
    let o = waiter.finish();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the update to 0.3.0 failed"), "{err}");
    let s: cdm_api::appliance::ApplianceStatus =
        serde_json::from_value(admin.get("/v1/appliance")).expect("typed status");
    assert_eq!(s.version, "0.2.0");
    assert_eq!(
        s.update.expect("update").state,
        cdm_api::appliance::UpdateState::Failed
    );
}

/// The names in DATA/updates that are not the filesystem's own.
fn spool_files(a: &Appliance) -> Vec<String> {
    spool(a).into_iter().filter(|n| n != "lost+found").collect()
}

/// The update spool on a small filesystem of its own: an upload needs a
/// Content-Length (411), is refused before a byte is stored when the
/// filesystem lacks its length plus the 256 MiB reserve (507), and only
/// one streams at a time (409).
#[test]
fn uploads_need_a_length_the_room_for_it_and_their_turn() {
    let kit = Kit::new();
    let work = kit.path("fs");
    std::fs::create_dir(&work).expect("fs dir");
    let (mnt, _fs) = small_ext4(&work, 320 << 20);
    let a = appliance(&kit, &kit.path("status.json"));
    let updates = a.data.join("updates");
    std::fs::create_dir_all(&updates).expect("updates dir");
    run(Command::new("mount").arg("--bind").arg(&mnt).arg(&updates));
    let _bind = LoopMount::new(updates.clone());
    let free: u64 = run(Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(&updates))
    .lines()
    .nth(1)
    .and_then(|l| l.trim().parse().ok())
    .expect("df's free bytes");
    let reserve = 256u64 << 20;
    assert!(
        free > reserve + (1 << 20),
        "the test filesystem has {free} bytes free"
    );

    // No length: nothing to check the space against.
    let (s, v) = http_head_only(
        &a.url(),
        &format!(
            "POST /v1/appliance/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            a.admin_token()
        ),
    );
    assert_eq!(s, 411, "{v}");
    assert!(spool_files(&a).is_empty());

    // A body that would leave less than the reserve: 507, nothing stored.
    let too_big = vec![0u8; (free - reserve + (1 << 20)) as usize];
    let (s, v) = upload(&a, &a.admin_token(), &too_big);
    assert_eq!(s, 507, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("not enough space for the update")
            && msg.contains(&format!("the bundle is {} bytes", too_big.len())),
        "{msg}"
    );
    assert!(spool_files(&a).is_empty(), "{:?}", spool_files(&a));

    // One upload streams (its head and a little of its body sent)...
    use std::io::Write;
    let addr = a.url().trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        slow,
        "POST /v1/appliance/updates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        a.admin_token(),
        1 << 20
    )
    .expect("head");
    slow.write_all(&[7u8; 1000]).expect("some body");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !spool_files(&a).iter().any(|n| n.starts_with("upload-")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow upload never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...so a second one waits its turn; within the room it is accepted.
    let good = std::fs::read(kit.bundle("good", "0.5.0", 64 << 10)).expect("bundle");
    let (s, v) = upload(&a, &a.admin_token(), &good);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("another update upload is streaming"),
        "{v}"
    );
    drop(slow);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (s, v) = loop {
        let (s, v) = upload(&a, &a.admin_token(), &good);
        if s != 409 || std::time::Instant::now() > deadline {
            break (s, v);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["version"], "0.5.0");
    assert_eq!(spool_files(&a), vec!["pending.cdmb".to_string()]);
}
