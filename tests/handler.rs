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

/// The outcomes of 20 runs of the handler on one delivery (attempt 1), as a layer that runs
/// it again (the breaker) makes them.
fn runs_of_one_delivery(handler: &MayhemHandler) -> Vec<bool> {
    let message = PubSubMessage::random(&mut fastrand::Rng::with_seed(7));
    let (extended, metrics) = (AtomicU32::new(0), Metrics::default());
    let ctx = Context::new(&message, 1, &extended, &metrics);
    (1..=20)
        .map(|run| {
            if run > 1 {
                ctx.run_again();
            }
            assert_eq!(ctx.run(), run);
            smol::block_on(handler.handle(&ctx)).is_ok()
        })
        .collect()
}

#[test]
fn a_delivery_run_again_draws_new_outcomes_and_the_same_seed_replays_them() {
    // Were the dice the same for every run of one delivery, a message the breaker held
    // after a failure would fail again each time it ran: the probe after a cooldown would
    // fail for ever, and the breaker would never close.
    let half = handler(0.0, 0.5, 0.0, 0);
    let outcomes = runs_of_one_delivery(&half);
    assert!(
        outcomes.contains(&true) && outcomes.contains(&false),
        "{outcomes:?}"
    );
    assert_eq!(outcomes, runs_of_one_delivery(&half));
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

/// A counted run of `messages` on the in-memory pub/sub with this chaos monkey: published at
/// once, no failures but the database's.
fn run_with(settings: MayhemConfig, messages: u64, max_attempts: u32) -> mayhem::Report {
    let mut config = mayhem::Config::default();
    config.run.messages = Some(messages);
    config.run.stats_interval = Duration::ZERO;
    config.publish.interval = Duration::ZERO;
    config.lease.max_attempts = max_attempts;
    let subscription = mayhem::Subscription::new(config.subscription());
    mayhem::Runner::new(&config)
        .publisher(&subscription)
        .run(
            &subscription,
            &MayhemHandler::new(settings),
            &mayhem::Shutdown::new(),
        )
        .expect("a valid configuration")
}

fn no_failures(latency: Duration) -> MayhemConfig {
    let mut settings = MayhemConfig::default();
    settings.latency = latency;
    settings.restart_failure_rate = 0.0;
    settings.save_failure_rate = 0.0;
    settings.seed = 42;
    settings
}

#[test]
fn every_save_fails_during_a_database_outage() {
    let mut settings = no_failures(Duration::ZERO);
    settings.db_outage = Some("0s+1h".parse().expect("an outage"));
    let report = run_with(settings, 10, 2);
    // Each delivery's save failed: every message used its two attempts and is dead.
    assert_eq!(report.db_outage, 20, "{report}");
    assert_eq!(report.save_failed, 20, "{report}");
    assert_eq!(report.dead_lettered, 10, "{report}");
    assert!(report.is_balanced(), "{report}");
}

#[test]
fn saves_past_the_database_capacity_wait_and_give_up_after_the_patience() {
    let mut settings = no_failures(Duration::from_millis(50));
    settings.db_capacity = Some(1);
    settings.db_patience = Duration::from_millis(1);
    // 30 handlers at once against one connection: most give up, and are delivered again
    // until each got the connection.
    let report = run_with(settings, 30, 1000);
    assert_eq!(report.acked, 30, "{report}");
    assert!(report.db_gave_up > 0, "{report}");
    assert_eq!(report.save_failed, report.db_gave_up, "{report}");
    assert_eq!(report.nacked, report.db_gave_up, "{report}");
    assert_eq!(report.db_outage, 0, "{report}");
}

#[test]
fn a_patient_save_waits_in_line_for_a_connection() {
    let mut settings = no_failures(Duration::from_millis(5));
    settings.db_capacity = Some(2);
    settings.db_patience = Duration::from_secs(60);
    let report = run_with(settings, 30, 1);
    // Nobody gave up: the saves past 2 at once waited their turn.
    assert_eq!(report.acked, 30, "{report}");
    assert_eq!(report.db_gave_up, 0, "{report}");
    assert!(report.db_queued > 0, "{report}");
}

#[test]
fn the_database_settings_default_to_off() {
    let settings = MayhemConfig::default();
    assert_eq!(settings.db_capacity, None);
    assert_eq!(settings.db_outage, None);
}

#[test]
fn messages_without_an_id_draw_outcomes_of_their_own() {
    // A RabbitMQ producer need not set `message-id`: every such message had the empty id's
    // draws, so at a failure rate of one half they all failed, or all succeeded, together.
    let half = handler(0.5, 0.0, 0.0, 0);
    let outcomes: Vec<bool> = (0..64)
        .map(|n| {
            let message = PubSubMessage::new(format!("web-{n:05}"));
            assert!(message.id().is_empty());
            let extended = AtomicU32::new(0);
            let metrics = Metrics::default();
            let ctx = Context::new(&message, 1, &extended, &metrics);
            smol::block_on(half.handle(&ctx)).is_ok()
        })
        .collect();
    let succeeded = outcomes.iter().filter(|ok| **ok).count();
    assert!(
        (16..=48).contains(&succeeded),
        "{succeeded} of 64: {outcomes:?}"
    );
    // The same data draws the same outcome again.
    let again = PubSubMessage::new("web-00000");
    let extended = AtomicU32::new(0);
    let metrics = Metrics::default();
    let ctx = Context::new(&again, 1, &extended, &metrics);
    assert_eq!(smol::block_on(half.handle(&ctx)).is_ok(), outcomes[0]);
}
