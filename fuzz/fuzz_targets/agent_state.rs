//! Bytes the agent reads back from places others can write: the
//! fingerprint file on a stage disk (a damaged or foreign disk can hold
//! anything), the block fingerprints in its state directory, and bandwidth
//! windows from the command line or the configuration. Nothing may panic;
//! block fingerprints that decode must encode back to the same bytes.
#![no_main]

use cdm_agent::block::Fingerprints;
use cdm_agent::throttle::Window;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cdm_agent::merge::decode(data);
    if let Ok(f) = Fingerprints::decode(data) {
        assert_eq!(f.encode(), data);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(w) = Window::parse(text) {
            assert!(w.limit_mibps >= 0.0);
        }
    }
});
