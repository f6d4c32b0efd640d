//! Data reduction and encryption at rest through the appliance: real
//! filesystem images copied with nbdcopy into deduplicated, compressed,
//! encrypted volumes; snapshots read back after a restart; the key checked
//! at start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use cdm_e2e::stamp;
use cdm_e2e::*;
use serde_json::{json, Value};

fn sha(p: &Path) -> String {
    sh(&format!("sha256sum {} | cut -d' ' -f1", p.display()))
        .trim()
        .to_string()
}

fn used(api: &Api) -> u64 {
    api.get("/v1/pool")["used_bytes"]
        .as_u64()
        .expect("used_bytes")
}

/// What the image holds as a store without compression would keep it:
/// `(non-zero 4 KiB blocks, distinct non-zero blocks)`, in bytes. nbdcopy
/// skips zeros, and dedup keeps one copy of equal blocks, so the second
/// figure is what the pool would store for one copy if compression did
/// nothing.
fn uncompressed(img: &Path) -> (u64, u64) {
    let data = std::fs::read(img).unwrap();
    let mut distinct = std::collections::HashSet::new();
    let mut nonzero = 0u64;
    for b in data.chunks(4096) {
        if b.iter().any(|&x| x != 0) {
            nonzero += 4096;
            distinct.insert(b);
        }
    }
    (nonzero, distinct.len() as u64 * 4096)
}

fn copy_in(a: &Appliance, img: &Path, export: &str) {
    run(Command::new("nbdcopy").arg(img).arg(a.unix_uri(export)));
}

fn copy_out(a: &Appliance, export: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    run(Command::new("nbdcopy").arg(a.unix_uri(export)).arg(out));
}

#[test]
fn same_image_in_two_volumes_is_stored_once_and_snapshots_survive_restart() {
    let work = tempfile::Builder::new()
        .prefix("cdm-reduction-")
        .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let w = work.path();
    // A real ext4 image of real files (binaries and text), 64 MiB.
    sh(&format!(
        "cd {d} && mkdir src && find /usr/bin /usr/share/doc -type f -size -2M -printf '%s %p\\n' 2>/dev/null | awk '{{t+=$1; if (t>36000000) exit; print $2}}' > list && \
         tar -cf - -T list 2>/dev/null | tar -xf - -C src && \
         mkfs.ext4 -q -F -b 4096 -d src disk.img 64M && head -c 32 /dev/urandom > key && head -c 32 /dev/urandom > wrong && \
         chmod 600 key wrong",
        d = w.display()
    ));
    let img = w.join("disk.img");
    let config = format!(
        "scheduler_tick_ms = 100\nkey_file = \"{}\"\n",
        w.join("key").display()
    );
    let mut a = Appliance::start(Some(&config));
    let api = Api::new(&a, &a.admin_token());
    let pool = api.get("/v1/pool");
    assert_eq!(pool["encryption_key"], "unlocked");
    for name in ["a", "b"] {
        let v = api.expect(
            201,
            "POST",
            "/v1/volumes",
            Some(json!({"name": name, "size": 64 << 20, "block_size": 4096,
                        "dedup": true, "compression": 8, "encryption": "aes-256-xts"})),
        );
        assert_eq!(v["dedup"], true);
        assert_eq!(v["compression"], 8);
        assert_eq!(v["encryption"], "aes-256-xts");
    }
    let listed = a.cdmctl(&["volume", "list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("dedup,zstd-8,aes-256-xts"),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    let u0 = used(&api);
    copy_in(&a, &img, "a");
    let u1 = used(&api);
    copy_in(&a, &img, "b");
    let u2 = used(&api);
    let first = u1 - u0;
    let second = u2 - u1;
    assert!(
        second * 10 < first,
        "second copy of the same image took {second} bytes (first {first})"
    );
    // Compression paid on the first copy too: measured against the data
    // actually written (the image's non-zero blocks; its apparent size is
    // mostly zeros that nbdcopy never sends) and against what the pool
    // would hold for them deduplicated but uncompressed.
    let (nonzero, distinct) = uncompressed(&img);
    assert!(
        nonzero > 30 << 20,
        "the image holds {nonzero} bytes of data"
    );
    let r = api.get("/v1/pool")["reduction"].clone();
    let logical = r["pool"]["logical_bytes"].as_u64().unwrap();
    let after_dedup = r["pool"]["after_dedup_bytes"].as_u64().unwrap();
    let after_comp = r["pool"]["after_compression_bytes"].as_u64().unwrap();
    assert!(logical + (1 << 20) >= after_dedup * 2, "{r}");
    assert!(after_comp < after_dedup, "{r}");
    // The pool's own accounting matches what was written: two copies of
    // the image's data, one after dedup.
    assert!(
        logical >= 2 * nonzero,
        "logical {logical} for 2 x {nonzero}: {r}"
    );
    assert!(
        after_dedup >= distinct,
        "after dedup {after_dedup} < {distinct}: {r}"
    );
    // Space really taken (metadata included) is well under the data
    // deduplicated alone: at least a fifth saved by compression.
    assert!(
        first * 5 < distinct * 4,
        "first copy took {first} bytes for {distinct} distinct non-zero bytes ({nonzero} written): {r}"
    );
    eprintln!("reduction: first copy {first} bytes; written {nonzero}, distinct {distinct}; {r}");
    // A snapshot chain with changes between snapshots.
    let mut cur = std::fs::read(&img).unwrap();
    let mut expect: Vec<(u64, String)> = Vec::new();
    for round in 0..3u8 {
        let s = api.expect(
            201,
            "POST",
            "/v1/volumes/a/snapshots",
            Some(json!({"label": format!("r{round}")})),
        );
        let p = w.join(format!("want{round}.img"));
        std::fs::write(&p, &cur).unwrap();
        expect.push((s["id"].as_u64().unwrap(), sha(&p)));
        // Change 1 MiB at a round-dependent offset (random bytes), and
        // copy a block-aligned range from elsewhere in the image (dedup hits).
        let patch = w.join("patch");
        sh(&format!(
            "head -c 1048576 /dev/urandom > {}",
            patch.display()
        ));
        let off = (round as usize + 1) * (5 << 20) + 12345;
        let bytes = std::fs::read(&patch).unwrap();
        cur[off..off + bytes.len()].copy_from_slice(&bytes);
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -s {} {off} 1048576", patch.display()))
            .arg(a.unix_uri("a")));
        let src = (round as usize) * (3 << 20);
        let dst = 40 << 20;
        let chunk = cur[src..src + (2 << 20)].to_vec();
        cur[dst..dst + chunk.len()].copy_from_slice(&chunk);
        std::fs::write(&patch, &chunk).unwrap();
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!(
                "write -s {} {dst} {}",
                patch.display(),
                chunk.len()
            ))
            .arg(a.unix_uri("a")));
    }
    let p = w.join("want-live.img");
    std::fs::write(&p, &cur).unwrap();
    let live = sha(&p);
    // Restart with the same key: every snapshot and the live volume read back.
    a.stop();
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    let out = w.join("out.img");
    for (id, want) in &expect {
        copy_out(&a, &format!("a@{id}"), &out);
        assert_eq!(&sha(&out), want, "snapshot {id} after restart");
    }
    copy_out(&a, "a", &out);
    assert_eq!(sha(&out), live);
    copy_out(&a, "b", &out);
    assert_eq!(sha(&out), sha(&img));
    // Deleting b frees almost nothing (a shares its chunks); deleting a's
    // snapshots and a then frees the rest.
    let before = used(&api);
    api.expect(204, "DELETE", "/v1/volumes/b", None);
    let after = used(&api);
    assert!(
        before - after.min(before) < first / 4,
        "{before} -> {after}"
    );
    a.stop();
    // A wrong key: snapshotd refuses to start, and writes nothing.
    let pool_file = a.data.join("pool");
    let state = sha(&pool_file);
    let wrong = w.join("wrong");
    let err = snapshotd_refused(&a.data, w, &["--key-file".as_ref(), wrong.as_os_str()]);
    assert!(err.contains("wrong key"), "{err}");
    assert_eq!(sha(&pool_file), state, "a refused start changed the pool");
    // Without a key: the API says so and encrypted volumes cannot be read.
    a.config = None;
    a.restart();
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/pool")["encryption_key"], "locked");
    let vols: Value = api.get("/v1/volumes");
    assert_eq!(vols[0]["encryption"], "aes-256-xts");
    let fail = run_fail(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4096"])
            .arg(a.unix_uri("a")),
    );
    assert!(!fail.is_empty());
    a.stop();
}

#[test]
fn pool_defaults_and_a_passphrase_from_the_config() {
    let work = tempfile::Builder::new()
        .prefix("cdm-defaults-")
        .tempdir_in(std::env::var("CDM_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("tempdir");
    let pass = work.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    // snapshotd refuses key files others may read.
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "passphrase_file = \"{}\"\n[defaults]\ndedup = true\ncompression = 8\nencryption = \"sm4-xts\"\n",
        pass.display()
    );
    let mut a = Appliance::start(Some(&config));
    let api = Api::new(&a, &a.admin_token());
    assert_eq!(api.get("/v1/pool")["encryption_key"], "unlocked");
    // Fields left out take the pool defaults; a request's fields win.
    let v = api.expect(
        201,
        "POST",
        "/v1/volumes",
        Some(json!({"name": "d", "size": 8 << 20})),
    );
    assert_eq!(
        (
            v["dedup"].clone(),
            v["compression"].clone(),
            v["encryption"].clone()
        ),
        (json!(true), json!(8), json!("sm4-xts"))
    );
    let p = api.expect(201, "POST", "/v1/volumes", Some(json!({"name": "p", "size": 8 << 20, "dedup": false, "compression": 0, "encryption": "none"})));
    assert_eq!(
        (p["dedup"].clone(), p["encryption"].clone()),
        (json!(false), json!("none"))
    );
    let ep = format!("unix:{}", a.sock.display());
    let t = stamp::tag("d");
    let c = stamp::write_nbd(&ep, "d", 0, &stamp::random(t, 0, 1 << 20, 1), true);
    drop(c);
    a.stop();
    // The same passphrase opens it again; another one stops the daemon.
    a.restart();
    let ep = format!("unix:{}", a.sock.display());
    let got = stamp::read_nbd(&ep, "d", 0, 2 << 20);
    stamp::verify_with(&got, t, 0, stamp::Body::Random, |o| {
        (o < 1 << 20).then_some(1)
    })
    .unwrap_or_else(|e| panic!("encrypted volume after restart: {e}"));
    a.stop();
    std::fs::write(&pass, "wrong horse\n").unwrap();
    let cfg = a.config.clone().unwrap();
    let err = snapshotd_refused(
        &a.data,
        work.path(),
        &["--config".as_ref(), cfg.as_os_str()],
    );
    assert!(err.contains("wrong key"), "{err}");
}
