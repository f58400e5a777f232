//! The layers as an embedder uses them: a handler of its own, wrapped in the timeout, the
//! rate limit and the circuit breaker, run by the library on the in-memory pub/sub. Failures
//! are injected by the handler; the tests wait on counters, never on a racing sleep.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mayhem::layer::{self, BreakerConfig, LayerConfig, RateLimit, Timeout};
use mayhem::{
    Config, Context, HandleError, Handler, MayhemConfig, MayhemHandler, Metrics, Pause, Report,
    Runner, Shutdown, Subscription,
};

/// Upper bound for anything a test waits for; only reached when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);

/// A downstream the test turns off and on: while it is down, a call hangs (until the
/// timeout layer drops it).
#[derive(Default)]
struct Downstream {
    /// Whether calls hang.
    down: AtomicBool,
    /// Calls made.
    calls: AtomicU64,
    /// When each call started, for the rate-limit test.
    starts: Mutex<Vec<Instant>>,
}

/// The embedder's own handler: one call to the downstream.
struct Mine(Arc<Downstream>);

impl Handler for Mine {
    async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
        let downstream = &self.0;
        downstream.calls.fetch_add(1, Ordering::SeqCst);
        downstream
            .starts
            .lock()
            .expect("no test thread panics holding it")
            .push(Instant::now());
        if downstream.down.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// A counted run of `messages` on the in-memory pub/sub: no pauses, no stats line.
fn config(messages: u64) -> Config {
    let mut config = Config::default();
    config.run.messages = Some(messages);
    config.run.stats_interval = Duration::ZERO;
    config.run.workers = 2;
    config.publish.interval = Duration::ZERO;
    config
}

/// Runs `handler` to completion on its own thread while `watch` looks at the live metrics
/// and the pause from the test's thread.
fn run_watched<H: Handler>(
    config: &Config,
    handler: &H,
    pause: &Pause,
    watch: impl FnOnce(&Metrics),
) -> Report {
    let subscription = Subscription::new(config.subscription());
    let metrics = Metrics::default();
    let shutdown = Shutdown::new();
    thread::scope(|scope| {
        let service = scope.spawn(|| {
            Runner::new(config)
                .metrics(&metrics)
                .publisher(&subscription)
                .pause(pause)
                .run(&subscription, handler, &shutdown)
                .expect("a valid configuration")
        });
        watch(&metrics);
        service.join().expect("run does not panic")
    })
}

/// Waits until `condition` holds; panics after [`PATIENCE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            Instant::now() < end,
            "{what} did not happen within {PATIENCE:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_handler_that_never_finishes_times_out_and_every_message_is_dead_lettered() {
    let downstream = Arc::new(Downstream::default());
    downstream.down.store(true, Ordering::SeqCst);
    let mut config = config(20);
    config.lease.max_attempts = 3;
    let handler = Timeout::new(Mine(downstream.clone()), Duration::from_millis(20));
    let report = run_watched(&config, &handler, &Pause::new(), |_| {});
    // Every delivery timed out and was nacked; after 3 each message is dead: none lost.
    assert_eq!(report.acked, 0, "{report}");
    assert_eq!(report.dead_lettered, 20, "{report}");
    assert_eq!(report.timed_out, 60, "{report}");
    assert_eq!(report.nacked, 60, "{report}");
    assert!(report.is_balanced(), "{report}");
    assert_eq!(downstream.calls.load(Ordering::SeqCst), 60);
}

#[test]
fn the_rate_limit_spaces_handler_starts() {
    let downstream = Arc::new(Downstream::default());
    // 100 a second: a burst of 20, then one start every 10 ms.
    let handler = RateLimit::new(Mine(downstream.clone()), 100);
    let report = run_watched(&config(60), &handler, &Pause::new(), |_| {});
    assert_eq!(report.acked, 60, "{report}");
    assert!(report.rate_limited > 0, "{report}");
    let mut starts = downstream
        .starts
        .lock()
        .expect("no test thread panics holding it")
        .clone();
    starts.sort();
    // The 60th start is at least 40 intervals after the first reservation (which came no
    // later than the first start): a lower bound, which no scheduling delay can break.
    let spread = starts[59] - starts[0];
    assert!(spread >= Duration::from_millis(399), "{spread:?}");
}

#[test]
fn an_open_breaker_stops_the_pulls_and_held_messages_wait_instead_of_failing() {
    let downstream = Arc::new(Downstream::default());
    downstream.down.store(true, Ordering::SeqCst);
    let mut config = config(40);
    config.run.max_in_flight = 8;
    config.lease.max_attempts = 10;
    let layers = LayerConfig {
        handler_timeout: Some(Duration::from_millis(50)),
        rate_limit: Some(1000),
        breaker: Some(BreakerConfig {
            failures: 3,
            cooldown: Duration::from_millis(100),
        }),
    };
    layers.validate().expect("valid layers");
    let pause = Pause::new();
    let handler = layer::stack(Mine(downstream.clone()), &layers, &pause);
    let report = run_watched(&config, &handler, &pause, |metrics| {
        wait_until("the breaker opening", || metrics.breaker_opened() >= 1);
        // The downstream is still down, so the breaker is open or probing: no pulling.
        assert!(pause.pulling_paused() && !pause.is_ready());
        assert!(handler.is_open());
        // The messages in flight when it opened wait (the window is 8, the trip takes 3).
        wait_until("held messages", || metrics.breaker_held() >= 1);
        downstream.down.store(false, Ordering::SeqCst);
    });
    assert_eq!(report.acked, 40, "{report}");
    assert_eq!(report.dead_lettered, 0, "{report}");
    assert!(report.is_balanced(), "{report}");
    // Nacked: one per failed probe (each reopening). The 3 failures that opened it waited
    // (twice as long as their handlers ran) for it to open, and ran again once it closed,
    // as did the messages that failed while it was open.
    assert_eq!(report.nacked, report.breaker_opened - 1, "{report}");
    assert!(report.timed_out >= report.nacked, "{report}");
    // Only the nacked messages were delivered twice: no storm of redeliveries.
    assert_eq!(report.consumed, 40 + report.nacked, "{report}");
    assert!(!pause.pulling_paused() && pause.is_ready());
}

/// Rejects every message: data no handler can use.
struct Picky;

impl Handler for Picky {
    async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
        Err(HandleError::reject("not a host name"))
    }
}

#[test]
fn rejections_are_about_the_message_and_never_open_the_breaker() {
    let pause = Pause::new();
    let settings = BreakerConfig {
        failures: 1,
        cooldown: Duration::from_secs(60),
    };
    let handler = layer::Breaker::new(Picky, settings, pause.clone());
    let report = run_watched(&config(20), &handler, &pause, |_| {});
    assert_eq!(report.rejected, 20, "{report}");
    assert_eq!(report.dead_lettered, 20, "{report}");
    assert_eq!(report.breaker_opened, 0, "{report}");
    assert!(!handler.is_open() && pause.is_ready());
}

#[test]
fn the_chaos_monkey_at_its_default_failure_rates_behind_a_breaker_handles_every_message() {
    // A quarter of saves and of restarts fail at random: two failures in a row come by
    // chance every few dozen messages, so the breaker opens and closes many times. Each
    // held message runs again with new dice; before it did, it failed again the same way,
    // every probe failed, and the run stalled for a cooldown per held message.
    let mut config = config(300);
    config.run.max_in_flight = 32;
    config.run.seed = Some(11);
    let mut settings = MayhemConfig::from_config(&config, 11);
    settings.latency = Duration::from_millis(1);
    assert_eq!(settings.save_failure_rate, 0.25, "the default rates");
    let pause = Pause::new();
    let breaker = BreakerConfig {
        failures: 2,
        cooldown: Duration::from_millis(10),
    };
    let handler = layer::Breaker::new(MayhemHandler::new(settings), breaker, pause.clone());
    let report = run_watched(&config, &handler, &pause, |_| {});
    assert_eq!(report.acked + report.dead_lettered, 300, "{report}");
    assert!(report.is_balanced(), "{report}");
    assert!(report.breaker_opened >= 2, "{report}");
    assert!(!handler.is_open() && pause.is_ready());
}

/// Fails its first `failures` calls (a downstream down, then back), then succeeds.
struct DownFor {
    /// Calls still to fail.
    failures: AtomicU64,
}

impl Handler for DownFor {
    async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
        let down = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if down {
            return Err(HandleError::Other("database down".into()));
        }
        Ok(())
    }
}

#[test]
fn an_open_breaker_with_no_message_held_pulls_one_to_probe_after_its_cooldown() {
    // One message in flight at most: the failed probe is nacked, and then no message is
    // held to be the next probe. Before the consumers pulled again after a cooldown, the
    // breaker stayed open for ever with nothing to probe it, and the run never ended.
    let mut config = config(3);
    config.run.max_in_flight = 1;
    config.lease.max_attempts = 10;
    let pause = Pause::new();
    let settings = BreakerConfig {
        failures: 1,
        cooldown: Duration::from_millis(10),
    };
    let downstream = DownFor {
        failures: AtomicU64::new(4),
    };
    let handler = layer::Breaker::new(downstream, settings, pause.clone());
    let report = run_watched(&config, &handler, &pause, |_| {});
    // Call 1 opens the breaker (held, not nacked); calls 2 to 4 are failed probes, each
    // nacked and reopening it; call 5, a probe pulled after the cooldown, closes it.
    assert_eq!(report.acked, 3, "{report}");
    assert_eq!(report.breaker_opened, 4, "{report}");
    assert_eq!(report.nacked, 3, "{report}");
    assert_eq!(report.dead_lettered, 0, "{report}");
    assert!(report.is_balanced(), "{report}");
    assert!(!handler.is_open() && pause.is_ready());
}
