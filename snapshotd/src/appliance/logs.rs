//! The event and audit logs.

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::ApiResult;

use super::{st, Appliance};
use crate::audit::Stored;
use crate::state::AUDIT;
use serde_json::json;

impl Appliance {
    pub(super) fn event_list(&self, q: EventQuery) -> ApiResult<Vec<Event>> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        self.events
            .list(
                q.after.unwrap_or(0),
                limit,
                q.after.is_none(),
                q.kind.as_deref(),
            )
            .map_err(st)
    }

    pub(super) fn audit_list(&self, q: AuditQuery) -> ApiResult<Vec<AuditEntry>> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let user = q.user.clone();
        self.state
            .scan::<AuditEntry>(AUDIT, q.after.unwrap_or(0), limit, q.after.is_none(), |e| {
                user.as_deref().is_none_or(|u| e.user == u)
            })
            .map_err(st)
    }

    pub(super) fn audit_record(&self, c: &Caller, method: &str, path: &str, status: u16) {
        let e = AuditEntry {
            id: 0,
            time_unix: self.clock.now(),
            user: c.user.clone(),
            token: c.token_name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            status,
        };
        let (message, reason) = match self.audit.record(e) {
            Stored::Database { replayed: 0 } => return,
            Stored::Database { replayed } => (
                format!("the state database works again: {replayed} audit records kept aside meanwhile are stored"),
                "audit_recovered",
            ),
            // Once per failure, not once per change.
            Stored::Aside { first: false } => return,
            Stored::Aside { first: true } => (
                "the state database cannot store audit records: they are kept in audit-pending.jsonl until it can".to_string(),
                "audit_aside",
            ),
            Stored::Lost => (
                format!("an audit record ({method} {path} by {}) could not be stored anywhere: changes are refused until the audit log can be written", c.user),
                "audit_lost",
            ),
        };
        // With the database failing, kept aside with the other events.
        self.events.emit(
            "alert.raised",
            "audit",
            "snapshotd",
            json!({"message": message, "reason": reason}),
        );
    }

    /// Audit records kept aside, not yet in the database (for metrics).
    pub(crate) fn audit_pending(&self) -> usize {
        self.audit.pending()
    }

    /// Audit records lost since start (for metrics and health).
    pub(crate) fn audit_lost(&self) -> u64 {
        self.audit.lost()
    }

    /// The logs' part of `/health`: records kept aside and lost.
    pub(super) fn logs_health(&self) -> serde_json::Value {
        json!({
            "events_pending": self.events.pending(),
            "events_lost": self.events.lost(),
            "audit_pending": self.audit.pending(),
            "audit_lost": self.audit.lost(),
        })
    }
}
