//! Any bytes through the event decoder and the ingest stage: never a panic,
//! a hang or an unbounded allocation, and every line is either an event or
//! a dead letter (docs/reliability.md, "Bad input").

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::core::clock::format_time;
use shoal::ingest::event::decode;
use shoal::ingest::stamp::{dead_letter, Identities, Ingest, Outcome};

fuzz_target!(|data: &[u8]| {
    // The whole input as one line, straight to the decoder.
    match decode(data) {
        Ok(event) => touch(&event),
        Err(bad) => check_dead_letter(&bad.0, data),
    }

    // The input as a stream of lines through ingest, as a file source reads
    // it: the clock, lateness and dedupe see every accepted event.
    let mut ingest = Ingest::new(1000, 5000, 3_600_000);
    let mut ids = Identities::default();
    let (mut nodes, mut links) = (Vec::new(), Vec::new());
    for (n, line) in data.split(|&b| b == b'\n').enumerate() {
        match ingest.read(line) {
            Outcome::Bad(reason) => check_dead_letter_at(n as u64 + 1, &reason, line),
            Outcome::Accepted(stamped) => {
                touch(&stamped.event);
                // The sink writes effect ticks as times.
                let _ = format_time(stamped.effect, false);
                ids.changes(&stamped, &mut nodes, &mut links);
            }
            Outcome::Blank | Outcome::Ignored | Outcome::Duplicate => {}
        }
    }
    let _ = ingest.final_tick(None);
});

/// Reads an accepted event the way the dataflow does.
fn touch(event: &shoal::ingest::event::Event) {
    let _ = event.anchor();
    let _ = event.named_ids();
    let _ = event.links();
    for root in ["properties", "traits", "context"] {
        let _ = event.get(&[root.to_string(), "a".to_string(), "b".to_string()]);
    }
}

fn check_dead_letter(reason: &str, line: &[u8]) {
    check_dead_letter_at(1, reason, line)
}

/// The dead letter of a refused line is one line of JSON naming it.
fn check_dead_letter_at(n: u64, reason: &str, line: &[u8]) {
    assert!(!reason.is_empty(), "a bad line needs a reason");
    let dead = dead_letter("fuzz", n, reason, line);
    assert!(!dead.contains('\n'), "a dead letter is one line");
    let v: serde_json::Value = serde_json::from_str(&dead).expect("dead letter is JSON");
    for field in ["source", "line", "reason", "text"] {
        assert!(v.get(field).is_some(), "dead letter without `{field}`: {dead}");
    }
}
