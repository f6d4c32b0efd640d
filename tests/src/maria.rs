//! A MariaDB of its own for end-to-end tests (`mariadb-install-db` in a
//! temporary directory, `mariadbd` on a private socket with its binlog on,
//! never the system service), a bank workload whose invariants can be
//! checked on any copy, the `mariadb` client to read it back, and the
//! agent's command line pointed at one appliance.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{run, wait_for, wait_output};

/// Accounts of the bank; each starts with [`OPENING`].
pub const ACCOUNTS: u32 = 2000;
pub const OPENING: i64 = 1000;

/// A query through the `mariadb` client as root (unix_socket
/// authentication): rows, tab-separated.
pub fn sql(sock: &Path, q: &str) -> String {
    run(Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", sock.display()))
        .args(["-uroot", "--batch", "--skip-column-names", "bank", "-e", q]))
    .trim()
    .to_string()
}

/// A MariaDB server in a temporary directory, run as root.
pub struct Maria {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub sock: PathBuf,
    child: Option<Child>,
}

impl Maria {
    /// Installs, starts and fills the bank (`acct`, `journal`) and a
    /// `filler` table that gives the data directory some bulk.
    pub fn init() -> Maria {
        crate::require("mariadb-install-db");
        crate::require("mariadb-backup");
        let dir = tempfile::Builder::new()
            .prefix("cdm-maria-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let data = dir.path().join("data");
        // A temporary directory of its own: servers installed and run side
        // by side by parallel tests must not share /tmp's temporary tables
        // (an install failed once with "Unknown table 'mysql.tmp_user_sys'"
        // after its temporary table file vanished from /tmp).
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        run(Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=socket", "--user=root"])
            .arg(format!("--tmpdir={}", tmp.display())));
        let mut m = Maria {
            sock: dir.path().join("mysqld.sock"),
            dir,
            data,
            child: None,
        };
        m.start();
        let s = &m.sock;
        run(Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", s.display()))
            .args(["-uroot", "-e", "CREATE DATABASE bank"]));
        sql(
            s,
            &format!(
                "CREATE TABLE acct (id INT PRIMARY KEY, bal BIGINT NOT NULL) ENGINE=InnoDB; \
                 CREATE TABLE journal (seq BIGINT AUTO_INCREMENT PRIMARY KEY, src INT NOT NULL, \
                   dst INT NOT NULL, amt INT NOT NULL) ENGINE=InnoDB; \
                 CREATE TABLE filler (id INT PRIMARY KEY, pad VARCHAR(2000)) ENGINE=InnoDB; \
                 INSERT INTO acct SELECT seq, {OPENING} FROM seq_1_to_{ACCOUNTS}; \
                 INSERT INTO filler SELECT seq, REPEAT(MD5(seq), 60) FROM seq_1_to_20000"
            ),
        );
        m
    }

    pub fn start(&mut self) {
        let log = self.dir.path().join("mariadbd.log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data.display()))
            .arg(format!("--socket={}", self.sock.display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!(
                "--tmpdir={}",
                self.dir.path().join("tmp").display()
            ))
            .arg(format!("--log-bin={}", self.data.join("binlog").display()))
            .args([
                "--server-id=1",
                "--skip-networking",
                "--user=root",
                "--innodb-flush-log-at-trx-commit=2",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("mariadbd");
        self.child = Some(child);
        let sock = self.sock.clone();
        wait_for(120, "mariadbd to answer", || {
            let ok = Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", sock.display()))
                .args(["-uroot", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok.then_some(())
        });
    }

    /// A clean shutdown, waited for.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            // SAFETY: kill(2) on the server this helper started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = wait_output(c, "mariadbd shutdown");
        }
    }

    pub fn agent_args(&self) -> Vec<String> {
        vec!["--socket".into(), self.sock.display().to_string()]
    }

    pub fn sql(&self, q: &str) -> String {
        sql(&self.sock, q)
    }

    /// The sequence number of the server's last GTID (domain 0).
    pub fn gtid_seq(&self) -> u64 {
        gtid_seq(&self.sql("SELECT @@gtid_binlog_pos"))
    }
}

impl Drop for Maria {
    fn drop(&mut self) {
        self.stop();
    }
}

/// "0-1-42" → 42 (one domain, as the test server has).
pub fn gtid_seq(g: &str) -> u64 {
    g.trim()
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `n` transfers, each one transaction (one GTID): money moves between
/// two accounts and the journal gets one row.
pub fn transfers(seed: u64, n: u32) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut s = String::new();
    for _ in 0..n {
        let a = next() % ACCOUNTS as u64 + 1;
        let b = next() % ACCOUNTS as u64 + 1;
        let amt = next() % 100 + 1;
        s.push_str(&format!(
            "BEGIN; UPDATE acct SET bal = bal - {amt} WHERE id = {a}; \
             UPDATE acct SET bal = bal + {amt} WHERE id = {b}; \
             INSERT INTO journal (src, dst, amt) VALUES ({a}, {b}, {amt}); COMMIT;\n"
        ));
    }
    s
}

/// Transfers in a thread, batch after batch, until stopped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Workload {
    pub fn start(m: &Maria, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let sock = m.sock.clone();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut done = 0u64;
            let mut batch = 0;
            while !flag.load(Ordering::Relaxed) {
                run_script(&sock, &transfers(seed * 1_000_003 + batch, 100));
                done += 100;
                batch += 1;
            }
            done
        });
        Workload {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops after the batch in flight; the transfers made.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("workload thread"))
            .unwrap_or(0)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs a script through the client's standard input.
pub fn run_script(sock: &Path, script: &str) {
    use std::io::Write as _;
    let mut child = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", sock.display()))
        .args(["-uroot", "bank"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mariadb client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script to the client");
    let out = wait_output(child, "mariadb script");
    assert!(
        out.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bank's invariants on any copy, and its journal's length: the
/// total is what it opened with, the journal has no gap, and every
/// balance is its opening plus what the journal moved in and out.
pub fn check_bank(sock: &Path) -> u64 {
    let total = sql(sock, "SELECT SUM(bal) FROM acct");
    assert_eq!(
        total,
        (OPENING * ACCOUNTS as i64).to_string(),
        "the total moved"
    );
    let j = sql(sock, "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM journal");
    let (n, max) = j.split_once('\t').expect("count and max");
    assert_eq!(n, max, "the journal has a gap: {j}");
    let off = sql(
        sock,
        &format!(
            "SELECT COUNT(*) FROM acct a LEFT JOIN \
             (SELECT id, SUM(d) AS moved FROM (SELECT dst AS id, amt AS d FROM journal \
               UNION ALL SELECT src, -amt FROM journal) x GROUP BY id) m ON m.id = a.id \
             WHERE a.bal <> {OPENING} + COALESCE(m.moved, 0)"
        ),
    );
    assert_eq!(off, "0", "balances that the journal does not explain");
    n.parse().expect("journal length")
}

/// A digest of the journal's first `n` rows: equal on two servers iff
/// they agree on those transfers.
pub fn journal_digest(sock: &Path, n: u64) -> String {
    sql(
        sock,
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(CRC32(CONCAT(seq, ':', src, ':', dst, ':', amt))), 0) \
             FROM journal WHERE seq <= {n}"
        ),
    )
}

/// The agent of a test (shared by every end-to-end test).
pub use crate::AgentCli as Agent;
