//! Sources: where lines come from, in order.
//!
//! Files, in-memory bytes and the generator are read to their end. Stdin is
//! live: a thread reads it into a bounded channel (backpressure, not an
//! unbounded queue) and the reader sees [`Next::Idle`] when nothing arrived
//! for a while, so the clock can follow wall time (SPEC §3). Every source
//! is opened decoded for the spec's streams ([`Lines`], `crate::ingest::decode`):
//! the reader gets each line as an event with its facts, or as a bad line
//! with its text.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use crate::ingest::decode::{Decoding, Got, Item, LiveLine, Prepared};
use crate::ingest::lines::read_line;
use crate::io::Error;

/// Where events come from, read one after another in order.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Stdin,
    Bytes {
        name: String,
        data: Arc<Vec<u8>>,
    },
    /// The built-in traffic generator (`run --generate N`).
    Generate(crate::generate::GenOptions),
    /// Events decoded beforehand (benchmarks that leave parsing out).
    Decoded(Arc<Vec<crate::ingest::event::Event>>),
    /// Lines offered live at a fixed rate per second, open loop (the
    /// latency benchmark): line `i` is offered at `i / rate` seconds.
    Paced {
        data: Arc<Vec<u8>>,
        rate: f64,
    },
    /// Events sent over HTTP (`/v1/…`, SPEC §8): live, and resumable from a
    /// checkpoint when the intake keeps a log (see `crate::io::intake`).
    Http(Arc<crate::io::intake::Intake>),
}

impl Source {
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Stdin => "-".to_string(),
            Source::Bytes { name, .. } => name.clone(),
            Source::Generate(g) => format!("generate(seed {})", g.seed),
            Source::Decoded(_) => "decoded".to_string(),
            Source::Paced { rate, .. } => format!("paced({rate}/s)"),
            Source::Http(_) => "http".to_string(),
        }
    }

    fn open_reader(&self) -> Result<Box<dyn BufRead + Send>, Error> {
        Ok(match self {
            Source::File(p) => Box::new(BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(p).map_err(Error::input(|| format!("read {}", p.display())))?,
            )),
            Source::Stdin => Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())),
            Source::Decoded(_) | Source::Paced { .. } | Source::Http(_) => unreachable!("not read as a byte stream"),
            Source::Bytes { data, .. } => Box::new(std::io::Cursor::new(SharedBytes(data.clone()))),
            Source::Generate(g) => Box::new(BufReader::with_capacity(
                1 << 16,
                GeneratedLines {
                    gen: crate::generate::Generator::new(g),
                    rest: Vec::new(),
                    at: 0,
                },
            )),
        })
    }
}

/// The generator's lines as a byte stream.
struct GeneratedLines {
    gen: crate::generate::Generator,
    rest: Vec<u8>,
    at: usize,
}

impl std::io::Read for GeneratedLines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.rest.len() {
            self.rest.clear();
            self.at = 0;
            match self.gen.next_line() {
                Some(line) => {
                    self.rest.extend_from_slice(line.as_bytes());
                    self.rest.push(b'\n');
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.rest.len() - self.at);
        buf[..n].copy_from_slice(&self.rest[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct SharedBytes(Arc<Vec<u8>>);
impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What reading a source gave.
pub enum Next {
    /// A line (or a pre-decoded event), decoded with its facts (see
    /// `crate::ingest::decode`); the buffer holds its text when it is not a valid
    /// event.
    ///
    /// Not boxed, though larger than the other variants: one per line, and
    /// moving it costs less than an allocation and a free per event on the
    /// reading worker.
    Prepared(Prepared),
    /// Nothing arrived within the wait (live sources only).
    Idle,
    End,
}

/// An open source, decoded on a thread of its own (see `crate::ingest::decode`).
pub enum Lines {
    /// A byte stream read to its end.
    Ahead(crate::ingest::decode::Ahead),
    /// A live source.
    Live(crate::ingest::decode::Ahead),
    /// Events decoded beforehand, the next one's index, and what the reader
    /// wants of them.
    Decoded(Arc<Vec<crate::ingest::event::Event>>, usize, Decoding),
}

/// A source before decoding.
enum Raw {
    /// A byte stream and the offset of its next line.
    Bytes(Box<dyn BufRead + Send>, u64),
    /// Lines from a thread (stdin, HTTP, the paced benchmark source), and
    /// the offset they start at.
    Live(Receiver<std::io::Result<Vec<LiveLine>>>, u64),
    Decoded(Arc<Vec<crate::ingest::event::Event>>),
}

impl Source {
    /// Opens the source, decoding it as `decoding` says; stdin gets a
    /// reader thread.
    pub fn open(&self, decoding: &Decoding) -> Result<Lines, Error> {
        self.open_at(0, decoding)
    }

    /// Opens the source at byte `offset` (resuming from a checkpoint),
    /// decoding it as `decoding` says.
    pub fn open_at(&self, offset: u64, decoding: &Decoding) -> Result<Lines, Error> {
        let failed = Error::input(|| "start the decoding thread".into());
        Ok(match self.raw_at(offset)? {
            Raw::Bytes(input, offset) => {
                Lines::Ahead(crate::ingest::decode::Ahead::spawn(input, offset, decoding.clone()).map_err(failed)?)
            }
            Raw::Live(lines, offset) => Lines::Live(
                crate::ingest::decode::live(lines, decoding.clone())
                    .map_err(failed)?
                    .resumed_at(offset),
            ),
            Raw::Decoded(events) => Lines::Decoded(events, 0, decoding.clone()),
        })
    }

    /// The source's lines as they come, from the start.
    fn raw(&self) -> Result<Raw, Error> {
        if let Source::Decoded(events) = self {
            return Ok(Raw::Decoded(events.clone()));
        }
        if let Source::Paced { data, rate } = self {
            let (data, rate) = (data.clone(), *rate);
            let (tx, rx) = sync_channel(1 << 14);
            std::thread::Builder::new()
                .name("shoal-paced".into())
                .spawn(move || {
                    let start = std::time::Instant::now();
                    for (i, line) in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
                        let due = Duration::from_secs_f64(i as f64 / rate);
                        if let Some(wait) = due.checked_sub(start.elapsed()).filter(|w| *w >= Duration::from_millis(1)) {
                            std::thread::sleep(wait);
                        }
                        if tx.send(Ok(vec![LiveLine::of(line.to_vec())])).is_err() {
                            break;
                        }
                    }
                })
                .map_err(Error::input(|| "start the paced source".into()))?;
            return Ok(Raw::Live(rx, 0));
        }
        if let Source::Http(intake) = self {
            return Ok(Raw::Live(intake.lines_from(0)?, 0));
        }
        if let Source::Stdin = self {
            let (tx, rx) = sync_channel(1 << 14);
            std::thread::Builder::new()
                .name("shoal-stdin".into())
                .spawn(move || {
                    let mut input = BufReader::with_capacity(1 << 20, std::io::stdin());
                    loop {
                        let mut line = Vec::new();
                        match read_line(&mut input, &mut line) {
                            Ok(0) => break,
                            Ok(_) => {
                                if tx.send(Ok(vec![LiveLine::of(line)])).is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                break;
                            }
                        }
                    }
                })
                .map_err(Error::input(|| "start the stdin reader".into()))?;
            return Ok(Raw::Live(rx, 0));
        }
        Ok(Raw::Bytes(self.open_reader()?, 0))
    }

    /// The source's lines from byte `offset`. Files seek; the generator and
    /// in-memory bytes skip; stdin and the benchmark sources cannot be read
    /// again.
    fn raw_at(&self, offset: u64) -> Result<Raw, Error> {
        use std::io::{Read, Seek};
        if offset == 0 {
            return self.raw();
        }
        let cannot = |e: std::io::Error| Error::input(|| format!("resume {} at byte {offset}", self.name()))(e);
        match self {
            Source::File(p) => {
                let mut f = std::fs::File::open(p).map_err(Error::input(|| format!("read {}", p.display())))?;
                let len = f.metadata().map_err(cannot)?.len();
                if len < offset {
                    return Err(Error::Changed(format!(
                        "cannot resume {} at byte {offset}: it is only {len} bytes long now (was it replaced?)",
                        p.display()
                    )));
                }
                f.seek(std::io::SeekFrom::Start(offset)).map_err(cannot)?;
                Ok(Raw::Bytes(Box::new(BufReader::with_capacity(1 << 20, f)), offset))
            }
            Source::Bytes { .. } | Source::Generate(_) => {
                let mut r = self.open_reader()?;
                let skipped = std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink()).map_err(cannot)?;
                if skipped < offset {
                    return Err(cannot(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(Raw::Bytes(r, offset))
            }
            Source::Http(intake) if intake.durable_log() => Ok(Raw::Live(intake.lines_from(offset)?, offset)),
            _ => Err(Error::Unsupported(format!(
                "{} cannot be read again from a checkpoint",
                self.name()
            ))),
        }
    }

    /// Whether a checkpoint can resume this source at a byte offset.
    pub fn replayable(&self) -> bool {
        match self {
            Source::File(_) | Source::Bytes { .. } | Source::Generate(_) => true,
            Source::Http(intake) => intake.durable_log(),
            _ => false,
        }
    }
}

/// A decoded line, with the text of a bad one put in `buf`.
fn hand_over(mut prepared: Prepared, buf: &mut Vec<u8>) -> Next {
    if let Item::Bad { text, .. } = &mut prepared.item {
        *buf = std::mem::take(text);
    }
    Next::Prepared(prepared)
}

impl Lines {
    /// The next line, waiting at most `wait` on a live source; the text of a
    /// line that is not a valid event is put in `buf` (for its dead letter).
    pub fn next(&mut self, buf: &mut Vec<u8>, wait: Duration) -> std::io::Result<Next> {
        buf.clear();
        match self {
            Lines::Ahead(ahead) => Ok(match ahead.next_line()? {
                Some(prepared) => hand_over(prepared, buf),
                None => Next::End,
            }),
            Lines::Live(live) => Ok(match live.next_within(wait)? {
                Got::Line(prepared) => hand_over(prepared, buf),
                Got::Idle => Next::Idle,
                Got::End => Next::End,
            }),
            Lines::Decoded(events, at, decoding) => {
                let Some(event) = events.get(*at) else { return Ok(Next::End) };
                *at += 1;
                let item = decoding.item_of(event);
                Ok(Next::Prepared(Prepared {
                    item,
                    offset: 0,
                    place: None,
                }))
            }
        }
    }

    /// The offset of the next line (byte streams and the HTTP log; 0
    /// otherwise).
    pub fn offset(&self) -> u64 {
        match self {
            Lines::Ahead(ahead) | Lines::Live(ahead) => ahead.offset(),
            Lines::Decoded(..) => 0,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self, Lines::Live(_))
    }
}
