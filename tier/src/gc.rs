//! Garbage collection of packs: list `packs/`, delete in batches every
//! pack the caller does not name as referenced. The caller's set must
//! include packs being uploaded by a tiering run that has not committed
//! yet (or GC must not overlap one): GC cannot tell an orphan from a pack
//! whose reference is about to be committed.

use std::collections::HashSet;

use tracing::info;

use crate::{parse_pack_key, S3Store, TierError, PACKS_DIR};

#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct GcReport {
    /// Objects listed under `packs/`.
    pub listed: usize,
    /// Referenced packs left in place.
    pub kept: usize,
    pub deleted: usize,
    pub deleted_bytes: u64,
    /// Keys under `packs/` that are not pack keys: left alone.
    pub unparsed: usize,
    /// `(key, code, message)` of packs the store refused to delete.
    pub failed: Vec<(String, String, String)>,
    /// DeleteObjects requests made.
    pub delete_requests: usize,
}

/// Deletes every pack under the store's prefix whose id is not in
/// `referenced`. Other keys, under `packs/` or elsewhere, are left.
pub fn gc(store: &S3Store, referenced: &HashSet<u64>) -> Result<GcReport, TierError> {
    let mut r = GcReport::default();
    let mut doomed = Vec::new();
    let mut doomed_bytes = Vec::new();
    for (key, size) in store.list(PACKS_DIR)? {
        r.listed += 1;
        match parse_pack_key(&key) {
            Some(id) if referenced.contains(&id) => r.kept += 1,
            Some(_) => {
                doomed.push(key);
                doomed_bytes.push(size);
            }
            None => r.unparsed += 1,
        }
    }
    let d = store.delete_batch(&doomed)?;
    let failed: HashSet<&str> = d.failed.iter().map(|f| f.0.as_str()).collect();
    r.deleted_bytes = doomed
        .iter()
        .zip(&doomed_bytes)
        .filter(|(k, _)| !failed.contains(k.as_str()))
        .map(|(_, s)| s)
        .sum();
    r.deleted = d.deleted;
    r.delete_requests = d.requests;
    r.failed = d.failed;
    info!(
        listed = r.listed,
        kept = r.kept,
        deleted = r.deleted,
        bytes = r.deleted_bytes,
        unparsed = r.unparsed,
        failed = r.failed.len(),
        "tier gc"
    );
    Ok(r)
}
