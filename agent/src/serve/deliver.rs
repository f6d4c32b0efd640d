//! Delivering a finished job's outcome: the log still waiting goes first
//! through progress calls (each bounded like any batch), then the finish
//! call carries at most one batch. An outcome is never given up while the
//! appliance is down or answers 5xx (for up to [`GIVE_UP_AFTER`]); only an
//! answer that the job is gone or already ended stops the tries (and a
//! body too large is sent again without its log).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::joblog::LogBatch;
use super::link::{Finished, Link, Progress};
use super::{Backoff, ServeError, Service};

/// How long an outcome is retried while the appliance cannot take it.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Longest pause between tries.
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Tries left once the service is stopping (it cannot wait a day).
const TRIES_WHEN_STOPPING: u32 = 3;

/// Longest error sent (a failed `vm backup` quotes every VM's outcome).
pub const ERROR_MAX: usize = 16 * 1024;

/// `s` cut to at most `max` bytes, marked when cut.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(5);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} […]", &s[..end])
}

/// The calls delivery makes (the appliance through [`Link`]).
pub trait Appliance {
    fn progress(&self, id: u64, log: &[String]) -> Result<Progress, ServeError>;
    fn finish(&self, id: u64, body: &Value) -> Result<Finished, ServeError>;
}

impl Appliance for Link {
    fn progress(&self, id: u64, log: &[String]) -> Result<Progress, ServeError> {
        Link::progress(self, id, log)
    }
    fn finish(&self, id: u64, body: &Value) -> Result<Finished, ServeError> {
        Link::finish(self, id, body)
    }
}

/// Time and pauses (the service's, or a test's).
pub trait Pacer {
    fn now(&self) -> Instant;
    fn pause(&mut self, d: Duration);
    fn stopping(&self) -> bool;
}

/// The service's pacing: real time; a stop cuts pauses short.
pub struct ServicePacer<'a>(pub &'a Service);

impl Pacer for ServicePacer<'_> {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn pause(&mut self, d: Duration) {
        if self.0.stop.get().is_some() {
            // The few tries left come quickly.
            std::thread::sleep(d.min(Duration::from_secs(2)));
        } else {
            self.0.stop.wait(d);
        }
    }
    fn stopping(&self) -> bool {
        self.0.stop.get().is_some()
    }
}

/// What became of an outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Recorded,
    /// The appliance no longer has the job running (404/409): it has its
    /// own outcome for it.
    Gone(String),
    /// The credential is refused: the service stops.
    Retired(String),
    /// Not delivered (the reason is logged).
    Lost(String),
}

/// What the appliance is told at the end.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub state: &'static str,
    pub result: Option<Value>,
    pub error: Option<String>,
}

impl Outcome {
    pub fn failed(why: impl Into<String>) -> Outcome {
        Outcome {
            state: "failed",
            result: None,
            error: Some(why.into()),
        }
    }
}

/// Retries with capped backoff while the appliance cannot be reached;
/// `Some` when it is time to stop trying.
struct Tries {
    start: Instant,
    backoff: Backoff,
    failures: u32,
}

impl Tries {
    fn new(p: &dyn Pacer) -> Tries {
        Tries {
            start: p.now(),
            backoff: Backoff::new(Duration::from_secs(1), MAX_PAUSE),
            failures: 0,
        }
    }

    fn failed(&mut self, p: &mut dyn Pacer, id: u64, what: &str, e: &ServeError) -> Option<String> {
        self.failures += 1;
        let waited = p.now().saturating_duration_since(self.start);
        if p.stopping() && self.failures >= TRIES_WHEN_STOPPING {
            return Some(format!(
                "the service stops and the appliance cannot be reached: {e}"
            ));
        }
        if waited >= GIVE_UP_AFTER {
            return Some(format!(
                "the appliance could not be reached for {} h: {e}",
                waited.as_secs() / 3600
            ));
        }
        let d = self.backoff.pause();
        if self.failures == 1 || self.failures.is_multiple_of(10) {
            tracing::warn!(job = id, failures = self.failures, waited = ?waited, retry_in = ?d, error = %e, "cannot deliver the job's {what}: retrying");
        }
        p.pause(d);
        None
    }

    fn succeeded(&mut self) {
        self.backoff.reset();
    }
}

/// Sends what is left of the log through progress calls until one batch
/// remains (or the appliance stops taking them).
fn drain(
    app: &dyn Appliance,
    p: &mut dyn Pacer,
    id: u64,
    log: &mut LogBatch,
) -> Result<(), Delivery> {
    let mut tries = Tries::new(p);
    while !log.fits_one_batch() {
        let b = log.batch();
        match app.progress(id, &b.lines) {
            Ok(Progress::Gone(_)) => return Ok(()),
            Ok(_) => {
                tries.succeeded();
                log.delivered(&b, p.now());
            }
            Err(ServeError::Retired(m)) => return Err(Delivery::Retired(m)),
            Err(ServeError::Unreachable(m)) => {
                let e = ServeError::Unreachable(m);
                if p.stopping() || tries.failed(p, id, "log", &e).is_some() {
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e, "the appliance refused a batch of the job's log: the outcome goes without it");
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Delivers `o` with the job's remaining `log`.
pub fn deliver(
    app: &dyn Appliance,
    p: &mut dyn Pacer,
    id: u64,
    o: &Outcome,
    log: &mut LogBatch,
) -> Delivery {
    if let Err(d) = drain(app, p, id, log) {
        return d;
    }
    let last = log.batch();
    let mut body = json!({ "state": o.state, "log": last.lines });
    if let Some(r) = &o.result {
        body["result"] = r.clone();
    }
    if let Some(e) = &o.error {
        body["error"] = json!(cut(e, ERROR_MAX));
    }
    let mut tries = Tries::new(p);
    let mut attempt = 0u32;
    let mut refusals = 0u32;
    loop {
        attempt += 1;
        let refused = match app.finish(id, &body) {
            Ok(Finished::Recorded) => {
                if attempt > 1 {
                    tracing::info!(job = id, attempt, "outcome delivered");
                }
                return Delivery::Recorded;
            }
            Ok(Finished::Gone(m)) => {
                tracing::warn!(job = id, state = o.state, message = %m, "the appliance no longer runs the job (it is gone or already ended): its outcome from this agent is not recorded");
                return Delivery::Gone(m);
            }
            Ok(Finished::TooLarge(m)) | Ok(Finished::Refused(m)) => m,
            Err(ServeError::Retired(m)) => return Delivery::Retired(m),
            Err(e) => {
                if let Some(why) = tries.failed(p, id, "outcome", &e) {
                    tracing::error!(job = id, state = o.state, "{why}: the job's outcome is lost (the appliance fails the job when the agent comes back)");
                    return Delivery::Lost(why);
                }
                continue;
            }
        };
        // Refused as it is: the outcome matters more than its log.
        let had_log = body
            .get("log")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if !had_log {
            tracing::error!(job = id, state = o.state, message = %refused, "the appliance refused the job's outcome");
            return Delivery::Lost(refused);
        }
        tracing::warn!(job = id, message = %refused, "the appliance refused the outcome with its log: sent again without it");
        refusals += 1;
        body["log"] = if refusals == 1 {
            json!([format!(
                "cdm-agent: the last {} log lines were refused by the appliance ({refused})",
                last.lines.len()
            )])
        } else {
            json!([])
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    /// The appliance's answers, in order, and the calls it got.
    #[derive(Default)]
    struct Script {
        progress: RefCell<VecDeque<Result<Progress, ServeError>>>,
        finish: RefCell<VecDeque<Result<Finished, ServeError>>>,
        calls: RefCell<Vec<(String, Value)>>,
    }

    impl Appliance for Script {
        fn progress(&self, _id: u64, log: &[String]) -> Result<Progress, ServeError> {
            self.calls
                .borrow_mut()
                .push(("progress".into(), json!(log)));
            self.progress
                .borrow_mut()
                .pop_front()
                .unwrap_or(Ok(Progress::Continue))
        }
        fn finish(&self, _id: u64, body: &Value) -> Result<Finished, ServeError> {
            self.calls
                .borrow_mut()
                .push(("finish".into(), body.clone()));
            self.finish
                .borrow_mut()
                .pop_front()
                .unwrap_or(Ok(Finished::Recorded))
        }
    }

    struct Clock {
        t: Instant,
        stopping: bool,
    }

    impl Pacer for Clock {
        fn now(&self) -> Instant {
            self.t
        }
        fn pause(&mut self, d: Duration) {
            self.t += d;
        }
        fn stopping(&self) -> bool {
            self.stopping
        }
    }

    fn clock() -> Clock {
        Clock {
            t: Instant::now(),
            stopping: false,
        }
    }

    fn down() -> Result<Finished, ServeError> {
        Err(ServeError::Unreachable("HTTP 503".into()))
    }

    fn ok() -> Outcome {
        Outcome {
            state: "succeeded",
            result: Some(json!({"snapshot": 1})),
            error: None,
        }
    }

    fn finishes(s: &Script) -> Vec<Value> {
        s.calls
            .borrow()
            .iter()
            .filter(|(k, _)| k == "finish")
            .map(|(_, v)| v.clone())
            .collect()
    }

    #[test]
    fn a_long_log_is_drained_before_one_bounded_finish() {
        let s = Script::default();
        let mut log = LogBatch::new(Instant::now());
        for i in 0..2_000 {
            log.push(&format!("{i} {}", "z".repeat(2000)));
        }
        let mut c = clock();
        assert_eq!(deliver(&s, &mut c, 1, &ok(), &mut log), Delivery::Recorded);
        let calls = s.calls.borrow();
        let (last, rest) = calls.split_last().unwrap();
        assert_eq!(last.0, "finish");
        assert!(
            rest.iter().all(|(k, _)| k == "progress"),
            "one finish, last"
        );
        let mut lines = 0;
        for (_, v) in calls.iter() {
            let body = serde_json::to_vec(v).unwrap();
            assert!(body.len() < 1 << 20, "{} bytes", body.len());
            lines += v.get("log").unwrap_or(v).as_array().unwrap().len();
        }
        assert_eq!(lines, 2_000, "every line once");
    }

    #[test]
    fn a_finish_refused_as_too_large_goes_again_without_the_log() {
        let s = Script::default();
        s.finish.borrow_mut().push_back(Ok(Finished::TooLarge(
            "payload too large (HTTP 413)".into(),
        )));
        let mut log = LogBatch::new(Instant::now());
        log.push("a line");
        let mut c = clock();
        assert_eq!(deliver(&s, &mut c, 1, &ok(), &mut log), Delivery::Recorded);
        let f = finishes(&s);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0]["log"], json!(["a line"]));
        assert!(
            f[1]["log"][0].as_str().unwrap().contains("refused"),
            "{}",
            f[1]
        );
        assert_eq!(f[1]["result"], f[0]["result"]);
    }

    /// An appliance down for hours gets the outcome once it is back; a
    /// day of silence gives up, saying so.
    #[test]
    fn an_outcome_is_retried_while_the_appliance_is_down() {
        let s = Script::default();
        for _ in 0..200 {
            s.finish.borrow_mut().push_back(down());
        }
        let mut log = LogBatch::new(Instant::now());
        let mut c = clock();
        let t0 = c.t;
        assert_eq!(deliver(&s, &mut c, 1, &ok(), &mut log), Delivery::Recorded);
        assert_eq!(finishes(&s).len(), 201);
        assert!(c.t - t0 > Duration::from_secs(3 * 3600), "{:?}", c.t - t0);

        let s = Script::default();
        for _ in 0..100_000 {
            s.finish.borrow_mut().push_back(down());
        }
        let mut c = clock();
        let t0 = c.t;
        match deliver(&s, &mut c, 1, &ok(), &mut log) {
            Delivery::Lost(why) => assert!(why.contains("24 h"), "{why}"),
            d => panic!("{d:?}"),
        }
        assert!(c.t - t0 >= GIVE_UP_AFTER);
        assert!(c.t - t0 < GIVE_UP_AFTER + 2 * MAX_PAUSE);
    }

    #[test]
    fn a_job_gone_or_ended_stops_the_tries() {
        for answer in [
            Ok(Finished::Gone("job 1 is not running (HTTP 409)".into())),
            Ok(Finished::Gone("no job 1 (HTTP 404)".into())),
        ] {
            let s = Script::default();
            s.finish.borrow_mut().extend([down(), answer]);
            let mut log = LogBatch::new(Instant::now());
            let d = deliver(&s, &mut clock(), 1, &ok(), &mut log);
            assert!(matches!(d, Delivery::Gone(_)), "{d:?}");
            assert_eq!(finishes(&s).len(), 2);
        }
        let s = Script::default();
        s.finish
            .borrow_mut()
            .push_back(Err(ServeError::Retired("HTTP 401".into())));
        let d = deliver(
            &s,
            &mut clock(),
            1,
            &ok(),
            &mut LogBatch::new(Instant::now()),
        );
        assert_eq!(d, Delivery::Retired("HTTP 401".into()));
    }

    #[test]
    fn a_long_error_is_cut() {
        let s = Script::default();
        let o = Outcome::failed("é".repeat(ERROR_MAX));
        let d = deliver(&s, &mut clock(), 1, &o, &mut LogBatch::new(Instant::now()));
        assert_eq!(d, Delivery::Recorded);
        let e = finishes(&s)[0]["error"].as_str().unwrap().to_string();
        assert!(e.len() <= ERROR_MAX && e.ends_with(" […]"), "{}", e.len());
        assert_eq!(cut("short", ERROR_MAX), "short");
    }

    #[test]
    fn a_stopping_service_tries_a_few_times() {
        let s = Script::default();
        for _ in 0..100 {
            s.finish.borrow_mut().push_back(down());
        }
        let mut c = clock();
        c.stopping = true;
        let d = deliver(&s, &mut c, 1, &ok(), &mut LogBatch::new(Instant::now()));
        assert!(matches!(d, Delivery::Lost(_)), "{d:?}");
        assert_eq!(finishes(&s).len(), TRIES_WHEN_STOPPING as usize);
    }
}
