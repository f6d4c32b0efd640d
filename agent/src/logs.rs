//! Continuous log archiving to the appliance, the ground of point-in-time
//! recovery: PostgreSQL's WAL streamed by `pg_receivewal` through a
//! physical replication slot (the server keeps every segment the archive
//! has not confirmed, so a stopped archiver loses nothing — it costs the
//! server disk instead), and MariaDB's binlogs streamed raw by
//! `mariadb-binlog --read-from-remote-server --raw --stop-never`.
//!
//! Both write into the application's *log volume* (`VOLUME-log`), a thin
//! cdm volume with ext4 that stays attached while the archiver runs. It is
//! an ordinary volume: encrypted at rest, compressed, replicated like the
//! stage volume. A restore never reads it in place: it snapshots it (the
//! crash-consistent state of what the archiver made durable) and mounts a
//! clone, so an archiver keeps writing while any number of restores read.
//!
//! How far the archive is known to be complete is kept in `status.json`
//! beside the logs: every second the archiver samples the server's clock
//! and its current log position, and once the streamer has made that
//! position durable (PostgreSQL: the slot's flush position; MariaDB: the
//! bytes on disk) the sample's time is *covered*: a restore to any time up
//! to it is a restore of everything the server had written by then, even
//! when no transaction committed since (an idle database).

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Context as _, ErrorKind, Result};
use crate::ops::{self, Mounted};
use crate::{pg, Ctx};

/// The log volume of an application's stage volume.
pub fn log_volume(volume: &str) -> String {
    format!("{volume}-log")
}

/// Log volumes are thin: what they hold is bounded by retention.
pub const LOG_VOLUME_SIZE: u64 = 256 << 30;

/// The archive's directory of WAL files, inside the log volume.
pub const WAL_DIR: &str = "wal";
/// The archive's directory of binlog files, inside the log volume.
pub const BINLOG_DIR: &str = "binlog";
pub const STATUS: &str = "status.json";

/// What `status.json` says: up to when the archive is known complete.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Unix microseconds (the database server's clock) up to which every
    /// log record the server wrote is in the archive.
    pub covered_us: i64,
    /// PostgreSQL: the LSN made durable at `covered_us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_lsn: Option<u64>,
    /// MariaDB: the binlog file and position made durable at `covered_us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covered_binlog: Option<(String, u64)>,
    /// The server's identity, so a restore refuses an archive of another.
    #[serde(default)]
    pub server: String,
}

pub fn read_status(dir: &Path) -> Option<Status> {
    let t = std::fs::read(dir.join(STATUS)).ok()?;
    serde_json::from_slice(&t).ok()
}

/// Written aside, synced, renamed, the directory synced: a power cut
/// leaves the old status or the new one.
pub(crate) fn write_status(dir: &Path, s: &Status) -> Result<()> {
    let tmp = dir.join(".status.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(s).map_err(|e| crate::err!(Io, "status: {e}"))?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATUS))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Samples of (server time, log position) waiting for the streamer to
/// make their position durable.
pub struct Coverage<P> {
    pending: VecDeque<(i64, P)>,
}

impl<P: PartialOrd + Clone> Coverage<P> {
    pub fn new() -> Self {
        Coverage {
            pending: VecDeque::new(),
        }
    }

    pub fn sample(&mut self, at_us: i64, pos: P) {
        self.pending.push_back((at_us, pos));
        // A streamer that is far behind must not grow this without bound.
        while self.pending.len() > 4096 {
            self.pending.pop_front();
        }
    }

    /// The newest sample whose position is durable, and the samples up to
    /// it dropped.
    pub fn covered(&mut self, durable: &P) -> Option<(i64, P)> {
        let mut best = None;
        while let Some((t, p)) = self.pending.front() {
            if p > durable {
                break;
            }
            best = Some((*t, p.clone()));
            self.pending.pop_front();
        }
        best
    }
}

impl<P: PartialOrd + Clone> Default for Coverage<P> {
    fn default() -> Self {
        Self::new()
    }
}

/// Stops the archiver on SIGTERM/SIGINT/SIGHUP.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    cdm_common::signals::block_termination();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        cdm_common::signals::wait_for_termination();
        s.store(true, Ordering::SeqCst);
    });
    stop
}

/// Sleeps `d` unless asked to stop; true when asked.
pub(crate) fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.load(Ordering::SeqCst)
}

/// The log volume, made if missing, mounted for the archiver's lifetime.
pub(crate) fn open_log_volume(ctx: &Ctx, volume: &str) -> Result<(Mounted, std::fs::File)> {
    let lv = log_volume(volume);
    ops::check_name(&lv)?;
    let lock =
        ops::lock(ctx, &lv).context_with(ErrorKind::Host, || format!("the archive of {volume}"))?;
    // As the stage volume is made: the same encryption and reduction.
    let settings = match ctx.api.volume(volume) {
        Ok(v) => ops::VolumeSettings {
            block_size: None,
            dedup: Some(v.dedup),
            compression: Some(v.compression),
            encryption: (!v.encryption.is_empty() && v.encryption != "none")
                .then(|| v.encryption.clone()),
        },
        Err(_) => ops::VolumeSettings::default(),
    };
    let (v, _) = ops::ensure_stage_volume(ctx, &lv, Some(LOG_VOLUME_SIZE), 4096, &settings)?;
    let m = Mounted::open(ctx, &lv, v.allocated_bytes == 0)?;
    Ok((m, lock))
}

pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    cdm_common::signals::clear_mask_on_exec(cmd);
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context_with(ErrorKind::Host, || {
            format!("starting {:?}", cmd.get_program())
        })
}

pub(crate) fn end_child(c: &mut Child) {
    // SIGTERM: both streamers flush what they received and exit.
    // SAFETY: kill on the pid of a child we own and have not reaped.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

pub(crate) fn tail(log: &Path) -> String {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = t.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The PostgreSQL side: the slot, the streamer, the coverage samples.
pub struct PgArchive {
    pub conn: pg::Conn,
    pub slot: String,
    /// How often WAL no point needs any more is removed.
    pub prune_every: Duration,
}

/// The first WAL segment a restore from the oldest point kept still
/// needs (its stop LSN's), and that point's timeline; `None` when there
/// is no point yet (everything is kept).
fn oldest_needed(ctx: &Ctx, volume: &str, seg_size: u64) -> Result<Option<(u32, u64)>> {
    let points = match ctx.api.list_snapshots(volume) {
        Ok(p) => p,
        // No backup made the stage volume yet: nothing to prune against.
        Err(cdm_api::client::ClientError::Api { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut oldest: Option<(u32, u64)> = None;
    for p in points
        .iter()
        .filter(|p| p.metadata.get("kind").and_then(Value::as_str) == Some("postgres"))
    {
        let Some(lsn) = p.metadata.get("stop_lsn").and_then(Value::as_str) else {
            continue;
        };
        let tli = p
            .metadata
            .get("timeline")
            .and_then(Value::as_u64)
            .unwrap_or(1) as u32;
        let seg = pg::parse_lsn(lsn)? / seg_size;
        if oldest.is_none_or(|(_, s)| seg < s) {
            oldest = Some((tli, seg));
        }
    }
    Ok(oldest)
}

/// WAL retention follows the points' retention: complete segments before
/// the one the oldest point's replay starts in are removed (the point's
/// copy holds the WAL up to its stop LSN itself). History files and the
/// streamer's `.partial` stay. The number removed.
pub fn prune_wal(dir: &Path, keep_from: (u32, u64), seg_size: u64) -> Result<usize> {
    let (tli, first) = keep_from;
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((t, seg, partial)) = crate::pitr::parse_wal_name(&name, seg_size) else {
            continue;
        };
        if !partial && t <= tli && seg < first {
            std::fs::remove_file(e.path())?;
            n += 1;
        }
    }
    if n > 0 {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(n)
}

fn pg_conn_args(c: &pg::Conn) -> Vec<String> {
    vec![
        "-h".into(),
        c.host.clone(),
        "-p".into(),
        c.port.to_string(),
        "-U".into(),
        c.user.clone(),
        "-w".into(),
    ]
}

fn pg_cmd(c: &pg::Conn, tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.args(pg_conn_args(c));
    if let Some(p) = &c.password {
        cmd.env("PGPASSWORD", p);
    }
    cmd
}

/// Server time (µs), current LSN, the slot's durable LSN.
fn pg_sample(client: &mut postgres::Client, slot: &str) -> Result<(i64, u64, Option<u64>)> {
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8, \
             pg_current_wal_lsn()::text, \
             (SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .context_with(ErrorKind::Host, || "sampling the server's WAL position")?;
    let us: i64 = row.get(0);
    let cur = pg::parse_lsn(&row.get::<_, String>(1))?;
    let durable = match row.get::<_, Option<String>>(2) {
        Some(s) => Some(pg::parse_lsn(&s)?),
        None => None,
    };
    Ok((us, cur, durable))
}

/// Streams the cluster's WAL into the log volume of `volume` until `stop`.
/// The streamer is restarted when it exits (server restarted, network
/// cut); the slot keeps the server from dropping what it has not sent.
pub fn archive_postgres(
    ctx: &Ctx,
    volume: &str,
    a: &PgArchive,
    stop: &AtomicBool,
) -> Result<Value> {
    // The server first: wrong credentials or a server that is down are
    // said before anything is made on the appliance.
    let mut client = a.conn.connect()?;
    let si = pg::info(&mut client)?;
    if !a
        .slot
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || a.slot.is_empty()
        || a.slot.len() > 63
    {
        crate::fail!(
            Invalid,
            "slot {:?}: lower-case letters, digits and _",
            a.slot
        );
    }
    let (m, _lock) = open_log_volume(ctx, volume)?;
    let dir = m.a.mount.join(WAL_DIR);
    let r = (|| -> Result<Value> {
        std::fs::create_dir_all(&dir)?;
        if let Some(s) = read_status(&m.a.mount) {
            if !s.server.is_empty() && s.server != si.system_identifier {
                crate::fail!(
                    Host,
                    "the archive of {volume} holds the WAL of PostgreSQL system {}, not of this server ({})",
                    s.server,
                    si.system_identifier
                );
            }
        }
        let bindir = pg_bindir(&si);
        let logf = ctx
            .state_dir
            .join(format!("{}.receivewal.log", log_volume(volume)));
        cdm_disk::host::run(
            pg_cmd(&a.conn, &bindir.join("pg_receivewal").to_string_lossy()).args([
                "--create-slot",
                "--if-not-exists",
                "-S",
                &a.slot,
            ]),
        )
        .context_with(ErrorKind::Host, || {
            format!("creating replication slot {}", a.slot)
        })?;
        let mut cov = Coverage::new();
        let mut status = read_status(&m.a.mount).unwrap_or_default();
        status.server = si.system_identifier.clone();
        let mut restarts = 0u64;
        let mut pruned = 0usize;
        let mut last_prune: Option<Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            let mut child = spawn_logged(
                pg_cmd(&a.conn, &bindir.join("pg_receivewal").to_string_lossy())
                    .arg("-D")
                    .arg(&dir)
                    .args(["-S", &a.slot, "--synchronous", "--no-loop", "-s", "1"]),
                &logf,
            )?;
            tracing::info!(volume, slot = a.slot, "streaming WAL");
            loop {
                if nap(stop, Duration::from_secs(1)) {
                    break;
                }
                if let Ok(Some(st)) = child.try_wait() {
                    tracing::warn!("pg_receivewal exited ({st}): {}", tail(&logf));
                    break;
                }
                let sample = match pg_sample(&mut client, &a.slot) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("{e}");
                        client = match a.conn.connect() {
                            Ok(c) => c,
                            Err(_) => continue,
                        };
                        continue;
                    }
                };
                if last_prune.is_none_or(|t| t.elapsed() >= a.prune_every) {
                    last_prune = Some(Instant::now());
                    match oldest_needed(ctx, volume, si.wal_segment_size).and_then(|k| {
                        k.map(|k| prune_wal(&dir, k, si.wal_segment_size))
                            .transpose()
                    }) {
                        Ok(Some(n)) if n > 0 => {
                            pruned += n;
                            tracing::info!(volume, removed = n, "WAL no point needs removed");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("pruning the archive of {volume}: {e}"),
                    }
                }
                let (us, cur, durable) = sample;
                cov.sample(us, cur);
                if let Some((t, lsn)) = durable.and_then(|d| cov.covered(&d)) {
                    status.covered_us = t;
                    status.covered_lsn = Some(lsn);
                    write_status(&m.a.mount, &status)?;
                }
            }
            end_child(&mut child);
            if stop.load(Ordering::SeqCst) {
                break;
            }
            restarts += 1;
            if nap(stop, Duration::from_secs(2)) {
                break;
            }
            if let Ok(c) = a.conn.connect() {
                client = c;
            }
        }
        Ok(json!({
            "archive": log_volume(volume),
            "slot": a.slot,
            "covered": cdm_api::instant::rfc3339_us(status.covered_us),
            "covered_lsn": status.covered_lsn.map(pg::fmt_lsn),
            "restarts": restarts,
            "segments_pruned": pruned,
        }))
    })();
    let closed = m.close(ctx);
    let v = r?;
    closed?;
    Ok(v)
}

/// Streams a MariaDB server's binlogs into the log volume of `volume`
/// until `stop` (see [`crate::maria_logs`]).
pub fn archive_mariadb(
    ctx: &Ctx,
    volume: &str,
    conn: &crate::maria::Conn,
    stop: &AtomicBool,
) -> Result<Value> {
    crate::maria_logs::archive(ctx, volume, conn, stop)
}

/// The server's own tools, matching its major version.
pub(crate) fn pg_bindir(si: &pg::ServerInfo) -> PathBuf {
    let major = si.version_num / 10_000;
    let d = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if d.join("pg_receivewal").exists() {
        d
    } else {
        PathBuf::from("/usr/bin")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_is_the_newest_durable_sample() {
        let mut c = Coverage::new();
        c.sample(10, 100u64);
        c.sample(20, 150);
        c.sample(30, 150);
        c.sample(40, 300);
        assert_eq!(c.covered(&99), None);
        assert_eq!(c.covered(&200), Some((30, 150)));
        assert_eq!(c.covered(&200), None);
        assert_eq!(c.covered(&300), Some((40, 300)));
    }

    #[test]
    fn pruning_keeps_what_the_oldest_point_needs() {
        let d = tempfile::tempdir().unwrap();
        let seg = 16u64 << 20;
        for n in [
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000006.partial",
            "00000002.history",
            "000000020000000000000002",
        ] {
            std::fs::write(d.path().join(n), b"x").unwrap();
        }
        assert_eq!(prune_wal(d.path(), (1, 5), seg).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "000000010000000000000005",
                "000000010000000000000006.partial",
                "00000002.history",
                "000000020000000000000002"
            ]
        );
    }

    #[test]
    fn status_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_status(d.path()), None);
        let s = Status {
            covered_us: 5,
            covered_lsn: Some(7),
            covered_binlog: None,
            server: "x".into(),
        };
        write_status(d.path(), &s).unwrap();
        assert_eq!(read_status(d.path()), Some(s));
    }
}
