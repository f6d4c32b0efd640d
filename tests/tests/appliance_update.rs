//! `cdm-update` end to end: keys, a bundle of a real squashfs root image
//! (mksquashfs), verification and its refusals (exit 2, one line), and
//! installation into an ESP directory whose slot devices are plain files.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::{bin, output, random_bytes, require, run, write_file};

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tool(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("cdm-update"));
        c.args(args);
        c
    }

    fn keygen(&self) {
        std::fs::create_dir_all(self.p("keys")).expect("keys dir");
        let p = |n: &str| self.p(n).to_string_lossy().into_owned();
        run(&mut self.tool(&[
            "keygen",
            "--secret",
            &p("secret"),
            "--public",
            &p("keys/release.pub"),
        ]));
    }

    /// A squashfs root image holding /usr/lib/cdm/version, plus kernel
    /// and initrd files; returns the bundle path.
    fn bundle(&self, version: &str, arch: &str) -> PathBuf {
        self.bundle_with(version, arch, &|_| {})
    }

    /// As [`Site::bundle`], with `tweak` applied to the `cdm-update bundle`
    /// command (more arguments, environment).
    fn bundle_with(&self, version: &str, arch: &str, tweak: &dyn Fn(&mut Command)) -> PathBuf {
        require("mksquashfs");
        let root = self.p(&format!("root-{version}"));
        std::fs::create_dir_all(root.join("usr/lib/cdm")).expect("root dir");
        write_file(
            &root.join("usr/lib/cdm/version"),
            format!("{version}\n").as_bytes(),
        );
        write_file(&root.join("usr/lib/cdm/filler"), &random_bytes(300_000, 7));
        let img = self.p(&format!("rootfs-{version}.squashfs"));
        let _ = std::fs::remove_file(&img);
        run(Command::new("mksquashfs")
            .args([root.as_os_str(), img.as_os_str()])
            .args(["-quiet", "-noappend", "-no-progress"]));
        write_file(&self.p("vmlinuz"), &random_bytes(40_000, 1));
        write_file(&self.p("initrd.img"), &random_bytes(60_000, 2));
        let out = self.p(&format!("{version}-{arch}.cdmb"));
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let mut c = self.tool(&[
            "bundle",
            "--key",
            &s(&self.p("secret")),
            "--version",
            version,
            "--arch",
            arch,
            "--rootfs",
            &s(&img),
            "--kernel",
            &s(&self.p("vmlinuz")),
            "--initrd",
            &s(&self.p("initrd.img")),
            "--out",
            &s(&out),
        ]);
        tweak(&mut c);
        run(&mut c);
        out
    }

    /// Runs `cdm-update verify`; returns (exit code, stdout, stderr).
    fn verify(&self, file: &Path) -> (i32, String, String) {
        let keys = self.p("keys");
        let o = output(self.tool(&["verify", "--keys"]).arg(&keys).arg(file));
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

#[test]
fn verify_prints_the_manifest_and_refuses_with_one_line() {
    let s = Site::new();
    s.keygen();
    let good = s.bundle("0.2.0+gabc", std::env::consts::ARCH);
    let (code, out, err) = s.verify(&good);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&out).expect("manifest JSON");
    assert_eq!(m["version"], "0.2.0+gabc");
    assert_eq!(m["compatible"], "cdm-appliance");
    assert_eq!(m["files"][0]["name"], "rootfs");
    let key = std::fs::read_to_string(s.p("keys/release.pub")).expect("pub");
    assert_eq!(key.len(), 65);

    let bytes = std::fs::read(&good).expect("bundle");
    let bad = s.p("bad.cdmb");
    let refuse = |data: &[u8], want: &str| {
        write_file(&bad, data);
        let (code, out, err) = s.verify(&bad);
        assert_eq!(code, 2, "{want}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "want {want:?}, got {err:?}");
    };
    let mut b = bytes.clone();
    b[0] = b'X';
    refuse(&b, "bad magic");
    refuse(&bytes[..bytes.len() - 10], "truncated");
    let mut b = bytes.clone();
    b.extend_from_slice(b"junk");
    refuse(&b, "trailing bytes");
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    refuse(&b, "hash mismatch of initrd");
    let mlen = u32::from_le_bytes(bytes[8..12].try_into().expect("len")) as usize;
    let mut b = bytes.clone();
    b[12 + mlen] ^= 1;
    refuse(&b, "bad signature");

    let other = if std::env::consts::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let foreign = s.bundle("0.2.1", other);
    let (code, _, err) = s.verify(&foreign);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        format!(
            "bundle is for {other}, this appliance is {}",
            std::env::consts::ARCH
        )
    );

    // A bundle from a key that is not trusted.
    let t = Site::new();
    t.keygen();
    let stranger = t.bundle("6.6.6", std::env::consts::ARCH);
    let (code, _, err) = s.verify(&stranger);
    assert_eq!(code, 2);
    assert!(err.contains("unknown key"), "{err}");
}

/// An ESP with slots.json whose devices are plain files, booted from
/// `booted`, plus the command line, version and status files.
struct Appliance {
    site: Site,
}

impl Appliance {
    fn new(booted: &str) -> Appliance {
        let site = Site::new();
        site.keygen();
        let a = Appliance { site };
        let esp = a.p("esp");
        std::fs::create_dir_all(esp.join("cdm")).expect("esp");
        std::fs::create_dir_all(esp.join("loader/entries")).expect("entries");
        for s in ["a", "b"] {
            write_file(&a.p(&format!("dev-{s}")), &vec![0u8; 4 << 20]);
        }
        let cfg = serde_json::json!({
            "slots": {
                "a": {"partuuid": "0a0a0a0a-0000-4000-8000-00000000000a", "device": a.p("dev-a")},
                "b": {"partuuid": "0b0b0b0b-0000-4000-8000-00000000000b", "device": a.p("dev-b")}
            },
            "cmdline": "console=ttyS0,115200 panic=10"
        });
        write_file(&esp.join("cdm/slots.json"), cfg.to_string().as_bytes());
        write_file(
            &esp.join(format!("loader/entries/cdm-{booted}.conf")),
            b"title cdm appliance 0.1.0\nsort-key cdm\nversion 1\n",
        );
        a.boot(booted, "0.1.0");
        a
    }

    fn p(&self, n: &str) -> PathBuf {
        self.site.p(n)
    }

    /// What a boot of `slot` running `version` changes.
    fn boot(&self, slot: &str, version: &str) {
        write_file(
            &self.p("cmdline"),
            format!("BOOT_IMAGE=/cdm/{slot}/vmlinuz ro cdm.slot={slot} quiet\n").as_bytes(),
        );
        write_file(&self.p("version"), format!("{version}\n").as_bytes());
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.site.tool(args);
        c.arg("--esp").arg(self.p("esp"));
        c.arg("--cmdline").arg(self.p("cmdline"));
        c.arg("--version-file").arg(self.p("version"));
        c.arg("--status-file").arg(self.p("run/status.json"));
        c
    }

    fn install(&self, file: &Path, spool: bool) -> std::process::Output {
        let mut c = self.cmd(&["install"]);
        c.arg("--keys").arg(self.p("keys"));
        if spool {
            c.arg("--spool");
        }
        output(c.arg(file))
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.p("esp/loader/entries"))
            .expect("entries")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn status(&self) -> serde_json::Value {
        let out = run(&mut self.cmd(&["status", "--json"]));
        serde_json::from_str(&out).expect("status JSON")
    }
}

#[test]
fn install_boot_and_bless_a_real_squashfs_slot() {
    require("unsquashfs");
    let a = Appliance::new("a");
    let bundle = a.site.bundle("0.2.0", std::env::consts::ARCH);
    let spool = a.p("pending.cdmb");
    std::fs::copy(&bundle, &spool).expect("spool");
    let o = a.install(&spool, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!spool.exists(), "the spool file is removed");
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
    let entry = std::fs::read_to_string(a.p("esp/loader/entries/cdm-b+3.conf")).expect("entry");
    assert!(entry.contains("\nversion 2\n"), "{entry}");
    assert!(entry.contains(
        "options root=PARTUUID=0b0b0b0b-0000-4000-8000-00000000000b rootfstype=squashfs ro cdm.slot=b console=ttyS0,115200 panic=10\n"
    ), "{entry}");
    // The slot device holds a squashfs that unsquashfs reads.
    let v = run(Command::new("unsquashfs")
        .arg("-cat")
        .arg(a.p("dev-b"))
        .arg("usr/lib/cdm/version"));
    assert_eq!(v, "0.2.0\n");
    assert_eq!(
        std::fs::read(a.p("esp/cdm/b/vmlinuz")).expect("kernel"),
        std::fs::read(a.p("vmlinuz")).expect("k")
    );
    let s = a.status();
    assert_eq!(s["booted_slot"], "a");
    assert_eq!(s["version"], "0.1.0");
    assert_eq!(s["slots"][1]["state"], "trying");
    assert_eq!(s["slots"][1]["tries_left"], 3);
    assert_eq!(s["slots"][1]["version"], "0.2.0");
    assert_eq!(s["update"]["state"], "installed");
    assert_eq!(s["update"]["version"], "0.2.0");

    // systemd-boot tries b (a try counted), and the appliance comes up.
    std::fs::rename(
        a.p("esp/loader/entries/cdm-b+3.conf"),
        a.p("esp/loader/entries/cdm-b+2-1.conf"),
    )
    .expect("count");
    a.boot("b", "0.2.0");
    // Until b is blessed, a is the only good fallback: no install over it.
    let early = a.site.bundle("0.2.1", std::env::consts::ARCH);
    let o = a.install(&early, false);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("the booted slot b is still being tried: wait for its health check"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+2-1.conf"]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}/health", closed.local_addr().expect("addr"));
    drop(closed);
    let o = output(&mut a.cmd(&["health", "--timeout", "1", "--url", &dead]));
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+2-1.conf"]);
    let url = health_server();
    let out = run(&mut a.cmd(&["health", "--timeout", "20", "--url", &url]));
    assert!(
        out.contains("blessed cdm-b+2-1.conf -> cdm-b.conf"),
        "{out}"
    );
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b.conf"]);
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.p("run/status.json")).expect("status file"))
            .expect("json");
    assert_eq!(s["booted_slot"], "b");
    assert_eq!(s["version"], "0.2.0");
    assert_eq!(s["slots"][1]["state"], "good");
    assert_eq!(s["slots"][1]["booted"], true);
    // Blessing raised the appliance's rollback index to b's.
    let index = s["slots"][1]["rollback_index"].as_u64().expect("index");
    assert_eq!(
        std::fs::read_to_string(a.p("esp/cdm/rollback_index")).expect("stored index"),
        format!("{index}\n")
    );
    assert_eq!(s["slots"][0]["booted"], false);

    // The next update goes to a, generation 3; b's entry stays as it is.
    let next = a.site.bundle("0.3.0", std::env::consts::ARCH);
    let o = a.install(&next, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(next.exists(), "not a spool: kept");
    assert_eq!(a.entries(), ["cdm-a+3.conf", "cdm-b.conf"]);
    let entry = std::fs::read_to_string(a.p("esp/loader/entries/cdm-a+3.conf")).expect("entry");
    assert!(
        entry.contains("\nversion 3\n") && entry.contains("cdm.slot=a "),
        "{entry}"
    );
}

/// Answers every request with 200 `{"status": "ok"}`.
fn health_server() -> String {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/health", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = r#"{"status": "ok"}"#;
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    url
}

#[test]
fn install_refusals_write_nothing_and_the_spool_goes() {
    let a = Appliance::new("a");
    let bundle = a.site.bundle("0.2.0", std::env::consts::ARCH);
    // A tampered spool file: exit 2, the reason, nothing installed.
    let mut bytes = std::fs::read(&bundle).expect("bundle");
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    let spool = a.p("pending.cdmb");
    write_file(&spool, &bytes);
    let o = a.install(&spool, true);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "hash mismatch of initrd"
    );
    assert!(!spool.exists());
    assert_eq!(a.entries(), ["cdm-a.conf"]);
    assert!(std::fs::read(a.p("dev-b"))
        .expect("dev")
        .iter()
        .all(|&b| b == 0));
    let s = a.status();
    assert_eq!(s["update"]["state"], "failed");
    assert_eq!(s["update"]["error"], "hash mismatch of initrd");
    assert_eq!(s["slots"][1]["state"], "empty");

    // A symlink as the spool file: refused, the link removed, its target kept.
    std::os::unix::fs::symlink(&bundle, &spool).expect("symlink");
    let o = a.install(&spool, true);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("symbolic links"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::symlink_metadata(&spool).is_err(),
        "the link is removed"
    );
    // A directory under the spool name: refused and removed, so that the
    // path unit does not start the installer on it again and again.
    std::fs::create_dir(&spool).expect("dir");
    let o = a.install(&spool, true);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a regular file (a directory): removed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::symlink_metadata(&spool).is_err(),
        "the directory is removed"
    );
    assert!(bundle.exists());
    assert_eq!(a.entries(), ["cdm-a.conf"]);
    assert_eq!(a.status()["update"]["state"], "failed");
}

/// Kills `cdm-update install` (SIGKILL) at delays spread over a whole
/// install, from a state where slot b holds an old blessed entry over an
/// all-zero device. After every kill: the booted slot's entry and device
/// are as they were; b's old entry exists only while b's device is still
/// untouched; b's new entry exists only with the whole new slot on disk.
/// Then an install run to the end works from whatever state the kill left.
#[test]
fn install_killed_at_any_point_never_leaves_a_half_slot_bootable() {
    use sha2::{Digest, Sha256};
    let a = Appliance::new("a");
    let rootfs = random_bytes(24 << 20, 11);
    write_file(&a.p("big.rootfs"), &rootfs);
    write_file(&a.p("k"), &random_bytes(3 << 20, 12));
    write_file(&a.p("i"), &random_bytes(5 << 20, 13));
    let bundle = a.p("big.cdmb");
    let s = |n: &str| a.p(n).to_string_lossy().into_owned();
    run(&mut a.site.tool(&[
        "bundle",
        "--key",
        &s("secret"),
        "--version",
        "9.9.9",
        "--rootfs",
        &s("big.rootfs"),
        "--kernel",
        &s("k"),
        "--initrd",
        &s("i"),
        "--out",
        &s("big.cdmb"),
    ]));
    let entries = a.p("esp/loader/entries");
    let booted_entry = std::fs::read(entries.join("cdm-a.conf")).expect("a entry");
    let old_b = b"title cdm appliance 0.0.1 (slot b)\nsort-key cdm\nversion 0\n";
    let dev_len = 32usize << 20;
    let reset = || {
        for e in a.entries() {
            if e.starts_with("cdm-b") {
                std::fs::remove_file(entries.join(e)).expect("rm entry");
            }
        }
        write_file(&entries.join("cdm-b.conf"), old_b);
        write_file(&a.p("dev-b"), &vec![0u8; dev_len]);
        let _ = std::fs::remove_dir_all(a.p("esp/cdm/b"));
    };
    for s in ["a", "b"] {
        write_file(&a.p(&format!("dev-{s}")), &vec![0u8; dev_len]);
    }
    let install_cmd = || {
        let mut c = a.cmd(&["install"]);
        c.arg("--keys").arg(a.p("keys")).arg(&bundle);
        c
    };
    // One full install, timed.
    reset();
    let t = std::time::Instant::now();
    run(&mut install_cmd());
    let full = t.elapsed();
    let rootfs_sum = Sha256::digest(&rootfs);

    let check = |after: &str| {
        assert_eq!(
            std::fs::read(entries.join("cdm-a.conf")).expect("a"),
            booted_entry,
            "{after}"
        );
        let dev_a = std::fs::read(a.p("dev-a")).expect("dev-a");
        assert!(
            dev_a.iter().all(|&x| x == 0),
            "{after}: booted device written"
        );
        let dev_b = std::fs::read(a.p("dev-b")).expect("dev-b");
        let b_entries: Vec<String> = a
            .entries()
            .into_iter()
            .filter(|e| e.starts_with("cdm-b") && e.ends_with(".conf"))
            .collect();
        assert!(b_entries.len() <= 1, "{after}: {b_entries:?}");
        match b_entries.first().map(String::as_str) {
            None => {}
            Some("cdm-b.conf") => {
                assert_eq!(
                    std::fs::read(entries.join("cdm-b.conf")).expect("b"),
                    old_b,
                    "{after}"
                );
                assert!(
                    dev_b.iter().all(|&x| x == 0),
                    "{after}: old entry over a written device"
                );
            }
            Some("cdm-b+3.conf") => {
                assert_eq!(
                    Sha256::digest(&dev_b[..rootfs.len()]),
                    rootfs_sum,
                    "{after}: entry before the rootfs"
                );
                assert_eq!(
                    std::fs::read(a.p("esp/cdm/b/vmlinuz")).expect("kernel"),
                    std::fs::read(a.p("k")).expect("k"),
                    "{after}"
                );
                assert_eq!(
                    std::fs::read(a.p("esp/cdm/b/initrd.img")).expect("initrd"),
                    std::fs::read(a.p("i")).expect("i"),
                    "{after}"
                );
                assert!(a.p("esp/cdm/b/manifest.json").exists(), "{after}");
            }
            Some(other) => panic!("{after}: unexpected entry {other}"),
        }
    };
    check("a full install");
    let cuts = 16u32;
    let mut outcomes = std::collections::BTreeSet::new();
    for k in 0..cuts {
        reset();
        let delay = full.mul_f64(1.2 * f64::from(k) / f64::from(cuts));
        let mut child = install_cmd()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(delay);
        let _ = child.kill();
        let st = child.wait().expect("wait");
        let after = format!("kill after {delay:?} of {full:?} ({st})");
        check(&after);
        outcomes.insert(
            a.entries()
                .into_iter()
                .filter(|e| e.starts_with("cdm-b"))
                .collect::<Vec<_>>()
                .join(","),
        );
        // Whatever the kill left, a new install completes.
        run(&mut install_cmd());
        check(&format!("reinstall after: {after}"));
        assert!(a.entries().contains(&"cdm-b+3.conf".to_string()));
    }
    eprintln!("outcomes: {outcomes:?} (full install {full:?})");
    // The kills landed in different phases (old entry, none, new entry).
    assert!(
        outcomes.len() >= 2,
        "all kills landed in one phase: {outcomes:?}"
    );
}

/// A loop device over a file, detached on drop (also when the test panics).
struct Loop(String);

impl Loop {
    fn new(img: &Path) -> Loop {
        require("losetup");
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(img));
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A real block device as slot b: refused while it is mounted (O_EXCL:
/// a slots.json naming a device in use cannot be written over), installed
/// into once it is not, and read back by unsquashfs from the device.
#[test]
fn a_mounted_slot_device_is_refused_and_a_free_one_installed() {
    require("mkfs.ext4");
    require("unsquashfs");
    let a = Appliance::new("a");
    let img = a.p("slot-b.img");
    write_file(&img, &vec![0u8; 16 << 20]);
    let dev = Loop::new(&img);
    let cfg = serde_json::json!({
        "slots": {
            "a": {"partuuid": "0a0a", "device": a.p("dev-a")},
            "b": {"partuuid": "0b0b", "device": dev.0}
        },
        "cmdline": ""
    });
    write_file(&a.p("esp/cdm/slots.json"), cfg.to_string().as_bytes());
    run(Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]));
    let mnt = a.p("mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    run(Command::new("mount").arg(&dev.0).arg(&mnt));
    let bundle = a.site.bundle("0.4.0", std::env::consts::ARCH);
    let o = a.install(&bundle, false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&dev.0) && err.contains("busy"), "{err}");
    assert_eq!(a.entries(), ["cdm-a.conf"]);
    run(Command::new("umount").arg(&mnt));
    let o = a.install(&bundle, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
    let v = run(Command::new("unsquashfs")
        .arg("-cat")
        .arg(&dev.0)
        .arg("usr/lib/cdm/version"));
    assert_eq!(v, "0.4.0\n");
}

/// Downgrade protection: a bundle below the stored rollback index is
/// refused (exit 2, nothing written); `--allow-downgrade` installs it from
/// a shell but never with `--spool`; an equal index installs.
#[test]
fn a_downgrade_is_refused_unless_allowed_from_a_shell() {
    let a = Appliance::new("a");
    let old = a.site.bundle_with("0.1.9", std::env::consts::ARCH, &|c| {
        c.env("SOURCE_DATE_EPOCH", "1000");
    });
    let (code, manifest, _) = a.site.verify(&old);
    assert_eq!(code, 0);
    let m: serde_json::Value = serde_json::from_str(&manifest).expect("manifest");
    assert_eq!(
        m["rollback_index"], 1000,
        "the default is SOURCE_DATE_EPOCH"
    );
    write_file(&a.p("esp/cdm/rollback_index"), b"2000\n");

    let o = a.install(&old, false);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "bundle rollback index 1000 is older than the appliance's 2000 (a downgrade): \
         install it with --allow-downgrade from a root shell"
    );
    assert_eq!(a.entries(), ["cdm-a.conf"]);
    assert!(std::fs::read(a.p("dev-b"))
        .expect("dev")
        .iter()
        .all(|&b| b == 0));
    assert_eq!(a.status()["update"]["state"], "failed");

    // Never through the spool (the upload path).
    let spool = a.p("pending.cdmb");
    std::fs::copy(&old, &spool).expect("spool");
    let mut c = a.cmd(&["install", "--spool", "--allow-downgrade"]);
    let o = output(c.arg("--keys").arg(a.p("keys")).arg(&spool));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--allow-downgrade is refused with --spool"),
        "{err}"
    );
    assert_eq!(a.entries(), ["cdm-a.conf"]);

    // From a shell it installs; the stored index stays.
    let mut c = a.cmd(&["install", "--allow-downgrade"]);
    let o = output(c.arg("--keys").arg(a.p("keys")).arg(&old));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
    assert_eq!(a.status()["slots"][1]["rollback_index"], 1000);
    assert_eq!(
        std::fs::read_to_string(a.p("esp/cdm/rollback_index")).expect("index"),
        "2000\n"
    );

    // An equal index is not a downgrade.
    let same = a.site.bundle_with("0.2.0", std::env::consts::ARCH, &|c| {
        c.args(["--rollback-index", "2000"]);
    });
    let o = a.install(&same, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(a.status()["slots"][1]["rollback_index"], 2000);
}

/// Free bytes of the filesystem holding `p`, as df says.
fn df_free(p: &Path) -> u64 {
    run(Command::new("df").args(["--output=avail", "-B1"]).arg(p))
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's free bytes")
}

/// An ESP without room for the kernel and initrd: refused before step 2,
/// with nothing written; with room again, the same bundle installs.
#[test]
fn a_full_esp_is_refused_with_nothing_written() {
    let a = Appliance::new("a");
    let bundle = a.site.bundle("0.2.0", std::env::consts::ARCH);
    let work = a.p("fs");
    std::fs::create_dir(&work).expect("fs dir");
    let (mnt, _fs) = cdm_e2e::small_ext4(&work, 8 << 20);
    run(Command::new("cp").arg("-a").arg(a.p("esp/.")).arg(&mnt));
    run(Command::new("mount")
        .arg("--bind")
        .arg(&mnt)
        .arg(a.p("esp")));
    let _bind = cdm_e2e::LoopMount::new(a.p("esp"));
    let filler = a.p("esp/filler");
    let free = df_free(&a.p("esp"));
    // Half a MiB left: less than the kernel and initrd plus 1 MiB of slack.
    write_file(&filler, &vec![0u8; (free - (512 << 10)) as usize]);
    let o = a.install(&bundle, false);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bytes free (counting the target slot's old kernel and initrd): the kernel and initrd need"),
        "{err}"
    );
    assert_eq!(a.entries(), ["cdm-a.conf"]);
    assert!(!a.p("esp/cdm/b").exists(), "nothing written on the ESP");
    assert!(std::fs::read(a.p("dev-b"))
        .expect("dev")
        .iter()
        .all(|&b| b == 0));
    std::fs::remove_file(&filler).expect("filler");
    let o = a.install(&bundle, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(a.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
}
