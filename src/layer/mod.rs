//! Layers: generic wrappers an embedder puts around any [`Handler`], as Watermill's
//! middleware or tower's layers do.
//!
//! Each layer is `impl<H: Handler> Handler for Layer<H>`, counts what it does in the one
//! counter table of [`Metrics`](crate::Metrics) (so in the report, `/metrics` and the stats
//! line), and has an `optional` constructor that passes every message straight through when
//! its setting is `None`:
//!
//! - [`Timeout`] (`--handler-timeout`): a handler still running past a limit is dropped and
//!   its message nacked, counted `timed_out`;
//! - [`RateLimit`] (`--rate-limit`): at most N handler starts a second, counted
//!   `rate_limited` when a start had to wait;
//! - [`Breaker`] (`--breaker-failures`, `--breaker-cooldown`): after N failures in a row the
//!   consumers stop pulling and held messages wait, until a probe succeeds; counted
//!   `breaker_opened` and `breaker_held`.
//!
//! [`stack`] composes the three the way the binary does, from a [`LayerConfig`]:
//! `Breaker(RateLimit(Timeout(handler)))`. The order is deliberate: the timeout bounds the
//! handler's own work only, never a wait for a start; a time-out is a failure the breaker
//! counts; and messages the open breaker holds take no start from the rate limit.
//!
//! ```
//! use std::time::Duration;
//! use mayhem::layer::{self, BreakerConfig, LayerConfig};
//! use mayhem::{Config, Context, HandleError, Handler, Pause, Shutdown, Subscription};
//!
//! struct Mine;
//! impl Handler for Mine {
//!     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
//!         Ok(())
//!     }
//! }
//!
//! let mut config = Config::default();
//! config.run.messages = Some(20);
//! config.publish.interval = Duration::ZERO;
//! let layers = LayerConfig {
//!     handler_timeout: Some(Duration::from_secs(1)),
//!     rate_limit: Some(1000),
//!     breaker: Some(BreakerConfig { failures: 5, cooldown: Duration::from_secs(1) }),
//! };
//! layers.validate().unwrap();
//! let pause = Pause::new();
//! let handler = layer::stack(Mine, &layers, &pause);
//! let subscription = Subscription::new(config.subscription());
//! let report = mayhem::Runner::new(&config)
//!     .publisher(&subscription)
//!     .pause(&pause)
//!     .run(&subscription, &handler, &Shutdown::new())
//!     .unwrap();
//! assert_eq!(report.acked, 20);
//! ```

pub mod breaker;
pub mod rate_limit;
pub mod timeout;

use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use pin_project_lite::pin_project;

pub use breaker::{Breaker, BreakerConfig};
pub use rate_limit::RateLimit;
pub use timeout::Timeout;

pin_project! {
    /// A layer's future: the inner handler's own future when the layer is off, or the
    /// layer's work, boxed, when it is on. An `async fn` keeps room for its largest state,
    /// so a layer written as one made every task larger with the layer off too (three layers
    /// added 232 bytes to each message in flight); this way an off layer adds a tag, and an
    /// on layer one allocation per message.
    #[project = PassProjection]
    pub(crate) enum Pass<A, B> {
        /// The layer is off: the inner handler's future.
        Through { #[pin] inner: A },
        /// The layer is on: its work.
        Layered { layered: Pin<Box<B>> },
    }
}

impl<A, B, T> Future for Pass<A, B>
where
    A: Future<Output = T>,
    B: Future<Output = T>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<T> {
        match self.project() {
            PassProjection::Through { inner } => inner.poll(cx),
            PassProjection::Layered { layered } => layered.as_mut().poll(cx),
        }
    }
}

use crate::config::duration;
use crate::error::ConfigError;
use crate::handler::Handler;
use crate::pause::Pause;

/// The most handler starts a second `--rate-limit` accepts.
pub const MAX_RATE_LIMIT: u32 = 10_000_000;
/// The most failures in a row `--breaker-failures` accepts.
pub const MAX_BREAKER_FAILURES: u32 = 1_000_000;
/// The longest time limit, or cooldown, the layers accept (one day).
const MAX_LAYER_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Which layers the binary puts around its handler; every one is off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerConfig {
    /// `--handler-timeout`: drop a handler that runs longer (`None` = no limit).
    pub handler_timeout: Option<Duration>,
    /// `--rate-limit`: most handler starts a second (`None` = no limit).
    pub rate_limit: Option<u32>,
    /// `--breaker-failures` and `--breaker-cooldown` (`None` = no breaker).
    pub breaker: Option<BreakerConfig>,
}

/// The binary's composition of the layers around a handler.
pub type Stack<H> = Breaker<RateLimit<Timeout<H>>>;

impl LayerConfig {
    /// Checks every value.
    ///
    /// # Errors
    ///
    /// The first bad setting, named by its command-line flag.
    ///
    /// ```
    /// let layers = mayhem::layer::LayerConfig { rate_limit: Some(0), ..Default::default() };
    /// assert_eq!(layers.validate().unwrap_err().option, "--rate-limit");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(limit) = self.handler_timeout {
            duration(
                "--handler-timeout",
                limit,
                Duration::from_millis(1),
                MAX_LAYER_DURATION,
            )?;
        }
        if let Some(rate) = self.rate_limit {
            if !(1..=MAX_RATE_LIMIT).contains(&rate) {
                return Err(ConfigError::new(
                    "--rate-limit",
                    rate,
                    format!("must be between 1 and {MAX_RATE_LIMIT}"),
                ));
            }
        }
        if let Some(breaker) = self.breaker {
            if !(1..=MAX_BREAKER_FAILURES).contains(&breaker.failures) {
                return Err(ConfigError::new(
                    "--breaker-failures",
                    breaker.failures,
                    format!("must be between 1 and {MAX_BREAKER_FAILURES}"),
                ));
            }
            duration(
                "--breaker-cooldown",
                breaker.cooldown,
                Duration::from_millis(1),
                MAX_LAYER_DURATION,
            )?;
        }
        Ok(())
    }
}

/// Puts the layers `config` turns on around `handler`: `Breaker(RateLimit(Timeout(handler)))`,
/// each passing messages straight through when off. The breaker holds `pause` while open.
pub fn stack<H: Handler>(handler: H, config: &LayerConfig, pause: &Pause) -> Stack<H> {
    Breaker::optional(
        RateLimit::optional(
            Timeout::optional(handler, config.handler_timeout),
            config.rate_limit,
        ),
        config.breaker,
        pause.clone(),
    )
}
