//! Where do usage events wait on disk? A journal: events one JSON object per line, fsynced,
//! read back a batch at a time from where the last read stopped. The usage writer keeps
//! what the store (or ledger) could not take in one; the NATS feed keeps its outbox in
//! another.

use crate::usage::UsageEvent;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Events the store has not taken yet, one JSON object per line, and how far replay got.
/// (The usage feed keeps its outbox in one too.)
pub(crate) struct Journal {
    path: PathBuf,
    /// Bytes already in the store (lost on restart, which replays them again: harmless,
    /// the store counts each event id once).
    read_from: u64,
}

impl Journal {
    pub(crate) fn new(path: PathBuf) -> Journal {
        Journal { path, read_from: 0 }
    }

    /// Where the next read starts, in bytes (0: nothing read since it was last emptied).
    pub(crate) fn read_from(&self) -> u64 {
        self.read_from
    }

    /// Marks everything before byte `to` as taken.
    pub(crate) fn advance(&mut self, to: u64) {
        self.read_from = to;
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    pub(crate) fn pending_bytes(&self) -> u64 {
        self.len().saturating_sub(self.read_from)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Appends events, whole lines only: a torn end left by an earlier failed write is ended
    /// first (so it cannot swallow these), and a write that fails is cut off again.
    pub(crate) fn append(&self, events: &[UsageEvent]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let before = file.metadata()?.len();
        let mut text = Vec::new();
        if before > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(before - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                text.push(b'\n');
            }
        }
        for event in events {
            serde_json::to_writer(&mut text, event)?;
            text.push(b'\n');
        }
        let written = file.write_all(&text).and_then(|()| file.sync_data());
        if written.is_err() {
            // Whatever part of the lines reached the disk is not an event: take it back.
            let _ = file.set_len(before);
        }
        written
    }

    /// Up to `max` events from the read position, and the position after them; `None` when
    /// nothing complete is left. Lines that are not events (torn by a crash) are skipped; an
    /// unterminated last line is left for later (it may still be being written... or torn,
    /// and then the next append ends it).
    pub(crate) fn next_batch(&self, max: usize) -> std::io::Result<Option<(Vec<UsageEvent>, u64)>> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.read_from))?;
        let mut reader = std::io::BufReader::new(file);
        let mut events = Vec::new();
        let mut position = self.read_from;
        let mut line = Vec::new();
        while events.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            position += n as u64;
            match serde_json::from_slice(&line) {
                Ok(event) => events.push(event),
                Err(e) => tracing::warn!(error = %e, "skipping a torn usage journal line"),
            }
        }
        Ok((position > self.read_from).then_some((events, position)))
    }

    /// Empties the journal once all of it is in the store.
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        if self.read_from < self.len() {
            // Appended while the last batch was on its way: kept for the next replay.
            return Ok(());
        }
        std::fs::File::create(&self.path)?.sync_all()?;
        self.read_from = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> UsageEvent {
        UsageEvent::for_test("k", "m", i as i64, i, 1)
    }

    fn journal(dir: &tempfile::TempDir) -> Journal {
        Journal {
            path: dir.path().join("usage.journal"),
            read_from: 0,
        }
    }

    #[test]
    fn a_torn_line_never_swallows_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        j.append(&[event(1)]).unwrap();
        // A write cut short (a full disk, a crash): half a line, no newline.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&j.path)
            .unwrap();
        file.write_all(b"{\"id\":\"k-torn\",\"time").unwrap();
        j.append(&[event(2)]).unwrap();
        let (events, end) = j.next_batch(100).unwrap().unwrap();
        let ids: Vec<_> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["k-1", "k-2"]);
        j.read_from = end;
        assert!(j.is_empty());
        j.clear().unwrap();
        assert_eq!(j.len(), 0);
    }

    #[test]
    fn replay_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(&dir);
        j.append(&(0..10).map(event).collect::<Vec<_>>()).unwrap();
        let (first, end) = j.next_batch(4).unwrap().unwrap();
        assert_eq!(first.len(), 4);
        j.read_from = end;
        // More arrives meanwhile; nothing is read twice, nothing skipped.
        j.append(&[event(10)]).unwrap();
        let mut rest = Vec::new();
        while let Some((events, end)) = j.next_batch(4).unwrap() {
            rest.extend(events);
            j.read_from = end;
        }
        let ids: Vec<u64> = first.iter().chain(&rest).map(|e| e.prompt_tokens).collect();
        assert_eq!(ids, (0..11).collect::<Vec<_>>());
        // Clearing waits until everything is read.
        j.clear().unwrap();
        assert_eq!((j.len(), j.read_from), (0, 0));
    }

    #[test]
    fn an_unterminated_last_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(&dir);
        j.append(&[event(1)]).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&j.path)
            .unwrap();
        file.write_all(b"{\"id\":").unwrap();
        let (events, end) = j.next_batch(10).unwrap().unwrap();
        assert_eq!(events.len(), 1);
        assert!(end < j.len(), "the partial line is not consumed");
    }
}
