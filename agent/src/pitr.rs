//! Restores to a point in time: the nearest earlier point is cloned and
//! started, and the archived logs (see [`crate::logs`]) are replayed onto
//! it up to the target — PostgreSQL's own archive recovery
//! (`recovery_target_time`/`_lsn`/`_name`), MariaDB's binlogs piped into
//! the started copy ([`crate::maria_pitr`]).
//!
//! Before anything starts, the archive is read: its contiguous range from
//! the chosen point, where a gap is, how far it reaches. A target it
//! cannot reach is refused with the range it can, never replayed past a
//! gap silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdm_api::instant::{parse_rfc3339, pg_utc, rfc3339_us};
use cdm_api::types::{Snapshot, SnapshotCreate};
use serde_json::{json, Value};

use crate::attach::{self, AttachRequest, Attachment};
use crate::error::{Context as _, ErrorKind, Result};
use crate::logs::{self, Status};
use crate::{pg, Ctx};

/// What a point-in-time restore aims at.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Unix microseconds.
    Time(i64),
    Lsn(u64),
    /// A PostgreSQL restore point (`pg_create_restore_point`).
    Name(String),
    /// A MariaDB GTID `domain-server-seq`.
    Gtid(String),
}

impl Target {
    /// From the command line's flags: exactly one.
    pub fn from_flags(
        time: Option<&str>,
        lsn: Option<&str>,
        name: Option<&str>,
        gtid: Option<&str>,
    ) -> Result<Target> {
        let n = [time, lsn, name, gtid]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if n != 1 {
            crate::fail!(
                Invalid,
                "give exactly one of --target-time, --target-lsn, --target-name, --target-gtid"
            );
        }
        if let Some(t) = time {
            return parse_rfc3339(t)
                .map(Target::Time)
                .ok_or_else(|| crate::err!(Invalid, "{t:?} is not an RFC 3339 time with a zone"));
        }
        if let Some(l) = lsn {
            return Ok(Target::Lsn(pg::parse_lsn(l)?));
        }
        if let Some(n) = name {
            if n.is_empty() || n.len() > 63 || n.contains(['\'', '\\', '\n']) {
                crate::fail!(Invalid, "{n:?} is not a restore point name");
            }
            return Ok(Target::Name(n.to_string()));
        }
        let g = gtid.unwrap_or_default();
        parse_gtid(g)
            .ok_or_else(|| crate::err!(Invalid, "{g:?} is not a GTID (domain-server-seq)"))?;
        Ok(Target::Gtid(g.to_string()))
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Time(t) => rfc3339_us(*t),
            Target::Lsn(l) => format!("LSN {}", pg::fmt_lsn(*l)),
            Target::Name(n) => format!("restore point {n:?}"),
            Target::Gtid(g) => format!("GTID {g}"),
        }
    }
}

/// (domain, server, seq) of `D-S-N`.
pub fn parse_gtid(g: &str) -> Option<(u32, u32, u64)> {
    let mut it = g.trim().split('-');
    let d = it.next()?.parse().ok()?;
    let s = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    it.next().is_none().then_some((d, s, n))
}

/// A read of the archive: a snapshot of the log volume (what the archiver
/// had made durable) and a clone of it mounted. Dropped with [`LogView::close`].
pub struct LogView {
    pub dir: PathBuf,
    pub status: Option<Status>,
    a: Attachment,
    child: Option<std::process::Child>,
    volume: String,
    snapshot: u64,
    clone: String,
}

impl LogView {
    pub fn open(ctx: &Ctx, volume: &str, name: &str) -> Result<LogView> {
        let lv = logs::log_volume(volume);
        let snap = ctx
            .api
            .create_snapshot(
                &lv,
                &SnapshotCreate {
                    label: Some(format!("read by restore {name}")),
                    metadata: Some(json!({"kind": "log-read", "restore": name})),
                },
            )
            .map_err(|e| match e {
                cdm_api::client::ClientError::Api { status: 404, .. } => crate::err!(
                    Host,
                    "{volume} has no log archive ({lv}): start `cdm-agent logs` for it first"
                ),
                e => e.into(),
            })?;
        let clone = format!("{name}-logread");
        let undo_snap = |e| {
            let _ = ctx.api.delete_snapshot(&lv, snap.id, false);
            e
        };
        ctx.api
            .create_clone(&lv, snap.id, &clone)
            .map_err(|e| undo_snap(e.into()))?;
        // Writable: mounting replays the ext4 journal of a volume that was
        // mounted when its snapshot was taken.
        let r = attach::attach(
            ctx,
            &AttachRequest {
                name: clone.clone(),
                export: clone.clone(),
                writable: true,
                mount: ctx.state_dir.join("mnt").join(&clone),
                mkfs: None,
            },
        );
        let (mut a, child) = match r {
            Ok(x) => x,
            Err(e) => {
                let _ = ctx.api.delete_clone(&clone, true);
                return Err(undo_snap(e));
            }
        };
        a.clone = Some(clone.clone());
        a.temporary = true;
        let _ = attach::save(ctx, &a);
        let status = logs::read_status(&a.mount);
        Ok(LogView {
            dir: a.mount.clone(),
            status,
            a,
            child,
            volume: lv,
            snapshot: snap.id,
            clone,
        })
    }

    pub fn close(mut self, ctx: &Ctx) -> Result<()> {
        let d = attach::detach(ctx, &self.a, self.child.as_mut());
        let c = ctx.api.delete_clone(&self.clone, true);
        let s = ctx.api.delete_snapshot(&self.volume, self.snapshot, false);
        d?;
        c?;
        s?;
        Ok(())
    }
}

/// The application's points (snapshots a backup made), oldest first.
pub fn points(ctx: &Ctx, volume: &str) -> Result<Vec<Snapshot>> {
    let mut v: Vec<Snapshot> = ctx
        .api
        .list_snapshots(volume)?
        .into_iter()
        .filter(|s| {
            matches!(
                s.metadata.get("kind").and_then(Value::as_str),
                Some("postgres" | "mariadb")
            )
        })
        .collect();
    v.sort_by_key(|s| s.id);
    Ok(v)
}

/// A WAL segment of the archive: its file (complete, or the `.partial`
/// the streamer is filling).
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub tli: u32,
    pub seg: u64,
    pub file: PathBuf,
    pub partial: bool,
}

/// (timeline, segment number) of a WAL file name.
pub fn parse_wal_name(name: &str, seg_size: u64) -> Option<(u32, u64, bool)> {
    let (base, partial) = match name.strip_suffix(".partial") {
        Some(b) => (b, true),
        None => (name, false),
    };
    if base.len() != 24 || !base.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&base[..8], 16).ok()?;
    let hi = u64::from_str_radix(&base[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&base[16..], 16).ok()?;
    let per = 0x1_0000_0000u64 / seg_size;
    (lo < per).then_some((tli, hi * per + lo, partial))
}

/// The archive's segments of timeline `tli`, by number (a complete file
/// wins over a `.partial` of the same segment).
pub fn wal_segments(dir: &Path, tli: u32, seg_size: u64) -> Result<Vec<Segment>> {
    let mut by = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).context_with(ErrorKind::Host, || dir.display().to_string())? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((t, seg, partial)) = parse_wal_name(&name, seg_size) else {
            continue;
        };
        if t != tli {
            continue;
        }
        let s = Segment {
            tli: t,
            seg,
            file: e.path(),
            partial,
        };
        match by.get(&seg) {
            Some(Segment { partial: false, .. }) => {}
            _ => {
                by.insert(seg, s);
            }
        }
    }
    Ok(by.into_values().collect())
}

/// The contiguous run of segments from `first`, and the first segment
/// missing after it when later ones exist (a gap).
pub fn contiguous(segs: &[Segment], first: u64) -> (Vec<Segment>, Option<u64>) {
    let mut run = Vec::new();
    for (want, s) in (first..).zip(segs.iter().filter(|s| s.seg >= first)) {
        if s.seg != want {
            return (run, Some(want));
        }
        run.push(s.clone());
        if s.partial {
            // The streamer's current segment: nothing after it is complete.
            break;
        }
    }
    if run.is_empty() && segs.iter().any(|s| s.seg > first) {
        return (run, Some(first));
    }
    (run, None)
}

/// What `pg_waldump` read over a run of segments.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WalScan {
    /// (LSN, time µs) of the last commit or abort record.
    pub last_commit: Option<(u64, i64)>,
    /// LSN of each restore point named, last wins.
    pub restore_points: Vec<(String, u64)>,
    /// Where valid WAL ends.
    pub end_lsn: Option<u64>,
}

/// Parses `pg_waldump` output (run with TZ=UTC).
pub fn parse_waldump(out: &str, err: &str) -> WalScan {
    let mut s = WalScan::default();
    for l in out.lines() {
        let Some(lsn) = l
            .split(", lsn: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|x| pg::parse_lsn(x).ok())
        else {
            continue;
        };
        let Some(desc) = l.split("desc: ").nth(1) else {
            continue;
        };
        if let Some(rest) = desc
            .strip_prefix("COMMIT ")
            .or_else(|| desc.strip_prefix("ABORT "))
        {
            // "2026-11-30 19:39:57.507918 UTC; ..."
            let t = rest.split(" UTC").next().unwrap_or("");
            if let Some(us) = parse_rfc3339(&format!("{t}Z").replacen(' ', "T", 1)) {
                s.last_commit = Some((lsn, us));
            }
        } else if let Some(n) = desc.strip_prefix("RESTORE_POINT ") {
            s.restore_points.push((n.trim().to_string(), lsn));
        }
        s.end_lsn = Some(lsn);
    }
    // "error in WAL record at 0/2000028: invalid record length at 0/20001C0: ..."
    if let Some(at) = err
        .split("invalid record length at ")
        .nth(1)
        .or_else(|| {
            err.split("invalid magic number")
                .nth(1)
                .and_then(|r| r.split(" offset ").nth(1))
        })
        .and_then(|r| r.split(':').next())
        .and_then(|x| pg::parse_lsn(x).ok())
    {
        s.end_lsn = Some(at);
    }
    s
}

/// `pg_waldump` over `run` (symlinked under their segment names, so the
/// streamer's `.partial` reads as a segment).
fn waldump(bindir: &Path, run: &[Segment], seg_size: u64) -> Result<WalScan> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Ok(WalScan::default());
    };
    let view = tempfile::tempdir()?;
    for s in run {
        std::os::unix::fs::symlink(
            &s.file,
            view.path().join(pg::wal_name(s.tli, s.seg, seg_size)),
        )?;
    }
    let out = Command::new(bindir.join("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(view.path())
        .arg(pg::wal_name(first.tli, first.seg, seg_size))
        .arg(pg::wal_name(last.tli, last.seg, seg_size))
        .output()
        .context_with(ErrorKind::Host, || "running pg_waldump")?;
    Ok(parse_waldump(
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    ))
}

fn meta_str<'a>(s: &'a Snapshot, key: &str) -> Option<&'a str> {
    s.metadata.get(key).and_then(Value::as_str)
}

/// The PostgreSQL plan: which point, what to replay, what PostgreSQL is
/// told.
#[derive(Debug)]
pub struct PgPlan {
    pub point: Snapshot,
    /// `recovery_target_*` lines (none: replay the whole archive).
    pub settings: String,
    pub reaches: String,
    pub segments: usize,
}

/// The earliest time point `p` is certainly consistent by. Snapshot times
/// are whole seconds (rounded down) and a point's consistency comes before
/// its snapshot, so the second after it: a target in the point's own
/// second is restored from the point before (a point consistent after the
/// target cannot be replayed back to it).
pub fn point_done_us(p: &Snapshot) -> i64 {
    (p.created_unix as i64 + 1) * 1_000_000
}

/// The range this archive can restore to from the first point, for
/// refusals.
fn range_text(first: &Snapshot, end: &str) -> String {
    format!(
        "this archive restores to any time from {} (point {}) to {end}",
        rfc3339_us(point_done_us(first)),
        first.id
    )
}

fn point_lsn(s: &Snapshot) -> Result<(u64, u32)> {
    let lsn = meta_str(s, "stop_lsn")
        .ok_or_else(|| crate::err!(Host, "point {} records no stop_lsn", s.id))?;
    let tli = s
        .metadata
        .get("timeline")
        .and_then(Value::as_u64)
        .unwrap_or(1) as u32;
    Ok((pg::parse_lsn(lsn)?, tli))
}

/// Chooses the point and checks the archive reaches `target` from it.
pub fn plan_pg(
    points: &[Snapshot],
    wal: &Path,
    status: Option<&Status>,
    bindir: &Path,
    seg_size: u64,
    target: &Target,
) -> Result<PgPlan> {
    let first = points
        .first()
        .ok_or_else(|| crate::err!(Host, "the application has no point yet"))?;
    let (first_lsn, tli) = point_lsn(first)?;
    let segs = wal_segments(wal, tli, seg_size)?;
    let (all_run, all_gap) = contiguous(&segs, first_lsn / seg_size);
    // A named restore point is found in the archive; the point is the
    // newest one before it.
    let name_lsn = match target {
        Target::Name(n) => {
            let scan = waldump(bindir, &all_run, seg_size)?;
            let lsn = scan
                .restore_points
                .iter()
                .rev()
                .find(|(x, _)| x == n)
                .map(|(_, l)| *l)
                .ok_or_else(|| {
                    let gap = all_gap
                        .map(|g| {
                            format!(
                                " (the archive has a gap at segment {})",
                                pg::wal_name(tli, g, seg_size)
                            )
                        })
                        .unwrap_or_default();
                    crate::err!(Host, "no restore point named {n:?} in the archive{gap}")
                })?;
            Some(lsn)
        }
        _ => None,
    };
    let mut chosen = None;
    for p in points.iter().rev() {
        let (lsn, _) = point_lsn(p)?;
        let ok = match target {
            Target::Time(t) => point_done_us(p) <= *t,
            Target::Lsn(l) => lsn <= *l,
            Target::Name(_) => name_lsn.is_some_and(|n| lsn <= n),
            Target::Gtid(_) => crate::fail!(
                Invalid,
                "a GTID is a MariaDB target: use a time, an LSN or a restore point name"
            ),
        };
        if ok {
            chosen = Some(p.clone());
            break;
        }
    }
    let Some(point) = chosen else {
        crate::fail!(
            Host,
            "{} is before the first point: {}",
            target.describe(),
            range_text(first, "the end of the archive")
        );
    };
    // The chosen point's own timeline (a failover since the first point
    // moved the server to a newer one).
    let (p_lsn, p_tli) = point_lsn(&point)?;
    let (tli, segs) = if p_tli == tli {
        (tli, segs)
    } else {
        (p_tli, wal_segments(wal, p_tli, seg_size)?)
    };
    let (run, gap) = contiguous(&segs, p_lsn / seg_size);
    if run.is_empty() {
        crate::fail!(
            Host,
            "the archive holds no WAL from point {} on (segment {} is missing): only the point itself can be restored",
            point.id,
            pg::wal_name(tli, p_lsn / seg_size, seg_size)
        );
    }
    // The end: the last commit found, or later when the archiver vouches
    // that everything up to its covered time is in (no commit since).
    let tail = &run[run.len().saturating_sub(2)..];
    let mut end = waldump(bindir, tail, seg_size)?;
    if end.last_commit.is_none() && run.len() > 2 {
        end = waldump(bindir, &run, seg_size)?;
    }
    // A complete segment is archived to its end; the streamer's partial
    // one up to its last valid record.
    let last = &run[run.len() - 1];
    let end_lsn = if last.partial {
        end.end_lsn.unwrap_or(0).max(last.seg * seg_size)
    } else {
        (last.seg + 1) * seg_size
    };
    let mut end_us = end
        .last_commit
        .map(|(_, t)| t)
        .unwrap_or((point.created_unix as i64) * 1_000_000);
    let vouched =
        gap.is_none() && status.is_some_and(|s| s.covered_lsn.is_some_and(|l| l <= end_lsn));
    if vouched {
        end_us = end_us.max(status.map(|s| s.covered_us).unwrap_or(0));
    }
    let end_text = format!("{} (LSN {})", rfc3339_us(end_us), pg::fmt_lsn(end_lsn));
    let gap_text = gap
        .map(|g| {
            format!(
                "; WAL segment {} is missing: replay cannot go past it",
                pg::wal_name(tli, g, seg_size)
            )
        })
        .unwrap_or_default();
    let refuse = |what: String| -> Result<PgPlan> {
        crate::fail!(Host, "{what}: {}{gap_text}", range_text(first, &end_text))
    };
    let (settings, reaches) = match target {
        Target::Time(t) if *t > end_us => {
            return refuse(format!(
                "{} is after the last archived WAL",
                target.describe()
            ))
        }
        // Nothing committed between the last commit and the target: the
        // whole archive is the state at the target.
        Target::Time(t) if end.last_commit.is_none_or(|(_, c)| *t >= c) && vouched => {
            (String::new(), format!("the end of the archive, {end_text}"))
        }
        Target::Time(t) => (
            format!("recovery_target_time = '{}'\n", pg_utc(*t)),
            rfc3339_us(*t),
        ),
        Target::Lsn(l) if *l > end_lsn => {
            return refuse(format!(
                "{} is after the last archived WAL",
                target.describe()
            ))
        }
        Target::Lsn(l) => (
            format!("recovery_target_lsn = '{}'\n", pg::fmt_lsn(*l)),
            format!("LSN {}", pg::fmt_lsn(*l)),
        ),
        Target::Name(n) => {
            if name_lsn.is_some_and(|l| l > end_lsn) {
                return refuse(format!("{} is past a gap", target.describe()));
            }
            (format!("recovery_target_name = '{n}'\n"), target.describe())
        }
        Target::Gtid(_) => unreachable_gtid()?,
    };
    Ok(PgPlan {
        point,
        settings,
        reaches,
        segments: run.len(),
    })
}

fn unreachable_gtid() -> Result<(String, String)> {
    crate::fail!(Invalid, "a GTID is a MariaDB target")
}

/// What the copy's postgresql.auto.conf gets for archive recovery: WAL
/// from the mounted archive clone (a `.partial` is the streamer's
/// unfinished segment: zeros after its last record, where replay stops),
/// promotion once the target is reached. Archive recovery refuses to end
/// before a target it was given (PostgreSQL >= 13): a target the archive
/// cannot reach fails the start instead of promoting short of it.
pub fn pg_recovery_settings(wal: &Path, targets: &str) -> String {
    let d = wal.display().to_string().replace('\'', "");
    format!(
        "\n# cdm-agent point-in-time restore\nrestore_command = 'f=%f; d=\"{d}\"; if [ -f \"$d/$f\" ]; then cp \"$d/$f\" \"%p\"; elif [ -f \"$d/$f.partial\" ]; then cp \"$d/$f.partial\" \"%p\"; else exit 1; fi'\n{targets}recovery_target_action = 'promote'\nrecovery_target_inclusive = on\n"
    )
}

/// Settings an earlier archive recovery may have left in the copy's
/// postgresql.auto.conf (a point taken of a restored copy): commented out,
/// so only this restore's target counts.
fn strip_recovery_settings(text: &str) -> String {
    text.lines()
        .map(|l| {
            let k = l.trim_start();
            if k.starts_with("restore_command") || k.starts_with("recovery_target") {
                format!("# (cdm-agent, earlier recovery) {l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect()
}

/// A regular file of the copy (not a symlink the source planted): written
/// in place of whatever is there.
fn write_plain(p: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if !m.file_type().is_file() {
            std::fs::remove_file(p)?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    std::io::Write::write_all(&mut f, bytes)?;
    Ok(())
}

/// Prepares a started-to-be copy for archive recovery from `wal`. Runs as
/// root on files the source host wrote (the copy, the archive): nothing
/// here follows a symlink.
pub fn pg_arm(r: &pg::Running, wal: &Path, targets: &str) -> Result<()> {
    use std::os::unix::fs::lchown;
    let auto = r.pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut text = strip_recovery_settings(&text);
    text.push_str(&pg_recovery_settings(wal, targets));
    write_plain(&auto, text.as_bytes())?;
    lchown(&auto, Some(r.uid), Some(r.gid))?;
    let sig = r.pgdata.join("recovery.signal");
    write_plain(&sig, b"")?;
    lchown(&sig, Some(r.uid), Some(r.gid))?;
    if !std::fs::symlink_metadata(wal)?.file_type().is_dir() {
        crate::fail!(
            Host,
            "{}: the archive's WAL directory is not a directory",
            wal.display()
        );
    }
    // The streamer wrote its files as its own user, mode 0600: the
    // copy's server reads them as the data directory's owner. Regular
    // files only.
    for e in std::fs::read_dir(wal)? {
        let e = e?;
        if e.file_type()?.is_file() {
            lchown(e.path(), Some(r.uid), Some(r.gid))?;
        }
    }
    lchown(wal, Some(r.uid), Some(r.gid))?;
    // The archive clone's root must let the server through; the
    // directories above it are the state directory's, which the copy's
    // own data directory already needs traversable.
    if let Some(root) = wal.parent() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::symlink_metadata(root)?.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode | 0o001))?;
        }
    }
    Ok(())
}

/// Waits until the started copy has promoted (recovery reached its
/// target), or fails with the server's last words when recovery stopped.
pub fn pg_wait_promoted(r: &pg::Running) -> Result<(Duration, Option<String>)> {
    let t = Instant::now();
    let c = pg::Conn {
        host: r.socket_dir.to_string_lossy().into_owned(),
        port: r.port,
        user: pg::owner_name(r.uid).unwrap_or_else(|| "postgres".into()),
        dbname: "postgres".into(),
        password: None,
    };
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        let state = c.connect().and_then(|mut c| {
            Ok(c.query_one("SELECT pg_is_in_recovery()", &[])?
                .get::<_, bool>(0))
        });
        if let Ok(false) = state {
            let last = log
                .lines()
                .rev()
                .find_map(|l| {
                    l.split("last completed transaction was at log time ")
                        .nth(1)
                })
                .map(str::to_string);
            return Ok((t.elapsed(), last));
        }
        let pid = std::fs::read_to_string(r.pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|p| p.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive || Instant::now() > deadline {
            let last: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("FATAL") || l.contains("recovery") || l.contains("LOG"))
                .rev()
                .take(4)
                .collect();
            crate::fail!(
                Host,
                "archive recovery did not finish: {}",
                last.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The WAL segment size of a PostgreSQL point (what its server said).
pub fn seg_size_of(point: &Snapshot) -> u64 {
    point
        .metadata
        .pointer("/database/wal_segment_size")
        .and_then(Value::as_u64)
        .filter(|s| s.is_power_of_two() && (1 << 20..=1 << 30).contains(s))
        .unwrap_or(16 << 20)
}

/// The directory of PostgreSQL's tools for a point's server version.
pub fn pg_bindir_of(point: &Snapshot) -> PathBuf {
    let major = point
        .metadata
        .pointer("/database/version")
        .and_then(Value::as_str)
        .and_then(|v| {
            v.split(['.', ' '])
                .next()
                .and_then(|m| m.parse::<u32>().ok())
        })
        .unwrap_or(15);
    let d = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if d.join("pg_waldump").exists() {
        d
    } else {
        PathBuf::from("/usr/bin")
    }
}

/// Replays the archive onto a started PostgreSQL copy.
struct PgReplay<'a> {
    wal: &'a Path,
    settings: String,
}

impl crate::ops::Recover for PgReplay<'_> {
    fn pg_before_start(&mut self, r: &pg::Running) -> Result<()> {
        pg_arm(r, self.wal, &self.settings)
    }
    fn pg_started(&mut self, r: &pg::Running) -> Result<Value> {
        let (took, last) = pg_wait_promoted(r)?;
        Ok(json!({
            "replay_seconds": took.as_secs_f64(),
            "last_transaction": last,
        }))
    }
}

/// A restore to `target` of the application whose stage volume is
/// `volume`: a clone named `name` of the nearest earlier point, started
/// on `port`, the archived logs replayed onto it.
pub fn restore(
    ctx: &Ctx,
    volume: &str,
    target: &Target,
    name: &str,
    port: u16,
    mount: Option<PathBuf>,
) -> Result<Value> {
    let t0 = Instant::now();
    crate::ops::check_name(volume)?;
    crate::ops::check_name(name)?;
    let points = points(ctx, volume)?;
    let kind = points
        .last()
        .and_then(|p| meta_str(p, "kind"))
        .ok_or_else(|| crate::err!(Host, "{volume} has no database point yet"))?
        .to_string();
    let view = LogView::open(ctx, volume, name)?;
    let r = (|| -> Result<Value> {
        let mut v = match kind.as_str() {
            "postgres" => {
                let pts: Vec<Snapshot> = points
                    .iter()
                    .filter(|p| meta_str(p, "kind") == Some("postgres"))
                    .cloned()
                    .collect();
                let last = pts
                    .last()
                    .ok_or_else(|| crate::err!(Host, "no PostgreSQL point"))?;
                let wal = view.dir.join(logs::WAL_DIR);
                let seg_size = seg_size_of(last);
                let plan = plan_pg(
                    &pts,
                    &wal,
                    view.status.as_ref(),
                    &pg_bindir_of(last),
                    seg_size,
                    target,
                )?;
                let snapshot = format!("{}@{}", plan.point.volume, plan.point.id);
                let mut rep = PgReplay {
                    wal: &wal,
                    settings: plan.settings.clone(),
                };
                let mut v =
                    crate::ops::restore_clone_with(ctx, &snapshot, name, port, mount, &mut rep)?;
                v["point"] = json!(plan.point.id);
                v["reaches"] = json!(plan.reaches);
                v["wal_segments"] = json!(plan.segments);
                v
            }
            "mariadb" => {
                crate::maria_pitr::restore(ctx, &points, &view, target, name, port, mount)?
            }
            k => crate::fail!(Host, "points of kind {k:?} have no logs to replay"),
        };
        v["target"] = json!(target.describe());
        v["seconds"] = json!(t0.elapsed().as_secs_f64());
        Ok(v)
    })();
    // The archive is read by now (PostgreSQL promoted, MariaDB's binlogs
    // applied): its clone goes whatever happened.
    let closed = view.close(ctx);
    let v = r?;
    if let Err(e) = closed {
        tracing::warn!("the archive's read clone was not removed: {e}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_and_gaps() {
        let seg = 16u64 << 20;
        assert_eq!(
            parse_wal_name("000000010000000000000002", seg),
            Some((1, 2, false))
        );
        assert_eq!(
            parse_wal_name("0000000100000001000000FF.partial", seg),
            Some((1, 511, true))
        );
        assert_eq!(parse_wal_name("000000010000000000000100", seg), None);
        assert_eq!(parse_wal_name("00000001.history", seg), None);
        let s = |n: u64, partial: bool| Segment {
            tli: 1,
            seg: n,
            file: PathBuf::from(format!("{n}")),
            partial,
        };
        let segs = vec![s(3, false), s(4, false), s(6, false), s(7, true)];
        let (run, gap) = contiguous(&segs, 3);
        assert_eq!(run.len(), 2);
        assert_eq!(gap, Some(5));
        let (run, gap) = contiguous(&segs, 6);
        assert_eq!((run.len(), gap), (2, None));
        let (run, gap) = contiguous(&segs, 2);
        assert_eq!((run.len(), gap), (0, Some(2)));
        let (run, gap) = contiguous(&segs, 9);
        assert_eq!((run.len(), gap), (0, None));
    }

    #[test]
    fn waldump_output_is_read() {
        let out = "rmgr: Transaction len (rec/tot):     66/    66, tx:        722, lsn: 0/015004B0, prev 0/01500438, desc: COMMIT 2026-11-30 19:39:57.507918 UTC; inval msgs: catcache 21; sync\n\
rmgr: XLOG        len (rec/tot):     98/    98, tx:        724, lsn: 0/015165D8, prev 0/01516598, desc: RESTORE_POINT rp1\n\
rmgr: Heap        len (rec/tot):     54/    54, tx:        725, lsn: 0/01516640, prev 0/015165D8, desc: INSERT off 2 flags 0x00\n";
        let err = "pg_waldump: error: error in WAL record at 0/1516640: invalid record length at 0/1516678: wanted 24, got 0";
        let s = parse_waldump(out, err);
        assert_eq!(
            s.last_commit,
            Some((
                0x015004B0,
                parse_rfc3339("2026-11-30T19:39:57.507918Z").unwrap()
            ))
        );
        assert_eq!(s.restore_points, vec![("rp1".to_string(), 0x015165D8)]);
        assert_eq!(s.end_lsn, Some(0x1516678));
    }

    #[test]
    fn targets_from_flags() {
        assert!(Target::from_flags(None, None, None, None).is_err());
        assert!(Target::from_flags(Some("2026-11-30T00:00:00Z"), Some("0/1"), None, None).is_err());
        assert_eq!(
            Target::from_flags(None, Some("0/1A"), None, None).unwrap(),
            Target::Lsn(0x1a)
        );
        assert!(Target::from_flags(Some("yesterday"), None, None, None).is_err());
        assert!(Target::from_flags(None, None, Some("a'b"), None).is_err());
        assert!(Target::from_flags(None, None, None, Some("0-1")).is_err());
        assert_eq!(parse_gtid("0-1-42"), Some((0, 1, 42)));
    }
}
