//! Events in over HTTP: Segment's tracking API (SPEC §8 "In").
//!
//! `POST /v1/track|identify|page|screen|alias|group` take one event,
//! `POST /v1/batch` takes `{"batch":[…]}`; so Segment's own libraries,
//! RudderStack's and any other client of that API send to shoal by changing
//! their host. A request is checked here, as a whole, before anything of it
//! is taken:
//!
//! - the write key is the HTTP Basic user name, one of `--write-key-file`'s
//!   keys (401 otherwise);
//! - the body, after `Content-Encoding: gzip` is undone, is at most 500 KB
//!   and each event at most 32 KB (400 otherwise; a gzip body is inflated
//!   only up to the limit, so a small bomb cannot grow large);
//! - it must parse as JSON of the right shape (400).
//!
//! Each event is then passed on as its own JSON text, untouched but for
//! two fields added when missing: `type` (from the path, for the
//! single-event calls) and `timestamp` (the time the request was received).
//! Whether an event is valid is decided by the reader, exactly as for a
//! line of a file: a bad one goes to the dead letters with its position
//! (the request's receive time and its index), and the request is still
//! answered 200. Duplicates (a client retrying) are dropped by `messageId`
//! like any other (`--dedupe-horizon`). The events go to the
//! [`Intake`], which answers once they are durable (with `--state`) or
//! says it is busy (503 with `Retry-After`).

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::io::intake::{Intake, Refused, Request};

/// The largest request body, after gzip is undone (Segment's limit).
pub const REQUEST_MAX: usize = 500 * 1024;
/// The largest event (Segment's limit).
pub const EVENT_MAX: usize = 32 * 1024;
/// A body up to this size is read to its end and answered 400 when over
/// [`REQUEST_MAX`] (closing the connection mid-body would leave the client
/// with a broken pipe instead of the answer); past it, the connection is
/// closed.
const READ_MAX: usize = 8 * REQUEST_MAX;
/// A request without a valid write key is answered before its body is
/// buffered: a body that says it is at most this long is read (and
/// dropped) first, so that the client reads the 401 rather than a broken
/// pipe; a longer one is not waited for.
const UNAUTHORIZED_READ: usize = 64 * 1024;
/// `/v1/` calls in progress at once; more wait for a slot (their bodies
/// unread), so that at most this many bodies are buffered.
const CONCURRENT: usize = 64;

/// What the `/v1/` calls need: the write keys and where events go.
pub struct EventsIn {
    keys: Vec<String>,
    intake: Arc<Intake>,
}

impl EventsIn {
    pub fn new(keys: Vec<String>, intake: Arc<Intake>) -> EventsIn {
        EventsIn { keys, intake }
    }

    /// The write keys of a file: one a line; blank lines and lines
    /// starting with `#` are skipped.
    pub fn keys_of(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }
}

/// The `/v1/` routes.
pub fn router(events: Arc<EventsIn>) -> Router {
    Router::new()
        .route("/v1/{call}", post(take))
        .with_state(events)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(CONCURRENT))
}

/// The single-event calls and the `type` each gives its events.
const CALLS: [&str; 6] = ["track", "identify", "page", "screen", "alias", "group"];

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let mut answer = (status, Json(json!({ "success": false, "error": message.into() }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    answer
}

async fn take(State(events): State<Arc<EventsIn>>, Path(call): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let received = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let kind = match call.as_str() {
        "batch" => None,
        c if CALLS.contains(&c) => Some(c),
        _ => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no call /v1/{call}: use track, identify, page, screen, alias, group or batch"),
            )
        }
    };
    if !authorized(&headers, &events.keys) {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n <= UNAUTHORIZED_READ) {
            let _ = axum::body::to_bytes(body, UNAUTHORIZED_READ).await;
        }
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a write key is needed: HTTP Basic authentication with the key as user name",
        );
    }
    let raw = match axum::body::to_bytes(body, READ_MAX).await {
        Ok(b) if b.len() <= REQUEST_MAX => b,
        Ok(_) => return refuse(StatusCode::BAD_REQUEST, format!("the body is larger than {REQUEST_MAX} bytes")),
        Err(e) => {
            let message = format!("cannot read the body (larger than {REQUEST_MAX} bytes, or cut short): {e}");
            return refuse(StatusCode::BAD_REQUEST, message);
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let body = if gzip {
        match gunzip(&raw) {
            Ok(b) => b,
            Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
        }
    } else {
        raw.to_vec()
    };
    let lines = match events_of(&body, kind, received) {
        Ok(lines) => lines,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    };
    let durable = match events.intake.submit(Request { received, events: lines }) {
        Ok(durable) => durable,
        Err(e @ (Refused::Busy | Refused::Closed | Refused::Log(_))) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    match durable.await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({ "success": true }))).into_response(),
        Ok(Err(e)) => refuse(StatusCode::SERVICE_UNAVAILABLE, Refused::Log(e).to_string()),
        Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, Refused::Closed.to_string()),
    }
}

/// Whether `headers` carry one of `keys` as the Basic user name.
fn authorized(headers: &HeaderMap, keys: &[String]) -> bool {
    use base64::Engine as _;
    let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
        return false;
    };
    let user = decoded.split(|&b| b == b':').next().unwrap_or_default();
    keys.iter().any(|k| k.as_bytes() == user)
}

/// A gzip body inflated, refused past [`REQUEST_MAX`].
fn gunzip(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(raw)
        .take(REQUEST_MAX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("the body is not valid gzip: {e}"))?;
    if out.len() > REQUEST_MAX {
        return Err(format!("the body is larger than {REQUEST_MAX} bytes once inflated"));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<&'a RawValue>,
}

/// The two fields an event may lack.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// A request body's events, each one JSON text on one line, `type` and
/// `timestamp` filled in when missing.
fn events_of(body: &[u8], kind: Option<&str>, received: u64) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    let raws: Vec<&RawValue> = match kind {
        None => {
            serde_json::from_str::<Batch>(text)
                .map_err(|e| format!("the body is not {{\"batch\":[…]}}: {e}"))?
                .batch
        }
        Some(_) => vec![serde_json::from_str::<&RawValue>(text).map_err(|e| format!("the body is not JSON: {e}"))?],
    };
    let stamp = crate::core::clock::format_time(received, true);
    raws.iter()
        .enumerate()
        .map(|(i, raw)| {
            let text = raw.get();
            if text.len() > EVENT_MAX {
                return Err(format!("event {i} is {} bytes, more than {EVENT_MAX}", text.len()));
            }
            Ok(complete(text, kind, &stamp))
        })
        .collect()
}

/// One event's text with `type` and `timestamp` added when missing (or
/// null), and line breaks (only whitespace, in valid JSON) made spaces.
fn complete(text: &str, kind: Option<&str>, stamp: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    let probe = serde_json::from_str::<Probe>(text).ok();
    // A null reads as missing: when the key is there, the value is replaced
    // through a map (rare), not given twice.
    let named = |key: &str| text.contains(&format!("\"{key}\""));
    let null_at = |p: &&Probe| (p.timestamp.is_none() && named("timestamp")) || (kind.is_some() && p.kind.is_none() && named("type"));
    if let Some(p) = probe.as_ref().filter(null_at) {
        if let Ok(mut map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
            if p.timestamp.is_none() {
                map.insert("timestamp".into(), stamp.into());
            }
            if let (None, Some(kind)) = (p.kind, kind) {
                map.insert("type".into(), kind.into());
            }
            return serde_json::to_vec(&map).expect("a map serializes");
        }
    }
    let rest = text.trim_start().strip_prefix('{');
    match (probe, rest) {
        (Some(probe), Some(rest)) => {
            out.push(b'{');
            if probe.timestamp.is_none() {
                out.extend_from_slice(b"\"timestamp\":\"");
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b"\",");
            }
            if let (None, Some(kind)) = (probe.kind, kind) {
                out.extend_from_slice(b"\"type\":\"");
                out.extend_from_slice(kind.as_bytes());
                out.extend_from_slice(b"\",");
            }
            // `{` + fields added + `}` of an empty object: drop the comma.
            if rest.trim_start().starts_with('}') && out.last() == Some(&b',') {
                out.pop();
            }
            out.extend_from_slice(rest.as_bytes());
        }
        // Not an object: passed on as it is, for its dead letter.
        _ => out.extend_from_slice(text.as_bytes()),
    }
    for b in &mut out {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_added_and_present_ones_kept() {
        let stamp = "2026-12-06T01:02:03.004Z";
        let got = complete(r#"{"event":"A","userId":"u"}"#, Some("track"), stamp);
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v["type"], "track");
        assert_eq!(v["timestamp"], stamp);
        assert_eq!(v["event"], "A");
        let got = complete(r#"{"type":"identify","timestamp":"2024-01-01T00:00:00Z"}"#, Some("track"), stamp);
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v["type"], "identify");
        assert_eq!(v["timestamp"], "2024-01-01T00:00:00Z");
        // A batch event keeps its lack of type (it is bad, as in a file).
        let got = complete("{ }", None, stamp);
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v.get("type"), None);
        assert_eq!(v["timestamp"], stamp);
        assert_eq!(complete("[1]", None, stamp), b"[1]");
        // A null is replaced, not given twice (a duplicate key is refused).
        let got = complete(r#"{"type":null,"timestamp":null,"p":{"timestamp":1}}"#, Some("page"), stamp);
        let text = String::from_utf8(got).unwrap();
        assert_eq!(text.matches("\"timestamp\"").count(), 2, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["timestamp"].as_str(), &v["p"]["timestamp"]),
            (Some("page"), Some(stamp), &serde_json::json!(1))
        );
        assert!(!complete("{\n\"a\":\n1}", None, stamp).contains(&b'\n'));
    }

    #[test]
    fn requests_are_checked_as_a_whole() {
        assert!(events_of(br#"{"batch":[{"type":"track"}, 3]}"#, None, 0).unwrap().len() == 2);
        assert!(events_of(br#"{"batch":{}}"#, None, 0).is_err());
        assert!(events_of(b"{", Some("track"), 0).is_err());
        let big = format!(r#"{{"batch":[{{"type":"track","p":"{}"}}]}}"#, "x".repeat(EVENT_MAX));
        assert!(events_of(big.as_bytes(), None, 0).unwrap_err().contains("event 0"));
    }

    #[test]
    fn write_keys_are_basic_user_names() {
        use base64::Engine as _;
        let keys = vec!["k1".to_string()];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(authorized(&with(&format!("Basic {}", b64("k1:"))), &keys));
        assert!(!authorized(&with(&format!("Basic {}", b64("k2:"))), &keys));
        assert!(!authorized(&with("Bearer k1"), &keys));
        assert!(!authorized(&HeaderMap::new(), &keys));
    }
}
