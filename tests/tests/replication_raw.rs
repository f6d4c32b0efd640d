//! Raw (ciphertext) replication of encrypted volumes (docs/replication.md,
//! "Raw sends") with three real snapshotd instances: A's pool has a key,
//! B's and C's have none. A raw link A→B and a cascade B→C carry A's
//! ciphertext; neither B's nor C's pool file holds A's data and B's points
//! cannot be read over NBD; A's key loaded on C (cdmctl) makes C's points
//! equal to A's (`qemu-img compare`); an incremental sends about the
//! change; a wrong key is refused; a raw link on a plain volume is
//! refused; failover: B's replica promoted, A's key loaded on B, written,
//! then replicated back to A incrementally.

mod repl_util;

use cdm_e2e::*;
use repl_util::*;
use serde_json::{json, Value};

const KEY_A: [u8; 32] = [0x5a; 32];
const BS: u32 = 65536;
const SIZE: u64 = 32 * MIB;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A call that must succeed (any 2xx); returns the body.
fn ok(n: &Node, method: &str, path: &str, body: Option<Value>) -> Value {
    let (s, v) = n.api().call(method, path, body);
    assert!(
        (200..300).contains(&s),
        "{}: {method} {path}: {s} {v}",
        n.name
    );
    v
}

/// Writes `data` at `off` of export `vol` over NBD.
fn put(n: &Node, vol: &str, off: u64, data: &[u8]) {
    let mut c = n.a.nbd(vol);
    c.write(off, data, false).expect("NBD write");
    c.flush().expect("NBD flush");
    c.disconnect().expect("NBD disconnect");
}

/// Whether the file at `path` holds `needle` anywhere (read in pieces that
/// overlap by the needle's length).
fn file_holds(path: &std::path::Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("pool file");
    let mut buf = vec![0u8; 16 << 20];
    let keep = needle.len() - 1;
    let mut have = 0usize;
    loop {
        let n = f.read(&mut buf[have..]).expect("read pool file");
        if n == 0 {
            return false;
        }
        let end = have + n;
        if buf[..end].windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let from = end.saturating_sub(keep);
        buf.copy_within(from..end, 0);
        have = end - from;
    }
}

/// Every point of `vol` on `src` (by point id) equals its copy on `dst`.
fn same_points(src: &Node, src_ids: &[(u64, String)], dst: &Node, vol: &str) {
    for (snap, pid) in src_ids {
        let theirs = dst.wait_point(vol, pid);
        compare(
            &src.uri(&format!("{vol}@{snap}")),
            &dst.uri(&format!("{vol}@{}", snap_id(&theirs))),
        );
    }
}

/// The newest `ok` transfer of a link.
fn last_ok(n: &Node, link: u64) -> Value {
    n.transfers(link)
        .into_iter()
        .find(|t| t["result"] == "ok")
        .unwrap_or_else(|| panic!("{}: no transfer of link {link} went through", n.name))
}

#[test]
fn raw_links_carry_ciphertext_to_appliances_without_the_key_and_back() {
    require("qemu-img");
    let _s = shared();
    let mut a = Node::start_keyed("A", "1G", Some(&KEY_A));
    let b = Node::start_keyed("B", "1G", None);
    let c = Node::start_keyed("C", "1G", None);
    pair(&a, &b);
    pair(&b, &c);
    let (ida, idb) = (a.identity(), b.identity());

    // A's data: random (so no compression hides it), with a distinctive
    // piece to look for in the other pools' files.
    let secret = random_bytes(MIB as usize, 0x5ec2e7);
    let needle = &secret[4096..4096 + 64];
    ok(
        &a,
        "POST",
        "/v1/volumes",
        Some(
            json!({"name": "v", "size": SIZE, "block_size": BS, "dedup": true,
                    "encryption": "aes-256-xts"}),
        ),
    );
    // A plain, uncompressed copy on A: the search finds what is there.
    ok(
        &a,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "plain", "size": SIZE, "block_size": BS, "compression": 0})),
    );
    put(&a, "plain", 0, &secret);
    a.fill("v", 0, 16 * MIB, 11);
    put(&a, "v", 20 * MIB, &secret);
    let p1 = a.snapshot("v", "p1", json!({}));
    a.fill("v", 2 * MIB, MIB, 12);
    let p2 = a.snapshot("v", "p2", json!({}));

    // A raw link of a plain volume has no ciphertext to send.
    let e = a.api().expect(
        400,
        "POST",
        "/v1/replication/links",
        Some(json!({"volume": "plain", "peer": "B", "raw": true})),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not encrypted"),
        "{e}"
    );

    let ab = a.link(json!({"volume": "v", "peer": "B", "raw": true}));
    assert_eq!(a.link_get(ab)["raw"], true);
    a.run_ok(ab);
    let on_b = b.wait_point("v", &point_id(&ida, p2));
    // B→C is not raw, but B holds no key: it sends what it stores.
    let bc = b.link(json!({"volume": "v", "peer": "C"}));
    b.run_ok(bc);
    let on_c = c.wait_point("v", &point_id(&ida, p2));
    let t = last_ok(&b, bc);
    assert_eq!(t["raw"], true, "{t}");
    assert!(
        t["message"].as_str().unwrap_or("").contains("sent raw"),
        "{t}"
    );
    assert_eq!(last_ok(&a, ab)["raw"], true);

    let vb = b.api().get("/v1/volumes/v");
    assert_eq!(
        (&vb["sealed"], &vb["key_loaded"]),
        (&json!(true), &json!(false)),
        "{vb}"
    );
    assert_eq!(vb["encryption"], "none", "{vb}");
    assert_eq!(on_b["sealed"], true, "{on_b}");
    // B cannot read its points: NBD reads fail, they never read as zeros.
    let mut nbd = b.a.nbd(&format!("v@{}", snap_id(&on_b)));
    let mut buf = vec![0u8; 65536];
    assert!(
        nbd.read(20 * MIB, &mut buf).is_err(),
        "B read a sealed point"
    );
    drop(nbd);
    // Nor clone it.
    let e = b.api().expect(
        409,
        "POST",
        &format!("/v1/volumes/v/snapshots/{}/clones", snap_id(&on_b)),
        Some(json!({"name": "peek"})),
    );
    assert_eq!(e["error"]["code"], "key_required", "{e}");
    // Nor browse its files.
    let e = b.api().expect(
        409,
        "GET",
        &format!("/v1/volumes/v/snapshots/{}/partitions", snap_id(&on_b)),
        None,
    );
    assert_eq!(e["error"]["code"], "key_required", "{e}");
    // But B can verify it holds intact ciphertext: the stored bytes are
    // checked without the key.
    let ver = b.api().expect(
        200,
        "POST",
        &format!("/v1/volumes/v/snapshots/{}/verify", snap_id(&on_b)),
        None,
    );
    assert_eq!(ver["errors"], json!([]), "{ver}");
    assert!(ver["bytes_checked"].as_u64().unwrap_or(0) > 0, "{ver}");
    // Ciphertext only: A's data is in no pool file but A's (every batch
    // received was flushed before it was acknowledged).
    assert!(file_holds(&a.pool_file(), needle));
    assert!(
        !file_holds(&b.pool_file(), needle),
        "B stores A's plaintext"
    );
    assert!(
        !file_holds(&c.pool_file(), needle),
        "C stores A's plaintext"
    );

    // Keys on C: a wrong one is refused, A's (with cdmctl) opens it.
    let wrong = [7u8; 32];
    let e = c.api().expect(
        409,
        "POST",
        "/v1/volumes/v/key",
        Some(json!({"key_file_hex": hex::encode(wrong)})),
    );
    assert_eq!(e["error"]["code"], "wrong_key", "{e}");
    let e = a.api().expect(
        400,
        "POST",
        "/v1/volumes/v/key",
        Some(json!({"key_file_hex": hex::encode(KEY_A)})),
    );
    assert_eq!(e["error"]["code"], "not_sealed", "{e}");
    let key_file = a.key_file();
    c.cdmctl(&[
        "volume",
        "load-key",
        "v",
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    assert_eq!(c.api().get("/v1/volumes/v")["key_loaded"], true);
    // The loads are audited; no key is in the audit log or the daemon's log.
    let audit = c.api().get("/v1/audit").to_string();
    assert!(audit.contains("/v1/volumes/v/key"), "{audit}");
    for k in [hex::encode(KEY_A), hex::encode(wrong)] {
        assert!(
            !audit.contains(&k) && !c.log().contains(&k),
            "a key was logged"
        );
    }
    same_points(
        &a,
        &[(p1, point_id(&ida, p1)), (p2, point_id(&ida, p2))],
        &c,
        "v",
    );
    assert_eq!(
        snap_id(&on_c),
        snap_id(&c.wait_point("v", &point_id(&ida, p2)))
    );

    // An incremental sends about the change, ciphertext as it is.
    const CHANGE: u64 = 2 * MIB;
    a.fill("v", 24 * MIB, CHANGE, 13);
    let p3 = a.snapshot("v", "p3", json!({}));
    a.run_ok(ab);
    b.wait_point("v", &point_id(&ida, p3));
    let t = last_ok(&a, ab);
    assert_eq!(
        (&t["full"], &t["raw"]),
        (&json!(false), &json!(true)),
        "{t}"
    );
    assert_eq!(t["base"], point_id(&ida, p2), "{t}");
    let sent = u(&t["bytes_sent"]);
    assert!((CHANGE * 9 / 10..=CHANGE * 11 / 10).contains(&sent), "{t}");

    // Failover: A is lost; B promotes its raw replica and, with A's key,
    // writes to it.
    a.stop();
    ok(&b, "POST", "/v1/volumes/v/promote", None);
    ok(
        &b,
        "POST",
        "/v1/volumes/v/key",
        Some(json!({"key_file_hex": hex::encode(KEY_A)})),
    );
    b.fill("v", 8 * MIB, CHANGE, 14);
    let p4 = b.snapshot("v", "on B", json!({"site": "B"}));

    // A comes back, its copy demoted: B feeds it from the newest point both
    // have (A's own p3), sealed, and A unseals it with its own key.
    a.restart();
    ok(
        &a,
        "POST",
        &format!("/v1/replication/links/{ab}/pause"),
        None,
    );
    ok(
        &a,
        "POST",
        "/v1/volumes/v/demote",
        Some(json!({"peer": "B"})),
    );
    let ba = b.link(json!({"volume": "v", "peer": "A"}));
    b.run_ok(ba);
    let back = a.wait_point("v", &point_id(&idb, p4));
    compare(
        &b.uri(&format!("v@{p4}")),
        &a.uri(&format!("v@{}", snap_id(&back))),
    );
    let t = last_ok(&b, ba);
    assert_eq!(
        (&t["full"], &t["raw"]),
        (&json!(false), &json!(true)),
        "{t}"
    );
    assert_eq!(t["base"], point_id(&ida, p3), "{t}");
    let sent = u(&t["bytes_sent"]);
    assert!((CHANGE * 9 / 10..=CHANGE * 11 / 10).contains(&sent), "{t}");
    let va = a.api().get("/v1/volumes/v");
    assert_eq!(
        (&va["sealed"], &va["encryption"]),
        (&json!(false), &json!("aes-256-xts")),
        "{va}"
    );

    // Unloaded, C's key is gone: its points are unreadable again.
    c.cdmctl(&["volume", "unload-key", "v"]);
    assert_eq!(c.api().get("/v1/volumes/v")["key_loaded"], false);
}
