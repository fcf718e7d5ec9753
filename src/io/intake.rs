//! Events that arrive over HTTP (SPEC §8 "In"), on their way to the reader.
//!
//! The HTTP handlers (`crate::serve::events`) parse a request into its
//! events and [`Intake::submit`] them as one [`Request`]; the reader opens
//! the intake as a live line source (`crate::io::source::Source::Http`).
//! Between the two there is a bounded queue: when it is full the request
//! is refused ([`Refused::Busy`], answered 503 with `Retry-After`), so a
//! burst the engine cannot keep up with is pushed back to the clients
//! instead of growing memory.
//!
//! **Durable.** With a log directory (`--state DIR` puts it in
//! `DIR/http-log`), a request is answered only once its events are on disk:
//! one writer thread appends every request waiting, as lines
//! `RECEIVED INDEX EVENT`, closes the group with a line `#`, and calls
//! `fsync` once for the whole group (one sync per group of requests, not
//! per event), then answers them all and hands their lines to the reader. The log is a sequence of segment files
//! named by the logical offset of their first byte; a line's position is
//! the logical offset just after it, which is what a checkpoint stores.
//! Resuming at an offset replays the log from there, then goes on live.
//! A group a crash interrupted (never answered, perhaps half written) is
//! cut off when the log is opened: back to the last `#`. Segments entirely
//! before the oldest checkpoint the state directory keeps are deleted
//! ([`Intake::compact_before`], called by the checkpoints).

use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::ingest::decode::{LiveLine, Place};
use crate::io::Error;

/// A segment is closed and a new one started past this size.
const SEGMENT: u64 = 64 << 20;
/// Requests waiting for the writer (with a log) or the reader (without).
const QUEUE: usize = 512;

/// One request's events, each a complete JSON object on one line.
#[derive(Clone, Debug)]
pub struct Request {
    /// When it was received (ms since the epoch).
    pub received: u64,
    pub events: Vec<Vec<u8>>,
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The queue is full: the reader is behind (answer 503).
    #[error("shoal is busy: try again shortly")]
    Busy,
    /// The run is stopping.
    #[error("shoal is stopping")]
    Closed,
    /// The log could not be written.
    #[error("cannot write the request log {0}")]
    Log(String),
}

/// A request the writer is to log, and whom to tell once it is durable.
struct Pending {
    request: Request,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The log's segment files, by the offset of their first byte.
#[derive(Debug)]
struct Segments {
    dir: PathBuf,
    starts: Vec<u64>,
}

impl Segments {
    fn path(&self, start: u64) -> PathBuf {
        segment_path(&self.dir, start)
    }
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.log"))
}

/// The intake: see the module docs.
pub struct Intake {
    /// To the writer thread (with a log) or straight to the reader.
    queue: Queue,
    /// The reader's end, taken when the source is opened.
    live: Mutex<Option<Receiver<std::io::Result<Vec<LiveLine>>>>>,
    /// With a log: its segments and its end when it was opened (what a
    /// resumed reader replays before the live lines).
    log: Option<(Arc<Mutex<Segments>>, u64)>,
    /// Segments wholly before this offset may go.
    compact_before: Arc<AtomicU64>,
    /// Closed at a stop ([`Intake::close`]); held for reading across a
    /// request's check and queueing, so none is queued after the close.
    closed: std::sync::RwLock<bool>,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").field("durable", &self.log.is_some()).finish()
    }
}

enum Queue {
    Logged(SyncSender<Pending>),
    Direct(SyncSender<std::io::Result<Vec<LiveLine>>>),
}

impl Intake {
    /// An intake without a log: a request is answered once queued.
    pub fn memory() -> Arc<Intake> {
        let (tx, rx) = sync_channel(QUEUE);
        Arc::new(Intake {
            queue: Queue::Direct(tx),
            live: Mutex::new(Some(rx)),
            log: None,
            compact_before: Arc::default(),
            closed: Default::default(),
        })
    }

    /// An intake that logs every request in `dir` before answering it
    /// (created if missing); a torn last line is cut off.
    pub fn durable(dir: &Path) -> Result<Arc<Intake>, Error> {
        Intake::durable_in_segments(dir, SEGMENT)
    }

    /// [`Intake::durable`] with segments of about `segment` bytes.
    fn durable_in_segments(dir: &Path, segment: u64) -> Result<Arc<Intake>, Error> {
        let name = || format!("open the request log {}", dir.display());
        std::fs::create_dir_all(dir).map_err(Error::input(name))?;
        let mut starts = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(Error::input(name))? {
            let entry = entry.map_err(Error::input(name))?;
            let file = entry.file_name();
            let Some(start) = file
                .to_str()
                .and_then(|f| f.strip_suffix(".log"))
                .and_then(|f| f.parse::<u64>().ok())
            else {
                continue;
            };
            starts.push(start);
        }
        starts.sort_unstable();
        if starts.is_empty() {
            starts.push(0);
        }
        let last = *starts.last().expect("one at least");
        let path = segment_path(dir, last);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(Error::input(|| format!("open {}", path.display())))?;
        let len = committed_length(&mut file).map_err(Error::input(|| format!("read {}", path.display())))?;
        file.set_len(len).map_err(Error::input(|| format!("repair {}", path.display())))?;
        file.sync_all().map_err(Error::input(|| format!("sync {}", path.display())))?;
        // The directory too: a checkpoint must never outlive the log it
        // points into.
        sync_dir(dir).map_err(Error::input(|| format!("sync {}", dir.display())))?;
        let end = last + len;
        let segments = Arc::new(Mutex::new(Segments {
            dir: dir.to_path_buf(),
            starts,
        }));
        let (tx, rx) = sync_channel(QUEUE);
        let (live_tx, live_rx) = sync_channel(QUEUE);
        let compact_before = Arc::new(AtomicU64::new(0));
        let mut writer = Writer {
            segments: segments.clone(),
            file,
            start: last,
            len,
            live: live_tx,
            compact_before: compact_before.clone(),
            compacted: 0,
            segment,
        };
        std::thread::Builder::new()
            .name("shoal-http-log".into())
            .spawn(move || writer.run(rx))
            .map_err(Error::input(|| "start the request log writer".into()))?;
        Ok(Arc::new(Intake {
            queue: Queue::Logged(tx),
            live: Mutex::new(Some(live_rx)),
            log: Some((segments, end)),
            compact_before,
            closed: Default::default(),
        }))
    }

    /// Whether a checkpoint can resume this intake (it has a log).
    pub fn durable_log(&self) -> bool {
        self.log.is_some()
    }

    /// Takes a request's events. The returned receiver answers once they
    /// are durable (at once without a log).
    pub fn submit(&self, request: Request) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, Refused> {
        let closed = self.closed.read().expect("not poisoned");
        if *closed {
            return Err(Refused::Closed);
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        match &self.queue {
            Queue::Logged(tx) => match tx.try_send(Pending { request, done }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return Err(Refused::Busy),
                Err(TrySendError::Disconnected(_)) => return Err(Refused::Closed),
            },
            Queue::Direct(tx) => {
                let lines = lines_of(request, |_| 0);
                match tx.try_send(Ok(lines)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => return Err(Refused::Busy),
                    Err(TrySendError::Disconnected(_)) => return Err(Refused::Closed),
                }
                let _ = done.send(Ok(()));
            }
        }
        Ok(answer)
    }

    /// Takes no more requests (they are answered 503, [`Refused::Closed`]):
    /// at a stop, the reader then reads what was taken before, so that no
    /// request answered 200 is left unread (without a log it would be
    /// lost).
    pub fn close(&self) {
        *self.closed.write().expect("not poisoned") = true;
    }

    /// The lines from logical `offset` on: the log replayed from there (when
    /// resuming), then the live ones. Can be called once.
    pub fn lines_from(&self, offset: u64) -> Result<Receiver<std::io::Result<Vec<LiveLine>>>, Error> {
        // The files to replay, checked before the reader's end is taken.
        if let Some((segments, end)) = self.log.as_ref().filter(|(_, end)| offset > *end) {
            return Err(Error::Changed(format!(
                "cannot resume the request log {} at offset {offset}: it ends at {end} (was it cut or deleted?)",
                segments.lock().expect("not poisoned").dir.display()
            )));
        }
        let pending = match &self.log {
            Some((segments, end)) if offset < *end => {
                let segments = segments.lock().expect("not poisoned");
                if segments.starts.first().is_some_and(|first| *first > offset) {
                    return Err(Error::Changed(format!(
                        "cannot resume the request log {} at offset {offset}: it starts at {} (was it changed?)",
                        segments.dir.display(),
                        segments.starts[0]
                    )));
                }
                let files: Vec<(u64, PathBuf)> = segments
                    .starts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| segments.starts.get(i + 1).is_none_or(|next| *next > offset))
                    .map(|(_, s)| (*s, segments.path(*s)))
                    .collect();
                Some((files, *end))
            }
            _ => None,
        };
        let live = self
            .live
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or_else(|| Error::Unsupported("the HTTP intake can be read only once".into()))?;
        let Some((files, end)) = pending else {
            return Ok(live);
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("shoal-http-replay".into())
            .spawn(move || {
                if let Err(e) = replay(&files, offset, end, &tx) {
                    let _ = tx.send(Err(e));
                    return;
                }
                while let Ok(batch) = live.recv() {
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            })
            .map_err(Error::input(|| "start the request log replay".into()))?;
        Ok(rx)
    }

    /// No checkpoint kept needs the lines before `offset` any more: the
    /// segments wholly before it may go (at the writer's next group).
    pub fn compact_before(&self, offset: u64) {
        self.compact_before.fetch_max(offset, Ordering::SeqCst);
    }
}

/// fsyncs a directory (its entries: files created or removed in it).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A group's closing line.
const COMMIT: &[u8] = b"#\n";

/// The length of `file` up to its last closed group (the end of its last
/// `#` line; 0 when it has none).
fn committed_length(file: &mut std::fs::File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut at = len;
    let mut buf = vec![0u8; 1 << 16];
    while at > 0 {
        // Overlap one byte so a `\n#\n` across two reads is seen.
        let n = at.min(buf.len() as u64) as usize;
        let start = at - n as u64;
        file.seek(std::io::SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        let chunk = &buf[..n];
        let mut end = n;
        while let Some(i) = memchr::memrchr(b'#', &chunk[..end]) {
            let line_start = i == 0 && start == 0 || i > 0 && chunk[i - 1] == b'\n';
            if line_start && chunk.get(i + 1) == Some(&b'\n') {
                return Ok(start + i as u64 + 2);
            }
            end = i;
        }
        if start == 0 {
            break;
        }
        at = start + 2;
    }
    Ok(0)
}

/// A request as live lines, `offset_after(i)` giving line `i`'s position.
fn lines_of(request: Request, offset_after: impl Fn(usize) -> u64) -> Vec<LiveLine> {
    let received = request.received;
    request
        .events
        .into_iter()
        .enumerate()
        .map(|(i, text)| LiveLine {
            text,
            offset: offset_after(i),
            place: Some(Place { received, index: i as u32 }),
        })
        .collect()
}

/// Sends the log's lines in `[offset, end)` (the log as it was opened).
fn replay(files: &[(u64, PathBuf)], offset: u64, end: u64, tx: &SyncSender<std::io::Result<Vec<LiveLine>>>) -> std::io::Result<()> {
    let mut at = offset;
    for (start, path) in files {
        let mut file = std::fs::File::open(path)?;
        if at > *start {
            file.seek(std::io::SeekFrom::Start(at - start))?;
        }
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut batch = Vec::with_capacity(1024);
        loop {
            if at >= end {
                break;
            }
            let mut line = Vec::new();
            let n = input.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            at += n as u64;
            if line == COMMIT {
                continue;
            }
            batch.push(parse_log_line(line, at).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: a line before offset {at} is not a request log line", path.display()),
                )
            })?);
            if batch.len() == 1024 && tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                return Ok(());
            }
        }
        if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `RECEIVED INDEX EVENT\n` back into a line.
fn parse_log_line(mut line: Vec<u8>, offset: u64) -> Option<LiveLine> {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let first = memchr::memchr(b' ', &line)?;
    let second = first + 1 + memchr::memchr(b' ', &line[first + 1..])?;
    let received = std::str::from_utf8(&line[..first]).ok()?.parse().ok()?;
    let index = std::str::from_utf8(&line[first + 1..second]).ok()?.parse().ok()?;
    line.drain(..second + 1);
    Some(LiveLine {
        text: line,
        offset,
        place: Some(Place { received, index }),
    })
}

/// The log's writer thread (see the module docs).
struct Writer {
    segments: Arc<Mutex<Segments>>,
    file: std::fs::File,
    /// The current segment's first offset and length.
    start: u64,
    len: u64,
    live: SyncSender<std::io::Result<Vec<LiveLine>>>,
    compact_before: Arc<AtomicU64>,
    compacted: u64,
    /// A segment is closed past this size.
    segment: u64,
}

impl Writer {
    fn run(&mut self, queue: Receiver<Pending>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Ok(first) = queue.recv() {
            let group: Vec<Pending> = std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())).collect();
            buf.clear();
            let mut lines = Vec::with_capacity(group.len());
            let mut dones = Vec::with_capacity(group.len());
            let base = self.start + self.len;
            for Pending { request, done } in group {
                let mut offsets = Vec::with_capacity(request.events.len());
                for (i, event) in request.events.iter().enumerate() {
                    write!(buf, "{} {i} ", request.received).expect("to memory");
                    buf.extend_from_slice(event);
                    buf.push(b'\n');
                    offsets.push(base + buf.len() as u64);
                }
                lines.push(lines_of(request, |i| offsets[i]));
                dones.push(done);
            }
            buf.extend_from_slice(COMMIT);
            let written = self.file.write_all(&buf).and_then(|_| self.file.sync_data());
            if let Err(e) = written {
                // Nothing of this group is answered as taken; the log is
                // cut back to where it was so a retry appends cleanly.
                let error = format!("{}: {e}", self.segments.lock().expect("not poisoned").path(self.start).display());
                tracing::error!("cannot write the request log: {error}");
                let cut = self.file.set_len(self.len);
                for done in dones {
                    let _ = done.send(Err(error.clone()));
                }
                if let Err(e) = cut {
                    // Later offsets would be wrong: take no more requests.
                    tracing::error!("cannot cut the request log back after a failed write ({e}); HTTP input stops");
                    return;
                }
                continue;
            }
            self.len += buf.len() as u64;
            if self.len >= self.segment {
                self.roll();
            }
            // Before the answers, so that a request answered after a
            // checkpoint was recorded finds the log compacted behind it.
            self.compact();
            for done in dones {
                let _ = done.send(Ok(()));
            }
            for batch in lines {
                if self.live.send(Ok(batch)).is_err() {
                    return; // the reader is gone: the run is over
                }
            }
        }
    }

    /// Starts a new segment at the current end.
    fn roll(&mut self) {
        let start = self.start + self.len;
        let mut segments = self.segments.lock().expect("not poisoned");
        let path = segments.path(start);
        match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => {
                self.file = file;
                self.start = start;
                self.len = 0;
                segments.starts.push(start);
                if let Ok(dir) = std::fs::File::open(&segments.dir) {
                    let _ = dir.sync_all();
                }
            }
            Err(e) => tracing::warn!("cannot start a new request log segment {}: {e}", path.display()),
        }
    }

    /// Deletes segments wholly before the compaction offset.
    fn compact(&mut self) {
        let before = self.compact_before.load(Ordering::SeqCst);
        if before <= self.compacted {
            return;
        }
        self.compacted = before;
        let mut segments = self.segments.lock().expect("not poisoned");
        while segments.starts.len() > 1 && segments.starts[1] <= before {
            let path = segments.path(segments.starts[0]);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot delete {}: {e}", path.display());
                break;
            }
            segments.starts.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(received: u64, events: &[&str]) -> Request {
        Request {
            received,
            events: events.iter().map(|e| e.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn a_closed_intake_refuses_requests() {
        let dir = tempfile::tempdir().unwrap();
        for intake in [Intake::memory(), Intake::durable(dir.path()).unwrap()] {
            assert!(intake.submit(request(1, &["{}"])).is_ok());
            intake.close();
            assert!(matches!(intake.submit(request(2, &["{}"])), Err(Refused::Closed)));
        }
    }

    /// Submits and waits until durable.
    fn take(intake: &Intake, r: Request) {
        intake.submit(r).unwrap().blocking_recv().unwrap().unwrap();
    }

    fn next_lines(rx: &Receiver<std::io::Result<Vec<LiveLine>>>, n: usize) -> Vec<LiveLine> {
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(rx.recv_timeout(std::time::Duration::from_secs(10)).expect("lines").unwrap());
        }
        got
    }

    #[test]
    fn the_log_is_replayed_from_an_offset_after_a_restart_with_its_torn_tail_cut() {
        let dir = tempfile::tempdir().unwrap();
        let offsets: Vec<u64> = {
            let intake = Intake::durable(dir.path()).unwrap();
            take(&intake, request(1000, &[r#"{"a":1}"#, r#"{"a":2}"#]));
            take(&intake, request(2000, &[r#"{"a":3}"#]));
            let lines = next_lines(&intake.lines_from(0).unwrap(), 3);
            assert_eq!(lines[1].text, br#"{"a":2}"#);
            assert_eq!(lines[1].place, Some(Place { received: 1000, index: 1 }));
            assert_eq!(lines[2].place, Some(Place { received: 2000, index: 0 }));
            lines.iter().map(|l| l.offset).collect()
        };
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        // A crash in the middle of a group's write leaves complete lines of
        // a request never answered, and a torn one.
        let log = segment_path(dir.path(), 0);
        let committed = std::fs::metadata(&log).unwrap().len();
        assert_eq!(committed, offsets[2] + 2, "each group ends with its `#` line");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"3000 0 {\"a\":9}\n3000 1 {\"a\"")
            .unwrap();
        let intake = Intake::durable(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), committed, "the unanswered group is cut off");
        assert!(
            matches!(intake.lines_from(committed + 1), Err(Error::Changed(_))),
            "past the end is refused"
        );
        let rx = intake.lines_from(offsets[0]).unwrap();
        take(&intake, request(4000, &[r#"{"a":4}"#]));
        let lines = next_lines(&rx, 3);
        let texts: Vec<&[u8]> = lines.iter().map(|l| l.text.as_slice()).collect();
        assert_eq!(
            texts,
            [&br#"{"a":2}"#[..], br#"{"a":3}"#, br#"{"a":4}"#],
            "replayed from the offset, then live"
        );
        assert_eq!(lines[1].offset, offsets[2]);
        assert!(lines[2].offset > offsets[2]);
    }

    #[test]
    fn segments_behind_the_checkpoint_before_the_newest_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let intake = Intake::durable_in_segments(dir.path(), 64).unwrap();
        let rx = intake.lines_from(0).unwrap();
        for i in 0..8 {
            take(
                &intake,
                request(i, &[r#"{"event":"some padding to fill a segment of sixty-four bytes or more"}"#]),
            );
        }
        let lines = next_lines(&rx, 8);
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files(), 9, "a segment per request, and an empty one to go on");
        take(&intake, request(8, &["{}"]));
        assert_eq!(files(), 9, "nothing goes before a checkpoint says so");
        intake.compact_before(lines[5].offset);
        take(&intake, request(9, &["{}"]));
        // Segments wholly before line 5's end go: those of lines 0 to 4
        // (line 5's segment also holds its group's `#`, after the offset).
        assert_eq!(files(), 9 - 5);
        assert!(intake.lines_from(0).is_err(), "the reader's end is taken once");
        drop(intake);
        let reopened = Intake::durable(dir.path()).unwrap();
        assert!(matches!(reopened.lines_from(0), Err(Error::Changed(_))), "offset 0 is gone");
        let replayed = next_lines(&reopened.lines_from(lines[5].offset).unwrap(), 4);
        assert_eq!(replayed[0].text, lines[6].text);
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        let intake = Intake::memory();
        let mut refused = false;
        for i in 0..QUEUE + 1 {
            match intake.submit(request(i as u64, &["{}"])) {
                Ok(_) => {}
                Err(Refused::Busy) => {
                    refused = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused, "nobody reads: the queue fills and refuses");
    }
}
