//! Membership changes to webhooks (SPEC §8 "Out", `--output-webhook URL`).
//!
//! [`WebhookSink`] is a [`Deliver`]: the sink hands it each tick's lines,
//! and a thread of its own POSTs them, one request after another, in tick
//! order. A request holds the lines of one tick (cut into chunks of
//! [`CHUNK`] lines when a tick has more), so the requests a run makes do
//! not depend on timing: after a restart from a checkpoint the same changes
//! go out in the same requests, with the same `Idempotency-Key` (a digest
//! of the tick, the chunk and the body), and a receiver can drop repeats
//! by that key. With a secret, `X-Shoal-Signature: sha256=<hex HMAC-SHA256
//! of the body>` lets the receiver check the sender.
//!
//! **At least once, in order.** A request is retried, with exponential
//! backoff from 100 ms to 30 s, on a connection error, a timeout, 408, 429
//! (waiting at least its `Retry-After`) and 5xx; while it is, the sink's
//! [`Deliver::unacknowledged`] names its tick, which holds the delivered
//! frontier and so the input (a reader keeps only a few batches beyond
//! what was delivered) and the checkpoints: changes wait in a bounded
//! amount of memory, never in a queue that grows while the receiver is
//! down. A request answered with another 4xx, or a redirect (shoal does
//! not follow one: it would turn the POST into a GET), is permanent: it goes to
//! `--webhook-dead-letter` with the answer, is counted, and delivery goes
//! on.
//!
//! **Bodies.** NDJSON (the SPEC §5 lines, `Content-Type:
//! application/x-ndjson`), or with `--webhook-format segment` a Segment
//! `/v1/batch` body of `track` events `Segment Entered` / `Segment Exited`
//! (`properties.segment`, `properties.group`), `userId` or `anonymousId`
//! from the profile id, the change's time as `timestamp`, and a
//! `messageId` that is a digest of the line (so a second shoal reading
//! them drops repeats). Credentials in the URL (`http://KEY:@host/v1/batch`)
//! are sent as HTTP Basic authentication, which is how a Segment receiver
//! takes its write key.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::Mac;
use serde::Serialize;
use sha2::Digest;

use crate::output::deliver::{Deliver, OpenError, OpenOutput};

/// Lines per request at most (a tick with more is cut into chunks).
pub const CHUNK: usize = 500;
/// The first wait before a retry; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the lines are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// The SPEC §5 lines, one a line.
    #[default]
    Ndjson,
    /// A Segment `/v1/batch` body of `Segment Entered` / `Segment Exited`
    /// `track` events.
    Segment,
}

/// The `--output-webhook` settings shared by every URL.
#[derive(Clone, Debug, Default)]
pub struct WebhookOptions {
    pub format: Format,
    /// The HMAC key (`--webhook-secret-file`).
    pub secret: Option<Vec<u8>>,
    /// Where permanently refused requests go (`--webhook-dead-letter`);
    /// without it, stderr.
    pub dead_letter: Option<PathBuf>,
    /// How long one attempt may take.
    pub timeout: Duration,
}

/// A request on its way: its tick, body and key.
struct Batch {
    tick: u64,
    body: Vec<u8>,
    key: String,
}

/// What the sender thread and the sink share.
#[derive(Default)]
struct Shared {
    /// Requests not yet answered for good, by tick.
    unacked: BTreeMap<u64, usize>,
    /// Requests refused for good.
    refused: u64,
    /// Set when the sink is dropped: retries end at this time (what is not
    /// delivered by then is left for the next run, which a checkpoint
    /// resumes before it).
    give_up_at: Option<std::time::Instant>,
}

/// The shared state and a condition to wake a sender that waits to retry.
#[derive(Default)]
struct Link {
    state: Mutex<Shared>,
    wake: std::sync::Condvar,
}

/// How long a dropped sink's sender goes on retrying.
const GRACE: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// Changes to one webhook (see the module docs).
pub struct WebhookSink {
    url: String,
    format: Format,
    /// The tick being gathered and its lines.
    tick: Option<u64>,
    lines: Vec<String>,
    chunk: usize,
    to_sender: Option<Sender<Batch>>,
    shared: Arc<Link>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookSink {
    pub fn new(url: &str, opts: &WebhookOptions) -> std::io::Result<WebhookSink> {
        let (endpoint, basic) = split_credentials(url)?;
        let (tx, rx) = channel();
        let shared = Arc::new(Link::default());
        let sender = Sender_ {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(opts.timeout)
                // A redirect is an answer, not a delivery (following one
                // would turn the POST into a GET without its body).
                .redirects(0)
                .build(),
            url: shown(&endpoint),
            endpoint,
            basic,
            content_type: match opts.format {
                Format::Ndjson => "application/x-ndjson",
                Format::Segment => "application/json",
            },
            secret: opts.secret.clone(),
            dead_letter: opts.dead_letter.clone(),
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("shoal-webhook".into())
            .spawn(move || sender.run(rx))?;
        Ok(WebhookSink {
            url: shown(url),
            format: opts.format,
            tick: None,
            lines: Vec::new(),
            chunk: 0,
            to_sender: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Sends the lines gathered as one request.
    fn cut(&mut self) {
        let Some(tick) = self.tick else { return };
        if self.lines.is_empty() {
            return;
        }
        let body = match self.format {
            Format::Ndjson => {
                let mut b = Vec::with_capacity(self.lines.iter().map(|l| l.len() + 1).sum());
                for l in &self.lines {
                    b.extend_from_slice(l.as_bytes());
                    b.push(b'\n');
                }
                b
            }
            Format::Segment => segment_body(&self.lines),
        };
        self.lines.clear();
        let digest = sha2::Sha256::new()
            .chain_update(tick.to_be_bytes())
            .chain_update((self.chunk as u64).to_be_bytes())
            .chain_update(&body)
            .finalize();
        let key = format!("shoal-{tick}-{}-{}", self.chunk, hex::encode(&digest[..12]));
        self.chunk += 1;
        *self.shared.state.lock().expect("not poisoned").unacked.entry(tick).or_default() += 1;
        if let Some(tx) = &self.to_sender {
            if tx.send(Batch { tick, body, key }).is_err() {
                tracing::error!(url = %self.url, "the webhook sender has stopped");
            }
        }
    }
}

impl Deliver for WebhookSink {
    fn send(&mut self, tick: u64, _key: &str, line: &str) -> std::io::Result<()> {
        if self.tick != Some(tick) {
            self.cut();
            self.tick = Some(tick);
            self.chunk = 0;
        }
        self.lines.push(line.to_string());
        if self.lines.len() == CHUNK {
            self.cut();
        }
        Ok(())
    }

    fn end_tick(&mut self, _tick: u64) -> std::io::Result<()> {
        self.cut();
        Ok(())
    }

    fn unacknowledged(&mut self) -> Option<u64> {
        self.shared.state.lock().expect("not poisoned").unacked.keys().next().copied()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.cut();
        // Closing the channel ends the sender once it has sent what it
        // has, retrying for at most GRACE (a stop while the receiver is
        // down must not hang; a checkpoint never passes what is unsent).
        self.to_sender = None;
        self.shared.state.lock().expect("not poisoned").give_up_at = Some(std::time::Instant::now() + GRACE);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let st = self.shared.state.lock().expect("not poisoned");
        if st.refused > 0 {
            eprintln!(
                "shoal: webhook {}: {} request(s) refused for good (see the webhook dead letters)",
                self.url, st.refused
            );
        }
        if let Some(first) = st.unacked.keys().next() {
            eprintln!(
                "shoal: webhook {}: changes from {} on were not delivered before the stop",
                self.url,
                crate::core::clock::format_time(*first, true)
            );
        }
    }
}

/// `http://user:pass@host/…` as the URL without credentials and the Basic
/// credentials (percent-decoded).
fn split_credentials(url: &str) -> std::io::Result<(String, Option<String>)> {
    use base64::Engine as _;
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("--output-webhook {}: {e}", shown(url)));
    let mut parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if parsed.username().is_empty() && parsed.password().is_none() {
        return Ok((url.to_string(), None));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let user = decode(parsed.username());
    let password = decode(parsed.password().unwrap_or_default());
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    parsed.set_username("").map_err(|()| bad("cannot take the user name out".into()))?;
    parsed.set_password(None).map_err(|()| bad("cannot take the password out".into()))?;
    Ok((parsed.to_string(), Some(basic)))
}

/// A URL as it may be shown (in logs and messages): without credentials.
fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => url.split('@').next_back().unwrap_or(url).to_string(),
    }
}

/// A Segment `/v1/batch` body for SPEC §5 lines. Their strings are
/// borrowed unless they hold escapes (an id with a quote or backslash),
/// which are undone into owned ones.
fn segment_body(lines: &[String]) -> Vec<u8> {
    use std::borrow::Cow;
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        time: Cow<'a, str>,
        #[serde(borrow)]
        segment: Cow<'a, str>,
        #[serde(borrow)]
        profile: Cow<'a, str>,
        #[serde(borrow)]
        change: Cow<'a, str>,
        #[serde(borrow)]
        group: Option<Cow<'a, str>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Track<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        event: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<Cow<'a, str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        anonymous_id: Option<Cow<'a, str>>,
        timestamp: Cow<'a, str>,
        message_id: String,
        properties: Props<'a>,
    }
    #[derive(Serialize)]
    struct Props<'a> {
        segment: Cow<'a, str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<Cow<'a, str>>,
    }
    #[derive(Serialize)]
    struct Body<'a> {
        batch: Vec<Track<'a>>,
    }
    /// The part of `s` after its first `:` (an id after its kind).
    fn after_colon<'a>(s: &Cow<'a, str>, at: usize) -> Cow<'a, str> {
        match s {
            Cow::Borrowed(b) => Cow::Borrowed(&b[at + 1..]),
            Cow::Owned(o) => Cow::Owned(o[at + 1..].to_string()),
        }
    }
    let batch = lines
        .iter()
        .filter_map(|l| {
            let line: Line = match serde_json::from_str(l) {
                Ok(line) => line,
                Err(e) => {
                    // Lines are written by shoal itself (SPEC §5): not one
                    // should fail, and none leaves without a word.
                    tracing::error!("webhook: a change line could not be read ({e}), left out of the batch: {l}");
                    return None;
                }
            };
            let (user_id, anonymous_id) = match line.profile.find(':') {
                Some(at) if &line.profile[..at] == "anon" => (None, Some(after_colon(&line.profile, at))),
                Some(at) => (Some(after_colon(&line.profile, at)), None),
                None => (Some(line.profile.clone()), None),
            };
            Some(Track {
                kind: "track",
                event: if line.change == "enter" {
                    "Segment Entered"
                } else {
                    "Segment Exited"
                },
                user_id,
                anonymous_id,
                timestamp: line.time,
                message_id: format!("shoal-{}", hex::encode(&sha2::Sha256::digest(l.as_bytes())[..16])),
                properties: Props {
                    segment: line.segment,
                    group: line.group,
                },
            })
        })
        .collect();
    serde_json::to_vec(&Body { batch }).expect("serializable")
}

/// The sending thread of one webhook.
struct Sender_ {
    agent: ureq::Agent,
    /// Where requests go, and the same as it may be shown.
    endpoint: String,
    url: String,
    basic: Option<String>,
    content_type: &'static str,
    secret: Option<Vec<u8>>,
    dead_letter: Option<PathBuf>,
    shared: Arc<Link>,
}

/// What one attempt gave.
enum Answer {
    Done,
    /// Try again, after at least this long when the receiver said so.
    Again(String, Option<Duration>),
    /// Refused for good: the status and the answer's body.
    Refused(u16, String),
}

impl Sender_ {
    fn run(&self, batches: Receiver<Batch>) {
        while let Ok(batch) = batches.recv() {
            let mut wait = BACKOFF_START;
            let mut attempts = 0u32;
            let delivered = loop {
                attempts += 1;
                match self.attempt(&batch) {
                    Answer::Done => break true,
                    Answer::Refused(status, answer) => {
                        self.refused(&batch, status, &answer);
                        break true;
                    }
                    Answer::Again(why, at_least) => {
                        if attempts == 1 || attempts.is_multiple_of(10) {
                            tracing::warn!(url = %self.url, attempts, "webhook: {why}; retrying");
                        }
                        let pause = at_least.map_or(wait, |a| a.min(RETRY_AFTER_MAX).max(wait));
                        if !self.pause(pause) {
                            break false;
                        }
                        wait = (wait * 2).min(BACKOFF_MAX);
                    }
                }
            };
            if !delivered {
                return; // the sink is gone and the grace is over
            }
            let mut shared = self.shared.state.lock().expect("not poisoned");
            if let Some(n) = shared.unacked.get_mut(&batch.tick) {
                *n -= 1;
                if *n == 0 {
                    shared.unacked.remove(&batch.tick);
                }
            }
        }
    }

    /// Waits `pause` before a retry; false when the sink is gone and its
    /// grace is over (then nothing more is tried).
    fn pause(&self, pause: Duration) -> bool {
        let until = std::time::Instant::now() + pause;
        let mut st = self.shared.state.lock().expect("not poisoned");
        loop {
            let now = std::time::Instant::now();
            if st.give_up_at.is_some_and(|g| now >= g) {
                return false;
            }
            if now >= until {
                return true;
            }
            let next = st.give_up_at.map_or(until, |g| g.min(until));
            st = self.shared.wake.wait_timeout(st, next - now).expect("not poisoned").0;
        }
    }

    fn attempt(&self, batch: &Batch) -> Answer {
        let mut request = self
            .agent
            .post(&self.endpoint)
            .set("Content-Type", self.content_type)
            .set("Idempotency-Key", &batch.key)
            .set("User-Agent", concat!("shoal/", env!("CARGO_PKG_VERSION")));
        if let Some(basic) = &self.basic {
            request = request.set("Authorization", &format!("Basic {basic}"));
        }
        if let Some(secret) = &self.secret {
            request = request.set("X-Shoal-Signature", &signature(secret, &batch.body));
        }
        match request.send_bytes(&batch.body) {
            Ok(r) if (200..300).contains(&r.status()) => Answer::Done,
            // A redirect (or any other answer below 400 that is not a
            // success): the URL is wrong, which retrying does not mend.
            Ok(r) => {
                let status = r.status();
                Answer::Refused(status, r.into_string().unwrap_or_default())
            }
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = response.into_string().unwrap_or_default();
                match status {
                    408 | 429 | 500..=599 => Answer::Again(format!("answered {status}"), retry_after),
                    _ => Answer::Refused(status, body),
                }
            }
            Err(ureq::Error::Transport(e)) => Answer::Again(e.to_string(), None),
        }
    }

    /// Writes a refused request to the webhook dead letters.
    fn refused(&self, batch: &Batch, status: u16, answer: &str) {
        self.shared.state.lock().expect("not poisoned").refused += 1;
        #[derive(Serialize)]
        struct Dead<'a> {
            url: &'a str,
            key: &'a str,
            status: u16,
            answer: &'a str,
            body: &'a str,
        }
        let line = serde_json::to_string(&Dead {
            url: &self.url,
            key: &batch.key,
            status,
            answer,
            body: &String::from_utf8_lossy(&batch.body),
        })
        .expect("serializable");
        tracing::warn!(url = %self.url, status, "webhook: a request was refused for good");
        let written = match &self.dead_letter {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}")),
            None => writeln!(std::io::stderr(), "{line}"),
        };
        if let Err(e) = written {
            eprintln!("shoal: cannot write the webhook dead letter: {e}: {line}");
        }
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// An output that opens a [`WebhookSink`] for `url` on worker 0.
pub fn webhook_output(url: String, opts: WebhookOptions) -> OpenOutput {
    Arc::new(move |_resume| -> Result<Box<dyn Deliver>, OpenError> {
        let sink = WebhookSink::new(&url, &opts).map_err(|e| OpenError::Other(Box::new(e)))?;
        Ok(Box::new(sink))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        assert_eq!(
            split_credentials("http://key:@127.0.0.1:9/v1/batch").unwrap(),
            ("http://127.0.0.1:9/v1/batch".to_string(), Some("a2V5Og==".to_string()))
        );
        assert_eq!(split_credentials("https://h/x@y").unwrap(), ("https://h/x@y".to_string(), None));
        // No path: the host is still the one before the query.
        let (url, basic) = split_credentials("http://k%40x:p@host?x=a@b").unwrap();
        assert_eq!(url::Url::parse(&url).unwrap().host_str(), Some("host"));
        assert_eq!(basic.as_deref(), Some("a0B4OnA="), "base64 of `k@x:p`, percent-decoded");
        assert_eq!(shown("http://key:secret@h/p"), "http://h/p");
        assert!(split_credentials("not a url").is_err());
    }

    #[test]
    fn segment_bodies_name_the_profile_and_change() {
        let body = segment_body(&[
            r#"{"time":"2024-01-01T00:00:01Z","segment":"s","profile":"user:u1","change":"enter"}"#.to_string(),
            r#"{"time":"2024-01-01T00:00:01Z","segment":"t","profile":"anon:a:b","change":"exit","group":"holdout"}"#.to_string(),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let b = v["batch"].as_array().unwrap();
        assert_eq!(b[0]["event"], "Segment Entered");
        assert_eq!(b[0]["userId"], "u1");
        assert_eq!(b[0]["properties"]["segment"], "s");
        assert_eq!(b[1]["event"], "Segment Exited");
        assert_eq!(b[1]["anonymousId"], "a:b");
        assert_eq!(b[1]["properties"]["group"], "holdout");
        assert_ne!(b[0]["messageId"], b[1]["messageId"]);
    }

    #[test]
    fn segment_bodies_keep_ids_that_need_escapes() {
        // The SPEC §5 line escapes a quote and a backslash; they must reach
        // the body undone, not drop the change.
        let line =
            serde_json::json!({"time": "2024-01-01T00:00:01Z", "segment": "s\"q", "profile": "user:CORP\\jdoe\"x", "change": "enter"});
        let body = segment_body(&[line.to_string()]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let b = v["batch"].as_array().unwrap();
        assert_eq!(b.len(), 1, "the change is in the batch: {v}");
        assert_eq!(b[0]["userId"], "CORP\\jdoe\"x");
        assert_eq!(b[0]["properties"]["segment"], "s\"q");
    }

    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
