//! `make soak`, Pub/Sub part: randomized fault runs of the binary on the Google Cloud Pub/Sub
//! emulator (instances SIGKILLed or stopped with SIGTERM and restarted, the emulator frozen
//! with SIGSTOP and continued), each checked by message id, then a summary table. Needs the
//! binary and this example built with `--features pubsub` (`make soak` does). Not part of
//! `make test` (its fast subset with fixed seeds is in `tests/pubsub.rs`).
//!
//! Usage: `pubsub_soak [--runs N] [--waves N] [--seed N] [--jobs N]` (defaults: 6 runs of 5
//! waves, a random seed, 2 jobs; each job starts an emulator of its own, about 4 s and
//! 300 MB, and runs its runs one after the other on it, each on a subscription of its own).
//! Exits 1 if any run lost a message or broke an expectation; exits 2 when the emulator is
//! not installed. `MAYHEM_SOAK_LOGS=DIR` keeps every instance's stderr and each run's
//! dead-lettered names in DIR.

#[path = "../tests/common/pubsub.rs"]
mod emulator;
#[path = "../tests/pubsub_soak/mod.rs"]
mod pubsub_soak;

/// What `tests/pubsub_soak` finds as `crate::common`, as the tests include it.
mod common {
    pub(crate) use super::emulator as pubsub;
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

use emulator::Emulator;

fn main() {
    let mut runs = 6u64;
    let mut waves = 5u64;
    let mut seed = fastrand::u64(..);
    let mut jobs = 2usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse::<u64>().ok());
        match (pair[0].as_str(), value) {
            ("--runs", Some(v)) => runs = v,
            ("--waves", Some(v)) => waves = v.max(1),
            ("--seed", Some(v)) => seed = v,
            ("--jobs", Some(v)) => jobs = v.max(1) as usize,
            (flag, _) => {
                eprintln!(
                    "error: invalid argument '{flag}' (see the usage in examples/pubsub_soak.rs)"
                );
                std::process::exit(2);
            }
        }
    }
    if !emulator::installed() {
        eprintln!(
            "error: {} not found (apt-get install google-cloud-cli-pubsub-emulator); the \
             Pub/Sub soak needs it",
            emulator::EMULATOR
        );
        std::process::exit(2);
    }
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("mayhem")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| {
            eprintln!("error: build the binary first (make soak does: cargo build --release --features pubsub --bins --examples)");
            std::process::exit(2);
        });
    let binary = binary.to_string_lossy().into_owned();
    println!("pubsub soak: {runs} runs of {waves} waves, {jobs} jobs, master seed {seed}");
    let next = AtomicU64::new(0);
    let results = Mutex::new(Vec::new());
    let started = Instant::now();
    // A few threads, each with an emulator of its own, running one scenario at a time on it
    // (a run freezes its emulator: runs must not share one at the same time).
    thread::scope(|scope| {
        for _ in 0..jobs.min(runs as usize) {
            scope.spawn(|| {
                let mut emulator: Option<Emulator> = None;
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= runs {
                        return;
                    }
                    let run_seed = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let run_started = Instant::now();
                    // A new emulator for the job's first run, or when the last one stopped
                    // answering.
                    if !emulator.as_ref().is_some_and(Emulator::answers) {
                        emulator = None;
                        emulator = match Emulator::start() {
                            Ok(started) => Some(started),
                            Err(error) => {
                                println!("run seed {run_seed}: PROBLEM {error}");
                                let outcome = pubsub_soak::Outcome {
                                    problems: vec![error],
                                    ..Default::default()
                                };
                                results
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((run_seed, outcome));
                                continue;
                            }
                        };
                    }
                    let Some(on) = emulator.as_ref() else {
                        continue;
                    };
                    let outcome = pubsub_soak::run(&binary, on, run_seed, waves as usize);
                    println!(
                        "run seed {run_seed}: {} published, {} acked, {} dead-lettered, \
                         {} duplicates, {} acked and dead-lettered, {:.0} s; faults: {}",
                        outcome.published,
                        outcome.acked,
                        outcome.dead,
                        outcome.duplicates,
                        outcome.acked_and_dead,
                        run_started.elapsed().as_secs_f64(),
                        outcome.fault_names.join(", ")
                    );
                    for problem in &outcome.problems {
                        println!("run seed {run_seed}: PROBLEM {problem}");
                    }
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((run_seed, outcome));
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let sum = |f: &dyn Fn(&pubsub_soak::Outcome) -> usize| -> usize {
        results.iter().map(|(_, o)| f(o)).sum()
    };
    let failed = results
        .iter()
        .filter(|(_, o)| !o.problems.is_empty())
        .count();
    println!();
    println!("| runs | published | acked | dead-lettered | lost | faults | duplicates | acked and dead-lettered | duplicates (healthy) | slow exits | failed runs | seconds |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
        results.len(),
        sum(&|o| o.published),
        sum(&|o| o.acked),
        sum(&|o| o.dead),
        sum(&|o| o.lost),
        sum(&|o| o.faults),
        sum(&|o| o.duplicates),
        sum(&|o| o.acked_and_dead),
        sum(&|o| o.healthy_duplicates),
        sum(&|o| o.slow_exits),
        failed,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
