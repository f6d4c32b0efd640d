//! A PostgreSQL cluster of its own for end-to-end tests (initdb as the
//! `postgres` user, trust on a private unix socket, pgbench tables), and
//! psql to read it back.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{output, run, sh};

pub fn pg_bin(tool: &str) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: scripts/test installs it")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join(tool))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    v.pop()
        .unwrap_or_else(|| panic!("{tool} not found under /usr/lib/postgresql"))
}

/// A port number for a PostgreSQL that listens only on a unix socket in a
/// directory of its own (listen_addresses = ''): the number only names the
/// socket file, no TCP port is taken, so nothing can race for it. Distinct
/// within this process anyway, so no two servers ever share a name.
pub fn pg_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(15432);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A PostgreSQL cluster of its own (initdb, trust for the socket).
pub struct Pg {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
}

impl Pg {
    pub fn init(scale: u32) -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("cdm-pg-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        sh(&format!("chown -R postgres: {}", dir.path().display()));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data));
        let pg = Pg {
            _dir: dir,
            data,
            sock,
            port: pg_port(),
        };
        pg.start();
        run(Command::new(pg_bin("pgbench")).args(pg.conn()).args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "postgres",
        ]));
        pg
    }

    pub fn start(&self) {
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("../log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=''",
                self.port,
                self.sock.display()
            ))
            .args(["-w", "start"]));
    }

    pub fn stop(&self) {
        let _ = output(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
        );
    }

    pub fn conn(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--host".into(),
            self.sock.display().to_string(),
            "--port".into(),
            self.port.to_string(),
        ]
    }

    /// The server's clock now, RFC 3339 in UTC with microseconds (what a
    /// point-in-time restore targets).
    pub fn server_time(&self) -> String {
        psql(
            &self.sock,
            self.port,
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .trim()
        .to_string()
    }

    pub fn pgbench(&self, tx: u32) {
        run(Command::new(pg_bin("pgbench")).args(self.conn()).args([
            "-n",
            "-c",
            "2",
            "-t",
            &tx.to_string(),
            "postgres",
        ]));
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The state of the pgbench tables, as the tests compare it.
pub const STATE: &str = "SELECT (SELECT count(*) FROM pgbench_history) || ',' || \
    (SELECT coalesce(sum(delta), 0) FROM pgbench_history) || ',' || \
    (SELECT sum(abalance) FROM pgbench_accounts) || ',' || \
    (SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts)";

pub fn psql(sock: &Path, port: u16, q: &str) -> String {
    run(Command::new("psql")
        .args(["-X", "-A", "-t", "-h"])
        .arg(sock)
        .args([
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            q,
        ]))
    .trim()
    .to_string()
}
