//! MariaDB point-in-time restores: the newest point before the target is
//! cloned and started, and the archived binlogs (see
//! [`crate::maria_logs`]) from the point's binlog position on are piped
//! through `mariadb-binlog` into the started copy.
//!
//! A point ends exactly at its recorded binlog file and position (read
//! under `BACKUP STAGE BLOCK_COMMIT`): every transaction before it is in
//! the copy, none after. Replaying the binlog from that position applies
//! the transactions that followed, in commit order.
//!
//! Where replay ends is decided here, not by `mariadb-binlog`'s own stop
//! options: the archive's event headers are walked (cheap: one seek per
//! event) and the replay is cut at a transaction boundary, given to
//! `mariadb-binlog` as the byte offset `--stop-position` in the last file.
//! So a stream that ends mid-event (the streamer's current file, read
//! from a snapshot while it was written) is never read past its last
//! whole transaction, a gap or a damaged file is never replayed past, and
//! the result names the exact GTID the copy was brought to.
//!
//! The rule for a time target: binlog events carry whole seconds (the
//! start of the statement that wrote them; a transaction's GTID event is
//! stamped with its COMMIT). Replay stops at the first transaction stamped
//! at or after the target's second — `mariadb-binlog --stop-datetime`'s
//! rule with the target truncated to the second. So a restore never holds
//! a transaction committed after the target; transactions committed in
//! the target's own second before it are left out too.
//!
//! A GTID target `D-S-N` includes that transaction: replay stops after the
//! transaction of domain D with sequence number N.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use cdm_api::instant::rfc3339_us;
use cdm_api::types::Snapshot;
use serde_json::{json, Value};

use crate::error::{Context as _, ErrorKind, Result};
use crate::logs::{self, Status};
use crate::maria;
use crate::pitr::{parse_gtid, LogView, Target};
use crate::Ctx;

/// (base, number) of a binlog file name such as `binlog.000042`.
pub fn parse_binlog_name(name: &str) -> Option<(&str, u64)> {
    let (base, num) = name.rsplit_once('.')?;
    if base.is_empty() || num.len() < 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, num.parse().ok()?))
}

pub fn binlog_name(base: &str, n: u64) -> String {
    format!("{base}.{n:06}")
}

/// The archive's binlog files named `base.NNNNNN`, by number.
pub fn archive_files(dir: &Path, base: &str) -> Result<BTreeMap<u64, PathBuf>> {
    let mut by = BTreeMap::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(by),
        Err(e) => {
            return Err(e).context_with(ErrorKind::Host, || dir.display().to_string());
        }
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((b, n)) = parse_binlog_name(&name) {
            if b == base && e.file_type()?.is_file() {
                by.insert(n, e.path());
            }
        }
    }
    Ok(by)
}

/// The run of files numbered contiguously from `first`, and the first
/// number missing when a later file exists (a gap).
pub fn contiguous(
    files: &BTreeMap<u64, PathBuf>,
    first: u64,
) -> (Vec<(u64, PathBuf)>, Option<u64>) {
    let mut run = Vec::new();
    for (want, (n, p)) in (first..).zip(files.range(first..)) {
        if *n != want {
            return (run, Some(want));
        }
        run.push((*n, p.clone()));
    }
    (run, None)
}

const HEADER: usize = 19;
const QUERY_EVENT: u8 = 2;
const XID_EVENT: u8 = 16;
const STOP_EVENT: u8 = 3;
const ROTATE_EVENT: u8 = 4;
const XA_PREPARE_EVENT: u8 = 38;
const GTID_EVENT: u8 = 162;
/// The GTID event's flag of a transaction that is one statement (DDL):
/// the next Query event ends it.
const FL_STANDALONE: u8 = 1;

/// A whole transaction of a binlog file.
#[derive(Clone, Debug, PartialEq)]
pub struct Trx {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
    /// Unix seconds: its GTID event's stamp (the COMMIT's start).
    pub stamp: u32,
    /// Offset of its GTID event.
    pub start: u64,
    /// Offset just past its last event.
    pub end: u64,
}

impl Trx {
    pub fn gtid(&self) -> String {
        format!("{}-{}-{}", self.domain, self.server, self.seq)
    }
}

/// How a walked file ends.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileEnd {
    pub size: u64,
    /// Just past the last whole event.
    pub valid_end: u64,
    /// Why the walk stopped before `size` (an event cut short, garbage).
    pub error: Option<String>,
    /// The type of the last whole event.
    pub last_kind: Option<u8>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether a Query event's statement ends the transaction it is in
/// (`COMMIT`, or `ROLLBACK` of one that touched non-transactional tables).
fn query_ends_trx(body: &[u8]) -> bool {
    // Post-header: thread id 4, exec time 4, db length 1, error code 2,
    // status variables length 2; then the variables, the db and a NUL.
    if body.len() < 13 {
        return false;
    }
    let db_len = body[8] as usize;
    let vars = u16::from_le_bytes([body[11], body[12]]) as usize;
    let q = 13 + vars + db_len + 1;
    let Some(text) = body.get(q..) else {
        return false;
    };
    let head: Vec<u8> = text.iter().take(8).map(u8::to_ascii_uppercase).collect();
    head.starts_with(b"COMMIT") || head.starts_with(b"ROLLBACK")
}

/// Walks the event headers of binlog `path`, calling `each` on every
/// whole transaction starting at or after `from` until it returns false.
pub fn walk(path: &Path, from: u64, mut each: impl FnMut(&Trx) -> bool) -> Result<FileEnd> {
    let f = File::open(path).context_with(ErrorKind::Host, || path.display().to_string())?;
    let size = f.metadata()?.len();
    let mut r = BufReader::with_capacity(256 << 10, f);
    let mut magic = [0u8; 4];
    let mut end = FileEnd {
        size,
        valid_end: 0,
        error: None,
        last_kind: None,
    };
    if r.read_exact(&mut magic).is_err() || magic != [0xfe, b'b', b'i', b'n'] {
        end.error = Some("not a binlog file (no magic number)".into());
        return Ok(end);
    }
    let mut off = 4u64;
    end.valid_end = off;
    // (GTID event, its transaction is one statement)
    let mut pending: Option<(Trx, bool)> = None;
    let mut h = [0u8; HEADER];
    while off < size {
        if size - off < HEADER as u64 {
            end.error = Some(format!("an event is cut short at offset {off}"));
            break;
        }
        r.read_exact(&mut h)?;
        let stamp = u32_at(&h, 0);
        let kind = h[4];
        let server = u32_at(&h, 5);
        let len = u32_at(&h, 9) as u64;
        let log_pos = u32_at(&h, 13) as u64;
        if len < HEADER as u64 || off + len > size {
            end.error = Some(if len < HEADER as u64 {
                format!("no valid event at offset {off}")
            } else {
                format!("an event is cut short at offset {off}")
            });
            break;
        }
        // The header records where the event ends (files under 4 GiB).
        if log_pos != 0 && off + len <= u32::MAX as u64 && log_pos != off + len {
            end.error = Some(format!(
                "the event at offset {off} says it ends at {log_pos}"
            ));
            break;
        }
        let body_len = (len as usize) - HEADER;
        // Only the starts of GTID and Query events are read.
        let want = match kind {
            GTID_EVENT => body_len.min(13),
            QUERY_EVENT if pending.is_some() => body_len.min(13 + 65535 + 256 + 9),
            _ => 0,
        };
        let mut body = vec![0u8; want];
        r.read_exact(&mut body)?;
        r.seek_relative((body_len - want) as i64)?;
        let next = off + len;
        let mut done = false;
        match kind {
            GTID_EVENT if body.len() >= 13 => {
                let seq = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
                let t = Trx {
                    domain: u32_at(&body, 8),
                    server,
                    seq,
                    stamp,
                    start: off,
                    end: next,
                };
                pending = Some((t, body[12] & FL_STANDALONE != 0));
            }
            XID_EVENT | XA_PREPARE_EVENT => done = pending.is_some(),
            QUERY_EVENT => {
                done = matches!(&pending, Some((_, standalone)) if *standalone || query_ends_trx(&body));
            }
            _ => {}
        }
        if done {
            if let Some((mut t, _)) = pending.take() {
                t.end = next;
                if t.start >= from && !each(&t) {
                    end.valid_end = next;
                    return Ok(end);
                }
            }
        }
        off = next;
        end.valid_end = off;
        end.last_kind = Some(kind);
    }
    Ok(end)
}

/// Where a MariaDB point's copy ends in the binlog.
#[derive(Clone, Debug)]
struct PointPos {
    base: String,
    num: u64,
    pos: u64,
    /// Its GTID position, per domain: (server, seq).
    gtid: BTreeMap<u32, (u32, u64)>,
}

fn point_pos(p: &Snapshot) -> Option<PointPos> {
    let b = p.metadata.get("binlog")?;
    let file = b.get("file")?.as_str()?;
    let (base, num) = parse_binlog_name(file)?;
    let mut gtid = BTreeMap::new();
    for g in b
        .get("gtid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .split(',')
    {
        if let Some((d, s, n)) = parse_gtid(g) {
            gtid.insert(d, (s, n));
        }
    }
    Some(PointPos {
        base: base.to_string(),
        num,
        pos: b.get("position")?.as_u64()?,
        gtid,
    })
}

/// What to replay onto which point.
#[derive(Debug)]
pub struct MariaPlan {
    pub point: Snapshot,
    /// The binlog files piped, the first read from `start`, the last up
    /// to `stop` (none: nothing to replay).
    pub files: Vec<PathBuf>,
    pub start: u64,
    pub stop: u64,
    pub transactions: u64,
    /// The GTID of the last transaction replayed (or the point's).
    pub applied_to: String,
    /// The binlog stamp of the last transaction replayed (whole seconds).
    pub last_transaction: Option<String>,
    pub reaches: String,
}

/// Where a walk from a point ends.
#[derive(Default)]
struct Walked {
    /// (index in the run, offset): where the target stops replay.
    stop_at: Option<(usize, u64)>,
    /// The last transaction before the stop, and its file's index.
    last: Option<(usize, Trx)>,
    /// Per domain: the last transaction's sequence number.
    last_seq: BTreeMap<u32, u64>,
    transactions: u64,
    /// A file of the run (not its last) that ends in garbage, and why.
    damaged: Option<(u64, String)>,
    /// How the run's last file ends.
    tail: FileEnd,
}

/// Where the walk stops.
#[derive(Clone, Copy)]
enum Stop {
    /// The first transaction stamped at or after this Unix second.
    Second(i64),
    /// Just after the transaction (domain, seq).
    Gtid(u32, u64),
    /// The end of the run.
    End,
}

fn walk_run(run: &[(u64, PathBuf)], from: u64, stop: Stop) -> Result<Walked> {
    let mut w = Walked::default();
    for (i, (n, path)) in run.iter().enumerate() {
        let start = if i == 0 { from } else { 4 };
        let mut stop_at = None;
        let fe = walk(path, start, |t| {
            match stop {
                Stop::Second(s) if t.stamp as i64 >= s => {
                    stop_at = Some(t.start);
                    return false;
                }
                Stop::Gtid(d, n) if t.domain == d && t.seq > n => {
                    stop_at = Some(t.start);
                    return false;
                }
                _ => {}
            }
            w.transactions += 1;
            w.last_seq.insert(t.domain, t.seq);
            w.last = Some((i, t.clone()));
            if let Stop::Gtid(d, n) = stop {
                if t.domain == d && t.seq == n {
                    stop_at = Some(t.end);
                    return false;
                }
            }
            true
        })?;
        if let Some(o) = stop_at {
            w.stop_at = Some((i, o));
            w.tail = fe;
            return Ok(w);
        }
        if i + 1 < run.len() {
            // A file the server finished ends with its rotation (or its
            // stop, before a restart's new file). Anything else lost its
            // end: purged on the server before the archiver had it all,
            // so the next file does not follow on from it.
            let why = fe.error.clone().or_else(|| {
                (!matches!(fe.last_kind, Some(ROTATE_EVENT | STOP_EVENT))).then(|| {
                    "it ends without the server's rotation to the next file (its end was never archived)".to_string()
                })
            });
            if let Some(why) = why {
                w.damaged = Some((*n, why));
                w.tail = fe;
                return Ok(w);
            }
        }
        w.tail = fe;
    }
    Ok(w)
}

fn point_time(p: &Snapshot) -> String {
    rfc3339_us(crate::pitr::point_done_us(p))
}

/// The plan for `target` from the archive in `dir` (binlog files) and its
/// status.
pub fn plan(
    points: &[Snapshot],
    dir: &Path,
    status: Option<&Status>,
    target: &Target,
) -> Result<MariaPlan> {
    let pts: Vec<(&Snapshot, PointPos)> = points
        .iter()
        .filter_map(|p| point_pos(p).map(|pp| (p, pp)))
        .collect();
    let Some((first, _)) = pts.first() else {
        crate::fail!(
            Host,
            "no MariaDB point of this application records a binlog position (was log_bin on when they were taken?)"
        );
    };
    let chosen = match target {
        Target::Time(t) => pts
            .iter()
            .rev()
            .find(|(p, _)| crate::pitr::point_done_us(p) <= *t),
        Target::Gtid(g) => {
            let (d, _, n) = parse_gtid(g)
                .ok_or_else(|| crate::err!(Invalid, "{g:?} is not a GTID (domain-server-seq)"))?;
            pts.iter()
                .rev()
                .find(|(_, pp)| pp.gtid.get(&d).is_none_or(|(_, s)| *s <= n))
        }
        Target::Lsn(_) | Target::Name(_) => crate::fail!(
            Invalid,
            "{} is a PostgreSQL target: give a MariaDB point a time or a GTID",
            target.describe()
        ),
    };
    let Some((point, pp)) = chosen else {
        let (_, fpp) = &pts[0];
        let at = match target {
            Target::Gtid(_) => format!(" (point {} is at GTID {})", first.id, fmt_gtids(&fpp.gtid)),
            _ => String::new(),
        };
        let end = archive_end(first, fpp, dir, status)?;
        crate::fail!(
            Host,
            "{} is before the first point{at}: {}",
            target.describe(),
            end.range(first)
        );
    };
    let files = archive_files(dir, &pp.base)?;
    let (run, gap) = contiguous(&files, pp.num);
    if run.is_empty() {
        crate::fail!(
            Host,
            "the archive holds no binlog from point {} on ({} is missing): only the point itself ({}) can be restored",
            point.id,
            binlog_name(&pp.base, pp.num),
            point_time(point)
        );
    }
    let stop = match target {
        Target::Time(t) => Stop::Second(t.div_euclid(1_000_000)),
        Target::Gtid(g) => {
            let (d, _, n) = parse_gtid(g).unwrap_or_default();
            if pp.gtid.get(&d).is_some_and(|(_, s)| *s == n) {
                // The point is at the target: nothing to replay.
                return Ok(MariaPlan {
                    point: (*point).clone(),
                    files: Vec::new(),
                    start: pp.pos,
                    stop: pp.pos,
                    transactions: 0,
                    applied_to: fmt_gtids(&pp.gtid),
                    last_transaction: None,
                    reaches: target.describe(),
                });
            }
            Stop::Gtid(d, n)
        }
        _ => Stop::End,
    };
    let w = walk_run(&run, pp.pos, stop)?;
    let end = End::of(point, pp, &run, gap, &w, status);
    let (stop_file, stop_off, reaches) = match (w.stop_at, target) {
        (Some((i, o)), _) => (i, o, target.describe()),
        (None, Target::Time(t)) if *t <= end.us => {
            let (i, o) = w
                .last
                .as_ref()
                .map(|(i, t)| (*i, t.end))
                .unwrap_or((0, pp.pos));
            (i, o, format!("the end of the archive, {}", end.text()))
        }
        (None, Target::Time(_)) => crate::fail!(
            Host,
            "{} is after the end of the archive: {}{}",
            target.describe(),
            end.range(first),
            end.gap_text()
        ),
        (None, _) => {
            let (d, _, _) = match target {
                Target::Gtid(g) => parse_gtid(g).unwrap_or_default(),
                _ => (0, 0, 0),
            };
            let reached = w
                .last_seq
                .get(&d)
                .or(pp.gtid.get(&d).map(|(_, s)| s))
                .map(|s| format!("sequence number {s}"))
                .unwrap_or_else(|| "no transaction".into());
            crate::fail!(
                Host,
                "{} is not in the archive (it holds domain {d} up to {reached}): {}{}",
                target.describe(),
                end.range(first),
                end.gap_text()
            )
        }
    };
    let files: Vec<PathBuf> = run[..=stop_file].iter().map(|(_, p)| p.clone()).collect();
    let applied_to = match &w.last {
        Some((_, t)) => t.gtid(),
        None => fmt_gtids(&pp.gtid),
    };
    let nothing = stop_file == 0 && stop_off <= pp.pos;
    Ok(MariaPlan {
        point: (*point).clone(),
        files: if nothing { Vec::new() } else { files },
        start: pp.pos,
        stop: stop_off,
        transactions: w.transactions,
        applied_to,
        last_transaction: w
            .last
            .as_ref()
            .map(|(_, t)| rfc3339_us(t.stamp as i64 * 1_000_000)),
        reaches,
    })
}

fn fmt_gtids(g: &BTreeMap<u32, (u32, u64)>) -> String {
    g.iter()
        .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// How far the archive reaches from a point.
struct End {
    us: i64,
    last_gtid: Option<String>,
    /// What stops replay short of the archive's last file.
    gap: Option<String>,
}

impl End {
    fn of(
        point: &Snapshot,
        pp: &PointPos,
        run: &[(u64, PathBuf)],
        gap: Option<u64>,
        w: &Walked,
        status: Option<&Status>,
    ) -> End {
        let mut us = w
            .last
            .as_ref()
            .map(|(_, t)| t.stamp as i64 * 1_000_000)
            .unwrap_or(point.created_unix as i64 * 1_000_000);
        let gap_text = match (&w.damaged, gap) {
            (Some((n, why)), _) => Some(format!(
                "{} is damaged ({why}): replay cannot go past it",
                binlog_name(&pp.base, *n)
            )),
            (None, Some(n)) => Some(format!(
                "{} is missing: replay cannot go past it",
                binlog_name(&pp.base, n)
            )),
            _ => None,
        };
        // The archiver vouches that everything the server wrote up to its
        // covered time is in, when that position is in this run.
        let last_num = run.last().map(|(n, _)| *n).unwrap_or(pp.num);
        let vouched = gap_text.is_none()
            && status.is_some_and(|s| {
                s.covered_binlog.as_ref().is_some_and(|(f, pos)| {
                    parse_binlog_name(f).is_some_and(|(b, n)| {
                        b == pp.base
                            && (n < last_num || (n == last_num && *pos <= w.tail.valid_end))
                    })
                })
            });
        if vouched {
            us = us.max(status.map(|s| s.covered_us).unwrap_or(0));
        }
        End {
            us,
            last_gtid: w.last.as_ref().map(|(_, t)| t.gtid()),
            gap: gap_text,
        }
    }

    fn text(&self) -> String {
        match &self.last_gtid {
            Some(g) => format!("{} (last GTID {g})", rfc3339_us(self.us)),
            None => rfc3339_us(self.us),
        }
    }

    fn range(&self, first: &Snapshot) -> String {
        format!(
            "this archive restores to any time from {} (point {}) to {}",
            point_time(first),
            first.id,
            self.text()
        )
    }

    fn gap_text(&self) -> String {
        self.gap
            .as_ref()
            .map(|g| format!("; {g}"))
            .unwrap_or_default()
    }
}

/// How far the archive reaches from the first point (for a refusal).
fn archive_end(
    first: &Snapshot,
    fpp: &PointPos,
    dir: &Path,
    status: Option<&Status>,
) -> Result<End> {
    let files = archive_files(dir, &fpp.base)?;
    let (run, gap) = contiguous(&files, fpp.num);
    let w = walk_run(&run, fpp.pos, Stop::End)?;
    let mut e = End::of(first, fpp, &run, gap, &w, status);
    if run.is_empty() {
        e.gap = Some(format!(
            "{} is missing: replay cannot go past it",
            binlog_name(&fpp.base, fpp.num)
        ));
    }
    Ok(e)
}

/// Runs `mariadb-binlog` over the plan's files into the copy's `mariadb`
/// client as its root (unix_socket, as the agent runs as root): the
/// replay. Its time.
fn replay(r: &maria::Running, plan: &MariaPlan) -> Result<f64> {
    let t = Instant::now();
    if plan.files.is_empty() {
        return Ok(0.0);
    }
    let root = maria::Conn {
        socket: r.socket.clone(),
        user: "root".into(),
        password: None,
    };
    // A commit need not reach the disk during the replay (a replay cut
    // short is redone from the point, never resumed): one log flush at
    // the end instead of one per transaction, several times faster.
    let flush = root
        .query("SELECT @@global.innodb_flush_log_at_trx_commit")?
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.parse::<u8>().ok())
        .unwrap_or(1);
    root.query("SET GLOBAL innodb_flush_log_at_trx_commit = 2")?;
    let r = pipe(r, plan);
    // FLUSH LOGS writes and syncs InnoDB's log: the replayed transactions
    // are durable before the restore is reported done.
    let back = root.query(&format!(
        "SET GLOBAL innodb_flush_log_at_trx_commit = {flush}; FLUSH LOGS"
    ));
    // The replay's own error first: it says why the copy stopped answering.
    r?;
    back?;
    Ok(t.elapsed().as_secs_f64())
}

/// `mariadb-binlog | mariadb` over the plan's files.
fn pipe(r: &maria::Running, plan: &MariaPlan) -> Result<()> {
    let binlog_err = tempfile::tempfile()?;
    let client_err = tempfile::tempfile()?;
    let mut dump = Command::new("mariadb-binlog");
    dump.env("TZ", "UTC")
        .arg("--no-defaults")
        .arg(format!("--start-position={}", plan.start))
        .arg(format!("--stop-position={}", plan.stop))
        .args(&plan.files)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(binlog_err.try_clone()?);
    let mut dump = dump.spawn().context_with(ErrorKind::Host, || {
        "running mariadb-binlog (is mariadb-client installed?)"
    })?;
    let out = dump
        .stdout
        .take()
        .ok_or_else(|| crate::err!(Host, "mariadb-binlog has no output"))?;
    let client = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", r.socket.display()))
        .args([
            "--user=root",
            "--binary-mode",
            // A binlog is the source host's bytes: no statement in it may
            // make this client (root here) read a local file.
            "--local-infile=0",
            "--batch",
            "--max-allowed-packet=1G",
        ])
        .stdin(Stdio::from(out))
        .stdout(Stdio::null())
        .stderr(client_err.try_clone()?)
        .status();
    let dumped = dump.wait();
    let read = |mut f: File| {
        let mut s = String::new();
        let _ = f.rewind();
        let _ = f.read_to_string(&mut s);
        s.trim().to_string()
    };
    let client = client.context_with(ErrorKind::Host, || "running the mariadb client")?;
    let dumped = dumped?;
    if !dumped.success() {
        crate::fail!(
            Host,
            "mariadb-binlog failed reading the archive ({dumped}): {}",
            read(binlog_err)
        );
    }
    if !client.success() {
        crate::fail!(
            Host,
            "replaying the binlogs into the copy failed ({client}): {}",
            read(client_err)
        );
    }
    Ok(())
}

/// Replays the plan onto the started copy.
struct Replay<'a> {
    plan: &'a MariaPlan,
}

impl crate::ops::Recover for Replay<'_> {
    fn maria_started(&mut self, r: &maria::Running) -> Result<Value> {
        let secs = replay(r, self.plan)?;
        Ok(json!({
            "replay_seconds": secs,
            "transactions": self.plan.transactions,
            "applied_to": self.plan.applied_to,
            "last_transaction": self.plan.last_transaction,
        }))
    }
}

/// The server identity the archive and a point must share (the server
/// id: the part of the archiver's identity string before '@').
fn same_server(status: Option<&Status>, point: &Snapshot) -> Result<()> {
    let Some(s) = status.filter(|s| !s.server.is_empty()) else {
        return Ok(());
    };
    let archived = s.server.split('@').next().unwrap_or("");
    let pid = point
        .metadata
        .pointer("/database/server_id")
        .and_then(Value::as_u64)
        .map(|i| i.to_string());
    if let Some(p) = pid {
        if archived != p {
            crate::fail!(
                Host,
                "the archive holds the binlogs of MariaDB server_id {archived}, point {} is of server_id {p}",
                point.id
            );
        }
    }
    Ok(())
}

/// A restore to `target` from MariaDB `points` (oldest first) and the
/// archive read through `view`: a clone named `name` of the newest point
/// before it, started on `port`, the binlogs replayed onto it.
pub fn restore(
    ctx: &Ctx,
    points: &[Snapshot],
    view: &LogView,
    target: &Target,
    name: &str,
    port: u16,
    mount: Option<PathBuf>,
) -> Result<Value> {
    let pts: Vec<Snapshot> = points
        .iter()
        .filter(|p| p.metadata.get("kind").and_then(Value::as_str) == Some("mariadb"))
        .cloned()
        .collect();
    let dir = view.dir.join(logs::BINLOG_DIR);
    let plan = plan(&pts, &dir, view.status.as_ref(), target)?;
    same_server(view.status.as_ref(), &plan.point)?;
    let snapshot = format!("{}@{}", plan.point.volume, plan.point.id);
    let mut rep = Replay { plan: &plan };
    let mut v = crate::ops::restore_clone_with(ctx, &snapshot, name, port, mount, &mut rep)?;
    v["point"] = json!(plan.point.id);
    v["reaches"] = json!(plan.reaches);
    v["applied_to"] = json!(plan.applied_to);
    v["binlog_files"] = json!(plan.files.len());
    v["transactions"] = json!(plan.transactions);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_names_and_gaps() {
        assert_eq!(parse_binlog_name("binlog.000042"), Some(("binlog", 42)));
        assert_eq!(
            parse_binlog_name("my.bin.1234567"),
            Some(("my.bin", 1234567))
        );
        assert_eq!(parse_binlog_name("binlog.index"), None);
        assert_eq!(parse_binlog_name("binlog.42"), None);
        assert_eq!(binlog_name("binlog", 7), "binlog.000007");
        let files: BTreeMap<u64, PathBuf> = [3, 4, 6, 7]
            .iter()
            .map(|n| (*n, PathBuf::from(n.to_string())))
            .collect();
        let (run, gap) = contiguous(&files, 3);
        assert_eq!((run.len(), gap), (2, Some(5)));
        let (run, gap) = contiguous(&files, 6);
        assert_eq!((run.len(), gap), (2, None));
        let (run, gap) = contiguous(&files, 2);
        assert_eq!((run.len(), gap), (0, Some(2)));
    }

    /// One event: header (stamp, type, server 1, length, end) and body.
    fn event(out: &mut Vec<u8>, stamp: u32, kind: u8, body: &[u8]) {
        let len = (HEADER + body.len() + 4) as u32;
        let end = out.len() as u32 + len;
        out.extend(stamp.to_le_bytes());
        out.push(kind);
        out.extend(1u32.to_le_bytes());
        out.extend(len.to_le_bytes());
        out.extend(end.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(body);
        out.extend([0xaa; 4]); // checksum
    }

    fn gtid_body(seq: u64, flags: u8) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend(0u32.to_le_bytes());
        b.push(flags);
        b
    }

    fn query_body(q: &str) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b.push(4); // db length
        b.extend([0, 0]);
        b.extend(2u16.to_le_bytes());
        b.extend([9, 9]); // status variables
        b.extend(b"bank\0");
        b.extend(q.as_bytes());
        b
    }

    #[test]
    fn transactions_are_found_whole() {
        let mut f = vec![0xfe, b'b', b'i', b'n'];
        event(&mut f, 100, 15, &[0; 40]); // format description
        event(&mut f, 100, GTID_EVENT, &gtid_body(1, FL_STANDALONE));
        event(
            &mut f,
            100,
            QUERY_EVENT,
            &query_body("CREATE TABLE t (x INT)"),
        );
        let t2 = f.len() as u64;
        event(&mut f, 101, GTID_EVENT, &gtid_body(2, 0));
        event(&mut f, 101, QUERY_EVENT, &query_body("BEGIN"));
        event(&mut f, 101, 30, &[0; 20]); // rows
        event(&mut f, 101, XID_EVENT, &[0; 8]);
        let t3 = f.len() as u64;
        event(&mut f, 102, GTID_EVENT, &gtid_body(3, 0));
        event(&mut f, 102, QUERY_EVENT, &query_body("BEGIN"));
        event(
            &mut f,
            102,
            QUERY_EVENT,
            &query_body("INSERT INTO m VALUES (1)"),
        );
        event(&mut f, 102, QUERY_EVENT, &query_body("COMMIT"));
        let whole = f.len() as u64;
        event(&mut f, 103, GTID_EVENT, &gtid_body(4, 0));
        event(&mut f, 103, 30, &[0; 20]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("binlog.000001");
        // The streamer's file, cut in the middle of an event.
        std::fs::write(&p, &f[..f.len() - 7]).unwrap();
        let mut seen = Vec::new();
        let end = walk(&p, 0, |t| {
            seen.push((t.seq, t.stamp, t.start));
            true
        })
        .unwrap();
        assert_eq!(seen, vec![(1, 100, seen[0].2), (2, 101, t2), (3, 102, t3)]);
        assert!(
            end.error.as_deref().unwrap().contains("cut short"),
            "{end:?}"
        );
        // Transaction 4 began but did not end: the whole events end after it.
        assert!(end.valid_end > whole && end.valid_end < end.size);
        // From a position: the transactions starting there on.
        let mut from = Vec::new();
        walk(&p, t3, |t| {
            from.push(t.gtid());
            true
        })
        .unwrap();
        assert_eq!(from, vec!["0-1-3"]);
        // Zeros after the last event (a file extended, not yet written).
        let mut z = f[..whole as usize].to_vec();
        z.extend([0u8; 64]);
        std::fs::write(&p, &z).unwrap();
        let end = walk(&p, 0, |_| true).unwrap();
        assert_eq!(end.valid_end, whole);
        assert!(end.error.is_some());
        std::fs::write(&p, b"junk").unwrap();
        assert!(walk(&p, 0, |_| true).unwrap().error.is_some());
    }

    fn point(id: u64, created: u64, file: &str, pos: u64, gtid: &str) -> Snapshot {
        let mut s: Snapshot = serde_json::from_value(json!({
            "id": id, "volume": "m", "label": "", "created_unix": created,
            "metadata": null, "size": 0, "block_size": 4096, "allocated_bytes": 0,
            "unique_bytes": 0, "export": format!("m@{id}"), "clones": [],
        }))
        .unwrap_or_else(|e| panic!("snapshot: {e}"));
        s.metadata =
            json!({"kind": "mariadb", "binlog": {"file": file, "position": pos, "gtid": gtid}});
        s
    }

    #[test]
    fn plans_stop_at_transaction_boundaries() {
        let d = tempfile::tempdir().unwrap();
        let mut f = vec![0xfe, b'b', b'i', b'n'];
        event(&mut f, 90, 15, &[0; 40]);
        let p1 = f.len() as u64;
        let mut starts = Vec::new();
        for (i, stamp) in [100u32, 101, 101, 103].iter().enumerate() {
            starts.push(f.len() as u64);
            event(&mut f, *stamp, GTID_EVENT, &gtid_body(10 + i as u64, 0));
            event(&mut f, *stamp, XID_EVENT, &[0; 8]);
        }
        let end = f.len() as u64;
        std::fs::write(d.path().join("binlog.000001"), &f).unwrap();
        let pts = vec![point(1, 99, "binlog.000001", p1, "0-1-9")];
        let s = |t: i64| Target::Time(t * 1_000_000 + 500_000);
        // Stamped before the target's second: 100 only.
        let p = plan(&pts, d.path(), None, &s(101)).unwrap();
        assert_eq!((p.start, p.stop, p.transactions), (p1, starts[1], 1));
        assert_eq!(p.applied_to, "0-1-10");
        assert_eq!(
            p.last_transaction.as_deref(),
            Some("1970-01-01T00:01:40.000000Z")
        );
        let p = plan(&pts, d.path(), None, &s(102)).unwrap();
        assert_eq!((p.stop, p.applied_to.as_str()), (starts[3], "0-1-12"));
        let p = plan(&pts, d.path(), None, &Target::Gtid("0-1-11".into())).unwrap();
        assert_eq!((p.stop, p.transactions), (starts[2], 2));
        let p = plan(&pts, d.path(), None, &Target::Gtid("0-1-9".into())).unwrap();
        assert!(p.files.is_empty());
        // Past the last transaction: refused, unless the archiver vouches.
        let e = plan(&pts, d.path(), None, &s(104)).unwrap_err().to_string();
        assert!(e.contains("after the end of the archive"), "{e}");
        let st = Status {
            covered_us: 200_000_000,
            covered_binlog: Some(("binlog.000001".into(), end)),
            ..Status::default()
        };
        let p = plan(&pts, d.path(), Some(&st), &s(150)).unwrap();
        assert_eq!((p.stop, p.transactions), (end, 4));
        let e = plan(&pts, d.path(), None, &Target::Gtid("0-1-20".into())).unwrap_err();
        assert!(e.to_string().contains("up to sequence number 13"), "{e}");
        let e = plan(&pts, d.path(), None, &s(50)).unwrap_err().to_string();
        assert!(e.contains("before the first point"), "{e}");
        // A gap after the point's file.
        std::fs::write(d.path().join("binlog.000003"), &f).unwrap();
        let e = plan(&pts, d.path(), Some(&st), &s(150))
            .unwrap_err()
            .to_string();
        assert!(e.contains("binlog.000002 is missing"), "{e}");
        assert!(plan(&pts, d.path(), Some(&st), &s(102)).is_ok());
    }

    #[test]
    fn a_file_that_lost_its_end_is_a_gap() {
        let d = tempfile::tempdir().unwrap();
        let file = |stamps: &[u32], seq0: u64, rotate: bool| {
            let mut f = vec![0xfe, b'b', b'i', b'n'];
            event(&mut f, 90, 15, &[0; 40]);
            for (i, stamp) in stamps.iter().enumerate() {
                event(&mut f, *stamp, GTID_EVENT, &gtid_body(seq0 + i as u64, 0));
                event(&mut f, *stamp, XID_EVENT, &[0; 8]);
            }
            if rotate {
                event(&mut f, 0, ROTATE_EVENT, &[0; 20]);
            }
            f
        };
        // File 1 was cut after its first transaction (purged before the
        // archiver had the rest): file 2 does not follow on from it.
        let f1 = file(&[100, 101], 10, false);
        let p1 = 4 + 19 + 40 + 4;
        std::fs::write(d.path().join("binlog.000001"), &f1).unwrap();
        std::fs::write(d.path().join("binlog.000002"), file(&[110, 111], 20, true)).unwrap();
        let pts = vec![point(1, 99, "binlog.000001", p1, "0-1-9")];
        let t = |s: i64| Target::Time(s * 1_000_000);
        let e = plan(&pts, d.path(), None, &t(111)).unwrap_err().to_string();
        assert!(e.contains("binlog.000001"), "{e}");
        // Up to its end, still fine.
        assert!(plan(&pts, d.path(), None, &t(101)).is_ok());
        // Ended by its rotation: the next file follows on.
        std::fs::write(d.path().join("binlog.000001"), file(&[100, 101], 10, true)).unwrap();
        assert!(plan(&pts, d.path(), None, &t(111)).is_ok());
    }
}
