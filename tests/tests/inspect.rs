//! VM inspection over a corpus of disk images built here with real tools
//! (mkfs.ext4 -d, mkfs.xfs, mkntfs + ntfs-3g, sfdisk, qemu-img) — Debian,
//! Ubuntu, CentOS, RHEL, SUSE; MBR with and without the boot flag, GPT, a
//! bare filesystem; Windows Server on NTFS with SOFTWARE and SYSTEM hives
//! written by the test (checked with hivexget); Linux guests with Oracle,
//! MySQL, PostgreSQL and DB2 footprints; a blank disk, a garbage partition
//! table, a truncated image, an encrypted-looking partition, a qcow2 read
//! through qemu-nbd. Every expected classification is asserted exactly.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::*;
use cdm_inspect::regf_write::HiveWriter;
use serde_json::Value;

struct Corpus {
    dir: tempfile::TempDir,
}

impl Corpus {
    fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// A directory tree from (path, content) pairs; a path ending in '/'
    /// is a directory.
    fn tree(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.p(name);
        for (f, c) in files {
            let p = root.join(f.trim_start_matches('/'));
            if f.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, c).unwrap();
            }
        }
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    fn ext4(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let t = self.tree(&format!("{name}.d"), files);
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&t)
            .arg(&img)
            .arg("24M"));
        img
    }

    fn xfs(&self, name: &str) -> PathBuf {
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("truncate").args(["-s", "320M"]).arg(&img));
        run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&img));
        img
    }

    /// An NTFS filesystem holding Windows/System32/config/{SOFTWARE,SYSTEM}.
    fn ntfs(&self, name: &str, software: &HiveWriter, system: &HiveWriter) -> PathBuf {
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("truncate").args(["-s", "32M"]).arg(&img));
        run(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&img));
        let mnt = self.p(&format!("{name}.mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("ntfs-3g").arg(&img).arg(&mnt));
        let cfg = mnt.join("Windows/System32/config");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("SOFTWARE"), software.to_bytes()).unwrap();
        std::fs::write(cfg.join("SYSTEM"), system.to_bytes()).unwrap();
        std::fs::create_dir_all(mnt.join("Program Files")).unwrap();
        run(Command::new("umount").arg(&mnt));
        img
    }

    /// A disk with one partition holding `fs` (label dos or gpt).
    fn disk(&self, name: &str, label: &str, bootable: bool, fs: &Path) -> PathBuf {
        let disk = self.p(&format!("{name}.img"));
        let fs_len = std::fs::metadata(fs).unwrap().len();
        run(Command::new("truncate")
            .arg("-s")
            .arg(((fs_len >> 20) + 4).to_string() + "M")
            .arg(&disk));
        let ty = if label == "gpt" {
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        } else {
            "83"
        };
        let boot = if bootable { ", bootable" } else { "" };
        sh(&format!(
            "printf 'label: {label}\\nstart=2048, size={}, type={ty}{boot}\\n' | sfdisk -q {}",
            fs_len / 512,
            disk.display()
        ));
        let j: Value =
            serde_json::from_str(&run(Command::new("sfdisk").arg("-J").arg(&disk))).unwrap();
        let start = j["partitiontable"]["partitions"][0]["start"]
            .as_u64()
            .unwrap();
        run(Command::new("dd")
            .arg(format!("if={}", fs.display()))
            .arg(format!("of={}", disk.display()))
            .args([
                "bs=512",
                &format!("seek={start}"),
                "conv=notrunc,sparse",
                "status=none",
            ]));
        disk
    }
}

fn windows_hives(
    product: &str,
    build: &str,
    host: &str,
    uninstall: &[&str],
    services: &[&str],
) -> (HiveWriter, HiveWriter) {
    let mut sw = HiveWriter::new("ROOT");
    let cv = "Microsoft\\Windows NT\\CurrentVersion";
    sw.set_sz(cv, "ProductName", product);
    sw.set_dword(cv, "CurrentMajorVersionNumber", 10);
    sw.set_dword(cv, "CurrentMinorVersionNumber", 0);
    sw.set_sz(cv, "CurrentBuildNumber", build);
    sw.set_sz(cv, "InstallationType", "Server");
    sw.set_sz(
        "Microsoft\\Windows\\CurrentVersion\\Uninstall\\{7-ZIP}",
        "DisplayName",
        "7-Zip 19.00 (x64)",
    );
    for (i, u) in uninstall.iter().enumerate() {
        sw.set_sz(
            &format!("Microsoft\\Windows\\CurrentVersion\\Uninstall\\{{APP-{i}}}"),
            "DisplayName",
            u,
        );
    }
    let mut sy = HiveWriter::new("ROOT");
    sy.set_dword("Select", "Current", 1);
    sy.set_sz(
        "ControlSet001\\Control\\ComputerName\\ComputerName",
        "ComputerName",
        host,
    );
    sy.set_dword("ControlSet001\\Services\\Tcpip", "Start", 1);
    for s in services {
        sy.set_dword(&format!("ControlSet001\\Services\\{s}"), "Start", 2);
    }
    (sw, sy)
}

/// (name, disk spec, status, family/distro/version, root, table, apps)
type Expect = (
    &'static str,
    String,
    &'static str,
    &'static str,
    Option<u32>,
    &'static str,
    Vec<&'static str>,
);

fn agent_inspect(specs: &[String]) -> Vec<Value> {
    let state = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--json".to_string(),
        "--state-dir".into(),
        state.path().display().to_string(),
        "vm".into(),
        "inspect".into(),
    ];
    args.extend(specs.iter().cloned());
    let out = run(Command::new(bin("cdm-agent")).args(&args));
    serde_json::from_str::<Value>(out.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn corpus_is_classified_exactly() {
    for t in [
        "mkfs.ext4",
        "mkfs.xfs",
        "mkntfs",
        "ntfs-3g",
        "sfdisk",
        "qemu-img",
        "qemu-nbd",
        "hivexget",
    ] {
        require(t);
    }
    let c = Corpus {
        dir: tempfile::Builder::new()
            .prefix("cdm-corpus-")
            .tempdir_in("/var/tmp")
            .unwrap(),
    };
    let mut expect: Vec<Expect> = Vec::new();
    let os_release = |id: &str, ver: &str, pretty: &str| {
        format!("ID={id}\nVERSION_ID=\"{ver}\"\nPRETTY_NAME=\"{pretty}\"\n")
    };

    // Debian 12, MBR, boot flag; PostgreSQL from dpkg and /etc/postgresql.
    let fs = c.ext4("debian", &[
        ("/etc/os-release", &os_release("debian", "12", "Debian GNU/Linux 12 (bookworm)")),
        ("/etc/hostname", "db1\n"),
        ("/etc/postgresql/15/main/", ""),
        ("/var/lib/dpkg/status", "Package: bash\nStatus: install ok installed\n\nPackage: postgresql-15\nStatus: install ok installed\n"),
    ]);
    let d = c.disk("debian", "dos", true, &fs);
    expect.push((
        "debian",
        d.display().to_string(),
        "ok",
        "linux/debian/12",
        Some(1),
        "mbr",
        vec!["PostgreSQL"],
    ));
    // Ubuntu 22.04, GPT; MySQL.
    let fs = c.ext4(
        "ubuntu",
        &[
            (
                "/etc/os-release",
                &os_release("ubuntu", "22.04", "Ubuntu 22.04.4 LTS"),
            ),
            ("/etc/mysql/my.cnf", "[mysqld]\n"),
        ],
    );
    let d = c.disk("ubuntu", "gpt", false, &fs);
    expect.push((
        "ubuntu",
        d.display().to_string(),
        "ok",
        "linux/ubuntu/22.04",
        Some(1),
        "gpt",
        vec!["MySQL"],
    ));
    // CentOS 7 by its release file only, MBR without a boot flag; Oracle.
    let fs = c.ext4(
        "centos",
        &[
            (
                "/etc/redhat-release",
                "CentOS Linux release 7.9.2009 (Core)\n",
            ),
            ("/etc/oratab", "ORCL:/u01/app/oracle/product/19c:Y\n"),
        ],
    );
    let d = c.disk("centos", "dos", false, &fs);
    expect.push((
        "centos",
        d.display().to_string(),
        "ok",
        "linux/centos/7.9.2009",
        Some(1),
        "mbr",
        vec!["Oracle"],
    ));
    // RHEL 9 on a bare filesystem (no partition table).
    let fs = c.ext4(
        "rhel",
        &[(
            "/usr/lib/os-release",
            &os_release("rhel", "9.2", "Red Hat Enterprise Linux 9.2 (Plow)"),
        )],
    );
    expect.push((
        "rhel",
        fs.display().to_string(),
        "ok",
        "linux/rhel/9.2",
        Some(0),
        "none",
        vec![],
    ));
    // SLES 12 SP4 by SuSE-release, GPT.
    let fs = c.ext4(
        "sles",
        &[(
            "/etc/SuSE-release",
            "SUSE Linux Enterprise Server 12 (x86_64)\nVERSION = 12\nPATCHLEVEL = 4\n",
        )],
    );
    let d = c.disk("sles", "gpt", false, &fs);
    expect.push((
        "sles",
        d.display().to_string(),
        "ok",
        "linux/sles/12.4",
        Some(1),
        "gpt",
        vec![],
    ));
    // A Linux guest with several databases (several app categories).
    let fs = c.ext4(
        "multi",
        &[
            (
                "/etc/os-release",
                &os_release("debian", "11", "Debian GNU/Linux 11 (bullseye)"),
            ),
            ("/etc/oratab", "X:/opt/oracle:N\n"),
            ("/var/lib/mysql/", ""),
            ("/opt/ibm/db2/V11.5/", ""),
        ],
    );
    let d = c.disk("multi", "dos", true, &fs);
    expect.push((
        "multi",
        d.display().to_string(),
        "ok",
        "linux/debian/11",
        Some(1),
        "mbr",
        vec!["DB2", "MySQL", "Oracle"],
    ));
    // Windows Server 2019 with SQL Server, MBR with boot flag.
    let (sw, sy) = windows_hives(
        "Windows Server 2019 Standard",
        "17763",
        "SQL01",
        &["Microsoft SQL Server 2019 (64-bit)"],
        &["MSSQLSERVER"],
    );
    let sw_path = c.p("SOFTWARE.sql");
    std::fs::write(&sw_path, sw.to_bytes()).unwrap();
    assert_eq!(
        run(Command::new("hivexget")
            .arg(&sw_path)
            .args(["Microsoft\\Windows NT\\CurrentVersion", "ProductName"]))
        .trim(),
        "Windows Server 2019 Standard"
    );
    let fs = c.ntfs("winsql", &sw, &sy);
    let d = c.disk("winsql", "dos", true, &fs);
    expect.push((
        "winsql",
        d.display().to_string(),
        "ok",
        "windows/windows/10.0.17763",
        Some(1),
        "mbr",
        vec!["SQL Server"],
    ));
    // Windows Server 2016 with Exchange, GPT.
    let (sw, sy) = windows_hives(
        "Windows Server 2016 Datacenter",
        "14393",
        "MAIL01",
        &["Microsoft Exchange Server 2016 Cumulative Update 23"],
        &["MSExchangeIS", "MSExchangeTransport"],
    );
    let fs = c.ntfs("winexch", &sw, &sy);
    let d = c.disk("winexch", "gpt", false, &fs);
    expect.push((
        "winexch",
        d.display().to_string(),
        "ok",
        "windows/windows/10.0.14393",
        Some(1),
        "gpt",
        vec!["Exchange"],
    ));
    // XFS (the RHEL default): recognised, not read yet.
    let fs = c.xfs("xfs");
    let d = c.disk("xfs", "dos", true, &fs);
    expect.push((
        "xfs",
        d.display().to_string(),
        "unknown",
        "",
        None,
        "mbr",
        vec![],
    ));
    // Blank disk.
    let d = c.p("blank.img");
    run(Command::new("truncate").args(["-s", "64M"]).arg(&d));
    expect.push((
        "blank",
        d.display().to_string(),
        "unknown",
        "",
        None,
        "none",
        vec![],
    ));
    // Garbage partition table: a valid signature, entries past the end.
    let d = c.p("garbage.img");
    run(Command::new("truncate").args(["-s", "16M"]).arg(&d));
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&d)
            .unwrap()
            .write_all_at(&mbr, 0)
            .unwrap();
    }
    expect.push((
        "garbage",
        d.display().to_string(),
        "unknown",
        "",
        None,
        "invalid",
        vec![],
    ));
    // Truncated image: the Debian disk cut to 3 MiB.
    let d = c.p("truncated.img");
    std::fs::copy(c.p("debian.img"), &d).unwrap();
    run(Command::new("truncate").args(["-s", "3M"]).arg(&d));
    expect.push((
        "truncated",
        d.display().to_string(),
        "unknown",
        "",
        None,
        "invalid",
        vec![],
    ));
    // Encrypted-looking partition: random bytes.
    let rnd = c.p("random.fs");
    sh(&format!("head -c 8388608 /dev/urandom > {}", rnd.display()));
    let d = c.disk("encrypted", "gpt", false, &rnd);
    expect.push((
        "encrypted",
        d.display().to_string(),
        "unknown",
        "",
        None,
        "gpt",
        vec![],
    ));
    // A qcow2 image read through qemu-nbd.
    let q = c.p("ubuntu.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(c.p("ubuntu.img"))
        .arg(&q));
    let sock = c.p("q.sock");
    let mut qn = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&q)
        .spawn()
        .unwrap();
    wait_for(10, "qemu-nbd", || sock.exists().then_some(()));
    expect.push((
        "qcow2",
        format!("nbd+unix:///?socket={}", sock.display()),
        "ok",
        "linux/ubuntu/22.04",
        Some(1),
        "gpt",
        vec!["MySQL"],
    ));

    assert!(expect.len() >= 12);
    let specs: Vec<String> = expect.iter().map(|e| e.1.clone()).collect();
    let got = agent_inspect(&specs);
    let _ = qn.kill();
    let _ = qn.wait();
    for (e, g) in expect.iter().zip(&got) {
        let (name, _, status, os, root, table, apps) = e;
        assert_eq!(g["status"], *status, "{name}: {g}");
        let os_got = if g["os"].is_null() {
            String::new()
        } else {
            format!(
                "{}/{}/{}",
                g["os"]["family"].as_str().unwrap(),
                g["os"]["distro"].as_str().unwrap(),
                g["os"]["version"].as_str().unwrap()
            )
        };
        assert_eq!(&os_got, os, "{name}: {g}");
        assert_eq!(g["root"].as_u64().map(|r| r as u32), *root, "{name}: {g}");
        assert_eq!(g["partition_table"], *table, "{name}: {g}");
        let app_names: Vec<&str> = g["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(&app_names, apps, "{name}: {g}");
        for a in g["apps"].as_array().unwrap() {
            assert!(!a["evidence"].as_str().unwrap().is_empty(), "{name}: {a}");
        }
        if *status == "unknown" {
            assert!(g["reason"].as_str().unwrap().len() > 10, "{name}: {g}");
        }
        // Metadata only: a few hundred KiB at most per image.
        assert!(g["bytes_read"].as_u64().unwrap() < 4 << 20, "{name}: {g}");
    }
    let host =
        |n: &str| got[expect.iter().position(|e| e.0 == n).unwrap()]["os"]["hostname"].clone();
    assert_eq!(host("debian"), "db1");
    assert_eq!(host("winsql"), "SQL01");
    let reason = |n: &str| {
        got[expect.iter().position(|e| e.0 == n).unwrap()]["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason("xfs").contains("xfs"), "{}", reason("xfs"));
    assert!(
        reason("truncated").contains("outside the 3145728-byte disk"),
        "{}",
        reason("truncated")
    );
    assert!(
        reason("encrypted").contains("no filesystem"),
        "{}",
        reason("encrypted")
    );
    let win = &got[expect.iter().position(|e| e.0 == "winsql").unwrap()];
    assert_eq!(win["os"]["product_name"], "Windows Server 2019 Standard");
}
