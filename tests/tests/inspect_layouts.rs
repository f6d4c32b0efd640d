//! Guest layouts in VM inspection, built with real tools and classified
//! exactly: LVM2 volume groups made by `pvcreate`/`vgcreate`/`lvcreate`
//! on loop devices (no device-mapper here: the LVs are never activated;
//! each filesystem is written where LVM's own `lvs`/`pvs` report says the
//! LV's extents are) with an XFS root and /var on its own ext4 LV found
//! through `/etc/fstab`, an ext4 root on a whole-disk PV with /var by
//! `UUID=`, a VG over two partitions with a striped LV, a VG with a
//! missing PV, damaged metadata and a damaged label; a btrfs root in a
//! non-top-level default subvolume with zstd-compressed files and a nested
//! /var subvolume; VMDK (sparse and flat), VHD and VHDX images read
//! through qemu-nbd.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::corpus::Corpus;
use cdm_e2e::*;
use serde_json::{json, Value};

/// No udev here and no device-mapper: LVM only reads and writes metadata.
const LVM_CONFIG: &str = "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 } activation { udev_sync = 0 udev_rules = 0 }";

fn lvm(tool: &str, args: &[&str]) -> String {
    run(Command::new(tool)
        .args(["--driverloaded", "n", "--config", LVM_CONFIG])
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1"))
}

fn report(tool: &str, section: &str, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["--reportformat", "json", "--units", "b", "--nosuffix"];
    a.extend_from_slice(args);
    let v: Value = serde_json::from_str(&lvm(tool, &a)).unwrap();
    v["report"][0][section].as_array().unwrap().clone()
}

fn num(v: &Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

/// PV images on loop devices and the VGs made on them: deactivated and
/// detached when dropped, also when the test fails halfway.
struct Pvs {
    loops: Vec<(String, PathBuf)>,
    vgs: Vec<String>,
}

impl Pvs {
    fn new(files: &[&Path]) -> Pvs {
        let mut p = Pvs {
            loops: Vec::new(),
            vgs: Vec::new(),
        };
        for f in files {
            let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(f));
            p.loops.push((dev.trim().to_string(), f.to_path_buf()));
        }
        p
    }

    /// `pvcreate` with options; `vg` makes the others PVs with defaults.
    fn pvcreate(&self, i: usize, opts: &[&str]) {
        let mut a = vec!["-q"];
        a.extend_from_slice(opts);
        a.push(&self.loops[i].0);
        lvm("pvcreate", &a);
    }

    fn vg(&mut self, name: &str) {
        let mut a = vec!["-q", "-s", "4m", name];
        a.extend(self.loops.iter().map(|(d, _)| d.as_str()));
        lvm("vgcreate", &a);
        self.vgs.push(name.to_string());
    }

    /// `lvcreate` with options `more`, on the PVs `on` (any if empty).
    fn lv(&self, vg: &str, name: &str, size: &str, more: &[&str], on: &[&str]) {
        let mut a = vec!["-q", "-an", "-Zn", "-n", name, "-L", size];
        a.extend_from_slice(more);
        a.push(vg);
        a.extend_from_slice(on);
        lvm("lvcreate", &a);
    }

    /// Where LVM put an LV, from its own report: (LV byte offset, length,
    /// PV image file, byte offset in that file) per segment.
    fn segments(&self, vg: &str, lv: &str) -> Vec<(u64, u64, PathBuf, u64)> {
        let devs: Vec<&str> = self.loops.iter().map(|(d, _)| d.as_str()).collect();
        let mut a = vec!["-o", "pv_name,pe_start"];
        a.extend_from_slice(&devs);
        let pe_start: Vec<(String, u64)> = report("pvs", "pv", &a)
            .iter()
            .map(|p| {
                (
                    p["pv_name"].as_str().unwrap().to_string(),
                    num(&p["pe_start"]),
                )
            })
            .collect();
        let full = format!("{vg}/{lv}");
        let segs = report(
            "lvs",
            "seg",
            &[
                "--segments",
                "-o",
                "seg_start_pe,seg_size_pe,seg_pe_ranges,vg_extent_size",
                &full,
            ],
        );
        segs.iter()
            .map(|s| {
                let ext = num(&s["vg_extent_size"]);
                let ranges = s["seg_pe_ranges"].as_str().unwrap();
                assert!(!ranges.contains(' '), "{full} is not linear: {ranges}");
                let (dev, r) = ranges.rsplit_once(':').unwrap();
                let first: u64 = r.split('-').next().unwrap().parse().unwrap();
                let start = pe_start.iter().find(|(d, _)| d == dev).unwrap().1;
                let file = self.loops.iter().find(|(d, _)| d == dev).unwrap().1.clone();
                (
                    num(&s["seg_start_pe"]) * ext,
                    num(&s["seg_size_pe"]) * ext,
                    file,
                    start + first * ext,
                )
            })
            .collect()
    }

    fn pv_uuid(&self, i: usize) -> String {
        report("pvs", "pv", &["-o", "pv_uuid", &self.loops[i].0])[0]["pv_uuid"]
            .as_str()
            .unwrap()
            .replace('-', "")
    }
}

impl Drop for Pvs {
    fn drop(&mut self) {
        for vg in &self.vgs {
            let _ = Command::new("vgchange")
                .args(["--driverloaded", "n", "--config", LVM_CONFIG, "-an", vg])
                .env("DM_DISABLE_UDEV", "1")
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .output();
        }
        for (dev, _) in &self.loops {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}

/// Writes a filesystem image into an LV's extents (after the loop devices
/// are gone, into the PV image files).
fn write_lv(fs: &Path, segs: &[(u64, u64, PathBuf, u64)]) {
    let len = std::fs::metadata(fs).unwrap().len();
    let lv_len: u64 = segs.iter().map(|s| s.1).sum();
    assert!(len <= lv_len, "{} is larger than its LV", fs.display());
    for (at, n, file, off) in segs {
        if *at >= len {
            continue;
        }
        let n = (*n).min(len - at);
        run(Command::new("dd")
            .arg(format!("if={}", fs.display()))
            .arg(format!("of={}", file.display()))
            .args([
                "bs=1M",
                "iflag=skip_bytes,count_bytes",
                "oflag=seek_bytes",
                &format!("skip={at}"),
                &format!("seek={off}"),
                &format!("count={n}"),
                "conv=notrunc,sparse",
                "status=none",
            ]));
    }
}

fn sparse(p: &Path, size: &str) {
    run(Command::new("truncate").args(["-s", size]).arg(p));
}

fn agent_inspect(specs: &[&Path]) -> Vec<Value> {
    let state = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("cdm-agent"))
        .args(["--json", "--state-dir"])
        .arg(state.path())
        .args(["vm", "inspect"])
        .args(specs));
    serde_json::from_str::<Value>(out.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn corpus(prefix: &str) -> Corpus {
    Corpus {
        dir: tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .unwrap(),
    }
}

fn os_release(id: &str, ver: &str, pretty: &str) -> String {
    format!("ID={id}\nVERSION_ID=\"{ver}\"\nPRETTY_NAME=\"{pretty}\"\n")
}

/// The fields of an inspection the LVM and btrfs tests compare exactly.
fn summary(i: &Value) -> Value {
    json!({
        "status": i["status"],
        "reason": i["reason"],
        "partition_table": i["partition_table"],
        "partitions": i["partitions"].as_array().unwrap().iter()
            .map(|p| json!([p["number"], p["filesystem"]])).collect::<Vec<_>>(),
        "root": i["root"],
        "root_volume": i["root_volume"],
        "os": i["os"],
        "apps": i["apps"],
        "volumes": i["volumes"],
        "mounts": i["mounts"],
    })
}

#[test]
fn lvm_guests_are_classified_exactly() {
    for t in [
        "pvcreate",
        "vgcreate",
        "lvcreate",
        "lvs",
        "losetup",
        "mkfs.xfs",
        "mkfs.ext4",
        "sfdisk",
        "blkid",
    ] {
        require(t);
    }
    let c = corpus("cdm-lvm-");
    let pid = std::process::id();

    // RHEL 9 on an MBR disk: one PV in partition 1, an XFS root LV, /var
    // on its own ext4 LV in two segments (a swap LV made between them),
    // named by /dev/mapper in fstab; PostgreSQL only under /var.
    let vg = format!("rhel-{pid}");
    let pv = c.p("rhel.pv");
    sparse(&pv, "400M");
    let mapper = |lv: &str| format!("/dev/mapper/{}-{lv}", vg.replace('-', "--"));
    let (root_segs, var_segs) = {
        let mut p = Pvs::new(&[&pv]);
        p.vg(&vg);
        p.lv(&vg, "root", "320M", &[], &[]);
        p.lv(&vg, "var", "16M", &[], &[]);
        p.lv(&vg, "swap", "8M", &[], &[]);
        lvm("lvextend", &["-q", "-L", "+12M", &format!("{vg}/var")]);
        (p.segments(&vg, "root"), p.segments(&vg, "var"))
    };
    assert_eq!(var_segs.len(), 2, "var is in two pieces: {var_segs:?}");
    let fstab = format!(
        "# /etc/fstab\n{} / xfs defaults 0 0\n{} /var ext4 defaults 0 0\n{} none swap defaults 0 0\n",
        mapper("root"),
        mapper("var"),
        mapper("swap")
    );
    let root = c.xfs(
        "rhel-root",
        &[
            (
                "/etc/os-release",
                &os_release("rhel", "9.3", "Red Hat Enterprise Linux 9.3 (Plow)"),
            ),
            ("/etc/hostname", "pg1\n"),
            ("/etc/fstab", &fstab),
            ("/var/", ""),
        ],
    );
    let var = c.ext4(
        "rhel-var",
        &[("/lib/postgresql/15/main/PG_VERSION", "15\n")],
    );
    write_lv(&root, &root_segs);
    write_lv(&var, &var_segs);
    let rhel = c.disk("rhel-lvm", "dos", true, &pv);

    // Ubuntu on a whole-disk PV (no partition table): ext4 root, /var on
    // XFS named by UUID=; MySQL only under /var.
    let vg2 = format!("ubuntu{pid}");
    let pv2 = c.p("ubuntu.pv");
    sparse(&pv2, "400M");
    let (root_segs, var_segs) = {
        let mut p = Pvs::new(&[&pv2]);
        p.vg(&vg2);
        p.lv(&vg2, "root", "28M", &[], &[]);
        p.lv(&vg2, "var", "320M", &[], &[]);
        (p.segments(&vg2, "root"), p.segments(&vg2, "var"))
    };
    let var = c.xfs("ubuntu-var", &[("/lib/mysql/ibdata1", "x")]);
    let uuid = run(Command::new("blkid")
        .args(["-o", "value", "-s", "UUID"])
        .arg(&var));
    let root = c.ext4(
        "ubuntu-root",
        &[
            (
                "/etc/os-release",
                &os_release("ubuntu", "22.04", "Ubuntu 22.04.4 LTS"),
            ),
            (
                "/etc/fstab",
                &format!(
                    "/dev/{vg2}/root / ext4 defaults 0 1\nUUID={} /var xfs defaults 0 2\n",
                    uuid.trim()
                ),
            ),
            ("/opt/ibm/db2/", ""),
            ("/var/", ""),
        ],
    );
    write_lv(&root, &root_segs);
    write_lv(&var, &var_segs);

    // SLES on a VG over two PVs in two partitions of one disk: the root
    // LV spans both; a striped LV (two stripes) is not readable.
    let vg3 = format!("sles{pid}");
    let (pa, pb) = (c.p("sles-a.pv"), c.p("sles-b.pv"));
    sparse(&pa, "80M");
    sparse(&pb, "80M");
    let (root_segs, uuid_b) = {
        let mut p = Pvs::new(&[&pa, &pb]);
        p.vg(&vg3);
        let first = p.loops[0].0.clone();
        p.lv(&vg3, "data", "16M", &["-i", "2", "-I", "64k"], &[]);
        p.lv(&vg3, "pad", "56M", &[], &[&first]);
        // The rest of the first PV, then the second.
        p.lv(&vg3, "root", "12M", &[], &[&first]);
        let second = p.loops[1].0.clone();
        lvm(
            "lvextend",
            &["-q", "-L", "+16M", &format!("{vg3}/root"), &second],
        );
        (p.segments(&vg3, "root"), p.pv_uuid(1))
    };
    let root_files: Vec<PathBuf> = root_segs.iter().map(|s| s.2.clone()).collect();
    assert!(
        root_files.contains(&pa) && root_files.contains(&pb),
        "the root spans both PVs: {root_segs:?}"
    );
    let root = c.ext4(
        "sles-root",
        &[(
            "/etc/os-release",
            &os_release("sles", "15.5", "SUSE Linux Enterprise Server 15 SP5"),
        )],
    );
    write_lv(&root, &root_segs);
    let sles = c.disk_parts("sles-lvm", "gpt", false, &[&pa, &pb]);

    // Damaged: the RHEL disk with its VG text changed (checksum), and
    // with its PV label changed.
    let damaged = |name: &str, find: &[u8], with: &[u8]| -> PathBuf {
        let out = c.p(name);
        std::fs::copy(&rhel, &out).unwrap();
        let mut head = vec![0u8; 4 << 20];
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        f.read_exact_at(&mut head, 0).unwrap();
        let mut hits = 0;
        for i in 0..head.len() - find.len() {
            if &head[i..i + find.len()] == find {
                f.write_all_at(with, i as u64).unwrap();
                hits += 1;
            }
        }
        assert!(hits > 0, "{name}: nothing to damage");
        out
    };
    let bad_text = damaged("rhel-badtext.img", b"extent_size = ", b"extent_sizf = ");
    let bad_label = damaged("rhel-badlabel.img", b"LVM2 001", b"LVM2 001\xff");

    // A PV made without a metadata area, its VG described only by the
    // other PV (not on this disk).
    let vg4 = format!("nometa{pid}");
    let (pm, pn) = (c.p("meta.pv"), c.p("nometa.pv"));
    sparse(&pm, "16M");
    sparse(&pn, "16M");
    let uuid_n = {
        let mut p = Pvs::new(&[&pm, &pn]);
        p.pvcreate(1, &["--metadatacopies", "0"]);
        p.vg(&vg4);
        let second = p.loops[1].0.clone();
        p.lv(&vg4, "root", "8M", &[], &[&second]);
        p.pv_uuid(1)
    };

    let got = agent_inspect(&[&rhel, &pv2, &sles, &pa, &bad_text, &bad_label, &pn]);
    cdm_e2e::corpus::keep(
        "lvm.list",
        &[
            ("rhel-lvm", &rhel),
            ("ubuntu-pv", &pv2),
            ("sles-lvm", &sles),
            ("sles-pv-alone", &pa),
        ],
    );
    let vol = |name: &str, size: u64, part: u32, fs: Option<&str>| json!({"name": name, "size": size, "partition": part, "filesystem": fs});
    let mib = 1u64 << 20;
    assert_eq!(
        summary(&got[0]),
        json!({
            "status": "ok", "reason": null, "partition_table": "mbr",
            "partitions": [[1, "lvm2"]], "root": 1, "root_volume": format!("{vg}/root"),
            "os": {"family": "linux", "distro": "rhel", "version": "9.3",
                   "product_name": "Red Hat Enterprise Linux 9.3 (Plow)", "hostname": "pg1",
                   "evidence": "/etc/os-release"},
            "apps": [{"name": "PostgreSQL", "evidence": "/var/lib/postgresql"}],
            "volumes": [vol(&format!("{vg}/root"), 320 * mib, 1, Some("xfs")),
                        vol(&format!("{vg}/var"), 28 * mib, 1, Some("ext4")),
                        vol(&format!("{vg}/swap"), 8 * mib, 1, None)],
            "mounts": [{"path": "/var", "device": mapper("var"), "partition": 1,
                        "volume": format!("{vg}/var")}],
        }),
        "{:#}",
        got[0]
    );
    assert_eq!(
        summary(&got[1]),
        json!({
            "status": "ok", "reason": null, "partition_table": "none",
            "partitions": [[0, "lvm2"]], "root": 0, "root_volume": format!("{vg2}/root"),
            "os": {"family": "linux", "distro": "ubuntu", "version": "22.04",
                   "product_name": "Ubuntu 22.04.4 LTS", "hostname": null,
                   "evidence": "/etc/os-release"},
            "apps": [{"name": "DB2", "evidence": "/opt/ibm/db2"},
                     {"name": "MySQL", "evidence": "/var/lib/mysql"}],
            "volumes": [vol(&format!("{vg2}/root"), 28 * mib, 0, Some("ext4")),
                        vol(&format!("{vg2}/var"), 320 * mib, 0, Some("xfs"))],
            "mounts": [{"path": "/var", "device": format!("UUID={}", uuid.trim()), "partition": 0,
                        "volume": format!("{vg2}/var")}],
        }),
        "{:#}",
        got[1]
    );
    let striped = "segment1: segment type striped over 2 PVs is not supported (linear only)";
    let mut data = vol(&format!("{vg3}/data"), 16 * mib, 1, None);
    data["reason"] = json!(striped);
    assert_eq!(
        summary(&got[2]),
        json!({
            "status": "ok", "reason": null, "partition_table": "gpt",
            "partitions": [[1, "lvm2"], [2, "lvm2"]], "root": 1, "root_volume": format!("{vg3}/root"),
            "os": {"family": "linux", "distro": "sles", "version": "15.5",
                   "product_name": "SUSE Linux Enterprise Server 15 SP5", "hostname": null,
                   "evidence": "/etc/os-release"},
            "apps": [],
            "volumes": [data.clone(),
                        vol(&format!("{vg3}/pad"), 56 * mib, 1, None),
                        vol(&format!("{vg3}/root"), 28 * mib, 1, Some("ext4"))],
            "mounts": null,
        }),
        "{:#}",
        got[2]
    );
    // One PV of that VG alone: the root's second piece is missing.
    let missing = format!("PV pv1 ({uuid_b}) is not on this disk");
    let mut root_v = vol(&format!("{vg3}/root"), 28 * mib, 0, None);
    root_v["reason"] = json!(missing);
    data["partition"] = json!(0);
    assert_eq!(
        summary(&got[3]),
        json!({
            "status": "unknown",
            "reason": format!("no operating system found: LV {vg3}/data: {striped}; LV {vg3}/pad: no filesystem recognised; LV {vg3}/root: {missing}"),
            "partition_table": "none", "partitions": [[0, "lvm2"]], "root": null, "root_volume": null,
            "os": null, "apps": [],
            "volumes": [data, vol(&format!("{vg3}/pad"), 56 * mib, 0, None), root_v],
            "mounts": null,
        }),
        "{:#}",
        got[3]
    );
    assert_eq!(
        summary(&got[6]),
        json!({
            "status": "unknown",
            "reason": format!("no operating system found: partition 0: LVM: PV {uuid_n} holds no metadata and no PV on this disk describes it"),
            "partition_table": "none", "partitions": [[0, "lvm2"]], "root": null,
            "root_volume": null, "os": null, "apps": [], "volumes": null, "mounts": null,
        }),
        "{:#}",
        got[6]
    );
    for (g, why) in [
        (
            &got[4],
            "metadata text checksum mismatch (damaged metadata)",
        ),
        (&got[5], "PV label checksum mismatch (damaged label)"),
    ] {
        assert_eq!(
            summary(g),
            json!({
                "status": "unknown",
                "reason": format!("no operating system found: partition 1: LVM: {why}"),
                "partition_table": "mbr", "partitions": [[1, "lvm2"]], "root": null,
                "root_volume": null, "os": null, "apps": [], "volumes": null, "mounts": null,
            }),
            "{g:#}"
        );
    }
}

#[test]
fn btrfs_guest_is_classified_exactly() {
    for t in ["mkfs.btrfs", "btrfs", "filefrag", "sfdisk", "losetup"] {
        require(t);
    }
    let c = corpus("cdm-btrfs-");
    let img = c.p("suse.fs");
    sparse(&img, "300M");
    run(Command::new("mkfs.btrfs").arg("-q").arg(&img));
    let mnt = c.p("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop,compress-force=zstd"])
        .arg(&img)
        .arg(&mnt));
    let m = LoopMount::new(mnt.clone());
    let top = |p: &str| mnt.join(p);
    let put = |p: &str, data: &[u8]| {
        let p = top(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_file(&p, data);
    };
    run(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(top("@")));
    run(Command::new("btrfs")
        .args(["-q", "subvolume", "create"])
        .arg(top("@/var")));
    // A decoy at the top level: the default subvolume must be read.
    put("etc/os-release", b"ID=decoy\n");
    // os-release padded past inline size: a regular zstd extent; /etc's
    // link to it as on openSUSE and Fedora.
    let mut rel = os_release("opensuse-leap", "15.5", "openSUSE Leap 15.5").into_bytes();
    for i in 0..400 {
        rel.extend_from_slice(format!("# padding line {i} of a long os-release\n").as_bytes());
    }
    put("@/usr/lib/os-release", &rel);
    // /etc's new files zlib-compressed (the property beats the mount
    // option): the hostname padded to a regular compressed extent.
    std::fs::create_dir_all(top("@/etc")).unwrap();
    run(Command::new("btrfs")
        .args(["property", "set"])
        .arg(top("@/etc"))
        .args(["compression", "zlib"]));
    let mut host = b"suse1\n".to_vec();
    host.extend(std::iter::repeat_n(b'\n', 8192));
    put("@/etc/hostname", &host);
    std::os::unix::fs::symlink("../usr/lib/os-release", top("@/etc/os-release")).unwrap();

    // dpkg's status past one 128 KiB compressed extent, PostgreSQL last.
    let mut status = Vec::new();
    for i in 0..3000 {
        status.extend_from_slice(
            format!("Package: lib{i}\nStatus: install ok installed\nVersion: 1.{i}\n\n").as_bytes(),
        );
    }
    status.extend_from_slice(b"Package: postgresql-15\nStatus: install ok installed\n");
    put("@/var/lib/dpkg/status", &status);
    sh(&format!("sync; btrfs subvolume set-default $(btrfs subvolume list {0} | awk '$NF==\"@\"{{print $2}}') {0}", mnt.display()));
    for f in [
        "@/usr/lib/os-release",
        "@/var/lib/dpkg/status",
        "@/etc/hostname",
    ] {
        let frag = run(Command::new("filefrag").arg("-v").arg(top(f)));
        assert!(frag.contains("encoded"), "{f} is compressed: {frag}");
    }
    let tree = run(Command::new("btrfs")
        .args(["inspect-internal", "dump-tree"])
        .arg(&img));
    assert!(tree.contains("compression 1"), "a zlib extent (hostname)");
    assert!(tree.contains("compression 3"), "zstd extents");
    drop(m);
    let disk = c.disk("suse", "gpt", false, &img);
    let got = agent_inspect(&[&disk]);
    cdm_e2e::corpus::keep("btrfs.list", &[("suse-btrfs", &disk)]);
    assert_eq!(
        summary(&got[0]),
        json!({
            "status": "ok", "reason": null, "partition_table": "gpt",
            "partitions": [[1, "btrfs"]], "root": 1, "root_volume": null,
            "os": {"family": "linux", "distro": "opensuse", "version": "15.5",
                   "product_name": "openSUSE Leap 15.5", "hostname": "suse1",
                   "evidence": "/etc/os-release"},
            "apps": [{"name": "PostgreSQL", "evidence": "/var/lib/dpkg/status: postgresql-15"}],
            "volumes": null, "mounts": null,
        }),
        "{:#}",
        got[0]
    );
}

#[test]
fn vmdk_vhd_and_vhdx_images_are_read_through_qemu_nbd() {
    for t in ["qemu-img", "qemu-nbd", "mkfs.ext4", "sfdisk"] {
        require(t);
    }
    let c = corpus("cdm-formats-");
    let fs = c.ext4(
        "debian",
        &[
            (
                "/etc/os-release",
                &os_release("debian", "12", "Debian GNU/Linux 12 (bookworm)"),
            ),
            ("/etc/mysql/my.cnf", "[mysqld]\n"),
        ],
    );
    let raw = c.p("debian.img");
    std::fs::rename(c.disk("debian", "dos", true, &fs), &raw).unwrap();
    let mut disks = Vec::new();
    for (name, fmt, opts) in [
        ("sparse.vmdk", "vmdk", ""),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("disk.vhd", "vpc", ""),
        ("disk.vhdx", "vhdx", ""),
    ] {
        let out = c.p(name);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-q", "-f", "raw", "-O", fmt]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        run(cmd.arg(&raw).arg(&out));
        disks.push((name, out));
    }
    assert!(c.p("flat-flat.vmdk").exists(), "the flat VMDK's extent");
    // Plain paths: the format comes from the extension.
    let mut inv = String::new();
    for (name, p) in &disks {
        inv.push_str(&format!(
            "[[vm]]\nname = \"{}\"\ndisks = [\"{}\"]\n",
            name.replace('.', "-"),
            p.display()
        ));
    }
    // A libvirt domain naming the format (a directory of domain files).
    std::fs::create_dir_all(c.p("libvirt")).unwrap();
    let xml = c.p("libvirt/vm.xml");
    std::fs::write(
        &xml,
        format!(
            "<domain type='kvm'><name>vhd-libvirt</name><devices><disk type='file' device='disk'>\
             <driver name='qemu' type='vpc'/><source file='{}'/><target dev='vda'/></disk></devices></domain>",
            disks[2].1.display()
        ),
    )
    .unwrap();
    let toml = c.p("inv.toml");
    std::fs::write(&toml, inv).unwrap();
    let state = tempfile::tempdir().unwrap();
    for (inv, n) in [(toml, 4), (c.p("libvirt"), 1)] {
        let out = run(Command::new(bin("cdm-agent"))
            .args(["--json", "--state-dir"])
            .arg(state.path())
            .args(["vm", "tree", "--by", "os", "--inventory"])
            .arg(inv));
        let t: Value = serde_json::from_str(&out).unwrap();
        let vms = t["vms"].as_array().unwrap();
        assert_eq!(vms.len(), n, "{t:#}");
        for v in vms {
            assert_eq!(v["os"]["distro"], "debian", "{v:#}");
            assert_eq!(v["os"]["version"], "12", "{v:#}");
            assert_eq!(v["apps"], json!(["MySQL"]), "{v:#}");
            assert_eq!(v["disks"][0]["status"], "ok", "{v:#}");
        }
    }
}
