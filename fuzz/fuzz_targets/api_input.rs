//! Outside bytes the API parses beyond serde: cron expressions of snapshot
//! schedules (parse, then search the next run), and request bodies decoded
//! into every resource a client sends. Nothing may panic; a parsed cron
//! expression's next run must be a real match after the start time.
#![no_main]

use cdm_api::cron::Cron;
use cdm_api::types::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Cron::parse(text) {
            let start = 1_795_478_400u64;
            if let Some(t) = c.next_after(start) {
                assert!(t > start && t % 60 == 0);
                assert!(c.day_matches((t / 86_400) as i64));
            }
        }
    }
    let _ = serde_json::from_slice::<VolumeCreate>(data);
    let _ = serde_json::from_slice::<SnapshotCreate>(data);
    let _ = serde_json::from_slice::<SnapshotPolicy>(data);
    let _ = serde_json::from_slice::<UserCreate>(data);
    let _ = serde_json::from_slice::<WebhookCreate>(data);
    let _ = serde_json::from_slice::<JobCreate>(data);
});
