//! Log lines of one kind, at most one a second: a repeated warning is aggregated with a
//! count instead of flooding stderr (a million lost leases must not print a million lines).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::Level;

/// Shortest time between two lines of one kind.
const PERIOD: Duration = Duration::from_secs(1);

/// A kind of log line printed at most once per [`PERIOD`]; the lines in between are counted
/// and the count is added to the next line printed (or to [`flush`](Throttle::flush)).
#[derive(Debug)]
pub(crate) struct Throttle {
    /// Names the kind in the line `flush` prints.
    kind: &'static str,
    /// The level of the lines.
    level: Level,
    /// When a line was last printed, and how many were suppressed since. A mutex, not
    /// atomics: it is taken only when a line of this kind is due, which is rare by design.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// A throttle of lines of `kind` at `level`.
    pub(crate) const fn new(kind: &'static str, level: Level) -> Self {
        Throttle {
            kind,
            level,
            state: Mutex::new((None, 0)),
        }
    }

    /// Logs the line `text` builds, unless a line of this kind was printed less than a second
    /// ago: then it only counts it. `count` says how many events the line stands for.
    pub(crate) fn log(&self, count: u64, text: impl FnOnce() -> String) {
        if !log::log_enabled!(self.level) {
            return;
        }
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(last) = state.0 {
            if now.duration_since(last) < PERIOD {
                state.1 += count;
                return;
            }
        }
        let suppressed = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        if suppressed > 0 {
            log::log!(
                self.level,
                "{} (and {suppressed} more {} in the last second)",
                text(),
                self.kind
            );
        } else {
            log::log!(self.level, "{}", text());
        }
    }

    /// Prints how many lines were suppressed since the last one, if any.
    pub(crate) fn flush(&self) {
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::take(&mut state.1)
        };
        if suppressed > 0 {
            log::log!(self.level, "{suppressed} more {}", self.kind);
        }
    }
}
