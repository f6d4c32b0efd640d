//! A small bootable guest for the VM tests: a raw disk with an MBR
//! (syslinux's), one bootable ext4 partition holding `/etc/os-release`,
//! a Debian kernel and an initramfs of busybox, booted by extlinux. The
//! initramfs prints `CDM-GUEST: booted`, mounts the disk's partition,
//! prints `CDM-GUEST-MARKER: <the partition's /marker>` (what the disk held,
//! so a recovered VM shows which point it booted from), starts the
//! partition's `/cdm-run` in the background when there is one, prints
//! `CDM-GUEST: ready` and idles. The kernel and the private qemu-system
//! come from `scripts/lib.sh` (`qemu_system_private`, `vm_guest_kit`),
//! under `$CDM_QEMU_DIR` (default `/opt/cdm-qemu`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{require, run};

/// The kit's directory.
pub fn kit_dir() -> PathBuf {
    PathBuf::from(std::env::var("CDM_QEMU_DIR").unwrap_or_else(|_| "/opt/cdm-qemu".into()))
}

/// The qemu-system-x86_64 the VM tests run (the private one).
pub fn qemu_system() -> PathBuf {
    let p = kit_dir().join("bin/qemu-system-x86_64");
    assert!(
        p.exists(),
        "{} is missing: scripts/test unpacks it (scripts/lib.sh qemu_system_private)",
        p.display()
    );
    p
}

/// What the guest disk holds.
pub struct GuestSpec<'a> {
    /// The disk's size (sparse).
    pub size: u64,
    /// `/marker` on the partition.
    pub marker: &'a str,
    /// `/cdm-run` on the partition (a busybox shell script), started in
    /// the background after the marker is printed.
    pub run_script: Option<&'a str>,
    /// More files on the partition: (absolute path, content).
    pub files: &'a [(&'a str, &'a str)],
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "CDM-GUEST: booted"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
i=0; while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda1 /mnt; then
  echo "CDM-GUEST-MARKER: $(cat /mnt/marker)"
  [ -x /mnt/cdm-run ] && /mnt/cdm-run </dev/null >/dev/console 2>&1 &
else
  echo "CDM-GUEST: no root disk"
fi
echo "CDM-GUEST: ready"
while true; do sleep 3600; done
"#;

const OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n";

/// The initramfs (built once per directory).
fn initramfs(work: &Path) -> PathBuf {
    let out = work.join("initrd.img");
    if out.exists() {
        return out;
    }
    require("cpio");
    let root = work.join("initrd.d");
    for d in ["bin", "lib/modules", "proc", "sys", "dev", "mnt"] {
        std::fs::create_dir_all(root.join(d)).expect("initramfs tree");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static (scripts/test installs it)");
    let mods = work.join("mods.d");
    std::fs::create_dir_all(&mods).expect("modules dir");
    run(Command::new("tar")
        .arg("xf")
        .arg(kit_dir().join("guest/modules.tar"))
        .arg("-C")
        .arg(&mods));
    run(Command::new("sh").arg("-c").arg(format!(
        "find {} -name '*.ko' -exec cp {{}} {} \\;",
        mods.display(),
        root.join("lib/modules").display()
    )));
    let init = root.join("init");
    std::fs::write(&init, INIT).expect("init");
    run(Command::new("chmod").arg("755").arg(&init));
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        root.display(),
        out.display()
    )));
    out
}

/// Builds `dir/NAME.raw`, a disk that boots by itself (see the module).
pub fn build_guest(dir: &Path, name: &str, spec: &GuestSpec) -> PathBuf {
    // SAFETY: a plain query of this process's identity.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the guest disk is built with losetup and mount: run as root"
    );
    for t in ["sfdisk", "losetup", "mkfs.ext4", "extlinux"] {
        require(t);
    }
    let kernel = kit_dir().join("guest/vmlinuz");
    assert!(
        kernel.exists(),
        "{} is missing: scripts/test fetches it (scripts/lib.sh vm_guest_kit)",
        kernel.display()
    );
    let work = dir.join(format!("{name}.build"));
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("boot/extlinux")).expect("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::copy(&kernel, tree.join("boot/vmlinuz")).expect("kernel");
    std::fs::copy(initramfs(&work), tree.join("boot/initrd.img")).expect("initramfs");
    std::fs::write(
        tree.join("boot/extlinux/extlinux.conf"),
        "DEFAULT cdm\nPROMPT 0\nTIMEOUT 1\nLABEL cdm\n  KERNEL /boot/vmlinuz\n  INITRD /boot/initrd.img\n  APPEND console=ttyS0 panic=-1\n",
    )
    .expect("extlinux.conf");
    std::fs::write(tree.join("etc/os-release"), OS_RELEASE).expect("os-release");
    std::fs::write(tree.join("marker"), format!("{}\n", spec.marker)).expect("marker");
    if let Some(s) = spec.run_script {
        let p = tree.join("cdm-run");
        std::fs::write(&p, s).expect("cdm-run");
        run(Command::new("chmod").arg("755").arg(&p));
    }
    for (p, c) in spec.files {
        let p = tree.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
        std::fs::write(&p, c).expect("file");
    }
    let img = dir.join(format!("{name}.raw"));
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(spec.size))
        .expect("disk image");
    run(Command::new("sh").arg("-c").arg(format!(
        "echo 'start=2048, type=83, bootable' | sfdisk -q {}",
        img.display()
    )));
    with_partition(&img, |dev, mnt| {
        // 4 KiB blocks whatever the size: extlinux does not boot from the
        // 1 KiB blocks mke2fs picks for small filesystems.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&tree)
            .arg(dev));
        mount(dev, mnt);
        let r = Command::new("extlinux")
            .arg("--install")
            .arg(mnt.join("boot/extlinux"))
            .output();
        umount(mnt);
        let r = r.expect("extlinux");
        assert!(
            r.status.success(),
            "extlinux: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    });
    run(Command::new("dd")
        .arg("if=/usr/lib/EXTLINUX/mbr.bin")
        .arg(format!("of={}", img.display()))
        .args(["conv=notrunc", "bs=440", "count=1", "status=none"]));
    let _ = std::fs::remove_dir_all(&work);
    img
}

/// Rewrites `/marker` on a guest disk built by [`build_guest`].
pub fn set_marker(img: &Path, marker: &str) {
    with_partition(img, |dev, mnt| {
        mount(dev, mnt);
        let r = std::fs::write(mnt.join("marker"), format!("{marker}\n"));
        umount(mnt);
        r.expect("marker");
    });
}

fn mount(dev: &Path, mnt: &Path) {
    run(Command::new("mount").arg(dev).arg(mnt));
}

fn umount(mnt: &Path) {
    let ok = Command::new("umount")
        .arg(mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
}

/// Runs `f` with the partition (at 1 MiB) as a loop device and an empty
/// mount point; the loop device is detached even when `f` panics.
fn with_partition(img: &Path, f: impl FnOnce(&Path, &Path)) {
    let dev = run(Command::new("losetup")
        .args(["-f", "--show", "-o", "1048576"])
        .arg(img))
    .trim()
    .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let guard = Detach(dev.clone());
    let mnt = img.with_extension("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    f(Path::new(&dev), &mnt);
    drop(guard);
    let _ = std::fs::remove_dir(&mnt);
}

/// Waits until the serial log at `path` holds `needle`; the log so far.
pub fn wait_serial(path: &Path, needle: &str, secs: u64) -> String {
    let t = Instant::now();
    loop {
        let log = std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{needle:?} not on the serial console after {secs} s; the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A qemu running a test guest; killed when dropped (a failing test
/// leaves no VM behind).
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots a test guest in software emulation (KVM cannot run a guest
/// kernel in this sandbox: docs/vm-recovery.md), 256 MiB, no NIC, its
/// serial console to `log`; `disk` holds the disk's arguments
/// (`-drive …` or `-blockdev …` and `-device …`), `extra` anything more.
pub fn start(log: &Path, disk: &[String], extra: &[String]) -> Running {
    let child = Command::new(qemu_system())
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
        .args(disk)
        .args(extra)
        .args(["-nic", "none"])
        .spawn()
        .expect("qemu-system");
    Running(child)
}

/// A libvirt domain XML for a guest disk (the VM tests' inventories).
pub fn domain_xml(name: &str, disks: &[&Path], memory_mib: u64, vcpus: u32) -> String {
    let mut d = String::new();
    for (i, p) in disks.iter().enumerate() {
        d.push_str(&format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vd{}' bus='virtio'/></disk>",
            p.display(),
            (b'a' + i as u8) as char
        ));
    }
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{d}<interface type='network'><mac address='52:54:00:aa:bb:01'/><model type='virtio'/></interface></devices></domain>"
    )
}
