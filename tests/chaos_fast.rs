//! The fast subset of the chaos soak, with fixed seeds: randomized faults and signals against
//! the binary and the library; every run must account for every message.
// These tests start the binary, which only the `cli` feature builds.
#![cfg(feature = "cli")]

mod chaos;

use std::time::Duration;

use chaos::Outcome;

/// Seeds chosen once; the runs they give cover signals (one and two), counted runs, panics,
/// stalls and certain failure.
const SEEDS: [u64; 8] = [1, 2, 3, 5, 8, 13, 21, 34];

fn assert_clean(outcome: &Outcome) {
    assert!(
        outcome.problems.is_empty(),
        "problems:\n{}",
        outcome.problems.join("\n")
    );
    assert_eq!(outcome.lost, 0);
}

#[test]
fn binary_runs_with_random_faults_and_signals_lose_nothing() {
    let mut total = Outcome::default();
    for seed in SEEDS {
        total.add(&chaos::binary_run(env!("CARGO_BIN_EXE_mayhem"), seed));
    }
    assert_clean(&total);
    assert!(total.signals > 0 && total.published > 0, "{total:?}");
}

#[test]
fn library_runs_with_random_faults_and_triggers_lose_nothing() {
    chaos::quiet_handler_panics();
    let mut total = Outcome::default();
    for seed in SEEDS {
        total.add(&chaos::library_run(seed));
    }
    assert_clean(&total);
    assert!(total.published > 0, "{total:?}");
}

#[test]
fn overload_keeps_memory_bounded() {
    let (peak_kb, outcome) =
        chaos::overload_run(env!("CARGO_BIN_EXE_mayhem"), Duration::from_secs(3));
    assert_clean(&outcome);
    assert!(outcome.published > 0);
    // Backpressure: the backlog (10,000) and the in-flight window (1,000) bound the memory.
    assert!(peak_kb > 0 && peak_kb < 64 * 1024, "peak RSS {peak_kb} kB");
}
