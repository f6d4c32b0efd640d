//! Faults of the appliance's own state: a state database whose device
//! fails (EIO injected with `fault_dir`) never lets a change go unaudited
//! nor an event go missing, and the appliance recovers without a restart
//! when the device does.

use cdm_e2e::webhook::Receiver;
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
        1,
        "the alert, an event, was kept aside with the events and stored later"
    );
    a.stop();
}

fn events(api: &Api) -> Vec<Value> {
    api.get("/v1/events?limit=10000")
        .as_array()
        .expect("event array")
        .clone()
}

/// The event `kind` about `subject`, which must exist once.
fn event(evs: &[Value], kind: &str, subject: &str) -> Value {
    let found: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == kind && e["subject"] == subject)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {subject} in {evs:?}");
    found[0].clone()
}

fn id(e: &Value) -> u64 {
    e["id"].as_u64().expect("event id")
}

/// An alert about events with `reason`, which must exist once.
fn event_alert(evs: &[Value], reason: &str) -> Value {
    let found: Vec<&Value> = evs
        .iter()
        .filter(|e| e["type"] == "alert.raised" && e["data"]["reason"] == reason)
        .collect();
    assert_eq!(found.len(), 1, "one {reason} alert in {evs:?}");
    found[0].clone()
}

fn metric(api: &Api, name: &str) -> String {
    let (st, v) = api.call("GET", "/metrics", None);
    assert_eq!(st, 200, "{v}");
    let text = v.as_str().unwrap_or("").to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Waits until every delivery of `hook` is delivered and that is durable,
/// so that the next fault is met by the test's request, not by a
/// delivery's bookkeeping.
fn settled(api: &Api, hook: &Value) {
    let path = format!("/v1/webhooks/{}/deliveries", hook["id"]);
    loop {
        let n = wait_for(120, "deliveries made", || {
            let d = api.get(&path);
            let d = d.as_array()?;
            d.iter()
                .all(|d| d["state"] == "delivered")
                .then_some(d.len())
        });
        // Delivery bookkeeping is written lazily and would be undone by
        // the fault; a change's audit record is synced, and everything
        // before it. That change may store audit records kept aside, and
        // the alert saying so is delivered too: then again.
        api.expect(200, "POST", "/v1/clock", Some(json!({"advance_secs": 0})));
        if api.get(&path).as_array().map(Vec::len) == Some(n) {
            return;
        }
    }
}

#[test]
fn events_are_kept_aside_while_the_state_database_fails_and_delivered_later() {
    let faults = tempfile::tempdir_in("/var/tmp").unwrap();
    let eio = faults.path().join("state-eio");
    let cfg = format!("fault_dir = \"{}\"\n{FAST_CONFIG}", faults.path().display());
    let mut a = Appliance::start(Some(&cfg));
    let tok = a.admin_token();
    let api = Api::new(&a, &tok);
    let pending = a.data.join("events-pending.jsonl");
    let rx = Receiver::start();
    let hook = api.expect(
        201,
        "POST",
        "/v1/webhooks",
        Some(json!({"url": format!("http://127.0.0.1:{}/hook", rx.port),
                    "events": ["volume.*", "alert.raised"]})),
    );
    api.expect(201, "POST", "/v1/volumes", volume("before"));
    rx.wait("volume.created", "before");
    settled(&api, &hook);

    // The device under state.redb fails: the change that meets the failure
    // is made, and its event is kept aside (synced) with its id.
    std::fs::write(&eio, b"").unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("during"));
    let kept = std::fs::read_to_string(&pending).expect("events kept aside");
    assert!(kept.contains("\"during\""), "{kept}");
    let health = http(&a.url(), "GET", "/health", None, None).1;
    assert!(
        health["logs"]["events_pending"].as_u64() >= Some(1),
        "{health}"
    );
    // While the database cannot be read, the list is refused, not short.
    let (st, v) = api.call("GET", "/v1/events?limit=10000", None);
    assert!(
        st == 503 || v.to_string().contains("\"during\""),
        "{st} {v}"
    );

    // The device recovers, no restart: the events are stored in order
    // after those before, with an alert, and delivered.
    std::fs::remove_file(&eio).unwrap();
    let evs = wait_for(120, "events stored again, and the alert saying so", || {
        let (st, v) = api.call("GET", "/v1/events?limit=10000", None);
        let evs = v.as_array().filter(|_| st == 200)?;
        evs.iter()
            .any(|e| e["data"]["reason"] == "events_recovered")
            .then(|| evs.clone())
    });
    assert!(!pending.exists(), "moved into the database");
    let ids: Vec<u64> = evs.iter().map(id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let before = event(&evs, "volume.created", "before");
    let during = event(&evs, "volume.created", "during");
    let aside = event_alert(&evs, "events_aside");
    let recovered = event_alert(&evs, "events_recovered");
    assert!(id(&before) < id(&during), "{evs:?}");
    assert!(id(&during) < id(&aside), "{evs:?}");
    assert!(id(&aside) < id(&recovered), "{evs:?}");
    assert!(
        recovered["data"]["events"].as_u64() >= Some(2),
        "{recovered}"
    );
    let got = rx.wait("volume.created", "during");
    assert_eq!(got["id"], during["id"], "delivered under its id");
    rx.wait("alert.raised", "events");
    assert_eq!(metric(&api, "cdm_events_pending_records"), "0");

    // Kept aside, then killed before the database recovered: the next
    // start stores the event and delivers it.
    settled(&api, &hook);
    std::fs::write(&eio, b"").unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("crash"));
    assert!(std::fs::read_to_string(&pending)
        .unwrap_or_default()
        .contains("\"crash\""));
    a.kill();
    std::fs::remove_file(&eio).unwrap();
    a.restart();
    let api = Api::new(&a, &tok);
    assert!(!pending.exists(), "replayed at start");
    let evs = events(&api);
    let crash = event(&evs, "volume.created", "crash");
    assert!(id(&crash) > id(&recovered), "{evs:?}");
    let opened: Vec<u64> = evs
        .iter()
        .filter(|e| e["type"] == "pool.opened")
        .map(id)
        .collect();
    assert!(
        opened.last().is_some_and(|&o| o > id(&crash)),
        "the start's events come after those kept aside: {evs:?}"
    );
    rx.wait("volume.created", "crash");

    // Neither the database nor the aside file can be written: that event
    // is lost, logged, counted, shown in /health, and told by an alert
    // once events can be kept again.
    settled(&api, &hook);
    std::fs::create_dir(&pending).unwrap();
    std::fs::write(&eio, b"").unwrap();
    api.expect(201, "POST", "/v1/volumes", volume("lost"));
    std::fs::remove_file(&eio).unwrap();
    std::fs::remove_dir(&pending).unwrap();
    assert!(a.log().contains("EVENT LOST"), "the loss is logged");
    let health = wait_for(120, "health", || {
        let (st, v) = http(&a.url(), "GET", "/health", None, None);
        (st == 200).then_some(v)
    });
    // The volume's event, and the alert that its audit record was kept
    // aside (an event too).
    let lost_n = health["logs"]["events_lost"].as_u64().unwrap_or(0);
    assert!(lost_n >= 1, "{health}");
    wait_for(120, "changes accepted again", || {
        (api.call("POST", "/v1/volumes", volume("after")).0 == 201).then_some(())
    });
    assert_eq!(metric(&api, "cdm_events_lost_total"), lost_n.to_string());
    let evs = events(&api);
    assert!(
        evs.iter()
            .all(|e| !(e["type"] == "volume.created" && e["subject"] == "lost")),
        "{evs:?}"
    );
    let lost = event_alert(&evs, "events_lost");
    assert_eq!(lost["data"]["events"], lost_n, "{lost}");
    rx.wait("volume.created", "after");
    a.stop();
}
