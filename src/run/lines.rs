//! Reading line sources (files, stdin, the generator) in order, on
//! worker 0 of process 0.

use std::time::{Duration, Instant};

use crate::ingest::stamp::{dead_letter, dead_letter_at, Outcome};
use crate::io::source::{Next, Source};
use crate::run::error::EngineError;
use crate::run::reader::{Reader, BATCH, LIVE_PUMP};

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
        loop {
            if reader.stopping() {
                reader.settle();
                reader.checkpoint(at(index, &lines, number));
                return Ok(());
            }
            let wait = if batch > 0 { Duration::from_millis(20) } else { tick.min(idle) };
            let next = lines
                .next(&mut line, wait)
                .map_err(crate::io::Error::input(|| format!("read {name}")))?;
            match next {
                Next::End => break,
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
                    let outcome = reader.feeder.read_prepared(*prepared);
                    if let Outcome::Bad(reason) = &outcome {
                        reader.dead_letter(match place {
                            Some(place) => dead_letter_at(place, reason, &line),
                            None => dead_letter(&name, number, reason, &line),
                        });
                    }
                    if matches!(outcome, Outcome::Accepted(_)) {
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
