//! The chaos monkey's simulated database: a connection pool of limited capacity and a
//! scheduled outage, both off by default (the save then behaves as it always did).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::future;

/// A window of time, counted from the handler's creation, during which every save fails:
/// `--db-outage AT+FOR`.
///
/// ```
/// use std::time::Duration;
/// let outage: mayhem::database::Outage = "30s+10s".parse().unwrap();
/// assert_eq!(outage.at, Duration::from_secs(30));
/// assert_eq!(outage.length, Duration::from_secs(10));
/// assert_eq!(outage.to_string(), "30s+10s");
/// assert!("30s".parse::<mayhem::database::Outage>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the outage begins, after the handler was created (the service's start).
    pub at: Duration,
    /// How long it lasts.
    pub length: Duration,
}

impl FromStr for Outage {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |part: &str| -> Result<Duration, String> {
            let part = part.trim();
            if part == "0" {
                return Ok(Duration::ZERO);
            }
            humantime::parse_duration(part).map_err(|error| format!("{part}: {error}"))
        };
        let (at, length) = text
            .split_once('+')
            .ok_or_else(|| "write AT+FOR, like 30s+10s".to_owned())?;
        let outage = Outage {
            at: parse(at)?,
            length: parse(length)?,
        };
        if outage.length.is_zero() {
            return Err("the outage must last longer than 0 (write AT+FOR, like 30s+10s)".into());
        }
        Ok(outage)
    }
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{}",
            humantime::format_duration(self.at),
            humantime::format_duration(self.length)
        )
    }
}

/// Why a save found no database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// Inside the outage window.
    Outage,
    /// Every connection stayed busy for longer than the patience.
    Busy,
}

/// The simulated database shared by every clone of a handler.
#[derive(Debug, Clone)]
pub(crate) struct Database {
    /// The connection pool; `None` = unlimited connections.
    pool: Option<Arc<Pool>>,
    /// The outage window, as instants; `None` = never down.
    outage: Option<(Instant, Instant)>,
}

/// A pool of `capacity` connections; saves past it wait in line for one.
#[derive(Debug)]
struct Pool {
    /// Connections in all (at least 1); [`Database::set_capacity`] changes it while saves
    /// run.
    capacity: AtomicUsize,
    /// Connections in use.
    in_use: AtomicUsize,
    /// Notified, one waiter at a time, when a connection is given back. event-listener
    /// notifies listeners in the order they listened, so the line is first come, first
    /// served, and a waiter that gives up (its patience ran out) passes a notification it
    /// did not take on to the next.
    freed: Event,
    /// How long a save waits for a connection before it fails.
    patience: Duration,
}

/// A connection taken from the pool; given back on drop.
pub(crate) struct Connection {
    /// The pool it goes back to; `None` for an unlimited database.
    pool: Option<Arc<Pool>>,
}

impl Database {
    /// A database with `capacity` connections (`None` = unlimited) whose waiting saves give
    /// up after `patience`, down during `outage` (counted from now).
    pub(crate) fn new(capacity: Option<usize>, patience: Duration, outage: Option<Outage>) -> Self {
        let now = Instant::now();
        Database {
            pool: capacity.map(|capacity| {
                Arc::new(Pool {
                    capacity: AtomicUsize::new(capacity.max(1)),
                    in_use: AtomicUsize::new(0),
                    freed: Event::new(),
                    patience,
                })
            }),
            outage: outage.map(|outage| (now + outage.at, now + outage.at + outage.length)),
        }
    }

    /// The connections of the pool now, or `None` for an unlimited database.
    pub(crate) fn capacity(&self) -> Option<usize> {
        self.pool
            .as_ref()
            .map(|pool| pool.capacity.load(Ordering::Acquire))
    }

    /// Sets the connections of the pool to `capacity` (at least 1) while saves run, and
    /// returns the capacity before; `None`, and nothing changes, for an unlimited database
    /// (made without a capacity), which has no pool to resize.
    ///
    /// A larger pool lets waiting saves in at once. A smaller one takes no connection away:
    /// saves holding one finish as they would, and new saves wait until fewer than the new
    /// capacity are in use.
    pub(crate) fn set_capacity(&self, capacity: usize) -> Option<usize> {
        let pool = self.pool.as_ref()?;
        let capacity = capacity.max(1);
        let before = pool.capacity.swap(capacity, Ordering::AcqRel);
        if capacity > before {
            // Wake as many waiters as there are new connections: each takes one, or passes
            // the notification on if another save took it first.
            pool.freed.notify(capacity - before);
        }
        Some(before)
    }

    /// Whether it has a pool or an outage: without either, a save needs no connection.
    pub(crate) fn is_simulated(&self) -> bool {
        self.pool.is_some() || self.outage.is_some()
    }

    /// Whether the database is down now.
    pub(crate) fn is_down(&self) -> bool {
        self.outage.is_some_and(|(from, until)| {
            let now = Instant::now();
            from <= now && now < until
        })
    }

    /// Takes a connection: at once while the pool has one free, else in line. Returns whether
    /// it had to wait, or why there is none.
    pub(crate) async fn connect(&self) -> Result<(Connection, bool), Unavailable> {
        if self.is_down() {
            return Err(Unavailable::Outage);
        }
        let Some(pool) = &self.pool else {
            return Ok((Connection { pool: None }, false));
        };
        if pool.try_take() {
            return Ok((pool.connection(), false));
        }
        let waited = future::or(
            async {
                loop {
                    let listener = pool.freed.listen();
                    // Checked again once listening: a connection given back in between is
                    // not missed.
                    if pool.try_take() {
                        return true;
                    }
                    listener.await;
                    if pool.try_take() {
                        return true;
                    }
                }
            },
            async {
                async_io::Timer::after(pool.patience).await;
                false
            },
        )
        .await;
        if waited {
            Ok((pool.connection(), true))
        } else {
            Err(Unavailable::Busy)
        }
    }
}

impl Pool {
    /// Takes a connection if one is free.
    fn try_take(&self) -> bool {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.capacity.load(Ordering::Acquire)).then_some(used + 1)
            })
            .is_ok()
    }

    /// The connection just taken.
    fn connection(self: &Arc<Self>) -> Connection {
        Connection {
            pool: Some(Arc::clone(self)),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.in_use.fetch_sub(1, Ordering::AcqRel);
            pool.freed.notify(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_past_the_capacity_wait_in_line_and_give_up_after_the_patience() {
        let database = Database::new(Some(2), Duration::from_millis(30), None);
        smol::block_on(async {
            let (first, waited) = database.connect().await.expect("free");
            assert!(!waited);
            let (second, _) = database.connect().await.expect("free");
            // Full: the third gives up after its patience.
            assert_eq!(database.connect().await.err(), Some(Unavailable::Busy));
            // A connection given back lets the next one in at once.
            drop(first);
            let (_third, waited) = database.connect().await.expect("freed");
            assert!(!waited);
            // One waiting in line gets the connection given back while it waits.
            let waiter = database.connect();
            let giver = async {
                async_io::Timer::after(Duration::from_millis(5)).await;
                drop(second);
            };
            let (result, ()) = future::zip(waiter, giver).await;
            assert!(result.expect("given back").1);
        });
    }

    #[test]
    fn the_capacity_changes_while_saves_hold_connections() {
        let database = Database::new(Some(2), Duration::from_millis(30), None);
        assert_eq!(database.capacity(), Some(2));
        smol::block_on(async {
            let (first, _) = database.connect().await.expect("free");
            let (second, _) = database.connect().await.expect("free");
            // Shrunk below the connections in use: none is taken away, none is given.
            assert_eq!(database.set_capacity(1), Some(2));
            assert_eq!(database.capacity(), Some(1));
            drop(first);
            assert_eq!(database.connect().await.err(), Some(Unavailable::Busy));
            drop(second);
            let (one, waited) = database.connect().await.expect("one free");
            assert!(!waited);
            assert_eq!(database.connect().await.err(), Some(Unavailable::Busy));
            // Grown while a save waits: the waiter gets a new connection at once.
            let waiter = database.connect();
            let grower = async {
                async_io::Timer::after(Duration::from_millis(5)).await;
                assert_eq!(database.set_capacity(3), Some(1));
            };
            let (result, ()) = future::zip(waiter, grower).await;
            let (_two, waited) = result.expect("a new connection");
            assert!(waited);
            let (_three, _) = database.connect().await.expect("free");
            assert_eq!(database.connect().await.err(), Some(Unavailable::Busy));
            drop(one);
        });
        // Zero is taken as 1, as at creation.
        assert_eq!(database.set_capacity(0), Some(3));
        assert_eq!(database.capacity(), Some(1));
        // An unlimited database has no pool to resize.
        let unlimited = Database::new(None, Duration::ZERO, None);
        assert_eq!(unlimited.set_capacity(10), None);
        assert_eq!(unlimited.capacity(), None);
    }

    #[test]
    fn every_save_fails_during_the_outage_only() {
        let during = Database::new(
            None,
            Duration::ZERO,
            Some(Outage {
                at: Duration::ZERO,
                length: Duration::from_secs(3600),
            }),
        );
        assert!(during.is_down());
        assert_eq!(
            smol::block_on(during.connect()).err(),
            Some(Unavailable::Outage)
        );
        let later = Database::new(
            None,
            Duration::ZERO,
            Some(Outage {
                at: Duration::from_secs(3600),
                length: Duration::from_secs(1),
            }),
        );
        assert!(!later.is_down());
    }
}
