//! A [`Source`] on a Redis stream with a consumer group (feature `redis`, on by default).
//!
//! # Mapping
//!
//! | `Source` | Redis |
//! |---|---|
//! | `publish` | `XADD stream * message_id <uuid> instance_name <name>` |
//! | start | `XGROUP CREATE stream group 0 MKSTREAM` (an existing group is kept) |
//! | `pull` | first this consumer's own pending entries left by an earlier run with the same consumer name (`XPENDING` + `XCLAIM`, once), then entries idle past the ack deadline (`XAUTOCLAIM`), then new ones (`XREADGROUP ... BLOCK ... STREAMS stream >`) |
//! | `ack` | `XACK` |
//! | `extend` | `XCLAIM ... JUSTID` (resets the entry's idle time) |
//! | `nack` | a copy of the entry with its attempt count is added to the stream and the entry acked, in one script: the message is at once deliverable to any consumer |
//! | dead letter | a copy goes to `{stream}:dead` with its attempt count and the entry is acked, in one script |
//!
//! Every lease operation runs as a Lua script that first checks with `XPENDING` that this
//! consumer still owns the entry with the same delivery count, so a lease that expired and was
//! claimed by another consumer (or by a later pull of this one) is never acked, extended or
//! nacked by its former holder.
//!
//! # Acks are queued
//!
//! `ack`, `nack` and `extend` are called by handlers on the executor and must not wait for a
//! round trip. They check the lease in a local table (an unknown lease, or one whose local
//! deadline passed, is refused with [`LeaseError::Expired`] at once), queue the operation and
//! return. A worker thread with its own connection sends the queued operations in pipelined
//! batches. An ack that Redis refuses (the entry was claimed by another consumer meanwhile) is
//! counted in `stale_acks`, not in `acked`; [`Source::settled`] and `acked` count only acks
//! Redis confirmed. [`Source::stats`] first waits (briefly) until the queue is empty.
//!
//! # Delivery guarantee
//!
//! At least once: a message is acked at most once (the ownership check), but a consumer that
//! dies or stalls past the ack deadline has its entries claimed and handled again by another.
//! A publish retried after a lost connection may add the same message twice.
//!
//! # Connection loss
//!
//! Lost connections are reopened with exponential backoff (50 ms doubling to 2 s). The first
//! failure logs `lost connection to redis ...` once, the first success after it
//! `reconnected to redis ...`. Queued lease operations are kept and sent again after the
//! reconnect. When the server stays unreachable for longer than
//! [`RedisConfig::reconnect_limit`], `pull` and `publish` return
//! [`SourceError::Unavailable`], and the runner shuts the service down.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use redis::{Client, Connection, RedisError, Value};
use slab::Slab;

use crate::error::{LeaseError, SourceError};
use crate::message::PubSubMessage;
use crate::source::{Envelope, Lease, LeaseId, Publish, Source, SourceStats};

/// First pause before reconnecting after a failure.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest pause between two reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Timeout of writes, of opening a connection, and of reads beyond the blocking time.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Most queued lease operations sent in one pipeline.
const OPS_BATCH: usize = 512;
/// How long `stats` waits for queued lease operations to be sent.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Longest sleep of a publish waiting for the server, so an interrupt is noticed promptly.
const RETRY_NAP: Duration = Duration::from_millis(50);

/// Checks ownership of one pending entry, then acks, extends, requeues or dead-letters it.
///
/// `KEYS`: stream, dead-letter stream. `ARGV`: group, entry id, consumer, delivery count
/// (`0`: any), operation (`ack`, `extend`, `requeue`, `dead`), attempts so far.
/// Returns 1 when done, 0 when another consumer owns the entry or it was delivered again
/// since, 2 when it is not pending at all (acked already, or gone).
/// Fields of an entry that are the message itself; every other field is an attribute.
const RESERVED_FIELDS: [&str; 3] = ["message_id", "instance_name", "attempts"];

const LEASE_SCRIPT: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then return 2 end
if p[1][2] ~= ARGV[3] or (ARGV[4] ~= '0' and p[1][4] ~= tonumber(ARGV[4])) then return 0 end
local op = ARGV[5]
if op == 'extend' then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
  return 1
end
if op ~= 'ack' then
  local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
  if #e > 0 then
    local args = {}
    local f = e[1][2]
    for i = 1, #f, 2 do
      if f[i] ~= 'attempts' then
        args[#args + 1] = f[i]
        args[#args + 1] = f[i + 1]
      end
    end
    args[#args + 1] = 'attempts'
    args[#args + 1] = ARGV[6]
    local target = KEYS[1]
    if op == 'dead' then target = KEYS[2] end
    redis.call('XADD', target, '*', unpack(args))
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Claims entries for this consumer, dead-lettering those past their attempts.
///
/// `KEYS`: stream, dead-letter stream. `ARGV`: group, consumer, max attempts, mode (`auto`:
/// `XAUTOCLAIM` of entries idle past the ack deadline; `own`: this consumer's own pending
/// entries), min idle ms, start id, count. Returns `{next start id, {{id, fields,
/// deliveries}...}, dead-lettered}`; a next start id of `0-0` means the scan is complete.
const CLAIM_SCRIPT: &str = r#"
local entries, cursor
if ARGV[4] == 'auto' then
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[5], ARGV[6], 'COUNT', ARGV[7])
  cursor = r[1]
  entries = r[2]
else
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[6], '+', ARGV[7], ARGV[2])
  if #p == 0 then return {'0-0', {}, 0} end
  local ids = {}
  for i, e in ipairs(p) do ids[i] = e[1] end
  cursor = '(' .. ids[#ids]
  entries = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))
end
local out = {}
local dead = 0
for _, e in ipairs(entries) do
  if type(e) == 'table' and type(e[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = p[1][4]
    local prior = 0
    local args = {}
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'attempts' then
        prior = tonumber(f[i + 1]) or 0
      else
        args[#args + 1] = f[i]
        args[#args + 1] = f[i + 1]
      end
    end
    if prior + n > tonumber(ARGV[3]) then
      args[#args + 1] = 'attempts'
      args[#args + 1] = tostring(prior + n - 1)
      redis.call('XADD', KEYS[2], '*', unpack(args))
      redis.call('XACK', KEYS[1], ARGV[1], e[1])
      dead = dead + 1
    else
      out[#out + 1] = {e[1], f, n}
    end
  end
end
return {cursor, out, dead}
"#;

/// Checks that `url` is a Redis address the client accepts, without connecting.
///
/// ```
/// use mayhem::redis_source::parse_url;
/// assert!(parse_url("redis://127.0.0.1:6379/0").is_ok());
/// assert!(parse_url("redis://127.0.0.1:notaport").is_err());
/// ```
///
/// # Errors
///
/// [`SourceError::Backend`] saying what is wrong with the address.
pub fn parse_url(url: &str) -> Result<(), SourceError> {
    use redis::IntoConnectionInfo;
    url.into_connection_info()
        .map(|_| ())
        .map_err(|error| SourceError::Backend(format!("invalid redis url: {error}")))
}

/// Settings of a [`RedisSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Server address, like `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// The stream messages are published to and consumed from.
    pub stream: String,
    /// The consumer group; instances sharing it split the messages.
    pub group: String,
    /// This consumer's name in the group; unique per running instance.
    pub consumer: String,
    /// How long a pulled entry stays leased without an extension; entries idle longer are
    /// claimed by the next pull of any consumer of the group.
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered to `{stream}:dead`.
    pub max_attempts: u32,
    /// Longest time one `XREADGROUP` blocks; short, so that shutdown is prompt.
    pub block: Duration,
    /// How long the server may stay unreachable before `pull` and `publish` fail with
    /// [`SourceError::Unavailable`].
    pub reconnect_limit: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".to_owned(),
            stream: "mayhem".to_owned(),
            group: "mayhem".to_owned(),
            consumer: "mayhem".to_owned(),
            ack_deadline: Duration::from_secs(3),
            max_attempts: 5,
            block: Duration::from_millis(100),
            reconnect_limit: Duration::from_secs(30),
        }
    }
}

/// A Redis stream consumed through a consumer group, with the lease semantics of
/// [`Source`]; see the [module docs](self) for the mapping.
///
/// Publishers and consumers take connections from a small pool (a blocked `XREADGROUP`
/// occupies its connection); queued acks, nacks and extensions go through one more connection
/// on a worker thread the source owns and joins when dropped.
pub struct RedisSource {
    /// The state shared with the worker thread.
    core: Arc<Core>,
    /// The queue of lease operations; `None` only while dropping.
    ops: Option<mpsc::Sender<Op>>,
    /// The worker thread sending queued lease operations.
    worker: Option<JoinHandle<()>>,
}

/// What the source and its worker thread share.
struct Core {
    /// The settings.
    config: RedisConfig,
    /// `{stream}:dead`.
    dead_stream: String,
    /// Opens connections.
    client: Client,
    /// Idle connections of publishers and consumers, tagged with the epoch they were opened
    /// in. A mutex, not a lock-free pool: it is held only to push or pop.
    pool: Mutex<Vec<(u64, Connection)>>,
    /// Connection health and the reconnect schedule.
    health: Mutex<Health>,
    /// Leases this consumer holds; a lease id is the slot index plus the slot's generation.
    leases: Mutex<Leases>,
    /// The counters (`remaining` is read from Redis when asked).
    stats: Mutex<SourceStats>,
    /// Acks and dead letters Redis confirmed, readable without a lock.
    settled: AtomicU64,
    /// Lease operations queued and not yet answered; `drained` signals when it reaches zero.
    queued: Mutex<u64>,
    /// Signalled when `queued` drops to zero.
    drained: Condvar,
    /// Set by `interrupt`: publishes and pulls return `Closed`.
    interrupted: AtomicBool,
    /// Set when the source is dropped: the worker stops retrying once the server is down.
    closing: AtomicBool,
    /// The pull's position in the two claim scans.
    claim: Mutex<ClaimCursor>,
}

/// Where the claim scans of `pull` continue.
struct ClaimCursor {
    /// Next start of the scan of this consumer's own pending entries; `None` once done.
    own: Option<String>,
    /// Next start id of `XAUTOCLAIM` (it scans a bounded part of the pending list per call).
    auto: String,
}

/// Connection health.
struct Health {
    /// Incremented on every loss: a failure of a connection from an earlier epoch is old news.
    epoch: u64,
    /// Since when the server is unreachable; `None` while it is reachable.
    down_since: Option<Instant>,
    /// The pause before the next reconnect attempt.
    backoff: Duration,
    /// No reconnect attempt before this instant.
    next_try: Instant,
    /// The last connection error, for the final error message.
    last_error: String,
}

/// The lease table.
struct Leases {
    /// Held leases.
    slots: Slab<Held>,
    /// Generation of the next lease.
    next_generation: u32,
}

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
    /// Tells this lease from earlier ones of the same slot.
    generation: u32,
}

/// A stream entry id, `ms-seq`, stored without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryId {
    /// Milliseconds part.
    ms: u64,
    /// Sequence part.
    seq: u64,
}

/// A delivered entry: its id, its `field value ...` list, and its delivery count.
type Entry = (String, Vec<Value>, u32);

/// A queued lease operation.
#[derive(Debug, Clone, Copy)]
struct Op {
    /// What to do.
    kind: OpKind,
    /// The lease (to expire it locally when Redis says it is not ours any more).
    lease: LeaseId,
    /// The entry.
    entry: EntryId,
    /// Delivery count the entry must still have.
    deliveries: u32,
    /// Attempts so far, stored with a requeued or dead-lettered copy.
    attempt: u32,
}

/// The kinds of lease operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    /// Ack the entry.
    Ack,
    /// Reset the entry's idle time.
    Extend,
    /// Add a copy for another delivery and ack the entry.
    Requeue,
    /// Add a copy to the dead-letter stream and ack the entry.
    Dead,
}

/// Why a command could not be run.
enum Failure {
    /// The server is unreachable; try again (after `retry_in`, with a new connection).
    Down {
        /// When the next reconnect attempt is due.
        retry_in: Duration,
    },
    /// The server has been unreachable for longer than the reconnect limit.
    GaveUp(String),
    /// The server answered with an error.
    Server(RedisError),
}

impl RedisSource {
    /// Connects to the server, creates the consumer group if needed, and starts the worker
    /// thread of lease operations.
    ///
    /// # Errors
    ///
    /// [`SourceError::Backend`] for an invalid URL or settings, a server that cannot be
    /// reached now, or a stream key that holds another type.
    pub fn connect(config: RedisConfig) -> Result<Self, SourceError> {
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
        let client = Client::open(config.url.as_str())
            .map_err(|error| SourceError::Backend(format!("invalid redis url: {error}")))?;
        let now = Instant::now();
        let core = Arc::new(Core {
            dead_stream: format!("{}:dead", config.stream),
            config,
            client,
            pool: Mutex::new(Vec::new()),
            health: Mutex::new(Health {
                epoch: 0,
                down_since: None,
                backoff: BACKOFF_START,
                next_try: now,
                last_error: String::new(),
            }),
            leases: Mutex::new(Leases {
                slots: Slab::new(),
                next_generation: 0,
            }),
            stats: Mutex::new(SourceStats::default()),
            settled: AtomicU64::new(0),
            queued: Mutex::new(0),
            drained: Condvar::new(),
            interrupted: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            claim: Mutex::new(ClaimCursor {
                own: Some("-".to_owned()),
                auto: "0-0".to_owned(),
            }),
        });
        // The first connection is opened here, so a wrong address fails at once instead of
        // after the reconnect limit.
        let connection = core
            .open()
            .map_err(|error| SourceError::Backend(format!("cannot connect to redis: {error}")))?;
        lock(&core.pool).push((0, connection));
        let (ops, queue) = mpsc::channel();
        let worker_core = Arc::clone(&core);
        let worker = thread::Builder::new()
            .name("mayhem-redis-acks".into())
            .spawn(move || worker_core.run_ops(queue))
            .map_err(|error| SourceError::Backend(format!("cannot start a thread: {error}")))?;
        Ok(RedisSource {
            core,
            ops: Some(ops),
            worker: Some(worker),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.core.config
    }

    /// Waits until every queued ack, nack and extension was answered by Redis, up to
    /// `timeout`, or until the server is found unreachable. Returns whether the queue is
    /// empty.
    ///
    /// # Blocking
    ///
    /// Blocks the calling thread; do not call it inside a future.
    pub fn flush(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut queued = lock(&self.core.queued);
        while *queued > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || lock(&self.core.health).down_since.is_some() {
                return false;
            }
            queued = self
                .core
                .drained
                .wait_timeout(queued, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Queues a lease operation for the worker thread.
    fn enqueue(&self, op: Op) {
        *lock(&self.core.queued) += 1;
        let sent = self.ops.as_ref().map(|ops| ops.send(op));
        if !matches!(sent, Some(Ok(()))) {
            // The worker is gone (only while dropping): the entry stays pending in the group
            // and is claimed again after the ack deadline, so nothing is lost.
            self.core.answered(1);
        }
    }

    /// Removes a live lease from the table; refuses an unknown or locally expired one.
    fn take(&self, id: LeaseId) -> Result<Held, LeaseError> {
        let mut leases = lock(&self.core.leases);
        let index = (id & u64::from(u32::MAX)) as usize;
        match leases.slots.get(index) {
            Some(held) if held.generation == (id >> 32) as u32 => {
                let held = leases.slots.remove(index);
                drop(leases);
                if held.deadline <= Instant::now() {
                    lock(&self.core.stats).expired += 1;
                    return Err(LeaseError::Expired);
                }
                Ok(held)
            }
            _ => Err(LeaseError::Expired),
        }
    }
}

impl Publish for RedisSource {
    fn publish(&self, batch: &[Envelope]) -> Result<(), SourceError> {
        for envelope in batch {
            if let Some((key, _)) = envelope
                .attributes
                .iter()
                .find(|(key, _)| RESERVED_FIELDS.contains(key))
            {
                return Err(SourceError::Backend(format!(
                    "attribute name '{key}' is reserved for the entry's own fields"
                )));
            }
        }
        for envelope in batch {
            self.publish_one(envelope)?;
        }
        Ok(())
    }

    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
    }
}

impl RedisSource {
    fn publish_one(&self, envelope: &Envelope) -> Result<(), SourceError> {
        let core = &self.core;
        let message = &envelope.message;
        let id = message.message_id().to_string();
        loop {
            if core.interrupted.load(Ordering::SeqCst) {
                return Err(SourceError::Closed);
            }
            let added = core.with_connection(|con| {
                redis::cmd("XADD")
                    .arg(&core.config.stream)
                    .arg("*")
                    .arg("message_id")
                    .arg(&id)
                    .arg("instance_name")
                    .arg(message.instance_name())
                    .arg(
                        envelope
                            .attributes
                            .iter()
                            .flat_map(|(key, value)| [key, value])
                            .collect::<Vec<_>>(),
                    )
                    .query::<Value>(con)
            });
            match added {
                Ok(_) => {
                    lock(&core.stats).published += 1;
                    return Ok(());
                }
                Err(Failure::Down { retry_in }) => thread::sleep(retry_in.min(RETRY_NAP)),
                Err(Failure::GaveUp(text)) => return Err(SourceError::Unavailable(text)),
                Err(Failure::Server(error)) => return Err(SourceError::Backend(error.to_string())),
            }
        }
    }
}

impl Source for RedisSource {
    fn pull(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), SourceError> {
        let core = &self.core;
        if core.interrupted.load(Ordering::SeqCst) {
            return Err(SourceError::Closed);
        }
        if max == 0 {
            return Ok(());
        }
        core.expire_local();
        let started = out.len();
        match core.pull_into(max, wait, out) {
            Ok(()) => Ok(()),
            Err(Failure::Down { retry_in }) => {
                // Nothing to deliver while the server is away; the consumer loop comes back.
                thread::sleep(retry_in.min(wait));
                Ok(())
            }
            Err(Failure::GaveUp(text)) => Err(SourceError::Unavailable(text)),
            Err(Failure::Server(error)) => {
                // What was claimed before the error is delivered; the rest comes next time.
                if out.len() > started {
                    error!("redis pull failed after claiming entries: {error}");
                    Ok(())
                } else {
                    Err(SourceError::Backend(error.to_string()))
                }
            }
        }
    }

    fn ack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        for &lease in leases {
            match self.take(lease) {
                Ok(held) => self.enqueue(Op::new(OpKind::Ack, lease, held)),
                Err(_) => refused.push(lease),
            }
        }
        Ok(())
    }

    fn nack(&self, leases: &[LeaseId], refused: &mut Vec<LeaseId>) -> Result<(), SourceError> {
        for &lease in leases {
            let Ok(held) = self.take(lease) else {
                refused.push(lease);
                continue;
            };
            let kind = if held.attempt >= self.core.config.max_attempts {
                OpKind::Dead
            } else {
                OpKind::Requeue
            };
            self.enqueue(Op::new(kind, lease, held));
        }
        Ok(())
    }

    fn extend(
        &self,
        leases: &[LeaseId],
        by: Duration,
        refused: &mut Vec<LeaseId>,
    ) -> Result<(), SourceError> {
        let now = Instant::now();
        for &lease in leases {
            let held = {
                let mut table = lock(&self.core.leases);
                let index = (lease & u64::from(u32::MAX)) as usize;
                match table.slots.get_mut(index) {
                    Some(held)
                        if held.generation == (lease >> 32) as u32 && held.deadline > now =>
                    {
                        held.deadline = now + by;
                        *held
                    }
                    _ => {
                        refused.push(lease);
                        continue;
                    }
                }
            };
            self.enqueue(Op::new(OpKind::Extend, lease, held));
        }
        Ok(())
    }

    fn flush(&self, timeout: Duration) -> usize {
        if RedisSource::flush(self, timeout) {
            0
        } else {
            usize::try_from(*lock(&self.core.queued)).unwrap_or(usize::MAX)
        }
    }

    fn interrupt(&self) {
        self.core.interrupted.store(true, Ordering::SeqCst);
    }

    fn nack_all(&self) -> usize {
        let held: Vec<Held> = lock(&self.core.leases).slots.drain().collect();
        let count = held.len();
        for held in held {
            // The lease id only matters for answers to extensions, which these are not.
            self.enqueue(Op::new(OpKind::Requeue, 0, held));
        }
        self.flush(IO_TIMEOUT);
        count
    }

    fn settled(&self) -> u64 {
        self.core.settled.load(Ordering::Relaxed)
    }

    /// The counters; `published`, `acked` and the rest count what this instance did, and
    /// `remaining` is what the whole group has left (entries not yet delivered plus entries
    /// pending), or 0 when Redis cannot be asked.
    ///
    /// # Blocking
    ///
    /// Waits (up to a few seconds) until queued lease operations were answered, then asks
    /// Redis: call it from a thread, not inside a future.
    fn stats(&self) -> SourceStats {
        self.flush(FLUSH_WAIT);
        self.core.expire_local();
        let mut stats = *lock(&self.core.stats);
        stats.remaining = self.core.group_remaining().unwrap_or(0);
        stats
    }
}

impl Drop for RedisSource {
    fn drop(&mut self) {
        self.core.closing.store(true, Ordering::SeqCst);
        // Closing the queue ends the worker once it has sent what is queued.
        self.ops = None;
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                error!("the redis ack thread panicked");
            }
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

impl Op {
    /// An operation on a held lease.
    fn new(kind: OpKind, lease: LeaseId, held: Held) -> Self {
        Op {
            kind,
            lease,
            entry: held.entry,
            deliveries: held.deliveries,
            attempt: held.attempt,
        }
    }

    /// The script's name of the operation.
    fn name(&self) -> &'static str {
        match self.kind {
            OpKind::Ack => "ack",
            OpKind::Extend => "extend",
            OpKind::Requeue => "requeue",
            OpKind::Dead => "dead",
        }
    }
}

impl EntryId {
    /// Parses `ms-seq`.
    fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl Core {
    /// Opens a connection with timeouts and prepares the server.
    fn open(&self) -> Result<Connection, RedisError> {
        let mut con = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        con.set_read_timeout(Some(self.config.block + IO_TIMEOUT))?;
        self.prepare(&mut con)?;
        Ok(con)
    }

    /// Creates the consumer group (keeping an existing one) and loads the scripts.
    fn prepare(&self, con: &mut Connection) -> Result<(), RedisError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("0")
            .arg("MKSTREAM")
            .query::<Value>(con);
        match created {
            Ok(_) => {}
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(error),
        }
        redis::Script::new(LEASE_SCRIPT).load(con)?;
        redis::Script::new(CLAIM_SCRIPT).load(con)?;
        Ok(())
    }

    /// Runs `command` on a pooled (or new) connection, keeping track of the server's health.
    fn with_connection<T>(
        &self,
        command: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, Failure> {
        let (epoch, mut con) = self.checkout()?;
        match command(&mut con) {
            Ok(value) => {
                lock(&self.pool).push((epoch, con));
                Ok(value)
            }
            Err(error) if is_connection_error(&error) => Err(self.lost(epoch, &error)),
            // The server forgot the group or the scripts (a FLUSHALL, or a restart the
            // connection did not notice): set them up again and let the caller retry.
            Err(error) if matches!(error.code(), Some("NOGROUP" | "NOSCRIPT")) => {
                warn!("redis lost the consumer group or scripts ({error}); setting them up again");
                match self.prepare(&mut con) {
                    Ok(()) => {
                        lock(&self.pool).push((epoch, con));
                        Err(Failure::Down {
                            retry_in: Duration::ZERO,
                        })
                    }
                    Err(error) if is_connection_error(&error) => Err(self.lost(epoch, &error)),
                    Err(error) => Err(Failure::Server(error)),
                }
            }
            Err(error) => {
                lock(&self.pool).push((epoch, con));
                Err(Failure::Server(error))
            }
        }
    }

    /// A connection of the current epoch from the pool, or a new one.
    fn checkout(&self) -> Result<(u64, Connection), Failure> {
        let epoch = {
            let health = lock(&self.health);
            if let Some(since) = health.down_since {
                if since.elapsed() > self.config.reconnect_limit {
                    return Err(Failure::GaveUp(format!(
                        "redis at {} unreachable for {}: {}",
                        self.config.url,
                        humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                        health.last_error
                    )));
                }
                let now = Instant::now();
                if now < health.next_try {
                    return Err(Failure::Down {
                        retry_in: health.next_try - now,
                    });
                }
            }
            health.epoch
        };
        {
            let mut pool = lock(&self.pool);
            while let Some((opened, con)) = pool.pop() {
                if opened == epoch {
                    return Ok((epoch, con));
                }
            }
        }
        match self.open() {
            Ok(con) => {
                let mut health = lock(&self.health);
                if let Some(since) = health.down_since.take() {
                    info!(
                        "reconnected to redis at {} after {}",
                        self.config.url,
                        humantime::format_duration(Duration::from_millis(
                            since.elapsed().as_millis() as u64
                        ))
                    );
                    health.backoff = BACKOFF_START;
                }
                Ok((health.epoch, con))
            }
            Err(error) if is_connection_error(&error) => Err(self.lost(epoch, &error)),
            Err(error) => Err(Failure::Server(error)),
        }
    }

    /// Records a connection failure of a connection opened in `epoch`; logs the first one.
    fn lost(&self, epoch: u64, error: &RedisError) -> Failure {
        let mut health = lock(&self.health);
        let now = Instant::now();
        if health.epoch == epoch {
            health.epoch += 1;
            health.last_error = error.to_string();
            match health.down_since {
                None => {
                    warn!("lost connection to redis at {}: {error}", self.config.url);
                    health.down_since = Some(now);
                    health.backoff = BACKOFF_START;
                }
                Some(_) => health.backoff = (health.backoff * 2).min(BACKOFF_MAX),
            }
            health.next_try = now + health.backoff;
            // Every pooled connection is of the old epoch: close them now.
            lock(&self.pool).clear();
        }
        Failure::Down {
            retry_in: health.next_try.saturating_duration_since(now),
        }
    }

    /// Claims this consumer's old pending entries, then idle ones, then reads new ones.
    fn pull_into(&self, max: usize, wait: Duration, out: &mut Vec<Lease>) -> Result<(), Failure> {
        let own = lock(&self.claim).own.clone();
        if let Some(start) = own {
            let (next, entries) = self.claim("own", &start, max)?;
            lock(&self.claim).own = (next != "0-0").then_some(next);
            if !entries.is_empty() {
                self.lease_all(entries, out);
                return Ok(());
            }
        }
        let start = lock(&self.claim).auto.clone();
        let (next, entries) = self.claim("auto", &start, max)?;
        lock(&self.claim).auto = next;
        self.lease_all(entries, out);
        let room = max.saturating_sub(out.len());
        if room == 0 {
            return Ok(());
        }
        // Block only when nothing was claimed, and never longer than the configured block.
        let block = if out.is_empty() {
            wait.min(self.config.block)
        } else {
            Duration::ZERO
        };
        let sent_at = Instant::now();
        let reply = self.with_connection(|con| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg("COUNT")
                .arg(room);
            // BLOCK 0 would block forever: no wait means no BLOCK argument.
            if !block.is_zero() {
                cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
            }
            cmd.arg("STREAMS")
                .arg(&self.config.stream)
                .arg(">")
                .query::<Value>(con)
        })?;
        let entries = read_reply_entries(&reply)
            .into_iter()
            .map(|(id, fields)| (id, fields, 1))
            .collect();
        self.lease_all_from(entries, sent_at, out);
        Ok(())
    }

    /// Runs the claim script in `mode` from `start`; returns the next start and the entries.
    fn claim(
        &self,
        mode: &str,
        start: &str,
        count: usize,
    ) -> Result<(String, Vec<Entry>), Failure> {
        let min_idle = self.config.ack_deadline.as_millis() as u64;
        let reply = self.with_connection(|con| {
            redis::cmd("EVALSHA")
                .arg(redis::Script::new(CLAIM_SCRIPT).get_hash())
                .arg(2)
                .arg(&self.config.stream)
                .arg(&self.dead_stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(self.config.max_attempts)
                .arg(mode)
                .arg(min_idle)
                .arg(start)
                .arg(count)
                .query::<Value>(con)
        })?;
        let Value::Array(parts) = reply else {
            return Ok(("0-0".to_owned(), Vec::new()));
        };
        let next = parts
            .first()
            .and_then(text)
            .unwrap_or_else(|| "0-0".to_owned());
        let dead = match parts.get(2) {
            Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        if dead > 0 {
            warn!("dead-lettered {dead} messages to {}", self.dead_stream);
            lock(&self.stats).dead_lettered += dead;
            self.settled.fetch_add(dead, Ordering::Relaxed);
        }
        let mut entries = Vec::new();
        if let Some(Value::Array(rows)) = parts.get(1) {
            for row in rows {
                if let Value::Array(cells) = row {
                    if let (Some(id), Some(Value::Array(fields)), Some(Value::Int(n))) =
                        (cells.first().and_then(text), cells.get(1), cells.get(2))
                    {
                        entries.push((id, fields.clone(), u32::try_from(*n).unwrap_or(u32::MAX)));
                    }
                }
            }
        }
        Ok((next, entries))
    }

    /// Leases claimed entries.
    fn lease_all(&self, entries: Vec<Entry>, out: &mut Vec<Lease>) {
        self.lease_all_from(entries, Instant::now(), out);
    }

    /// Turns entries delivered at `since` into leases; dead-letters entries that are not
    /// messages at all.
    fn lease_all_from(&self, entries: Vec<Entry>, since: Instant, out: &mut Vec<Lease>) {
        let deadline = since + self.config.ack_deadline;
        let mut leases = lock(&self.leases);
        let mut malformed = Vec::new();
        for (id, fields, deliveries) in entries {
            let Some(entry) = EntryId::parse(&id) else {
                continue;
            };
            let fields = field_map(&fields);
            let message = fields
                .get("message_id")
                .and_then(|id| uuid::Uuid::parse_str(id).ok())
                .zip(fields.get("instance_name"))
                .and_then(|(id, name)| PubSubMessage::from_parts(id, name));
            let prior: u32 = fields
                .get("attempts")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let attempt = prior.saturating_add(deliveries);
            let Some(message) = message else {
                malformed.push(Op {
                    kind: OpKind::Dead,
                    lease: 0,
                    entry,
                    deliveries: 0,
                    attempt,
                });
                continue;
            };
            let generation = leases.next_generation;
            leases.next_generation = generation.wrapping_add(1);
            let index = leases.slots.insert(Held {
                entry,
                deliveries,
                attempt,
                deadline,
                generation,
            });
            // Every other field of the entry is an attribute (a program's own publishers may
            // add some); the chaos monkey's own entries have none, so nothing is allocated.
            let attributes = fields
                .iter()
                .filter(|(key, _)| {
                    !matches!(key.as_str(), "message_id" | "instance_name" | "attempts")
                })
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            out.push(Lease {
                message,
                attributes,
                attempt,
                id: (u64::from(generation) << 32) | index as u64,
            });
        }
        drop(leases);
        if !malformed.is_empty() {
            warn!(
                "dead-lettering {} entries of {} that are not messages",
                malformed.len(),
                self.config.stream
            );
            // Sent on this thread: a pull may block.
            if let Err(Failure::Server(error)) = self.send_ops(&malformed, false) {
                error!("could not dead-letter malformed entries: {error}");
            }
        }
    }

    /// Drops leases whose local deadline passed: their entries are claimed again (by any
    /// consumer) once idle past the ack deadline.
    fn expire_local(&self) {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        let before = leases.slots.len();
        leases.slots.retain(|_, held| held.deadline > now);
        let expired = (before - leases.slots.len()) as u64;
        drop(leases);
        if expired > 0 {
            lock(&self.stats).expired += expired;
        }
    }

    /// Sends lease operations in one pipeline and counts what Redis answered. `retried` says
    /// that an earlier try of the same batch lost its connection: an ack or dead letter that
    /// now finds its entry no longer pending was most likely done by that try (the scripts
    /// never ack an entry another consumer owns), so it counts as done, not as refused. The
    /// rare exception, an entry that sat idle past the ack deadline meanwhile and was claimed
    /// and acked by another consumer, is then counted by both: the count can be one high,
    /// the entry is still acked once.
    fn send_ops(&self, ops: &[Op], retried: bool) -> Result<(), Failure> {
        let hash = redis::Script::new(LEASE_SCRIPT).get_hash().to_owned();
        let answers: Vec<i64> = self.with_connection(|con| {
            let mut pipe = redis::pipe();
            for op in ops {
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(2)
                    .arg(&self.config.stream)
                    .arg(&self.dead_stream)
                    .arg(&self.config.group)
                    .arg(op.entry.to_string())
                    .arg(&self.config.consumer)
                    .arg(op.deliveries)
                    .arg(op.name())
                    .arg(op.attempt);
            }
            pipe.query(con)
        })?;
        let mut stats = lock(&self.stats);
        let mut expired = Vec::new();
        for (op, answer) in ops.iter().zip(answers) {
            match (op.kind, answer) {
                (OpKind::Ack, 1) | (OpKind::Ack, 2) if answer == 1 || retried => {
                    self.settled.fetch_add(1, Ordering::Relaxed);
                }
                (OpKind::Ack, _) => stats.late_refusals += 1,
                (OpKind::Dead, 1) | (OpKind::Dead, 2) if answer == 1 || retried => {
                    stats.dead_lettered += 1;
                    self.settled.fetch_add(1, Ordering::Relaxed);
                }
                (OpKind::Extend, 1) | (OpKind::Requeue, _) | (OpKind::Dead, _) => {}
                (OpKind::Extend, _) => expired.push(op.lease),
            }
        }
        drop(stats);
        if !expired.is_empty() {
            // Another consumer claimed these entries: the local leases end now, so that
            // their acks are refused.
            let mut leases = lock(&self.leases);
            let now = Instant::now();
            for lease in expired {
                let index = (lease & u64::from(u32::MAX)) as usize;
                if let Some(held) = leases.slots.get_mut(index) {
                    if held.generation == (lease >> 32) as u32 {
                        held.deadline = now;
                    }
                }
            }
        }
        Ok(())
    }

    /// The worker thread: sends queued lease operations in batches until the queue closes.
    fn run_ops(&self, queue: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(OPS_BATCH);
        while let Ok(first) = queue.recv() {
            batch.push(first);
            while batch.len() < OPS_BATCH {
                match queue.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let mut retried = false;
            loop {
                match self.send_ops(&batch, retried) {
                    Ok(()) => break,
                    Err(Failure::Down { retry_in }) => {
                        retried = true;
                        if self.closing.load(Ordering::SeqCst) {
                            warn!(
                                "redis is unreachable: {} lease operations not sent; their \
                                 entries are claimed again after the ack deadline",
                                batch.len()
                            );
                            break;
                        }
                        thread::sleep(retry_in.min(BACKOFF_MAX));
                    }
                    Err(Failure::GaveUp(text)) => {
                        if self.closing.load(Ordering::SeqCst) {
                            error!("{text}: {} lease operations not sent", batch.len());
                            break;
                        }
                        thread::sleep(BACKOFF_MAX);
                    }
                    Err(Failure::Server(error)) => {
                        // A server error is not transient; the entries stay pending and are
                        // claimed again after the ack deadline.
                        error!("redis refused {} lease operations: {error}", batch.len());
                        break;
                    }
                }
            }
            self.answered(batch.len() as u64);
            batch.clear();
        }
    }

    /// Counts answered lease operations and wakes `flush` when none is left.
    fn answered(&self, count: u64) {
        let mut queued = lock(&self.queued);
        *queued = queued.saturating_sub(count);
        if *queued == 0 {
            self.drained.notify_all();
        }
    }

    /// Entries of the group not yet delivered plus entries pending, per `XINFO GROUPS`.
    fn group_remaining(&self) -> Option<u64> {
        let reply = self
            .with_connection(|con| {
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&self.config.stream)
                    .query::<Value>(con)
            })
            .ok()?;
        let Value::Array(groups) = reply else {
            return None;
        };
        for group in groups {
            let Value::Array(pairs) = group else { continue };
            let fields: HashMap<String, &Value> = pairs
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, pair.get(1)?)))
                .collect();
            if fields.get("name").and_then(|v| text(v)).as_deref() != Some(&self.config.group) {
                continue;
            }
            let number = |key: &str| match fields.get(key) {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            return Some(number("lag").unwrap_or(0) + number("pending").unwrap_or(0));
        }
        None
    }
}

/// Locks a mutex, taking over a poisoned one: no code panics while holding these locks, and
/// each is consistent after every statement that changes it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether an error means the connection is unusable.
fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

/// A string reply as text.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// An entry's flat `field value ...` list as a map.
fn field_map(fields: &[Value]) -> HashMap<String, String> {
    fields
        .chunks(2)
        .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
        .collect()
}

/// The entries of an `XREADGROUP` reply on one stream: `[[stream, [[id, fields]...]]]`, or
/// nil when the block timed out.
fn read_reply_entries(reply: &Value) -> Vec<(String, Vec<Value>)> {
    let mut entries = Vec::new();
    let streams: &[Value] = match reply {
        Value::Array(streams) => streams,
        _ => return entries,
    };
    for stream in streams {
        let Value::Array(parts) = stream else {
            continue;
        };
        let Some(Value::Array(rows)) = parts.get(1) else {
            continue;
        };
        for row in rows {
            let Value::Array(cells) = row else { continue };
            if let (Some(id), Some(Value::Array(fields))) =
                (cells.first().and_then(text), cells.get(1))
            {
                entries.push((id, fields.clone()));
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_round_trip() {
        let id = EntryId::parse("1700000000000-42").expect("a valid id");
        assert_eq!(
            id,
            EntryId {
                ms: 1_700_000_000_000,
                seq: 42
            }
        );
        assert_eq!(id.to_string(), "1700000000000-42");
        assert_eq!(EntryId::parse("17-x"), None);
        assert_eq!(EntryId::parse("17"), None);
    }

    #[test]
    fn read_reply_parses_entries_and_timeouts() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("mayhem"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("instance_name"), bulk("cattle-ab12")]),
            ])]),
        ])]);
        let entries = read_reply_entries(&reply);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(field_map(&entries[0].1)["instance_name"], "cattle-ab12");
        assert!(read_reply_entries(&Value::Nil).is_empty());
    }

    #[test]
    fn connect_refuses_bad_urls_and_settings() {
        let bad_url = RedisConfig {
            url: "http://localhost".to_owned(),
            ..RedisConfig::default()
        };
        assert!(matches!(
            RedisSource::connect(bad_url),
            Err(SourceError::Backend(text)) if text.starts_with("invalid redis url")
        ));
        let empty_group = RedisConfig {
            group: String::new(),
            ..RedisConfig::default()
        };
        assert!(matches!(
            RedisSource::connect(empty_group),
            Err(SourceError::Backend(text)) if text.contains("group")
        ));
    }
}
