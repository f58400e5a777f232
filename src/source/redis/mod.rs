//! A [`Source`] on a Redis stream with a consumer group (feature `redis`, on by default).
//!
//! # Mapping
//!
//! | `Source` | Redis |
//! |---|---|
//! | `publish` | `XADD stream * data <data> [message_id <id>] [ordering_key <key>] [<attribute> <value>]...` |
//! | start | claim the consumer name (a liveness key, see below); `XGROUP CREATE stream group <floor> MKSTREAM` (an existing group is kept); this consumer's own pending entries, left by an earlier instance of the same name, are marked expired |
//! | `pull` | entries idle past the ack deadline (`XPENDING ... IDLE` probes for one, `XAUTOCLAIM` claims them), then new ones (`XREADGROUP ... COUNT <free window> BLOCK ... STREAMS stream >`) |
//! | `ack` | `XACK stream group id...` (one per batch) |
//! | `extend` | `XCLAIM ... JUSTID` (resets the entry's idle time) |
//! | `nack` | a copy of the entry with its attempt count is added to the stream and the entry acked, in one script: the message is at once deliverable to any consumer |
//! | dead letter | a copy goes to `{stream}:dead` (bounded by [`RedisConfig::dead_letter_max`]) with its attempt count and the entry is acked, in one script |
//! | retention | `XTRIM stream MINID <lowest floor of every group>`, every [`RedisConfig::trim_interval`] |
//! | graceful stop | the liveness key is deleted; the consumer is removed (`XGROUP DELCONSUMER`) when it holds nothing |
//!
//! Extensions, nacks and dead letters are checked for ownership first: one Lua script per
//! batch checks with `XPENDING` that this consumer still owns each entry with the same
//! delivery count, so a lease that expired and was claimed by another consumer (or by a later
//! pull of this one) is never extended, requeued or dead-lettered by its former holder. Acks
//! go as one `XACK` of many ids in the same round trip: an entry is acked at most once
//! whoever acks it, and a message whose handler succeeded is done even if its lease passed to
//! another consumer meanwhile (whose ack then counts as a late refusal).
//!
//! # One live instance per consumer name
//!
//! Two live instances with the same consumer name would take each other's entries. At start
//! an instance sets `{stream}:{group}:live:{consumer}` (`SET NX` with a time to live of
//! [`RedisConfig::liveness_ttl`]) and refreshes it five times per time to live. When the key
//! exists, start-up watches it for up to one time to live: if it expires, its holder is dead
//! and the name is taken over; if it is refreshed, start-up fails with an error naming the
//! consumer. An instance that finds its key taken over (it was stopped for longer than the
//! time to live) stops with [`SourceError::Unavailable`].
//!
//! The pending entries of a dead predecessor are not read back by a separate scan (a scan
//! that resumes after `XREADGROUP` has added new entries to the same list would deliver those
//! twice): they are marked idle past any deadline, and the one claim path takes them over.
//!
//! # Acks are queued
//!
//! `ack`, `nack` and `extend` are called by handlers on the executor and must not wait for a
//! round trip. They check the lease in a local table (an unknown lease, or one whose local
//! deadline passed, is pushed to `refused` at once), queue the operations and
//! return. A worker thread sends the queued operations, one script call per batch. An ack
//! that Redis refuses (the entry was claimed by another consumer meanwhile) is counted in
//! `stale_acks`, not in `acked`; [`Source::settled`] and `acked` count only acks Redis
//! confirmed.
//!
//! # Delivery guarantee
//!
//! At least once: a message is acked at most once (the ownership check), but a consumer that
//! dies or stalls past the ack deadline has its entries claimed and handled again by another.
//! A publish retried after a lost connection may add the same message twice.
//!
//! # A destroyed group
//!
//! When the group disappears mid-run (`XGROUP DESTROY`, `FLUSHALL`), the server no longer
//! knows what was acked. The source never loses unacked entries and does not replay the
//! acked history: each retention pass records the group's floor in `{stream}:{group}:floor`
//! (every entry below it is acked), and the group is recreated there. Entries at or above
//! the floor are delivered again: the ones that were pending or not yet delivered, plus the
//! few acked since the last retention pass (at most [`RedisConfig::trim_interval`] of work).
//! Without a recorded floor the group is created at `0`.
//!
//! # Connections
//!
//! The `redis` crate parses addresses and builds commands and scripts, but the connections
//! are the source's own (a socket and a read buffer, RESP2): a reply is framed without being
//! parsed, and the hot paths read it in place: the entries of an `XREADGROUP`, the
//! confirmations of a pipeline of `XADD`s. Every other reply is handed to the crate's parser.
//! TCP and Unix socket addresses are supported (`redis://`, `redis+unix://`), TLS is not.
//!
//! # Failures
//!
//! Lost connections are reopened with exponential backoff (50 ms doubling to 2 s), and so
//! is every other failing command (for example `WRONGTYPE` when the stream key was replaced):
//! the first failure logs one line, a different failure another, and the first success
//! after them `reconnected to redis ...`. Queued lease operations are kept and sent again
//! afterwards. When the failure lasts longer than [`RedisConfig::reconnect_limit`], `pull`
//! and `publish` return [`SourceError::Unavailable`] and the runner shuts the service down.
//! Start-up retries the same way within the same limit ([`RedisSource::connect_with`] stops
//! early when its [`Shutdown`] is triggered).
//!
//! # Shutdown
//!
//! Every command has a socket timeout (the blocking time plus 400 ms); after
//! [`Source::interrupt`] every command's timeout is 250 ms, and `stats`, `flush` and dropping
//! the source wait a bounded time: a stalled server (`SIGSTOP`) delays the exit by well under
//! a second. Lease operations left unsent are logged with their count; their entries are
//! claimed again after the ack deadline. The password of the URL is never logged: every
//! address and error text goes through one redaction.

mod acker;
mod claim;
mod config;
mod connection;
mod maintenance;
mod publish;
mod reply;
mod wire;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::warn;
use redis::Client;

use crate::error::SourceError;
use crate::shutdown::Shutdown;
use crate::source::kit::{self, LeaseTable, Secrets, Worker};
use crate::source::{Lease, LeaseId, Source, SourceStats};
use crate::sync::{lock, Outstanding};

use self::acker::{Op, OpKind};
use self::connection::{Failure, Health, Pooled, Scripts};
use self::reply::EntryId;

pub use self::config::{
    check_message, parse_url, RedisConfig, MAX_REDIS_INTERVAL, MIN_LIVENESS_TTL, MIN_TRIM_INTERVAL,
};
pub use self::publish::RedisPublisher;
pub use crate::source::redact_url;

/// How long `stats` waits for queued lease operations to be sent.
const STATS_WAIT: Duration = Duration::from_millis(250);
/// How long `stats` and dropping the source wait once the source was interrupted: the
/// service's exit must not wait on a stalled server.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(250);
/// Most entries one pull reads (`XREADGROUP COUNT`, when the window has room; large entries
/// are read fewer at a time, see `claim::READ_BYTES`). Each read costs the server a
/// command and its reply beside the entries themselves: reading 1,024 at a time instead of
/// 256 makes a quarter of the reads.
const READ_BATCH: usize = 1024;

/// A Redis stream consumed through a consumer group, with the lease semantics of
/// [`Source`]; see the [module docs](self) for the mapping.
///
/// Publishers and consumers take connections from a small pool (a blocked `XREADGROUP`
/// occupies its connection); queued acks, nacks and extensions go through a worker thread,
/// and a maintenance thread keeps the consumer name alive, trims the stream and watches the
/// group. Both threads are owned by the source and end when it is dropped.
pub struct RedisSource {
    /// The state shared with the worker threads.
    core: Arc<Core>,
    /// The thread sending queued lease operations, and its queue.
    worker: Worker<Op>,
    /// The maintenance thread.
    maintenance: Option<JoinHandle<()>>,
}

/// What the source and its threads share.
struct Core {
    /// The settings.
    config: RedisConfig,
    /// The URL with its password replaced, for log lines and errors.
    shown_url: String,
    /// The URL's secrets, removed from every error text.
    secrets: Secrets,
    /// `{stream}:dead`.
    dead_stream: String,
    /// `{stream}:{group}:live:{consumer}`.
    live_key: String,
    /// `{stream}:{group}:floor`.
    floor_key: String,
    /// This instance's value of the liveness key.
    token: String,
    /// The scripts' hashes.
    scripts: Scripts,
    /// A [`RedisPublisher`]: no consumer name, no group, no scripts, no threads.
    publish_only: bool,
    /// Opens connections.
    client: Client,
    /// Idle connections. A mutex, not a lock-free pool: it is held only to push or pop.
    pool: Mutex<Vec<Pooled>>,
    /// Connection health and the reconnect schedule.
    health: Mutex<Health>,
    /// Whether `health` records a failure; read without the lock on every command.
    failing: AtomicBool,
    /// Leases this consumer holds; a lease id is the slot index plus the slot's generation.
    leases: Mutex<Leases>,
    /// The counters (`remaining` is read from Redis when asked).
    stats: Mutex<SourceStats>,
    /// Acks and dead letters Redis confirmed, readable without a lock.
    settled: AtomicU64,
    /// Messages published through this source that the group is known to have settled.
    group_settled: AtomicU64,
    /// Messages published through this source, readable without a lock.
    published: AtomicU64,
    /// The group's pending and undelivered entries, as last read.
    remaining: AtomicU64,
    /// Lease operations queued and not yet answered.
    queued: Outstanding,
    /// Set by `interrupt`: publishes and pulls return `Closed`, commands get short timeouts.
    interrupted: AtomicBool,
    /// Set when the source is dropped: the threads stop retrying and end.
    closing: Mutex<bool>,
    /// Wakes the maintenance thread when `closing` is set.
    closing_signal: Condvar,
    /// Set when another instance took the consumer name over: pulls fail.
    name_lost: AtomicBool,
    /// Where the next `XAUTOCLAIM` starts (it scans a bounded part of the pending list), and
    /// when the next sweep of the pending list is due.
    claim_cursor: Mutex<ClaimCursor>,
    /// The mean size of the entries of the last read ([`PubSubMessage::size`]), 0 before
    /// the first: bounds how many entries one read asks for (see `claim::READ_BYTES`).
    entry_bytes: AtomicUsize,
    /// The server's ids of the connections in a blocking `XREADGROUP`: `interrupt` ends
    /// those reads with `CLIENT UNBLOCK` rather than waiting out their block (up to 50 ms
    /// after the last ack of a `--messages N` run).
    blocked_reads: Mutex<Vec<i64>>,
}

/// The position of the sweep of the pending list for expired entries.
struct ClaimCursor {
    /// Where the next `XAUTOCLAIM` starts; `0-0` starts a new sweep.
    start: String,
    /// No new sweep before this instant.
    due: Instant,
}

/// The lease table.
type Leases = LeaseTable<Held>;

/// One lease this consumer holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The stream entry.
    entry: EntryId,
    /// Redis's delivery count of the entry when it was leased.
    deliveries: u32,
    /// Delivery attempt of the message (earlier requeued deliveries included).
    attempt: u32,
    /// Local deadline; past it, acks and extensions are refused.
    deadline: Instant,
}

impl RedisSource {
    /// Connects to the server (retrying within [`RedisConfig::reconnect_limit`]), claims the
    /// consumer name, creates the consumer group if needed, and starts the worker threads.
    ///
    /// # Errors
    ///
    /// As [`connect_with`](Self::connect_with).
    pub fn connect(config: RedisConfig) -> Result<Self, SourceError> {
        Self::connect_with(config, &Shutdown::new())
    }

    /// [`connect`](Self::connect), giving up early (with [`SourceError::Closed`]) once `stop`
    /// is triggered, so that a signal during the start-up retries ends the program
    /// gracefully.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] for an invalid URL or settings, or a consumer name a live
    /// instance holds; [`SourceError::Unavailable`] when the server could not be reached (or
    /// kept failing) for the whole reconnect limit; [`SourceError::Closed`] when `stop` was
    /// triggered first.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread while retrying; do not call it inside a future.
    pub fn connect_with(config: RedisConfig, stop: &Shutdown) -> Result<Self, SourceError> {
        for (name, value) in [
            ("stream", &config.stream),
            ("group", &config.group),
            ("consumer", &config.consumer),
        ] {
            if value.is_empty() {
                return Err(SourceError::Backend(format!("the {name} name is empty")));
            }
        }
        if config.ack_deadline.is_zero() || config.max_attempts == 0 {
            return Err(SourceError::Backend(
                "ack deadline and max attempts must be above zero".to_owned(),
            ));
        }
        config
            .validate()
            .map_err(|error| SourceError::Backend(error.to_string()))?;
        parse_url(&config.url)?;
        let client = Client::open(config.url.as_str()).map_err(|error| {
            SourceError::Backend(format!(
                "invalid redis url: {}",
                Secrets::of(&config.url).scrub(&error.to_string())
            ))
        })?;
        let core = Arc::new(Core::new(config, client, false));
        core.start(stop)?;
        let worker_core = Arc::clone(&core);
        let worker = Worker::spawn("mayhem-redis-acks", move |queue| worker_core.run_ops(queue))?;
        let maintenance_core = Arc::clone(&core);
        let maintenance = kit::spawn("mayhem-redis-maintenance", move || {
            maintenance_core.run_maintenance();
        });
        // Built before the maintenance thread is known to run: dropped, it ends the worker.
        let mut source = RedisSource {
            core,
            worker,
            maintenance: None,
        };
        source.maintenance = Some(maintenance?);
        Ok(source)
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.core.config
    }

    /// Waits until every queued ack, nack and extension was answered by Redis, up to
    /// `timeout`, or until the server is found failing. Returns how many lease operations
    /// are still unsent (0: all were answered).
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread; do not call it inside a future.
    pub fn flush(&self, timeout: Duration) -> usize {
        self.core.flush(timeout)
    }

    /// Queues lease operations for the worker thread.
    /// Once the worker is gone (only while dropping), the entries stay pending in the group
    /// and are claimed again after the ack deadline, so nothing is lost.
    fn enqueue(&self, ops: Vec<Op>) {
        self.worker.send(&self.core.queued, ops);
    }

    /// Removes live leases from the table, one lock for the batch, and turns each into an
    /// operation; an unknown or locally expired lease is refused.
    fn take_all(
        &self,
        ids: &[LeaseId],
        refused: &mut Vec<LeaseId>,
        kind: impl Fn(&Held) -> OpKind,
    ) -> Vec<Op> {
        let (live, expired) =
            lock(&self.core.leases).take_live(ids, Instant::now(), |held| held.deadline, refused);
        if expired > 0 {
            lock(&self.core.stats).expired += expired;
        }
        live.into_iter()
            .map(|(id, held)| Op::new(kind(&held), id, held))
            .collect()
    }
}

impl Source for RedisSource {
    /// 1,024: every `XREADGROUP` costs the server a fixed part besides its entries.
    fn pull_batch(&self) -> usize {
        READ_BATCH
    }

    /// Claims expired entries, then reads new ones: `XREADGROUP COUNT` is what is left of
    /// `max`, the free part of the caller's flow-control window.
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        let core = &self.core;
        if core.interrupted.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if core.name_lost.load(Ordering::SeqCst) {
            return Err(SourceError::Unavailable(format!(
                "consumer name {} was taken over by another instance",
                core.config.consumer
            )));
        }
        if max == 0 {
            return Ok(());
        }
        core.expire_local();
        match core.pull_into(max, wait, out) {
            Ok(()) => Ok(()),
            Err(Failure::Down { retry_in }) => {
                // Nothing to deliver while the server fails; the consumer loop comes back.
                thread::sleep(retry_in.min(wait));
                Ok(())
            }
            Err(Failure::GaveUp(text)) => Err(SourceError::Unavailable(text)),
        }
    }

    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let ops = self.take_all(leases, refused, |_| OpKind::Ack);
        self.enqueue(ops);
        Ok(())
    }

    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        let max_attempts = self.core.config.max_attempts;
        let ops = self.take_all(leases, refused, |held| {
            if held.attempt >= max_attempts {
                OpKind::Dead
            } else {
                OpKind::Requeue
            }
        });
        self.enqueue(ops);
        Ok(())
    }

    /// Dead-letters the entry at once with `dead_reason` (queued, as every lease operation).
    fn reject(
        &self,
        lease: LeaseId,
        reason: &str,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let mut ops = self.take_all(&[lease], refused, |_| OpKind::Reject);
        let reason: Arc<str> = reason.into();
        for op in &mut ops {
            op.reason = Some(reason.clone());
        }
        self.enqueue(ops);
        Ok(())
    }

    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        let mut ops = Vec::with_capacity(leases.len());
        {
            let mut table = lock(&self.core.leases);
            for &lease in leases {
                match table.get_mut(lease) {
                    Some(held) if held.deadline > now => {
                        held.deadline = now + by;
                        ops.push(Op::new(OpKind::Extend, lease, *held));
                    }
                    _ => refused.push(lease),
                }
            }
        }
        self.enqueue(ops);
        Ok(())
    }

    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
        self.core.unblock_reads();
    }

    /// Waits for the queued lease operations; once the source is interrupted, at most a
    /// quarter of a second, so that a stalled server cannot hold up the exit.
    fn flush(&self, timeout: Duration) -> usize {
        let timeout = if self.core.interrupted.load(Ordering::SeqCst) {
            timeout.min(SHUTDOWN_WAIT)
        } else {
            timeout
        };
        // Reported by the caller: the drop's report leaves them out.
        self.core.queued.told(self.core.flush(timeout))
    }

    fn nack_all(&self) -> usize {
        let held: Vec<Held> = lock(&self.core.leases).drain().collect();
        let count = held.len();
        // The lease id only matters for answers to extensions, which these are not.
        self.enqueue(
            held.into_iter()
                .map(|held| Op::new(OpKind::Requeue, 0, held))
                .collect(),
        );
        self.core.flush(SHUTDOWN_WAIT);
        count
    }

    /// Acks and dead letters this instance had confirmed; once the whole group has drained
    /// (every entry delivered, none pending), at least every message published through this
    /// source: `--messages N` on a shared group completes when the instance published its N
    /// and either the group settled everything, whoever handled it, or this instance settled
    /// N entries itself (its own or others': on a stream where other instances publish
    /// without end, the group may never drain).
    fn settled(&self) -> u64 {
        self.core
            .settled
            .load(Ordering::Relaxed)
            .max(self.core.group_settled.load(Ordering::SeqCst))
    }

    /// The counters; `remaining` is what the whole group has left (entries not yet
    /// delivered plus entries pending).
    ///
    /// # Blocking
    ///
    /// Waits (at most a quarter of a second: the runner's thread that logs the stats line
    /// also reacts to the shutdown) until queued lease operations were answered, then asks
    /// Redis: call it from a thread, not inside a future.
    fn stats(&self) -> SourceStats {
        let core = &self.core;
        core.flush(STATS_WAIT);
        core.expire_local();
        let mut stats = *lock(&core.stats);
        // Asked of the server while it answers; else the maintenance thread's last answer.
        // Also after the interrupt, for the last report: an answer up to a tenth of a second
        // old still counted as pending the entries acked since (a lone instance's report
        // then did not balance), and once interrupted every command gives up after a
        // quarter of a second, so a stalled server cannot hold up the exit.
        let fresh = if core.failing.load(Ordering::SeqCst) {
            None
        } else {
            core.group_state()
        };
        stats.remaining = match fresh {
            Some(state) => {
                let remaining = state.pending + state.undelivered;
                core.remaining.store(remaining, Ordering::SeqCst);
                remaining
            }
            None => core.remaining.load(Ordering::SeqCst),
        };
        stats
    }
}

impl Drop for RedisSource {
    fn drop(&mut self) {
        let core = &self.core;
        *lock(&core.closing) = true;
        core.closing_signal.notify_all();
        // Closing the queue ends the worker once it has sent what is queued.
        self.worker.close();
        let end = Instant::now() + SHUTDOWN_WAIT;
        claim::MALFORMED_LOG.flush();
        let unsent = core.queued.untold(core.flush(SHUTDOWN_WAIT));
        if unsent > 0 {
            warn!(
                "{unsent} lease operations were left unsent to redis; their entries are \
                 claimed again after the ack deadline"
            );
        }
        core.release();
        self.worker.join_by(end, "redis ack");
        if let Some(maintenance) = self.maintenance.take() {
            kit::join_by(maintenance, end, "redis maintenance");
        }
    }
}

impl fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSource")
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// The shared state of a source not yet connected.
    fn new(config: RedisConfig, client: Client, publish_only: bool) -> Self {
        let now = Instant::now();
        Core {
            shown_url: redact_url(&config.url),
            secrets: Secrets::of(&config.url),
            dead_stream: format!("{}:dead", config.stream),
            live_key: format!(
                "{}:{}:live:{}",
                config.stream, config.group, config.consumer
            ),
            floor_key: format!("{}:{}:floor", config.stream, config.group),
            token: format!(
                "{}-{:016x}{:016x}",
                std::process::id(),
                fastrand::u64(..),
                fastrand::u64(..)
            ),
            scripts: Scripts::new(),
            publish_only,
            config,
            client,
            pool: Mutex::new(Vec::new()),
            health: Mutex::new(Health::new()),
            failing: AtomicBool::new(false),
            leases: Mutex::new(Leases::new()),
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            group_settled: AtomicU64::new(0),
            published: AtomicU64::new(0),
            remaining: AtomicU64::new(0),
            queued: Outstanding::default(),
            interrupted: AtomicBool::new(false),
            closing: Mutex::new(false),
            closing_signal: Condvar::new(),
            name_lost: AtomicBool::new(false),
            entry_bytes: AtomicUsize::new(0),
            blocked_reads: Mutex::new(Vec::new()),
            claim_cursor: Mutex::new(ClaimCursor {
                start: "0-0".to_owned(),
                due: now,
            }),
        }
    }

    /// Whether the source is being dropped.
    fn is_closing(&self) -> bool {
        *lock(&self.closing)
    }

    /// Waits until the queue of lease operations is empty, up to `timeout` or until the
    /// server is found failing; returns how many are left.
    fn flush(&self, timeout: Duration) -> usize {
        self.queued
            .wait_drained(timeout, || self.failing.load(Ordering::SeqCst))
    }

    /// Counts answered lease operations and wakes `flush` when none is left.
    fn answered(&self, count: u64) {
        self.queued.done(count);
    }
}
