//! Kafka over TLS (and SASL over TLS) against a real TLS listener: a CA and
//! a server certificate made here, `socat` terminating TLS in front of
//! librdkafka's mock cluster (in this process), whose broker advertises
//! socat's address. Events read over TLS give the same changes as from a
//! file, changes go out over TLS; a wrong CA, TLS against a plaintext
//! listener, no listener at all and SASL against a broker without it end
//! the run with an error naming the broker instead of hanging.
//!
//! Needs `socat` on the PATH (`apt-get install -y socat`).

mod common;

use std::ffi::{CStr, CString};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer};

use shoal::generate::{GenOptions, Generator};

const SPEC: &str = "dataflows/retail.toml";

/// A bound on how long a run that must fail may take: it guards against a
/// hang, it does not time anything.
const FAILS_WITHIN: Duration = Duration::from_secs(30);

/// A mock cluster of one broker, made through librdkafka's C API so that
/// its broker can advertise another address (`rdkafka::mocking` does not
/// give out its handle). The unsafe code is all here.
struct Mock {
    cluster: *mut rd::rd_kafka_mock_cluster_t,
    /// The client the cluster lives in; it must outlive the cluster.
    _client: BaseProducer,
    /// The broker's own (plaintext) listener.
    plain: String,
}

impl Mock {
    fn new() -> Mock {
        let client: BaseProducer = ClientConfig::new().create().expect("a client for the mock cluster");
        // SAFETY: the client is alive for as long as the cluster (see Drop).
        let cluster = unsafe { rd::rd_kafka_mock_cluster_new(client.client().native_ptr(), 1) };
        assert!(!cluster.is_null(), "cannot create a mock cluster");
        // SAFETY: the cluster returns a NUL-terminated string it owns.
        let plain = unsafe { CStr::from_ptr(rd::rd_kafka_mock_cluster_bootstraps(cluster)) }
            .to_string_lossy()
            .into_owned();
        Mock {
            cluster,
            _client: client,
            plain,
        }
    }

    fn port(&self) -> u16 {
        self.plain.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port")
    }

    fn create_topic(&self, name: &str, partitions: i32) {
        let name = CString::new(name).unwrap();
        // SAFETY: a live cluster and a NUL-terminated name.
        let err = unsafe { rd::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), partitions, 1) };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, "create topic");
    }

    /// Makes the broker advertise `host:port` in metadata (the TLS terminator).
    fn advertise(&self, host: &str, port: u16) {
        let host = CString::new(host).unwrap();
        // SAFETY: a live cluster and a NUL-terminated host; broker 1 exists.
        unsafe { rd::rd_kafka_mock_broker_set_host_port(self.cluster, 1, host.as_ptr(), i32::from(port)) };
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // SAFETY: made by rd_kafka_mock_cluster_new, destroyed once, before its client.
        unsafe { rd::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// A free local port (free when this returns; taken by whoever binds next).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `socat` terminating TLS on a local port and passing the bytes to `to`.
struct Tls {
    child: Child,
    port: u16,
}

impl Tls {
    fn start(pki: &common::Pki, to: u16) -> Tls {
        let port = free_port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            pki.path("server.pem").display(),
            pki.path("server.key").display()
        );
        let child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{to}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start socat ({e}): apt-get install -y socat"));
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "socat does not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tls { child, port }
    }

    fn brokers(&self) -> String {
        format!("localhost:{}", self.port)
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mock cluster behind a TLS terminator, advertising it.
fn tls_cluster(pki: &common::Pki) -> (Mock, Tls) {
    let mock = Mock::new();
    let tls = Tls::start(pki, mock.port());
    mock.advertise("localhost", tls.port);
    (mock, tls)
}

/// Generated lines in event-time order (as in tests/kafka.rs, so that no
/// event is late whether read from a file or from partitions).
fn lines(events: u64, seed: u64) -> Vec<String> {
    let mut g = Generator::new(&GenOptions {
        users: 50,
        events,
        seed,
        ..GenOptions::default()
    });
    let mut at = 0;
    let mut keyed = Vec::new();
    while let Some(l) = g.next_line() {
        if let Ok(e) = shoal::ingest::event::decode(l.as_bytes()) {
            at = e.time;
        }
        keyed.push((at, l.to_string()));
    }
    keyed.sort_by_key(|(t, _)| *t);
    keyed.into_iter().map(|(_, l)| l).collect()
}

fn tls_client(brokers: &str, ca: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", ca);
    c
}

/// `shoal run SPEC --lateness 1h ARGS…`.
fn shoal(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.args(["run", SPEC, "--lateness", "1h"]).args(args);
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Runs `c` to its end, killing it (and failing) if it takes longer than
/// `within`; returns whether it succeeded and its stderr.
fn finish(mut c: Command, within: Duration) -> (bool, String) {
    let mut child = c.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {within:?}: {}", reading.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), reading.join().unwrap())
}

/// [`shoal`] with Kafka options as `--kafka-option KEY=VALUE` flags.
fn shoal_with(args: &[&str], kafka: &[(&str, &str)]) -> Command {
    let mut c = shoal(args);
    for (k, v) in kafka {
        c.arg("--kafka-option").arg(format!("{k}={v}"));
    }
    c
}

/// The run failed, and its error (the last line of stderr) names `brokers`
/// and says each of `says`.
fn assert_fails_naming(ok: bool, stderr: &str, brokers: &str, says: &[&str]) {
    assert!(!ok, "the run must fail: {stderr}");
    let last = stderr.lines().rev().find(|l| l.starts_with("shoal:")).unwrap_or_default();
    assert!(
        last.starts_with(&format!("shoal: kafka {brokers}: cannot connect: ")),
        "the error names the broker: {stderr}"
    );
    for s in says {
        assert!(last.contains(s), "the error says {s:?}: {stderr}");
    }
    eprintln!("{last}");
}

#[test]
fn events_read_over_tls_give_the_same_changes_as_a_file_and_changes_go_out_over_tls() {
    let pki = common::Pki::new();
    let (mock, tls) = tls_cluster(&pki);
    mock.create_topic("events", 2);
    mock.create_topic("changes", 1);
    let brokers = tls.brokers();
    let events = lines(600, 5);
    common::produce(&tls_client(&brokers, &pki.ca()), "events", &events);

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, events.join("\n") + "\n").unwrap();
    let from_file = dir.path().join("from-file.jsonl");
    let c = shoal(&["--input", input.to_str().unwrap(), "--output", from_file.to_str().unwrap()]);
    let (ok, err) = finish(c, Duration::from_secs(120));
    assert!(ok, "{err}");
    let want = std::fs::read_to_string(&from_file).unwrap();
    assert!(want.lines().count() > 10, "the spec has changes to compare: {want}");

    let ca = pki.ca();
    let tls_options = [("security.protocol", "SSL"), ("ssl.ca.location", ca.as_str())];
    let kafka = |group: &str, then: &[&str]| -> Command {
        let mut args = vec![
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            "events",
            "--kafka-group",
            group,
            "--kafka-until-end",
        ];
        args.extend_from_slice(then);
        shoal_with(&args, &tls_options)
    };

    // In over TLS, out to a file.
    let from_kafka = dir.path().join("from-kafka.jsonl");
    let c = kafka("tls-in", &["--output", from_kafka.to_str().unwrap()]);
    let (ok, err) = finish(c, Duration::from_secs(120));
    assert!(ok, "{err}");
    let got = std::fs::read_to_string(&from_kafka).unwrap();
    assert_eq!(got, want, "read over TLS, the changes differ from the file's");
    let summary: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(summary["events_read"], events.len(), "{err}");

    // In and out over TLS.
    let c = kafka("tls-out", &["--output-kafka", "changes"]);
    let (ok, err) = finish(c, Duration::from_secs(120));
    assert!(ok, "{err}");
    let mut out = common::read_topic(&tls_client(&brokers, &pki.ca()), "changes", 1);
    out.dedup(); // at least once: a retry may repeat a line right after itself
    assert_eq!(out, want.lines().collect::<Vec<_>>(), "written over TLS, the changes differ");
}

#[test]
fn a_certificate_from_another_ca_fails_naming_the_broker() {
    let pki = common::Pki::new();
    let (mock, tls) = tls_cluster(&pki);
    mock.create_topic("events", 1);
    let brokers = tls.brokers();
    let wrong = pki.other_ca();
    let args = ["--kafka-brokers", &brokers, "--kafka-topic", "events", "--kafka-until-end"];
    let (ok, err) = finish(
        shoal_with(&args, &[("security.protocol", "SSL"), ("ssl.ca.location", &wrong)]),
        FAILS_WITHIN,
    );
    assert_fails_naming(ok, &err, &brokers, &["SSL handshake failed", "certificate verify failed"]);

    // Writing too: the producer does not retry forever on a certificate.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, lines(50, 1).join("\n") + "\n").unwrap();
    let args = [
        "--input",
        input.to_str().unwrap(),
        "--kafka-brokers",
        &brokers,
        "--output-kafka",
        "changes",
    ];
    let (ok, err) = finish(
        shoal_with(&args, &[("security.protocol", "SSL"), ("ssl.ca.location", &wrong)]),
        FAILS_WITHIN,
    );
    assert_fails_naming(ok, &err, &brokers, &["SSL handshake failed", "certificate verify failed"]);
}

#[test]
fn tls_against_a_plaintext_listener_fails_naming_the_broker() {
    let pki = common::Pki::new();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let ca = pki.ca();
    let args = ["--kafka-brokers", &brokers, "--kafka-topic", "events", "--kafka-until-end"];
    let (ok, err) = finish(
        shoal_with(&args, &[("security.protocol", "SSL"), ("ssl.ca.location", &ca)]),
        FAILS_WITHIN,
    );
    assert_fails_naming(ok, &err, &brokers, &["SSL handshake failed", "PLAINTEXT"]);
}

#[test]
fn plaintext_against_a_tls_listener_fails_naming_the_broker() {
    let pki = common::Pki::new();
    let (mock, tls) = tls_cluster(&pki);
    mock.create_topic("events", 1);
    let brokers = tls.brokers();
    let args = ["--kafka-brokers", &brokers, "--kafka-topic", "events", "--kafka-until-end"];
    let (ok, err) = finish(shoal(&args), FAILS_WITHIN);
    assert_fails_naming(ok, &err, &brokers, &["Disconnected", "is it a TLS listener?"]);
}

#[test]
fn no_listener_fails_naming_the_broker_after_the_connect_timeout() {
    let pki = common::Pki::new();
    let brokers = format!("localhost:{}", free_port());
    let ca = pki.ca();
    let args = ["--kafka-brokers", &brokers, "--kafka-topic", "events", "--kafka-until-end"];
    let bound = shoal::io::kafka::CONNECT_TIMEOUT + FAILS_WITHIN;
    let (ok, err) = finish(shoal_with(&args, &[("security.protocol", "SSL"), ("ssl.ca.location", &ca)]), bound);
    assert_fails_naming(ok, &err, &brokers, &["Connection refused", "no broker answered"]);
}

#[test]
fn sasl_scram_over_tls_is_built_in_and_fails_clearly_against_a_broker_without_sasl() {
    // The client builds with SCRAM over TLS (librdkafka has it through OpenSSL).
    let pki = common::Pki::new();
    let sasl = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-256"),
        ("sasl.username", "shoal"),
        ("sasl.password", "secret"),
    ];
    let mut config = tls_client("localhost:9", &pki.ca());
    for (k, v) in sasl {
        config.set(k, v);
    }
    if let Err(e) = config.create::<BaseProducer>() {
        panic!("SASL_SSL with SCRAM-SHA-256 must be built in: {e}");
    }

    // The mock broker does not speak SASL: the run fails, it does not hang.
    let (mock, tls) = tls_cluster(&pki);
    mock.create_topic("events", 1);
    let brokers = tls.brokers();
    let ca = pki.ca();
    let args = ["--kafka-brokers", &brokers, "--kafka-topic", "events", "--kafka-until-end"];
    let mut pairs = sasl.to_vec();
    pairs.push(("ssl.ca.location", &ca));
    let (ok, err) = finish(shoal_with(&args, &pairs), FAILS_WITHIN);
    assert_fails_naming(ok, &err, &brokers, &["SASL"]);
    assert!(!err.contains("not available at build time") && !err.contains("recompile"), "{err}");
}

/// tansu, a Kafka-protocol broker that speaks SASL/SCRAM, on a SQLite file
/// so that users made before authentication is switched on survive the
/// restart with it. Needs `tansu` on the PATH, built with that storage:
/// `cargo install tansu --version 0.6.0 --no-default-features --features libsql`.
struct Tansu {
    child: Child,
    port: u16,
}

impl Tansu {
    /// Starts the broker on `port` over `db`, advertising `advertised`.
    fn start(db: &std::path::Path, port: u16, advertised: &str, authentication: bool) -> Tansu {
        let mut c = Command::new("tansu");
        c.args(["broker", "--silent", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
            // tansu reads the file's path relative to its working directory.
            .args([
                "--storage-engine",
                &format!("sqlite://{}", db.file_name().unwrap().to_string_lossy()),
            ])
            .current_dir(db.parent().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if authentication {
            c.arg("--authentication");
        }
        let child = c.spawn().unwrap_or_else(|e| {
            panic!("cannot start tansu ({e}): cargo install tansu --version 0.6.0 --no-default-features --features libsql")
        });
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "tansu does not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, port }
    }

    /// Runs `tansu ARGS… --broker` against this broker.
    fn cli(&self, args: &[&str]) {
        let out = Command::new("tansu")
            .args(args)
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()
            .unwrap();
        assert!(out.status.success(), "tansu {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sasl(mechanism: &str, user: &str, password: &str) -> Vec<(String, String)> {
    [("sasl.mechanism", mechanism), ("sasl.username", user), ("sasl.password", password)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// SASL/SCRAM against a real broker that checks passwords: events read with
/// SCRAM-SHA-256 and SCRAM-SHA-512, over plaintext and over TLS, give the
/// file's changes; a wrong password ends the run at once naming the broker.
#[test]
#[ignore = "needs tansu built with --features libsql on the PATH (see the README)"]
fn sasl_scram_against_a_real_broker_reads_like_a_file_and_a_wrong_password_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tansu.db");
    let port = free_port();
    let plain = format!("127.0.0.1:{port}");
    {
        // Users and the topic, before authentication is on.
        let open = Tansu::start(&db, port, &plain, false);
        open.cli(&["user", "create", "alice", "alice-secret", "--mechanism", "scram256"]);
        open.cli(&["user", "create", "bob", "bob-secret", "--mechanism", "scram512"]);
        open.cli(&["topic", "create", "events", "--partitions", "1"]);
    }
    let events = lines(400, 11);
    let input = dir.path().join("events.jsonl");
    std::fs::write(&input, events.join("\n") + "\n").unwrap();
    let from_file = dir.path().join("from-file.jsonl");
    let (ok, err) = finish(
        shoal(&["--input", input.to_str().unwrap(), "--output", from_file.to_str().unwrap()]),
        Duration::from_secs(120),
    );
    assert!(ok, "{err}");
    let want = std::fs::read_to_string(&from_file).unwrap();
    assert!(want.lines().count() > 10, "the spec has changes to compare: {want}");

    // Reads the topic with `settings`; the changes, or the run's error.
    let read = |brokers: &str, group: &str, settings: &[(String, String)]| -> (bool, String, String) {
        let out = dir.path().join(format!("{group}.jsonl"));
        let args = [
            "--kafka-brokers",
            brokers,
            "--kafka-topic",
            "events",
            "--kafka-group",
            group,
            "--kafka-until-end",
            "--output",
            out.to_str().unwrap(),
        ];
        let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (ok, err) = finish(shoal_with(&args, &pairs), Duration::from_secs(120));
        (ok, std::fs::read_to_string(&out).unwrap_or_default(), err)
    };

    {
        let broker = Tansu::start(&db, port, &plain, true);
        let mut settings = vec![("security.protocol".to_string(), "SASL_PLAINTEXT".to_string())];
        settings.extend(sasl("SCRAM-SHA-256", "alice", "alice-secret"));
        let mut producer = ClientConfig::new();
        producer.set("bootstrap.servers", &plain);
        for (k, v) in &settings {
            producer.set(k, v);
        }
        common::produce(&producer, "events", &events);

        let (ok, got, err) = read(&plain, "scram-256", &settings);
        assert!(ok, "{err}");
        assert_eq!(got, want, "read with SCRAM-SHA-256, the changes differ from the file's");

        let mut bob = vec![("security.protocol".to_string(), "SASL_PLAINTEXT".to_string())];
        bob.extend(sasl("SCRAM-SHA-512", "bob", "bob-secret"));
        let (ok, got, err) = read(&plain, "scram-512", &bob);
        assert!(ok, "{err}");
        assert_eq!(got, want, "read with SCRAM-SHA-512, the changes differ from the file's");

        let mut wrong = vec![("security.protocol".to_string(), "SASL_PLAINTEXT".to_string())];
        wrong.extend(sasl("SCRAM-SHA-256", "alice", "not-her-password"));
        let (ok, _, err) = read(&plain, "wrong", &wrong);
        assert_fails_naming(ok, &err, &plain, &["SASL authentication", "failed"]);
        drop(broker);
    }

    // The same broker behind a TLS terminator that it advertises: SASL_SSL.
    let pki = common::Pki::new();
    let tls = Tls::start(&pki, port);
    let brokers = tls.brokers();
    let _broker = Tansu::start(&db, port, &brokers, true);
    let mut settings = vec![
        ("security.protocol".to_string(), "SASL_SSL".to_string()),
        ("ssl.ca.location".to_string(), pki.ca()),
    ];
    settings.extend(sasl("SCRAM-SHA-512", "bob", "bob-secret"));
    let (ok, got, err) = read(&brokers, "sasl-ssl", &settings);
    assert!(ok, "{err}");
    assert_eq!(got, want, "read with SASL_SSL, the changes differ from the file's");
    settings.pop();
    settings.push(("sasl.password".to_string(), "guess".to_string()));
    let (ok, _, err) = read(&brokers, "sasl-ssl-wrong", &settings);
    assert_fails_naming(ok, &err, &brokers, &["SASL authentication", "failed"]);
}
