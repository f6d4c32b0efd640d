//! Events and webhooks. Every change and notable happening is an [`Event`]
//! in the state store; webhooks subscribed to its type get a signed POST,
//! delivered by worker threads with retries and backoff, each attempt series
//! kept as a [`Delivery`]. Emitting never waits for a receiver: I/O paths
//! only append to the store and queue an id.
//!
//! Events are never dropped silently: like audit records they go through
//! a [`Journal`] (`crate::pending`), so an event the state database cannot
//! take is kept in `events-pending.jsonl` with its final id and the
//! webhooks subscribed to it when it happened, and moved into the database
//! in order later, its deliveries queued then. Alerts (`alert.raised`,
//! subject `events`) say when events began to be kept aside
//! (`events_aside`), when they were stored (`events_recovered`) and when
//! some could be stored nowhere (`events_lost`, raised at the next event
//! that can be kept).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cdm_api::types::{Delivery, Event, Webhook};
use cdm_common::lock::lock;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::clock::Clock;
use crate::pending::{Entry, Journal, Stored};
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

/// An event as the journal keeps it: with the webhooks subscribed to it
/// when it happened, whose deliveries are made when it is stored.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Emitted {
    pub event: Event,
    pub hooks: Vec<u64>,
}

impl Entry for Emitted {
    fn id(&self) -> u64 {
        self.event.id
    }
    fn set_id(&mut self, id: u64) {
        self.event.id = id;
    }
}

/// How often events kept aside are tried again when nothing else happens:
/// at first, and at most (doubling while the database keeps failing, so a
/// long failure does not fill the log with a retry every second).
const REPLAY_EVERY: Duration = Duration::from_secs(1);
const REPLAY_MAX: Duration = Duration::from_secs(30);

/// Deliveries due, each id at most once (a delivery found again when its
/// event is replayed may be queued already).
#[derive(Default)]
struct Queue {
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    ids: HashSet<u64>,
}

impl Queue {
    fn push(&mut self, at: Instant, id: u64) {
        if self.ids.insert(id) {
            self.due.push(Reverse((at, id)));
        }
    }
}

pub struct Events {
    state: Arc<State>,
    clock: Arc<Clock>,
    cfg: WebhookConfig,
    hooks: Mutex<Vec<HookRec>>,
    queue: Mutex<Queue>,
    cv: Condvar,
    stop: AtomicBool,
    agent: ureq::Agent,
    journal: Journal<Emitted>,
    /// Events lost and not yet told in an `events_lost` alert.
    lost_untold: AtomicU64,
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
            clock,
            cfg,
            hooks: Mutex::new(hooks),
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            agent,
            journal: Journal::new(state.clone(), EVENTS, "events-pending.jsonl", "event"),
            lost_untold: AtomicU64::new(0),
            state,
        });
        // Events kept aside by an earlier run whose database was failing
        // (a failure is logged; the replay thread tries again).
        let _ = ev.replay();
        if let Ok(pending) = ev
            .state
            .scan::<Delivery>(DELIVERIES, 0, usize::MAX, false, |d| d.state == "pending")
        {
            let mut q = lock(&ev.queue);
            for d in pending {
                q.push(Instant::now(), d.id);
            }
        }
        ev
    }

    /// Starts the delivery threads, and the one that stores events kept
    /// aside once the database works again even if no new event comes.
    pub fn start(self: &Arc<Self>) {
        for i in 0..self.cfg.workers.max(1) {
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || me.worker());
        }
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("event-replay".into())
            .spawn(move || {
                let mut wait = REPLAY_EVERY;
                while !me.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(wait);
                    if me.journal.pending() > 0 {
                        wait = match me.replay() {
                            Ok(_) => REPLAY_EVERY,
                            Err(_) => (wait * 2).min(REPLAY_MAX),
                        };
                    }
                }
            });
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Records an event and queues its webhook deliveries. The event (with
    /// its id) is returned unless it was lost: stored, or kept aside.
    pub fn emit(&self, kind: &str, subject: &str, actor: &str, data: Value) -> Option<Event> {
        let hooks: Vec<u64> = lock(&self.hooks)
            .iter()
            .filter(|h| h.events.iter().any(|p| matches(p, kind)))
            .map(|h| h.id)
            .collect();
        let e = Emitted {
            event: Event {
                id: 0,
                time_unix: self.clock.now(),
                kind: kind.to_string(),
                subject: subject.to_string(),
                actor: actor.to_string(),
                data,
            },
            hooks,
        };
        let (stored, e) = self.journal.record(e, &|r: &[Emitted], p| self.store(r, p));
        let id = e.event.id;
        match stored {
            Stored::Database { replayed } => {
                tracing::info!(id, kind, subject, actor, "event");
                self.tell_replayed(replayed);
            }
            Stored::Aside { first } => {
                tracing::info!(id, kind, subject, actor, "event (kept aside)");
                if first {
                    self.alert(
                        "events_aside",
                        "the state database cannot store events: they are kept in events-pending.jsonl until it can".into(),
                        json!({}),
                    );
                }
            }
            Stored::Lost => {
                self.lost_untold.fetch_add(1, Ordering::SeqCst);
                return None;
            }
        }
        self.tell_lost();
        Some(e.event)
    }

    /// Moves events kept aside into the database (their deliveries are
    /// queued then); how many.
    pub fn replay(&self) -> Result<usize, crate::state::StateError> {
        let r = self.journal.replay(&|r: &[Emitted], p| self.store(r, p));
        match &r {
            Ok(n) if *n > 0 => {
                self.tell_replayed(*n);
                self.tell_lost();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "events kept aside cannot be stored yet"),
        }
        r
    }

    /// Events kept aside, not yet in the database.
    pub fn pending(&self) -> usize {
        self.journal.pending()
    }

    /// Events lost since start.
    pub fn lost(&self) -> u64 {
        self.journal.lost()
    }

    /// Events for `GET /v1/events` (ids above `after` that `kind` takes:
    /// the newest `limit` when `newest`, else the first). Events kept
    /// aside are moved into the database first; those it still cannot take
    /// are listed from the pending file among the others, by id.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        newest: bool,
        kind: Option<&str>,
    ) -> Result<Vec<Event>, crate::state::StateError> {
        if self.journal.pending() > 0 {
            // Failing, they are listed from the file below.
            let _ = self.replay();
        }
        let takes = |e: &Event| kind.is_none_or(|k| matches(k, &e.kind));
        let mut v = self
            .state
            .scan::<Event>(EVENTS, after, limit, newest, takes)?;
        if self.journal.pending() > 0 {
            let kept = self.journal.kept().into_iter().map(|r| r.event);
            // Unnumbered ones (id 0) cannot be placed yet.
            v.extend(kept.filter(|e| e.id > after && e.id != 0 && takes(e)));
            v.sort_by_key(|e| e.id);
            v.dedup_by_key(|e| e.id);
            if v.len() > limit {
                if newest {
                    v.drain(..v.len() - limit);
                } else {
                    v.truncate(limit);
                }
            }
        }
        Ok(v)
    }

    /// Stores events under their ids with their deliveries, synced; then
    /// queues the deliveries. For events from the pending file, deliveries
    /// an earlier attempt made already are found and not made twice.
    fn store(&self, recs: &[Emitted], replay: bool) -> crate::state::Result<()> {
        let events: Vec<&Event> = recs.iter().map(|r| &r.event).collect();
        self.state.put_all(EVENTS, Sync::Lazy, &events, |e| e.id)?;
        let mut made = HashSet::new();
        let mut queue = Vec::new();
        if replay && recs.iter().any(|r| !r.hooks.is_empty()) {
            let ids: HashSet<u64> = recs.iter().map(|r| r.event.id).collect();
            for d in self
                .state
                .scan::<Delivery>(DELIVERIES, 0, usize::MAX, false, |d| ids.contains(&d.event))?
            {
                made.insert((d.event, d.webhook));
                if d.state == "pending" {
                    queue.push(d.id);
                }
            }
        }
        let now = self.clock.now();
        for r in recs {
            for &hook in &r.hooks {
                if made.contains(&(r.event.id, hook)) {
                    continue;
                }
                let d = self.state.append(DELIVERIES, Sync::Lazy, |id| Delivery {
                    id,
                    webhook: hook,
                    event: r.event.id,
                    event_type: r.event.kind.clone(),
                    state: "pending".into(),
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                    updated_unix: now,
                    next_attempt_unix: Some(now),
                })?;
                queue.push(d.id);
            }
        }
        // Durable before anything is queued: a delivery is sent only for
        // an event that is stored.
        self.state.sync()?;
        if !queue.is_empty() {
            let mut q = lock(&self.queue);
            for id in queue {
                q.push(Instant::now(), id);
            }
            self.cv.notify_all();
        }
        Ok(())
    }

    fn tell_replayed(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.alert(
            "events_recovered",
            format!("the state database works again: {n} events kept aside meanwhile are stored, their webhook deliveries queued"),
            json!({"events": n}),
        );
    }

    /// Raises the `events_lost` alert for losses not yet told, now that an
    /// event could be kept again.
    fn tell_lost(&self) {
        let n = self.lost_untold.swap(0, Ordering::SeqCst);
        if n == 0 {
            return;
        }
        self.alert(
            "events_lost",
            format!("{n} events could be stored neither in the state database nor in events-pending.jsonl: they are only in snapshotd's log"),
            json!({"events": n}),
        );
    }

    fn alert(&self, reason: &str, message: String, mut data: Value) {
        if let Some(o) = data.as_object_mut() {
            o.insert("message".into(), message.into());
            o.insert("reason".into(), reason.into());
        }
        self.emit("alert.raised", "events", "snapshotd", data);
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
                    match q.due.peek() {
                        Some(Reverse((due, _))) if *due <= now => {
                            let Some(Reverse((_, id))) = q.due.pop() else {
                                continue;
                            };
                            q.ids.remove(&id);
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
                lock(&self.queue).push(Instant::now() + Duration::from_millis(delay), id);
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

    struct Setup {
        dir: tempfile::TempDir,
        fault: std::path::PathBuf,
        state: Arc<State>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let fault = dir.path().join("eio");
        let state = Arc::new(State::open(&dir.path().join("s.redb"), Some(&fault)).unwrap());
        Setup { dir, fault, state }
    }

    /// Events with one webhook subscribed to `volume.*`; no delivery threads
    /// (what is queued stays in the queue for the test to see).
    fn events(s: &Setup) -> Arc<Events> {
        let ev = Events::new(
            s.state.clone(),
            Arc::new(Clock::new(false)),
            WebhookConfig::default(),
        );
        ev.add_hook(HookRec {
            id: 7,
            url: "http://192.0.2.1/".into(),
            events: vec!["volume.*".into()],
            secret: "s".into(),
            created_unix: 0,
        });
        ev
    }

    fn kinds(v: &[Event]) -> Vec<String> {
        v.iter()
            .map(|e| match e.data["reason"].as_str() {
                Some(r) => format!("{}:{r}", e.kind),
                None => e.kind.clone(),
            })
            .collect()
    }

    fn queued(ev: &Events) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&ev.queue).ids.iter().copied().collect();
        v.sort();
        v
    }

    #[test]
    fn events_kept_aside_are_stored_in_order_with_their_deliveries() {
        let s = setup();
        let ev = events(&s);
        let a = ev.emit("volume.created", "a", "t", json!({})).unwrap();
        std::fs::write(&s.fault, b"").unwrap();
        let b = ev.emit("volume.created", "b", "t", json!({})).unwrap();
        let c = ev.emit("snapshot.created", "a@1", "t", json!({})).unwrap();
        assert_eq!((a.id, b.id), (1, 2), "an event kept aside has its id");
        // b, the events_aside alert, c.
        assert_eq!(c.id, 4);
        assert_eq!(ev.pending(), 3);
        assert_eq!(queued(&ev).len(), 1, "no delivery for what is not stored");
        assert!(ev.list(0, 100, true, None).is_err(), "the database fails");
        std::fs::remove_file(&s.fault).unwrap();
        let all = ev.list(0, 100, true, None).unwrap();
        assert_eq!(ev.pending(), 0);
        assert_eq!(
            kinds(&all),
            [
                "volume.created",
                "volume.created",
                "alert.raised:events_aside",
                "snapshot.created",
                "alert.raised:events_recovered",
            ]
        );
        let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_eq!(all[4].data["events"], 3);
        let d = ev.deliveries(7).unwrap();
        let for_events: Vec<u64> = d.iter().map(|d| d.event).collect();
        assert_eq!(
            for_events,
            [2, 1],
            "one delivery per volume event, newest first"
        );
        assert!(d.iter().all(|d| d.state == "pending"));
        assert_eq!(
            queued(&ev),
            [1, 2],
            "the replayed event's delivery is queued"
        );
    }

    #[test]
    fn a_restart_stores_events_kept_aside_and_queues_their_deliveries_once() {
        let s = setup();
        let ev = events(&s);
        ev.emit("volume.created", "a", "t", json!({}));
        std::fs::write(&s.fault, b"").unwrap();
        ev.emit("volume.deleted", "a", "t", json!({}));
        drop(ev);
        std::fs::remove_file(&s.fault).unwrap();
        let ev = events(&s);
        assert_eq!(ev.pending(), 0, "replayed at start");
        let all = ev.list(0, 100, true, Some("volume.*")).unwrap();
        assert_eq!(kinds(&all), ["volume.created", "volume.deleted"]);
        // The first event's delivery and the replayed one's, each once.
        assert_eq!(queued(&ev), [1, 2]);
        assert_eq!(ev.deliveries(7).unwrap().len(), 2);
    }

    #[test]
    fn a_lost_event_is_counted_and_told_once_events_can_be_kept() {
        let s = setup();
        let ev = events(&s);
        ev.emit("volume.created", "a", "t", json!({}));
        let aside = s.dir.path().join("events-pending.jsonl");
        std::fs::create_dir(&aside).unwrap();
        std::fs::write(&s.fault, b"").unwrap();
        assert!(ev.emit("volume.created", "b", "t", json!({})).is_none());
        assert_eq!(ev.lost(), 1);
        std::fs::remove_file(&s.fault).unwrap();
        std::fs::remove_dir(&aside).unwrap();
        ev.emit("volume.created", "c", "t", json!({})).unwrap();
        let all = ev.list(0, 100, true, None).unwrap();
        assert_eq!(
            kinds(&all),
            [
                "volume.created",
                "volume.created",
                "alert.raised:events_lost"
            ]
        );
        assert_eq!(all[2].data["events"], 1);
        assert!(all[1].id > 2, "the lost event's id is not given again");
        assert_eq!(ev.lost(), 1);
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
