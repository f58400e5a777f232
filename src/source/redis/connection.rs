//! Connections: the pool, socket timeouts, the health of the server and the reconnect
//! schedule, start-up, and the one place error texts are made one line and password-free.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use redis::{ConnectionLike, RedisError, Value};

use super::reply::{int, EntryId};
use super::wire::Wire;
use super::{lock, Core};
use crate::error::SourceError;
use crate::shutdown::Shutdown;
use crate::source::kit::{Backoff, Outage};

/// Longest pause between two retries.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Pauses between retries after a failure: 50 ms, doubling up to [`BACKOFF_MAX`].
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), BACKOFF_MAX);
/// Timeout of opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Socket timeout of a command beyond its blocking time. A server that answers nothing for
/// this long counts as lost: the connection is replaced and the command retried.
const IO_MARGIN: Duration = Duration::from_millis(400);
/// Socket timeout of every command once the source is interrupted, so that a stalled server
/// cannot hold up the shutdown.
const SHUTDOWN_IO: Duration = Duration::from_millis(250);
/// Longest `unblock_reads` keeps asking for reads registered before an interrupt to end.
const UNBLOCK_RETRY: Duration = Duration::from_millis(50);
/// Idle time given to a dead predecessor's pending entries: past any ack deadline.
const EXPIRED_IDLE_MS: u64 = 10_000_000_000;
/// Entries of a dead predecessor marked per script call.
const RESET_BATCH: usize = 1000;

/// The scripts, loaded on every new connection and run by hash.
pub(super) struct Scripts {
    /// Lease operations of one batch.
    pub(super) lease: redis::Script,
    /// Claims of expired entries.
    pub(super) claim: redis::Script,
    /// Marks a dead predecessor's entries expired.
    pub(super) reset_own: redis::Script,
    /// Refreshes the liveness key.
    pub(super) liveness: redis::Script,
    /// Gives the consumer up on a graceful stop.
    pub(super) release: redis::Script,
    /// Trims acked entries and records the floor.
    pub(super) retention: redis::Script,
    /// Reads the group's state.
    pub(super) group_state: redis::Script,
}

impl Scripts {
    /// The scripts of `scripts/`.
    pub(super) fn new() -> Self {
        Scripts {
            lease: redis::Script::new(include_str!("scripts/lease.lua")),
            claim: redis::Script::new(include_str!("scripts/claim.lua")),
            reset_own: redis::Script::new(include_str!("scripts/reset_own.lua")),
            liveness: redis::Script::new(include_str!("scripts/liveness.lua")),
            release: redis::Script::new(include_str!("scripts/release.lua")),
            retention: redis::Script::new(include_str!("scripts/retention.lua")),
            group_state: redis::Script::new(include_str!("scripts/group_state.lua")),
        }
    }

    /// Every script, to load them.
    fn all(&self) -> [&redis::Script; 7] {
        [
            &self.lease,
            &self.claim,
            &self.reset_own,
            &self.liveness,
            &self.release,
            &self.retention,
            &self.group_state,
        ]
    }
}

/// A pooled connection.
pub(super) struct Pooled {
    /// The health epoch it was opened in: a connection of an earlier epoch is not reused.
    epoch: u64,
    /// Whether its timeouts were shortened for the shutdown.
    short: bool,
    /// The connection.
    con: Wire,
}

/// The health of the server as this source sees it.
pub(super) struct Health {
    /// Incremented on every lost connection: a failure of an older connection is old news.
    epoch: u64,
    /// Whether the failure is a lost connection (else the server answers with errors).
    unreachable: bool,
    /// Since when commands fail, the last error (one line, password removed), and the
    /// next try.
    outage: Outage,
    /// The class of the command the server refused last, while it refuses one.
    refusing: Option<Class>,
    /// Whether a refusal was `WRONGTYPE`: a key of the source holds another type.
    wrong_type: bool,
}

/// What a command works on; a failure of one class is ended only by a success of the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Reading new entries (`XREADGROUP`) and claiming expired ones (the claim script).
    Read,
    /// Adding entries (`XADD`).
    Publish,
    /// Lease operations: the lease script (which also writes the dead-letter stream) and
    /// `XACK`.
    Leases,
    /// Retention and the group's state.
    Maintenance,
    /// The consumer name's liveness key.
    Liveness,
    /// Opening a connection (authenticating, loading the scripts): any command's success
    /// ends its failure.
    Connect,
}

impl Health {
    /// A healthy start.
    pub(super) fn new() -> Self {
        Health {
            epoch: 0,
            unreachable: false,
            outage: Outage::new(BACKOFF),
            refusing: None,
            wrong_type: false,
        }
    }
}

/// Why a command could not be run.
pub(super) enum Failure {
    /// The server is unreachable or failing; try again after `retry_in`.
    Down {
        /// When the next try is due.
        retry_in: Duration,
    },
    /// The server has been unreachable or failing for longer than the reconnect limit.
    GaveUp(String),
}

/// Why start-up did not succeed yet.
enum StartError {
    /// A failure that may pass: retry within the reconnect limit.
    Retry(String),
    /// A failure that will not pass by retrying.
    Refused(String),
    /// The stop handle was triggered.
    Stopped,
}

impl From<RedisError> for StartError {
    fn from(error: RedisError) -> Self {
        StartError::Retry(error.to_string())
    }
}

/// `duration` to the millisecond, as a log line shows it.
fn shown_millis(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    ))
}

/// Whether the server refused what the URL asks, which retrying cannot cure: the credentials
/// (a wrong password, `WRONGPASS`; none where one is required, `NOAUTH`; a user without the
/// permission, `NOPERM`; a password for a server that has none), or the database (`SELECT`
/// of one past the server's `databases`). These come as plain `ERR` replies, told apart by
/// their text, since `ERR` also says things that pass (`max number of clients reached`).
fn refused_for_good(error: &RedisError) -> bool {
    const FOR_GOOD: [&str; 3] = [
        "DB index is out of range",
        "invalid DB index",
        "called without any password configured",
    ];
    let text = error.to_string();
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        || FOR_GOOD.iter().any(|words| text.contains(words))
}

/// Whether an error means the connection is unusable.
fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
}

impl Core {
    /// An error of this source's server as one password-free line; a reply that is not the
    /// Redis protocol says so.
    pub(super) fn describe(&self, error: &RedisError) -> String {
        let text = self.secrets.scrub(&error.to_string());
        if error.kind() == redis::ErrorKind::Parse {
            format!("the server does not speak the redis protocol ({text})")
        } else if error.code() == Some("WRONGTYPE") {
            // Redis does not say which key: name the source's keys and the type each must
            // have, so that the one another program wrote over can be found.
            format!(
                "{text} (a key of this source holds another type: {} and {} must be streams, \
                 {} and {} strings)",
                self.config.stream, self.dead_stream, self.floor_key, self.live_key
            )
        } else {
            text
        }
    }

    /// Connects, claims the consumer name, prepares the group, and marks the entries a dead
    /// predecessor of the same name left pending; retries within the reconnect limit.
    pub(super) fn start(&self, stop: &Shutdown) -> Result<(), SourceError> {
        let started = Instant::now();
        let limit = self.config.reconnect_limit;
        let mut backoff = BACKOFF;
        let mut logged = String::new();
        loop {
            if stop.is_triggered() {
                return Err(SourceError::Closed);
            }
            let error = match self.try_start(stop) {
                Ok(con) => {
                    if !logged.is_empty() {
                        info!("connected to redis at {}", self.shown_url);
                    }
                    lock(&self.pool).push(Pooled {
                        epoch: 0,
                        short: false,
                        con,
                    });
                    return Ok(());
                }
                Err(StartError::Stopped) => return Err(SourceError::Closed),
                Err(StartError::Refused(text)) => return Err(SourceError::Backend(text)),
                Err(StartError::Retry(text)) => self.secrets.scrub(&text),
            };
            let elapsed = started.elapsed();
            if elapsed >= limit {
                return Err(SourceError::Unavailable(format!(
                    "cannot connect to redis at {} (tried for {}): {error}",
                    self.shown_url,
                    humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
                )));
            }
            if error != logged {
                warn!(
                    "cannot connect to redis at {}: {error}; retrying for up to {}",
                    self.shown_url,
                    humantime::format_duration(limit)
                );
                logged = error;
            }
            if stop.wait_timeout(backoff.next_pause().min(limit - elapsed)) {
                return Err(SourceError::Closed);
            }
        }
    }

    /// One try of `start`.
    fn try_start(&self, stop: &Shutdown) -> Result<Wire, StartError> {
        let mut con = self.open().map_err(|error| {
            let text = self.describe(&error);
            // Credentials retrying cannot cure end the start at once (once running, a
            // reconnection retries them: the server may be being reconfigured).
            if refused_for_good(&error) {
                StartError::Refused(format!(
                    "redis at {} refused the connection: {text}",
                    self.shown_url
                ))
            } else {
                StartError::Retry(text)
            }
        })?;
        if self.publish_only {
            return Ok(con);
        }
        self.claim_name(&mut con, stop)?;
        let mut start = "-".to_owned();
        let (mut marked, mut gone, mut first_gone) = (0, 0, String::new());
        loop {
            let reply: Value = self
                .scripts
                .reset_own
                .key(&self.config.stream)
                .key(&self.dead_stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(&start)
                .arg(RESET_BATCH)
                .arg(EXPIRED_IDLE_MS)
                .arg(self.config.dead_letter_max)
                .invoke(&mut con)
                .map_err(|error| StartError::Retry(self.describe(&error)))?;
            let Value::Array(parts) = reply else { break };
            let next = parts
                .first()
                .and_then(super::reply::text)
                .unwrap_or_default();
            marked += parts.get(1).and_then(int).unwrap_or(0);
            gone += parts.get(2).and_then(int).unwrap_or(0);
            if first_gone.is_empty() {
                first_gone = parts
                    .get(3)
                    .and_then(super::reply::text)
                    .unwrap_or_default();
            }
            if next.is_empty() {
                break;
            }
            start = next;
        }
        if marked > 0 {
            info!(
                "{marked} entries left pending by an earlier instance named {} are claimed again",
                self.config.consumer
            );
        }
        if gone > 0 {
            self.deleted_while_pending(gone.unsigned_abs(), &first_gone);
        }
        Ok(con)
    }

    /// Takes the consumer name: sets the liveness key, or waits up to one time to live for a
    /// dead holder's key to expire. A key that is refreshed meanwhile belongs to a live
    /// instance: then the name is refused.
    fn claim_name(&self, con: &mut Wire, stop: &Shutdown) -> Result<(), StartError> {
        let ttl = self.config.liveness_ttl;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let take = |con: &mut Wire| -> Result<bool, StartError> {
            let set: Value = redis::cmd("SET")
                .arg(&self.live_key)
                .arg(&self.token)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query(con)
                .map_err(|error| StartError::Retry(self.describe(&error)))?;
            Ok(!matches!(set, Value::Nil))
        };
        if take(con)? {
            return Ok(());
        }
        info!(
            "consumer name {} is held by an earlier instance; waiting up to {} for its key to expire",
            self.config.consumer,
            humantime::format_duration(ttl)
        );
        let end = Instant::now() + ttl + ttl / 2;
        let mut last_ttl: Option<i64> = None;
        let nap = (ttl / 20).clamp(Duration::from_millis(10), Duration::from_millis(100));
        loop {
            if stop.wait_timeout(nap) {
                return Err(StartError::Stopped);
            }
            if take(con)? {
                return Ok(());
            }
            let left: i64 = redis::cmd("PTTL")
                .arg(&self.live_key)
                .query(con)
                .map_err(|error| StartError::Retry(self.describe(&error)))?;
            let refreshed = matches!(last_ttl, Some(before) if left > before + 5);
            if refreshed || left == -1 || Instant::now() > end {
                return Err(StartError::Refused(format!(
                    "consumer name {} of group {} is in use by a running instance (key {} is \
                     kept alive); give each instance its own --consumer-name",
                    self.config.consumer, self.config.group, self.live_key
                )));
            }
            last_ttl = Some(left);
        }
    }

    /// Opens a connection with timeouts and prepares the server.
    fn open(&self) -> Result<Wire, RedisError> {
        let stopping = self.interrupted.load(Ordering::SeqCst);
        let connect = if stopping {
            SHUTDOWN_IO
        } else {
            CONNECT_TIMEOUT
        };
        let mut con = Wire::open(self.client.get_connection_info(), connect)?;
        let (read, write) = self.timeouts(stopping);
        con.set_write_timeout(Some(write))?;
        con.set_read_timeout(Some(read))?;
        self.prepare(&mut con)?;
        Ok(con)
    }

    /// Read and write timeouts of a connection.
    fn timeouts(&self, stopping: bool) -> (Duration, Duration) {
        if stopping {
            (SHUTDOWN_IO, SHUTDOWN_IO)
        } else {
            (self.config.block + IO_MARGIN, IO_MARGIN)
        }
    }

    /// Creates the consumer group (keeping an existing one) at its recorded floor, or at `0`
    /// (also when the stream itself is new), and loads the scripts; nothing for a publisher.
    fn prepare(&self, con: &mut Wire) -> Result<(), RedisError> {
        if self.publish_only {
            // A publisher creates no group (one nobody consumes would hold back retention)
            // and runs no script; `XADD` creates the stream.
            return Ok(());
        }
        // A floor outlives its stream only when the stream was deleted as a whole: then no
        // history is left to replay, and the floor is dropped.
        let exists: bool = redis::cmd("EXISTS").arg(&self.config.stream).query(con)?;
        let floor: Option<String> = if exists {
            redis::cmd("GET").arg(&self.floor_key).query(con)?
        } else {
            redis::cmd("DEL").arg(&self.floor_key).query::<()>(con)?;
            None
        };
        let start = floor
            .as_deref()
            .and_then(EntryId::parse)
            .map_or_else(|| "0".to_owned(), |id| id.predecessor().to_string());
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&start)
            .arg("MKSTREAM")
            .query::<Value>(con);
        match created {
            Ok(_) => {
                if start != "0" {
                    warn!(
                        "consumer group {} recreated at {start}: entries up to there were acked \
                         before the group was lost",
                        self.config.group
                    );
                }
            }
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(error),
        }
        for script in self.scripts.all() {
            script.prepare_invoke().load(con)?;
        }
        Ok(())
    }

    /// Runs `command`, of `class`, on a pooled (or new) connection, keeping track of the
    /// server's health. A command the server refuses starts a failure that only a success of
    /// the same class ends (or a new connection after an unreachable server): a success of
    /// other commands says nothing of it. (A dead-letter stream held as a string by another
    /// program failed every lease script while every read succeeded: each read ended the
    /// failure, a line was logged ten times a second, and the reconnect limit never ran out.)
    pub(super) fn with_connection<T>(
        &self,
        class: Class,
        command: impl FnOnce(&mut Wire) -> Result<T, RedisError>,
    ) -> Result<T, Failure> {
        let mut pooled = self.checkout()?;
        match command(&mut pooled.con) {
            Ok(value) => {
                self.succeeded(class, &mut pooled.con);
                self.give_back(pooled);
                Ok(value)
            }
            Err(error) if is_connection_error(&error) => Err(self.lost(pooled.epoch, &error)),
            // The server forgot the group or the scripts (a destroyed group, a FLUSHALL, or a
            // restart the connection did not notice): set them up again and retry.
            Err(error) if matches!(error.code(), Some("NOGROUP" | "NOSCRIPT")) => {
                warn!(
                    "redis lost the consumer group or scripts ({}); setting them up again",
                    self.describe(&error)
                );
                match self.prepare(&mut pooled.con) {
                    Ok(()) => {
                        self.give_back(pooled);
                        Err(Failure::Down {
                            retry_in: Duration::ZERO,
                        })
                    }
                    Err(error) if is_connection_error(&error) => {
                        Err(self.lost(pooled.epoch, &error))
                    }
                    Err(error) => {
                        self.give_back(pooled);
                        Err(self.failed(&error, class))
                    }
                }
            }
            Err(error) => {
                self.give_back(pooled);
                Err(self.failed(&error, class))
            }
        }
    }

    /// Ends the blocking reads in progress (`CLIENT UNBLOCK`), so that an interrupt does not
    /// wait out their block. The command goes on an idle pooled connection, or on a new one
    /// (no idle one is a normal state: a CI run met it, and the read waited its whole block),
    /// with the shutdown's short timeouts. A read registered before the interrupt may send its
    /// `XREADGROUP` just after the `CLIENT UNBLOCK` (which then finds nothing to end): while
    /// such a read is still registered it is asked again, for at most [`UNBLOCK_RETRY`].
    /// Best effort: when the server refuses (an ACL without `CLIENT`) or does not answer, the
    /// reads end with their block, at most [`RedisConfig::block`].
    pub(super) fn unblock_reads(&self) {
        if lock(&self.blocked_reads).is_empty() {
            return;
        }
        let pooled = lock(&self.pool).pop();
        // The epoch of a pooled connection, kept when it goes back; a new one is not pooled.
        let (mut con, epoch) = match pooled {
            Some(pooled) => (pooled.con, Some(pooled.epoch)),
            None => match Wire::open(self.client.get_connection_info(), SHUTDOWN_IO) {
                Ok(con) => (con, None),
                Err(error) => {
                    debug!(
                        "could not end a blocking read at the interrupt: {}",
                        self.describe(&error)
                    );
                    return;
                }
            },
        };
        let (read, write) = self.timeouts(true);
        if con.set_read_timeout(Some(read)).is_err() || con.set_write_timeout(Some(write)).is_err()
        {
            return;
        }
        let end = Instant::now() + UNBLOCK_RETRY;
        loop {
            let ids = lock(&self.blocked_reads).clone();
            if ids.is_empty() {
                break;
            }
            for id in ids {
                let unblocked: Result<i64, RedisError> =
                    redis::cmd("CLIENT").arg("UNBLOCK").arg(id).query(&mut con);
                if let Err(error) = unblocked {
                    debug!(
                        "could not end a blocking read at the interrupt: {}",
                        self.describe(&error)
                    );
                    return;
                }
            }
            if Instant::now() >= end {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        if let Some(epoch) = epoch {
            self.give_back(Pooled {
                epoch,
                short: true,
                con,
            });
        }
    }

    /// Returns a connection to the pool, unless it broke (a reply that was not the Redis
    /// protocol leaves the stream at an unknown position): a broken one is closed.
    fn give_back(&self, pooled: Pooled) {
        if pooled.con.is_open() {
            lock(&self.pool).push(pooled);
        }
    }

    /// A connection of the current epoch from the pool, or a new one.
    fn checkout(&self) -> Result<Pooled, Failure> {
        let epoch = {
            let health = lock(&self.health);
            let now = Instant::now();
            if let Some(failing) = health.outage.over(now, self.config.reconnect_limit) {
                let what = if health.unreachable {
                    "unreachable"
                } else {
                    "failing"
                };
                return Err(Failure::GaveUp(format!(
                    "redis at {} {what} for {}: {}",
                    self.shown_url,
                    humantime::format_duration(Duration::from_secs(failing.as_secs())),
                    health.outage.last_error()
                )));
            }
            if let Some(retry_in) = health.outage.wait(now) {
                return Err(Failure::Down { retry_in });
            }
            health.epoch
        };
        let stopping = self.interrupted.load(Ordering::SeqCst);
        let reused = {
            let mut pool = lock(&self.pool);
            let mut found = None;
            while let Some(pooled) = pool.pop() {
                if pooled.epoch == epoch {
                    found = Some(pooled);
                    break;
                }
            }
            found
        };
        if let Some(mut pooled) = reused {
            if stopping && !pooled.short {
                let (read, write) = self.timeouts(true);
                let shortened = pooled
                    .con
                    .set_read_timeout(Some(read))
                    .and_then(|()| pooled.con.set_write_timeout(Some(write)));
                if let Err(error) = shortened {
                    return Err(self.lost(epoch, &error));
                }
                pooled.short = true;
            }
            return Ok(pooled);
        }
        match self.open() {
            Ok(con) => {
                let mut health = lock(&self.health);
                if health.unreachable {
                    if let Some(failed) = health.outage.recovered(Instant::now()) {
                        info!(
                            "reconnected to redis at {} after {}",
                            self.shown_url,
                            shown_millis(failed)
                        );
                    }
                    health.unreachable = false;
                    health.refusing = None;
                    health.wrong_type = false;
                    self.failing.store(false, Ordering::SeqCst);
                }
                Ok(Pooled {
                    epoch: health.epoch,
                    short: stopping,
                    con,
                })
            }
            Err(error) if is_connection_error(&error) => Err(self.lost(epoch, &error)),
            Err(error) => Err(self.failed(&error, Class::Connect)),
        }
    }

    /// Records a lost connection opened in `epoch`; logs the first of a series.
    fn lost(&self, epoch: u64, error: &RedisError) -> Failure {
        let text = self.describe(error);
        let mut health = lock(&self.health);
        if health.epoch == epoch {
            health.epoch += 1;
            // Every pooled connection is of the old epoch: close them now.
            lock(&self.pool).clear();
            health.unreachable = true;
            let (new_kind, failure) = self.failure(&mut health, "connection", text.clone());
            if new_kind {
                warn!("lost connection to redis at {}: {text}", self.shown_url);
            }
            failure
        } else {
            Failure::Down {
                retry_in: health.outage.wait(Instant::now()).unwrap_or_default(),
            }
        }
    }

    /// Records a command of `class` the server refused; logs it when it differs from the
    /// last failure.
    fn failed(&self, error: &RedisError, class: Class) -> Failure {
        let text = self.describe(error);
        let kind = error
            .code()
            .map_or_else(|| error.category().to_owned(), str::to_owned);
        let mut health = lock(&self.health);
        health.refusing = Some(class);
        health.wrong_type |= error.code() == Some("WRONGTYPE");
        let (new_kind, failure) = self.failure(&mut health, &kind, text.clone());
        if new_kind {
            warn!("redis at {} refuses commands: {text}", self.shown_url);
        }
        failure
    }

    /// Starts or continues a failure of `kind`: the next try is scheduled with backoff.
    /// Returns whether the kind is new (to be logged), and the failure.
    fn failure(&self, health: &mut Health, kind: &str, text: String) -> (bool, Failure) {
        if health.outage.since().is_none() {
            self.failing.store(true, Ordering::SeqCst);
        }
        let (new_kind, retry_in) = health.outage.failed(Instant::now(), kind, text);
        (new_kind, Failure::Down { retry_in })
    }

    /// Records a command of `class` that succeeded on `con`: a failure of the server's
    /// answers to that class is over. After a `WRONGTYPE`, only once every key of the source
    /// holds its type again: a command that happened not to touch the key another program
    /// wrote over proves nothing (a lease script whose operations had all gone stale ended
    /// such a failure once per ack deadline, and the reconnect limit never ran out).
    fn succeeded(&self, class: Class, con: &mut Wire) {
        if !self.failing.load(Ordering::SeqCst) {
            return;
        }
        let mut health = lock(&self.health);
        let other = |refusing: Class| refusing != class && refusing != Class::Connect;
        if !health.unreachable && health.refusing.is_some_and(other) {
            return;
        }
        if health.wrong_type && !self.unreachable_or_typed(&health, con) {
            return;
        }
        health.refusing = None;
        health.wrong_type = false;
        if let Some(failed) = health.outage.recovered(Instant::now()) {
            if health.unreachable {
                info!(
                    "reconnected to redis at {} after {}",
                    self.shown_url,
                    shown_millis(failed)
                );
            } else {
                info!(
                    "redis at {} answers commands again after {}",
                    self.shown_url,
                    shown_millis(failed)
                );
            }
        }
        health.unreachable = false;
        self.failing.store(false, Ordering::SeqCst);
    }

    /// Whether the failure was a lost connection, or every key of the source holds its type:
    /// the streams are streams (or absent), the floor and liveness keys strings (or absent).
    fn unreachable_or_typed(&self, health: &Health, con: &mut Wire) -> bool {
        if health.unreachable {
            return true;
        }
        let mut typed = |key: &str, want: &str| {
            redis::cmd("TYPE")
                .arg(key)
                .query::<String>(con)
                .is_ok_and(|kind| kind == want || kind == "none")
        };
        typed(&self.config.stream, "stream")
            && typed(&self.dead_stream, "stream")
            && typed(&self.floor_key, "string")
            && (self.publish_only || typed(&self.live_key, "string"))
    }

    /// Sleeps until `retry_in` passes, or the source closes.
    pub(super) fn nap(&self, retry_in: Duration) {
        let closing = lock(&self.closing);
        if !*closing {
            let _ = self
                .closing_signal
                .wait_timeout(closing, retry_in.min(BACKOFF_MAX));
        }
        thread::yield_now();
    }
}
