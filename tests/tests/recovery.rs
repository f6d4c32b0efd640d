//! Recovery on the appliance with real kernel mounts: the FUSE view,
//! read-only snapshot mounts while the volume keeps changing, instant
//! (writable clone) mounts, several clones at once, file-level restore
//! through the API (ext4, XFS and NTFS read in process, partitioned or
//! not), bad input,
//! and mounts across a restart. Needs root, /dev/fuse and loop devices.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cdm_e2e::stamp;
use cdm_e2e::*;
use serde_json::{json, Value};

struct Setup {
    _work: tempfile::TempDir,
    w: PathBuf,
    fuse: PathBuf,
    a: Appliance,
}

fn setup() -> Setup {
    for t in [
        "losetup",
        "blkid",
        "mount",
        "mkfs.ext4",
        "mkfs.xfs",
        "sfdisk",
        "nbdcopy",
        "qemu-io",
        "tar",
    ] {
        require(t);
    }
    let work = tempfile::Builder::new()
        .prefix("cdm-recovery-")
        .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let w = work.path().to_path_buf();
    let fuse = w.join("fuse");
    let config = format!("scheduler_tick_ms = 100\nmount = \"{}\"\n", fuse.display());
    let a = Appliance::start(Some(&config));
    Setup {
        _work: work,
        w,
        fuse,
        a,
    }
}

/// A tree of files: text, random binaries, a 3 MB file, a sparse file, a
/// symlink, nested directories and one directory with 3000 entries.
fn make_tree(dir: &Path) {
    sh(&format!(
        "set -e; mkdir -p {d}/etc/app {d}/data/nested/deeper {d}/many
         echo 'db_port = 5432' > {d}/etc/app/app.conf
         head -c 3000000 /dev/urandom > {d}/data/big.bin
         head -c 12345 /dev/urandom > {d}/data/nested/deeper/odd.bin
         truncate -s 20M {d}/data/sparse.img
         printf 'middle' | dd of={d}/data/sparse.img bs=1 seek=10485760 conv=notrunc status=none
         ln -s ../etc/app/app.conf {d}/data/link.conf
         for i in $(seq 1 3000); do echo $i > {d}/many/f$i; done",
        d = dir.display()
    ));
}

fn sums(dir: &Path, out: &Path) {
    sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum > {}",
        dir.display(),
        out.display()
    ));
}

fn check_sums(dir: &str, sums: &Path) {
    sh(&format!(
        "cd {dir} && sha256sum --quiet -c {}",
        sums.display()
    ));
}

fn post_volume(api: &Api, name: &str, size: u64) {
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": name, "size": size})),
    );
}

fn snapshot(api: &Api, vol: &str) -> u64 {
    api.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots"),
        Some(json!({})),
    )["id"]
        .as_u64()
        .expect("id")
}

fn download(a: &Appliance, token: &str, path: &str, out: &Path) -> u16 {
    let code = sh(&format!(
        "curl -s -o {} -w '%{{http_code}}' -H 'Authorization: Bearer {token}' '{}{path}'",
        out.display(),
        a.url()
    ));
    code.trim().parse().unwrap_or(0)
}

#[test]
fn snapshots_mount_browse_and_restore_on_ext4_xfs_and_gpt() {
    let mut s = setup();
    let w = s.w.clone();
    let src = w.join("src");
    make_tree(&src);
    let sum_file = w.join("sums");
    sums(&src, &sum_file);
    // Images made with real tools, filled into volumes through NBD.
    sh(&format!(
        "set -e; cd {w}
         mkfs.ext4 -q -F -d src ext4.img 256M
         truncate -s 512M xfs.img && mkfs.xfs -q -f xfs.img
         mkdir -p mnt && mount -o loop xfs.img mnt && cp -a src/. mnt/ && umount mnt
         truncate -s 300M gpt.img
         printf 'label: gpt\\nstart=2048, size=409600, type=0FC63DAF-8483-4772-8E79-3D47D8E4DE47\\n' | sfdisk -q gpt.img
         mkfs.ext4 -q -F -d src part.fs 200M
         dd if=part.fs of=gpt.img bs=1M seek=1 conv=notrunc status=none
         head -c 64M /dev/urandom > garbage.img",
        w = w.display()
    ));
    let token = s.a.admin_token();
    let api = Api::new(&s.a, &token);
    for (v, img, size) in [
        ("e", "ext4.img", 256u64 << 20),
        ("x", "xfs.img", 512 << 20),
        ("g", "gpt.img", 300 << 20),
        ("bad", "garbage.img", 64 << 20),
    ] {
        post_volume(&api, v, size);
        run(Command::new("nbdcopy")
            .arg(w.join(img))
            .arg(s.a.unix_uri(v)));
    }
    let se = snapshot(&api, "e");
    let sx = snapshot(&api, "x");
    let sg = snapshot(&api, "g");
    let sbad = snapshot(&api, "bad");

    // The FUSE view: sizes, contents, read-only snapshots, writable volumes.
    let snap_file = s.fuse.join(format!("snapshots/e/{se}/disk"));
    assert_eq!(std::fs::metadata(&snap_file).unwrap().len(), 256 << 20);
    sh(&format!(
        "cmp {} {}",
        w.join("ext4.img").display(),
        snap_file.display()
    ));
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(&snap_file)
        .is_err());
    // A write through the FUSE file lands exactly there: stamped sectors
    // at 10 MiB, read back over NBD, the random bytes around untouched.
    let scratch = s.fuse.join("volumes/bad/disk");
    let t = stamp::tag("bad");
    write_file(&w.join("stamped"), &stamp::random(t, 10 << 20, 1 << 20, 1));
    sh(&format!(
        "dd if={} of={} bs=1M count=1 seek=10 conv=notrunc,fsync status=none",
        w.join("stamped").display(),
        scratch.display()
    ));
    let got = stamp::read_nbd(
        &format!("unix:{}", s.a.sock.display()),
        "bad",
        9 << 20,
        3 << 20,
    );
    let garbage = std::fs::read(w.join("garbage.img")).unwrap();
    assert!(
        got[..1 << 20] == garbage[9 << 20..10 << 20],
        "9 MiB..10 MiB changed"
    );
    assert!(
        got[2 << 20..] == garbage[11 << 20..12 << 20],
        "11 MiB..12 MiB changed"
    );
    stamp::assert_stamped(
        "written through FUSE",
        &got[1 << 20..2 << 20],
        t,
        10 << 20,
        1,
    );

    // Read-only mounts of the snapshots while the volumes keep changing.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (uri_e, uri_x) = (s.a.unix_uri("e"), s.a.unix_uri("x"));
        let writing = writing.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while writing.load(Ordering::SeqCst) {
                for uri in [&uri_e, &uri_x] {
                    let off = (n * 7919 % 200) << 20;
                    run(Command::new("qemu-io")
                        .args(["-f", "raw", "-c"])
                        .arg(format!("write -P {} {off} 1M", n % 250 + 1))
                        .arg(uri));
                }
                n += 1;
            }
            n
        })
    };
    let me = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("e@{se}")})),
    );
    assert_eq!(me["fstype"], "ext4");
    assert_eq!(me["state"], "mounted");
    let mx = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("x@{sx}")})),
    );
    assert_eq!(mx["fstype"], "xfs");
    let mg = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("g@{sg}")})),
    );
    assert_eq!(mg["partition"], Value::Null);
    for m in [&me, &mx, &mg] {
        check_sums(m["path"].as_str().unwrap(), &sum_file);
    }
    // A read-only mount refuses writes.
    let ro = me["path"].as_str().unwrap().to_string();
    assert!(std::fs::write(Path::new(&ro).join("new"), b"x").is_err());

    // Instant recovery: writable clones, two at once, isolated.
    let c1 = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("e@{se}"), "writable": true, "clone": "e-dev1"})),
    );
    let c2 = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("x@{sx}"), "writable": true})),
    );
    let c3 = api.expect(
        201,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("e@{se}"), "writable": true, "clone": "e-dev2"})),
    );
    assert_eq!(c2["clone"], format!("x-{sx}-rw"));
    for (m, text) in [(&c1, "one"), (&c2, "two"), (&c3, "three")] {
        let p = Path::new(m["path"].as_str().unwrap());
        check_sums(p.to_str().unwrap(), &sum_file);
        std::fs::write(p.join("etc/app/app.conf"), text).unwrap();
        sh(&format!("sync -f {}", p.display()));
    }
    writing.store(false, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    for (m, text) in [(&c1, "one"), (&c2, "two"), (&c3, "three")] {
        let p = Path::new(m["path"].as_str().unwrap());
        assert_eq!(
            std::fs::read_to_string(p.join("etc/app/app.conf")).unwrap(),
            text
        );
    }
    // The snapshots did not change.
    for m in [&me, &mx, &mg] {
        check_sums(m["path"].as_str().unwrap(), &sum_file);
    }
    // Clones are also NBD exports, usable while mounted.
    run(Command::new("nbdinfo")
        .arg("--size")
        .arg(s.a.unix_uri("e-dev2")));

    // File-level restore without the kernel.
    let list = api.get(&format!("/v1/volumes/e/snapshots/{se}/files?path=/data"));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big.bin", "link.conf", "nested", "sparse.img"]);
    let link = &list.as_array().unwrap()[1];
    assert_eq!(link["kind"], "symlink");
    assert_eq!(link["target"], "../etc/app/app.conf");
    let mut seen = 0;
    for page in 0..4 {
        let l = api.get(&format!(
            "/v1/volumes/e/snapshots/{se}/files?path=/many&offset={}&limit=1000",
            page * 1000
        ));
        seen += l.as_array().unwrap().len();
    }
    assert_eq!(seen, 3000);
    // XFS is read in process too: the same tree (a sparse file with
    // holes, a symlink, a large directory) as on ext4.
    let xl = api.get(&format!("/v1/volumes/x/snapshots/{sx}/files?path=/data"));
    let shown = |l: &Value| -> Vec<Value> {
        l.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let size = if e["kind"] == "dir" {
                    0
                } else {
                    e["size"].as_u64().unwrap()
                };
                json!([e["name"], e["kind"], e["mode"], e["uid"], e["target"], size])
            })
            .collect()
    };
    assert_eq!(shown(&xl), shown(&list), "XFS lists /data as ext4 does");
    // 3000 entries: on XFS a directory in B+tree format.
    let xmany = api.get(&format!(
        "/v1/volumes/x/snapshots/{sx}/files?path=/many&limit=5000"
    ));
    assert_eq!(xmany.as_array().unwrap().len(), 3000);
    for (snap, vol) in [(se, "e"), (sg, "g"), (sx, "x")] {
        for f in [
            "/data/big.bin",
            "/data/sparse.img",
            "/data/nested/deeper/odd.bin",
            "/etc/app/app.conf",
        ] {
            let got = w.join("got");
            let code = download(
                &s.a,
                &token,
                &format!("/v1/volumes/{vol}/snapshots/{snap}/files/content?path={f}"),
                &got,
            );
            assert_eq!(code, 200, "{vol}@{snap}{f}");
            sh(&format!("cmp {} {}{f}", got.display(), src.display()));
        }
        let tarf = w.join(format!("{vol}.tar"));
        assert_eq!(
            download(
                &s.a,
                &token,
                &format!("/v1/volumes/{vol}/snapshots/{snap}/files/tar?path=/data"),
                &tarf
            ),
            200
        );
        let x = w.join(format!("x-{vol}"));
        sh(&format!(
            "mkdir -p {x} && tar -xf {t} -C {x} && diff -r --no-dereference {x} {s}/data",
            x = x.display(),
            t = tarf.display(),
            s = src.display()
        ));
    }
    let parts = api.get(&format!("/v1/volumes/g/snapshots/{sg}/partitions"));
    assert_eq!(parts.as_array().unwrap().len(), 1);
    assert_eq!(parts[0]["start"], 1 << 20);
    assert!(
        parts[0]["kind"]
            .as_str()
            .unwrap()
            .starts_with("gpt:0fc63daf"),
        "{parts}"
    );
    assert_eq!(
        api.get(&format!(
            "/v1/volumes/g/snapshots/{sg}/files/stat?path=/etc/app/app.conf&partition=1"
        ))["size"],
        15
    );

    // Bad input: clear errors, nothing mounted.
    api.expect(
        404,
        "GET",
        &format!("/v1/volumes/e/snapshots/{se}/files?path=/nope"),
        None,
    );
    api.expect(
        400,
        "GET",
        &format!("/v1/volumes/e/snapshots/{se}/files?path=/data/../etc"),
        None,
    );
    api.expect(
        400,
        "GET",
        &format!("/v1/volumes/e/snapshots/{se}/files?path=relative"),
        None,
    );
    api.expect(
        400,
        "GET",
        &format!("/v1/volumes/e/snapshots/{se}/files/content?path=/data"),
        None,
    );
    api.expect(
        404,
        "GET",
        &format!("/v1/volumes/g/snapshots/{sg}/files?path=/&partition=7"),
        None,
    );
    let u = api.expect(
        422,
        "GET",
        &format!("/v1/volumes/bad/snapshots/{sbad}/files?path=/"),
        None,
    );
    assert!(
        u["error"]["message"].as_str().unwrap().contains("ext4"),
        "{u}"
    );
    api.expect(
        404,
        "GET",
        &format!("/v1/volumes/x/snapshots/{sx}/files/stat?path=/data/nope"),
        None,
    );
    let u = api.expect(
        422,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("bad@{sbad}")})),
    );
    assert!(
        u["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no filesystem"),
        "{u}"
    );
    api.expect(
        404,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": "e@999"})),
    );
    api.expect(400, "POST", "/v1/mounts", Some(json!({"snapshot": "e"})));
    api.expect(
        409,
        "POST",
        "/v1/mounts",
        Some(json!({"snapshot": format!("e@{se}")})),
    );
    api.expect(
        409,
        "DELETE",
        &format!("/v1/volumes/e/snapshots/{se}?force=true"),
        None,
    );
    api.expect(409, "DELETE", "/v1/volumes/e-dev1?force=true", None);
    // A damaged filesystem: the superblock of a copy overwritten.
    post_volume(&api, "broken", 256 << 20);
    run(Command::new("nbdcopy")
        .arg(w.join("ext4.img"))
        .arg(s.a.unix_uri("broken")));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1024 1024"])
        .arg(s.a.unix_uri("broken")));
    let sb = snapshot(&api, "broken");
    api.expect(
        422,
        "GET",
        &format!("/v1/volumes/broken/snapshots/{sb}/files?path=/"),
        None,
    );
    // A superblock crafted to make the reader divide by zero (found by the
    // disk_image fuzz target): a clear error, the daemon unharmed.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x53 1080 1",
            "-c",
            "write -P 0xef 1081 1",
            "-c",
            "write -z 1056 4",
        ])
        .arg(s.a.unix_uri("broken")));
    let sb2 = snapshot(&api, "broken");
    let u = api.expect(
        422,
        "GET",
        &format!("/v1/volumes/broken/snapshots/{sb2}/files?path=/"),
        None,
    );
    assert!(
        u["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per group"),
        "{u}"
    );

    // A restart re-establishes the mounts (or says why not).
    s.a.stop();
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(&*s.fuse.to_string_lossy()));
    s.a.restart();
    let api = Api::new(&s.a, &token);
    let mounts = api.get("/v1/mounts");
    assert_eq!(mounts.as_array().unwrap().len(), 6);
    for m in mounts.as_array().unwrap() {
        assert_eq!(m["state"], "mounted", "{m}");
    }
    check_sums(me["path"].as_str().unwrap(), &sum_file);
    assert_eq!(
        std::fs::read_to_string(Path::new(c1["path"].as_str().unwrap()).join("etc/app/app.conf"))
            .unwrap(),
        "one"
    );
    // Unmounted behind the appliance's back: reported, not pretended.
    sh(&format!("umount {}", mx["path"].as_str().unwrap()));
    let gone = api.get("/v1/mounts");
    let xm = gone
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == mx["name"])
        .unwrap();
    assert_eq!(xm["state"], "gone");
    // A crash (SIGKILL) leaves a dead FUSE view and mounts on loop devices
    // backed by it: the next start cleans them up and mounts everything again.
    s.a.kill();
    s.a.restart();
    let api = Api::new(&s.a, &token);
    for m in api.get("/v1/mounts").as_array().unwrap() {
        assert_eq!(m["state"], "mounted", "{m}");
    }
    check_sums(mx["path"].as_str().unwrap(), &sum_file);
    assert_eq!(
        std::fs::read_to_string(Path::new(c3["path"].as_str().unwrap()).join("etc/app/app.conf"))
            .unwrap(),
        "three"
    );
    let loops = sh("losetup -a");
    assert_eq!(
        loops.matches(&*s.fuse.to_string_lossy()).count(),
        6,
        "stale loop devices left: {loops}"
    );
    // Undo: unmount everything, delete the clones.
    for m in api.get("/v1/mounts").as_array().unwrap() {
        let q = if m["writable"] == true {
            "?delete_clone=true"
        } else {
            ""
        };
        api.expect(
            204,
            "DELETE",
            &format!("/v1/mounts/{}{q}", m["name"].as_str().unwrap()),
            None,
        );
    }
    assert_eq!(api.get("/v1/mounts"), json!([]));
    assert_eq!(api.get("/v1/clones"), json!([]));
    api.expect(
        204,
        "DELETE",
        &format!("/v1/volumes/e/snapshots/{se}"),
        None,
    );
    s.a.stop();
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(&*s.w.to_string_lossy()));
}

/// NTFS (a Windows data disk: MBR, one partition of type 7) browsed and
/// restored through the API: listing without NTFS's own files, names
/// without case, a file's bytes, a folder's tar; a missing path is 404, a
/// damaged boot sector 422.
#[test]
fn file_restore_from_an_ntfs_snapshot() {
    require("mkntfs");
    require("ntfs-3g");
    let s = setup();
    let w = s.w.clone();
    let src = w.join("src");
    sh(&format!(
        "set -e; mkdir -p {d}/Reports/2026 {d}/Empty
         head -c 5000000 /dev/urandom > {d}/Reports/2026/q1.bin
         head -c 777 /dev/urandom > {d}/Reports/notes.txt
         printf 'Quarterly <b>results</b>' > '{d}/Reports/2026/read me.txt'",
        d = src.display()
    ));
    sh(&format!(
        "set -e; cd {w}
         truncate -s 64M ntfs.fs && mkntfs -F -Q -q ntfs.fs
         mkdir -p mnt && ntfs-3g ntfs.fs mnt && cp -r src/. mnt/
         for i in $(seq 600); do umount mnt && break; sleep 0.1; done
         ! mountpoint -q mnt
         truncate -s 80M disk.img
         printf 'label: dos\nstart=2048, size=131072, type=7\n' | sfdisk -q disk.img
         dd if=ntfs.fs of=disk.img bs=1M seek=1 conv=notrunc status=none",
        w = w.display()
    ));
    let token = s.a.admin_token();
    let api = Api::new(&s.a, &token);
    post_volume(&api, "win", 80 << 20);
    run(Command::new("nbdcopy")
        .arg(w.join("disk.img"))
        .arg(s.a.unix_uri("win")));
    let id = snapshot(&api, "win");
    let base = format!("/v1/volumes/win/snapshots/{id}");
    let root = api.get(&format!("{base}/files?path=/"));
    let names: Vec<&str> = root
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Empty", "Reports"], "{root}");
    let st = api.get(&format!("{base}/files/stat?path=/Reports/2026/q1.bin"));
    assert_eq!(
        (st["kind"].as_str(), st["size"].as_u64()),
        (Some("file"), Some(5_000_000))
    );
    for (asked, file) in [
        ("/reports/2026/Q1.BIN", "Reports/2026/q1.bin"),
        ("/Reports/2026/read%20me.txt", "Reports/2026/read me.txt"),
    ] {
        let got = w.join("got");
        let code = download(
            &s.a,
            &token,
            &format!("{base}/files/content?path={asked}"),
            &got,
        );
        assert_eq!(code, 200, "{asked}");
        sh(&format!("cmp {} '{}/{file}'", got.display(), src.display()));
    }
    let tarf = w.join("reports.tar");
    assert_eq!(
        download(
            &s.a,
            &token,
            &format!("{base}/files/tar?path=/Reports"),
            &tarf
        ),
        200
    );
    sh(&format!(
        "set -e; mkdir -p {x} && tar -xf {t} -C {x} && diff -r {x} {s}/Reports",
        x = w.join("x").display(),
        t = tarf.display(),
        s = src.display()
    ));
    api.expect(
        404,
        "GET",
        &format!("{base}/files?path=/Reports/nope"),
        None,
    );
    api.expect(404, "GET", &format!("{base}/files/stat?path=/$MFT"), None);
    // A damaged boot sector (bytes per sector and the MFT's place): 422
    // with the reason, and the daemon unharmed.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xff 1048587 40"])
        .arg(s.a.unix_uri("win")));
    let bad = snapshot(&api, "win");
    let u = api.expect(
        422,
        "GET",
        &format!("/v1/volumes/win/snapshots/{bad}/files?path=/"),
        None,
    );
    assert!(
        u["error"]["message"].as_str().unwrap().contains("NTFS"),
        "{u}"
    );
    api.get(&format!("{base}/files?path=/Reports"));
}

fn ctl_ok(a: &Appliance, args: &[&str]) -> String {
    let o = a.cdmctl(args);
    assert!(
        o.status.success(),
        "cdmctl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cdmctl_mounts_and_restores_files() {
    let mut s = setup();
    let w = s.w.clone();
    let src = w.join("src");
    make_tree(&src);
    sh(&format!(
        "cd {} && mkfs.ext4 -q -F -d src fs.img 64M",
        w.display()
    ));
    let api = Api::new(&s.a, &s.a.admin_token());
    post_volume(&api, "db", 64 << 20);
    run(Command::new("nbdcopy")
        .arg(w.join("fs.img"))
        .arg(s.a.unix_uri("db")));
    let id = snapshot(&api, "db");
    let snap = format!("db@{id}");
    let out = ctl_ok(
        &s.a,
        &["mount", "create", &snap, "--writable", "--clone", "db-test"],
    );
    assert!(out.contains("read-write clone"), "{out}");
    let list = ctl_ok(&s.a, &["mount", "list"]);
    assert!(
        list.contains("db-test") && list.contains("mounted"),
        "{list}"
    );
    let ls = ctl_ok(&s.a, &["files", "ls", &snap, "/data"]);
    assert!(ls.contains("link.conf -> ../etc/app/app.conf"), "{ls}");
    let got = w.join("big.bin");
    ctl_ok(
        &s.a,
        &[
            "files",
            "get",
            &snap,
            "/data/big.bin",
            "-o",
            got.to_str().unwrap(),
        ],
    );
    sh(&format!(
        "cmp {} {}/data/big.bin",
        got.display(),
        src.display()
    ));
    let t = w.join("etc.tar");
    ctl_ok(
        &s.a,
        &["files", "tar", &snap, "/etc", "-o", t.to_str().unwrap()],
    );
    sh(&format!(
        "mkdir {w}/etc-x && tar -xf {t} -C {w}/etc-x && diff -r {w}/etc-x {s}/etc",
        w = w.display(),
        t = t.display(),
        s = src.display()
    ));
    let missing = s.a.cdmctl(&[
        "files",
        "get",
        &snap,
        "/nope",
        "-o",
        w.join("x").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(4));
    assert!(
        !w.join("x").exists(),
        "a failed download left a file behind"
    );
    ctl_ok(&s.a, &["mount", "delete", "db-test", "--delete-clone"]);
    assert!(ctl_ok(&s.a, &["--json", "mount", "list"]).trim() == "[]");
    s.a.stop();
}

#[test]
fn cdmfs_mount_serves_an_offline_pool_until_sigterm() {
    let env = Env::new("1G");
    let img = env.path("img");
    sh(&format!("head -c 8M /dev/urandom > {}", img.display()));
    env.cdmfs(&["volume", "create", "v", "--size", "8M"]);
    env.cdmfs(&["write", "v", img.to_str().unwrap()]);
    env.cdmfs(&["snapshot", "create", "v"]);
    let dir = env.path("view");
    let mut child = Command::new(bin("cdmfs"))
        .arg("--pool")
        .arg(&env.pool)
        .arg("mount")
        .arg(&dir)
        .spawn()
        .expect("cdmfs mount");
    wait_for(20, "the FUSE view", || {
        dir.join("volumes/v/disk").exists().then_some(())
    });
    let snap = std::fs::read_dir(dir.join("snapshots/v"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    sh(&format!("cmp {} {}/disk", img.display(), snap.display()));
    sh(&format!(
        "printf 'written through FUSE' | dd of={}/volumes/v/disk bs=1 seek=4096 conv=notrunc,fsync status=none",
        dir.display()
    ));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(&*dir.to_string_lossy()));
    let back = env.cdmfs(&["cat", "v", "--offset", "4096", "--length", "20"]);
    assert_eq!(back, "written through FUSE");
    let fsck = env.cdmfs(&["fsck"]);
    assert!(fsck.contains("volumes"), "{fsck}");
}
