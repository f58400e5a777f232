//! The health of requests: a run of failures is logged once per kind of failure and once
//! on recovery, and its length decides when the source gives up.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::rest::RestError;
use super::BACKOFF;
use crate::source::kit::Outage;
use crate::sync::lock;

/// Whether requests fail, since when, and what was logged.
#[derive(Debug)]
pub(super) struct Health {
    /// The current run of failures.
    outage: Mutex<Outage>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            outage: Mutex::new(Outage::new(BACKOFF)),
        }
    }
}

impl Health {
    /// Records a failure: logs it when its kind changed; returns how long requests have
    /// been failing.
    pub(super) fn failed(&self, base: &str, error: &RestError) -> Duration {
        let kind = error.kind();
        let now = Instant::now();
        let mut outage = lock(&self.outage);
        if outage.failed(now, &kind, error.to_string()).0 {
            warn!("pubsub at {base} unavailable: {error}; retrying");
        }
        outage.over(now, Duration::ZERO).unwrap_or_default()
    }

    /// Records a success: logs the recovery after failures.
    pub(super) fn recovered(&self, base: &str) {
        if lock(&self.outage).recovered(Instant::now()).is_some() {
            info!("reconnected to pubsub at {base}");
        }
    }

    /// Whether requests are failing now.
    pub(super) fn is_failing(&self) -> bool {
        lock(&self.outage).since().is_some()
    }
}
