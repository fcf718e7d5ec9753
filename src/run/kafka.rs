//! Reading Kafka: each worker reads its own partitions (see
//! [`crate::io::kafka`]) and feeds its reader, clocked by their watermark.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode};
use rdkafka::message::Message;

use crate::ingest::stamp::Outcome;
use crate::io::kafka::{
    client_config, commit, connect, dead_letter, kafka_error, lag_line, my_partitions, open_partitions, position, KafkaInput, Lag,
    Partition, COMMIT_EVERY, POLL_BATCH,
};
use crate::io::Position;
use crate::run::error::EngineError;
use crate::run::reader::Reader;

/// Reads this worker's partitions until a stop, or (bounded) their ends.
pub fn read(reader: &mut Reader<'_>, k: &KafkaInput, start: Option<Position>) -> Result<(), EngineError> {
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
    if mine.is_empty() {
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
    let mut parts = open_partitions(&consumer, k, &mine, start)?;
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
        advance_clock(reader, &parts, partition_idle, idle, &last_event, tick);
        let lag = || lag_line(&consumer, &parts);
        reader.pump(!k.until_end && got < POLL_BATCH, lag);
        reader.checkpoint_if_due(|| position(&parts));
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &mut parts, reader.delivered_frontier(), CommitMode::Async, &k.brokers)?;
            last_commit = Instant::now();
        }
    }
    if reader.stopping() {
        reader.settle();
    } else {
        reader.finish_input();
    }
    reader.checkpoint_final(position(&parts));
    commit(&consumer, &mut parts, reader.delivered_frontier(), CommitMode::Sync, &k.brokers)?;
    Ok(())
}

/// Moves the reader's clock: the least over its partitions of their largest
/// event time (a quiet or finished partition does not hold it back), minus
/// the lateness; when every partition is quiet for `idle`, by wall time.
fn advance_clock(
    reader: &mut Reader<'_>,
    parts: &[Partition],
    partition_idle: Duration,
    idle: Duration,
    last_event: &(Instant, Option<u64>),
    tick: u64,
) {
    let active = |p: &&Partition| !p.done() && p.quiet_for() < partition_idle;
    let holding: Vec<Option<u64>> = parts.iter().filter(active).map(Partition::max_time).collect();
    let watermark = if holding.is_empty() {
        parts.iter().filter_map(Partition::max_time).max()
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
