//! The sender's transport to a target's replication listener, and who the
//! caller is on the receiving side.
//!
//! The control side builds the [`PeerHttp`] agent with the mutual-TLS
//! client configuration (own client certificate, only the peer's pinned CA
//! trusted); tests use a plain one. Either way every answer that is not a
//! 2xx becomes a [`ReplError`] carrying the target's error code, and every
//! failure to get an answer at all is `network`.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ReplError;
use super::throttle::Throttle;

/// Answers larger than this are refused (the largest is a volume's list
/// of points: a few hundred bytes per point).
const MAX_ANSWER: u64 = 16 << 20;

/// A paired appliance as the replication listener identified it from its
/// client certificate; inserted as a request extension by the listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerId {
    pub name: String,
    pub identity: String,
    /// Hex SHA-256 of its client certificate, pinned at pairing: what a
    /// replica is bound to (an identity is only what a peer claimed).
    pub cert_sha256: String,
}

/// HTTP(S) to one peer's replication listener.
#[derive(Clone)]
pub struct PeerHttp {
    pub agent: ureq::Agent,
    /// `https://HOST:PORT` (no trailing slash).
    pub base: String,
}

/// Paces a request body through the bandwidth limit as the socket takes
/// it, in small pieces, so the limit holds within a batch too.
struct Paced<'a> {
    data: &'a [u8],
    throttle: &'a Throttle,
}

impl Read for Paced<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len()).min(64 << 10);
        if n == 0 {
            return Ok(0);
        }
        self.throttle.consume(n as u64);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn answer_error(e: ureq::Error) -> ReplError {
    match e {
        ureq::Error::Status(status, resp) => {
            let mut body = String::new();
            let _ = resp.into_reader().take(64 << 10).read_to_string(&mut body);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let code = v["error"]["code"].as_str().unwrap_or("http").to_string();
            let message = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("the target answered {status}: {body}"));
            ReplError {
                status,
                ..ReplError::new(&code, message)
            }
        }
        ureq::Error::Transport(t) => ReplError::new("network", t.to_string()),
    }
}

fn read_body(resp: ureq::Response) -> Result<Vec<u8>, ReplError> {
    let mut out = Vec::new();
    resp.into_reader()
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut out)
        .map_err(|e| ReplError::new("network", format!("reading the answer: {e}")))?;
    if out.len() as u64 > MAX_ANSWER {
        return Err(ReplError::new(
            "protocol",
            "the target's answer is larger than any valid one",
        ));
    }
    Ok(out)
}

fn json<T: DeserializeOwned>(b: &[u8]) -> Result<T, ReplError> {
    serde_json::from_slice(b)
        .map_err(|e| ReplError::new("protocol", format!("the target's answer: {e}")))
}

impl PeerHttp {
    pub fn new(agent: ureq::Agent, base: String) -> PeerHttp {
        PeerHttp {
            agent,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ReplError> {
        let resp = self
            .agent
            .get(&self.url(path))
            .call()
            .map_err(answer_error)?;
        json(&read_body(resp)?)
    }

    /// A JSON request; its body counts against `throttle`.
    pub fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        throttle: &Throttle,
    ) -> Result<T, ReplError> {
        let b = serde_json::to_vec(body).map_err(|e| ReplError::new("internal", e.to_string()))?;
        let out = self.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            &b,
            throttle,
        )?;
        json(&out)
    }

    /// A binary body (paced by `throttle`); the answer's bytes.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        throttle: &Throttle,
    ) -> Result<Vec<u8>, ReplError> {
        let mut req = self
            .agent
            .request(method, &self.url(path))
            .set("content-length", &body.len().to_string());
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.set("content-type", "application/octet-stream");
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = req
            .send(Paced {
                data: body,
                throttle,
            })
            .map_err(answer_error)?;
        read_body(resp)
    }

    pub fn delete(&self, path: &str) -> Result<(), ReplError> {
        self.agent
            .delete(&self.url(path))
            .call()
            .map_err(answer_error)?;
        Ok(())
    }
}
