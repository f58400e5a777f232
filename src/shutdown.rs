//! The shutdown handle: a value a program passes into [`Runner::run`](crate::Runner::run) and triggers itself.
//!
//! It is a shared `AtomicBool` (checked without locking on every loop of every thread) plus a
//! condition variable that wakes threads sleeping in [`Shutdown::wait_timeout`], such as
//! publishers in their pause between two messages. The library never installs a signal
//! handler: a binary does, and calls [`Shutdown::trigger`] from it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync;

/// Why the service shuts down.
///
/// New reasons may come in minor releases (`#[non_exhaustive]`): a `match` needs a `_` arm,
/// or can use [`ShutdownReason::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// A signal arrived; the text is its name, like `SIGTERM`.
    Signal(String),
    /// The embedding program asked for it.
    Requested,
    /// `--messages N` were all published and settled.
    Completed,
    /// A handler panicked (the reference's global exception handler).
    Panicked(String),
    /// The source failed for good (for example, its server stayed unreachable); the text
    /// says how.
    Failed(String),
}

impl ShutdownReason {
    /// A short name for reports: `signal`, `requested`, `completed`, `panicked` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            ShutdownReason::Signal(_) => "signal",
            ShutdownReason::Requested => "requested",
            ShutdownReason::Completed => "completed",
            ShutdownReason::Panicked(_) => "panicked",
            ShutdownReason::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Signal(name) => write!(f, "signal {name}"),
            ShutdownReason::Requested => f.write_str("requested"),
            ShutdownReason::Completed => f.write_str("all messages settled"),
            ShutdownReason::Panicked(text) => write!(f, "handler panicked: {text}"),
            ShutdownReason::Failed(text) => write!(f, "source failed: {text}"),
        }
    }
}

/// A cloneable handle that starts one graceful shutdown; triggering it again does nothing.
///
/// ```
/// use mayhem::{Shutdown, ShutdownReason};
/// let shutdown = Shutdown::new();
/// assert!(!shutdown.is_triggered());
/// assert!(shutdown.trigger(ShutdownReason::Requested));
/// assert!(!shutdown.trigger(ShutdownReason::Completed)); // idempotent: the first reason stays
/// assert_eq!(shutdown.reason(), Some(ShutdownReason::Requested));
/// ```
#[derive(Clone, Default)]
pub struct Shutdown {
    /// The state shared by every clone.
    inner: Arc<Inner>,
}

/// What the clones of a [`Shutdown`] share.
#[derive(Default)]
struct Inner {
    /// The flag every loop checks; set once, never cleared.
    triggered: AtomicBool,
    /// The first reason given; guarded so that it is set together with the wake-up.
    reason: Mutex<Option<ShutdownReason>>,
    /// Wakes threads blocked in `wait` or `wait_timeout`.
    woken: Condvar,
}

impl Shutdown {
    /// A handle not yet triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown. Returns `true` for the first call, `false` when it had already
    /// begun (the first reason is kept).
    pub fn trigger(&self, reason: ShutdownReason) -> bool {
        let mut slot = sync::lock(&self.inner.reason);
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason);
        self.inner.triggered.store(true, Ordering::SeqCst);
        self.inner.woken.notify_all();
        true
    }

    /// Whether the shutdown has begun. Lock-free; fine to call in every loop.
    pub fn is_triggered(&self) -> bool {
        self.inner.triggered.load(Ordering::SeqCst)
    }

    /// The reason of the shutdown, once triggered.
    pub fn reason(&self) -> Option<ShutdownReason> {
        sync::lock(&self.inner.reason).clone()
    }

    /// Blocks until the shutdown is triggered and returns its reason.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread; do not call it inside a future.
    pub fn wait(&self) -> ShutdownReason {
        let mut slot = sync::lock(&self.inner.reason);
        loop {
            if let Some(reason) = slot.as_ref() {
                return reason.clone();
            }
            slot = sync::wait(&self.inner.woken, slot);
        }
    }

    /// Blocks up to `timeout`, returning early (with `true`) once the shutdown is triggered.
    /// This is the interruptible pause of the publishers.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread; do not call it inside a future.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let end = Instant::now().checked_add(timeout);
        let mut slot = sync::lock(&self.inner.reason);
        loop {
            if slot.is_some() {
                return true;
            }
            let left = match end {
                Some(end) => end.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return false;
            }
            slot = sync::wait_timeout(&self.inner.woken, slot, left).0;
        }
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("reason", &self.reason())
            .finish()
    }
}
