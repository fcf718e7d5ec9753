//! An append-only journal of JSON lines, each durable before
//! [`Journal::append`] returns: what the API changes at run time (segments
//! added, changed or removed; later, profiles forgotten and ids unlinked)
//! is written here before it takes effect, so a restart with `--state`
//! replays it.
//!
//! A crash can leave at most the last line torn (no closing newline): on
//! open it is cut off, as it was never acknowledged. A complete line that
//! does not parse is corruption and is reported with its line number rather
//! than skipped, since every later entry may depend on it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::io::Error;

/// An open journal, positioned at its end.
pub struct Journal {
    file: File,
    path: PathBuf,
    /// A failed append could not be cut back.
    broken: bool,
}

impl Journal {
    /// Opens (or creates) the journal at `path` and reads its entries.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Journal, Vec<T>), Error> {
        let what = || format!("open the journal {}", path.display());
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(Error::input(what))?;
        let mut entries = Vec::new();
        let mut whole = 0u64;
        let mut reader = BufReader::new(&mut file);
        // Bytes, not text: a torn end may split a character.
        let mut line = Vec::new();
        for number in 1.. {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(Error::input(|| format!("read the journal {}", path.display())))?;
            if n == 0 || !line.ends_with(b"\n") {
                break;
            }
            let entry = serde_json::from_slice(&line).map_err(|e| {
                Error::Changed(format!(
                    "the journal {} is damaged at line {number}: {e} (restore it, or remove it to start without the changes made at run time)",
                    path.display()
                ))
            })?;
            entries.push(entry);

            whole += n as u64;
        }
        drop(reader);
        if file.seek(SeekFrom::End(0)).map_err(Error::input(what))? != whole {
            // A torn last line: never acknowledged, so never applied.
            file.set_len(whole)
                .and_then(|()| file.sync_data())
                .map_err(Error::input(|| format!("cut the torn end of the journal {}", path.display())))?;
        }
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            broken: false,
        };
        Ok((journal, entries))
    }

    /// Appends `entry` as one line and waits until it is on disk. On a
    /// failure the journal is cut back to where it was, so that an entry
    /// refused is never replayed (if even that fails, the journal refuses
    /// every later entry rather than append after a partial line).
    pub fn append<T: Serialize>(&mut self, entry: &T) -> Result<(), Error> {
        let what = || format!("write the journal {}", self.path.display());
        if self.broken {
            return Err(Error::Changed(format!(
                "{}: an earlier write failed and could not be undone",
                what()
            )));
        }
        let mut line = serde_json::to_vec(entry).expect("journal entries serialize");
        line.push(b'\n');
        let before = self.file.metadata().map_err(Error::input(what))?.len();
        let written = self.file.write_all(&line).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            if self.file.set_len(before).and_then(|()| self.file.sync_data()).is_err() {
                self.broken = true;
            }
            return Err(Error::Input { what: what(), error: e });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_back_in_order_and_a_torn_end_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (mut j, none) = Journal::open::<(u64, String)>(&path).unwrap();
        assert!(none.is_empty());
        j.append(&(1u64, "a")).unwrap();
        j.append(&(2u64, "b")).unwrap();
        drop(j);
        // A crash in the middle of a third append.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"[3,\"c")
            .unwrap();
        let (mut j, back) = Journal::open::<(u64, String)>(&path).unwrap();
        assert_eq!(back, [(1, "a".to_string()), (2, "b".to_string())]);
        j.append(&(3u64, "c")).unwrap();
        let (_, back) = Journal::open::<(u64, String)>(&path).unwrap();
        assert_eq!(back.len(), 3, "appends after a cut continue the journal");
        assert_eq!(back[2], (3, "c".to_string()));
    }

    #[test]
    fn a_torn_end_inside_a_character_is_cut_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let (mut j, _) = Journal::open::<String>(&path).unwrap();
        j.append(&"é".to_string()).unwrap();
        drop(j);
        // The next entry torn in the middle of a two-byte character.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"\"\xc3")
            .unwrap();
        let (_, back) = Journal::open::<String>(&path).unwrap();
        assert_eq!(back, ["é"]);
        assert_eq!(std::fs::read(&path).unwrap(), "\"é\"\n".as_bytes());
    }

    #[test]
    fn a_damaged_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        std::fs::write(&path, "[1,\"a\"]\nnot json\n[2,\"b\"]\n").unwrap();
        let err = Journal::open::<(u64, String)>(&path).err().unwrap().to_string();
        assert!(err.contains("line 2") && err.contains("j.jsonl"), "{err}");
    }
}
