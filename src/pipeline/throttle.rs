//! Log lines of one kind, at most one a second: a repeated warning is aggregated with a
//! count instead of flooding stderr (a million lost leases must not print a million lines).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::Level;

use crate::sync;

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
        let Some(suppressed) = self.admit(Instant::now(), count) else {
            return;
        };
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

    /// Whether a line of `count` events is printed at `now`: `Some` with the number of events
    /// suppressed since the last line printed, or `None` when it only counts them.
    fn admit(&self, now: Instant, count: u64) -> Option<u64> {
        let mut state = sync::lock(&self.state);
        if let Some(last) = state.0 {
            if now.saturating_duration_since(last) < PERIOD {
                state.1 += count;
                return None;
            }
        }
        state.0 = Some(now);
        Some(std::mem::take(&mut state.1))
    }

    /// Prints how many lines were suppressed since the last one, if any.
    pub(crate) fn flush(&self) {
        let suppressed = {
            let mut state = sync::lock(&self.state);
            std::mem::take(&mut state.1)
        };
        if suppressed > 0 {
            log::log!(self.level, "{suppressed} more {}", self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_carries_the_count_of_the_rest() {
        let throttle = Throttle::new("test lines", Level::Warn);
        let start = Instant::now();
        assert_eq!(throttle.admit(start, 1), Some(0));
        // A million events within the second print nothing and are counted.
        for step in 0..1_000_000u32 {
            let now = start + Duration::from_nanos(u64::from(step) * 900);
            assert_eq!(throttle.admit(now, 1), None);
        }
        assert_eq!(throttle.admit(start + PERIOD, 1), Some(1_000_000));
        assert_eq!(throttle.admit(start + PERIOD, 5), None);
        assert_eq!(throttle.admit(start + PERIOD * 3, 1), Some(5));
    }
}
