//! Checkpoints: what a run needs to go on after a crash, written atomically.
//!
//! A differential dataflow is a function of its input collections, so a
//! checkpoint does not copy the dataflow's arrangements: it keeps the
//! *inputs* each reader fed, consolidated, and the few pieces of state that
//! are not a function of the inputs at one tick. At a checkpoint with
//! delivered frontier `C` (every tick before it is out), each reader's log
//! of updates is compacted: updates before `C` move to the last delivered
//! tick `L = C - tick` and consolidate, and windowed facts whose expiry is
//! at or before `L` are dropped (the window operator would have retracted
//! them by then). Updates at `C` or later keep their ticks. A restarted run
//! feeds these updates into a fresh dataflow, so every collection at every
//! tick from `L` on equals the original's; the sink suppresses ticks before
//! `C`, and the diffs from `C` on are the original's, line for line.
//!
//! Besides the input logs a reader's checkpoint holds its sequential state:
//! the clock, the dedupe memory, the identity ticks, the lifetime "latest
//! value" winners, the dead letters sent but not yet written, and its input
//! position (source, byte offset and line number of file input; next offset
//! per Kafka partition). The snapshot also holds the output positions at `C`
//! (the byte lengths of the output and dead-letter files, so a restart cuts
//! them back and continues: exactly once), and the clusterings' models and
//! the predictive models' state as of `L` (a clustering's numbering depends
//! on the models before it, and a predictive model's next fit on features
//! set aside at `r - horizon`: neither can the inputs at one tick tell).
//!
//! On disk a checkpoint is `ckpt-<seq>.shoal`: an 8-byte magic, the format
//! version, the payload's length and its xxh3-64 checksum, then the payload
//! in postcard (serde; see docs/decisions.md "Checkpoints" for the encodings
//! measured). It is written to a temporary file, fsynced, renamed into place
//! and the directory fsynced; the newest [`KEEP`] are kept. On start the
//! newest one that is whole and checksums is used; a corrupt or truncated
//! one is reported and skipped; one written by another version, spec or
//! clock options is refused, naming what differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::fact::{Fact, Pay};
use crate::core::id::StreamId;
use crate::core::id::{Key, Label};
use crate::ingest::stamp::{IdentityState, IngestState};
use crate::io::Position;
use crate::output::sink::Mark;

/// The on-disk format; a checkpoint of another format is refused.
pub const FORMAT: u32 = 4;
const MAGIC: &[u8; 8] = b"SHOALCKP";
const HEADER: usize = 8 + 4 + 8 + 8;
/// Checkpoints kept in the directory (the newest first).
pub const KEEP: usize = 3;

/// What a checkpoint must agree with to be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// shoal's version.
    pub version: String,
    /// A digest of the compiled spec.
    pub spec: u64,
    pub tick: u64,
    pub lateness: u64,
    pub dedupe_horizon: u64,
    pub until: Option<u64>,
    /// The inputs, in order (file names, or Kafka topics).
    pub inputs: Vec<String>,
    /// Readers: 1 for line input, the number of workers for Kafka.
    pub readers: usize,
}

impl Fingerprint {
    /// What differs from `other`, in words, or `None`.
    pub fn differs(&self, other: &Fingerprint) -> Option<String> {
        let mut what = Vec::new();
        if self.version != other.version {
            what.push(format!("shoal version ({} here {})", self.version, other.version));
        }
        if self.spec != other.spec {
            what.push("spec".to_string());
        }
        if (self.tick, self.lateness, self.dedupe_horizon, self.until) != (other.tick, other.lateness, other.dedupe_horizon, other.until) {
            what.push("--tick, --lateness, --dedupe-horizon or --until".to_string());
        }
        if self.inputs != other.inputs {
            what.push(format!("input ({:?}, here {:?})", self.inputs, other.inputs));
        }
        if self.readers != other.readers {
            what.push(format!("number of readers ({}, here {})", self.readers, other.readers));
        }
        (!what.is_empty()).then(|| what.join(", "))
    }
}

/// One reader's part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderState {
    pub worker: usize,
    pub ingest: IngestState,
    pub identities: IdentityState,
    pub winners: Vec<((Key, StreamId), (u64, Pay))>,
    pub facts: Vec<(Fact, u64, isize)>,
    pub nodes: Vec<((Key, Label), u64, isize)>,
    pub links: Vec<((Key, Key), u64, isize)>,
    /// Ids forgotten and pairs unlinked over the API (the reader that fed
    /// them: worker 0's).
    pub forgotten: Vec<(Key, u64, isize)>,
    pub unlinked: Vec<((Key, Key), u64, isize)>,
    /// Accepted events fed to the served model at or after the frontier.
    pub events: Vec<((Key, crate::ingest::event::Kept), u64, isize)>,
    /// Dead letters sent but not yet written, in order.
    pub dead: Vec<String>,
    /// Dead letters sent so far.
    pub dead_sent: u64,
    pub position: Position,
}

/// A reader's part of a cluster checkpoint that its own process wrote:
/// the file beside the checkpoint that holds its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    pub worker: usize,
    /// The round it was written for: once no checkpoint kept is that
    /// recent, an unreferenced part is removed.
    pub seq: u64,
    pub file: String,
    /// The payload's xxh3-64, as in the part's header.
    pub sum: u64,
    /// The frontier its state is compacted at (a restart compacts it at
    /// the checkpoint's, as for a stopped reader's state).
    pub taken: u64,
    /// Its reader stopped reading: the part serves every later round.
    pub last: bool,
}

/// A reader's part in a round: its state (a reader of this process), or
/// the file another process wrote it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    State(Box<ReaderState>),
    File(PartRef),
}

/// The head of a snapshot: what names its parts.
#[derive(Deserialize)]
struct Head {
    _fingerprint: Fingerprint,
    _seq: u64,
    parts: Vec<PartRef>,
}

/// A whole checkpoint. The fields up to `parts` are its head, which
/// [`Store`] reads alone to know which parts are still needed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub fingerprint: Fingerprint,
    pub seq: u64,
    /// The readers of other processes (cluster runs), each in its file.
    pub parts: Vec<PartRef>,
    pub mark: Mark,
    pub readers: Vec<ReaderState>,
    /// Per clustering of the plan: its model as of the last delivered tick.
    pub clusters: Vec<Option<crate::dataflow::cluster::KMeans>>,
    /// Per model of the plan: its fit, the features set aside for the
    /// refreshes to come and the last examples, as of the last delivered tick.
    pub models: Vec<Option<crate::dataflow::model::ModelState>>,
    /// Serving with `--history`: the accepted events the served model kept,
    /// `(anchor, effect tick, event)`, of ticks before the frontier (the
    /// readers' logs hold those after it), so that segments defined at run
    /// time over them come back complete.
    /// `None` when the run kept no events (not serving, or `--history 0`).
    pub kept: Option<Vec<(Key, u64, crate::ingest::event::Kept)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The directory cannot be used, or a write failed.
    #[error("checkpoint directory {dir}: {what}: {error}")]
    Io { dir: String, what: String, error: std::io::Error },
    /// A checkpoint that is whole but made for something else.
    #[error("{0}")]
    Refused(String),
}

/// Why bytes are not a checkpoint.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Corrupt(pub String);

/// The bytes of a checkpoint file.
pub fn encode(snap: &Snapshot) -> Vec<u8> {
    framed(&postcard::to_stdvec(snap).expect("a snapshot serializes"))
}

/// The payload in its frame: magic, format, length, checksum.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a checkpoint file's bytes: the format, then the length, then the
/// checksum, then the payload.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, Corrupt> {
    let (payload, _) = unframed(bytes)?;
    postcard::from_bytes(payload).map_err(|e| Corrupt(format!("undecodable: {e}")))
}

/// The format a frame's header names, when it has a header.
fn format_of(bytes: &[u8]) -> Option<u32> {
    (bytes.len() >= HEADER && &bytes[..8] == MAGIC).then(|| u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")))
}

/// The payload of a whole frame, and its checksum.
fn unframed(bytes: &[u8]) -> Result<(&[u8], u64), Corrupt> {
    let Some(format) = format_of(bytes) else {
        return Err(Corrupt("not a shoal checkpoint (no header)".into()));
    };
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    if format != FORMAT {
        return Err(Corrupt(format!("format {format}, this shoal reads format {FORMAT}")));
    }
    let (len, sum) = (word(12), word(20));
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(Corrupt(format!("truncated: {} of {len} bytes", payload.len())));
    }
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        return Err(Corrupt("checksum mismatch".into()));
    }
    Ok((payload, sum))
}

/// A directory of checkpoints.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) `dir` and checks that a file can be written in it.
    pub fn open(dir: &Path) -> Result<Store, CheckpointError> {
        let store = Store { dir: dir.to_path_buf() };
        std::fs::create_dir_all(dir).map_err(|e| store.io("cannot create it", e))?;
        // Temporary files of writes a crash interrupted.
        for entry in std::fs::read_dir(dir).map_err(|e| store.io("cannot list it", e))?.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| (n.starts_with(".ckpt-") || n.starts_with(".part-")) && n.ends_with(".tmp"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"").map_err(|e| store.io("cannot write in it", e))?;
        let _ = std::fs::remove_file(probe);
        Ok(store)
    }

    fn io(&self, what: &str, error: std::io::Error) -> CheckpointError {
        CheckpointError::Io {
            dir: self.dir.display().to_string(),
            what: what.to_string(),
            error,
        }
    }

    /// The checkpoint files, newest first.
    pub fn files(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| self.io("cannot list it", e))? {
            let path = entry.map_err(|e| self.io("cannot list it", e))?.path();
            let seq = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("ckpt-")?.strip_suffix(".shoal")?.parse::<u64>().ok());
            if let Some(seq) = seq {
                files.push((seq, path));
            }
        }
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(files)
    }

    /// The newest usable checkpoint. Corrupt ones are reported (through
    /// `warn`) and skipped; a whole one made for another spec, version,
    /// format or options is refused.
    pub fn latest(&self, fingerprint: &Fingerprint, mut warn: impl FnMut(String)) -> Result<Option<Snapshot>, CheckpointError> {
        for (_, path) in self.files()? {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    warn(format!("cannot read checkpoint {}: {e}; trying an older one", path.display()));
                    continue;
                }
            };
            // Torn or damaged, an older checkpoint stands in for it; whole
            // but of another format, or passing its checksum and not
            // decoding, another shoal wrote it: refused.
            let foreign = |why: String| {
                CheckpointError::Refused(format!(
                    "checkpoint {} cannot be read: {why}; run the shoal that made it, or give another \
                     --state directory (or empty this one) to start over",
                    path.display()
                ))
            };
            let snap = match unframed(&bytes) {
                Ok((payload, _)) => postcard::from_bytes::<Snapshot>(payload)
                    .map_err(|e| foreign(format!("it is whole but does not decode ({e}): another version of shoal wrote it")))?,
                Err(Corrupt(why)) => match format_of(&bytes).filter(|f| *f != FORMAT) {
                    Some(f) => return Err(foreign(format!("it has format {f}, and this shoal reads format {FORMAT}"))),
                    None => {
                        warn(format!("checkpoint {} is unusable ({why}); trying an older one", path.display()));
                        continue;
                    }
                },
            };
            if let Some(what) = snap.fingerprint.differs(fingerprint) {
                return Err(CheckpointError::Refused(format!(
                    "checkpoint {} was made for a different {what}; run with what it was made for, \
                     or give another --state directory (or empty this one) to start over",
                    path.display()
                )));
            }
            // Every process of a cluster makes this same choice.
            match snap.parts.iter().try_for_each(|p| self.check_part(p)) {
                Ok(()) => return Ok(Some(snap)),
                Err(Corrupt(why)) => warn(format!("checkpoint {} is unusable ({why}); trying an older one", path.display())),
            }
        }
        Ok(None)
    }

    /// The number the next checkpoint takes: after every one in the
    /// directory, usable or not (the newest [`KEEP`] by number are kept, so
    /// a lower one would be removed as soon as written).
    pub fn next_seq(&self, restored: Option<u64>) -> Result<u64, CheckpointError> {
        let newest = self.files()?.first().map(|f| f.0);
        Ok(newest.max(restored).map_or(1, |s| s + 1))
    }

    /// Writes `snap` atomically (temporary file, fsync, rename, fsync of
    /// the directory) and removes all but the newest [`KEEP`]. On failure
    /// the temporary file is removed and earlier checkpoints stay. Parts
    /// no kept checkpoint needs are removed too.
    pub fn write(&self, snap: &Snapshot) -> Result<PathBuf, CheckpointError> {
        let bytes = encode(snap);
        let path = self.dir.join(format!("ckpt-{:012}.shoal", snap.seq));
        let tmp = self.dir.join(format!(".ckpt-{:012}.tmp", snap.seq));
        if let Err(e) = crate::io::write_atomically(&tmp, &path, &bytes, false) {
            return Err(self.io(&format!("cannot write checkpoint {}", path.display()), e));
        }
        let files = self.files()?;
        for (_, old) in files.iter().skip(KEEP) {
            let _ = std::fs::remove_file(old);
        }
        self.remove_parts(&files[..files.len().min(KEEP)]);
        Ok(path)
    }

    /// Writes a reader's state as a part (cluster runs, a process other
    /// than 0), named by its round, reader and checksum: one name is
    /// always the same bytes.
    pub fn write_part(&self, seq: u64, taken: u64, last: bool, st: &ReaderState) -> Result<PartRef, CheckpointError> {
        let payload = postcard::to_stdvec(st).expect("a reader's state serializes");
        let sum = xxhash_rust::xxh3::xxh3_64(&payload);
        let file = format!("part-{seq:012}-w{}-{sum:016x}.shoal", st.worker);
        let (path, tmp) = (self.dir.join(&file), self.dir.join(format!(".{file}.tmp")));
        if let Err(e) = crate::io::write_atomically(&tmp, &path, &framed(&payload), false) {
            return Err(self.io(&format!("cannot write checkpoint part {}", path.display()), e));
        }
        Ok(PartRef {
            worker: st.worker,
            seq,
            file,
            sum,
            taken,
            last,
        })
    }

    /// Whether `part` is there, whole, and the one named.
    pub(crate) fn check_part(&self, part: &PartRef) -> Result<(), Corrupt> {
        self.part_payload(part, |_| Ok(()))
    }

    /// The state in `part`, checked.
    pub fn read_part(&self, part: &PartRef) -> Result<ReaderState, Corrupt> {
        self.part_payload(part, |payload| {
            postcard::from_bytes(payload).map_err(|e| Corrupt(format!("undecodable: {e}")))
        })
    }

    fn part_payload<T>(&self, part: &PartRef, f: impl FnOnce(&[u8]) -> Result<T, Corrupt>) -> Result<T, Corrupt> {
        let path = self.dir.join(&part.file);
        let why = |w: String| Corrupt(format!("its part {}: {w}", path.display()));
        let bytes = std::fs::read(&path).map_err(|e| why(e.to_string()))?;
        let (payload, sum) = unframed(&bytes).map_err(|Corrupt(w)| why(w))?;
        if sum != part.sum {
            return Err(why("not the one it names".into()));
        }
        f(payload).map_err(|Corrupt(w)| why(w))
    }

    /// Removes the parts that no kept checkpoint (`kept`) names and that
    /// are older than all of them (a newer part may be waiting for its
    /// round's checkpoint).
    fn remove_parts(&self, kept: &[(u64, PathBuf)]) {
        let Some(oldest) = kept.iter().map(|k| k.0).min() else { return };
        let mut named = std::collections::HashSet::new();
        for (_, path) in kept {
            match Self::head(path) {
                Some(parts) => named.extend(parts.into_iter().map(|p| p.file)),
                // A checkpoint whose head cannot be read may name any part.
                None => return,
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let seq = name.strip_prefix("part-").and_then(|n| n.get(..12)?.parse::<u64>().ok());
            if seq.is_some_and(|s| s < oldest) && !named.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The parts a checkpoint names, from its head alone.
    fn head(path: &Path) -> Option<Vec<PartRef>> {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::fs::File::open(path).ok()?.take(1 << 20).read_to_end(&mut bytes).ok()?;
        let payload = bytes.get(HEADER..)?;
        postcard::take_from_bytes::<Head>(payload).ok().map(|(h, _)| h.parts)
    }
}

/// A reader's log of the updates it fed one input, compacted at each
/// checkpoint (see the module docs).
#[derive(Clone, Debug)]
pub struct Log<D> {
    pub updates: Vec<(D, u64, isize)>,
}

impl<D> Default for Log<D> {
    fn default() -> Self {
        Log { updates: Vec::new() }
    }
}

impl<D: Ord + Clone> Log<D> {
    pub fn push(&mut self, d: D, t: u64, r: isize) {
        self.updates.push((d, t, r));
    }

    /// Moves updates before `frontier` to `frontier - tick`, drops those
    /// `gone` says are gone by then, and consolidates.
    pub fn compact(&mut self, frontier: u64, tick: u64, gone: impl Fn(&D, u64) -> bool) {
        compact(&mut self.updates, frontier, tick, gone);
    }
}

/// See [`Log::compact`].
pub fn compact<D: Ord + Clone>(updates: &mut Vec<(D, u64, isize)>, frontier: u64, tick: u64, gone: impl Fn(&D, u64) -> bool) {
    let last = frontier.saturating_sub(tick);
    for (_, t, _) in updates.iter_mut() {
        if *t < frontier {
            *t = last;
        }
    }
    differential_dataflow::consolidation::consolidate_updates(updates);
    updates.retain(|(d, t, _)| *t >= frontier || !gone(d, last));
}

/// Whether a windowed fact is gone at tick `last`: its expiry tick has
/// passed (`windows` by stream; `None` is lifetime).
pub fn expired(fact: &Fact, last: u64, windows: &[Option<u64>], tick: u64) -> bool {
    let (_, stream, e, _) = fact;
    windows[stream.index()].is_some_and(|w| crate::core::clock::tick_of(e.saturating_add(w), tick) <= last)
}

/// How many of the `sent` dead letters of the reader on `worker` a mark
/// that counts `written` (dead letters written, by reader) has not
/// written: the last ones sent.
pub fn unwritten(worker: usize, sent: u64, written: &BTreeMap<usize, u64>) -> usize {
    sent.saturating_sub(written.get(&worker).copied().unwrap_or(0)) as usize
}

impl ReaderState {
    /// Keeps only the dead letters not yet written as of a checkpoint that
    /// counts `written` of this reader's.
    pub fn unwritten(&mut self, written: &BTreeMap<usize, u64>) {
        let extra = self.dead.len().saturating_sub(unwritten(self.worker, self.dead_sent, written));
        self.dead.drain(..extra);
    }

    /// Compacts the logs at `frontier` (see [`Log::compact`]).
    pub fn compact(&mut self, frontier: u64, tick: u64, windows: &[Option<u64>]) {
        compact(&mut self.facts, frontier, tick, |f, last| expired(f, last, windows, tick));
        compact(&mut self.nodes, frontier, tick, |_, _| false);
        compact(&mut self.links, frontier, tick, |_, _| false);
        compact(&mut self.forgotten, frontier, tick, |_, _| false);
        compact(&mut self.unlinked, frontier, tick, |_, _| false);
        self.events.retain(|(_, t, _)| *t >= frontier);
    }
}

/// A checkpoint of several readers (Kafka) gathered at one delivered
/// frontier. A round opens at a [`Mark`]; each reader gives its state at
/// the mark's frontier when it next comes by; a reader that stops reading
/// gives its final state once, and that state stands in for it in every
/// later round. The round is written once every reader is in.
///
/// A stopped reader's state is compacted once, at the frontier it was
/// taken at, and a compaction cannot be undone (updates before it have
/// moved to one tick). So that state may serve only rounds at that frontier
/// or later: [`Rounds::final_frontier`] takes it no later than the open
/// round, and later rounds open at later marks.
#[derive(Debug)]
pub struct Rounds<S> {
    readers: usize,
    open: Option<(Mark, BTreeMap<usize, S>)>,
    /// Stopped readers: the frontier their final state was taken at, and it.
    stopped: BTreeMap<usize, (u64, S)>,
}

impl<S> Rounds<S> {
    pub fn new(readers: usize) -> Rounds<S> {
        Rounds {
            readers,
            open: None,
            stopped: BTreeMap::new(),
        }
    }

    /// Closes the open round without a checkpoint (a part of it could not
    /// be written).
    pub fn give_up(&mut self) {
        self.open = None;
    }

    /// Whether a round is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Opens a round at `mark` unless one is open, or a stopped reader's
    /// state was taken past it; returns whether it did.
    pub fn open(&mut self, mark: Mark) -> bool {
        if self.open.is_some() || self.stopped.values().any(|(taken, _)| *taken > mark.frontier) {
            return false;
        }
        self.open = Some((mark, BTreeMap::new()));
        true
    }

    /// The frontier at which `reader` owes the open round its state.
    pub fn owed_by(&self, reader: usize) -> Option<u64> {
        match &self.open {
            Some((mark, states)) if !states.contains_key(&reader) => Some(mark.frontier),
            _ => None,
        }
    }

    /// The open round's mark.
    pub fn mark(&self) -> Option<&Mark> {
        self.open.as_ref().map(|(mark, _)| mark)
    }

    /// Takes `reader`'s state for the open round.
    pub fn give(&mut self, reader: usize, st: S) {
        if let Some((_, states)) = &mut self.open {
            states.insert(reader, st);
        }
    }

    /// The frontier a stopping reader takes its final state at: `frontier`
    /// (the delivered mark's, or the reader's own if behind), but no later
    /// than the open round's.
    pub fn final_frontier(&self, frontier: u64) -> u64 {
        self.open.as_ref().map_or(frontier, |(mark, _)| frontier.min(mark.frontier))
    }

    /// Keeps a stopped reader's final state, taken at `frontier`; returns
    /// whether every reader has now stopped.
    pub fn stop(&mut self, reader: usize, frontier: u64, st: S) -> bool {
        self.stopped.insert(reader, (frontier, st));
        self.stopped.len() == self.readers
    }

    /// The open round, once every reader is in: its mark and the states,
    /// stopped readers' compacted at its frontier by `compact`.
    pub fn complete(&mut self, compact: impl Fn(&S, u64) -> S) -> Option<(Mark, Vec<S>)> {
        let (_, states) = self.open.as_ref()?;
        let missing = self.stopped.keys().filter(|w| !states.contains_key(w)).count();
        if states.len() + missing < self.readers {
            return None;
        }
        let (mark, mut states) = self.open.take().expect("open");
        let states = self.with_stopped(&mark, &mut states, compact)?;
        Some((mark, states))
    }

    /// Every reader stopped: their final states at `mark`.
    pub fn finals(&self, mark: &Mark, compact: impl Fn(&S, u64) -> S) -> Option<Vec<S>> {
        self.with_stopped(mark, &mut BTreeMap::new(), compact)
    }

    fn with_stopped(&self, mark: &Mark, states: &mut BTreeMap<usize, S>, compact: impl Fn(&S, u64) -> S) -> Option<Vec<S>> {
        for (w, (taken, st)) in &self.stopped {
            if states.contains_key(w) {
                continue;
            }
            if *taken > mark.frontier {
                // Cannot happen (see the type's docs); were it to, the round
                // would resume with that reader's updates moved: skip it.
                tracing::error!(
                    reader = w,
                    taken,
                    frontier = mark.frontier,
                    "a stopped reader's state is past the round; round skipped"
                );
                return None;
            }
            states.insert(*w, compact(st, mark.frontier));
        }
        Some(std::mem::take(states).into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Position;
    use crate::output::sink::Mark;

    fn snapshot() -> Snapshot {
        Snapshot {
            parts: vec![],
            fingerprint: Fingerprint {
                version: "0".into(),
                spec: 7,
                tick: 1000,
                lateness: 0,
                dedupe_horizon: 0,
                until: None,
                inputs: vec!["a".into()],
                readers: 1,
            },
            seq: 3,
            mark: Mark::default(),
            readers: vec![ReaderState {
                worker: 0,
                ingest: IngestState::default(),
                identities: IdentityState::default(),
                winners: vec![],
                facts: vec![((1, StreamId(0), 5, Pay::Unit), 1000, 1)],
                nodes: vec![],
                links: vec![],
                forgotten: vec![],
                unlinked: vec![],
                events: vec![],
                dead: vec!["x".into()],
                dead_sent: 1,
                position: Position::Lines {
                    source: 0,
                    offset: 10,
                    line: 1,
                },
            }],
            clusters: vec![None],
            models: vec![None],
            kept: None,
        }
    }

    /// A reader's state with `facts` (stream 0, 10 s window) at ticks of 1 s.
    fn reader(worker: usize, facts: &[(u64, u64)]) -> ReaderState {
        let mut st = snapshot().readers.pop().unwrap();
        st.worker = worker;
        st.facts = facts.iter().map(|&(e, t)| ((1, StreamId(0), e, Pay::Unit), t, 1)).collect();
        st
    }

    const WINDOWS: [Option<u64>; 1] = [Some(10_000)];

    fn compacted(st: &ReaderState, frontier: u64) -> ReaderState {
        let mut st = st.clone();
        st.compact(frontier, 1000, &WINDOWS);
        st
    }

    fn mark(frontier: u64) -> Mark {
        Mark {
            frontier,
            ..Mark::default()
        }
    }

    /// CI failure (issue 25): a reader stopped while a round was open, took
    /// its final state at the newer delivered mark, and the open round wrote
    /// it there. Updates between the two frontiers had moved to one tick, so
    /// the run resumed from that round wrote other changes, and more.
    #[test]
    fn a_reader_that_stops_during_a_round_gives_its_state_at_the_rounds_frontier() {
        let full = reader(1, &[(4_000, 5_000), (14_000, 15_000), (21_000, 22_000)]);
        let mut rounds = Rounds::new(2);
        assert!(rounds.open(mark(10_000)));
        assert!(!rounds.open(mark(12_000)), "one round at a time");
        assert_eq!(rounds.owed_by(0), Some(10_000));
        // Reader 1 stops with the delivered mark at 20 s (its clock is later).
        let frontier = rounds.final_frontier(20_000);
        assert_eq!(frontier, 10_000);
        assert!(!rounds.stop(1, frontier, compacted(&full, frontier)));
        assert_eq!(rounds.complete(compacted), None, "reader 0 has not given its state");
        rounds.give(0, reader(0, &[]));
        assert_eq!(rounds.owed_by(0), None);
        let (m, states) = rounds.complete(compacted).expect("every reader is in");
        assert_eq!(m, mark(10_000));
        assert_eq!(states[1], compacted(&full, 10_000));
        assert!(states[1].facts.iter().any(|(_, t, _)| *t == 15_000), "{:?}", states[1].facts);
        // A later round uses the stopped state at its own frontier, as if taken there.
        assert!(rounds.open(mark(30_000)));
        rounds.give(0, reader(0, &[]));
        let (_, states) = rounds.complete(compacted).expect("every reader is in");
        assert_eq!(states[1], compacted(&full, 30_000));
        assert!(rounds.stop(0, 30_000, reader(0, &[])));
        assert_eq!(rounds.finals(&mark(40_000), compacted).unwrap()[1], compacted(&full, 40_000));
    }

    #[test]
    fn no_round_opens_before_a_stopped_readers_frontier() {
        let mut rounds = Rounds::new(2);
        rounds.stop(1, 20_000, reader(1, &[(14_000, 15_000)]));
        assert!(!rounds.open(mark(10_000)), "a mark read before reader 1 stopped");
        assert!(rounds.open(mark(20_000)));
    }

    #[test]
    fn a_round_never_uses_a_stopped_state_taken_past_its_frontier() {
        let mut rounds = Rounds::new(2);
        assert!(rounds.open(mark(10_000)));
        rounds.stop(1, 20_000, reader(1, &[(14_000, 15_000)]));
        rounds.give(0, reader(0, &[]));
        assert_eq!(rounds.complete(compacted), None);
        assert_eq!(rounds.finals(&mark(15_000), compacted), None);
    }

    /// A cluster checkpoint names its parts: a restart takes the newest
    /// one whose parts are all whole, and parts no kept checkpoint names
    /// (older than all of them) are removed.
    #[test]
    fn a_checkpoint_with_a_broken_part_gives_way_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let fp = snapshot().fingerprint;
        let mut seqs = Vec::new();
        for seq in 1..=5u64 {
            let part = store.write_part(seq, seq * 1000, false, &reader(2, &[(seq, seq * 1000)])).unwrap();
            assert_eq!(store.read_part(&part).unwrap(), reader(2, &[(seq, seq * 1000)]));
            let snap = Snapshot {
                seq,
                parts: vec![part.clone()],
                ..snapshot()
            };
            store.write(&snap).unwrap();
            seqs.push(part);
        }
        // Parts of the three checkpoints kept stay, the older ones go; a
        // part of a round still gathering (newer than every checkpoint)
        // stays too.
        let waiting = store.write_part(6, 6000, false, &reader(3, &[])).unwrap();
        store.write(&Snapshot { seq: 6, ..snapshot() }).unwrap();
        let parts = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with("part-"))
                .collect();
            v.sort();
            v
        };
        let mut want = vec![seqs[3].file.clone(), seqs[4].file.clone(), waiting.file.clone()];
        want.sort();
        assert_eq!(parts(dir.path()), want);
        assert_eq!(store.latest(&fp, |_| {}).unwrap().unwrap().seq, 6);
        std::fs::remove_file(dir.path().join("ckpt-000000000006.shoal")).unwrap();
        assert_eq!(store.latest(&fp, |_| {}).unwrap().unwrap().seq, 5);
        // A flipped byte in checkpoint 5's part: checkpoint 4 is taken, and
        // why is said.
        let path = dir.path().join(&seqs[4].file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let mut warned = Vec::new();
        assert_eq!(store.latest(&fp, |w| warned.push(w)).unwrap().unwrap().seq, 4);
        assert!(warned[0].contains(&seqs[4].file) && warned[0].contains("checksum"), "{warned:?}");
        std::fs::remove_file(dir.path().join(&seqs[3].file)).unwrap();
        assert_eq!(store.latest(&fp, |_| {}).unwrap(), None, "checkpoint 4's part is gone");
    }

    #[test]
    fn a_checkpoint_reads_back() {
        let snap = snapshot();
        assert_eq!(decode(&encode(&snap)), Ok(snap));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_detected() {
        let bytes = encode(&snapshot());
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "byte {i} flipped");
        }
    }

    #[test]
    fn the_store_keeps_the_newest_and_falls_back_past_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut snap = snapshot();
        for seq in 1..=5 {
            snap.seq = seq;
            store.write(&snap).unwrap();
        }
        let seqs: Vec<u64> = store.files().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![5, 4, 3]);
        let newest = store.files().unwrap()[0].1.clone();
        let len = std::fs::metadata(&newest).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let mut warnings = Vec::new();
        let got = store.latest(&snap.fingerprint, |w| warnings.push(w)).unwrap().unwrap();
        assert_eq!(got.seq, 4);
        assert!(warnings[0].contains("truncated"), "{warnings:?}");
    }

    #[test]
    fn a_checkpoint_of_another_spec_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let snap = snapshot();
        store.write(&snap).unwrap();
        let mut other = snap.fingerprint.clone();
        other.spec = 8;
        match store.latest(&other, |_| {}) {
            Err(CheckpointError::Refused(m)) => assert!(m.contains("a different spec"), "{m}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_whole_checkpoint_of_another_format_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut snap = snapshot();
        snap.seq = 1;
        store.write(&snap).unwrap();
        // Seq 2, whole, as another format writes it.
        snap.seq = 2;
        let mut bytes = encode(&snap);
        bytes[8..12].copy_from_slice(&(FORMAT + 1).to_le_bytes());
        std::fs::write(dir.path().join("ckpt-000000000002.shoal"), &bytes).unwrap();
        match store.latest(&snap.fingerprint, |_| {}) {
            Err(CheckpointError::Refused(m)) => assert!(m.contains("format") && m.contains("ckpt-000000000002"), "{m}"),
            other => panic!("not refused: {other:?}"),
        }
        // A whole frame whose payload is not a snapshot of this version.
        let framed = framed(b"\x07 not a snapshot");
        std::fs::write(dir.path().join("ckpt-000000000002.shoal"), framed).unwrap();
        match store.latest(&snap.fingerprint, |_| {}) {
            Err(CheckpointError::Refused(m)) => assert!(m.contains("another version"), "{m}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn numbering_goes_on_after_checkpoints_that_were_skipped() {
        // Three torn checkpoints numbered 5..7: a run starts over, and its
        // first checkpoint must not be numbered below them (the store keeps
        // the newest three by number and would remove it as it is written).
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut snap = snapshot();
        for seq in 5..=7 {
            snap.seq = seq;
            let path = store.write(&snap).unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
        }
        assert!(store.latest(&snap.fingerprint, |_| {}).unwrap().is_none());
        snap.seq = store.next_seq(None).unwrap();
        assert_eq!(snap.seq, 8);
        let path = store.write(&snap).unwrap();
        assert!(path.exists(), "the new checkpoint is kept");
        assert_eq!(store.latest(&snap.fingerprint, |_| {}).unwrap().unwrap().seq, 8);
        assert_eq!(store.next_seq(Some(8)).unwrap(), 9);
    }

    #[test]
    fn compaction_moves_old_updates_to_the_last_tick_and_drops_what_is_gone() {
        let mut log = Log::default();
        log.push(1u64, 1000, 1);
        log.push(1, 2000, 1);
        log.push(2, 1000, 1);
        log.push(2, 3000, -1);
        log.push(3, 5000, 1);
        log.compact(4000, 1000, |d, _| *d == 9);
        assert_eq!(log.updates, vec![(1, 3000, 2), (3, 5000, 1)], "2 nets to zero; 3 keeps its tick");
        log.push(9, 2000, 1);
        log.compact(6000, 1000, |d, _| *d == 9);
        assert_eq!(log.updates, vec![(1, 5000, 2), (3, 5000, 1)], "9 is gone");
    }
}
