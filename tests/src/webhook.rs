//! A webhook receiver on 127.0.0.1 for end-to-end tests: records every
//! request (headers and body), answers the first `fail_first` with 500 and
//! the rest with 200; with `hang`, holds every request unanswered until
//! [`Receiver::release`] (or the drop) — stuck for as long as the test
//! needs, not for some number of seconds.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex};

use serde_json::Value;

use crate::wait_for;

/// Each request: its headers (lower-case names) and its body.
pub type Received = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// Set when a hanging receiver may answer.
type Gate = Arc<(Mutex<bool>, Condvar)>;

pub struct Receiver {
    pub port: u16,
    pub got: Received,
    gate: Gate,
}

impl Receiver {
    /// Answers 200 to everything.
    pub fn start() -> Receiver {
        Receiver::with(0, false)
    }

    pub fn with(fail_first: usize, hang: bool) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a webhook receiver");
        Receiver::on(l, fail_first, hang)
    }

    pub fn on(l: TcpListener, fail_first: usize, hang: bool) -> Receiver {
        let port = l.local_addr().expect("receiver address").port();
        let got: Received = Arc::default();
        let gate: Gate = Arc::default();
        let (g, gt) = (got.clone(), gate.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(s) = conn else { continue };
                let (g, gt) = (g.clone(), gt.clone());
                // A thread per request: one held request must not keep the
                // next from being recorded.
                std::thread::spawn(move || serve_one(s, &g, &gt, fail_first, hang));
            }
        });
        Receiver { port, got, gate }
    }

    /// The URL to register (`http://127.0.0.1:PORT/hook`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn release(&self) {
        let (open, cv) = &*self.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }

    /// Every body received so far, as JSON (Null when it was not JSON).
    pub fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap_or(Value::Null))
            .collect()
    }

    /// Waits for the delivery of the event `kind` about `subject`.
    pub fn wait(&self, kind: &str, subject: &str) -> Value {
        wait_for(120, &format!("delivery of {kind} {subject}"), || {
            self.bodies()
                .into_iter()
                .find(|b| b["event"]["type"] == kind && b["event"]["subject"] == subject)
                .map(|b| b["event"].clone())
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.release();
    }
}

/// A header's value.
pub fn header<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn serve_one(mut s: std::net::TcpStream, g: &Received, gate: &Gate, fail_first: usize, hang: bool) {
    let Ok(c) = s.try_clone() else { return };
    let mut r = BufReader::new(c);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0u8; len];
    let _ = r.read_exact(&mut body);
    let n = {
        let mut gl = g.lock().unwrap();
        gl.push((headers, body));
        gl.len()
    };
    if hang {
        let (open, cv) = &**gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
    }
    let status = if n <= fail_first {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}
