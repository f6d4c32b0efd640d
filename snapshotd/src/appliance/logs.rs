//! The event and audit logs.

use cdm_api::auth::Caller;
use cdm_api::types::*;
use cdm_api::ApiResult;

use super::{st, Appliance};
use crate::state::{Sync, AUDIT};

impl Appliance {
    pub(super) fn event_list(&self, q: EventQuery) -> ApiResult<Vec<Event>> {
        let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
        let kind = q.kind.clone();
        self.state
            .scan::<Event>(
                crate::state::EVENTS,
                q.after.unwrap_or(0),
                limit,
                q.after.is_none(),
                |e| {
                    kind.as_deref()
                        .is_none_or(|k| crate::events::matches(k, &e.kind))
                },
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
        let now = self.clock.now();
        if let Err(e) = self.state.append(AUDIT, Sync::Lazy, |id| AuditEntry {
            id,
            time_unix: now,
            user: c.user.clone(),
            token: c.token_name.clone(),
            method: method.to_string(),
            path: path.to_string(),
            status,
        }) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}
