//! MariaDB: the server as the agent sees it (`mariadb` client queries),
//! `mariadb-backup` runs (full, incremental, prepare), what a prepared
//! copy records of its consistency point, and a `mariadbd` started on a
//! restored copy (regular, instant and clone restores).
//!
//! A point is a *prepared* data directory: `mariadb-backup --prepare`
//! has applied the redo log copied with the files, so the InnoDB pages
//! are those of one LSN, and the non-InnoDB tables were copied under
//! `BACKUP STAGE BLOCK_COMMIT`, where the binlog file, position and GTID
//! are read: `xtrabackup_binlog_info` names the transaction the copy
//! ends at. Started, the server rolls back what was not committed at
//! that point and nothing later is in the copy.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Context as _, ErrorKind, Result};

/// The data directory's name in a stage disk, a clone or a regular
/// restore's target.
pub const DATADIR: &str = "mariadb";

/// How the agent reaches the server: its Unix socket and a user (with
/// unix_socket authentication, Debian's default for root, no password).
#[derive(Clone, Debug)]
pub struct Conn {
    pub socket: PathBuf,
    pub user: String,
    pub password: Option<String>,
}

/// A `[client]` options file holding the password (mode 0600, removed
/// when dropped): the password never appears on a command line.
pub(crate) struct Secret(Option<tempfile::NamedTempFile>);

impl Conn {
    pub(crate) fn secret(&self) -> Result<Secret> {
        let Some(p) = &self.password else {
            return Ok(Secret(None));
        };
        if p.contains('\n') {
            crate::fail!(Invalid, "the MariaDB password holds a line break");
        }
        let mut f = tempfile::NamedTempFile::new()?;
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        // Quoted: a password may hold '#' or spaces.
        let q = p.replace('\\', "\\\\").replace('"', "\\\"");
        writeln!(f, "[client]\npassword=\"{q}\"")?;
        f.flush()?;
        Ok(Secret(Some(f)))
    }

    /// `prog` with the options file (it must come first) and the socket
    /// and user.
    pub(crate) fn command(&self, prog: &str, secret: &Secret) -> Command {
        let mut c = Command::new(prog);
        if let Some(f) = &secret.0 {
            c.arg(format!("--defaults-extra-file={}", f.path().display()));
        }
        c.arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--user={}", self.user));
        c
    }

    /// One query; its rows, tab-separated columns.
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<String>>> {
        self.query_in(None, sql)
    }

    /// One query in `database` (none: no default database).
    pub fn query_in(&self, database: Option<&str>, sql: &str) -> Result<Vec<Vec<String>>> {
        let secret = self.secret()?;
        let mut cmd = self.command("mariadb", &secret);
        if let Some(db) = database {
            cmd.arg(format!("--database={db}"));
        }
        let out = cmd
            .args([
                "--batch",
                "--skip-column-names",
                "--connect-timeout=10",
                "-e",
            ])
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .context_with(ErrorKind::Host, || {
                "running the mariadb client (is mariadb-client installed?)"
            })?;
        if !out.status.success() {
            crate::fail!(
                Host,
                "cannot query MariaDB at {} as {}: {}",
                self.socket.display(),
                self.user,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect())
    }
}

/// What the server says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub datadir: PathBuf,
    pub log_bin: bool,
    pub server_id: u64,
    pub gtid_binlog_pos: String,
}

pub fn info(c: &Conn) -> Result<ServerInfo> {
    let rows = c.query("SELECT @@version, @@datadir, @@log_bin, @@server_id, @@gtid_binlog_pos")?;
    let r = rows
        .first()
        .filter(|r| r.len() == 5)
        .ok_or_else(|| crate::err!(Host, "MariaDB answered {rows:?} about itself"))?;
    if !r[0].to_lowercase().contains("mariadb") {
        crate::fail!(
            Host,
            "the server at {} is not MariaDB ({}): mariadb-backup needs MariaDB",
            c.socket.display(),
            r[0]
        );
    }
    Ok(ServerInfo {
        version: r[0].clone(),
        datadir: PathBuf::from(r[1].trim_end_matches('/')),
        log_bin: r[2] == "1",
        server_id: r[3].parse()?,
        gtid_binlog_pos: r[4].clone(),
    })
}

/// `xtrabackup_checkpoints`: `key = value` lines.
pub fn parse_checkpoints(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The text of a checkpoints file for `--incremental-basedir`:
/// mariadb-backup reads its first four lines in this order.
pub fn checkpoints_text(c: &BTreeMap<String, String>) -> String {
    const ORDER: [&str; 4] = ["backup_type", "from_lsn", "to_lsn", "last_lsn"];
    let mut s: String = ORDER
        .iter()
        .filter_map(|k| c.get(*k).map(|v| format!("{k} = {v}\n")))
        .collect();
    for (k, v) in c.iter().filter(|(k, _)| !ORDER.contains(&k.as_str())) {
        s.push_str(&format!("{k} = {v}\n"));
    }
    s
}

/// Where a point's copy ends: the binlog file, position and GTID read
/// under `BACKUP STAGE BLOCK_COMMIT` (none when the server has no binlog).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Binlog {
    pub file: String,
    pub position: u64,
    pub gtid: String,
}

/// `xtrabackup_binlog_info`: "FILE\tPOSITION[\tGTID]".
pub fn parse_binlog_info(text: &str) -> Option<Binlog> {
    let mut f = text.lines().next()?.split('\t');
    Some(Binlog {
        file: f.next()?.trim().to_string(),
        position: f.next()?.trim().parse().ok()?,
        gtid: f.next().unwrap_or("").trim().to_string(),
    })
}

/// What a backup directory (before or after prepare) records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub checkpoints: BTreeMap<String, String>,
    pub binlog: Option<Binlog>,
}

pub fn read_point(dir: &Path) -> Result<Point> {
    let cp = dir.join("xtrabackup_checkpoints");
    let text = std::fs::read_to_string(&cp)
        .context_with(ErrorKind::Host, || format!("{}", cp.display()))?;
    let checkpoints = parse_checkpoints(&text);
    if !checkpoints.contains_key("to_lsn") {
        crate::fail!(Host, "{} has no to_lsn", cp.display());
    }
    let binlog = std::fs::read_to_string(dir.join("xtrabackup_binlog_info"))
        .ok()
        .and_then(|t| parse_binlog_info(&t));
    Ok(Point {
        checkpoints,
        binlog,
    })
}

/// Runs a `mariadb-backup` step with its log in `log`; the log's last
/// lines are the error when it fails.
fn run_logged(mut cmd: Command, what: &str, log: &Path) -> Result<Duration> {
    let t = Instant::now();
    let f = std::fs::File::create(log).context_with(ErrorKind::Io, || log.display().to_string())?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .status()
        .context_with(ErrorKind::Host, || {
            "running mariadb-backup (is the mariadb-backup package installed?)"
        })?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let last: Vec<&str> = text
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect();
        crate::fail!(
            Host,
            "{what} failed ({status}): {}",
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(t.elapsed())
}

/// `mariadb-backup --backup` of the server into `target` (new): a full
/// copy, or with `base` (a directory holding the last point's
/// `xtrabackup_checkpoints`) the pages changed since its `to_lsn`.
pub fn backup(
    c: &Conn,
    datadir: &Path,
    target: &Path,
    base: Option<&Path>,
    log: &Path,
) -> Result<Duration> {
    let secret = c.secret()?;
    let mut cmd = c.command("mariadb-backup", &secret);
    cmd.arg("--backup")
        .arg(format!("--datadir={}", datadir.display()))
        .arg(format!("--target-dir={}", target.display()));
    if let Some(b) = base {
        cmd.arg(format!("--incremental-basedir={}", b.display()));
    }
    let what = if base.is_some() {
        "mariadb-backup --backup (incremental)"
    } else {
        "mariadb-backup --backup"
    };
    run_logged(cmd, what, log)
}

/// `mariadb-backup --prepare` of `target` (applying `incremental` to it
/// when given).
pub fn prepare(target: &Path, incremental: Option<&Path>, log: &Path) -> Result<Duration> {
    let mut cmd = Command::new("mariadb-backup");
    cmd.arg("--prepare")
        .arg(format!("--target-dir={}", target.display()));
    if let Some(i) = incremental {
        cmd.arg(format!("--incremental-dir={}", i.display()));
    }
    run_logged(cmd, "mariadb-backup --prepare", log)
}

/// A `mariadbd` started by the agent on a restored copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Running {
    pub datadir: PathBuf,
    pub socket: PathBuf,
    pub pid_file: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    /// The user `mariadbd` runs as: the copy's owner.
    pub user: String,
}

/// Makes the copy at `root` (holding `mariadb/`) ready to start: its
/// socket, pid file, temporary files and log under `root/run` and
/// `root`, none in production paths.
pub fn ready_copy(root: &Path, port: u16) -> Result<Running> {
    use std::os::unix::fs::{chown, MetadataExt};
    let datadir = root.join(DATADIR);
    if !datadir.join("backup-my.cnf").exists() {
        crate::fail!(
            Host,
            "{}: not a prepared MariaDB copy (no backup-my.cnf)",
            datadir.display()
        );
    }
    let m = std::fs::metadata(&datadir)?;
    let user = crate::pg::owner_name(m.uid()).ok_or_else(|| {
        crate::err!(
            Host,
            "the copy's owner (uid {}) is not a user of this host",
            m.uid()
        )
    })?;
    let run = root.join("run");
    std::fs::create_dir_all(&run)?;
    chown(&run, Some(m.uid()), Some(m.gid()))?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    let log = root.join("mariadbd.log");
    if !log.exists() {
        std::fs::write(&log, b"")?;
    }
    chown(&log, Some(m.uid()), Some(m.gid()))?;
    let pid_file = run.join("mariadbd.pid");
    let _ = std::fs::remove_file(&pid_file);
    Ok(Running {
        socket: run.join("mariadbd.sock"),
        pid_file,
        log,
        port,
        user,
        datadir,
    })
}

/// The options a copy's `mariadbd` runs with, after the InnoDB settings
/// the backup recorded (`backup-my.cnf`, read alone: the host's
/// `/etc/mysql` names production paths). No networking (its socket only),
/// no replica threads, no binlog, everything it writes inside the copy.
pub fn copy_args(r: &Running) -> Vec<String> {
    let run = r.pid_file.parent().unwrap_or(Path::new("/nonexistent"));
    vec![
        format!(
            "--defaults-file={}",
            r.datadir.join("backup-my.cnf").display()
        ),
        format!("--datadir={}", r.datadir.display()),
        format!("--socket={}", r.socket.display()),
        format!("--pid-file={}", r.pid_file.display()),
        format!("--log-error={}", r.log.display()),
        format!("--tmpdir={}", run.display()),
        format!("--port={}", r.port),
        format!("--user={}", r.user),
        "--skip-networking".into(),
        "--skip-slave-start".into(),
        "--skip-log-bin".into(),
        "--general-log=0".into(),
        "--slow-query-log=0".into(),
        "--event-scheduler=DISABLED".into(),
    ]
}

fn pid_of(r: &Running) -> Option<u32> {
    std::fs::read_to_string(&r.pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// Starts `mariadbd` on the copy and waits until it answers on its
/// socket (`mariadb-admin ping` succeeds even when the copy's users
/// refuse us); the time that took.
pub fn start(r: &Running) -> Result<Duration> {
    start_in(r, false)
}

/// [`start`], with `netns` in a new, empty network namespace (`unshare
/// --net`, which execs `mariadbd`): on top of `--skip-networking` it can
/// connect nowhere (no primary, no federated or CONNECT table reaching
/// production). Its Unix socket, a file, still answers from the host.
pub fn start_in(r: &Running, netns: bool) -> Result<Duration> {
    let t = Instant::now();
    let fail = |why: String| {
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        let last: Vec<&str> = log.lines().rev().take(5).collect();
        crate::err!(
            Host,
            "mariadbd did not start on {}: {why}; log: {}",
            r.datadir.display(),
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    };
    let mut cmd = if netns {
        let mut c = Command::new("unshare");
        c.args(["--net", "--", "mariadbd"]);
        c
    } else {
        Command::new("mariadbd")
    };
    cmd.args(copy_args(r))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group: the agent's terminal or job does not take it
    // down; `stop` does.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run mariadbd: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(fail(format!("mariadbd exited ({st})")));
        }
        let ping = Command::new("mariadb-admin")
            .arg("--no-defaults")
            .arg(format!("--socket={}", r.socket.display()))
            .args(["--connect-timeout=2", "ping"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(ping, Ok(s) if s.success()) && r.socket.exists() {
            return Ok(t.elapsed());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(fail("no answer on its socket".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the copy's `mariadbd` (SIGTERM: a clean shutdown, whatever its
/// users allow us) and waits until it is gone.
pub fn stop(r: &Running) -> Result<()> {
    stop_with(r, false)
}

/// [`stop`]; with `now`, SIGKILL (a drill out of time: a hung query must
/// not hold the teardown, and the copy is thrown away).
pub fn stop_with(r: &Running, now: bool) -> Result<()> {
    let Some(pid) = pid_of(r) else {
        return Ok(());
    };
    if !alive(pid) {
        return Ok(());
    }
    let pid_i = i32::try_from(pid).map_err(|_| crate::err!(Host, "pid {pid}"))?;
    let sig = if now { libc::SIGKILL } else { libc::SIGTERM };
    // SAFETY: kill(2) with a pid read from the copy's own pid file.
    if unsafe { libc::kill(pid_i, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(crate::error::Error::with_source(
                ErrorKind::Host,
                format!("stopping mariadbd {pid}"),
                e,
            ));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while alive(pid) {
        if Instant::now() > deadline {
            crate::fail!(
                Host,
                "mariadbd {pid} on {} did not stop",
                r.datadir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip() {
        let t = "backup_type = full-backuped\nfrom_lsn = 0\nto_lsn = 44778\nlast_lsn = 46750\n";
        let c = parse_checkpoints(t);
        assert_eq!(c["to_lsn"], "44778");
        assert_eq!(c["backup_type"], "full-backuped");
        assert_eq!(parse_checkpoints(&checkpoints_text(&c)), c);
        // The order mariadb-backup reads, not the map's.
        assert_eq!(
            checkpoints_text(&c),
            "backup_type = full-backuped\nfrom_lsn = 0\nto_lsn = 44778\nlast_lsn = 46750\n"
        );
    }

    #[test]
    fn binlog_info() {
        assert_eq!(
            parse_binlog_info("binlog.000001\t1177\t0-1-5\n"),
            Some(Binlog {
                file: "binlog.000001".into(),
                position: 1177,
                gtid: "0-1-5".into()
            })
        );
        assert_eq!(
            parse_binlog_info("binlog.000002\t4").map(|b| b.gtid),
            Some(String::new())
        );
        assert_eq!(parse_binlog_info("x\ty"), None);
        assert_eq!(parse_binlog_info(""), None);
    }

    #[test]
    fn copies_write_nothing_outside_themselves() {
        let r = Running {
            datadir: "/m/c1/mariadb".into(),
            socket: "/m/c1/run/mariadbd.sock".into(),
            pid_file: "/m/c1/run/mariadbd.pid".into(),
            log: "/m/c1/mariadbd.log".into(),
            port: 40001,
            user: "mysql".into(),
        };
        let a = copy_args(&r);
        assert_eq!(a[0], "--defaults-file=/m/c1/mariadb/backup-my.cnf");
        for want in [
            "--skip-networking",
            "--skip-slave-start",
            "--skip-log-bin",
            "--tmpdir=/m/c1/run",
            "--socket=/m/c1/run/mariadbd.sock",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} missing from {a:?}");
        }
        // Every path it is given is inside the copy.
        for x in &a {
            if let Some((_, v)) = x.split_once('=') {
                if v.starts_with('/') {
                    assert!(v.starts_with("/m/c1/"), "{x}");
                }
            }
        }
    }
}
