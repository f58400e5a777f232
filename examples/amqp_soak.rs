//! `make soak`, RabbitMQ part: randomized fault runs of the binary on RabbitMQ (instances
//! SIGKILLed or stopped with SIGTERM and restarted, the broker frozen with SIGSTOP or stopped
//! and started again on its data, memory alarms, foreign messages), each checked by message
//! id, then a summary table. Needs the binary and this example built with `--features amqp`
//! (`make soak` does). Not part of `make test` (its fast subset with fixed seeds is in
//! `tests/amqp.rs`).
//!
//! Usage: `amqp_soak [--runs N] [--waves N] [--seed N] [--jobs N]` (defaults: 10 runs of 6
//! waves, a random seed, 2 jobs; each run starts a `rabbitmq-server` of its own, about 5 s
//! and 150 to 230 MB). Exits 1 if any run lost a message or broke an expectation; exits 2
//! when `rabbitmq-server` is not installed.

#[path = "../tests/amqp_soak/mod.rs"]
mod amqp_soak;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

fn main() {
    let mut runs = 10u64;
    let mut waves = 6u64;
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
                    "error: invalid argument '{flag}' (see the usage in examples/amqp_soak.rs)"
                );
                std::process::exit(2);
            }
        }
    }
    if !std::path::Path::new(amqp_soak::SERVER).exists() {
        eprintln!(
            "error: {} not found (apt-get install rabbitmq-server); the RabbitMQ soak needs it",
            amqp_soak::SERVER
        );
        std::process::exit(2);
    }
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("mayhem")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| {
            eprintln!("error: build the binary first (make soak does: cargo build --release --features amqp --bins --examples)");
            std::process::exit(2);
        });
    let binary = binary.to_string_lossy().into_owned();
    println!("amqp soak: {runs} runs of {waves} waves, {jobs} jobs, master seed {seed}");
    let next = AtomicU64::new(0);
    let results = Mutex::new(Vec::new());
    let started = Instant::now();
    // A few threads, each running one scenario at a time (each with its own server).
    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= runs {
                    return;
                }
                let run_seed = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let run_started = Instant::now();
                let outcome = amqp_soak::run(&binary, run_seed, waves as usize);
                println!(
                    "run seed {run_seed}: {}{} published, {} acked, {} dead-lettered, {} foreign, \
                     {} duplicates, {:.0} s; faults: {}",
                    if outcome.adopted {
                        "queue declared first as a classic one, "
                    } else {
                        ""
                    },
                    outcome.published,
                    outcome.acked,
                    outcome.dead,
                    outcome.foreign,
                    outcome.duplicates,
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
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let sum = |f: &dyn Fn(&amqp_soak::Outcome) -> usize| -> usize {
        results.iter().map(|(_, o)| f(o)).sum()
    };
    let failed = results
        .iter()
        .filter(|(_, o)| !o.problems.is_empty())
        .count();
    println!();
    println!("| runs | of them on a queue declared first as a classic one | published | acked | dead-lettered | lost | foreign | faults | duplicates | slow exits | failed runs | seconds |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
        results.len(),
        results.iter().filter(|(_, o)| o.adopted).count(),
        sum(&|o| o.published),
        sum(&|o| o.acked),
        sum(&|o| o.dead),
        sum(&|o| o
            .published
            .saturating_sub(o.acked + o.dead)
            .min(o.published)),
        sum(&|o| o.foreign),
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
