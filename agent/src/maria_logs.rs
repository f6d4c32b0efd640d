//! MariaDB binlog archiving: `mariadb-binlog --read-from-remote-server
//! --raw --stop-never` copies the server's binlog files byte for byte, as
//! a replica receives them, into the log volume's `binlog/` directory.
//!
//! The server keeps no slot for us: what it purges before the streamer
//! fetched it is lost (the restore planner then sees a gap and says so).
//! The streamer starts at the last file the archive holds, fetched again
//! from its start (`--raw` writes each file from its beginning), or on a
//! new archive at the oldest binlog the server still has. When it exits
//! (the server restarted) it is started again the same way.
//!
//! Coverage: every second the server's clock and its current binlog
//! file and position (`SHOW MASTER STATUS`, read after the clock, so the
//! position is at least where the server was at that time) are sampled;
//! once the archive's files reach that position and the log volume was
//! synced (`syncfs`), the sample's time is written to `status.json` as
//! covered: everything the server wrote up to then is in the archive.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::Result;
use crate::logs::{self, Coverage, BINLOG_DIR};
use crate::maria::{self, Conn};
use crate::maria_pitr::{archive_files, binlog_name, parse_binlog_name};
use crate::Ctx;

/// The server's binlog files (`SHOW BINARY LOGS`), oldest first.
fn binary_logs(c: &Conn) -> Result<Vec<String>> {
    let rows = c.query("SHOW BINARY LOGS").map_err(|e| {
        crate::err!(
            Host,
            "{e} (the archiver's user needs the BINLOG MONITOR privilege, or REPLICATION CLIENT)"
        )
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next())
        .filter(|f| parse_binlog_name(f).is_some())
        .collect())
}

/// Server time (µs), its current binlog file and position.
fn sample(c: &Conn) -> Result<(i64, String, u64)> {
    let rows = c.query(
        "SET time_zone = '+00:00'; \
         SELECT CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED); \
         SHOW MASTER STATUS",
    )?;
    let us = rows
        .first()
        .and_then(|r| r.first())
        .and_then(|x| x.parse::<i64>().ok());
    let pos = rows
        .get(1)
        .filter(|r| r.len() >= 2)
        .and_then(|r| Some((r[0].clone(), r[1].parse::<u64>().ok()?)));
    match (us, pos) {
        (Some(us), Some((f, p))) => Ok((us, f, p)),
        _ => crate::fail!(
            Host,
            "SHOW MASTER STATUS answered {rows:?} (is the binlog on, and may the user read it?)"
        ),
    }
}

/// The file the streamer starts at: the last one the archive holds
/// (fetched again whole), or the server's oldest on a new archive.
fn first_file(dir: &Path, server: &[String]) -> Result<String> {
    let Some((base, _)) = server.first().and_then(|f| parse_binlog_name(f)) else {
        crate::fail!(Host, "the server lists no binary logs");
    };
    let newest = server
        .iter()
        .filter_map(|f| parse_binlog_name(f))
        .map(|(_, n)| n)
        .max()
        .unwrap_or(0);
    let held = archive_files(dir, base)?;
    let Some((&last, _)) = held.iter().next_back() else {
        return Ok(server[0].clone());
    };
    if newest < last {
        crate::fail!(
            Host,
            "the server's newest binlog is {} but the archive already holds {} (RESET MASTER?): \
             archive this server into a new log volume",
            binlog_name(base, newest),
            binlog_name(base, last)
        );
    }
    let on_server: Vec<u64> = server
        .iter()
        .filter_map(|f| parse_binlog_name(f))
        .map(|(_, n)| n)
        .collect();
    if on_server.contains(&last) {
        return Ok(binlog_name(base, last));
    }
    // Purged before it was fetched whole: what follows is archived, the
    // planner reports the gap.
    let next = on_server
        .iter()
        .copied()
        .filter(|n| *n > last)
        .min()
        .unwrap_or(newest);
    tracing::warn!(
        "{} is no longer on the server: the archive continues at {} with a gap",
        binlog_name(base, last),
        binlog_name(base, next)
    );
    Ok(binlog_name(base, next))
}

/// The archive's newest file (number, bytes), made durable.
fn durable(mount: &Path, dir: &Path, base: &str) -> Result<(u64, u64)> {
    let held = archive_files(dir, base)?;
    let at = match held.iter().next_back() {
        Some((n, p)) => (*n, std::fs::metadata(p)?.len()),
        None => (0, 0),
    };
    // What was on the files before the sync is on the appliance after it.
    crate::merge::syncfs(mount)?;
    Ok(at)
}

/// How often binlogs no kept point needs are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// The number of the binlog file the oldest MariaDB point's replay starts
/// in; `None` when there is no such point (everything is kept).
fn oldest_needed(ctx: &Ctx, volume: &str, base: &str) -> Result<Option<u64>> {
    let points = crate::pitr::points(ctx, volume)?;
    Ok(points
        .iter()
        .filter(|p| p.metadata.get("kind").and_then(Value::as_str) == Some("mariadb"))
        .filter_map(|p| p.metadata.pointer("/binlog/file").and_then(Value::as_str))
        .filter_map(parse_binlog_name)
        .filter(|(b, _)| *b == base)
        .map(|(_, n)| n)
        .min())
}

/// Binlog retention follows the points': files before the one the oldest
/// point's replay starts in are removed (the point holds what they did),
/// never the archive's newest (the streamer resumes from it). The number
/// removed.
pub fn prune_binlogs(dir: &Path, base: &str, keep_from: u64) -> Result<usize> {
    let held = archive_files(dir, base)?;
    let newest = held.keys().next_back().copied().unwrap_or(0);
    let mut n = 0;
    for (num, p) in held.range(..keep_from.min(newest)) {
        std::fs::remove_file(p)?;
        tracing::debug!(file = %binlog_name(base, *num), "binlog no point needs removed");
        n += 1;
    }
    if n > 0 {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(n)
}

/// A replica server id of the streamer, stable per archive and far from
/// the small ids servers are given.
fn streamer_id(volume: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in volume.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    4_000_000_000 + h % 200_000_000
}

/// Streams the server's binlogs into the log volume of `volume` until
/// `stop`.
pub fn archive(ctx: &Ctx, volume: &str, conn: &Conn, stop: &AtomicBool) -> Result<Value> {
    // The server first: wrong credentials, a server that is down or has
    // no binlog are said before anything is made on the appliance.
    let si = maria::info(conn)?;
    if !si.log_bin {
        crate::fail!(
            Host,
            "the MariaDB server at {} has no binary log (@@log_bin is off): start it with log_bin \
             (and binlog_format=ROW) to archive its changes",
            conn.socket.display()
        );
    }
    let server_logs = binary_logs(conn)?;
    let Some(base) = server_logs
        .first()
        .and_then(|f| parse_binlog_name(f))
        .map(|(b, _)| b.to_string())
    else {
        crate::fail!(Host, "the server lists no binary logs");
    };
    sample(conn)?;
    let identity = format!("{}@{}", si.server_id, si.datadir.display());
    let (m, _lock) = logs::open_log_volume(ctx, volume)?;
    let mount = m.a.mount.clone();
    let dir = mount.join(BINLOG_DIR);
    let r = (|| -> Result<Value> {
        std::fs::create_dir_all(&dir)?;
        let mut status = logs::read_status(&mount).unwrap_or_default();
        if !status.server.is_empty() && status.server != identity {
            crate::fail!(
                Host,
                "the archive of {volume} holds the binlogs of MariaDB {}, not of this server ({identity})",
                status.server
            );
        }
        status.server = identity.clone();
        let logf = ctx
            .state_dir
            .join(format!("{}.mariadb-binlog.log", logs::log_volume(volume)));
        let mut cov = Coverage::new();
        let mut restarts = 0u64;
        let mut server_logs = server_logs;
        let mut pruned = 0usize;
        let mut last_prune: Option<std::time::Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            let first = first_file(&dir, &server_logs)?;
            let secret = conn.secret()?;
            let mut cmd = conn.command("mariadb-binlog", &secret);
            cmd.args(["--read-from-remote-server", "--raw", "--stop-never"])
                .arg(format!(
                    "--stop-never-slave-server-id={}",
                    streamer_id(volume)
                ))
                .arg(format!("--result-file={}/", dir.display()))
                .arg(&first);
            let mut child = logs::spawn_logged(&mut cmd, &logf)?;
            tracing::info!(volume, first, "streaming binlogs");
            let mut progressed = false;
            loop {
                if logs::nap(stop, Duration::from_secs(1)) {
                    break;
                }
                if let Ok(Some(st)) = child.try_wait() {
                    if !progressed && restarts == 0 && !st.success() {
                        crate::fail!(
                            Host,
                            "mariadb-binlog could not stream from the server ({st}): {} \
                             (the user needs the REPLICATION SLAVE privilege)",
                            logs::tail(&logf)
                        );
                    }
                    tracing::warn!("mariadb-binlog exited ({st}): {}", logs::tail(&logf));
                    break;
                }
                let (us, file, pos) = match sample(conn) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("{e}");
                        continue;
                    }
                };
                let Some((b, n)) = parse_binlog_name(&file) else {
                    continue;
                };
                if b != base {
                    tracing::warn!("the server's binlog is now {file}, not {base}.*: not archived");
                    continue;
                }
                if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                    last_prune = Some(std::time::Instant::now());
                    match oldest_needed(ctx, volume, &base)
                        .and_then(|k| k.map(|k| prune_binlogs(&dir, &base, k)).transpose())
                    {
                        Ok(Some(k)) if k > 0 => {
                            pruned += k;
                            tracing::info!(volume, removed = k, "binlogs no point needs removed");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("pruning the archive of {volume}: {e}"),
                    }
                }
                cov.sample(us, (n, pos));
                let d = durable(&mount, &dir, &base)?;
                progressed = true;
                if let Some((t, (n, p))) = cov.covered(&d) {
                    status.covered_us = t;
                    status.covered_binlog = Some((binlog_name(&base, n), p));
                    logs::write_status(&mount, &status)?;
                }
            }
            logs::end_child(&mut child);
            if stop.load(Ordering::SeqCst) {
                break;
            }
            restarts += 1;
            if logs::nap(stop, Duration::from_secs(2)) {
                break;
            }
            match binary_logs(conn) {
                Ok(l) if !l.is_empty() => server_logs = l,
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(json!({
            "archive": logs::log_volume(volume),
            "server": identity,
            "covered": cdm_api::instant::rfc3339_us(status.covered_us),
            "covered_binlog": status.covered_binlog,
            "files": archive_files(&dir, &base)?.len(),
            "restarts": restarts,
            "files_pruned": pruned,
        }))
    })();
    let closed = m.close(ctx);
    let v = r?;
    closed?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streamer_resumes_at_the_last_file_held() {
        let d = tempfile::tempdir().unwrap();
        let server: Vec<String> = (3..=6).map(|n| binlog_name("binlog", n)).collect();
        assert_eq!(first_file(d.path(), &server).unwrap(), "binlog.000003");
        std::fs::write(d.path().join("binlog.000004"), b"x").unwrap();
        std::fs::write(d.path().join("binlog.000005"), b"x").unwrap();
        assert_eq!(first_file(d.path(), &server).unwrap(), "binlog.000005");
        // Purged before it was fetched whole: the next one.
        let later: Vec<String> = (6..=7).map(|n| binlog_name("binlog", n)).collect();
        assert_eq!(first_file(d.path(), &later).unwrap(), "binlog.000006");
        // Renumbered below the archive: refused.
        let reset = vec![binlog_name("binlog", 1)];
        let e = first_file(d.path(), &reset).unwrap_err().to_string();
        assert!(e.contains("RESET MASTER"), "{e}");
        // Retention: what the oldest point needs on, and the newest file.
        for n in [1, 2, 3, 6] {
            std::fs::write(d.path().join(binlog_name("binlog", n)), b"x").unwrap();
        }
        std::fs::write(d.path().join("status.json"), b"{}").unwrap();
        assert_eq!(prune_binlogs(d.path(), "binlog", 4).unwrap(), 3);
        let left: Vec<u64> = archive_files(d.path(), "binlog")
            .unwrap()
            .into_keys()
            .collect();
        assert_eq!(left, vec![4, 5, 6]);
        assert_eq!(prune_binlogs(d.path(), "binlog", 9).unwrap(), 2);
        assert_eq!(
            archive_files(d.path(), "binlog")
                .unwrap()
                .into_keys()
                .collect::<Vec<_>>(),
            vec![6]
        );
        assert!(d.path().join("status.json").exists());
        assert!(streamer_id("a") > 4_000_000_000 && streamer_id("a") < u32::MAX as u64);
        assert_ne!(streamer_id("a"), streamer_id("b"));
    }
}
