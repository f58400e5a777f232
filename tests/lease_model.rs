//! Property tests of the lease state machine: random interleavings of publish, pull, ack,
//! nack, extend, clock advance and interrupt, checked against a model.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayhem::source::one;
use mayhem::{
    Clock, LeaseError, LeaseId, ManualClock, MessageId, PubSubMessage, Publish, Source,
    SourceError, Subscription, SubscriptionConfig,
};
use proptest::prelude::*;

const DEADLINE_MS: u64 = 1000;
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Pull(usize),
    Ack(usize),
    Nack(usize),
    Extend(usize, u64),
    /// One ack call over several leases (duplicates and stale ones included).
    AckMany(Vec<usize>),
    Advance(u64),
    Interrupt,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Publish),
        3 => (1usize..5).prop_map(Op::Pull),
        3 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Nack),
        2 => (any::<usize>(), 1u64..2 * DEADLINE_MS).prop_map(|(i, by)| Op::Extend(i, by)),
        2 => proptest::collection::vec(any::<usize>(), 1..6).prop_map(Op::AckMany),
        3 => (0u64..2 * DEADLINE_MS).prop_map(Op::Advance),
        1 => Just(Op::Interrupt),
    ]
}

/// Where the model says a message is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Queued {
        attempts: u32,
    },
    Leased {
        lease: LeaseId,
        attempts: u32,
        deadline: Instant,
    },
    Acked,
    Dead,
}

struct Model {
    states: HashMap<MessageId, State>,
    /// Every lease ever handed out, with its message: stale ones are used on purpose.
    leases: Vec<(LeaseId, MessageId)>,
    interrupted: bool,
}

impl Model {
    /// Applies expiry up to `now`, as the subscription does before any operation.
    fn expire(&mut self, now: Instant) {
        for state in self.states.values_mut() {
            if let State::Leased {
                attempts, deadline, ..
            } = *state
            {
                if deadline <= now {
                    *state = back(attempts);
                }
            }
        }
    }

    fn count(&self, wanted: impl Fn(&State) -> bool) -> u64 {
        self.states.values().filter(|state| wanted(state)).count() as u64
    }

    /// The live lease `lease` of `message`, if the model holds it.
    fn live(&self, lease: LeaseId, message: &MessageId) -> Option<u32> {
        match self.states.get(message) {
            Some(State::Leased {
                lease: held,
                attempts,
                ..
            }) if *held == lease => Some(*attempts),
            _ => None,
        }
    }
}

/// Where a message goes when its lease ends without ack.
fn back(attempts: u32) -> State {
    if attempts >= MAX_ATTEMPTS {
        State::Dead
    } else {
        State::Queued { attempts }
    }
}

proptest! {
    // A fixed seed: the same interleavings on every run, so a failure always reproduces.
    #![proptest_config(ProptestConfig { cases: 256, rng_seed: proptest::test_runner::RngSeed::Fixed(0x6d61_7968_656d), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_subscription_follows_the_model(ops in proptest::collection::vec(op(), 1..80), seed in any::<u64>()) {
        let clock = Arc::new(ManualClock::new());
        let sub = Subscription::with_clock(
            SubscriptionConfig { ack_deadline: Duration::from_millis(DEADLINE_MS), max_attempts: MAX_ATTEMPTS, max_backlog: 1000 },
            clock.clone(),
        );
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut model = Model { states: HashMap::new(), leases: Vec::new(), interrupted: false };

        for op in ops {
            let now = clock.now();
            model.expire(now);
            match op {
                Op::Publish => {
                    let message = PubSubMessage::random(&mut rng);
                    let result = sub.publish(std::slice::from_ref(&message));
                    if model.interrupted {
                        prop_assert_eq!(result, Err(SourceError::Closed));
                    } else {
                        prop_assert_eq!(result, Ok(()));
                        model.states.insert(message.id().clone(), State::Queued { attempts: 0 });
                    }
                }
                Op::Pull(max) => {
                    let mut out = Vec::new();
                    let result = sub.pull(max, Duration::ZERO, &mut out);
                    if model.interrupted {
                        prop_assert_eq!(result, Err(SourceError::Closed));
                        continue;
                    }
                    prop_assert_eq!(result, Ok(()));
                    let queued = model.count(|s| matches!(s, State::Queued { .. }));
                    prop_assert_eq!(out.len() as u64, queued.min(max as u64));
                    for lease in out {
                        // Only a queued message can be delivered: never one leased to another holder.
                        let state = model.states.get(lease.message.id()).copied();
                        let Some(State::Queued { attempts }) = state else {
                            return Err(TestCaseError::fail(format!("delivered {:?} in state {state:?}", lease.message)));
                        };
                        // Attempts only grow, one per delivery.
                        prop_assert_eq!(lease.attempt, attempts + 1);
                        model.states.insert(lease.message.id().clone(), State::Leased {
                            lease: lease.id,
                            attempts: lease.attempt,
                            deadline: now + Duration::from_millis(DEADLINE_MS),
                        });
                        model.leases.push((lease.id, lease.message.id().clone()));
                    }
                }
                Op::Ack(index) | Op::Nack(index) | Op::Extend(index, _) if model.leases.is_empty() => {
                    let _ = index;
                }
                Op::AckMany(_) if model.leases.is_empty() => {}
                Op::AckMany(indexes) => {
                    let picked: Vec<(LeaseId, MessageId)> = indexes
                        .iter()
                        .map(|index| model.leases[index % model.leases.len()].clone())
                        .collect();
                    let ids: Vec<LeaseId> = picked.iter().map(|(id, _)| *id).collect();
                    let mut refused = Vec::new();
                    prop_assert_eq!(sub.ack(&ids, &mut refused), Ok(()));
                    // The model settles them in order: a duplicate is refused the second time.
                    let mut expected = Vec::new();
                    for (lease, message) in picked {
                        if model.live(lease, &message).is_some() {
                            model.states.insert(message, State::Acked);
                        } else {
                            expected.push(lease);
                        }
                    }
                    prop_assert_eq!(refused, expected);
                }
                Op::Ack(index) => {
                    let (lease, message) = model.leases[index % model.leases.len()].clone();
                    let result = one(lease, |ids, refused| sub.ack(ids, refused));
                    if model.live(lease, &message).is_some() {
                        prop_assert_eq!(result, Ok(()));
                        model.states.insert(message, State::Acked);
                    } else {
                        // An expired or settled lease's ack is refused.
                        prop_assert_eq!(result, Err(LeaseError::Expired));
                    }
                }
                Op::Nack(index) => {
                    let (lease, message) = model.leases[index % model.leases.len()].clone();
                    let result = one(lease, |ids, refused| sub.nack(ids, refused));
                    match model.live(lease, &message) {
                        Some(attempts) => {
                            prop_assert_eq!(result, Ok(()));
                            model.states.insert(message, back(attempts));
                        }
                        None => prop_assert_eq!(result, Err(LeaseError::Expired)),
                    }
                }
                Op::Extend(index, by) => {
                    let (lease, message) = model.leases[index % model.leases.len()].clone();
                    let result = one(lease, |ids, refused| sub.extend(ids, Duration::from_millis(by), refused));
                    match model.live(lease, &message) {
                        Some(attempts) => {
                            prop_assert_eq!(result, Ok(()));
                            model.states.insert(message, State::Leased { lease, attempts, deadline: now + Duration::from_millis(by) });
                        }
                        None => prop_assert_eq!(result, Err(LeaseError::Expired)),
                    }
                }
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Interrupt => {
                    Source::interrupt(&sub);
                    model.interrupted = true;
                }
            }

            // Every published message is in exactly one state, and the counts agree.
            model.expire(clock.now());
            let stats = sub.stats();
            prop_assert_eq!(stats.published, model.states.len() as u64);
            let acked = model.count(|s| *s == State::Acked);
            prop_assert_eq!(stats.dead_lettered, model.count(|s| *s == State::Dead));
            prop_assert_eq!(stats.remaining, model.count(|s| matches!(s, State::Queued { .. } | State::Leased { .. })));
            prop_assert_eq!(stats.published, acked + stats.dead_lettered + stats.remaining);
            prop_assert_eq!(sub.settled(), acked + stats.dead_lettered);
        }
    }
}
