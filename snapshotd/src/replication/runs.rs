//! A link's run: a `replicate` job that sends, for each of the link's
//! volumes, every point the target lacks (`send::run`) over mutual TLS to
//! the peer's replication listener, within the link's bandwidth, then
//! stores the transfers, updates the link (lag, error) and says what
//! happened in events and metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cdm_api::control::LogLine;
use cdm_api::replication::Transfer;
use cdm_api::types::Job;
use cdm_api::{ApiError, ApiResult};
use cdm_common::lock::lock;
use serde_json::{json, Value};

use super::http::PeerHttp;
use super::links::{rate_at, LinkRec};
use super::peers::{self, PeerRec};
use super::send::{self, SendRequest, TransferRecord};
use super::service::{Replication, Running};
use super::throttle::Throttle;
use crate::error::Error;
use crate::state::Sync;

/// Lines a job log keeps at its head and its tail.
const LOG_KEEP: u64 = 1000;

/// Per-link counters since the daemon started, for `/metrics`.
#[derive(Default, Clone)]
pub struct Counters {
    pub bytes_sent: u64,
    /// By result (`ok`, `failed`, `cancelled`).
    pub transfers: HashMap<String, u64>,
}

/// Removes a link's run from the running set when its job ends, however.
struct RunGuard<'a>(&'a Replication, u64);

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.runs).remove(&self.1);
    }
}

fn transfer_of(r: &TransferRecord) -> Transfer {
    Transfer {
        id: 0,
        volume: r.volume.clone(),
        snapshot: r.snapshot,
        base: r.base.clone(),
        full: r.full,
        started_unix: r.started_unix,
        seconds: r.seconds,
        bytes_sent: r.bytes_sent,
        bytes_logical: r.bytes_logical,
        blocks_total: r.blocks_total,
        blocks_known: r.blocks_known,
        resumed_from_batch: r.resumed_from_batch,
        raw: r.raw,
        result: r.result.clone(),
        message: r.message.clone(),
    }
}

impl Replication {
    /// The counters of every link now.
    pub fn counters_snapshot(&self) -> HashMap<u64, Counters> {
        lock(&self.counters).clone()
    }

    /// `POST /v1/replication/links/{id}/run`, and every scheduled run:
    /// 409 `busy` while one runs for the link.
    pub fn run_link(&self, id: u64, by: &str) -> ApiResult<Job> {
        let l = self.link_rec(id)?;
        if peers::get(&self.state, &l.peer)
            .map_err(crate::appliance::st)?
            .is_none()
        {
            return Err(ApiError::not_found(format!("peer {} not found", l.peer)));
        }
        let me = self.arc()?;
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let mut runs = lock(&self.runs);
            if runs.contains_key(&id) {
                return Err(ApiError::new(
                    409,
                    "busy",
                    format!("link {id} is running already"),
                ));
            }
            runs.insert(
                id,
                Running {
                    job: None,
                    cancel: cancel.clone(),
                },
            );
        }
        let c2 = cancel.clone();
        let started = self.jobs.start("replicate", by, move |p| {
            let _running = RunGuard(&me, id);
            me.run_body(id, &c2, p)
        });
        match started {
            Ok(j) => {
                if let Some(r) = lock(&self.runs).get_mut(&id) {
                    r.job = Some(j.id);
                }
                Ok(j)
            }
            Err(e) => {
                lock(&self.runs).remove(&id);
                Err(crate::appliance::st(e))
            }
        }
    }

    /// Cancels the run whose job is `job`, if it is a link's; the job ends
    /// `failed` with "cancelled" once the transfer stops (at the next
    /// batch). None if `job` is no running link's.
    pub fn cancel_job(&self, job: u64) -> Option<ApiResult<Job>> {
        let runs = lock(&self.runs);
        let r = runs.values().find(|r| r.job == Some(job))?;
        r.cancel.store(true, Ordering::SeqCst);
        drop(runs);
        Some(
            self.jobs
                .get(job)
                .map_err(crate::appliance::st)
                .and_then(|j| j.ok_or_else(|| ApiError::not_found(format!("job {job} not found")))),
        )
    }

    /// The peer's replication listener over mutual TLS: this appliance's
    /// client certificate, only the peer's pinned CA trusted.
    pub(crate) fn peer_http(&self, p: &PeerRec) -> Result<PeerHttp, Error> {
        let Some(ep) = &p.endpoint else {
            return Err(Error::Failed(format!(
                "peer {} has no replication listener (pair again once it runs with --replication)",
                p.name
            )));
        };
        let cfg = crate::tls::replication_client(&p.ca_pem, &self.client)
            .map_err(|e| Error::Failed(format!("TLS for peer {}: {e}", p.name)))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(600))
            .timeout_write(Duration::from_secs(600))
            .tls_config(cfg)
            .build();
        Ok(PeerHttp::new(agent, format!("https://{ep}")))
    }

    /// The volumes a link replicates now: its volume, or the volumes of
    /// the applications that have its policy (read at each run).
    pub(crate) fn link_volumes(&self, l: &LinkRec) -> ApiResult<Vec<String>> {
        if let Some(v) = &l.volume {
            return Ok(vec![v.clone()]);
        }
        let (Some(p), Some(ctl)) = (&l.policy, self.control.get()) else {
            return Ok(Vec::new());
        };
        let mut v: Vec<String> = ctl
            .applications(None)?
            .into_iter()
            .filter(|a| a.policy.as_deref() == Some(p.as_str()))
            .map(|a| a.volume)
            .filter(|v| self.pool.volume(v).is_ok())
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// The volumes a link's lag is over: those it replicates now (all it
    /// ever sent if they cannot be read, so a late link is not hidden).
    pub(crate) fn lag_volumes(&self, l: &LinkRec) -> Vec<String> {
        self.link_volumes(l)
            .unwrap_or_else(|_| l.target_newest.keys().cloned().collect())
    }

    /// Retention on the target: the link's, else the source volume's (its
    /// protection policy's, else its snapshot policy's).
    fn retention_for(&self, l: &LinkRec, volume: &str) -> (Option<u64>, Option<u64>) {
        if l.keep_last.is_some() || l.keep_days.is_some() {
            return (l.keep_last, l.keep_days);
        }
        let from_app = self
            .control
            .get()
            .and_then(|c| c.retention_by_volume().ok())
            .and_then(|m| m.get(volume).cloned());
        let r = from_app.or_else(|| {
            self.state
                .get::<_, (String, crate::scheduler::SnapshotPolicyRec)>(
                    crate::state::POLICIES,
                    volume,
                )
                .ok()
                .flatten()
                .map(|(_, p)| p.policy.retention)
        });
        match r {
            Some(r) => (r.keep_last.map(u64::from), r.keep_days.map(u64::from)),
            None => (None, None),
        }
    }

    fn job_log(&self, job: u64, line: &str) {
        let l = LogLine {
            time_unix: self.clock.now(),
            line: line.to_string(),
        };
        if let Err(e) = self
            .state
            .append_lines(job, &[l], LOG_KEEP, LOG_KEEP, Sync::Lazy)
        {
            tracing::warn!(job, error = %e, "cannot store a replication job's log line");
        }
    }

    /// The body of a run's job.
    fn run_body(
        &self,
        id: u64,
        cancel: &AtomicBool,
        p: &crate::jobs::Progress,
    ) -> crate::error::Result<Value> {
        let job = p.id();
        let l = self.link_rec(id).map_err(Error::Api)?;
        let peer = peers::get(&self.state, &l.peer)?
            .ok_or_else(|| Error::Failed(format!("peer {} is no longer paired", l.peer)))?;
        let outcome = self.peer_http(&peer).and_then(|http| {
            let vols = self.link_volumes(&l).map_err(Error::Api)?;
            Ok(self.send_all(&l, &peer, &http, &vols, cancel, p, job))
        });
        let (sent, errors) = match outcome {
            Ok(x) => x,
            Err(e) => (Vec::new(), vec![("setup".to_string(), e.to_string())]),
        };
        let failed = !errors.is_empty();
        let message = errors
            .iter()
            .map(|(v, e)| format!("{v}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        let now = self.clock.now();
        self.update_link(id, |r| {
            r.last_run_unix = Some(now);
            if failed {
                r.failures = r.failures.saturating_add(1);
                r.last_error = Some(message.clone());
            } else {
                r.failures = 0;
                r.last_error = None;
            }
        })
        .map_err(Error::Api)?;
        if failed {
            self.events.emit(
                "replication.failed",
                &format!("link {id}"),
                "replication",
                json!({"link": id, "peer": l.peer, "reason": message, "job": job}),
            );
            return Err(Error::Failed(message));
        }
        let bytes: u64 = sent.iter().map(|t| t.bytes_sent).sum();
        Ok(json!({"link": id, "transfers": sent.len(), "bytes_sent": bytes}))
    }

    /// Sends each volume in turn; the transfers that went through and the
    /// volumes that failed (with why). A cancel stops at once.
    #[allow(clippy::too_many_arguments)]
    fn send_all(
        &self,
        l: &LinkRec,
        peer: &PeerRec,
        http: &PeerHttp,
        vols: &[String],
        cancel: &AtomicBool,
        p: &crate::jobs::Progress,
        job: u64,
    ) -> (Vec<Transfer>, Vec<(String, String)>) {
        let (windows, outside, clock) = (
            l.bandwidth_windows.clone(),
            l.bandwidth_mibps,
            self.clock.clone(),
        );
        let throttle = Throttle::new(Box::new(move || rate_at(&windows, outside, clock.now())));
        let mut sent = Vec::new();
        let mut errors = Vec::new();
        for vol in vols {
            if cancel.load(Ordering::SeqCst) {
                errors.push((vol.clone(), "cancelled".to_string()));
                break;
            }
            let newest_before = self.newest_created(vol);
            let (keep_last, keep_days) = self.retention_for(l, vol);
            let log = |m: &str| {
                tracing::info!(link = l.id, volume = %vol, "{m}");
                self.job_log(job, &format!("{vol}: {m}"));
            };
            let progress = |done: u64, total: u64| p.set(done, total);
            let res = send::run(SendRequest {
                pool: &self.pool,
                state: &self.state,
                identity: &self.identity,
                volume: vol,
                peer_name: &peer.name,
                http,
                keep_last,
                keep_days,
                raw: l.raw,
                throttle: &throttle,
                cancel,
                progress: &progress,
                log: &log,
            });
            let (recs, err) = match res {
                Ok(r) => (r, None),
                Err(mut e) => (std::mem::take(&mut e.records), Some(e)),
            };
            for r in &recs {
                match self.finish_transfer(l, peer, r, job) {
                    Ok(t) if t.result == "ok" => sent.push(t),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(link = l.id, error = %e.message, "cannot store a transfer")
                    }
                }
            }
            match err {
                None => {
                    // Everything the source had before the run is there now.
                    if let Some(t) = newest_before {
                        let _ = self.update_link(l.id, |r| {
                            let e = r.target_newest.entry(vol.clone()).or_insert(t);
                            *e = (*e).max(t);
                        });
                    }
                }
                Some(e) => {
                    log(&format!("failed: {e}"));
                    let cancelled = e.is("cancelled");
                    errors.push((vol.clone(), e.to_string()));
                    if cancelled {
                        break;
                    }
                }
            }
        }
        (sent, errors)
    }

    /// Creation time (unix s) of the newest point of `volume` here.
    fn newest_created(&self, volume: &str) -> Option<u64> {
        let snaps = self.pool.list_snapshots(Some(volume)).ok()?;
        snaps.iter().map(|s| s.created_ns / 1_000_000_000).max()
    }

    /// Stores one transfer and says what it means: the target's newest
    /// point (lag), events, counters.
    fn finish_transfer(
        &self,
        l: &LinkRec,
        peer: &PeerRec,
        r: &TransferRecord,
        job: u64,
    ) -> ApiResult<Transfer> {
        let t = {
            // Not for a link deleted meanwhile (its delete takes this lock
            // too): its history is gone, and a later link may get its id.
            let _one = lock(&self.runs);
            self.link_rec(l.id)?;
            self.record_transfer(l.id, transfer_of(r))?
        };
        {
            let mut c = lock(&self.counters);
            let e = c.entry(l.id).or_default();
            e.bytes_sent += t.bytes_sent;
            *e.transfers.entry(t.result.clone()).or_default() += 1;
        }
        let subject = format!("{}@{}", r.volume, r.snapshot);
        if let Some(why) = &r.full_resend {
            self.events.emit(
                "replication.full_resend",
                &subject,
                "replication",
                json!({"link": l.id, "peer": peer.name, "volume": r.volume, "why": why}),
            );
        }
        if t.result == "ok" {
            let created = r.created_ns / 1_000_000_000;
            self.update_link(l.id, |rec| {
                let e = rec.target_newest.entry(r.volume.clone()).or_insert(created);
                *e = (*e).max(created);
                rec.last_transfer = Some(t.clone());
            })?;
            self.events.emit(
                "replication.completed",
                &subject,
                "replication",
                json!({"link": l.id, "peer": peer.name, "volume": r.volume,
                    "snapshot": r.snapshot, "point": r.point, "full": r.full,
                    "bytes_sent": r.bytes_sent, "bytes_logical": r.bytes_logical,
                    "seconds": r.seconds, "job": job}),
            );
        } else {
            self.update_link(l.id, |rec| rec.last_transfer = Some(t.clone()))?;
        }
        Ok(t)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::replication::peers::PEERS;
    use crate::replication::service::Setup;
    use cdm_api::auth::{Caller, Role};
    use cdm_api::replication::LinkCreate;

    /// A replication service on a fresh pool and state in `dir`.
    pub(crate) fn service(dir: &std::path::Path) -> Arc<Replication> {
        let pool = crate::replication::testutil::pool(dir);
        let state = Arc::new(crate::state::State::open(&dir.join("s.redb"), None).unwrap());
        let clock = Arc::new(crate::clock::Clock::new(true));
        let events = crate::events::Events::new(state.clone(), clock.clone(), Default::default());
        let jobs = crate::jobs::Jobs::new(state.clone(), clock.clone(), events.clone());
        let tls = dir.join("tls");
        let own = crate::tls::ensure_own(&tls, &["localhost".to_string()]).unwrap();
        let client = crate::tls::ensure_client(&tls, "a", "aaaa").unwrap();
        Replication::new(Setup {
            pool,
            state,
            events,
            clock,
            jobs,
            name: "a".into(),
            client,
            server_ca: own.ca_pem,
            compression: 0,
        })
        .unwrap()
    }

    #[test]
    fn one_run_per_link_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let r = service(d.path());
        r.pool.create_volume("v", 1 << 20, 65536).unwrap();
        r.pool.create_snapshot("v", "p1", json!({})).unwrap();
        // A peer that accepts connections and never answers: a run hangs
        // in its first request until cancelled.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = PeerRec {
            name: "b".into(),
            identity: "bbbb".into(),
            url: None,
            endpoint: Some(silent.local_addr().unwrap().to_string()),
            paired_unix: 0,
            ca_pem: r.client.ca_pem.clone(),
            ca_sha256: String::new(),
            client_cert_sha256: "0".repeat(64),
        };
        r.state.put(PEERS, "b", &peer, Sync::Now).unwrap();
        let admin = Caller {
            user: "admin".into(),
            role: Role::Admin,
            grants: Vec::new(),
            token_id: String::new(),
            token_name: String::new(),
        };
        let l = r
            .create_link(
                &admin,
                LinkCreate {
                    volume: Some("v".into()),
                    peer: "b".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        // A second link of the volume to the same peer is refused.
        let e = r
            .create_link(
                &admin,
                LinkCreate {
                    volume: Some("v".into()),
                    peer: "b".into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!((e.status, e.code), (409, "conflict"), "{e:?}");
        let j = r.run_link(l.id, "admin").unwrap();
        assert_eq!(j.kind, "replicate");
        assert_eq!(r.link(l.id).unwrap().state, "running");
        let e = r.run_link(l.id, "admin").unwrap_err();
        assert_eq!((e.status, e.code), (409, "busy"));
        // The cancel is taken by the running job; the dropped connection
        // then fails its request and the run ends, failed.
        let (sock, _) = silent.accept().unwrap();
        assert!(r.cancel_job(j.id).is_some());
        drop(sock);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        // The link and its job end one after the other: wait for both.
        while r.link(l.id).unwrap().state == "running"
            || r.jobs.get(j.id).unwrap().unwrap().state == "running"
        {
            assert!(std::time::Instant::now() < deadline, "the run did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        let done = r.jobs.get(j.id).unwrap().unwrap();
        assert_eq!(done.state, "failed");
        let link = r.link(l.id).unwrap();
        assert_eq!(link.state, "failing");
        // Not a job of a link: nothing to cancel here.
        assert!(r.cancel_job(j.id).is_none());
        assert!(r.cancel_job(9999).is_none());
    }
}
