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
//! on RabbitMQ and Redis (and on the Pub/Sub emulator where a peer is built for it).

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
        let us =
            |values: &[f64]| median(values).map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut text = format!(
            "{rate:.0} msg/s; client CPU {} µs/msg; {broker} CPU {} µs/msg",
            us(&self.client),
            us(&self.broker)
        );
        if !self.extra.is_empty() {
            let extra: Vec<String> = self
                .extra
                .iter()
                .map(
                    |(name, values)| match self.calls.get(name).and_then(|calls| median(calls)) {
                        Some(calls) => format!("{name} {} ({calls:.0} calls)", us(values)),
                        None => format!("{name} {}", us(values)),
                    },
                )
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
