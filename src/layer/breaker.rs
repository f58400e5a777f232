//! The circuit-breaker layer: after N failures in a row, stop taking work until a probe
//! succeeds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::future;
use log::{info, warn};

use crate::error::HandleError;
use crate::handler::{Context, Handler};
use crate::layer::Pass;
use crate::pause::Pause;
use crate::sync;

/// Settings of a [`Breaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker (at least 1).
    pub failures: u32,
    /// How long it stays open before one message is let through as a probe.
    pub cooldown: Duration,
}

/// A circuit breaker around a handler whose failures mostly come from one downstream (a
/// database): once it fails `failures` times in a row the downstream is taken to be down.
///
/// - **Closed**: messages run; a success resets the count of failures in a row. A failure
///   is not returned at once: it waits twice as long as its handler ran (at most
///   `cooldown`), in case the breaker opens meanwhile; then it is returned (nacked). Under
///   a window of thousands, successes of handlers that made their call before an outage
///   keep coming in among the failures and resetting the count: a database outage, with a
///   window of 5,000 and 10 failures to open, cost 1,013 nacks before 10 came in a row. A
///   failure that waited for the opening is held as below, and runs again.
/// - **Open** (after `failures` in a row, one warning; those failures wait and run again):
///   the breaker holds its [`Pause`], so
///   the consumers stop pulling; messages already held wait, their handler start awaited,
///   instead of failing one after the other and being nacked in a storm. A message whose
///   handler had started before the breaker opened and fails while it is open waits too,
///   then runs again: it was the downstream that failed, so no delivery attempt is used.
///   The lease manager keeps extending the leases of waiting messages (up to `--max-lease`).
///   A message run again is told so by [`Context::run`], so that a handler drawing random
///   outcomes does not replay the failure that held it.
/// - **Half-open** (after `cooldown`, one line): the first message to ask becomes the probe;
///   the others keep waiting. When no message is held to ask (the last probe was nacked,
///   and nothing else was in flight, or the waiting messages were cancelled), the consumers
///   pull again after the cooldown, only until a message arrives to be the probe. While a
///   message waits, they do not: it becomes the probe when the cooldown ends, and nothing
///   more is pulled during an outage however many cooldowns it lasts. A probe that succeeds closes the breaker (one
///   line), releases the pause and lets every waiting message run; a probe that fails is
///   nacked (the one attempt a cooldown costs, so that a message that can never succeed
///   still reaches the dead letters) and opens the breaker for another cooldown (one
///   warning).
///
/// A [`HandleError::Rejected`] message is about the message, not the downstream: it is
/// dead-lettered as usual and neither counts as a failure nor waits.
///
/// Each opening (the first, and each after a failed probe) is counted in [`Metrics::breaker_opened`](crate::Metrics::breaker_opened),
/// each message that had to wait in [`Metrics::breaker_held`](crate::Metrics::breaker_held).
/// Only failed probes, and failures the breaker did not open for, are nacked.
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
/// use mayhem::layer::{Breaker, BreakerConfig};
/// use mayhem::{Context, HandleError, Handler, Metrics, Pause, PubSubMessage};
///
/// struct Down;
/// impl Handler for Down {
///     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
///         Err(HandleError::Other("database down".into()))
///     }
/// }
///
/// let pause = Pause::new();
/// let settings = BreakerConfig { failures: 2, cooldown: Duration::from_millis(20) };
/// let handler = Breaker::new(Down, settings, pause.clone());
/// let (message, extended, metrics) = (PubSubMessage::random(&mut mayhem::Rng::with_seed(1)),
///     AtomicU32::new(0), Metrics::default());
/// let ctx = Context::new(&message, 1, &extended, &metrics);
/// // The first failure: the breaker stays closed, the error is returned (nacked).
/// assert!(smol::block_on(handler.handle(&ctx)).is_err());
/// assert!(!handler.is_open());
/// // The second in a row opens it and waits; after the cooldown it runs again as the probe,
/// // which fails: the error is returned, and the breaker is open again.
/// assert!(smol::block_on(handler.handle(&ctx)).is_err());
/// assert!(handler.is_open() && pause.pulling_paused());
/// assert_eq!(metrics.breaker_opened(), 2);
/// assert_eq!(metrics.breaker_held(), 1);
/// ```
#[derive(Debug)]
pub struct Breaker<H> {
    /// The handler whose failures are counted.
    inner: H,
    /// The breaker; `None` passes every message straight through.
    circuit: Option<Circuit>,
}

/// The state and settings of one breaker.
#[derive(Debug)]
struct Circuit {
    /// Tells this breaker's hold on the [`Pause`] from other breakers'.
    id: u64,
    /// The settings.
    config: BreakerConfig,
    /// Held while the breaker is open or half-open: the consumers stop pulling.
    pause: Pause,
    /// The state. A mutex, not atomics: a transition reads and writes it together, and
    /// it is held for a few operations, never across an await.
    state: Mutex<State>,
    /// Notified at every change of state, to wake the messages that wait.
    changed: Event,
    /// Messages waiting in [`Circuit::admit`]; changed only with `state` locked. While
    /// one waits, the pause holds the consumers past the cooldown: a waiting message is the
    /// next probe, none has to be pulled.
    waiting: AtomicUsize,
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Messages run; the count is of failures in a row.
    Closed(u32),
    /// Messages wait until this instant; then one is the probe.
    Open(Instant),
    /// The probe runs; every other message waits for its outcome.
    Probing,
}

/// What to do with a handler's result.
enum Verdict {
    /// Return it: ack on success, nack on failure.
    Done,
    /// The handler failed while the breaker was open: wait, then run it again.
    Hold,
    /// The handler failed while the breaker was closed: wait a while for it to open (then
    /// hold), else return it.
    Suspend,
}

impl<H> Breaker<H> {
    /// `inner` behind a breaker with these settings, holding `pause` while it is open.
    pub fn new(inner: H, config: BreakerConfig, pause: Pause) -> Self {
        Self::optional(inner, Some(config), pause)
    }

    /// `inner` behind a breaker only when `config` is `Some`: `None` passes every message
    /// straight through, which is how the binary composes its flags (default: off).
    pub fn optional(inner: H, config: Option<BreakerConfig>, pause: Pause) -> Self {
        /// The next breaker's id.
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let circuit = config.map(|config| Circuit {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config: BreakerConfig {
                failures: config.failures.max(1),
                ..config
            },
            pause,
            state: Mutex::new(State::Closed(0)),
            changed: Event::new(),
            waiting: AtomicUsize::new(0),
        });
        Breaker { inner, circuit }
    }

    /// Whether the breaker is open or letting its probe through (never, when it is off).
    pub fn is_open(&self) -> bool {
        self.circuit
            .as_ref()
            .is_some_and(|circuit| !matches!(*circuit.lock(), State::Closed(_)))
    }

    /// The handler inside.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

impl<H: Handler> Handler for Breaker<H> {
    fn handle(
        &self,
        ctx: &Context<'_>,
    ) -> impl std::future::Future<Output = Result<(), HandleError>> + Send {
        match &self.circuit {
            None => Pass::Through {
                inner: self.inner.handle(ctx),
            },
            Some(circuit) => Pass::Layered {
                layered: Box::pin(self.guarded(circuit, ctx)),
            },
        }
    }
}

impl<H: Handler> Breaker<H> {
    /// Runs the handler behind the circuit.
    async fn guarded(&self, circuit: &Circuit, ctx: &Context<'_>) -> Result<(), HandleError> {
        let mut held = false;
        loop {
            let probe = circuit.admit(ctx, &mut held).await;
            let started = Instant::now();
            let result = self.inner.handle(ctx).await;
            match circuit.settle(probe, &result, ctx) {
                Verdict::Done => return result,
                Verdict::Hold => {}
                Verdict::Suspend => {
                    let wait = (started.elapsed() * 2).min(circuit.config.cooldown);
                    if !circuit.opens_within(wait).await {
                        return result;
                    }
                }
            }
            // The same delivery runs again: a handler drawing random outcomes draws anew.
            ctx.run_again();
        }
    }
}

impl Circuit {
    /// The state, whatever a panicking holder left (every write is a single assignment, so
    /// it is never half-done).
    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    /// Holds the pause for an open breaker (called with `state` locked): past the cooldown
    /// too while a message waits to be the probe, else only until the cooldown ends (then
    /// the consumers pull one to be the probe).
    fn hold_open(&self, until: Instant) {
        let until = (self.waiting.load(Ordering::SeqCst) == 0).then_some(until);
        self.pause.hold_breaker(self.id, until);
    }

    /// One message no longer waits (called with `state` locked): the last one lets the
    /// consumers of an open breaker pull a probe after the cooldown.
    fn stop_waiting(&self, state: &State) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if let State::Open(until) = *state {
            self.hold_open(until);
        }
    }

    /// Waits until the message may run; returns a probe guard when it runs as the probe.
    /// Counts the message as held the first time it has to wait.
    async fn admit<'c>(&'c self, ctx: &Context<'_>, held: &mut bool) -> Option<Probe<'c>> {
        // Counted in `waiting` from its first wait until it runs, or is dropped.
        let mut waiter: Option<Waiter<'c>> = None;
        loop {
            let (listener, until) = {
                let mut state = self.lock();
                let until = match *state {
                    State::Closed(_) => {
                        if let Some(waiter) = waiter.take() {
                            waiter.leave(&state);
                        }
                        return None;
                    }
                    State::Open(until) if Instant::now() >= until => {
                        // Probing before the waiter leaves: the last one leaving an open
                        // breaker would let the consumers pull, for an instant, the cooldown
                        // being over.
                        *state = State::Probing;
                        if let Some(waiter) = waiter.take() {
                            waiter.leave(&state);
                        }
                        // No more pulling: the consumers may have resumed to bring a probe.
                        self.pause.hold_breaker(self.id, None);
                        info!("Circuit breaker half-open: {} is the probe", ctx.message());
                        return Some(Probe {
                            circuit: self,
                            armed: true,
                        });
                    }
                    State::Open(until) => Some(until),
                    State::Probing => None,
                };
                if waiter.is_none() {
                    waiter = Some(Waiter::enter(self, &state));
                }
                // Listening before the lock is released: a change made after it cannot be
                // missed.
                (self.changed.listen(), until)
            };
            if !*held {
                *held = true;
                ctx.metrics().count_breaker_held();
            }
            match until {
                Some(until) => {
                    future::or(listener, async {
                        async_io::Timer::at(until).await;
                    })
                    .await
                }
                None => listener.await,
            }
        }
    }

    /// Whether the breaker is open (or probing) now, or opens within `wait`.
    async fn opens_within(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            let listener = {
                let state = self.lock();
                if !matches!(*state, State::Closed(_)) {
                    return true;
                }
                // Listening before the lock is released: an opening after it is not missed.
                self.changed.listen()
            };
            if Instant::now() >= until {
                return false;
            }
            let woken = future::or(
                async {
                    listener.await;
                    true
                },
                async {
                    async_io::Timer::at(until).await;
                    false
                },
            )
            .await;
            if !woken {
                return !matches!(*self.lock(), State::Closed(_));
            }
        }
    }

    /// Takes a handler's result into account and says what to do with it.
    fn settle(
        &self,
        probe: Option<Probe<'_>>,
        result: &Result<(), HandleError>,
        ctx: &Context<'_>,
    ) -> Verdict {
        // A rejection is about the message (data no handler can use), not the downstream:
        // it neither counts nor waits. A rejected probe proved nothing: the probe guard's
        // drop lets the next message probe at once.
        if result.as_ref().is_err_and(HandleError::is_rejection) {
            return Verdict::Done;
        }
        let mut state = self.lock();
        if let Some(mut probe) = probe {
            probe.armed = false;
            match result {
                Ok(()) => {
                    *state = State::Closed(0);
                    drop(state);
                    info!("Circuit breaker closed: the probe succeeded, consumers pull again");
                    self.pause.release_breaker(self.id);
                }
                Err(error) => {
                    let until = Instant::now() + self.config.cooldown;
                    *state = State::Open(until);
                    self.hold_open(until);
                    drop(state);
                    ctx.metrics().count_breaker_opened();
                    warn!(
                        "Circuit breaker open again: the probe failed ({error}); next probe in {}",
                        humantime::format_duration(self.config.cooldown)
                    );
                }
            }
            self.changed.notify(usize::MAX);
            return Verdict::Done;
        }
        match (*state, result) {
            (State::Closed(_), Ok(())) => {
                *state = State::Closed(0);
                Verdict::Done
            }
            (State::Closed(failures), Err(error)) => {
                let failures = failures + 1;
                if failures < self.config.failures {
                    *state = State::Closed(failures);
                    return Verdict::Suspend;
                }
                let until = Instant::now() + self.config.cooldown;
                *state = State::Open(until);
                // The pause first: whoever sees the count sees the consumers paused.
                self.hold_open(until);
                drop(state);
                ctx.metrics().count_breaker_opened();
                warn!(
                    "Circuit breaker opened after {failures} failures in a row (last: {error}): \
                     consumers stop pulling, held messages wait; probe in {}",
                    humantime::format_duration(self.config.cooldown)
                );
                self.changed.notify(usize::MAX);
                Verdict::Hold
            }
            // Started before the breaker opened: its success says nothing the probe will not.
            (State::Open(_) | State::Probing, Ok(())) => Verdict::Done,
            // Failed because the downstream is down: wait, and run again once it is back.
            (State::Open(_) | State::Probing, Err(_)) => Verdict::Hold,
        }
    }
}

impl Drop for Circuit {
    /// A breaker dropped while open gives the consumers back.
    fn drop(&mut self) {
        self.pause.release_breaker(self.id);
    }
}

/// The probe's turn. Dropped while still armed (its handler was cancelled, at shutdown),
/// it opens the breaker again at once, so that the next message probes instead of every
/// message waiting for an outcome that never comes.
struct Probe<'c> {
    /// The breaker probed.
    circuit: &'c Circuit,
    /// Whether the outcome is still unknown.
    armed: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = Instant::now();
            let mut state = self.circuit.lock();
            *state = State::Open(now);
            self.circuit.hold_open(now);
            drop(state);
            self.circuit.changed.notify(usize::MAX);
        }
    }
}

/// A message waiting in [`Circuit::admit`], counted in [`Circuit::waiting`]. Dropped with
/// its task (cancelled at shutdown, or its lease lost) it is no longer counted: when it was
/// the last, the consumers pull a probe again after the cooldown.
struct Waiter<'c> {
    /// The breaker waited on.
    circuit: &'c Circuit,
    /// Whether it still counts (`leave` was not called).
    counted: bool,
}

impl<'c> Waiter<'c> {
    /// Counts a message that starts waiting; `state` is the locked state. The first one
    /// holds the pause past the cooldown.
    fn enter(circuit: &'c Circuit, state: &State) -> Self {
        circuit.waiting.fetch_add(1, Ordering::SeqCst);
        if let State::Open(until) = *state {
            circuit.hold_open(until);
        }
        Waiter {
            circuit,
            counted: true,
        }
    }

    /// No longer counts the message; `state` is the locked state.
    fn leave(mut self, state: &State) {
        self.counted = false;
        self.circuit.stop_waiting(state);
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.circuit.stop_waiting(&self.circuit.lock());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};

    use super::{Breaker, BreakerConfig};
    use crate::{Context, HandleError, Handler, Metrics, Pause, PubSubMessage};

    /// Fails after 30 ms.
    struct Slow;
    impl Handler for Slow {
        async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
            async_io::Timer::after(Duration::from_millis(30)).await;
            Err(HandleError::Other("database down".into()))
        }
    }

    /// Fails on the first run of a delivery, succeeds when run again.
    struct FirstRunFails;
    impl Handler for FirstRunFails {
        async fn handle(&self, ctx: &Context<'_>) -> Result<(), HandleError> {
            if ctx.run() == 1 {
                return Err(HandleError::Other("database down".into()));
            }
            Ok(())
        }
    }

    #[test]
    fn a_held_message_runs_again_as_a_new_run_of_its_delivery() {
        let config = BreakerConfig {
            failures: 1,
            cooldown: Duration::from_millis(10),
        };
        let pause = Pause::new();
        let breaker = Breaker::new(FirstRunFails, config, pause.clone());
        let (message, extended, metrics) = (
            PubSubMessage::copy_from_slice(b"web-01"),
            AtomicU32::new(0),
            Metrics::default(),
        );
        let ctx = Context::new(&message, 1, &extended, &metrics);
        // The failure opens the breaker and is held; after the cooldown it runs again, as
        // the probe, told it is run 2: it succeeds and closes the breaker.
        assert!(smol::block_on(breaker.handle(&ctx)).is_ok());
        assert_eq!(ctx.run(), 2);
        assert_eq!(metrics.breaker_opened(), 1);
        assert!(!breaker.is_open() && !pause.pulling_paused());
    }

    /// Always fails.
    struct Down;
    impl Handler for Down {
        async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
            Err(HandleError::Other("database down".into()))
        }
    }

    #[test]
    fn consumers_stay_paused_past_the_cooldown_while_a_message_waits_to_probe() {
        let config = BreakerConfig {
            failures: 1,
            cooldown: Duration::from_millis(20),
        };
        let pause = Pause::new();
        let breaker = Breaker::new(Down, config, pause.clone());
        let (message, extended, metrics) = (
            PubSubMessage::copy_from_slice(b"web-01"),
            AtomicU32::new(0),
            Metrics::default(),
        );
        let ctx = Context::new(&message, 1, &extended, &metrics);
        let mut handling = Box::pin(breaker.handle(&ctx));
        // One poll: the failure opens the breaker and the message waits for the cooldown.
        assert!(smol::block_on(futures_lite::future::poll_once(&mut handling)).is_none());
        assert!(breaker.is_open() && pause.pulling_paused());
        assert_eq!(metrics.breaker_held(), 1);
        // The cooldown is over, and the waiting message (not polled since) is the next
        // probe: the consumers still do not pull.
        std::thread::sleep(config.cooldown + Duration::from_millis(5));
        assert!(pause.pulling_paused());
        // Cancelled (its task dropped): nobody is left to probe, so the consumers pull one.
        drop(handling);
        assert!(breaker.is_open() && !pause.pulling_paused());
    }

    #[test]
    fn a_failure_the_breaker_does_not_open_for_waits_twice_its_time_then_is_returned() {
        let config = BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(60),
        };
        let breaker = Breaker::new(Slow, config, Pause::new());
        let (message, extended, metrics) = (
            PubSubMessage::copy_from_slice(b"web-01"),
            AtomicU32::new(0),
            Metrics::default(),
        );
        let ctx = Context::new(&message, 1, &extended, &metrics);
        let started = Instant::now();
        assert!(smol::block_on(breaker.handle(&ctx)).is_err());
        // 30 ms of handling, then at least 60 ms of waiting for an opening that never came.
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert!(!breaker.is_open());
        assert_eq!(metrics.breaker_opened(), 0);
    }
}
