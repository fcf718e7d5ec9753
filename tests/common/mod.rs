//! What the tests that talk to `shoal run --http` share: starting the
//! binary on a free port (`--http 127.0.0.1:0`) and reading the address it
//! prints, and plain HTTP/1.1 requests over a real socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::Message as _;
use rdkafka::producer::Producer as _;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `shoal run … --http 127.0.0.1:0`, killed when dropped.
pub struct Shoal {
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// Its stdin, when started with `stdin = true` (live input).
    pub stdin: Option<ChildStdin>,
    /// Everything it wrote on stderr after the address, so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Shoal {
    /// Starts `shoal run ARGS --http 127.0.0.1:0` in `dir`, with a piped
    /// stdin when `stdin`, and waits for `shoal: listening on http://ADDR`
    /// (the first line on stderr). The rest of stderr is drained in the
    /// background, so the child never blocks on it.
    pub fn start(dir: &Path, args: &[&str], stdin: bool) -> Shoal {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("run")
            .args(args)
            .args(["--http", "127.0.0.1:0"])
            .current_dir(dir)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .spawn()
            .expect("shoal starts");
        let mut err = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        err.read_line(&mut line).expect("stderr readable");
        let addr = line
            .trim()
            .strip_prefix("shoal: listening on http://")
            .or_else(|| line.trim().strip_prefix("shoal: listening on https://"))
            .unwrap_or_else(|| panic!("no address: {line}"))
            .to_string();
        let stderr = Arc::new(Mutex::new(String::new()));
        let rest = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                rest.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Shoal {
            stdin: child.stdin.take(),
            child,
            addr,
            stderr,
        }
    }

    /// Starts `shoal run` over `spec` (written to `dir/spec.toml`) reading
    /// live from a piped stdin, writing `out.jsonl`, with the clock
    /// following wall time after 200 ms without events and no lateness.
    pub fn live(dir: &Path, spec: &str) -> Shoal {
        Shoal::live_with(dir, spec, &[])
    }

    /// [`Shoal::live`] with more flags; an `--idle` among them replaces
    /// the 200 ms.
    pub fn live_with(dir: &Path, spec: &str, more: &[&str]) -> Shoal {
        std::fs::write(dir.join("spec.toml"), spec).unwrap();
        let mut args = vec!["spec.toml", "--input", "-", "--output", "out.jsonl", "--lateness", "0s"];
        if !more.contains(&"--idle") {
            args.extend(["--idle", "200ms"]);
        }
        args.extend_from_slice(more);
        Shoal::start(dir, &args, true)
    }

    /// Sends SIGTERM and waits for the process to end.
    pub fn terminate(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.child.wait().unwrap()
    }
}

impl Drop for Shoal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request (`Connection: close`); returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
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

/// The body of a complete chunked transfer.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A GET that must answer 200 with JSON.
pub fn get(addr: &str, path: &str) -> serde_json::Value {
    let (status, body) = http(addr, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Percent-encodes everything but unreserved characters (ids in paths).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The newest checkpoint file in a `--state` directory, if any.
pub fn newest_checkpoint(state: &Path) -> Option<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(state)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ckpt-")))
        .collect();
    files.sort();
    files.pop()
}

/// Waits until `child` wrote a checkpoint newer than `before` (or ended,
/// or a minute passed).
pub fn wait_for_checkpoint(child: &mut Child, state: &Path, before: &Option<std::path::PathBuf>) {
    let started = std::time::Instant::now();
    while newest_checkpoint(state) == *before && child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A POST to `/v1/…` with write key `key`, gzipped when asked.
pub fn post(addr: &str, path: &str, key: Option<&str>, body: &[u8], gzip: bool) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let mut req = agent.post(&format!("http://{addr}{path}")).set("Content-Type", "application/json");
    if let Some(key) = key {
        use base64::Engine as _;
        req = req.set(
            "Authorization",
            &format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))),
        );
    }
    let body = if gzip {
        req = req.set("Content-Encoding", "gzip");
        use std::io::Write as _;
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(body).unwrap();
        z.finish().unwrap()
    } else {
        body.to_vec()
    };
    match req.send_bytes(&body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("POST {path}: {e}"),
    }
}

/// `shoal_events_total{result="…"}` from `/metrics`.
pub fn counted(addr: &str, result: &str) -> u64 {
    let (status, text) = http(addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let key = format!("shoal_events_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A CA, a server certificate it signed (for `localhost` and `127.0.0.1`)
/// and a second CA that signed nothing here, as PEM files.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("shoal test CA");
        let (other_cert, _) = ca("shoal test CA"); // same name, other key
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate().unwrap();
        let server = params.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other_cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    pub fn other_ca(&self) -> String {
        self.path("other-ca.pem").display().to_string()
    }
}

/// Produces `lines` with `config` (its brokers and settings), keyed by
/// their user as Segment keys messages, and waits until all are taken.
pub fn produce(config: &rdkafka::config::ClientConfig, topic: &str, lines: &[String]) {
    let producer: rdkafka::producer::BaseProducer = config.create().expect("producer");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        let key = v.get("userId").or_else(|| v.get("anonymousId")).map(|i| i.to_string());
        let key = key.unwrap_or_else(|| "bad".into());
        let mut record = rdkafka::producer::BaseRecord::to(topic).key(&key).payload(l);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}

/// Every message of `topic` (partitions `0..partitions`) from the start,
/// as far as their end offsets when called (a minute at most).
pub fn read_topic(config: &rdkafka::config::ClientConfig, topic: &str, partitions: i32) -> Vec<String> {
    let consumer: rdkafka::consumer::BaseConsumer = config
        .clone()
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut total = 0;
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
        total += consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1;
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    while (out.len() as i64) < total && started.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What [`cluster_until_done`] saw.
pub struct ClusterLives {
    pub kills: usize,
    /// Lives that started from a checkpoint.
    pub resumed: usize,
    /// Process 0's stderr in the life that finished.
    pub last: String,
}

/// Runs a 2-process cluster (`spawn(process, hostfile)`, stderr piped)
/// with `--state state` until a life of it finishes, SIGKILLing a random
/// process of each life at a random moment (half of them after a new
/// checkpoint) while `kills < want`. After a kill the other process must
/// stop by itself within 30 s, saying it lost its peer (or, killed while
/// connecting, that its peer did not connect: `spawn` should give a short
/// `--connect-timeout`). Every life gets fresh ports.
pub fn cluster_until_done(
    dir: &Path,
    state: &Path,
    want: usize,
    rng: &mut impl rand::Rng,
    spawn: impl Fn(usize, &Path) -> Child,
) -> ClusterLives {
    let (mut kills, mut resumed) = (0, 0);
    let hostfile = dir.join("hosts");
    loop {
        std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
        let before = newest_checkpoint(state);
        resumed += usize::from(before.is_some());
        let mut lives = [spawn(0, &hostfile), spawn(1, &hostfile)];
        if kills < want {
            if rng.gen_ratio(1, 2) {
                let [p0, _] = &mut lives;
                wait_for_checkpoint(p0, state, &before);
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..80)));
            } else {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
            }
            let victim = rng.gen_range(0..2);
            if lives[victim].try_wait().unwrap().is_none() {
                lives[victim].kill().unwrap(); // SIGKILL
                lives[victim].wait().unwrap();
                kills += 1;
                let other = &mut lives[1 - victim];
                let started = std::time::Instant::now();
                while other.try_wait().unwrap().is_none() {
                    if started.elapsed() > Duration::from_secs(30) {
                        other.kill().unwrap();
                        panic!("process {} did not stop after process {victim} was killed", 1 - victim);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let [p0, p1] = lives;
                let (o0, o1) = (p0.wait_with_output().unwrap(), p1.wait_with_output().unwrap());
                let (survivor, code) = if victim == 0 {
                    (&o1, o1.status.code())
                } else {
                    (&o0, o0.status.code())
                };
                let err = String::from_utf8_lossy(&survivor.stderr);
                // It may have finished just before its peer was killed.
                if code != Some(0) {
                    assert_eq!(code, Some(1), "{err}");
                    assert!(
                        err.contains("lost a connection to another process") || err.contains("did not all connect"),
                        "{err}"
                    );
                }
                assert!(!err.contains("unusable"), "no checkpoint is ever torn: {err}");
                continue;
            }
        }
        let [p0, p1] = lives;
        let (o0, o1) = (p0.wait_with_output().unwrap(), p1.wait_with_output().unwrap());
        for o in [&o0, &o1] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{err}");
            assert!(!err.contains("unusable"), "no checkpoint is ever torn: {err}");
        }
        return ClusterLives {
            kills,
            resumed,
            last: String::from_utf8_lossy(&o0.stderr).into_owned(),
        };
    }
}

/// Whole runs through [`cluster_until_done`], each started afresh by
/// `run(index, rng)` (which checks its output), until 20 kills and 10
/// resumes from a checkpoint have landed, in at most 10 runs: how many
/// kills a run takes depends on the machine's speed, not on what is
/// checked.
pub fn cluster_runs(seed: u64, mut run: impl FnMut(usize, &mut rand_chacha::ChaCha8Rng) -> ClusterLives) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut kills, mut resumed, mut runs) = (0, 0, 0);
    while (kills < 20 || resumed < 10) && runs < 10 {
        let lives = run(runs, &mut rng);
        (kills, resumed, runs) = (kills + lives.kills, resumed + lives.resumed, runs + 1);
    }
    eprintln!("{kills} kills, {resumed} lives resumed from a checkpoint, {runs} runs to the end");
    assert!(
        kills >= 20 && resumed >= 10,
        "only {kills} kills and {resumed} resumes in {runs} runs"
    );
}
