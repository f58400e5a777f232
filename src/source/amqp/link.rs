//! The connection: opening it with its channels and the topology, reconnecting with
//! backoff, health, and the bounded wait on every broker call.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::future;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use log::{info, warn};

use super::{Conn, CONNECT_TIMEOUT, SHUTDOWN_WAIT, TICK};
use crate::sync::lock;

/// One connection with its two channels.
pub(super) struct Link {
    /// Which link this is: leases remember it, and a lease of a lost link is void.
    pub(super) epoch: u64,
    /// The connection.
    pub(super) connection: Connection,
    /// The channel in confirm mode that publishes.
    pub(super) publish: Channel,
    /// The channel that consumes, acks and rejects (a delivery tag belongs to its channel).
    pub(super) consume: Channel,
    /// The consumer's deliveries, started by the first pull (a client that only publishes
    /// never takes deliveries). A mutex: one puller drains it at a time.
    pub(super) consumer: Mutex<Option<Consumer>>,
}

/// Why a broker call did not succeed.
pub(super) enum Failure {
    /// The broker is unreachable; try again after `retry_in`.
    Down {
        /// When the next attempt is due.
        retry_in: Duration,
    },
    /// It stayed unreachable past the reconnect limit.
    GaveUp(String),
    /// The broker refused published messages (`basic.nack`: a full queue with
    /// `x-overflow: reject-publish`, or the broker's own error). The connection is fine:
    /// the batch is sent again on it after a backoff, not on a new connection.
    Refused(String),
    /// The source was interrupted or is closing.
    Closed,
}

/// What a connection's side does when the connection loses its link.
pub(super) trait Side {
    /// Whether this side consumes (only the consuming side says that it adopted a queue).
    const CONSUMES: bool;
    /// Forgets what belonged to the lost link of `epoch`.
    fn forget(&self, epoch: u64);
}

/// When a bounded broker call ([`Core::bounded`]) gives up before its time limit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Abort {
    /// When the source is interrupted, or closes: publishing and connecting.
    OnInterrupt,
    /// Only when the source closes: lease operations, which keep working after an
    /// interrupt, and the waits of the shutdown.
    OnClose,
    /// When the source closes, or is interrupted while the broker blocks the connection:
    /// sending a batch, whose frames lapin may write once it began. Aborted mid-way by an
    /// interrupt, such a batch was stored by the broker but tracked nowhere: it was neither
    /// counted as published nor awaited as unconfirmed, and a lone instance's report counted
    /// one more message acked and remaining than published.
    IfBlockedOnInterrupt,
}

/// Runs lapin methods in order, started together: polls each future once, in order, then
/// awaits each in order; counts in `done` the leading ones that succeeded, and stops at the
/// first error.
///
/// lapin queues a method's frames on the first poll, and the future then waits for its I/O
/// thread to write them. Awaiting each before starting the next costs a wake-up of that
/// thread, and a write, per method (measured: publishing at about 25k msg/s at most, and
/// about 30 µs of CPU per consumed message, most of it in futex and sendto); started
/// together, the frames are written in bulk.
pub(super) async fn in_order<T, F>(
    methods: impl Iterator<Item = F>,
    done: &Cell<usize>,
) -> Result<Vec<T>, String>
where
    F: Future<Output = lapin::Result<T>>,
{
    let mut started = Vec::with_capacity(methods.size_hint().0);
    for method in methods {
        let mut method = Box::pin(method);
        let ready = future::poll_once(&mut method).await;
        started.push((method, ready));
    }
    let mut results = Vec::with_capacity(started.len());
    for (method, ready) in started {
        let result = match ready {
            Some(result) => result,
            None => method.await,
        };
        results.push(result.map_err(|error| error.to_string())?);
        done.set(done.get() + 1);
    }
    Ok(results)
}

/// Whether the broker refused for a reason retrying cannot cure: `ACCESS_REFUSED` (403:
/// credentials, permissions), `PRECONDITION_FAILED` (406: a queue or exchange declared with
/// other arguments) or `NOT_ALLOWED` (530: a vhost that does not exist).
pub(super) fn refused_for_good(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 406 | 530))
}

/// Whether a `queue.declare` was refused because the queue exists with other arguments
/// (`PRECONDITION_FAILED`, "inequivalent arg").
fn is_inequivalent(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406)
}

/// The text a failure carries, for the log.
pub(super) fn failure_text(failure: &Failure) -> String {
    match failure {
        Failure::Down { .. } => "the broker did not answer in time".to_owned(),
        Failure::GaveUp(text) | Failure::Refused(text) => text.clone(),
        Failure::Closed => "closed".to_owned(),
    }
}

impl<S: Side> Conn<S> {
    /// Closes the current link, waiting for the broker at most until `end`.
    pub(super) fn close(&self, end: Instant) {
        if let Some(link) = lock(&self.link).take() {
            let closed = future::block_on(future::or(
                async {
                    link.connection
                        .close(200, ShortString::from("shutdown"))
                        .await
                        .is_ok()
                },
                async {
                    Timer::at(end).await;
                    false
                },
            ));
            // Only the consuming connection holds deliveries; a publishing one that the
            // broker blocks (a resource alarm) cannot send its close, and holds nothing.
            if !closed && self.consuming.load(Ordering::SeqCst) {
                warn!("the amqp connection did not close in time; the broker gives the messages back when it notices");
            } else if !closed {
                log::debug!("an amqp publishing connection did not close in time");
            }
        }
    }

    /// The current link if it is still connected; a broken one is forgotten.
    pub(super) fn healthy(&self) -> Option<Arc<Link>> {
        let slot = lock(&self.link);
        let link = Arc::clone(slot.as_ref()?);
        drop(slot);
        if link.connection.status().connected() && link.consume.status().connected() {
            return Some(link);
        }
        self.lost(&link, "the connection was closed");
        None
    }

    /// The current link, connecting when there is none and the backoff allows.
    pub(super) fn link(&self) -> Result<Arc<Link>, Failure> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Failure::Closed);
        }
        if let Some(link) = self.healthy() {
            return Ok(link);
        }
        // One connection attempt at a time; the `link` mutex itself is never held across
        // one, so that acks (which read only `live_epoch`) and the worker never wait on it.
        let _connecting = lock(&self.connecting);
        if let Some(link) = self.healthy() {
            return Ok(link);
        }
        let now = Instant::now();
        {
            let health = lock(&self.health);
            if health.over(now, self.config.reconnect_limit).is_some() {
                return Err(Failure::GaveUp(format!(
                    "amqp {} unavailable for more than {}: {}",
                    self.shown_url,
                    humantime::format_duration(self.config.reconnect_limit),
                    health.last_error()
                )));
            }
            if let Some(retry_in) = health.wait(now) {
                return Err(Failure::Down { retry_in });
            }
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        match self.bounded(CONNECT_TIMEOUT, Abort::OnInterrupt, self.open(epoch)) {
            Ok(link) => {
                let link = Arc::new(link);
                self.connected_once.store(true, Ordering::SeqCst);
                *lock(&self.link) = Some(Arc::clone(&link));
                self.live_epoch.store(epoch, Ordering::SeqCst);
                if lock(&self.health).recovered(Instant::now()).is_some() {
                    info!("reconnected to amqp {}", self.shown_url);
                }
                Ok(link)
            }
            Err(Failure::Closed) => Err(Failure::Closed),
            Err(failure) => {
                let text = match failure {
                    Failure::Down { .. } => format!(
                        "no answer within {}",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    ),
                    Failure::GaveUp(text) | Failure::Refused(text) => text,
                    Failure::Closed => String::new(),
                };
                // A refusal that retrying cannot cure (credentials, a missing vhost, a queue
                // declared with other arguments) ends the start at once; once connected, a
                // refusal may be a broker being reconfigured, and is retried as any failure.
                if self.refused.swap(false, Ordering::SeqCst)
                    && !self.connected_once.load(Ordering::SeqCst)
                {
                    return Err(Failure::GaveUp(format!(
                        "amqp {} refused the connection: {text}",
                        self.shown_url
                    )));
                }
                Err(self.failed(&text))
            }
        }
    }

    /// Records a failure and schedules the next attempt.
    pub(super) fn failed(&self, text: &str) -> Failure {
        let text = self.secrets.scrub(text);
        let (new_kind, retry_in) = lock(&self.health).failed(Instant::now(), &text, text.clone());
        if new_kind {
            warn!(
                "amqp {} unavailable: {text}; retrying for up to {}",
                self.shown_url,
                humantime::format_duration(self.config.reconnect_limit)
            );
        }
        Failure::Down { retry_in }
    }

    /// Forgets a link found broken: its leases are void (the broker gives their messages
    /// back) and counted as expired ([`Side::forget`]); the next call reconnects.
    pub(super) fn lost(&self, link: &Arc<Link>, text: &str) {
        {
            let mut slot = lock(&self.link);
            match &*slot {
                Some(current) if Arc::ptr_eq(current, link) => *slot = None,
                _ => return,
            }
            self.live_epoch.store(0, Ordering::SeqCst);
        }
        self.side.forget(link.epoch);
        self.failed(text);
        // Closing frees the broker's side at once if the socket still works.
        let _ = self.bounded(SHUTDOWN_WAIT, Abort::OnClose, async {
            let _ = link.connection.close(320, ShortString::from("lost")).await;
            Ok(())
        });
    }

    /// The ready messages of a queue (a passive `queue.declare`), at most a quarter of a
    /// second; `None` without an answer.
    pub(super) fn count(&self, queue: &str) -> Option<u64> {
        let link = lock(&self.link).clone()?;
        self.bounded(SHUTDOWN_WAIT, Abort::OnClose, async {
            link.consume
                .queue_declare(
                    ShortString::from(queue),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map(|queue| u64::from(queue.message_count()))
                .map_err(|error| error.to_string())
        })
        .ok()
    }

    /// The ready messages of a queue once the broker has taken back what this instance gave
    /// back (`given_back`, since its consumer was cancelled): the count read again every
    /// 50 ms until two reads agree and it holds at least those, at most a second (a quorum
    /// queue counts a returned message as ready only once it applied the return). On a
    /// loaded machine two reads 50 ms apart once agreed on 2 before the broker had applied
    /// the return of 237, and a lone instance's last report came out 235 short.
    pub(super) fn settled_count(&self, queue: &str, given_back: u64) -> Option<u64> {
        let end = Instant::now() + Duration::from_secs(1);
        let mut last = self.count(queue)?;
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
            let now = self.count(queue)?;
            // Another consumer of the queue may take what was given back: then the count
            // never reaches it, and the second is the bound.
            if now == last && now >= given_back {
                break;
            }
            last = now;
        }
        Some(last)
    }

    /// The epoch of the current link (0 when there is none: no lease matches it).
    pub(super) fn current_epoch(&self) -> u64 {
        self.live_epoch.load(Ordering::SeqCst)
    }

    /// Opens a connection, its channels and the topology.
    pub(super) async fn open(&self, epoch: u64) -> Result<Link, String> {
        let scrubbed = |error: lapin::Error| {
            if refused_for_good(&error) {
                self.refused.store(true, Ordering::SeqCst);
            }
            self.secrets.scrub(&error.to_string())
        };
        // `amqps://` takes the TLS settings (built with `amqp-tls`); `amqp://` ignores them.
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca.clone(),
        };
        let connection = Connection::connect_uri_with_config(
            self.uri.clone(),
            ConnectionProperties::default().with_connection_name("mayhem".into()),
            tls,
            lapin::runtime::default_runtime().map_err(scrubbed)?,
        )
        .await
        .map_err(scrubbed)?;
        let publish = connection.create_channel().await.map_err(scrubbed)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(scrubbed)?;
        let consume = connection.create_channel().await.map_err(scrubbed)?;
        let dead = ShortString::from(self.dead.as_str());
        let queue = ShortString::from(self.config.queue.as_str());
        consume
            .exchange_declare(
                dead.clone(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        consume
            .queue_declare(
                dead.clone(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        consume
            .queue_bind(
                dead.clone(),
                dead.clone(),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(scrubbed)?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.config.max_attempts)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead.as_str().into()),
        );
        // Dead letters at least once: the quorum queue keeps a dead-lettered message until
        // the dead-letter queue confirmed it. The default, at most once, drops it when the
        // dead-letter queue cannot take it at that moment, as while the broker stops (on
        // 3.10 every give-back of a clean stop counts as a delivery, so messages cross the
        // limit then) or after `{queue}:dead` was deleted. RabbitMQ takes this strategy only
        // with `x-overflow` `reject-publish`; no length limit is set, so nothing is rejected.
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let declared = consume
            .queue_declare(queue.clone(), QueueDeclareOptions::durable(), arguments)
            .await;
        let consume = match declared {
            Ok(_) => consume,
            // Declared first by another program, with other arguments: consumed as it is
            // (see `adopted.rs`), on a new channel (the refusal closed this one).
            Err(error) if is_inequivalent(&error) => {
                let consume = connection.create_channel().await.map_err(scrubbed)?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                consume
                    .queue_declare(queue.clone(), passive, FieldTable::default())
                    .await
                    .map_err(scrubbed)?;
                if !self.adopted.swap(true, Ordering::SeqCst) && S::CONSUMES {
                    warn!(
                        "amqp queue {} exists with other arguments than this source declares \
                         (declared by another program?): consuming it as it is; this source \
                         publishes its dead letters to {} and counts deliveries where the \
                         queue does not",
                        self.config.queue, self.dead
                    );
                }
                consume
            }
            Err(error) => return Err(scrubbed(error)),
        };
        consume
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(scrubbed)?;
        // A client that consumed before consumes again as part of the reconnection: a broker
        // that takes connections but cannot serve the queue (a quorum queue without a
        // leader) is still failing, and counts against the reconnect limit.
        let consumer = if self.consuming.load(Ordering::SeqCst) {
            Some(
                consume
                    .basic_consume(
                        ShortString::from(self.config.queue.as_str()),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(scrubbed)?,
            )
        } else {
            None
        };
        Ok(Link {
            epoch,
            connection,
            publish,
            consume,
            consumer: Mutex::new(consumer),
        })
    }

    /// Runs `work` to completion, at most `limit`; gives up early when the source closes,
    /// or, with [`Abort::OnInterrupt`] (publishing and connecting, not lease operations,
    /// which keep working after an interrupt), when it is interrupted.
    pub(super) fn bounded<T>(
        &self,
        limit: Duration,
        abort: Abort,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        self.bounded_unless(limit, abort, None, work)
    }

    /// [`Core::bounded`] for a publish on `link`: with [`Abort::OnInterrupt`] (a `publish`,
    /// not the shutdown's `wait_confirmed`), the time the broker blocks the connection (a memory or
    /// disk alarm: it reads nothing from a publishing connection then) does not count
    /// against `limit`. A blocked broker is not a lost connection: reconnecting would only
    /// send the same batches again into the same block.
    pub(super) fn bounded_publishing<T>(
        &self,
        link: &Link,
        limit: Duration,
        abort: Abort,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        let blocking = matches!(abort, Abort::OnInterrupt | Abort::IfBlockedOnInterrupt)
            .then_some(&link.connection);
        self.bounded_unless(limit, abort, blocking, work)
    }

    /// [`Core::bounded`], not counting the time `blocking` is blocked by the broker; logs
    /// when the broker blocks and unblocks it.
    pub(super) fn bounded_unless<T>(
        &self,
        limit: Duration,
        abort: Abort,
        blocking: Option<&Connection>,
        work: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        let mut end = Instant::now() + limit;
        let mut checked = Instant::now();
        let mut blocked = false;
        future::block_on(future::or(
            async { work.await.map_err(Failure::GaveUp) },
            async {
                loop {
                    let now = Instant::now();
                    if let Some(connection) = blocking {
                        blocked = connection.status().blocked();
                        if blocked {
                            end += now - checked;
                        }
                        self.note_blocked(blocked);
                    }
                    checked = now;
                    let left = end.saturating_duration_since(now);
                    if left.is_zero() {
                        return Err(Failure::Down {
                            retry_in: Duration::ZERO,
                        });
                    }
                    let interrupts = match abort {
                        Abort::OnInterrupt => true,
                        Abort::IfBlockedOnInterrupt => blocked,
                        Abort::OnClose => false,
                    };
                    if self.closing.load(Ordering::SeqCst)
                        || (interrupts && self.interrupted.load(Ordering::SeqCst))
                    {
                        return Err(Failure::Closed);
                    }
                    Timer::after(left.min(TICK)).await;
                }
            },
        ))
    }

    /// Logs once when the broker blocks this publishing connection, and once when it is
    /// seen unblocked again.
    pub(super) fn note_blocked(&self, blocked: bool) {
        if self.blocked.swap(blocked, Ordering::SeqCst) == blocked {
            return;
        }
        if blocked {
            warn!(
                "amqp {} blocked publishing (a memory or disk alarm on the broker); publishing \
                 waits until it unblocks",
                self.shown_url
            );
        } else {
            info!("amqp {} unblocked publishing", self.shown_url);
        }
    }
}
