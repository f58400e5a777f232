//! A broker's run of failures: since when it fails, the last error, which kind of failure
//! was logged last (each kind once), and the backoff before the next try.

use std::time::{Duration, Instant};

/// Pauses that double from `first` up to `max`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// The first pause, and the pause after a reset.
    first: Duration,
    /// The longest pause.
    max: Duration,
    /// The next pause.
    next: Duration,
}

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The next pause; the one after is twice as long, up to the longest.
    pub(crate) fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(self.max);
        pause
    }

    /// Starts over at the first pause.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Whether requests to a broker fail, since when, and when the next try may go.
#[derive(Debug)]
pub(crate) struct Outage {
    /// The first failure of the current run; `None` while requests succeed.
    since: Option<Instant>,
    /// The kind of failure logged last: a new kind is logged again.
    logged: String,
    /// The last failure's text (one line, secrets removed by the caller).
    last_error: String,
    /// The pauses between tries.
    backoff: Backoff,
    /// No try before this instant.
    next_try: Option<Instant>,
}

impl Outage {
    /// No failure yet; tries after failures pause as `backoff` says.
    pub(crate) fn new(backoff: Backoff) -> Self {
        Outage {
            since: None,
            logged: String::new(),
            last_error: String::new(),
            backoff,
            next_try: None,
        }
    }

    /// The first failure of the current run, if requests fail.
    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
    }

    /// The last failure's text.
    pub(crate) fn last_error(&self) -> &str {
        &self.last_error
    }

    /// How long a try must still wait at `now` (`None`: it may go).
    pub(crate) fn wait(&self, now: Instant) -> Option<Duration> {
        self.next_try
            .filter(|next| self.since.is_some() && now < *next)
            .map(|next| next - now)
    }

    /// How long requests have failed at `now`, when that is `limit` or more.
    pub(crate) fn over(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let failing = now.duration_since(self.since?);
        (failing >= limit).then_some(failing)
    }

    /// Records a failure of `kind` at `now`, with its `text`. Returns whether the kind
    /// differs from the one logged last (the caller logs it then), and the pause before
    /// the next try.
    pub(crate) fn failed(&mut self, now: Instant, kind: &str, text: String) -> (bool, Duration) {
        if self.since.is_none() {
            self.since = Some(now);
            self.backoff.reset();
        }
        let pause = self.backoff.next_pause();
        self.next_try = Some(now + pause);
        self.last_error = text;
        let new_kind = self.logged != kind;
        if new_kind {
            kind.clone_into(&mut self.logged);
        }
        (new_kind, pause)
    }

    /// Records a success at `now`: returns how long the failures lasted, if they did.
    pub(crate) fn recovered(&mut self, now: Instant) -> Option<Duration> {
        let since = self.since.take()?;
        self.logged.clear();
        self.last_error.clear();
        self.backoff.reset();
        self.next_try = None;
        Some(now.duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pauses_double_up_to_the_longest_and_start_over_after_a_success() {
        let t0 = Instant::now();
        let mut outage = Outage::new(Backoff::new(50 * MS, 200 * MS));
        let pauses: Vec<Duration> = (0..4)
            .map(|n| outage.failed(t0 + n * MS, "down", "x".into()).1)
            .collect();
        assert_eq!(pauses, [50 * MS, 100 * MS, 200 * MS, 200 * MS]);
        assert_eq!(outage.wait(t0 + 3 * MS), Some(200 * MS));
        assert_eq!(outage.wait(t0 + 203 * MS), None);
        assert_eq!(outage.recovered(t0 + 10 * MS), Some(10 * MS));
        assert_eq!(outage.wait(t0 + 10 * MS), None, "no wait once recovered");
        assert_eq!(outage.failed(t0 + 20 * MS, "down", "x".into()).1, 50 * MS);
    }

    #[test]
    fn each_kind_is_logged_once_per_run() {
        let t0 = Instant::now();
        let mut outage = Outage::new(Backoff::new(MS, MS));
        let logged: Vec<bool> = ["a", "a", "b", "b", "a"]
            .iter()
            .map(|kind| outage.failed(t0, kind, (*kind).to_owned()).0)
            .collect();
        assert_eq!(logged, [true, false, true, false, true]);
        assert_eq!(outage.last_error(), "a");
        outage.recovered(t0);
        assert!(
            outage.failed(t0, "a", String::new()).0,
            "a new run logs again"
        );
    }

    #[test]
    fn the_limit_counts_from_the_first_failure_of_the_run() {
        let t0 = Instant::now();
        let mut outage = Outage::new(Backoff::new(MS, MS));
        assert_eq!(outage.over(t0, Duration::ZERO), None, "not failing");
        outage.failed(t0, "a", String::new());
        outage.failed(t0 + 5 * MS, "a", String::new());
        assert_eq!(outage.since(), Some(t0));
        assert_eq!(outage.over(t0 + 9 * MS, 10 * MS), None);
        assert_eq!(outage.over(t0 + 10 * MS, 10 * MS), Some(10 * MS));
        assert_eq!(outage.recovered(t0 + 11 * MS), Some(11 * MS));
        assert_eq!(
            outage.recovered(t0 + 12 * MS),
            None,
            "nothing to recover from"
        );
    }
}
