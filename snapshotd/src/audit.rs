//! The audit log, which never drops a record silently.
//!
//! Records go to the state database, synced before the response is sent.
//! When the database cannot take one (an I/O error), the record is
//! appended to `audit-pending.jsonl` beside it and synced; the records
//! kept there are moved into the database, in order and in one
//! transaction, as soon as it works again (at the next record, at the next
//! mutation's check, and at start). Only when neither can be written is a
//! record lost: that is logged as an error, and from then on mutations are
//! refused (`ready`) until the audit log can be written again.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cdm_api::types::AuditEntry;
use cdm_common::lock::lock;

use crate::state::{State, Sync, AUDIT};

/// Where one record went.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// In the database (after `replayed` records kept aside earlier).
    Database { replayed: usize },
    /// In the pending file: the database failed.
    Aside,
    /// Nowhere: the database and the pending file both failed.
    Lost,
}

pub struct AuditLog {
    state: Arc<State>,
    pending: PathBuf,
    /// One writer at a time, so records keep their order.
    one: Mutex<()>,
    /// A record was lost: mutations are refused until a write succeeds.
    blocked: AtomicBool,
}

impl AuditLog {
    pub fn new(state: Arc<State>) -> AuditLog {
        let pending = state.path().with_file_name("audit-pending.jsonl");
        AuditLog {
            state,
            pending,
            one: Mutex::new(()),
            blocked: AtomicBool::new(false),
        }
    }

    /// Stores one record (its `id` is given by the database).
    pub fn record(&self, e: AuditEntry) -> Stored {
        let _one = lock(&self.one);
        let replayed = match self.replay_locked() {
            Ok(n) => n,
            Err(err) => return self.aside(&e, &err.to_string()),
        };
        match self
            .state
            .append(AUDIT, Sync::Now, |id| AuditEntry { id, ..e.clone() })
        {
            Ok(_) => {
                self.blocked.store(false, Ordering::SeqCst);
                Stored::Database { replayed }
            }
            Err(err) => self.aside(&e, &err.to_string()),
        }
    }

    /// Moves the records kept aside into the database; how many.
    pub fn replay(&self) -> crate::state::Result<usize> {
        let _one = lock(&self.one);
        self.replay_locked()
    }

    /// Whether a mutation may run: refused only after a record was lost,
    /// until the audit log can be written again.
    pub fn ready(&self) -> Result<(), String> {
        if !self.blocked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _one = lock(&self.one);
        let probe = self
            .replay_locked()
            .and_then(|_| self.state.sync())
            .map_err(|e| e.to_string())
            .and_then(|()| self.pending_writable());
        match probe {
            Ok(()) => {
                self.blocked.store(false, Ordering::SeqCst);
                tracing::warn!("the audit log can be written again: mutations accepted");
                Ok(())
            }
            Err(e) => Err(format!(
                "the audit log cannot be written ({e}); changes are refused until it can"
            )),
        }
    }

    /// Records kept aside and not yet in the database.
    pub fn pending(&self) -> usize {
        std::fs::read_to_string(&self.pending)
            .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
            .unwrap_or(0)
    }

    fn aside(&self, e: &AuditEntry, why: &str) -> Stored {
        match self.append_pending(e) {
            Ok(()) => {
                tracing::error!(error = why, file = %self.pending.display(),
                    "cannot store an audit record in the state database; kept aside");
                Stored::Aside
            }
            Err(io) => {
                tracing::error!(error = why, aside = %io, user = %e.user, method = %e.method,
                    path = %e.path, status = e.status,
                    "AUDIT RECORD LOST: neither the state database nor the pending file can be written; changes are refused from now on");
                self.blocked.store(true, Ordering::SeqCst);
                Stored::Lost
            }
        }
    }

    fn append_pending(&self, e: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.pending)?;
        f.write_all(&line)?;
        f.sync_data()?;
        sync_dir(&self.pending)
    }

    fn pending_writable(&self) -> Result<(), String> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.pending)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", self.pending.display()))?;
        // An empty file left by the probe is harmless; drop it anyway.
        if self.pending() == 0 {
            let _ = std::fs::remove_file(&self.pending);
        }
        Ok(())
    }

    fn replay_locked(&self) -> crate::state::Result<usize> {
        let text = match std::fs::read_to_string(&self.pending) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(crate::state::StateError::Io(e.to_string())),
        };
        let mut recs = Vec::new();
        for (n, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<AuditEntry>(l) {
                Ok(r) => recs.push(r),
                // Only a record cut by a crash while being kept aside: its
                // mutation never got an answer.
                Err(e) => {
                    tracing::warn!(line = n + 1, error = %e, "skipping a torn pending audit record")
                }
            }
        }
        self.state
            .append_all(AUDIT, Sync::Now, recs.len(), |i, id| AuditEntry {
                id,
                ..recs[i].clone()
            })?;
        std::fs::remove_file(&self.pending)
            .and_then(|()| sync_dir(&self.pending))
            .map_err(|e| crate::state::StateError::Io(e.to_string()))?;
        if !recs.is_empty() {
            tracing::warn!(
                records = recs.len(),
                "audit records kept aside are now in the state database"
            );
        }
        Ok(recs.len())
    }
}

/// Syncs the directory holding `file`, so its creation or removal lasts.
fn sync_dir(file: &std::path::Path) -> std::io::Result<()> {
    match file.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}
