//! `make bench`: throughput, memory and shutdown latency of the real pipeline, side by side
//! with a bare bridge (producer thread -> async_channel -> one executor task per message).
//!
//! Prints a table, writes it to `benches/results.md`, plots throughput against consumers and
//! workers into `benches/throughput.svg`, and replaces the section between the bench markers
//! in `README.md`. Memory figures come from child processes (this binary re-run with a mode
//! argument) so that each one starts from a clean heap.
//!
//! `MAYHEM_BENCH_MESSAGES` sets the message count of the throughput runs (default 1,000,000).
//! `MAYHEM_BENCH=redis` runs only the Redis rows (`MAYHEM_BENCH=payload` only its 1 KiB and
//! 64 KiB payload rows); `MAYHEM_BENCH=amqp` only the RabbitMQ rows
//! (measured when built with `--features amqp`, as `make bench` builds it);
//! `MAYHEM_BENCH=pubsub` only the Pub/Sub rows (built with `--features pubsub`);
//! `MAYHEM_BENCH=peers` only the comparison rows with the Rust peers on tokio (`benches/peers/`,
//! a cargo project of its own that the bench builds), on Redis and RabbitMQ; `MAYHEM_BENCH=noop`
//! only the no-op pipeline and the bare bridge, interleaved; `MAYHEM_BENCH=window-auto` only
//! the `auto` runs of the adaptive window's three workloads, each with its trace (to tune the
//! controller); `MAYHEM_BENCH=window-fixed` one fixed window of workload (a),
//! `MAYHEM_BENCH_WINDOW` (default 2,000,000), with its trace; `MAYHEM_BENCH=window` only the
//! rows of `--max-in-flight auto` (`benches/window/`): the goodput curve's workload and two
//! more, each against fixed windows, a downstream that degrades mid-run, a database outage
//! with and without the breaker, and the rate limit, with their plots (`benches/window.svg`
//! and beside it).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use async_executor::Executor;
use futures_lite::future;
use mayhem::{
    Config, MayhemConfig, MayhemHandler, Metrics, PubSubMessage, Publish, Runner, Shutdown,
    ShutdownReason, Source, Subscription,
};

/// Thread counts swept for publishers, consumers and workers.
const SWEEP: [usize; 3] = [1, 2, 4];
/// Messages per sweep point (smaller than the headline runs, to keep `make bench` short).
const SWEEP_MESSAGES: u64 = 200_000;
/// Repetitions of the headline figures.
const RUNS: usize = 5;
/// Messages of the peak-RSS run.
const RSS_MESSAGES: u64 = 200_000;
/// Messages held in flight for the per-message memory figure.
const IN_FLIGHT: usize = 100_000;
/// Flow-control windows of the goodput curve (1 s handlers).
const WINDOWS: [usize; 6] = [1_000, 10_000, 100_000, 300_000, 1_000_000, 2_000_000];
/// Warm-up before a goodput point is measured: the window fills and the first handlers end.
const GOODPUT_WARMUP: Duration = Duration::from_secs(5);
/// How long a goodput point is measured (a run of workload (a) of `benches/window/`).
const GOODPUT_SPAN: Duration = Duration::from_secs(10);
/// Messages of the overload run of the binary.
const OVERLOAD_MESSAGES: usize = 1_000_000;
/// The title of `benches/window.svg`.
const WINDOW_TITLE: &str = "--max-in-flight auto over time (1 s handlers)";
/// Start and end markers of the generated section of the README.
const MARKERS: (&str, &str) = ("<!-- bench:start -->", "<!-- bench:end -->");

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "pubsub")]
mod pubsub;
mod redis;
mod window;

/// Messages (entries) per run of the comparison rows with the Rust peers.
const PEER_MESSAGES: u64 = 200_000;

/// The comparison rows with the Rust peers (`benches/peers/`), built first: Redis, then
/// RabbitMQ (measured when the bench is built with `--features amqp`).
fn peer_rows(messages: u64) -> Vec<String> {
    let peers = peers::Peers::build();
    let mut rows = redis::peer_rows(messages, &peers);
    #[cfg(feature = "amqp")]
    rows.extend(amqp::peer_rows(messages, &peers));
    #[cfg(not(feature = "amqp"))]
    rows.push(
        "| RabbitMQ peer rows | NOT MEASURED: bench built without `--features amqp` | |".to_owned(),
    );
    rows
}

/// Entries per run of the Redis rows.
const REDIS_MESSAGES: u64 = 200_000;
/// Messages per run of the RabbitMQ rows.
const AMQP_MESSAGES: u64 = 50_000;

/// Messages per run of the Pub/Sub rows.
const PUBSUB_MESSAGES: u64 = 40_000;

/// The Pub/Sub rows, measured when the bench is built with `--features pubsub`.
#[cfg(feature = "pubsub")]
fn pubsub_rows(messages: u64) -> Vec<String> {
    pubsub::rows(messages)
}

/// The Pub/Sub rows, measured when the bench is built with `--features pubsub`.
#[cfg(not(feature = "pubsub"))]
fn pubsub_rows(_messages: u64) -> Vec<String> {
    vec!["| Pub/Sub rows | not measured: bench built without `--features pubsub` | |".to_owned()]
}

/// The RabbitMQ rows, measured when the bench is built with `--features amqp`.
#[cfg(feature = "amqp")]
fn amqp_rows(messages: u64) -> Vec<String> {
    amqp::rows(messages)
}

/// The RabbitMQ rows, measured when the bench is built with `--features amqp`.
#[cfg(not(feature = "amqp"))]
fn amqp_rows(_messages: u64) -> Vec<String> {
    vec!["| RabbitMQ rows | not measured: bench built without `--features amqp` | |".to_owned()]
}

/// A run of `--max-in-flight auto` over time: acked/s (left axis) and the window, scaled
/// to the same height (its maximum is written in the legend).
fn plot_window(trace: &[(f64, usize, f64)], title: &str) -> String {
    let (width, height, left, bottom, top, right) = (640.0, 400.0, 90.0, 50.0, 40.0, 40.0);
    let max_rate = trace.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let max_window = trace.iter().map(|p| p.1).max().unwrap_or(1).max(1) as f64 * 1.1;
    let end = trace.last().map_or(1.0, |p| p.0).max(1.0);
    let x_of = |at: f64| left + at / end * (width - left - right);
    let y_of = |share: f64| height - bottom - share * (height - bottom - top);
    let mut svg = svg_frame(right, title, "seconds since the start", "acked/s", max_rate);
    for (color, values, label) in [
        (
            "#1f77b4",
            trace
                .iter()
                .map(|p| (p.0, p.2 / max_rate))
                .collect::<Vec<_>>(),
            "acked/s".to_owned(),
        ),
        (
            "#ff7f0e",
            trace
                .iter()
                .map(|p| (p.0, p.1 as f64 / max_window))
                .collect(),
            format!("window (top = {:.0}k)", max_window / 1000.0),
        ),
    ] {
        let line: Vec<String> = values
            .iter()
            .map(|&(at, share)| format!("{:.1},{:.1}", x_of(at), y_of(share)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        let legend_y = if color == "#1f77b4" { 56.0 } else { 72.0 };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{legend_y}\" fill=\"{color}\">{label}</text>",
            left + 10.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Prints the adaptive window's debug lines (each change of the window, with the sample that
/// made it), for `MAYHEM_BENCH=window-auto`.
struct WindowLines;

impl log::Log for WindowLines {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("mayhem::pipeline::service")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) && record.level() == log::Level::Debug {
            println!("  {}", record.args());
        }
    }

    fn flush(&self) {}
}

fn main() {
    let only = std::env::var("MAYHEM_BENCH").unwrap_or_default();
    if ["redis", "payload", "amqp", "pubsub", "peers"].contains(&only.as_str()) {
        let rows = match only.as_str() {
            "redis" => redis::rows(REDIS_MESSAGES),
            "payload" => redis::payload_only(),
            "amqp" => amqp_rows(AMQP_MESSAGES),
            "peers" => peer_rows(PEER_MESSAGES),
            _ => pubsub_rows(PUBSUB_MESSAGES),
        };
        for row in rows {
            println!("{row}");
        }
        return;
    }
    if only == "noop" {
        return noop_ab();
    }
    if only == "window-auto" {
        // `auto` alone on each workload, with its trace and the controller's own lines: for
        // tuning the controller.
        log::set_logger(&WindowLines).expect("the first logger");
        log::set_max_level(log::LevelFilter::Debug);
        for workload in [
            window::Workload::Slow,
            window::Workload::Database,
            window::Workload::Cpu,
        ] {
            let run = workload.run(mayhem::AUTO_CEILING, true);
            println!(
                "{workload:?}: {:.0} acked/s from 10 s, p99 {:.1} ms",
                run.span_rate(),
                run.p99_ms
            );
            for (at, window, rate) in window::points(&run) {
                println!("{at:>5.1} s  window {window:>8}  {rate:>9.0} acked/s");
            }
        }
        return;
    }
    if only == "window-fixed" {
        // One fixed window of workload (a), MAYHEM_BENCH_WINDOW (default 2,000,000), with its
        // trace: to see where a large window's goodput goes.
        let window = std::env::var("MAYHEM_BENCH_WINDOW")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(2_000_000);
        let run = window::Workload::Slow.run(window, false);
        println!("window {window}: {:.0} acked/s from 10 s", run.span_rate());
        for sample in run.trace.iter().skip(1) {
            println!(
                "{:>5.1} s  held {:>8}  {:>9.0} acked/s",
                sample.at, sample.held, sample.rate
            );
        }
        return;
    }
    if only == "window" {
        // Only the rows of `--max-in-flight auto`, their tables and plots.
        let rows = window::Rows::run(window::Sweep::run(window::Workload::Slow));
        for (at, window, rate) in window::points(&rows.sweeps[0].auto) {
            println!("{at:>5.1} s  window {window:>8}  {rate:>9.0} acked/s");
        }
        println!("{}", rows.tables());
        let root = env!("CARGO_MANIFEST_DIR");
        write_or_warn(
            &format!("{root}/benches/window.svg"),
            &plot_window(&window::points(&rows.sweeps[0].auto), WINDOW_TITLE),
        );
        rows.plot(root);
        return;
    }
    match std::env::args().nth(1).as_deref() {
        Some("child-rss") => return child_rss(),
        Some("child-in-flight") => return child_in_flight(),
        _ => {}
    }
    let messages: u64 = std::env::var("MAYHEM_BENCH_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000);
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    println!("mayhem bench: {cpus} CPUs, {messages} messages per headline run, {RUNS} runs each\n");

    // Sweep publishers x consumers x workers.
    let mut sweep = Vec::new();
    for &publishers in &SWEEP {
        for &consumers in &SWEEP {
            for &workers in &SWEEP {
                let rate = pipeline(publishers, consumers, workers, SWEEP_MESSAGES);
                println!("sweep p={publishers} c={consumers} w={workers}: {rate:>12.0} msg/s");
                sweep.push(((publishers, consumers, workers), rate));
            }
        }
    }
    let best = sweep
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(setting, _)| *setting)
        .unwrap_or((1, 1, cpus));
    let default = (1, 1, cpus);

    // The best setting and the bare bridge alternate run by run, so that both see the same
    // machine; each run also gives the process's CPU time per message.
    let (mut best_rates, mut best_cpu, mut bare_rates, mut bare_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let before = cpu_seconds();
        best_rates.push(pipeline(best.0, best.1, best.2, messages));
        let middle = cpu_seconds();
        bare_rates.push(bare_bridge(cpus, messages));
        let after = cpu_seconds();
        best_cpu.push((middle - before) * 1e9 / messages as f64);
        bare_cpu.push((after - middle) * 1e9 / messages as f64);
    }
    let (best_runs, bare_runs) = (stats(best_rates), stats(bare_rates));
    let (best_cpu, bare_cpu) = (stats(best_cpu), stats(bare_cpu));
    let default_runs = stats(
        (0..RUNS)
            .map(|_| pipeline(default.0, default.1, default.2, messages))
            .collect(),
    );
    let ratio = best_runs.median / bare_runs.median;

    let peak_rss_kb = child("child-rss");
    let per_message_bytes = child("child-in-flight");
    let library_stop = stats((0..RUNS).map(|_| library_shutdown_ms(4, 4)).collect());
    let binary_stop = stats((0..RUNS).map(|_| binary_shutdown_ms()).collect());
    let redis_rows = redis::rows(REDIS_MESSAGES.min(messages));
    let amqp_rows = amqp_rows(AMQP_MESSAGES.min(messages));
    let pubsub_rows = pubsub_rows(PUBSUB_MESSAGES.min(messages));
    let peer_rows = peer_rows(PEER_MESSAGES.min(messages));
    // The binary users build (`make build`: default features), which `make bench` builds
    // first and names in MAYHEM_BENCH_BINARY; and the one this bench runs (its features).
    let default_binary = std::env::var("MAYHEM_BENCH_BINARY").ok();
    let default_bytes = default_binary
        .as_deref()
        .and_then(|path| std::fs::metadata(path).ok())
        .map(|m| m.len());
    let binary_bytes = std::fs::metadata(env!("CARGO_BIN_EXE_mayhem")).map_or(0, |m| m.len());
    // The goodput curve: workload (a) of the window rows, `auto` and each of WINDOWS, its
    // goodput over GOODPUT_SPAN after GOODPUT_WARMUP; and where `auto`'s window was at the
    // end. Then the rest of the window rows.
    let slow = window::Sweep::run(window::Workload::Slow);
    let curve_rate = |run: &window::Run| {
        let from = GOODPUT_WARMUP.as_secs_f64();
        run.rate(from, from + GOODPUT_SPAN.as_secs_f64())
    };
    let (auto_rate, auto_window, auto_trace) = (
        curve_rate(&slow.auto),
        slow.auto.end_window(),
        window::points(&slow.auto),
    );
    println!("goodput window auto: {auto_rate:>10.0} acked/s (window {auto_window} at the end)");
    let goodput: Vec<(usize, f64)> = slow
        .fixed
        .iter()
        .map(|(window, run)| (*window, curve_rate(run)))
        .collect();
    let window_rows = window::Rows::run(slow);

    let overload = overload_run();

    let mut table = String::new();
    let _ = writeln!(table, "Measured by `make bench` on {cpus} CPUs ({messages} messages per throughput run, {RUNS} runs: median, min-max).\n");
    let _ = writeln!(table, "| figure | measured | target |");
    let _ = writeln!(table, "|---|---|---|");
    let _ = writeln!(
        table,
        "| messages/s, best setting (p={} c={} w={}) | {} | >= 1,000,000 |",
        best.0,
        best.1,
        best.2,
        best_runs.show(0)
    );
    let _ = writeln!(
        table,
        "| messages/s, defaults (p=1 c=1 w={}) | {} | |",
        default.2,
        default_runs.show(0)
    );
    let _ = writeln!(
        table,
        "| messages/s, bare bridge (1 producer, {cpus} workers) | {} | |",
        bare_runs.show(0)
    );
    let _ = writeln!(
        table,
        "| ratio best / bare bridge (medians) | {ratio:.2} | >= 1.0 |"
    );
    let _ = writeln!(
        table,
        "| CPU time per message (user + system, all threads): best setting / bare bridge | {} ns / {} ns | |",
        best_cpu.show(0),
        bare_cpu.show(0)
    );
    for row in redis_rows
        .iter()
        .chain(&amqp_rows)
        .chain(&pubsub_rows)
        .chain(&peer_rows)
    {
        let _ = writeln!(table, "{row}");
    }
    let _ = writeln!(
        table,
        "| peak RSS, {RSS_MESSAGES} messages to completion | {:.1} MB | <= 20 MB |",
        peak_rss_kb / 1024.0
    );
    let _ = writeln!(table, "| memory per message in flight ({IN_FLIGHT} in flight; the chaos monkey's 11-byte data, a host name: empty data is no host name and would be rejected, not held) | {per_message_bytes:.0} B | <= 1.6 KB |");
    let _ = writeln!(table, "| shutdown, programmatic trigger to `run` returning (4 consumers, 4 workers, idle) | {} ms | |", library_stop.show(2));
    let _ = writeln!(
        table,
        "| shutdown, SIGTERM to exit of the binary (idle handlers) | {} ms | <= 20 ms |",
        binary_stop.show(2)
    );
    match default_bytes {
        Some(bytes) => {
            let _ = writeln!(
                table,
                "| release binary, default features (stripped) | {:.2} MB | <= 3 MB |",
                bytes as f64 / 1e6
            );
        }
        None => {
            let _ = writeln!(
                table,
                "| release binary, default features (stripped) | not measured: run `make bench`, which builds it | <= 3 MB |"
            );
        }
    }
    let _ = writeln!(
        table,
        "| release binary, the bench's features{} (stripped) | {:.2} MB | |",
        if cfg!(feature = "amqp") {
            ": redis and amqp"
        } else {
            ": redis"
        },
        binary_bytes as f64 / 1e6
    );
    let _ = writeln!(
        table,
        "| overload run: `--messages {OVERLOAD_MESSAGES} --max-in-flight {OVERLOAD_MESSAGES} --max-backlog {OVERLOAD_MESSAGES} --publish-interval 0 --handler-latency 1s`, failure rates 0 | {} | every message acked, 0 expired, 0 dead-lettered, <= 20 s, < 100 lines at warn, <= 1.6 KB per message in flight |",
        overload.show()
    );
    let peak = goodput.iter().map(|(_, rate)| *rate).fold(0.0, f64::max);
    // Capacity is reached at the first window whose goodput comes within 80 % of the peak;
    // from there on, as the window grows, goodput must stay within 80 % of the peak.
    let saturated_at = goodput
        .iter()
        .position(|(_, rate)| *rate >= 0.8 * peak)
        .unwrap_or(0);
    let worst_past_capacity = goodput[saturated_at..]
        .iter()
        .map(|(_, rate)| *rate)
        .fold(peak, f64::min);
    let _ = writeln!(
        table,
        "\nGoodput against the flow-control window (handlers of 1 s latency, no failures; acked/s over {}s after a {}s warm-up; plotted in `benches/goodput.svg`):\n",
        GOODPUT_SPAN.as_secs(),
        GOODPUT_WARMUP.as_secs()
    );
    let _ = writeln!(table, "| window | acked/s | share of peak |");
    let _ = writeln!(table, "|---|---|---|");
    for (window, rate) in &goodput {
        let _ = writeln!(
            table,
            "| {window} | {rate:.0} | {:.0} % |",
            rate / peak.max(1.0) * 100.0
        );
    }
    let _ = writeln!(
        table,
        "| auto (window {auto_window} at the end) | {auto_rate:.0} | {:.0} % |",
        auto_rate / peak.max(1.0) * 100.0
    );
    let _ = writeln!(
        table,
        "\nFrom the window where it first reaches 80 % of its peak ({}) on, goodput keeps {:.0} % of the peak at worst (target: >= 80 %).",
        goodput[saturated_at].0,
        worst_past_capacity / peak.max(1.0) * 100.0
    );
    table.push_str(&window_rows.tables());
    let _ = writeln!(
        table,
        "\nSweep ({SWEEP_MESSAGES} messages per point, one run each), messages/s:\n"
    );
    let _ = writeln!(
        table,
        "| publishers | consumers | workers=1 | workers=2 | workers=4 |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|");
    for &publishers in &SWEEP {
        for &consumers in &SWEEP {
            let cells: Vec<String> = SWEEP
                .iter()
                .map(|&workers| {
                    let rate = sweep
                        .iter()
                        .find(|(setting, _)| *setting == (publishers, consumers, workers))
                        .map_or(0.0, |(_, rate)| *rate);
                    format!("{rate:.0}")
                })
                .collect();
            let _ = writeln!(
                table,
                "| {publishers} | {consumers} | {} |",
                cells.join(" | ")
            );
        }
    }
    println!("\n{table}");

    let root = env!("CARGO_MANIFEST_DIR");
    write_or_warn(&format!("{root}/benches/results.md"), &table);
    write_or_warn(
        &format!("{root}/benches/throughput.svg"),
        &plot(&sweep, best.0),
    );
    write_or_warn(
        &format!("{root}/benches/goodput.svg"),
        &plot_goodput(&goodput),
    );
    write_or_warn(
        &format!("{root}/benches/window.svg"),
        &plot_window(&auto_trace, WINDOW_TITLE),
    );
    window_rows.plot(root);
    update_readme(&format!("{root}/README.md"), &table);
}

/// Median, minimum and maximum of a few runs.
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.*} ({:.*}-{:.*})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }
}

fn stats(mut values: Vec<f64>) -> Stats {
    values.sort_by(f64::total_cmp);
    Stats {
        median: values[values.len() / 2],
        min: values[0],
        max: values[values.len() - 1],
    }
}

/// `acked_per_sec` of a run of the binary against the broker at `source`, with no latency
/// and no failures, `window` messages in flight and 2 consumers, plus `args` (the Redis and
/// RabbitMQ rows).
fn binary_rate(source: &str, window: &str, args: &[&str]) -> Option<f64> {
    let output = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args(["--source", source])
        .args(["--handler-latency", "0", "--restart-failure-rate", "0"])
        .args([
            "--save-failure-rate",
            "0",
            "--log-level",
            "warn",
            "--report",
            "json",
        ])
        .args(["--max-in-flight", window, "--consumers", "2"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let key = "\"acked_per_sec\":";
    let rest = &stdout[stdout.find(key)? + key.len()..];
    rest[..rest.find([',', '}'])?].parse().ok()
}

/// `MAYHEM_BENCH=noop`: the no-op pipeline (1 publisher, 1 consumer, 1 and all workers) and
/// the bare bridge, interleaved run by run so that both see the same machine, with the
/// ratio of the medians. Beside the rate, the CPU time the process spent per message (user
/// plus system, all threads): a figure that other load on the machine disturbs far less.
fn noop_ab() {
    let messages: u64 = std::env::var("MAYHEM_BENCH_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000);
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    for run in 0..RUNS {
        let mut line = format!("run {run}:");
        for (index, name) in ["pipeline w=1", "pipeline w=all", "bare bridge"]
            .iter()
            .enumerate()
        {
            let before = cpu_seconds();
            let rate = match index {
                0 => pipeline(1, 1, 1, messages),
                1 => pipeline(1, 1, cpus, messages),
                _ => bare_bridge(cpus, messages),
            };
            let nanos = (cpu_seconds() - before) * 1e9 / messages as f64;
            rates[index].push(rate);
            cpu[index].push(nanos);
            let _ = write!(line, "  {name} {rate:>10.0}/s {nanos:>4.0} ns CPU/msg");
        }
        println!("{line}");
    }
    let [one, all, bare] = rates.map(stats);
    let [one_cpu, all_cpu, bare_cpu] = cpu.map(stats);
    println!(
        "rate medians: w=1 {} / w={cpus} {} / bare {}: ratios {:.2} and {:.2}",
        one.show(0),
        all.show(0),
        bare.show(0),
        one.median / bare.median,
        all.median / bare.median
    );
    println!(
        "CPU ns per message, medians: w=1 {} / w={cpus} {} / bare {}",
        one_cpu.show(0),
        all_cpu.show(0),
        bare_cpu.show(0),
    );
}

/// CPU time of this process so far (user plus system, every thread), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` writes into the zeroed struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A configuration for pure throughput: no pauses, no latency, no failures.
fn fast_config(publishers: usize, consumers: usize, workers: usize, messages: u64) -> Config {
    let mut config = Config::default();
    config.publish.publishers = publishers;
    config.run.consumers = consumers;
    config.run.workers = workers;
    config.run.messages = Some(messages);
    config.publish.interval = Duration::ZERO;
    config.handler.latency = Duration::ZERO;
    config.handler.restart_failure_rate = 0.0;
    config.handler.save_failure_rate = 0.0;
    config.run.seed = Some(1);
    config
}

/// Messages per second through the real pipeline, publish to ack.
fn pipeline(publishers: usize, consumers: usize, workers: usize, messages: u64) -> f64 {
    let config = fast_config(publishers, consumers, workers, messages);
    let subscription = Subscription::new(config.subscription());
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
    let report = Runner::new(&config)
        .publisher(&subscription)
        .run(&subscription, &handler, &Shutdown::new())
        .expect("valid bench config");
    assert!(
        report.is_balanced() && report.acked == messages,
        "{report:?}"
    );
    report.acked_per_sec
}

/// Messages per second through a bare bridge: one producer thread, a bounded async_channel
/// with `send_blocking`, and `workers` executor threads spawning one task per message.
fn bare_bridge(workers: usize, messages: u64) -> f64 {
    let executor = Arc::new(Executor::new());
    let (sender, receiver) = async_channel::bounded::<u64>(1000);
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let (done, finished) = async_channel::bounded::<()>(1);
    let handled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (executor, receiver, stopped, handled, done) = (
                executor.clone(),
                receiver.clone(),
                stopped.clone(),
                handled.clone(),
                done.clone(),
            );
            thread::spawn(move || {
                future::block_on(executor.run(async {
                    while let Ok(value) = receiver.recv().await {
                        let (handled, done) = (handled.clone(), done.clone());
                        executor
                            .spawn(async move {
                                std::hint::black_box(value);
                                if handled.fetch_add(1, Ordering::Relaxed) + 1 == messages {
                                    let _ = done.try_send(());
                                }
                            })
                            .detach();
                    }
                    let _ = stopped.recv().await;
                }))
            })
        })
        .collect();
    for value in 0..messages {
        sender.send_blocking(value).expect("receivers alive");
    }
    future::block_on(finished.recv()).expect("done sender alive");
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    sender.close();
    stop.close();
    for thread in threads {
        thread.join().expect("bare bridge thread");
    }
    rate
}

/// The overload run of the binary, as an operator would start it.
struct Overload {
    wall: Duration,
    report: String,
    warn_lines: usize,
    peak_rss_kb: f64,
}

impl Overload {
    fn show(&self) -> String {
        let field = |name: &str| -> String {
            self.report
                .split(&format!("\"{name}\":"))
                .nth(1)
                .and_then(|rest| rest.split([',', '}']).next())
                .unwrap_or("?")
                .to_owned()
        };
        format!(
            "acked {}, expired {}, dead-lettered {}, {:.1} s wall, {} log lines, peak RSS {:.0} MB = {:.0} B per message in flight",
            field("acked"),
            field("expired"),
            field("dead_lettered"),
            self.wall.as_secs_f64(),
            self.warn_lines,
            self.peak_rss_kb / 1024.0,
            self.peak_rss_kb * 1024.0 / OVERLOAD_MESSAGES as f64
        )
    }
}

/// Runs the release binary on the overload settings at `--log-level warn`, sampling its
/// peak RSS from /proc while it runs.
fn overload_run() -> Overload {
    let count = OVERLOAD_MESSAGES.to_string();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--messages",
            &count,
            "--max-in-flight",
            &count,
            "--max-backlog",
            &count,
            "--publish-interval",
            "0",
            "--handler-latency",
            "1s",
            "--restart-failure-rate",
            "0",
            "--save-failure-rate",
            "0",
            "--log-level",
            "warn",
            "--report",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let status_path = format!("/proc/{}/status", child.id());
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = thread::spawn(move || BufReader::new(stderr).lines().count());
    let mut peak_rss_kb: f64 = 0.0;
    while child.try_wait().expect("wait for the binary").is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            }) {
                peak_rss_kb = peak_rss_kb.max(kb);
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    let wall = started.elapsed();
    let output = child
        .wait_with_output()
        .expect("collect the binary's output");
    Overload {
        wall,
        report: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        warn_lines: lines.join().expect("stderr reader"),
        peak_rss_kb,
    }
}

/// The frame both plots share (640x400, margins of 90, 50 and 40 and `right`): the title,
/// the axes with their labels, and four grid lines from 0 to `max_rate`.
fn svg_frame(right: f64, title: &str, x_label: &str, y_label: &str, max_rate: f64) -> String {
    let (width, height, left, bottom, top) = (640.0, 400.0, 90.0, 50.0, 40.0);
    let y_of = |rate: f64| height - bottom - rate / max_rate * (height - bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"20\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {})\">{y_label}</text>\n",
        width / 2.0,
        height - bottom,
        width - right,
        height - bottom,
        height - bottom,
        (left + width - right) / 2.0,
        height - 12.0,
        height / 2.0,
        height / 2.0
    );
    for step in 0..=4 {
        let rate = max_rate * f64::from(step) / 4.0;
        let y = y_of(rate);
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}k</text>",
            width - right,
            left - 6.0,
            y + 4.0,
            rate / 1000.0
        );
    }
    svg
}

/// The goodput curve as an SVG line chart, window on a log scale.
fn plot_goodput(points: &[(usize, f64)]) -> String {
    let (width, height, left, bottom, top, right) = (640.0, 400.0, 90.0, 50.0, 40.0, 40.0);
    let max_rate = points.iter().map(|(_, rate)| *rate).fold(1.0, f64::max) * 1.1;
    let (low, high) = (
        (points.first().map_or(1, |p| p.0) as f64).log10(),
        (points.last().map_or(10, |p| p.0) as f64).log10(),
    );
    let x_of = |window: usize| {
        left + ((window as f64).log10() - low) / (high - low).max(1e-9) * (width - left - right)
    };
    let y_of = |rate: f64| height - bottom - rate / max_rate * (height - bottom - top);
    let mut svg = svg_frame(
        right,
        "Mayhem goodput against the flow-control window (1 s handlers)",
        "--max-in-flight (log scale)",
        "acked/s",
        max_rate,
    );
    let line: Vec<String> = points
        .iter()
        .map(|&(window, rate)| format!("{:.1},{:.1}", x_of(window), y_of(rate)))
        .collect();
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>",
        line.join(" ")
    );
    for &(window, rate) in points {
        let (x, y) = (x_of(window), y_of(rate));
        let label = if window >= 1_000_000 {
            format!("{}M", window / 1_000_000)
        } else {
            format!("{}k", window / 1000)
        };
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"#1f77b4\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            height - bottom + 16.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Runs this bench binary in a child mode and parses the one number it prints.
fn child(mode: &str) -> f64 {
    let exe = std::env::current_exe().expect("bench executable path");
    let output = Command::new(exe)
        .arg(mode)
        .output()
        .expect("run bench child");
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("child {mode} printed {text:?}"))
}

/// A field of /proc/self/status in kB, like `VmHWM` (peak RSS) or `VmRSS`.
fn proc_status_kb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Child: peak RSS (kB) of a full run of `RSS_MESSAGES` with the default thread counts.
fn child_rss() {
    let cpus = thread::available_parallelism().map_or(2, |n| n.get());
    let config = fast_config(1, 1, cpus, RSS_MESSAGES);
    let subscription = Subscription::new(config.subscription());
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
    let report = Runner::new(&config)
        .publisher(&subscription)
        .run(&subscription, &handler, &Shutdown::new())
        .expect("valid bench config");
    assert!(report.is_balanced());
    println!("{}", proc_status_kb("VmHWM"));
}

/// Child: bytes of RSS per message held in flight by slow handlers.
fn child_in_flight() {
    let mut config = Config::default();
    config.publish.publishers = 0;
    config.run.consumers = 1;
    config.run.workers = 2;
    config.run.max_in_flight = IN_FLIGHT;
    config.memory.max_backlog = IN_FLIGHT;
    config.handler.latency = Duration::from_secs(3600);
    config.lease.ack_deadline = Duration::from_secs(600);
    config.lease.extend_interval = Duration::from_secs(300);
    config.run.grace_period = Duration::ZERO;
    config.run.seed = Some(1);
    let subscription = Subscription::new(config.subscription());
    let mut rng = fastrand::Rng::with_seed(1);
    let batch: Vec<PubSubMessage> = (0..IN_FLIGHT)
        .map(|_| PubSubMessage::random(&mut rng))
        .collect();
    subscription.publish(&batch).expect("room in the backlog");
    drop(batch);
    let metrics = Metrics::default();
    let before = proc_status_kb("VmRSS");
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
    let shutdown = Shutdown::new();
    let measured = thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            // Wait until every message was pulled, then give the executor time to poll each
            // new task once (so each holds its timers), and measure.
            while metrics.in_flight() < IN_FLIGHT {
                thread::sleep(Duration::from_millis(10));
            }
            thread::sleep(Duration::from_millis(500));
            let after = proc_status_kb("VmRSS");
            shutdown.trigger(ShutdownReason::Requested);
            after
        });
        let report = Runner::new(&config)
            .metrics(&metrics)
            .publisher(&subscription)
            .run(&subscription, &handler, &shutdown)
            .expect("valid bench config");
        assert!(report.is_balanced());
        watcher.join().expect("watcher")
    });
    println!("{}", (measured - before) * 1024.0 / IN_FLIGHT as f64);
}

/// Milliseconds from a programmatic trigger to `run` returning, with idle threads blocked.
fn library_shutdown_ms(consumers: usize, workers: usize) -> f64 {
    let mut config = Config::default();
    config.run.consumers = consumers;
    config.run.workers = workers;
    config.publish.interval = Duration::from_secs(3600);
    config.handler.latency = Duration::ZERO;
    config.run.seed = Some(1);
    let subscription = Subscription::new(config.subscription());
    let handler = MayhemHandler::new(MayhemConfig::from_config(&config, 1));
    let shutdown = Shutdown::new();
    thread::scope(|scope| {
        let service = scope.spawn(|| {
            let report = Runner::new(&config)
                .publisher(&subscription)
                .run(&subscription, &handler, &shutdown)
                .expect("valid bench config");
            (report, Instant::now())
        });
        // Until the one published message is acked, so every thread is idle and blocked.
        while subscription.settled() < 1 {
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(100));
        let triggered = Instant::now();
        shutdown.trigger(ShutdownReason::Requested);
        let (report, returned) = service.join().expect("service thread");
        assert!(report.is_balanced());
        (returned - triggered).as_secs_f64() * 1000.0
    })
}

/// Milliseconds from SIGTERM to the exit of the binary, with idle handlers.
fn binary_shutdown_ms() -> f64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mayhem"))
        .args([
            "--publish-interval",
            "1h",
            "--handler-latency",
            "0",
            "--report",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mayhem");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        if line.expect("stderr line").contains("Done. Acked") {
            break;
        }
    }
    thread::spawn(move || lines.for_each(drop));
    thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    loop {
        if let Some(status) = child.try_wait().expect("wait for mayhem") {
            assert_eq!(status.code(), Some(0));
            return sent.elapsed().as_secs_f64() * 1000.0;
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// An SVG line chart: throughput against consumers, one line per worker count.
fn plot(sweep: &[((usize, usize, usize), f64)], publishers: usize) -> String {
    let (width, height, left, bottom, top, right) = (640.0, 400.0, 90.0, 50.0, 40.0, 120.0);
    let points: Vec<_> = sweep
        .iter()
        .filter(|((p, _, _), _)| *p == publishers)
        .collect();
    let max_rate = points.iter().map(|(_, rate)| *rate).fold(1.0, f64::max) * 1.1;
    let x_of = |consumers: usize| {
        let index = SWEEP.iter().position(|&c| c == consumers).unwrap_or(0) as f64;
        left + index * (width - left - right) / (SWEEP.len() - 1) as f64
    };
    let y_of = |rate: f64| height - bottom - rate / max_rate * (height - bottom - top);
    let mut svg = svg_frame(
        right,
        &format!("Mayhem throughput ({publishers} publisher(s), {SWEEP_MESSAGES} messages)"),
        "consumer threads",
        "messages/s",
        max_rate,
    );
    for &consumers in &SWEEP {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{consumers}</text>",
            x_of(consumers),
            height - bottom + 16.0
        );
    }
    for (index, &workers) in SWEEP.iter().enumerate() {
        let colour = ["#1f77b4", "#ff7f0e", "#2ca02c"][index % 3];
        let line: Vec<String> = SWEEP
            .iter()
            .filter_map(|&consumers| {
                let rate = points
                    .iter()
                    .find(|((_, c, w), _)| *c == consumers && *w == workers)?
                    .1;
                Some(format!("{:.1},{:.1}", x_of(consumers), y_of(rate)))
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            line.join(" ")
        );
        for point in &line {
            let (x, y) = point.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                svg,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{colour}\"/>"
            );
        }
        let legend_y = top + 20.0 * index as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{workers} worker(s)</text>",
            width - right + 10.0,
            width - right + 30.0,
            width - right + 35.0,
            legend_y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn write_or_warn(path: &str, text: &str) {
    if let Err(error) = std::fs::write(path, text) {
        eprintln!("could not write {path}: {error}");
    }
}

/// Replaces the README's generated section with `table`.
fn update_readme(path: &str, table: &str) {
    let Ok(readme) = std::fs::read_to_string(path) else {
        return;
    };
    let (Some(start), Some(end)) = (readme.find(MARKERS.0), readme.find(MARKERS.1)) else {
        eprintln!("README has no bench markers; not updated");
        return;
    };
    let updated = format!(
        "{}{}\n{table}\n{}",
        &readme[..start],
        MARKERS.0,
        &readme[end..]
    );
    write_or_warn(path, &updated);
}

// Inline: a `benches/peers/mod.rs` would be left out of the package, which skips
// `benches/peers/`, a cargo project of its own.
mod peers {
    //! The Rust peers of `make bench`, seen from the bench: builds the peers' cargo project
    //! (`benches/peers/Cargo.toml`, a project of its own: tokio is in its tree, never in
    //! mayhem's), runs them, and measures each contender's run the same way.
    //!
    //! Each run gives:
    //! - messages per second (mayhem's `acked_per_sec`; the peer's own `msg_per_sec`);
    //! - the client's CPU per message: user plus system time of the child process, from
    //!   `getrusage(RUSAGE_CHILDREN)` before and after it (the same measure for mayhem and the
    //!   peers: each is a child process the bench waits for, start-up and connection included);
    //! - the broker's CPU per message: user plus system time of its processes from
    //!   `/proc/<pid>/stat` before and after the run (redis-server; the Erlang VM of
    //!   rabbitmq-server).
    //!
    //! `MAYHEM_BENCH=peers make bench` runs the comparison rows alone: mayhem against the peers
    //! on RabbitMQ and Redis.

    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    /// Rounds of each comparison: mayhem and every peer once per round, in turn, each on a
    /// fresh preloaded queue or stream. Medians are shown.
    pub const ROUNDS: usize = 5;

    /// The peers' binaries, or why they are missing.
    pub struct Peers {
        dir: Result<PathBuf, String>,
    }

    impl Peers {
        /// Builds the peers' project in release mode, in `peers/` of the bench's target
        /// directory, with its own lock file (`--locked`). A failed build is printed in full on
        /// stderr, and every peer row says it was not measured, and why.
        pub fn build() -> Peers {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), |dir| root.join(dir))
                .join("peers");
            let manifest = root.join("benches/peers/Cargo.toml");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            eprintln!("building the Rust peers (release): {}", manifest.display());
            let output = Command::new(cargo)
                .args(["build", "--release", "--locked", "--manifest-path"])
                .arg(&manifest)
                .env("CARGO_TARGET_DIR", &target)
                .stdin(Stdio::null())
                .output();
            let dir = match output {
                Ok(output) if output.status.success() => Ok(target.join("release")),
                Ok(output) => {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    eprintln!(
                        "THE RUST PEERS DID NOT BUILD ({}):\n{stderr}",
                        output.status
                    );
                    let error = stderr
                        .lines()
                        .find(|line| line.starts_with("error"))
                        .unwrap_or("see the bench's stderr")
                        .to_owned();
                    Err(format!(
                        "the peers did not build ({}): {error}",
                        output.status
                    ))
                }
                Err(error) => Err(format!(
                    "the peers did not build: cargo did not start: {error}"
                )),
            };
            Peers { dir }
        }

        /// Runs the peer `name` with `args` until it exits; its figures, or why there are none.
        pub fn run(&self, name: &str, args: &[&str]) -> Result<PeerRun, String> {
            let binary = self.dir.as_ref().map_err(Clone::clone)?.join(name);
            let before = children_cpu_seconds();
            let output = Command::new(&binary)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|error| format!("{name} did not start: {error}"))?;
            let client_cpu = children_cpu_seconds() - before;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let field = |key: &str| -> Option<f64> {
                stdout
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            let stderr = String::from_utf8_lossy(&output.stderr);
            match (output.status.success(), field("msg_per_sec"), field("left")) {
                (true, Some(rate), Some(left)) => {
                    if let Some(first) = stderr.lines().next() {
                        println!(
                            "{name} wrote {} lines on stderr, the first: {first}",
                            stderr.lines().count()
                        );
                    }
                    Ok(PeerRun {
                        rate,
                        client_cpu,
                        left: left as u64,
                    })
                }
                _ => Err(format!(
                    "{name} failed ({}): {}",
                    output.status,
                    stderr.lines().last().unwrap_or("no message")
                )),
            }
        }
    }

    /// What one run of a peer measured.
    pub struct PeerRun {
        /// Messages acked per second.
        pub rate: f64,
        /// The process's CPU time, in seconds.
        pub client_cpu: f64,
        /// Messages the broker still held once the peer was done (0 unless an ack was lost).
        pub left: u64,
    }

    /// CPU time (user plus system) of the child processes this process waited for, in seconds.
    pub fn children_cpu_seconds() -> f64 {
        // SAFETY: `getrusage` writes into the zeroed struct it is given and reads nothing else.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
            usage
        };
        let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    /// CPU time (user plus system, every thread) of the processes `pids`, in seconds, from
    /// `/proc/<pid>/stat`.
    pub fn processes_cpu_seconds(pids: &[u32]) -> f64 {
        // SAFETY: sysconf only reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        pids.iter()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // The fields after the command name, which is in parentheses: utime and stime
                // are the 14th and 15th fields of the line, the 12th and 13th after it.
                let rest = &stat[stat.rfind(')')? + 2..];
                let mut fields = rest.split_whitespace().skip(11);
                let user: f64 = fields.next()?.parse().ok()?;
                let system: f64 = fields.next()?.parse().ok()?;
                Some((user + system) / ticks)
            })
            .sum()
    }

    /// The processes whose command line contains `needle`.
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
    pub fn pids_with(needle: &str) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| {
                let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                String::from_utf8_lossy(&cmdline)
                    .contains(needle)
                    .then_some(pid)
            })
            .collect()
    }

    /// The median of what was measured, or `None` when nothing was.
    pub fn median(values: &[f64]) -> Option<f64> {
        let mut values = values.to_vec();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    }

    /// One contender of a comparison: its figures run by run.
    #[derive(Default)]
    pub struct Contender {
        /// Messages per second.
        pub rates: Vec<f64>,
        /// Client CPU, µs per message.
        pub client: Vec<f64>,
        /// Broker CPU, µs per message.
        pub broker: Vec<f64>,
        /// Further figures per message by name (the server's time per command on Redis).
        pub extra: BTreeMap<String, Vec<f64>>,
        /// Calls per run of the commands of `extra`, by the same name.
        pub calls: BTreeMap<String, Vec<f64>>,
        /// The most messages left behind by one run.
        pub left: u64,
        /// Why a run measured nothing (the last such reason).
        pub failure: Option<String>,
    }

    impl Contender {
        /// Records a run of `messages` that took `client_cpu` and `broker_cpu` seconds.
        pub fn record(&mut self, messages: u64, rate: f64, client_cpu: f64, broker_cpu: f64) {
            self.rates.push(rate);
            self.client.push(client_cpu * 1e6 / messages as f64);
            self.broker.push(broker_cpu * 1e6 / messages as f64);
        }

        /// The median rate.
        pub fn rate(&self) -> Option<f64> {
            median(&self.rates)
        }

        /// The median broker CPU per message.
        #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
        pub fn broker_cpu(&self) -> Option<f64> {
            median(&self.broker)
        }

        /// The measured column of its row: medians of msg/s, client and broker CPU per
        /// message, the further figures, and the rates run by run.
        pub fn show(&self, broker: &str) -> String {
            let Some(rate) = self.rate() else {
                return format!(
                    "NOT MEASURED: {}",
                    self.failure.as_deref().unwrap_or("no run succeeded")
                );
            };
            let us = |values: &[f64]| {
                median(values).map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
            };
            let mut text = format!(
                "{rate:.0} msg/s; client CPU {} µs/msg; {broker} CPU {} µs/msg",
                us(&self.client),
                us(&self.broker)
            );
            if !self.extra.is_empty() {
                let extra: Vec<String> = self
                    .extra
                    .iter()
                    .map(|(name, values)| {
                        match self.calls.get(name).and_then(|calls| median(calls)) {
                            Some(calls) => format!("{name} {} ({calls:.0} calls)", us(values)),
                            None => format!("{name} {}", us(values)),
                        }
                    })
                    .collect();
                let _ = write!(text, "; server time per message (µs): {}", extra.join(", "));
            }
            let runs: Vec<String> = self.rates.iter().map(|v| format!("{v:.0}")).collect();
            let _ = write!(text, " (runs {})", runs.join(", "));
            if self.left > 0 {
                let _ = write!(
                    text,
                    "; UP TO {} MESSAGES LEFT UNACKED AFTER A RUN",
                    self.left
                );
            }
            if let Some(why) = &self.failure {
                let _ = write!(text, "; a run failed: {why}");
            }
            text
        }
    }

    /// `a / b` of two medians, or `-`.
    pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
        a.zip(b)
            .map_or_else(|| "-".to_owned(), |(a, b)| format!("{:.2}", a / b))
    }
}
