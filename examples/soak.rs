//! `make soak`: many randomized fault runs of the real binary and of the library, then an
//! overload run, and a summary table. Not part of `make test` (its fast subset with fixed
//! seeds is `tests/chaos_fast.rs`).
//!
//! Usage: `soak [--runs N] [--seconds S] [--overload-seconds S] [--seed N] [--jobs N]`
//! (defaults: 500 runs, at most 300 s of runs, a 30 s overload run, a random seed, 4 jobs).
//! Exits 1 if any run lost a message or broke an expectation.

#[path = "../tests/chaos/mod.rs"]
mod chaos;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use chaos::Outcome;

fn main() {
    let mut runs = 500u64;
    let mut seconds = 300u64;
    let mut overload_seconds = 30u64;
    let mut seed = fastrand::u64(..);
    let mut jobs = 4usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse::<u64>().ok());
        match (pair[0].as_str(), value) {
            ("--runs", Some(v)) => runs = v,
            ("--seconds", Some(v)) => seconds = v,
            ("--overload-seconds", Some(v)) => overload_seconds = v,
            ("--seed", Some(v)) => seed = v,
            ("--jobs", Some(v)) => jobs = v.max(1) as usize,
            (flag, _) => {
                eprintln!("error: invalid argument '{flag}' (see the usage in examples/soak.rs)");
                std::process::exit(2);
            }
        }
    }
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("mayhem")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| {
            eprintln!("error: build the binary first (make soak does: cargo build --release --bins --examples)");
            std::process::exit(2);
        });
    let binary = binary.to_string_lossy().into_owned();
    chaos::quiet_handler_panics();
    println!(
        "soak: {runs} runs (at most {seconds} s), {jobs} jobs, master seed {seed}, binary {binary}"
    );

    let next = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let totals = Mutex::new((Outcome::default(), 0u64, 0u64));
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= runs || Instant::now() >= deadline {
                    break;
                }
                let run_seed = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let binary_run = index.is_multiple_of(2);
                let outcome = if binary_run {
                    chaos::binary_run(&binary, run_seed)
                } else {
                    chaos::library_run(run_seed)
                };
                for problem in &outcome.problems {
                    println!("PROBLEM: {problem}");
                }
                let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
                totals.0.add(&outcome);
                if binary_run {
                    totals.1 += 1;
                } else {
                    totals.2 += 1;
                }
            });
        }
    });
    let (mut total, binary_runs, library_runs) =
        totals.into_inner().unwrap_or_else(|e| e.into_inner());
    let runs_took = started.elapsed();

    println!("overload: unthrottled publishers, 1 s handlers, {overload_seconds} s");
    let (peak_kb, overload) = chaos::overload_run(&binary, Duration::from_secs(overload_seconds));
    for problem in &overload.problems {
        println!("PROBLEM: {problem}");
    }
    total.add(&overload);

    println!();
    println!("| runs (binary + library) | signals sent | faults injected (panics / handler failures / expired leases) | forced exits | messages | lost | problems | overload peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} ({binary_runs} + {library_runs}) in {:.0} s | {} | {} / {} / {} | {} | {} | {} | {} | {:.1} MB over {overload_seconds} s |",
        binary_runs + library_runs,
        runs_took.as_secs_f64(),
        total.signals,
        total.panics,
        total.failures,
        total.expired,
        total.forced,
        total.published,
        total.lost,
        total.problems.len(),
        peak_kb as f64 / 1024.0
    );
    if total.lost > 0 || !total.problems.is_empty() {
        std::process::exit(1);
    }
}
