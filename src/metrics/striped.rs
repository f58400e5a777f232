//! Striped counters ([`Striped`]): one cache line per thread, summed when read.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::load;

/// Stripes of the counters that every handler task updates.
pub(super) const STRIPES: usize = 8;

/// A counter split into cache-line-sized stripes, one per thread (modulo [`STRIPES`]): the
/// executor threads add to it for every message, and a single atomic would bounce between
/// their cores. Reads sum the stripes.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

/// One stripe, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

impl Striped {
    pub(crate) fn add(&self, count: u64) {
        self.0[stripe()].0.fetch_add(count, Ordering::Relaxed);
    }

    /// Takes `count` away; a stripe may wrap below zero, the sum does not.
    pub(crate) fn sub(&self, count: u64) {
        self.0[stripe()].0.fetch_sub(count, Ordering::Relaxed);
    }

    pub(super) fn reset(&self) {
        self.0
            .iter()
            .for_each(|padded| padded.0.store(0, Ordering::Relaxed));
    }

    /// The total. Wrapping: a gauge's stripes may each be "negative" (one thread adds what
    /// another takes away), while their sum never is.
    pub(crate) fn sum(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, padded| sum.wrapping_add(load(&padded.0)))
    }
}

/// The stripe of the calling thread: threads get consecutive stripes as they first count.
pub(super) fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}
