use super::*;
use crate::keys;
use crate::testutil::{read, Fixture};

fn refusal(f: &Fixture, bytes: &[u8]) -> String {
    let p = f.path("mutated.cdmb");
    std::fs::write(&p, bytes).unwrap();
    verify_path(&p, &f.trusted).unwrap_err().to_string()
}

fn other_arch() -> &'static str {
    if crate::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    }
}

/// Re-signs a modified manifest, so the check after the signature is hit.
fn resigned(f: &Fixture, manifest: &str, payloads: &[u8]) -> Vec<u8> {
    let mut out = encode_header(manifest.as_bytes(), &f.secret);
    out.extend_from_slice(payloads);
    out
}

#[test]
fn round_trip() {
    let f = Fixture::new();
    let (p, m) = f.bundle("b.cdmb", "1.2.3", crate::ARCH, 3 * CHUNK + 17);
    let v = verify_path(&p, &f.trusted).unwrap();
    assert_eq!(v.manifest(), &m);
    assert_eq!(m.key_id, f.trusted[0].id);
    assert_eq!(m.files.len(), 3);
    let (rootfs, off) = v.payload("rootfs").unwrap();
    assert_eq!(rootfs.size, 3 * CHUNK as u64 + 17);
    let bytes = read(&p);
    assert_eq!(&bytes[..8], MAGIC);
    let src = read(&f.path("b.cdmb.rootfs"));
    assert_eq!(&bytes[off as usize..off as usize + src.len()], &src[..]);
    assert_eq!(
        bytes.len() as u64,
        v.header.len() + m.files.iter().map(|e| e.size).sum::<u64>()
    );
}

#[test]
fn every_flipped_byte_region_is_refused_with_its_reason() {
    let f = Fixture::new();
    let (p, _) = f.bundle("b.cdmb", "1.2.3", crate::ARCH, 10_000);
    let good = read(&p);
    let v = verify_path(&p, &f.trusted).unwrap();
    let hl = v.header.len() as usize;
    let mlen = v.header.manifest_bytes.len();

    // A byte inside the version string: still JSON, so the signature fails.
    let at = 12 + find(&v.header.manifest_bytes, b"1.2.3");
    let mut b = good.clone();
    b[at] ^= 0x04;
    assert!(
        refusal(&f, &b).contains("bad signature"),
        "{}",
        refusal(&f, &b)
    );
    // The signature itself.
    let mut b = good.clone();
    b[12 + mlen + 5] ^= 1;
    assert!(refusal(&f, &b).starts_with("bad signature"));
    // The magic.
    let mut b = good.clone();
    b[0] ^= 1;
    assert!(refusal(&f, &b).contains("bad magic"));
    // Each payload: first, middle and last byte.
    for name in FILE_NAMES {
        let (e, off) = v.payload(name).unwrap();
        for i in [0, e.size / 2, e.size - 1] {
            let mut b = good.clone();
            b[(off + i) as usize] ^= 0x80;
            assert_eq!(refusal(&f, &b), format!("hash mismatch of {name}"));
        }
    }
    // A JSON-breaking flip of the manifest.
    let mut b = good.clone();
    b[12] = b'x';
    assert!(refusal(&f, &b).starts_with("manifest is not valid JSON"));
    assert!(hl > 12 + mlen);
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn truncation_anywhere_and_trailing_bytes_are_refused() {
    let f = Fixture::new();
    let (p, _) = f.bundle("b.cdmb", "1.2.3", crate::ARCH, 10_000);
    let good = read(&p);
    let v = verify_path(&p, &f.trusted).unwrap();
    let hl = v.header.len() as usize;
    let mlen = v.header.manifest_bytes.len();
    let cases = [
        (0, "truncated bundle: it ends inside the header"),
        (5, "truncated bundle: it ends inside the header"),
        (10, "truncated bundle: it ends inside the header"),
        (12, "truncated bundle: it ends inside the manifest"),
        (
            12 + mlen / 2,
            "truncated bundle: it ends inside the manifest",
        ),
        (
            12 + mlen + 1,
            "truncated bundle: it ends inside the signature",
        ),
        (hl, "truncated bundle: it ends inside the payload rootfs"),
        (
            hl + 9_999,
            "truncated bundle: it ends inside the payload rootfs",
        ),
        (
            hl + 10_000,
            "truncated bundle: it ends inside the payload kernel",
        ),
        (
            good.len() - 1,
            "truncated bundle: it ends inside the payload initrd",
        ),
    ];
    for (cut, want) in cases {
        assert_eq!(refusal(&f, &good[..cut]), want, "cut at {cut}");
    }
    let mut b = good.clone();
    b.push(0);
    assert_eq!(
        refusal(&f, &b),
        "trailing bytes after the last payload (1 bytes)"
    );
}

#[test]
fn other_key_arch_and_compatible_are_refused() {
    let f = Fixture::new();
    let (p, m) = f.bundle("b.cdmb", "1.2.3", crate::ARCH, 100);
    // A key that is not trusted.
    let other = Fixture::new();
    let e = verify_path(&p, &other.trusted).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("bundle is signed by an unknown key {}", m.key_id)
    );
    // A trusted key whose id matches but whose bytes do not verify cannot
    // happen by chance; a forged key_id under another key's signature:
    let mut forged = other.trusted[0].clone();
    forged.id = m.key_id.clone();
    let e = verify_path(&p, &[forged]).unwrap_err().to_string();
    assert!(e.starts_with("bad signature"), "{e}");

    let (p, _) = f.bundle("arm.cdmb", "1.2.3", other_arch(), 100);
    let e = verify_path(&p, &f.trusted).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "bundle is for {}, this appliance is {}",
            other_arch(),
            crate::ARCH
        )
    );

    let payloads = &read(&p)[verify_path_header(&p).len() as usize..];
    let mut mm: serde_json::Value =
        serde_json::from_slice(&verify_path_header(&p).manifest_bytes).unwrap();
    mm["compatible"] = "toaster".into();
    mm["arch"] = crate::ARCH.into();
    let e = refusal(&f, &resigned(&f, &mm.to_string(), payloads));
    assert!(
        e.contains("wrong compatible") && e.contains("toaster"),
        "{e}"
    );
}

fn verify_path_header(p: &Path) -> Header {
    read_header(&File::open(p).unwrap(), p).unwrap()
}

#[test]
fn manifest_rules_are_enforced() {
    let f = Fixture::new();
    let (p, m) = f.bundle("b.cdmb", "1.2.3", crate::ARCH, 100);
    let h = verify_path_header(&p);
    let payloads = read(&p)[h.len() as usize..].to_vec();
    let base: serde_json::Value = serde_json::from_slice(&h.manifest_bytes).unwrap();

    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        edit(&mut v);
        refusal(&f, &resigned(&f, &v.to_string(), &payloads))
    };
    let e = with(&|v| v["files"][2]["name"] = "kernel".into());
    assert_eq!(e, "manifest files: file \"kernel\" is listed twice");
    let e = with(&|v| {
        v["files"].as_array_mut().unwrap().pop();
    });
    assert_eq!(e, "manifest files: file \"initrd\" is missing");
    let e = with(&|v| v["files"][0]["name"] = "bootloader".into());
    assert_eq!(e, "manifest files: unknown file \"bootloader\"");
    let e = with(&|v| {
        v["files"][0]["size"] = u64::MAX.into();
    });
    assert_eq!(e, "manifest files: payload sizes overflow");
    let e = with(&|v| v["files"][1]["size"] = (u64::MAX - 200).into());
    assert_eq!(e, "manifest files: payload sizes overflow");
    let e = with(&|v| v["format"] = 2.into());
    assert_eq!(e, "unsupported bundle format 2 (this tool reads format 1)");
    let e = with(&|v| v["version"] = "1.0\noptions init=/bin/sh".into());
    assert_eq!(
        e,
        "manifest: version \"1.0\\noptions init=/bin/sh\" is not 1-128 characters of A-Z a-z 0-9 . _ + - ~"
    );
    let e = with(&|v| v["version"] = "".into());
    assert!(e.starts_with("manifest: version \"\" is not"), "{e}");
    let e = with(&|v| v["key_id"] = "abc\n".into());
    assert_eq!(e, "manifest: key_id \"abc\\n\" is not 16 hex digits");
    // Downgrade protection depends on the index: a manifest without it
    // (or with a negative one) is no bundle of format 1.
    let e = with(&|v| {
        v.as_object_mut().unwrap().remove("rollback_index");
    });
    assert!(
        e.starts_with("manifest is not valid JSON: missing field `rollback_index`"),
        "{e}"
    );
    let e = with(&|v| v["rollback_index"] = (-1).into());
    assert!(e.starts_with("manifest is not valid JSON"), "{e}");
    let e = with(&|v| v["files"][0]["sha256"] = "zz".into());
    assert_eq!(e, "manifest files: sha256 of rootfs is not 64 hex digits");
    // A size that still adds up but lies: the payload boundaries move.
    let e = with(&|v| {
        v["files"][0]["size"] = (m.files[0].size - 1).into();
        v["files"][1]["size"] = (m.files[1].size + 1).into();
    });
    assert_eq!(e, "hash mismatch of rootfs");

    // Manifest length: too large and zero.
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&(MAX_MANIFEST + 1).to_le_bytes());
    b.resize(200, b' ');
    assert_eq!(
        refusal(&f, &b),
        "manifest length 65537 is outside 1..=65536"
    );
    b[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(refusal(&f, &b), "manifest length 0 is outside 1..=65536");
    // The largest allowed manifest parses (padding is valid JSON space).
    let mut big = serde_json::to_vec(&m).unwrap();
    big.resize(MAX_MANIFEST as usize, b' ');
    let mut b = encode_header(&big, &f.secret);
    b.extend_from_slice(&payloads);
    let p2 = f.path("big.cdmb");
    std::fs::write(&p2, &b).unwrap();
    verify_path(&p2, &f.trusted).unwrap();
}

#[test]
fn parse_header_never_panics_on_short_or_odd_input() {
    for n in 0..40usize {
        let b = vec![0xffu8; n];
        assert!(parse_header(&b).is_err());
    }
    assert!(matches!(
        parse_header(b"CDMB"),
        Err(BundleError::Truncated(_))
    ));
    assert!(matches!(parse_header(b"XDMB"), Err(BundleError::BadMagic)));
    let _ = keys::key_id(b"");
}
