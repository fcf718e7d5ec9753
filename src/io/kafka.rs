//! Kafka in and out, through librdkafka.
//!
//! **In.** Every worker of every process reads its own share of the
//! partitions: the `(topic, partition)` pairs of all `--kafka-topic`s, in
//! order, dealt out round-robin over the global worker indexes, so none is
//! read twice and none skipped. Each worker assigns its partitions to its own
//! `BaseConsumer` (no group rebalancing: the deal is fixed by the cluster's
//! shape) and polls in batches (the loop is `crate::run::kafka::read`).
//! Each worker runs its own feeder (`crate::run::feeder`): its clock
//! follows the *watermark* of its partitions — the least over them of the
//! largest event time read — minus the lateness; a partition with nothing
//! new for `--kafka-partition-idle` stops holding it back, and when all are
//! quiet for `--idle` the clock follows wall time (SPEC §3). The dataflow's
//! frontier is the least over the workers.
//!
//! **Commits.** The group (`--kafka-group`) stores offsets only: an offset is
//! committed once every event before it took effect at a tick the output has
//! delivered (the sink's delivered frontier). So the guarantee is at least
//! once: after a crash the events since the last commit are read again.
//!
//! **Out.** [`KafkaSink`] writes each membership change to `--output-kafka`
//! (key: the profile id; value: the SPEC §5 line) with an idempotent
//! producer that never gives up on a message: while the broker is away it
//! retries with backoff, and the sink holds the delivered frontier until
//! the broker acknowledged, which in turn holds back commits and input.
//!
//! **Connecting.** Before reading or writing, each client must reach a
//! broker and read the topic's metadata within [`CONNECT_TIMEOUT`]
//! ([`connect`], [`KafkaSink::new`]). A TLS handshake or SASL
//! authentication that fails, or a `security.protocol` that does not match
//! the listener, ends the run at once with librdkafka's reason naming the
//! broker (`kafka B: cannot connect: ssl://B/bootstrap: SSL handshake
//! failed: ...`): retrying cannot mend a setting. Once running, a broker
//! that goes away is waited for, as before.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;

use crate::io::Error;
use crate::output::deliver::Deliver;
use crate::output::deliver::OpenError;

/// Kafka input settings (the `--kafka-*` flags).
#[derive(Clone, Debug)]
pub struct KafkaInput {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group: String,
    /// Read each partition to its end offset as of the start, then finish
    /// like file input.
    pub until_end: bool,
    /// A partition with no message for this long (ms) stops holding the clock.
    pub partition_idle: u64,
    /// Extra librdkafka settings (`--kafka-option key=value`).
    pub options: Vec<(String, String)>,
}

/// Polls per batch at most.
pub const POLL_BATCH: usize = 4096;

/// How long the final commit retries (e.g. while the group finds its
/// coordinator again after an outage).
pub const FINAL_COMMIT_RETRY: Duration = Duration::from_secs(30);

/// How often offsets are committed while running.
pub const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// The consumer's context: keeps the brokers' latest high watermarks from
/// librdkafka's statistics, for the lag shown while running.
#[derive(Default)]
pub struct Lag {
    high: Mutex<HashMap<(String, i32), i64>>,
}

impl ClientContext for Lag {
    fn stats(&self, stats: Statistics) {
        let mut high = self.high.lock().expect("not poisoned");
        for (topic, t) in stats.topics {
            for (p, part) in t.partitions {
                if p >= 0 && part.hi_offset >= 0 {
                    high.insert((topic.clone(), p), part.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Lag {}

/// One partition as its reader sees it.
pub struct Partition {
    pub topic: String,
    pub partition: i32,
    /// The offset of the next message to read.
    next: i64,
    /// The end offset as of the start (bounded runs).
    end: Option<i64>,
    /// The largest accepted event time read.
    max_time: Option<u64>,
    /// When the last message came (or the reader started).
    last_seen: Instant,
    /// (offset after the message, latest effect tick up to it), not yet committed.
    uncommitted: VecDeque<(i64, u64)>,
    /// The latest effect tick read so far.
    effect: u64,
    /// The offset after the last message whose effects are delivered: what
    /// the next commit sends.
    ready: i64,
    /// The offset the group last took.
    committed: i64,
}

/// The name HTTP input goes by beside Kafka partitions in a reader's
/// position: not a valid Kafka topic name, so it cannot clash with one.
pub const HTTP_TOPIC: &str = ":http";

impl Partition {
    /// Events over HTTP read beside Kafka (worker 0): a partition of its
    /// own in the clock and the checkpoint position (its `next` is the
    /// request log's offset), never committed to the group.
    pub fn http(resumed: Option<&crate::io::PartitionPosition>) -> Partition {
        let next = resumed.map_or(0, |p| p.next);
        Partition {
            topic: HTTP_TOPIC.to_string(),
            partition: 0,
            next,
            end: None,
            max_time: resumed.and_then(|p| p.max_time),
            last_seen: Instant::now(),
            uncommitted: VecDeque::new(),
            effect: resumed.map_or(0, |p| p.effect),
            ready: next,
            committed: next,
        }
    }

    /// Takes an HTTP line whose position (the log offset after it) is `next`.
    pub fn take_to(&mut self, next: i64) {
        self.next = next;
        self.last_seen = Instant::now();
    }

    /// The offset of the next message to read.
    pub fn next(&self) -> i64 {
        self.next
    }

    /// Read to its end offset (bounded runs).
    pub fn done(&self) -> bool {
        self.end.is_some_and(|e| self.next >= e)
    }

    /// Takes the message at `offset`, unless it was read already (a
    /// redelivery) or the partition is done; returns whether it did.
    pub fn take(&mut self, offset: i64) -> bool {
        if offset < self.next || self.done() {
            return false;
        }
        self.next = offset + 1;
        self.last_seen = Instant::now();
        true
    }

    /// The message just taken was an event of `time` that takes effect at
    /// `effect` (`None`: after `--until`, it never does).
    pub fn accepted(&mut self, time: u64, effect: Option<u64>) {
        self.max_time = self.max_time.max(Some(time));
        self.effect = self.effect.max(effect.unwrap_or(0));
    }

    /// The message just taken was bad: its dead letter goes out with the
    /// tick the reader is at.
    pub fn refused(&mut self, frontier: u64) {
        self.effect = self.effect.max(frontier);
    }

    /// Records the message just taken as read and not yet committed: the
    /// offset after it can be committed once its effects are delivered.
    pub fn read(&mut self) {
        match self.uncommitted.back_mut() {
            Some(last) if last.1 == self.effect => last.0 = self.next,
            _ => self.uncommitted.push_back((self.next, self.effect)),
        }
    }

    /// The largest accepted event time read.
    pub fn max_time(&self) -> Option<u64> {
        self.max_time
    }

    /// How long since the last message (or the start).
    pub fn quiet_for(&self) -> Duration {
        self.last_seen.elapsed()
    }
}

pub fn client_config(brokers: &str, options: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

/// How long a client may take at the start to reach a broker and read a
/// topic's metadata (through TLS and SASL if set) before the run fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one metadata request of the start may take before the next.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);

/// What librdkafka reported through a client's error callback, to explain
/// a start that cannot connect.
#[derive(Default)]
pub struct Reported {
    state: Mutex<ReportedState>,
}

#[derive(Default)]
struct ReportedState {
    /// The first error that retrying cannot mend (see [`is_fatal`]).
    fatal: Option<String>,
    /// The latest error.
    last: Option<String>,
}

impl Reported {
    /// Records an error from the error callback; returns whether it is fatal.
    pub fn record(&self, error: &KafkaError, reason: &str) -> bool {
        self.note(error.rdkafka_error_code(), reason)
    }

    /// Records a connection failure librdkafka only logs (facility `FAIL`):
    /// a disconnect during the TLS handshake or the ApiVersion request,
    /// where its reason suspects `security.protocol`.
    pub fn record_log(&self, fac: &str, message: &str) {
        if fac == "FAIL" {
            // "[thrd:ssl://b:9093/bootstrap]: ssl://b:9093/bootstrap: reason"
            let reason = message
                .strip_prefix("[thrd:")
                .and_then(|m| m.split_once("]: "))
                .map_or(message, |(_, r)| r);
            self.note(None, reason);
        }
    }

    fn note(&self, code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
        let fatal = is_fatal(code, reason);
        let mut st = self.state.lock().expect("not poisoned");
        if fatal && st.fatal.is_none() {
            st.fatal = Some(reason.to_string());
        }
        // "1/1 brokers are down" says less than the error before it.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) || st.last.is_none() {
            st.last = Some(reason.to_string());
        }
        fatal
    }

    /// The first fatal error reported, if any.
    pub fn fatal(&self) -> Option<String> {
        self.state.lock().expect("not poisoned").fatal.clone()
    }

    /// The latest error reported, if any.
    pub fn last(&self) -> Option<String> {
        self.state.lock().expect("not poisoned").last.clone()
    }
}

/// Whether an error librdkafka reports (its code, if it has one, and its
/// reason) comes from a setting rather than from a broker that is away: a
/// failed TLS handshake (an unknown CA, a name the certificate does not
/// have, a plaintext listener), a failed SASL authentication, or a
/// `security.protocol` that librdkafka itself suspects from how the broker
/// hung up.
pub fn is_fatal(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    matches!(
        code,
        Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
    ) || reason.contains("SSL handshake failed")
        || reason.contains("security.protocol")
        || (reason.contains("Disconnected") && (reason.contains("in state AUTH") || reason.contains("in state APIVERSION_QUERY")))
}

/// Whether `options` ask for TLS (`security.protocol` SSL or SASL_SSL).
fn wants_tls(options: &[(String, String)]) -> bool {
    options
        .iter()
        .any(|(k, v)| k == "security.protocol" && v.to_ascii_uppercase().ends_with("SSL"))
}

/// Forwards a librdkafka log line as the default context does.
fn log_line(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
    }
}

/// A client that only checks the connection (see [`connect`]).
#[derive(Default)]
struct Probe {
    reported: Reported,
}

impl ClientContext for Probe {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Its errors make the run's error; the run's own clients log as usual.
        tracing::debug!(?level, fac, message, "kafka: connection check");
        self.reported.record_log(fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reported.record(&error, reason);
    }
}

impl ProducerContext for Probe {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Connects to `brokers` with the run's settings and reads the metadata of
/// `topic`: fails at once on a TLS, SASL or `security.protocol` error (with
/// librdkafka's reason, which names the broker), and after
/// [`CONNECT_TIMEOUT`] when no broker answers.
pub fn connect(brokers: &str, options: &[(String, String)], topic: &str) -> Result<(), Error> {
    let probe: BaseProducer<Probe> = client_config(brokers, options)
        // Reading a topic's metadata must not create it.
        .set("allow.auto.create.topics", "false")
        // Some disconnects are only logged, at level info.
        .set_log_level(RDKafkaLogLevel::Info)
        .create_with_context(Probe::default())
        .map_err(|e| kafka_error(brokers, "cannot create a client", e))?;
    // Polling runs its callbacks: everything queued, errors included.
    wait_for_metadata(probe.client(), &probe.context().reported, brokers, options, topic, || {
        probe.poll(Duration::from_millis(50))
    })
}

/// Reads `topic`'s metadata through `client` until it comes, a fatal error
/// is reported, or [`CONNECT_TIMEOUT`] passes. `serve` runs the client's
/// callbacks (a threaded producer runs them itself).
fn wait_for_metadata<C: ClientContext>(
    client: &Client<C>,
    reported: &Reported,
    brokers: &str,
    options: &[(String, String)],
    topic: &str,
    serve: impl Fn(),
) -> Result<(), Error> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let attempt = client.fetch_metadata(Some(topic), CONNECT_ATTEMPT);
        serve();
        let error = match attempt {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let Some(mut reason) = reported.fatal() {
            // A TLS listener hangs up on a plaintext ApiVersion request.
            if reason.contains("APIVERSION_QUERY") && !wants_tls(options) {
                reason.push_str(": is it a TLS listener? (--kafka-option security.protocol=SSL or SASL_SSL)");
            }
            return Err(cannot_connect(brokers, &reason));
        }
        if Instant::now() >= deadline {
            return Err(match reported.last() {
                Some(reason) => cannot_connect(brokers, &format!("{reason} (no broker answered in {}s)", CONNECT_TIMEOUT.as_secs())),
                None => kafka_error(brokers, "cannot connect", error),
            });
        }
    }
}

fn cannot_connect(brokers: &str, reason: &str) -> Error {
    Error::Topic {
        brokers: brokers.to_string(),
        what: format!("cannot connect: {reason}"),
    }
}

pub fn kafka_error(brokers: &str, what: &str, e: KafkaError) -> Error {
    Error::Kafka {
        brokers: brokers.to_string(),
        what: what.to_string(),
        error: Box::new(e),
    }
}

/// The dead-letter line of a bad message.
pub fn dead_letter(topic: &str, partition: i32, offset: i64, reason: &str, payload: &[u8]) -> String {
    #[derive(Serialize)]
    struct At<'a> {
        source: &'static str,
        topic: &'a str,
        partition: i32,
        offset: i64,
    }
    let at = At {
        source: "kafka",
        topic,
        partition,
        offset,
    };
    crate::ingest::stamp::dead_letter_of(at, reason, payload)
}

/// This worker's share of the partitions of `topics`.
pub fn my_partitions(consumer: &BaseConsumer<Lag>, k: &KafkaInput, index: usize, peers: usize) -> Result<Vec<(String, i32)>, Error> {
    let mut all = Vec::new();
    for topic in &k.topics {
        let meta = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .map_err(|e| kafka_error(&k.brokers, &format!("cannot read the metadata of topic {topic}"), e))?;
        let t = meta.topics().iter().find(|t| t.name() == topic).ok_or_else(|| Error::Topic {
            brokers: k.brokers.clone(),
            what: format!("no topic {topic}"),
        })?;
        if let Some(err) = t.error() {
            return Err(Error::Topic {
                brokers: k.brokers.clone(),
                what: format!("topic {topic}: {}", RDKafkaErrorCode::from(err)),
            });
        }
        if t.partitions().is_empty() {
            return Err(Error::Topic {
                brokers: k.brokers.clone(),
                what: format!("topic {topic} has no partitions"),
            });
        }
        let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ps.sort();
        all.extend(ps.into_iter().map(|p| (topic.clone(), p)));
    }
    Ok(all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % peers == index)
        .map(|(_, tp)| tp)
        .collect())
}

/// Where a checkpoint finds the partitions.
pub fn position<'a>(parts: impl IntoIterator<Item = &'a Partition>) -> crate::io::Position {
    crate::io::Position::Kafka(
        parts
            .into_iter()
            .map(|p| crate::io::PartitionPosition {
                topic: p.topic.clone(),
                partition: p.partition,
                next: p.next,
                max_time: p.max_time,
                effect: p.effect,
            })
            .collect(),
    )
}

/// Assigns `mine` from a checkpoint's positions when resuming from one (a
/// partition it does not name starts at the beginning), otherwise from the
/// group's committed offsets (or the beginning).
pub fn open_partitions(
    consumer: &BaseConsumer<Lag>,
    k: &KafkaInput,
    mine: &[(String, i32)],
    start: Option<crate::io::Position>,
) -> Result<Vec<Partition>, Error> {
    let from_checkpoint = start.is_some();
    let resumed: HashMap<(String, i32), crate::io::PartitionPosition> = match start {
        Some(crate::io::Position::Kafka(ps)) => ps.into_iter().map(|p| ((p.topic.clone(), p.partition), p)).collect(),
        _ => HashMap::new(),
    };
    let mut tpl = TopicPartitionList::new();
    for (t, p) in mine {
        tpl.add_partition(t, *p);
    }
    let committed = consumer
        .committed_offsets(tpl.clone(), Duration::from_secs(30))
        .map_err(|e| kafka_error(&k.brokers, &format!("cannot read the committed offsets of group {}", k.group), e))?;
    let mut parts = Vec::new();
    let mut assign = TopicPartitionList::new();
    for (topic, partition) in mine {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(30))
            .map_err(|e| kafka_error(&k.brokers, &format!("cannot read the offsets of {topic}/{partition}"), e))?;
        let resumed = resumed.get(&(topic.clone(), *partition));
        let start = match (resumed, committed.find_partition(topic, *partition).map(|e| e.offset())) {
            (Some(r), _) if r.next >= low => r.next,
            (Some(r), _) => {
                return Err(Error::Topic {
                    brokers: k.brokers.clone(),
                    what: format!(
                        "cannot resume {topic}/{partition} at offset {} from the checkpoint: the broker keeps offsets from {low} on",
                        r.next
                    ),
                })
            }
            (None, Some(Offset::Offset(o))) if o >= low && !from_checkpoint => o,
            _ => low,
        };
        assign
            .add_partition_offset(topic, *partition, Offset::Offset(start))
            .map_err(|e| kafka_error(&k.brokers, "cannot assign", e))?;
        parts.push(Partition {
            topic: topic.clone(),
            partition: *partition,
            next: start,
            end: k.until_end.then_some(high),
            max_time: resumed.and_then(|r| r.max_time),
            last_seen: Instant::now(),
            uncommitted: VecDeque::new(),
            effect: resumed.map_or(0, |r| r.effect),
            ready: start,
            committed: start,
        });
    }
    consumer
        .assign(&assign)
        .map_err(|e| kafka_error(&k.brokers, "cannot assign partitions", e))?;
    tracing::info!(partitions = ?mine, "kafka: reading");
    Ok(parts)
}

/// Commits, per partition, the offset after the last message whose effects
/// (and those of every message before it) are delivered. An offset counts
/// as committed once the client took the commit (the periodic commits are
/// asynchronous), so one it refused goes out again with the next commit. The final commit (`Sync`) retries for a
/// while: just after a broker outage the group may still be finding its
/// coordinator.
pub fn commit(consumer: &BaseConsumer<Lag>, parts: &mut [Partition], delivered: u64, mode: CommitMode, brokers: &str) -> Result<(), Error> {
    let mut tpl = TopicPartitionList::new();
    for p in parts.iter_mut() {
        while let Some(&(offset, effect)) = p.uncommitted.front() {
            if effect >= delivered && effect != 0 {
                break;
            }
            p.ready = offset;
            p.uncommitted.pop_front();
        }
        if p.ready > p.committed {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.ready))
                .map_err(|e| kafka_error(brokers, "cannot commit", e))?;
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    let deadline = Instant::now()
        + if matches!(mode, CommitMode::Sync) {
            FINAL_COMMIT_RETRY
        } else {
            Duration::ZERO
        };
    loop {
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                for p in parts.iter_mut() {
                    p.committed = p.ready;
                }
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "kafka: final commit failed, retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            // A failed commit is retried with the next one; at worst events are read again.
            Err(e) if matches!(mode, CommitMode::Async) => {
                tracing::warn!(error = %e, "kafka: commit failed, will retry");
                return Ok(());
            }
            Err(e) => return Err(kafka_error(brokers, "cannot commit offsets", e)),
        }
    }
}

/// Per-partition lag for the progress line: `topic/p:lag`.
pub fn lag_line(consumer: &BaseConsumer<Lag>, parts: &[Partition]) -> String {
    let high = consumer.context().high.lock().expect("not poisoned");
    let lags: Vec<String> = parts
        .iter()
        .map(|p| match high.get(&(p.topic.clone(), p.partition)) {
            Some(h) => format!("{}/{}:{}", p.topic, p.partition, (h - p.next).max(0)),
            None => format!("{}/{}:?", p.topic, p.partition),
        })
        .collect();
    format!(", lag {}", lags.join(" "))
}

/// The producer's context: counts unacknowledged lines per tick and takes
/// back the ones that failed, to send again.
#[derive(Default)]
struct Acks {
    state: Mutex<AckState>,
    reported: Reported,
}

#[derive(Default)]
struct AckState {
    unacked: BTreeMap<u64, usize>,
    failed: Vec<(u64, Vec<u8>, Vec<u8>)>,
    errors: u64,
}

impl ClientContext for Acks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.reported.record_log(fac, message);
        log_line(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // At the start a fatal one fails the run (`KafkaSink::new`); later
        // the producer retries until the broker takes the changes.
        self.reported.record(&error, reason);
        tracing::error!(%error, reason, "kafka: producer");
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tick: usize) {
        let mut st = self.state.lock().expect("not poisoned");
        match result {
            Ok(_) => {
                let tick = tick as u64;
                if let Some(n) = st.unacked.get_mut(&tick) {
                    *n -= 1;
                    if *n == 0 {
                        st.unacked.remove(&tick);
                    }
                }
            }
            Err((e, msg)) => {
                st.errors += 1;
                if st.errors.is_power_of_two() {
                    tracing::warn!(error = %e, errors = st.errors, "kafka: a change was not delivered; sending it again");
                }
                let key = msg.key().unwrap_or_default().to_vec();
                let payload = msg.payload().unwrap_or_default().to_vec();
                st.failed.push((tick as u64, key, payload));
            }
        }
    }
}

/// Membership changes to a Kafka topic (see the module docs).
pub struct KafkaSink {
    producer: ThreadedProducer<Acks>,
    topic: String,
    /// Lines the producer's queue had no room for yet.
    backlog: VecDeque<(u64, Vec<u8>, Vec<u8>)>,
}

impl KafkaSink {
    pub fn new(brokers: &str, topic: &str, options: &[(String, String)]) -> Result<KafkaSink, Error> {
        let producer: ThreadedProducer<Acks> = client_config(brokers, options)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Never give up on a change: retry until the broker is back.
            .set("message.timeout.ms", "0")
            .set("retry.backoff.ms", "100")
            .set("retry.backoff.max.ms", "2000")
            .set("linger.ms", "5")
            // Some disconnects are only logged, at level info.
            .set_log_level(RDKafkaLogLevel::Info)
            .create_with_context(Acks::default())
            .map_err(|e| kafka_error(brokers, "cannot create a producer", e))?;
        wait_for_metadata(producer.client(), &producer.context().reported, brokers, options, topic, || {})?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_string(),
            backlog: VecDeque::new(),
        })
    }

    /// Hands queued lines to the producer until its queue is full.
    fn push(&mut self) {
        let failed = std::mem::take(&mut self.producer.context().state.lock().expect("not poisoned").failed);
        for f in failed.into_iter().rev() {
            self.backlog.push_front(f);
        }
        while let Some((tick, key, payload)) = self.backlog.pop_front() {
            let record = BaseRecord::with_opaque_to(&self.topic, tick as usize).key(&key).payload(&payload);
            if let Err((e, _)) = self.producer.send(record) {
                if !matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) {
                    tracing::warn!(error = %e, "kafka: cannot queue a change; will retry");
                }
                self.backlog.push_front((tick, key, payload));
                break;
            }
        }
    }
}

impl Deliver for KafkaSink {
    fn send(&mut self, tick: u64, key: &str, line: &str) -> std::io::Result<()> {
        *self
            .producer
            .context()
            .state
            .lock()
            .expect("not poisoned")
            .unacked
            .entry(tick)
            .or_default() += 1;
        self.backlog.push_back((tick, key.as_bytes().to_vec(), line.as_bytes().to_vec()));
        Ok(())
    }

    fn end_tick(&mut self, _tick: u64) -> std::io::Result<()> {
        self.push();
        Ok(())
    }

    fn unacknowledged(&mut self) -> Option<u64> {
        self.push();
        self.producer
            .context()
            .state
            .lock()
            .expect("not poisoned")
            .unacked
            .keys()
            .next()
            .copied()
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(10));
    }
}

/// An output that opens a [`KafkaSink`] on worker 0.
pub fn kafka_output(brokers: String, topic: String, options: Vec<(String, String)>) -> crate::output::deliver::OpenOutput {
    Arc::new(move |_resume| -> Result<Box<dyn Deliver>, OpenError> {
        let sink = KafkaSink::new(&brokers, &topic, &options).map_err(|e| OpenError::Other(Box::new(e)))?;
        Ok(Box::new(sink))
    })
}
