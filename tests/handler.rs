//! Outcomes of the Mayhem handler under injected failure rates.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use futures_lite::FutureExt;
use mayhem::{Context, HandleError, Handler, MayhemConfig, MayhemHandler, Metrics, PubSubMessage};

fn handler(restart: f64, save: f64, panic: f64, retries: u32) -> MayhemHandler {
    let mut settings = MayhemConfig::default();
    settings.latency = Duration::ZERO;
    settings.restart_failure_rate = restart;
    settings.save_failure_rate = save;
    settings.panic_rate = panic;
    settings.stall_rate = 0.0;
    settings.stall = Duration::ZERO;
    settings.restart_retries = retries;
    settings.seed = 42;
    MayhemHandler::new(settings)
}

/// Handles one message and returns the result with the metrics it left.
fn handle(handler: &MayhemHandler, attempt: u32) -> (Result<(), HandleError>, Metrics) {
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(7));
    let extended = AtomicU32::new(0);
    let metrics = Metrics::default();
    let result = {
        let ctx = Context::new(&message, attempt, &extended, &metrics);
        smol::block_on(handler.handle(&ctx))
    };
    (result, metrics)
}

fn counters(metrics: &Metrics) -> (u64, u64, u64) {
    (
        metrics.restart_failed(),
        metrics.restart_retried(),
        metrics.save_failed(),
    )
}

#[test]
fn no_failures_means_success() {
    let (result, metrics) = handle(&handler(0.0, 0.0, 0.0, 3), 1);
    assert_eq!(result, Ok(()));
    assert_eq!(counters(&metrics), (0, 0, 0));
}

#[test]
fn a_restart_that_always_fails_is_retried_then_given_up() {
    let (result, metrics) = handle(&handler(1.0, 0.0, 0.0, 3), 1);
    assert!(
        matches!(result, Err(HandleError::RestartFailed { ref hostname }) if hostname.ends_with(".example.net"))
    );
    // One first try and three retries, all failed.
    assert_eq!(counters(&metrics), (4, 3, 0));
}

#[test]
fn a_failing_save_is_an_error() {
    let (result, metrics) = handle(&handler(0.0, 1.0, 0.0, 3), 1);
    assert!(
        matches!(result, Err(HandleError::SaveFailed { ref message }) if message.starts_with("PubSubMessage("))
    );
    assert_eq!(counters(&metrics), (0, 0, 1));
}

#[test]
fn both_failing_reports_the_restart_and_counts_both() {
    let (result, metrics) = handle(&handler(1.0, 1.0, 0.0, 0), 1);
    assert!(matches!(result, Err(HandleError::RestartFailed { .. })));
    assert_eq!(counters(&metrics), (1, 0, 1));
}

#[test]
fn the_same_seed_gives_the_same_outcome() {
    let half = handler(0.5, 0.5, 0.0, 1);
    let outcomes: Vec<_> = (1..=20)
        .map(|attempt| handle(&half, attempt).0.is_ok())
        .collect();
    let again: Vec<_> = (1..=20)
        .map(|attempt| handle(&half, attempt).0.is_ok())
        .collect();
    assert_eq!(outcomes, again);
    assert!(
        outcomes.contains(&true) && outcomes.contains(&false),
        "{outcomes:?}"
    );
}

#[test]
fn panic_rate_one_panics() {
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(8));
    let extended = AtomicU32::new(0);
    let metrics = Metrics::default();
    let ctx = Context::new(&message, 1, &extended, &metrics);
    let always = handler(0.0, 0.0, 1.0, 0);
    let caught = smol::block_on(AssertUnwindSafe(always.handle(&ctx)).catch_unwind());
    assert!(caught.is_err());
}
