//! What this host can protect, MariaDB's part: running servers, found
//! through `/proc` — a process named `mariadbd` (or `mysqld`), its data
//! directory from `--datadir=` or its working directory (the server
//! changes into it), its socket from `--socket=` or else the Unix socket
//! it has bound (its `fd/` links to `socket:[INODE]`, `net/unix` names
//! the path of that inode). Each data directory is reported once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::discover::{dir_size, Discovered, Roots};

/// Where Debian's server listens when nothing says otherwise.
const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";

/// Every running MariaDB of this host.
pub fn mariadb(roots: &Roots) -> Vec<Discovered> {
    let Ok(rd) = std::fs::read_dir(&roots.proc) else {
        return Vec::new();
    };
    let mut by_dir: BTreeMap<PathBuf, (PathBuf, PathBuf)> = BTreeMap::new();
    for e in rd.flatten() {
        if e.file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !matches!(comm.trim(), "mariadbd" | "mysqld") {
            continue;
        }
        let args = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let datadir =
            option(&args, "--datadir").or_else(|| std::fs::read_link(dir.join("cwd")).ok());
        // A data directory holds the `mysql` schema.
        let Some(datadir) = datadir.filter(|d| d.join("mysql").is_dir()) else {
            continue;
        };
        let socket = option(&args, "--socket")
            .or_else(|| bound_socket(&roots.proc, &dir))
            .unwrap_or_else(|| DEFAULT_SOCKET.into());
        let key = std::fs::canonicalize(&datadir).unwrap_or_else(|_| datadir.clone());
        by_dir.entry(key).or_insert((datadir, socket));
    }
    by_dir
        .into_values()
        .map(|(datadir, socket)| Discovered {
            kind: "mariadb".into(),
            name: datadir.display().to_string(),
            size_bytes: dir_size(&datadir),
            config: json!({
                "socket": socket,
                "user": "root",
                "datadir": datadir,
            }),
        })
        .collect()
}

/// `--NAME=VALUE` (or `--NAME VALUE`) of a NUL-separated command line;
/// the last one wins, as for the server.
fn option(cmdline: &[u8], name: &str) -> Option<PathBuf> {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix(name) {
            if let Some(v) = v.strip_prefix('=') {
                found = Some(PathBuf::from(v));
            } else if v.is_empty() {
                found = it.next().map(PathBuf::from);
            }
        }
    }
    found.filter(|p| !p.as_os_str().is_empty())
}

/// The path of a Unix socket the process `pid_dir` has open and bound.
fn bound_socket(proc: &Path, pid_dir: &Path) -> Option<PathBuf> {
    let inodes: BTreeSet<String> = std::fs::read_dir(pid_dir.join("fd"))
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let table = std::fs::read_to_string(proc.join("net/unix")).ok()?;
    // Num RefCount Protocol Flags Type St Inode Path
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (inode, path) = (f.get(6)?, f.get(7)?);
        (inodes.contains(*inode) && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(proc: &Path, pid: u32, comm: &str, cwd: &Path, cmdline: &[&str]) -> PathBuf {
        let p = proc.join(pid.to_string());
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::write(p.join("comm"), format!("{comm}\n")).unwrap();
        std::os::unix::fs::symlink(cwd, p.join("cwd")).unwrap();
        let mut c = cmdline.join("\0");
        c.push('\0');
        std::fs::write(p.join("cmdline"), c).unwrap();
        p
    }

    fn datadir(root: &Path, rel: &str) -> PathBuf {
        let d = root.join(rel);
        std::fs::create_dir_all(d.join("mysql")).unwrap();
        std::fs::write(d.join("ibdata1"), vec![0u8; 4096]).unwrap();
        d
    }

    #[test]
    fn running_servers_with_their_socket_each_once() {
        let t = tempfile::tempdir().unwrap();
        let roots = Roots {
            proc: t.path().join("proc"),
            debian: t.path().join("etc/postgresql"),
            ..Roots::default()
        };
        std::fs::create_dir_all(roots.proc.join("net")).unwrap();
        // Debian's service: no options, the datadir is its working
        // directory, the socket the one it has bound.
        let deb = datadir(t.path(), "var/lib/mysql");
        let p = process(&roots.proc, 100, "mariadbd", &deb, &["/usr/sbin/mariadbd"]);
        std::os::unix::fs::symlink("socket:[4242]", p.join("fd/20")).unwrap();
        std::os::unix::fs::symlink("socket:[999]", p.join("fd/21")).unwrap();
        std::fs::write(
            roots.proc.join("net/unix"),
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 999 @abstract\n\
             0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/mysqld/mysqld.sock\n",
        )
        .unwrap();
        // A second server with its options on the command line; a thread
        // of it (same data directory) is reported once.
        let other = datadir(t.path(), "srv/db2");
        let sock = format!("--socket={}/s.sock", other.display());
        let dd = format!("--datadir={}", other.display());
        process(
            &roots.proc,
            200,
            "mysqld",
            t.path(),
            &["mysqld", &dd, &sock],
        );
        process(&roots.proc, 201, "mysqld", &other, &["mysqld", &dd, &sock]);
        // Not servers: another program, a directory without `mysql`.
        process(&roots.proc, 300, "bash", &deb, &["bash"]);
        process(&roots.proc, 301, "mariadbd", t.path(), &["mariadbd"]);
        let got = mariadb(&roots);
        assert_eq!(got.len(), 2, "{got:?}");
        let find = |d: &Path| {
            got.iter()
                .find(|x| x.name == d.display().to_string())
                .unwrap()
        };
        let a = find(&deb);
        assert_eq!(a.kind, "mariadb");
        assert_eq!(a.config["socket"], "/run/mysqld/mysqld.sock");
        assert_eq!(a.config["user"], "root");
        assert_eq!(a.size_bytes, Some(4096));
        let b = find(&other);
        assert_eq!(b.config["socket"], format!("{}/s.sock", other.display()));
        assert_eq!(b.config["datadir"], other.display().to_string());
    }

    #[test]
    fn options_and_defaults() {
        let c = b"mariadbd\0--datadir\0/a\0--datadir=/b\0--socket=\0";
        assert_eq!(option(c, "--datadir"), Some("/b".into()));
        assert_eq!(option(c, "--socket"), None);
        assert_eq!(option(b"x\0--datadirx=/c\0", "--datadir"), None);
        let none = Roots {
            proc: "/nonexistent/proc".into(),
            debian: "/nonexistent".into(),
            ..Roots::default()
        };
        assert!(mariadb(&none).is_empty());
    }
}
