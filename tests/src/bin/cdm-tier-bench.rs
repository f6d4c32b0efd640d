//! `cdm-tier-bench`: the object-storage tier's store-side figures
//! (docs/benchmarks.md, `scripts/bench-tier`) against a real S3 server
//! (s3s-fs) on loopback:
//!
//! - upload throughput of verified pack puts (PUT with SHA-256 and MD5,
//!   then HEAD), and requests per pack;
//! - ranged GETs of 4 MiB straight from the store (what the cache adds
//!   to a cold read is the difference);
//! - sequential reads of every pack through `TierReader` in 128 KiB
//!   requests: cold (an empty cache, read-ahead on) and warm (all hits),
//!   against the same bytes read from a local file;
//! - objects per TiB at this pack size against one object per ~1.4 MiB
//!   chunk (Proxmox Backup Server's S3 datastore).
//!
//! Usage: `cdm-tier-bench [--packs N] [--pack-mib M]` (defaults 16, 16).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use cdm_e2e::s3::S3Server;
use cdm_tier::cache::CacheConfig;
use cdm_tier::{pack_key, Op, PackCache, S3Config, S3Store, TierMetrics, TierReader};

const MIB: u64 = 1 << 20;
const READ: u64 = 128 << 10;

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name}: not a number")),
        None => Ok(default),
    }
}

/// Incompressible, distinct per pack.
fn pack(id: u64, len: u64) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// Reads `file` from start to `pack_len` in 128 KiB requests, `packs`
/// times; seconds taken.
fn local_pass(file: &std::fs::File, packs: u64, pack_len: u64) -> Result<f64> {
    let mut buf = vec![0u8; READ as usize];
    let t = Instant::now();
    for _ in 0..packs {
        let mut off = 0;
        while off < pack_len {
            file.read_exact_at(&mut buf, off)?;
            off += READ;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let packs = arg(&args, "--packs", 16)?;
    let pack_len = arg(&args, "--pack-mib", 16)? * MIB;
    ensure!(
        packs > 0 && pack_len > 0,
        "--packs and --pack-mib must be above 0"
    );
    let total = packs * pack_len;

    let server = S3Server::start();
    let (ak, sk) = server.keys();
    let cfg = S3Config::new(&server.endpoint(), server.bucket(), ak, sk);
    let metrics = Arc::new(TierMetrics::default());
    let store = Arc::new(S3Store::with_metrics(cfg, metrics.clone())?);

    let data: Vec<Vec<u8>> = (0..packs).map(|p| pack(p, pack_len)).collect();
    let t = Instant::now();
    for (p, d) in data.iter().enumerate() {
        store.put(&pack_key(p as u64), d)?;
    }
    let up = t.elapsed().as_secs_f64();
    let put_requests = metrics.requests(Op::Put) + metrics.requests(Op::Head);

    // The store alone: ranged GETs of 4 MiB, the size of one read-ahead.
    let t = Instant::now();
    for p in 0..packs {
        let mut off = 0;
        while off < pack_len {
            let len = (4 * MIB).min(pack_len - off);
            let got = store.get_range(&pack_key(p), off, len)?;
            ensure!(got.len() as u64 == len, "raw GET of pack {p} at {off}");
            off += len;
        }
    }
    let raw = t.elapsed().as_secs_f64();

    let cache_dir = tempfile::tempdir_in("/var/tmp")?;
    let cache = PackCache::open(
        CacheConfig::new(cache_dir.path(), total + MIB),
        metrics.clone(),
    )?;
    let reader = TierReader::new(store.clone(), cache);
    let read_all = |what: &str| -> Result<f64> {
        let t = Instant::now();
        for p in 0..packs {
            let mut off = 0;
            while off < pack_len {
                let got = reader.read(p, off, READ as u32)?;
                ensure!(
                    got == data[p as usize][off as usize..(off + READ) as usize],
                    "{what}: pack {p} at {off} differs"
                );
                off += READ;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let gets0 = metrics.requests(Op::Get);
    let cold = read_all("cold")?;
    let cold_gets = metrics.requests(Op::Get) - gets0;
    let (h0, m0) = (
        TierMetrics::get(&metrics.cache_hits),
        TierMetrics::get(&metrics.cache_misses),
    );
    let warm = read_all("warm")?;
    let warm_hits = TierMetrics::get(&metrics.cache_hits) - h0;
    let warm_misses = TierMetrics::get(&metrics.cache_misses) - m0;

    // The same bytes from a local file (the server's own copy of pack 0,
    // read once first so it is in the page cache like the warm cache).
    let local = std::fs::File::open(server.object_path(&pack_key(0)))?;
    local_pass(&local, packs, pack_len)?;
    let local_secs = local_pass(&local, packs, pack_len)?;

    let tib = 1u64 << 40;
    let pbs_chunk = 1.4 * MIB as f64;
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| upload, {packs} packs of {} MiB (PUT with SHA-256 + MD5, then HEAD) | {:.0} MiB/s, {} requests ({} per pack) |",
        pack_len / MIB,
        mibps(total, up),
        put_requests,
        put_requests / packs
    );
    println!(
        "| ranged GETs of 4 MiB straight from the store (no cache) | {:.0} MiB/s |",
        mibps(total, raw)
    );
    println!(
        "| cold sequential read through the cache (128 KiB reads, 1 MiB chunks, read-ahead 4) | {:.0} MiB/s, {} GETs ({:.1} per MiB) |",
        mibps(total, cold),
        cold_gets,
        cold_gets as f64 / (total / MIB) as f64
    );
    println!(
        "| warm read (all from the cache) | {:.0} MiB/s, {warm_hits} hits, {warm_misses} misses |",
        mibps(total, warm)
    );
    println!(
        "| the same reads from a local file (page cache) | {:.0} MiB/s |",
        mibps(total, local_secs)
    );
    println!(
        "| objects per TiB: {} MiB packs vs ~1.4 MiB chunk objects | {} vs {:.0} ({:.1}× fewer) |",
        pack_len / MIB,
        tib / pack_len,
        tib as f64 / pbs_chunk,
        (tib as f64 / pbs_chunk) / (tib / pack_len) as f64
    );
    Ok(())
}
