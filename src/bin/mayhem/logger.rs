//! The binary's logger: one line per record on stderr, in the reference's format
//! `18:46:39,660 INFO: message` (UTC time of day).
//!
//! Hand-written instead of simple_logger: simple_logger fixes its own line layout (level
//! padding and a `[target]` field), and a logger must never panic when stderr is closed,
//! which `eprintln!` does.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

/// Writes records at or above a level to stderr.
struct StderrLogger {
    /// The most verbose level written.
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since_epoch.as_secs() % 86_400;
        let line = format!(
            "{:02}:{:02}:{:02},{:03} {}: {}\n",
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            since_epoch.subsec_millis(),
            record.level(),
            record.args()
        );
        // One write per line keeps lines whole across threads; a closed stderr is ignored.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger for the whole process.
pub(crate) fn init(level: LevelFilter) {
    log::set_max_level(level);
    // Fails only if a logger is already set, and `main` sets it once.
    let _ = log::set_boxed_logger(Box::new(StderrLogger { level }));
}
