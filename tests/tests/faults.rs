//! Faults of the appliance's own state: a state database whose device
//! fails (EIO injected with `fault_dir`) never lets a change go unaudited,
//! and the appliance recovers without a restart when the device does.

use cdm_e2e::*;
use serde_json::{json, Value};

fn audit_paths(api: &Api) -> Vec<String> {
    api.get("/v1/audit?limit=1000")
        .as_array()
        .expect("audit array")
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or(""),
                e["status"]
            )
        })
        .collect()
}

fn alerts(api: &Api, reason: &str) -> usize {
    api.get("/v1/events?type=alert.raised&limit=1000")
        .as_array()
        .expect("event array")
        .iter()
        .filter(|e| e["data"]["reason"] == reason)
        .count()
}

fn volume(name: &str) -> Option<Value> {
    Some(json!({"name": name, "size": 16u64 << 20}))
}

#[test]
fn a_failing_state_database_never_loses_an_audit_record_and_recovers_without_restart() {
    let faults = tempfile::tempdir_in("/var/tmp").unwrap();
    let eio = faults.path().join("state-eio");
    let cfg = format!("fault_dir = \"{}\"\n", faults.path().display());
    let mut a = Appliance::start(Some(&cfg));
    let tok = a.admin_token();
    let api = Api::new(&a, &tok);
    let pending = a.data.join("audit-pending.jsonl");
    api.expect(201, "POST", "/v1/volumes", volume("before"));

    // The device under state.redb fails. Every request either makes its
    // change and keeps the audit record aside (synced), or is refused.
    std::fs::write(&eio, b"").unwrap();
    let mut made = Vec::new();
    let mut refused = 0;
    for i in 0..6 {
        let name = format!("during{i}");
        let (st, v) = api.call("POST", "/v1/volumes", volume(&name));
        match st {
            201 => made.push(name),
            503 => {
                assert_eq!(v["error"]["code"], "unavailable", "{v}");
                refused += 1;
            }
            _ => panic!("POST /v1/volumes while the state database fails: {st} {v}"),
        }
    }
    eprintln!(
        "while failing: {} changes made and kept aside, {refused} refused",
        made.len()
    );
    assert!(!made.is_empty(), "the first change runs and is kept aside");
    assert!(
        refused > 0,
        "changes are refused while the database cannot be reopened"
    );
    let kept = std::fs::read_to_string(&pending).expect("records kept aside");
    assert_eq!(
        kept.lines().count(),
        made.len(),
        "one record aside per change made: {kept}"
    );

    // The device recovers: no restart. The records kept aside go to the
    // database first, in order, and an alert says so.
    std::fs::remove_file(&eio).unwrap();
    wait_for(120, "the state database reopened", || {
        (api.call("GET", "/v1/volumes", None).0 == 200).then_some(())
    });
    api.expect(201, "POST", "/v1/volumes", volume("after"));
    assert!(
        !pending.exists(),
        "records aside are moved into the database"
    );
    let paths = audit_paths(&api);
    let creates: Vec<&String> = paths
        .iter()
        .filter(|p| p.starts_with("POST /v1/volumes "))
        .collect();
    assert_eq!(
        creates.len(),
        made.len() + 2,
        "every change audited: {paths:?}"
    );
    assert!(creates.iter().all(|p| p.ends_with(" 201")), "{paths:?}");
    let names: Vec<String> = api
        .get("/v1/volumes")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap_or("").to_string())
        .collect();
    for n in made
        .iter()
        .chain(["before".to_string(), "after".to_string()].iter())
    {
        assert!(names.contains(n), "volume {n} exists: {names:?}");
    }
    assert_eq!(alerts(&api, "audit_recovered"), 1);

    // Kept aside, then killed before the database recovered: the next
    // start stores the record.
    std::fs::write(&eio, b"").unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("crash"));
    assert!(pending.exists());
    a.kill();
    std::fs::remove_file(&eio).unwrap();
    a.restart();
    let api = Api::new(&a, &tok);
    assert!(!pending.exists(), "replayed at start");
    let paths = audit_paths(&api);
    assert_eq!(
        paths
            .iter()
            .filter(|p| p.starts_with("POST /v1/volumes "))
            .count(),
        made.len() + 3,
        "{paths:?}"
    );

    // Neither the database nor the aside file can be written: that record
    // is lost (and logged), and changes are refused until the audit log
    // can be written again.
    std::fs::create_dir(&pending).unwrap();
    std::fs::write(&eio, b"").unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("lost"));
    std::fs::remove_file(&eio).unwrap();
    wait_for(120, "reads served again", || {
        (api.call("GET", "/v1/volumes", None).0 == 200).then_some(())
    });
    let v = api.expect(503, "POST", "/v1/volumes", volume("refused"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("audit log"),
        "{v}"
    );
    assert!(a.log().contains("AUDIT RECORD LOST"), "the loss is logged");
    std::fs::remove_dir(&pending).unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("accepted"));
    assert_eq!(
        alerts(&api, "audit_lost"),
        0,
        "stored nowhere while it happened"
    );
    a.stop();
}
