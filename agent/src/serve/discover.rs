//! What this host can protect: PostgreSQL clusters, found two ways and
//! reported once each — running postmasters (through `/proc`: a process
//! named `postgres` whose working directory holds a `postmaster.pid` that
//! names it; its data directory, port and socket directory come from that
//! file), and Debian clusters (`/etc/postgresql/VERSION/NAME/postgresql.conf`:
//! `port`, `data_directory`, `unix_socket_directories`), running or not.
//! The roots are parameters so tests run on fixture trees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

/// Where to look, and for what.
#[derive(Clone, Debug)]
pub struct Roots {
    /// `/proc`.
    pub proc: PathBuf,
    /// `/etc/postgresql`.
    pub debian: PathBuf,
    /// Look for PostgreSQL clusters.
    pub postgres: bool,
    /// Look for MariaDB servers ([`super::discover_maria`]).
    pub mariadb: bool,
}

impl Default for Roots {
    fn default() -> Roots {
        Roots {
            proc: "/proc".into(),
            debian: "/etc/postgresql".into(),
            postgres: true,
            mariadb: true,
        }
    }
}

/// Every application of the kinds `roots` asks for.
pub fn all(roots: &Roots) -> Vec<Discovered> {
    let mut v = Vec::new();
    if roots.postgres {
        v.extend(postgres(roots));
    }
    if roots.mariadb {
        v.extend(super::discover_maria::mariadb(roots));
    }
    v
}

/// An application as the heartbeat reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Discovered {
    pub kind: String,
    pub name: String,
    pub config: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// What `postmaster.pid` says of a running server.
#[derive(Clone, Debug, PartialEq)]
struct Running {
    pgdata: PathBuf,
    port: u16,
    /// Socket directory, or an address when the server has no socket.
    host: String,
}

/// A cluster found by either way, before it is reported.
#[derive(Clone, Debug)]
struct Cluster {
    name: String,
    pgdata: PathBuf,
    port: u16,
    host: String,
}

const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Every PostgreSQL cluster of this host, by name.
pub fn postgres(roots: &Roots) -> Vec<Discovered> {
    let mut by_dir: BTreeMap<PathBuf, Cluster> = BTreeMap::new();
    for c in debian_clusters(&roots.debian) {
        by_dir.insert(canonical(&c.pgdata), c);
    }
    for r in running(&roots.proc) {
        let key = canonical(&r.pgdata);
        match by_dir.get_mut(&key) {
            // A Debian cluster that runs: its name, what it runs with.
            Some(c) => {
                c.port = r.port;
                c.host = r.host;
            }
            None => {
                by_dir.insert(
                    key,
                    Cluster {
                        name: r.pgdata.display().to_string(),
                        pgdata: r.pgdata,
                        port: r.port,
                        host: r.host,
                    },
                );
            }
        }
    }
    let mut out: Vec<Discovered> = by_dir
        .into_values()
        .map(|c| Discovered {
            kind: "postgresql".into(),
            size_bytes: dir_size(&c.pgdata),
            config: json!({
                "host": c.host,
                "port": c.port,
                "user": "postgres",
                "pgdata": c.pgdata,
            }),
            name: c.name,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Postmasters in `proc`: processes named `postgres` (or `postmaster`)
/// whose data directory's `postmaster.pid` starts with their pid — the
/// backends share the name and the directory, not the pid.
fn running(proc: &Path) -> Vec<Running> {
    let Ok(rd) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "postgres" | "postmaster") {
            continue;
        }
        let mut candidates = Vec::new();
        if let Ok(cwd) = std::fs::read_link(dir.join("cwd")) {
            candidates.push(cwd);
        }
        if let Some(d) = data_arg(&std::fs::read(dir.join("cmdline")).unwrap_or_default()) {
            candidates.push(d);
        }
        if let Some(r) = candidates.iter().find_map(|d| postmaster_pid(d, pid)) {
            out.push(r);
        }
    }
    out
}

/// The `-D DIR` (or `-DDIR`) of a NUL-separated command line.
fn data_arg(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == b"-D" {
            return it
                .next()
                .map(|d| PathBuf::from(String::from_utf8_lossy(d).into_owned()));
        }
        if let Some(d) = a.strip_prefix(b"-D") {
            return Some(PathBuf::from(String::from_utf8_lossy(d).into_owned()));
        }
    }
    None
}

/// `DIR/postmaster.pid` if it names `pid`: line 1 the pid, 2 the data
/// directory, 4 the port, 5 the first socket directory, 6 the first
/// listen address.
fn postmaster_pid(dir: &Path, pid: u32) -> Option<Running> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    if lines.first()?.parse::<u32>().ok()? != pid {
        return None;
    }
    let pgdata = match lines.get(1) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => dir.to_path_buf(),
    };
    let port = lines.get(3)?.parse::<u16>().ok()?;
    let socket = lines.get(4).copied().unwrap_or("");
    let listen = lines.get(5).copied().unwrap_or("");
    let host = if !socket.is_empty() {
        socket.to_string()
    } else {
        match listen.split(',').next().map(str::trim).unwrap_or("") {
            "" => DEFAULT_SOCKET_DIR.to_string(),
            "*" | "0.0.0.0" => "127.0.0.1".to_string(),
            "::" => "::1".to_string(),
            a => a.to_string(),
        }
    };
    Some(Running { pgdata, port, host })
}

/// Debian's clusters: `ROOT/VERSION/NAME/postgresql.conf` whose data
/// directory holds a cluster (`PG_VERSION`).
fn debian_clusters(root: &Path) -> Vec<Cluster> {
    let mut out = Vec::new();
    for v in read_dirs(root) {
        for c in read_dirs(&v) {
            let Ok(text) = std::fs::read_to_string(c.join("postgresql.conf")) else {
                continue;
            };
            let (Some(version), Some(name)) = (file_name(&v), file_name(&c)) else {
                continue;
            };
            let conf = parse_conf(&text);
            let pgdata = conf
                .get("data_directory")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/postgresql/{version}/{name}")));
            if !pgdata.join("PG_VERSION").exists() {
                continue;
            }
            let port = conf
                .get("port")
                .and_then(|p| p.parse().ok())
                .unwrap_or(5432);
            let host = conf
                .get("unix_socket_directories")
                .and_then(|s| s.split(',').map(str::trim).find(|s| !s.is_empty()))
                .unwrap_or(DEFAULT_SOCKET_DIR)
                .to_string();
            out.push(Cluster {
                name: format!("{version}/{name}"),
                pgdata,
                port,
                host,
            });
        }
    }
    out
}

fn read_dirs(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().and_then(|n| n.to_str()).map(str::to_string)
}

/// `key = value` settings of a postgresql.conf (the last one wins, as for
/// the server); comments and quotes removed.
fn parse_conf(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let line = strip_comment(line).trim();
        let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(' ')) else {
            continue;
        };
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(v);
        m.insert(k.trim().to_ascii_lowercase(), v.replace("''", "'"));
    }
    m
}

/// The line up to a `#` that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Bytes of the files under `p` (not following symbolic links); `None`
/// when `p` cannot be read.
pub fn dir_size(p: &Path) -> Option<u64> {
    let m = std::fs::symlink_metadata(p).ok()?;
    if !m.is_dir() {
        return Some(m.len());
    }
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _t: tempfile::TempDir,
        root: PathBuf,
        roots: Roots,
    }

    fn fixture() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let roots = Roots {
            proc: root.join("proc"),
            debian: root.join("etc/postgresql"),
            ..Roots::default()
        };
        std::fs::create_dir_all(&roots.proc).unwrap();
        std::fs::create_dir_all(&roots.debian).unwrap();
        Fixture { _t: t, root, roots }
    }

    fn cluster_dir(f: &Fixture, rel: &str, bytes: usize) -> PathBuf {
        let d = f.root.join(rel);
        std::fs::create_dir_all(d.join("base/1")).unwrap();
        std::fs::write(d.join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(d.join("base/1/1259"), vec![0u8; bytes]).unwrap();
        d
    }

    fn process(f: &Fixture, pid: u32, comm: &str, cwd: &Path, cmdline: &[&str]) {
        let p = f.roots.proc.join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        std::os::unix::fs::symlink(cwd, p.join("cwd")).unwrap();
        let mut c = cmdline.join("\0");
        c.push('\0');
        std::fs::write(p.join("cmdline"), c).unwrap();
    }

    fn pid_file(dir: &Path, pid: u32, port: u16, socket: &str, listen: &str) {
        std::fs::write(
            dir.join("postmaster.pid"),
            format!(
                "{pid}\n{}\n1700000000\n{port}\n{socket}\n{listen}\n  5432001    32769\nready   \n",
                dir.display()
            ),
        )
        .unwrap();
    }

    #[test]
    fn running_postmasters_and_debian_clusters_each_once() {
        let f = fixture();
        // A Debian cluster that runs on another port than its file says.
        let deb = cluster_dir(&f, "var/lib/postgresql/15/main", 3000);
        let conf = f.roots.debian.join("15/main");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("postgresql.conf"),
            format!(
                "# a comment\ndata_directory = '{}'\t# where\nport = 5433\nunix_socket_directories = '/run/pg1,/tmp' # two\n",
                deb.display()
            ),
        )
        .unwrap();
        pid_file(&deb, 700, 5434, "/run/pg1", "localhost");
        process(
            &f,
            700,
            "postgres",
            &deb,
            &[
                "/usr/lib/postgresql/15/bin/postgres",
                "-D",
                &deb.display().to_string(),
            ],
        );
        // Its backends: same name, same directory, another pid.
        process(&f, 701, "postgres", &deb, &["postgres: checkpointer"]);
        // A Debian cluster that is stopped.
        let stopped = cluster_dir(&f, "var/lib/postgresql/14/old", 10);
        let c2 = f.roots.debian.join("14/old");
        std::fs::create_dir_all(&c2).unwrap();
        std::fs::write(
            c2.join("postgresql.conf"),
            format!("data_directory='{}'\n", stopped.display()),
        )
        .unwrap();
        // A configuration directory whose cluster is gone.
        let c3 = f.roots.debian.join("13/gone");
        std::fs::create_dir_all(&c3).unwrap();
        std::fs::write(c3.join("postgresql.conf"), "data_directory = '/nowhere'\n").unwrap();
        // A hand-made cluster found only by its process (cwd unreadable:
        // found by -D), TCP only.
        let own = cluster_dir(&f, "srv/pg", 500);
        pid_file(&own, 800, 6000, "", "*");
        process(
            &f,
            800,
            "postgres",
            Path::new("/nonexistent"),
            &["postgres", &format!("-D{}", own.display())],
        );
        // Not PostgreSQL; a stale postmaster.pid of another pid.
        process(&f, 900, "bash", &own, &["bash"]);
        let stale = cluster_dir(&f, "srv/stale", 1);
        pid_file(&stale, 12345, 7000, "/tmp", "");
        process(&f, 901, "postgres", &stale, &["postgres"]);

        let got = postgres(&f.roots);
        let names: Vec<&str> = got.iter().map(|d| d.name.as_str()).collect();
        // Sorted by name ('/' before digits).
        assert_eq!(
            names,
            vec![own.to_str().unwrap(), "14/old", "15/main"],
            "{got:?}"
        );
        let old = &got[1];
        assert_eq!(old.config["port"], 5432);
        assert_eq!(old.config["host"], DEFAULT_SOCKET_DIR);
        assert_eq!(old.size_bytes, Some(3 + 10));
        let main = &got[2];
        assert_eq!(main.kind, "postgresql");
        assert_eq!(main.config["port"], 5434, "the running port wins");
        assert_eq!(main.config["host"], "/run/pg1");
        assert_eq!(main.config["user"], "postgres");
        assert_eq!(main.config["pgdata"], deb.display().to_string());
        let pid_len = std::fs::metadata(deb.join("postmaster.pid")).unwrap().len();
        assert_eq!(main.size_bytes, Some(3 + 3000 + pid_len));
        let o = &got[0];
        assert_eq!(o.config["host"], "127.0.0.1");
        assert_eq!(o.config["port"], 6000);
    }

    #[test]
    fn nothing_to_find() {
        let f = fixture();
        assert!(postgres(&f.roots).is_empty());
        let none = Roots {
            proc: f.root.join("no-proc"),
            debian: f.root.join("no-etc"),
            ..Roots::default()
        };
        assert!(postgres(&none).is_empty());
    }

    #[test]
    fn conf_parsing() {
        let m = parse_conf(
            "port=5999 # x\nlisten_addresses = '*'\ncluster_name = 'a#b''c'\nport = 6001\n",
        );
        assert_eq!(m["port"], "6001");
        assert_eq!(m["listen_addresses"], "*");
        assert_eq!(m["cluster_name"], "a#b'c");
        assert_eq!(
            data_arg(b"postgres\0-D\0/x/y\0-c\0a=b\0"),
            Some(PathBuf::from("/x/y"))
        );
        assert_eq!(data_arg(b"postgres\0-c\0a=b\0"), None);
    }
}
