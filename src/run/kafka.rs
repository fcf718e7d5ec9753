//! Reading Kafka: each worker reads its own partitions (see
//! [`crate::io::kafka`]) and feeds its reader, clocked by their watermark.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode};
use rdkafka::message::Message;

use crate::ingest::stamp::{dead_letter_at, Outcome};
use crate::io::kafka::{
    client_config, commit, connect, dead_letter, kafka_error, lag_line, my_partitions, open_partitions, position, KafkaInput, Lag,
    Partition, COMMIT_EVERY, HTTP_TOPIC, POLL_BATCH,
};
use crate::io::source::{Next, Source};
use crate::io::Position;
use crate::run::error::EngineError;
use crate::run::reader::Reader;

/// Events over HTTP beside Kafka (worker 0): the open source and its
/// place among the partitions.
struct Http {
    intake: std::sync::Arc<crate::io::intake::Intake>,
    lines: crate::io::source::Lines,
    part: Partition,
    buf: Vec<u8>,
}

impl Http {
    /// At a stop: takes no more requests, and reads what was taken before
    /// until nothing more comes (see `crate::run::lines`).
    fn drain(&mut self, reader: &mut Reader<'_>) -> Result<(), EngineError> {
        self.intake.close();
        let mut quiet = Instant::now();
        while quiet.elapsed() < crate::run::lines::DRAIN_WAIT {
            if self.read(reader)?.0 > 0 {
                quiet = Instant::now();
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        reader.pump(true, String::new);
        Ok(())
    }

    /// Reads what arrived over HTTP (at most a batch, without waiting);
    /// returns how many lines, and whether an event was accepted.
    fn read(&mut self, reader: &mut Reader<'_>) -> Result<(usize, bool), EngineError> {
        let (mut got, mut any) = (0, false);
        while got < POLL_BATCH {
            let next = self
                .lines
                .next(&mut self.buf, Duration::ZERO)
                .map_err(crate::io::Error::input(|| "read events over HTTP".into()))?;
            let prepared = match next {
                Next::Prepared(p) => p,
                Next::Idle | Next::End => break,
            };
            got += 1;
            self.part.take_to(prepared.offset as i64);
            let place = prepared.place;
            let outcome = reader.feeder.read_prepared(prepared);
            match &outcome {
                Outcome::Accepted(s) => {
                    let effect = reader.opts.until.is_none_or(|u| s.effect <= u).then_some(s.effect);
                    self.part.accepted(s.event.time, effect);
                    any = true;
                }
                Outcome::Bad(reason) => {
                    self.part.refused(reader.feeder.frontier());
                    let line = match place {
                        Some(place) => dead_letter_at(place, reason, &self.buf),
                        None => crate::ingest::stamp::dead_letter("http", 0, reason, &self.buf),
                    };
                    reader.dead_letter(line);
                }
                Outcome::Blank | Outcome::Ignored | Outcome::Duplicate => {}
            }
            // Not `read()`: HTTP is never committed to the group, so its
            // offsets must not pile up for a commit.
        }
        Ok((got, any))
    }
}

/// Reads this worker's partitions until a stop, or (bounded) their ends;
/// worker 0 also reads events over HTTP when `http` is given.
pub fn read(reader: &mut Reader<'_>, k: &KafkaInput, http: Option<&Source>, start: Option<Position>) -> Result<(), EngineError> {
    let (index, peers) = (reader.worker.index(), reader.worker.peers());
    // A setting that cannot work (TLS, SASL) fails here with its reason.
    if let Some(topic) = k.topics.first() {
        connect(&k.brokers, &k.options, topic)?;
    }
    let consumer: BaseConsumer<Lag> = client_config(&k.brokers, &k.options)
        .set("group.id", &k.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "2000")
        .create_with_context(Lag::default())
        .map_err(|e| kafka_error(&k.brokers, "cannot create a consumer", e))?;
    let mine = my_partitions(&consumer, k, index, peers)?;
    if mine.is_empty() && http.is_none() {
        reader.checkpoint_final(Position::Kafka(Vec::new()));
        return Ok(());
    }
    reader.feeder.external_clock();
    // With --state the checkpoint is where reading resumes; with no
    // checkpoint yet the state is empty, so reading starts at the beginning
    // (the group's offsets may be past events no checkpoint holds).
    let start = match (start, reader.checkpointing()) {
        (None, true) => Some(Position::Kafka(Vec::new())),
        (start, _) => start,
    };
    // HTTP's place in the position is its own, not a Kafka partition's.
    let (start, http_start) = match start {
        Some(Position::Kafka(ps)) => {
            let (h, ps): (Vec<_>, Vec<_>) = ps.into_iter().partition(|p| p.topic == HTTP_TOPIC);
            (Some(Position::Kafka(ps)), h.into_iter().next())
        }
        other => (other, None),
    };
    let mut http = match http {
        Some(source @ Source::Http(intake)) => {
            let part = Partition::http(http_start.as_ref());
            let lines = source.open_at(part.next() as u64, &reader.feeder.decoding())?;
            Some(Http {
                intake: intake.clone(),
                lines,
                part,
                buf: Vec::new(),
            })
        }
        _ => None,
    };
    let mut parts = if mine.is_empty() {
        Vec::new()
    } else {
        open_partitions(&consumer, k, &mine, start)?
    };
    let at: HashMap<(String, i32), usize> = parts.iter().enumerate().map(|(i, p)| ((p.topic.clone(), p.partition), i)).collect();

    let idle = Duration::from_millis(reader.opts.idle);
    let partition_idle = Duration::from_millis(k.partition_idle);
    let tick = reader.opts.tick;
    let mut last_event = (Instant::now(), None::<u64>);
    let mut last_commit = Instant::now();
    loop {
        if reader.stopping() || (k.until_end && parts.iter().all(Partition::done)) {
            break;
        }
        // Poll a batch: the first message may wait a little, the rest are
        // already fetched and come at once.
        let mut got = 0;
        while got < POLL_BATCH {
            let wait = if got == 0 { Duration::from_millis(20) } else { Duration::ZERO };
            let Some(polled) = consumer.poll(wait) else { break };
            let msg = match polled {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: consumer error (retrying)");
                    break;
                }
            };
            got += 1;
            let Some(&i) = at.get(&(msg.topic().to_string(), msg.partition())) else {
                continue;
            };
            let p = &mut parts[i];
            if !p.take(msg.offset()) {
                continue;
            }
            let payload = msg.payload().unwrap_or_default();
            let payload = payload.strip_suffix(b"\n").unwrap_or(payload);
            let outcome = reader.feeder.read(payload);
            match &outcome {
                Outcome::Accepted(s) => {
                    p.accepted(s.event.time, reader.opts.until.is_none_or(|u| s.effect <= u).then_some(s.effect));
                    last_event = (Instant::now(), reader.feeder.now());
                }
                Outcome::Bad(reason) => {
                    p.refused(reader.feeder.frontier());
                    let line = dead_letter(&p.topic, p.partition, msg.offset(), reason, payload);
                    reader.dead_letter(line);
                }
                Outcome::Blank | Outcome::Ignored | Outcome::Duplicate => {}
            }
            p.read();
        }
        if let Some(h) = &mut http {
            let (n, accepted) = h.read(reader)?;
            got += n;
            if accepted {
                last_event = (Instant::now(), reader.feeder.now());
            }
        }
        advance_clock(reader, &with_http(&parts, &http), partition_idle, idle, &last_event, tick);
        let lag = || lag_line(&consumer, &parts);
        reader.pump(!k.until_end && got < POLL_BATCH, lag);
        reader.checkpoint_if_due(|| position(with_http(&parts, &http)));
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &mut parts, reader.delivered_frontier(), CommitMode::Async, &k.brokers)?;
            last_commit = Instant::now();
        }
    }
    if reader.stopping() {
        if let Some(h) = &mut http {
            h.drain(reader)?;
        }
        reader.settle();
    } else {
        reader.finish_input();
    }
    reader.checkpoint_final(position(with_http(&parts, &http)));
    commit(&consumer, &mut parts, reader.delivered_frontier(), CommitMode::Sync, &k.brokers)?;
    Ok(())
}

/// The Kafka partitions and, beside them, HTTP's.
fn with_http<'a>(parts: &'a [Partition], http: &'a Option<Http>) -> Vec<&'a Partition> {
    parts.iter().chain(http.iter().map(|h| &h.part)).collect()
}

/// Moves the reader's clock: the least over its partitions of their largest
/// event time (a quiet or finished partition does not hold it back), minus
/// the lateness; when every partition is quiet for `idle`, by wall time.
fn advance_clock(
    reader: &mut Reader<'_>,
    parts: &[&Partition],
    partition_idle: Duration,
    idle: Duration,
    last_event: &(Instant, Option<u64>),
    tick: u64,
) {
    let active = |p: &&&Partition| !p.done() && p.quiet_for() < partition_idle;
    let holding: Vec<Option<u64>> = parts.iter().filter(active).map(|p| p.max_time()).collect();
    let watermark = if holding.is_empty() {
        parts.iter().filter_map(|p| p.max_time()).max()
    } else if holding.iter().all(Option::is_some) {
        holding.into_iter().flatten().min()
    } else {
        None // an active partition has not shown an event yet
    };
    if let Some(w) = watermark {
        reader.feeder.advance_watermark(w);
    }
    let (at, now) = *last_event;
    let quiet = parts.iter().all(|p| p.quiet_for() >= idle);
    if let Some(now) = now.filter(|_| quiet && at.elapsed() >= idle) {
        reader.feeder.advance_clock(now + (at.elapsed().as_millis() as u64 / tick) * tick);
    }
}
