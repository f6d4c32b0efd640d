//! The audit log, which never drops a record silently.
//!
//! Records go to the state database, synced before the response is sent;
//! when it cannot take one they are kept in `audit-pending.jsonl` and moved
//! into it later, in order (the rule is `crate::pending`'s, shared with the
//! events). The records kept aside are moved at the next record, at the
//! next mutation's check and at start. Only when neither can be written is
//! a record lost: that is logged as an error, and from then on mutations
//! are refused (`ready`) until the audit log can be written again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cdm_api::types::AuditEntry;

pub use crate::pending::Stored;
use crate::pending::{Entry, Journal};
use crate::state::{State, Sync, AUDIT};

impl Entry for AuditEntry {
    fn id(&self) -> u64 {
        self.id
    }
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

pub struct AuditLog {
    state: Arc<State>,
    journal: Journal<AuditEntry>,
    /// A record was lost: mutations are refused until a write succeeds.
    blocked: AtomicBool,
}

impl AuditLog {
    pub fn new(state: Arc<State>) -> AuditLog {
        let journal = Journal::new(state.clone(), AUDIT, "audit-pending.jsonl", "audit record");
        AuditLog {
            state,
            journal,
            blocked: AtomicBool::new(false),
        }
    }

    fn store(&self, recs: &[AuditEntry], _replay: bool) -> crate::state::Result<()> {
        self.state.put_all(AUDIT, Sync::Now, recs, |r| r.id)
    }

    /// Stores one record (its `id` is given here).
    pub fn record(&self, e: AuditEntry) -> Stored {
        let (stored, _) = self
            .journal
            .record(e, &|r: &[AuditEntry], p| self.store(r, p));
        match stored {
            Stored::Database { .. } => self.blocked.store(false, Ordering::SeqCst),
            Stored::Lost => {
                tracing::error!("an audit record was lost: changes are refused from now on");
                self.blocked.store(true, Ordering::SeqCst)
            }
            Stored::Aside { .. } => {}
        }
        stored
    }

    /// Moves the records kept aside into the database; how many.
    pub fn replay(&self) -> crate::state::Result<usize> {
        self.journal.replay(&|r: &[AuditEntry], p| self.store(r, p))
    }

    /// Whether a mutation may run: refused only after a record was lost,
    /// until the audit log can be written again.
    pub fn ready(&self) -> Result<(), String> {
        if !self.blocked.load(Ordering::SeqCst) {
            return Ok(());
        }
        match self
            .journal
            .writable(&|r: &[AuditEntry], p| self.store(r, p))
        {
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
        self.journal.pending()
    }

    /// Records lost since start.
    pub fn lost(&self) -> u64 {
        self.journal.lost()
    }
}
