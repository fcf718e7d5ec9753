//! Delivery: where lines go. [`Deliver`] is a file, a writer, memory or a
//! Kafka topic (in `crate::io::kafka`); an [`OpenOutput`] opens one on
//! worker 0, afresh or cut back to a checkpoint's length.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Why an output cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot write {path}: {error}")]
    File { path: String, error: std::io::Error },
    /// A file shorter than the checkpoint that resumes it says.
    #[error("cannot continue {path}: it is {len} bytes, shorter than the {want} bytes the checkpoint wrote (was it changed?)")]
    Shorter { path: String, len: u64, want: u64 },
    /// Another kind of output (Kafka) that failed to open.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Where lines go: a file, memory, or a Kafka topic.
pub trait Deliver {
    /// Queues one line; `key` is the profile id (Kafka's message key).
    fn send(&mut self, tick: u64, key: &str, line: &str) -> std::io::Result<()>;
    /// Called after the last line of a tick (Kafka hands the tick's lines
    /// to its producer here).
    fn end_tick(&mut self, _tick: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// Called when the sink has written all it can for now (the end of
    /// its activation), before it records the delivered frontier: files
    /// flush here, not per tick, which cost a write call per tick.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The earliest tick with lines sent but not yet acknowledged.
    fn unacknowledged(&mut self) -> Option<u64> {
        None
    }
    /// Bytes written so far, when the output is a file that a restart can
    /// cut back to this length (see `crate::run::checkpoint`).
    fn position(&self) -> Option<u64> {
        None
    }
    /// The file written to, if any (to fsync before a checkpoint).
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
}

/// Lines to a regular file: flushed whenever the sink has written what it
/// could, with the file's length known for checkpoints.
pub struct FileLines {
    out: std::io::BufWriter<std::fs::File>,
    len: u64,
}

impl FileLines {
    /// Continues `file`, which is `len` bytes long, at its end.
    pub fn new(file: std::fs::File, len: u64) -> FileLines {
        FileLines {
            out: std::io::BufWriter::with_capacity(1 << 16, file),
            len,
        }
    }
}

impl Deliver for FileLines {
    fn send(&mut self, _tick: u64, _key: &str, line: &str) -> std::io::Result<()> {
        self.len += line.len() as u64 + 1;
        writeln!(self.out, "{line}")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn position(&self) -> Option<u64> {
        Some(self.len)
    }

    fn file(&self) -> Option<&std::fs::File> {
        Some(self.out.get_ref())
    }
}

/// Lines to a writer, acknowledged once flushed.
pub struct WriteLines(pub Box<dyn Write>);

impl Deliver for WriteLines {
    fn send(&mut self, _tick: u64, _key: &str, line: &str) -> std::io::Result<()> {
        writeln!(self.0, "{line}")
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// One set of lines to several outputs (a file and webhooks): each gets
/// every line; a tick is acknowledged once all have it. The first output
/// that is a file is the one a checkpoint records, at its length *before*
/// the first unacknowledged tick: a restart cuts it back there and writes
/// those ticks again, with the changes the webhook is sent again.
pub struct Tee {
    outputs: Vec<Box<dyn Deliver>>,
    /// The file's length before each tick written since the first
    /// unacknowledged one.
    starts: std::collections::VecDeque<(u64, u64)>,
    /// The first unacknowledged tick, as last asked.
    unacked: Option<u64>,
}

impl Tee {
    pub fn new(outputs: Vec<Box<dyn Deliver>>) -> Tee {
        Tee {
            outputs,
            starts: Default::default(),
            unacked: None,
        }
    }

    fn file_position(&self) -> Option<u64> {
        self.outputs.iter().find_map(|d| d.position())
    }
}

impl Deliver for Tee {
    fn send(&mut self, tick: u64, key: &str, line: &str) -> std::io::Result<()> {
        if self.starts.back().map(|s| s.0) != Some(tick) {
            if let Some(p) = self.file_position() {
                self.starts.push_back((tick, p));
            }
        }
        self.outputs.iter_mut().try_for_each(|d| d.send(tick, key, line))
    }

    fn end_tick(&mut self, tick: u64) -> std::io::Result<()> {
        self.outputs.iter_mut().try_for_each(|d| d.end_tick(tick))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.outputs.iter_mut().try_for_each(|d| d.flush())
    }

    fn unacknowledged(&mut self) -> Option<u64> {
        let first = self.outputs.iter_mut().filter_map(|d| d.unacknowledged()).min();
        self.unacked = first;
        while self.starts.front().is_some_and(|s| first.is_none_or(|u| s.0 < u)) {
            self.starts.pop_front();
        }
        first
    }

    fn position(&self) -> Option<u64> {
        let now = self.file_position()?;
        Some(match self.unacked {
            Some(u) => self.starts.iter().find(|s| s.0 >= u).map_or(now, |s| s.1),
            None => now,
        })
    }

    fn file(&self) -> Option<&std::fs::File> {
        self.outputs.iter().find_map(|d| d.file())
    }
}

/// Several outputs opened as one [`Tee`] (one alone as itself).
pub fn tee_output(mut outputs: Vec<OpenOutput>) -> OpenOutput {
    if outputs.len() == 1 {
        return outputs.pop().expect("one");
    }
    Arc::new(move |resume| -> Result<Box<dyn Deliver>, OpenError> {
        Ok(Box::new(Tee::new(outputs.iter().map(|o| o(resume)).collect::<Result<_, _>>()?)))
    })
}

/// Opens an output on worker 0 (called once, inside the worker): afresh
/// with `None`, or continuing after a restart with `Some(length)`, the
/// length it had at the checkpoint.
pub type OpenOutput = Arc<dyn Fn(Option<u64>) -> Result<Box<dyn Deliver>, OpenError> + Send + Sync>;

/// An output that opens (creating or truncating) a file, or stdout for `-`.
/// Resuming, a regular file is cut back to the checkpoint's length and
/// continued (exactly once); anything else is continued (at least once).
pub fn file_output(path: PathBuf) -> OpenOutput {
    Arc::new(move |resume| -> Result<Box<dyn Deliver>, OpenError> {
        if path.as_os_str() == "-" {
            return Ok(Box::new(WriteLines(Box::new(std::io::BufWriter::new(std::io::stdout())))));
        }
        let cannot = |e: std::io::Error| OpenError::File {
            path: path.display().to_string(),
            error: e,
        };
        let f = match resume {
            None => std::fs::File::create(&path).map_err(cannot)?,
            Some(_) => std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(cannot)?,
        };
        let meta = f.metadata().map_err(cannot)?;
        if !meta.is_file() {
            return Ok(Box::new(WriteLines(Box::new(std::io::BufWriter::with_capacity(1 << 16, f)))));
        }
        let len = match resume {
            None => 0,
            Some(len) if meta.len() < len => {
                return Err(OpenError::Shorter {
                    path: path.display().to_string(),
                    len: meta.len(),
                    want: len,
                })
            }
            Some(len) => {
                f.set_len(len).map_err(cannot)?;
                len
            }
        };
        Ok(Box::new(FileLines::new(f, len)))
    })
}

/// Lines to this process's standard error, as it was given (appending to
/// a log opened with `2>>`, a pipe, the journal's socket): the default of
/// the dead letters. Not opened again by name: `/dev/stderr` opened as a
/// file would truncate a log, write at its own position over other lines,
/// and fail on a socket. Continued at least once when resuming.
pub fn stderr_output() -> OpenOutput {
    Arc::new(|_| Ok(Box::new(WriteLines(Box::new(std::io::BufWriter::new(std::io::stderr()))))))
}

/// An output collecting lines in memory (cut back like a file on resume).
pub fn memory_output(buf: Arc<Mutex<Vec<u8>>>) -> OpenOutput {
    struct Mem(Arc<Mutex<Vec<u8>>>);
    impl Deliver for Mem {
        fn send(&mut self, _tick: u64, _key: &str, line: &str) -> std::io::Result<()> {
            let mut b = self.0.lock().expect("not poisoned");
            b.extend_from_slice(line.as_bytes());
            b.push(b'\n');
            Ok(())
        }
        fn position(&self) -> Option<u64> {
            Some(self.0.lock().expect("not poisoned").len() as u64)
        }
    }
    Arc::new(move |resume| -> Result<Box<dyn Deliver>, OpenError> {
        let mut b = buf.lock().expect("not poisoned");
        match resume {
            Some(len) => b.truncate(len as usize),
            None => b.clear(),
        }
        Ok(Box::new(Mem(buf.clone())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledges what `acked` says.
    struct Slow(Arc<Mutex<Option<u64>>>);
    impl Deliver for Slow {
        fn send(&mut self, _tick: u64, _key: &str, _line: &str) -> std::io::Result<()> {
            Ok(())
        }
        fn unacknowledged(&mut self) -> Option<u64> {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn a_tee_records_the_file_as_of_the_first_unacknowledged_tick() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let waiting = Arc::new(Mutex::new(None));
        let mut tee = Tee::new(vec![memory_output(buf.clone())(None).unwrap(), Box::new(Slow(waiting.clone()))]);
        tee.send(1, "k", "a").unwrap();
        tee.send(2, "k", "bb").unwrap();
        tee.send(2, "k", "cc").unwrap();
        tee.send(3, "k", "d").unwrap();
        *waiting.lock().unwrap() = Some(2);
        assert_eq!(tee.unacknowledged(), Some(2));
        assert_eq!(tee.position(), Some(2), "the file before tick 2's lines");
        *waiting.lock().unwrap() = Some(3);
        assert_eq!(tee.unacknowledged(), Some(3));
        assert_eq!(tee.position(), Some(2 + 6));
        *waiting.lock().unwrap() = None;
        assert_eq!(tee.unacknowledged(), None);
        assert_eq!(tee.position(), Some(10), "all of it");
    }
}
