//! Throughput of each data-pipeline stage on one core, over 64 KiB and
//! 4 KiB chunks of a real file: `cargo run --release -p cdmfs --example
//! pipeline_bench -- FILE`. Used by scripts/bench-reduction.

use std::time::Instant;

use cdmfs::format::Extent;
use cdmfs::pipeline::{self, Cipher, KeySource, Keys};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: pipeline_bench FILE"))?;
    let mut data = std::fs::read(&path)?;
    data.truncate((256 << 20).min(data.len() / 65536 * 65536));
    let mb = data.len() as f64 / 1e6;
    let (_, keys) = Keys::create(&KeySource::Key(vec![1; 32]))?;
    println!("| stage | chunk | MB/s (one core) |\n|---|---:|---:|");
    for bs in [65536usize, 4096] {
        let time = |name: &str, f: &mut dyn FnMut(&[u8])| {
            let t = Instant::now();
            for c in data.chunks(bs) {
                f(c);
            }
            println!(
                "| {name} | {} KiB | {:.0} |",
                bs / 1024,
                mb / t.elapsed().as_secs_f64()
            );
        };
        time("fingerprint (blake3)", &mut |c| {
            std::hint::black_box(pipeline::fingerprint(None, None, c));
        });
        time("fingerprint (keyed blake3)", &mut |c| {
            std::hint::black_box(pipeline::fingerprint(
                Some(&keys),
                Some(Cipher::Aes256Xts),
                c,
            ));
        });
        for level in [1u8, 8, 29] {
            if level == 29 && bs == 4096 {
                continue;
            }
            let name = format!(
                "compress level {level} (zstd {})",
                pipeline::zstd_level(level)
            );
            time(&name, &mut |c| {
                std::hint::black_box(pipeline::compress(level, c));
            });
        }
        let packed: Vec<(Vec<u8>, bool)> = data
            .chunks(bs)
            .map(|c| match pipeline::compress(8, c) {
                Some(z) => (z, true),
                None => (c.to_vec(), false),
            })
            .collect();
        let t = Instant::now();
        for (z, compressed) in &packed {
            let e = Extent {
                addr: 1000,
                stored_len: z.len() as u32,
                csum: 0,
                flags: if *compressed {
                    cdmfs::format::flags::COMPRESSED
                } else {
                    0
                },
                aux: 0,
            };
            let mut s = z.clone();
            std::hint::black_box(pipeline::decode(None, &e, &mut s, bs)?);
        }
        println!(
            "| decompress level 8 | {} KiB | {:.0} |",
            bs / 1024,
            mb / t.elapsed().as_secs_f64()
        );
        for c in Cipher::ALL {
            let mut buf = vec![0u8; bs];
            time(&format!("encrypt {}", c.name()), &mut |chunk| {
                buf[..chunk.len()].copy_from_slice(chunk);
                pipeline::encrypt(&keys, c, 77, &mut buf[..chunk.len().max(16)]);
            });
        }
        time("crc32c", &mut |c| {
            std::hint::black_box(cdmfs::format::crc(c));
        });
    }
    Ok(())
}
