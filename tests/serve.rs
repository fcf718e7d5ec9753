//! The HTTP API (SPEC §7) over a real socket, against `shoal run --http`
//! on generated data: sizes and members agree with the diffs written up to
//! the same tick, history with the diffs, a segment added at run time has
//! the members the reference evaluator gives and its enters are written,
//! removal writes exits, and bad requests get 400/404 without stopping the
//! run, which serves until SIGTERM.

mod reference;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SPEC: &str = r#"
[[segment]]
name = "viewers"
description = "Viewed 3+ products in 48h"
when = "count('Product Viewed', 48h) >= 3"

[[segment]]
name = "carts"
when = "count('Product Added', 24h) >= 1 and not in_segment('viewers')"

[[segment]]
name = "mobile"
when = "count(page where context.device.type == 'mobile', 7d) >= 2"
"#;

/// The runtime segment: terms of the spec only, a filter written anew.
const ADDED: &str =
    "count('Product Viewed', 48h) >= 1 and count(page where context.device.type == 'mobile', 7d) >= 1 and not in_segment('carts')";

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn get(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn start(dir: &Path, events: u64) -> Server {
    let input = dir.join("events.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    let opts = shoal::generate::GenOptions {
        users: 150,
        events,
        seed: 7,
        ..Default::default()
    };
    shoal::generate::write_all(&opts, &mut f, None).unwrap();
    std::fs::write(dir.join("spec.toml"), SPEC).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "run",
            "spec.toml",
            "--input",
            "events.jsonl",
            "--output",
            "out.jsonl",
            "--dead-letter",
            "dead.jsonl",
        ])
        .args(["--http", "127.0.0.1:0"])
        .current_dir(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("shoal: listening on http://")
        .unwrap_or_else(|| panic!("no address: {line}"))
        .to_string();
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = err.read_to_string(&mut sink);
    });
    Server { child, addr }
}

/// Waits until the input is read and the clock stops moving.
fn settle(addr: &str, events: u64) -> String {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        assert!(started.elapsed() < Duration::from_secs(120), "the run did not settle");
        let (_, metrics) = http(addr, "GET", "/metrics", None);
        let read = metrics.contains(&format!("shoal_events_total{{result=\"read\"}} {events}\n"));
        let clock = get(addr, "/segments")["clock"].as_str().unwrap_or("").to_string();
        if read && !clock.is_empty() && clock == last {
            return clock;
        }
        last = clock;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Members by segment from the output's lines up to `clock`.
fn applied(out: &str, clock: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in out.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["time"].as_str().unwrap() > clock {
            continue;
        }
        let set = members.entry(v["segment"].as_str().unwrap().to_string()).or_default();
        let p = v["profile"].as_str().unwrap().to_string();
        if v["change"] == "enter" {
            assert!(set.insert(p));
        } else {
            assert!(set.remove(&p));
        }
    }
    members
}

fn all_members(addr: &str, segment: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut path = format!("/segments/{segment}/members?limit=7");
    loop {
        let page = get(addr, &path);
        for m in page["members"].as_array().unwrap() {
            assert!(out.insert(m.as_str().unwrap().to_string()), "paged twice");
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/segments/{segment}/members?limit=7&after={}", urlencode(next)),
            None => return out,
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn api_agrees_with_the_diffs_and_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let events = 3000;
    let server = start(dir.path(), events);
    let addr = server.addr.clone();
    let clock = settle(&addr, events);

    // Sizes and members equal the diffs applied up to the same tick.
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    let members = applied(&out, &clock);
    let segments = get(&addr, "/segments");
    assert_eq!(segments["clock"], clock.as_str());
    let names: Vec<&str> = segments["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["viewers", "carts", "mobile"]);
    assert_eq!(segments["segments"][0]["description"], "Viewed 3+ products in 48h");
    for s in segments["segments"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let expected = members.get(name).cloned().unwrap_or_default();
        assert_eq!(s["size"].as_u64().unwrap() as usize, expected.len(), "{name}");
        assert_eq!(all_members(&addr, name), expected, "{name}");
    }
    assert!(members.values().any(|m| !m.is_empty()), "the data makes members");

    // History: the size at each step, exactly from the diffs.
    let hist = get(&addr, "/segments/viewers/history?step=6h");
    let points = hist["points"].as_array().unwrap();
    assert!(points.len() > 3);
    for p in points {
        let t = p["time"].as_str().unwrap();
        assert_eq!(
            p["size"].as_u64().unwrap() as usize,
            applied(&out, t).get("viewers").map_or(0, |m| m.len()),
            "at {t}"
        );
    }

    // A profile: its segments and why.
    let someone = members["viewers"].iter().next().unwrap().clone();
    let profile = get(&addr, &format!("/profiles/{}", urlencode(&someone)));
    assert_eq!(profile["profile"], someone.as_str());
    assert!(profile["ids"].as_array().unwrap().iter().any(|i| i == someone.as_str()));
    assert_eq!(profile["segments"]["viewers"]["member"], true);
    let why = &profile["segments"]["viewers"]["why"][0];
    assert_eq!(why["condition"], "count('Product Viewed', 48h) >= 3");
    assert_eq!(why["holds"], true);

    // Errors: bad expression with line/column, unknown names, not-JSON; the run goes on.
    let (status, body) = http(&addr, "POST", "/segments/preview", Some(r#"{"when":"count('x', 1h) >="}"#));
    assert_eq!(status, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((e["line"].as_u64(), e["column"].is_u64()), (Some(1), true), "{body}");
    let (status, _) = http(&addr, "PUT", "/segments/x", Some(r#"{"when":"in_segment('nope')"}"#));
    assert_eq!(status, 400);
    assert_eq!(http(&addr, "GET", "/segments/nope/members", None).0, 404);
    assert_eq!(http(&addr, "DELETE", "/segments/nope", None).0, 404);
    assert_eq!(http(&addr, "GET", "/profiles/user:nobody-at-all", None).0, 404);
    assert_eq!(http(&addr, "POST", "/segments/preview", Some("not json")).0, 400);

    // Preview: the reach of a definition, not added.
    let body = serde_json::json!({ "when": ADDED }).to_string();
    let (status, preview) = http(&addr, "POST", "/segments/preview", Some(&body));
    assert_eq!(status, 200, "{preview}");
    let preview: Value = serde_json::from_str(&preview).unwrap();
    assert_eq!(get(&addr, "/segments")["segments"].as_array().unwrap().len(), 3);

    // Added at run time: the reference's members at the clock, written as enters.
    let (status, put) = http(&addr, "PUT", "/segments/added", Some(&body));
    assert_eq!(status, 200, "{put}");
    let put: Value = serde_json::from_str(&put).unwrap();
    assert_eq!(put["size"], preview["size"]);
    let mut full = SPEC.to_string();
    full.push_str(&format!(
        "\n[[segment]]\nname = \"added\"\nwhen = {}\n",
        serde_json::to_string(ADDED).unwrap()
    ));
    std::fs::write(dir.path().join("full.toml"), &full).unwrap();
    let spec = shoal::spec::load(&dir.path().join("full.toml"), 1000).unwrap();
    let input = std::fs::read(dir.path().join("events.jsonl")).unwrap();
    let reference = reference::evaluate(&spec, &input, &reference::RefOptions::default());
    let expected = applied(&reference.lines.join("\n"), &clock).remove("added").unwrap_or_default();
    assert!(!expected.is_empty(), "the added segment has members");
    assert_eq!(all_members(&addr, "added"), expected);
    assert_eq!(put["size"].as_u64().unwrap() as usize, expected.len());
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    assert_eq!(applied(&out, &clock).remove("added").unwrap_or_default(), expected);
    assert_eq!(
        get(&addr, "/segments")["segments"][3]["size"].as_u64().unwrap() as usize,
        expected.len()
    );

    // Removed: every member exits, in the output too.
    assert_eq!(http(&addr, "DELETE", "/segments/added", None).0, 204);
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    assert!(applied(&out, &clock).get("added").is_none_or(|m| m.is_empty()));
    let exits = out
        .lines()
        .filter(|l| l.contains("\"segment\":\"added\"") && l.contains("exit"))
        .count();
    assert_eq!(exits, expected.len());
    assert_eq!(http(&addr, "GET", "/segments/added/members", None).0, 404);

    // Metrics in Prometheus text.
    let (_, metrics) = http(&addr, "GET", "/metrics", None);
    for name in [
        "shoal_events_total{result=\"accepted\"}",
        "shoal_events_total{result=\"duplicate\"}",
        "shoal_diffs_total",
        "shoal_segment_size{segment=\"viewers\"}",
        "shoal_clock_seconds",
        "shoal_clock_lag_seconds",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    // The page.
    let (status, page) = http(&addr, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(page.contains("EventSource"));

    // Serving ends on SIGTERM, with the summary.
    let mut server = server;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
