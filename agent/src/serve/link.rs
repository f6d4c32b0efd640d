//! The service's calls to the appliance (`/v1/agent/*`), each answer
//! sorted into what the service does next: go on, retry later (the
//! appliance is down or restarting), or stop (the credential is refused:
//! the host was retired).

use std::path::Path;
use std::time::Duration;

use cdm_api::client::{encode_segment, Client, ClientError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ServeError;

/// Longest long poll the contract allows.
pub const MAX_WAIT: u64 = 30;

/// The appliance as seen with this host's credential.
pub struct Link {
    /// Short calls: heartbeat, progress, finish.
    calls: Client,
    /// The long poll, whose answer may take `MAX_WAIT` seconds.
    poll: Client,
}

/// `POST /v1/agent/enrol`'s answer.
#[derive(Debug, Deserialize)]
pub struct Enrolled {
    pub host: String,
    pub credential: String,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
}

fn default_heartbeat() -> u64 {
    10
}

/// What the appliance said of a running job's progress.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// Cancelled on the appliance: stop the child, finish as cancelled.
    Cancel,
    /// Not this host's, or no longer running: stop the child.
    Gone(String),
}

/// What the appliance said of a job's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    Recorded,
    /// The appliance has another outcome for it (it failed the job
    /// meanwhile, or the job is not this host's).
    Refused(String),
}

/// A call's transport failure or 5xx is worth retrying; 401 means the
/// credential is gone; other statuses are answers.
fn classify(r: Result<(u16, Value), ClientError>) -> Result<(u16, Value), ServeError> {
    match r {
        Err(e) => Err(ServeError::Unreachable(e.to_string())),
        Ok((401, v)) => Err(ServeError::Retired(message(401, &v))),
        Ok((s, v)) if s >= 500 => Err(ServeError::Unreachable(message(s, &v))),
        Ok(x) => Ok(x),
    }
}

/// The API's error message of an answer.
pub fn message(status: u16, v: &Value) -> String {
    match (&v["error"]["message"], v) {
        (Value::String(m), _) => format!("{m} (HTTP {status})"),
        (_, Value::String(s)) if !s.is_empty() => format!("{s} (HTTP {status})"),
        _ => format!("HTTP {status}"),
    }
}

/// A client of `url` that trusts only the CA in `ca` for https.
fn client(
    url: &str,
    token: Option<&str>,
    timeout: Duration,
    ca: Option<&Path>,
) -> Result<Client, ServeError> {
    Client::with_ca(url, token.map(str::to_string), timeout, ca)
        .map_err(|e| ServeError::Invalid(e.to_string()))
}

impl Link {
    /// The appliance at `url`, with the host's credential; `ca` pinned.
    pub fn new(url: &str, credential: &str, ca: Option<&Path>) -> Result<Link, ServeError> {
        Ok(Link {
            calls: client(url, Some(credential), Duration::from_secs(30), ca)?,
            poll: client(
                url,
                Some(credential),
                Duration::from_secs(MAX_WAIT + 30),
                ca,
            )?,
        })
    }

    /// Enrols with a one-time token (no credential yet).
    pub fn enrol(url: &str, ca: Option<&Path>, body: &Value) -> Result<Enrolled, ServeError> {
        let c = client(url, None, Duration::from_secs(30), ca)?;
        match c.request("POST", "/v1/agent/enrol", Some(body)) {
            Err(e) => Err(ServeError::Unreachable(e.to_string())),
            Ok((s, v)) if s >= 500 => Err(ServeError::Unreachable(message(s, &v))),
            Ok((200..=299, v)) => serde_json::from_value(v)
                .map_err(|e| ServeError::Unreachable(format!("unexpected enrolment answer: {e}"))),
            Ok((s, v)) => Err(ServeError::EnrolRefused(message(s, &v))),
        }
    }

    /// Returns the heartbeat interval the appliance wants.
    pub fn heartbeat(&self, body: &Value) -> Result<u64, ServeError> {
        let (s, v) = classify(
            self.calls
                .request("POST", "/v1/agent/heartbeat", Some(body)),
        )?;
        if !(200..300).contains(&s) {
            return Err(ServeError::Refused(message(s, &v)));
        }
        Ok(v["heartbeat_seconds"].as_u64().unwrap_or(10).clamp(1, 3600))
    }

    /// Jobs for this host, after at most `wait` seconds.
    pub fn jobs(&self, wait: u64) -> Result<Vec<Value>, ServeError> {
        let path = format!("/v1/agent/jobs?wait={}", wait.min(MAX_WAIT));
        let (s, v) = classify(self.poll.request("GET", &path, None))?;
        match (s, v) {
            (200..=299, Value::Array(a)) => Ok(a),
            (200..=299, v) => Err(ServeError::Unreachable(format!(
                "unexpected answer to the job poll: {v}"
            ))),
            (s, v) => Err(ServeError::Refused(message(s, &v))),
        }
    }

    pub fn progress(&self, id: u64, log: &[String]) -> Result<Progress, ServeError> {
        let body = json!({"done": 0, "total": 0, "log": log});
        let path = format!(
            "/v1/agent/jobs/{}/progress",
            encode_segment(&id.to_string())
        );
        let (s, v) = classify(self.calls.request("POST", &path, Some(&body)))?;
        Ok(match s {
            200..=299 if v["cancel"] == Value::Bool(true) => Progress::Cancel,
            200..=299 => Progress::Continue,
            404 | 409 | 410 => Progress::Gone(message(s, &v)),
            _ => return Err(ServeError::Refused(message(s, &v))),
        })
    }

    pub fn finish(&self, id: u64, body: &Value) -> Result<Finished, ServeError> {
        let path = format!("/v1/agent/jobs/{}/finish", encode_segment(&id.to_string()));
        let (s, v) = classify(self.calls.request("POST", &path, Some(body)))?;
        Ok(match s {
            200..=299 => Finished::Recorded,
            _ => Finished::Refused(message(s, &v)),
        })
    }
}
