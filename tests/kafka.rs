//! Kafka in and out against a real Kafka-protocol broker: librdkafka's mock
//! cluster, in this process, over real sockets. The same events give the
//! same diffs from a multi-partition topic (1 and 2 workers) as from a file;
//! a broker outage mid-run loses no change; a second run resumes from the
//! offsets the first committed; the binary stops cleanly on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use shoal::generate::{GenOptions, Generator};
use shoal::io::kafka::{kafka_output, KafkaInput};
use shoal::output::deliver::memory_output;
use shoal::run::{run, run_memory, Job, RunOptions, Summary};

const SPEC: &str = "dataflows/retail.toml";

fn spec() -> shoal::spec::Spec {
    shoal::spec::load(std::path::Path::new(SPEC), 1000).expect("retail.toml checks")
}

/// Generated lines, seeded.
fn lines(events: u64, seed: u64) -> Vec<String> {
    let mut g = Generator::new(&GenOptions {
        users: 300,
        events,
        seed,
        ..GenOptions::default()
    });
    let mut out = Vec::new();
    while let Some(l) = g.next_line() {
        out.push(l.to_string());
    }
    in_time_order(out)
}

/// The lines in event-time order (a bad line keeps the time before it), so
/// that no event is late whether read from a file or from partitions: the
/// clock over partitions is their least and runs behind a file's, so which
/// events are late (an order-dependent fact) would differ otherwise.
fn in_time_order(lines: Vec<String>) -> Vec<String> {
    let mut at = 0;
    let mut keyed: Vec<(u64, String)> = lines
        .into_iter()
        .map(|l| {
            if let Ok(e) = shoal::ingest::event::decode(l.as_bytes()) {
                at = e.time;
            }
            (at, l)
        })
        .collect();
    keyed.sort_by_key(|(t, _)| *t);
    keyed.into_iter().map(|(_, l)| l).collect()
}

fn produce(brokers: &str, topic: &str, lines: &[String]) {
    produce_batched(brokers, topic, lines, 10_000);
}

/// Produces `lines` in message sets of at most `batch` messages. The mock
/// broker answers a fetch with one message set per partition, so small sets
/// and a slow broker pace a reader whatever its speed.
fn produce_batched(brokers: &str, topic: &str, lines: &[String], batch: usize) {
    let config = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("batch.num.messages", batch.to_string())
        .clone();
    common::produce(&config, topic, lines);
}

fn opts(workers: usize) -> RunOptions {
    RunOptions {
        lateness: 3_600_000,
        workers,
        ..RunOptions::default()
    }
}

fn kafka_job(brokers: &str, topic: &str, group: &str, workers: usize, output: shoal::output::deliver::OpenOutput) -> Job {
    let mut job = Job::quiet(spec(), opts(workers), Vec::new());
    job.kafka = Some(KafkaInput {
        brokers: brokers.to_string(),
        topics: vec![topic.to_string()],
        group: group.to_string(),
        until_end: true,
        partition_idle: 10_000,
        options: Vec::new(),
    });
    job.output = Some(output);
    job
}

fn run_to_memory(job: Job) -> (Vec<String>, Summary) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut job = job;
    job.output = Some(memory_output(buf.clone()));
    let summary = run(job).expect("the run succeeds");
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    (text.lines().map(str::to_string).collect(), summary)
}

/// The binary reading topic `events` as consumer group `group`.
fn shoal_kafka(brokers: &str, group: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.args([
        "run",
        SPEC,
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        "events",
        "--kafka-group",
        group,
    ]);
    c
}

fn cluster() -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let c = MockCluster::new(3).expect("mock cluster");
    let b = c.bootstrap_servers();
    (c, b)
}

#[test]
fn a_multi_partition_topic_gives_the_same_diffs_as_a_file() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 1).unwrap();
    let events = lines(6_000, 7);
    produce(&brokers, "events", &events);
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");
    assert!(file.lines.len() > 100, "the spec has changes to compare: {}", file.lines.len());
    for workers in [1, 2] {
        let job = kafka_job(
            &brokers,
            "events",
            &format!("same-{workers}"),
            workers,
            memory_output(Arc::default()),
        );
        let (lines, summary) = run_to_memory(job);
        assert_eq!(lines, file.lines, "{workers} worker(s): Kafka and file diffs differ");
        // The clock over partitions is their least, so it runs behind the
        // file's: an event late in the file may not be late here, and a
        // repeat long after its first may still be remembered as a duplicate.
        let f = &file.summary;
        let same = |s: &Summary| {
            (
                s.events_read,
                s.bad,
                s.ignored,
                s.accepted + s.duplicates,
                s.profiles,
                s.diffs_written,
                s.clock.clone(),
            )
        };
        assert_eq!(same(&summary), same(f), "{workers} worker(s): summaries differ");
    }
}

/// Reads every message of `topic` from the start.
fn read_topic(brokers: &str, topic: &str, partitions: i32) -> Vec<String> {
    common::read_topic(ClientConfig::new().set("bootstrap.servers", brokers), topic, partitions)
}

#[test]
fn a_broker_outage_mid_run_loses_no_change() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 3).unwrap();
    cluster.create_topic("changes", 2, 3).unwrap();
    let events = lines(20_000, 11);
    produce(&brokers, "events", &events);
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");

    let job = kafka_job(
        &brokers,
        "events",
        "outage",
        2,
        kafka_output(brokers.clone(), "changes".into(), Vec::new()),
    );
    let running = std::thread::spawn(move || run(job).expect("the run survives the outage"));
    // Make produce requests fail for a while, then take the brokers away one
    // at a time while the run reads and writes.
    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::Produce,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5],
    );
    for broker in 1..=3 {
        std::thread::sleep(Duration::from_millis(300));
        cluster.broker_down(broker).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        cluster.broker_up(broker).unwrap();
    }
    let summary = running.join().unwrap();
    assert_eq!(summary.diffs_written as usize, file.lines.len());

    let mut got = read_topic(&brokers, "changes", 2);
    let mut want = file.lines.clone();
    got.sort();
    want.sort();
    // At least once, and the idempotent producer keeps retries from repeating.
    got.dedup();
    assert_eq!(got, want, "every change reached the topic");
}

#[test]
fn a_second_run_resumes_from_the_committed_offsets() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 3, 1).unwrap();
    let all = lines(4_000, 5);
    let (first, second) = all.split_at(2_500);
    produce(&brokers, "events", first);
    let (_, s1) = run_to_memory(kafka_job(&brokers, "events", "resume", 2, memory_output(Arc::default())));
    assert_eq!(s1.events_read as usize, first.len());

    produce(&brokers, "events", second);
    let (lines2, s2) = run_to_memory(kafka_job(&brokers, "events", "resume", 1, memory_output(Arc::default())));
    assert_eq!(
        s2.events_read as usize,
        second.len(),
        "only what came after the commit is read again"
    );
    assert!(!lines2.is_empty());

    assert_committed_at_the_ends(&brokers, "resume", "events", 3);
}

#[test]
fn offsets_are_not_committed_past_changes_the_output_failed_to_write() {
    // An output that fails from its 50th line: the run ends with the
    // error, and the group's offsets stay before the events whose changes
    // were lost, so a second run reads them again.
    struct Failing(usize);
    impl shoal::output::deliver::Deliver for Failing {
        fn send(&mut self, _tick: u64, _key: &str, _line: &str) -> std::io::Result<()> {
            self.0 += 1;
            match self.0 {
                ..50 => Ok(()),
                _ => Err(std::io::Error::other("the disk is full")),
            }
        }
    }
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 2, 1).unwrap();
    let all = lines(3_000, 9);
    produce(&brokers, "events", &all);
    let failing: shoal::output::deliver::OpenOutput = Arc::new(|_| Ok(Box::new(Failing(0))));
    let error = run(kafka_job(&brokers, "events", "failing", 1, failing)).expect_err("the output failed");
    assert!(error.to_string().contains("the disk is full"), "{error}");

    let total = committed_total(&brokers, "failing", "events", 2);
    assert!(
        total < all.len() as i64 / 2,
        "{total} of {} offsets committed past a failed write",
        all.len()
    );
}

/// The group's committed offset of each of the topic's partitions, and a
/// consumer of the cluster to ask more.
fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> (BaseConsumer, Vec<Offset>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let list = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let offsets = (0..partitions).map(|p| list.find_partition(topic, p).unwrap().offset()).collect();
    (consumer, offsets)
}

/// The sum of the group's committed offsets over the topic's partitions
/// (none committed counts 0).
fn committed_total(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let (_, offsets) = committed(brokers, group, topic, partitions);
    offsets
        .into_iter()
        .map(|o| match o {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// The group's committed offsets are the ends of the topic's partitions.
fn assert_committed_at_the_ends(brokers: &str, group: &str, topic: &str, partitions: i32) {
    let (consumer, offsets) = committed(brokers, group, topic, partitions);
    for (p, offset) in (0..partitions).zip(offsets) {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        assert_eq!(offset, Offset::Offset(high), "partition {p}");
    }
}

#[test]
fn the_final_commit_waits_for_a_coordinator_that_is_not_ready() {
    // Just after an outage the group may still be finding its coordinator:
    // the commit at the end of a run must wait it out, not fail the run.
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 2, 1).unwrap();
    let events = lines(1_000, 13);
    produce(&brokers, "events", &events);
    cluster.request_errors(
        rdkafka::types::RDKafkaApiKey::OffsetCommit,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 8],
    );
    let (_, summary) = run_to_memory(kafka_job(&brokers, "events", "patient", 1, memory_output(Arc::default())));
    assert_eq!(summary.events_read as usize, events.len());
    assert_committed_at_the_ends(&brokers, "patient", "events", 2);
}

#[test]
fn bad_messages_become_dead_letters_with_their_position() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 1, 1).unwrap();
    let good = r#"{"type":"track","event":"Product Viewed","userId":"u1","timestamp":"2024-01-01T00:00:00Z","messageId":"m1"}"#;
    produce(&brokers, "events", &[good.to_string(), "{not json".to_string()]);
    let dead = Arc::new(Mutex::new(Vec::new()));
    let mut job = kafka_job(&brokers, "events", "dead", 1, memory_output(Arc::default()));
    job.dead_letters = Some(memory_output(dead.clone()));
    let summary = run(job).unwrap();
    assert_eq!((summary.accepted, summary.bad), (1, 1));
    let text = String::from_utf8(dead.lock().unwrap().clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["topic"], "events");
    assert_eq!(v["partition"], 0);
    assert_eq!(v["offset"], 1);
    assert_eq!(v["text"], "{not json");
}

#[test]
fn the_binary_runs_live_and_stops_cleanly_on_sigterm() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 2, 1).unwrap();
    let events = lines(3_000, 3);
    produce(&brokers, "events", &events);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("changes.jsonl");
    let mut child = shoal_kafka(&brokers, "live")
        .args(["--idle", "200ms", "--kafka-partition-idle", "500ms", "--output"])
        .arg(&out)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Progress with per-partition lag shows while it runs; then ask it to stop.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let started = Instant::now();
    let progress = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("a progress line within 30s");
        if line.contains("progress") {
            break line;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    };
    assert!(progress.contains("lag events/0:") && progress.contains("events/1:"), "{progress}");
    assert!(
        std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) > 0,
        "changes are out while it runs"
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    let err = reading.join().unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    let summary: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(summary["events_read"], events.len(), "{err}");
    let written = std::fs::read_to_string(&out).unwrap().lines().count();
    assert!(written > 0);
    assert_eq!(summary["diffs_written"], written);

    // Offsets were committed on the way out.
    assert!(committed_total(&brokers, "live", "events", 2) > 0, "some offsets were committed");
}

/// Against a standalone Kafka-compatible broker (not in every CI run: it
/// needs one running). With tansu, for example:
///
/// ```text
/// cargo install tansu --version 0.6.0 --no-default-features --features dynostore
/// tansu broker --listener-url tcp://127.0.0.1:19092 \
///   --advertised-listener-url tcp://127.0.0.1:19092 --storage-engine memory://tansu/ &
/// SHOAL_KAFKA_BROKERS=127.0.0.1:19092 cargo test --test kafka -- --ignored
/// ```
#[test]
#[ignore = "needs a standalone broker: SHOAL_KAFKA_BROKERS=host:port cargo test --test kafka -- --ignored"]
fn a_standalone_broker_gives_the_same_diffs_as_a_file() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let brokers = std::env::var("SHOAL_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let (events_topic, changes_topic) = (format!("shoal-events-{stamp}"), format!("shoal-changes-{stamp}"));
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("admin client");
    let topics = [
        NewTopic::new(&events_topic, 4, TopicReplication::Fixed(1)),
        NewTopic::new(&changes_topic, 2, TopicReplication::Fixed(1)),
    ];
    for r in futures_executor::block_on(admin.create_topics(&topics, &AdminOptions::new())).expect("topics created") {
        r.expect("topic created");
    }
    let events = lines(10_000, 21);
    produce(&brokers, &events_topic, &events);
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");
    let job = kafka_job(
        &brokers,
        &events_topic,
        &format!("g-{stamp}"),
        2,
        kafka_output(brokers.clone(), changes_topic.clone(), Vec::new()),
    );
    let summary = run(job).expect("the run succeeds");
    assert_eq!(summary.diffs_written as usize, file.lines.len());
    let mut got = read_topic(&brokers, &changes_topic, 2);
    let mut want = file.lines.clone();
    got.sort();
    want.sort();
    got.dedup();
    assert_eq!(got, want);
}

#[test]
fn two_processes_share_the_partitions_and_agree_with_a_file() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 1).unwrap();
    let events = lines(6_000, 13);
    produce(&brokers, "events", &events);
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");
    let dir = tempfile::tempdir().unwrap();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", port(), port())).unwrap();
    let out = dir.path().join("changes.jsonl");
    let process = |i: usize| {
        shoal_kafka(&brokers, "two")
            .args(["--kafka-until-end", "--lateness", "1h", "--workers", "2", "--processes", "2"])
            .args(["--process", &i.to_string(), "--hostfile"])
            .arg(&hostfile)
            .arg("--output")
            .arg(&out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p0, p1) = (process(0), process(1));
    let (o1, o0) = (p1.wait_with_output().unwrap(), p0.wait_with_output().unwrap());
    for o in [&o0, &o1] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let written = std::fs::read_to_string(&out).unwrap();
    let written: Vec<&str> = written.lines().collect();
    let first_difference = written.iter().zip(&file.lines).position(|(a, b)| a != b);
    assert_eq!(
        (written.len(), first_difference),
        (file.lines.len(), None),
        "2 processes × 2 workers differ from the file run; first difference: {:?} vs {:?}",
        first_difference.map(|i| written[i]),
        first_difference.map(|i| &file.lines[i])
    );
    let err = String::from_utf8_lossy(&o0.stderr);
    let summary: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(summary["events_read"], events.len(), "process 0 sums every reader's counts");
}

#[test]
fn an_idle_partition_stops_holding_the_clock_back() {
    // Two partitions, events only in one: live, the clock must still move
    // once the empty partition has been quiet for --kafka-partition-idle.
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 2, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for i in 0..20u64 {
        let line = format!(
            r#"{{"type":"track","event":"Product Viewed","userId":"u1","timestamp":{},"messageId":"m{i}"}}"#,
            1_704_067_200_000 + i * 60_000
        );
        producer
            .send(BaseRecord::to("events").partition(0).key("u1").payload(&line))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mut job = kafka_job(&brokers, "events", "idle", 1, memory_output(buf.clone()));
    job.spec = shoal::spec::parse_spec(
        "[[segment]]\nname = \"viewer\"\nwhen = \"count('Product Viewed', 1h) >= 1\"\n",
        1000,
    )
    .unwrap();
    job.opts.lateness = 0;
    job.opts.idle = 60_000; // wall-clock idling is not what makes it move here
    if let Some(k) = job.kafka.as_mut() {
        k.until_end = false;
        k.partition_idle = 300;
    }
    let stop = job.stop.clone();
    let running = std::thread::spawn(move || run(job).expect("the run succeeds"));
    let started = Instant::now();
    while buf.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let summary = running.join().unwrap();
    assert!(summary.diffs_written > 0, "changes came out with partition 1 silent: {summary:?}");
    assert_eq!(summary.events_read, 20);
}

#[test]
fn sigkill_with_kafka_in_and_out_on_two_workers_repeats_only_identical_lines() {
    use rand::{Rng, SeedableRng};
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 3).unwrap();
    // One partition out, so the topic's order is the order written.
    cluster.create_topic("changes", 1, 3).unwrap();
    // librdkafka's mock cluster keeps a few MB per partition: stay under it.
    let events = lines(30_000, 23);
    produce_batched(&brokers, "events", &events, 100);
    // Paced input: 100 events per partition per 10 ms round trip, under a second
    // for the whole input, so every life ends before the input does however
    // fast the engine gets (a fast engine once finished it in its first life).
    for broker in 1..=3 {
        cluster.broker_round_trip_time(broker, Duration::from_millis(10)).unwrap();
    }
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (mut kills, mut outage) = (0, false);
    let last_life = loop {
        let before = common::newest_checkpoint(&state);
        let mut child = shoal_kafka(&brokers, "killed")
            .args([
                "--kafka-until-end",
                "--lateness",
                "1h",
                "--output-kafka",
                "changes",
                "--checkpoint-every",
                "50ms",
                "--workers",
                "2",
            ])
            .arg("--state")
            .arg(&state)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if rng.gen_ratio(3, 4) {
            common::wait_for_checkpoint(&mut child, &state, &before);
        }
        if kills == 2 && !outage {
            // Every broker away while checkpoints come due, then a kill
            // before they are back: the checkpoints written meanwhile cover
            // only what the brokers acknowledged.
            outage = true;
            for broker in 1..=3 {
                cluster.broker_down(broker).unwrap();
            }
            std::thread::sleep(Duration::from_millis(1500));
            child.kill().unwrap();
            child.wait().unwrap();
            for broker in 1..=3 {
                cluster.broker_up(broker).unwrap();
            }
            kills += 1;
            continue;
        }
        // Short: each life must leave most of the input for the next ones.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            continue;
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        break err;
    };
    assert!(kills >= 5 && outage, "only {kills} kills before the run finished");
    // At least once: the topic is the file run's lines, where a restart may
    // go back (to its checkpoint) and repeat lines exactly, never skip one.
    let index: BTreeMap<&str, usize> = file.lines.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
    let got = read_topic(&brokers, "changes", 1);
    let (mut next, mut reached, mut repeats) = (0usize, 0usize, 0usize);
    for line in &got {
        let i = *index
            .get(line.as_str())
            .unwrap_or_else(|| panic!("a line no uninterrupted run writes: {line}"));
        assert!(i <= reached, "line {i} skips ahead of {reached}: a change was lost");
        if i != next {
            assert!(i < next, "out of order at {i} after {next}");
            repeats += next - i;
        }
        next = i + 1;
        reached = reached.max(next);
    }
    assert_eq!(reached, file.lines.len(), "every change reached the topic");
    assert_eq!(got.len(), file.lines.len() + repeats, "every line past the first copy is a repeat");
    eprintln!("{kills} kills: {} lines, {repeats} of them repeats", got.len());
    // The summary counts every event and change once, across the restarts:
    // lines repeated on the topic after a restart are not counted again.
    let summary: serde_json::Value = serde_json::from_str(last_life.lines().last().unwrap()).unwrap();
    assert_eq!(summary["events_read"], events.len(), "{last_life}");
    assert_eq!(
        summary["diffs_written"],
        file.lines.len(),
        "{last_life}\n{kills} kills; the topic holds {} lines, {repeats} of them repeats",
        got.len()
    );
}

/// With `--http` over two processes, `/metrics` counts the events that
/// every process's readers read: each reader's counters reach the server on
/// process 0 through the dataflow.
#[test]
fn metrics_count_the_readers_of_every_process() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 1).unwrap();
    let events = lines(2_000, 17);
    produce(&brokers, "events", &events);
    let dir = tempfile::tempdir().unwrap();
    let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hostfile = dir.path().join("hosts");
    std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", port(), port())).unwrap();
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SPEC);
    let args = |i: usize| -> Vec<String> {
        [
            spec.to_str().unwrap(),
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            "events",
            "--kafka-group",
            "metrics",
            "--kafka-until-end",
            "--lateness",
            "1h",
            "--processes",
            "2",
            "--process",
            &i.to_string(),
            "--hostfile",
            hostfile.to_str().unwrap(),
            "--output",
            "changes.jsonl",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // Every process gets the same flags (the dataflow must be the same); only process 0 serves.
    let p1 = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("run")
        .args(args(1))
        .args(["--http", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let args0 = args(0);
    let mut p0 = common::Shoal::start(dir.path(), &args0.iter().map(String::as_str).collect::<Vec<_>>(), false);
    // Each process reads two of the four partitions.
    let want = format!("shoal_events_total{{result=\"read\"}} {}\n", events.len());
    let started = Instant::now();
    loop {
        let (status, metrics) = common::http(&p0.addr, "GET", "/metrics", None);
        assert_eq!(status, 200);
        if metrics.contains(&want) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never {want}: {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Serving ends on a signal to every process (as any stop with several processes).
    let pid = p1.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = p0.terminate();
    assert!(status.success(), "{status:?}: {}", p0.stderr.lock().unwrap());
    let o1 = p1.wait_with_output().unwrap();
    assert!(o1.status.success(), "{}", String::from_utf8_lossy(&o1.stderr));
}

/// Events over HTTP beside a topic (SPEC §8): half the events come from
/// Kafka, half over `/v1/batch`, and the memberships equal those of all of
/// them read from a file. HTTP is a partition of its own for the clock: once
/// the topic's partitions are quiet, an event over HTTP moves it.
#[test]
fn events_over_http_are_read_beside_a_topic() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 2, 1).unwrap();
    let events = lines(3_000, 12);
    let to_kafka: Vec<String> = events.iter().step_by(2).cloned().collect();
    let to_http: Vec<&String> = events.iter().skip(1).step_by(2).collect();
    produce(&brokers, "events", &to_kafka);
    let max = events
        .iter()
        .filter_map(|l| shoal::ingest::event::decode(l.as_bytes()).ok())
        .map(|e| e.time)
        .max()
        .unwrap();
    let sentinel = format!(
        r#"{{"type":"track","event":"Sentinel","userId":"zz-sentinel","messageId":"sentinel","timestamp":"{}"}}"#,
        shoal::core::clock::format_time(max + 7_200_000, true)
    );
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("all.jsonl");
    std::fs::write(&input, events.join("\n") + "\n" + &sentinel + "\n").unwrap();
    let until = max.to_string();
    let spec = format!("{}/{SPEC}", env!("CARGO_MANIFEST_DIR"));
    let file = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "run",
            &spec,
            "--lateness",
            "1h",
            "--until",
            &until,
            "--output",
            "ref.jsonl",
            "--input",
        ])
        .arg(&input)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(file.status.success(), "{}", String::from_utf8_lossy(&file.stderr));
    let summary: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&file.stderr).lines().last().unwrap()).unwrap();
    let accepted = summary["accepted"].as_u64().unwrap();
    assert!(std::fs::read_to_string(dir.path().join("ref.jsonl")).unwrap().lines().count() > 100);

    std::fs::write(dir.path().join("keys"), "k\n").unwrap();
    let args = [
        spec.as_str(),
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        "events",
        "--kafka-group",
        "beside",
        "--kafka-partition-idle",
        "500ms",
        "--write-key-file",
        "keys",
        "--lateness",
        "1h",
        "--until",
        &until,
        "--output",
        "out.jsonl",
    ];
    let mut s = common::Shoal::start(dir.path(), &args, false);
    for chunk in to_http.chunks(100) {
        let body = format!(
            "{{\"batch\":[{}]}}",
            chunk
                .iter()
                .map(|l| l.as_str())
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                .collect::<Vec<_>>()
                .join(",")
        );
        let (status, answer) = common::post(&s.addr, "/v1/batch", Some("k"), body.as_bytes(), false);
        assert_eq!(status, 200, "{answer}");
    }
    // (Lines that are not JSON cannot go in a batch; the file run counts
    // them as bad, not accepted.) Everything but the sentinel first:
    let started = Instant::now();
    loop {
        let now = common::counted(&s.addr, "accepted");
        if now + 1 >= accepted {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{now} of {accepted} accepted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = common::post(
        &s.addr,
        "/v1/batch",
        Some("k"),
        format!("{{\"batch\":[{sentinel}]}}").as_bytes(),
        false,
    );
    assert_eq!(status, 200);
    let started = Instant::now();
    while common::counted(&s.addr, "accepted") < accepted {
        assert!(started.elapsed() < Duration::from_secs(60), "the sentinel was not accepted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The clock passes `--until` once the partitions are quiet (500 ms).
    let expected = std::fs::read_to_string(dir.path().join("ref.jsonl")).unwrap();
    let out = dir.path().join("out.jsonl");
    let started = Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) < expected.len() as u64 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.terminate().success(), "{}", s.stderr.lock().unwrap());
    let got = std::fs::read_to_string(&out).unwrap();
    assert!(
        got == expected,
        "Kafka and HTTP together differ from the file ({} lines against {})",
        got.lines().count(),
        expected.lines().count()
    );
}

/// A cluster whose processes were given different `--state` directories
/// (a natural mistake on separate hosts): process 0 cannot read process
/// 1's parts, so it must not commit rounds that name them (a restart would
/// then find every checkpoint unusable and silently start over); it says
/// why instead.
#[test]
fn a_cluster_without_a_shared_state_directory_commits_no_round_and_says_why() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 1).unwrap();
    produce_batched(&brokers, "events", &lines(3_000, 41), 100);
    cluster.broker_round_trip_time(1, Duration::from_millis(5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts");
    std::fs::write(
        &hostfile,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", common::free_port(), common::free_port()),
    )
    .unwrap();
    let states = [dir.path().join("state-0"), dir.path().join("state-1")];
    let lives: Vec<_> = (0..2)
        .map(|process| {
            shoal_kafka(&brokers, "apart")
                .args(["--kafka-until-end", "--checkpoint-every", "20ms"])
                .args(["--workers", "1", "--processes", "2", "--connect-timeout", "5s"])
                .args(["--process", &process.to_string(), "--hostfile"])
                .arg(&hostfile)
                .args(["--dead-letter", "/dev/null", "--output"])
                .arg(dir.path().join("out.jsonl"))
                .arg("--state")
                .arg(&states[process])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = lives.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let stderr0 = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(outputs[0].status.success(), "{stderr0}");
    let committed: Vec<_> = std::fs::read_dir(&states[0])
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
        .map(|e| e.file_name())
        .collect();
    assert!(
        committed.is_empty(),
        "rounds committed with parts process 0 cannot read: {committed:?}"
    );
    assert!(
        stderr0.contains("cannot read") && stderr0.contains("same --state directory"),
        "{stderr0}"
    );
}

/// Kafka into a cluster of 2 processes × 2 workers with `--state`: random
/// processes SIGKILLed at random moments (the other stops by itself), all
/// started again from the checkpoint whose parts every process wrote, and
/// the output file is the file run's, byte for byte.
#[test]
fn sigkill_of_any_process_of_a_kafka_cluster_leaves_the_output_byte_identical() {
    let (cluster, brokers) = cluster();
    cluster.create_topic("events", 4, 1).unwrap();
    let events = lines(20_000, 29);
    produce_batched(&brokers, "events", &events, 100);
    // Paced, so that a life leaves input for the next ones.
    cluster.broker_round_trip_time(1, Duration::from_millis(10)).unwrap();
    let file = run_memory(&spec(), (events.join("\n") + "\n").as_bytes(), &opts(1)).expect("file run");
    let want = file.lines.join("\n") + "\n";
    common::cluster_runs(31, |runs, rng| {
        let dir = tempfile::tempdir().unwrap();
        let (state, out) = (dir.path().join("state"), dir.path().join("changes.jsonl"));
        let group = format!("cluster-{runs}");
        let lives = common::cluster_until_done(dir.path(), &state, 12, rng, |process, hostfile| {
            shoal_kafka(&brokers, &group)
                .args(["--kafka-until-end", "--lateness", "1h", "--checkpoint-every", "20ms"])
                .args(["--workers", "2", "--processes", "2", "--connect-timeout", "5s"])
                .args(["--process", &process.to_string(), "--hostfile"])
                .arg(hostfile)
                .arg("--dead-letter")
                .arg(dir.path().join("dead.jsonl"))
                .arg("--state")
                .arg(&state)
                .arg("--output")
                .arg(&out)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        });
        let got = std::fs::read_to_string(&out).unwrap();
        let first_difference = got.lines().zip(file.lines.iter()).position(|(a, b)| a != b);
        assert!(
            got == want,
            "after {} kills: {} lines of {}, first difference at {first_difference:?}",
            lives.kills,
            got.lines().count(),
            file.lines.len()
        );
        let summary: serde_json::Value = serde_json::from_str(lives.last.lines().last().unwrap()).unwrap();
        assert_eq!(summary["events_read"], events.len(), "{}", lives.last);
        // Every bad message is dead-lettered once, whichever process read it
        // (readers interleave, so the order is free).
        let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap();
        let mut dead: Vec<&str> = dead.lines().collect();
        dead.sort_unstable();
        let n = dead.len();
        dead.dedup();
        assert_eq!(
            (n, dead.len()),
            (file.dead_letters.len(), file.dead_letters.len()),
            "dead letters lost or repeated"
        );
        // Process 1's readers are in the checkpoints as parts.
        let newest = std::fs::read(common::newest_checkpoint(&state).unwrap()).unwrap();
        let snap = shoal::run::checkpoint::decode(&newest).unwrap();
        assert_eq!(
            snap.parts.iter().map(|p| p.worker).collect::<Vec<_>>(),
            vec![2, 3],
            "{:?}",
            snap.parts
        );
        assert!(snap.parts.iter().all(|p| state.join(&p.file).exists()));
        lives
    });
}
