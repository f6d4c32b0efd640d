//! The NBD server against real clients nobody here wrote: libnbd's nbdinfo,
//! nbdcopy and nbdfuse, qemu-img and qemu-io, fio's nbd engine, and the
//! kernel's ext4 through a loop device.

use std::process::Command;

use cdm_e2e::stamp;
use cdm_e2e::*;

fn setup(vol_size: &str) -> (Env, NbdServer) {
    let env = Env::new("4G");
    env.cdmfs(&["volume", "create", "db", "--size", vol_size]);
    let srv = env.serve(&[]);
    (env, srv)
}

#[test]
fn nbdinfo_lists_exports_sizes_flags_and_map() {
    require("nbdinfo");
    require("qemu-io");
    let env = Env::new("1G");
    env.cdmfs(&[
        "volume",
        "create",
        "db",
        "--size",
        "64M",
        "--block-size",
        "64K",
    ]);
    let data = random_bytes(3 << 20, 1);
    write_file(&env.path("d"), &data);
    env.cdmfs(&[
        "write",
        "db",
        env.path("d").to_str().unwrap(),
        "--offset",
        "1M",
    ]);
    let snap = env.cdmfs_json(&["snapshot", "create", "db", "--label", "base"]);
    let sid = snap["id"].as_u64().unwrap();
    let srv = env.serve(&[]);
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(srv.unix_uri("")));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"db"), "{names:?}");
    let snapname = format!("db@{sid}");
    assert!(names.contains(&snapname.as_str()), "{names:?}");
    for e in exports {
        assert_eq!(e["export-size"].as_u64(), Some(64 << 20));
        let ro = e["is_read_only"].as_bool().unwrap();
        assert_eq!(ro, e["export-name"].as_str().unwrap().contains('@'));
        assert_eq!(e["can_multi_conn"].as_bool(), Some(true));
        assert_eq!(e["can_flush"].as_bool(), Some(true));
        assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20));
    }
    // base:allocation reflects the extent tree: data at 1M..4M, holes elsewhere.
    run(Command::new("qemu-io").args(["-f", "raw", &srv.unix_uri("db"), "-c", "discard 2M 64k"]));
    let map = run(Command::new("nbdinfo")
        .arg("--map")
        .arg("--json")
        .arg(srv.tcp_uri("db")));
    let m: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let runs: Vec<(u64, u64, u64)> = m
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0, 1 << 20, 3),
            (1 << 20, 1 << 20, 0),
            (2 << 20, 65536, 3),
            ((2 << 20) + 65536, (2 << 20) - 65536, 0),
            (4 << 20, 60 << 20, 3)
        ]
    );
    // The snapshot still maps the discarded block.
    let smap = run(Command::new("nbdinfo")
        .arg("--map")
        .arg("--json")
        .arg(srv.unix_uri(&snapname)));
    let sm: Vec<serde_json::Value> = serde_json::from_str(&smap).unwrap();
    assert_eq!(sm.len(), 3, "{smap}");
    srv.stop();
}

#[test]
fn qemu_img_convert_compare_info_both_ways() {
    require("qemu-img");
    let (env, srv) = setup("96M");
    let img = env.path("in.raw");
    let mut data = random_bytes(80 << 20, 2);
    data[10 << 20..20 << 20].fill(0);
    write_file(&img, &data);
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        img.to_str().unwrap(),
        &srv.unix_uri("db"),
    ]));
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &srv.tcp_uri("db")]));
    let i: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(i["virtual-size"].as_u64(), Some(96 << 20));
    // qemu-img compare treats the 16 MiB tail past the file as zeros only in strict size mode off.
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        &srv.tcp_uri("db"),
    ]));
    // Back out to a qcow2 file and compare again.
    let q = env.path("out.qcow2");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &srv.unix_uri("db"),
        q.to_str().unwrap(),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        q.to_str().unwrap(),
        &srv.unix_uri("db"),
    ]));
    // The zero range was stored as holes.
    let map = run(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &srv.unix_uri("db"),
    ]));
    let m: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    assert!(
        m.iter()
            .any(|e| e["start"].as_u64() == Some(10 << 20) && e["data"].as_bool() == Some(false)),
        "{map}"
    );
    srv.stop();
}

#[test]
fn qemu_io_patterns_unaligned_and_across_blocks() {
    require("qemu-io");
    let (env, srv) = setup("16M");
    let uri = srv.unix_uri("db");
    let out = stamp::qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 1000 70000",
        "-c",
        "read -P 0xab 0 1000",
        "-c",
        "read -P 0xcd 1000 70000",
        "-c",
        "read -P 0xab 71000 977576",
        "-c",
        "write -z 131072 65536",
        "-c",
        "read -P 0 131072 65536",
        "-c",
        "write -z -u 200000 300000",
        "-c",
        "read -P 0 200000 300000",
        "-c",
        "read -P 0xab 500000 548576",
        "-c",
        "discard 1M 1M",
        "-c",
        "read -P 0 1M 1M",
        "-c",
        "flush",
        "-c",
        "write -P 0x11 -f 16773120 4096",
        "-c",
        "read -P 0x11 16773120 4096",
    ]);
    assert!(!out.contains("failed"), "{out}");
    // One-byte patterns cannot tell one sector from its neighbour: the same
    // kind of unaligned overwrite across block boundaries with stamped
    // sectors, written by qemu-io from a file, read back by nbdcopy.
    let t = stamp::tag("db");
    let base = stamp::random(t, 4 << 20, 2 << 20, 1);
    let over_at = (4 << 20) + 3 * 512 + 65536 - 4096;
    let over = stamp::random(t, over_at, 70 * 512, 2);
    write_file(&env.path("base"), &base);
    write_file(&env.path("over"), &over);
    stamp::qemu_io(&[
        "-f",
        "raw",
        &uri,
        "-c",
        &format!(
            "write -s {} {} {}",
            env.path("base").display(),
            4 << 20,
            base.len()
        ),
        "-c",
        &format!(
            "write -s {} {over_at} {}",
            env.path("over").display(),
            over.len()
        ),
    ]);
    let back = env.path("back.raw");
    run(Command::new("nbdcopy").args([&uri, back.to_str().unwrap()]));
    let got = std::fs::read(&back).unwrap();
    let range = (4u64 << 20)..(6 << 20);
    let ov = over_at..over_at + over.len() as u64;
    stamp::verify_with(
        &got[4 << 20..6 << 20],
        t,
        4 << 20,
        stamp::Body::Random,
        |o| {
            Some(if ov.contains(&o) {
                2
            } else if range.contains(&o) {
                1
            } else {
                0
            })
        },
    )
    .unwrap_or_else(|e| panic!("stamped overwrite read back by nbdcopy: {e}"));
    // Past the end: refused.
    let err = run_fail(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 1 16776000 4096",
    ]));
    assert!(
        err.to_lowercase().contains("out of range")
            || err.contains("Input/output")
            || err.contains("No space"),
        "{err}"
    );
    srv.stop();
}

#[test]
fn nbdcopy_both_directions_and_socket_activation() {
    require("nbdcopy");
    let (env, srv) = setup("64M");
    let src = env.path("src.raw");
    let data = random_bytes(64 << 20, 3);
    write_file(&src, &data);
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &srv.tcp_uri("db")]));
    let back = env.path("back.raw");
    run(Command::new("nbdcopy").args([&srv.unix_uri("db"), back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    srv.stop();
    // Socket activation: nbdcopy starts the server itself.
    let act = env.path("act.raw");
    run(Command::new("nbdcopy")
        .args(["--", "["])
        .arg(bin("cdm-nbd"))
        .args(["--pool"])
        .arg(&env.pool)
        .args(["--default-export", "db", "]"])
        .arg(&act));
    assert!(
        std::fs::read(&act).unwrap() == data,
        "socket-activated copy differs"
    );
}

#[test]
fn fio_nbd_engine_verify_crc32c() {
    require("fio");
    let (env, srv) = setup("256M");
    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("write", "1M", "8")] {
        let out = run(Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.unix_uri("db")),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--size=128M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]));
        let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        assert_eq!(j["jobs"][0]["error"].as_u64(), Some(0), "{out}");
    }
    let _ = env;
    srv.stop();
}

#[test]
fn snapshot_export_is_read_only_and_frozen() {
    require("qemu-io");
    require("nbdcopy");
    let env = Env::new("1G");
    env.cdmfs(&["volume", "create", "db", "--size", "32M"]);
    let base = random_bytes(32 << 20, 4);
    write_file(&env.path("base"), &base);
    env.cdmfs(&["write", "db", env.path("base").to_str().unwrap()]);
    let sid = env.cdmfs_json(&["snapshot", "create", "db"])["id"]
        .as_u64()
        .unwrap();
    let srv = env.serve(&[]);
    let snap = srv.unix_uri(&format!("db@{sid}"));
    let err =
        run_fail(Command::new("qemu-io").args(["-f", "raw", &snap, "-c", "write -P 1 0 4096"]));
    assert!(
        err.contains("read-only")
            || err.contains("Operation not permitted")
            || err.contains("Permission"),
        "{err}"
    );
    // The volume changes (stamped sectors written by qemu-io); the
    // snapshot does not.
    let t = stamp::tag("db");
    write_file(&env.path("new"), &stamp::random(t, 0, 8 << 20, 2));
    stamp::qemu_io(&[
        "-f",
        "raw",
        &srv.unix_uri("db"),
        "-c",
        &format!("write -s {} 0 8M", env.path("new").display()),
        "-c",
        "discard 16M 8M",
        "-c",
        "flush",
    ]);
    let out = env.path("snap.raw");
    run(Command::new("nbdcopy").args([&snap, out.to_str().unwrap()]));
    assert!(std::fs::read(&out).unwrap() == base, "snapshot changed");
    stamp::qemu_io(&["-f", "raw", &srv.unix_uri("db"), "-c", "read -P 0 16M 8M"]);
    let live = stamp::read_nbd(&srv.endpoint(), "db", 0, 8 << 20);
    stamp::assert_stamped("the volume after the snapshot", &live, t, 0, 2);
    srv.stop();
    assert!(env.cdmfs(&["fsck"]).contains("clean"));
}

/// Unmounts, detaches and stops nbdfuse even when the test fails.
struct Attached {
    mnt: std::path::PathBuf,
    loopdev: String,
    fuse: std::process::Child,
    fusedir: std::path::PathBuf,
}

impl Attached {
    fn new(env: &Env, name: &str, uri: &str, ro: bool) -> Attached {
        let fusedir = env.path(&format!("fuse-{name}"));
        let mnt = env.path(&format!("mnt-{name}"));
        std::fs::create_dir_all(&fusedir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut c = Command::new("nbdfuse");
        if ro {
            c.arg("--readonly");
        }
        let fuse = c
            .arg(fusedir.join("disk"))
            .arg(uri)
            .spawn()
            .expect("nbdfuse");
        let disk = fusedir.join("disk");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut l = Command::new("losetup");
        l.args(["-f", "--show"]);
        if ro {
            l.arg("-r");
        }
        let loopdev = run(l.arg(&disk)).trim().to_string();
        Attached {
            mnt,
            loopdev,
            fuse,
            fusedir,
        }
    }
    fn mount(&self, opts: &str) {
        run(Command::new("mount")
            .args(["-o", opts, &self.loopdev])
            .arg(&self.mnt));
    }
    fn umount(&self) {
        run(Command::new("umount").arg(&self.mnt));
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).output();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fusedir)
            .output();
        let _ = Command::new("umount").arg(&self.fusedir).output();
        let _ = self.fuse.wait();
    }
}

#[test]
fn ext4_through_nbdfuse_loop_mount_and_read_only_snapshot() {
    for t in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount"] {
        require(t);
    }
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices, mount); CI runs as root"
    );
    let env = Env::new("2G");
    env.cdmfs(&["volume", "create", "fs", "--size", "256M"]);
    let srv = env.serve(&[]);
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                format!("f{i}.bin"),
                random_bytes(100_000 + i * 37_000, 10 + i as u64),
            )
        })
        .collect();
    {
        let a = Attached::new(&env, "fs", &srv.unix_uri("fs"), false);
        run(Command::new("mkfs.ext4").args(["-q", "-F", &a.loopdev]));
        a.mount("rw");
        for (n, d) in &files {
            write_file(&a.mnt.join(n), d);
        }
        sh(&format!(
            "mkdir -p {0}/dir/sub && echo hello > {0}/dir/sub/x && sync",
            a.mnt.display()
        ));
        a.umount();
        run(Command::new("e2fsck").args(["-fn", &a.loopdev]));
    }
    srv.stop();
    // Snapshot the unmounted filesystem, serve again.
    let sid = env.cdmfs_json(&["snapshot", "create", "fs", "--label", "after-files"])["id"]
        .as_u64()
        .unwrap();
    let srv = env.serve(&[]);
    let live = Attached::new(&env, "live", &srv.unix_uri("fs"), false);
    live.mount("rw");
    // The volume changes while the snapshot is mounted read-only.
    sh(&format!("rm {0}/f0.bin; echo changed > {0}/f1.bin; head -c 5000000 /dev/urandom > {0}/new.bin; sync", live.mnt.display()));
    let snap = Attached::new(&env, "snap", &srv.unix_uri(&format!("fs@{sid}")), true);
    snap.mount("ro,noload");
    for (n, d) in &files {
        assert!(
            std::fs::read(snap.mnt.join(n)).unwrap() == *d,
            "{n} differs in the snapshot"
        );
    }
    assert!(!snap.mnt.join("new.bin").exists());
    assert_eq!(
        std::fs::read_to_string(snap.mnt.join("dir/sub/x")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(live.mnt.join("f1.bin")).unwrap(),
        "changed\n"
    );
    snap.umount();
    live.umount();
    run(Command::new("e2fsck").args(["-fn", &live.loopdev]));
    drop(snap);
    drop(live);
    srv.stop();
    assert!(env.cdmfs(&["fsck"]).contains("clean"));
}
