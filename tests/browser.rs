//! The live page in a real headless browser (Debian's chromium): it loads
//! while a segment has one member, new events arrive on stdin, and the page
//! — without reloading — shows the new size.
//!
//! `.ci/run` installs chromium when it is missing; elsewhere this test says
//! it skipped when no chromium is found (set `CHROMIUM` to point at one).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Shoal;

const SPEC: &str =
    "[[segment]]\nname = \"viewers\"\ndescription = \"viewed anything in the last hour\"\nwhen = \"count('view', 1h) >= 1\"\n\
     groups = [{ name = \"treatment\", weight = 1 }, { name = \"control\", weight = 1 }]\n\
     [[segment]]\nname = \"repeat\"\nwhen = \"count('view', 1h) >= 2\"\n\
     [[model]]\nname = \"returns\"\nlabel = \"count('view', 2s) >= 1\"\nhorizon = \"2s\"\nrefresh = \"2s\"\n\
     features = [\"count('view', 10s)\"]\n";

fn chromium() -> Option<String> {
    let candidates = [
        std::env::var("CHROMIUM").ok(),
        Some("/usr/bin/chromium".into()),
        Some("/usr/bin/chromium-browser".into()),
    ];
    candidates.into_iter().flatten().find(|p| std::path::Path::new(p).exists())
}

fn view(user: &str, t: u64) -> String {
    format!("{{\"type\":\"track\",\"event\":\"view\",\"userId\":\"{user}\",\"timestamp\":{t},\"messageId\":\"{user}-{t}\"}}\n")
}

/// The size the API reports for `viewers`.
fn api_size(addr: &str) -> u64 {
    common::get(addr, "/segments")["segments"][0]["size"].as_u64().unwrap_or(0)
}

fn wait_for_size(addr: &str, want: u64) {
    let started = Instant::now();
    while api_size(addr) != want {
        assert!(started.elapsed() < Duration::from_secs(30), "the API never showed size {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_page_shows_a_size_change_after_new_events() {
    let Some(chromium) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must have chromium (.ci/run installs it)");
        eprintln!("skipped: no chromium (apt-get install chromium, or set CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The clock moves with the events only: after `--idle` it would follow
    // the wall time, and a browser slow to open (a loaded machine) left it
    // past the events sent once the page is open, which were then late and
    // never labelled, so the model never fitted.
    let mut shoal = Shoal::live_with(dir.path(), SPEC, &["--idle", "1h"]);
    let addr = shoal.addr.clone();
    let mut stdin = shoal.stdin.take().unwrap();
    let t0 = 1_704_067_200_000u64;
    stdin.write_all(view("a", t0).as_bytes()).unwrap();
    stdin.write_all(view("a", t0 + 2_000).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_for_size(&addr, 1);

    // The browser opens the page now; we read its DOM over the DevTools protocol.
    let profile = tempfile::tempdir().unwrap();
    let browser = open(&chromium, profile.path(), &format!("http://{addr}/"));
    let mut page = DevTools::connect(profile.path());
    let size = "(document.querySelector('tr[data-segment=viewers] .size') || {}).textContent || ''";
    page.wait_for(size, "1");
    // While the page stays open, two more people view something.
    stdin.write_all(view("b", t0 + 3_000).as_bytes()).unwrap();
    stdin.write_all(view("c", t0 + 4_000).as_bytes()).unwrap();
    stdin.write_all(view("a", t0 + 6_000).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_for_size(&addr, 3);
    page.wait_for(size, "3");
    // The trend is the segment's history, as the API gives it.
    let trend = "(() => { const s = document.querySelector('tr[data-segment=viewers] svg.trend'); \
                 return s ? JSON.stringify(s.dataset) : ''; })()";
    let started = Instant::now();
    let drawn = loop {
        let got = page.eval(trend);
        let v: serde_json::Value = serde_json::from_str(&got).unwrap_or_default();
        if v["sizes"].as_str().is_some_and(|s| s.ends_with(",3")) {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no sparkline ending at 3: {got}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let path = format!(
        "/segments/viewers/history?from={}&to={}&step={}s",
        common::urlencode(drawn["from"].as_str().unwrap()),
        common::urlencode(drawn["to"].as_str().unwrap()),
        drawn["step"].as_str().unwrap()
    );
    let sizes: Vec<String> = common::get(&addr, &path)["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["size"].to_string())
        .collect();
    assert_eq!(drawn["sizes"].as_str().unwrap(), sizes.join(","), "the sparkline draws {path}");
    assert!(sizes.contains(&"1".to_string()), "the trend shows the size before: {sizes:?}");

    // Ticking two segments shows their overlap, as the API counts it.
    page.eval("document.querySelector('tr[data-segment=viewers] .compare').click()");
    page.eval("document.querySelector('tr[data-segment=repeat] .compare').click()");
    let shared = common::get(&addr, "/segments/overlap?names=viewers,repeat")["overlaps"][0]["size"].to_string();
    assert_eq!(shared, "1", "a viewed three times: in both");
    page.wait_for(
        "(document.querySelector('#overlap tr.shared[data-segments=\"viewers,repeat\"] .size') || {}).textContent || ''",
        &shared,
    );
    page.wait_for(
        "(document.querySelector('#overlap tr.alone[data-segments=viewers] .size') || {}).textContent || ''",
        "3",
    );
    // The holdout's groups and their sizes, as the API gives them.
    let groups = common::get(&addr, "/segments")["segments"][0]["groups"].clone();
    let groups = groups.as_array().expect("viewers has groups");
    let total: u64 = groups.iter().map(|g| g["size"].as_u64().unwrap()).sum();
    assert_eq!(total, 3, "every member in one group: {groups:?}");
    for g in groups {
        let name = g["name"].as_str().unwrap();
        page.wait_for(
            &format!(
                "(document.querySelector('tr[data-segment=viewers] .group[data-group={name}]') || {{dataset: {{}}}}).dataset.size || ''"
            ),
            &g["size"].to_string(),
        );
    }
    // The model, once fitted (at t0 + 6s: a returned, b and c did not),
    // with as many examples as the API says.
    let started = Instant::now();
    let examples = loop {
        let m = common::get(&addr, "/models")["models"][0].clone();
        if let Some(n) = m["examples"].as_u64() {
            break n;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no fit: {m}");
        std::thread::sleep(Duration::from_millis(200));
    };
    page.wait_for(
        "(document.querySelector('#models tr[data-model=returns]') || {dataset: {}}).dataset.examples || ''",
        &examples.to_string(),
    );
    drop(browser);

    drop(stdin);
    assert!(shoal.terminate().success());
}

/// With the API locked (`--http-token-file`), the page opened as
/// `/#token=…` sends the token with every call and reads the live stream
/// with it: before, every call of the page was refused (401) and it showed
/// nothing.
#[test]
fn the_page_works_on_a_locked_api_given_the_token() {
    let Some(chromium) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI must have chromium (.ci/run installs it)");
        eprintln!("skipped: no chromium (apt-get install chromium, or set CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
    let mut shoal = Shoal::live_with(dir.path(), SPEC, &["--http-token-file", "token"]);
    let addr = shoal.addr.clone();
    assert_eq!(common::http(&addr, "GET", "/segments", None).0, 401, "the API is locked");
    let mut stdin = shoal.stdin.take().unwrap();
    let t0 = 1_704_067_200_000u64;
    stdin.write_all(view("a", t0).as_bytes()).unwrap();
    stdin.flush().unwrap();

    let profile = tempfile::tempdir().unwrap();
    let browser = open(&chromium, profile.path(), &format!("http://{addr}/#token=s3cret-token"));
    let mut page = DevTools::connect(profile.path());
    let size = "(document.querySelector('tr[data-segment=viewers] .size') || {}).textContent || ''";
    page.wait_for(size, "1");
    page.wait_for("document.getElementById('status').textContent", "live");
    // The live stream carries the next change, and the token left the address.
    stdin.write_all(view("b", t0 + 3_000).as_bytes()).unwrap();
    stdin.flush().unwrap();
    page.wait_for(size, "2");
    assert!(!page.eval("location.href").contains("s3cret"), "the token stays out of the address");
    drop(browser);
    drop(stdin);
    assert!(shoal.terminate().success());
}

/// Headless chromium with its DevTools server, its profile in `profile`,
/// showing `url`; killed when dropped.
fn open(chromium: &str, profile: &std::path::Path, url: &str) -> Killed {
    let browser = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(browser)
}

/// A page in the browser, over the DevTools protocol (a websocket).
struct DevTools {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    id: u64,
}

impl DevTools {
    fn connect(profile: &std::path::Path) -> DevTools {
        let started = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(profile.join("DevToolsActivePort")) {
                if let Some(port) = text.lines().next().and_then(|l| l.trim().parse::<u16>().ok()) {
                    break port;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromium did not start its DevTools server"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // The page's websocket address, from the target list.
        let url = loop {
            let body = http_get(port, "/json/list");
            let targets: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let page = targets.as_array().into_iter().flatten().find(|t| t["type"] == "page");
            if let Some(url) = page.and_then(|p| p["webSocketDebuggerUrl"].as_str()) {
                break url.to_string();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no page target: {body}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (socket, _) = tungstenite::connect(url).expect("DevTools websocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        DevTools { socket, id: 0 }
    }

    /// Evaluates `expr` in the page and returns its value as a string.
    fn eval(&mut self, expr: &str) -> String {
        self.id += 1;
        let call = serde_json::json!({"id": self.id, "method": "Runtime.evaluate", "params": {"expression": expr, "returnByValue": true}});
        self.socket.send(tungstenite::Message::text(call.to_string())).unwrap();
        loop {
            let msg = self.socket.read().expect("a DevTools answer");
            let Ok(text) = msg.to_text() else { continue };
            let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            if v["id"] == self.id {
                let value = &v["result"]["result"]["value"];
                return value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            }
        }
    }

    /// Polls `expr` until it equals `want` (30 s at most).
    fn wait_for(&mut self, expr: &str, want: &str) {
        let started = Instant::now();
        loop {
            let got = self.eval(expr);
            if got == want {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the page shows {got:?}, not {want:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A GET over HTTP/1.1 that reads exactly Content-Length bytes of body.
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Kills a child process when the test ends, passing or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
