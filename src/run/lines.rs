//! Reading line sources (files, stdin, the generator) in order, on
//! worker 0 of process 0.

use std::time::{Duration, Instant};

use crate::ingest::stamp::{dead_letter, dead_letter_at, Outcome};
use crate::io::source::{Next, Source};
use crate::run::error::EngineError;
use crate::run::reader::{Reader, BATCH, LIVE_PUMP};

/// How long a stopping HTTP source waits for more of what it took before
/// it closed: the decoding thread hands it on within this.
pub(super) const DRAIN_WAIT: Duration = Duration::from_millis(200);

/// Reads the line sources in order (worker 0 of process 0), from `start`
/// when resuming; checkpoints as it goes, at a stop, and at the end.
pub(super) fn read_lines(reader: &mut Reader<'_>, sources: &[Source], start: Option<crate::io::Position>) -> Result<(), EngineError> {
    let mut line = Vec::new();
    let opts = reader.opts.clone();
    let tick = Duration::from_millis(opts.tick);
    let idle = Duration::from_millis(opts.idle);
    let (first, offset, mut number) = match start {
        Some(crate::io::Position::Lines { source, offset, line }) => (source, offset, line),
        _ => (0, 0, 0),
    };
    let at = |source: usize, lines: &crate::io::source::Lines, line: u64| crate::io::Position::Lines {
        source,
        offset: lines.offset(),
        line,
    };
    for (index, source) in sources.iter().enumerate().skip(first) {
        let name = source.name();
        let decoding = reader.feeder.decoding();
        let mut lines = if index == first {
            source.open_at(offset, &decoding)?
        } else {
            source.open(&decoding)?
        };
        if index != first {
            number = 0;
        }
        let live = lines.is_live();
        // Live clock: when the last event came, and the clock then.
        let mut last_event = (Instant::now(), reader.feeder.now());
        let mut batch = 0usize;
        let mut last_pump = Instant::now();
        // Stopping events over HTTP: closed to new requests, and read until
        // nothing more comes, so that none answered 200 is left unread.
        let mut draining = false;
        loop {
            if reader.stopping() && !draining {
                if let Source::Http(intake) = source {
                    intake.close();
                    draining = true;
                } else {
                    reader.settle();
                    reader.checkpoint(at(index, &lines, number));
                    return Ok(());
                }
            }
            let wait = match (draining, batch > 0) {
                (true, _) => DRAIN_WAIT,
                (false, true) => Duration::from_millis(20),
                (false, false) => tick.min(idle),
            };
            let next = lines
                .next(&mut line, wait)
                .map_err(crate::io::Error::input(|| format!("read {name}")))?;
            match next {
                Next::End => break,
                Next::Idle if draining => {
                    reader.settle();
                    reader.checkpoint(at(index, &lines, number));
                    return Ok(());
                }
                Next::Idle => {
                    let (at, now) = last_event;
                    if let Some(now) = now.filter(|_| at.elapsed() >= idle) {
                        reader
                            .feeder
                            .advance_clock(now + (at.elapsed().as_millis() as u64 / opts.tick) * opts.tick);
                    }
                    batch = 0;
                    reader.pump(live, String::new);
                }
                Next::Prepared(prepared) => {
                    number += 1;
                    let place = prepared.place;
                    let outcome = reader.feeder.read_prepared(prepared);
                    if let Outcome::Bad(reason) = &outcome {
                        reader.dead_letter(match place {
                            Some(place) => dead_letter_at(place, reason, &line),
                            None => dead_letter(&name, number, reason, &line),
                        });
                    }
                    // Only live input idles (files never do): no clock
                    // read per event otherwise.
                    if live && matches!(outcome, Outcome::Accepted(_)) {
                        last_event = (Instant::now(), reader.feeder.now());
                    }
                    batch += 1;
                    // Live, a steady stream is pushed through every few
                    // milliseconds, not only when a batch fills.
                    if batch >= BATCH || (live && last_pump.elapsed() >= LIVE_PUMP) {
                        batch = 0;
                        reader.pump(live, String::new);
                        last_pump = Instant::now();
                        reader.checkpoint_if_due(|| at(index, &lines, number));
                    }
                }
            }
        }
    }
    if reader.checkpoints.is_some() {
        // The end: everything delivered, then a checkpoint past the input,
        // so that running the same command again writes nothing more.
        reader.finish_input();
        reader.checkpoint(crate::io::Position::Lines {
            source: sources.len(),
            offset: 0,
            line: 0,
        });
    }
    Ok(())
}
