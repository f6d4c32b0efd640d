//! The object store's answers are outside bytes: a ListObjectsV2 page, a
//! DeleteObjects result and an error body are parsed from whatever the
//! endpoint sends (a misconfigured proxy, a hostile server). Each parser
//! must refuse malformed text with an error, never panic; what a list
//! page yields is bounded by the body.
#![no_main]

use cdm_tier::store::{parse_delete, parse_list};
use cdm_tier::xml::error_fields;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((keys, token)) = parse_list(body) {
        assert!(keys.iter().map(|(k, _)| k.len()).sum::<usize>() <= body.len());
        assert!(token.map_or(0, |t| t.len()) <= body.len());
    }
    let _ = parse_delete(body);
    let (code, message) = error_fields(body);
    assert!(code.len() <= body.len() && message.len() <= body.len());
});
