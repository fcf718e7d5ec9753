//! Decoding ahead of the reader, on a thread of its own.
//!
//! A reader's sequential work (SPEC §3: the clock, dedupe and identity
//! follow input order) is cheap; what is expensive per line — parsing the
//! JSON and matching it against every stream's selector and filter, reading
//! the paths the streams keep — depends on the line alone. So for files and
//! other byte streams read to their end, a `shoal-decode` thread does that
//! part: it reads lines, decodes each into an [`Event`] and its facts
//! ([`crate::ingest::select::extract`] for every stream), and hands them over in
//! batches through a bounded channel (so it runs at most a few batches
//! ahead). The reader then only stamps and feeds them, in order. On two
//! cores this takes about a third of the per-event work off the worker that
//! reads, which is what limited a second worker (see `docs/performance.md`).
//!
//! With several threads ([`Decoding::on_threads`], `--decoders`), a
//! `shoal-read` thread cuts the input into blocks of whole lines, one
//! buffer each, and deals them in turn to the decoding threads, which cut
//! them into lines; a `shoal-merge` thread takes the decoded blocks back
//! in the same turn: the reader still gets every line in input order.
//!
//! A line is decoded with its objects borrowed from it
//! ([`crate::ingest::event::decode_borrowed`]): the facts are read from the
//! line itself, and the objects copied out only when whole events are
//! wanted.
//!
//! Live sources (stdin) get the same, line by line, so that a line is
//! never held back to fill a batch ([`live`]).
//!
//! The output is the same as decoding in place: each line keeps its number,
//! its byte offset (checkpoints resume after the last line fed), and a line
//! that does not decode keeps its text for the dead letter.

use std::io::BufRead;
use std::sync::mpsc::{sync_channel, Receiver};

use crate::core::fact::Pay;
use crate::core::id::StreamId;
use crate::ingest::event::{decode_borrowed, Event, EventOf};
use crate::ingest::lines::read_line;
use crate::ingest::select::extract;
use crate::ingest::select::Selectors;
use crate::plan::StreamDef;

/// Lines per batch handed to the reader.
const BATCH: usize = 256;
/// Batches the decoder may run ahead.
const AHEAD: usize = 16;

/// One line, decoded.
pub enum Item {
    /// Only whitespace: not an event, not counted.
    Blank,
    /// Not a valid event: why, and the line as read.
    Bad { reason: String, text: Vec<u8> },
    /// A valid event and what each stream it matches keeps of it.
    Event { event: Box<Event>, facts: StreamPays },
}

/// What the reader wants of each line: the facts of every stream, and the
/// event's objects (`properties`, `traits`, `context`) only when it keeps
/// whole events (the served model's history, `--history`). Otherwise they
/// are dropped here, once the facts are read from them: freeing them is
/// the decoding thread's work, not the reader's.
#[derive(Clone)]
pub struct Decoding {
    streams: Vec<StreamDef>,
    selectors: Selectors,
    objects: bool,
    /// Threads that decode a file or byte stream ([`Ahead::spawn`]).
    threads: usize,
}

impl Decoding {
    /// Facts for `streams`, and the objects kept if `objects`.
    pub fn new(streams: &[StreamDef], objects: bool) -> Decoding {
        Decoding {
            streams: streams.to_vec(),
            selectors: Selectors::new(streams),
            objects,
            threads: 1,
        }
    }

    /// Decodes files and byte streams on `threads` threads (at least one).
    pub fn on_threads(mut self, threads: usize) -> Decoding {
        self.threads = threads.max(1);
        self
    }

    /// Facts for `streams`, objects kept.
    pub fn all(streams: &[StreamDef]) -> Decoding {
        Decoding::new(streams, true)
    }

    /// What every stream keeps of `event`, in stream order, checking only
    /// the streams whose selector can match it.
    pub fn facts(&self, event: &EventOf<'_>) -> StreamPays {
        let mut facts = StreamPays::new();
        self.selectors.candidates(event, |i| {
            if let Some(pay) = extract(&self.streams[i.index()], event) {
                facts.push((i, pay));
            }
        });
        facts.sort_unstable_by_key(|(i, _)| *i);
        facts
    }

    /// The event decoded for the reader: its facts, and the event itself,
    /// without its objects unless they are wanted (only then are they
    /// copied out of the line).
    pub fn item(&self, event: EventOf<'_>) -> Item {
        let facts = self.facts(&event);
        let event = if self.objects {
            event.into_owned()
        } else {
            event.into_without_objects()
        };
        Item::Event {
            facts,
            event: Box::new(event),
        }
    }

    /// [`Decoding::item`] of an event decoded beforehand.
    pub fn item_of(&self, event: &Event) -> Item {
        Item::Event {
            facts: self.facts(event),
            event: Box::new(if self.objects { event.clone() } else { event.without_objects() }),
        }
    }
}

/// `(stream, payload)` for every stream an event matches, in stream order.
pub type StreamPays = Vec<(StreamId, Pay)>;

fn trim_line_ending(line: &[u8]) -> &[u8] {
    match line.strip_suffix(b"\n") {
        Some(line) => line.strip_suffix(b"\r").unwrap_or(line),
        None => line,
    }
}

/// Decodes one line (with or without its line ending).
fn prepare(line: &[u8], decoding: &Decoding) -> Item {
    let line = trim_line_ending(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Item::Blank;
    }
    match decode_borrowed(line) {
        Ok(event) => decoding.item(event),
        Err(e) => Item::Bad {
            reason: e.0,
            text: line.to_vec(),
        },
    }
}

/// A line of a live source: its text, the offset just after it (0 when
/// the source cannot be resumed) and, for events that came over HTTP,
/// where they came from.
#[derive(Clone, Debug, Default)]
pub struct LiveLine {
    pub text: Vec<u8>,
    pub offset: u64,
    pub place: Option<Place>,
}

impl LiveLine {
    /// A line of a source that cannot be resumed.
    pub fn of(text: Vec<u8>) -> LiveLine {
        LiveLine {
            text,
            offset: 0,
            place: None,
        }
    }
}

/// Where an event that came over HTTP came from: its request's receive
/// time (ms) and its index in the request, the position its dead letter
/// names (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub received: u64,
    pub index: u32,
}

/// Decodes the lines of a live source (stdin, HTTP, the paced benchmark
/// source) on a thread of its own. A line is never held back to fill a
/// batch: the thread takes every batch of lines already waiting (up to
/// [`BATCH`] lines), decodes them and passes them on together, so a busy
/// stream crosses the channel in batches and a quiet one line by line.
pub fn live(lines: Receiver<std::io::Result<Vec<LiveLine>>>, decoding: Decoding) -> std::io::Result<Ahead> {
    let (tx, batches) = sync_channel(AHEAD);
    std::thread::Builder::new().name("shoal-decode".into()).spawn(move || {
        while let Ok(first) = lines.recv() {
            let mut batch = Vec::with_capacity(BATCH);
            let mut failed = None;
            let mut next = Some(first);
            while let Some(got) = next.take() {
                match got {
                    Ok(got) => batch.extend(got.into_iter().map(|line| Prepared {
                        item: prepare(&line.text, &decoding),
                        offset: line.offset,
                        place: line.place,
                    })),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                if batch.len() < BATCH {
                    next = lines.try_recv().ok();
                }
            }
            if tx.send(Ok(batch)).is_err() {
                return;
            }
            if let Some(e) = failed {
                let _ = tx.send(Err(e));
                return;
            }
        }
    })?;
    Ok(Ahead {
        batches,
        current: Vec::new().into_iter(),
        offset: 0,
    })
}

/// What waiting for the next line of a live source gave.
pub enum Got {
    Line(Prepared),
    /// Nothing within the wait.
    Idle,
    End,
}

/// A decoded line and the byte offset just after it.
pub struct Prepared {
    pub item: Item,
    pub offset: u64,
    /// Where an event that came over HTTP came from.
    pub place: Option<Place>,
}

/// How many lines ahead of the one handed out the reader asks for the next
/// one's event and facts (see [`prefetch`]).
const PREFETCH: usize = 4;

/// Asks the CPU to bring a decoded line's event and facts into this core's
/// cache. They were written on the decoding thread's core, and the reader's
/// first read of each missed the cache: perf put over half the samples of
/// `Ingest::accept` on its first read of the event (`event.kind`), and a
/// quarter of `Feeder::fed`'s on its first read of the facts. Asked a few
/// lines ahead, the reads arrive while the lines before are fed.
fn prefetch(p: &Prepared) {
    #[cfg(target_arch = "x86_64")]
    if let Item::Event { event, facts } = &p.item {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let event: *const Event = &**event;
        let lines = std::mem::size_of::<Event>().div_ceil(64);
        let facts_bytes = std::mem::size_of_val(facts.as_slice());
        for at in (0..lines)
            .map(|i| event.cast::<i8>().wrapping_add(i * 64))
            .chain((0..facts_bytes.div_ceil(64)).map(|i| facts.as_ptr().cast::<i8>().wrapping_add(i * 64)))
        {
            // SAFETY: a prefetch is a hint: it reads nothing the program
            // sees and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at) };
        }
    }
}

/// Bytes per block a `shoal-read` thread hands a decoder: about
/// [`BATCH`] lines of typical events.
const BLOCK: usize = 128 * 1024;

/// Whole lines of the input, as read in one piece: `start` is the offset
/// of the first; `last` marks the end of the input.
struct Block {
    bytes: Vec<u8>,
    start: u64,
    last: bool,
}

impl Block {
    /// Every line of the block, decoded, with the offset just after it.
    fn prepared(&self, decoding: &Decoding) -> Vec<Prepared> {
        let mut at = 0;
        let mut out = Vec::with_capacity(BATCH);
        while at < self.bytes.len() {
            let end = memchr::memchr(b'\n', &self.bytes[at..]).map_or(self.bytes.len(), |i| at + i + 1);
            out.push(Prepared {
                item: prepare(&self.bytes[at..end], decoding),
                offset: self.start + end as u64,
                place: None,
            });
            at = end;
        }
        out
    }
}

/// Cuts an input into [`Block`]s: [`BLOCK`] bytes each and the rest of
/// the line they end in (the last block: what is left). A block never
/// takes more of the input than that, however much a reader lends at once
/// (a source held in memory lends all of it).
struct Blocks {
    at: u64,
}

impl Blocks {
    fn new(offset: u64) -> Blocks {
        Blocks { at: offset }
    }

    /// The next block. A read that fails gives the whole lines read before
    /// it, as a block, and the error; the start of a line it cut is lost,
    /// as reading line by line loses it.
    fn next(&mut self, input: &mut (dyn BufRead + Send)) -> Result<Block, (Block, std::io::Error)> {
        let mut bytes = Vec::with_capacity(BLOCK + BLOCK / 4);
        let last = loop {
            let available = match input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let whole = memchr::memrchr(b'\n', &bytes).map_or(0, |i| i + 1);
                    bytes.truncate(whole);
                    return Err((self.block(bytes, false), e));
                }
            };
            if available.is_empty() {
                break true;
            }
            // Up to the block's size, then up to the end of the line.
            let room = BLOCK.saturating_sub(bytes.len());
            let (used, done) = match room {
                0 => match memchr::memchr(b'\n', available) {
                    Some(i) => (i + 1, true),
                    None => (available.len(), false),
                },
                _ => (available.len().min(room), false),
            };
            bytes.extend_from_slice(&available[..used]);
            input.consume(used);
            if done {
                break false;
            }
        };
        Ok(self.block(bytes, last))
    }

    fn block(&mut self, bytes: Vec<u8>, last: bool) -> Block {
        let start = self.at;
        self.at += bytes.len() as u64;
        Block { bytes, start, last }
    }
}

/// The reader's end of a decoding thread.
pub struct Ahead {
    batches: Receiver<std::io::Result<Vec<Prepared>>>,
    current: std::vec::IntoIter<Prepared>,
    offset: u64,
}

impl Ahead {
    /// Starts decoding `input` (positioned at byte `offset`) as `decoding`
    /// says, on as many threads as it says.
    pub fn spawn(input: Box<dyn BufRead + Send>, offset: u64, decoding: Decoding) -> std::io::Result<Ahead> {
        if decoding.threads > 1 {
            return Ahead::spawn_many(input, offset, decoding);
        }
        Ahead::spawn_one(input, offset, decoding)
    }

    /// One `shoal-decode` thread reads and decodes, line by line into one
    /// reused buffer. Reading [`Blocks`] as several threads do (one
    /// mechanism, no copy per line) was measured against it: 2–5% more
    /// CPU at one worker, with or without reusing the block's buffer
    /// (`docs/performance.md`, session 25). A line read into a buffer that
    /// stays in cache is parsed from there; a block of 128 KiB is not.
    fn spawn_one(mut input: Box<dyn BufRead + Send>, offset: u64, decoding: Decoding) -> std::io::Result<Ahead> {
        let (tx, batches) = sync_channel(AHEAD);
        std::thread::Builder::new().name("shoal-decode".into()).spawn(move || {
            let mut at = offset;
            let mut batch = Vec::with_capacity(BATCH);
            // One buffer for every line: only a bad line's text is kept.
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line(&mut input, &mut line) {
                    Ok(0) => break,
                    Ok(n) => at += n as u64,
                    Err(e) => {
                        let _ = tx.send(Ok(std::mem::take(&mut batch)));
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                let item = prepare(&line, &decoding);
                batch.push(Prepared {
                    item,
                    offset: at,
                    place: None,
                });
                if batch.len() == BATCH && tx.send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))).is_err() {
                    return; // the reader stopped
                }
            }
            let _ = tx.send(Ok(batch));
        })?;
        Ok(Ahead {
            batches,
            current: Vec::new().into_iter(),
            offset,
        })
    }

    /// A `shoal-read` thread cuts the input into blocks of whole lines,
    /// dealt in turn to `n` `shoal-decode` threads; a `shoal-merge` thread
    /// takes the decoded blocks back in the same turn, so the reader gets
    /// them in input order (SPEC §3 stamps in that order). Each decoder's
    /// channels are bounded, so the whole runs at most a few blocks ahead.
    ///
    /// A block is one buffer, cut into lines by the decoder that gets it:
    /// reading line by line, each into a buffer of its own that another
    /// thread freed, took the reading thread a fifth of the CPU the
    /// decoders took (see `docs/performance.md`, session 24).
    fn spawn_many(mut input: Box<dyn BufRead + Send>, offset: u64, decoding: Decoding) -> std::io::Result<Ahead> {
        let n = decoding.threads;
        let (mut to_decoders, mut from_decoders) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (tx, rx) = sync_channel::<std::io::Result<Block>>(AHEAD.div_ceil(n).max(2));
            let (out, back) = sync_channel::<std::io::Result<(Vec<Prepared>, bool)>>(AHEAD.div_ceil(n).max(2));
            let decoding = decoding.clone();
            std::thread::Builder::new().name(format!("shoal-decode-{i}")).spawn(move || {
                while let Ok(block) = rx.recv() {
                    let decoded = block.map(|b| (b.prepared(&decoding), b.last));
                    if out.send(decoded).is_err() {
                        return;
                    }
                }
            })?;
            to_decoders.push(tx);
            from_decoders.push(back);
        }
        std::thread::Builder::new().name("shoal-read".into()).spawn(move || {
            let mut blocks = Blocks::new(offset);
            for turn in (0..n).cycle() {
                match blocks.next(&mut input) {
                    Ok(block) => {
                        let last = block.last;
                        if to_decoders[turn].send(Ok(block)).is_err() || last {
                            return;
                        }
                    }
                    Err((lines, e)) => {
                        let _ = to_decoders[turn].send(Ok(lines));
                        let _ = to_decoders[(turn + 1) % n].send(Err(e));
                        return;
                    }
                }
            }
        })?;
        let (tx, batches) = sync_channel(AHEAD);
        std::thread::Builder::new().name("shoal-merge".into()).spawn(move || {
            // A decoder that ends after the last block or an error passed
            // on ends the input. One that ends before died: that is an
            // error, not the end of the input.
            for turn in (0..n).cycle() {
                let Ok(decoded) = from_decoders[turn].recv() else {
                    let _ = tx.send(Err(std::io::Error::other("a decoding thread stopped")));
                    return;
                };
                let (batch, end) = match decoded {
                    Ok((batch, last)) => (Ok(batch), last),
                    Err(e) => (Err(e), true),
                };
                if tx.send(batch).is_err() || end {
                    return;
                }
            }
        })?;
        Ok(Ahead {
            batches,
            current: Vec::new().into_iter(),
            offset,
        })
    }

    /// The next decoded line, `None` at the end of the input.
    pub fn next_line(&mut self) -> std::io::Result<Option<Prepared>> {
        // A wait too long for a deadline is a plain blocking receive.
        Ok(match self.next_within(std::time::Duration::MAX)? {
            Got::Line(p) => Some(p),
            Got::Idle | Got::End => None,
        })
    }

    /// The next decoded line, waiting at most `wait` (live sources).
    pub fn next_within(&mut self, wait: std::time::Duration) -> std::io::Result<Got> {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            if let Some(p) = self.current.next() {
                self.offset = p.offset;
                // What is left starts at the next line: the line `PREFETCH`
                // after `p` is at `PREFETCH - 1`, and the batch's first
                // `PREFETCH` lines were asked for when it came.
                if let Some(ahead) = self.current.as_slice().get(PREFETCH - 1) {
                    prefetch(ahead);
                }
                return Ok(Got::Line(p));
            }
            match self.batches.recv_timeout(wait) {
                Ok(batch) => {
                    self.current = batch?.into_iter();
                    self.current.as_slice().iter().take(PREFETCH).for_each(prefetch);
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Got::Idle),
                Err(RecvTimeoutError::Disconnected) => return Ok(Got::End),
            }
        }
    }

    /// The byte offset just after the last line returned.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A live source's offset (0 until a line was read): after resuming,
    /// the offset it was opened at.
    pub fn resumed_at(mut self, offset: u64) -> Ahead {
        self.offset = offset;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::id::StreamId;

    /// What every stream keeps of `event`: the definition, checking every
    /// stream.
    fn facts(streams: &[StreamDef], event: &Event) -> StreamPays {
        streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| extract(s, event).map(|p| (StreamId::of(i), p)))
            .collect()
    }

    #[test]
    fn facts_from_the_candidate_streams_are_the_facts_of_every_stream() {
        // Every bundled dataflow, over generated traffic of every kind.
        let specs = [
            include_str!("../../dataflows/retail.toml"),
            include_str!("../../dataflows/engagement.toml"),
            include_str!("../../dataflows/saas_leads.toml"),
            include_str!("../../dataflows/email_lifecycle.toml"),
        ];
        let mut generator = crate::generate::Generator::new(&crate::generate::GenOptions {
            users: 300,
            events: 5_000,
            ..Default::default()
        });
        let events: Vec<Event> = std::iter::from_fn(|| generator.next_line().map(|l| crate::ingest::event::decode(l.as_bytes()).ok()))
            .flatten()
            .collect();
        for text in specs {
            let plan = crate::plan::Plan::new(&crate::spec::parse_spec(text, 1000).expect("a bundled spec"));
            let decoding = Decoding::new(&plan.streams, false);
            let mut matched = 0;
            for event in &events {
                let all = facts(&plan.streams, event);
                matched += all.len();
                assert_eq!(decoding.facts(event), all, "{event:?}");
            }
            assert!(matched > events.len() / 2, "the traffic matches the spec's streams");
        }
    }

    fn spec() -> crate::plan::Plan {
        let text = "[[segment]]\nname = \"s\"\nwhen = \"count('Bought', 1h) >= 1 and sum('Bought', price, 1h) > 3\"\n";
        crate::plan::Plan::new(&crate::spec::parse_spec(text, 1000).expect("spec"))
    }

    #[test]
    fn lines_decoded_ahead_keep_their_offsets_text_and_facts() {
        let plan = spec();
        let good = r#"{"type":"track","event":"Bought","userId":"u1","messageId":"m1","timestamp":"2024-01-01T00:00:00Z","properties":{"price":5}}"#;
        let input = format!("{good}\r\n   \nnot json\n{good}");
        let reader: Box<dyn BufRead + Send> = Box::new(std::io::Cursor::new(input.clone().into_bytes()));
        let mut ahead = Ahead::spawn(reader, 7, Decoding::all(&plan.streams)).expect("thread");
        let mut got = Vec::new();
        while let Some(p) = ahead.next_line().expect("read") {
            assert_eq!(ahead.offset(), p.offset);
            got.push(p);
        }
        let ends: Vec<u64> = got.iter().map(|p| p.offset).collect();
        let first = 7 + good.len() as u64 + 2;
        assert_eq!(ends, vec![first, first + 4, first + 13, first + 13 + good.len() as u64]);
        assert!(matches!(got[1].item, Item::Blank));
        match &got[2].item {
            Item::Bad { text, .. } => assert_eq!(text, b"not json"),
            _ => panic!("a bad line"),
        }
        for p in [&got[0], &got[3]] {
            let Item::Event { event, facts: f } = &p.item else {
                panic!("an event")
            };
            assert_eq!(*f, facts(&plan.streams, event));
            assert_eq!(f.len(), 2, "a count and a sum stream");
        }
    }

    /// A reader that lends the whole input at once (a source in memory)
    /// is still cut into blocks of about [`BLOCK`] bytes, each of whole
    /// lines, together the whole input: one block would leave every
    /// decoding thread but one idle.
    #[test]
    fn blocks_are_whole_lines_of_about_a_block_each() {
        let line = |i: usize| format!("{}\n", "x".repeat(i % 300));
        let text: String = (0..5_000).map(line).collect();
        let mut input: Box<dyn BufRead + Send> = Box::new(std::io::Cursor::new(text.clone().into_bytes()));
        let mut blocks = Blocks::new(10);
        let mut seen = Vec::new();
        loop {
            let Ok(block) = blocks.next(&mut *input) else {
                panic!("a read from memory fails")
            };
            assert_eq!(block.start, 10 + seen.len() as u64);
            assert!(block.bytes.len() <= BLOCK + 300, "{} bytes", block.bytes.len());
            assert!(block.bytes.is_empty() || block.bytes.ends_with(b"\n"));
            seen.extend_from_slice(&block.bytes);
            if block.last {
                break;
            }
            assert!(block.bytes.len() >= BLOCK);
        }
        assert_eq!(seen, text.as_bytes());
    }

    /// What a decoded line is, to compare: its offset, and its kind with
    /// the bad line's text or the event's id and facts.
    fn seen(p: &Prepared) -> (u64, String) {
        let what = match &p.item {
            Item::Blank => "blank".to_string(),
            Item::Bad { reason, text } => format!("bad {reason} {}", String::from_utf8_lossy(text)),
            Item::Event { event, facts } => format!("{} {} {facts:?}", event.key, event.time),
        };
        (p.offset, what)
    }

    /// Decoded on one thread or several, the lines come in input order,
    /// each with its offset and as decoded in place, over batch boundaries
    /// and an input that ends mid-batch or on one; an input that fails
    /// mid-way gives every line before the failure, then the error.
    #[test]
    fn several_decoding_threads_give_the_lines_of_one_in_order() {
        let plan = spec();
        let mut text = String::new();
        let mut generator = crate::generate::Generator::new(&crate::generate::GenOptions {
            users: 50,
            events: 3_000,
            ..Default::default()
        });
        let mut i = 0;
        while let Some(l) = generator.next_line() {
            text.push_str(l);
            text.push('\n');
            i += 1;
            if i % 97 == 0 {
                text.push_str("  \nnot json\n");
            }
            if i == 1_500 {
                // A line longer than a block.
                let pad = "x".repeat(BLOCK * 2);
                text.push_str(&format!(
                    r#"{{"type":"track","event":"Bought","userId":"u1","timestamp":"2024-01-01T00:00:00Z","properties":{{"price":5,"pad":"{pad}"}}}}"#
                ));
                text.push_str("\r\n");
            }
        }
        let bought = r#"{"type":"track","event":"Bought","userId":"u1","messageId":"m1","timestamp":"2024-01-01T00:00:00Z","properties":{"price":5}}"#;
        text.push_str(bought);
        let decode_all = |input: Vec<u8>, threads: usize| {
            let reader: Box<dyn BufRead + Send> = Box::new(std::io::Cursor::new(input));
            let mut ahead = Ahead::spawn(reader, 3, Decoding::all(&plan.streams).on_threads(threads)).expect("threads");
            let mut got = Vec::new();
            let end = loop {
                match ahead.next_line() {
                    Ok(Some(p)) => got.push(seen(&p)),
                    Ok(None) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            };
            (got, end)
        };
        // Each line decoded in place, as the reference.
        let every_stream = Decoding::all(&plan.streams);
        let in_place = |input: &[u8]| {
            let mut at = 3;
            let lines = input.split_inclusive(|b| *b == b'\n').map(|line| {
                at += line.len() as u64;
                let item = prepare(line, &every_stream);
                seen(&Prepared {
                    item,
                    offset: at,
                    place: None,
                })
            });
            (lines.collect::<Vec<_>>(), None)
        };
        // Cut mid-batch, and after exactly one and two whole batches of
        // lines (offsets start at 3).
        let (whole, _) = decode_all(text.clone().into_bytes(), 1);
        let batches = |k: usize| (whole[k * BATCH - 1].0 - 3) as usize;
        for len in [text.len(), 256 * 40, 256 * 40 + 17, 0, batches(1), batches(2)] {
            let input = text.as_bytes()[..len.min(text.len())].to_vec();
            let one = decode_all(input.clone(), 1);
            assert!(one == in_place(&input), "1 thread, {len} bytes");
            for threads in [2, 3, 5] {
                assert!(decode_all(input.clone(), threads) == one, "{threads} threads, {len} bytes");
            }
        }
        let (all, _) = decode_all(text.clone().into_bytes(), 1);
        assert!(all.len() > 3_000 && all.iter().any(|(_, w)| w.starts_with("bad")));
        let long = all.windows(2).find(|w| w[1].0 - w[0].0 > 2 * BLOCK as u64).expect("the long line");
        assert!(
            long[1].1.contains("Val"),
            "the long line is an event with its price: {:.80}",
            long[1].1
        );
        // A read that fails after 5,000 bytes.
        struct Failing(std::io::Cursor<Vec<u8>>);
        impl std::io::Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.position() >= 5_000 {
                    return Err(std::io::Error::other("disk gone"));
                }
                let n = buf.len().min(100);
                self.0.read(&mut buf[..n])
            }
        }
        for threads in [1, 3] {
            let reader: Box<dyn BufRead + Send> =
                Box::new(std::io::BufReader::new(Failing(std::io::Cursor::new(text.clone().into_bytes()))));
            let mut ahead = Ahead::spawn(reader, 0, Decoding::all(&plan.streams).on_threads(threads)).expect("threads");
            let mut lines = 0;
            let err = loop {
                match ahead.next_line() {
                    Ok(Some(_)) => lines += 1,
                    Ok(None) => panic!("the failure is reported"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.to_string(), "disk gone");
            assert_eq!(all[..lines].iter().map(|(o, _)| *o).max(), all[..lines].last().map(|l| l.0));
            assert!(
                lines > 5 && all[lines - 1].0 <= 5_000,
                "{threads} threads: {lines} lines before the failure"
            );
        }
    }
}
