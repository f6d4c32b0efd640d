//! An update bundle is outside bytes (uploaded through the API by an
//! admin, then read by root's installer). The header parser (magic,
//! manifest length, manifest JSON and its file rules, signature) must
//! refuse anything malformed without panicking or allocating beyond the
//! 64 KiB manifest bound; a parsed header is then checked against a
//! throwaway trusted key, which must refuse it (no signature can match).
//! Seeds: a real bundle's header made by `cdm-update bundle`.
#![no_main]

use cdm_appliance::bundle::{check_header, parse_header};
use cdm_appliance::keys::PublicKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_header(data) {
        assert!(h.len() as usize <= data.len());
        let key = PublicKey::new([7u8; 32]);
        let forged = PublicKey {
            id: h.manifest.key_id.clone(),
            ..key
        };
        assert!(check_header(&h, &[forged]).is_err());
    }
});
