//! The kit's lease semantics on a broker in memory.

use std::collections::VecDeque;

use super::*;
use crate::source::{Lease, LeaseId};

/// What the fake broker was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Ack(Vec<u32>),
    Modify(Vec<u32>, u32),
    Dead(u32, String, bool),
}

/// A broker in memory: hands out what `waiting` holds, records every call, and fails
/// the next `failures` calls of each kind with `failure` (503: transient; 400: for good).
#[derive(Debug, Default)]
struct Fake {
    waiting: Mutex<VecDeque<Fetched<u32>>>,
    calls: Mutex<Vec<Call>>,
    failures: Mutex<u32>,
    failure: u16,
    dead_refused_unless_stripped: bool,
    /// A handle whose every request is refused for good, as the emulator refuses a request
    /// with an unknown ack id.
    poisoned: Option<u32>,
}

impl Fake {
    fn fail(&self) -> Result<(), HttpError> {
        let mut failures = lock(&self.failures);
        if *failures == 0 {
            return Ok(());
        }
        *failures -= 1;
        Err(HttpError::Status {
            code: self.failure,
            status: String::new(),
            message: "injected".into(),
        })
    }
}

impl Broker for Fake {
    type Handle = u32;
    const NAME: &'static str = "fake";
    const FETCH_MAX: usize = 10;
    const PER_REQUEST: usize = 2;
    const MAX_EXTENSION: Duration = Duration::from_secs(600);

    fn endpoint(&self) -> &str {
        "memory"
    }

    fn queue(&self) -> &str {
        "queue"
    }

    fn fetch(&self, max: usize) -> Result<Vec<Fetched<u32>>, HttpError> {
        let mut waiting = lock(&self.waiting);
        let take = max.min(waiting.len());
        Ok(waiting.drain(..take).collect())
    }

    fn recreate(&self) -> Result<(), HttpError> {
        Ok(())
    }

    fn ack(&self, handles: &[u32]) -> Result<(), HttpError> {
        self.fail()?;
        if self
            .poisoned
            .is_some_and(|poisoned| handles.contains(&poisoned))
        {
            return Err(HttpError::Status {
                code: 400,
                status: "INVALID_ARGUMENT".into(),
                message: "Invalid ack id".into(),
            });
        }
        lock(&self.calls).push(Call::Ack(handles.to_vec()));
        Ok(())
    }

    fn modify(&self, handles: &[u32], seconds: u32) -> Result<(), HttpError> {
        self.fail()?;
        lock(&self.calls).push(Call::Modify(handles.to_vec(), seconds));
        Ok(())
    }

    fn dead_letter(&self, letter: &DeadLetter<u32>, stripped: bool) -> Result<(), HttpError> {
        if self.dead_refused_unless_stripped && !stripped {
            return Err(HttpError::Status {
                code: 400,
                status: "INVALID_ARGUMENT".into(),
                message: "too large".into(),
            });
        }
        let call = Call::Dead(letter.handle, letter.reason.to_string(), stripped);
        lock(&self.calls).push(call);
        Ok(())
    }
}

fn delivery(handle: u32, attempt: Option<u32>, data: Result<&str, &str>) -> Fetched<u32> {
    Fetched {
        handle,
        origin: format!("m{handle}"),
        attempt,
        message: data
            .map(|data| PubSubMessage::new(data.to_owned()))
            .map_err(str::to_owned),
    }
}

fn leasing(fake: Fake, max_attempts: u32) -> Leasing<Fake> {
    let terms = Terms {
        max_attempts,
        reconnect_limit: Duration::from_secs(30),
        deadline: Duration::from_secs(10),
        ordering: false,
    };
    Leasing::start(Shared::new(fake, terms)).unwrap()
}

fn pull(leasing: &Leasing<Fake>) -> Vec<Lease> {
    let mut out = Vec::new();
    leasing.pull(10, Duration::ZERO, &mut out).unwrap();
    out
}

fn calls(leasing: &Leasing<Fake>) -> Vec<Call> {
    assert_eq!(leasing.flush(Duration::from_secs(10)), 0, "all sent");
    lock(&leasing.shared.broker.calls).clone()
}

#[test]
fn acks_nacks_and_rejects_become_the_brokers_requests_in_batches() {
    let fake = Fake::default();
    lock(&fake.waiting).extend((1..=5).map(|n| delivery(n, Some(1), Ok("web-01"))));
    let leasing = leasing(fake, 5);
    let leases = pull(&leasing);
    assert_eq!(leases.len(), 5);
    let ids: Vec<LeaseId> = leases.iter().map(|lease| lease.id).collect();
    let mut refused = Vec::new();
    leasing.ack(&ids[..3], &mut refused).unwrap();
    leasing.nack(&ids[3..4], &mut refused).unwrap();
    leasing.reject(ids[4], "bad host", &mut refused).unwrap();
    // Settled leases are refused the second time.
    leasing.ack(&ids[..1], &mut refused).unwrap();
    assert_eq!(refused, [ids[0]]);
    let calls = calls(&leasing);
    let acks: Vec<&Vec<u32>> = calls
        .iter()
        .filter_map(|call| match call {
            Call::Ack(handles) => Some(handles),
            _ => None,
        })
        .collect();
    assert!(acks.iter().all(|handles| handles.len() <= 2), "{calls:?}");
    let mut acked: Vec<u32> = acks.into_iter().flatten().copied().collect();
    acked.sort_unstable();
    assert_eq!(acked, [1, 2, 3, 5], "{calls:?}");
    assert!(calls.contains(&Call::Modify(vec![4], 0)), "{calls:?}");
    // The dead letter is published before its delivery is acked.
    let dead_at = calls
        .iter()
        .position(|call| *call == Call::Dead(5, "bad host".into(), false));
    let acked_at = calls
        .iter()
        .position(|call| matches!(call, Call::Ack(handles) if handles.contains(&5)));
    assert!(dead_at.is_some() && dead_at < acked_at, "{calls:?}");
    assert_eq!(
        calls
            .iter()
            .filter(|call| !matches!(call, Call::Ack(_)))
            .count(),
        2,
        "one give-back and one dead letter: {calls:?}"
    );
    assert_eq!(leasing.settled(), 4);
    let stats = leasing.stats();
    assert_eq!((stats.dead_lettered, stats.remaining), (1, 0));
}

#[test]
fn the_last_attempt_unreadable_data_and_too_many_deliveries_are_dead_letters() {
    let fake = Fake::default();
    lock(&fake.waiting).extend([
        delivery(1, Some(3), Ok("web-01")),
        delivery(2, Some(4), Ok("web-02")),
        delivery(3, None, Err("its data is not base64")),
    ]);
    let leasing = leasing(fake, 3);
    let leases = pull(&leasing);
    assert_eq!(leases.len(), 1, "only the first is handed out");
    assert_eq!(leases[0].attempt, 3);
    leasing.nack(&[leases[0].id], &mut Vec::new()).unwrap();
    let calls = calls(&leasing);
    let dead: Vec<&Call> = calls
        .iter()
        .filter(|call| matches!(call, Call::Dead(..)))
        .collect();
    assert_eq!(dead.len(), 3, "{calls:?}");
    assert!(calls.contains(&Call::Dead(
        2,
        "delivered 4 times, over the maximum of 3".into(),
        false
    )));
    assert!(calls.contains(&Call::Dead(1, "nacked on attempt 3 of 3".into(), false)));
    let stats = leasing.stats();
    assert_eq!((stats.dead_lettered, stats.undecodable), (3, 1));
    assert_eq!(leasing.settled(), 3, "each dead letter acked once");
}

#[test]
fn transient_failures_are_retried_and_a_refused_dead_letter_goes_stripped() {
    let fake = Fake {
        failure: 503,
        dead_refused_unless_stripped: true,
        ..Fake::default()
    };
    *lock(&fake.failures) = 2;
    lock(&fake.waiting).extend([delivery(1, Some(1), Ok("a")), delivery(2, None, Ok("b"))]);
    let leasing = leasing(fake, 5);
    let leases = pull(&leasing);
    let mut refused = Vec::new();
    leasing.ack(&[leases[0].id], &mut refused).unwrap();
    leasing.reject(leases[1].id, "why", &mut refused).unwrap();
    // `flush` gives up while the broker fails; wait for the retries instead.
    let end = Instant::now() + Duration::from_secs(10);
    while leasing.settled() < 2 && Instant::now() < end {
        thread::sleep(Duration::from_millis(5));
    }
    let calls = calls(&leasing);
    assert!(
        calls.contains(&Call::Dead(2, "why".into(), true)),
        "{calls:?}"
    );
    let acked: Vec<u32> = calls
        .iter()
        .flat_map(|call| match call {
            Call::Ack(handles) => handles.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(acked.len(), 2, "both acked once, after two 503s: {calls:?}");
    assert_eq!(leasing.settled(), 2);
}

#[test]
fn extensions_are_whole_seconds_up_to_the_brokers_limit_and_expired_leases_are_refused() {
    let fake = Fake::default();
    lock(&fake.waiting).extend([delivery(1, Some(1), Ok("a"))]);
    let leasing = leasing(fake, 5);
    let lease = pull(&leasing).remove(0);
    let mut refused = Vec::new();
    leasing
        .extend(&[lease.id], Duration::from_millis(1500), &mut refused)
        .unwrap();
    leasing
        .extend(&[lease.id], Duration::from_secs(3600), &mut refused)
        .unwrap();
    assert!(refused.is_empty());
    let calls = calls(&leasing);
    assert_eq!(
        calls,
        [Call::Modify(vec![1], 2), Call::Modify(vec![1], 600)],
        "rounded up, and capped at MAX_EXTENSION"
    );
    // Past its local deadline the lease is refused and counted as expired.
    lock(&leasing.shared.holds)
        .extend(lease.id, Instant::now(), Instant::now())
        .unwrap();
    leasing.ack(&[lease.id], &mut refused).unwrap();
    assert_eq!(refused, [lease.id]);
    assert_eq!(leasing.stats().expired, 1);
}

#[test]
fn a_handle_refused_for_good_does_not_void_the_others_of_its_request() {
    let fake = Fake {
        poisoned: Some(3),
        ..Fake::default()
    };
    lock(&fake.waiting).extend((1..=6).map(|n| delivery(n, Some(1), Ok("web-01"))));
    let leasing = leasing(fake, 5);
    let ids: Vec<LeaseId> = pull(&leasing).iter().map(|lease| lease.id).collect();
    let mut refused = Vec::new();
    leasing.ack(&ids, &mut refused).unwrap();
    assert!(refused.is_empty());
    // Requests of 2: [3, 4] is refused whole, then 4 goes alone and 3 is refused alone.
    assert_eq!(
        calls(&leasing),
        [
            Call::Ack(vec![1, 2]),
            Call::Ack(vec![4]),
            Call::Ack(vec![5, 6])
        ]
    );
    assert_eq!(leasing.settled(), 5);
}
