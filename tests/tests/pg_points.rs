//! What a PostgreSQL backup point costs the pool (issue 14): after a full
//! backup and about 2% of the pages changed, the next point grows the
//! pool by little more than the 4 KiB units of the data directory that
//! differ between the two points; its WAL is only what replay reads (from
//! the start LSN's page to the stop LSN's, plus each segment's first
//! page); and restored instantly it starts and holds exactly the source's
//! data at backup time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cdm_e2e::pg::*;
use cdm_e2e::AgentCli as Agent;
use cdm_e2e::*;
use serde_json::Value;

/// Every table's rows, hashed (pgbench's four tables).
const TABLES_MD5: &str = "SELECT md5(string_agg(t, '|')) FROM ( \
    SELECT (SELECT md5(string_agg(aid || ':' || bid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts) AS t \
    UNION ALL SELECT (SELECT md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid)) FROM pgbench_tellers) \
    UNION ALL SELECT (SELECT md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches) \
    UNION ALL SELECT (SELECT md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta || ':' || mtime, ',' \
        ORDER BY tid, bid, aid, delta, mtime)) FROM pgbench_history)) x";

const UNIT: usize = 4096;

fn lsn(s: &str) -> u64 {
    let (a, b) = s.split_once('/').expect("an LSN");
    (u64::from_str_radix(a, 16).unwrap() << 32) | u64::from_str_radix(b, 16).unwrap()
}

fn files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files(root, &r, out);
        } else if t.is_file() {
            out.push(r);
        }
    }
}

/// 4 KiB units of the files under `pgdata` in `new` that differ from
/// `old` (a unit past the old file's end counts unless it is zeros).
fn changed_units(old: &Path, new: &Path) -> u64 {
    let mut list = Vec::new();
    files(new, Path::new("pgdata"), &mut list);
    let mut n = 0;
    for rel in list {
        let b = std::fs::read(new.join(&rel)).unwrap();
        let a = std::fs::read(old.join(&rel)).unwrap_or_default();
        for (i, u) in b.chunks(UNIT).enumerate() {
            let o = a.get(i * UNIT..((i + 1) * UNIT).min(a.len()));
            let same = match o {
                Some(o) => o == u,
                None => u.iter().all(|&x| x == 0),
            };
            if !same {
                n += 1;
            }
        }
    }
    n
}

fn attach_point(agent: &Agent, export: &str, name: &str) -> PathBuf {
    let v = agent.ok(&["attach", export, "--read-only", "--name", name]);
    PathBuf::from(v["mount"].as_str().expect("mount"))
}

/// The pool's used bytes once what was freed is reusable (two periodic
/// commits): blocks a point's copy-on-write freed are not its cost.
fn pool_used(api: &Api) -> u64 {
    wait_for(60, "freed blocks to become reusable", || {
        let p = api.get("/v1/pool");
        (p["freeing_bytes"] == 0).then(|| p["used_bytes"].as_u64().unwrap())
    })
}

#[test]
fn a_point_stores_what_changed_and_only_the_wal_replay_reads() {
    let _load = shared();
    let app = Appliance::start(None);
    let api = Api::new(&app, &app.admin_token());
    let agent = Agent::new(&app);
    let pg = Pg::init(10);
    let mut conn = pg.agent_args();
    conn.splice(
        0..0,
        ["backup", "postgres", "--volume", "pgpoint"].map(String::from),
    );
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = conn.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| -> Value {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        agent.ok(&a)
    };
    let full = run(args(&["--size", "1G"]));
    // About 2% of the accounts pages (each transaction updates one random
    // account), then a checkpoint, as a daily backup would find them.
    let pages: u64 = psql(
        &pg.sock,
        pg.port,
        "SELECT relpages FROM pg_class WHERE relname = 'pgbench_accounts'",
    )
    .parse()
    .unwrap();
    pg.pgbench((pages / 50 / 2) as u32);
    psql(&pg.sock, pg.port, "CHECKPOINT");
    let at_backup = psql(&pg.sock, pg.port, TABLES_MD5);
    let used0 = pool_used(&api);
    let point = run(args(&[]));
    let grew = pool_used(&api) - used0;
    // The source moves on after the backup.
    pg.pgbench(100);
    assert_ne!(psql(&pg.sock, pg.port, TABLES_MD5), at_backup);

    let (a, b) = (
        full["export"].as_str().unwrap(),
        point["export"].as_str().unwrap(),
    );
    let old = attach_point(&agent, a, "p-old");
    let new = attach_point(&agent, b, "p-new");
    let units = changed_units(&old, &new);
    assert!(
        units > 200,
        "only {units} units changed: pgbench did not run?"
    );

    // The WAL in the point: from the start LSN's page to the stop LSN's
    // (rounded to the filesystem's 4 KiB) and each segment's first page;
    // the rest of each 16 MiB segment is a hole.
    let (start, stop) = (
        lsn(point["postgres"]["start_lsn"].as_str().unwrap()),
        lsn(point["postgres"]["stop_lsn"].as_str().unwrap()),
    );
    let segs = point["postgres"]["wal"].as_array().unwrap().len() as u64;
    assert!(segs >= 1);
    let mut wal_alloc = 0;
    let mut wal_files = Vec::new();
    for e in std::fs::read_dir(new.join("pgdata/pg_wal")).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_file() {
            assert_eq!(m.len(), 16 << 20, "{:?} is not a whole segment", e.path());
            wal_alloc += m.blocks() * 512;
            wal_files.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    wal_files.sort();
    let mut want: Vec<String> = point["postgres"]["wal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    want.sort();
    assert_eq!(wal_files, want, "the point holds other WAL than it needs");
    let wal_bound = (stop - start) + segs * (8192 + 2 * 4096);
    assert!(
        wal_alloc <= wal_bound,
        "pg_wal holds {wal_alloc} bytes for {} bytes of WAL in {segs} segment(s) (bound {wal_bound})",
        stop - start
    );

    // The pool grew by the units that changed (each stored once, as
    // written) and a fixed allowance for the stage filesystem's journal
    // and inodes and the engine's tree nodes; not by whole 8 KiB blocks
    // where 4 KiB changed, a rewritten fingerprint file or a copied tree
    // leaf per changed page.
    let data = units * UNIT as u64;
    let bound = data + data / 4 + (3 << 19);
    eprintln!(
        "point: pool grew {grew} bytes; {units} changed 4 KiB units = {data} bytes (bound {bound}); \
         pg_wal allocated {wal_alloc} bytes for {} bytes of WAL (bound {wal_bound}); merge wrote {}",
        stop - start,
        point["bytes_written"]
    );
    assert!(
        grew <= bound,
        "the point grew the pool by {grew} bytes for {data} bytes of changed 4 KiB units (bound {bound}); \
         the merge wrote {}",
        point["bytes_written"]
    );
    agent.ok(&["detach", "p-old"]);
    agent.ok(&["detach", "p-new"]);

    // Restored instantly, it starts and holds the source's data at backup
    // time, to the row.
    let port = pg_port();
    let v = agent.ok(&[
        "restore",
        "instant",
        b,
        "--name",
        "p-inst",
        "--port",
        &port.to_string(),
    ]);
    let sock = PathBuf::from(v["postgres"]["socket_dir"].as_str().unwrap());
    assert_eq!(psql(&sock, port, TABLES_MD5), at_backup);
    assert_eq!(psql(&sock, port, "SELECT pg_is_in_recovery()"), "f");
    agent.ok(&["detach", "p-inst", "--delete-clone"]);
}
