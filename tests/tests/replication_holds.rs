//! Retention holds (docs/replication.md, "Holds"): the newest point a
//! link's target acknowledged is the base of the link's next incremental
//! transfer, so the source's retention keeps it while the link is paused,
//! and a manual delete of it is refused unless forced.

mod repl_util;

use cdm_e2e::*;
use repl_util::*;
use serde_json::{json, Value};

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn has_snapshot(n: &Node, vol: &str, id: u64) -> bool {
    n.snapshots(vol).iter().any(|s| snap_id(s) == id)
}

fn events(n: &Node, kind: &str) -> Vec<Value> {
    n.api()
        .get(&format!("/v1/events?type={kind}&limit=100"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn keep_last_1_on_the_source_keeps_the_base_of_a_paused_link() {
    let _s = shared();
    let a = Node::start("A");
    let b = Node::start("B");
    pair(&a, &b);
    let ida = a.identity();
    const SIZE: u64 = 32 * MIB;
    a.create_volume("v", SIZE, 65536);
    a.fill("v", 0, SIZE, 5);
    let p1 = a.snapshot("v", "p1", json!({}));
    let ab = a.link(json!({"volume": "v", "peer": "B", "keep_last": 1}));
    a.run_ok(ab);
    b.wait_point("v", &point_id(&ida, p1));

    // Keep-last 1 on the source (the scheduler applies it at every tick),
    // and the link paused while new points come.
    a.api().expect(
        200,
        "PUT",
        "/v1/volumes/v/policy",
        Some(json!({"retention": {"keep_last": 1}})),
    );
    a.api().expect(
        200,
        "POST",
        &format!("/v1/replication/links/{ab}/pause"),
        None,
    );
    const CHANGE: u64 = 4 * MIB;
    a.fill("v", 4 * MIB, CHANGE / 2, 600);
    let p2 = a.snapshot("v", "p2", json!({}));
    a.fill("v", 12 * MIB, CHANGE / 2, 700);
    let p3 = a.snapshot("v", "p3", json!({}));
    // p2 is neither the newest nor held: it goes. p1, the base the
    // paused link still needs, stays.
    wait_for(WAIT, "p2 expired on A", || {
        (!has_snapshot(&a, "v", p2)).then_some(())
    });
    assert!(
        has_snapshot(&a, "v", p1),
        "retention deleted the replication base p1: {:?}",
        a.snapshots("v")
    );
    let kept = wait_for(WAIT, "the event saying p1 was kept", || {
        events(&a, "snapshot.kept")
            .into_iter()
            .find(|e| e["data"]["id"] == p1)
    });
    let msg = kept["data"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains(&format!("kept point {p1}")) && msg.contains(&format!("link {ab} to peer B")),
        "{kept}"
    );
    // The API shows who holds it.
    let listed = a.snapshots("v");
    let held: Vec<&Value> = listed
        .iter()
        .filter(|s| s["held_by"] != json!([]))
        .collect();
    assert_eq!(held.len(), 1, "{listed:?}");
    assert_eq!(snap_id(held[0]), p1);
    assert_eq!(held[0]["held_by"], json!([ab]));
    // A manual delete of the held point is refused, naming the link.
    let v = a.api().expect(
        409,
        "DELETE",
        &format!("/v1/volumes/v/snapshots/{p1}"),
        None,
    );
    assert_eq!(v["error"]["code"], "held", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("link {ab} to peer B")),
        "{v}"
    );

    // Resumed, the link sends p3 from p1: incremental, about the change.
    a.api().expect(
        200,
        "POST",
        &format!("/v1/replication/links/{ab}/resume"),
        None,
    );
    a.run_ok(ab);
    b.wait_point("v", &point_id(&ida, p3));
    let t = a.transfers(ab);
    let r = t
        .iter()
        .find(|t| t["result"] == "ok" && t["snapshot"] == p3)
        .unwrap_or_else(|| panic!("no transfer of p3: {t:?}"));
    assert_eq!(r["full"], false, "a full resend: {r}");
    assert_eq!(r["base"], point_id(&ida, p1), "{r}");
    let logical = u(&r["bytes_logical"]);
    assert!((CHANGE..=CHANGE + 2 * 65536).contains(&logical), "{r}");
    let sent = u(&r["bytes_sent"]);
    assert!((CHANGE * 9 / 10..=CHANGE * 11 / 10).contains(&sent), "{r}");

    // The hold moved to p3: p1 now expires; p3 is refused, then forced.
    wait_for(WAIT, "p1 expired on A once the base moved", || {
        (!has_snapshot(&a, "v", p1)).then_some(())
    });
    let v = a.api().expect(
        409,
        "DELETE",
        &format!("/v1/volumes/v/snapshots/{p3}"),
        None,
    );
    assert_eq!(v["error"]["code"], "held", "{v}");
    let (s, v) = a.api().call(
        "DELETE",
        &format!("/v1/volumes/v/snapshots/{p3}?force=true"),
        None,
    );
    assert!((200..300).contains(&s), "forced delete: {s} {v}");
    assert!(!has_snapshot(&a, "v", p3));
    // The replica keeps its newest point whatever its own keep-last says.
    assert!(b.point("v", &point_id(&ida, p3)).is_some());
}
