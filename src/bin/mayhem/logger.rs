//! The binary's logger: one line per record on stderr, in the reference's format
//! `18:46:39,660 INFO: message`, in local time, with the offset when it is not UTC
//! (`19:46:39,660+01:00 INFO: message`).
//!
//! # Never blocking the service
//!
//! A stderr nobody reads (a full pipe) must not stop the service. Records are therefore
//! formatted by the thread that logs and put in a bounded in-memory queue (at most
//! [`QUEUE_BYTES`]); one writer thread (`mayhem-log`) drains it to stderr in batches. When
//! the queue is full the line is dropped and counted, and the writer writes
//! `WARN: N log lines dropped` once it catches up. So logging costs a handler a lock and a
//! copy, never a wait on stderr. At exit, [`flush`] waits for the queue to drain, but gives
//! up when stderr takes nothing for a while.
//!
//! # Filters and time
//!
//! `--log-level` sets the level of every module; `--log-filter` adds `RUST_LOG`-style
//! directives (`mayhem::pipeline::consumer=debug,warn`) parsed by `env_filter`. The time zone is read
//! once at start by `jiff` (`TZ`, then `/etc/localtime`; UTC when neither is usable) in pure
//! Rust: unlike libc's `localtime_r`, which reads the environment, it is sound while other
//! threads run.
//!
//! Hand-written instead of simple_logger: simple_logger fixes its own line layout (level
//! padding and a `[target]` field) and writes synchronously, and a logger must never panic
//! when stderr is closed, which `eprintln!` does.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use jiff::tz::TimeZone;
use jiff::Timestamp;
use log::{Level, LevelFilter, Log, Metadata, Record};

/// The most bytes of formatted lines waiting for stderr; more are dropped and counted.
pub(crate) const QUEUE_BYTES: usize = 1024 * 1024;

/// The queue between the threads that log and the writer thread.
struct Queue {
    /// The lines and the counters.
    state: Mutex<QueueState>,
    /// Wakes the writer when lines arrive.
    ready: Condvar,
    /// Wakes `flush` when the writer wrote a batch.
    written: Condvar,
    /// The local time zone, read once.
    zone: TimeZone,
}

/// What [`Queue`] guards.
#[derive(Default)]
struct QueueState {
    /// Formatted lines, oldest first.
    lines: VecDeque<String>,
    /// Their total length.
    bytes: usize,
    /// Lines dropped since the writer last reported drops.
    dropped: u64,
    /// Whether the writer is writing a batch it took.
    writing: bool,
    /// Batches written so far (progress, for `flush`).
    batches: u64,
}

/// Formats records and queues them.
struct QueueLogger {
    /// Which records are written.
    filter: env_filter::Filter,
    /// Shared with the writer thread and `flush`.
    queue: &'static Queue,
}

/// The queue, once the logger is installed.
static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Parses `--log-filter` over `--log-level`.
///
/// # Errors
///
/// A one-line description of a bad directive.
pub(crate) fn filter(
    level: LevelFilter,
    directives: Option<&str>,
) -> Result<env_filter::Filter, String> {
    let mut builder = env_filter::Builder::new();
    builder.filter_level(level);
    if let Some(directives) = directives {
        builder
            .try_parse(directives)
            .map_err(|error| format!("invalid value '{directives}' for '--log-filter': {error}"))?;
    }
    Ok(builder.build())
}

/// Installs the logger for the whole process and starts its writer thread.
///
/// # Errors
///
/// A one-line description when the writer thread cannot start.
pub(crate) fn init(filter: env_filter::Filter) -> Result<(), String> {
    let (zone, refused) = match local_zone() {
        Ok(zone) => (zone, None),
        Err(refused) => (TimeZone::UTC, Some(refused)),
    };
    let queue = QUEUE.get_or_init(|| Queue {
        state: Mutex::new(QueueState::default()),
        ready: Condvar::new(),
        written: Condvar::new(),
        zone,
    });
    thread::Builder::new()
        .name("mayhem-log".into())
        .spawn(move || queue.write_forever())
        .map_err(|error| format!("cannot start the log thread: {error}"))?;
    log::set_max_level(filter.filter());
    // Fails only if a logger is already set, and `main` sets it once.
    let _ = log::set_boxed_logger(Box::new(QueueLogger { filter, queue }));
    if let Some(refused) = refused {
        log::warn!("{refused}: logging in UTC");
    }
    Ok(())
}

/// The largest time zone file `TZ` may name, 1 MiB (TZif files of the time zone database
/// are a few KiB).
const MAX_TZ_FILE: u64 = 1024 * 1024;

/// The local time zone: `TZ` (a POSIX rule, a name of the time zone database, or a file),
/// else `/etc/localtime`, else UTC, as `jiff` reads them.
///
/// # Errors
///
/// A `TZ` naming a file that is not a regular file of at most [`MAX_TZ_FILE`] bytes, which
/// is not read: `jiff` reads such a file whole, so `TZ=/dev/zero` took memory until the
/// kernel killed the process, and a FIFO nobody writes to hung the start for good.
fn local_zone() -> Result<TimeZone, String> {
    if let Some(value) = std::env::var_os("TZ") {
        let text = value.to_string_lossy();
        let name = text.strip_prefix(':').unwrap_or(&text);
        // A name of the database or a POSIX rule is never read from the working directory.
        let named = name.is_empty() || TimeZone::get(name).is_ok() || TimeZone::posix(name).is_ok();
        if !named {
            if let Ok(metadata) = std::fs::metadata(name) {
                if !metadata.is_file() || metadata.len() > MAX_TZ_FILE {
                    return Err(format!(
                        "TZ={name} is not a time zone file (a regular file of at most 1 MiB)"
                    ));
                }
            }
        }
    }
    Ok(TimeZone::try_system().unwrap_or(TimeZone::UTC))
}

/// Waits until every queued line was written, giving up once stderr took nothing for
/// `stall` or after `limit` in all. Returns whether the queue drained.
///
/// # Blocking
///
/// Blocks the calling thread; for the end of `main` and the forced exit.
pub(crate) fn flush(stall: Duration, limit: Duration) -> bool {
    let Some(queue) = QUEUE.get() else {
        return true;
    };
    let end = Instant::now() + limit;
    let mut state = queue.lock();
    let mut progress = (state.batches, Instant::now());
    while !state.lines.is_empty() || state.writing || state.dropped > 0 {
        let now = Instant::now();
        if state.batches != progress.0 {
            progress = (state.batches, now);
        }
        let give_up = (progress.1 + stall).min(end);
        if now >= give_up {
            return false;
        }
        state = queue
            .written
            .wait_timeout(state, give_up - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    true
}

impl Queue {
    /// The state; every update is complete before the lock is released, so a poisoned lock
    /// is used as is.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a line, or drops and counts it when the queue is full. Never waits on stderr.
    fn push(&self, line: String) {
        let mut state = self.lock();
        if state.bytes + line.len() > QUEUE_BYTES {
            state.dropped += 1;
            return;
        }
        state.bytes += line.len();
        state.lines.push_back(line);
        drop(state);
        self.ready.notify_one();
    }

    /// The writer thread: writes batches to stderr forever. It is the only thread that
    /// logs to stderr once the logger is installed, so a full stderr blocks this thread only.
    ///
    /// The handle is `Stderr`, not a `StderrLock` held across batches: `write_all` on it takes
    /// the process-wide stderr lock for the one write of a batch only. Holding the lock while
    /// waiting for lines would hang, forever, any other writer of stderr (a dependency's
    /// `eprintln!`, a panic message printed before the hook is installed).
    fn write_forever(&self) {
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut stderr = std::io::stderr();
        loop {
            // A closed stderr is ignored: the lines are lost, the service goes on.
            self.write_batch(&mut batch, &mut stderr);
        }
    }

    /// Waits for lines, takes everything queued and writes it in one go, then reports the
    /// lines dropped since the last batch.
    fn write_batch(&self, batch: &mut Vec<u8>, out: &mut impl Write) {
        let mut state = self.lock();
        while state.lines.is_empty() && state.dropped == 0 {
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        batch.clear();
        for line in state.lines.drain(..) {
            batch.extend_from_slice(line.as_bytes());
        }
        state.bytes = 0;
        let dropped = std::mem::take(&mut state.dropped);
        state.writing = true;
        drop(state);
        if dropped > 0 {
            let noun = if dropped == 1 { "line" } else { "lines" };
            let line = format_line(
                &self.zone,
                Level::Warn,
                &format_args!("{dropped} log {noun} dropped (stderr was not read fast enough)"),
            );
            batch.extend_from_slice(line.as_bytes());
        }
        let _ = out.write_all(batch);
        let mut state = self.lock();
        state.writing = false;
        state.batches += 1;
        drop(state);
        self.written.notify_all();
    }
}

impl Log for QueueLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        self.queue
            .push(format_line(&self.queue.zone, record.level(), record.args()));
    }

    fn flush(&self) {
        flush(Duration::from_millis(500), Duration::from_secs(5));
    }
}

/// One line: `HH:MM:SS,mmm[+HH:MM] LEVEL: message\n`, in `zone`'s local time.
fn format_line(zone: &TimeZone, level: Level, message: &std::fmt::Arguments<'_>) -> String {
    let now = Timestamp::now();
    let time = zone.to_datetime(now);
    let offset = zone.to_offset(now).seconds();
    let mut line = format!(
        "{:02}:{:02}:{:02},{:03}",
        time.hour(),
        time.minute(),
        time.second(),
        time.millisecond()
    );
    if offset != 0 {
        let sign = if offset < 0 { '-' } else { '+' };
        let offset = offset.unsigned_abs();
        line.push_str(&format!(
            "{sign}{:02}:{:02}",
            offset / 3600,
            offset / 60 % 60
        ));
    }
    line.push_str(&format!(" {level}: {message}\n"));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            written: Condvar::new(),
            zone: TimeZone::UTC,
        }
    }

    #[test]
    fn a_full_queue_drops_lines_and_the_writer_reports_how_many() {
        let queue = queue();
        let line = format!("{}\n", "x".repeat(1023));
        let fits = QUEUE_BYTES / line.len();
        for _ in 0..fits + 5 {
            queue.push(line.clone());
        }
        let mut out = Vec::new();
        queue.write_batch(&mut Vec::new(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with('x')).count(), fits);
        let last = text.lines().last().unwrap();
        assert!(
            last.ends_with(" WARN: 5 log lines dropped (stderr was not read fast enough)"),
            "{last}"
        );
        // Caught up: the next lines are queued again.
        queue.push("after\n".to_owned());
        let mut out = Vec::new();
        queue.write_batch(&mut Vec::new(), &mut out);
        assert_eq!(out, b"after\n");
    }

    #[test]
    fn lines_show_the_offset_only_when_it_is_not_zero() {
        let utc = format_line(&TimeZone::UTC, Level::Info, &format_args!("hello"));
        assert_eq!(&utc[12..], " INFO: hello\n", "{utc}");
        let east = TimeZone::fixed(jiff::tz::Offset::constant(3));
        let line = format_line(&east, Level::Info, &format_args!("hello"));
        assert_eq!(&line[12..], "+03:00 INFO: hello\n", "{line}");
        let west = TimeZone::fixed(jiff::tz::Offset::from_seconds(-(9 * 3600 + 30 * 60)).unwrap());
        let line = format_line(&west, Level::Warn, &format_args!("hello"));
        assert_eq!(&line[12..], "-09:30 WARN: hello\n", "{line}");
    }

    #[test]
    fn an_idle_writer_leaves_stderr_to_other_writers() {
        let queue: &'static Queue = Box::leak(Box::new(queue()));
        thread::spawn(move || queue.write_forever());
        // An empty line: the writer writes nothing, then waits for the next line.
        queue.push(String::new());
        let mut state = queue.lock();
        while state.batches == 0 {
            state = queue.written.wait(state).unwrap();
        }
        drop(state);
        // Another writer of stderr gets it at once; a writer that kept the lock while
        // waiting would hold it forever. The bound only decides how long a failure takes.
        let (done, finished) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = std::io::stderr().lock().write_all(b"");
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(30)).is_ok(),
            "the log writer holds the stderr lock while idle"
        );
    }
}
