//! Sealed-block decoding (`cdmfs::pipeline::unseal_block`) of outside
//! bytes under a fixed test key: a raw replica's blocks arrive from
//! another pool, so decoding them must never panic, whatever they hold.
//! It also seals the input as a plain block and checks it unseals back.
//!
//! Input layout:
//!   byte 0        mode: bits 0-2 pick the block size (512 B … 1 MiB, one
//!                 short-last-block size); bit 3: write the compressed
//!                 form's magic and bytes 1..5 as its length; bit 4: also
//!                 encrypt the payload under the block's tweak, so the zstd
//!                 decoder sees fuzzer-chosen bytes
//!   bytes 1..5    payload length (u32 LE) for bit 3
//!   bytes 5..     the block, padded with zeros or truncated to its size
#![no_main]

use std::sync::OnceLock;

use cdmfs::pipeline::{encrypt, seal_block, unseal_block, Keys, SealRec, SEAL_MAGIC};
use cdmfs::{Cipher, KeySource};
use libfuzzer_sys::fuzz_target;

const SIZES: [usize; 8] = [512, 1024, 4096, 4608, 8192, 65536, 65536 + 512, 1 << 20];
const INDEX: u64 = 5;

fn keys() -> &'static (Keys, SealRec) {
    static K: OnceLock<(Keys, SealRec)> = OnceLock::new();
    K.get_or_init(|| {
        let src = KeySource::Key(vec![0x5a; 32]);
        let (crypto, _) = Keys::create(&src).expect("test key");
        let keys = Keys::unlock_seal(&crypto, &src).expect("test key unlocks");
        let rec = SealRec {
            version: 1,
            crypto,
            cipher: Cipher::Aes256Xts,
            nonce: 0x0123_4567_89ab_cdef,
        };
        (keys, rec)
    })
}

fuzz_target!(|data: &[u8]| {
    let (keys, rec) = keys();
    let mode = data.first().copied().unwrap_or(0);
    let n = SIZES[(mode & 7) as usize];
    let body = data.get(5..).unwrap_or(&[]);
    let mut block = vec![0u8; n];
    let m = body.len().min(n);
    block[..m].copy_from_slice(&body[..m]);

    // Round trip of the input as a plain block.
    let mut sealed = vec![0u8; n];
    seal_block(keys, rec, INDEX, &block, &mut sealed).expect("sealing a block");
    let mut back = vec![0u8; n];
    unseal_block(keys, rec, INDEX, &sealed, &mut back).expect("unsealing what was sealed");
    assert_eq!(back, block, "sealed block does not round-trip");

    // Outside bytes as a sealed block.
    if mode & 8 != 0 {
        let mut l = [0u8; 4];
        let h = data.get(1..5).unwrap_or(&[]);
        l[..h.len()].copy_from_slice(h);
        block[..12].copy_from_slice(&SEAL_MAGIC);
        block[12..16].copy_from_slice(&l);
        let l = u32::from_le_bytes(l) as usize;
        if mode & 16 != 0 && (32..=n - 16).contains(&l) {
            let tweak = ((rec.nonce as u128) << 64) | INDEX as u128 | 1 << 63;
            encrypt(keys, rec.cipher, tweak, &mut block[16..16 + l]);
            block[16 + l..].fill(0);
        }
    }
    let mut out = vec![0u8; n];
    let _ = unseal_block(keys, rec, INDEX, &block, &mut out);
});
