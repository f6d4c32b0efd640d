//! A job's log on its way to the appliance: batches bounded by lines and
//! by bytes (the API refuses bodies over 1 MiB), and a bounded memory
//! while the appliance cannot be reached (the head of what waits is kept,
//! then the newest lines; what falls between is counted and said).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A progress call (the log so far, or nothing: a keep-alive) at least
/// this often.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Lines per progress call.
pub const BATCH_LINES: usize = 500;
/// Bytes of log (as JSON strings) per call: half the API's body limit.
pub const BATCH_BYTES: usize = 512 * 1024;
/// A log line's longest length (bytes, the truncation mark included).
pub const LINE_MAX: usize = 4096;
/// Bytes of log kept per job while the appliance cannot be reached.
pub const PENDING_BYTES: usize = 8 << 20;
/// Of those, the oldest waiting lines kept whatever comes after (how the
/// job started matters as much as how it ends).
pub const HEAD_BYTES: usize = 1 << 20;
/// Lines of stderr quoted as the error of a child that printed no JSON.
const LAST: usize = 5;
/// Appended to a truncated line.
const CUT_MARK: &str = " […]";

/// What a line costs in a request body: its JSON string and a comma.
pub fn cost(line: &str) -> usize {
    let escaped: usize = line
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    escaped + 3
}

/// One batch: the lines, and where they came from (to remove them once
/// the appliance has them).
#[derive(Debug, Default)]
pub struct Batch {
    pub lines: Vec<String>,
    head: usize,
    note: bool,
    tail: usize,
}

/// The job's log: lines waiting to be sent, and the last few for an error.
pub struct LogBatch {
    head: VecDeque<String>,
    head_bytes: usize,
    tail: VecDeque<String>,
    tail_bytes: usize,
    /// Lines dropped between `head` and `tail`.
    dropped: u64,
    last: VecDeque<String>,
    next_flush: Instant,
}

impl LogBatch {
    pub fn new(now: Instant) -> LogBatch {
        LogBatch {
            head: VecDeque::new(),
            head_bytes: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            dropped: 0,
            last: VecDeque::new(),
            next_flush: now + FLUSH_EVERY,
        }
    }

    pub fn push(&mut self, line: &str) {
        let mut l = line.trim_end().to_string();
        if l.len() > LINE_MAX {
            let mut cut = LINE_MAX - CUT_MARK.len();
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
            l.push_str(CUT_MARK);
        }
        if self.last.len() == LAST {
            self.last.pop_front();
        }
        self.last.push_back(l.clone());
        let c = cost(&l);
        if self.tail.is_empty() && self.dropped == 0 && self.head_bytes + c <= HEAD_BYTES {
            self.head.push_back(l);
            self.head_bytes += c;
            return;
        }
        self.tail.push_back(l);
        self.tail_bytes += c;
        while self.head_bytes + self.tail_bytes > PENDING_BYTES {
            let Some(old) = self.tail.pop_front() else {
                break;
            };
            self.tail_bytes -= cost(&old);
            if self.dropped == 0 {
                tracing::warn!(
                    kept_bytes = PENDING_BYTES,
                    "a job's log waits for the appliance beyond what is kept: lines are dropped between its head and its newest lines"
                );
            }
            self.dropped += 1;
        }
    }

    fn lines(&self) -> usize {
        self.head.len() + self.tail.len() + usize::from(self.dropped > 0)
    }

    /// Time for a progress call: the interval passed, or a full batch.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_flush
            || self.lines() >= BATCH_LINES
            || self.head_bytes + self.tail_bytes >= BATCH_BYTES
    }

    /// Nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.lines() == 0
    }

    /// The next batch (not removed until [`LogBatch::delivered`]): at
    /// most [`BATCH_LINES`] lines and [`BATCH_BYTES`] bytes, in order, a
    /// note where lines were dropped.
    pub fn batch(&self) -> Batch {
        let mut b = Batch::default();
        let mut bytes = 0;
        let mut fits = |b: &Batch, c: usize| {
            let ok = b.lines.len() < BATCH_LINES && bytes + c <= BATCH_BYTES;
            if ok {
                bytes += c;
            }
            ok
        };
        for l in &self.head {
            if !fits(&b, cost(l)) {
                return b;
            }
            b.lines.push(l.clone());
            b.head += 1;
        }
        if self.dropped > 0 {
            let note = format!(
                "cdm-agent: {} log lines dropped while the appliance could not be reached",
                self.dropped
            );
            if !fits(&b, cost(&note)) {
                return b;
            }
            b.lines.push(note);
            b.note = true;
        }
        for l in &self.tail {
            if !fits(&b, cost(l)) {
                return b;
            }
            b.lines.push(l.clone());
            b.tail += 1;
        }
        b
    }

    /// Everything waiting fits in one batch.
    pub fn fits_one_batch(&self) -> bool {
        self.batch().lines.len() == self.lines()
    }

    /// The appliance has `b`: its lines leave, the next call after the
    /// interval.
    pub fn delivered(&mut self, b: &Batch, now: Instant) {
        for l in self.head.drain(..b.head) {
            self.head_bytes -= cost(&l);
        }
        if b.note {
            self.dropped = 0;
        }
        for l in self.tail.drain(..b.tail) {
            self.tail_bytes -= cost(&l);
        }
        self.next_flush = now + FLUSH_EVERY;
    }

    /// The batch was not delivered: tried again at `retry`.
    pub fn retry_at(&mut self, retry: Instant) {
        self.next_flush = retry;
    }

    /// The last lines, ` | `-joined.
    pub fn tail_text(&self) -> String {
        self.last.iter().cloned().collect::<Vec<_>>().join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(b: &mut LogBatch, now: Instant) -> Vec<String> {
        let batch = b.batch();
        b.delivered(&batch, now);
        batch.lines
    }

    #[test]
    fn batches_every_interval_or_when_full() {
        let t0 = Instant::now();
        let mut b = LogBatch::new(t0);
        assert!(!b.due(t0));
        assert!(b.due(t0 + FLUSH_EVERY), "a keep-alive even without lines");
        b.push("one\n");
        b.push("two");
        assert!(!b.due(t0 + Duration::from_millis(100)));
        assert_eq!(send(&mut b, t0 + FLUSH_EVERY), vec!["one", "two"]);
        assert!(!b.due(t0 + FLUSH_EVERY + Duration::from_secs(1)));
        for i in 0..BATCH_LINES {
            b.push(&i.to_string());
        }
        assert!(b.due(t0), "a full batch goes at once");
        b.push("last");
        assert_eq!(send(&mut b, t0).len(), BATCH_LINES);
        assert_eq!(send(&mut b, t0), vec!["last"]);
        assert!(b.is_empty());
    }

    /// 500 lines of 4 KiB are 2 MiB: over the API's 1 MiB body limit.
    #[test]
    fn batches_are_bounded_by_bytes() {
        let t0 = Instant::now();
        let mut b = LogBatch::new(t0);
        for _ in 0..BATCH_LINES {
            b.push(&"x".repeat(10_000));
        }
        assert!(b.due(t0), "a batch's worth of bytes goes at once");
        let mut total = 0;
        while !b.is_empty() {
            let lines = send(&mut b, t0);
            let bytes: usize = lines.iter().map(|l| cost(l)).sum();
            // Well under the API's 1 MiB body limit.
            assert!(bytes <= 512 * 1024, "{bytes}");
            assert!(lines.iter().all(|l| l.len() <= LINE_MAX));
            total += lines.len();
        }
        assert_eq!(total, BATCH_LINES);
        // Escapes count: control characters are 6 bytes in JSON.
        b.push(&"\u{1}".repeat(4000));
        assert!(cost(&b.batch().lines[0]) > 6 * 4000);
        let mut long = LogBatch::new(t0);
        long.push(&"é".repeat(LINE_MAX));
        let l = &long.batch().lines[0];
        assert!(l.len() <= LINE_MAX && l.ends_with(CUT_MARK), "{}", l.len());
    }

    #[test]
    fn undelivered_lines_are_kept_in_order() {
        let t0 = Instant::now();
        let mut b = LogBatch::new(t0);
        b.push("a");
        b.push("b");
        let first = b.batch();
        b.push("c");
        b.retry_at(t0 + Duration::from_secs(4));
        assert!(!b.due(t0 + Duration::from_secs(3)), "after the backoff");
        assert!(b.due(t0 + Duration::from_secs(4)));
        assert_eq!(first.lines, ["a", "b"]);
        assert_eq!(send(&mut b, t0), ["a", "b", "c"]);
    }

    /// An appliance away for long: the memory held stays bounded, the
    /// head and the newest lines are kept, and the log says how many
    /// lines are missing between them.
    #[test]
    fn memory_is_bounded_keeping_head_and_newest() {
        let t0 = Instant::now();
        let mut b = LogBatch::new(t0);
        let line = |i: usize| format!("{i:06} {}", "y".repeat(4000));
        let n = 5_000; // about 20 MiB
        for i in 0..n {
            b.push(&line(i));
        }
        assert!(b.head_bytes + b.tail_bytes <= PENDING_BYTES);
        let mut got = Vec::new();
        while !b.is_empty() {
            got.extend(send(&mut b, t0));
        }
        let note = got
            .iter()
            .position(|l| l.starts_with("cdm-agent: "))
            .expect("a note of the dropped lines");
        let head = HEAD_BYTES / cost(&line(0));
        assert_eq!(note, head, "the head is kept whole");
        for (i, l) in got[..note].iter().enumerate() {
            assert!(l.starts_with(&format!("{i:06} ")));
        }
        let newest = &got[note + 1..];
        assert_eq!(
            newest.last().unwrap(),
            &line(n - 1),
            "the newest line is kept"
        );
        let dropped = n - note - newest.len();
        assert!(
            got[note].contains(&format!(" {dropped} log lines dropped")),
            "{}",
            got[note]
        );
        let first_new: usize = newest[0][..6].parse().unwrap();
        assert_eq!(first_new, note + dropped, "nothing missing after the gap");
        assert!(
            newest.len() * cost(&line(0)) > PENDING_BYTES - HEAD_BYTES - 2 * cost(&line(0)),
            "the memory allowed is used"
        );
        assert_eq!(b.tail_text().matches(" | ").count(), 4);
    }
}
