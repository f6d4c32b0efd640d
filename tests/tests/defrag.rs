//! Defragmentation through the appliance: a volume fragmented by random
//! 64 KiB rewrites over NBD, a `defrag` job started through the API runs to
//! completion, the fragmentation figure (API, `/metrics`, cdmctl) drops,
//! the data reads back identical over NBD, and fsck is clean.

use std::process::Command;

use cdm_e2e::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn runs_metric(a: &Appliance, volume: &str) -> Option<f64> {
    let (_, body) = http(&a.url(), "GET", "/metrics", Some(&a.admin_token()), None);
    let text = body.as_str().unwrap_or_default().to_string();
    let key = format!("cdm_volume_fragmentation_runs_per_mib{{volume=\"{volume}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn defrag_job_makes_a_fragmented_volume_contiguous_and_keeps_its_data() {
    let mut a = Appliance::start(None);
    let api = Api::new(&a, &a.admin_token());
    api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "db", "size": 64 * MIB})),
    );
    // Written sequentially, then 20 rounds of 1% random 64 KiB rewrites,
    // each flushed (as incrementals are).
    let mut c = a.nbd("db");
    let mut data = random_bytes((64 * MIB) as usize, 1);
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        c.write(i as u64 * (4 << 20), chunk, false).unwrap();
    }
    c.flush().unwrap();
    let blocks = 64 * MIB / 65536;
    let mut x = 12345u64;
    for round in 0..20u64 {
        for _ in 0..blocks / 100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x % blocks;
            let d = random_bytes(65536, round << 32 | b);
            c.write(b * 65536, &d, false).unwrap();
            data[(b * 65536) as usize..((b + 1) * 65536) as usize].copy_from_slice(&d);
        }
        c.flush().unwrap();
    }
    c.disconnect().unwrap();

    let before = api.get("/v1/volumes/db")["fragmentation"].clone();
    let runs0 = before["runs"].as_u64().expect("fragmentation.runs");
    assert!(runs0 > 50, "the rewrites fragment the volume: {before}");
    assert!(before["runs_per_mib"].as_f64().unwrap() > 0.5, "{before}");
    // Listings leave the tree walk out.
    let list = api.get("/v1/volumes");
    assert!(list[0].get("fragmentation").is_none(), "{list}");
    let m0 = runs_metric(&a, "db").expect("metric for db");
    assert!(m0 > 0.5, "metric {m0}");
    let used0 = api.get("/v1/pool")["used_bytes"].as_u64().unwrap();

    // Bad requests are refused.
    api.expect(400, "POST", "/v1/jobs", Some(json!({"kind": "defrag"})));
    api.expect(
        404,
        "POST",
        "/v1/jobs",
        Some(json!({"kind": "defrag", "volume": "nope"})),
    );

    let out = a.cdmctl(&[
        "--json", "job", "start", "defrag", "db", "--rate", "200", "--wait",
    ]);
    assert!(
        out.status.success(),
        "cdmctl job start defrag: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs = api.get("/v1/jobs");
    let job: Value = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "defrag")
        .cloned()
        .expect("a defrag job");
    assert_eq!(job["state"], "succeeded", "{job}");
    let r = &job["result"];
    assert!(r["bytes_moved"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["shared_blocks_left"], 0, "{r}");
    assert_eq!(r["before"]["runs"], runs0, "{r}");

    let after = api.get("/v1/volumes/db")["fragmentation"].clone();
    let runs1 = after["runs"].as_u64().unwrap();
    assert!(runs1 * 10 <= runs0, "runs {runs0} -> {runs1}: {after}");
    assert_eq!(after["mapped_bytes"], before["mapped_bytes"]);
    assert_eq!(r["after"]["runs"], runs1, "{r}");
    let m1 = runs_metric(&a, "db").expect("metric for db");
    assert!(m1 * 10.0 <= m0, "metric {m0} -> {m1}");
    let show = a.cdmctl(&["volume", "show", "db"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains(&format!("in {runs1} runs")),
        "cdmctl volume show: {show}"
    );

    // The same bytes over NBD, and no space kept once frees are reusable
    // (two periodic commits; a flush commits when frees wait).
    let mut c = a.nbd("db");
    let mut got = vec![0u8; data.len()];
    for (i, chunk) in got.chunks_mut(4 << 20).enumerate() {
        c.read(i as u64 * (4 << 20), chunk).unwrap();
    }
    assert!(got == data, "data changed by defragmentation");
    for _ in 0..3 {
        c.flush().unwrap();
    }
    c.disconnect().unwrap();
    let used1 = wait_for(60, "the old copies' space to be reusable", || {
        let u = api.get("/v1/pool")["used_bytes"].as_u64().unwrap();
        (u <= used0 + MIB).then_some(u)
    });
    assert!(used1 <= used0 + MIB, "used {used0} -> {used1}");

    a.stop();
    let fsck = run(Command::new(bin("cdmfs"))
        .arg("--pool")
        .arg(a.data.join("pool"))
        .arg("fsck"));
    assert!(fsck.contains("clean"), "{fsck}");
}
