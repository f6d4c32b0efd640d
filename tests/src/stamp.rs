//! Self-identifying test data. Every 512-byte sector carries a magic, the
//! volume's tag, its own byte offset and a per-write generation, and a body
//! derived from those three. A read served from the wrong place, the wrong
//! volume or an older write cannot match (no two sectors of a test are
//! alike, unlike a one-byte pattern), and a failed check names the first
//! bad sector and what it holds instead.
//!
//! Also the one qemu-io runner for `-P` pattern checks: some qemu-io
//! versions print "Pattern verification failed" and still exit 0.

use std::process::Command;

pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"CDMSTAMP";
/// Header: magic, tag, offset, generation (u64 little-endian each).
const HEADER: usize = 32;

/// A stable tag for a volume name (FNV-1a), so data written to one volume
/// is told apart from another's.
pub fn tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mix(mut x: u64) -> u64 {
    // splitmix64: a cheap bijective scrambler for the sector bodies.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How a sector's body is filled after the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Pseudo-random: incompressible, every byte depends on the header.
    Random,
    /// One 8-byte word derived from the header, repeated: compresses well
    /// (for compression tests) but still differs from every other sector.
    Compressible,
}

fn sector(out: &mut [u8], tag: u64, off: u64, gen: u64, body: Body) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&tag.to_le_bytes());
    out[16..24].copy_from_slice(&off.to_le_bytes());
    out[24..32].copy_from_slice(&gen.to_le_bytes());
    let seed = mix(tag ^ mix(off ^ mix(gen)));
    for (i, w) in out[HEADER..].chunks_mut(8).enumerate() {
        let v = match body {
            Body::Random => mix(seed.wrapping_add(i as u64)),
            Body::Compressible => seed,
        };
        w.copy_from_slice(&v.to_le_bytes()[..w.len()]);
    }
}

/// `len` bytes (a multiple of 512) for byte offset `off` (sector aligned)
/// of the volume tagged `tag`, generation `gen`.
pub fn data(tag: u64, off: u64, len: usize, gen: u64, body: Body) -> Vec<u8> {
    assert!(
        off.is_multiple_of(SECTOR as u64) && len.is_multiple_of(SECTOR),
        "stamps are whole sectors"
    );
    let mut v = vec![0u8; len];
    for (i, s) in v.chunks_mut(SECTOR).enumerate() {
        sector(s, tag, off + (i * SECTOR) as u64, gen, body);
    }
    v
}

/// Random-bodied stamps (the usual case).
pub fn random(tag: u64, off: u64, len: usize, gen: u64) -> Vec<u8> {
    data(tag, off, len, gen, Body::Random)
}

/// Bytes for writes that are not sector aligned: each byte depends on the
/// tag, its own absolute offset and the generation, so a read served from
/// elsewhere (any distance, another write) differs in all but about one
/// byte in 256. Check by comparing with a model built from these bytes.
pub fn unaligned(tag: u64, off: u64, len: usize, gen: u64) -> Vec<u8> {
    let key = mix(tag ^ mix(gen));
    (off..off + len as u64)
        .map(|p| mix(key ^ (p / 8)).to_le_bytes()[(p % 8) as usize])
        .collect()
}

/// What a sector holds: `Some((tag, offset, generation))` if it carries a
/// stamp header, `None` otherwise (zeros, foreign data).
pub fn decode(s: &[u8]) -> Option<(u64, u64, u64)> {
    if s.len() < HEADER || &s[..8] != MAGIC {
        return None;
    }
    let u = |o: usize| u64::from_le_bytes(s[o..o + 8].try_into().unwrap_or([0; 8]));
    Some((u(8), u(16), u(24)))
}

fn describe(s: &[u8]) -> String {
    match decode(s) {
        Some((t, o, g)) => format!("stamp of tag {t:#x}, offset {o}, generation {g}"),
        None if s.iter().all(|&b| b == 0) => "zeros".into(),
        None => format!("no stamp (starts {:02x?})", &s[..s.len().min(16)]),
    }
}

/// Checks `buf`, read at byte `off` of the volume tagged `tag`: each
/// sector must be the stamp of generation `gen(offset)`. `None` from `gen`
/// means the sector must read as zeros (never written, or discarded).
/// Returns the first bad sector, decoded.
pub fn verify_with(
    buf: &[u8],
    tag: u64,
    off: u64,
    body: Body,
    gen: impl Fn(u64) -> Option<u64>,
) -> Result<(), String> {
    if !buf.len().is_multiple_of(SECTOR) {
        return Err(format!("{} bytes is not whole sectors", buf.len()));
    }
    let mut want = [0u8; SECTOR];
    for (i, s) in buf.chunks(SECTOR).enumerate() {
        let at = off + (i * SECTOR) as u64;
        let ok = match gen(at) {
            Some(g) => {
                sector(&mut want, tag, at, g, body);
                s == want
            }
            None => s.iter().all(|&b| b == 0),
        };
        if !ok {
            let expected = match gen(at) {
                Some(g) => format!("stamp of tag {tag:#x}, offset {at}, generation {g}"),
                None => "zeros".into(),
            };
            let header_ok = gen(at).is_some() && decode(s) == Some((tag, at, gen(at).unwrap_or(0)));
            return Err(format!(
                "sector at byte {at}: expected {expected}, found {}{}",
                describe(s),
                if header_ok {
                    " with a damaged body"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(())
}

/// Checks that `buf` (read at `off`) is generation `gen` throughout.
pub fn verify(buf: &[u8], tag: u64, off: u64, gen: u64) -> Result<(), String> {
    verify_with(buf, tag, off, Body::Random, |_| Some(gen))
}

/// Panics with the first bad sector if `buf` is not generation `gen`.
#[track_caller]
pub fn assert_stamped(what: &str, buf: &[u8], tag: u64, off: u64, gen: u64) {
    if let Err(e) = verify(buf, tag, off, gen) {
        panic!("{what}: {e}");
    }
}

/// Reads `len` bytes at `off` of `export` at an NBD `endpoint`
/// (`unix:PATH` or `HOST:PORT`) with our client, 4 MiB per request.
pub fn read_nbd(endpoint: &str, export: &str, off: u64, len: usize) -> Vec<u8> {
    let mut c = nbd_proto::Client::connect(endpoint, Some(export), &Default::default())
        .unwrap_or_else(|e| panic!("connect to {endpoint} {export}: {e}"));
    let mut buf = vec![0u8; len];
    for (i, chunk) in buf.chunks_mut(4 << 20).enumerate() {
        let at = off + (i as u64) * (4 << 20);
        c.read(at, chunk)
            .unwrap_or_else(|e| panic!("read {export} at {at}: {e}"));
    }
    let _ = c.disconnect();
    buf
}

/// Writes `data` at `off` of `export` with our client (one request per
/// 4 MiB), then FLUSH if `flush`; returns the connection still open.
pub fn write_nbd(
    endpoint: &str,
    export: &str,
    off: u64,
    data: &[u8],
    flush: bool,
) -> nbd_proto::Client {
    let mut c = nbd_proto::Client::connect(endpoint, Some(export), &Default::default())
        .unwrap_or_else(|e| panic!("connect to {endpoint} {export}: {e}"));
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        let at = off + (i as u64) * (4 << 20);
        c.write(at, chunk, false)
            .unwrap_or_else(|e| panic!("write {export} at {at}: {e}"));
    }
    if flush {
        c.flush().unwrap_or_else(|e| panic!("flush {export}: {e}"));
    }
    c
}

/// Runs qemu-io (`args` as given, e.g. `-f raw URI -c 'read -P 0x3c 0 4M'`)
/// and fails on a non-zero exit OR on "Pattern verification failed" in its
/// output, which older qemu-io versions print with exit status 0. Returns
/// stdout.
#[track_caller]
pub fn qemu_io(args: &[&str]) -> String {
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .expect("run qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-io {args:?} failed ({}): {stdout}{stderr}",
        out.status
    );
    pattern_ok(&format!("{stdout}{stderr}")).unwrap_or_else(|e| panic!("qemu-io {args:?}: {e}"));
    stdout
}

/// Fails if qemu-io's output reports a pattern mismatch.
pub fn pattern_ok(output: &str) -> Result<(), String> {
    match output
        .lines()
        .find(|l| l.contains("Pattern verification failed"))
    {
        Some(l) => Err(l.to_string()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sector_differs_and_checks() {
        let t = tag("vol");
        let d = random(t, 4096, 64 << 10, 7);
        let mut seen = std::collections::HashSet::new();
        for s in d.chunks(SECTOR) {
            assert!(seen.insert(s.to_vec()), "two sectors alike");
        }
        verify(&d, t, 4096, 7).unwrap();
        let c = data(t, 0, 8192, 1, Body::Compressible);
        assert!(
            c.chunks(SECTOR)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 16
        );
    }

    #[test]
    fn misplaced_stale_foreign_and_torn_sectors_are_named() {
        let t = tag("vol");
        let d = random(t, 0, 8 << 10, 2);
        // A read served from the neighbouring sector.
        let mut m = d.clone();
        m[1024..1536].copy_from_slice(&d[1536..2048]);
        let e = verify(&m, t, 0, 2).unwrap_err();
        assert!(e.contains("byte 1024") && e.contains("offset 1536"), "{e}");
        // An older generation.
        let mut s = d.clone();
        s[..512].copy_from_slice(&random(t, 0, 512, 1));
        let e = verify(&s, t, 0, 2).unwrap_err();
        assert!(e.contains("generation 1"), "{e}");
        // Another volume.
        let e = verify(&random(tag("other"), 0, 512, 2), t, 0, 2).unwrap_err();
        assert!(e.contains(&format!("{:#x}", tag("other"))), "{e}");
        // Header right, body torn.
        let mut b = d.clone();
        b[600] ^= 1;
        let e = verify(&b, t, 0, 2).unwrap_err();
        assert!(e.contains("byte 512") && e.contains("damaged body"), "{e}");
        // Zeros where data was expected, data where zeros were.
        let e = verify(&[0u8; 512], t, 0, 2).unwrap_err();
        assert!(e.contains("found zeros"), "{e}");
        let e = verify_with(&d[..512], t, 0, Body::Random, |_| None).unwrap_err();
        assert!(e.contains("expected zeros"), "{e}");
    }

    #[test]
    fn unaligned_bytes_do_not_repeat() {
        let d = unaligned(1, 1000, 64 << 10, 3);
        assert_eq!(d[..100], unaligned(1, 1000, 100, 3)[..]);
        assert_eq!(d[8..100], unaligned(1, 1008, 92, 3)[..]);
        for shift in [1usize, 8, 256, 512, 4096] {
            let same = d.iter().zip(&d[shift..]).filter(|(a, b)| a == b).count();
            assert!(same * 100 < d.len(), "shift {shift}: {same} equal bytes");
        }
        assert_ne!(d[..64], unaligned(1, 1000, 64, 4)[..]);
        assert_ne!(d[..64], unaligned(2, 1000, 64, 3)[..]);
    }

    #[test]
    fn pattern_failure_text_fails_even_with_status_zero() {
        assert!(pattern_ok("read 4096/4096 bytes at offset 0\n").is_ok());
        assert!(pattern_ok("Pattern verification failed at offset 0, 4096 bytes\nread 4096/4096 bytes at offset 0\n").is_err());
    }
}
