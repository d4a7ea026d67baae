//! How do log lines reach stderr without costing a request thread a write or a wake-up?
//!
//! Logging threads append whole lines to one in-memory buffer; a writer thread of its own
//! takes the buffer [`FLUSH_EVERY`] after its first line and writes it in one call. A logging
//! thread makes no syscall for its line and wakes the writer at most once per batch (a
//! per-line hand-off, as in
//! tracing-appender's non-blocking writer, cost a futex wake and a write per request in the
//! gateway's profile). Nothing is dropped: past [`HIGH_WATER`] bytes the writer is woken at
//! once, and past [`LIMIT`] a logging thread waits for room. What a crash can lose is the
//! lines of the last [`FLUSH_EVERY`]; dropping the [`Flusher`] writes everything first.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long lines wait in memory at most (while the writer keeps up).
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Past this many waiting bytes the writer is woken rather than left to its timer.
const HIGH_WATER: usize = 256 << 10;
/// Past this many waiting bytes a logging thread waits for the writer.
const LIMIT: usize = 8 << 20;

struct State {
    lines: Vec<u8>,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer early (a full buffer, a stop).
    wake_writer: Condvar,
    /// Wakes logging threads waiting for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked mid-append left whole lines or none: the buffer is usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut state = self.lock();
        while state.lines.len() >= LIMIT && !state.stopping {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let before = state.lines.len();
        state.lines.extend_from_slice(line);
        // The writer sleeps while there is nothing to write: the first line wakes it (it then
        // gathers for FLUSH_EVERY), and so does a buffer past HIGH_WATER. Other lines wake
        // nobody.
        if before == 0 || (before < HIGH_WATER && state.lines.len() >= HIGH_WATER) {
            self.wake_writer.notify_one();
        }
    }
}

/// Where logging threads put their lines; cheap to clone. As a `tracing_subscriber`
/// writer, each event's formatted line arrives in one `write` call.
#[derive(Clone)]
pub struct LogBuffer {
    shared: Arc<Shared>,
}

/// Owns the writer thread; dropping it writes what is left and stops the thread.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A buffer whose lines a thread named `thread_name` writes to `out`.
pub fn buffer<W: Write + Send + 'static>(out: W, thread_name: &str) -> (LogBuffer, Flusher) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            lines: Vec::with_capacity(64 << 10),
            stopping: false,
        }),
        wake_writer: Condvar::new(),
        room: Condvar::new(),
    });
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || write_batches(&writer, out))
        .expect("the log writer thread starts");
    (
        LogBuffer {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    )
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    // Two buffers trade places, so neither side allocates once they have grown.
    let mut spare = Vec::with_capacity(64 << 10);
    loop {
        let stopping = {
            let mut state = shared.lock();
            while state.lines.is_empty() && !state.stopping {
                state = shared
                    .wake_writer
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if state.lines.len() < HIGH_WATER && !state.stopping {
                state = shared
                    .wake_writer
                    .wait_timeout(state, FLUSH_EVERY)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            std::mem::swap(&mut state.lines, &mut spare);
            shared.room.notify_all();
            state.stopping
        };
        if !spare.is_empty() {
            // A log that cannot be written has nowhere to report that; the lines are lost
            // only if stderr itself is gone.
            let _ = out.write_all(&spare);
            let _ = out.flush();
            spare.clear();
        }
        if stopping && shared.lock().lines.is_empty() {
            return;
        }
    }
}

impl LogBuffer {
    /// Appends one whole line (with its newline).
    pub fn write_line(&self, line: &[u8]) {
        self.shared.append(line);
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.shared.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake_writer.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_by_the_time_the_flusher_is_dropped() {
        let sink = Sink::default();
        let (buffer, flusher) = super::buffer(sink.clone(), "test-log-writer");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let buffer = buffer.clone();
                std::thread::spawn(move || {
                    // Enough to pass LIMIT, so that logging threads also wait for room.
                    let pad = "x".repeat(200);
                    for i in 0..20_000 {
                        buffer.write_line(format!("{t} {i} {pad}\n").as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(flusher);
        let written = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 80_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter(|l| l.starts_with(&format!("{t} ")))
                .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..20_000).collect::<Vec<_>>(),
                "thread {t}'s lines, in order"
            );
        }
    }

    #[test]
    fn a_quiet_log_is_written_within_its_flush_interval() {
        let sink = Sink::default();
        let (buffer, _flusher) = super::buffer(sink.clone(), "test-log-writer");
        buffer.write_line(b"one line\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line was not written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"one line\n");
    }
}
