//! Drill jobs in the service: the `cdm-agent drill` command line of a
//! `drill` job, and, at the service's start, the cleanup of what drills of
//! an earlier run left (a crash or a kill of the agent mid-drill: their
//! servers stopped, their attachments detached, their clones deleted).

use std::ffi::OsString;

use serde_json::Value;

use super::job::{AgentJob, Work};
use super::Service;

fn s(v: impl ToString) -> OsString {
    OsString::from(v.to_string())
}

/// `drill VOLUME@ID --name drill-APP-JOB --timeout S --probes JSON`.
pub fn args(job: &AgentJob, args: &mut Vec<OsString>) -> Result<Work, String> {
    let p = &job.params;
    if !matches!(job.application.kind.as_str(), "postgresql" | "mariadb") {
        return Err(format!(
            "this agent drills postgresql and mariadb applications, not {:?}",
            job.application.kind
        ));
    }
    let volume = p["volume"]
        .as_str()
        .filter(|v| !v.is_empty())
        .ok_or("the drill names no volume")?;
    let snap = p["snapshot"]
        .as_u64()
        .ok_or("the drill names no snapshot")?;
    let name = p["name"]
        .as_str()
        .filter(|n| n.starts_with(crate::drill::PREFIX))
        .ok_or("the drill names no drill-… clone")?;
    let timeout = p["timeout_seconds"]
        .as_u64()
        .unwrap_or(cdm_api::drills::DEFAULT_TIMEOUT_SECS);
    let probes = match &p["probes"] {
        Value::Null => Value::Array(Vec::new()),
        v @ Value::Array(_) => v.clone(),
        _ => return Err("the drill's probes are not a list".into()),
    };
    args.extend([
        s("drill"),
        s(format!("{volume}@{snap}")),
        s("--name"),
        s(name),
        s("--timeout"),
        s(timeout),
        s("--probes"),
        s(probes),
    ]);
    Ok(Work::Drill)
}

/// Cleans up after the drills of an earlier run of the agent (none of them
/// runs: their processes died with it).
pub fn cleanup_stale(svc: &Service) {
    let ca = Some(super::credential::ca_path(&svc.opts.state_dir)).filter(|p| p.exists());
    let api = match cdm_api::client::Client::connect(
        &svc.opts.url,
        Some(svc.credential.clone()),
        ca.as_deref(),
    ) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "drills left behind not cleaned up");
            return;
        }
    };
    let nbd_tls = ca
        .as_deref()
        .and_then(|p| nbd_proto::ClientTls::from_ca_file(p).ok());
    let ctx = crate::Ctx {
        api,
        nbd: svc.opts.nbd.clone(),
        state_dir: svc.opts.state_dir.clone(),
        bandwidth: Default::default(),
        json: true,
        progress: false,
        ca_file: ca,
        nbd_tls,
    };
    let done = crate::drill::cleanup_stale(&ctx);
    if !done.is_empty() {
        tracing::info!(drills = ?done, "cleaned up what drills of an earlier run left");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drill_jobs_become_drill_commands() {
        let j = |params: Value, kind: &str| -> AgentJob {
            serde_json::from_value(json!({"id": 4, "kind": "drill",
                "application": {"id": 1, "kind": kind, "name": "n", "config": {}, "volume": "v"},
                "params": params}))
            .unwrap()
        };
        let mut a = Vec::new();
        let w = args(
            &j(
                json!({"volume": "v", "snapshot": 3, "name": "drill-1-4", "timeout_seconds": 30,
                       "probes": [{"sql": "select 1", "expect": "1"}]}),
                "postgresql",
            ),
            &mut a,
        )
        .unwrap();
        assert_eq!(w, Work::Drill);
        let a: Vec<String> = a.iter().map(|x| x.to_string_lossy().into_owned()).collect();
        assert_eq!(a[..4], ["drill", "v@3", "--name", "drill-1-4"]);
        assert_eq!(a[5], "30");
        assert!(a[7].contains("select 1"));
        let mut a = Vec::new();
        for (p, kind, why) in [
            (
                json!({"volume": "v", "snapshot": 3, "name": "x"}),
                "postgresql",
                "drill-",
            ),
            (
                json!({"volume": "v", "name": "drill-1-4"}),
                "postgresql",
                "snapshot",
            ),
            (
                json!({"volume": "v", "snapshot": 3, "name": "drill-1-4"}),
                "files",
                "files",
            ),
        ] {
            let e = args(&j(p, kind), &mut a).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
