//! What a guest is, from its configuration files (libguestfs's order):
//! Linux from `/etc/os-release` (or `/usr/lib/os-release`), then
//! `lsb-release`, the distributions' `*-release` files and
//! `debian_version`; Windows from the `SOFTWARE` hive's
//! `Microsoft\Windows NT\CurrentVersion` and the `SYSTEM` hive's current
//! control set; Unix from `/etc/release` (Solaris) or FreeBSD's
//! `/bin/freebsd-version`. Applications from their files, packages,
//! uninstall entries and services, each with its evidence.

use crate::fsview::FsView;
use crate::registry::Hive;
use crate::{App, Os};

const SMALL: u64 = 1 << 20;
const HIVE: u64 = 256 << 20;

fn text(v: &mut dyn FsView, p: &str) -> Option<String> {
    v.read(p, SMALL)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `KEY=value` lines with optional quotes.
fn kv(t: &str, key: &str) -> Option<String> {
    t.lines().find_map(|l| {
        let (k, v) = l.trim().split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches(['"', '\'']).to_string())
    })
}

fn hostname(v: &mut dyn FsView) -> Option<String> {
    ["/etc/hostname", "/etc/HOSTNAME"]
        .iter()
        .find_map(|p| text(v, p))
        .map(|t| t.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// A version like "7.9.2009" or "15 SP4" from a release line.
fn version_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or("")
        .to_string()
}

/// Which distribution a release file's first line names.
type Which = &'static dyn Fn(&str) -> Option<&'static str>;

fn linux(v: &mut dyn FsView) -> Option<Os> {
    for p in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(t) = text(v, p) {
            if let Some(id) = kv(&t, "ID") {
                let distro = match id.as_str() {
                    "sles" | "sled" => "sles".to_string(),
                    x if x.starts_with("opensuse") => "opensuse".to_string(),
                    x => x.to_string(),
                };
                return Some(Os {
                    family: "linux".into(),
                    distro,
                    version: kv(&t, "VERSION_ID").unwrap_or_default(),
                    product_name: kv(&t, "PRETTY_NAME")
                        .or_else(|| kv(&t, "NAME"))
                        .unwrap_or_default(),
                    hostname: hostname(v),
                    evidence: p.into(),
                });
            }
        }
    }
    if let Some(t) = text(v, "/etc/lsb-release") {
        if let Some(id) = kv(&t, "DISTRIB_ID") {
            return Some(Os {
                family: "linux".into(),
                distro: id.to_ascii_lowercase(),
                version: kv(&t, "DISTRIB_RELEASE").unwrap_or_default(),
                product_name: kv(&t, "DISTRIB_DESCRIPTION").unwrap_or(id),
                hostname: hostname(v),
                evidence: "/etc/lsb-release".into(),
            });
        }
    }
    let releases: [(&str, Which); 5] = [
        ("/etc/centos-release", &|_| Some("centos")),
        ("/etc/rocky-release", &|_| Some("rocky")),
        ("/etc/redhat-release", &|l| {
            Some(if l.contains("CentOS") {
                "centos"
            } else if l.contains("Fedora") {
                "fedora"
            } else {
                "rhel"
            })
        }),
        ("/etc/SuSE-release", &|l| {
            Some(if l.contains("openSUSE") {
                "opensuse"
            } else {
                "sles"
            })
        }),
        ("/etc/debian_version", &|_| Some("debian")),
    ];
    for (p, which) in releases {
        if let Some(t) = text(v, p) {
            let line = t.lines().next().unwrap_or("").trim().to_string();
            let distro = which(&line)?.to_string();
            let version = if p.ends_with("SuSE-release") {
                let ver = kv(&t, "VERSION").unwrap_or_default();
                match kv(&t, "PATCHLEVEL") {
                    Some(pl) if pl != "0" => format!("{ver}.{pl}"),
                    _ => ver,
                }
            } else if p.ends_with("debian_version") {
                line.clone()
            } else {
                version_in(&line)
            };
            return Some(Os {
                family: "linux".into(),
                distro,
                version,
                product_name: line,
                hostname: hostname(v),
                evidence: p.into(),
            });
        }
    }
    None
}

fn unix(v: &mut dyn FsView) -> Option<Os> {
    if let Some(t) = text(v, "/etc/release") {
        let line = t.lines().next().unwrap_or("").trim().to_string();
        if line.contains("Solaris") || line.contains("illumos") || line.contains("OpenIndiana") {
            return Some(Os {
                family: "unix".into(),
                distro: "solaris".into(),
                version: version_in(&line),
                product_name: line,
                hostname: hostname(v),
                evidence: "/etc/release".into(),
            });
        }
    }
    if let Some(t) = text(v, "/bin/freebsd-version") {
        let ver = t
            .lines()
            .find_map(|l| l.trim().strip_prefix("USERLAND_VERSION="))
            .map(|s| s.trim_matches('"').to_string());
        return Some(Os {
            family: "unix".into(),
            distro: "freebsd".into(),
            version: ver.clone().unwrap_or_default(),
            product_name: format!("FreeBSD {}", ver.unwrap_or_default()),
            hostname: None,
            evidence: "/bin/freebsd-version".into(),
        });
    }
    None
}

/// The Windows system root: a directory with `System32/config/SOFTWARE`.
fn systemroot(v: &mut dyn FsView) -> Option<String> {
    ["/Windows", "/WINNT", "/WIN32", "/WIN"]
        .into_iter()
        .find(|r| v.exists(&format!("{r}/System32/config/SOFTWARE")))
        .map(str::to_string)
}

fn hive(v: &mut dyn FsView, root: &str, name: &str) -> Option<Vec<u8>> {
    v.read(&format!("{root}/System32/config/{name}"), HIVE)
}

/// The current control set's name in a SYSTEM hive ("ControlSet001").
fn control_set(sys: &Hive) -> String {
    let n = sys
        .key("Select")
        .and_then(|k| k.value("Current"))
        .and_then(|v| match v {
            crate::registry::Value::Dword(d) => Some(d),
            _ => None,
        })
        .unwrap_or(1);
    format!("ControlSet{n:03}")
}

fn windows(v: &mut dyn FsView) -> Option<Os> {
    let root = systemroot(v)?;
    let sw = hive(v, &root, "SOFTWARE")?;
    let h = Hive::parse(&sw).ok()?;
    let cv = h.key("Microsoft\\Windows NT\\CurrentVersion")?;
    let s = |n: &str| cv.value(n).and_then(|x| x.as_string());
    let mut product = s("ProductName").unwrap_or_default();
    // Windows 11 keeps "Windows 10" in ProductName; its builds start at
    // 22000 (libguestfs does the same).
    let build: u32 = s("CurrentBuildNumber")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    if build >= 22000 && product.starts_with("Windows 10") {
        product = product.replacen("Windows 10", "Windows 11", 1);
    }
    let version = match (
        s("CurrentMajorVersionNumber"),
        s("CurrentMinorVersionNumber"),
    ) {
        (Some(a), Some(b)) => format!("{a}.{b}"),
        _ => s("CurrentVersion").unwrap_or_default(),
    };
    let version = match s("CurrentBuildNumber") {
        Some(b) if !version.is_empty() => format!("{version}.{b}"),
        _ => version,
    };
    let hostname = hive(v, &root, "SYSTEM").and_then(|b| {
        let sys = Hive::parse(&b).ok()?;
        let cs = control_set(&sys);
        sys.key(&format!("{cs}\\Control\\ComputerName\\ComputerName"))
            .and_then(|k| k.value("ComputerName"))
            .and_then(|x| x.as_string())
    });
    Some(Os {
        family: "windows".into(),
        distro: "windows".into(),
        version,
        product_name: product,
        hostname,
        evidence: format!("{root}/System32/config/SOFTWARE: Microsoft\\Windows NT\\CurrentVersion"),
    })
}

/// The operating system on this filesystem, if it holds one.
pub fn os(v: &mut dyn FsView) -> Option<Os> {
    linux(v).or_else(|| windows(v)).or_else(|| unix(v))
}

/// (application, paths whose existence shows it) on Unix-like guests.
const FILES: &[(&str, &[&str])] = &[
    ("Oracle", &["/etc/oratab", "/u01/app/oracle", "/opt/oracle"]),
    (
        "MySQL",
        &[
            "/etc/mysql/my.cnf",
            "/etc/my.cnf",
            "/usr/sbin/mysqld",
            "/usr/sbin/mariadbd",
            "/var/lib/mysql",
        ],
    ),
    (
        "PostgreSQL",
        &[
            "/etc/postgresql",
            "/usr/lib/postgresql",
            "/var/lib/pgsql",
            "/var/lib/postgresql",
        ],
    ),
    ("SQL Server", &["/opt/mssql/bin/sqlservr", "/var/opt/mssql"]),
    ("DB2", &["/opt/ibm/db2", "/var/db2"]),
    ("Sybase", &["/opt/sybase", "/opt/sap/SYBASE.sh"]),
    (
        "Domino",
        &["/opt/hcl/domino", "/opt/ibm/domino", "/opt/lotus/notes"],
    ),
];

/// (application, package name prefixes) in dpkg's status file.
const PACKAGES: &[(&str, &[&str])] = &[
    ("MySQL", &["mysql-server", "mariadb-server"]),
    ("PostgreSQL", &["postgresql"]),
    ("Oracle", &["oracle-"]),
    ("SQL Server", &["mssql-server"]),
    ("DB2", &["db2"]),
];

/// (application, words in an uninstall entry's DisplayName or a service
/// name) on Windows guests.
const WINDOWS: &[(&str, &[&str], &[&str])] = &[
    (
        "SQL Server",
        &["Microsoft SQL Server"],
        &["MSSQLSERVER", "MSSQL$"],
    ),
    (
        "Exchange",
        &["Microsoft Exchange Server"],
        &["MSExchangeIS", "MSExchangeTransport"],
    ),
    (
        "Oracle",
        &["Oracle Database", "Oracle Server"],
        &["OracleService"],
    ),
    ("MySQL", &["MySQL Server", "MariaDB"], &["MySQL"]),
    ("PostgreSQL", &["PostgreSQL"], &["postgresql-"]),
    ("DB2", &["IBM DB2", "Db2"], &["DB2-"]),
    ("Sybase", &["Sybase", "SAP Adaptive Server"], &["SYBSQL_"]),
    (
        "Domino",
        &["Domino", "Lotus Notes"],
        &["Lotus Domino Server", "HCL Domino"],
    ),
];

fn add(out: &mut Vec<App>, name: &str, evidence: String) {
    if !out.iter().any(|a| a.name == name) {
        out.push(App {
            name: name.into(),
            evidence,
        });
    }
}

/// The applications this filesystem shows.
pub fn apps(v: &mut dyn FsView) -> Vec<App> {
    let mut out = Vec::new();
    for (app, paths) in FILES {
        if let Some(p) = paths.iter().find(|p| v.exists(p)) {
            add(&mut out, app, p.to_string());
        }
    }
    if let Some(t) = v.read("/var/lib/dpkg/status", 64 << 20) {
        let t = String::from_utf8_lossy(&t);
        for pkg in t.lines().filter_map(|l| l.strip_prefix("Package: ")) {
            for (app, prefixes) in PACKAGES {
                if prefixes.iter().any(|p| pkg.starts_with(p)) {
                    add(&mut out, app, format!("/var/lib/dpkg/status: {pkg}"));
                }
            }
        }
    }
    if let Some(root) = systemroot(v) {
        if let Some(sw) = hive(v, &root, "SOFTWARE") {
            if let Ok(h) = Hive::parse(&sw) {
                for base in [
                    "Microsoft\\Windows\\CurrentVersion\\Uninstall",
                    "WOW6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall",
                ] {
                    for k in h.key(base).map(|k| k.subkeys()).unwrap_or_default() {
                        let Some(name) = k.value("DisplayName").and_then(|x| x.as_string()) else {
                            continue;
                        };
                        for (app, words, _) in WINDOWS {
                            if words.iter().any(|w| name.contains(w)) {
                                add(
                                    &mut out,
                                    app,
                                    format!("SOFTWARE\\{base}\\{}: {name}", k.name()),
                                );
                            }
                        }
                    }
                }
                if let Some(k) = h.key("Microsoft\\Microsoft SQL Server\\Instance Names\\SQL") {
                    let names: Vec<String> = k.value_names();
                    if !names.is_empty() {
                        add(&mut out, "SQL Server", format!("SOFTWARE\\Microsoft\\Microsoft SQL Server\\Instance Names\\SQL: {}", names.join(", ")));
                    }
                }
            }
        }
        if let Some(sy) = hive(v, &root, "SYSTEM") {
            if let Ok(h) = Hive::parse(&sy) {
                let cs = control_set(&h);
                for k in h
                    .key(&format!("{cs}\\Services"))
                    .map(|k| k.subkeys())
                    .unwrap_or_default()
                {
                    let n = k.name();
                    for (app, _, services) in WINDOWS {
                        if services.iter().any(|s| n.starts_with(s)) {
                            add(&mut out, app, format!("SYSTEM\\{cs}\\Services\\{n}"));
                        }
                    }
                }
            }
        }
    }
    out
}
