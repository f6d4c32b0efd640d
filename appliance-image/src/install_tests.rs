use super::*;
use crate::status::tests::site;
use crate::testutil::{read, Fixture};

const BOOTED_ENTRY: &str =
    "title cdm appliance 0.1.0 (slot a)\nsort-key cdm\nversion 4\nlinux /cdm/a/vmlinuz\n";

struct Rig {
    _d: tempfile::TempDir,
    p: Paths,
    f: Fixture,
}

/// An ESP booted from slot a (its blessed entry has generation 4), slot
/// devices as files of `dev_len` bytes filled with 0xEE.
fn rig(booted: &str, dev_len: usize) -> Rig {
    let (d, p) = site(booted);
    let esp = p.esp();
    for s in ["a", "b"] {
        std::fs::write(d.path().join(format!("dev-{s}")), vec![0xEE; dev_len]).unwrap();
    }
    let cfg = serde_json::json!({
        "slots": {
            "a": {"partuuid": "aaaa-1", "device": d.path().join("dev-a")},
            "b": {"partuuid": "bbbb-2", "device": d.path().join("dev-b")}
        },
        "cmdline": "console=ttyS0,115200 panic=10"
    });
    std::fs::write(esp.slots_json(), cfg.to_string()).unwrap();
    std::fs::write(
        esp.entries_dir().join(format!("cdm-{booted}.conf")),
        BOOTED_ENTRY,
    )
    .unwrap();
    Rig {
        _d: d,
        p,
        f: Fixture::new(),
    }
}

impl Rig {
    fn install(&self, bundle: &Path) -> Result<Installed, InstallError> {
        self.install_with(bundle, Options::default())
    }

    fn install_with(&self, bundle: &Path, opts: Options) -> Result<Installed, InstallError> {
        let file = File::open(bundle).unwrap();
        install(&file, bundle, &self.f.trusted, &self.p, opts)
    }

    fn entries(&self) -> Vec<String> {
        self.p
            .esp()
            .entries()
            .unwrap()
            .into_iter()
            .map(|e| e.file)
            .collect()
    }

    fn dev(&self, s: &str) -> Vec<u8> {
        read(&self.p.esp.parent().unwrap().join(format!("dev-{s}")))
    }

    fn update_state(&self) -> UpdateStatus {
        status::last_update(&self.p.status_file).unwrap()
    }

    fn booted_entry_untouched(&self, booted: &str) {
        let e = self
            .p
            .esp()
            .entries_dir()
            .join(format!("cdm-{booted}.conf"));
        assert_eq!(std::fs::read_to_string(e).unwrap(), BOOTED_ENTRY);
        assert_eq!(self.dev(booted), vec![0xEE; self.dev(booted).len()]);
    }
}

#[test]
fn installs_into_the_other_slot_with_the_entry_last() {
    let r = rig("a", 200_000);
    let (b, m) = r.f.bundle("u.cdmb", "0.2.0+g1", crate::ARCH, 150_000);
    let i = r.install(&b).unwrap();
    assert_eq!(
        (i.slot, i.generation, i.version.as_str()),
        (Slot::B, 5, "0.2.0+g1")
    );
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
    let esp = r.p.esp();
    let text = std::fs::read_to_string(esp.entries_dir().join("cdm-b+3.conf")).unwrap();
    assert_eq!(
        text,
        "title cdm appliance 0.2.0+g1 (slot b)\nsort-key cdm\nversion 5\nlinux /cdm/b/vmlinuz\n\
         initrd /cdm/b/initrd.img\noptions root=PARTUUID=bbbb-2 rootfstype=squashfs ro cdm.slot=b \
         console=ttyS0,115200 panic=10\n"
    );
    let dev = r.dev("b");
    let rootfs = read(&r.f.path("u.cdmb.rootfs"));
    assert_eq!(&dev[..rootfs.len()], &rootfs[..]);
    assert!(
        dev[rootfs.len()..].iter().all(|&x| x == 0xEE),
        "beyond the image untouched"
    );
    assert_eq!(
        read(&esp.slot_dir(Slot::B).join("vmlinuz")),
        read(&r.f.path("u.cdmb.kernel"))
    );
    assert_eq!(
        read(&esp.slot_dir(Slot::B).join("initrd.img")),
        read(&r.f.path("u.cdmb.initrd"))
    );
    assert_eq!(esp.installed(Slot::B), Some(m));
    let leftovers: Vec<_> = std::fs::read_dir(esp.slot_dir(Slot::B))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    r.booted_entry_untouched("a");
    let u = r.update_state();
    assert_eq!(
        (u.state.as_str(), u.version.as_deref(), u.error),
        ("installed", Some("0.2.0+g1"), None)
    );
    let s = status::collect(&r.p, None).unwrap();
    assert_eq!(s.slots[1].state, "trying");
    assert_eq!(s.slots[1].tries_left, Some(3));
    assert_eq!(s.slots[1].version.as_deref(), Some("0.2.0+g1"));

    // Again (the new slot failed and was rolled back, say): generation 6,
    // one entry for b.
    let (b2, _) = r.f.bundle("u2.cdmb", "0.3.0", crate::ARCH, 100_000);
    std::fs::rename(
        esp.entries_dir().join("cdm-b+3.conf"),
        esp.entries_dir().join("cdm-b+0-3.conf"),
    )
    .unwrap();
    let i = r.install(&b2).unwrap();
    assert_eq!(i.generation, 6);
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
    let text = std::fs::read_to_string(esp.entries_dir().join("cdm-b+3.conf")).unwrap();
    assert!(
        text.contains("version 6\n") && text.contains("appliance 0.3.0 (slot b)"),
        "{text}"
    );
    r.booted_entry_untouched("a");
}

#[test]
fn booted_b_installs_into_a() {
    let r = rig("b", 100_000);
    let (b, _) = r.f.bundle("u.cdmb", "0.2.0", crate::ARCH, 50_000);
    let i = r.install(&b).unwrap();
    assert_eq!(i.slot, Slot::A);
    assert_eq!(r.entries(), ["cdm-a+3.conf", "cdm-b.conf"]);
    r.booted_entry_untouched("b");
}

#[test]
fn slot_too_small_writes_nothing() {
    let r = rig("a", 1000);
    let esp = r.p.esp();
    std::fs::write(esp.entries_dir().join("cdm-b+0-3.conf"), "version 3\n").unwrap();
    let (b, _) = r.f.bundle("u.cdmb", "0.2.0", crate::ARCH, 1001);
    let e = r.install(&b).unwrap_err().to_string();
    assert!(
        e.starts_with("rootfs is 1001 bytes, larger than slot b's device"),
        "{e}"
    );
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+0-3.conf"]);
    assert_eq!(r.dev("b"), vec![0xEE; 1000]);
    assert!(!esp.slot_dir(Slot::B).exists());
    let u = r.update_state();
    assert_eq!(u.state, "failed");
    assert_eq!(u.version.as_deref(), Some("0.2.0"));
    assert_eq!(u.error.as_deref(), Some(e.as_str()));
    r.booted_entry_untouched("a");
}

#[test]
fn refused_bundle_writes_nothing() {
    let r = rig("a", 100_000);
    let (b, _) = r.f.bundle("u.cdmb", "0.2.0", crate::ARCH, 5000);
    let mut bytes = read(&b);
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&b, bytes).unwrap();
    let e = r.install(&b).unwrap_err();
    assert!(matches!(e, InstallError::Refused(_)));
    assert_eq!(e.to_string(), "hash mismatch of initrd");
    assert_eq!(r.entries(), ["cdm-a.conf"]);
    assert_eq!(r.dev("b"), vec![0xEE; 100_000]);
    let u = r.update_state();
    assert_eq!((u.state.as_str(), u.version), ("failed", None));
    // Not booted from a slot: nothing to install into.
    std::fs::write(&r.p.cmdline, "root=/dev/sda1\n").unwrap();
    let (b, _) = r.f.bundle("v.cdmb", "0.2.0", crate::ARCH, 5000);
    let e = r.install(&b).unwrap_err().to_string();
    assert!(e.contains("no cdm.slot"), "{e}");
    assert_eq!(r.entries(), ["cdm-a.conf"]);
}

#[test]
fn bundle_changed_after_verification_leaves_no_entry_for_the_slot() {
    let r = rig("a", 100_000);
    std::fs::write(r.p.esp().entries_dir().join("cdm-b.conf"), "version 2\n").unwrap();
    // b's old kernel and initrd, and a temporary a killed install left.
    let bdir = r.p.esp().slot_dir(Slot::B);
    std::fs::create_dir_all(&bdir).unwrap();
    for f in ["vmlinuz", "initrd.img", "initrd.img.tmp"] {
        std::fs::write(bdir.join(f), b"old").unwrap();
    }
    let (b, _) = r.f.bundle("u.cdmb", "0.2.0", crate::ARCH, 5000);
    let file = OpenOptions::new().read(true).write(true).open(&b).unwrap();
    let v = bundle::verify(&file, &b, &r.f.trusted).unwrap();
    let (_, off) = v.payload("kernel").unwrap();
    file.write_all_at(b"X", off + 10).unwrap();
    let e = install_verified(&file, &b, &v, &r.p, Options::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "kernel changed after verification (hash differs while copying)"
    );
    // The rootfs was written, so b's old entry must be gone.
    assert_eq!(r.entries(), ["cdm-a.conf"]);
    assert!(!r.p.esp().slot_dir(Slot::B).join("vmlinuz").exists());
    assert!(!r.p.esp().slot_dir(Slot::B).join("manifest.json").exists());
    // The old initrd went in step 2 (room on the ESP), every temporary
    // with the failure.
    let left: Vec<_> = std::fs::read_dir(&bdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    r.booted_entry_untouched("a");
}

#[test]
fn a_downgrade_is_refused_with_nothing_written_unless_allowed() {
    let r = rig("a", 200_000);
    let esp = r.p.esp();
    std::fs::write(esp.rollback_index_file(), "100\n").unwrap();
    let (old, _) = r.f.bundle_at("old.cdmb", "0.1.5", crate::ARCH, 150_000, 99);
    let e = r.install(&old).unwrap_err();
    assert_eq!(
        e.to_string(),
        "bundle rollback index 99 is older than the appliance's 100 (a downgrade): \
         install it with --allow-downgrade from a root shell"
    );
    assert_eq!(r.entries(), ["cdm-a.conf"]);
    assert_eq!(r.dev("b"), vec![0xEE; 200_000], "slot b untouched");
    assert!(!esp.slot_dir(Slot::B).exists());
    let u = r.update_state();
    assert_eq!(
        (u.state.as_str(), u.version.as_deref()),
        ("failed", Some("0.1.5"))
    );
    // Allowed from a root shell; the stored index is not lowered by it.
    let i = r
        .install_with(
            &old,
            Options {
                allow_downgrade: true,
            },
        )
        .unwrap();
    assert_eq!(i.slot, Slot::B);
    assert_eq!(esp.rollback_index().unwrap(), 100);
    // An equal index is a reinstall, not a downgrade.
    let (same, _) =
        r.f.bundle_at("same.cdmb", "0.2.0", crate::ARCH, 150_000, 100);
    r.install(&same).unwrap();
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
}

#[test]
fn the_last_good_slot_is_never_overwritten() {
    let r = rig("a", 200_000);
    let esp = r.p.esp();
    let dir = esp.entries_dir();
    // b is good; a (booted) is being tried: b is the only fallback.
    std::fs::write(dir.join("cdm-b.conf"), "version 3\n").unwrap();
    std::fs::rename(dir.join("cdm-a.conf"), dir.join("cdm-a+2-1.conf")).unwrap();
    let (u, _) = r.f.bundle("u.cdmb", "0.3.0", crate::ARCH, 150_000);
    let e = r.install(&u).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the booted slot a is still being tried: wait for its health check"
    );
    assert_eq!(r.entries(), ["cdm-a+2-1.conf", "cdm-b.conf"]);
    assert_eq!(r.dev("b"), vec![0xEE; 200_000], "slot b untouched");
    // No entry for the booted slot at all: refused the same way.
    std::fs::remove_file(dir.join("cdm-a+2-1.conf")).unwrap();
    assert!(matches!(
        r.install(&u).unwrap_err(),
        InstallError::BootedNotGood("a")
    ));
    assert_eq!(r.entries(), ["cdm-b.conf"]);
    // Blessed: the install goes ahead.
    std::fs::write(dir.join("cdm-a.conf"), BOOTED_ENTRY).unwrap();
    r.install(&u).unwrap();
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
}

#[test]
fn install_and_bless_wait_for_the_esp_lock() {
    use std::sync::mpsc;
    use std::time::Duration;
    let r = rig("a", 200_000);
    let (u, _) = r.f.bundle("u.cdmb", "0.2.0", crate::ARCH, 150_000);
    let held = r.p.esp().lock().unwrap();
    assert!(r.p.esp.join("cdm/.lock").exists());
    let (r, u) = (&r, &u);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        s.spawn(move || tx.send(("install", r.install(u).is_ok())).unwrap());
        s.spawn(move || {
            tx2.send(("bless", crate::health::bless(&r.p).is_ok()))
                .unwrap()
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(700)).is_err(),
            "neither runs while the lock is held"
        );
        assert_eq!(r.entries(), ["cdm-a.conf"]);
        drop(held);
        let mut got = [
            rx.recv_timeout(Duration::from_secs(30)).unwrap(),
            rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        ];
        got.sort();
        assert_eq!(got, [("bless", true), ("install", true)]);
    });
    assert_eq!(r.entries(), ["cdm-a.conf", "cdm-b+3.conf"]);
}
