//! `make soak`, Redis part: randomized fault runs of the binary on Redis (instances killed
//! and restarted under the same name or another, SIGTERM, Redis stopped with SIGSTOP or
//! killed and restarted, the group destroyed, foreign entries), each checked by message id,
//! then a summary table. Not part of `make test` (its fast subset with fixed seeds is in
//! `tests/redis.rs`).
//!
//! Usage: `redis_soak [--runs N] [--waves N] [--seed N] [--jobs N]` (defaults: 20 runs of 8
//! waves, a random seed, 2 jobs). Exits 1 if any run lost a message or broke an expectation;
//! exits 2 when `redis-server` is not installed.

#[path = "../tests/redis_soak/mod.rs"]
mod redis_soak;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

fn main() {
    let mut runs = 20u64;
    let mut waves = 8u64;
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
                    "error: invalid argument '{flag}' (see the usage in examples/redis_soak.rs)"
                );
                std::process::exit(2);
            }
        }
    }
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("error: redis-server is not installed; the Redis soak needs it");
        std::process::exit(2);
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
    println!("redis soak: {runs} runs of {waves} waves, {jobs} jobs, master seed {seed}");
    let next = AtomicU64::new(0);
    let results = Mutex::new(Vec::new());
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= runs {
                    return;
                }
                let run_seed = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let outcome = redis_soak::run(&binary, run_seed, waves as usize);
                for problem in &outcome.problems {
                    println!("run seed {run_seed}: PROBLEM {problem}");
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((run_seed, outcome));
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let sum = |f: &dyn Fn(&redis_soak::Outcome) -> usize| -> usize {
        results.iter().map(|(_, o)| f(o)).sum()
    };
    let failed = results
        .iter()
        .filter(|(_, o)| !o.problems.is_empty())
        .count();
    println!();
    println!("| runs | published | acked | dead-lettered | lost | faults | duplicates (healthy) | slow exits | failed runs | seconds |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
        results.len(),
        sum(&|o| o.published),
        sum(&|o| o.acked),
        sum(&|o| o.dead),
        sum(&|o| o
            .published
            .saturating_sub(o.acked + o.dead)
            .min(o.published)),
        sum(&|o| o.faults),
        sum(&|o| o.duplicates),
        sum(&|o| o.slow_exits),
        failed,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
