//! VM inspection over a corpus of disk images built here with real tools
//! (mkfs.ext4 -d, mkfs.xfs, mkntfs + ntfs-3g, sfdisk, qemu-img) — Debian,
//! Ubuntu, CentOS, RHEL, SUSE; MBR with and without the boot flag, GPT, a
//! bare filesystem; Windows Server on NTFS with SOFTWARE and SYSTEM hives
//! written by the test (checked with hivexget); Linux guests with Oracle,
//! MySQL, PostgreSQL and DB2 footprints; a blank disk, a garbage partition
//! table, a truncated image, an encrypted-looking partition, a qcow2 read
//! through qemu-nbd. Every expected classification is asserted exactly.

use std::path::Path;
use std::process::Command;

use cdm_e2e::corpus::Corpus;
use cdm_e2e::*;
use cdm_inspect::regf_write::HiveWriter;
use serde_json::Value;

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
    check_hives(&sw, &sy, product, host, uninstall, services);
    (sw, sy)
}

/// Reads both generated hives back with hivexget (libhivex, an
/// independent reader): what inspection is then expected to find must be
/// what a real registry reader sees in them.
fn check_hives(
    sw: &HiveWriter,
    sy: &HiveWriter,
    product: &str,
    host: &str,
    uninstall: &[&str],
    services: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let (swp, syp) = (dir.path().join("SOFTWARE"), dir.path().join("SYSTEM"));
    std::fs::write(&swp, sw.to_bytes()).unwrap();
    std::fs::write(&syp, sy.to_bytes()).unwrap();
    let get = |hive: &Path, key: &str, value: &str| {
        run(Command::new("hivexget").arg(hive).args([key, value]))
            .trim()
            .to_string()
    };
    let cv = "Microsoft\\Windows NT\\CurrentVersion";
    assert_eq!(get(&swp, cv, "ProductName"), product);
    assert_eq!(get(&swp, cv, "CurrentMajorVersionNumber"), "10");
    let un = "Microsoft\\Windows\\CurrentVersion\\Uninstall";
    for (i, u) in uninstall.iter().enumerate() {
        assert_eq!(get(&swp, &format!("{un}\\{{APP-{i}}}"), "DisplayName"), *u);
    }
    assert_eq!(get(&syp, "Select", "Current"), "1");
    assert_eq!(
        get(
            &syp,
            "ControlSet001\\Control\\ComputerName\\ComputerName",
            "ComputerName"
        ),
        host
    );
    for s in services {
        assert_eq!(
            get(&syp, &format!("ControlSet001\\Services\\{s}"), "Start"),
            "2"
        );
    }
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
    // SLES 15 on XFS in a logical partition of an extended MBR partition,
    // with Sybase and Domino.
    let fs = c.xfs(
        "suse",
        &[
            (
                "/etc/os-release",
                &os_release("sles", "15.5", "SUSE Linux Enterprise Server 15 SP5"),
            ),
            ("/opt/sybase/ASE-16_0/", ""),
            ("/opt/hcl/domino/bin/server", "ELF"),
        ],
    );
    let d = c.disk_logical("suse", &fs);
    expect.push((
        "suse",
        d.display().to_string(),
        "ok",
        "linux/sles/15.5",
        Some(5),
        "mbr",
        vec!["Domino", "Sybase"],
    ));
    // A Unix guest (Solaris, by /etc/release) on a bare filesystem.
    let fs = c.ext4(
        "solaris",
        &[(
            "/etc/release",
            "                             Oracle Solaris 11.4 X86\n",
        )],
    );
    expect.push((
        "solaris",
        fs.display().to_string(),
        "ok",
        "unix/solaris/11.4",
        Some(0),
        "none",
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
    // XFS (the RHEL and CentOS default): CentOS Stream 9 whose
    // /etc/os-release is a symlink into /usr/lib, with PostgreSQL, MBR.
    let fs = c.xfs(
        "centos9",
        &[
            (
                "/usr/lib/os-release",
                &os_release("centos", "9", "CentOS Stream 9"),
            ),
            ("/etc/os-release", "-> ../usr/lib/os-release"),
            ("/etc/hostname", "pg9\n"),
            ("/var/lib/pgsql/data/PG_VERSION", "15\n"),
        ],
    );
    let d = c.disk("centos9", "dos", true, &fs);
    expect.push((
        "centos9",
        d.display().to_string(),
        "ok",
        "linux/centos/9",
        Some(1),
        "mbr",
        vec!["PostgreSQL"],
    ));
    // RHEL 7 on XFS by its release file, GPT, with Oracle and SQL Server
    // for Linux, and a directory big enough for block format.
    let mut rhel7: Vec<(String, String)> = vec![
        (
            "/etc/redhat-release".into(),
            "Red Hat Enterprise Linux Server release 7.9 (Maipo)\n".into(),
        ),
        ("/u01/app/oracle/".into(), String::new()),
        ("/opt/mssql/bin/sqlservr".into(), "ELF".into()),
    ];
    for i in 0..200 {
        rhel7.push((
            format!("/etc/file-with-a-long-name-{i:04}"),
            format!("{i}\n"),
        ));
    }
    let rhel7_ref: Vec<(&str, &str)> = rhel7
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let fs = c.xfs("rhel7", &rhel7_ref);
    let d = c.disk("rhel7", "gpt", false, &fs);
    expect.push((
        "rhel7",
        d.display().to_string(),
        "ok",
        "linux/rhel/7.9",
        Some(1),
        "gpt",
        vec!["Oracle", "SQL Server"],
    ));
    // An empty XFS: read, nothing there.
    let fs = c.xfs("xfs", &[]);
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
    // scripts/bench-inspect keeps the corpus (image files) for timing.
    let files: Vec<(&str, &Path)> = expect
        .iter()
        .filter(|(_, spec, ..)| !spec.contains("://"))
        .map(|(name, spec, ..)| (*name, Path::new(spec.as_str())))
        .collect();
    cdm_e2e::corpus::keep("list", &files);
    let got = agent_inspect(&specs);
    let _ = qn.kill();
    let _ = qn.wait();
    // One result per image, in order: zip below would stop at the shorter.
    assert_eq!(got.len(), expect.len(), "results: {got:?}");
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
    assert_eq!(reason("xfs"), "no operating system found");
    assert_eq!(host("centos9"), "pg9");
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

fn j(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

fn domain_xml(name: &str, file: &Path, format: &str, pool: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><uuid>00000000-0000-0000-0000-{:012}</uuid>\
         <resource><partition>{pool}</partition></resource><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <disk type='file' device='cdrom'><source file='/iso/install.iso'/></disk>\
         </devices></domain>",
        name.len(),
        file.display()
    )
}

#[test]
fn inventory_categories_and_backup_by_category() {
    for t in [
        "mkfs.ext4",
        "mkntfs",
        "ntfs-3g",
        "sfdisk",
        "qemu-img",
        "qemu-nbd",
        "hivexget",
    ] {
        require(t);
    }
    let app = Appliance::start(None);
    let c = Corpus {
        dir: tempfile::Builder::new()
            .prefix("cdm-vms-")
            .tempdir_in("/var/tmp")
            .unwrap(),
    };
    let san1 = c.p("san1");
    let san2 = c.p("san2");
    std::fs::create_dir_all(&san1).unwrap();
    std::fs::create_dir_all(&san2).unwrap();
    let os_release = |id: &str, ver: &str| format!("ID={id}\nVERSION_ID=\"{ver}\"\n");
    let fs = c.ext4(
        "debian",
        &[
            ("/etc/os-release", &os_release("debian", "12")),
            ("/var/lib/postgresql/", ""),
        ],
    );
    let debian = c.disk("debian", "dos", true, &fs);
    std::fs::rename(&debian, san1.join("debian-db.img")).unwrap();
    let fs = c.ext4(
        "ubuntu",
        &[
            ("/etc/os-release", &os_release("ubuntu", "22.04")),
            ("/etc/mysql/my.cnf", ""),
        ],
    );
    let ubuntu = c.disk("ubuntu", "gpt", false, &fs);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&ubuntu)
        .arg(san2.join("ubuntu-web.qcow2")));
    let fs = c.ext4(
        "centos",
        &[
            (
                "/etc/redhat-release",
                "CentOS Linux release 7.9.2009 (Core)\n",
            ),
            ("/etc/oratab", ""),
        ],
    );
    let centos = c.disk("centos", "dos", false, &fs);
    std::fs::rename(&centos, san2.join("centos-ora.img")).unwrap();
    let (sw, sy) = windows_hives(
        "Windows Server 2019 Standard",
        "17763",
        "SQL01",
        &["Microsoft SQL Server 2019 (64-bit)"],
        &["MSSQLSERVER"],
    );
    let fs = c.ntfs("win", &sw, &sy);
    let win = c.disk("win", "dos", true, &fs);
    std::fs::rename(&win, san1.join("win-sql.img")).unwrap();
    let xml = c.p("domains");
    std::fs::create_dir_all(&xml).unwrap();
    for (n, f, fmt, pool) in [
        (
            "debian-db",
            san1.join("debian-db.img"),
            "raw",
            "/production",
        ),
        ("ubuntu-web", san2.join("ubuntu-web.qcow2"), "qcow2", "/dev"),
        (
            "centos-ora",
            san2.join("centos-ora.img"),
            "raw",
            "/production",
        ),
        ("win-sql", san1.join("win-sql.img"), "raw", "/production"),
        ("broken", san1.join("missing.img"), "raw", "/production"),
    ] {
        std::fs::write(xml.join(format!("{n}.xml")), domain_xml(n, &f, fmt, pool)).unwrap();
    }
    let state = tempfile::Builder::new()
        .prefix("cdm-agent-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let agent = |args: &[&str]| -> std::process::Output {
        output(
            Command::new(bin("cdm-agent"))
                .args(["--json", "--url", &app.url(), "--token-file"])
                .arg(app.data.join("admin.token"))
                .arg("--nbd")
                .arg(format!("unix:{}", app.sock.display()))
                .arg("--state-dir")
                .arg(state.path())
                .args(args),
        )
    };
    let ok = |args: &[&str]| -> Value {
        let o = agent(args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let inv = xml.to_str().unwrap();
    assert_eq!(
        ok(&["vm", "list", "--inventory", inv])
            .as_array()
            .unwrap()
            .len(),
        5
    );
    // The regrouped trees.
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "os"]);
    assert_eq!(
        t["groups"],
        j(
            r#"[{"name":"Linux","groups":[{"name":"centos 7.9.2009","vms":["centos-ora"]},{"name":"debian 12","vms":["debian-db"]},{"name":"ubuntu 22.04","vms":["ubuntu-web"]}]},{"name":"Unknown","vms":["broken"]},{"name":"Windows","groups":[{"name":"Windows Server 2019 Standard","vms":["win-sql"]}]}]"#
        )
    );
    assert_eq!(t["cache_hits"], 0);
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "app", "--publish"]);
    assert_eq!(t["published"], true);
    // The appliance serves the same regrouped tree.
    let api = Api::new(&app, &app.admin_token());
    assert_eq!(api.get("/v1/vms").as_array().unwrap().len(), 5);
    assert_eq!(api.get("/v1/vms/tree?by=app")["groups"], t["groups"]);
    assert_eq!(
        api.get("/v1/vms/tree?by=os")["groups"][2],
        j(
            r#"{"name":"Windows","groups":[{"name":"Windows Server 2019 Standard","vms":["win-sql"]}]}"#
        )
    );
    let (st, _) = api.call("GET", "/v1/vms/tree?by=colour", None);
    assert_eq!(st, 400);
    assert_eq!(
        t["groups"],
        j(
            r#"[{"name":"(no application)","vms":["broken"]},{"name":"MySQL","vms":["ubuntu-web"]},{"name":"Oracle","vms":["centos-ora"]},{"name":"PostgreSQL","vms":["debian-db"]},{"name":"SQL Server","vms":["win-sql"]}]"#
        )
    );
    // Cached by disk identity: the four readable files were not read again.
    assert_eq!(t["cache_hits"], 4);
    let broken = t["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "broken")
        .unwrap()
        .clone();
    assert!(
        broken["disks"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("missing.img"),
        "{broken}"
    );
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "keyword:db"]);
    assert_eq!(
        t["groups"],
        j(
            r#"[{"name":"name contains db","vms":["debian-db"]},{"name":"name without db","vms":["broken","centos-ora","ubuntu-web","win-sql"]}]"#
        )
    );
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "path"]);
    assert_eq!(t["groups"].as_array().unwrap().len(), 2, "{}", t["groups"]);
    assert_eq!(
        t["groups"][0]["vms"],
        serde_json::json!(["broken", "debian-db", "win-sql"])
    );
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "pool"]);
    assert_eq!(
        t["groups"],
        j(
            r#"[{"name":"/dev","vms":["ubuntu-web"]},{"name":"/production","vms":["broken","centos-ora","debian-db","win-sql"]}]"#
        )
    );
    // A changed disk is inspected again.
    sh(&format!(
        "printf x | dd of={} bs=1 seek=100 conv=notrunc status=none",
        san2.join("centos-ora.img").display()
    ));
    let t = ok(&["vm", "tree", "--inventory", inv, "--by", "os"]);
    assert_eq!(t["cache_hits"], 3);

    // Back up every Linux VM, two at a time.
    let b = ok(&[
        "vm",
        "backup",
        "--inventory",
        inv,
        "--category",
        "os:linux",
        "--parallel",
        "2",
    ]);
    let names: Vec<&str> = b["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3);
    for v in b["vms"].as_array().unwrap() {
        assert_eq!(v["ok"], true, "{v}");
    }
    let snap = api.get("/v1/volumes/vm-debian-db-disk0/snapshots");
    let meta = &snap[0]["metadata"];
    assert_eq!(meta["os"]["distro"], "debian");
    assert_eq!(meta["apps"], serde_json::json!(["PostgreSQL"]));
    assert_eq!(meta["vm"]["pool"], "/production");
    run(Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &app.unix_uri(snap[0]["export"].as_str().unwrap()),
        ])
        .arg(san1.join("debian-db.img")));
    let s = api.get("/v1/volumes/vm-ubuntu-web-disk0/snapshots");
    run(Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &app.unix_uri(s[0]["export"].as_str().unwrap()),
        ])
        .arg(san2.join("ubuntu-web.qcow2")));
    // Incremental: nothing changed, nothing written.
    let b = ok(&[
        "vm",
        "backup",
        "--inventory",
        inv,
        "--category",
        "app:PostgreSQL",
    ]);
    assert_eq!(b["vms"][0]["disks"][0]["bytes_written"], 0, "{b}");
    // Each run is a point of the VM: its disks' snapshots, grouped.
    let pts = api.get("/v1/vms/debian-db/points");
    let pts = pts.as_array().unwrap();
    assert_eq!(pts.len(), 2, "{pts:?}");
    assert_ne!(pts[0]["point"], pts[1]["point"]);
    for p in pts {
        assert_eq!(p["complete"], true, "{p}");
        assert_eq!(p["expected_disks"], 1, "{p}");
        assert_eq!(p["disks"][0]["volume"], "vm-debian-db-disk0", "{p}");
    }
    assert_eq!(api.call("GET", "/v1/vms/nosuch/points", None).0, 404);
    // One VM's failure does not stop the others.
    let o = agent(&[
        "vm",
        "backup",
        "--inventory",
        inv,
        "--category",
        "pool:/production",
    ]);
    assert!(!o.status.success());
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = e["error"].as_str().unwrap();
    assert!(
        e.contains("1 VM(s) of category pool:/production failed") && e.contains("missing.img"),
        "{e}"
    );
    assert_eq!(
        api.get("/v1/volumes/vm-win-sql-disk0/snapshots")
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/v1/volumes/vm-centos-ora-disk0/snapshots")
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The same backup as an appliance job (it runs cdm-agent as its caller).
    let wait_job = |body: Value| -> Value {
        let (st, j) = api.call("POST", "/v1/jobs", Some(body));
        assert_eq!(st, 202, "{j}");
        let id = j["id"].as_u64().unwrap();
        wait_for(120, "vm-backup job", || {
            let j = api.get(&format!("/v1/jobs/{id}"));
            (j["state"] != "running").then_some(j)
        })
    };
    let j = wait_job(
        serde_json::json!({"kind": "vm-backup", "inventory": inv, "category": "app:MySQL"}),
    );
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["result"]["vms"][0]["vm"], "ubuntu-web");
    assert_eq!(
        api.get("/v1/volumes/vm-ubuntu-web-disk0/snapshots")
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let j = wait_job(
        serde_json::json!({"kind": "vm-backup", "inventory": inv, "category": "keyword:broken"}),
    );
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["message"].as_str().unwrap().contains("missing.img"),
        "{j}"
    );
    // And through cdmctl.
    let o = app.cdmctl(&[
        "job",
        "start",
        "vm-backup",
        "--inventory",
        inv,
        "--category",
        "keyword:win",
        "--wait",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        api.get("/v1/volumes/vm-win-sql-disk0/snapshots")
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (st, _) = api.call(
        "POST",
        "/v1/jobs",
        Some(serde_json::json!({"kind": "vm-backup", "inventory": inv})),
    );
    assert_eq!(st, 400);
    // The same inventory as TOML; a listing that fails ends the job.
    let toml = c.p("inventory.toml");
    std::fs::write(
        &toml,
        format!(
            "[[vm]]\nname = \"debian-db\"\npool = \"/production\"\ndisks = [\"{}\"]\n",
            san1.join("debian-db.img").display()
        ),
    )
    .unwrap();
    let t = ok(&[
        "vm",
        "tree",
        "--inventory",
        toml.to_str().unwrap(),
        "--by",
        "os",
    ]);
    assert_eq!(
        t["groups"][0]["groups"][0]["vms"],
        serde_json::json!(["debian-db"])
    );
    std::fs::write(xml.join("bad.xml"), "<domain><name>x</name>").unwrap();
    let o = agent(&["vm", "backup", "--inventory", inv, "--category", "os:linux"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("listing the VMs failed"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = agent(&[
        "vm",
        "backup",
        "--inventory",
        toml.to_str().unwrap(),
        "--category",
        "os:solaris",
    ]);
    assert!(String::from_utf8_lossy(&e.stdout).contains("no VM is in category"));
}
