//! Webhook subscriptions and their deliveries.

use cdm_api::auth::Caller;
use cdm_api::backend::Backend;
use cdm_api::types::*;
use cdm_api::{ApiError, ApiResult};
use serde_json::json;

use super::users::random_hex;
use super::{st, Appliance};
use crate::events::HookRec;
use crate::state::{Sync, WEBHOOKS};

impl Appliance {
    pub(super) fn webhook_create(&self, c: &Caller, req: WebhookCreate) -> ApiResult<Webhook> {
        let url = req.url.trim().to_string();
        let parsed_ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() <= 2048
            && !url.chars().any(|ch| ch.is_whitespace() || ch.is_control())
            && url
                .split("://")
                .nth(1)
                .is_some_and(|r| !r.is_empty() && !r.starts_with('/'));
        if !parsed_ok {
            return Err(ApiError::bad_request(format!(
                "webhook url {url:?} must be an http:// or https:// URL with a host"
            )));
        }
        self.events
            .check_target(&url)
            .map_err(ApiError::bad_request)?;
        if req.events.is_empty() {
            return Err(ApiError::bad_request(
                "events must name at least one type (or \"*\")",
            ));
        }
        for e in &req.events {
            let ok = e == "*"
                || (e.len() <= 64
                    && e.split_once('.').is_some_and(|(m, a)| {
                        !m.is_empty()
                            && !a.is_empty()
                            && m.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                            && (a == "*" || a.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    }));
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "bad event type {e:?}: use MODULE.ACTION, MODULE.* or *"
                )));
            }
        }
        let secret = match req.secret {
            Some(s) if s.len() >= 16 && s.len() <= 256 => s,
            Some(_) => return Err(ApiError::bad_request("secret must be 16 to 256 bytes")),
            None => random_hex(32),
        };
        let now = self.clock.now();
        let events = req.events.clone();
        let rec = self
            .state
            .append(WEBHOOKS, Sync::Now, |id| HookRec {
                id,
                url: url.clone(),
                events,
                secret: secret.clone(),
                created_unix: now,
            })
            .map_err(st)?;
        self.events.add_hook(rec.clone());
        self.events.emit(
            "webhook.created",
            &format!("webhook {}", rec.id),
            &c.user,
            json!({"url": url, "events": req.events}),
        );
        let mut w = rec.public();
        w.secret = Some(secret);
        Ok(w)
    }

    pub(super) fn webhook_list(&self) -> ApiResult<Vec<Webhook>> {
        Ok(self
            .state
            .scan::<HookRec>(WEBHOOKS, 0, usize::MAX, false, |_| true)
            .map_err(st)?
            .iter()
            .map(HookRec::public)
            .collect())
    }

    pub(super) fn webhook_get(&self, id: u64) -> ApiResult<Webhook> {
        self.state
            .get::<_, HookRec>(WEBHOOKS, id)
            .map_err(st)?
            .map(|h| h.public())
            .ok_or_else(|| ApiError::not_found(format!("webhook {id} not found")))
    }

    pub(super) fn webhook_delete(&self, c: &Caller, id: u64) -> ApiResult<()> {
        if !self.state.remove(WEBHOOKS, id).map_err(st)? {
            return Err(ApiError::not_found(format!("webhook {id} not found")));
        }
        self.events.remove_hook(id);
        self.events.emit(
            "webhook.deleted",
            &format!("webhook {id}"),
            &c.user,
            json!({}),
        );
        Ok(())
    }

    pub(super) fn webhook_deliveries(&self, id: u64) -> ApiResult<Vec<Delivery>> {
        self.webhook(id)?;
        self.events.deliveries(id).map_err(st)
    }
}
