//! PostgreSQL: a consistent online copy with the low-level backup API
//! (`pg_backup_start` / `pg_backup_stop`, non-exclusive, in one session),
//! and a copy made ready to start (regular, instant and clone restores).
//!
//! The copy holds `pgdata/` (the data directory without what the
//! PostgreSQL documentation lists as safe to omit), `pgdata/backup_label`
//! from `pg_backup_stop`, and in `pgdata/pg_wal/` exactly the WAL from the
//! backup's start checkpoint to its end: the first segment's first page
//! plus everything from the start LSN's page, the segments between, and
//! the last segment up to the page holding the stop LSN — the rest of
//! those segments are holes. Started on it, PostgreSQL replays that WAL
//! and stops at its end: the consistent point the backup recorded, no
//! later. A temporary physical replication slot keeps the server from
//! recycling that WAL while the copy runs. Configuration files kept
//! outside the data directory (Debian's `/etc/postgresql`) go to
//! `pgconf/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdm_disk::host::run;
use postgres::{Client, NoTls};
use serde::{Deserialize, Serialize};

use crate::error::{Context as _, ErrorKind, Result};
use crate::merge::{Entry, Meta, Source};

#[derive(Clone, Debug)]
pub struct Conn {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
}

impl Conn {
    pub fn connect(&self) -> Result<Client> {
        let mut c = postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("cdm-agent")
            .connect_timeout(Duration::from_secs(10));
        if let Some(p) = &self.password {
            c.password(p);
        }
        c.connect(NoTls).map_err(|e| {
            let why = match e.as_db_error() {
                Some(d) => format!("{}: {}", d.code().code(), d.message()),
                None => {
                    let mut s = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(x) = src {
                        s = format!("{s}: {x}");
                        src = x.source();
                    }
                    s
                }
            };
            crate::err!(
                Host,
                "cannot connect to PostgreSQL at {}:{} as {}: {why}",
                self.host,
                self.port,
                self.user
            )
        })
    }
}

/// What the server says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub version_num: i32,
    pub system_identifier: String,
    pub data_directory: PathBuf,
    pub config_file: PathBuf,
    pub hba_file: PathBuf,
    pub ident_file: PathBuf,
    pub wal_segment_size: u64,
    pub wal_block_size: u64,
    pub port: u16,
}

fn one(c: &mut Client, q: &str) -> Result<String> {
    let row = c.query_one(q, &[]).context_with(ErrorKind::Host, || q)?;
    row.try_get::<_, String>(0)
        .context_with(ErrorKind::Host, || q)
}

pub fn info(c: &mut Client) -> Result<ServerInfo> {
    let version_num: i32 = one(c, "SELECT current_setting('server_version_num')")?.parse()?;
    if version_num < 150000 {
        crate::fail!(
            Host,
            "PostgreSQL {version_num} is older than 15: pg_backup_start/pg_backup_stop are needed"
        );
    }
    Ok(ServerInfo {
        version: one(c, "SELECT current_setting('server_version')")?,
        version_num,
        system_identifier: one(c, "SELECT system_identifier::text FROM pg_control_system()")?,
        data_directory: one(c, "SELECT current_setting('data_directory')")?.into(),
        config_file: one(c, "SELECT current_setting('config_file')")?.into(),
        hba_file: one(c, "SELECT current_setting('hba_file')")?.into(),
        ident_file: one(c, "SELECT current_setting('ident_file')")?.into(),
        wal_segment_size: one(
            c,
            "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'",
        )?
        .parse()?,
        wal_block_size: one(c, "SELECT current_setting('wal_block_size')")?.parse()?,
        port: one(c, "SELECT current_setting('port')")?.parse()?,
    })
}

/// An LSN "X/Y".
pub fn parse_lsn(s: &str) -> Result<u64> {
    let (a, b) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| crate::err!(Invalid, "{s:?} is not an LSN"))?;
    Ok((u64::from_str_radix(a, 16)? << 32) | u64::from_str_radix(b, 16)?)
}

pub fn fmt_lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

/// The WAL segment file name for segment `seg` on timeline `tli`.
pub fn wal_name(tli: u32, seg: u64, seg_size: u64) -> String {
    let per = 0x1_0000_0000u64 / seg_size;
    format!("{:08X}{:08X}{:08X}", tli, seg / per, seg % per)
}

/// The WAL files a restore needs, each with the byte ranges to keep.
pub fn wal_plan(
    tli: u32,
    start: u64,
    stop: u64,
    seg_size: u64,
    blk: u64,
) -> Vec<(String, Vec<(u64, u64)>)> {
    let first = start / seg_size;
    let last = stop.saturating_sub(1).max(start) / seg_size;
    let mut out = Vec::new();
    for seg in first..=last {
        let base = seg * seg_size;
        let from = if seg == first {
            (start - base) / blk * blk
        } else {
            0
        };
        let to = if seg == last {
            ((stop.max(start + 1) - base).div_ceil(blk) * blk).min(seg_size)
        } else {
            seg_size
        };
        let mut r = Vec::new();
        if from > 0 {
            // The segment's first page: its long header is checked on open.
            r.push((0, blk));
        }
        r.push((from, to));
        out.push((wal_name(tli, seg, seg_size), r));
    }
    out
}

/// Files and directories the PostgreSQL documentation lists as omitted
/// from a base backup (their contents are rebuilt or meaningless).
fn skipped(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let top = rel
        .parent()
        .map(|p| p.as_os_str().is_empty())
        .unwrap_or(true);
    (top && matches!(
        name,
        "postmaster.pid"
            | "postmaster.opts"
            | "backup_label"
            | "tablespace_map"
            | "backup_label.old"
            | "recovery.signal"
            | "standby.signal"
    )) || name == "pg_internal.init"
        || name.starts_with("pgsql_tmp")
}

fn emptied(rel: &Path) -> bool {
    matches!(
        rel.to_str().unwrap_or(""),
        "pg_wal"
            | "pg_replslot"
            | "pg_dynshmem"
            | "pg_notify"
            | "pg_serial"
            | "pg_snapshots"
            | "pg_stat_tmp"
            | "pg_subtrans"
    )
}

/// What the copy cannot hold yet: tablespaces outside the data directory.
pub fn check_layout(pgdata: &Path) -> Result<()> {
    let tblspc = pgdata.join("pg_tblspc");
    if let Ok(rd) = std::fs::read_dir(&tblspc) {
        let names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !names.is_empty() {
            crate::fail!(
                Host,
                "tablespaces outside the data directory are not supported yet (pg_tblspc holds {})",
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// The data directory's entries under `pgdata/` (WAL comes later), and
/// configuration files kept outside it under `pgconf/`.
pub fn entries(si: &ServerInfo, pgdata: &Path) -> Result<Vec<Entry>> {
    check_layout(pgdata)?;
    let mut out = Vec::new();
    let root = std::fs::symlink_metadata(pgdata)
        .context_with(ErrorKind::Io, || pgdata.display().to_string())?;
    out.push(Entry {
        rel: "pgdata".into(),
        source: Source::Dir,
        meta: Meta::of(&root),
    });
    crate::merge::walk(pgdata, Path::new("pgdata"), &skipped, &emptied, &mut out)?;
    // pg_wal may be a symlink (initdb -X): the copy has a directory.
    for e in out.iter_mut() {
        if e.rel == Path::new("pgdata/pg_wal") && !matches!(e.source, Source::Dir) {
            e.source = Source::Dir;
            e.meta.mode = 0o700;
        }
    }
    let wal = std::fs::metadata(pgdata.join("pg_wal"))?;
    out.push(Entry {
        rel: "pgdata/pg_wal/archive_status".into(),
        source: Source::Dir,
        meta: Meta::of(&wal),
    });
    let mut conf = Vec::new();
    for f in [&si.config_file, &si.hba_file, &si.ident_file] {
        if f.starts_with(pgdata) {
            continue;
        }
        if let (Ok(m), Some(n)) = (std::fs::metadata(f), f.file_name()) {
            conf.push(Entry {
                rel: Path::new("pgconf").join(n),
                source: Source::File {
                    path: f.clone(),
                    keep: None,
                },
                meta: Meta::of(&m),
            });
        }
    }
    if !conf.is_empty() {
        out.push(Entry {
            rel: "pgconf".into(),
            source: Source::Dir,
            meta: Meta {
                mode: 0o755,
                ..Meta::of(&root)
            },
        });
        out.extend(conf);
    }
    Ok(out)
}

/// An online backup in progress: `pg_backup_stop` is called by [`stop`]
/// or, if the copy failed, when this is dropped. The session — and with it
/// the temporary replication slot that keeps the WAL — lives until this is
/// dropped, after the WAL has been copied.
pub struct Backup {
    client: Client,
    stopped: bool,
    pub start_lsn: u64,
    pub label: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stopped {
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub backup_label: String,
    pub tablespace_map: String,
    pub wal: Vec<String>,
}

impl Backup {
    pub fn start(mut client: Client, label: &str) -> Result<Backup> {
        let slot = format!("cdm_agent_{}", std::process::id());
        client
            .query_one(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                &[&slot],
            )
            .map_err(|e| {
                crate::err!(
                    Host,
                    "cannot reserve the backup's WAL with a temporary replication slot \
                     (the role needs REPLICATION, max_replication_slots needs room): {e}"
                )
            })?;
        let row = client
            .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
            .context_with(ErrorKind::Host, || "pg_backup_start")?;
        let start_lsn = parse_lsn(&row.get::<_, String>(0))?;
        Ok(Backup {
            client,
            stopped: false,
            start_lsn,
            label: label.to_string(),
        })
    }

    /// Ends the backup; what a restore needs to be consistent.
    pub fn stop(&mut self, si: &ServerInfo) -> Result<Stopped> {
        if self.stopped {
            crate::fail!(Host, "the backup was already stopped");
        }
        // Whatever the answer, never call it twice: a failed stop leaves
        // the session to abort the backup when it closes.
        self.stopped = true;
        let row = self
            .client
            .query_one(
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
                &[],
            )
            .context_with(ErrorKind::Host, || "pg_backup_stop")?;
        let stop = parse_lsn(&row.get::<_, String>(0))?;
        let label: String = row.get(1);
        let spc: Option<String> = row.get(2);
        let tli = label
            .lines()
            .find_map(|l| l.strip_prefix("START TIMELINE:"))
            .and_then(|t| t.trim().parse::<u32>().ok())
            .ok_or_else(|| crate::err!(Host, "backup_label without START TIMELINE"))?;
        let wal = wal_plan(
            tli,
            self.start_lsn,
            stop,
            si.wal_segment_size,
            si.wal_block_size,
        )
        .into_iter()
        .map(|(n, _)| n)
        .collect();
        Ok(Stopped {
            start_lsn: fmt_lsn(self.start_lsn),
            stop_lsn: fmt_lsn(stop),
            timeline: tli,
            backup_label: label,
            tablespace_map: spc.unwrap_or_default(),
            wal,
        })
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            match self
                .client
                .query_one("SELECT lsn::text FROM pg_backup_stop(false)", &[])
            {
                Ok(_) => tracing::info!("backup aborted: pg_backup_stop called"),
                Err(e) => tracing::warn!(error = %e, "pg_backup_stop after a failed copy"),
            }
        }
    }
}

/// The entries written after `pg_backup_stop`: the label, the WAL, the
/// tablespace map.
pub fn final_entries(
    si: &ServerInfo,
    pgdata: &Path,
    s: &Stopped,
    start: u64,
) -> Result<Vec<Entry>> {
    let wal_dir = pgdata.join("pg_wal");
    let dm = std::fs::metadata(pgdata)?;
    let file_meta = Meta {
        mode: 0o600,
        ..Meta::of(&dm)
    };
    let mut out = vec![Entry {
        rel: "pgdata/backup_label".into(),
        source: Source::Data(s.backup_label.clone().into_bytes()),
        meta: file_meta,
    }];
    if !s.tablespace_map.is_empty() {
        out.push(Entry {
            rel: "pgdata/tablespace_map".into(),
            source: Source::Data(s.tablespace_map.clone().into_bytes()),
            meta: file_meta,
        });
    }
    let stop = parse_lsn(&s.stop_lsn)?;
    for (name, keep) in wal_plan(
        s.timeline,
        start,
        stop,
        si.wal_segment_size,
        si.wal_block_size,
    ) {
        let p = wal_dir.join(&name);
        let m = std::fs::metadata(&p)
            .context_with(ErrorKind::Io, || format!("WAL segment {}", p.display()))?;
        out.push(Entry {
            rel: Path::new("pgdata/pg_wal").join(&name),
            source: Source::File {
                path: p,
                keep: Some(keep),
            },
            meta: Meta::of(&m),
        });
    }
    Ok(out)
}

/// A PostgreSQL started by the agent on a restored copy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Running {
    pub pgdata: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    pub log: PathBuf,
    pub bindir: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// `/usr/lib/postgresql/VERSION/bin` for the data directory's PG_VERSION.
pub fn bindir(pgdata: &Path) -> Result<PathBuf> {
    let v = std::fs::read_to_string(pgdata.join("PG_VERSION")).map_err(|e| {
        crate::err!(
            Host,
            "{}: not a PostgreSQL data directory ({e})",
            pgdata.display()
        )
    })?;
    let d = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", v.trim()));
    if d.join("pg_ctl").exists() {
        return Ok(d);
    }
    let which = run(Command::new("sh").args(["-c", "command -v pg_ctl"])).map_err(|_| {
        crate::err!(
            Host,
            "PostgreSQL {} binaries not found ({})",
            v.trim(),
            d.display()
        )
    })?;
    Ok(Path::new(&which)
        .parent()
        .unwrap_or(Path::new("/usr/bin"))
        .to_path_buf())
}

/// Makes the copy at `root` (holding `pgdata/`) ready to start on `port`
/// with its socket in `root/run`: configuration from `pgconf/` when the
/// data directory has none, paths that pointed at the original cluster
/// dropped, archiving off (a copy must never write into the production
/// archive), the port and socket appended to postgresql.auto.conf (the
/// last setting wins).
pub fn prepare(root: &Path, port: u16, cluster: &str) -> Result<Running> {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let pgdata = root.join("pgdata");
    let bindir = bindir(&pgdata)?;
    let m = std::fs::metadata(&pgdata)?;
    let (uid, gid) = (m.uid(), m.gid());
    let conf = pgdata.join("postgresql.conf");
    if !conf.exists() {
        let orig = root.join("pgconf/postgresql.conf");
        let text = std::fs::read_to_string(&orig).map_err(|e| {
            crate::err!(Host, "no postgresql.conf in the copy nor in pgconf/ ({e})")
        })?;
        let cleaned: String = text
            .lines()
            .map(|l| {
                let k = l.trim_start();
                if [
                    "data_directory",
                    "hba_file",
                    "ident_file",
                    "external_pid_file",
                    "include_dir",
                    "include_if_exists",
                    "include ",
                    "include=",
                ]
                .iter()
                .any(|p| k.starts_with(p))
                {
                    format!("# (cdm-agent) {l}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&conf, cleaned)?;
        chown(&conf, Some(uid), Some(gid))?;
        for f in ["pg_hba.conf", "pg_ident.conf"] {
            let dst = pgdata.join(f);
            if !dst.exists() {
                std::fs::copy(root.join("pgconf").join(f), &dst)
                    .context_with(ErrorKind::Io, || format!("pgconf/{f}"))?;
                chown(&dst, Some(uid), Some(gid))?;
            }
        }
    }
    let sock = root.join("run");
    std::fs::create_dir_all(&sock)?;
    chown(&sock, Some(uid), Some(gid))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o755))?;
    let log = root.join("postgresql.log");
    if !log.exists() {
        std::fs::write(&log, b"")?;
    }
    chown(&log, Some(uid), Some(gid))?;
    let auto = pgdata.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    let major = std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(0);
    text.push_str(&copy_settings(major, port, &sock, cluster));
    std::fs::write(&auto, text)?;
    chown(&auto, Some(uid), Some(gid))?;
    let _ = std::fs::remove_file(pgdata.join("postmaster.pid"));
    Ok(Running {
        pgdata,
        port,
        socket_dir: sock,
        log,
        bindir,
        uid,
        gid,
    })
}

/// What a copy's postgresql.auto.conf gets (the last setting wins over
/// both configuration files). Every setting that names a path outside the
/// data directory is pointed inside it or turned off, so a copy never
/// writes where production does: its socket directory, the pid file, the
/// statistics directory (Debian points PostgreSQL <= 14's
/// `stats_temp_directory` at /var/run/postgresql/NN-main.pg_stat_tmp;
/// the setting is gone in 15) and the log (no collector: `pg_ctl -l`
/// writes it beside the copy). recovery_init_sync_method = syncfs: the
/// copy has nothing unsynced, and one syncfs beats opening and fsyncing
/// every file before replay.
fn copy_settings(major: u32, port: u16, sock: &Path, cluster: &str) -> String {
    let mut t = format!(
        "\n# cdm-agent restore\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\narchive_mode = off\ncluster_name = '{}'\nrecovery_init_sync_method = syncfs\nexternal_pid_file = ''\nlogging_collector = off\n",
        sock.display().to_string().replace('\'', ""),
        cluster.replace('\'', "")
    );
    if (1..=14).contains(&major) {
        t.push_str("stats_temp_directory = 'pg_stat_tmp'\n");
    }
    t
}

fn as_owner(r: &Running, prog: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={}", r.uid),
        &format!("--regid={}", r.gid),
        "--init-groups",
    ])
    .arg(prog);
    c
}

/// Starts PostgreSQL and waits until a query answers; the time that took.
pub fn start(r: &Running) -> Result<Duration> {
    start_in(r, false)
}

/// `pg_ctl`, run as the data directory's owner; with `netns`, in a new,
/// empty network namespace (`unshare --net`), which the postmaster and all
/// its children inherit: only its own loopback, brought up so that
/// PostgreSQL <= 14's statistics collector gets its UDP socket (nothing
/// of the host's listens there). Its Unix socket, a file, still answers
/// from the host's namespace.
fn pg_ctl(r: &Running, netns: bool) -> Command {
    let prog = r.bindir.join("pg_ctl");
    if !netns {
        return as_owner(r, &prog);
    }
    let mut c = Command::new("unshare");
    c.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up 2>/dev/null; exec \"$0\" \"$@\"",
        "setpriv",
        &format!("--reuid={}", r.uid),
        &format!("--regid={}", r.gid),
        "--init-groups",
    ])
    .arg(prog);
    c
}

/// [`start`], the server in its own empty network namespace when `netns`:
/// it can connect nowhere (no production server on localhost, no
/// publisher, no primary), whatever its configuration says.
pub fn start_in(r: &Running, netns: bool) -> Result<Duration> {
    let t = Instant::now();
    let fail = |why: String| {
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        let last: Vec<&str> = log.lines().rev().take(5).collect();
        crate::err!(
            Host,
            "PostgreSQL did not start: {why}; log: {}",
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    };
    // pg_ctl -W returns once the postmaster is launched; this loop then
    // waits for the first answered query itself (pg_ctl -w polls only every
    // 100 ms).
    run(pg_ctl(r, netns)
        .arg("-D")
        .arg(&r.pgdata)
        .arg("-l")
        .arg(&r.log)
        .args(["-W", "start"]))
    .map_err(|e| fail(e.to_string()))?;
    let c = Conn {
        host: r.socket_dir.to_string_lossy().into_owned(),
        port: r.port,
        user: owner_name(r.uid).unwrap_or_else(|| "postgres".into()),
        dbname: "postgres".into(),
        password: None,
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match c
            .connect()
            .and_then(|mut c| Ok(c.query_one("SELECT 1", &[])?))
        {
            Ok(_) => return Ok(t.elapsed()),
            Err(e) if Instant::now() > deadline => return Err(fail(format!("{e:#}"))),
            Err(_) => {}
        }
        // A postmaster that exited (bad configuration, failed recovery)
        // removes its pid file or leaves a dead pid in it.
        let pid = std::fs::read_to_string(r.pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|p| p.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && t.elapsed() > Duration::from_secs(3) {
            return Err(fail("the postmaster exited".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stop(r: &Running) -> Result<()> {
    if !r.pgdata.join("postmaster.pid").exists() {
        return Ok(());
    }
    run(as_owner(r, &r.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&r.pgdata)
        .args(["-m", "fast", "-w", "-t", "120", "stop"]))
    .map(|_| ())
    .context_with(ErrorKind::Host, || {
        format!("stopping PostgreSQL on {}", r.pgdata.display())
    })
}

/// The user name of `uid`.
pub fn owner_name(uid: u32) -> Option<String> {
    let pw = std::fs::read_to_string("/etc/passwd").ok()?;
    pw.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_write_nothing_outside_their_data_directory() {
        let sock = Path::new("/srv/cdm/mnt/drill-1-2/run");
        let pg14 = copy_settings(14, 40123, sock, "drill-1-2");
        for want in [
            "port = 40123\n",
            "listen_addresses = ''\n",
            "unix_socket_directories = '/srv/cdm/mnt/drill-1-2/run'\n",
            "archive_mode = off\n",
            "external_pid_file = ''\n",
            "logging_collector = off\n",
            "stats_temp_directory = 'pg_stat_tmp'\n",
        ] {
            assert!(pg14.contains(want), "{want} missing from {pg14}");
        }
        // The setting is gone in 15: writing it would stop the server.
        let pg15 = copy_settings(15, 40123, sock, "drill-1-2");
        assert!(!pg15.contains("stats_temp_directory"), "{pg15}");
        assert!(pg15.contains("logging_collector = off"), "{pg15}");
    }

    #[test]
    fn lsn_and_wal_names() {
        assert_eq!(parse_lsn("0/2000028").unwrap(), 0x2000028);
        assert_eq!(parse_lsn("1A/FF").unwrap(), (0x1a << 32) | 0xff);
        assert!(parse_lsn("nope").is_err());
        assert_eq!(fmt_lsn(0x1_0000_00ff), "1/FF");
        let seg = 16 << 20;
        assert_eq!(wal_name(1, 2, seg), "000000010000000000000002");
        assert_eq!(wal_name(3, 0x1_23, seg), "000000030000000100000023");
    }

    #[test]
    fn wal_plan_keeps_only_what_replay_reads() {
        let seg = 16u64 << 20;
        // One segment: its first page, then from the start page to the
        // page after the stop LSN.
        let p = wal_plan(1, 2 * seg + 0x10028, 2 * seg + 0x20010, seg, 8192);
        assert_eq!(
            p,
            vec![(
                "000000010000000000000002".into(),
                vec![(0, 8192), (0x10000, 0x22000)]
            )]
        );
        // Three segments, stop exactly on a boundary: the last one is whole.
        let p = wal_plan(1, 2 * seg + 0x28, 5 * seg, seg, 8192);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].1, vec![(0, seg)]);
        assert_eq!(p[2], ("000000010000000000000004".into(), vec![(0, seg)]));
    }
}
