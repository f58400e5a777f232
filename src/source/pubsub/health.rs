//! The health of requests: a run of failures is logged once per kind of failure and once
//! on recovery, and its length decides when the source gives up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::rest::RestError;
use crate::sync::lock;

/// Whether requests fail, since when, and what was logged.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// The first failure of the current run of failures, and the kind last logged.
    state: Mutex<Option<(Instant, String)>>,
}

impl Health {
    /// Records a failure: logs it when its kind changed; returns how long requests have
    /// been failing.
    pub(super) fn failed(&self, base: &str, error: &RestError) -> Duration {
        let kind = match error {
            RestError::Status { code, status, .. } => format!("{code} {status}"),
            other => other.to_string().chars().take(40).collect(),
        };
        let mut state = lock(&self.state);
        let since = state
            .as_ref()
            .map_or_else(Instant::now, |(since, _)| *since);
        if state.as_ref().is_none_or(|(_, logged)| *logged != kind) {
            warn!("pubsub at {base} unavailable: {error}; retrying");
        }
        *state = Some((since, kind));
        since.elapsed()
    }

    /// Records a success: logs the recovery after failures.
    pub(super) fn recovered(&self, base: &str) {
        let mut state = lock(&self.state);
        if state.take().is_some() {
            info!("reconnected to pubsub at {base}");
        }
    }

    /// Whether requests are failing now.
    pub(super) fn is_failing(&self) -> bool {
        lock(&self.state).is_some()
    }
}
