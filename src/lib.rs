//! Mayhem: a mock chaos monkey, and a runtime-agnostic pub/sub worker.
//!
//! Mayhem consumes "restart this host" messages from a pub/sub subscription and handles each
//! one concurrently: restart the host, save a record, keep the message's lease alive, ack it.
//! Its point is the bridge between plain synchronous threads (the kind a sync pub/sub client
//! library gives you) and async handlers, and a shutdown that is clean and deterministic.
//!
//! # Data flow
//!
//! ```text
//!  publisher threads ──Publish::publish (batches)──▶ broker (in-memory, Redis, RabbitMQ)
//!                                                     │ Source::pull: blocking, leases in batches
//!                                                     ▼
//!  consumer threads ──lease manager admits each lease──▶ bounded async_channel (send_blocking)
//!                                                     │ recv().await in the executor threads
//!                                                     ▼
//!  executor threads ──one task per message: the handler──▶ ack / nack ──▶ broker
//!
//!  lease-manager thread: extends every lease held (waiting or being handled) in one batched
//!  call per round, from pull to settle
//! ```
//!
//! Shutdown is a [`Shutdown`] value passed into [`Runner::run`]: a shared `AtomicBool` that every loop
//! checks, plus closing the source and the channels, which wakes every blocked thread and
//! task. What stops is fixed in order, so the outcome is the same every time. The library
//! never installs signal handlers or a logger; the `mayhem` binary does both.
//!
//! # Modules
//!
//! - [`message`]: [`PubSubMessage`], Pub/Sub's message model for every broker (id, data as
//!   bytes, attributes, publish time, ordering key), its limits, and the host-name rule of the
//!   chaos monkey.
//! - [`source`]: the broker traits [`Publish`] and [`Source`] (batched ack, nack and extend),
//!   [`Lease`], [`Attributes`], and [`Delivery`], a lease with a drop guard that nacks;
//!   [`source::memory`] is [`Subscription`], the embedded in-memory pub/sub with real lease
//!   semantics, and the [`Clock`] it reads.
//!   `source::redis` (feature `redis`, on by default) is `RedisSource`, a broker on a Redis
//!   stream with a consumer group; `source::amqp` (feature `amqp`) is `AmqpSource`, a
//!   RabbitMQ quorum queue; `source::pubsub` (feature `pubsub`) is `PubSubSource`, a Google
//!   Cloud Pub/Sub subscription over REST.
//! - [`handler`]: the [`Handler`] trait and [`MayhemHandler`], the default;
//!   [`database`] is its simulated database (connection pool, outage).
//! - [`shutdown`]: [`Shutdown`], the handle a program triggers.
//! - [`pause`]: [`Pause`], the handle that stops taking work without shutting down (quiet
//!   mode, open circuit breakers) and says whether the service is ready.
//! - [`layer`]: wrappers around any [`Handler`]: `Timeout`, `RateLimit`, `Breaker`.
//! - [`config`]: [`Config`], every setting.
//! - [`metrics`]: counters and the final [`Report`].
//! - [`error`]: the typed errors.
//! - the pipeline (private): publisher and consumer threads, the lease manager, the
//!   executor-thread bridge, the per-message task, flow control; [`Runner`] wires them, the one entry point.
//!
//! # Embedding
//!
//! A plain `fn main`, a custom handler, and a programmatic stop:
//!
//! ```
//! use std::time::Duration;
//! use mayhem::{Config, Context, HandleError, Handler, Runner, Shutdown, ShutdownReason, Subscription};
//!
//! struct Noop;
//!
//! impl Handler for Noop {
//!     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
//!         Ok(())
//!     }
//! }
//!
//! let mut config = Config::default();
//! config.publish.interval = Duration::from_millis(1);
//! let subscription = Subscription::new(config.subscription());
//! let shutdown = Shutdown::new();
//! let stopper = shutdown.clone();
//! let timer = std::thread::spawn(move || {
//!     std::thread::sleep(Duration::from_millis(50));
//!     stopper.trigger(ShutdownReason::Requested);
//! });
//! let report = Runner::new(&config)
//!     .publisher(&subscription)
//!     .run(&subscription, &Noop, &shutdown)
//!     .unwrap();
//! timer.join().unwrap();
//! assert_eq!(report.reason, "requested");
//! assert!(report.is_balanced());
//! ```
//!
//! Inside `smol::block_on` (or any executor's `block_on`), [`Runner::run`] may be called directly when
//! that future does nothing else meanwhile, since it blocks the thread until the shutdown. An
//! async program that goes on working hands it to a blocking pool instead:
//!
//! ```
//! # use std::time::Duration;
//! # use mayhem::{Config, Runner, Context, HandleError, Handler, Shutdown, ShutdownReason, Subscription};
//! # struct Noop;
//! # impl Handler for Noop {
//! #     async fn handle(&self, _ctx: &Context<'_>) -> Result<(), HandleError> {
//! #         Ok(())
//! #     }
//! # }
//! let mut config = Config::default();
//! config.publish.interval = Duration::from_millis(1);
//! let shutdown = Shutdown::new();
//! let report = smol::block_on(async {
//!     // `run` blocks its thread, so it runs on smol's blocking pool.
//!     let service = {
//!         let (config, shutdown) = (config.clone(), shutdown.clone());
//!         smol::unblock(move || {
//!             let subscription = Subscription::new((&config).into());
//!             Runner::new(&config)
//!                 .publisher(&subscription)
//!                 .run(&subscription, &Noop, &shutdown)
//!         })
//!     };
//!     // Meanwhile the program goes on with async work, then stops the service.
//!     smol::Timer::after(Duration::from_millis(50)).await;
//!     shutdown.trigger(ShutdownReason::Requested);
//!     service.await.unwrap()
//! });
//! assert_eq!(report.reason, "requested");
//! assert!(report.is_balanced());
//! ```
//!
//! `examples/embed_smol.rs` is the same as a program, with the chaos monkey's handler.
//!
//! # Features
//!
//! - `cli` (default): the `mayhem` binary and its dependencies (clap, signal-hook, env_filter,
//!   jiff, gethostname, libc). A library user turns it off:
//!   `mayhem-worker = { version = "0.1", default-features = false, features = ["redis"] }`.
//! - `redis` (default): the Redis Streams source.
//! - `amqp`: the RabbitMQ source (`AmqpSource`, a quorum queue through `lapin` on smol).
//! - `amqp-tls`: `amqp` with `amqps://` (rustls with ring, the system's CA certificates and
//!   `AmqpConfig::ca_file`).
//! - `pubsub`: the Google Cloud Pub/Sub source (`PubSubSource`, REST over ureq with rustls,
//!   serde_json, base64, ring for service-account JWTs; no tokio).

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod config;
pub mod database;
pub mod error;
pub mod handler;
pub mod layer;
pub mod message;
pub mod metrics;
pub mod pause;
mod pipeline;
pub mod shutdown;
pub mod source;
mod sync;

pub use bytes::Bytes;
pub use config::{Config, HandlerConfig, LeaseConfig, MemoryConfig, PublishConfig, RunConfig};
pub use error::{ConfigError, HandleError, LeaseError, RunError, SourceError};
pub use handler::{Context, Handler, MayhemConfig, MayhemHandler};
pub use message::{Attributes, HostNameError, MessageError, MessageId, PubSubMessage};
pub use metrics::{LatencySnapshot, Metrics, Report, REPORT_SCHEMA_VERSION};
pub use pause::Pause;
pub use pipeline::window::AUTO_CEILING;
#[allow(deprecated)]
pub use pipeline::{run, run_clients, run_controlled, run_with_metrics};
pub use pipeline::{Broker, Runner};
pub use shutdown::{Shutdown, ShutdownReason};
#[cfg(feature = "amqp")]
pub use source::amqp::{AmqpConfig, AmqpSource};
pub use source::memory::{
    Clock, DeadLetter, ManualClock, Subscription, SubscriptionConfig, SystemClock,
};
#[cfg(feature = "pubsub")]
pub use source::pubsub::{PubSubConfig, PubSubSource};
#[cfg(feature = "redis")]
pub use source::redis::{RedisConfig, RedisPublisher, RedisSource};
pub use source::{Delivery, Lease, LeaseId, Publish, Source, SourceStats};
pub use uuid::Uuid;

/// The random number generator that [`PubSubMessage::random`] draws from.
///
/// It is [fastrand](https://docs.rs/fastrand/2)'s `Rng`, re-exported so that callers need no
/// dependency of their own on fastrand (and get the same version): seed one with
/// `mayhem::Rng::with_seed(7)`. A new major version of fastrand would be a breaking change of
/// this crate.
pub use fastrand::Rng;
