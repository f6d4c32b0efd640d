//! Events and webhooks. Every change and notable happening is an [`Event`]
//! in the state store; webhooks subscribed to its type get a signed POST,
//! delivered by worker threads with retries and backoff, each attempt series
//! kept as a [`Delivery`]. Emitting never waits for a receiver: I/O paths
//! only append to the store and queue an id.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cdm_api::types::{Delivery, Event, Webhook};
use cdm_common::lock::lock;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::clock::Clock;
use crate::state::{State, Sync, DELIVERIES, EVENTS, WEBHOOKS};

/// Webhook delivery settings (`[webhooks]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Per-attempt timeout.
    pub timeout_ms: u64,
    /// Attempts before a delivery is given up.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Delivery threads (a slow receiver holds one).
    pub workers: usize,
    /// Allow loopback, link-local, unspecified and multicast targets
    /// ([`crate::targets`]); for tests and special cases.
    pub allow_private: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            timeout_ms: 10_000,
            max_attempts: 8,
            backoff_ms: 2_000,
            max_backoff_ms: 3_600_000,
            workers: 4,
            allow_private: false,
        }
    }
}

/// A webhook as stored (with its secret).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct HookRec {
    pub id: u64,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    pub created_unix: u64,
}

impl HookRec {
    pub fn public(&self) -> Webhook {
        Webhook {
            id: self.id,
            url: self.url.clone(),
            events: self.events.clone(),
            created_unix: self.created_unix,
            secret: None,
        }
    }
}

/// Whether a subscription pattern (`*`, `snapshot.*`, `volume.created`) takes an event type.
pub fn matches(pattern: &str, kind: &str) -> bool {
    pattern == "*"
        || pattern == kind
        || pattern
            .strip_suffix(".*")
            .is_some_and(|m| kind.split_once('.').is_some_and(|(km, _)| km == m))
}

/// `sha256=HEX` of HMAC-SHA256(secret, body): the `X-Cdm-Signature` header.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(), // HMAC takes keys of any length
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct Events {
    state: Arc<State>,
    clock: Arc<Clock>,
    cfg: WebhookConfig,
    hooks: Mutex<Vec<HookRec>>,
    queue: Mutex<BinaryHeap<Reverse<(Instant, u64)>>>,
    cv: Condvar,
    stop: AtomicBool,
    agent: ureq::Agent,
}

impl Events {
    /// Loads webhooks and re-queues deliveries left pending by the last run.
    pub fn new(state: Arc<State>, clock: Arc<Clock>, cfg: WebhookConfig) -> Arc<Events> {
        let hooks = state
            .scan::<HookRec>(WEBHOOKS, 0, usize::MAX, false, |_| true)
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot load webhooks");
                Vec::new()
            });
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
            .redirects(0)
            .resolver(crate::targets::Guard {
                allow_private: cfg.allow_private,
            })
            .build();
        let ev = Arc::new(Events {
            state,
            clock,
            cfg,
            hooks: Mutex::new(hooks),
            queue: Mutex::new(BinaryHeap::new()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            agent,
        });
        if let Ok(pending) = ev
            .state
            .scan::<Delivery>(DELIVERIES, 0, usize::MAX, false, |d| d.state == "pending")
        {
            let mut q = lock(&ev.queue);
            for d in pending {
                q.push(Reverse((Instant::now(), d.id)));
            }
        }
        ev
    }

    /// Starts the delivery threads.
    pub fn start(self: &Arc<Self>) {
        for i in 0..self.cfg.workers.max(1) {
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || me.worker());
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Records an event and queues its webhook deliveries.
    pub fn emit(&self, kind: &str, subject: &str, actor: &str, data: Value) -> Option<Event> {
        let now = self.clock.now();
        let ev = match self.state.append(EVENTS, Sync::Lazy, |id| Event {
            id,
            time_unix: now,
            kind: kind.to_string(),
            subject: subject.to_string(),
            actor: actor.to_string(),
            data,
        }) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(error = %e, kind, subject, "cannot record event");
                return None;
            }
        };
        tracing::info!(id = ev.id, kind, subject, actor, "event");
        let targets: Vec<u64> = lock(&self.hooks)
            .iter()
            .filter(|h| h.events.iter().any(|p| matches(p, kind)))
            .map(|h| h.id)
            .collect();
        for hook in targets {
            let d = self.state.append(DELIVERIES, Sync::Lazy, |id| Delivery {
                id,
                webhook: hook,
                event: ev.id,
                event_type: ev.kind.clone(),
                state: "pending".into(),
                attempts: 0,
                last_status: None,
                last_error: None,
                updated_unix: now,
                next_attempt_unix: Some(now),
            });
            match d {
                Ok(d) => {
                    lock(&self.queue).push(Reverse((Instant::now(), d.id)));
                    self.cv.notify_one();
                }
                Err(e) => tracing::error!(error = %e, "cannot queue a webhook delivery"),
            }
        }
        Some(ev)
    }

    pub fn add_hook(&self, h: HookRec) {
        lock(&self.hooks).push(h);
    }

    pub fn remove_hook(&self, id: u64) {
        lock(&self.hooks).retain(|h| h.id != id);
    }

    fn worker(self: Arc<Self>) {
        loop {
            let id = {
                let mut q = lock(&self.queue);
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = Instant::now();
                    match q.peek() {
                        Some(Reverse((due, _))) if *due <= now => {
                            let Some(Reverse((_, id))) = q.pop() else {
                                continue;
                            };
                            break id;
                        }
                        Some(Reverse((due, _))) => {
                            let wait = *due - now;
                            q = self
                                .cv
                                .wait_timeout(q, wait)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|e| e.into_inner().0);
                        }
                        None => {
                            q = cdm_common::lock::wait(&self.cv, q);
                        }
                    }
                }
            };
            if let Err(e) = self.deliver(id) {
                tracing::error!(delivery = id, error = %e, "webhook delivery bookkeeping failed");
            }
        }
    }

    fn deliver(&self, id: u64) -> Result<(), crate::state::StateError> {
        let Some(mut d) = self.state.get::<_, Delivery>(DELIVERIES, id)? else {
            return Ok(());
        };
        if d.state != "pending" {
            return Ok(());
        }
        let hook = lock(&self.hooks)
            .iter()
            .find(|h| h.id == d.webhook)
            .cloned();
        let (Some(hook), Some(ev)) = (hook, self.state.get::<_, Event>(EVENTS, d.event)?) else {
            d.state = "failed".into();
            d.last_error = Some("webhook or event no longer exists".into());
            d.next_attempt_unix = None;
            d.updated_unix = self.clock.now();
            return self.state.put(DELIVERIES, id, &d, Sync::Lazy);
        };
        if let Err(why) = self.check_target(&hook.url) {
            // Not retried: the target is refused, not unreachable.
            tracing::warn!(delivery = id, url = %hook.url, error = %why, "webhook delivery refused");
            d.attempts += 1;
            d.state = "failed".into();
            d.last_status = None;
            d.last_error = Some(why);
            d.next_attempt_unix = None;
            d.updated_unix = self.clock.now();
            return self.state.put(DELIVERIES, id, &d, Sync::Lazy);
        }
        let body = serde_json::to_vec(&serde_json::json!({"delivery": id, "event": ev}))
            .unwrap_or_default();
        let res = self
            .agent
            .post(&hook.url)
            .set("Content-Type", "application/json")
            .set(
                "User-Agent",
                concat!("cdm-snapshotd/", env!("CARGO_PKG_VERSION")),
            )
            .set("X-Cdm-Event", &ev.kind)
            .set("X-Cdm-Delivery", &id.to_string())
            .set("X-Cdm-Signature", &sign(&hook.secret, &body))
            .send_bytes(&body);
        d.attempts += 1;
        d.updated_unix = self.clock.now();
        let err = match res {
            Ok(r) if (200..300).contains(&r.status()) => {
                d.last_status = Some(r.status());
                None
            }
            Ok(r) => {
                d.last_status = Some(r.status());
                Some(format!("HTTP {}", r.status()))
            }
            Err(ureq::Error::Status(code, _)) => {
                d.last_status = Some(code);
                Some(format!("HTTP {code}"))
            }
            Err(e) => {
                d.last_status = None;
                Some(e.to_string())
            }
        };
        match err {
            None => {
                d.state = "delivered".into();
                d.last_error = None;
                d.next_attempt_unix = None;
            }
            Some(e) if d.attempts >= self.cfg.max_attempts => {
                tracing::warn!(delivery = id, url = %hook.url, error = %e, attempts = d.attempts, "webhook delivery given up");
                d.state = "failed".into();
                d.last_error = Some(e);
                d.next_attempt_unix = None;
            }
            Some(e) => {
                let shift = (d.attempts - 1).min(30);
                let delay = self
                    .cfg
                    .backoff_ms
                    .saturating_mul(1 << shift)
                    .min(self.cfg.max_backoff_ms);
                tracing::info!(delivery = id, url = %hook.url, error = %e, retry_ms = delay, "webhook delivery failed; will retry");
                d.last_error = Some(e);
                d.next_attempt_unix = Some(d.updated_unix + delay.div_ceil(1000));
                lock(&self.queue)
                    .push(Reverse((Instant::now() + Duration::from_millis(delay), id)));
                self.cv.notify_one();
            }
        }
        self.state.put(DELIVERIES, id, &d, Sync::Lazy)
    }

    /// `Err(reason)` if webhooks may not go to `url`'s host.
    pub fn check_target(&self, url: &str) -> Result<(), String> {
        if self.cfg.allow_private {
            return Ok(());
        }
        crate::targets::check_url(url)
    }

    /// Deliveries of one webhook, newest first (at most 1000).
    pub fn deliveries(&self, hook: u64) -> Result<Vec<Delivery>, crate::state::StateError> {
        let mut v = self
            .state
            .scan::<Delivery>(DELIVERIES, 0, 1000, true, |d| d.webhook == hook)?;
        v.reverse();
        Ok(v)
    }

    /// Counts of deliveries by state among the newest 10000 (for metrics).
    pub fn delivery_counts(&self) -> [(String, u64); 3] {
        let mut c = [0u64; 3];
        if let Ok(v) = self
            .state
            .scan::<Delivery>(DELIVERIES, 0, 10_000, true, |_| true)
        {
            for d in v {
                match d.state.as_str() {
                    "pending" => c[0] += 1,
                    "delivered" => c[1] += 1,
                    _ => c[2] += 1,
                }
            }
        }
        [
            ("pending".into(), c[0]),
            ("delivered".into(), c[1]),
            ("failed".into(), c[2]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("*", "volume.created"));
        assert!(matches("volume.created", "volume.created"));
        assert!(matches("volume.*", "volume.deleted"));
        assert!(!matches("volume.*", "volumes.deleted"));
        assert!(!matches("snapshot.created", "snapshot.deleted"));
    }

    #[test]
    fn signature_is_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
