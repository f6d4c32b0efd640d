//! `/metrics`: Prometheus text exposition of I/O per export (from the NBD
//! server), pool space and commits, catalog counts, clients, jobs and
//! webhook deliveries, and the control plane (RPO states, jobs, hosts).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::appliance::Appliance;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(a: &Appliance) -> cdmfs::Result<String> {
    let mut o = String::with_capacity(16 << 10);
    let sp = a.pool.space()?;
    let (commits, commit_ns) = a.pool.commit_stats()?;
    let (vols, snaps) = a.pool.catalog()?;

    head(&mut o, "cdm_pool_size_bytes", "gauge", "Pool capacity.");
    let _ = writeln!(o, "cdm_pool_size_bytes {}", sp.total_bytes);
    head(
        &mut o,
        "cdm_pool_used_bytes",
        "gauge",
        "Pool bytes in use (data and metadata).",
    );
    let _ = writeln!(o, "cdm_pool_used_bytes {}", sp.used_bytes);
    head(
        &mut o,
        "cdm_pool_generation",
        "gauge",
        "Commit generation of the newest superblock.",
    );
    let _ = writeln!(o, "cdm_pool_generation {}", sp.generation);
    head(
        &mut o,
        "cdm_pool_commits_total",
        "counter",
        "Commits since the daemon started.",
    );
    let _ = writeln!(o, "cdm_pool_commits_total {commits}");
    head(
        &mut o,
        "cdm_pool_commit_seconds_total",
        "counter",
        "Time spent in commits.",
    );
    let _ = writeln!(
        o,
        "cdm_pool_commit_seconds_total {:.6}",
        commit_ns as f64 / 1e9
    );
    let (records, replayed) = a.pool.log_stats();
    head(
        &mut o,
        "cdm_pool_log_records_total",
        "counter",
        "Intent-log records written since the daemon started (flushes that did not need a commit).",
    );
    let _ = writeln!(o, "cdm_pool_log_records_total {records}");
    head(
        &mut o,
        "cdm_pool_log_replayed_records",
        "gauge",
        "Intent-log records replayed when the pool was opened.",
    );
    let _ = writeln!(o, "cdm_pool_log_replayed_records {replayed}");
    pool_health(&mut o, &a.pool.health()?, sp.freeing_bytes);

    head(&mut o, "cdm_volumes", "gauge", "Volumes by kind.");
    let clones = vols.iter().filter(|v| v.origin.is_some()).count();
    let _ = writeln!(o, "cdm_volumes{{kind=\"stage\"}} {}", vols.len() - clones);
    let _ = writeln!(o, "cdm_volumes{{kind=\"clone\"}} {clones}");
    head(&mut o, "cdm_snapshots", "gauge", "Snapshots per volume.");
    let mut per: BTreeMap<&str, usize> = vols.iter().map(|v| (v.name.as_str(), 0)).collect();
    for s in &snaps {
        if let Some(v) = vols.iter().find(|v| v.id == s.volume_id) {
            *per.entry(v.name.as_str()).or_default() += 1;
        }
    }
    for (v, n) in &per {
        let _ = writeln!(o, "cdm_snapshots{{volume=\"{}\"}} {n}", esc(v));
    }
    volume_fragmentation(&mut o, a, &vols);

    head(
        &mut o,
        "cdm_nbd_clients",
        "gauge",
        "Connected NBD clients per export.",
    );
    let mut clients: BTreeMap<String, usize> = BTreeMap::new();
    for c in a.nbd.clients() {
        *clients.entry(c.export).or_default() += 1;
    }
    for (e, n) in &clients {
        let _ = writeln!(o, "cdm_nbd_clients{{export=\"{}\"}} {n}", esc(e));
    }
    nbd_io(&mut o, a);

    head(
        &mut o,
        "cdm_audit_pending_records",
        "gauge",
        "Audit records kept aside while the state database fails.",
    );
    let _ = writeln!(o, "cdm_audit_pending_records {}", a.audit_pending());
    head(
        &mut o,
        "cdm_audit_lost_total",
        "counter",
        "Audit records stored neither in the state database nor aside, since start.",
    );
    let _ = writeln!(o, "cdm_audit_lost_total {}", a.audit_lost());
    head(
        &mut o,
        "cdm_events_pending_records",
        "gauge",
        "Events kept aside while the state database fails.",
    );
    let _ = writeln!(o, "cdm_events_pending_records {}", a.events.pending());
    head(
        &mut o,
        "cdm_events_lost_total",
        "counter",
        "Events stored neither in the state database nor aside, since start.",
    );
    let _ = writeln!(o, "cdm_events_lost_total {}", a.events.lost());

    head(
        &mut o,
        "cdm_webhook_deliveries",
        "gauge",
        "Webhook deliveries by state (newest 10000).",
    );
    for (state, n) in a.events.delivery_counts() {
        let _ = writeln!(o, "cdm_webhook_deliveries{{state=\"{state}\"}} {n}");
    }
    // The control plane's figures; a failing state database loses only them.
    if let Err(e) = control(&mut o, a) {
        tracing::error!(error = %e.message, "control plane metrics missing");
    }
    if let Some(r) = a.replication.get() {
        if let Err(e) = replication(&mut o, r) {
            tracing::error!(error = %e.message, "replication metrics missing");
        }
    }
    tier(&mut o, &snaps);
    Ok(o)
}

/// The object-store tier: requests, bytes, cache hits (`cdm-tier`'s
/// counters) and points by where their data is.
fn tier(o: &mut String, snaps: &[cdmfs::Brief]) {
    o.push_str(&crate::tier::runtime().metrics.prometheus());
    head(
        o,
        "cdm_tier_points",
        "gauge",
        "Snapshots by where their data is (local, tiered, recalling).",
    );
    let mut n = [0u64; 3];
    for b in snaps {
        let i = match crate::tier::location_of(b.id, b.tiered) {
            "tiered" => 1,
            "recalling" => 2,
            _ => 0,
        };
        n[i] += 1;
    }
    for (loc, k) in ["local", "tiered", "recalling"].iter().zip(n) {
        let _ = writeln!(o, "cdm_tier_points{{location=\"{loc}\"}} {k}");
    }
}

/// Per link: lag (per volume), bytes sent and transfers by result since
/// the daemon started.
fn replication(o: &mut String, r: &crate::replication::Replication) -> cdm_api::ApiResult<()> {
    let links = r.link_recs()?;
    let now = r.clock.now();
    head(
        o,
        "cdm_replication_lag_seconds",
        "gauge",
        "Age of the newest point on the target, per link and volume (after the first transfer).",
    );
    for l in &links {
        for (vol, t) in &l.target_newest {
            let _ = writeln!(
                o,
                "cdm_replication_lag_seconds{{link=\"{}\",volume=\"{}\",peer=\"{}\"}} {}",
                l.id,
                esc(vol),
                esc(&l.peer),
                now.saturating_sub(*t)
            );
        }
    }
    let counters = r.counters_snapshot();
    head(
        o,
        "cdm_replication_bytes_sent_total",
        "counter",
        "Bytes sent on the wire per link since the daemon started.",
    );
    for l in &links {
        let c = counters.get(&l.id).cloned().unwrap_or_default();
        let _ = writeln!(
            o,
            "cdm_replication_bytes_sent_total{{link=\"{}\"}} {}",
            l.id, c.bytes_sent
        );
    }
    head(
        o,
        "cdm_replication_transfers_total",
        "counter",
        "Transfers per link and result since the daemon started.",
    );
    for l in &links {
        let c = counters.get(&l.id).cloned().unwrap_or_default();
        for result in ["ok", "failed", "cancelled"] {
            let n = c.transfers.get(result).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "cdm_replication_transfers_total{{link=\"{}\",result=\"{result}\"}} {n}",
                l.id
            );
        }
    }
    Ok(())
}

/// Runs per MiB of each volume, reusing figures up to `FRAG_TTL` (5
/// minutes, `appliance/defrag.rs`) old: each walks the volume's tree.
fn volume_fragmentation(o: &mut String, a: &Appliance, vols: &[cdmfs::Brief]) {
    head(
        o,
        "cdm_volume_fragmentation_runs_per_mib",
        "gauge",
        "Runs of logically and physically contiguous extents per MiB mapped (about the seeks a sequential read of 1 MiB costs; 1/16 for 16 MiB runs), up to 5 minutes old.",
    );
    for v in vols {
        match a.fragmentation_cached(v.id) {
            Ok(f) => {
                let _ = writeln!(
                    o,
                    "cdm_volume_fragmentation_runs_per_mib{{volume=\"{}\"}} {:.6}",
                    esc(&v.name),
                    f.runs_per_mib()
                );
            }
            // Deleted since the catalog was read, or unreadable: the
            // volume's own requests report that.
            Err(e) => tracing::debug!(volume = %v.name, error = %e, "no fragmentation figure"),
        }
    }
    a.fragmentation_retain(&vols.iter().map(|v| v.id).collect());
}

fn nbd_io(o: &mut String, a: &Appliance) {
    let stats = a.nbd.io_stats();
    head(
        o,
        "cdm_nbd_ops_total",
        "counter",
        "NBD requests per export and operation.",
    );
    for (e, s) in &stats {
        for (op, n) in &s.ops {
            let _ = writeln!(
                o,
                "cdm_nbd_ops_total{{export=\"{}\",op=\"{op}\"}} {n}",
                esc(e)
            );
        }
    }
    head(
        o,
        "cdm_nbd_bytes_total",
        "counter",
        "Bytes per export and data operation.",
    );
    for (e, s) in &stats {
        for (op, n) in &s.bytes {
            let _ = writeln!(
                o,
                "cdm_nbd_bytes_total{{export=\"{}\",op=\"{op}\"}} {n}",
                esc(e)
            );
        }
    }
    head(
        o,
        "cdm_nbd_errors_total",
        "counter",
        "NBD requests answered with an error.",
    );
    for (e, s) in &stats {
        let _ = writeln!(
            o,
            "cdm_nbd_errors_total{{export=\"{}\"}} {}",
            esc(e),
            s.errors
        );
    }
    head(
        o,
        "cdm_nbd_request_duration_seconds",
        "histogram",
        "NBD request latency, from decoded request to reply sent.",
    );
    for (e, s) in &stats {
        let e = esc(e);
        for (class, h) in &s.latency {
            let mut cum = 0u64;
            for (i, c) in h.counts.iter().enumerate() {
                cum += c;
                let le = h
                    .bounds
                    .get(i)
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "+Inf".into());
                let _ = writeln!(
                    o,
                    "cdm_nbd_request_duration_seconds_bucket{{export=\"{e}\",op=\"{class}\",le=\"{le}\"}} {cum}"
                );
            }
            let _ = writeln!(
                o,
                "cdm_nbd_request_duration_seconds_sum{{export=\"{e}\",op=\"{class}\"}} {:.9}",
                h.sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                o,
                "cdm_nbd_request_duration_seconds_count{{export=\"{e}\",op=\"{class}\"}} {}",
                h.count
            );
        }
    }
}

/// What the pool can do now and the device errors behind it.
fn pool_health(o: &mut String, h: &cdmfs::PoolHealth, freeing: u64) {
    use cdmfs::PoolState as P;
    head(
        o,
        "cdm_pool_state",
        "gauge",
        "1 for the pool's current state: ok, full (data writes refused), no_space or io_error (commits fail: reads only).",
    );
    for s in [P::Ok, P::Full, P::NoSpace, P::IoError] {
        let v = u8::from(h.state == s);
        let _ = writeln!(o, "cdm_pool_state{{state=\"{}\"}} {v}", s.as_str());
    }
    head(
        o,
        "cdm_pool_commit_retries_total",
        "counter",
        "Commits tried again after the device refused one.",
    );
    let _ = writeln!(o, "cdm_pool_commit_retries_total {}", h.commit_retries);
    head(
        o,
        "cdm_pool_io_errors_total",
        "counter",
        "Errors the pool's device returned, by operation.",
    );
    for (op, n) in [
        ("read", h.io_errors.read),
        ("write", h.io_errors.write),
        ("sync", h.io_errors.sync),
    ] {
        let _ = writeln!(o, "cdm_pool_io_errors_total{{op=\"{op}\"}} {n}");
    }
    head(
        o,
        "cdm_pool_reserve_bytes",
        "gauge",
        "Space kept for metadata: data writes are refused this far from full.",
    );
    let _ = writeln!(o, "cdm_pool_reserve_bytes {}", h.reserve_bytes);
    head(
        o,
        "cdm_pool_freeing_bytes",
        "gauge",
        "Space freed by deletes, reusable after the next commits.",
    );
    let _ = writeln!(o, "cdm_pool_freeing_bytes {freeing}");
}

/// RPO state and point age per application, jobs by kind and state,
/// hosts online, queued agent jobs.
fn control(o: &mut String, a: &Appliance) -> cdm_api::ApiResult<()> {
    let apps = a.control.applications(None)?;
    let hosts = a.control.hosts()?;
    let jobs = a
        .jobs
        .list_where(10_000, |_| true)
        .map_err(crate::appliance::st)?;
    head(
        o,
        "cdm_application_rpo_state",
        "gauge",
        "1 for each application's RPO state (ok, late, failing, unprotected).",
    );
    for ap in &apps {
        let l = format!(
            "application=\"{}\",host=\"{}\",name=\"{}\"",
            ap.id,
            esc(&ap.host),
            esc(&ap.name)
        );
        for st in ["ok", "late", "failing", "unprotected"] {
            let v = u8::from(ap.rpo.state == st);
            let _ = writeln!(o, "cdm_application_rpo_state{{{l},state=\"{st}\"}} {v}");
        }
    }
    head(
        o,
        "cdm_application_last_point_age_seconds",
        "gauge",
        "Age of each application's newest point (absent without one).",
    );
    for ap in &apps {
        if let Some(age) = ap.rpo.age_seconds {
            let _ = writeln!(
                o,
                "cdm_application_last_point_age_seconds{{application=\"{}\",host=\"{}\",name=\"{}\"}} {age}",
                ap.id,
                esc(&ap.host),
                esc(&ap.name)
            );
        }
    }
    head(
        o,
        "cdm_jobs",
        "gauge",
        "Jobs by kind and state (newest 10000).",
    );
    let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
    for j in &jobs {
        *by.entry((j.kind.clone(), j.state.clone())).or_default() += 1;
    }
    for ((k, s), n) in by {
        let _ = writeln!(
            o,
            "cdm_jobs{{kind=\"{}\",state=\"{}\"}} {n}",
            esc(&k),
            esc(&s)
        );
    }
    head(
        o,
        "cdm_host_online",
        "gauge",
        "1 while an enrolled host's agent is heard from.",
    );
    for h in hosts.iter().filter(|h| h.state != "retired") {
        let _ = writeln!(
            o,
            "cdm_host_online{{host=\"{}\"}} {}",
            esc(&h.name),
            u8::from(h.state == "online")
        );
    }
    let (_, queued) = a.control.queue_counts();
    head(
        o,
        "cdm_jobs_queued",
        "gauge",
        "Agent jobs waiting for their host.",
    );
    let _ = writeln!(o, "cdm_jobs_queued {queued}");
    head(
        o,
        "cdm_agent_polls_waiting",
        "gauge",
        "Agents' long polls waiting for a job.",
    );
    let _ = writeln!(o, "cdm_agent_polls_waiting {}", a.control.polls_waiting());
    drills(o, a)
}

/// The last recovery drill of each application: passed, and its RTO.
fn drills(o: &mut String, a: &Appliance) -> cdm_api::ApiResult<()> {
    let last: BTreeMap<u64, (bool, Option<f64>)> = a.control.last_drills()?.into_iter().collect();
    head(
        o,
        "cdm_drill_last_passed",
        "gauge",
        "1 if the application's last recovery drill passed, 0 if it failed.",
    );
    for (app, (passed, _)) in &last {
        let _ = writeln!(
            o,
            "cdm_drill_last_passed{{application=\"{app}\"}} {}",
            u8::from(*passed)
        );
    }
    head(
        o,
        "cdm_drill_last_rto_seconds",
        "gauge",
        "RTO measured by the application's last recovery drill (absent when it did not start).",
    );
    for (app, (_, rto)) in &last {
        if let Some(r) = rto {
            let _ = writeln!(o, "cdm_drill_last_rto_seconds{{application=\"{app}\"}} {r}");
        }
    }
    Ok(())
}
